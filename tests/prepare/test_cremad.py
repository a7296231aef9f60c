"""``equimodal prepare cremad`` and the ``cremad`` loader on a tiny raw tree in the release layout.

The fixture: 12 good clips over 4 actors and the 6 emotions (16 kHz wavs of 0.5 s, 64x48 30 fps flvs of
1.5 s written with PyAV) plus bad inputs: a zero-byte wav, a truncated flv, a wav without its flv, a bad
emotion code, a malformed name and one of the six clips known to be broken.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile
import torch

from equimodal.cli import main
from equimodal.data import load_dataset
from equimodal.prepare import prepare

EMOTIONS = ("ANG", "DIS", "FEA", "HAP", "NEU", "SAD")
SENTENCES = ("DFA", "IEO", "TIE", "ITH", "IWW", "MTI")
GOOD = [f"{1001 + i % 4}_{SENTENCES[i // 2 % 6]}_{EMOTIONS[i % 6]}_XX" for i in range(12)]
EMPTY_WAV, TRUNCATED_FLV, NO_FLV = "1002_IEO_HAP_LO", "1003_TIE_SAD_HI", "1004_ITH_DIS_MD"
BAD_EMOTION, MALFORMED, BROKEN = "1001_DFA_XYZ_XX", "1001_DFA_ANG", "1076_MTI_NEU_XX"
SMALL = ["--set", "val_actors=1", "--set", "test_actors=1"]


def write_wav(path: Path, seconds: float = 0.5, tone: float = 440.0) -> None:
    t = np.arange(int(16000 * seconds)) / 16000
    soundfile.write(str(path), (0.3 * np.sin(2 * np.pi * tone * t)).astype(np.float32), 16000)


def write_flv(path: Path, seconds: float = 1.5, shade: int = 0) -> None:
    """A 64x48, 30 fps flv: a horizontal gradient (so flips show) whose brightness changes per frame."""
    gradient = np.linspace(0, 150, 64)[None, :, None] + np.zeros((48, 64, 3))
    with av.open(str(path), "w", format="flv") as out:
        stream = out.add_stream("flv", rate=30)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(int(30 * seconds)):
            image = (gradient + (shade * 7 + i * 3) % 100).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def make_raw(root: Path) -> Path:
    """A raw CREMA-D tree (AudioWAV/, VideoFlash/) with the good clips and the bad inputs."""
    wavs, flvs = root / "AudioWAV", root / "VideoFlash"
    wavs.mkdir(parents=True)
    flvs.mkdir()
    for i, key in enumerate([*GOOD, EMPTY_WAV, TRUNCATED_FLV, BAD_EMOTION, MALFORMED, BROKEN]):
        write_wav(wavs / f"{key}.wav", tone=200.0 + 50 * i)
        write_flv(flvs / f"{key}.flv", shade=i)
    write_wav(wavs / f"{NO_FLV}.wav")
    (wavs / f"{EMPTY_WAV}.wav").write_bytes(b"")
    data = (flvs / f"{TRUNCATED_FLV}.flv").read_bytes()
    (flvs / f"{TRUNCATED_FLV}.flv").write_bytes(data[: len(data) // 2])
    return root


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_raw(tmp_path_factory.mktemp("raw") / "CREMA-D")


@pytest.fixture(scope="module")
def prepared(raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "cremad"
    assert main(["prepare", "cremad", "--raw", str(raw), "--out", str(out), "--workers", "2", *SMALL]) == 0
    return out


def _info(out: Path) -> dict:
    return json.loads((out / "prepare.json").read_text())


def _manifest(out: Path) -> list[list[str]]:
    return [line.split(",") for line in (out / "manifest.csv").read_text().splitlines()]


def test_prepare_writes_the_layout(prepared: Path, raw: Path) -> None:
    header, *rows = _manifest(prepared)
    assert header == ["key", "label", "split", "audio", "visual"]
    assert sorted(r[0] for r in rows) == sorted(GOOD)
    assert all(
        r[1] == r[0].split("_")[2] and r[3] == f"audio/{r[0]}.npy" and r[4] == f"visual/{r[0]}" for r in rows
    )
    info = _info(prepared)
    assert info["classes"] == list(EMOTIONS) and sum(info["counts"].values()) == 12
    assert info["clips"] == {
        "found": 18, "usable_names": 14, "prepared": 12, "prepared_now": 12, "already_there": 0, "skipped": 6
    }  # fmt: skip
    skipped = {s["clip"]: s for s in info["skipped"]}
    assert set(skipped) == {EMPTY_WAV, TRUNCATED_FLV, NO_FLV, BAD_EMOTION, MALFORMED, BROKEN}
    assert (
        "empty (0 bytes)" in skipped[EMPTY_WAV]["reason"]
        and f"{EMPTY_WAV}.wav" in skipped[EMPTY_WAV]["reason"]
    )
    assert (
        "truncated" in skipped[TRUNCATED_FLV]["reason"]
        and f"{TRUNCATED_FLV}.flv" in skipped[TRUNCATED_FLV]["reason"]
    )
    assert f"VideoFlash/{NO_FLV}.flv is missing" in skipped[NO_FLV]["reason"]
    assert "unknown emotion code 'XYZ'" in skipped[BAD_EMOTION]["reason"]
    assert (
        "malformed clip name" in skipped[MALFORMED]["reason"]
        and "known to be broken" in skipped[BROKEN]["reason"]
    )
    assert str(raw / "AudioWAV" / f"{BROKEN}.wav") in skipped[BROKEN]["files"]
    assert info["skipped_counts"] == {
        "known broken": 1, "malformed name": 1, "unknown emotion": 1, "unpaired": 1, "unreadable": 2
    }  # fmt: skip
    for split in ("train", "val", "test"):
        listed = (prepared / "splits" / f"{split}.txt").read_text().split()
        assert listed == [r[0] for r in rows if r[2] == split] and listed
        assert sum(info["class_counts"][split].values()) == info["counts"][split] == len(listed)
    spec = np.load(prepared / rows[0][3])
    assert spec.shape == (257, 188) and spec.dtype == np.float16 and np.isfinite(spec).all()
    frames = sorted((prepared / rows[0][4]).iterdir())
    assert [f.name for f in frames] == ["001.jpg", "002.jpg"]  # 1.5 s at 1 fps
    from PIL import Image

    assert Image.open(frames[0]).size == (64, 48)


def test_default_split_is_actor_disjoint(prepared: Path) -> None:
    _, *rows = _manifest(prepared)
    actors = {s: {r[0][:4] for r in rows if r[2] == s} for s in ("train", "val", "test")}
    assert [len(actors[s]) for s in ("train", "val", "test")] == [2, 1, 1]
    assert set.union(*actors.values()) == {"1001", "1002", "1003", "1004"}  # 1076 holds only a broken clip
    split = _info(prepared)["split"]
    assert split["protocol"] == "actor" and split["actor_disjoint"] and split["seed"] == 0
    assert {s: set(a) for s, a in split["actors"].items()} == actors


def test_rerun_resumes_and_redoes_only_missing_outputs(prepared: Path, raw: Path, tmp_path: Path) -> None:
    out = tmp_path / "again"
    shutil.copytree(prepared, out)
    options = {"val_actors": 1, "test_actors": 1}
    info = prepare("cremad", raw, out, workers=1, **options)
    assert info["clips"]["prepared_now"] == 0 and info["clips"]["already_there"] == 12
    audio, visual = out / "audio" / f"{GOOD[3]}.npy", out / "visual" / GOOD[5]
    kept = out / "audio" / f"{GOOD[0]}.npy"
    stamp = kept.stat().st_mtime_ns
    audio.unlink()
    shutil.rmtree(visual)
    info = prepare("cremad", raw, out, workers=1, **options)
    assert info["clips"]["prepared_now"] == 2 and info["clips"]["already_there"] == 10
    assert np.load(audio).shape == (257, 188) and len(list(visual.glob("*.jpg"))) == 2
    assert kept.stat().st_mtime_ns == stamp
    with pytest.raises(
        ValueError, match="holds clips prepared with other settings .*float16.*new --out folder"
    ):
        prepare("cremad", raw, out, workers=1, audio_dtype="float32", **options)


def _write_lists(folder: Path) -> tuple[Path, Path]:
    """OGM-GE style lists: train.csv with a BOM, a header and extensions; test.csv plain ``id,emotion``."""
    train_keys, test_keys = GOOD[:9] + [BROKEN], GOOD[9:]
    train, test = folder / "train.csv", folder / "test.csv"
    lines = [f"{k}.flv,{k.split('_')[2]}" for k in train_keys]
    train.write_text("\ufeffclip,emotion\n" + "\n".join(lines) + "\n", encoding="utf-8")
    test.write_text("".join(f"{k},{k.split('_')[2]}\n" for k in test_keys))
    return train, test


def test_ogmge_split_from_the_csv_files(prepared: Path, raw: Path, tmp_path: Path) -> None:
    out = tmp_path / "ogmge"
    shutil.copytree(prepared, out)
    train, test = _write_lists(tmp_path)
    info = prepare("cremad", raw, out, workers=1, split="ogmge", train_csv=str(train), test_csv=str(test))
    _, *rows = _manifest(out)
    split = {r[0]: r[2] for r in rows}
    assert sorted(k for k, s in split.items() if s == "test") == sorted(GOOD[9:])
    val = {k for k, s in split.items() if s == "val"}
    assert (
        val and val < set(GOOD[:9]) and info["counts"] == {"train": 9 - len(val), "val": len(val), "test": 3}
    )
    # the 9 training clips hold 3 emotions twice: one of each pair is held out (stratified)
    twice = [e for e in EMOTIONS if sum(k.split("_")[2] == e for k in GOOD[:9]) == 2]
    assert sorted(k.split("_")[2] for k in val) == sorted(twice)
    about = info["split"]
    assert about["protocol"] == "ogmge" and not about["actor_disjoint"]
    assert about["listed"] == {"train": 10, "test": 3} and about["listed_but_skipped"] == [BROKEN]
    assert (out / "splits" / "test.txt").read_text().split() == [k for k in sorted(GOOD[9:])]
    with pytest.raises(
        ValueError, match=r"The val split\(s\) of split='ogmge' would be empty.*val_fraction > 0"
    ):
        prepare(
            "cremad",
            raw,
            out,
            workers=1,
            split="ogmge",
            train_csv=str(train),
            test_csv=str(test),
            val_fraction=0,
        )
    with test.open("a") as f:
        f.write("1099_DFA_ANG_XX,ANG\n")
    with pytest.raises(
        ValueError,
        match=r"test.csv lists 1 clip\(s\) that are not in the raw tree.*1099_DFA_ANG_XX \(line 4\)",
    ):
        prepare("cremad", raw, out, workers=1, split="ogmge", train_csv=str(train), test_csv=str(test))
    with pytest.raises(ValueError, match="split='ogmge' needs the OGM-GE split files"):
        prepare("cremad", raw, out, workers=1, split="ogmge")


def test_errors_name_the_missing_folder_and_the_empty_split(raw: Path, tmp_path: Path) -> None:
    (tmp_path / "nested" / "CREMA-D").mkdir(parents=True)
    (tmp_path / "nested" / "CREMA-D" / "AudioWAV").mkdir()
    with pytest.raises(FileNotFoundError, match=r"No AudioWAV folder in .*nested.*pass --raw .*CREMA-D"):
        prepare("cremad", tmp_path / "nested", tmp_path / "out", workers=1)
    with pytest.raises(
        ValueError, match=r"leave the val split\(s\) without actors.*4 actor.*--set val_actors=1"
    ):
        prepare("cremad", raw, tmp_path / "out", workers=1, val_actors=0, test_actors=1)
    with pytest.raises(ValueError, match=r"leave the train split\(s\) without actors"):
        prepare("cremad", raw, tmp_path / "out", workers=1)  # the defaults (14 + 14 actors) on 4 actors
    assert not (tmp_path / "out").exists()  # refused before any work


def test_a_split_emptied_by_skipped_clips_keeps_the_report(tmp_path: Path) -> None:
    """Every clip of two of three actors is unreadable: the error names them and skipped.json lists them."""
    wavs, flvs = tmp_path / "raw" / "AudioWAV", tmp_path / "raw" / "VideoFlash"
    wavs.mkdir(parents=True)
    flvs.mkdir()
    for actor in (1001, 1002, 1003):
        for emotion in ("ANG", "SAD"):
            key = f"{actor}_DFA_{emotion}_XX"
            write_wav(wavs / f"{key}.wav")
            write_flv(flvs / f"{key}.flv", seconds=0.5)
            if actor != 1001:
                (wavs / f"{key}.wav").write_bytes(b"")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"would be empty after skipping unusable inputs.*4 input\(s\) were "
                       r"skipped, all listed in .*skipped.json.*1002_DFA_ANG_XX: .*empty"):  # fmt: skip
        prepare("cremad", tmp_path / "raw", out, workers=1, val_actors=1, test_actors=1)
    listed = json.loads((out / "skipped.json").read_text())
    assert sorted(f["clip"] for f in listed) == [
        f"{a}_DFA_{e}_XX" for a in (1002, 1003) for e in ("ANG", "SAD")
    ]


def test_loader_shapes_and_transforms(prepared: Path) -> None:
    ds = load_dataset("cremad", root=str(prepared), image_size=32)
    assert ds.num_classes == 6 and ds.class_names == list(EMOTIONS) and ds.modalities == ["audio", "visual"]
    assert (len(ds.train), len(ds.val), len(ds.test)) == tuple(_info(prepared)["counts"].values())
    x, y = ds.test[0]
    assert x["audio"].shape == (1, 257, 188) and x["audio"].dtype == torch.float32
    assert x["visual"].shape == (3, 32, 32) and 0 <= y < 6
    assert torch.equal(ds.test[0][0]["visual"], x["visual"])  # evaluation is deterministic
    reader = pickle.loads(pickle.dumps(ds.train.reader))  # DataLoader workers get a copy
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    a = reader(0, torch.Generator().manual_seed(1))["visual"]
    assert torch.equal(torch.rand(1), before)  # training transforms draw only from the given generator
    assert torch.equal(reader(0, torch.Generator().manual_seed(1))["visual"], a)
    others = [reader(0, torch.Generator().manual_seed(s))["visual"] for s in range(2, 6)]
    assert all(not torch.equal(o, a) for o in others)
    assert not torch.equal(reader(0, None)["visual"], a)
    many = load_dataset("cremad", root=str(prepared), image_size=16, frames=3)
    assert many.train[0][0]["visual"].shape == (3, 3, 16, 16) and many.test[0][0]["visual"].shape == (
        3,
        3,
        16,
        16,
    )
    with pytest.raises(FileNotFoundError, match="equimodal prepare cremad"):
        load_dataset("cremad", root=str(prepared / "nothing"))


def test_tiny_preset_trains_one_epoch(prepared: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    argv = ["train", "cremad-tiny", "--set", f"data.options.root={prepared}", "--set", "train.progress=false"]
    assert main([*argv, "--out", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 1 and 0.0 <= summary["test"]["test_acc"] <= 1.0


@pytest.mark.slow
def test_official_preset_trains_one_epoch(prepared: Path, tmp_path: Path) -> None:
    """The full recipe (two full-width ResNet18, 224x224 frames, AMSS), one epoch on the fixture."""
    run = tmp_path / "run"
    argv = ["train", "cremad", "--set", f"data.options.root={prepared}", "--set", "train.progress=false"]
    argv += ["--set", "train.epochs=1", "--set", "train.probe=false", "--set", "data.num_workers=0"]
    assert main([*argv, "--out", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 1 and 0.0 <= summary["test"]["test_acc"] <= 1.0


def test_training_frame_is_drawn_from_the_generator(prepared: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import equimodal.data.cremad.loader as cremad
    from equimodal.data.media import read_rgb
    from equimodal.data.transforms import resize

    monkeypatch.setattr(cremad, "frame_transform", lambda image, size, generator: resize(image, size))
    reader = load_dataset("cremad", root=str(prepared), image_size=16).train.reader
    first, second = (resize(read_rgb(f), 16) for f in sorted((prepared / reader.visual[0]).iterdir()))
    picks = [reader(0, torch.Generator().manual_seed(s))["visual"] for s in range(12)]
    assert all(torch.equal(p, first) or torch.equal(p, second) for p in picks)
    assert any(torch.equal(p, first) for p in picks) and any(torch.equal(p, second) for p in picks)
    assert torch.equal(reader(0, None)["visual"], first)  # evaluation: the first of evenly spaced frames
