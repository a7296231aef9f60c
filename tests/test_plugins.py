"""Plugins: installed packages register balancers, datasets, encoders, fusions and preparers.

Every test runs equimodal in a subprocess whose path holds an installed distribution (pip's, or one
written by hand as pip would leave it: a ``.dist-info`` folder with ``entry_points.txt``), so the
plugins never reach the registries of other tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_extending import file_blocks

SRC = Path(__file__).resolve().parents[1] / "src"

# A function entry point registering one item of every other kind (the doc's module registers a balancer).
EVERY_KIND = """
def register():
    import torch
    from torch import nn
    import equimodal as em
    from equimodal.prepare import register_preparer

    @em.register_encoder("plugin_linear")
    def plugin_linear(in_dim: int, out_dim: int = 8) -> nn.Module:
        layer = nn.Linear(in_dim, out_dim)
        layer.out_dim = out_dim
        return layer

    @em.register_fusion("plugin_sum")
    class PluginSum(em.Fusion):
        def __init__(self, dims, num_classes):
            super().__init__(dims, num_classes)
            self.heads = nn.ModuleDict({m: nn.Linear(d, num_classes) for m, d in dims.items()})

        def forward(self, features):
            uni = {m: self.heads[m](features[m]) for m in self.modalities}
            return torch.stack(list(uni.values())).sum(0), uni

    @em.register_dataset("plugin_mfeat")
    def plugin_mfeat(*, seed: int = 0):
        return em.load_dataset("mfeat", views="fac,mor", seed=seed)

    @register_preparer("plugin_mfeat")
    def prepare_plugin_mfeat(raw, out, *, workers: int):
        return {}
"""

CHECK = textwrap.dedent(
    """
    import contextlib, io, json, sys
    from pathlib import Path
    import equimodal
    lazy = "equimodal_halfstep" not in sys.modules  # importing equimodal loads no plugin
    from equimodal.cli import main
    from equimodal.plugins import PLUGINS
    listed = io.StringIO()
    with contextlib.redirect_stdout(listed):
        listing = main(["list", "balancers"])
    assert equimodal.list_balancers() and "halfstep" in equimodal.balancers.list_balancers()
    run = Path(sys.argv[1])
    trained = main([
        "train", "--set", "balancer.name=halfstep", "--set", "balancer.options.factor=0.25",
        "--set", "data.options.views=fac,mor", "--set", "train.epochs=1", "--set", "train.probe=false",
        "--set", "data.batch_size=256",
        "--out", str(run),
    ])
    from equimodal.data import list_datasets
    from equimodal.models import list_encoders, list_fusions
    from equimodal.prepare import list_preparers
    print(json.dumps({
        "lazy": lazy, "listing": listing, "balancers": listed.getvalue().split(), "trained": trained,
        "summary": json.loads((run / "summary.json").read_text())["epochs"],
        "config": (run / "config.yaml").read_text(), "loaded": PLUGINS.loaded,
        "kinds": [list_datasets(), list_encoders(), list_fusions(), list_preparers()],
    }))
    """
)


def write_distribution(site: Path, name: str, entry_points: dict[str, str], modules: dict[str, str]) -> None:
    """An installed distribution as pip leaves it in site-packages: its modules and its ``.dist-info``."""
    info = site / f"{name}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    lines = "".join(f"{key} = {value}\n" for key, value in entry_points.items())
    (info / "entry_points.txt").write_text(f"[equimodal.plugins]\n{lines}")
    for module, code in modules.items():
        (site / f"{module}.py").write_text(code)


def python(site: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(SRC)])}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def check_installed_plugin(site: Path, tmp_path: Path, every_kind: bool) -> None:
    """``equimodal list balancers`` shows the doc's plugin balancer and ``equimodal train`` trains with it."""
    done = python(site, "-c", CHECK, str(tmp_path / "run"), cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert (
        got["lazy"] and got["listing"] == 0 and "halfstep" in got["balancers"] and "amss" in got["balancers"]
    )
    assert got["trained"] == 0 and got["summary"] == 1 and "name: halfstep" in got["config"]
    assert "factor: 0.25" in got["config"]
    if every_kind:
        assert got["loaded"] == ["everything", "halfstep"]  # each plugin loaded once, for all lookups
        datasets, encoders, fusions, preparers = got["kinds"]
        assert "plugin_mfeat" in datasets and "plugin_linear" in encoders and "plugin_sum" in fusions
        assert "plugin_mfeat" in preparers and "mfeat" in datasets and "concat" in fusions


@pytest.mark.slow
def test_a_plugin_package_installed_with_pip_is_listed_and_trains(tmp_path: Path) -> None:
    package = tmp_path / "package"
    package.mkdir()
    blocks = file_blocks("A plugin package")
    assert sorted(blocks) == ["equimodal_halfstep.py", "pyproject.toml"]
    for name, code in blocks.items():
        (package / name).write_text(code)
    site = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-q"]
    done = subprocess.run(
        [*pip, "--target", str(site), str(package)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (site / "equimodal_halfstep-0.1.0.dist-info" / "entry_points.txt").is_file()
    check_installed_plugin(site, tmp_path, every_kind=False)


def test_plugins_register_every_kind_and_load_once_on_the_first_lookup(tmp_path: Path) -> None:
    site = tmp_path / "site"
    module = file_blocks("A plugin package")["equimodal_halfstep.py"]
    write_distribution(
        site, "equimodal_halfstep", {"halfstep": "equimodal_halfstep"}, {"equimodal_halfstep": module}
    )
    write_distribution(site, "every_kind", {"everything": "every_kind:register"}, {"every_kind": EVERY_KIND})
    check_installed_plugin(site, tmp_path, every_kind=True)


def test_a_plugin_that_fails_to_load_is_a_warning_and_the_builtins_keep_working(tmp_path: Path) -> None:
    site = tmp_path / "site"
    broken = "import a_module_that_is_not_installed\n"
    write_distribution(site, "broken", {"broken": "broken_plugin"}, {"broken_plugin": broken})
    done = python(site, "-m", "equimodal", "list", "balancers", cwd=tmp_path)
    assert done.returncode == 0 and "amss" in done.stdout.split(), done.stderr
    assert (
        "PluginWarning: equimodal plugin 'broken' (broken_plugin) failed to load and is skipped"
        in done.stderr
    )
    assert "ModuleNotFoundError: No module named 'a_module_that_is_not_installed'" in done.stderr


def test_a_name_a_plugin_shares_with_a_builtin_or_another_plugin_is_an_error_naming_both(
    tmp_path: Path,
) -> None:
    site = tmp_path / "site"
    steal = "import equimodal as em\n\n@em.register_balancer('amss', overwrite=True)\nclass Mine(em.Balancer):\n    pass\n"
    write_distribution(site, "thief", {"thief": "thief_plugin"}, {"thief_plugin": steal})
    done = python(site, "-m", "equimodal", "list", "balancers", cwd=tmp_path)
    assert done.returncode == 2, done.stdout
    message = " ".join(done.stderr.split())
    assert "Plugin 'thief' (thief_plugin) registers the balancer 'amss'" in message
    assert "which the module equimodal.balancers.amss already registers" in message

    site = tmp_path / "site2"
    twin = "import equimodal as em\n\n@em.register_encoder('twin')\ndef twin(in_dim: int):\n    return None\n"
    for name in ("one", "two"):
        write_distribution(site, name, {name: f"{name}_plugin"}, {f"{name}_plugin": twin})
    done = python(site, "-c", "import equimodal; equimodal.list_encoders()", cwd=tmp_path)
    message = " ".join(done.stderr.split())
    assert done.returncode == 1 and "PluginClashError" in message
    assert "registers the encoder 'twin', which plugin 'one' (one_plugin) already registers" in message
    assert "Plugin 'two' (two_plugin)" in message
