"""``equimodal report`` as a self-contained HTML page: what it holds, where it goes, and that it renders.

The browser test opens the page in headless Chromium (Debian's ``chromium``; ``make test-browser`` and
CI install it), takes a screenshot and reads back the count of figures that decoded.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from equimodal.cli import main
from equimodal.engine.config import load_config
from equimodal.engine.trainer import train
from equimodal.reporting.html import build_page, stat_groups, write_report

FAST = ["data.options.views=fac,mor", "train.epochs=3", "train.progress=false", "train.probe=true"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "amss_run"
    train(load_config(None, [*FAST, "balancer.name=amss"]), out)
    return out


@pytest.fixture(scope="module")
def comparison(tmp_path_factory) -> Path:
    """A small comparison folder as `equimodal compare` writes it (2 seeds, none and amss)."""
    out = tmp_path_factory.mktemp("report") / "cmp"
    code = main(["compare", "--set", "data.options.views=fac,mor", "--set", "train.epochs=2",
                 "--set", "train.probe=false", "--balancers", "none,amss", "--seeds", "2",
                 "--no-references", "--out", str(out)])  # fmt: skip
    assert code == 0
    return out


STUDY = """
title: "A one-cell study"
claim: "Checks that a study folder reports."
quick:
  seeds: 2
  set: [train.epochs=1, train.probe=false, "data.options.views=fac,mor"]
full:
  seeds: 3
parts:
  - name: mfeat
    reference: none
    columns:
      concat: [model.fusion=concat]
    rows:
      none: [balancer.name=none]
      amss: [balancer.name=amss]
"""


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """A small study folder as `equimodal study` writes it."""
    root = tmp_path_factory.mktemp("report")
    (root / "one.yaml").write_text(STUDY)
    assert main(["study", str(root / "one.yaml"), "--out", str(root / "study"), "--jobs", "1"]) == 0
    return root / "study"


def test_a_study_page_holds_its_tables_and_figure(study: Path, tmp_path: Path) -> None:
    page = write_report([study]).read_text()
    assert "<h2>Study: A one-cell study</h2>" in page and "<h3>mfeat</h3>" in page
    assert "<th>concat</th>" in page and "<td>amss</td>" in page and "Δ vs `none`:" in page
    assert _images(page) == ["one"]
    broken = tmp_path / "broken"
    shutil.copytree(study, broken)
    (broken / "one.md").unlink()
    with pytest.raises(FileNotFoundError, match="one.md' is missing: rerun `equimodal study`"):
        build_page([broken])


def _images(page: str) -> list[str]:
    return re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,', page)


def test_a_run_page_holds_every_figure_and_the_class_names(run: Path) -> None:
    path = write_report([run])
    assert path == run / "report.html"
    page = path.read_text()
    alts = " | ".join(_images(page))
    for what in ("Accuracy over epochs", "Imbalance over epochs", "optimizer step", "Kept fraction of each",
                 "Confusion matrix", "Per modality on test"):  # fmt: skip
        assert what in alts, what
    assert "http://" not in page and "https://" not in page  # self-contained: nothing to fetch
    summary = json.loads((run / "summary.json").read_text())
    assert f"Epoch {summary['selected_epoch']} selected" in page
    assert "fac: linear probe" in page and "fused without mor" in page


def test_a_comparison_page_and_several_folders(run: Path, comparison: Path, tmp_path: Path) -> None:
    page = write_report([comparison]).read_text()
    alts = " | ".join(_images(page))
    assert "Test accuracy per method" in alts and "Paired difference to joint training" in alts
    assert "Validation accuracy over epochs, mean over" in alts
    assert "<td>amss</td>" in page and "Δacc vs none (pp)" in page
    both = write_report([run, comparison], tmp_path / "pages" / "both.html").read_text()
    assert both.count("<h2>") == 2
    with pytest.raises(ValueError, match="2 folders go into one page: pass --out PAGE.html"):
        write_report([run, comparison])
    with pytest.raises(ValueError, match="expected a page ending in .html"):
        write_report([run], tmp_path / "page.txt")
    assert main(["report", str(run), "--out", str(tmp_path / "cli.html")]) == 0
    assert (tmp_path / "cli.html").read_text().startswith("<!doctype html>")


def test_a_run_without_steps_or_summary_still_reports(run: Path, tmp_path: Path) -> None:
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(run / "metrics.csv", partial / "metrics.csv")
    page = build_page([partial])
    assert "has not finished" in page and "reports none, or steps.csv is off" in page
    assert len(_images(page)) == 2
    assert stat_groups(["k/a", "k/b", "layer_kept/a/x", "fallback", "rho/a"], ["a", "b"]) == {
        "k": ["k/a", "k/b"],
        "rho": ["rho/a"],
    }


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    raise AssertionError(
        "headless Chromium is needed for this test: `make test-browser` installs Debian's chromium "
        "(apt-get install chromium), or install it yourself."
    )


@pytest.mark.browser
def test_the_page_renders_in_headless_chromium(
    run: Path, comparison: Path, study: Path, tmp_path: Path
) -> None:
    from PIL import Image

    page = write_report([run, comparison, study], tmp_path / "page.html")
    total = len(_images(page.read_text()))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000"]  # fmt: skip
    url = page.resolve().as_uri()
    dom = subprocess.run(
        [_chromium(), *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120
    )
    match = re.search(r'data-figures="(\d+)/(\d+)"', dom.stdout)
    assert match, dom.stderr[-2000:]
    assert (int(match[1]), int(match[2])) == (total, total) and total >= 10
    shot = tmp_path / "page.png"
    subprocess.run([_chromium(), *flags, "--window-size=1200,4000", f"--screenshot={shot}", url],
                   capture_output=True, timeout=120, check=True)  # fmt: skip
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape == (4000, 1200) and pixels.std() > 10  # something was drawn, not a blank page
