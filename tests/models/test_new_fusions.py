"""The AMSS paper's remaining fusions: ``affine`` (either direction), ``channel`` (MMTM) and ``ml_lstm``."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import ToyEncoder, make_toy_batch

import equimodal as em
from equimodal.models import create_fusion, list_fusions

torch.set_num_threads(1)

NEW = ["affine", "channel", "ml_lstm"]
AUX = ["affine", "ml_lstm"]


def build(num_modalities: int, fusion: str, seed: int = 0, **options: Any) -> em.MultimodalClassifier:
    """The toy encoders of ``make_toy_model``, through the public constructor with fusion options."""
    torch.manual_seed(seed)
    encoders = {f"m{i}": ToyEncoder(5 + i) for i in range(num_modalities)}
    return em.MultimodalClassifier(encoders, 3, fusion=fusion, **options)


def options_for(fusion: str, num_modalities: int) -> dict[str, Any]:
    """A non-default option set per fusion (the defaults are covered by test_fusion.py)."""
    return {
        "affine": {"target": f"m{num_modalities - 1}", "hidden": 16},
        "channel": {"ratio": 2},
        "ml_lstm": {"width": 12, "hidden": 10, "layers": 3, "readout": "mean"},
    }[fusion]


def random_features(dims: dict[str, int], batch: int = 5, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn(batch, d, generator=g) for m, d in dims.items()}


def test_new_fusions_are_registered() -> None:
    assert set(NEW) <= set(list_fusions())
    flags = {n: create_fusion(n, {"a": 4, "b": 4}, 3).auxiliary for n in NEW}
    assert flags == {"affine": True, "channel": False, "ml_lstm": True}


@pytest.mark.parametrize("with_options", [False, True], ids=["defaults", "options"])
@pytest.mark.parametrize("fusion", NEW)
def test_builds_and_trains_every_encoder(fusion: str, with_options: bool, num_modalities: int) -> None:
    opts = options_for(fusion, num_modalities) if with_options else {}
    model = build(num_modalities, fusion, **opts)
    batch, y = make_toy_batch(num_modalities, batch_size=5)
    out = model(batch)
    assert out.logits.shape == (5, 3)
    assert list(out.unimodal_logits) == model.modalities
    assert all(z.shape == (5, 3) and torch.isfinite(z).all() for z in out.unimodal_logits.values())
    assert model.auxiliary_heads == (fusion in AUX)
    F.cross_entropy(out.logits, y).backward()
    for m, enc in model.encoders.items():
        grads = [p.grad for p in enc.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), m
        assert any(g.abs().sum() > 0 for g in grads), f"{fusion}: no fused-loss gradient reaches {m}"


@pytest.mark.parametrize("fusion", AUX)
def test_auxiliary_heads_never_reach_the_encoders(fusion: str, num_modalities: int) -> None:
    model = build(num_modalities, fusion, **options_for(fusion, num_modalities))
    batch, y = make_toy_batch(num_modalities, batch_size=5)
    out = model(batch)
    sum(F.cross_entropy(z, y) for z in out.unimodal_logits.values()).backward()
    assert all(p.grad is None for p in model.encoders.parameters())
    aux_ids = {id(p) for p in model.fusion.aux.parameters()}
    assert all(p.grad is None for p in model.fusion.parameters() if id(p) not in aux_ids)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.fusion.aux.parameters())


# ---------------------------------------------------------------------------------------------- channel
def test_channel_fused_is_the_mean_of_its_unimodal_logits(num_modalities: int) -> None:
    model = build(num_modalities, "channel")
    batch, _ = make_toy_batch(num_modalities, batch_size=5)
    out = model(batch)
    assert torch.equal(out.logits, torch.stack(list(out.unimodal_logits.values())).mean(0))
    torch.testing.assert_close(out.logits, sum(out.unimodal_logits.values()) / num_modalities)
    # each term is its own head on its 2*sigmoid-gated features (MMTM excitation)
    fusion = model.fusion
    squeeze = torch.relu(fusion.squeeze(torch.cat(list(out.features.values()), 1)))
    for m, h in out.features.items():
        gate = 2 * torch.sigmoid(fusion.excite[m](squeeze))
        torch.testing.assert_close(out.unimodal_logits[m], fusion.heads[m](gate * h))


def test_channel_unimodal_losses_reach_own_and_other_encoders(num_modalities: int) -> None:
    model = build(num_modalities, "channel")
    batch, y = make_toy_batch(num_modalities, batch_size=5)
    for m in model.modalities:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(batch).unimodal_logits[m], y).backward()
        for other, enc in model.encoders.items():
            grads = [p.grad for p in enc.parameters()]
            assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads), (m, other)
        # the unimodal loss of m uses m's head only
        assert all(
            (p.grad is not None) == (k == m) for k, h in model.fusion.heads.items() for p in h.parameters()
        )


def test_channel_gate_is_identity_at_zero_excitation() -> None:
    dims = {"a": 4, "b": 6, "c": 5}
    fusion = create_fusion("channel", dims, 3)
    assert fusion.bottleneck == int(2 * 15 / 4)
    with torch.no_grad():
        for lin in fusion.excite.values():
            lin.weight.zero_()
            lin.bias.zero_()
    feats = random_features(dims)
    _, uni = fusion(feats)
    for m in dims:
        torch.testing.assert_close(uni[m], fusion.heads[m](feats[m]))


def test_channel_declares_its_heads_as_modality_blocks(num_modalities: int) -> None:
    model = build(num_modalities, "channel")
    blocks = model.fusion.modality_blocks()
    assert list(blocks) == model.modalities
    for m, (weight, cols) in blocks.items():
        assert weight is model.fusion.heads[m].weight and cols == slice(0, 8)


# ----------------------------------------------------------------------------------------------- affine
@pytest.mark.parametrize("target", [None, "b", "c"])
def test_affine_modulates_the_target_by_the_others(target: str | None) -> None:
    dims = {"a": 4, "b": 6, "c": 5}
    torch.manual_seed(0)
    fusion = create_fusion("affine", dims, 3, target=target, hidden=7)
    t = target or "a"
    sources = [m for m in dims if m != t]
    assert fusion.target == t and fusion.sources == sources
    assert fusion.direction == f"{t} <- {', '.join(sources)}"
    assert fusion.fc.in_features == dims[t]
    mlp = fusion.conditioner[t]
    assert mlp[0].in_features == sum(dims[m] for m in sources) and mlp[-1].out_features == 2 * dims[t]
    assert all(k.startswith(f"conditioner.{t}.") for k in fusion.state_dict() if k.startswith("conditioner"))
    feats = random_features(dims)
    gamma, beta = mlp(torch.cat([feats[m] for m in sources], 1)).chunk(2, 1)
    fused, _ = fusion(feats)
    torch.testing.assert_close(fused, fusion.fc((1 + gamma) * feats[t] + beta))


def perturbed(fusion: torch.nn.Module, feats: dict[str, torch.Tensor], m: str) -> bool:
    """Whether the fused logits change when the features of modality ``m`` change."""
    base, _ = fusion(feats)
    moved, _ = fusion({**feats, m: feats[m] + 1.0})
    return not torch.allclose(base, moved)


@pytest.mark.parametrize("target", ["m0", "m1"])
def test_affine_direction_by_perturbation(target: str) -> None:
    dims = {"m0": 8, "m1": 8}
    torch.manual_seed(0)
    fusion = create_fusion("affine", dims, 3, target=target)
    other = "m1" if target == "m0" else "m0"
    feats = random_features(dims)
    # the output depends on the target (through the head) and the other (through scale and shift)
    assert perturbed(fusion, feats, target) and perturbed(fusion, feats, other)
    # with the conditioner's output zeroed, the modulation is the identity: only the target is read
    with torch.no_grad():
        fusion.conditioner[target][-1].weight.zero_()
        fusion.conditioner[target][-1].bias.zero_()
    assert perturbed(fusion, feats, target) and not perturbed(fusion, feats, other)
    torch.testing.assert_close(fusion(feats)[0], fusion.fc(feats[target]))


def test_affine_checkpoints_do_not_cross_directions() -> None:
    dims = {"m0": 8, "m1": 8}
    forward = create_fusion("affine", dims, 3, target="m0")
    backward = create_fusion("affine", dims, 3, target="m1")
    with pytest.raises(RuntimeError, match=r"conditioner\.m1"):
        backward.load_state_dict(forward.state_dict())


def test_affine_differs_from_film_in_direction() -> None:
    dims = {"m0": 8, "m1": 8}
    film = create_fusion("film", dims, 3)
    feats = random_features(dims)
    with torch.no_grad():
        film.film.weight.zero_()
        film.film.bias.zero_()
    assert perturbed(film, feats, "m0") and not perturbed(film, feats, "m1")  # film: always m0 modulated


# ---------------------------------------------------------------------------------------------- ml_lstm
@pytest.mark.parametrize("readout", ["last", "mean"])
def test_ml_lstm_reads_the_top_layer(readout: str, num_modalities: int) -> None:
    dims = {f"m{i}": 4 + i for i in range(num_modalities)}
    torch.manual_seed(0)
    fusion = create_fusion("ml_lstm", dims, 3, width=6, hidden=5, layers=3, readout=readout)
    assert [(m.input_size, m.hidden_size, m.num_layers) for m in fusion.lstms] == [
        (6, 5, 1),
        (5, 5, 1),
        (5, 5, 1),
    ]
    # the forget gate's input bias starts at 1, every other bias at 0
    assert fusion.lstms[0].bias_ih_l0[5:10].eq(1).all() and fusion.lstms[0].bias_ih_l0[:5].eq(0).all()
    feats = random_features(dims)
    x = torch.nn.functional.layer_norm(torch.stack([fusion.proj[m](feats[m]) for m in dims], 1), (6,))
    first, (h_n, _) = fusion.lstms[0](x)
    torch.testing.assert_close(first[:, -1], h_n[-1])  # "last" is the layer's final hidden state
    second = first + fusion.lstms[1](first)[0]  # residual from the second layer on
    top = second + fusion.lstms[2](second)[0]
    assert top.shape == (5, num_modalities, 5)
    expected = fusion.fc(top[:, -1] if readout == "last" else top.mean(1))
    torch.testing.assert_close(fusion(feats)[0], expected)


def test_ml_lstm_trains_under_plain_sgd() -> None:
    """The plain 2-layer nn.LSTM it replaced was still on its plateau here (loss 0.91 after 100 steps)."""
    torch.manual_seed(0)
    dims = {"a": 5, "b": 6}
    fusion = create_fusion("ml_lstm", dims, 3)
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (64,), generator=g)
    feats = {m: torch.randn(64, d, generator=g) + y[:, None].float() for m, d in dims.items()}
    opt = torch.optim.SGD(fusion.parameters(), lr=0.01, momentum=0.9)
    for _ in range(100):
        loss = torch.nn.functional.cross_entropy(fusion(feats)[0], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.6


def test_ml_lstm_depends_on_modality_order() -> None:
    dims = {"a": 4, "b": 4}
    torch.manual_seed(0)
    fusion = create_fusion("ml_lstm", dims, 3)
    feats = random_features(dims)
    swapped = {"a": feats["b"], "b": feats["a"]}
    with torch.no_grad():
        fusion.proj["b"].load_state_dict(fusion.proj["a"].state_dict())  # same projection for both
    assert not torch.allclose(fusion(feats)[0], fusion(swapped)[0])


def test_string_options_from_a_command_line_are_converted() -> None:
    fusion = create_fusion("ml_lstm", {"a": 4, "b": 4}, 3, layers="3", hidden="9")
    assert len(fusion.lstms) == 3 and fusion.lstms[-1].hidden_size == 9
    assert create_fusion("channel", {"a": 4, "b": 4}, 3, ratio="2").bottleneck == 8


# ------------------------------------------------------------------------------------------ bad options
def test_affine_unknown_target_lists_the_modalities() -> None:
    with pytest.raises(
        ValueError,
        match=r"Fusion 'affine' option 'target' must be one of the modalities \['m0', 'm1'\], found 'm2'",
    ):
        build(2, "affine", target="m2")


@pytest.mark.parametrize(
    ("fusion", "option", "value"),
    [
        ("affine", "hidden", 0),
        ("affine", "hidden", -3),
        ("channel", "ratio", 0),
        ("ml_lstm", "width", 0),
        ("ml_lstm", "hidden", -1),
        ("ml_lstm", "layers", 0),
    ],
)
def test_non_positive_sizes_are_refused(fusion: str, option: str, value: int) -> None:
    with pytest.raises(
        ValueError,
        match=rf"Fusion '{fusion}' option '{option}' must be a positive integer, found {value}\. Pass e\.g\.",
    ):
        create_fusion(fusion, {"a": 4, "b": 4}, 3, **{option: value})


def test_mistyped_options_are_named() -> None:
    with pytest.raises(
        ValueError, match=r"option 'readout' must be one of 'last', 'mean'.*Did you mean 'mean'"
    ):
        create_fusion("ml_lstm", {"a": 4, "b": 4}, 3, readout="maen")
    with pytest.raises(TypeError, match=r"option 'layers': expected an integer"):
        create_fusion("ml_lstm", {"a": 4, "b": 4}, 3, layers=1.5)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['modulated'\]"):
        create_fusion("affine", {"a": 4, "b": 4}, 3, modulated="b")
