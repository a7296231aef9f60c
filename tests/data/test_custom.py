"""Bring-your-own data: .npz and CSV round trips in the documented layouts, and every bad input's message."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_csv

from equimodal.data import load_dataset
from equimodal.data.base import make_loader
from equimodal.data.custom import default_encoder_spec, encode_labels


def _toy_arrays(n: int = 60, classes: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    label = np.arange(n) % classes
    return {
        "audio": rng.normal(size=(n, 13)) + label[:, None],
        "video": rng.normal(size=(n, 1, 6, 6)),
        "label": label,
    }


def _toy_csv(path: Path, n: int = 30, split: bool = False, label_names: bool = False) -> Path:
    rng = np.random.default_rng(1)
    audio = [f"audio_{i}" for i in range(12)]  # audio_10, audio_11 sort after audio_9
    header = ["label", *[f"video_{i}" for i in range(3)], *audio] + (["split"] if split else [])
    rows = []
    for r in range(n):
        y = r % 3
        row: list[object] = [["cat", "dog", "eel"][y] if label_names else y]
        row += [f"{v:.5f}" for v in rng.normal(size=3)]
        row += [f"{r * 100 + i}" for i in range(12)]
        if split:
            row.append(("train", "train", "val", "test")[r % 4])
        rows.append(row)
    return write_csv(path, header, rows)


# ---------------------------------------------------------------- npz


def test_npz_round_trip_with_string_split(tmp_path: Path) -> None:
    arrays = _toy_arrays()
    split = np.array(["train", "val", "test"] * 20)
    path = tmp_path / "d.npz"
    np.savez(path, **arrays, split=split)
    with pytest.warns(UserWarning, match=r"class 0 \(20 samples\): none in val or test"):  # label r % 3
        ds = load_dataset("custom_npz", path=str(path), standardize=False)
    assert ds.modalities == ["audio", "video"] and ds.num_classes == 3 and ds.class_names is None
    assert ds.input_shapes() == {"audio": (13,), "video": (1, 6, 6)}
    assert (len(ds.train), len(ds.val), len(ds.test)) == (20, 20, 20)
    np.testing.assert_allclose(ds.val.inputs["audio"].numpy(), arrays["audio"][1::3], rtol=1e-6)
    assert torch.equal(ds.test.labels, torch.from_numpy(arrays["label"][2::3]))
    enc = ds.default_encoders()
    batch, _ = next(iter(make_loader(ds.train, 4)))
    assert {m: e(batch[m]).shape[0] for m, e in enc.items()} == {"audio": 4, "video": 4}
    assert type(enc["video"]).__name__ == "ConvEncoder"


def test_npz_int_split_and_modality_selection(tmp_path: Path) -> None:
    arrays = _toy_arrays()
    path = tmp_path / "d.npz"
    np.savez(path, **arrays, split=np.arange(60) % 3)
    with pytest.warns(UserWarning, match="leaves classes out of some splits"):
        ds = load_dataset("custom_npz", path=path, modalities="video,audio")
    assert ds.modalities == ["video", "audio"]
    assert len(ds.train) == 20
    x = ds.train.inputs["audio"].double()
    torch.testing.assert_close(x.mean(0), torch.zeros(13, dtype=torch.float64), atol=1e-5, rtol=0)


def test_npz_without_split_is_stratified_by_seed(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, **_toy_arrays())
    a = load_dataset("custom_npz", path=path, seed=0)
    b = load_dataset("custom_npz", path=path, seed=0)
    c = load_dataset("custom_npz", path=path, seed=1)
    assert (len(a.train), len(a.val), len(a.test)) == (36, 12, 12)
    assert torch.equal(torch.bincount(a.val.labels), torch.full((3,), 4))
    assert torch.equal(a.train.inputs["audio"], b.train.inputs["audio"])
    assert not torch.equal(a.train.inputs["audio"], c.train.inputs["audio"])
    assert "stratified" in str(a.info["split"])


def test_npz_string_labels_are_mapped_and_named(tmp_path: Path) -> None:
    arrays = _toy_arrays()
    names = np.array(["neutral", "angry", "happy"])[arrays.pop("label")]
    path = tmp_path / "d.npz"
    np.savez(path, **arrays, label=names)
    ds = load_dataset("custom_npz", path=path)
    assert ds.class_names == ["angry", "happy", "neutral"] and ds.num_classes == 3


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"label": None}, ValueError, r"has no 'label' array \(found \['audio', 'video'\]\)"),
        (
            {"video": np.zeros((59, 4))},
            ValueError,
            r"one row per label \(60 labels\), found rows \{'audio': 60, 'video': 59\}",
        ),
        (
            {"label": np.arange(60) % 3 + 1},
            ValueError,
            r"exactly 0..C-1 for C = 3 classes, found values \[1, 2, 3\]",
        ),
        ({"label": np.zeros(60)}, ValueError, "at least 2 classes"),
        ({"label": np.linspace(0, 1, 60)}, ValueError, "non-integer or non-finite float"),
        ({"split": np.array(["train", "dev", "test"] * 20)}, ValueError, r"found \['dev'\]"),
        ({"split": np.array(["train", "test"] * 30)}, ValueError, r"leaves \['val'\] empty"),
        ({"audio": np.full((60, 2), np.nan)}, ValueError, "'audio' holds 120 non-finite values"),
        ({"audio": np.array(["a"] * 60)}, TypeError, "'audio' must be numeric"),
    ],
)
def test_npz_bad_inputs(tmp_path: Path, change: dict, error: type[Exception], message: str) -> None:
    arrays = {**_toy_arrays(), **change}
    path = tmp_path / "bad.npz"
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    with pytest.raises(error, match=message):
        load_dataset("custom_npz", path=path)


def test_npz_missing_file_and_unknown_modality(tmp_path: Path) -> None:
    with pytest.raises(
        FileNotFoundError, match=r"No \.npz file at .*nope\.npz.*one \(N, \.\.\.\) array per modality"
    ):
        load_dataset("custom_npz", path=tmp_path / "nope.npz")
    path = tmp_path / "d.npz"
    np.savez(path, **_toy_arrays())
    with pytest.raises(
        ValueError, match=r"Modalities \['text'\] are not in .*available: \['audio', 'video'\]"
    ):
        load_dataset("custom_npz", path=path, modalities=["audio", "text"])
    np.savez(tmp_path / "only.npz", label=np.arange(6) % 2)
    with pytest.raises(ValueError, match="found no modality data"):
        load_dataset("custom_npz", path=tmp_path / "only.npz")
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(ValueError, match="Could not read .* as an .npz archive"):
        load_dataset("custom_npz", path=tmp_path / "junk.npz")


def test_npz_object_arrays_get_a_fix(tmp_path: Path) -> None:
    arrays = _toy_arrays()
    arrays["label"] = np.array(["a", "b", "c"] * 20, dtype=object)
    np.savez(tmp_path / "obj.npz", **arrays)
    with pytest.raises(ValueError, match="dtype=str"):
        load_dataset("custom_npz", path=tmp_path / "obj.npz")


def test_standardize_must_be_a_bool(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", **_toy_arrays())
    with pytest.raises(TypeError, match="option 'standardize': expected true or false, found int 2"):
        load_dataset("custom_npz", path=tmp_path / "d.npz", standardize=2)
    with pytest.raises(
        TypeError, match="option 'standardize': expected true or false, found the string 'maybe'"
    ):
        load_dataset("custom_npz", path=tmp_path / "d.npz", standardize="maybe")
    assert (
        load_dataset("custom_npz", path=tmp_path / "d.npz", standardize="no").info["options"]["standardize"]
        is False
    )
    # 1 and 0 (YAML reads `--set data.options.standardize=1` as the integer) mean what "1" and "0" mean
    assert (
        load_dataset("custom_npz", path=tmp_path / "d.npz", standardize=0).info["options"]["standardize"]
        is False
    )


def test_too_few_rows_for_a_split(tmp_path: Path) -> None:
    np.savez(tmp_path / "tiny.npz", a=np.zeros((4, 2)), b=np.zeros((4, 2)), label=np.array([0, 1, 0, 1]))
    with pytest.raises(ValueError, match="too few for a train/val/test split"):
        load_dataset("custom_npz", path=tmp_path / "tiny.npz")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"val_fraction": 0.0}, r"`val_fraction` in \(0, 1\)"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "below 1"),
    ],
)
def test_bad_fractions(tmp_path: Path, options: dict[str, float], message: str) -> None:
    np.savez(tmp_path / "d.npz", **_toy_arrays())
    with pytest.raises(ValueError, match=message):
        load_dataset("custom_npz", path=tmp_path / "d.npz", **options)


# ---------------------------------------------------------------- csv


def test_csv_round_trip_groups_by_prefix_in_index_order(tmp_path: Path) -> None:
    path = _toy_csv(tmp_path / "d.csv", split=True)
    ds = load_dataset("custom_csv", path=path, standardize=False)
    assert set(ds.modalities) == {"video", "audio"}
    assert ds.input_shapes() == {"video": (3,), "audio": (12,)}
    assert (len(ds.train), len(ds.val), len(ds.test)) == (16, 7, 7)
    first = ds.train.inputs["audio"][0].tolist()
    assert first == [float(i) for i in range(12)]  # row 0: audio_i = i, ordered numerically
    assert ds.info["options"]["modalities"]["audio"][-3:] == ["audio_9", "audio_10", "audio_11"]
    enc = ds.default_encoders()
    assert type(enc["audio"]).__name__ == "MLP"


def test_csv_explicit_groups_string_labels_and_seeded_split(tmp_path: Path) -> None:
    path = _toy_csv(tmp_path / "d.csv", label_names=True)
    ds = load_dataset("custom_csv", path=path, modalities="sound=audio_,picture=video_", seed=3)
    assert ds.modalities == ["sound", "picture"] and ds.class_names == ["cat", "dog", "eel"]
    assert (len(ds.train), len(ds.val), len(ds.test)) == (18, 6, 6)
    ds2 = load_dataset(
        "custom_csv", path=path, modalities={"audio": "audio_", "video": ["video_2", "video_0"]}
    )
    assert ds2.input_shapes() == {"audio": (12,), "video": (2,)}
    ds3 = load_dataset("custom_csv", path=path, modalities="audio,video", seed=3)
    assert torch.equal(ds3.train.inputs["audio"], ds.train.inputs["sound"])


def test_csv_integer_split_column(tmp_path: Path) -> None:
    rows = [[r % 2, r, -r, r % 3] for r in range(12)]
    path = write_csv(tmp_path / "d.csv", ["label", "a_0", "b_0", "split"], rows)
    ds = load_dataset("custom_csv", path=path, standardize=False)
    assert ds.test.inputs["a"].flatten().tolist() == [2.0, 5.0, 8.0, 11.0]


@pytest.mark.parametrize(
    ("header", "rows", "options", "error", "message"),
    [
        (
            ["y", "a_0", "b_0"],
            [[0, 1, 2]],
            {},
            ValueError,
            r"has no 'label' column \(columns: \['y', 'a_0', 'b_0'\]\)",
        ),
        (["label", "a_0", "b_0"], [[0, 1, 2], [1, 2]], {}, ValueError, r"line 3: 2 fields, expected 3"),
        (
            ["label", "a_0", "b_0"],
            [[0, 1, ""], [1, 2, 3]],
            {},
            ValueError,
            r"line 2, column 'b_0': expected a number, found ''",
        ),
        (
            ["label", "a_0", "age"],
            [[0, 1, 2]],
            {},
            ValueError,
            r"column\(s\) \['age'\] do not look like <modality>_<index>",
        ),
        (
            ["label", "a_0", "b_0"],
            [[0, 1, 2]],
            {"modalities": "a=a_,c=c_"},
            ValueError,
            r"modality 'c' matches no column \(prefix 'c_'\)",
        ),
        (
            ["label", "a_0", "ab_0"],
            [[0, 1, 2]],
            {"modalities": "x=a,y=ab"},
            ValueError,
            r"column 'ab_0' is claimed by both 'x' and 'y'",
        ),
        (
            ["label", "a_0", "b_0"],
            [[0, 1, 2]],
            {"modalities": {"a": ["a_0", "a_9"]}},
            ValueError,
            r"lists missing column\(s\) \['a_9'\]",
        ),
        (["label", "a_0", "a_0"], [[0, 1, 2]], {}, ValueError, r"duplicate column name\(s\) \['a_0'\]"),
        (["label", "a_0", "b_0"], [], {}, ValueError, "header but no data rows"),
        (["label", "a_0", "b_0"], [[5, 1, 2], [7, 2, 3]], {}, ValueError, r"found values \[5, 7\]"),
        (
            ["label", "a_0", "b_0"],
            [[0, 1, 2]],
            {"modalities": 3},
            TypeError,
            "Expected `modalities` as a mapping",
        ),
    ],
)
def test_csv_bad_inputs(tmp_path: Path, header, rows, options, error: type[Exception], message: str) -> None:
    path = write_csv(tmp_path / "bad.csv", header, rows)
    with pytest.raises(error, match=message):
        load_dataset("custom_csv", path=path, **options)


def test_csv_missing_and_empty_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"No CSV file at .*missing\.csv.*a `label` column"):
        load_dataset("custom_csv", path=tmp_path / "missing.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="is empty; expected a header row"):
        load_dataset("custom_csv", path=tmp_path / "empty.csv")


# ---------------------------------------------------------------- helpers


def test_encode_labels() -> None:
    codes, names = encode_labels(np.array([b"b", b"a", b"b"]))
    assert codes.tolist() == [1, 0, 1] and names == ["a", "b"]
    codes, names = encode_labels(np.array([1.0, 0.0, 2.0]))
    assert codes.tolist() == [1, 0, 2] and names is None
    with pytest.raises(ValueError, match=r"shape \(N,\)"):
        encode_labels(np.zeros((2, 2), dtype=np.int64))


def test_default_encoder_spec() -> None:
    assert default_encoder_spec((7,)) == ("mlp", {"in_dim": 7, "hidden": (64,)})
    assert default_encoder_spec((13, 20)) == ("conv1d", {"in_channels": 13})
    assert default_encoder_spec((3, 8, 8)) == ("cnn", {"in_channels": 3})
    assert default_encoder_spec((2, 3, 4, 5))[0] == "mlp"


def test_csv_error_reports_the_file_line_after_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "gap.csv"
    path.write_text("label,a_0,b_0\n0,1,2\n\n1,x,3\n")
    with pytest.raises(ValueError, match=r"line 4, column 'a_0': expected a number, found 'x'"):
        load_dataset("custom_csv", path=path)


# ---------------------------------------------------------------- classes, typos, bad cells, scalars


def _rows_with_labels(labels: list[object]) -> list[list[object]]:
    return [[y, float(i), float(-i)] for i, y in enumerate(labels)]


def test_a_class_of_one_sample_without_a_split_is_refused(tmp_path: Path) -> None:
    labels = ["cat"] * 10 + ["dog"] * 10 + ["eel"]
    path = write_csv(tmp_path / "d.csv", ["label", "a_0", "b_0"], _rows_with_labels(labels))
    with pytest.raises(ValueError) as err:
        load_dataset("custom_csv", path=path)
    message = str(err.value)
    assert "class 'eel' (1 sample): none in val or test" in message
    assert "at least 4 samples" in message and "'split' column" in message
    assert "cat" not in message  # only the classes that are too small are named
    arrays = {"a": np.zeros((21, 2)), "label": np.array([0] * 10 + [1] * 10 + [2])}
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(ValueError, match=r"class 2 \(1 sample\): none in val or test"):
        load_dataset("custom_npz", path=tmp_path / "d.npz")
    arrays["label"] = np.array([0] * 10 + [1] * 9 + [2] * 2)  # 2 samples: train and test, no val
    np.savez(tmp_path / "d2.npz", **arrays)
    with pytest.raises(ValueError, match=r"class 2 \(2 samples\): none in val"):
        load_dataset("custom_npz", path=tmp_path / "d2.npz")


def test_a_class_missing_from_a_chosen_split_is_allowed_with_a_warning(tmp_path: Path) -> None:
    labels = ["cat"] * 10 + ["dog"] * 10 + ["eel"]
    rows = [[*r, s] for r, s in zip(_rows_with_labels(labels), ["train", "val", "test"] * 7, strict=True)]
    path = write_csv(tmp_path / "d.csv", ["label", "a_0", "b_0", "split"], rows)
    with pytest.warns(UserWarning, match=r"class 'eel' \(1 sample\): none in train or val\. A class missing"):
        ds = load_dataset("custom_csv", path=path)
    assert ds.class_names == ["cat", "dog", "eel"] and len(ds.test) == 7


def test_a_lone_column_near_another_prefix_is_a_typo(tmp_path: Path) -> None:
    header = ["label", *[f"audio_{i}" for i in range(13)], "audoi_0", "video_0", "video_1"]
    rows = [[r % 2, *range(13), 1, 2, r] for r in range(20)]
    path = write_csv(tmp_path / "d.csv", header, rows)
    with pytest.raises(ValueError) as err:
        load_dataset("custom_csv", path=path)
    message = str(err.value)
    assert "column 'audoi_0' is the only column with prefix 'audoi_', close to 'audio_'" in message
    assert "(13 column(s) audio_0..audio_12)" in message
    assert "Rename it (e.g. to 'audio_13')" in message and "modalities=" in message
    ds = load_dataset(
        "custom_csv", path=path, modalities={"audio": "audio_", "audoi": ["audoi_0"], "video": "video_"}
    )
    assert ds.input_shapes() == {"audio": (13,), "audoi": (1,), "video": (2,)}
    # one-column modalities whose names are not alike stay accepted
    ok = write_csv(
        tmp_path / "ok.csv", ["label", "age_0", "video_0", "video_1"], [[r % 2, r, 1, 2] for r in range(20)]
    )
    assert load_dataset("custom_csv", path=ok).input_shapes() == {"age": (1,), "video": (2,)}
    alike = write_csv(
        tmp_path / "alike.csv", ["label", "sensor1_0", "sensor2_0"], [[r % 2, r, -r] for r in range(20)]
    )
    assert load_dataset("custom_csv", path=alike).input_shapes() == {"sensor1": (1,), "sensor2": (1,)}


def test_a_nan_cell_is_named_by_line_and_column(tmp_path: Path) -> None:
    rows = [[r % 2, r, r, r] for r in range(20)]
    rows[6][3] = "inf"
    rows[4][2] = "nan"
    rows[4][3] = "NaN"
    rows[9][1] = "nan"
    path = write_csv(tmp_path / "d.csv", ["label", "a_0", "b_0", "b_1"], rows)
    # data row 4 is file line 6 (the header is line 1); a_0 belongs to another modality than b_0
    with pytest.raises(
        ValueError,
        match=r"line 6, column 'b_0': found 'nan', a non-finite value \(NaN or inf\); 4 such cell\(s\) in 3 "
        r"row\(s\) in all .*Fill or impute them",
    ):
        load_dataset("custom_csv", path=path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"audio": np.float64(3.0)},
            r"'audio' is a scalar \(0-d array, value 3\.0\) where an array of 60 rows",
        ),
        ({"label": np.int64(1)}, r"'label' is a scalar \(0-d array, value 1\) where an array of N rows"),
        (
            {"split": np.array("train")},
            r"'split' is a scalar \(0-d array, value 'train'\) where an array of 60",
        ),
    ],
)
def test_a_scalar_in_an_npz_is_named_as_such(tmp_path: Path, change: dict, message: str) -> None:
    np.savez(tmp_path / "d.npz", **{**_toy_arrays(), **change})
    with pytest.raises(ValueError, match=message):
        load_dataset("custom_npz", path=tmp_path / "d.npz")


# ---------------------------------------------------------------- missing labels, repeated rows


def test_a_missing_label_in_a_csv_is_named_by_line(tmp_path: Path) -> None:
    labels: list[object] = ["cat", "dog"] * 8 + ["nan", "", "NaN", "<NA>"]
    path = write_csv(tmp_path / "d.csv", ["label", "a_0", "b_0"], _rows_with_labels(labels))
    with pytest.raises(ValueError) as err:
        load_dataset("custom_csv", path=path)
    message = str(err.value)
    assert (
        "d.csv' line(s) 18, 19, 20, 21: the 'label' cell is empty or a missing value ('nan' in line 18"
        in message
    )
    assert "Give every line its label" in message


@pytest.mark.parametrize(
    "labels",
    [
        np.array(["cat", "dog", "eel", "nan"] * 15),
        np.where(np.arange(60) % 4 == 3, np.nan, np.arange(60) % 3),
    ],
)
def test_a_missing_label_in_an_npz_is_named_by_row(tmp_path: Path, labels: np.ndarray) -> None:
    np.savez(tmp_path / "d.npz", **{**_toy_arrays(), "label": labels})
    with pytest.raises(
        ValueError, match=r"custom_npz row\(s\) 3, 7, 11, .* and 5 more: the 'label' cell is empty or"
    ):
        load_dataset("custom_npz", path=tmp_path / "d.npz")


def test_repeated_csv_rows_are_an_error_unless_allowed(tmp_path: Path) -> None:
    rows = _rows_with_labels(["cat", "dog"] * 10)
    rows += [
        ["dog", 3.0, -3.0],
        ["cat", "2", "-2.0"],
    ]  # the features of lines 5 and 4 again, written otherwise
    path = write_csv(tmp_path / "d.csv", ["label", "a_0", "b_0"], rows)
    with pytest.raises(ValueError) as err:
        load_dataset("custom_csv", path=path)
    message = str(err.value)
    assert "d.csv' lines 5 and 22 hold the same value in every feature column" in message
    assert "1 more repeated line(s): 23." in message and "allow_duplicates=true" in message
    ds = load_dataset("custom_csv", path=path, allow_duplicates=True)
    assert len(ds.train) + len(ds.val) + len(ds.test) == 22
