"""The ``manifest`` dataset: media readers, the CSV manifest, file checks, skipping and training from the CLI.

Fixtures are real files in the documented on-disk layout (wav/flac by soundfile, png/jpg by Pillow,
frame folders of jpgs, npy, txt and a tokenizer.json built locally), kept tiny.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import pickle
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import write_csv
from PIL import Image

from equimodal.data import load_dataset
from equimodal.data.base import FileSplit, SampleKey, make_loader, sample_generator
from equimodal.data.media import (
    LocalTokenizer,
    MediaError,
    frame_positions,
    read_audio,
    read_frames,
    read_image,
    read_npy,
    read_text,
)
from equimodal.engine.config import load_config
from equimodal.models.encoders import create_encoder

CLASSES = ("cat", "dog", "eel")
ROWS = 30
RATE = 16000
SMALL = {"audio_seconds": 0.2, "n_fft": 128, "hop_length": 64, "image_size": 16, "frames": 3, "max_tokens": 8}
VOCAB = ["[PAD]", "[UNK]", "the", "a", "cat", "dog", "eel", "runs", "swims", "barks", "fast"]


# ------------------------------------------------------------------------------------------ fixtures
def _tokenizer(path: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return path


def _image(path: Path, value: int, size: int = 16, mode: str = "RGB") -> Path:
    channels = 3 if mode == "RGB" else 1
    arr = np.full((size, size, channels), value, dtype=np.uint8)
    arr[: size // 2, :, 0] = 255 - value  # top half differs in the first channel
    Image.fromarray(arr[..., 0] if mode == "L" else arr, mode).save(path)
    return path


def _wav(path: Path, wave: np.ndarray, rate: int = RATE, subtype: str | None = None) -> Path:
    sf.write(str(path), wave, rate, subtype=subtype)
    return path


def _make_media(root: Path, rows: int = ROWS) -> list[dict[str, str]]:
    """One sample per row: audio (wav/flac), image (png/jpg), frames (jpgs), caption (txt), feat (npy)."""
    for d in ("audio", "img", "frames", "text", "feat"):
        (root / d).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = []
    for r in range(rows):
        y = r % 3
        t = np.arange(int(0.25 * RATE)) / RATE
        wave = (0.3 * np.sin(2 * np.pi * 300 * (y + 1) * t) + 0.01 * rng.normal(size=t.size)).astype(
            np.float32
        )
        audio = f"audio/{r:03d}." + ("wav" if r % 2 else "flac")
        _wav(root / audio, wave)
        image = f"img/{r:03d}." + ("png" if r % 2 else "jpg")
        _image(root / image, 60 * y + 20)
        clip = root / "frames" / f"{r:03d}"
        clip.mkdir(exist_ok=True)
        for k in range(4 + r % 3):
            _image(clip / f"f{k:02d}.jpg", 40 * k + y)
        (root / "text" / f"{r:03d}.txt").write_text(f"the {CLASSES[y]} runs fast", encoding="utf-8")
        np.save(root / "feat" / f"{r:03d}.npy", rng.normal(size=8) + y)
        out.append(
            {"label": CLASSES[y], "audio": audio, "image": image, "clip": f"frames/{r:03d}",
             "caption": f"text/{r:03d}.txt", "feat": f"feat/{r:03d}.npy"}
        )  # fmt: skip
    return out


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, str]]]:
    root = tmp_path_factory.mktemp("media")
    rows = _make_media(root)
    _tokenizer(root / "tokenizer.json")
    return root, rows


def _manifest(
    root: Path, rows: list[dict[str, str]], columns: list[str], name: str = "manifest.csv",
    split: list[str] | None = None,
) -> Path:  # fmt: skip
    header = ["label", *columns] + (["split"] if split is not None else [])
    table = [
        [r["label"], *[r[c] for c in columns]] + ([split[i]] if split else []) for i, r in enumerate(rows)
    ]
    return write_csv(root / name, header, table)


def _opts(root: Path, **extra: object) -> dict[str, object]:
    return {**SMALL, "tokenizer": str(root / "tokenizer.json"), **extra}


ALL = ["audio", "image", "clip", "caption", "feat"]


# --------------------------------------------------------------------------------------------- readers
def test_read_npy_keeps_shape_as_float32(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.arange(6, dtype=np.int16).reshape(2, 3))
    x = read_npy(tmp_path / "a.npy")
    assert x.dtype == torch.float32 and x.shape == (2, 3)
    assert torch.equal(x, torch.arange(6, dtype=torch.float32).reshape(2, 3))


def test_audio_mono_resampled_padded_and_spectrogram(tmp_path: Path) -> None:
    stereo = np.stack([np.full(800, 0.5), np.full(800, -0.1)], 1).astype(np.float32)  # 0.1 s at 8 kHz
    path = _wav(tmp_path / "s.wav", stereo, rate=8000, subtype="FLOAT")
    wave = read_audio(path, sample_rate=RATE, seconds=0.2, mode="waveform")
    assert wave.shape == (1, 3200) and wave.dtype == torch.float32
    nonzero = int((wave.abs() > 1e-3).sum())
    assert 1500 <= nonzero <= 1700  # 800 samples at 8 kHz -> ~1600 at 16 kHz, then zeros
    assert abs(float(wave[0, 400:1200].mean()) - 0.2) < 0.01  # channels averaged: (0.5 - 0.1) / 2
    spec = read_audio(path, sample_rate=RATE, seconds=0.2, n_fft=128, hop_length=64)
    assert spec.shape == (1, 65, 3200 // 64 + 1) and spec.dtype == torch.float32
    assert bool((spec >= 0).all()) and float(spec.max()) > 0  # log(1 + |X|)


def test_audio_crop_random_in_training_centred_in_evaluation(tmp_path: Path) -> None:
    ramp = (np.arange(RATE) / RATE).astype(np.float32)  # 1 s of a ramp: values give the offset
    path = _wav(tmp_path / "ramp.wav", ramp, subtype="FLOAT")
    kw = {"sample_rate": RATE, "seconds": 0.2, "mode": "waveform"}
    eval_a, eval_b = read_audio(path, **kw), read_audio(path, **kw)  # type: ignore[arg-type]
    assert torch.equal(eval_a, eval_b)
    torch.testing.assert_close(eval_a[0], torch.from_numpy(ramp[6400:9600]))
    same = [read_audio(path, torch.Generator().manual_seed(5), **kw) for _ in range(2)]  # type: ignore[arg-type]
    assert torch.equal(same[0], same[1])
    starts = {
        round(float(read_audio(path, torch.Generator().manual_seed(s), **kw)[0, 0]) * RATE)  # type: ignore[arg-type]
        for s in range(8)
    }
    assert len(starts) > 4 and all(0 <= s <= RATE - 3200 for s in starts)


def test_image_rgb_gray_resized_in_unit_range(tmp_path: Path) -> None:
    png = _image(tmp_path / "a.png", 100, size=20)
    x = read_image(png, size=8)
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert abs(float(x[1].mean()) - 100 / 255) < 1e-6  # second channel is constant
    assert float(x[0, 0].mean()) > float(x[0, -1].mean())  # top half brighter in the first channel
    gray = read_image(_image(tmp_path / "g.jpg", 80, mode="L"), size=16, mode="L")
    assert gray.shape == (1, 16, 16)


def test_frames_evenly_spaced_in_evaluation_random_in_training(tmp_path: Path) -> None:
    for k in range(10):
        _image(tmp_path / f"{k:02d}.jpg", 20 * k)
    assert frame_positions(10, 4) == [0, 3, 6, 9]
    x = read_frames(tmp_path, frames=4, size=8)
    assert x.shape == (4, 3, 8, 8)
    levels = [round(float(x[i, 1].mean()) * 255 / 20) for i in range(4)]
    assert levels == [0, 3, 6, 9]
    assert torch.equal(x, read_frames(tmp_path, frames=4, size=8))
    draws = [frame_positions(10, 4, torch.Generator().manual_seed(s)) for s in range(6)]
    assert all(d == sorted(set(d)) and len(d) == 4 for d in draws) and len({tuple(d) for d in draws}) > 1
    a = read_frames(tmp_path, torch.Generator().manual_seed(3), frames=4, size=8)
    assert torch.equal(a, read_frames(tmp_path, torch.Generator().manual_seed(3), frames=4, size=8))
    assert frame_positions(2, 4) == [0, 1, 1, 1]  # fewer frames than asked: the last one repeats


def test_image_augmentation_in_training_only() -> None:
    """flip and crop_flip draw from the sample's generator (one draw for all frames); evaluation is plain."""
    from equimodal.data.media import augment_image

    image = torch.arange(3 * 8 * 8, dtype=torch.float32).reshape(3, 8, 8) / 192  # varies along W
    clip = torch.stack([image, image])
    assert augment_image(image, "crop_flip", None) is image  # evaluation: untouched
    assert augment_image(image, "none", torch.Generator().manual_seed(0)) is image
    flips = [augment_image(image, "flip", torch.Generator().manual_seed(s)) for s in range(8)]
    assert {torch.equal(f, image) for f in flips} == {True, False}
    assert all(torch.equal(f, image) or torch.equal(f, image.flip(-1)) for f in flips)
    crops = [augment_image(clip, "crop_flip", torch.Generator().manual_seed(s)) for s in range(4)]
    assert all(c.shape == clip.shape for c in crops) and any(not torch.equal(c, clip) for c in crops)
    assert all(torch.equal(c[0], c[1]) for c in crops)  # one draw per clip: every frame alike
    again = augment_image(clip, "crop_flip", torch.Generator().manual_seed(2))
    assert torch.equal(crops[2], again)  # seeded: the same sample and epoch give the same crop


def test_text_token_ids_padded_and_truncated(tmp_path: Path) -> None:
    tok = LocalTokenizer(_tokenizer(tmp_path / "tokenizer.json"))
    (tmp_path / "t.txt").write_text("the dog barks zebra", encoding="utf-8")
    ids = read_text(tmp_path / "t.txt", tok, max_tokens=6)
    assert ids.dtype == torch.long and ids.tolist() == [2, 5, 9, 1, 0, 0]  # zebra -> [UNK], then padding
    assert read_text(tmp_path / "t.txt", tok, max_tokens=2).tolist() == [2, 5]
    restored = pickle.loads(pickle.dumps(tok))
    assert restored.vocab_size == len(VOCAB)


def test_text_embedding_ignores_padding() -> None:
    enc = create_encoder("text_embedding", vocab_size=11, dim=8)
    ids = torch.tensor([[2, 5, 0, 0], [3, 0, 0, 0]])
    longer = torch.cat([ids, torch.zeros(2, 3, dtype=torch.long)], 1)
    out = enc(ids)
    assert out.shape == (2, 8) and enc.out_dim == 8
    torch.testing.assert_close(enc(longer), out)
    with pytest.raises(ValueError, match=r"\(B, L\) token ids"):
        enc(torch.zeros(2, 3, 4, dtype=torch.long))


# -------------------------------------------------------------------------------------- the dataset
def test_manifest_with_every_file_type(media: tuple[Path, list[dict[str, str]]]) -> None:
    root, rows = media
    path = _manifest(root, rows, ALL)
    ds = load_dataset("manifest", path=str(path), **_opts(root))
    assert ds.modalities == ALL and ds.class_names == list(CLASSES) and ds.num_classes == 3
    assert (len(ds.train), len(ds.val), len(ds.test)) == (18, 6, 6)
    assert ds.info["columns"] == {"audio": "audio", "image": "image", "clip": "frames", "caption": "text",
                                  "feat": "npy"}  # fmt: skip
    assert ds.info["skipped"] == [] and not ds.in_memory
    assert ds.input_shapes() == {
        "audio": (1, 65, 51), "image": (3, 16, 16), "clip": (3, 3, 16, 16), "caption": (8,), "feat": (8,)
    }  # fmt: skip
    inputs, label = ds.test[0]
    assert inputs["caption"].dtype == torch.long and inputs["caption"][:5].tolist() == [
        2,
        4 + label,
        7,
        10,
        0,
    ]
    encoders = ds.default_encoders()
    kinds = {m: type(e).__name__ for m, e in encoders.items()}
    assert kinds == {"audio": "ConvEncoder", "image": "ConvEncoder", "clip": "ResNet18",
                     "caption": "TextEmbedding", "feat": "MLP"}  # fmt: skip
    assert encoders["clip"].out_dim == 128 and encoders["caption"].vocab_size == len(VOCAB)
    batch, labels = next(iter(make_loader(ds.train, 4, train=True)))
    assert {m: tuple(e(batch[m]).shape) for m, e in encoders.items()} == {
        m: (4, e.out_dim) for m, e in encoders.items()
    }
    assert labels.shape == (4,)


def test_train_split_seeded_per_sample_eval_deterministic(media: tuple[Path, list[dict[str, str]]]) -> None:
    root, rows = media
    ds = load_dataset("manifest", path=str(_manifest(root, rows, ["audio", "clip"])), **_opts(root))
    train = ds.train
    assert isinstance(train, FileSplit) and train.train and not ds.val.train
    a, _ = train[SampleKey(0, 0)]
    b, _ = train[SampleKey(0, 0)]
    assert all(torch.equal(a[m], b[m]) for m in a)
    record = int(train.records[0])
    direct = train.reader(record, sample_generator(train.seed, 0, record))
    assert all(torch.equal(a[m], direct[m]) for m in a)
    epochs = [train[SampleKey(0, e)][0]["audio"] for e in range(6)]
    assert any(not torch.equal(epochs[0], x) for x in epochs[1:])  # a new crop in another epoch
    v1, v2 = ds.val[0][0], ds.val[0][0]
    assert all(torch.equal(v1[m], v2[m]) for m in v1)
    clone = pickle.loads(pickle.dumps(ds.val))  # spawn-started workers pickle the split
    assert all(torch.equal(clone[0][0][m], v1[m]) for m in v1)


def test_integer_labels_and_given_split(tmp_path: Path, media: tuple[Path, list[dict[str, str]]]) -> None:
    root, rows = media
    split = ["train", "train", "val", "TEST", "train", "val"] * 5
    absolute = [dict(r, label=str(CLASSES.index(r["label"])), feat=str(root / r["feat"]), image=str(root / r["image"]))
                for r in rows]  # fmt: skip
    ds = load_dataset("manifest", path=_manifest(tmp_path, absolute, ["feat", "image"], split=split), **SMALL)
    assert ds.class_names is None and ds.num_classes == 3
    assert ds.train.records.tolist() == [i for i in range(ROWS) if i % 6 in (0, 1, 4)]
    assert ds.test.records.tolist() == list(range(3, ROWS, 6))


# ------------------------------------------------------------------------------------------ training
def _overrides(path: Path, root: Path, *extra: str) -> list[str]:
    """``--set`` overrides of a one-epoch run on the manifest at ``path``."""
    opts = [f"data.options.{k}={v}" for k, v in _opts(root).items()]
    return ["data.name=manifest", f"data.options.path={path}", *opts, "train.epochs=1", "train.probe=false",
            "train.progress=false", "data.batch_size=8", *extra]  # fmt: skip


def _cli(overrides: list[str], out: Path) -> list[str]:
    return ["train", *[a for o in overrides for a in ("--set", o)], "--out", str(out)]


def test_cli_trains_one_epoch(tmp_path: Path, media: tuple[Path, list[dict[str, str]]]) -> None:
    from equimodal.cli import main

    root, rows = media
    path = _manifest(root, rows, ALL, name="cli.csv")
    assert main(_cli(_overrides(path, root, "data.num_workers=0"), tmp_path / "run")) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["dataset"] == "manifest" and summary["modalities"] == ALL
    assert summary["class_names"] == list(CLASSES) and 0.0 <= summary["test"]["test_acc"] <= 1.0
    assert not (tmp_path / "run" / "skipped.csv").exists()


def test_workers_give_identical_results(tmp_path: Path, media: tuple[Path, list[dict[str, str]]]) -> None:
    from equimodal.engine.trainer import train

    root, rows = media
    path = _manifest(root, rows, ["audio", "clip", "caption"], name="workers.csv")
    results = []
    for workers in (0, 2):
        cfg = load_config(None, _overrides(path, root, f"data.num_workers={workers}", "train.epochs=2"))
        assert cfg.data.num_workers == workers
        results.append(train(cfg, tmp_path / f"w{workers}"))
    assert results[0]["test"] == results[1]["test"] and results[0]["val"] == results[1]["val"]
    metrics = [(tmp_path / f"w{w}" / "metrics.csv").read_text().splitlines() for w in (0, 2)]
    assert metrics[0][0].split(",")[2] == "epoch_time" and len(metrics[0]) == 3
    drop_time = [
        [",".join(c for i, c in enumerate(line.split(",")) if i != 2) for line in m] for m in metrics
    ]
    assert drop_time[0] == drop_time[1]


# ------------------------------------------------------------------------------------------ bad input
def _bad_manifest(
    tmp: Path, media: tuple[Path, list[dict[str, str]]], kind: str
) -> tuple[Path, int, str, str]:
    """A manifest (absolute paths) whose row 7 holds a bad file; returns (path, row, column, cell)."""
    root, rows = media
    rows = [{k: (str(root / v) if k != "label" else v) for k, v in r.items()} for r in rows]
    column, cell = "audio", str(tmp / "gone.wav")
    if kind == "empty_wav":
        (tmp / "empty.wav").write_bytes(b"")
        cell = str(tmp / "empty.wav")
    elif kind == "corrupt_png":
        (tmp / "bad.png").write_bytes(np.random.default_rng(0).bytes(300))
        column, cell = "image", str(tmp / "bad.png")
    elif kind == "truncated_jpg":
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
            buf, "JPEG"
        )
        (tmp / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
        column, cell = "image", str(tmp / "cut.jpg")
    rows[6][column] = cell
    return _manifest(tmp, rows, ["audio", "image", "feat"]), 7, column, cell


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("missing", "does not exist"),
        ("empty_wav", r"is empty \(0 bytes\)"),
        ("corrupt_png", "cannot be read as an image"),
    ],
)
def test_bad_file_names_file_row_and_column(
    tmp_path: Path, media: tuple[Path, list[dict[str, str]]], kind: str, reason: str
) -> None:
    path, row, column, cell = _bad_manifest(tmp_path, media, kind)
    with pytest.raises(ValueError) as err:
        load_dataset("manifest", path=str(path), **SMALL)
    msg = str(err.value)
    assert f"manifest.csv row {row}, column {column!r}: file {cell!r}" in msg
    assert re.search(reason, msg), msg
    assert "skip_bad=true" in msg and "counted from 1" in msg


def test_check_levels(tmp_path: Path, media: tuple[Path, list[dict[str, str]]]) -> None:
    path, *_ = _bad_manifest(tmp_path, media, "corrupt_png")
    assert len(load_dataset("manifest", path=str(path), check="exists", **SMALL).train) == 18
    trunc, row, column, cell = _bad_manifest(tmp_path, media, "truncated_jpg")
    assert load_dataset("manifest", path=str(trunc), **SMALL).num_classes == 3  # header verifies
    with pytest.raises(ValueError, match=rf"row {row}, column '{column}': file '{cell}' cannot be read"):
        load_dataset("manifest", path=str(trunc), check="full", **SMALL)


def test_bad_file_at_read_time_names_row(tmp_path: Path, media: tuple[Path, list[dict[str, str]]]) -> None:
    path, row, column, _ = _bad_manifest(tmp_path, media, "corrupt_png")
    ds = load_dataset("manifest", path=str(path), check="exists", **SMALL)
    split = next(s for s in (ds.train, ds.val, ds.test) if row - 1 in s.records.tolist())
    with pytest.raises(ValueError, match=rf"row {row}, column '{column}'.*check='full'"):
        split[split.records.tolist().index(row - 1)]


def test_skip_bad_drops_rows_and_run_writes_skipped_csv(
    tmp_path: Path, media: tuple[Path, list[dict[str, str]]], caplog: pytest.LogCaptureFixture
) -> None:
    from equimodal.cli import main

    root, rows = media
    rows = [dict(r) for r in rows]
    (tmp_path / "zero.wav").write_bytes(b"")
    (tmp_path / "junk.png").write_bytes(b"not a png at all" * 10)
    rows[1]["audio"], rows[4]["image"] = str(tmp_path / "zero.wav"), str(tmp_path / "junk.png")
    rows[8]["feat"] = "no.npy"  # relative to the manifest's folder, where it does not exist
    rows = [{k: (v if k == "label" or Path(v).is_absolute() or v == "no.npy" else str(root / v)) for k, v in r.items()}
            for r in rows]  # fmt: skip
    path = _manifest(tmp_path, rows, ["audio", "image", "feat"])
    with caplog.at_level(logging.WARNING, logger="equimodal.data.manifest"):
        ds = load_dataset("manifest", path=str(path), skip_bad=True, **SMALL)
    assert "skipped 3 of 30 rows" in caplog.text
    skipped = ds.info["skipped"]
    assert [(s["row"], s["column"]) for s in skipped] == [(2, "audio"), (5, "image"), (9, "feat")]  # type: ignore[index]
    kept = sorted(ds.train.records.tolist() + ds.val.records.tolist() + ds.test.records.tolist())
    assert kept == [i for i in range(ROWS) if i not in (1, 4, 8)]
    out = tmp_path / "run"
    assert main(_cli(_overrides(path, root, "data.options.skip_bad=true", "data.num_workers=0"), out)) == 0
    with (out / "skipped.csv").open() as fh:
        table = list(csv.DictReader(fh))
    assert [r["row"] for r in table] == ["2", "5", "9"]
    assert list(table[0]) == ["row", "column", "path", "reason"]
    assert "empty (0 bytes)" in table[0]["reason"]
    assert json.loads((out / "summary.json").read_text())["skipped_rows"] == 3


def test_skip_bad_emptying_a_class_is_an_error(
    tmp_path: Path, media: tuple[Path, list[dict[str, str]]]
) -> None:
    root, rows = media
    rows = [dict(r, feat=r["feat"] if r["label"] != "eel" else "nope.npy") for r in rows]
    with pytest.raises(ValueError, match=r"class\(es\) \['eel'\] have no rows left after skipping 10 row"):
        load_dataset("manifest", path=_manifest(root, rows, ["feat", "audio"], name="eel.csv"), skip_bad=True)


def _simple(tmp: Path, header: list[str], rows: list[list[object]]) -> Path:
    for i in range(3):
        np.save(tmp / f"{i}.npy", np.zeros(3))
    return write_csv(tmp / "m.csv", header, rows)


@pytest.mark.parametrize(
    ("header", "rows", "match"),
    [
        (["label", "split", "x", "y"], [[0, "train", "0.npy", "0.npy"], [1, "training", "1.npy", "0.npy"]],
         r"m.csv row 2, column 'split': unknown split 'training'; expected 'train', 'val' or 'test'"),
        (["target", "x", "y"], [[0, "0.npy", "0.npy"]], r"m.csv has no 'label' column \(columns: \['target', 'x', 'y'\]\)"),
        (["label", "split"], [[0, "train"]], r"no modality column besides 'label'/'split'"),
        (["label", "x"], [[0, "0.npy"]], r"m.csv has one modality column \('x'\); balancing needs at least two"),
        (["label", "x", "y"], [], r"has a header but no data rows"),
        (["label", "x", "y"], [[0, "0.npy", "0.npy"], [1, "a.wav", "0.npy"]], r"column 'x' mixes file types 'npy' \(row 1, '0.npy'\) and 'audio' \(row 2"),
        (["label", "x", "y"], [[0, "0.npy", "0.npy"], [1, "a.mp4", "0.npy"]], r"row 2, column 'x': unsupported file type '.mp4'"),
        (["label", "x", "y"], [[0, "0.npy", "0.npy"], ["", "1.npy", "0.npy"]], r"row\(s\) 2: the 'label' cell is empty"),
    ],
)  # fmt: skip
def test_manifest_errors(tmp_path: Path, header: list[str], rows: list[list[object]], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_dataset("manifest", path=str(_simple(tmp_path, header, rows)))


def test_missing_manifest_and_small_class_and_npy_shapes(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="No manifest CSV file at"):
        load_dataset("manifest", path=str(tmp_path / "nope.csv"))
    for i in range(12):
        np.save(tmp_path / f"{i}.npy", np.zeros(4 if i != 5 else 5))
    rows = [[i % 3, f"{i}.npy", "0.npy"] for i in range(12)]
    with pytest.raises(
        ValueError, match=r"column 'x' holds .npy arrays of different shapes: \(4,\) .* \(5,\) \(row 6"
    ):
        load_dataset("manifest", path=str(write_csv(tmp_path / "m.csv", ["label", "x", "y"], rows)))
    np.save(tmp_path / "5.npy", np.zeros(4))
    rows = [[0 if i < 9 else 1, f"{i}.npy", "0.npy"] for i in range(12)]  # class 1 has 3 rows: 2/1/0
    with pytest.raises(
        ValueError, match=r"class 1 has 3 rows, too few .*\(it gets 2/1/0 train/val/test rows\)"
    ):
        load_dataset("manifest", path=str(write_csv(tmp_path / "m.csv", ["label", "x", "y"], rows)))


def test_text_column_needs_tokenizer_option(media: tuple[Path, list[dict[str, str]]]) -> None:
    root, rows = media
    path = _manifest(root, rows, ["caption", "feat"], name="text.csv")
    with pytest.raises(
        ValueError,
        match=r"column 'caption' holds .txt files, which need a tokenizer: pass the option `tokenizer`",
    ):
        load_dataset("manifest", path=str(path))
    with pytest.raises(ValueError, match=r"Option `tokenizer`: no file or folder at"):
        load_dataset("manifest", path=str(path), tokenizer=root / "missing.json")


@pytest.mark.parametrize(
    ("module", "package", "column", "extra"),
    [("soundfile", "soundfile", "audio", "audio"), ("PIL.Image", "Pillow", "image", "vision"),
     ("tokenizers", "tokenizers", "caption", "text")],
)  # fmt: skip
def test_missing_library_names_install_command(
    media: tuple[Path, list[dict[str, str]]],
    monkeypatch: pytest.MonkeyPatch,
    module: str,
    package: str,
    column: str,
    extra: str,
) -> None:
    root, rows = media
    path = _manifest(root, rows, [column, "feat"], name=f"lib_{column}.csv")
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    install = re.escape(f"pip install 'equimodal[{extra}]'")
    with pytest.raises(ImportError, match=rf"needs the '{package}' package .*Install it with: {install}$"):
        load_dataset("manifest", path=str(path), **_opts(root))


def test_media_error_is_a_value_error(tmp_path: Path) -> None:
    (tmp_path / "x.npy").write_bytes(b"garbage")
    with pytest.raises(MediaError, match=r"cannot be read as a .npy array"):
        read_npy(tmp_path / "x.npy")
    assert issubclass(MediaError, ValueError)


# --------------------------------------------------------------------------- missing labels, repeated rows
def _npy_rows(tmp: Path, labels: list[str]) -> list[list[object]]:
    """One row per label, each with files of its own in both columns."""
    for i in range(len(labels)):
        np.save(tmp / f"x{i}.npy", np.full(3, float(i)))
        np.save(tmp / f"y{i}.npy", np.full(2, float(i)))
    return [[y, f"x{i}.npy", f"y{i}.npy"] for i, y in enumerate(labels)]


def test_a_nan_label_is_an_error_not_a_class(tmp_path: Path) -> None:
    labels = ["cat", "dog"] * 6 + ["nan", "NaN", "<NA>", "nan"]  # before: 'nan' became a fourth class
    path = write_csv(tmp_path / "m.csv", ["label", "x", "y"], _npy_rows(tmp_path, labels))
    with pytest.raises(ValueError) as err:
        load_dataset("manifest", path=str(path))
    message = str(err.value)
    assert (
        "m.csv row(s) 13, 14, 15, 16: the 'label' cell is empty or a missing value ('nan' in row 13"
        in message
    )
    assert "Give every row its label, or delete the unlabelled rows" in message
    assert "data rows counted from 1" in message


def test_a_sample_listed_twice_is_an_error_naming_its_rows(tmp_path: Path) -> None:
    from equimodal.cli import main

    rows = _npy_rows(tmp_path, ["cat", "dog", "eel"] * 4)
    path = write_csv(tmp_path / "dup.csv", ["label", "x", "y"], [*rows, ["dog", "./x1.npy", "y1.npy"]])
    with pytest.raises(ValueError) as err:
        load_dataset("manifest", path=str(path))
    message = str(err.value)
    assert (
        "dup.csv: rows 2 and 13 (file lines 3 and 14) list the same file in every modality column" in message
    )
    assert "x='x1.npy', y='y1.npy'" in message and "a leak" in message
    assert "Delete the repeated rows, keeping one of each" in message
    args = ["train", "--set", "data.name=manifest", "--set", f"data.options.path={path}"]
    assert main(args) == 2  # the CLI's exit code for bad input, no traceback
    # the same file in one column only (one y shared by two x) is a sample of its own
    shared = write_csv(
        tmp_path / "shared.csv", ["label", "x", "y"], [*rows[:-1], ["eel", "x11.npy", "y1.npy"]]
    )
    assert len(load_dataset("manifest", path=str(shared)).train) > 0
