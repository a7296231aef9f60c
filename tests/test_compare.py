"""The compare command: statistics and ensembles on synthetic predictions, run folders, tables, plot."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from rich.console import Console

from equimodal.cli import main
from equimodal.engine.run_folder import RunFolder, RunFolderError
from equimodal.experiments import compare
from equimodal.experiments.comparison import summarise
from equimodal.experiments.specs import RunSpec, finished_summary, parse_variant, run_config, run_specs
from equimodal.reporting.figures import results_figure
from equimodal.reporting.statistics import bootstrap_ci, ensemble_accuracy, gap_closed
from equimodal.reporting.tables import results_table


def test_product_rule_uses_all_branches(tmp_path) -> None:
    labels = np.array([0, 1, 1, 0])
    a = np.log(np.array([[0.6, 0.4], [0.6, 0.4], [0.2, 0.8], [0.9, 0.1]]))
    b = np.log(np.array([[0.7, 0.3], [0.1, 0.9], [0.45, 0.55], [0.45, 0.55]]))
    counts = np.array([5, 5])
    # product: [0.42,0.12]->0, [0.06,0.36]->1, [0.09,0.44]->1, [0.405,0.055]->0
    assert ensemble_accuracy([a, b], labels, counts, "product") == 1.0
    # mean: sample 2 -> [0.35, 0.65] -> 1 ; sample 4 -> [0.675, 0.325] -> 0
    assert ensemble_accuracy([a, b], labels, counts, "mean") == 1.0
    assert ensemble_accuracy([a], labels, counts, "product") == 0.75
    with pytest.raises(ValueError, match="Unknown ensemble rule 'max'; expected 'product' or 'mean'"):
        ensemble_accuracy([a, b], labels, counts, "max")


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
    # a list or mapping value keeps its commas
    label, ov = parse_variant("g:model.fusion=mmtm,model.fusion_options.gates=[2,3],x.y={a: 1, b: '2,3'}")
    assert ov == ("model.fusion=mmtm", "model.fusion_options.gates=[2,3]", "x.y={a: 1, b: '2,3'}")


def _fake_runs(root, specs, test_of, logits_of, fraction_of=lambda s: 1.0) -> None:
    """Write summary.json and predictions.npz for each spec, as finished runs would."""
    for s in specs:
        run = root / s.label / f"seed{s.seed}"
        run.mkdir(parents=True)
        summary = {"test": test_of(s), "time_per_epoch": 1.0, "train_fraction": fraction_of(s)}
        (run / "summary.json").write_text(json.dumps(summary))
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

    fraction = lambda s: 0.9 if s.label == "amss" else 1.0  # noqa: E731 - as if amss held 10 % out
    _fake_runs(tmp_path, specs, summary_of, lambda y: rng.normal(size=(20, 2)) + 2 * np.eye(2)[y], fraction)
    rows = summarise(tmp_path, specs, ["a", "b"], True).rows
    by = {r["method"]: r for r in rows}
    assert by["amss"]["test acc"] == "84.5 ± 0.7"  # 0.84, 0.85
    assert (by["amss"]["train data"], by["none"]["train data"]) == ("90 %", "100 %")
    assert (
        "amss holds the rest out of training to fit its own weights" in (tmp_path / "results.md").read_text()
    )
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
    rows = summarise(tmp_path, specs, ["a", "b"], True).rows
    assert {r["method"]: r for r in rows}["amss"]["gap closed [95% CI]"] == "n/a (no gap)"


def test_a_run_with_another_config_is_not_reused(tmp_path) -> None:
    spec = run_specs(["data.options.views=fac,mor"], ["none"], ["fac", "mor"], 1, False)[0]
    run = tmp_path / spec.label / "seed0"
    run.mkdir(parents=True)
    expected = run_config(None, spec)
    (run / "summary.json").write_text(json.dumps({"config": expected, "test": {"test_acc": 0.5}}))
    assert finished_summary(tmp_path, spec, expected) is not None
    other = run_config(None, run_specs(["optim.lr=0.3"], ["none"], ["a", "b"], 1, False)[0])
    assert finished_summary(tmp_path, spec, other) is None


# ---------------------------------------------------------------- compare end to end

BASE = ["data.options.views=fac,mor", "train.epochs=1", "train.probe=false"]


def _compare(out, **kw):
    """``compare`` of joint training, one seed, no references, on the fast mfeat pair (``kw`` changes it)."""
    values = {"balancers": ("none",), "seeds": 1, "overrides": list(BASE), "out": out, "references": False}
    values.update(kw)
    return compare(**values)


def _finished(root, spec, config, test, marker: str = "") -> None:
    """A finished run folder of ``spec`` trained with ``config`` (as train writes it)."""
    run = root / spec.label / f"seed{spec.seed}"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    summary = {"config": config, "test": test, "time_per_epoch": 1.0, "marker": marker}
    (run / "summary.json").write_text(json.dumps(summary))
    labels = np.array([0, 1] * 10)
    np.savez(
        run / "predictions.npz",
        test_logits=2 * np.eye(2)[labels] + 0.1 * spec.seed,
        test_labels=labels,
        train_label_counts=np.array([5, 5]),
    )


def test_a_folder_of_another_config_is_refused_before_any_training(tmp_path, capsys) -> None:
    spec = run_specs(BASE, ["none"], ["fac", "mor"], 1, False)[0]
    old = run_config(None, RunSpec(spec.label, (*spec.overrides, "optim.lr=0.3"), 0))
    _finished(tmp_path, spec, old, {"test_acc": 0.5}, marker="old run")
    (tmp_path / "none" / "seed0" / "notes.txt").write_text("mine")
    before = sorted(p.name for p in (tmp_path / "none" / "seed0").iterdir())
    with pytest.raises(RunFolderError) as err:
        _compare(tmp_path)
    message = str(err.value)
    assert "none/seed0: optim.lr: 0.3 there, " in message
    assert "another --out" in message and "--overwrite" in message and "Nothing was trained" in message
    run = tmp_path / "none" / "seed0"
    assert sorted(p.name for p in run.iterdir()) == before
    assert json.loads((run / "summary.json").read_text())["marker"] == "old run"
    # through the command line: exit status 2 and the same message, no traceback
    assert main(["compare", "--out", str(tmp_path), "--balancers", "none", "--seeds", "1",
                 "--no-references", *[a for s in BASE for a in ("--set", s)]]) == 2  # fmt: skip
    assert "optim.lr: 0.3 there" in capsys.readouterr().err
    assert json.loads((run / "summary.json").read_text())["marker"] == "old run"


def test_a_run_that_wrote_only_its_config_is_retrained_under_the_new_one(tmp_path) -> None:
    """A run that failed on a bad option leaves config.yaml alone: rerunning with a fixed config trains."""
    spec = run_specs(BASE, ["none"], ["fac", "mor"], 1, False)[0]
    run = tmp_path / "none" / "seed0"
    run.mkdir(parents=True)
    old = run_config(None, RunSpec(spec.label, (*spec.overrides, "optim.lr=0.3"), 0))
    (run / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    assert _compare(tmp_path).failures == []
    assert json.loads((run / "summary.json").read_text())["config"]["optim"]["lr"] != 0.3


def test_overwrite_retrains_a_folder_of_another_config_from_scratch(tmp_path) -> None:
    spec = run_specs(BASE, ["none"], ["fac", "mor"], 1, False)[0]
    old = run_config(None, RunSpec(spec.label, (*spec.overrides, "optim.lr=0.3"), 0))
    _finished(tmp_path, spec, old, {"test_acc": 0.5}, marker="old run")
    (tmp_path / "none" / "seed0" / "notes.txt").write_text("mine")
    (tmp_path / "none" / "seed0" / "last.pt").write_bytes(b"not a checkpoint")  # resuming it would fail
    assert _compare(tmp_path, overwrite=True).failures == []
    run = tmp_path / "none" / "seed0"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["config"] == run_config(None, spec) and "marker" not in summary
    assert yaml.safe_load((run / "config.yaml").read_text()) == run_config(None, spec)
    assert (run / "notes.txt").read_text() == "mine"  # only the old run's files were replaced


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"seeds": 0},
            r"--seeds must be a whole number >= 1 \(the number of seeds.*found 0\. Pass e\.g\. --seeds 3",
        ),
        ({"seeds": -2}, r"--seeds must be a whole number >= 1 .*found -2"),
        ({"jobs": 0}, r"--jobs must be a whole number >= 1 \(runs in parallel\), found 0"),
        (
            {"threads": -1},
            r"--threads must be a whole number >= 1 \(torch threads per run, or auto\), found -1",
        ),
    ],
)
def test_counts_below_one_are_refused_first(tmp_path, change, message) -> None:
    with pytest.raises(ValueError, match=message):
        _compare(tmp_path / "out", **change)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="--seeds must be"):
        run_specs([], ["none"], ["a"], 0, False)


def test_a_single_seed_has_no_spread_and_no_interval(tmp_path) -> None:
    specs = run_specs([], ["amss"], ["a", "b"], 1, True)

    def summary_of(s):
        acc = {"none": 0.80, "amss": 0.84}.get(s.label, 0.7)
        return {"test_acc": acc, "test_f1": acc, "test_acc_a": 0.6, "test_acc_b": 0.5, "test_imbalance": 0.1}

    rng = np.random.default_rng(0)
    _fake_runs(tmp_path, specs, summary_of, lambda y: rng.normal(size=(20, 2)) + 2 * np.eye(2)[y])
    rows = summarise(tmp_path, specs, ["a", "b"], True).rows
    by = {r["method"]: r for r in rows}
    assert by["amss"]["test acc"] == "84.0" and by["amss"]["a unimodal"] == "60.0"
    assert by["amss"]["Δacc vs none (pp)"] == "+4.00 [n/a (1 seed)]"
    assert by["amss"]["gap closed [95% CI]"] == "n/a (1 seed)"
    for name in ("results.md", "results.csv"):
        text = (tmp_path / name).read_text()
        assert "± 0.0" not in text and "nan" not in text.lower() and "n/a (1 seed)" in text, name
    assert 'its interval reads "n/a (1 seed)"' in (tmp_path / "results.md").read_text()


def test_the_terminal_table_fits_80_columns_and_the_files_have_every_column(
    tmp_path, capsys, monkeypatch
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    specs = run_specs(BASE, ["none", "amss", "amss_plus"], ["fac", "mor"], 3, True)
    for s in specs:
        acc = {"none": 0.801, "amss": 0.8437, "amss_plus": 0.852}.get(s.label, 0.7) + 0.013 * s.seed
        test = {"test_acc": acc, "test_f1": acc, "test_acc_fac": 0.61, "test_acc_mor": 0.52,
                "test_probe_fac": 0.63, "test_probe_mor": 0.55, "test_imbalance": 0.123}  # fmt: skip
        _finished(tmp_path, s, run_config(None, s), test)
    assert main(["compare", "--out", str(tmp_path), "--balancers", "none,amss,amss_plus", "--seeds", "3",
                 *[a for s in BASE for a in ("--set", s)]]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "0 to run" in printed
    assert "…" not in printed and max(len(line) for line in printed.splitlines()) <= 80
    for cell in ("ensemble_product", "unimodal_fac", "86.5 ± 1.3", "test acc", "results.md", "results.csv"):
        assert cell in printed, cell
    header = (tmp_path / "results.csv").read_text().splitlines()[0].split(",")
    assert header == ["method", "n", "train data", "test acc", "test macro-F1", "fac unimodal", "mor unimodal", "fac probe",
                      "mor probe", "imbalance", "time/epoch vs none", "gap closed [95% CI]",
                      "Δacc vs none (pp)"]  # fmt: skip
    assert "fac probe" in (tmp_path / "results.md").read_text()


def test_results_table_never_cuts_a_cell() -> None:
    rows = [{"method": "ensemble_product", "n": 10, "test acc": "100.0 ± 10.7",
             "Δacc vs none (pp)": "-10.10 [-10.10, -10.10]", "gap closed [95% CI]": "-0.54 [-0.58, -0.51]"},
            {"method": "amss", "n": 10, "test acc": "84.5", "Δacc vs none (pp)": "+4.00 [n/a (1 seed)]",
             "gap closed [95% CI]": "n/a (1 seed)"}]  # fmt: skip
    console = Console(width=80, record=True)
    console.print(results_table(rows, "t", seeds=10))
    text = console.export_text()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80
    for cell in ("-10.10 [-10.10, -10.10]", "-0.54 [-0.58, -0.51]", "100.0 ± 10.7"):
        assert cell in text, cell  # the widest cells of a real table fit on one line
    assert "+4.00 [n/a (1 seed)]" in text  # printed as text, not read as a style tag
    console = Console(width=80, record=True)
    console.print(results_table([{"method": "a_very_long_variant_label_" * 4}], "t"))
    text = console.export_text()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80
    assert "a_very_long_variant_label_" * 4 in "".join(text.split())  # too long: folded, not cut


def test_the_result_plot_starts_the_accuracy_axis_at_zero() -> None:
    raw = {"none": {"0": {"test_acc": 0.91}, "1": {"test_acc": 0.93}}, "amss": {"0": {"test_acc": 0.95}}}
    fig = results_figure(raw)
    ax = fig.axes[0]
    assert ax.get_ylim() == (0.0, 100.0)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["none", "amss"]


class _Stop(Exception):
    pass


@pytest.mark.parametrize(
    ("config", "dataset", "source", "data_name"),
    [
        (None, "avdigits_hard", "avdigits_hard", "avdigits_hard"),  # a preset: the recipe `train X` runs
        (None, "mfeat", None, "mfeat"),  # no preset: the default config on that dataset
        ("avdigits_hard", "avdigits", "avdigits_hard", "avdigits"),  # a config given: only data.name changes
    ],
)
def test_dataset_runs_the_recipe_train_runs(
    monkeypatch, tmp_path, capsys, config, dataset, source, data_name
):
    """``compare --dataset X`` trains X's preset (as ``train X``, ``diagnose X`` and run_results.sh do),
    not the default config's lr, batch and epochs with data.name swapped; it says which recipe it runs."""
    from equimodal.engine.config import config_to_dict, load_config

    seen: dict[str, object] = {}

    def fake_execute(out, specs, cfg_source, **kwargs):
        seen["configs"] = [run_config(cfg_source, s) for s in specs]
        raise _Stop

    monkeypatch.setattr("equimodal.experiments.comparison.execute_runs", fake_execute)
    with pytest.raises(_Stop):
        _compare(tmp_path, dataset=dataset, config=config, overrides=[], console=Console())
    want = load_config(
        source, [f"data.name={data_name}", "balancer.name=none", "train.seed=0", "train.progress=0"]
    )
    assert seen["configs"][0] == config_to_dict(want)
    printed = " ".join(capsys.readouterr().out.split())
    assert f"data {data_name!r}" in printed and f"{want.train.epochs} epochs" in printed


def test_a_damaged_recorded_config_is_a_difference_naming_the_file(tmp_path) -> None:
    folder = RunFolder(tmp_path / "none" / "seed0")
    folder.path.mkdir(parents=True)
    (folder.path / "metrics.csv").write_text("epoch\n0\n")
    (folder.path / "config.yaml").write_text("optim: {lr: 0.1\n")
    assert list(folder.recorded_config() or {}) == [
        "(config.yaml is damaged: expected ',' or '}', but got '<stream end>')"
    ]
    (folder.path / "config.yaml").unlink()
    (folder.path / "summary.json").write_text('{"config": {"optim"')
    assert list(folder.recorded_config() or {}) == ["(summary.json is damaged: truncated or not JSON)"]


# ---------------------------------------------------------------- umt reads the unimodal runs of its seed


def test_compare_trains_umt_after_the_unimodal_runs_of_its_seed_and_points_it_at_them(tmp_path) -> None:
    result = _compare(tmp_path, balancers=("umt",), seeds=2, references=True, console=Console(quiet=True))
    assert result.failures == []
    for seed in (0, 1):
        run = tmp_path / "umt" / f"seed{seed}"
        teachers = json.loads((run / "summary.json").read_text())["config"]["balancer"]["options"]["teachers"]
        assert teachers == {m: str(tmp_path / f"unimodal_{m}" / f"seed{seed}") for m in ("fac", "mor")}
        # the teachers had finished when umt started: their summaries are older than umt's first checkpoint
        for folder in teachers.values():
            assert RunFolder(folder).summary.stat().st_mtime <= (run / "config.yaml").stat().st_mtime
    assert "umt" in {row["method"] for row in result.rows}
    again = _compare(tmp_path, balancers=("umt",), seeds=2, references=True)  # all finished: nothing trains
    assert again.failures == [] and again.rows == result.rows


def test_compare_refuses_umt_without_references_unless_teachers_are_given(tmp_path) -> None:
    with pytest.raises(
        ValueError, match=r"umt/seed0: balancer 'umt' reads unimodal runs .*drop --no-references"
    ):
        _compare(tmp_path, balancers=("umt",))
    assert not (tmp_path / "umt").exists()


def test_a_failed_unimodal_run_leaves_umt_of_that_seed_unstarted_and_named(tmp_path, monkeypatch) -> None:
    from equimodal.experiments import comparison
    from equimodal.experiments.execution import RunFailure

    real = comparison.execute_runs
    calls = []

    def first_wave_fails_mor(out, specs, *a, **kw):
        expected, failures = real(out, [s for s in specs if s.label != "unimodal_mor"], *a, **kw)
        calls.append([s.name for s in specs])
        lost = [s for s in specs if s.label == "unimodal_mor"]
        failures += [RunFailure(tmp_path / s.label / f"seed{s.seed}", "RuntimeError: x") for s in lost]
        return {**expected, **{s: run_config(None, s) for s in lost}}, failures

    monkeypatch.setattr(comparison, "execute_runs", first_wave_fails_mor)
    result = _compare(tmp_path, balancers=("umt",), references=True)
    assert "umt/seed0" not in calls[0] and calls[1] == []
    umt = [f for f in result.failures if f.folder == tmp_path / "umt" / "seed0"]
    assert len(umt) == 1 and "unimodal run" in umt[0].error and "unimodal_mor" in umt[0].error
