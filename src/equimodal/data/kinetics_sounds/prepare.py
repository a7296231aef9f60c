"""``equimodal prepare kinetics_sounds``: Kinetics-Sounds videos into spectrograms and 1 fps frame folders.

Raw layout (the videos as downloaded, one folder per class, and the split lists of the version you use)::

    RAW/videos/<class name>/<clip id>.mp4    (video with its audio track; .mkv, .webm, .avi also read)
    RAW/splits/train.txt                     one clip per line: <class name>/<clip id>.mp4
    RAW/splits/val.txt                       optional (without it, val is carved from train)
    RAW/splits/test.txt

A list line may leave out the extension (``<class name>/<clip id>``) or start with ``videos/``; when the
named file is absent, the same clip id with another video extension is taken. Kinetics-Sounds exists in
several versions (31 classes with 14 799 / 2 597 clips; 12 892 / 1 228; the AMSS group's 15 000 / 1 900 /
1 900): the lists decide which one is prepared, and ``prepare.json`` records the listed counts, the
classes and the version the counts match (if any).

Per clip (``key`` = ``<class name>/<clip id>``) it writes::

    audio/<key>.npy          log(|STFT| + 1e-7) of the audio track: 16 kHz mono, tiled or cut to 10 s,
                             n_fft 512, hop 160, Hann window: (257, 1001) float16
    frames/<key>/00001.jpg   one frame per second (the frame nearest the middle of each second),
                             shorter side resized to 256

Clips giving 3 frames or fewer are dropped, as the official pipeline does. Missing, empty, truncated or
undecodable videos, videos without an audio track, and list lines naming an unknown class or a missing
file are skipped and listed (with the file and the reason) in ``prepare.json``.

Differences from the official pipeline (spec sections 8-10): the official code reads pre-computed
spectrogram pickles of 257 x 1004 (the script that made them is not published; 10 s at 16 kHz with hop 160
gives 1001 frames here), and frame folders extracted by an unpublished script. Frames are stored smaller
(short side 256) to keep the disk use low; the loader crops and resizes them to 224 anyway.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

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
    save_frame_folder,
    save_npy,
    write_layout,
)
from ...prepare.media import official_spectrogram, read_audio_track, resample, resize_frame, video_frames

DATASET = "kinetics_sounds"
log = prepare_logger(DATASET)
SPLITS = ("train", "val", "test")
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi")
COLUMNS = ("audio", "visual")
N_FFT = 512
HOP_LENGTH = 160
MAX_DROPPED_FRAMES = 3
"""Clips with this many frames or fewer (at ``fps``) are dropped, as the official pipeline does."""
KNOWN_VERSIONS: tuple[tuple[str, dict[str, int]], ...] = (
    ("31 classes, 14 799 train / 2 597 test", {"train+val": 14799, "test": 2597}),
    ("12 892 train / 1 228 test", {"train+val": 12892, "test": 1228}),
    ("AMSS group: 15 000 train / 1 900 val / 1 900 test", {"train": 15000, "val": 1900, "test": 1900}),
)
ARRAY_OPTIONS = ("sample_rate", "audio_seconds", "audio_dtype", "fps", "frame_size")
"""Options that change what a clip's files hold: a folder is only resumed with the same values."""


@dataclass(frozen=True)
class Entry:
    """One usable list line: the clip key, its class, its video file and where it was listed."""

    key: str
    label: str
    video: Path
    where: str  # "train.txt:3"


# ------------------------------------------------------------------------------------- split lists
def find_lists(raw: Path) -> dict[str, Path]:
    """The split lists present in ``raw/splits`` (train and test required, val optional).

    Raises:
        FileNotFoundError: ``videos/`` or the train / test list is missing (says which and why they are
            needed: the lists decide which Kinetics-Sounds version is prepared).
    """
    if not (raw / "videos").is_dir():
        raise FileNotFoundError(
            f"No {str(raw / 'videos')!r} folder: expected the clips as videos/<class name>/<clip id>.mp4 in "
            "--raw (one folder per class)."
        )
    lists = {s: raw / "splits" / f"{s}.txt" for s in SPLITS if (raw / "splits" / f"{s}.txt").is_file()}
    missing = [f"splits/{s}.txt" for s in ("train", "test") if s not in lists]
    if missing:
        raise FileNotFoundError(
            f"No Kinetics-Sounds split list {' or '.join(missing)} in {str(raw)!r}. Kinetics-Sounds exists in "
            "several versions (31 classes 14 799 / 2 597 clips; 12 892 / 1 228; the AMSS group's 15 000 / "
            "1 900 / 1 900) and the lists decide which one is prepared: write RAW/splits/train.txt and "
            "test.txt (val.txt optional; without it val is carved from train) with one clip per line as "
            "<class name>/<clip id>.mp4."
        )
    return lists


def _split_line(line: str) -> tuple[str, str]:
    """``"<class>/<clip>[.ext]"`` (optionally ``videos/`` first) -> ``(class, clip file name)``."""
    parts = [p for p in line.replace("\\", "/").split("/") if p not in ("", ".")]
    if len(parts) == 3 and parts[0] == "videos":
        parts = parts[1:]
    if len(parts) != 2 or ".." in parts:
        raise ValueError(f"line {line!r} is not <class name>/<clip id>.mp4")
    return parts[0], parts[1]


def find_video(folder: Path, name: str) -> Path | None:
    """The video ``name`` in ``folder``; else the same clip id with another extension; else ``None``."""
    if (folder / name).is_file():
        return folder / name
    stem = clip_id(name)
    return next((folder / f"{stem}{s}" for s in VIDEO_SUFFIXES if (folder / f"{stem}{s}").is_file()), None)


def clip_id(name: str) -> str:
    """A clip's id: its file name without a video extension (``abc_000010_000020.mp4`` -> ``abc_000010_000020``)."""
    suffix = Path(name).suffix
    return name[: -len(suffix)] if suffix.lower() in VIDEO_SUFFIXES else name


def _bad_key(line: str) -> str:
    """The clip key a list line names (for the report), as far as it can be read."""
    try:
        label, name = _split_line(line)
    except ValueError:
        return line
    return f"{label}/{clip_id(name)}"


def _unknown_class(label: str, classes: list[str]) -> str:
    close = difflib.get_close_matches(label, classes, n=2, cutoff=0.6)
    hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
    return f"unknown class {label!r}: no folder videos/{label}{hint}"


def parse_entry(raw: Path, line: str, classes: list[str], where: str = "") -> Entry | str:
    """An :class:`Entry` for a list line, or the reason it cannot be used (unknown class, missing file).

    Raises:
        ValueError: the line is not ``<class name>/<clip id>[.ext]``.
    """
    label, name = _split_line(line)
    if label not in classes:
        return _unknown_class(label, classes)
    video = find_video(raw / "videos" / label, name)
    if video is None:
        also = ", ".join(VIDEO_SUFFIXES)
        return (
            f"video file {str(raw / 'videos' / label / name)!r} is missing (no {clip_id(name)!r} with any of "
            f"{also} either)"
        )
    return Entry(f"{label}/{clip_id(video.name)}", label, video, where)


def read_lists(
    raw: Path, lists: dict[str, Path]
) -> tuple[dict[str, list[Entry]], list[dict[str, str]], dict[str, int]]:
    """The usable entries of every list, the unusable lines (as report records) and the listed counts.

    A clip listed twice is kept once: in test if listed there, else val, else train (so a clip in both
    train and test never leaks into training); the other listings are reported.
    """
    classes = sorted(p.name for p in (raw / "videos").iterdir() if p.is_dir() and not p.name.startswith("."))
    entries: dict[str, list[Entry]] = {s: [] for s in lists}
    bad: list[dict[str, str]] = []
    listed: dict[str, int] = {s: 0 for s in SPLITS}
    seen: dict[str, str] = {}
    for split in sorted(lists, key=lambda s: SPLITS.index(s), reverse=True):  # test, val, train
        path = lists[split]
        for number, line in enumerate(path.read_text(encoding="utf-8-sig", errors="replace").splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            listed[split] += 1
            where = f"{path.name}:{number}"
            try:
                entry = parse_entry(raw, line, classes, where)
            except ValueError as err:
                entry = str(err)
            if isinstance(entry, Entry) and entry.key in seen:
                entry = f"clip {entry.key!r} is also listed in {seen[entry.key]}; kept there only"
            if isinstance(entry, str):
                bad.append({"clip": _bad_key(line), "files": str(path), "reason": f"{where}: {entry}"})
                continue
            seen[entry.key] = where
            entries[split].append(entry)
    return entries, bad, listed


def match_version(listed: dict[str, int]) -> str | None:
    """The known Kinetics-Sounds version whose clip counts the lists match exactly, else ``None``."""
    counts = {**listed, "train+val": listed.get("train", 0) + listed.get("val", 0)}
    for name, want in KNOWN_VERSIONS:
        if all(counts.get(k) == n for k, n in want.items()):
            return name
    return None


# ------------------------------------------------------------------------------------------- media
def clip_spectrogram(path: Path, sample_rate: int, seconds: float) -> np.ndarray:
    """The audio track of ``path`` at ``sample_rate``, tiled or cut to ``seconds``, clipped to [-1, 1], as
    ``log(|STFT| + 1e-7)`` (n_fft 512, hop 160, Hann, centred): ``(257, 1 + samples // 160)`` float32."""
    wave, rate = read_audio_track(path)
    wave = resample(wave, rate, sample_rate)
    return official_spectrogram(wave, sample_rate, seconds=seconds, n_fft=N_FFT, hop_length=HOP_LENGTH)


def _prepare_clip(item: Item, out: Path) -> None:
    """Work function: one video into its frame folder and spectrogram (written last)."""
    (video,) = item.inputs
    fps, frame_size, sample_rate, seconds, dtype = item.args
    frames = video_frames(video, fps=fps)
    if len(frames) <= MAX_DROPPED_FRAMES:
        raise PrepareError(
            f"video file {str(video)!r} gives {len(frames)} frame(s) at {fps:g} fps: clips with "
            f"{MAX_DROPPED_FRAMES} frames or fewer are dropped, as the official pipeline does"
        )
    spec = clip_spectrogram(video, sample_rate, seconds).astype(dtype)
    save_frame_folder(out / item.outputs[1], [resize_frame(f, frame_size) for f in frames])
    save_npy(out / item.outputs[0], spec)


# ---------------------------------------------------------------------------------------- preparer
def _check_options(
    sample_rate: int, audio_seconds: float, fps: float, frame_size: int | None, val_fraction: float
) -> None:
    if sample_rate < 1000:
        raise ValueError(f"sample_rate must be at least 1000 Hz, found {sample_rate} (official: 16000).")
    if not audio_seconds > 0:
        raise ValueError(f"audio_seconds must be positive, found {audio_seconds} (official: 10).")
    if not fps > 0:
        raise ValueError(f"fps must be positive, found {fps} (official: 1 frame per second).")
    if frame_size is not None and frame_size < 8:
        raise ValueError(
            f"frame_size must be at least 8 pixels, or null to keep the original size; found {frame_size}."
        )
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), found {val_fraction} (default 0.1).")


def _item(entry: Entry, args: tuple[Any, ...]) -> Item:
    return Item(entry.key, (entry.video,), (f"audio/{entry.key}.npy", f"frames/{entry.key}"), args)


@register_preparer(DATASET)
def prepare_kinetics_sounds(
    raw: Path,
    out: Path,
    *,
    workers: int,
    sample_rate: int = 16000,
    audio_seconds: float = 10.0,
    audio_dtype: Literal["float16", "float32"] = "float16",
    fps: float = 1.0,
    frame_size: int | None = 256,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> dict[str, Any]:
    """Prepare Kinetics-Sounds: per clip a log-magnitude spectrogram ``.npy`` and a 1 fps frame folder.

    Args:
        raw: the download (``videos/<class>/<clip>.mp4`` and ``splits/{train,val,test}.txt``).
        out: the prepared folder (resumable: finished clips are kept).
        workers: worker processes.
        sample_rate: audio resampled to this rate (official 16 000 Hz).
        audio_seconds: audio tiled (short clips) or cut (long ones) to this length (official 10 s).
        audio_dtype: dtype of the stored spectrogram (float16 halves the disk use; about 0.5 MB a clip).
        fps: frames kept per second of video (official 1).
        frame_size: frames resized so their shorter side is this many pixels; ``null`` keeps them as they
            are (the loader resizes to ``image_size`` anyway).
        val_fraction: without ``splits/val.txt``, this share of each class's train clips becomes val.
        seed: seed of that validation split.
    """
    _check_options(sample_rate, audio_seconds, fps, frame_size, val_fraction)
    options = {"sample_rate": sample_rate, "audio_seconds": audio_seconds, "audio_dtype": audio_dtype,
               "fps": fps, "frame_size": frame_size, "val_fraction": val_fraction, "seed": seed}  # fmt: skip
    check_resume_settings(out, {k: options[k] for k in ARRAY_OPTIONS})
    lists = find_lists(raw)
    entries, bad, listed = read_lists(raw, lists)
    split_of = {e.key: s for s, es in entries.items() for e in es}
    every = [e for s in SPLITS for e in entries.get(s, [])]
    args = (float(fps), frame_size, sample_rate, float(audio_seconds), audio_dtype)
    report = run_items([_item(e, args) for e in every], _prepare_clip, out, workers=workers, desc=DATASET)
    if "val" not in lists:  # carved from the usable train clips, so unusable ones never shrink val
        ok = set(report.ok)
        usable = [e for e in entries["train"] if e.key in ok]
        split_of.update({k: "val" for k in carve_val(((e.key, e.label) for e in usable), val_fraction, seed)})
    last_run = {
        "prepared": len(report.done),
        "already_there": len(report.existing),
        "skipped": len(report.failed),
    }
    report.failed = sorted(bad, key=lambda f: f["clip"]) + report.failed
    log.info("%s: %s; %d list line(s) unusable", DATASET, report.summary(), len(bad))
    return _write(out, every, split_of, options, report, lists, listed, last_run)


def _write(
    out: Path,
    entries: list[Entry],
    split_of: dict[str, str],
    options: dict[str, Any],
    report: Report,
    lists: dict[str, Path],
    listed: dict[str, int],
    last_run: dict[str, int],
) -> dict[str, Any]:
    ok = set(report.ok)
    rows = [
        {"key": e.key, "label": e.label, "split": split_of[e.key], "audio": f"audio/{e.key}.npy",
         "visual": f"frames/{e.key}"}
        for e in entries
        if e.key in ok
    ]  # fmt: skip
    samples = int(round(options["audio_seconds"] * options["sample_rate"]))
    extra = {
        "source": "Kinetics-Sounds: videos/<class>/<clip> with the user's split lists",
        "lists": {s: f"splits/{p.name}" for s, p in lists.items()},
        "listed": listed,
        "version": match_version(listed),
        "split": "train / val / test lists" if "val" in lists else "train / test lists; val carved from train "
        "per class (val_fraction, seed)",
        "spectrogram": {"shape": [N_FFT // 2 + 1, 1 + samples // HOP_LENGTH], "dtype": options["audio_dtype"],
                        "n_fft": N_FFT, "hop_length": HOP_LENGTH, "formula": "log(|STFT| + 1e-7)"},
        "frames": f"frames/<key>/00001.jpg ...: {options['fps']:g} fps, shorter side {options['frame_size']}",
        "last_run": last_run,
    }  # fmt: skip
    return write_layout(out, DATASET, rows, COLUMNS, options=options, report=report, extra=extra)
