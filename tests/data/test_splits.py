"""Split helpers: stratified, disjoint, covering, deterministic by seed; clear errors on bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from equimodal.data.splits import (
    check_seed,
    make_splits,
    per_class_count_split,
    split_from_assignment,
    standardize_array,
    stratified_split,
)


def _check_partition(parts: tuple[np.ndarray, ...], n: int) -> None:
    allidx = np.concatenate(parts)
    assert np.array_equal(np.sort(allidx), np.arange(n)), "splits must cover every index exactly once"
    for p in parts:
        assert np.array_equal(p, np.sort(p))


@settings(max_examples=30, deadline=None)
@given(
    counts=st.lists(st.integers(min_value=1, max_value=40), min_size=2, max_size=6),
    seed=st.integers(min_value=0, max_value=10_000),
)
def test_stratified_split_partitions_and_keeps_class_proportions(counts: list[int], seed: int) -> None:
    labels = np.repeat(np.arange(len(counts)), counts)
    np.random.default_rng(0).shuffle(labels)
    parts = stratified_split(labels, (0.6, 0.2, 0.2), seed)
    _check_partition(parts, labels.size)
    for c, n in enumerate(counts):
        n_train = int(np.sum(labels[parts[0]] == c))
        n_val = int(np.sum(labels[parts[1]] == c))
        assert n_train == min(n, round(0.6 * n))
        assert n_val == min(n - n_train, round(0.2 * n))


def test_stratified_split_is_deterministic_and_seed_dependent() -> None:
    labels = np.repeat(np.arange(5), 30)
    a = stratified_split(labels, (0.6, 0.2, 0.2), 3)
    b = stratified_split(labels, (0.6, 0.2, 0.2), 3)
    c = stratified_split(labels, (0.6, 0.2, 0.2), 4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize("fractions", [(0.5, 0.5), (0.7, 0.2, 0.2), (1.2, -0.1, -0.1)])
def test_stratified_split_rejects_bad_fractions(fractions: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="three non-negative split fractions"):
        stratified_split(np.zeros(10, dtype=np.int64), fractions, 0)


def test_stratified_split_rejects_non_integer_labels() -> None:
    with pytest.raises(TypeError, match="integer class labels"):
        stratified_split(np.array([0.5, 1.5]), (0.6, 0.2, 0.2), 0)


def test_per_class_count_split_sizes_and_determinism() -> None:
    labels = np.repeat(np.arange(3), [110, 120, 105])
    a = per_class_count_split(labels, 60, 40, 7)
    _check_partition(a, labels.size)
    assert [a[0].size, a[1].size, a[2].size] == [180, 120, labels.size - 300]
    for c in range(3):
        assert np.sum(labels[a[0]] == c) == 60 and np.sum(labels[a[1]] == c) == 40
    b = per_class_count_split(labels, 60, 40, np.random.default_rng(7))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[0], per_class_count_split(labels, 60, 40, 8)[0])


def test_per_class_count_split_needs_enough_samples() -> None:
    with pytest.raises(ValueError, match="Class 1 has 5 samples"):
        per_class_count_split(np.repeat([0, 1], [20, 5]), 3, 2, 0)


def test_split_from_assignment_strings_and_ints() -> None:
    s = np.array(["train", "val", "test", " Train", "test"])
    tr, va, te = split_from_assignment(s)
    assert tr.tolist() == [0, 3] and va.tolist() == [1] and te.tolist() == [2, 4]
    tr2, va2, te2 = split_from_assignment(np.array([0, 1, 2, 0, 2]))
    assert tr2.tolist() == tr.tolist() and va2.tolist() == va.tolist() and te2.tolist() == te.tolist()


@pytest.mark.parametrize(
    ("split", "message"),
    [
        (np.array(["train", "valid", "test"]), "must be 'train', 'val' or 'test'; found \\['valid'\\]"),
        (np.array([0, 1, 3]), "must be 0 \\(train\\), 1 \\(val\\) or 2 \\(test\\); found \\[3\\]"),
        (np.array(["train", "test"]), "leaves \\['val'\\] empty"),
        (np.array([0.0, 1.0, 2.0]), "strings or ints 0/1/2"),
    ],
)
def test_split_from_assignment_errors(split: np.ndarray, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        split_from_assignment(split)


def test_check_seed() -> None:
    assert check_seed(np.int64(3)) == 3
    with pytest.raises(TypeError, match="non-negative int"):
        check_seed("1")
    with pytest.raises(TypeError, match="non-negative int"):
        check_seed(True)
    with pytest.raises(ValueError, match="non-negative int"):
        check_seed(-1)


def test_standardize_uses_train_rows_only() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(50, 4))
    x[:, 3] = 1.0  # constant feature: centred, not divided by zero
    train = np.arange(30)
    z = standardize_array(x, train)
    assert z.dtype == np.float32
    np.testing.assert_allclose(z[train, :3].mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(z[train, :3].std(0), 1.0, atol=1e-5)
    assert np.all(z[:, 3] == 0)
    expected = (x[30:, 0] - x[train, 0].mean()) / x[train, 0].std()
    np.testing.assert_allclose(z[30:, 0], expected, rtol=1e-5)


def test_make_splits_builds_tensor_splits() -> None:
    x = np.arange(20, dtype=np.float64).reshape(10, 2)
    y = np.arange(10) % 2
    idx = (np.array([0, 1, 2, 3]), np.array([4, 5]), np.array([6, 7, 8, 9]))
    train, val, test = make_splits({"a": x}, y, idx)
    assert len(train) == 4 and len(val) == 2 and len(test) == 4
    assert train.inputs["a"].dtype.is_floating_point and train.labels.dtype.is_signed
    assert val.inputs["a"][0].tolist() == [8.0, 9.0]
