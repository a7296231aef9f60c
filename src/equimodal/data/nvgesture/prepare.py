"""``equimodal prepare nvgesture``: the NVIDIA Dynamic Hand Gesture release into RGB, depth and flow arrays.

Raw layout (the release unpacked, list files next to ``Video_data``)::

    RAW/nvgesture_train_correct_cvpr2016_v2.lst   (or nvgesture_train_correct_v2.lst)
    RAW/nvgesture_test_correct_cvpr2016_v2.lst    (or nvgesture_test_correct_v2.lst)
    RAW/Video_data/class_01/subject1_r0/sk_color.avi, sk_depth.avi, ...

Each list line reads ``path:./Video_data/class_01/subject1_r0 depth:sk_depth:73:153
color:sk_color:73:153 duo_left:duo_left:97:217 label:1``: the clip folder, per sensor the video name and
the gesture's first and end frame (end exclusive, as the release's own loader reads ``range(start, end)``),
and the class 1..25.

Per clip it writes (uint8 / int8 ``.npy``, ``T = clip_frames``, ``S = frame_size``):

    rgb/<key>.npy     (T, S, S, 3) uint8, RGB
    depth/<key>.npy   (T, S, S)    uint8, grey
    flow/<key>.npy    (T, S, S, 2) int8, Farneback flow (dx, dy) in pixels of the stored frames,
                      clipped to +-flow_bound and stored as round(flow * 127 / flow_bound)

with ``key`` the clip folder below ``Video_data`` joined by ``_`` (``class_01_subject1_r0``) and class
names ``class_01`` .. ``class_25``. The official train list gives train and val (``val_fraction`` of each
class, seeded), the official test list gives test.

Differences from the official pipeline (spec sections 10 and 11):

- Frames: the gesture's frames are resampled to ``clip_frames`` evenly spaced frames (identical to the
  official read when a gesture spans exactly 80 frames, as most do); the official loader takes the first
  80 frames from the start and zero-pads shorter gestures.
- Colour is stored RGB (PyAV); loaders built on OpenCV keep BGR. Depth is the luma plane of the depth
  video (its channels are equal: it is a grey video).
- Optical flow: the official code reads pre-computed flow whose algorithm it does not state; here it is
  OpenCV's Farneback (see :data:`FARNEBACK`) on consecutive grey colour frames of the stored clip; the
  last frame repeats the previous flow.
- Validation: the official code has none and selects the model on test; a val split is carved here.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...prepare import register_preparer
from ...prepare.base import (
    Item,
    PrepareError,
    Report,
    carve_val,
    check_resume_settings,
    prepare_logger,
    run_items,
    save_npy,
    write_layout,
)
from ...prepare.media import iter_video_frames

DATASET = "nvgesture"
log = prepare_logger(DATASET)
NUM_CLASSES = 25
LIST_NAMES = {
    "train": ("nvgesture_train_correct_cvpr2016_v2.lst", "nvgesture_train_correct_v2.lst"),
    "test": ("nvgesture_test_correct_cvpr2016_v2.lst", "nvgesture_test_correct_v2.lst"),
}
SENSORS = {"color": "rgb", "depth": "depth"}  # list-file sensor -> modality read from its video
COLUMNS = ("rgb", "depth", "flow")
FARNEBACK: dict[str, float | int] = {
    "pyr_scale": 0.5,
    "levels": 3,
    "winsize": 15,
    "iterations": 3,
    "poly_n": 5,
    "poly_sigma": 1.2,
    "flags": 0,
}
"""Parameters of ``cv2.calcOpticalFlowFarneback`` (OpenCV's documented example values)."""
FLOW_LEVELS = 127


@dataclass(frozen=True)
class Entry:
    """One parsed list line: clip key, folder (relative to RAW), class 1..25, per-sensor video and span."""

    key: str
    folder: str
    label: int
    videos: dict[str, tuple[str, int, int]]  # sensor -> (video name without .avi, start, end)
    where: str  # "list file:line" for reports

    @property
    def class_name(self) -> str:
        """``class_01`` .. ``class_25``: sorts in class order."""
        return f"class_{self.label:02d}"


# ------------------------------------------------------------------------------------- list files
def find_list(raw: Path, split: str) -> Path:
    """The train or test list file in ``raw`` (either accepted name).

    Raises:
        FileNotFoundError: neither name is there (names both and the folder expected).
    """
    for name in LIST_NAMES[split]:
        if (raw / name).is_file():
            return raw / name
    raise FileNotFoundError(
        f"No NVGesture {split} list in {str(raw)!r}: expected {' or '.join(LIST_NAMES[split])}. Pass --raw the "
        "unpacked release folder that holds the two .lst files next to Video_data/."
    )


def _clip_key(folder: str) -> str:
    parts = [p for p in Path(folder).parts if p not in (".", "Video_data")]
    if not parts or any(p == ".." for p in parts):
        raise ValueError(f"path {folder!r} does not name a clip folder inside the release")
    return "_".join(parts)


def _sensor_field(value: str) -> tuple[str, int, int]:
    parts = value.split(":")
    if len(parts) != 3:
        raise ValueError(f"sensor field {value!r} is not <video>:<start>:<end>")
    try:
        start, end = int(parts[1]), int(parts[2])
    except ValueError:
        raise ValueError(f"sensor field {value!r} has non-integer frame numbers") from None
    if start < 0 or end <= start:
        raise ValueError(
            f"sensor field {value!r} has an empty or negative frame span (start {start}, end {end})"
        )
    return parts[0], start, end


def parse_line(line: str, where: str) -> Entry:
    """Parse one list line (``path:... depth:... color:... label:N``).

    Raises:
        ValueError: a malformed line, a missing field, or a label outside 1..25 (the message says which).
    """
    fields: dict[str, str] = {}
    for token in line.split():
        name, sep, value = token.partition(":")
        if not sep or not value:
            raise ValueError(f"field {token!r} is not name:value")
        fields[name] = value
    missing = [f for f in ("path", "label", *SENSORS) if f not in fields]
    if missing:
        raise ValueError(f"line lacks the field(s) {missing} (expected path:, depth:, color:, label:)")
    try:
        label = int(fields["label"])
    except ValueError:
        raise ValueError(f"label {fields['label']!r} is not an integer") from None
    if not 1 <= label <= NUM_CLASSES:
        raise ValueError(f"label {label} is outside 1..{NUM_CLASSES}")
    videos = {sensor: _sensor_field(fields[sensor]) for sensor in SENSORS}
    return Entry(_clip_key(fields["path"]), fields["path"], label, videos, where)


def read_list(path: Path, seen: set[str]) -> tuple[list[Entry], list[dict[str, str]]]:
    """The usable entries of a list file and the unusable lines (as report records).

    ``seen`` holds the keys of earlier entries (in this and the other list); a repeated clip is refused.
    """
    entries, bad = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path.name}:{number}"
        try:
            entry = parse_line(line, where)
            if entry.key in seen:
                raise ValueError(f"clip {entry.key!r} is listed a second time")
        except ValueError as err:
            bad.append({"clip": where, "files": str(path), "reason": f"{err} (line {line.strip()!r})"})
            continue
        seen.add(entry.key)
        entries.append(entry)
    return entries, bad


# ------------------------------------------------------------------------------------------ media
def _decode(path: Path, end: int, fmt: str) -> list[np.ndarray]:
    """The first ``end`` frames of a video (``fmt`` ``"rgb24"`` or ``"gray"``), decoding no further."""
    frames: list[np.ndarray] = []
    for frame in iter_video_frames(path):
        frames.append(frame.to_ndarray(format=fmt))
        if len(frames) >= end:
            break
    return frames


def gesture_frames(path: Path, start: int, end: int, count: int, size: int, fmt: str) -> np.ndarray:
    """Frames ``start .. end - 1`` of a video resampled to ``count`` evenly spaced frames, each resized
    to ``size x size`` (bilinear, as ``cv2.resize``): ``(count, size, size[, 3])`` uint8.

    Raises:
        PrepareError: the video is missing, corrupt, or holds fewer than ``end`` frames.
    """
    import cv2

    frames = _decode(path, end, fmt)
    if len(frames) < end:
        raise PrepareError(
            f"video file {str(path)!r} holds {len(frames)} decodable frames, but the list asks for frames "
            f"{start}..{end - 1} (truncated video, or a span beyond its end)"
        )
    picks = np.linspace(start, end - 1, count).round().astype(int)
    resized = [cv2.resize(frames[i], (size, size), interpolation=cv2.INTER_LINEAR) for i in picks]
    return np.stack(resized).astype(np.uint8)


def farneback_flow(rgb: np.ndarray) -> np.ndarray:
    """Dense optical flow ``(T, H, W, 2)`` float32 (dx, dy, pixels) of a ``(T, H, W, 3)`` uint8 clip.

    Flow ``t`` goes from frame ``t`` to frame ``t + 1`` (``cv2.calcOpticalFlowFarneback`` with
    :data:`FARNEBACK` on grey frames); the last frame repeats the previous flow (a one-frame clip: zeros).
    """
    import cv2

    grey = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in rgb]
    flow = np.zeros((*rgb.shape[:3], 2), dtype=np.float32)
    p = FARNEBACK
    for t in range(len(grey) - 1):
        flow[t] = cv2.calcOpticalFlowFarneback(
            grey[t], grey[t + 1], None, p["pyr_scale"], p["levels"], p["winsize"], p["iterations"],
            p["poly_n"], p["poly_sigma"], p["flags"],
        )  # fmt: skip
    if len(grey) > 1:
        flow[-1] = flow[-2]
    return flow


def quantize_flow(flow: np.ndarray, bound: float) -> np.ndarray:
    """Flow in pixels clipped to ``[-bound, bound]`` and stored as int8 ``round(flow * 127 / bound)``."""
    return np.round(np.clip(flow, -bound, bound) * (FLOW_LEVELS / bound)).astype(np.int8)


def dequantize_flow(stored: np.ndarray, bound: float) -> np.ndarray:
    """The inverse of :func:`quantize_flow`: float32 pixels (step ``bound / 127``)."""
    return stored.astype(np.float32) * np.float32(bound / FLOW_LEVELS)


def _prepare_clip(item: Item, out: Path) -> None:
    """Work function: one clip's colour and depth videos into its rgb, depth and flow arrays."""
    color_video, depth_video = item.inputs
    color_span, depth_span, count, size, bound = item.args
    rgb = gesture_frames(color_video, *color_span, count, size, "rgb24")
    depth = gesture_frames(depth_video, *depth_span, count, size, "gray")
    flow = quantize_flow(farneback_flow(rgb), bound)
    for column, array in zip(COLUMNS, (rgb, depth, flow), strict=True):
        save_npy(out / f"{column}/{item.key}.npy", array)


# ---------------------------------------------------------------------------------------- preparer
def _item(raw: Path, entry: Entry, args: tuple[int, int, float]) -> Item:
    folder = raw / entry.folder
    color, depth = entry.videos["color"], entry.videos["depth"]
    return Item(
        entry.key,
        (folder / f"{color[0]}.avi", folder / f"{depth[0]}.avi"),
        tuple(f"{c}/{entry.key}.npy" for c in COLUMNS),
        (color[1:], depth[1:], *args),
    )


def _check_options(clip_frames: int, frame_size: int, val_fraction: float, flow_bound: float) -> None:
    if clip_frames < 1:
        raise ValueError(f"clip_frames must be at least 1, found {clip_frames} (the official clip has 80).")
    if frame_size < 8:
        raise ValueError(f"frame_size must be at least 8 pixels, found {frame_size} (official: 256).")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), found {val_fraction} (default 0.1).")
    if not flow_bound > 0:
        raise ValueError(f"flow_bound must be a positive number of pixels, found {flow_bound} (default 20).")


def _rows(entries: list[Entry], ok: set[str], split_of: dict[str, str]) -> list[dict[str, str]]:
    return [
        {
            "key": e.key,
            "label": e.class_name,
            "split": split_of[e.key],
            **{c: f"{c}/{e.key}.npy" for c in COLUMNS},
        }
        for e in entries
        if e.key in ok
    ]


@register_preparer(DATASET)
def prepare_nvgesture(
    raw: Path,
    out: Path,
    *,
    workers: int,
    clip_frames: int = 80,
    frame_size: int = 256,
    val_fraction: float = 0.1,
    seed: int = 0,
    flow_bound: float = 20.0,
) -> dict[str, Any]:
    """Prepare NVGesture: per clip the gesture's RGB, depth and Farneback flow as ``.npy`` arrays.

    Args:
        raw: the unpacked release (the two ``.lst`` files and ``Video_data/``).
        out: the prepared folder (resumable: finished clips are kept).
        workers: worker processes.
        clip_frames: frames per clip (the gesture span resampled; official 80).
        frame_size: frames resized to ``frame_size`` x ``frame_size`` (official 256; smaller saves disk:
            at 256 a clip takes about 31 MB, 48 GB for the 1 532 clips).
        val_fraction: share of each class's train-list clips moved to the val split (seeded by ``seed``).
        seed: seed of the val split.
        flow_bound: flow is clipped to +-``flow_bound`` pixels before int8 quantisation (step bound / 127).
    """
    _check_options(clip_frames, frame_size, val_fraction, flow_bound)
    options = {"clip_frames": clip_frames, "frame_size": frame_size, "val_fraction": val_fraction,
               "seed": seed, "flow_bound": flow_bound}  # fmt: skip
    check_resume_settings(out, {k: options[k] for k in ("clip_frames", "frame_size", "flow_bound")})
    lists = {split: find_list(raw, split) for split in ("train", "test")}
    seen: set[str] = set()
    train, bad_train = read_list(lists["train"], seen)
    test, bad_test = read_list(lists["test"], seen)
    val = carve_val(((e.key, e.label) for e in train), val_fraction, seed)
    split_of = {e.key: ("val" if e.key in val else "train") for e in train} | {e.key: "test" for e in test}
    entries = train + test
    args = (clip_frames, frame_size, float(flow_bound))
    items = [_item(raw, e, args) for e in entries]
    report = run_items(items, _prepare_clip, out, workers=workers, desc="nvgesture clips")
    report.failed = sorted(bad_train + bad_test, key=lambda f: f["clip"]) + report.failed
    log.info("nvgesture: %s", report.summary())
    return _write(out, entries, split_of, options, report, lists)


def _write(
    out: Path,
    entries: list[Entry],
    split_of: dict[str, str],
    options: dict[str, Any],
    report: Report,
    lists: dict[str, Path],
) -> dict[str, Any]:
    ok = set(report.ok)
    rows = _rows(entries, ok, split_of)
    listed = Counter(split_of[e.key] for e in entries)
    extra = {
        "source": "NVIDIA Dynamic Hand Gesture dataset (nvGesture), sk_color.avi and sk_depth.avi",
        "lists": {s: p.name for s, p in lists.items()},
        "listed": {s: listed.get(s, 0) for s in ("train", "val", "test")},
        "split": "official train / test lists; val carved from the train list per class (seed)",
        "arrays": {
            "rgb": "(T, S, S, 3) uint8 RGB",
            "depth": "(T, S, S) uint8 grey",
            "flow": f"(T, S, S, 2) int8 (dx, dy): pixels = stored * flow_bound / {FLOW_LEVELS}",
        },
        "frames": "gesture span [start, end) resampled to clip_frames evenly spaced frames, resized to S x S",
        "flow": {"algorithm": "cv2.calcOpticalFlowFarneback on consecutive grey colour frames", **FARNEBACK},
    }
    return write_layout(out, DATASET, rows, COLUMNS, options=options, report=report, extra=extra)
