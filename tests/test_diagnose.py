"""``equimodal diagnose``: the figures it measures, its verdicts, and reading a compare folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from equimodal.cli import main
from equimodal.experiments.diagnosis import (
    Diagnosis,
    Interval,
    ModalityFigures,
    analyse,
    diagnose,
    epochs_to,
    paired_interval,
    verdict,
)
from equimodal.reporting.html import write_report

SETS = ["data.options.views=fac,mor", "train.epochs=4", "train.progress=false"]


def test_speed_and_paired_intervals() -> None:
    assert epochs_to([0.2, 0.5, 0.95, 1.0, 0.98]) == 3.0  # first epoch at 90 % of the best
    assert epochs_to([]) != epochs_to([])  # NaN
    two = paired_interval({0: 0.90, 1: 0.80}, {0: 0.85, 1: 0.80})
    assert two.mean == pytest.approx(2.5) and two.low < 0 < two.high  # t interval with 1 dof: wide
    many = paired_interval({s: 0.9 + 0.001 * s for s in range(8)}, {s: 0.85 for s in range(8)})
    assert many.significant and str(many).startswith("+5.35 [")
    assert not paired_interval({0: 0.9}, {0: 0.8}).significant and "1 seed" in str(
        paired_interval({0: 0.9}, {0: 0.8})
    )


def _figures(alone: float, probe: float, deficit: Interval, speed: float) -> ModalityFigures:
    return ModalityFigures(alone, probe - 5, probe, deficit, speed, speed, 0.5, 0.5)


def test_verdicts_follow_the_headroom_and_the_deficits() -> None:
    sig, none_ = Interval(3.0, 1.0, 5.0), Interval(0.2, -1.0, 1.4)
    mods = {"image": _figures(78, 67, Interval(11, 9, 13), 12), "audio": _figures(65, 62, none_, 4)}
    diag = Diagnosis("avd", 10, 87.6, 91.1, sig, mods)
    text, todo = verdict(diag)
    assert (
        "'image' encoder is under-trained" in text and "the stronger modality alone and learns slower" in text
    )
    assert "multitask" in todo and "mmpareto" in todo
    # the weaker modality under-trained (the CREMA-D-like case)
    diag.modalities = {
        "image": _figures(78, 64, Interval(14, 13, 15), 17),
        "audio": _figures(95, 91, none_, 7),
    }
    text, _ = verdict(diag)
    assert "'image' encoder" in text and "the weaker modality alone and learns slower" in text
    assert text.startswith(
        "Imbalance: the ensemble of separately trained branches beats joint training by +3.00"
    )
    diag.modalities = mods
    diag.headroom = none_
    text, todo = verdict(diag)
    assert text.startswith("No imbalance worth fixing") and "Keep joint training" in todo
    diag.headroom = sig
    diag.modalities = {m: _figures(f.alone, f.probe, none_, 3) for m, f in mods.items()}
    assert "no encoder's probe is significantly below" in verdict(diag)[0]


def test_diagnose_trains_writes_and_reports(tmp_path: Path, capsys) -> None:
    out = tmp_path / "dg"
    code = main(["diagnose", *[x for s in SETS for x in ("--set", s)], "--seeds", "3", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "9 runs, 0 already finished, 9 to run" in printed and "Verdict." in printed
    assert "**" not in printed and max(len(line) for line in printed.splitlines()) <= 80
    raw = json.loads((out / "diagnosis.json").read_text())
    assert set(raw["modalities"]) == {"fac", "mor"} and raw["seeds"] == 3
    fac = raw["modalities"]["fac"]
    assert 0 < fac["alone"] <= 100 and 0 <= fac["grad_share"] <= 1  # the monitor logged the shares
    assert (out / "diagnosis.png").read_bytes()[:4] == b"\x89PNG"
    page = write_report([out]).read_text()
    assert "<b>Verdict.</b>" in page and page.count("data:image/png") == 1


def test_reading_a_compare_folder_and_missing_runs(tmp_path: Path) -> None:
    cmp = tmp_path / "cmp"
    assert main(["compare", *[x for s in SETS for x in ("--set", s)], "--balancers", "none", "--seeds", "2",
                 "--out", str(cmp)]) == 0  # fmt: skip
    diag = diagnose(overrides=SETS, runs=cmp).diagnosis
    assert diag.seeds == 2 and (cmp / "diagnosis.md").is_file()
    assert diag.modalities["fac"].grad_share != diag.modalities["fac"].grad_share  # not logged there: NaN
    with pytest.raises(
        FileNotFoundError, match=r"lacks finished runs of \['unimodal_fac', 'unimodal_mor', 'joint'\]"
    ):
        analyse(tmp_path / "empty", ["fac", "mor"])


HEADROOM_SIDES = {"below zero": Interval(-3.43, -5.66, -1.20), "across zero": Interval(-2.0, -4.5, 0.5),
                  "above zero": Interval(3.0, 1.0, 5.0)}  # fmt: skip


@pytest.mark.parametrize("side", list(HEADROOM_SIDES))
def test_the_headroom_verdict_follows_the_side_of_zero(side: str) -> None:
    """An interval entirely below zero is joint training winning, not "an interval that reaches zero"."""
    mods = {
        "image": _figures(78, 67, Interval(11, 9, 13), 12),
        "audio": _figures(65, 62, Interval(0, -1, 1), 4),
    }
    text, todo = verdict(Diagnosis("avd", 5, 87.6, 84.2, HEADROOM_SIDES[side], mods))
    if side == "below zero":
        assert text.startswith("No imbalance to fix: joint training beats the ensemble") and "3.43 pp" in text
        assert "[-5.66, -1.20]" in text and "zero" in text and "includes zero" not in text
        assert "Keep joint training" in todo
    elif side == "across zero":
        assert text.startswith("No imbalance worth fixing") and "an interval that includes zero" in text
        assert "Keep joint training" in todo
    else:
        assert text.startswith("Imbalance:") and "'image' encoder is under-trained" in text


DEFICITS = {"below zero": Interval(-4.0, -6.0, -2.0), "across zero": Interval(1.0, -1.0, 3.0),
            "above zero": Interval(5.0, 3.0, 7.0)}  # fmt: skip


@pytest.mark.parametrize("side", list(DEFICITS))
def test_only_a_deficit_above_zero_names_an_under_trained_encoder(side: str) -> None:
    """Every imbalance branch: a deficit below zero (the probe in joint training beats the branch alone) or
    across zero names no encoder; above zero names it, as the stronger or the weaker modality alone."""
    for audio_alone, role in ((60, "the weaker modality alone"), (90, "the stronger modality alone")):
        mods = {"image": _figures(80, 70, Interval(0.5, -2.0, 3.0), 5),
                "audio": _figures(audio_alone, 55, DEFICITS[side], 9)}  # fmt: skip
        text, todo = verdict(Diagnosis("avd", 5, 87.6, 91.1, Interval(3.0, 1.0, 5.0), mods))
        if side == "above zero":
            assert "'audio' encoder is under-trained" in text and f"it is {role} and learns slower" in text
            assert "multitask" in todo
        else:
            assert "no encoder's probe is significantly below its branch alone" in text
            assert "late-fusion ensemble" in todo


def test_one_seed_cannot_tell() -> None:
    text, todo = verdict(Diagnosis("avd", 1, 87.6, 91.1, Interval(2.0, float("nan"), float("nan")), {}))
    assert text.startswith("Cannot tell from one seed") and "--seeds 3" in todo


def test_the_printed_diagnosis_fits_80_columns(tmp_path: Path, capsys, monkeypatch) -> None:
    """The terminal gets wrapped paragraphs and a table; diagnosis.md keeps its Markdown."""
    monkeypatch.setenv("COLUMNS", "80")
    mods = {"image": _figures(78.04, 67.1, Interval(11.52, 9.01, 13.25), 12),
            "audio_mfcc_long_name": _figures(65, 62, Interval(0.2, float("nan"), float("nan")), 4)}  # fmt: skip
    diag = Diagnosis("avdigits_hard", 10, 87.6, 91.1, Interval(3.0, 1.0, 5.0), mods)
    diag.verdict, diag.recommendation = verdict(diag)
    diag.curves = {name: {"alone": [0.5, 0.7]} for name in [*mods, "fused"]}
    monkeypatch.setattr("equimodal.experiments.diagnosis.analyse", lambda root, modalities, joint_label: diag)
    code = main(["diagnose", *[x for s in SETS for x in ("--set", s)], "--runs", str(tmp_path)])
    printed = capsys.readouterr().out
    assert code == 0 and "Verdict. Imbalance:" in " ".join(printed.split())
    assert max(len(line) for line in printed.splitlines()) <= 80 and "…" not in printed
    for cell in ("78.0", "+11.52", "[+9.01,", "+13.25]", "audio_mfcc", "diagnosis.md", "own_signal"):
        assert cell in printed, cell
    markdown = (tmp_path / "diagnosis.md").read_text()
    assert "**Verdict.** Imbalance:" in markdown and "| image | 78.0 | 62.1 | 67.1 |" in markdown


def test_a_damaged_summary_is_named_with_the_fix(tmp_path: Path) -> None:
    for label in ("joint", "unimodal_a", "unimodal_b"):
        (tmp_path / label / "seed0").mkdir(parents=True)
        (tmp_path / label / "seed0" / "summary.json").write_text(json.dumps({"test": {"test_acc": 0.5}}))
    (tmp_path / "joint" / "seed0" / "summary.json").write_text('{"test": {"test_')
    with pytest.raises(
        ValueError, match=r"joint/seed0/summary.json' is not valid JSON .*Rerun `equimodal train`"
    ):
        analyse(tmp_path, ["a", "b"])


@pytest.mark.slow
def test_a_task_that_needs_both_modalities_together_is_told_to_keep_joint_training(
    tmp_path: Path, capsys
) -> None:
    """Built as the outside task where balancers lost: joint training far above the ensemble. Here the label is
    the XOR of one sign per modality, which a FiLM head learns jointly and neither branch can alone."""
    import numpy as np

    rng = np.random.default_rng(0)
    a, v = rng.normal(size=(2, 800, 4)).astype(np.float32)
    np.savez(tmp_path / "xor.npz", a=a, v=v, label=((a[:, 0] > 0) ^ (v[:, 0] > 0)).astype(np.int64))
    sets = ["data.name=custom_npz", f"data.options.path={tmp_path / 'xor.npz'}", "model.fusion=film"]
    sets += ["train.epochs=20", "train.progress=false", "data.batch_size=32"]
    out = tmp_path / "dg"
    assert (
        main(["diagnose", *[x for s in sets for x in ("--set", s)], "--seeds", "3", "--out", str(out)]) == 0
    )
    text = " ".join(capsys.readouterr().out.split())
    assert "Verdict. No imbalance to fix: joint training beats the ensemble" in text
    assert "Keep joint training (balancer none)" in text
    raw = json.loads((out / "diagnosis.json").read_text())
    assert raw["headroom"]["high"] < -20  # measured: -40.62 [-45.28, -35.97] pp
