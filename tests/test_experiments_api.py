"""The experiments as a Python API: ``compare``, ``study`` and ``diagnose`` called from Python (tiny
configs), their result objects, their silence without a console; and the package's shape (layers, no
import cycle, run-file names in one place)."""

from __future__ import annotations

import ast
import csv
import json
import logging
from pathlib import Path

import pytest
import yaml
from rich.console import Console

import equimodal
from equimodal.engine.run_folder import RUN_OUTPUTS, RunFolder
from equimodal.experiments import (
    ComparisonResult,
    DiagnosisResult,
    RunFailure,
    RunsFailed,
    StudyResult,
    compare,
    diagnose,
    study,
)

FAST = ["data.options.views=fac,mor", "train.epochs=1", "train.probe=false"]
BOOM = ("boom", ["balancer.name=none", "optim.lr=1e29"])  # a run that stops on a non-finite loss


@pytest.fixture(autouse=True)
def _library_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    """The library's loggers as a notebook has them: a command-line test before this one may have sent
    the trainer's progress lines to stdout (the CLI does, off a terminal)."""
    for name in ("equimodal.engine.trainer", "equimodal.prepare"):
        monkeypatch.setattr(logging.getLogger(name), "handlers", [])
        monkeypatch.setattr(logging.getLogger(name), "level", logging.NOTSET)


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_compare_returns_its_table_runs_failures_and_files_and_prints_nothing(tmp_path: Path, capsys) -> None:
    out = tmp_path / "cmp"
    result = compare(balancers=("none", "amss"), seeds=2, overrides=FAST, out=out, references=False,
                     variants=[BOOM])  # fmt: skip
    assert capsys.readouterr() == ("", "")  # console=None: nothing on the terminal
    assert isinstance(result, ComparisonResult) and result.out == out and result.seeds == 2
    assert result.title == "mfeat: test metrics, mean ± std over 2 seeds (epoch chosen on val)"
    # the failed variant is named with its folder and error, and left out of the table
    assert [f.folder for f in result.failures] == [out / "boom" / "seed0", out / "boom" / "seed1"]
    assert all(isinstance(f, RunFailure) and f.error.startswith("NonFiniteError:") for f in result.failures)
    assert [r["method"] for r in result.rows] == ["none", "amss"]
    # the rows are the table's: every column a key, the same cells as results.csv
    assert all(list(r) == result.columns for r in result.rows)
    assert _csv_rows(result.files["csv"]) == [{c: str(r[c]) for c in result.columns} for r in result.rows]
    assert set(result.raw) == {"none", "amss"} and set(result.raw["amss"]) == {"0", "1"}
    assert json.loads(result.files["json"].read_text()) == result.raw
    assert set(result.files) == {"markdown", "csv", "json", "figure"}
    assert all(p.parent == out and p.is_file() for p in result.files.values())
    assert result.runs["amss"] == {0: out / "amss" / "seed0", 1: out / "amss" / "seed1"}
    assert all(RunFolder(p).finished for p in result.runs["none"].values())
    assert not any(RunFolder(p).finished for p in result.runs["boom"].values())
    # a rerun trains only the failed runs again (they fail again) and returns the same table
    again = compare(balancers=("none", "amss"), seeds=2, overrides=FAST, out=out, references=False,
                    variants=[BOOM])  # fmt: skip
    assert again.rows == result.rows and len(again.failures) == 2


def test_compare_prints_its_progress_into_a_given_console(tmp_path: Path) -> None:
    console = Console(record=True, width=200)
    result = compare(
        balancers=["none"], seeds=1, overrides=FAST, out=tmp_path, references=False, console=console
    )
    text = console.export_text()
    assert "Recipe: the default config, data 'mfeat'" in text
    assert "1 runs, 0 already finished, 1 to run" in text and "[1/1] done none/seed0" in text
    assert result.failures == [] and [r["n"] for r in result.rows] == [1]
    assert result.rows[0]["test acc"] != "" and result.rows[0]["Δacc vs none (pp)"] == ""


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (
            {"balancers": "none,amss"},
            TypeError,
            r"balancers: expected a sequence of names.*\('none', 'amss'\)",
        ),
        ({"balancers": ("nonne",)}, ValueError, r"Unknown balancer 'nonne'.*none"),
        (
            {"variants": [("x", ["balancer.name"])]},
            ValueError,
            r"variant \('x', \['balancer.name'\]\): expected",
        ),
        ({"variants": ["x"]}, ValueError, r"--variant 'x' must look like LABEL:key=value"),
        ({"jobs": 0}, ValueError, r"--jobs must be a whole number >= 1"),
    ],
)
def test_compare_refuses_bad_arguments_before_writing(tmp_path: Path, change, error, message) -> None:
    kwargs = {"balancers": ("none",), "seeds": 1, "overrides": FAST, "out": tmp_path / "out", **change}
    with pytest.raises(error, match=message):
        compare(**kwargs)
    assert not (tmp_path / "out").exists()


def _tiny_study(path: Path) -> Path:
    """A study preset of one part: joint training and AMSS, each with concat and sum fusion, one seed."""
    part = {"name": "p", "reference": "none", "columns": {"concat": ["model.fusion=concat"], "sum": ["model.fusion=sum"]},
            "rows": {"none": ["balancer.name=none"], "amss": ["balancer.name=amss"]}}  # fmt: skip
    quick = {"seeds": 1, "set": ["train.epochs=1", "train.probe=false", "data.options.views=fac,mor"]}
    preset = {"title": "A tiny study", "quick": quick, "full": {"seeds": 2}, "parts": [part]}
    path.write_text(yaml.safe_dump(preset, sort_keys=False))  # the rows in their order
    return path


def test_study_returns_its_tables_accuracies_and_files(tmp_path: Path, capsys) -> None:
    result = study(name=str(_tiny_study(tmp_path / "tiny.yaml")), out=tmp_path / "st", jobs=1)
    assert capsys.readouterr() == ("", "")
    assert isinstance(result, StudyResult) and result.study.name == "tiny" and result.study.mode == "quick"
    table = result.tables["p"]
    assert table.header == ["row", "concat", "sum"] and [r[0] for r in table.accuracy] == ["none", "amss"]
    assert [r[0] for r in table.delta] == ["amss"]  # one seed: a difference without an interval
    assert all(cell.startswith(("+", "-")) and "[" not in cell for cell in table.delta[0][1:])
    assert set(result.accuracy) == {"p/concat/none", "p/concat/amss", "p/sum/none", "p/sum/amss"}
    assert table.accuracy[0][1] == f"{100 * result.accuracy['p/concat/none'][0]:.1f}"
    assert result.markdown == result.files["markdown"].read_text()
    assert set(result.files) == {"markdown", "csv", "json", "figure"}
    assert result.files["markdown"].name == "tiny.md" and result.files["json"].name == "study.json"
    assert result.runs["p/sum/amss"] == {0: tmp_path / "st" / "p" / "sum" / "amss" / "seed0"}
    assert result.failures == []


def test_diagnose_reads_a_comparison_and_returns_its_diagnosis(tmp_path: Path, capsys) -> None:
    cmp = tmp_path / "cmp"
    compare(balancers=("none",), seeds=2, overrides=FAST, out=cmp)
    result = diagnose(overrides=FAST, runs=cmp)
    assert capsys.readouterr() == ("", "")
    assert isinstance(result, DiagnosisResult) and result.out == cmp
    diag = result.diagnosis
    assert diag.seeds == 2 and list(diag.modalities) == ["fac", "mor"] and diag.verdict
    assert set(result.runs) == {"none", "unimodal_fac", "unimodal_mor"}
    assert result.runs["unimodal_mor"] == {
        0: cmp / "unimodal_mor" / "seed0",
        1: cmp / "unimodal_mor" / "seed1",
    }
    raw = json.loads(result.files["json"].read_text())
    assert raw["seeds"] == 2 and raw["modalities"]["fac"]["alone"] == diag.modalities["fac"].alone
    assert result.files["markdown"].read_text().startswith("# Diagnosis: mfeat (2 seeds)")


def test_diagnose_names_the_runs_that_failed(tmp_path: Path) -> None:
    with pytest.raises(RunsFailed, match=r"3 run\(s\) did not finish") as err:
        diagnose(overrides=[*FAST, "optim.lr=1e29"], seeds=1, out=tmp_path)
    assert sorted(f.folder.parent.name for f in err.value.failures) == [
        "joint",
        "unimodal_fac",
        "unimodal_mor",
    ]
    assert all(f.error.startswith("NonFiniteError:") for f in err.value.failures)


# ------------------------------------------------------------------------------------ the package's shape
PACKAGE = Path(equimodal.__file__).parent
LAYERS = {"utils": 0, "engine": 2, "reporting": 3, "experiments": 4, "cli": 5}  # the rest: the library, 1


def _modules() -> dict[str, tuple[Path, bool]]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if package else parts)] = (path, package)
    return found


def _imports(name: str, path: Path, package: bool, modules: dict[str, tuple[Path, bool]]) -> set[str]:
    """The package's modules that ``name`` imports, at module level or in a function, with the packages
    that hold them (their ``__init__`` runs first)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = name.split(".")[: None if package else -1]
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target.startswith("equimodal") and target != name:
                found.add(target)
    # importing a.b.c runs the packages a.b and a first: those of ``name``'s own ancestors are running already
    parents = {".".join(t.split(".")[:i]) for t in found for i in range(2, t.count(".") + 1)}
    return found | {p for p in parents if p in modules and not (name + ".").startswith(p + ".")}


def _layer(name: str) -> int:
    parts = name.split(".")
    return LAYERS.get(parts[1], 1) if len(parts) > 1 else 1


def test_each_layer_imports_only_from_those_below_it_and_there_is_no_cycle() -> None:
    modules = _modules()
    graph = {name: _imports(name, path, package, modules) for name, (path, package) in modules.items()}
    upward = [(a, b) for a, targets in graph.items() for b in targets if _layer(b) > _layer(a)]
    assert upward == [("equimodal.__main__", "equimodal.cli")]  # the entry point runs the command line
    assert not [b for b in graph["equimodal.reporting.html"] if b.startswith("equimodal.experiments")]
    seen: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        seen[name] = 1
        for target in sorted(graph[name]):
            assert seen.get(target) != 1, f"import cycle: {' -> '.join([*path, name, target])}"
            if target not in seen:
                visit(target, [*path, name])
        seen[name] = 2

    for name in sorted(graph):
        if name not in seen:
            visit(name, [])


OWN = ("experiments", "reporting", "cli", "engine/run_folder.py", "engine/run_log.py", "engine/checkpoint.py",
       "engine/preflight.py", "engine/trainer.py")  # fmt: skip


def _own_files() -> list[Path]:
    return [p for p in sorted(PACKAGE.rglob("*.py")) if str(p.relative_to(PACKAGE)).startswith(OWN)]


def test_no_private_name_is_used_outside_its_module() -> None:
    for path in _own_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (
                node.level or (node.module or "").startswith("equimodal")
            ):
                private = [
                    a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")
                ]
                assert not private, f"{path.name} imports {private} from {node.module}"


def _code_strings(tree: ast.AST) -> list[str]:
    """Every string constant in ``tree`` but docstrings (f-strings give their literal parts)."""
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
    }  # fmt: skip
    return [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ]


RUN_FILES = (*RUN_OUTPUTS, "config.yaml", "results.json", "results.csv", "results.md", "results.png",
             "study.json", "diagnosis.json", "diagnosis.md", "diagnosis.png")  # fmt: skip


def test_run_file_names_live_in_their_folder_modules_only() -> None:
    """``utils.run_files`` and ``reporting.folders`` name the files; the rest of the package asks them. No code
    string of the experiments, the reporting, the CLI and the run-file side of the engine names a file;
    nowhere in the package is a path built from such a name."""
    homes = {PACKAGE / "utils" / "run_files.py", PACKAGE / "reporting" / "folders.py"}
    own = set(_own_files()) - homes
    for path in sorted(set(PACKAGE.rglob("*.py")) - homes):
        for text in _code_strings(ast.parse(path.read_text())):
            named = [name for name in RUN_FILES if name in text]
            if path in own:
                assert not named, f"{path.relative_to(PACKAGE)}: {text!r}"
            else:
                assert not [n for n in named if text.strip() in (n, f"/{n}")], (
                    f"{path.relative_to(PACKAGE)}: {text!r}"
                )
