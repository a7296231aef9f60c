"""What commands check before their first run: devices, every run's build, optional packages, literal hints."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from equimodal.cli import main

TINY = ["data.options.views=fac,mor", "train.epochs=1", "data.batch_size=256", "train.probe=false"]


def _sets(items: list[str]) -> list[str]:
    return [a for s in items for a in ("--set", s)]


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("gpu", "train.device: expected auto, cpu, cuda, cuda:N (a GPU's index) or mps, found 'gpu'"),
        ("cuda:x", "train.device: expected auto, cpu, cuda"),
    ],
)
def test_a_device_that_is_not_one_is_refused_with_the_valid_values(capsys, device, message) -> None:
    assert main(["train", "--set", f"train.device={device}"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert message in err and "Traceback" not in err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks a machine without CUDA")
def test_cuda_on_a_machine_without_it_is_refused_before_any_work(tmp_path, capsys) -> None:
    """This machine has no GPU (CI's has none either); a GPU machine runs the CUDA tests instead."""
    out = tmp_path / "run"
    assert main(["train", "--set", "train.device=cuda", "--out", str(out)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "asks for a CUDA GPU, but torch finds none here" in err and "train.device=auto" in err
    assert not (out / "metrics.csv").exists()


def test_compare_checks_every_run_before_training_any(tmp_path, capsys) -> None:
    """A value only a built run can reject (a unimodal row for a modality the data lacks) stops compare
    before its first run, naming the run, instead of failing it after the others trained."""
    out = tmp_path / "cmp"
    code = main(["compare", "--out", str(out), "--balancers", "none", "--seeds", "2", "--no-references",
                 "--variant", "uni_pix:balancer.name=unimodal,balancer.options.modality=pix", *_sets(TINY)])  # fmt: skip
    assert code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "Run uni_pix/seed0 cannot start" in err and "'pix'" in err and "Nothing was trained" in err
    assert not list(out.rglob("summary.json")) and not list(out.rglob("metrics.csv"))


def _run_without(blocked: list[str], argv: list[str], cwd) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh interpreter in which importing ``blocked`` modules fails (not installed)."""
    code = textwrap.dedent(f"""
        import sys
        for name in {blocked!r}:
            sys.modules[name] = None  # import raises ImportError, as for a package that is not installed
        from equimodal.cli import main
        sys.exit(main({argv!r}))
    """)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_study_without_scikit_learn_stops_before_its_first_run(tmp_path) -> None:
    """A study with an AV-Digits part on an install without scikit-learn used to train every mfeat run,
    fail the AV-Digits ones one by one, and stop at the end; now nothing trains and the install line is
    printed literally."""
    preset = tmp_path / "mini.yaml"
    preset.write_text(
        textwrap.dedent("""
        title: mini
        quick: {seeds: 1, set: [train.epochs=1, train.probe=false]}
        parts:
          - name: mf
            columns: {fm: ["data.options.views=fac,mor"]}
            rows: {none: [balancer.name=none]}
          - name: av
            columns: {av: [data.name=avdigits]}
            rows: {none: [balancer.name=none]}
    """)
    )
    out = tmp_path / "study"
    done = _run_without(["sklearn", "sklearn.datasets"], ["study", str(preset), "--out", str(out)], tmp_path)
    assert done.returncode == 2, done.stderr
    err = " ".join(done.stderr.split())
    assert "Run av/av/none/seed0 cannot start" in err and "pip install scikit-learn" in err
    assert "Traceback" not in done.stderr
    assert not list(out.rglob("summary.json"))


def test_compare_without_matplotlib_says_so_first_and_claims_no_plot(tmp_path) -> None:
    out = tmp_path / "cmp"
    argv = [
        "compare",
        "--out",
        str(out),
        "--balancers",
        "none",
        "--seeds",
        "1",
        "--no-references",
        *_sets(TINY),
    ]
    done = _run_without(["matplotlib"], argv, tmp_path)
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())
    first = text.index("matplotlib is not installed")
    assert first < text.index("none/seed0")  # said before the first run
    assert "pip install 'equimodal[plots]'" in text  # literally: rich markup used to eat "[plots]"
    assert "plot:" not in text and not (out / "results.png").exists()
    assert (out / "results.md").is_file()
