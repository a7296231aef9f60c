"""Reading and writing run files: atomic writes that name a failed file, readers that name a bad one.

Every writer goes through a private temporary file (``tempfile.mkstemp`` in the target's folder) and an
atomic rename. A write that fails for lack of room (``ENOSPC``, ``EDQUOT``) or for a file size limit
(``EFBIG``: ``ulimit -f``, or the file system's largest file) is re-raised as an ``OSError`` naming the
file, what happened and the fix (:func:`write_error`); the temporary file is removed and the previous
version of the file, if any, is kept.

The readers (:func:`read_json`, :func:`read_csv_numbers`, :func:`read_npz`) are for the files that
commands write and others read back (a run's summary and metrics, a comparison's results, ...; their
names and fixes live with their folders, :mod:`equimodal.engine.run_folder` and
:mod:`equimodal.reporting.folders`): a file that is truncated, damaged or not what it should be is a
``ValueError`` naming it, what is wrong and the fix the caller passes (how to write it again).
"""

from __future__ import annotations

import collections
import csv
import errno
import io
import json
import os
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch import nn

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


def atomic_write_csv(
    path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None
) -> None:
    """Write ``rows`` as CSV with a header, atomically.

    Args:
        path: the file.
        rows: one mapping per row; a key a row lacks is an empty cell.
        columns: the header; default the union of every row's keys, in order of appearance.
    """
    header = list(columns) if columns is not None else list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def atomic_savez(path: Path, **arrays: Any) -> None:
    """``numpy.savez_compressed`` through a temporary file and an atomic rename."""
    _atomic(Path(path), lambda f: np.savez_compressed(f, **arrays))


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` through a temporary file and an atomic rename.

    The object is serialised in memory first: ``torch.save`` into a file reports a failed write as a
    ``RuntimeError`` that names neither the file nor the cause, a plain write as an ``OSError``.
    """
    buf = io.BytesIO()
    torch.save(obj, buf)
    _atomic(Path(path), lambda f: f.write(buf.getbuffer()))


# ------------------------------------------------------------------------------------------- reading
DAMAGED = "the file is truncated, damaged or not one equimodal wrote"


def read_text(path: Path, fix: str) -> str:
    """The UTF-8 text of ``path``; otherwise a ``ValueError`` naming it and ``fix`` (how to write it again)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{str(path)!r} is not UTF-8 text (byte {err.start}): {DAMAGED}. {fix}") from None


def read_json(path: Path, fix: str, *, keys: Sequence[str] = ()) -> dict[str, Any]:
    """The JSON object in ``path``, which must hold ``keys`` (dotted for nested ones: ``"test.test_acc"``).

    Raises:
        ValueError: not UTF-8 JSON, not an object, or a key missing; names the file and ``fix``.
    """
    try:
        data = json.loads(read_text(path, fix))
    except json.JSONDecodeError as err:
        where = f"{err.msg} at line {err.lineno}, column {err.colno}"
        raise ValueError(f"{str(path)!r} is not valid JSON ({where}): {DAMAGED}. {fix}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} holds a JSON {type(data).__name__}, not an object: {DAMAGED}. {fix}")
    for key in keys:
        node: Any = data
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise ValueError(f"{str(path)!r} has no {key!r} entry: {DAMAGED}. {fix}")
            node = node[part]
    return data


def read_csv_text(path: Path, fix: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header of a CSV file and its rows as ``(file line, cells)`` (blank lines skipped).

    Raises:
        ValueError: not UTF-8, no header, or a row whose width differs from the header's (a truncated
            file); names the file, its line and ``fix``.
    """
    try:
        with Path(path).open(newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise ValueError(f"{str(path)!r} is empty, without even a header: {DAMAGED}. {fix}")
            rows = [(reader.line_num, row) for row in reader if row]
    except UnicodeDecodeError as err:
        raise ValueError(f"{str(path)!r} is not UTF-8 text (byte {err.start}): {DAMAGED}. {fix}") from None
    except csv.Error as err:
        raise ValueError(f"{str(path)!r} is not a readable CSV ({err}): {DAMAGED}. {fix}") from None
    for line, row in rows:
        if len(row) != len(header):
            raise ValueError(
                f"{str(path)!r} line {line}: {len(row)} fields where the header has {len(header)}: {DAMAGED}. {fix}"
            )
    return header, rows


def read_csv_numbers(path: Path, fix: str, *, numbers_only: bool = False) -> list[dict[str, Any]]:
    """The rows of a CSV file as dicts: numbers as floats, empty cells left out, other text kept (or,
    with ``numbers_only``, a ``ValueError`` naming the file, line and column); see :func:`read_csv_text`."""
    header, rows = read_csv_text(path, fix)
    parsed: list[dict[str, Any]] = []
    for line, cells in rows:
        row: dict[str, Any] = {}
        for key, value in zip(header, cells, strict=True):
            if value == "":
                continue
            try:
                row[key] = float(value)
            except ValueError:
                if numbers_only:
                    raise ValueError(
                        f"{str(path)!r} line {line}, column {key!r}: expected a number, found {value!r}: "
                        f"{DAMAGED}. {fix}"
                    ) from None
                row[key] = value
        parsed.append(row)
    return parsed


def read_npz(path: Path, fix: str, *, keys: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Every array of the ``.npz`` file ``path`` (no pickle), which must hold ``keys``.

    Raises:
        ValueError: not an ``.npz`` archive, a damaged one, or an array missing; names the file and ``fix``.
    """
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError("a single array, not an archive")
        with data:
            arrays = {k: data[k] for k in data.files}
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError) as err:
        raise ValueError(f"{str(path)!r} is not a readable .npz archive ({err}): {DAMAGED}. {fix}") from None
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise ValueError(f"{str(path)!r} has no array {missing}: {DAMAGED}. {fix}")
    return arrays


# --------------------------------------------------------------------------------- plain data
_LEAVES = (bool, int, float, complex, str, type(None), torch.dtype, torch.device, torch.Size)
_MAPPINGS = (dict, collections.OrderedDict, collections.Counter)


def plain_data(obj: Any, where: str) -> Any:
    """``obj`` as data that ``torch.load(weights_only=True)`` reads back: numpy numbers become Python numbers.

    Tensors, Python numbers, strings, ``None``, lists, tuples and dicts (also ``OrderedDict`` and
    ``Counter``, as torch's state dicts use them) are kept as they are; a container is copied only when
    something inside it was converted (a model state dict keeps its ``_metadata``).

    Args:
        obj: what is about to be saved (e.g. a balancer's ``state_dict()``).
        where: its name in the checkpoint, for the error (e.g. ``"balancer"``).

    Raises:
        TypeError: ``obj`` holds anything else (a numpy array, a dataclass, an enum, a generator...),
            naming where it is and what to return instead.
    """
    if type(obj) in _LEAVES or (isinstance(obj, torch.Tensor) and type(obj) in (torch.Tensor, nn.Parameter)):
        return obj
    if isinstance(obj, (np.number, np.bool_)):
        return obj.item()
    if type(obj) in _MAPPINGS:
        items = [
            (plain_data(k, f"{where} (a key)"), plain_data(v, f"{where}[{k!r}]")) for k, v in obj.items()
        ]
        if all(k is k0 and v is v0 for (k, v), (k0, v0) in zip(items, obj.items(), strict=True)):
            return obj
        copy = type(obj)(items)
        if hasattr(obj, "_metadata"):
            copy._metadata = obj._metadata  # type: ignore[attr-defined]
        return copy
    if type(obj) in (list, tuple):
        values = [plain_data(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return obj if all(v is v0 for v, v0 in zip(values, obj, strict=True)) else type(obj)(values)
    kind = f"{type(obj).__module__}.{type(obj).__qualname__}"
    raise TypeError(
        f"Cannot save {where} in a checkpoint: expected tensors, Python numbers, strings, None, lists, tuples "
        f"or dicts (what torch.load(weights_only=True) reads back without running code), found a {kind}. "
        "Return it as a tensor (torch.as_tensor) or as plain Python values from state_dict()."
    )


# --------------------------------------------------------------------------------- folders
class RunFolderError(ValueError):
    """A run folder that cannot be used as asked (another config's run, a file, unwritable)."""


def check_writable_folder(out: Path, flag: str = "--out", *, create: bool = True) -> None:
    """Raise :class:`RunFolderError` when ``out`` is a file or cannot be created or written.

    With ``create=False`` (a dry run, which writes nothing) only the file case is checked.
    """
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"{flag} {str(out)!r} is an existing file, not a folder; pass a folder path.")
    if not create:
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".equimodal-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise RunFolderError(
            f"{flag} {str(out)!r} cannot be written ({err.strerror or err}); pass a folder you can write to."
        ) from err
