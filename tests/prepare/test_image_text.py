"""``equimodal prepare sarcasm|twitter15`` on fixture raw trees in the real formats, the loaders, and one
epoch of each ``-tiny`` preset through the CLI."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from equimodal.cli import main
from equimodal.data import load_dataset
from equimodal.data.image_text import SARCASM, TWITTER15
from equimodal.data.image_text.loader import LazyEncoders
from equimodal.prepare import prepare

PIL = pytest.importorskip("PIL.Image")
tokenizers = pytest.importorskip("tokenizers")

WORDS = [
    "a",
    "the",
    "cat",
    "dog",
    "is",
    "on",
    "mat",
    "funny",
    "not",
    "really",
    "great",
    "day",
    "sad",
    "happy",
    "love",
    "this",
    "so",
    "what",
    "oh",
    "wow",
]
SARCASM_TEXTS = ["what a great day", "the cat is on the mat", "oh wow so funny", "i love this", "sad dog"]


def write_image(path: Path, size: tuple[int, int], color: tuple[int, int, int], mode: str = "RGB") -> None:
    """A JPEG (or PNG, by suffix) of one colour with a stripe, so resizing is visible."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    arr[:] = color
    arr[:, : size[0] // 4] = 255 - np.array(color, np.uint8)
    PIL.fromarray(arr).convert(mode).save(path)


def write_tsv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    lines = ["\t".join(header)] + ["\t".join(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def make_tokenizer(folder: Path) -> Path:
    """A WordLevel tokenizer.json built locally ([PAD] 0, [UNK] 1, [CLS] 2, [SEP] 3), lower-casing, < 64 ids."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    path = folder / "tokenizer.json"
    tok.save(str(path))
    return path


def make_sarcasm_raw(root: Path, *, val_name: str = "valid.tsv", bad: bool = True) -> Path:
    """Sarcasm raw tree: train/valid/test tsv (Label, String, ImageID) and images/<id>.jpg.

    With ``bad``: train also holds a missing image, a corrupt jpg, an unknown label and an empty text.
    """
    raw = root / "sarcasm_raw"
    header = ["Label", "String", "ImageID"]
    ids = iter(range(100, 200))
    splits = {"train.tsv": 8, val_name: 4, "test.tsv": 4}
    for name, n in splits.items():
        rows = []
        for i in range(n):
            image_id = str(next(ids))
            color = (30 * (i % 8), 200 - 20 * (i % 8), 90)
            write_image(raw / "images" / f"{image_id}.jpg", (40 + 8 * i, 30), color)
            rows.append([str(i % 2), SARCASM_TEXTS[i % len(SARCASM_TEXTS)], image_id])
        if name == "test.tsv":  # pandas-style quoting: a quoted field with a tab and doubled quotes
            rows[-1][1] = '"so \t ""funny"" day"'
        if bad and name == "train.tsv":
            (raw / "images" / "901.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
            rows += [["1", "no image here", "900"], ["0", "corrupt image", "901"]]
            rows += [["7", "what a label", "100"], ["1", "   ", "101"]]
        write_tsv(raw / name, header, rows)
    return raw


def make_twitter_raw(root: Path) -> Path:
    """Twitter-2015 raw tree in the released format (index, #1 Label, #2 ImageID, #3 String, #3 String)."""
    raw = root / "twitter_raw"
    header = ["index", "#1 Label", "#2 ImageID", "#3 String", "#3 String"]
    serial = iter(range(1000))
    for name, n in {"train.tsv": 6, "dev.tsv": 3, "test.tsv": 3}.items():
        rows = []
        for i in range(n):
            image = f"{name[:3]}{i // 2}.jpg"  # two targets per tweet share one image
            if not (raw / "images" / image).exists():
                write_image(raw / "images" / image, (36, 48), (20 * i, 100, 220 - 20 * i))
            target = ["the cat", "dog"][i % 2]
            rows.append([str(next(serial)), str(i % 3), image, "$T$ is so funny", target])
        write_tsv(raw / name, header, rows)
    return raw


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Both datasets prepared once (and a tokenizer) for the tests that only read them."""
    root = tmp_path_factory.mktemp("image_text")
    out = {"tokenizer": make_tokenizer(root)}
    for name, make in (("sarcasm", make_sarcasm_raw), ("twitter15", make_twitter_raw)):
        out[name] = root / f"{name}_prepared"
        prepare(name, make(root), out[name], workers=2, image_size=24)
    return out


def manifest_rows(out: Path) -> list[dict[str, str]]:
    import csv

    with (out / "manifest.csv").open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------------ prepare
def test_sarcasm_layout_and_bad_inputs_are_reported(prepared: dict[str, Path]) -> None:
    out = prepared["sarcasm"]
    info = json.loads((out / "prepare.json").read_text())
    assert info["dataset"] == "sarcasm" and info["counts"] == {"train": 8, "val": 4, "test": 4}
    assert info["classes"] == ["not_sarcastic", "sarcastic"]
    assert info["columns"]["train.tsv"] == {"label": "Label", "image": "ImageID", "text": "String"}
    skipped = {s["clip"]: s for s in info["skipped"]}
    # header is line 1, the 8 good rows are lines 2-9, then the four bad ones
    assert set(skipped) == {"train-000010", "train-000011", "train-000012", "train-000013"}
    assert (
        "image not found" in skipped["train-000010"]["reason"] and "900" in skipped["train-000010"]["reason"]
    )
    assert (
        "cannot be decoded" in skipped["train-000011"]["reason"]
        and "901.jpg" in skipped["train-000011"]["files"]
    )
    assert "unknown label '7'" in skipped["train-000012"]["reason"]
    assert skipped["train-000013"]["reason"] == "empty text"
    assert all(s["files"].startswith("train.tsv line ") for s in skipped.values())
    rows = manifest_rows(out)
    assert [r["key"] for r in rows][:2] == ["train-000002", "train-000003"]
    first = rows[0]
    assert (out / first["text"]).read_text(encoding="utf-8") == SARCASM_TEXTS[0]
    assert first["image"] == "images/100.jpg" and first["label"] == "not_sarcastic"
    with PIL.open(out / rows[3]["image"]) as im:  # raw 64 x 30 -> shorter side 24
        assert im.mode == "RGB" and im.size == (51, 24)
    assert (out / "splits" / "val.txt").read_text().split() == [r["key"] for r in rows if r["split"] == "val"]
    assert (out / rows[-1]["text"]).read_text(encoding="utf-8") == 'so \t "funny" day'


def test_twitter15_columns_target_and_shared_images(prepared: dict[str, Path]) -> None:
    out = prepared["twitter15"]
    info = json.loads((out / "prepare.json").read_text())
    assert info["counts"] == {"train": 6, "val": 3, "test": 3} and info["skipped"] == []
    assert info["classes"] == ["negative", "neutral", "positive"]
    mapping = info["columns"]["train.tsv"]
    assert (
        mapping["label"] == "#1 Label" and mapping["image"] == "#2 ImageID" and mapping["text"] == "#3 String"
    )
    assert mapping["target"] == "#3 String (column 5)"
    rows = manifest_rows(out)
    texts = [(out / r["text"]).read_text(encoding="utf-8") for r in rows[:2]]
    assert texts == ["the cat is so funny", "dog is so funny"]
    assert [r["label"] for r in rows[:3]] == ["negative", "neutral", "positive"]
    assert rows[0]["image"] == rows[1]["image"] == "images/tra0.jpg"  # one image, prepared once
    assert info["images"]["written"] == len({r["image"] for r in rows}) == 3 + 2 + 2


def test_rerun_resumes_and_refuses_another_image_size(tmp_path: Path) -> None:
    raw = make_sarcasm_raw(tmp_path, val_name="dev.tsv", bad=False)  # dev.tsv is accepted for val
    out = tmp_path / "out"
    first = prepare("sarcasm", raw, out, workers=1, image_size=16)
    again = prepare("sarcasm", raw, out, workers=1, image_size=16)
    assert first["images"]["written"] == 16 and again["images"] == {"written": 0, "reused": 16, "failed": 0}
    assert again["counts"] == first["counts"] == {"train": 8, "val": 4, "test": 4}
    with pytest.raises(ValueError, match="prepared with other settings \\(image_size=16 before"):
        prepare("sarcasm", raw, out, workers=1, image_size=32)


def test_missing_split_file_and_header_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = make_sarcasm_raw(tmp_path, bad=False)
    (raw / "test.tsv").unlink()
    rc = main(["prepare", "sarcasm", "--raw", str(raw), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "no test split file" in err and "test.tsv" in err and "train.tsv, valid.tsv" in err
    write_tsv(raw / "test.tsv", ["Label", "Tweet text", "Picture"], [["1", "x", "100"]])
    with pytest.raises(ValueError, match=r"test.tsv: the header .* no column for \['image', 'text'\]"):
        prepare("sarcasm", raw, tmp_path / "o", workers=1)
    with pytest.raises(FileNotFoundError, match="image_dir"):
        prepare(
            "twitter15", make_twitter_raw(tmp_path), tmp_path / "t", workers=1, image_dir="twitter2015_images"
        )


# ------------------------------------------------------------------------------------------ loaders
def test_loader_reads_token_ids_and_normalised_images(prepared: dict[str, Path]) -> None:
    tok = str(prepared["tokenizer"])
    ds = load_dataset("sarcasm", root=str(prepared["sarcasm"]), tokenizer=tok, max_tokens=8, image_size=20)
    assert ds.modalities == ["text", "image"] and ds.num_classes == 2
    assert (len(ds.train), len(ds.val), len(ds.test)) == (8, 4, 4)
    inputs, label = ds.train[0]
    text, image = inputs["text"], inputs["image"]
    assert text.dtype == torch.long and text.shape == (8,)
    ids = [4 + WORDS.index(w) if w in WORDS else 1 for w in SARCASM_TEXTS[0].split()]
    assert text.tolist() == ids + [0] * (8 - len(ids)) and label == 0  # official: no [CLS] / [SEP]
    with_special = load_dataset(
        "sarcasm", root=str(prepared["sarcasm"]), tokenizer=tok, max_tokens=8, special_tokens=True
    )
    assert with_special.train[0][0]["text"].tolist() == [2, *ids, 3] + [0] * (6 - len(ids))
    assert image.shape == (3, 20, 20) and image.dtype == torch.float32
    right = image[:, 10, -1]  # the uniform colour (0, 200, 90) away from the stripe, normalised
    expected = (torch.tensor([0.0, 200.0, 90.0]) / 255 - torch.tensor(SARCASM.mean)) / torch.tensor(
        SARCASM.std
    )
    torch.testing.assert_close(right, expected, atol=0.08, rtol=0)
    again, _ = ds.train[0]  # no augmentation: the training read is deterministic
    assert torch.equal(again["image"], image)
    reader = pickle.loads(pickle.dumps(ds.train.reader))  # DataLoader workers get a pickled reader
    assert torch.equal(reader(0, None)["text"], text)


def test_twitter15_loader_uses_its_own_statistics(prepared: dict[str, Path]) -> None:
    ds = load_dataset("twitter15", root=str(prepared["twitter15"]), tokenizer=str(prepared["tokenizer"]))
    inputs, _ = ds.val[0]
    assert inputs["text"].shape == (128,) and inputs["image"].shape == (3, 224, 224)
    assert ds.num_classes == 3 and ds.class_names == ["negative", "neutral", "positive"]
    assert ds.info["mean"] == list(TWITTER15.mean) and ds.info["std"] == list(TWITTER15.std)


def test_loader_errors_name_the_fix(prepared: dict[str, Path], tmp_path: Path) -> None:
    root = str(prepared["sarcasm"])
    with pytest.raises(TypeError, match=r"needs option\(s\) \['tokenizer'\]"):
        load_dataset("sarcasm", root=root)
    with pytest.raises(FileNotFoundError, match="data.options.tokenizer=PATH"):
        load_dataset("sarcasm", root=root, tokenizer=str(tmp_path / "nope.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot be loaded as a tokenizer"):
        load_dataset("sarcasm", root=root, tokenizer=str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match="holds a prepared 'sarcasm' dataset, not 'twitter15'"):
        load_dataset("twitter15", root=root, tokenizer=str(prepared["tokenizer"]))
    ds = load_dataset("sarcasm", root=root, tokenizer=str(prepared["tokenizer"]))
    encoders = ds.default_encoders()
    assert isinstance(encoders, LazyEncoders) and list(encoders) == ["text", "image"]
    with pytest.raises(ValueError, match="--set data.options.bert=PATH"):
        encoders["text"]
    encoders["text"] = torch.nn.Identity()  # what a model.encoders override does: the default is never built
    assert list(encoders) == ["text", "image"] and isinstance(encoders["text"], torch.nn.Identity)
    assert encoders["image"].out_dim == 256  # the default resnet50, built on first read


# ------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("name", ["sarcasm", "twitter15"])
def test_tiny_preset_trains_one_epoch_through_the_cli(
    prepared: dict[str, Path], tmp_path: Path, name: str
) -> None:
    run = tmp_path / "run"
    argv = ["train", f"{name}-tiny", "--set", f"data.options.root={prepared[name]}"]
    argv += ["--set", f"data.options.tokenizer={prepared['tokenizer']}", "--set", "train.progress=false"]
    assert main([*argv, "--out", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 1 and 0.0 <= summary["test"]["test_acc"] <= 1.0
    assert summary["modalities"] == ["text", "image"]
