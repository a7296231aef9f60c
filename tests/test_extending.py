"""The dataset, encoder and fusion sections of docs/extending.md run and do what they say.

Each example runs in a subprocess, so what it registers never reaches the registries of other tests.
The plugin section is run by tests/test_plugins.py (it installs the package it shows).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"
SRC = Path(__file__).resolve().parents[1] / "src"
FILE_BLOCK = re.compile(r"`([^`\s]+)`(?: \([^\n]*\))?:\n\n```\w+\n(.*?)```", re.S)


def section(title: str) -> str:
    """The text of the ``## title`` section of the page."""
    text = DOC.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def file_blocks(title: str) -> dict[str, str]:
    """``path -> content`` of the code blocks a section introduces with a file path (`` `path`: ``)."""
    return {path: code for path, code in FILE_BLOCK.findall(section(title))}


def python_blocks(title: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", section(title), re.S)


def run_python(code: str, cwd: Path, pythonpath: list[Path]) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON object last, which is returned."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in [*pythonpath, SRC])}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_raw_pairs(raw: Path) -> None:
    """Two classes of 10 samples in the documented raw tree, and one unreadable sample."""
    for label, shift in (("left", -1.0), ("right", 1.0)):
        (raw / label).mkdir(parents=True)
        for i in range(10):
            a = " ".join(str(shift + 0.1 * (i + j)) for j in range(4))
            b = " ".join(str(shift * j - 0.05 * i) for j in range(4))
            (raw / label / f"{i:03d}.txt").write_text(f"{a}\n{b}\n")
    (raw / "left" / "bad.txt").write_text("1 2 3\n4 5 6 7\n")


def test_the_dataset_section_is_a_complete_dataset_with_a_prepare_step(tmp_path: Path) -> None:
    blocks = file_blocks("A dataset")
    assert sorted(blocks) == [
        "data/pairs/__init__.py", "data/pairs/loader.py", "data/pairs/pairs-tiny.yaml", "data/pairs/prepare.py"
    ]  # fmt: skip
    folders = tmp_path / "datasets"
    for path, code in blocks.items():
        target = folders / Path(path).relative_to("data")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(code)
    raw, out = tmp_path / "raw", tmp_path / "prepared"
    write_raw_pairs(raw)
    script = textwrap.dedent(
        f"""
        import json
        from pathlib import Path
        import pairs  # a dataset folder registers its dataset and its preparer when imported
        from equimodal.cli import main
        from equimodal.data import load_dataset
        from equimodal.engine import config

        config.DATASET_DIR = Path({str(folders)!r})  # as if the folder were in equimodal/data/
        assert main(["prepare", "pairs", "--raw", {str(raw)!r}, "--out", {str(out)!r}, "--workers", "2"]) == 0
        info = json.loads((Path({str(out)!r}) / "prepare.json").read_text())
        again = main(["prepare", "pairs", "--raw", {str(raw)!r}, "--out", {str(out)!r}])  # resumes
        ds = load_dataset("pairs", root={str(out)!r})
        sample, label = ds.train[0]
        run = Path({str(tmp_path / "run")!r})
        code = main(["train", "pairs-tiny", "--set", "data.options.root={out}", "--out", str(run)])
        summary = json.loads((run / "summary.json").read_text())
        print(json.dumps({{
            "counts": info["counts"], "skipped": info["skipped"], "classes": info["classes"], "again": again,
            "modalities": ds.modalities, "shapes": {{m: list(t.shape) for m, t in sample.items()}},
            "presets": config.list_presets(), "train": code, "epochs": summary["epochs"],
        }}))
        """
    )
    got = run_python(script, tmp_path, [folders])
    assert got["counts"] == {"train": 12, "val": 4, "test": 4} and got["classes"] == ["left", "right"]
    assert [s["clip"] for s in got["skipped"]] == ["left-bad"] and "two lines of 4 numbers" in str(
        got["skipped"]
    )
    assert got["again"] == 0 and got["modalities"] == ["a", "b"] and got["shapes"] == {"a": [4], "b": [4]}
    assert "pairs-tiny" in got["presets"] and got["train"] == 0 and got["epochs"] == 2


def test_the_encoder_and_fusion_sections_register_what_a_config_can_name(tmp_path: Path) -> None:
    (encoder,) = python_blocks("An encoder")
    (fusion,) = python_blocks("A fusion")
    script = (
        textwrap.dedent(
            """
        import json
        import torch
        import equimodal as em
        from equimodal.engine.config import load_config
        from equimodal.engine.trainer import train

        exec(ENCODER)
        exec(FUSION)
        enc = em.create_encoder("norm_linear", in_dim="216", out_dim="8")  # options from a command line
        head = em.create_fusion("mean_heads", {"a": 8, "b": 6}, 3, dropout=0.0)
        fused, unimodal = head({"a": torch.randn(5, 8), "b": torch.randn(5, 6)})
        cfg = load_config(None, [
            "data.options.views=fac,mor", "model.encoders.fac={name: norm_linear, in_dim: 216, out_dim: 8}",
            "model.fusion=mean_heads", "model.fusion_options.dropout=0.1", "train.epochs=1", "train.probe=false",
            "data.batch_size=256",
            "train.progress=false",
        ])
        summary = train(cfg)
        print(json.dumps({
            "out": list(enc(torch.zeros(2, 216)).shape), "out_dim": enc.out_dim,
            "mean": bool(torch.allclose(fused, (unimodal["a"] + unimodal["b"]) / 2)),
            "listed": ["norm_linear" in em.list_encoders(), "mean_heads" in em.list_fusions()],
            "epochs": summary["epochs"],
        }))
        """
        )
        .replace("ENCODER", repr(encoder))
        .replace("FUSION", repr(fusion))
    )
    got = run_python(script, tmp_path, [])
    assert got["out"] == [2, 8] and got["out_dim"] == 8 and got["mean"] and got["listed"] == [True, True]
    assert got["epochs"] == 1


def test_the_page_lists_what_adding_a_dataset_touches() -> None:
    table = section("A dataset").split("\n\n")[2]
    rows = [line.split("|")[1].strip() for line in table.splitlines()[2:]]
    assert rows == [
        "`prepare.py`", "`loader.py`", "`__init__.py`", "`<name>.yaml`, `<name>-tiny.yaml`", "`<name>.md`",
        "`src/equimodal/data/__init__.py`", "`tests/prepare/test_<name>.py`",
    ]  # fmt: skip
    # every built-in dataset folder has the files the table names (those without a prepare step: no prepare.py)
    for folder in sorted(p for p in (SRC / "equimodal" / "data").iterdir() if (p / "__init__.py").is_file()):
        names = {p.name for p in folder.iterdir()}
        assert {"__init__.py", "loader.py"} <= names, folder
        if "prepare.py" in names:
            assert any(n.endswith(".md") for n in names) and any(n.endswith("-tiny.yaml") for n in names), (
                folder
            )
