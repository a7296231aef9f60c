"""``equimodal diagnose``: the figures it measures, its verdicts, and reading a compare folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from equimodal.cli import main
from equimodal.diagnose import (
    Diagnosis,
    Interval,
    ModalityFigures,
    _paired,
    analyse,
    diagnose,
    epochs_to,
    verdict,
)
from equimodal.report_html import write_report

SETS = ["data.options.views=fac,mor", "train.epochs=4", "train.progress=false"]


def test_speed_and_paired_intervals() -> None:
    assert epochs_to([0.2, 0.5, 0.95, 1.0, 0.98]) == 3.0  # first epoch at 90 % of the best
    assert epochs_to([]) != epochs_to([])  # NaN
    two = _paired({0: 0.90, 1: 0.80}, {0: 0.85, 1: 0.80})
    assert two.mean == pytest.approx(2.5) and two.low < 0 < two.high  # t interval with 1 dof: wide
    many = _paired({s: 0.9 + 0.001 * s for s in range(8)}, {s: 0.85 for s in range(8)})
    assert many.significant and str(many).startswith("+5.35 [")
    assert not _paired({0: 0.9}, {0: 0.8}).significant and "1 seed" in str(_paired({0: 0.9}, {0: 0.8}))


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
    assert "own_signal" in todo and "mmpareto" in todo
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
    assert "9 runs, 0 already finished, 9 to run" in printed and "**Verdict.**" in printed
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
    diag = diagnose(None, SETS, runs=cmp)
    assert diag.seeds == 2 and (cmp / "diagnosis.md").is_file()
    assert diag.modalities["fac"].grad_share != diag.modalities["fac"].grad_share  # not logged there: NaN
    with pytest.raises(
        FileNotFoundError, match=r"lacks finished runs of \['unimodal_fac', 'unimodal_mor', 'joint'\]"
    ):
        analyse(tmp_path / "empty", ["fac", "mor"])


def test_a_damaged_summary_is_named_with_the_fix(tmp_path: Path) -> None:
    for label in ("joint", "unimodal_a", "unimodal_b"):
        (tmp_path / label / "seed0").mkdir(parents=True)
        (tmp_path / label / "seed0" / "summary.json").write_text(json.dumps({"test": {"test_acc": 0.5}}))
    (tmp_path / "joint" / "seed0" / "summary.json").write_text('{"test": {"test_')
    with pytest.raises(
        ValueError, match=r"joint/seed0/summary.json' is not valid JSON .*Rerun `equimodal train`"
    ):
        analyse(tmp_path, ["a", "b"])
