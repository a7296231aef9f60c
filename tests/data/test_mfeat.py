"""The vendored UCI Multiple Features dataset: checksum, views, shapes, split and standardisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from equimodal.data import load_dataset
from equimodal.data.base import make_loader
from equimodal.data.mfeat import MFEAT_DIMS, MFEAT_VIEWS, parse_views, read_mfeat_arrays
from equimodal.data.mfeat import loader as mfeat


@pytest.fixture(scope="module")
def raw() -> dict[str, np.ndarray]:
    return read_mfeat_arrays()


def test_vendored_file_content(raw: dict[str, np.ndarray]) -> None:
    assert set(raw) == {*MFEAT_VIEWS, "label"}
    for v in MFEAT_VIEWS:
        assert raw[v].shape == (2000, MFEAT_DIMS[v]) and raw[v].dtype == np.float32
    assert np.array_equal(np.bincount(raw["label"]), np.full(10, 200))
    pix = raw["pix"]
    assert pix.min() == 0 and pix.max() == 6 and np.array_equal(pix, np.round(pix))


def test_checksum_mismatch_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mfeat, "MFEAT_SHA256", "0" * 64)
    with pytest.raises(
        ValueError, match="Checksum mismatch for the vendored mfeat.npz: expected sha256 0000"
    ):
        load_dataset("mfeat")


def test_default_is_pix_image_plus_fou() -> None:
    ds = load_dataset("mfeat")
    assert ds.name == "mfeat" and ds.num_classes == 10 and ds.modalities == ["pix", "fou"]
    assert ds.input_shapes() == {"pix": (1, 16, 15), "fou": (76,)}
    assert (len(ds.train), len(ds.val), len(ds.test)) == (1200, 400, 400)
    for split, per_class in ((ds.train, 120), (ds.val, 40), (ds.test, 40)):
        assert torch.equal(torch.bincount(split.labels), torch.full((10,), per_class))
    assert ds.info["licence"] == "CC BY 4.0"
    encoders = ds.default_encoders()
    batch, _ = next(iter(make_loader(ds.train, 5)))
    for m, enc in encoders.items():
        assert enc(batch[m]).shape == (5, enc.out_dim)
    assert type(encoders["pix"]).__name__ == "ConvEncoder"
    assert type(encoders["fou"]).__name__ == "MLP"


def test_pix_image_is_upright_rows_of_15(raw: dict[str, np.ndarray]) -> None:
    ds = load_dataset("mfeat", views="pix")
    x = torch.cat([ds.train.inputs["pix"], ds.val.inputs["pix"], ds.test.inputs["pix"]])
    # standardisation is a single affine map, so rank order of pixel values is kept: row r of the image
    # is raw values r*15 .. r*15+14 of the same digit.
    first = ds.train.inputs["pix"][0, 0]
    label = int(ds.train.labels[0])
    candidates = raw["pix"][raw["label"] == label].reshape(-1, 16, 15)
    lo = float(x.min())
    zero_mask = (first == lo).numpy()
    assert any(np.array_equal(zero_mask, c == 0) for c in candidates)


@pytest.mark.parametrize(
    ("views", "names", "shapes"),
    [
        ("fac,mor", ["fac", "mor"], {"fac": (216,), "mor": (6,)}),
        (
            "all",
            list(MFEAT_VIEWS),
            {v: ((1, 16, 15) if v == "pix" else (MFEAT_DIMS[v],)) for v in MFEAT_VIEWS},
        ),
        (["zer", "kar"], ["zer", "kar"], {"zer": (47,), "kar": (64,)}),
    ],
)
def test_view_selection(views: object, names: list[str], shapes: dict[str, tuple[int, ...]]) -> None:
    ds = load_dataset("mfeat", views=views)
    assert ds.modalities == names and ds.input_shapes() == shapes
    assert set(ds.default_encoders()) == set(names)


def test_pix_as_vector() -> None:
    ds = load_dataset("mfeat", views="pix,fou", pix_image=False)
    assert ds.input_shapes() == {"pix": (240,), "fou": (76,)}


def test_standardisation_fitted_on_train_only() -> None:
    ds = load_dataset("mfeat", views="fac,fou", seed=1)
    x = ds.train.inputs["fou"].double()
    torch.testing.assert_close(x.mean(0), torch.zeros(76, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        x.std(0, unbiased=False), torch.ones(76, dtype=torch.float64), atol=1e-4, rtol=0
    )
    assert float(ds.test.inputs["fou"].mean(0).abs().max()) > 1e-3  # test rows were not used for the fit


def test_split_deterministic_by_seed_and_different_across_seeds() -> None:
    a = load_dataset("mfeat", views="fac,mor", seed=5)
    b = load_dataset("mfeat", views="fac,mor", seed=5)
    c = load_dataset("mfeat", views="fac,mor", seed=6)
    assert torch.equal(a.test.inputs["fac"], b.test.inputs["fac"])
    assert torch.equal(a.train.labels, b.train.labels)
    assert not torch.equal(a.test.inputs["fac"], c.test.inputs["fac"])


@pytest.mark.parametrize(
    ("views", "error", "message"),
    [
        (
            "pix,foo",
            ValueError,
            r"Unknown mfeat view\(s\) \['foo'\]. Valid views: fac, fou, kar, mor, pix, zer",
        ),
        ("pix,pix", ValueError, r"listed more than once"),
        (",", ValueError, "Unknown mfeat view"),
        (3, TypeError, "comma-separated string like 'pix,fou'"),
    ],
)
def test_bad_views(views: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        parse_views(views)  # type: ignore[arg-type]


def test_bad_pix_image_option() -> None:
    with pytest.raises(TypeError, match="option 'pix_image': expected true or false"):
        load_dataset("mfeat", pix_image=[1])
