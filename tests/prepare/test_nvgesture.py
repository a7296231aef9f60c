"""NVGesture: the preparer on a tiny raw tree in the release's layout, the loader, one tiny training epoch."""

from __future__ import annotations

import csv
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from equimodal.cli import main
from equimodal.data import load_dataset
from equimodal.data.base import SampleKey
from equimodal.data.nvgesture.prepare import dequantize_flow, parse_line, quantize_flow
from equimodal.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from equimodal.prepare import prepare

av = pytest.importorskip("av")
pytest.importorskip("cv2")

W, H, N = 48, 40, 30  # fixture video size and length
CLIP, SIZE = 16, 40  # prepare options used by the tests (and the tiny preset)
CLASSES = (1, 2, 3)
TRAIN_LIST = "nvgesture_train_correct_cvpr2016_v2.lst"
TEST_LIST = "nvgesture_test_correct_cvpr2016_v2.lst"


def _write_video(path: Path, frames: int = N, step: int = 1) -> None:
    """An mjpeg avi (48x40) of a bright 10x12 square on a dark ground moving ``step`` px right per frame."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="avi") as container:
        stream = container.add_stream("mjpeg", rate=30)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuvj420p"
        for t in range(frames):
            img = np.full((H, W, 3), 30, dtype=np.uint8)
            img[14:26, 4 + step * t : 14 + step * t] = 230
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _line(folder: str, label: int, span: str = "2:26") -> str:
    return (
        f"path:./Video_data/{folder} depth:sk_depth:{span} color:sk_color:{span} "
        f"duo_left:duo_left:5:40 label:{label}"
    )


def make_raw(raw: Path) -> dict[str, list[str]]:
    """3 classes x 4 good clips (3 train + 1 test each) plus five bad entries; returns the lines."""
    train, test = [], []
    for c in CLASSES:
        for s in range(4):
            folder = f"class_{c:02d}/subject{s + 1}_r0"
            for sensor in ("sk_color", "sk_depth"):
                _write_video(raw / "Video_data" / folder / f"{sensor}.avi")
            (train if s < 3 else test).append(_line(folder, c))
    bad = raw / "Video_data" / "class_01"
    _write_video(bad / "nodepth_r0" / "sk_color.avi")  # sk_depth.avi missing
    for sensor in ("sk_color", "sk_depth"):
        _write_video(bad / "trunc_r0" / f"{sensor}.avi")
        _write_video(bad / "short_r0" / f"{sensor}.avi")
    data = (bad / "trunc_r0" / "sk_color.avi").read_bytes()
    (bad / "trunc_r0" / "sk_color.avi").write_bytes(data[: len(data) // 3])
    train += [
        _line("class_01/nodepth_r0", 1),
        _line("class_01/trunc_r0", 1),
        _line("class_01/short_r0", 1, span="10:50"),
        "path:./Video_data/class_02/broken depth:sk_depth:3 label:2",
    ]
    test.append(_line("class_03/subject1_r1", 26))
    (raw / TRAIN_LIST).write_text("\n".join(train) + "\n")
    (raw / TEST_LIST).write_text("\n".join(test) + "\n")
    return {"train": train, "test": test}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("nvgesture")
    raw, out = base / "raw", base / "prepared"
    make_raw(raw)
    args = ["prepare", "nvgesture", "--raw", str(raw), "--out", str(out), "--workers", "2"]
    assert main([*args, "--set", f"clip_frames={CLIP}", "--set", f"frame_size={SIZE}"]) == 0
    return raw, out


def _manifest(out: Path) -> list[dict[str, str]]:
    with (out / "manifest.csv").open() as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------------ parsing
def test_parse_line_reads_the_release_format() -> None:
    entry = parse_line(
        "path:./Video_data/class_07/subject13_r1 depth:sk_depth:73:153 color:sk_color:70:150 "
        "duo_left:duo_left:97:217 label:7",
        "x.lst:1",
    )
    assert entry.key == "class_07_subject13_r1" and entry.class_name == "class_07"
    assert entry.videos == {"color": ("sk_color", 70, 150), "depth": ("sk_depth", 73, 153)}


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("path:./Video_data/a/b depth:sk_depth:1:5 color:sk_color:1:5 label:0", "outside 1..25"),
        ("path:./Video_data/a/b depth:sk_depth:1:5 color:sk_color:1:5 label:x", "not an integer"),
        ("path:./Video_data/a/b depth:sk_depth:1:5 label:3", "'color'"),
        ("path:./Video_data/a/b depth:sk_depth:9:5 color:sk_color:1:5 label:3", "empty or negative"),
        ("path:./Video_data/a/b depth:sk_depth:a:5 color:sk_color:1:5 label:3", "non-integer"),
        ("garbage", "not name:value"),
    ],
)
def test_parse_line_names_what_is_wrong(line: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_line(line, "x.lst:3")


def test_flow_quantisation_round_trip() -> None:
    flow = np.array([-30.0, -20.0, -1.0, 0.0, 0.3, 19.9, 25.0], dtype=np.float32)
    stored = quantize_flow(flow, 20.0)
    assert stored.dtype == np.int8 and stored.min() == -127 and stored.max() == 127
    back = dequantize_flow(stored, 20.0)
    assert np.allclose(back, np.clip(flow, -20, 20), atol=20 / 127 / 2 + 1e-6)


# ------------------------------------------------------------------------------------------ prepare
def test_prepare_writes_the_layout_and_reports_bad_inputs(prepared: tuple[Path, Path]) -> None:
    raw, out = prepared
    info = json.loads((out / "prepare.json").read_text())
    assert info["dataset"] == "nvgesture" and info["classes"] == ["class_01", "class_02", "class_03"]
    assert info["counts"] == {"train": 6, "val": 3, "test": 3}
    assert info["options"]["clip_frames"] == CLIP and info["flow"]["winsize"] == 15
    reasons = {s["clip"]: s["reason"] for s in info["skipped"]}
    assert len(reasons) == 5, reasons
    video = raw / "Video_data" / "class_01"
    assert str(video / "nodepth_r0" / "sk_depth.avi") in reasons["class_01_nodepth_r0"]
    assert "missing" in reasons["class_01_nodepth_r0"]
    assert str(video / "trunc_r0" / "sk_color.avi") in reasons["class_01_trunc_r0"]
    assert (
        "holds 30 decodable frames" in reasons["class_01_short_r0"]
        and "10..49" in reasons["class_01_short_r0"]
    )
    assert "lacks the field(s) ['color']" in reasons[f"{TRAIN_LIST}:13"]
    assert "label 26 is outside 1..25" in reasons[f"{TEST_LIST}:4"]
    rows = _manifest(out)
    assert len(rows) == 12 and list(rows[0]) == ["key", "label", "split", "rgb", "depth", "flow"]
    assert (out / "splits" / "val.txt").read_text().split() == [r["key"] for r in rows if r["split"] == "val"]


def test_val_is_carved_from_the_train_list_per_class(prepared: tuple[Path, Path]) -> None:
    _, out = prepared
    rows = _manifest(out)
    test = {r["key"] for r in rows if r["split"] == "test"}
    assert test == {f"class_{c:02d}_subject4_r0" for c in CLASSES}
    val = [r for r in rows if r["split"] == "val"]
    assert sorted(r["label"] for r in val) == ["class_01", "class_02", "class_03"]
    assert not {r["key"] for r in val} & test


def test_prepared_arrays_and_flow_where_the_square_moves(prepared: tuple[Path, Path]) -> None:
    _, out = prepared
    rgb = np.load(out / "rgb" / "class_02_subject1_r0.npy")
    depth = np.load(out / "depth" / "class_02_subject1_r0.npy")
    flow = np.load(out / "flow" / "class_02_subject1_r0.npy")
    assert rgb.shape == (CLIP, SIZE, SIZE, 3) and rgb.dtype == np.uint8
    assert depth.shape == (CLIP, SIZE, SIZE) and depth.dtype == np.uint8
    assert flow.shape == (CLIP, SIZE, SIZE, 2) and flow.dtype == np.int8
    assert rgb[0, 20, 12].min() > 180 and rgb[0, 2, 2].max() < 60  # square inside, dark ground outside
    assert abs(int(depth[0, 20, 12]) - int(rgb[0, 20, 12].mean())) < 20  # grey depth of the same picture
    # The square moves 1 px per source frame = 1.5 px per stored frame (24 -> 16) x 40/48 = 1.25 px.
    dx = dequantize_flow(flow, 20.0)[..., 0]
    edge = dx[:8, 15:28, 8:24]  # around the square's trailing and leading edges in the first frames
    assert edge.max() > 0.8 and np.median(dx[:, :5, :]) == pytest.approx(0.0, abs=0.05)


def test_prepare_resumes_and_refuses_other_array_options(prepared: tuple[Path, Path], tmp_path: Path) -> None:
    raw, base = prepared
    out = tmp_path / "copy"
    shutil.copytree(base, out)
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/*.npy")}
    (out / "flow" / "class_03_subject2_r0.npy").unlink()
    info = prepare("nvgesture", raw, out, workers=1, clip_frames=CLIP, frame_size=SIZE)
    assert info["counts"] == {"train": 6, "val": 3, "test": 3}
    changed = sorted(p.name for p, t in stamps.items() if not p.exists() or p.stat().st_mtime_ns != t)
    assert changed == ["class_03_subject2_r0.npy"] * 3  # only the clip with a missing output was redone
    with pytest.raises(ValueError, match="frame_size"):
        prepare("nvgesture", raw, out, workers=1, clip_frames=CLIP, frame_size=32)


def test_prepare_names_the_list_files_when_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nvgesture_train_correct_v2.lst"):
        prepare("nvgesture", tmp_path, tmp_path / "out", workers=1)


def test_prepare_accepts_the_short_list_names(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    for split, name in (
        ("train", "nvgesture_train_correct_v2.lst"),
        ("test", "nvgesture_test_correct_v2.lst"),
    ):
        folders = [f"class_0{c}/s{split}_r0" for c in (1, 2)] + (
            ["class_01/s2_r0"] if split == "train" else []
        )
        for folder in folders:
            for sensor in ("sk_color", "sk_depth"):
                _write_video(raw / "Video_data" / folder / f"{sensor}.avi", frames=8)
        (raw / name).write_text("\n".join(_line(f, int(f[7]), "0:8") for f in folders))
    info = prepare("nvgesture", raw, tmp_path / "out", workers=1, clip_frames=4, frame_size=16)
    assert info["lists"]["train"] == "nvgesture_train_correct_v2.lst" and info["skipped"] == []
    assert info["counts"] == {"train": 2, "val": 1, "test": 2}


# ------------------------------------------------------------------------------------------- loader
def _encode_indices(out: Path) -> None:
    """Overwrite every clip so its values encode (t, y, x): rgb = (t, y, x), depth = t + 2y + 3x mod 256,
    flow = (t - 60, y - x) in stored int8 units."""
    t, y, x = np.meshgrid(np.arange(CLIP), np.arange(SIZE), np.arange(SIZE), indexing="ij")
    rgb = np.stack([t, y, x], -1).astype(np.uint8)
    depth = ((t + 2 * y + 3 * x) % 256).astype(np.uint8)
    flow = np.stack([t - 60, y - x], -1).astype(np.int8)
    for row in _manifest(out):
        for column, array in (("rgb", rgb), ("depth", depth), ("flow", flow)):
            np.save(out / row[column], array)


def _decode_rgb(x: torch.Tensor) -> np.ndarray:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1, 1)
    return torch.round((x * std + mean) * 255).to(torch.int64).numpy()


def _check_aligned(sample: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The (t, y, x) index grids read back from rgb; depth and flow must hold the same positions."""
    t, y, x = _decode_rgb(sample["rgb"])
    assert np.array_equal(np.round(sample["depth"][0].numpy() * 255), (t + 2 * y + 3 * x) % 256)
    pixels = sample["flow"].numpy() * 127 / 20.0
    assert np.allclose(pixels[0], t - 60, atol=1e-3) and np.allclose(pixels[1], y - x, atol=1e-3)
    return t, y, x


def test_loader_shares_window_and_crop_in_training_and_takes_all_frames_in_eval(
    prepared: tuple[Path, Path], tmp_path: Path
) -> None:
    out = tmp_path / "indexed"
    shutil.copytree(prepared[1], out)
    _encode_indices(out)
    ds = load_dataset("nvgesture", root=str(out), frames=8, crop=32, seed=3)
    assert ds.modalities == ["rgb", "depth", "flow"] and ds.num_classes == 3
    assert (len(ds.train), len(ds.val), len(ds.test)) == (6, 3, 3)
    starts, corners = set(), set()
    for epoch in range(6):
        for i in range(len(ds.train)):
            sample, _ = ds.train[SampleKey(i, epoch)]
            assert {m: tuple(v.shape) for m, v in sample.items()} == {
                "rgb": (3, 8, 32, 32), "depth": (1, 8, 32, 32), "flow": (2, 8, 32, 32)
            }  # fmt: skip
            t, y, x = _check_aligned(sample)
            assert np.array_equal(t[:, 0, 0], np.arange(t[0, 0, 0], t[0, 0, 0] + 8))  # consecutive frames
            starts.add(int(t[0, 0, 0]))
            corners.add((int(y[0, 0, 0]), int(x[0, 0, 0])))
    assert max(starts) <= CLIP - 8 and len(starts) > 3 and len(corners) > 5  # random, within bounds
    sample, label = ds.test[0]
    assert sample["rgb"].shape == (3, CLIP, 32, 32) and label in (0, 1, 2)
    t, y, x = _check_aligned(sample)
    assert np.array_equal(t[:, 0, 0], np.arange(CLIP)) and (y[0, 0, 0], x[0, 0, 0]) == (4, 4)  # centre crop
    assert torch.equal(ds.val[1][0]["flow"], ds.val[1][0]["flow"])  # evaluation is deterministic


def test_loader_values_reader_pickles_and_checks_sizes(prepared: tuple[Path, Path]) -> None:
    _, out = prepared
    ds = load_dataset("nvgesture", root=str(out), frames=8, crop=32)
    sample, _ = ds.test[0]
    assert float(sample["depth"].min()) >= 0.0 and float(sample["depth"].max()) <= 1.0
    assert float(sample["rgb"].min()) < -1.0  # ImageNet-normalised dark ground
    reader = pickle.loads(pickle.dumps(ds.train.reader))
    assert torch.equal(reader(0, None)["flow"], ds.train.reader(0, None)["flow"])
    with pytest.raises(ValueError, match="frames between 1 and 16"):
        load_dataset("nvgesture", root=str(out), frames=64)
    with pytest.raises(ValueError, match="crop between 1 and 40"):
        load_dataset("nvgesture", root=str(out), frames=8, crop=224)
    encoders = ds.default_encoders()
    assert {m: e.in_channels for m, e in encoders.items()} == {"rgb": 3, "depth": 1, "flow": 2}


# --------------------------------------------------------------------------------------------- train
def test_tiny_preset_trains_one_epoch(prepared: tuple[Path, Path], tmp_path: Path) -> None:
    _, out = prepared
    run = tmp_path / "run"
    args = ["train", "nvgesture-tiny", "--set", f"data.options.root={out}", "--set", "train.progress=false"]
    assert main([*args, "--out", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary, "the run wrote an empty summary"
    with (run / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and np.isfinite(float(rows[0]["train_loss"]))
