"""AMSS options for ablation studies: a fixed update ratio (the paper's fixed-ratio ablation), what a unit
of a conv weight is (output filter, input channel, single weight), which layer kinds are masked, and the
fusion-head mask on and off."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_toy_batch, make_toy_model
from torch import Tensor, nn
from torch.nn.utils import parametrizations

import equimodal as em
from equimodal.amss.explain import describe_units
from equimodal.amss.masker import GradientMasker
from equimodal.amss.units import UnitTensor, discover_units, encoder_units
from equimodal.balancers.amss import AMSS
from equimodal.models import MultimodalClassifier
from equimodal.testing import check_balancer

torch.set_num_threads(1)
RATIOS = (0.1, 0.3, 0.5, 0.7, 0.9)
D, HEADS, FF = 16, 4, 24


def ceil_count(k: float, n: int) -> int:
    """``ceil(k n)``, with ``k n`` within 1e-6 of an integer taken as that integer (as the masker does)."""
    return max(1, min(n, math.ceil(k * n * (1 - 1e-6))))


class ConvNet(nn.Module):
    """Convs of different widths (one grouped), then a Linear: groups of several sizes."""

    def __init__(self, groups: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 10, 3, padding=1, groups=groups)
        self.fc = nn.Linear(10, 8)
        self.out_dim = 8

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(h.mean((2, 3)))


class TinyTransformer(nn.Module):
    """A transformer encoder (nn.TransformerEncoderLayer: attention heads and an FFN), mean-pooled."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv1d(5, D, 1)
        layer = nn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.0, batch_first=True)
        self.blocks = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.out_dim = D

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.embed(x).transpose(1, 2)).mean(1)


def conv_model(groups: int = 1) -> MultimodalClassifier:
    torch.manual_seed(0)
    return MultimodalClassifier({"image": ConvNet(groups), "other": ConvNet(1)}, num_classes=3)


def conv_batch(n: int = 8) -> tuple[dict[str, Tensor], Tensor]:
    g = torch.Generator().manual_seed(1)
    return {m: torch.randn(n, 3, 6, 6, generator=g) for m in ("image", "other")}, torch.arange(n) % 3


def transformer_model() -> MultimodalClassifier:
    torch.manual_seed(0)
    return MultimodalClassifier({"seq": TinyTransformer(), "other": ConvNet()}, num_classes=3)


def transformer_batch(n: int = 6) -> tuple[dict[str, Tensor], Tensor]:
    g = torch.Generator().manual_seed(2)
    return {"seq": torch.randn(n, 5, 7, generator=g), "other": torch.randn(n, 3, 6, 6, generator=g)}, (
        torch.arange(n) % 3
    )


def random_grads_step(
    balancer: AMSS, model: nn.Module, batch: dict[str, Tensor], y: Tensor
) -> dict[str, Tensor]:
    """One step whose gradients are replaced by random non-zero ones before masking; returns them."""
    model.zero_grad()
    balancer.loss(model(batch), y).backward()
    g = torch.Generator().manual_seed(5)
    before = {}
    for name, p in model.named_parameters():
        p.grad = torch.randn(p.shape, generator=g) + 3.0  # never exactly zero
        before[name] = p.grad.clone()
    balancer.before_step()
    return before


def kept_per_group(u: UnitTensor) -> list[int]:
    return (u.sq_norms(u.param.grad) > 0).view(u.groups, u.units).sum(1).tolist()


# ------------------------------------------------------------------------------------ fixed ratio
@pytest.mark.parametrize("sampler", ["adaptive", "uniform", "topk"])
@pytest.mark.parametrize("ratio", RATIOS)
def test_fixed_ratio_keeps_ceil_k_n_units_per_group(sampler: str, ratio: float) -> None:
    model = conv_model()
    balancer = em.create_balancer("amss", model, ratio=ratio, sampler=sampler, conv_units="filters", seed=3)
    random_grads_step(balancer, model, *conv_batch())
    stats = balancer.stats()
    for m in ("image", "other"):
        assert stats[f"k/{m}"] == pytest.approx(ratio)
        assert math.isfinite(stats[f"rho/{m}"]) and math.isfinite(stats[f"mi/{m}"])  # still computed, logged
        units = balancer.units[m]
        for u in units:
            expected = ceil_count(ratio, u.units)
            assert kept_per_group(u) == [expected] * u.groups, (u.name, sampler)
            assert stats[f"layer_kept/{m}/{u.name}"] == pytest.approx(expected / u.units)
        total = sum(u.num_units for u in units)
        kept = sum(u.groups * ceil_count(ratio, u.units) for u in units)
        assert stats[f"kept_fraction/{m}"] == pytest.approx(kept / total)


@pytest.mark.parametrize("name", ["amss", "amss_plus", "uniform_mask"])
def test_fixed_ratio_overrides_the_fallback_and_the_clamp(name: str) -> None:
    model = make_toy_model(3)
    balancer = em.create_balancer(name, model, ratio=1.0, offset=-100.0, k_max=0.5)  # fallback fires
    batch, y = make_toy_batch(3, 16, seed=0)
    balancer.loss(model(batch), y).backward()
    before = [p.grad.clone() for p in model.parameters()]
    balancer.before_step()
    s = balancer.stats()
    assert s["fallback"] == 1 and all(s[f"k/{m}"] == 1.0 for m in balancer.modalities)
    assert all(s[f"kept_fraction/{m}"] == 1.0 for m in balancer.modalities)
    if name != "amss_plus":  # k = 1 keeps everything, weight 1
        assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), before, strict=True))


def test_default_ratio_is_adaptive() -> None:
    model = make_toy_model(2)
    balancer = em.create_balancer("amss", model)
    assert balancer.parts.ratio.fixed is None
    batch, y = make_toy_batch(2, 16, seed=0)
    balancer.loss(model(batch), y).backward()
    balancer.before_step()
    s = balancer.stats()
    if s["fallback"] == 0:
        expected = 1 / (1 + math.exp(-(s["rho/m1"] - s["rho/m0"]) / 0.2))
        assert s["k/m0"] == pytest.approx(min(max(expected, 0.1), 0.9), abs=1e-5)


# ------------------------------------------------------------------------------------ conv units
@pytest.mark.parametrize("groups", [1, 2])
def test_input_channel_units_keep_whole_input_channel_slices(groups: int) -> None:
    model = conv_model(groups)
    balancer = em.create_balancer("amss", model, conv_units="input_channels", ratio=0.5, seed=4)
    convs = [u for u in balancer.units["image"] if u.kind == "input_channels"]
    assert [(u.name, u.groups, u.units, u.conv_groups) for u in convs] == [
        ("encoders.image.conv1", 1, 3, 1),
        ("encoders.image.conv2", 1, 6, groups),
    ]
    before = random_grads_step(balancer, model, *conv_batch())
    for u, name in zip(convs, ("conv1", "conv2"), strict=True):
        conv: nn.Conv2d = getattr(model.encoders["image"], name)
        full = before[f"encoders.image.{name}.weight"]
        grad = conv.weight.grad
        out_per, in_per = conv.out_channels // conv.groups, conv.in_channels // conv.groups
        kept = []
        for c in range(conv.in_channels):
            rows = slice((c // in_per) * out_per, (c // in_per + 1) * out_per)  # the filters reading c
            part, ref = grad[rows, c % in_per], full[rows, c % in_per]
            assert torch.equal(part, ref) or bool((part == 0).all()), (name, c)  # for every output filter
            kept.append(torch.equal(part, ref))
        assert sum(kept) == ceil_count(0.5, conv.in_channels)
        dropped = conv.in_channels - sum(kept)
        assert int((grad == 0).sum()) == dropped * out_per * conv.weight[0, 0].numel()  # only those slices
        scores = u.sq_norms(full)
        expected = torch.stack(
            [
                full[(c // in_per) * out_per : (c // in_per + 1) * out_per, c % in_per].pow(2).sum()
                for c in range(conv.in_channels)
            ]
        )
        torch.testing.assert_close(scores, expected)


def test_depthwise_input_channels_are_its_filters() -> None:
    conv = nn.Conv2d(4, 4, 3, groups=4)
    (u,) = encoder_units(conv, "a", conv_units="input_channels")
    (f,) = encoder_units(conv, "a")
    conv.weight.grad = torch.randn_like(conv.weight)
    torch.testing.assert_close(u.sq_norms(conv.weight.grad), f.sq_norms(conv.weight.grad))


@pytest.mark.parametrize("ratio", [0.3, 0.7])
def test_single_weight_units_keep_about_k_of_the_elements(ratio: float) -> None:
    model = conv_model()
    balancer = em.create_balancer("amss", model, conv_units="weights", ratio=ratio, seed=6)
    convs = [u for u in balancer.units["image"] if u.kind == "filter_elements"]
    conv2 = model.encoders["image"].conv2
    assert (convs[1].groups, convs[1].units) == (10, 6 * 9)  # one group per output filter
    before = random_grads_step(balancer, model, *conv_batch())
    full = before["encoders.image.conv2.weight"]
    torch.testing.assert_close(convs[1].sq_norms(full), full.pow(2).flatten())  # a weight's own g^2
    grad = conv2.weight.grad
    kept = grad != 0
    assert torch.equal(grad[kept], full[kept])
    assert kept.flatten(1).sum(1).tolist() == [ceil_count(ratio, 54)] * 10  # per filter
    assert abs(kept.float().mean().item() - ratio) <= 1 / 54
    # memory: rows = output filters (plus fusion rows), width = the widest filter, not the widest tensor
    lay = balancer.masker.layout()
    rows = sum(u.groups for us in balancer.units.values() for u in us)
    assert tuple(lay.norms.shape) == (rows, max(u.units for us in balancer.units.values() for u in us))
    assert lay.norms.shape[1] < conv2.weight.numel()


@pytest.mark.parametrize("conv_units", ["input_channels", "weights"])
def test_channels_last_gradients_are_masked_in_place(conv_units: str) -> None:
    conv = nn.Conv2d(4, 6, 3).to(memory_format=torch.channels_last)
    (u,) = encoder_units(conv, "a", conv_units=conv_units)
    conv.weight.grad = (torch.randn(conv.weight.shape) + 3.0).to(memory_format=torch.channels_last)
    masker = GradientMasker({"a": [u]})
    masker.apply(torch.tensor([0.5]), torch.Generator().manual_seed(0))
    frac = (conv.weight.grad != 0).float().mean().item()
    assert frac == pytest.approx(0.5, abs=0.03)


def test_weight_norm_conv_is_refused_for_non_filter_units() -> None:
    conv = parametrizations.weight_norm(nn.Conv2d(3, 4, 3))
    assert encoder_units(conv, "a")[0].members  # filters: g joins its filter
    with pytest.raises(ValueError, match="these units are input channels"):
        encoder_units(conv, "a", conv_units="input_channels")
    with pytest.raises(ValueError, match="these units are single weights"):
        encoder_units(conv, "a", conv_units="weights")


# ------------------------------------------------------------------------------------ layer kinds
ATTENTION_KINDS = ("head_rows", "head_cols")


def _grads_equal(model: nn.Module, before: dict[str, Tensor], keys: list[str]) -> bool:
    params = dict(model.named_parameters())
    return all(torch.equal(params[k].grad, before[k]) for k in keys)


def test_layer_kinds_attention_only_masks_attention_projections() -> None:
    model = transformer_model()
    balancer = em.create_balancer("amss", model, layer_kinds={"attention"}, ratio=0.5)
    assert [u.kind for u in balancer.units["other"]] == ["row_elements"]  # a CNN: its fusion block only
    seq = [u for u in balancer.units["seq"] if u.kind != "row_elements"]
    assert {u.kind for u in seq} == set(ATTENTION_KINDS)
    assert all(".self_attn." in u.name for u in seq)
    before = random_grads_step(balancer, model, *transformer_batch())
    ffn = [n for n in before if n.startswith("encoders.seq.") and (".linear1." in n or ".linear2." in n)]
    embed = [n for n in before if n.startswith("encoders.seq.embed")]
    assert ffn and _grads_equal(model, before, ffn + embed)  # FFN rows and the conv untouched
    attn = [n for n in before if n.endswith(("in_proj_weight", "out_proj.weight"))]
    assert not _grads_equal(model, before, attn)
    for u in seq:
        assert kept_per_group(u) == [ceil_count(0.5, HEADS)] * u.groups
    report = describe_units(model, layer_kinds={"attention"})
    row = {r.name: r for r in report.modalities["seq"]}["encoders.seq.blocks.layers.0.linear1.weight"]
    assert not row.masked and row.note == "layer kind 'linear' not selected (layer_kinds=attention)"
    conv = {r.name: r for r in report.modalities["other"]}["encoders.other.conv1.weight"]
    assert conv.note == "layer kind 'conv' not selected (layer_kinds=attention)"


def test_layer_kinds_linear_only_masks_ffn_neurons() -> None:
    model = transformer_model()
    balancer = em.create_balancer("amss", model, layer_kinds=["linear"], ratio=0.5)
    seq = [u for u in balancer.units["seq"] if u.kind != "row_elements"]
    assert [u.name.removeprefix("encoders.seq.blocks.layers.") for u in seq] == [
        "0.linear1",
        "0.linear2",
        "1.linear1",
        "1.linear2",
    ]
    before = random_grads_step(balancer, model, *transformer_batch())
    attn = [n for n in before if n.startswith("encoders.seq") and "self_attn" in n]
    assert attn and _grads_equal(model, before, attn)  # every attention projection untouched
    for u in seq:
        assert kept_per_group(u) == [ceil_count(0.5, u.units)]
    report = describe_units(model, layer_kinds="linear")
    rows = {r.name: r for r in report.modalities["seq"]}
    for name in ("in_proj_weight", "out_proj.weight"):
        row = rows[f"encoders.seq.blocks.layers.1.self_attn.{name}"]
        assert not row.masked and row.note == "layer kind 'attention' not selected (layer_kinds=linear)"
    assert rows["fusion.fc.weight"].masked  # the fusion head follows mask_fusion, not layer_kinds


def test_layer_kinds_conv_against_linear_and_report_matches_balancer() -> None:
    model = conv_model()
    for kinds, expected in (
        (("conv",), {"filters"}),
        ("linear", {"rows"}),
        ("conv,linear", {"filters", "rows"}),
    ):
        balancer = em.create_balancer("amss_plus", model, layer_kinds=kinds, mask_fusion=False)
        assert {u.kind for us in balancer.units.values() for u in us} == expected
        report = describe_units(model, "amss_plus", layer_kinds=kinds, mask_fusion=False)
        assert {m: [u.name for u in us] for m, us in report.units.items()} == {
            m: [u.name for u in us] for m, us in balancer.units.items()
        }
    report = describe_units(model, layer_kinds=["linear", "conv"], conv_units="weights")
    assert report.selection.layer_kinds == ("conv", "linear")
    assert "conv_units='weights', layer_kinds=('conv', 'linear'))" in str(report).splitlines()[0]
    assert "conv_units" not in str(describe_units(model)).splitlines()[0]  # defaults: as before


def test_layer_kinds_on_bert_split_heads_from_ffn() -> None:
    pytest.importorskip("transformers")
    from test_units_transformers import LAYERS, tiny_model

    model = tiny_model()
    found = discover_units(model, ["text", "other"], layer_kinds="attention")["text"]
    attention = [u for u in found if u.kind != "row_elements"]  # the fusion block follows mask_fusion
    prefix = "encoders.text.bert.encoder.layer"
    expected = []
    for i in range(LAYERS):
        expected += [f"{prefix}.{i}.attention.self.{p}" for p in ("query", "key", "value")]
        expected.append(f"{prefix}.{i}.attention.output.dense")  # BERT's output projection: attention
    assert [u.name for u in attention] == expected
    linear = discover_units(model, ["text", "other"], layer_kinds="linear", mask_fusion=False)["text"]
    names = [u.name for u in linear]
    assert f"{prefix}.0.intermediate.dense" in names and f"{prefix}.0.output.dense" in names
    assert not set(names) & set(expected) and {u.kind for u in linear} == {"rows"}


# ------------------------------------------------------------------------------------ fusion mask
def test_mask_fusion_on_and_off() -> None:
    grads = {}
    for mask_fusion in (True, False):
        model = make_toy_model(2)
        balancer = em.create_balancer("amss", model, mask_fusion=mask_fusion, ratio=0.5, seed=1)
        batch, y = make_toy_batch(2, 16, seed=0)
        random_grads_step(balancer, model, batch, y)
        fused = [u for us in balancer.units.values() for u in us if u.kind == "row_elements"]
        assert len(fused) == (2 if mask_fusion else 0)
        grads[mask_fusion] = model.fusion.fc.weight.grad
        for u in fused:
            assert kept_per_group(u) == [ceil_count(0.5, u.units)] * u.groups
        conv = balancer.units["m0"][0]
        assert kept_per_group(conv) == [ceil_count(0.5, conv.units)]  # encoders masked either way
    assert bool((grads[True] == 0).any()) and not bool((grads[False] == 0).any())


# ------------------------------------------------------------------------------------ errors, contract
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ratio": 0.0}, r"ratio must lie in \(0, 1\]"),
        ({"ratio": 1.5}, r"ratio must lie in \(0, 1\]"),
        ({"ratio": -0.3}, r"ratio must lie in \(0, 1\]"),
        ({"ratio": float("nan")}, r"ratio must lie in \(0, 1\]"),
        ({"conv_units": "channels"}, "conv_units'? must be one of"),
        ({"layer_kinds": "ffn"}, r"unknown layer kind\(s\) 'ffn'"),
        ({"layer_kinds": ["conv", "heads"]}, r"unknown layer kind\(s\) 'heads'"),
        ({"layer_kinds": []}, "layer_kinds must name at least one"),
        ({"layer_kinds": [1]}, "layer_kinds must be None"),
        ({"layer_kinds": "attention", "mask_fusion": False}, "no maskable units.*layer_kinds=attention"),
    ],
)
def test_bad_values_give_the_documented_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        em.create_balancer("amss", make_toy_model(2), **kwargs)


def test_bad_values_without_the_registry() -> None:
    model = make_toy_model(2)
    with pytest.raises(ValueError, match="conv_units must be one of 'filters', 'input_channels', 'weights'"):
        AMSS(model, conv_units="filter")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"ratio must lie in \(0, 1\]"):
        AMSS(model, ratio=True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="conv_units must be one of"):
        encoder_units(model.encoders["m0"], "m0", conv_units="rows")  # type: ignore[arg-type]


def test_strings_from_a_command_line_are_accepted() -> None:
    balancer = em.create_balancer(
        "amss", make_toy_model(2), ratio="0.3", layer_kinds="conv", conv_units="weights"
    )
    assert balancer.parts.ratio.fixed == 0.3
    assert {u.kind for us in balancer.units.values() for u in us} == {"filter_elements", "row_elements"}


@pytest.mark.parametrize(
    "options",
    [
        {
            "ratio": 0.3,
            "conv_units": "input_channels",
            "layer_kinds": ["conv", "linear"],
            "sampler": "uniform",
        },
        {
            "ratio": 0.7,
            "conv_units": "weights",
            "layer_kinds": "conv",
            "sampler": "topk",
            "mask_fusion": False,
        },
    ],
)
def test_contract_suite_passes_with_study_options(options: dict) -> None:
    check_balancer("amss", options=options)


def test_contract_suite_passes_for_amss_plus_with_single_weights() -> None:
    check_balancer("amss_plus", options={"ratio": 0.5, "conv_units": "weights"}, modalities=(2,))


@pytest.mark.parametrize(
    "options",
    [{"head_weight": 1.0}, {"significance": "speed"}, {"significance": "speed", "head_weight": 0.5}],
)
def test_own_heads_and_speed_significance_pass_the_contract(options: dict) -> None:
    """AMSS with unimodal heads of its own, or with learning-speed significance, is a full balancer."""
    import equimodal as em
    from equimodal import testing

    assert testing.check_balancer("amss", options=options, modalities=(2, 3))  # raises on a broken promise
    model = testing.toy_model(2)
    bal = em.create_balancer("amss", model, **options)
    assert bal.requirements.parameters and len(list(bal.parameters())) == 4  # a Linear per modality


def test_speed_significance_masks_the_faster_learner_more() -> None:
    """After the warm-up, the modality whose own head's loss falls faster gets the smaller ratio."""
    import torch

    import equimodal as em
    from equimodal.testing import drive_step, toy_batch, toy_model

    model = toy_model(2)
    bal = em.create_balancer("amss", model, significance="speed", temperature=0.2, seed=0)
    bal.set_epoch(0)
    opt = torch.optim.SGD([*model.parameters(), *bal.parameters()], lr=0.2)
    for step in range(40):
        x, y = toy_batch(2, 32, seed=step % 4)
        x["m0"] = torch.randn_like(x["m0"])  # m0 carries no label information: its head cannot learn
        drive_step(bal, model, x, y, opt)
    stats = bal.stats()
    assert stats["fallback"] == 0.0
    assert stats["rho/m1"] > stats["rho/m0"] and stats["k/m1"] < stats["k/m0"]
    with pytest.raises(ValueError, match="option 'significance' must be one of 'confidence', 'speed'"):
        em.create_balancer("amss", model, significance="probe")
