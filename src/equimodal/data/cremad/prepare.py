"""``equimodal prepare cremad``: the CREMA-D release into the prepared layout the ``cremad`` loader reads.

Raw layout (the release of CheyneyComputerScience/CREMA-D)::

    RAW/AudioWAV/1001_DFA_ANG_XX.wav     16 kHz mono speech, one file per clip
    RAW/VideoFlash/1001_DFA_ANG_XX.flv   480x360, 30 fps video of the same clip

Clips are named ``{actor}_{sentence}_{emotion}_{level}`` (actors 1001-1091, emotions ANG DIS FEA HAP
NEU SAD); the label is the emotion code of the name. Prepared layout (see :mod:`equimodal.prepare.base`)::

    OUT/manifest.csv                  key, label, split, audio, visual
    OUT/prepare.json                  counts, skipped clips and why, split protocol (and its actors)
    OUT/splits/{train,val,test}.txt   clip ids of each split
    OUT/audio/<clip>.npy              official spectrogram, (257, 188), float16 by default
    OUT/visual/<clip>/001.jpg ...     frames at ``fps`` (1 per second: about 3 per clip)

Per clip, as the official AMSS/OGM-GE pipeline (spec §10): the wav resampled to 22 050 Hz (soxr), tiled
to 3 s, clipped to [-1, 1], ``log(|STFT| + 1e-7)`` with n_fft 512, hop 353; frames taken at 1 fps.

Differences from the official pipeline: the spectrogram is stored (float16 by default, which rounds
log-magnitudes to about 3 significant digits) instead of computed from the wav at every step, the
frames are extracted with PyAV (the official folders came from an unspecified ffmpeg call), and the
default split is actor-disjoint (63 / 14 / 14 actors) instead of OGM-GE's lists, which put every actor
in both train and test (``split="ogmge"`` with the user's ``train.csv`` / ``test.csv`` reproduces
them, with a validation split carved from train). The six clips of the release known to be broken are
dropped (listed as skipped).
"""

from __future__ import annotations

import csv
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ...prepare import register_preparer
from ...prepare.base import (
    Item,
    Report,
    carve_val,
    check_resume_settings,
    prepare_logger,
    run_items,
    save_frame_folder,
    save_npy,
    write_layout,
)
from ...prepare.media import check_flv_complete, official_spectrogram, read_wav, resample, video_frames

DATASET = "cremad"
log = prepare_logger(DATASET)
EMOTIONS = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")
"""The emotion codes in the official code's index order (the loader uses the sorted names instead)."""
BROKEN = frozenset(
    {
        "1076_MTI_NEU_XX",
        "1076_MTI_SAD_XX",
        "1064_TIE_SAD_XX",
        "1064_IEO_DIS_MD",
        "1047_IEO_SAD_LO",
        "1047_IEO_FEA_LO",
    }
)
"""Clips of the release known to be broken or empty (dropped by other pipelines too)."""
NAME = re.compile(r"(?P<actor>\d{4})_(?P<sentence>[A-Z]{3})_(?P<emotion>[A-Z]{3})_(?P<level>[A-Z]{2})")
SAMPLE_RATE = 22050
AUDIO_DIR, VIDEO_DIR = "AudioWAV", "VideoFlash"
SPLITS = ("train", "val", "test")
LAYOUT_HINT = (
    f"expected the CREMA-D release layout RAW/{AUDIO_DIR}/<clip>.wav and RAW/{VIDEO_DIR}/<clip>.flv "
    "(clips named like 1001_DFA_ANG_XX)"
)


@dataclass(frozen=True)
class Clip:
    """A usable pair of raw files: the clip id, its actor and emotion code, its wav and flv."""

    key: str
    actor: str
    emotion: str
    wav: Path
    flv: Path


# ------------------------------------------------------------------------------------ the raw tree
def _media_folder(raw: Path, name: str) -> Path:
    """``raw/name``; a ``FileNotFoundError`` naming it (and a nested candidate, if any) when absent."""
    folder = raw / name
    if folder.is_dir():
        return folder
    nested = sorted(p.parent for p in raw.glob(f"*/{name}") if p.is_dir())
    hint = f" It exists one level down: pass --raw {nested[0]}." if nested else ""
    raise FileNotFoundError(f"No {name} folder in {str(raw)!r}: {LAYOUT_HINT}.{hint}")


def _stems(folder: Path, suffix: str) -> dict[str, Path]:
    """The files of ``folder`` with ``suffix`` (any case), by name without the suffix."""
    return {
        p.stem: p
        for p in sorted(folder.iterdir())
        if p.suffix.lower() == suffix and not p.name.startswith(".")
    }


def _skip(key: str, files: Sequence[Path], reason: str, kind: str) -> dict[str, str]:
    """A skipped-clip record in :class:`~equimodal.prepare.base.Report` form, plus its ``kind``."""
    return {"clip": key, "files": ", ".join(str(f) for f in files), "reason": reason, "kind": kind}


def _check_name(key: str) -> tuple[str, str] | None:
    """Why a clip id is unusable (``(reason, kind)``), or ``None`` when it is a well-formed usable name."""
    match = NAME.fullmatch(key)
    if match is None:
        return (
            f"malformed clip name {key!r}: expected {{actor}}_{{sentence}}_{{emotion}}_{{level}}, "
            "e.g. 1001_DFA_ANG_XX",
            "malformed name",
        )
    if match["emotion"] not in EMOTIONS:
        return (
            f"unknown emotion code {match['emotion']!r} in {key!r}: expected one of {', '.join(sorted(EMOTIONS))}",
            "unknown emotion",
        )
    if key in BROKEN:
        return "one of the six clips of the CREMA-D release known to be broken; dropped", "known broken"
    return None


def scan(raw: Path) -> tuple[list[Clip], list[dict[str, str]], set[str]]:
    """The usable clips of a raw tree, the skipped ones (with reasons) and every clip id found.

    Raises:
        FileNotFoundError: no ``AudioWAV`` / ``VideoFlash`` folder, or no wav file at all.
    """
    wavs = _stems(_media_folder(raw, AUDIO_DIR), ".wav")
    flvs = _stems(_media_folder(raw, VIDEO_DIR), ".flv")
    if not wavs:
        raise FileNotFoundError(f"{raw / AUDIO_DIR} holds no .wav file: {LAYOUT_HINT}.")
    clips, skipped = [], []
    for key in sorted(wavs.keys() | flvs.keys()):
        files = [p for p in (wavs.get(key), flvs.get(key)) if p is not None]
        bad = _check_name(key)
        if bad is None and (key not in wavs or key not in flvs):
            have, lack = (
                (wavs[key], f"{VIDEO_DIR}/{key}.flv")
                if key in wavs
                else (flvs[key], f"{AUDIO_DIR}/{key}.wav")
            )
            bad = f"{str(have)!r} has no partner: {lack} is missing", "unpaired"
        if bad is not None:
            skipped.append(_skip(key, files, *bad))
            continue
        match = NAME.fullmatch(key)
        clips.append(Clip(key, match["actor"], match["emotion"], wavs[key], flvs[key]))
    return clips, skipped, set(wavs) | set(flvs)


# --------------------------------------------------------------------------------------- splits
def actor_split(
    clips: Sequence[Clip], *, seed: int, val_actors: int, test_actors: int
) -> tuple[dict[str, str], dict[str, list[str]]]:
    """An actor-disjoint split: ``val_actors`` and ``test_actors`` actors drawn by ``seed``, the rest train.

    Returns the split of every clip id and the actors of every split.

    Raises:
        ValueError: a split would be empty (says which option to change).
    """
    actors = sorted({c.actor for c in clips})
    n_train = len(actors) - val_actors - test_actors
    sizes = {"train": n_train, "val": val_actors, "test": test_actors}
    empty = [s for s, n in sizes.items() if n <= 0]
    if empty:
        raise ValueError(
            f"The actor split would leave the {' and '.join(empty)} split(s) without actors: the raw tree has "
            f"{len(actors)} actor(s) ({', '.join(actors[:12])}{', ...' if len(actors) > 12 else ''}) and "
            f"val_actors={val_actors}, test_actors={test_actors}. Give val and test at least one actor each "
            "and leave at least one for train, e.g. --set val_actors=1 --set test_actors=1 on a small tree "
            "(the defaults 14 / 14 leave 63 of the release's 91 actors for train)."
        )
    order = [actors[i] for i in np.random.default_rng(seed).permutation(len(actors))]
    by_split = {
        "val": sorted(order[:val_actors]),
        "test": sorted(order[val_actors : val_actors + test_actors]),
        "train": sorted(order[val_actors + test_actors :]),
    }
    of_actor = {a: s for s, group in by_split.items() for a in group}
    return {c.key: of_actor[c.actor] for c in clips}, {s: by_split[s] for s in SPLITS}


def _clip_id(cell: str) -> str:
    """A listed clip id without folders or a file extension (``x/1001_DFA_ANG_XX.flv`` -> the id)."""
    name = Path(cell.strip()).name
    return name.split(".", 1)[0] if "." in name else name


def read_clip_list(path: Path) -> list[tuple[int, str, str | None]]:
    """An OGM-GE split file: ``(line, clip id, emotion or None)`` per listed clip.

    One clip per line, ``clip_id,emotion`` (the emotion column is optional); a header line, a UTF-8
    byte-order mark, blank lines and file extensions in the id are allowed.

    Raises:
        FileNotFoundError: no such file. ValueError: it lists no clip.
    """
    if not path.is_file():
        raise FileNotFoundError(
            f"No split file at {str(path)!r}: pass the OGM-GE train.csv / test.csv (lines 'clip_id,emotion') "
            "as --set train_csv=PATH --set test_csv=PATH."
        )
    with path.open(newline="", encoding="utf-8-sig") as f:
        rows = [(i, r) for i, r in enumerate(csv.reader(f), 1) if r and r[0].strip()]
    if rows and NAME.fullmatch(_clip_id(rows[0][1][0])) is None:
        second = rows[0][1][1].strip().upper() if len(rows[0][1]) > 1 else ""
        if second not in EMOTIONS:
            rows = rows[1:]  # a header line
    if not rows:
        raise ValueError(f"{str(path)!r} lists no clip; expected one 'clip_id,emotion' line per clip.")
    return [
        (i, _clip_id(r[0]), r[1].strip().upper() if len(r) > 1 and r[1].strip() else None) for i, r in rows
    ]


def _check_listed(path: Path, listed: list[tuple[int, str, str | None]], found: set[str]) -> None:
    """Every listed clip must be in the raw tree, with the emotion its name says."""
    unknown = [(i, k) for i, k, _ in listed if k not in found]
    if unknown:
        shown = ", ".join(f"{k} (line {i})" for i, k in unknown[:10])
        raise ValueError(
            f"{path.name} lists {len(unknown)} clip(s) that are not in the raw tree ({AUDIO_DIR}/ or "
            f"{VIDEO_DIR}/): {shown}{', ...' if len(unknown) > 10 else ''}. Pass the full CREMA-D release as "
            "--raw, or the split files that belong to it."
        )
    wrong = [(i, k, e) for i, k, e in listed if e is not None and k.split("_")[2:3] != [e]]
    if wrong:
        i, k, e = wrong[0]
        raise ValueError(
            f"{path.name} line {i}: clip {k} is listed as {e!r}, but its name says {k.split('_')[2]!r} "
            f"({len(wrong)} such line(s)); the file is not a CREMA-D split list of clip_id,emotion lines."
        )


def ogmge_split(
    clips: Sequence[Clip], found: set[str], *, train_csv: str | None, test_csv: str | None,
    val_fraction: float, seed: int,
) -> tuple[dict[str, str], dict[str, Any]]:  # fmt: skip
    """OGM-GE's train/test lists, with a stratified validation split carved from train.

    Clips of the lists that were skipped (broken, unpaired) are left out; clips in neither list are not
    prepared. Returns the split of every clip id and what to record about the protocol.
    """
    if not train_csv or not test_csv:
        raise ValueError(
            "split='ogmge' needs the OGM-GE split files: --set train_csv=PATH/train.csv --set "
            "test_csv=PATH/test.csv (or use the default split='actor')."
        )
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(
            f"val_fraction must be in [0, 1), found {val_fraction}; e.g. --set val_fraction=0.1."
        )
    lists = {}
    for name, given in (("train", train_csv), ("test", test_csv)):
        path = Path(given).expanduser()
        lists[name] = read_clip_list(path)
        _check_listed(path, lists[name], found)
    both = sorted({k for _, k, _ in lists["train"]} & {k for _, k, _ in lists["test"]})
    if both:
        raise ValueError(
            f"{len(both)} clip(s) are listed in both train_csv and test_csv, e.g. {', '.join(both[:5])}; "
            "pass the matching pair of OGM-GE split files."
        )
    listed = {k: s for s, rows in lists.items() for _, k, _ in rows}
    usable = {c.key: c for c in clips}
    train = [usable[k] for k, s in listed.items() if s == "train" and k in usable]
    val = carve_val(((c.key, c.emotion) for c in train), val_fraction, seed)
    assignment = {k: ("val" if k in val else s) for k, s in listed.items() if k in usable}
    info = {
        "train_csv": str(train_csv), "test_csv": str(test_csv), "val_fraction": val_fraction,
        "listed": {s: len(rows) for s, rows in lists.items()},
        "listed_but_skipped": sorted(k for k in listed if k not in usable),
        "not_listed": len(usable.keys() - listed.keys()),
    }  # fmt: skip
    return assignment, info


def _check_not_empty(assignment: dict[str, str], split: str) -> None:
    """Raise a ``ValueError`` saying what to change when a split holds no clip."""
    counts = Counter(assignment.values())
    empty = [s for s in SPLITS if not counts.get(s)]
    if not empty:
        return
    if split == "actor":
        fix = "check the clips skipped in the report, or change seed / val_actors / test_actors"
    else:
        fix = "set val_fraction > 0 (e.g. 0.1) for val; check that train_csv / test_csv list clips of --raw"
    raise ValueError(
        f"The {' and '.join(empty)} split(s) of split={split!r} would be empty "
        f"(counts: {dict(counts)}); {fix}."
    )


# ----------------------------------------------------------------------------------- per clip
def clip_spectrogram(wav: Path) -> np.ndarray:
    """The official CREMA-D audio input of a wav: resampled to 22 050 Hz, (257, 188) float32."""
    wave, rate = read_wav(wav)
    return official_spectrogram(resample(wave, rate, SAMPLE_RATE), SAMPLE_RATE)


def prepare_clip(item: Item, out: Path) -> None:
    """One clip's work: the spectrogram as ``.npy`` and the frames as jpgs (both decoded before writing)."""
    wav, flv = item.inputs
    dtype, fps = item.args
    spectrogram = clip_spectrogram(wav).astype(dtype)
    check_flv_complete(flv)
    frames = video_frames(flv, fps=fps)
    save_npy(out / item.outputs[0], spectrogram)
    save_frame_folder(out / item.outputs[1], frames, digits=3)


# ------------------------------------------------------------------------------------ the command
def _assign(
    clips: list[Clip], found: set[str], split: str, options: dict[str, Any]
) -> tuple[dict[str, str], dict[str, Any]]:
    """The split of every clip to prepare and what to record about the protocol."""
    seed = options["seed"]
    if split == "actor":
        assignment, actors = actor_split(
            clips, seed=seed, val_actors=options["val_actors"], test_actors=options["test_actors"]
        )
        about: dict[str, Any] = {"actors": actors, "actor_disjoint": True}
    else:
        assignment, about = ogmge_split(
            clips, found, train_csv=options["train_csv"], test_csv=options["test_csv"],
            val_fraction=options["val_fraction"], seed=seed,
        )  # fmt: skip
        about["actor_disjoint"] = False
    _check_not_empty(assignment, split)
    return assignment, {"protocol": split, "seed": seed, **about}


def _summary(
    clips: list[Clip], rows: list[dict[str, str]], report: Report, found: set[str]
) -> dict[str, Any]:
    """Counts for ``prepare.json``: clips found, prepared (now / before), skipped by kind, per class."""
    kinds = Counter(f["kind"] for f in report.failed)
    per_class = {
        s: dict(sorted(Counter(r["label"] for r in rows if r["split"] == s).items())) for s in SPLITS
    }
    return {
        "clips": {
            "found": len(found), "usable_names": len(clips), "prepared": len(rows),
            "prepared_now": len(report.done), "already_there": len(report.existing),
            "skipped": len(report.failed),
        },
        "skipped_counts": dict(sorted(kinds.items())),
        "class_counts": per_class,
    }  # fmt: skip


@register_preparer(DATASET)
def prepare_cremad(
    raw: Path,
    out: Path,
    *,
    workers: int,
    split: Literal["actor", "ogmge"] = "actor",
    seed: int = 0,
    val_actors: int = 14,
    test_actors: int = 14,
    train_csv: str | None = None,
    test_csv: str | None = None,
    val_fraction: float = 0.1,
    audio_dtype: Literal["float16", "float32"] = "float16",
    fps: float = 1.0,
) -> dict[str, Any]:
    """Prepare the CREMA-D release ``raw`` into ``out`` (layout and pipeline: the module docstring).

    Args:
        raw: the release folder holding ``AudioWAV/`` and ``VideoFlash/``.
        out: the prepared folder (created; rerunning resumes, finished clips are kept).
        workers: worker processes.
        split: ``"actor"`` (actor-disjoint train/val/test) or ``"ogmge"`` (OGM-GE's train/test lists).
        seed: draws the held-out actors (``actor``) or the validation clips (``ogmge``).
        val_actors: actors in the validation split (``actor``).
        test_actors: actors in the test split (``actor``).
        train_csv: OGM-GE's ``train.csv`` (``ogmge``), lines ``clip_id,emotion``.
        test_csv: OGM-GE's ``test.csv`` (``ogmge``).
        val_fraction: fraction of every class's training clips held out for validation (``ogmge``).
        audio_dtype: how the spectrograms are stored (``float16`` halves the disk; read as float32).
        fps: frames per second taken from the videos (the official folders hold 1 fps).

    Raises:
        FileNotFoundError: no ``AudioWAV`` / ``VideoFlash`` folder (or split file).
        ValueError: an empty split, unknown clips in the split files, or ``out`` holding clips prepared
            with other media settings.
    """
    if fps <= 0:
        raise ValueError(f"fps must be positive, found {fps}; the official frames are at --set fps=1.")
    if val_actors < 0 or test_actors < 0:
        raise ValueError(f"val_actors and test_actors must be >= 0, found {val_actors} and {test_actors}.")
    options = {
        "split": split, "seed": seed, "val_actors": val_actors, "test_actors": test_actors,
        "train_csv": train_csv, "test_csv": test_csv, "val_fraction": val_fraction,
        "audio_dtype": audio_dtype, "fps": fps,
    }  # fmt: skip
    clips, skipped, found = scan(raw)
    assignment, protocol = _assign(clips, found, split, options)
    check_resume_settings(out, {"audio_dtype": audio_dtype, "fps": fps, "sample_rate": SAMPLE_RATE})
    todo = [c for c in clips if c.key in assignment]
    items = [
        Item(c.key, (c.wav, c.flv), (f"audio/{c.key}.npy", f"visual/{c.key}"), (audio_dtype, fps))
        for c in todo
    ]
    report = run_items(items, prepare_clip, out, workers=workers, desc="cremad clips")
    for failure in report.failed:
        failure.setdefault("kind", "unreadable")
    report.failed = sorted(report.failed + skipped, key=lambda f: f["clip"])
    log.info("cremad: %s", report.summary())
    ok = set(report.ok)
    rows = [
        {"key": c.key, "label": c.emotion, "split": assignment[c.key], "audio": f"audio/{c.key}.npy",
         "visual": f"visual/{c.key}"}
        for c in todo if c.key in ok
    ]  # fmt: skip
    extra = {
        "source": "CREMA-D release (AudioWAV 16 kHz wav, VideoFlash 480x360 30 fps flv)",
        "official_label_order": list(EMOTIONS),
        "audio": {
            "sample_rate": SAMPLE_RATE, "seconds": 3.0, "n_fft": 512, "hop_length": 353,
            "transform": "log(|STFT| + 1e-7) of the wave tiled to 3 s, clipped to [-1, 1]",
            "shape": [257, 188], "dtype": audio_dtype,
        },
        "visual": {"fps": fps, "format": "jpg"},
        "split": protocol,
        **_summary(clips, rows, report, found),
    }  # fmt: skip
    return write_layout(out, DATASET, rows, ["audio", "visual"], options=options, report=report, extra=extra)
