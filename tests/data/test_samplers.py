"""The samplers and loader options: per-epoch shuffles, DDP shards, mid-epoch resume, evaluation order."""

from __future__ import annotations

import torch

from equimodal.data.base import EvalSampler, LoaderOptions, TensorSplit, TrainSampler, make_loader


def _order(sampler: TrainSampler) -> list[int]:
    return [k.index for k in sampler]


def test_train_sampler_reshuffles_per_epoch_and_repeats_for_a_seed() -> None:
    s = TrainSampler(10, seed=3)
    first = _order(s)
    assert sorted(first) == list(range(10))
    s.set_epoch(1)
    second = _order(s)
    assert sorted(second) == list(range(10)) and second != first
    s.set_epoch(0)
    assert _order(s) == first  # the same epoch gives the same order
    assert _order(TrainSampler(10, seed=4)) != first
    assert all(k.epoch == 0 for k in s)


def test_train_sampler_shards_cover_the_epoch_with_wrapped_padding() -> None:
    shards = [TrainSampler(10, seed=1, rank=r, world_size=3) for r in range(3)]
    orders = [_order(s) for s in shards]
    assert [len(o) for o in orders] == [4, 4, 4] and all(len(s) == 4 for s in shards)
    whole = _order(TrainSampler(10, seed=1))
    padded = whole + whole[:2]  # 12 = 3 x 4: the first two samples repeat, as DistributedSampler does
    assert [padded[r::3] for r in range(3)] == orders


def test_train_sampler_resumes_mid_epoch_then_runs_whole_epochs() -> None:
    s = TrainSampler(10, seed=2)
    s.set_epoch(5)
    whole = _order(s)
    s.set_epoch(5, start=4)
    assert len(s) == 6 and _order(s) == whole[4:]
    assert len(s) == 10  # the skip applies to one pass only
    again = _order(s)
    assert sorted(again) == list(range(10))  # a further pass in the same epoch: a new order


def test_eval_sampler_and_loader_keep_every_sample_once_in_order() -> None:
    assert [list(EvalSampler(7, r, 2)) for r in range(2)] == [[0, 2, 4, 6], [1, 3, 5]]
    assert len(EvalSampler(7, 1, 2)) == 3
    split = TensorSplit({"a": torch.arange(7.0)[:, None]}, torch.arange(7) % 2)
    loader = make_loader(split, 3)
    batches = [x["a"].flatten().tolist() for x, _ in loader]
    assert batches == [[0, 1, 2], [3, 4, 5], [6]]  # the last, short batch is kept


def test_loader_options_reach_the_dataloader() -> None:
    split = TensorSplit({"a": torch.arange(8.0)[:, None]}, torch.arange(8) % 2)
    opts = LoaderOptions(num_workers=2, pin_memory=False, persistent_workers=True, prefetch_factor=3)
    loader = make_loader(split, 4, train=True, seed=1, options=opts)
    assert (loader.num_workers, loader.persistent_workers, loader.prefetch_factor) == (2, True, 3)
    assert loader.worker_init_fn is not None
    plain = make_loader(split, 4, train=True, seed=1)
    loader.sampler.set_epoch(1)
    plain.sampler.set_epoch(1)
    with_workers = [x["a"].flatten().tolist() for x, _ in loader]
    assert with_workers == [x["a"].flatten().tolist() for x, _ in plain]  # workers change nothing


def test_drop_last_applies_to_training_only() -> None:
    split = TensorSplit({"a": torch.arange(7.0)[:, None]}, torch.arange(7) % 2)
    train = make_loader(split, 3, train=True, seed=0, drop_last=True)
    assert [len(y) for _, y in train] == [3, 3]
    assert [len(y) for _, y in make_loader(split, 3, drop_last=True)] == [3, 3, 1]  # evaluation keeps all
