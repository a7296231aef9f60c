"""``describe_units`` (what AMSS masks and why the rest is not) and the ``equimodal units`` command."""

from __future__ import annotations

import pytest
import torch
from conftest import make_toy_model
from test_units_discovery import ViT, vit_model
from torch import nn
from torch.nn.utils import parametrizations

import equimodal as em
from equimodal.amss.explain import BIAS, BIAS_OF_MASKED, NORM, describe_units, unit_options
from equimodal.cli import main
from equimodal.models import MultimodalClassifier, create_encoder


def by_name(rows) -> dict[str, object]:
    return {r.name: r for r in rows}


def test_report_units_are_exactly_what_the_balancer_masks() -> None:
    for model in (make_toy_model(3), vit_model(), vit_model("sum")):
        for opts in ({}, {"linear_rows": True}, {"linear_rows": "auto", "mask_fusion": False}):
            report = describe_units(model, **opts)
            balancer = em.create_balancer("amss_plus", model, **opts)
            assert {m: [(u.name, u.kind, u.num_units) for u in us] for m, us in report.units.items()} == {
                m: [(u.name, u.kind, u.num_units) for u in us] for m, us in balancer.units.items()
            }
            masked = {m: sorted(r.name for r in report.masked(m)) for m in report.modalities}
            for m, us in balancer.units.items():
                assert masked[m] == sorted({n for u in us for n in u.param_names})


def test_every_trained_parameter_is_listed_with_a_unit_or_a_reason() -> None:
    model = vit_model()
    model.encoders["image"].mlp[0].amss_skip = True
    report = describe_units(model, linear_rows=True)
    listed = [r.name for rows in report.modalities.values() for r in rows] + [r.name for r in report.other]
    expected = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(set(listed)) == sorted(expected)
    rows = by_name(report.modalities["image"])
    assert (
        rows["encoders.image.patch.weight"].kind == "filters"
        and rows["encoders.image.patch.weight"].units == 16
    )
    attn = "encoders.image.blocks.layers.0.self_attn"
    assert (rows[f"{attn}.in_proj_weight"].kind, rows[f"{attn}.in_proj_weight"].groups) == ("head_rows", 3)
    assert rows[f"{attn}.in_proj_bias"].note == BIAS_OF_MASKED
    assert rows["encoders.image.blocks.layers.0.linear1.weight"].kind == "rows"
    assert rows["encoders.image.norm.weight"].note == NORM
    assert rows["encoders.image.mlp.0.weight"].note == "skipped: amss_skip on encoders.image.mlp.0"
    assert rows["encoders.image.cls"].note.startswith("no unit rule for ViT.cls")
    assert rows["fusion.fc.weight"].kind == "row_elements" and rows["fusion.fc.weight"].numel == 3 * 16
    assert by_name(report.other)["fusion.fc.bias"].note == BIAS
    auto = by_name(describe_units(model, linear_rows="auto").modalities["image"])
    assert "linear_rows='auto'" in auto["encoders.image.blocks.layers.0.linear1.weight"].note
    totals = report.totals()["image"]
    assert totals["units"] == sum(u.num_units for u in report.units["image"])
    assert totals["tensors"] == len(report.units["image"]) and totals["masked_weights"] < totals["weights"]
    text = str(report)
    assert "encoders.image.norm.weight" in text and "total image:" in text


def test_reasons_for_fusion_heads_tied_and_shared_parameters() -> None:
    rows = by_name(describe_units(vit_model("sum")).modalities["audio"])
    note = rows["fusion.heads.audio.weight"].note
    assert "sum fusion, a head per modality" in note and "mask_fusion='all'" in note
    film = describe_units(vit_model("film"))
    assert "film fusion has no per-modality column blocks" in by_name(film.other)["fusion.fc.weight"].note
    assert "auxiliary unimodal head" in by_name(film.other)["fusion.aux.image.weight"].note
    off = describe_units(vit_model(), mask_fusion=False)
    block = by_name(off.modalities["audio"])["fusion.fc.weight"]  # listed under each modality it serves
    assert (block.note, block.numel) == ("fusion head not masked: mask_fusion=False", 3 * 8)

    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    enc[1].weight = enc[0].weight
    enc.out_dim = 4
    model = MultimodalClassifier({"a": enc, "b": create_encoder("mlp", in_dim=3, hidden=(4,))}, num_classes=2)
    rows = by_name(describe_units(model).modalities["a"])
    assert rows["encoders.a.0.weight"].kind == "rows"
    assert (
        rows["encoders.a.1.weight"].note == "tied: same Parameter as encoders.a.0.weight, masked once there"
    )

    shared = nn.Linear(3, 3)
    model.encoders["b"].extra = shared
    model.encoders["a"].extra = shared
    report = describe_units(model, exclude=lambda name, m: name == "encoders.b.extra")
    assert by_name(report.modalities["b"])["encoders.b.extra.weight"].note.startswith(
        "shared with 'a': masked there"
    )


def test_reparametrized_weights_in_the_report() -> None:
    torch.manual_seed(0)
    enc = nn.Sequential(parametrizations.weight_norm(nn.Linear(4, 6)))
    enc.out_dim = 6
    model = MultimodalClassifier({"a": enc, "b": create_encoder("mlp", in_dim=3, hidden=(4,))}, num_classes=2)
    rows = by_name(describe_units(model).modalities["a"])
    v, g = (
        rows["encoders.a.0.parametrizations.weight.original1"],
        rows["encoders.a.0.parametrizations.weight.original0"],
    )
    assert (v.kind, v.units, g.kind, g.units) == ("rows", 6, "rows", 6)
    assert g.note.startswith("same units as")
    off = by_name(describe_units(model, linear_rows=False).modalities["a"])
    assert off["encoders.a.0.parametrizations.weight.original1"].note == "Linear rows off (linear_rows=False)"


def test_options_are_checked_as_the_balancer_checks_them() -> None:
    model = make_toy_model(2)
    with pytest.raises(TypeError, match="unknown option.*Did you mean 'linear_rows'"):
        describe_units(model, linear_row=True)
    with pytest.raises(ValueError, match="option 'linear_rows' must be one of"):
        describe_units(model, linear_rows="sometimes")
    with pytest.raises(ValueError, match="Balancer 'ogm_ge' masks no AMSS units"):
        describe_units(model, balancer="ogm_ge")
    assert unit_options("uniform_mask", temperature=0.5).mask_encoders is True
    with pytest.raises(ValueError, match="no maskable units for modality 'm0'"):
        describe_units(model, mask_encoders=False, mask_fusion=False)


# ---------------------------------------------------------------------------------------- the CLI
def _check_80(text: str) -> None:
    assert max(len(line.rstrip()) for line in text.splitlines()) <= 80


def test_units_command_on_the_default_config(capsys) -> None:
    assert (
        main(["units", "--set", "balancer.name=amss_plus", "--set", "balancer.options.linear_rows=auto"]) == 0
    )
    out = capsys.readouterr().out
    _check_80(out)
    assert "mfeat / amss_plus / concat fusion: linear_rows='auto'" in out
    assert "totals" in out and "row_elements" in out and "norm layer parameters" in out
    assert main(["units"]) == 0  # balancer none: what amss would mask
    assert "Balancer 'none' masks no units" in capsys.readouterr().out


def test_units_command_on_a_preset_and_a_tiny_config(tmp_path, capsys) -> None:
    assert main(["units", "avdigits_hard", "--set", "balancer.name=amss"]) == 0
    out = capsys.readouterr().out
    _check_80(out)
    assert "image (encoders.image.*)" in out and "audio (encoders.audio.*)" in out
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(
        "data:\n  name: mfeat\n  options:\n    views: fac,mor\nmodel:\n  fusion: sum\n"
        "balancer:\n  name: amss\n  options:\n    mask_fusion: true\n"
    )
    assert main(["units", str(cfg)]) == 0
    out = capsys.readouterr().out
    _check_80(out)
    assert "sum fusion, a head per modality" in " ".join(out.split())


def test_units_command_errors_exit_2(capsys) -> None:
    assert (
        main(["units", "--set", "balancer.name=amss", "--set", "balancer.options.linear_rows=sometimes"]) == 2
    )
    assert "linear_rows" in capsys.readouterr().err
    assert main(["units", "no_such_preset"]) == 2
    assert "neither a file nor a shipped preset" in capsys.readouterr().err


def test_vit_alone_is_importable_for_reuse() -> None:
    assert ViT().out_dim == 16
