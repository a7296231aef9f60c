"""Atomic writes: partial outputs never replace good ones, and a failed write names its file.

Every writer goes through a private temporary file (``tempfile.mkstemp`` in the target's folder) and an
atomic rename. A write that fails for lack of room (``ENOSPC``, ``EDQUOT``) or for a file size limit
(``EFBIG``: ``ulimit -f``, or the file system's largest file) is re-raised as an ``OSError`` naming the
file, what happened and the fix (:func:`write_error`); the temporary file is removed and the previous
version of the file, if any, is kept.
"""

from __future__ import annotations

import errno
import io
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

ROOM = "Free space on that disk, or write to another folder (e.g. another --out)."
WRITE_FAILURES = {
    errno.ENOSPC: ("the disk is full (no space left on device)", ROOM),
    errno.EDQUOT: ("the disk quota is exceeded", ROOM),
    errno.EFBIG: (
        "the file would exceed the file size limit (this process's `ulimit -f`, or the largest file the "
        "file system holds)",
        "Raise the limit (e.g. `ulimit -f unlimited`), or write to another file system (e.g. another --out).",
    ),
}
"""What each out-of-room errno means, and its fix."""


def write_error(path: Path, err: OSError) -> OSError:
    """``err`` (a failed write of ``path``) as an ``OSError`` naming the file, what happened and the fix.

    Errors other than those of :data:`WRITE_FAILURES` are returned unchanged.
    """
    if err.errno not in WRITE_FAILURES:
        return err
    what, fix = WRITE_FAILURES[err.errno]
    new = OSError(f"Could not write {str(path)!r}: {what}. {fix}")
    new.errno = err.errno  # no filename: the message names it already
    return new


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic(path: Path, write: Callable[[IO[bytes]], Any], *, sync: bool = True) -> None:
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if sync:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a written file follows the umask
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno in WRITE_FAILURES:
            raise write_error(path, err) from err
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and an atomic rename."""
    _atomic(Path(path), lambda f: f.write(text.encode()))


def atomic_write_bytes(path: Path, data: bytes, *, sync: bool = True) -> None:
    """Write ``data`` to ``path`` through a temporary file and an atomic rename (``sync``: ``fsync`` first;
    bulk outputs that a rerun can redo, such as prepared clips, skip it)."""
    _atomic(Path(path), lambda f: f.write(data), sync=sync)


def atomic_savez(path: Path, **arrays: Any) -> None:
    """``numpy.savez_compressed`` through a temporary file and an atomic rename."""
    import numpy as np

    _atomic(Path(path), lambda f: np.savez_compressed(f, **arrays))


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` through a temporary file and an atomic rename.

    The object is serialised in memory first: ``torch.save`` into a file reports a failed write as a
    ``RuntimeError`` that names neither the file nor the cause, a plain write as an ``OSError``.
    """
    buf = io.BytesIO()
    torch.save(obj, buf)
    _atomic(Path(path), lambda f: f.write(buf.getbuffer()))
