"""``equimodal prepare kinetics_sounds`` on a tiny raw tree in the real layout, its loader and the tiny preset."""

from __future__ import annotations

import csv
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from equimodal.cli import main
from equimodal.data import load_dataset
from equimodal.data.base import SampleKey
from equimodal.data.kinetics_sounds.prepare import match_version, read_lists
from equimodal.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize, resize
from equimodal.prepare import PREPARERS, prepare
from equimodal.prepare.base import carve_val
from equimodal.prepare.media import video_frames

av = pytest.importorskip("av")

CLASSES = ("playing bagpipes", "ripping paper", "tapping guitar")
SECONDS, AUDIO_SECONDS, FRAME_SIZE, RATE = 4.0, 1, 32, 16000
BAD = {  # key -> words its skip reason must hold
    "playing bagpipes/empty": "empty (0 bytes)",
    "ripping paper/trunc": "cannot be decoded",
    "tapping guitar/mute": "has no audio track",
    "tapping guitar/short": "gives 3 frame(s) at 1 fps",
    "ripping paper/gone": "is missing",
    "playing bagpips/x": "unknown class 'playing bagpips'",
}


def write_clip(
    path: Path, *, seconds: float = SECONDS, fps: int = 10, audio: bool = True, shade: int = 0
) -> None:
    """A 64x48 mpeg4 video whose brightness ramps with time, with a mono AAC sine track (PyAV)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    out = av.open(str(path), "w")
    video = out.add_stream("mpeg4", rate=fps)
    video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
    sound = out.add_stream("aac", rate=RATE) if audio else None
    if sound is not None:
        sound.layout = "mono"
    for i in range(int(seconds * fps)):
        image = np.full((48, 64, 3), (shade * 50 + i * 5) % 256, np.uint8)
        for packet in video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
            out.mux(packet)
    t = 0
    while sound is not None and t < seconds * RATE:
        wave = (0.1 * np.sin(np.arange(t, t + 1024) * (0.05 + 0.02 * shade))).astype(np.float32)[None]
        frame = av.AudioFrame.from_ndarray(wave, format="fltp", layout="mono")
        frame.sample_rate, frame.pts, t = RATE, t, t + 1024
        for packet in sound.encode(frame):
            out.mux(packet)
    for stream in (video, sound):
        for packet in stream.encode() if stream is not None else ():
            out.mux(packet)
    out.close()


def make_raw(raw: Path) -> dict[str, list[str]]:
    """Three classes of four good clips (one stored as .mkv, one listed without extension) and bad inputs;
    clips 0-1 of each class in train, 2 in val, 3 in test. Returns the list lines."""
    lines: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for c, label in enumerate(CLASSES):
        for i in range(4):
            suffix = ".mkv" if (c, i) == (1, 0) else ".mp4"
            write_clip(raw / "videos" / label / f"c{c}_{i}{suffix}", shade=c)
            listed = f"{label}/c{c}_{i}" + ("" if (c, i) == (2, 1) else ".mp4")
            lines[("train", "train", "val", "test")[i]].append(listed)
    videos = raw / "videos"
    (videos / "playing bagpipes" / "empty.mp4").write_bytes(b"")
    (videos / "ripping paper" / "trunc.mp4").write_bytes(
        (videos / "ripping paper" / "c1_1.mp4").read_bytes()[:600]
    )
    write_clip(videos / "tapping guitar" / "mute.mp4", audio=False)
    write_clip(videos / "tapping guitar" / "short.mp4", seconds=3.0)
    lines["train"] += [f"{k}.mp4" for k in BAD] + [lines["test"][0], "", "# a comment"]
    (raw / "splits").mkdir(parents=True, exist_ok=True)
    for split, entries in lines.items():
        (raw / "splits" / f"{split}.txt").write_text("\n".join(entries) + "\n")
    return lines


def run_prepare(raw: Path, out: Path, *extra: str) -> None:
    args = ["prepare", "kinetics_sounds", "--raw", str(raw), "--out", str(out), "--workers", "2"]
    sets = [f"audio_seconds={AUDIO_SECONDS}", f"frame_size={FRAME_SIZE}", *extra]
    assert main([*args, *[a for s in sets for a in ("--set", s)]]) == 0


def prepare_direct(raw: Path, out: Path, **options: object) -> dict:
    """The preparer without the CLI (which turns errors into exit code 2), for the error tests."""
    return prepare("kinetics_sounds", raw, out, workers=1, audio_seconds=AUDIO_SECONDS, **options)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ks")
    raw, out = root / "raw", root / "out"
    make_raw(raw)
    run_prepare(raw, out)
    return raw, out


def _info(out: Path) -> dict:
    return json.loads((out / "prepare.json").read_text())


def _manifest(out: Path) -> list[dict[str, str]]:
    with (out / "manifest.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_prepare_writes_the_layout(prepared: tuple[Path, Path]) -> None:
    _, out = prepared
    rows, info = _manifest(out), _info(out)
    assert list(rows[0]) == ["key", "label", "split", "audio", "visual"]
    assert info["counts"] == {"train": 6, "val": 3, "test": 3} and info["classes"] == list(CLASSES)
    assert info["listed"] == {"train": 13, "val": 3, "test": 3} and info["version"] is None
    assert info["spectrogram"]["shape"] == [257, 101] and info["split"] == "train / val / test lists"
    by_key = {r["key"]: r for r in rows}
    assert by_key["ripping paper/c1_0"]["split"] == "train"  # listed as .mp4, stored as .mkv
    assert by_key["tapping guitar/c2_1"]["visual"] == "frames/tapping guitar/c2_1"  # listed without extension
    assert by_key["playing bagpipes/c0_3"]["split"] == "test"  # listed in train too: kept in test only
    for row in rows:
        spec = np.load(out / row["audio"])
        assert spec.shape == (257, 101) and spec.dtype == np.float16 and np.isfinite(spec).all()
        frames = sorted((out / row["visual"]).iterdir())
        assert [f.name for f in frames] == [f"{i:05d}.jpg" for i in range(1, 5)]
    from PIL import Image

    with Image.open(out / by_key["ripping paper/c1_2"]["visual"] / "00001.jpg") as im:
        assert im.size == (43, FRAME_SIZE)
    assert (out / "splits" / "val.txt").read_text().splitlines() == sorted(
        k for k, r in by_key.items() if r["split"] == "val"
    )
    assert not list(out.rglob(".*.tmp"))


def test_prepare_names_every_skipped_input(prepared: tuple[Path, Path]) -> None:
    raw, out = prepared
    skipped = {s["clip"]: s for s in _info(out)["skipped"]}
    assert set(skipped) == {*BAD, "playing bagpipes/c0_3"}
    for key, words in BAD.items():
        assert words in skipped[key]["reason"], (key, skipped[key])
    for key in (
        "playing bagpipes/empty",
        "ripping paper/trunc",
        "tapping guitar/mute",
        "tapping guitar/short",
    ):
        assert skipped[key]["files"] == str(raw / "videos" / f"{key}.mp4")
    assert "videos/ripping paper/gone.mp4" in skipped["ripping paper/gone"]["reason"]
    assert "did you mean 'playing bagpipes'" in skipped["playing bagpips/x"]["reason"]
    assert skipped["playing bagpipes/c0_3"]["reason"].startswith("train.txt:")
    assert "also listed in test.txt:1" in skipped["playing bagpipes/c0_3"]["reason"]
    assert not any((out / "frames" / k).exists() or (out / "audio" / f"{k}.npy").exists() for k in BAD)


def test_prepare_resumes_and_refuses_other_settings(prepared: tuple[Path, Path]) -> None:
    raw, out = prepared
    stamp = (out / "audio" / "playing bagpipes" / "c0_0.npy").stat().st_mtime_ns
    run_prepare(raw, out)
    assert _info(out)["last_run"] == {"prepared": 0, "already_there": 12, "skipped": 4}
    assert (out / "audio" / "playing bagpipes" / "c0_0.npy").stat().st_mtime_ns == stamp
    (out / "audio" / "ripping paper" / "c1_2.npy").unlink()
    run_prepare(raw, out)
    assert _info(out)["last_run"]["prepared"] == 1 and _info(out)["counts"]["val"] == 3
    with pytest.raises(ValueError, match=r"other settings \(frame_size=32 before, 64 now\)"):
        prepare_direct(raw, out, frame_size=64)


def test_val_is_carved_from_train_without_val_list(prepared: tuple[Path, Path], tmp_path: Path) -> None:
    raw, out = prepared
    raw2, out2 = tmp_path / "raw", tmp_path / "out"
    (raw2 / "splits").mkdir(parents=True)
    os.symlink(raw / "videos", raw2 / "videos")
    train = (raw / "splits" / "train.txt").read_text() + (raw / "splits" / "val.txt").read_text()
    (raw2 / "splits" / "train.txt").write_text(train)
    shutil.copy(raw / "splits" / "test.txt", raw2 / "splits" / "test.txt")
    for part in ("audio", "frames", "prepare.json"):  # the clips are already prepared: only the split changes
        (shutil.copytree if part != "prepare.json" else shutil.copy)(out / part, out2 / part)
    run_prepare(raw2, out2, "val_fraction=0.34", "seed=3")
    info, rows = _info(out2), _manifest(out2)
    assert info["counts"] == {"train": 6, "val": 3, "test": 3} and info["last_run"]["prepared"] == 0
    assert "val carved from train" in info["split"] and set(info["lists"]) == {"train", "test"}
    val = [r for r in rows if r["split"] == "val"]
    assert sorted(r["label"] for r in val) == list(CLASSES)  # stratified: one per class
    listed_train = {line.removesuffix(".mp4") for line in train.splitlines()}
    assert {r["key"] for r in val} <= listed_train
    entries, _, _ = read_lists(raw2, {s: raw2 / "splits" / f"{s}.txt" for s in ("train", "test")})
    usable = [e for e in entries["train"] if e.key in {r["key"] for r in rows}]  # carved after decoding
    assert len(usable) == 9 and {r["key"] for r in val} == carve_val(
        ((e.key, e.label) for e in usable), 0.34, 3
    )
    assert len({frozenset(carve_val(((e.key, e.label) for e in usable), 0.34, s)) for s in range(6)}) > 1


def test_missing_split_lists_and_bad_options_fail_clearly(tmp_path: Path) -> None:
    (tmp_path / "raw" / "videos" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"splits/train.txt or splits/test.txt.*14 799 / 2 597"):
        prepare_direct(tmp_path / "raw", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="videos/<class name>/<clip id>.mp4"):
        prepare_direct(tmp_path, tmp_path / "out")
    assert PREPARERS.check("kinetics_sounds", {"frame_size": None, "workers": 1})["frame_size"] is None
    with pytest.raises(ValueError, match="'float16', 'float32'"):
        PREPARERS.check("kinetics_sounds", {"audio_dtype": "float64", "workers": 1})
    with pytest.raises(ValueError, match="fps must be positive"):
        prepare_direct(tmp_path / "raw", tmp_path / "out", fps=0)
    assert match_version({"train": 15000, "val": 1900, "test": 1900}).startswith("AMSS group")
    assert match_version({"train": 13300, "val": 1499, "test": 2597}).startswith("31 classes")
    assert match_version({"train": 10, "val": 0, "test": 2}) is None


@pytest.mark.parametrize("fps", [1.0, 0.7, 4.0])
def test_streamed_frames_match_video_frames(tmp_path: Path, fps: float) -> None:
    clip = tmp_path / "c.mp4"
    write_clip(clip, seconds=3.3, fps=30, audio=False)
    import av

    with av.open(str(clip)) as container:  # the reference: decode everything, pick by nearest time
        decoded = [(float(f.time), f.to_ndarray(format="rgb24")) for f in container.decode(video=0)]
    times = np.array([t for t, _ in decoded])
    targets = np.arange(0.0, times[-1] + 1e-9, 1.0 / fps) + 0.5 / fps
    reference = [decoded[i][1] for i in sorted({int(np.abs(times - t).argmin()) for t in targets})]
    streamed = video_frames(clip, fps=fps)
    assert len(streamed) == len(reference) > 1
    assert all(np.array_equal(a, b) for a, b in zip(streamed, reference, strict=True))


def test_loader_shapes_randomness_and_determinism(prepared: tuple[Path, Path]) -> None:
    _, out = prepared
    ds = load_dataset("kinetics_sounds", root=str(out), image_size=32, seed=1)
    assert (len(ds.train), len(ds.val), len(ds.test), ds.num_classes) == (6, 3, 3, 3)
    assert ds.class_names == list(CLASSES) and ds.modalities == ["audio", "visual"]
    x, y = ds.train[SampleKey(0, 0)]
    assert x["audio"].shape == (1, 257, 101) and x["audio"].dtype == torch.float32
    assert x["visual"].shape == (3, 3, 32, 32) and 0 <= y < 3
    again, _ = ds.train[SampleKey(0, 0)]
    other = [ds.train[SampleKey(0, e)][0]["visual"] for e in range(1, 4)]
    assert torch.equal(x["visual"], again["visual"]) and not all(torch.equal(x["visual"], o) for o in other)
    t1, t2 = ds.test[0][0]["visual"], ds.test[0][0]["visual"]
    assert torch.equal(t1, t2)
    from PIL import Image

    folder = out / "frames" / "playing bagpipes" / "c0_3"
    frames = [torch.from_numpy(np.asarray(Image.open(folder / f"{i:05d}.jpg").convert("RGB"), np.float32) / 255)
              for i in (1, 3, 4)]  # fmt: skip  # evenly spaced: positions 0, 2, 3 of 4
    expected = normalize(resize(torch.stack(frames).permute(0, 3, 1, 2), 32), IMAGENET_MEAN, IMAGENET_STD)
    index = [r["key"] for r in _manifest(out) if r["split"] == "test"].index("playing bagpipes/c0_3")
    assert torch.allclose(ds.test[index][0]["visual"], expected, atol=1e-5)
    reader = pickle.loads(pickle.dumps(ds.train.reader))
    assert torch.equal(
        reader(int(ds.train.records[0]), None)["audio"],
        ds.val.reader(int(ds.train.records[0]), None)["audio"],
    )
    enc = ds.default_encoders()
    assert enc["visual"](ds.test[0][0]["visual"][None]).shape == (1, 512)


def test_training_crop_and_flip_are_shared_by_the_clip(tmp_path: Path) -> None:
    from PIL import Image

    from equimodal.data.kinetics_sounds.loader import KineticsSoundsReader

    noise = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    (tmp_path / "f").mkdir()
    for i in range(1, 6):
        Image.fromarray(noise).save(tmp_path / "f" / f"{i:05d}.png")
    reader = KineticsSoundsReader(tmp_path, ("k",), ("a.npy",), ("f",), frames=3, image_size=16)
    clips = [reader.read_visual(0, torch.Generator().manual_seed(s)) for s in range(4)]
    assert all(
        c.shape == (3, 3, 16, 16) and torch.equal(c[0], c[1]) and torch.equal(c[0], c[2]) for c in clips
    )
    assert not all(torch.equal(clips[0], c) for c in clips[1:])  # but a new crop for another draw


def test_loader_errors_name_the_fix(prepared: tuple[Path, Path], tmp_path: Path) -> None:
    _, out = prepared
    with pytest.raises(FileNotFoundError, match="equimodal prepare kinetics_sounds"):
        load_dataset("kinetics_sounds", root=str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="frames must be >= 1"):
        load_dataset("kinetics_sounds", root=str(out), frames=0)
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    np.save(copy / "audio" / "ripping paper" / "c1_0.npy", np.zeros((257, 50), np.float16))
    ds = load_dataset("kinetics_sounds", root=str(copy), image_size=32)
    index = [r["key"] for r in _manifest(copy) if r["split"] == "train"].index("ripping paper/c1_0")
    with pytest.raises(ValueError, match=r"clip 'ripping paper/c1_0', audio file .*expected \(257, 101\)"):
        ds.train[index]


def test_tiny_preset_trains_one_epoch(prepared: tuple[Path, Path], tmp_path: Path) -> None:
    _, out = prepared
    run = tmp_path / "run"
    args = [
        "train",
        "kinetics_sounds-tiny",
        "--set",
        f"data.options.root={out}",
        "--set",
        "train.progress=false",
    ]
    assert main([*args, "--out", str(run)]) == 0
    with (run / "metrics.csv").open() as f:
        metrics = list(csv.DictReader(f))
    assert len(metrics) == 1 and np.isfinite(float(metrics[0]["train_loss"]))
    summary = json.loads((run / "summary.json").read_text())
    assert 0.0 <= summary["test"]["test_acc"] <= 1.0


def test_no_usable_training_clip_fails_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "10000")  # the error console does not wrap the long paths
    raw, out = tmp_path / "raw", tmp_path / "out"
    for c, label in enumerate(CLASSES[:2]):
        write_clip(raw / "videos" / label / "v.mp4", seconds=SECONDS, shade=c)
    (raw / "splits").mkdir()
    (raw / "splits" / "train.txt").write_text(f"{CLASSES[0]}/gone.mp4\n{CLASSES[1]}/lost.mp4\n")
    (raw / "splits" / "val.txt").write_text(f"{CLASSES[0]}/v.mp4\n")
    (raw / "splits" / "test.txt").write_text(f"{CLASSES[1]}/v.mp4\n")
    args = ["prepare", "kinetics_sounds", "--raw", str(raw), "--out", str(out), "--workers", "1"]
    assert main([*args, "--set", f"audio_seconds={AUDIO_SECONDS}", "--set", f"frame_size={FRAME_SIZE}"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert (
        "kinetics_sounds: the train split(s) would be empty" in err
        and "(prepared: 0 train, 1 val, 1 test)" in err
    )
    assert "2 input(s) were skipped" in err and "gone.mp4' is missing" in err
    assert not (out / "manifest.csv").exists()
