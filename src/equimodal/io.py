"""Atomic writes: partial outputs never replace good ones."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a written file follows the umask
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and an atomic rename."""
    _atomic(Path(path), lambda f: f.write(text.encode()))


def atomic_savez(path: Path, **arrays: Any) -> None:
    """``numpy.savez_compressed`` through a temporary file and an atomic rename."""
    import numpy as np

    _atomic(Path(path), lambda f: np.savez_compressed(f, **arrays))


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` through a temporary file and an atomic rename."""
    _atomic(Path(path), lambda f: torch.save(obj, f))
