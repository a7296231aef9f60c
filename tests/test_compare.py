"""Statistics and ensembles of the compare command, on synthetic predictions."""

from __future__ import annotations

import json

import numpy as np
import pytest

from equimodal.compare import (
    bootstrap_ci,
    ensemble_accuracy,
    finished_summary,
    gap_closed,
    parse_variant,
    run_config,
    run_specs,
    summarise,
)


def _write(path, logits, labels, counts) -> None:
    path.mkdir(parents=True)
    np.savez(path / "predictions.npz", test_logits=logits, test_labels=labels, train_label_counts=counts)


def test_product_rule_uses_all_branches(tmp_path) -> None:
    labels = np.array([0, 1, 1, 0])
    a = np.log(np.array([[0.6, 0.4], [0.6, 0.4], [0.2, 0.8], [0.9, 0.1]]))
    b = np.log(np.array([[0.7, 0.3], [0.1, 0.9], [0.45, 0.55], [0.45, 0.55]]))
    _write(tmp_path / "a", a, labels, np.array([5, 5]))
    _write(tmp_path / "b", b, labels, np.array([5, 5]))
    # product: [0.42,0.12]->0, [0.06,0.36]->1, [0.09,0.44]->1, [0.405,0.055]->0
    assert ensemble_accuracy([tmp_path / "a", tmp_path / "b"], "product") == 1.0
    # mean: sample 2 -> [0.35, 0.65] -> 1 ; sample 4 -> [0.675, 0.325] -> 0
    assert ensemble_accuracy([tmp_path / "a", tmp_path / "b"], "mean") == 1.0
    assert ensemble_accuracy([tmp_path / "a"], "product") == 0.75


def test_gap_closed_is_ratio_of_paired_means() -> None:
    joint = np.array([0.80, 0.82, 0.81])
    ens = np.array([0.90, 0.86, 0.89])
    method = joint + 0.5 * (ens - joint)
    f, lo, hi = gap_closed(method, joint, ens)
    assert abs(f - 0.5) < 1e-12 and lo <= f <= hi
    f0, _, _ = gap_closed(joint, joint, ens)
    assert f0 == 0.0


def test_bootstrap_ci_contains_mean_and_needs_two_seeds() -> None:
    v = np.array([[1.0], [2.0], [3.0], [4.0]])
    lo, hi = bootstrap_ci(v, lambda r: float(r.mean()))
    assert lo <= 2.5 <= hi
    assert np.isnan(bootstrap_ci(v[:1], lambda r: float(r.mean()))[0])


def test_run_specs_include_references_per_modality() -> None:
    specs = run_specs(["data.name=x"], ["amss"], ["a", "b"], 2, True)
    labels = {s.label for s in specs}
    assert labels == {"amss", "none", "none_adam", "unimodal_a", "unimodal_b"}
    assert len(specs) == 2 * 5
    assert all(s.overrides[-1] == f"train.seed={s.seed}" for s in specs)


def test_variants_are_labelled_rows_with_their_overrides() -> None:
    label, ov = parse_variant("amss_T1:balancer.name=amss, balancer.options.temperature=1.0")
    assert label == "amss_T1" and ov == ("balancer.name=amss", "balancer.options.temperature=1.0")
    specs = run_specs([], ["none"], ["a", "b"], 1, False, [(label, ov)])
    assert [s.label for s in specs] == ["none", "amss_T1"]
    assert specs[1].overrides == (*ov, "train.seed=0")
    with pytest.raises(ValueError, match="LABEL:key=value"):
        parse_variant("amss_T1")


def _fake_runs(root, specs, test_of, logits_of) -> None:
    """Write summary.json and predictions.npz for each spec, as finished runs would."""
    for s in specs:
        run = root / s.label / f"seed{s.seed}"
        run.mkdir(parents=True)
        (run / "summary.json").write_text(json.dumps({"test": test_of(s), "time_per_epoch": 1.0}))
        labels = np.array([0, 1] * 10)
        counts = np.array([5, 5])
        np.savez(
            run / "predictions.npz",
            test_logits=logits_of(labels),
            test_labels=labels,
            train_label_counts=counts,
        )


def test_summarise_writes_tables_and_plot(tmp_path) -> None:
    rng = np.random.default_rng(0)
    specs = run_specs([], ["amss"], ["a", "b"], 2, True)

    def summary_of(s):
        acc = {"none": 0.80, "amss": 0.84, "none_adam": 0.82}.get(s.label, 0.7) + 0.01 * s.seed
        return {"test_acc": acc, "test_f1": acc, "test_acc_a": 0.6, "test_acc_b": 0.5, "test_imbalance": 0.1}

    _fake_runs(tmp_path, specs, summary_of, lambda y: rng.normal(size=(20, 2)) + 2 * np.eye(2)[y])
    columns, rows = summarise(tmp_path, specs, ["a", "b"], True)
    by = {r["method"]: r for r in rows}
    assert by["amss"]["test acc"] == "84.5 ± 0.7"  # 0.84, 0.85
    assert by["amss"]["Δacc vs none (pp)"].startswith("+4.00")
    assert {"ensemble_product", "ensemble_mean"} <= set(by)
    assert by["unimodal_a"]["gap closed [95% CI]"] == ""
    for name in ("results.md", "results.csv", "results.json", "results.png"):
        assert (tmp_path / name).stat().st_size > 0, name


def test_no_gap_gives_no_fraction(tmp_path) -> None:
    specs = run_specs([], ["amss"], ["a", "b"], 3, True)

    def summary_of(s):
        return {"test_acc": 1.0 if s.label == "none" else 0.9, "test_f1": 0.9, "test_imbalance": 0.0}

    # every branch is perfect: the ensemble equals joint training (1.0), so there is no gap to close
    _fake_runs(tmp_path, specs, summary_of, lambda y: 2 * np.eye(2)[y])
    _, rows = summarise(tmp_path, specs, ["a", "b"], True)
    assert {r["method"]: r for r in rows}["amss"]["gap closed [95% CI]"] == "n/a (no gap)"


def test_a_run_with_another_config_is_not_reused(tmp_path) -> None:
    spec = run_specs(["data.options.views=fac,mor"], ["none"], ["fac", "mor"], 1, False)[0]
    run = tmp_path / spec.label / "seed0"
    run.mkdir(parents=True)
    expected = run_config(None, spec)
    (run / "summary.json").write_text(json.dumps({"config": expected, "test": {}}))
    assert finished_summary(tmp_path, spec, expected) is not None
    other = run_config(None, run_specs(["optim.lr=0.3"], ["none"], ["a", "b"], 1, False)[0])
    assert finished_summary(tmp_path, spec, other) is None
