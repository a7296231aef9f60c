"""Mask-unit discovery by module type, head boundaries, the selection API and bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import make_toy_model
from torch import nn

import equimodal as em
from equimodal.amss.units import UnitTensor, discover_units, encoder_units
from equimodal.models.encoders import create_encoder


class MixedEncoder(nn.Module):
    """Conv1d/2d/3d, BatchNorm, a skipped block and a Linear (forward is not needed for discovery)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(2, 3, 3)
        self.c2 = nn.Conv2d(3, 5, 3)
        self.c3 = nn.Conv3d(5, 7, 1)
        self.bn = nn.BatchNorm2d(5)
        self.skipped = nn.Sequential(nn.Conv2d(5, 5, 1), nn.Conv2d(5, 5, 1))
        self.skipped.amss_skip = True
        self.fc = nn.Linear(7, 4)
        self.out_dim = 4


def names(units: list[UnitTensor]) -> list[str]:
    return [u.name for u in units]


def test_every_layer_type_found_by_type_and_markers_respected() -> None:
    enc = MixedEncoder()
    units = encoder_units(enc, "a")  # default: every layer type, a conv does not switch Linear rows off
    assert names(units) == ["c1", "c2", "c3", "fc"]
    assert [(u.kind, u.groups, u.units) for u in units] == [
        ("filters", 1, 3),
        ("filters", 1, 5),
        ("filters", 1, 7),
        ("rows", 1, 4),
    ]
    assert all(u.param.dim() >= 2 for u in units)  # never biases or norms
    assert names(encoder_units(enc, "a", linear_rows="auto")) == ["c1", "c2", "c3"]  # the old rule, explicit
    assert names(encoder_units(enc, "a", linear_rows=False)) == ["c1", "c2", "c3"]
    assert names(encoder_units(enc, "a", exclude=[enc.c2])) == ["c1", "c3", "fc"]
    assert names(encoder_units(enc, "a", exclude=lambda n, m: isinstance(m, nn.Conv3d))) == ["c1", "c2", "fc"]
    assert names(encoder_units(enc, "a", include=[enc.fc, enc.c1])) == ["c1", "fc"]
    assert names(encoder_units(enc, "a", include=lambda n, m: n.startswith("skipped"))) == []


def test_linear_rows_auto_only_without_structured_units() -> None:
    mlp = create_encoder("mlp", in_dim=6, hidden=(8, 4))
    units = encoder_units(mlp, "a")
    assert [(u.kind, u.units) for u in units] == [("rows", 8), ("rows", 4)]
    assert encoder_units(mlp, "a", linear_rows=False) == []
    with pytest.raises(ValueError, match="linear_rows"):
        encoder_units(mlp, "a", linear_rows="yes")  # type: ignore[arg-type]


def test_resnet18_follows_the_official_choice() -> None:
    enc = create_encoder("resnet18", in_channels=1, base_channels=8)
    units = encoder_units(enc, "audio")
    assert len(units) == 16  # conv1 and conv2 of 8 basic blocks; stem and downsample carry amss_skip
    assert all(u.kind == "filters" and "layer" in u.name for u in units)
    assert not any("downsample" in u.name or "stem" in u.name for u in units)


def test_frozen_parameters_are_not_masked() -> None:
    enc = MixedEncoder()
    enc.c2.weight.requires_grad_(False)
    assert names(encoder_units(enc, "a")) == ["c1", "c3", "fc"]


def _mha_grads(mha: nn.MultiheadAttention) -> None:
    for p in mha.parameters():
        p.grad = torch.randn_like(p)


def test_attention_head_units_match_head_boundaries() -> None:
    embed, heads = 8, 2
    dh = embed // heads
    mha = nn.MultiheadAttention(embed, heads)
    enc = nn.Sequential(nn.Linear(4, embed), mha)
    units = encoder_units(enc, "t", linear_rows=False)
    by_kind = {u.kind: u for u in units}
    assert set(by_kind) == {"head_rows", "head_cols"}
    assert [u.kind for u in encoder_units(enc, "t")] == ["rows", "head_rows", "head_cols"]  # the Linear too
    qkv, out = by_kind["head_rows"], by_kind["head_cols"]
    assert (qkv.groups, qkv.units, out.groups, out.units) == (3, heads, 1, heads)
    _mha_grads(mha)
    g_in, g_out = mha.in_proj_weight.grad.clone(), mha.out_proj.weight.grad.clone()
    expected_in = torch.stack([g_in[h * dh : (h + 1) * dh].pow(2).sum() for h in range(3 * heads)])
    torch.testing.assert_close(qkv.sq_norms(g_in), expected_in)
    expected_out = torch.stack([g_out[:, h * dh : (h + 1) * dh].pow(2).sum() for h in range(heads)])
    torch.testing.assert_close(out.sq_norms(g_out), expected_out)
    mask_in = torch.arange(1.0, 3 * heads + 1)
    qkv.apply_(mha.in_proj_weight.grad, mask_in)
    for h in range(3 * heads):
        torch.testing.assert_close(
            mha.in_proj_weight.grad[h * dh : (h + 1) * dh], g_in[h * dh : (h + 1) * dh] * mask_in[h]
        )
    mask_out = torch.tensor([0.0, 2.0])
    out.apply_(mha.out_proj.weight.grad, mask_out)
    for h in range(heads):
        torch.testing.assert_close(
            mha.out_proj.weight.grad[:, h * dh : (h + 1) * dh], g_out[:, h * dh : (h + 1) * dh] * mask_out[h]
        )


def test_separate_projections_with_declared_heads() -> None:
    q, k, v, o = nn.Linear(6, 12), nn.Linear(6, 12), nn.Linear(6, 12), nn.Linear(12, 6)
    ffn = nn.Linear(6, 6)
    enc = nn.ModuleDict({"q": q, "k": k, "v": v, "o": o, "ffn": ffn})
    o.amss_heads = (3, "cols")  # the marker form
    units = encoder_units(enc, "t", heads={q: (3, "rows"), k: (3, "rows"), v: (3, "rows")})
    assert [(u.name, u.kind, u.units) for u in units] == [
        ("q", "head_rows", 3),
        ("k", "head_rows", 3),
        ("v", "head_rows", 3),
        ("o", "head_cols", 3),
        ("ffn", "rows", 6),
    ]
    g = torch.randn(12, 6)
    torch.testing.assert_close(units[0].sq_norms(g), g.view(3, 4, 6).pow(2).sum((1, 2)))


def test_head_count_must_divide_the_projection() -> None:
    q = nn.Linear(6, 12)
    with pytest.raises(ValueError, match="Head count 5 does not divide the output size 12"):
        encoder_units(nn.Sequential(q), "t", heads={q: (5, "rows")})
    o = nn.Linear(12, 6)
    with pytest.raises(ValueError, match="does not divide the input size 12"):
        encoder_units(nn.Sequential(o), "t", heads={o: (5, "cols")})
    with pytest.raises(ValueError, match="head declaration"):
        encoder_units(nn.Sequential(o), "t", heads={o: (4, "columns")})
    with pytest.raises(TypeError, match="only nn.Linear"):
        conv = nn.Conv1d(2, 4, 1)
        encoder_units(nn.Sequential(conv), "t", heads={conv: (2, "rows")})


def test_fusion_blocks_per_row_elements() -> None:
    model = make_toy_model(3, num_classes=4)
    units = discover_units(model, ["m0", "m1", "m2"])
    fusion = [u for u in units["m1"] if u.kind == "row_elements"]
    assert len(fusion) == 1
    u = fusion[0]
    assert (u.groups, u.units, u.columns) == (4, 8, slice(8, 16))
    g = torch.randn_like(model.fusion.fc.weight)
    torch.testing.assert_close(u.sq_norms(g), g[:, 8:16].pow(2).reshape(-1))
    assert all(
        u.kind != "row_elements" for u in discover_units(model, ["m0", "m1", "m2"], mask_fusion=False)["m1"]
    )


def test_no_maskable_units_is_a_clear_error() -> None:
    model = make_toy_model(2)
    for enc in model.encoders.values():
        enc.amss_skip = True
    with pytest.raises(ValueError, match="no maskable units for modality 'm0'"):
        em.create_balancer("amss", model, mask_fusion=False)
    em.create_balancer("amss", model)  # the fusion blocks alone are enough


def test_shared_encoder_parameters_are_refused() -> None:
    model = make_toy_model(2)
    model.encoders["m1"].conv = model.encoders["m0"].conv
    with pytest.raises(ValueError, match="shared by the encoders"):
        discover_units(model, ["m0", "m1"])


def test_selector_type_errors() -> None:
    with pytest.raises(TypeError, match="include must be"):
        encoder_units(MixedEncoder(), "a", include=["c1"])  # type: ignore[list-item]
