"""MMTM mid fusion: the gate's formula, the stage split of the built-in encoders, the config switch."""

from __future__ import annotations

import pytest
import torch

import equimodal as em
from equimodal.models.encoders import create_encoder
from equimodal.models.mmtm import MMTMClassifier, MMTMGate, encoder_stages
from equimodal.testing import toy_batch, toy_model


def official_mmtm(visual: torch.Tensor, skeleton: torch.Tensor, gate: MMTMGate) -> tuple[torch.Tensor, ...]:
    """The official MMTM_mitigate.forward (SEonly=False, shareweight=False, no curation) in plain torch."""
    sq = torch.cat(
        [visual.view(visual.shape[:2] + (-1,)).mean(-1), skeleton.view(skeleton.shape[:2] + (-1,)).mean(-1)],
        1,
    )
    exc = torch.relu(sq @ gate.squeeze.weight.T + gate.squeeze.bias)
    (a, b) = gate.channels
    vis = torch.sigmoid(exc @ gate.excite[a].weight.T + gate.excite[a].bias)
    sk = torch.sigmoid(exc @ gate.excite[b].weight.T + gate.excite[b].bias)
    return visual * vis.view(vis.shape + (1,) * (visual.dim() - 2)), skeleton * sk.view(
        sk.shape + (1,) * (skeleton.dim() - 2)
    )


def test_a_two_modality_gate_is_the_official_mmtm_with_its_width() -> None:
    torch.manual_seed(0)
    gate = MMTMGate({"a": 6, "b": 10}, ratio=4)
    assert gate.squeeze.out_features == int(2 * 16 / 4)
    x, y = torch.randn(3, 6, 4, 5), torch.randn(3, 10, 7)
    out = gate({"a": x, "b": y})
    ref = official_mmtm(x, y, gate)
    torch.testing.assert_close(out["a"], ref[0])
    torch.testing.assert_close(out["b"], ref[1])


def test_an_override_replaces_one_modality_in_training_only_unless_asked() -> None:
    torch.manual_seed(0)
    gate = MMTMGate({"a": 4, "b": 4})
    x = {"a": torch.rand(5, 4) + 0.5, "b": torch.rand(5, 4) + 0.5}
    avg = {"a": torch.full((4,), 0.25), "b": torch.full((4,), 0.75)}
    gate.set_override(torch.tensor([False, True]), avg)
    plain = MMTMGate({"a": 4, "b": 4})
    plain.load_state_dict(gate.state_dict())
    out, ref = gate(x), plain(x)
    torch.testing.assert_close(out["a"], ref["a"])
    torch.testing.assert_close(out["b"], x["b"] * 0.75)
    gate.eval()
    torch.testing.assert_close(gate(x)["b"], ref["b"])  # evaluation keeps the sample-wise gate
    gate.override_in_eval = True
    torch.testing.assert_close(gate(x)["b"], x["b"] * 0.75)


def test_the_built_in_encoders_split_into_stages_that_compose_to_the_encoder() -> None:
    torch.manual_seed(0)
    for name, kwargs, x in [
        ("mlp", {"in_dim": 7, "hidden": (8, 6)}, torch.randn(4, 7)),
        ("cnn", {"in_channels": 1}, torch.randn(4, 1, 8, 8)),
        ("conv1d", {"in_channels": 13}, torch.randn(4, 13, 20)),
    ]:
        enc = create_encoder(name, **kwargs).eval()
        h = x
        for stage in encoder_stages(enc, "m"):
            h = stage(h)
        h = h if h.dim() == 2 else h.flatten(2).mean(2)
        torch.testing.assert_close(h, enc(x), msg=name)
    assert len(encoder_stages(create_encoder("cnn", in_channels=1), "m")) == 2


def test_an_encoder_that_cannot_be_split_is_refused_naming_the_ways_out() -> None:
    with pytest.raises(ValueError, match=r"modality 'v'.*GRUEncoder.*'mlp'.*`stages`.*model.fusion=concat"):
        MMTMClassifier({"a": create_encoder("mlp", in_dim=3), "v": create_encoder("gru", in_channels=3)}, 2)


def test_gates_default_after_every_stage_but_the_first_and_bad_gates_are_refused() -> None:
    mlps = {m: create_encoder("mlp", in_dim=4, hidden=(8, 8, 8)) for m in ("a", "b")}
    assert MMTMClassifier(mlps, 3).gate_after == [2, 3]
    one = {m: create_encoder("mlp", in_dim=4) for m in ("a", "b")}
    assert MMTMClassifier(one, 3).gate_after == [1]
    with pytest.raises(ValueError, match=r"gates must be stage numbers in 1\.\.3.*found \[4\]"):
        MMTMClassifier(mlps, 3, gates=[4])
    uneven = {"a": create_encoder("mlp", in_dim=4, hidden=(8, 8)), "b": create_encoder("mlp", in_dim=4)}
    with pytest.raises(ValueError, match="different numbers of stages"):
        MMTMClassifier(uneven, 3)


def test_the_classifier_follows_the_contract_and_fuses_by_the_mean_of_its_heads() -> None:
    model = toy_model(3, fusion="mmtm")
    batch, y = toy_batch(3, 8)
    out = em.types.check_output(model(batch), model.modalities, y)
    torch.testing.assert_close(out.logits, torch.stack(list(out.unimodal_logits.values())).mean(0))
    for m, h in out.features.items():
        torch.testing.assert_close(out.unimodal_logits[m], model.heads[m](h))
    out.logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_model_fusion_mmtm_builds_the_mid_fusion_model_from_a_config() -> None:
    from equimodal.data import load_dataset
    from equimodal.engine.config import load_config
    from equimodal.engine.trainer import build_model

    cfg = load_config(
        None, ["data.options.views=fac,mor", "model.fusion=mmtm", "model.fusion_options.ratio=2"]
    )
    model = build_model(cfg, load_dataset(cfg.data.name, seed=0, **cfg.data.options))
    assert isinstance(model, MMTMClassifier) and model.gate_after == [1]
    assert model.gates[0].squeeze.out_features == 64 * 2 * 2 // 2
    with pytest.raises((TypeError, ValueError), match="bogus"):
        load_config(None, ["model.fusion=mmtm", "model.fusion_options.bogus=1"])
    checked = load_config(
        None, ["data.options.views=fac,mor", "model.fusion=mmtm", "model.fusion_options.validate_inputs=true"]
    )
    assert build_model(checked, load_dataset(cfg.data.name, seed=0, **cfg.data.options)).validate_inputs
