"""Atomic writers: a full disk or a file size limit is an error naming the file and the fix, nothing half
written replaces a good file, and temporary names are private."""

from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from equimodal.prepare.base import save_npy, save_text
from equimodal.utils.io import atomic_savez, atomic_torch_save, atomic_write_text

SRC = Path(__file__).resolve().parents[1] / "src"

WRITERS: dict[str, Callable[[Path], None]] = {
    "text": lambda p: atomic_write_text(p, "new"),
    "torch": lambda p: atomic_torch_save({"w": torch.zeros(3)}, p),
    "savez": lambda p: atomic_savez(p, a=np.zeros(3)),
    "prepare_npy": lambda p: save_npy(p, np.zeros(3)),
}


class _FullDisk:
    """A file whose every write fails as on a full disk (ENOSPC)."""

    def __init__(self, f: Any) -> None:
        self.f = f

    def __enter__(self) -> _FullDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.f.close()

    def write(self, data: Any) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name: str) -> Any:  # seek, tell, flush, fileno: the real file's
        return getattr(self.f, name)


@pytest.mark.parametrize("writer", list(WRITERS))
def test_a_full_disk_names_the_file_and_keeps_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writer: str
) -> None:
    target = tmp_path / "out" / "file.bin"
    target.parent.mkdir()
    target.write_text("old")
    real = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: _FullDisk(real(fd, *a, **k)))
    with pytest.raises(OSError) as err:
        WRITERS[writer](target)
    message = str(err.value)
    assert f"Could not write {str(target)!r}: the disk is full" in message
    assert "Free space on that disk, or write to another folder (e.g. another --out)." in message
    assert err.value.errno == errno.ENOSPC
    assert target.read_text() == "old" and sorted(p.name for p in target.parent.iterdir()) == ["file.bin"]


def _file_size_limit(limit: int) -> Callable[[], None]:
    def apply() -> None:  # in the child: writes past `limit` bytes fail with EFBIG instead of a signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.parametrize(
    ("limit", "name"),
    # the claim is the first file a run writes; best.pt is a checkpoint
    [(200, ".equimodal-claim"), pytest.param(5000, "best.pt", marks=pytest.mark.slow)],
)
def test_a_file_size_limit_stops_train_with_exit_2_naming_the_file(
    tmp_path: Path, limit: int, name: str
) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    env["COLUMNS"] = "10000"  # the error console does not wrap the long path
    sets = ["train.epochs=1", "train.probe=false", "train.progress=false"]
    proc = subprocess.run(
        [sys.executable, "-m", "equimodal", "train", "--out", str(out), *[a for s in sets for a in ("--set", s)]],
        capture_output=True, text=True, timeout=300, env=env, preexec_fn=_file_size_limit(limit),
    )  # fmt: skip
    err = " ".join(proc.stderr.split())
    assert proc.returncode == 2, proc.stderr
    assert f"Could not write {str(out / name)!r}: the file would exceed the file size limit" in err
    assert "Raise the limit" in err and "Traceback" not in proc.stderr
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_prepare_outputs_use_a_private_temporary_name(tmp_path: Path) -> None:
    """A file at the name another writer would take (the old ``.NAME.<pid>.tmp``) is left alone."""
    target = tmp_path / "clip.txt"
    squatter = tmp_path / f".clip.txt.{os.getpid()}.tmp"
    squatter.mkdir()
    save_text(target, "hello")
    assert target.read_text() == "hello" and squatter.is_dir()
