"""Diagnosing & Re-learning: purity and strength against a re-enactment of the official code, the soft
re-initialisation, its schedule, its options and DDP agreement."""

from __future__ import annotations

import copy
import io
import re

import numpy as np
import pytest
import torch
from conftest import BNEncoder, make_toy_batch, make_toy_model
from torch import nn

import equimodal as em
from equimodal.balancers.relearning import gather_shards, kmeans, minmax_scale, purity, reinit_strength
from equimodal.models.classifier import MultimodalClassifier
from equimodal.testing import drive_step, optimizer_for, toy_epoch_data
from equimodal.types import MultimodalOutput

DIAGNOSE_AT_1 = {"first_reinit": 1, "reinit_epoch": 1}


def official_purity(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """``purity_score`` of the official ``ours.py``, re-enacted: labels renumbered 0..L-1, each cluster votes
    its most frequent label (``np.histogram`` + ``argmax``), purity = accuracy of the voted labels."""
    y_true = y_true.copy()
    labels = np.unique(y_true)
    for k, label in enumerate(labels):
        y_true[y_true == label] = k
    labels = np.unique(y_true)
    bins = np.concatenate((labels, [labels.max() + 1]))
    voted = np.zeros(y_true.shape)
    for cluster in np.unique(y_pred):
        hist, _ = np.histogram(y_true[y_pred == cluster], bins=bins)
        voted[y_pred == cluster] = np.argmax(hist)
    return float((voted == y_true).mean())


@pytest.mark.parametrize("seed", range(5))
def test_purity_equals_the_official_purity_score(seed: int) -> None:
    g = np.random.default_rng(seed)
    y = g.choice([0, 2, 5, 7], size=60)  # labels with gaps, renumbered by the official code
    clusters = g.integers(0, 4, size=60)
    clusters[:20] = 3  # one cluster with a clear majority
    y[:20] = 5
    ours = purity(torch.from_numpy(y), torch.from_numpy(clusters))
    assert float(ours) == pytest.approx(official_purity(y, clusters), abs=1e-12)


def test_strength_is_the_official_tanh_of_lambda_times_the_gap() -> None:
    p_train, p_held = torch.tensor([0.9, 0.5, 0.3], dtype=torch.float64), torch.tensor([0.6, 0.5, 0.45])
    for lam in (3.0, 1.0):
        expected = [
            float(torch.tanh(torch.tensor(lam * np.abs(a - b))))
            for a, b in zip(p_train.tolist(), p_held.double().tolist(), strict=True)
        ]
        got = reinit_strength(p_train, p_held.double(), lam)
        assert got.tolist() == pytest.approx(expected, abs=1e-12)
    assert reinit_strength(p_train, p_held.double(), 3.0)[1] == 0


def test_minmax_scale_equals_sklearn_minmaxscaler_minus_one_to_one() -> None:
    preprocessing = pytest.importorskip("sklearn.preprocessing")
    x = torch.randn(40, 5, generator=torch.Generator().manual_seed(0)) * 3 + 1
    x[:, 2] = 4.0  # a constant column
    expected = preprocessing.MinMaxScaler(feature_range=(-1, 1)).fit_transform(x.double().numpy())
    torch.testing.assert_close(minmax_scale(x.double()), torch.from_numpy(expected))


def _blobs(n: int, k: int, d: int, spread: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, d, generator=g) * spread
    y = torch.arange(k).repeat_interleave(n)
    return centers[y] + torch.randn(n * k, d, generator=g), y


def test_kmeans_finds_separated_clusters_and_is_a_lloyd_fixed_point() -> None:
    x, y = _blobs(30, 4, 6, 10.0, seed=1)
    labels = kmeans(minmax_scale(x), 4, seed=0)
    assert float(purity(y, labels)) == 1.0
    x, _ = _blobs(40, 5, 8, 1.5, seed=2)  # overlapping: the fixed point still holds
    labels = kmeans(x, 5, seed=3)
    means = torch.stack([x[labels == c].mean(0) for c in range(5)])
    assert torch.equal(torch.cdist(x, means).argmin(1), labels)
    assert torch.equal(kmeans(x, 5, seed=3), labels)  # seeded: the same clusters again


def test_kmeans_inertia_is_as_low_as_sklearn_kmeans() -> None:
    cluster = pytest.importorskip("sklearn.cluster")
    x, _ = _blobs(50, 6, 8, 2.0, seed=4)
    x = minmax_scale(x.double()).float()
    ours = kmeans(x, 6, seed=0, n_init=10)
    inertia = sum(float((x[ours == c] - x[ours == c].mean(0)).square().sum()) for c in range(6))
    reference = cluster.KMeans(n_clusters=6, random_state=0, n_init=10).fit(x.numpy()).inertia_
    assert inertia <= reference * 1.02


def _trained(num_modalities: int = 2, steps: int = 3, **options: object):
    """A toy model and its balancer after ``steps`` steps of epoch 0 (weights moved off their init)."""
    model = make_toy_model(num_modalities)
    bal = em.create_balancer("relearning", model, **{**DIAGNOSE_AT_1, **options})
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    bal.check_optimizer(opt)
    bal.start_epoch(0, toy_epoch_data(num_modalities))
    for s in range(steps):
        drive_step(bal, model, *make_toy_batch(num_modalities, 16, seed=s), opt)
    return model, bal, opt


def _features(model: nn.Module, batches: list) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    model.eval()
    with torch.no_grad():
        outs = [(model(b).features, y) for b, y in batches]
    model.train()
    feats = {m: torch.cat([f[m] for f, _ in outs]) for m in outs[0][0]}
    return feats, torch.cat([y for _, y in outs])


def test_diagnosis_reinitialises_each_encoder_by_its_strength_and_leaves_the_head() -> None:
    model, bal, _ = _trained(3)
    initial = {m: {k: v.clone() for k, v in bal.initial.values[m].items()} for m in bal.modalities}
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    data = toy_epoch_data(3)
    train, y_train = _features(model, list(data.train()))
    held, y_held = _features(model, list(data.heldout()))
    bal.start_epoch(1, data)
    (row,) = bal.diagnoses
    assert row["epoch"] == 1
    for i, m in enumerate(bal.modalities):  # the diagnosis, re-enacted from features measured here
        p_tr = purity(y_train, kmeans(minmax_scale(train[m]), 3, seed=bal.seed))
        p_ho = purity(y_held, kmeans(minmax_scale(held[m]), 3, seed=bal.seed))
        assert row["purity_train"][m] == pytest.approx(float(p_tr))
        assert row["purity_heldout"][m] == pytest.approx(float(p_ho))
        w = float(torch.tanh(3 * (p_tr - p_ho).abs()))
        assert row["strength"][m] == pytest.approx(w) and float(bal.strength[i]) == pytest.approx(w)
        for k, p in model.encoders[m].named_parameters():
            old = before[f"encoders.{m}.{k}"]
            torch.testing.assert_close(p.detach(), w * initial[m][k] + (1 - w) * old)
    assert any(v > 0 for v in row["strength"].values())  # the check above is not vacuous
    for k, p in model.named_parameters():
        if not k.startswith("encoders."):
            assert torch.equal(p, before[k]), f"{k} changed"


def test_nothing_happens_outside_the_diagnosis_epochs() -> None:
    model = make_toy_model(2)
    bal = em.create_balancer("relearning", model, first_reinit=1, reinit_epoch=2, reinit_num=2)
    assert bal.reinit_epochs == [1, 3]
    assert em.create_balancer("relearning", make_toy_model(2)).reinit_epochs == [21, 41, 61]  # ours.sh
    opt = optimizer_for(model, bal)
    for epoch in range(6):
        before = {k: v.detach().clone() for k, v in model.named_parameters()}
        bal.start_epoch(epoch, toy_epoch_data(2))
        moved = any(not torch.equal(p, before[k]) for k, p in model.named_parameters())
        assert moved == (epoch in (1, 3)), f"epoch {epoch}"
        drive_step(bal, model, *make_toy_batch(2, 16, seed=epoch), opt)
        assert set(bal.stats()) == {"strength/m0", "strength/m1"}
    assert [d["epoch"] for d in bal.diagnoses] == [1, 3]


def test_steps_are_joint_training() -> None:
    model = make_toy_model(2)
    twin = copy.deepcopy(model)
    bal, none = em.create_balancer("relearning", model), em.create_balancer("none", twin)
    batch, y = make_toy_batch(2)
    bal.start_epoch(0, toy_epoch_data(2))
    none.start_epoch(0)
    assert bal.loss(model(batch), y).item() == none.loss(twin(batch), y).item()


def test_optimizer_state_kept_by_default_and_reset_on_request() -> None:
    model, bal, opt = _trained(2)
    bal.start_epoch(1, toy_epoch_data(2))
    assert all(p in opt.state for p in model.encoders.parameters())  # the authors': momentum carries on
    model, bal, opt = _trained(2, optimizer_state="reset")
    bal.start_epoch(1, toy_epoch_data(2))
    reset = [
        p
        for m in bal.modalities
        if bal.diagnoses[0]["strength"][m] > 0
        for p in model.encoders[m].parameters()
    ]
    assert reset and all(p not in opt.state for p in reset)
    assert all(p in opt.state for p in model.fusion.parameters())


def test_reset_without_the_optimizer_names_the_call() -> None:
    model = make_toy_model(2)
    bal = em.create_balancer("relearning", model, optimizer_state="reset", **DIAGNOSE_AT_1)
    bal.start_epoch(0, toy_epoch_data(2))
    with pytest.raises(em.DriverError, match=r"balancer\.check_optimizer\(optimizer\)"):
        bal.start_epoch(1, toy_epoch_data(2))


@pytest.mark.parametrize("batchnorm", ["keep", "blend"])
def test_batchnorm_statistics_kept_or_blended(batchnorm: str) -> None:
    torch.manual_seed(0)
    model = MultimodalClassifier({"m0": BNEncoder(5), "m1": BNEncoder(6)}, 3)
    bal = em.create_balancer("relearning", model, batchnorm=batchnorm, **DIAGNOSE_AT_1)
    opt = optimizer_for(model, bal)
    bal.start_epoch(0, toy_epoch_data(2))
    for s in range(3):
        drive_step(bal, model, *make_toy_batch(2, 16, seed=s), opt)
    stats = {k: v.clone() for k, v in model.named_buffers() if v.is_floating_point()}
    bal.start_epoch(1, toy_epoch_data(2))  # its passes run in eval mode: BatchNorm statistics untouched
    for k, v in model.named_buffers():
        if not v.is_floating_point():
            continue
        m, key = k.split(".")[1], k.split(".", 2)[2]
        w = bal.diagnoses[0]["strength"][m]
        expected = stats[k] if batchnorm == "keep" else w * bal.initial.values[m][key] + (1 - w) * stats[k]
        torch.testing.assert_close(v, expected)


def test_resumed_balancer_pulls_towards_the_original_initial_weights() -> None:
    model, bal, _ = _trained(2)
    buf = io.BytesIO()
    torch.save(bal.state_dict(), buf)
    buf.seek(0)
    fresh = em.create_balancer("relearning", copy.deepcopy(model), **DIAGNOSE_AT_1)  # init = trained weights
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    for m in bal.modalities:
        for k, v in bal.initial.values[m].items():
            assert torch.equal(fresh.initial.values[m][k], v)
    bal.start_epoch(1, toy_epoch_data(2))
    fresh.start_epoch(1, toy_epoch_data(2))
    assert fresh.diagnoses == bal.diagnoses
    assert all(
        torch.equal(a, b) for a, b in zip(bal.model.parameters(), fresh.model.parameters(), strict=True)
    )


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("move_lambda", -1.0, ">= 0"),
        ("reinit_epoch", 0, ">= 1"),
        ("reinit_num", -1, ">= 0"),
        ("first_reinit", -2, ">= 0"),
        ("heldout_fraction", 0.0, "in (0, 1)"),
        ("optimizer_state", "drop", "one of 'keep', 'reset'"),
        ("batchnorm", "reset", "one of 'keep', 'blend'"),
        ("n_init", 0, ">= 1"),
        ("num_classes", 1, ">= 2"),
    ],
)
def test_bad_options_raise_naming_the_option(option: str, value: object, expected: str) -> None:
    with pytest.raises(
        ValueError,
        match=rf"option '{option}' must be .*{re.escape(expected)}.*found {re.escape(repr(value))}",
    ):
        em.create_balancer("relearning", make_toy_model(2), **{option: value})


def test_a_model_without_class_count_or_features_is_refused() -> None:
    model = make_toy_model(2)
    del model.num_classes
    model.fusion.num_classes = None
    with pytest.raises(ValueError, match=r"model\.num_classes .* num_classes=<int>"):
        em.create_balancer("relearning", model)
    assert em.create_balancer("relearning", model, num_classes=3).num_classes == 3

    class NoFeatures(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner, self.encoders, self.num_classes = inner, inner.encoders, 3

        def forward(self, batch):
            out = self.inner(batch)
            return MultimodalOutput(out.logits, out.unimodal_logits, None)

    bal = em.create_balancer("relearning", NoFeatures(make_toy_model(2)), first_reinit=0)
    with pytest.raises(ValueError, match="features=None"):
        bal.start_epoch(0, toy_epoch_data(2))


def test_too_few_samples_for_the_clusters_use_fewer_clusters(caplog: pytest.LogCaptureFixture) -> None:
    model = make_toy_model(2, num_classes=3)
    bal = em.create_balancer("relearning", model, num_classes=20, first_reinit=0)
    with caplog.at_level("WARNING"):
        bal.start_epoch(0, toy_epoch_data(2))  # 12 held-out samples, 20 clusters asked for
    assert "fewer than the 20 clusters; using 12" in caplog.text
    assert bal.diagnoses[0]["purity_heldout"]["m0"] == 1.0  # one sample per cluster


def _gather_worker(rank: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        shard = torch.arange(rank, 7, 2, dtype=torch.float32)[:, None].repeat(1, 2)  # rank::world of 7 rows
        torch.save(gather_shards(shard), f"{out}/gathered{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_gather_shards_restores_the_split_order_on_every_rank(tmp_path) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gather_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        rows = torch.load(tmp_path / f"gathered{rank}.pt")
        assert rows[:, 0].tolist() == list(range(7)) and rows.shape == (7, 2)


@pytest.mark.ddp
def test_ranks_agree_through_a_diagnosis() -> None:
    em.testing.check_ranks_agree("relearning", 3, DIAGNOSE_AT_1)
