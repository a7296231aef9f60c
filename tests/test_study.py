"""``equimodal study``: presets load, the grid runs paired by seed and resumes, the tables and figure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from equimodal.cli import main
from equimodal.experiments.studies import file_stem, list_studies, load_study, paired_delta, study_specs

TINY = """
title: "A tiny study"
claim: "Checks the study machinery."
quick:
  seeds: 2
  set: [train.epochs=1, train.probe=false]
full:
  seeds: 3
parts:
  - name: mfeat
    set: ["data.options.views=fac,mor"]
    reference: none
    step_cost: true
    columns:
      concat: [model.fusion=concat]
      sum: [model.fusion=sum]
    rows:
      none: [balancer.name=none]
      amss: [balancer.name=amss]
    baselines:
      adam: [balancer.name=none, optim.name=adam, optim.lr=0.001]
"""


def test_every_shipped_study_loads_in_both_settings() -> None:
    assert {"fusions", "backbones", "update_ratio", "mask_units", "modalities"} <= set(list_studies())
    for name in list_studies():
        quick, full = load_study(name), load_study(name, full=True)
        assert full.seeds > quick.seeds >= 1 and study_specs(quick)
        labels = {s.label for s in study_specs(quick)}
        assert len(labels) * quick.seeds == len(study_specs(quick))  # every cell, every seed
        assert (file_stem(quick), file_stem(full)) == (name, f"{name}_full")  # both fit in docs/studies


def test_a_study_runs_resumes_and_writes_its_tables(tmp_path: Path, capsys) -> None:
    preset = tmp_path / "tiny.yaml"
    preset.write_text(TINY)
    out, docs = tmp_path / "out", tmp_path / "docs"
    assert main(["study", str(preset), "--out", str(out), "--docs", str(docs), "--jobs", "1"]) == 0
    printed = capsys.readouterr().out
    assert "10 runs, 0 already finished, 10 to run" in printed  # 2 columns x 2 rows + 1 baseline, 2 seeds
    md = (out / "tiny.md").read_text()
    assert "| row | concat | sum |" in md and "Δ vs `none`:" in md and "adam (baseline)" in md
    assert "Optimizer-step time relative to `none`" in md and " x |" in md
    assert (docs / "tiny.md").read_text() == md and (docs / "tiny.png").read_bytes()[:4] == b"\x89PNG"
    raw = json.loads((out / "study.json").read_text())
    assert set(raw["accuracy"]["mfeat/sum/amss"]) == {"0", "1"} and raw["mode"] == "quick"
    assert (out / "mfeat" / "concat" / "amss" / "seed1" / "summary.json").is_file()
    took = raw["took"]
    assert took.endswith("min of wall time with --jobs 1")
    assert main(["study", str(preset), "--out", str(out), "--jobs", "1"]) == 0
    assert "10 runs, 10 already finished, 0 to run" in capsys.readouterr().out
    again = json.loads((out / "study.json").read_text())
    assert again["took"] == took and again["costs"] == raw["costs"]  # a rerun keeps the first timings


def test_bad_presets_say_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(
        FileNotFoundError, match="neither a YAML file nor a shipped study; shipped: backbones"
    ):
        load_study("fusion")
    bad = tmp_path / "bad.yaml"
    bad.write_text("parts:\n  - name: p\n    rows: {a: balancer.name=none}\n    reference: b\n")
    with pytest.raises(
        ValueError, match=r"bad.yaml: parts\[0\].reference 'b' is neither a row nor a baseline"
    ):
        load_study(str(bad))
    bad.write_text("parts:\n  - name: p\n    rows: {a: [views]}\n")
    with pytest.raises(
        ValueError, match=r"parts\[0\].rows.a: expected a list of section.key=value overrides"
    ):
        load_study(str(bad))
    assert paired_delta({0: 0.9, 1: 0.8}, {0: 0.85, 1: 0.8}).startswith("+2.50 [")
    assert paired_delta({0: 0.9}, {0: 0.85}) == "+5.00" and paired_delta({0: 0.9}, {1: 0.8}) == "-"
