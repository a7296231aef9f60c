"""Dataset registry: names, options, coercion and errors."""

from __future__ import annotations

import pytest
import torch

import equimodal.data as data
from equimodal.data import MultimodalDataset, TensorSplit, dataset_options, list_datasets, load_dataset


def test_builtin_datasets_are_registered() -> None:
    assert {"mfeat", "avdigits", "avdigits_hard", "custom_npz", "custom_csv"} <= set(list_datasets())


def test_every_loader_takes_a_seed() -> None:
    for name in list_datasets():
        assert dataset_options(name)["seed"] == 0


def test_unknown_dataset_suggests_close_names() -> None:
    with pytest.raises(ValueError, match="Unknown dataset 'mfet'. Did you mean 'mfeat'"):
        load_dataset("mfet")


def test_unknown_option_lists_valid_options() -> None:
    with pytest.raises(
        TypeError, match=r"unknown option\(s\) \['view'\]. Did you mean 'views'.*Valid options: seed=0"
    ):
        load_dataset("mfeat", view="pix")


def test_missing_required_option() -> None:
    with pytest.raises(TypeError, match=r"Dataset 'custom_npz' needs option\(s\) \['path'\]"):
        load_dataset("custom_npz")


def test_string_options_are_coerced_to_the_default_type() -> None:
    ds = load_dataset("mfeat", seed="2", views="fac,mor", pix_image="false")
    assert ds.info["options"] == {"seed": 2, "views": "fac,mor", "pix_image": False}
    with pytest.raises(TypeError, match="option 'seed': expected an integer"):
        load_dataset("mfeat", seed="two")


def _toy_loader(*, seed: int = 0, size: int = 4) -> MultimodalDataset:
    g = torch.Generator().manual_seed(seed)

    def split() -> TensorSplit:
        return TensorSplit(
            {"a": torch.randn(size, 3, generator=g), "b": torch.randn(size, 2, generator=g)},
            torch.arange(size) % 2,
        )

    return MultimodalDataset("toy", split(), split(), split(), 2, ["a", "b"], dict)


def test_register_dataset_and_duplicate_names(monkeypatch: pytest.MonkeyPatch) -> None:
    registry = data.registry.DATASETS
    monkeypatch.setattr(registry, "_items", dict(registry._items))
    data.register_dataset("toy_test")(_toy_loader)
    assert "toy_test" in list_datasets()
    assert len(load_dataset("toy_test", size="6").train) == 6
    assert dataset_options("toy_test") == {"seed": 0, "size": 4}
    with pytest.raises(ValueError, match="already registered"):
        data.register_dataset("toy_test")(_toy_loader)
    with pytest.raises(TypeError, match="class or function"):
        data.register_dataset("bad")(3)  # type: ignore[arg-type]

    @data.register_dataset("toy_decorated")
    def toy2(*, seed: int = 0) -> MultimodalDataset:
        return _toy_loader(seed=seed)

    assert len(load_dataset("toy_decorated").val) == 4
