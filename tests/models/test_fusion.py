"""The model contract for every registered fusion, and ``MultimodalClassifier``'s input errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import ToyEncoder, make_toy_batch, make_toy_model
from torch import nn

import equimodal as em
from equimodal.models import create_fusion, list_fusions
from equimodal.types import check_output

torch.set_num_threads(1)

SPLIT_EXACTLY = ["concat", "sum"]  # fusions whose unimodal logits sum to the fused logits


@pytest.mark.parametrize("fusion", list_fusions())
def test_output_follows_the_contract(fusion: str, num_modalities: int) -> None:
    model = make_toy_model(num_modalities, num_classes=3, fusion=fusion)
    batch, y = make_toy_batch(num_modalities, batch_size=5)
    out = model(batch)
    assert isinstance(out, em.MultimodalOutput)
    names = [f"m{i}" for i in range(num_modalities)]
    assert model.modalities == names
    assert list(out.unimodal_logits) == names
    assert out.logits.shape == (5, 3)
    assert all(z.shape == (5, 3) for z in out.unimodal_logits.values())
    assert {m: f.shape for m, f in out.features.items()} == {m: (5, 8) for m in names}
    check_output(out, model.modalities, y)
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("fusion", list_fusions())
def test_fused_logits_train_the_encoders(fusion: str, num_modalities: int) -> None:
    model = make_toy_model(num_modalities, fusion=fusion)
    batch, y = make_toy_batch(num_modalities, batch_size=5)
    F.cross_entropy(model(batch).logits, y).backward()
    for m, enc in model.encoders.items():
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in enc.parameters()), m
        assert any(p.grad.abs().sum() > 0 for p in enc.parameters()), m


@pytest.mark.parametrize("fusion", SPLIT_EXACTLY)
def test_unimodal_logits_sum_to_fused(fusion: str, num_modalities: int) -> None:
    model = make_toy_model(num_modalities, fusion=fusion)
    batch, _ = make_toy_batch(num_modalities, batch_size=5)
    out = model(batch)
    torch.testing.assert_close(torch.stack(list(out.unimodal_logits.values())).sum(0), out.logits)
    assert not model.auxiliary_heads


def test_concat_unimodal_logits_use_column_blocks(num_modalities: int) -> None:
    model = make_toy_model(num_modalities, fusion="concat")
    batch, _ = make_toy_batch(num_modalities, batch_size=5)
    out = model(batch)
    fc = model.fusion.fc
    torch.testing.assert_close(out.logits, fc(torch.cat(list(out.features.values()), 1)))
    blocks = model.fusion.modality_blocks()
    assert list(blocks) == model.modalities
    start = 0
    for m, (weight, cols) in blocks.items():
        assert weight is fc.weight and cols == slice(start, start + 8)
        expected = out.features[m] @ fc.weight[:, cols].t() + fc.bias / num_modalities
        torch.testing.assert_close(out.unimodal_logits[m], expected)
        start += 8
    assert start == fc.weight.shape[1]


def test_weighted_fusion_combines_own_heads(num_modalities: int) -> None:
    model = make_toy_model(num_modalities, fusion="weighted")
    with torch.no_grad():
        model.fusion.alpha.copy_(torch.arange(num_modalities, dtype=torch.float))
    batch, _ = make_toy_batch(num_modalities, batch_size=5)
    out = model(batch)
    w = model.fusion.weights()
    torch.testing.assert_close(w.sum(), torch.tensor(float(num_modalities)))
    fused = sum(w[i] * out.unimodal_logits[m] for i, m in enumerate(model.modalities))
    torch.testing.assert_close(out.logits, fused)


AUXILIARY = [name for name in list_fusions() if create_fusion(name, {"a": 4, "b": 4}, 3).auxiliary]


def test_fusions_that_cannot_be_split_are_auxiliary() -> None:
    assert {"film", "gated", "attention"} <= set(AUXILIARY)
    assert not set(SPLIT_EXACTLY) & set(AUXILIARY)


@pytest.mark.parametrize("fusion", AUXILIARY)
def test_auxiliary_heads_see_detached_features(fusion: str, num_modalities: int) -> None:
    model = make_toy_model(num_modalities, fusion=fusion)
    assert model.auxiliary_heads
    batch, y = make_toy_batch(num_modalities, batch_size=5)
    out = model(batch)
    sum(F.cross_entropy(z, y) for z in out.unimodal_logits.values()).backward()
    for m, enc in model.encoders.items():
        assert all(p.grad is None for p in enc.parameters()), f"{fusion}: encoder {m} got a gradient"
    for m, head in model.fusion.aux.items():
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters()), m
    # the auxiliary loss never reaches the fusion's own (non-auxiliary) parameters either
    aux_ids = {id(p) for p in model.fusion.aux.parameters()}
    assert all(p.grad is None for p in model.fusion.parameters() if id(p) not in aux_ids)


def test_fewer_than_two_encoders() -> None:
    for encoders in ({}, {"m0": ToyEncoder(5)}):
        with pytest.raises(ValueError, match=rf"at least 2 encoders, found {len(encoders)}"):
            em.MultimodalClassifier(encoders, num_classes=3)


def test_encoder_without_out_dim() -> None:
    bare = nn.Sequential(nn.Linear(5, 4))
    with pytest.raises(ValueError, match=r"modality 'm1' \(Sequential\) has no positive integer `out_dim`"):
        em.MultimodalClassifier({"m0": ToyEncoder(5), "m1": bare}, num_classes=3)
    # the documented fix: feature_dims
    model = em.MultimodalClassifier({"m0": ToyEncoder(5), "m1": bare}, num_classes=3, feature_dims={"m1": 4})
    out = model({"m0": torch.randn(2, 5), "m1": torch.randn(2, 5)})
    assert out.logits.shape == (2, 3)


def test_batch_missing_a_modality_names_it() -> None:
    model = make_toy_model(3)
    batch, _ = make_toy_batch(3, batch_size=4)
    del batch["m1"]
    with pytest.raises(ValueError, match=r"missing modality \['m1'\]"):
        model(batch)


def test_batch_must_be_a_mapping() -> None:
    model = make_toy_model(2)
    batch, _ = make_toy_batch(2, batch_size=4)
    with pytest.raises(TypeError, match="mapping of modality name to tensor"):
        model(list(batch.values()))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_names_the_modality(bad: float) -> None:
    model = make_toy_model(2)
    batch, _ = make_toy_batch(2, batch_size=4)
    batch["m0"][1, 2] = bad
    with pytest.raises(ValueError, match=r"modality 'm0' holds 1 non-finite"):
        model(batch)
    model.validate_inputs = False  # the documented opt-out skips the check
    assert model(batch).logits.shape == (4, 3)


def test_unknown_fusion_name_gives_close_matches() -> None:
    with pytest.raises(ValueError, match=r"Unknown fusion 'concatt'.*Did you mean 'concat'") as info:
        make_toy_model(2, fusion="concatt")
    assert all(name in str(info.value) for name in list_fusions())


def test_fusion_instance_is_used_as_given() -> None:
    head = create_fusion("sum", {"m0": 8, "m1": 8}, 3)
    model = em.MultimodalClassifier({"m0": ToyEncoder(5), "m1": ToyEncoder(6)}, 3, fusion=head)
    assert model.fusion is head


def test_fusion_argument_errors() -> None:
    with pytest.raises(ValueError, match="at least 2 modalities"):
        create_fusion("concat", {"a": 4}, 3)
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        create_fusion("concat", {"a": 4, "b": 4}, 1)
    with pytest.raises(ValueError, match="divisible by heads"):
        create_fusion("attention", {"a": 4, "b": 4}, 3, d_model=10, heads=4)
