"""Unit discovery on models users write: a ViT with a conv stem, GRU/LSTM encoders, tied weights,
weight-norm parametrizations and sum/weighted fusion heads (each test fails on the rule it replaces)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

import equimodal as em
from equimodal.amss.masker import MASK_STATS, GradientMasker
from equimodal.amss.units import UnitTensor, discover_units, encoder_units
from equimodal.models import MultimodalClassifier, create_encoder

torch.set_num_threads(1)
D, HEADS, FF, LAYERS = 16, 4, 24, 2


class ViT(nn.Module):
    """Conv patch embedding, CLS token, transformer blocks (nn.TransformerEncoderLayer), an MLP head."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, D, 4, 4)
        self.cls = nn.Parameter(torch.zeros(1, 1, D))
        layer = nn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.0, batch_first=True)
        self.blocks = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(D)
        self.mlp = nn.Sequential(nn.Linear(D, FF), nn.GELU(), nn.Linear(FF, D))
        self.out_dim = D

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(len(x), -1, -1), tokens], 1)
        return self.mlp(self.norm(self.blocks(tokens)[:, 0]))


class Block(nn.Module):
    """A hand-written pre-norm block: nn.MultiheadAttention and a Linear MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.attn = nn.MultiheadAttention(D, HEADS, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(D, FF), nn.Linear(FF, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.fc2(torch.relu(self.fc1(self.ln2(x))))


class RNNEncoder(nn.Module):
    def __init__(self, rnn: nn.RNNBase) -> None:
        super().__init__()
        self.rnn = rnn
        self.out_dim = rnn.hidden_size * (2 if rnn.bidirectional else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rnn(x)[0].mean(1)


def vit_model(fusion: str = "concat") -> MultimodalClassifier:
    torch.manual_seed(0)
    encoders = {"image": ViT(), "audio": create_encoder("mlp", in_dim=6, hidden=(8,))}
    return MultimodalClassifier(encoders, num_classes=3, fusion=fusion)


def set_grads(units: dict[str, list[UnitTensor]], seed: int) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    saved = {}
    for u in (u for us in units.values() for u in us):
        for t in getattr(u, "tensors", (u.param,)):
            if id(t) not in saved:
                t.grad = torch.randn(t.shape, generator=g) + 0.1
                saved[id(t)] = t.grad.clone()
    return saved


# ---------------------------------------------------------------------------------------- ViT
def test_vit_every_head_ffn_neuron_and_patch_filter_is_a_unit() -> None:
    model = vit_model()
    units = discover_units(model, ["image", "audio"])["image"]
    table = [(u.name.removeprefix("encoders.image."), u.kind, u.groups, u.units) for u in units]
    expected = [("patch", "filters", 1, D)]
    for i in range(LAYERS):
        expected += [
            (f"blocks.layers.{i}.self_attn.in_proj", "head_rows", 3, HEADS),
            (f"blocks.layers.{i}.self_attn.out_proj", "head_cols", 1, HEADS),
            (f"blocks.layers.{i}.linear1", "rows", 1, FF),
            (f"blocks.layers.{i}.linear2", "rows", 1, D),
        ]
    expected += [("mlp.0", "rows", 1, FF), ("mlp.2", "rows", 1, D), ("fusion[image]", "row_elements", 3, D)]
    assert table == expected
    # the code-faithful rule stays available, explicitly
    old = discover_units(model, ["image", "audio"], linear_rows="auto")["image"]
    assert [u.kind for u in old if u.kind != "row_elements"] == ["filters"] + [
        "head_rows",
        "head_cols",
    ] * LAYERS


def test_vit_hand_written_blocks_and_a_balancer_step_mask_whole_units() -> None:
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Conv1d(3, D, 1), Block(), Block())
    units = encoder_units(enc, "x")
    assert [(u.name, u.kind, u.num_units) for u in units] == [
        ("0", "filters", D),
        ("1.attn.in_proj", "head_rows", 3 * HEADS),
        ("1.attn.out_proj", "head_cols", HEADS),
        ("1.fc1", "rows", FF),
        ("1.fc2", "rows", D),
        ("2.attn.in_proj", "head_rows", 3 * HEADS),
        ("2.attn.out_proj", "head_cols", HEADS),
        ("2.fc1", "rows", FF),
        ("2.fc2", "rows", D),
    ]
    model = vit_model()
    bal = em.create_balancer("amss", model, linear_rows=True, k_max=0.5, temperature=0.5, seed=1)
    x = {"image": torch.randn(6, 3, 8, 8), "audio": torch.randn(6, 6)}
    bal.loss(model(x), torch.arange(6) % 3).backward()
    before = {id(u.param): u.param.grad.clone() for u in bal.units["image"]}
    bal.before_step()
    k = bal.stats()["k/image"]
    for u in bal.units["image"]:
        if u.kind == "row_elements":
            continue
        kept = (u.sq_norms(u.param.grad) > 0).view(u.groups, u.units)
        assert kept.sum(1).tolist() == [math.ceil(k * u.units * (1 - 1e-6))] * u.groups, u.name
        ref = u.unit_view(before[id(u.param)])
        assert torch.equal(u.unit_view(u.param.grad), ref * u.mask_view(kept.reshape(u.grid_shape).float()))


# ---------------------------------------------------------------------------------------- RNNs
RNNS = [
    pytest.param(lambda: nn.GRU(5, 6, num_layers=1, batch_first=True), 3, id="gru"),
    pytest.param(lambda: nn.GRU(5, 6, num_layers=2, bidirectional=True, batch_first=True), 3, id="gru-2-bi"),
    pytest.param(lambda: nn.LSTM(5, 6, num_layers=2, batch_first=True), 4, id="lstm-2"),
    pytest.param(lambda: nn.LSTM(5, 6, num_layers=1, bidirectional=True, batch_first=True), 4, id="lstm-bi"),
    pytest.param(lambda: nn.RNN(5, 6, num_layers=2, batch_first=True), 1, id="rnn-2"),
]


@pytest.mark.parametrize(("make", "gates"), RNNS)
def test_rnn_units_are_the_gate_rows_of_each_hidden_unit(make, gates: int) -> None:
    torch.manual_seed(0)
    rnn = make()
    hidden, dirs = rnn.hidden_size, (["", "_reverse"] if rnn.bidirectional else [""])
    units = encoder_units(rnn, "a", prefix="rnn")
    cells = [f"l{k}{d}" for k in range(rnn.num_layers) for d in dirs]
    assert [(u.name, u.kind, u.units, u.gates) for u in units] == [
        (f"rnn.{c}", "gate_rows", hidden, gates) for c in cells
    ]
    params = dict(rnn.named_parameters())
    for u, c in zip(units, cells, strict=True):
        assert u.param is params[f"weight_ih_{c}"] and u.members == (params[f"weight_hh_{c}"],)
        assert u.param_names == (f"rnn.weight_ih_{c}", f"rnn.weight_hh_{c}")
        for t in u.tensors:
            t.grad = torch.randn_like(t)
        g_ih, g_hh = u.param.grad.clone(), u.members[0].grad.clone()
        rows = [[g * hidden + j for g in range(gates)] for j in range(hidden)]  # the unit's rows
        expected = torch.stack([g_ih[r].pow(2).sum() + g_hh[r].pow(2).sum() for r in rows])
        torch.testing.assert_close(u.unit_sq_norms(), expected)
        mask = (torch.arange(hidden) % 2).float() * 3.0
        for t in u.tensors:
            u.apply_(t.grad, mask)
        for j, r in enumerate(rows):
            assert torch.equal(u.param.grad[r], g_ih[r] * mask[j]) and torch.equal(
                u.members[0].grad[r], g_hh[r] * mask[j]
            )


@pytest.mark.parametrize("sampler", ["adaptive", "uniform"])
def test_masking_keeps_or_zeroes_all_rows_of_a_hidden_unit_together(sampler: str) -> None:
    torch.manual_seed(0)
    encoders = {
        "a": RNNEncoder(nn.LSTM(5, 8, num_layers=2, bidirectional=True, batch_first=True)),
        "b": RNNEncoder(nn.GRU(4, 6, batch_first=True)),
    }
    model = MultimodalClassifier(encoders, num_classes=3)
    bal = em.create_balancer("amss", model, sampler=sampler, seed=2, k_max=0.6, temperature=0.5)
    x = {"a": torch.randn(8, 7, 5), "b": torch.randn(8, 7, 4)}
    bal.loss(model(x), torch.arange(8) % 3).backward()
    biases = {n: p.grad.clone() for n, p in model.named_parameters() if "bias" in n}
    bal.before_step()
    stats = bal.stats()
    assert [[u.kind for u in bal.units[m]].count("gate_rows") for m in ("a", "b")] == [4, 1]  # layers x dirs
    for m in ("a", "b"):
        for u in (u for u in bal.units[m] if u.kind == "gate_rows"):
            hidden, gates = u.units, u.gates
            kept = torch.stack([(t.grad.view(gates, hidden, -1) != 0).any(-1).any(0) for t in u.tensors])
            zero = torch.stack([(t.grad.view(gates, hidden, -1) == 0).all(-1).all(0) for t in u.tensors])
            assert torch.equal(kept, ~zero)  # every unit: all its gate rows in both tensors, or none
            assert torch.equal(kept[0], kept[1])
            assert int(kept[0].sum()) == math.ceil(stats[f"k/{m}"] * hidden * (1 - 1e-6)), u.name
    for n, p in model.named_parameters():
        if n in biases:
            assert torch.equal(p.grad, biases[n]), n  # biases are never masked (the official convention)


def test_rnn_cells_and_lstm_projections() -> None:
    cell = nn.LSTMCell(3, 5)
    (u,) = encoder_units(cell, "a")
    assert (u.kind, u.units, u.gates, u.members) == ("gate_rows", 5, 4, (cell.weight_hh,))
    assert [(u.kind, u.units) for u in encoder_units(nn.GRUCell(3, 5), "a")] == [("gate_rows", 5)]
    lstm = nn.LSTM(3, 6, num_layers=2, proj_size=2)
    units = encoder_units(lstm, "a")
    assert [(u.name, u.kind, u.units) for u in units] == [
        ("l0", "gate_rows", 6), ("l0.proj", "rows", 2), ("l1", "gate_rows", 6), ("l1.proj", "rows", 2),
    ]  # fmt: skip
    assert units[1].param is lstm.weight_hr_l0


# ---------------------------------------------------------------------------------------- tied weights
class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8, bias=False)
        self.b = nn.Linear(8, 8, bias=False)
        self.b.weight = self.a.weight  # tied Parameter
        self.shared = nn.Linear(8, 6)
        self.path = nn.Sequential(nn.ReLU(), self.shared)  # the same module reachable twice
        self.out_dim = 6


def test_tied_weights_are_masked_once_keep_fraction_k_not_k_squared() -> None:
    model = nn.Module()
    model.encoders = nn.ModuleDict({"t": Tied(), "o": nn.Linear(4, 4)})
    units = discover_units(model, ["t", "o"])
    k = 0.5
    fractions, reported = [], []
    for seed in range(20):
        set_grads(units, seed)
        masker = GradientMasker(units, sampler="uniform")
        stats, _ = masker.apply(torch.tensor([k, k]), torch.Generator().manual_seed(seed))
        for w in (model.encoders["t"].a.weight.grad, model.encoders["t"].shared.weight.grad):
            fractions.append(float((w != 0).any(1).float().mean()))  # rows of the weight still updated
        reported.append(float(stats[MASK_STATS.index("kept_fraction"), 0]))
    assert fractions == [k] * 40  # masked twice, the mean would be about k^2 = 0.25
    assert reported == pytest.approx([k] * 20)
    assert [u.name for u in units["t"]] == ["encoders.t.a", "encoders.t.shared"]


def test_shared_between_modalities_refused_unless_excluded_from_one() -> None:
    model = nn.Module()
    shared = nn.Linear(4, 4)
    model.encoders = nn.ModuleDict(
        {"m0": nn.Sequential(shared), "m1": nn.Sequential(shared, nn.Linear(4, 2))}
    )
    with pytest.raises(ValueError, match=r"shared by the encoders of 'm0' \(encoders.m0.0\) and 'm1'"):
        discover_units(model, ["m0", "m1"])
    units = discover_units(model, ["m0", "m1"], exclude=lambda name, m: name == "encoders.m1.0")
    assert [u.name for u in units["m0"]] == ["encoders.m0.0"] and [u.name for u in units["m1"]] == [
        "encoders.m1.1"
    ]


# ---------------------------------------------------------------------------------------- weight norm
def test_weight_norm_is_masked_through_the_parametrization() -> None:
    torch.manual_seed(0)
    conv = parametrizations.weight_norm(nn.Conv1d(2, 4, 3))
    lin = parametrizations.weight_norm(nn.Linear(8, 5))
    enc = nn.Sequential(conv, nn.Flatten(), lin)
    units = encoder_units(enc, "a")
    assert [(u.name, u.kind, u.units) for u in units] == [("0", "filters", 4), ("2", "rows", 5)]
    for u, mod, name in zip(units, (conv, lin), ("0", "2"), strict=True):
        plist = mod.parametrizations.weight
        assert u.param is plist.original1 and u.members == (plist.original0,)  # v, then g
        assert u.param_names == (
            f"{name}.parametrizations.weight.original1",
            f"{name}.parametrizations.weight.original0",
        )
    model = nn.Module()
    model.encoders = nn.ModuleDict({"a": enc, "b": nn.Linear(3, 3)})
    found = discover_units(model, ["a", "b"])
    saved = set_grads(found, 0)
    GradientMasker(found).apply(torch.tensor([0.5, 0.5]), torch.Generator().manual_seed(0))
    for u in found["a"]:
        v, g = u.param.grad.flatten(1), u.members[0].grad.flatten(1)
        kept_v, kept_g = (v != 0).all(1), (g != 0).all(1)
        assert torch.equal(kept_v, kept_g) and torch.equal(kept_v, ~(v == 0).all(1))  # row j of v with g_j
        assert int(kept_v.sum()) == math.ceil(0.5 * u.units)
        torch.testing.assert_close(u.param.grad[kept_v], saved[id(u.param)][kept_v])


def test_old_weight_norm_and_a_training_step() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        lin = nn.utils.weight_norm(nn.Linear(6, 4))
    (u,) = encoder_units(lin, "a")
    assert u.param is lin.weight_v and u.members == (lin.weight_g,) and u.kind == "rows"
    torch.manual_seed(0)
    encoders = {"a": nn.Sequential(parametrizations.weight_norm(nn.Linear(6, 8))), "b": nn.Linear(5, 8)}
    for e in encoders.values():
        e.out_dim = 8
    model = MultimodalClassifier(encoders, num_classes=3)
    bal = em.create_balancer("amss", model, k_max=0.5, temperature=0.5)
    bal.loss(model({"a": torch.randn(6, 6), "b": torch.randn(6, 5)}), torch.arange(6) % 3).backward()
    bal.before_step()
    (unit,) = [u for u in bal.units["a"] if u.kind == "rows"]
    v, g = unit.param.grad, unit.members[0].grad
    assert torch.equal((v == 0).all(1), (g == 0).all(1)) and int((v != 0).any(1).sum()) == 4


def test_other_reparametrizations_are_refused_with_the_parameter_named() -> None:
    cases = [
        (parametrizations.spectral_norm(nn.Linear(4, 4)), "_SpectralNorm"),
        (parametrizations.weight_norm(nn.Linear(4, 4), dim=1), "dim=1"),
        (parametrizations.orthogonal(nn.Linear(4, 4)), "_Orthogonal"),
        (nn.utils.spectral_norm(nn.Linear(4, 4)), "computed from other parameters"),
    ]
    for layer, what in cases:
        with pytest.raises(ValueError, match=rf"encoders\.a\.0\.weight is reparametrized \(.*{what}") as info:
            discover_units(_two(nn.Sequential(layer)), ["a", "b"])
        assert "remove_parametrizations" in str(info.value) and "amss_skip" in str(info.value)
    out = parametrizations.weight_norm(nn.Linear(8, 4))
    with pytest.raises(ValueError, match="per output row, but these units are columns"):
        encoder_units(nn.Sequential(out), "a", heads={out: (2, "cols")})
    skipped = parametrizations.spectral_norm(nn.Linear(4, 4))
    skipped.amss_skip = True
    assert encoder_units(nn.Sequential(skipped, nn.Linear(4, 2)), "a")[0].name == "1"  # opted out: fine
    frozen = parametrizations.spectral_norm(nn.Linear(4, 4)).requires_grad_(False)
    assert [u.name for u in encoder_units(nn.Sequential(frozen, nn.Linear(4, 2)), "a")] == [
        "1"
    ]  # not trained


def _two(enc: nn.Module) -> nn.Module:
    model = nn.Module()
    model.encoders = nn.ModuleDict({"a": enc, "b": nn.Linear(3, 3)})
    return model


# ---------------------------------------------------------------------------------------- fusion heads
@pytest.mark.parametrize("fusion", ["sum", "weighted"])
def test_own_head_fusions_are_not_masked_by_default(fusion: str) -> None:
    model = vit_model(fusion)
    for found in (discover_units(model, ["image", "audio"]), em.create_balancer("amss", model).units):
        assert not any(u.kind == "row_elements" for us in found.values() for u in us)
    every = discover_units(model, ["image", "audio"], mask_fusion="all")
    heads = [u for u in every["audio"] if u.kind == "row_elements"]
    assert len(heads) == 1 and heads[0].param is model.fusion.heads["audio"].weight


def test_concat_head_blocks_stay_masked_and_options_are_checked() -> None:
    model = vit_model("concat")
    for mode in (True, "concat", "all"):
        blocks = [
            u
            for u in discover_units(model, ["image", "audio"], mask_fusion=mode)["audio"]
            if u.kind == "row_elements"
        ]
        assert [(u.param, u.columns) for u in blocks] == [(model.fusion.fc.weight, slice(D, D + 8))]
    assert not any(
        u.kind == "row_elements"
        for u in discover_units(model, ["image", "audio"], mask_fusion=False)["audio"]
    )
    with pytest.raises(ValueError, match="mask_fusion must be True, False, 'concat' or 'all'"):
        discover_units(model, ["image", "audio"], mask_fusion="sum")  # type: ignore[arg-type]
