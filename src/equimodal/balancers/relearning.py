"""Diagnosing & Re-learning (Wei, Li, Feng & Hu, "Diagnosing and Re-learning for Balanced Multimodal
Learning", ECCV 2024): soft re-initialisation of each encoder by how much its features over-fit."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..distributed import is_distributed
from ..types import output_features
from .base import Balancer, DriverError, EpochData
from .epoch_data import Split
from .passes import inference
from .registry import register_balancer
from .reinit import BatchNormMode, InitialWeights, OptimizerState, reinitialise

log = logging.getLogger(__name__)


def minmax_scale(x: Tensor) -> Tensor:
    """Each column of ``x`` mapped linearly onto [-1, 1] by its own minimum and maximum.

    As scikit-learn's ``MinMaxScaler(feature_range=(-1, 1)).fit_transform``: a constant column (a range
    below ten float epsilons) keeps a scale of 1, so it maps to -1.
    """
    low, high = x.min(0).values, x.max(0).values
    span = high - low
    span = torch.where(span < 10 * torch.finfo(x.dtype).eps, torch.ones_like(span), span)
    return (x - low) / span * 2 - 1


def _sq_dist(x: Tensor, centers: Tensor) -> Tensor:
    """Squared Euclidean distances ``(N, K)``, never negative."""
    d = (x * x).sum(1, keepdim=True) - 2 * x @ centers.t() + (centers * centers).sum(1)[None, :]
    return d.clamp_min(0)


def kmeans_plusplus(x: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """Greedy k-means++ seeding (scikit-learn's ``_kmeans_plusplus``): ``2 + int(ln k)`` candidates per
    centre, drawn in proportion to the squared distance to the nearest centre; the one that lowers the
    potential most is kept. Random numbers come from the CPU ``generator`` (device independent)."""
    n = x.shape[0]
    trials = 2 + int(math.log(k))
    first = int(torch.randint(n, (1,), generator=generator))
    centers = [x[first]]
    closest = _sq_dist(x, x[first][None]).squeeze(1).double()
    for _ in range(1, k):
        draws = torch.rand(trials, generator=generator, dtype=torch.float64).to(x.device) * closest.sum()
        ids = torch.searchsorted(closest.cumsum(0), draws).clamp_max(n - 1)
        dist_c = torch.minimum(closest[None], _sq_dist(x, x[ids]).t().double())  # (trials, N)
        best = int(dist_c.sum(1).argmin())
        centers.append(x[ids[best]])
        closest = dist_c[best]
    return torch.stack(centers)


def _lloyd(x: Tensor, centers: Tensor, max_iter: int, threshold: float) -> tuple[float, Tensor]:
    """One k-means run from ``centers``: its inertia and labels (scikit-learn's Lloyd loop)."""
    k = centers.shape[0]
    labels = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
    for _ in range(max_iter):
        d = _sq_dist(x, centers)
        new_labels = d.argmin(1)
        counts = torch.bincount(new_labels, minlength=k)
        new = torch.zeros_like(centers).index_add_(0, new_labels, x) / counts.clamp_min(1)[:, None]
        empty = (counts == 0).nonzero().flatten()
        if empty.numel():  # an empty cluster takes the point farthest from its centre
            new[empty] = x[d.gather(1, new_labels[:, None]).squeeze(1).topk(empty.numel()).indices]
        converged = bool(torch.equal(new_labels, labels))
        shift = float((new - centers).square().sum())
        labels, centers = new_labels, new
        if converged or shift <= threshold:
            break
    d = _sq_dist(x, centers)
    labels = d.argmin(1)  # the labels of the final centres
    return float(d.gather(1, labels[:, None]).sum()), labels


def kmeans(
    x: Tensor, k: int, *, seed: int = 0, n_init: int = 1, max_iter: int = 300, tol: float = 1e-4
) -> Tensor:
    """Cluster labels of the rows of ``x``: Lloyd's k-means from k-means++ seeds, the lowest-inertia run of
    ``n_init`` (scikit-learn's ``KMeans(n_clusters=k, random_state=seed)`` algorithm, not its random
    stream). A run stops when no label changes or the centres move (squared, summed) by at most ``tol``
    times the mean feature variance; an empty cluster takes the point farthest from its centre."""
    generator = torch.Generator().manual_seed(int(seed))
    x = x.float()
    threshold = float(x.var(0, unbiased=False).mean()) * tol
    runs = [_lloyd(x, kmeans_plusplus(x, k, generator), max_iter, threshold) for _ in range(n_init)]
    return min(runs, key=lambda run: run[0])[1]


def purity(labels: Tensor, clusters: Tensor) -> Tensor:
    """The fraction of samples whose cluster's majority label is their own label (0-d float64)."""
    _, y = labels.unique(return_inverse=True)
    _, c = clusters.unique(return_inverse=True)
    counts = torch.zeros(int(c.max()) + 1, int(y.max()) + 1, dtype=torch.float64, device=labels.device)
    counts.index_put_((c, y), torch.ones_like(y, dtype=torch.float64), accumulate=True)
    return counts.max(1).values.sum() / labels.numel()


def reinit_strength(purity_train: Tensor, purity_heldout: Tensor, move_lambda: float) -> Tensor:
    """``tanh(move_lambda * |purity_train - purity_heldout|)`` per modality."""
    return torch.tanh(move_lambda * (purity_train - purity_heldout).abs())


def gather_shards(t: Tensor) -> Tensor:
    """Every rank's rows of a split sharded ``rank::world`` (shards may differ in length by one), in the
    split's order, on every rank (identity on one process)."""
    if not is_distributed():
        return t
    world = dist.get_world_size()
    count = torch.tensor([t.shape[0]], device=t.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    padded = t.new_zeros((max(sizes), *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    rows = torch.stack(parts, 1).reshape(max(sizes) * world, *t.shape[1:])
    valid = torch.stack([torch.arange(max(sizes)) < s for s in sizes], 1).reshape(-1)
    return rows[valid.to(t.device)]


@register_balancer("relearning")
class Relearning(Balancer):
    """Diagnosing & Re-learning (Wei, Li, Feng & Hu, ECCV 2024): at a few epochs, each encoder is pulled
    back towards its initial weights by how much its features' cluster structure over-fits.

    Diagnosis, per modality m (official code ``code/ours.py``: ``get_feature``, ``reinit_score``,
    ``purity_score``, ``reinit``, the loop of ``main``): the encoder features ``out.features[m]`` of the
    training split and of the held-out split (eval mode, no gradient: BatchNorm statistics untouched) are
    each min-max scaled to [-1, 1] per dimension (fitted on that split alone) and clustered by k-means
    with ``k`` = the number of classes (k-means++ seeds, seed ``seed`` for every clustering as the code's
    ``random_state=0``); ``purity`` = the fraction of samples whose cluster's majority label is theirs;
    ``g_m = |purity_train - purity_heldout|`` and the strength ``w_m = tanh(move_lambda * g_m)``.
    Re-learning: ``theta_m <- w_m theta_m^init + (1 - w_m) theta_m`` for every trainable parameter of
    encoder m (not the fusion head), ``theta^init`` the weights when the balancer was built.

    Schedule (``ours.py``'s loop, ``script/ours.sh``): the code re-initialises after training epoch
    ``e`` (0-based) with ``e % reinit_epoch == 0 and e > 0``, at most ``reinit_num`` times; here that is
    the start of epochs ``first_reinit + j * reinit_epoch``, ``j < reinit_num``, with ``first_reinit``
    ``None`` meaning the code's ``reinit_epoch + 1`` (epochs 21, 41, 61 by default). Other epochs are plain
    joint training (fused cross-entropy, as the code's ``train_epoch``).

    Defaults (``ours.py`` ``get_arguments`` and ``script/ours.sh``): ``move_lambda=3``,
    ``reinit_epoch=20``, ``reinit_num=3``. k-means follows scikit-learn's ``KMeans`` defaults (k-means++,
    at most 300 iterations, tolerance 1e-4 of the mean feature variance); ``n_init=1`` is scikit-learn's
    ``"auto"`` for k-means++ (versions >= 1.4, current when the code was published; ``n_init=10`` is
    the default of earlier versions, which the code does not pin).

    Deviations (each a named option): the authors diagnose on their validation split; equimodal keeps
    validation for model selection, so the held-out part is ``heldout_fraction`` (0.1) of train, carved by
    the driver and never trained on. ``optimizer_state="keep"`` and ``batchnorm="keep"`` are the authors'
    (momentum and running statistics carry on); ``"reset"`` drops the re-initialised parameters'
    optimizer state (needs ``balancer.check_optimizer(optimizer)``), ``"blend"`` pulls BatchNorm running
    statistics by the same strength (:mod:`~equimodal.balancers.reinit`). Parameters frozen with
    ``requires_grad=False`` are left alone (the code blends every encoder parameter; its models freeze
    none). k-means uses its own random stream, so clusters match scikit-learn's in kind, not bit for bit.

    Under DDP each rank gathers the features of every shard (in the split's order, as sharded
    ``rank::world``), and rank 0's strengths are broadcast, so every rank re-initialises identically.
    Cost per diagnosis: one forward pass over the training split and one over the held-out split, plus
    ``2 M`` k-means runs; about ``reinit_num`` epochs of inference over a whole run. Figures:
    ``strength/<m>`` (the last strengths) every step; each diagnosis (purities, gap, strength) is logged
    and kept in ``diagnoses``.

    Args:
        model: a model whose output carries ``features``.
        move_lambda: the slope of the strength, ``w = tanh(move_lambda * gap)`` (3).
        reinit_epoch: epochs between diagnoses (20).
        reinit_num: number of diagnoses (3).
        first_reinit: the epoch of the first diagnosis; ``None``: ``reinit_epoch + 1`` (the code's).
        heldout_fraction: the part of train held out for the diagnosis (0.1).
        optimizer_state: ``"keep"`` (authors) or ``"reset"``.
        batchnorm: ``"keep"`` (authors) or ``"blend"``.
        n_init: k-means runs per clustering, the lowest inertia kept (1).
        max_iter: k-means iterations at most (300).
        tol: k-means tolerance, relative to the mean feature variance (1e-4).
        num_classes: ``k``; ``None`` reads ``model.num_classes`` (or ``model.fusion.num_classes``).
        start_epoch, end_epoch: the window in which diagnoses may happen.
        seed: the k-means seed.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        move_lambda: float = 3.0,
        reinit_epoch: int = 20,
        reinit_num: int = 3,
        first_reinit: int | None = None,
        heldout_fraction: float = 0.1,
        optimizer_state: OptimizerState = "keep",
        batchnorm: BatchNormMode = "keep",
        n_init: int = 1,
        max_iter: int = 300,
        tol: float = 1e-4,
        num_classes: int | None = None,
        **options: Any,
    ) -> None:
        super().__init__(model, **options)
        opt = self.check_option
        self.move_lambda = opt("move_lambda", move_lambda, low=0, hint="the authors' value is 3")
        self.reinit_epoch = opt("reinit_epoch", reinit_epoch, low=1, integer=True)
        self.reinit_num = opt("reinit_num", reinit_num, low=0, integer=True)
        first = opt("first_reinit", first_reinit, low=0, integer=True, allow_none=True)
        self.first_reinit = self.reinit_epoch + 1 if first is None else first
        self.heldout_fraction = opt(
            "heldout_fraction", heldout_fraction, low=0, high=1, open_low=True, open_high=True,
            hint="the diagnosis compares train with a held-out part of it",
        )  # fmt: skip
        self.optimizer_state = opt("optimizer_state", optimizer_state, choices=("keep", "reset"))
        self.batchnorm = opt("batchnorm", batchnorm, choices=("keep", "blend"))
        self.n_init = opt("n_init", n_init, low=1, integer=True)
        self.max_iter = opt("max_iter", max_iter, low=1, integer=True)
        self.tol = opt("tol", tol, low=0)
        self.num_classes = self._classes(model, num_classes)
        encoders = {m: model.encoders[m] for m in self.modalities}
        self.add_state("initial", InitialWeights(encoders))
        self.add_state("strength", torch.zeros(len(self.modalities)), rollback=False)
        self.add_state("diagnoses", [])  # one dict per diagnosis: epoch, purities, gap, strength

    def _classes(self, model: nn.Module, num_classes: int | None) -> int:
        """``k``: ``num_classes``, else ``model.num_classes`` or ``model.fusion.num_classes``."""
        if num_classes is not None:
            return self.check_option("num_classes", num_classes, low=2, integer=True, allow_none=True)
        fusion = getattr(model, "fusion", None)
        found = getattr(model, "num_classes", None) or getattr(fusion, "num_classes", None)
        if isinstance(found, bool) or not isinstance(found, int) or found < 2:
            raise ValueError(
                f"Balancer {self.name!r} clusters each modality's features into as many clusters as classes; "
                f"it looked for model.num_classes and model.fusion.num_classes and found {found!r}. Set "
                "`model.num_classes = <int>` (2 or more) or pass num_classes=<int>."
            )
        return found

    @property
    def reinit_epochs(self) -> list[int]:
        """The epochs at whose start a diagnosis happens (while the window allows)."""
        return [self.first_reinit + j * self.reinit_epoch for j in range(self.reinit_num)]

    def adjust_gradients(self) -> None:
        """Record the last strengths (the method does not touch gradients)."""
        self.record("strength", self.strength)

    def _features(self, data: EpochData, split: Split) -> tuple[dict[str, Tensor], Tensor]:
        """Every modality's features and the labels of ``split``, gathered over DDP ranks."""
        feats: dict[str, list[Tensor]] = {m: [] for m in self.modalities}
        labels = []
        for out, y, _ in inference(self.model, data, split):
            f = output_features(out, f"{self.name} clusters each modality's encoder features")
            for m in self.modalities:
                feats[m].append(f[m].detach().float().flatten(1))
            labels.append(y)
        empty = not labels
        if is_distributed():  # every rank raises together rather than leave the others waiting
            flag = torch.tensor([float(empty)], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            empty = bool(flag.item())  # once per diagnosis, not per step
        if empty:
            raise ValueError(
                f"{self.name}: EpochData's {split!r} split is empty"
                + (" on at least one rank (it needs a sample per rank)" if is_distributed() else "")
                + "; the diagnosis needs samples."
            )
        y = gather_shards(torch.cat(labels).long())
        if split == "train" and data.size is not None and y.shape[0] > data.size:
            y = y[: data.size]  # a padded DistributedSampler repeats a few samples at the end
        return {m: gather_shards(torch.cat(v))[: y.shape[0]] for m, v in feats.items()}, y

    def _purity(self, x: Tensor, y: Tensor) -> Tensor:
        """The purity of ``k``-means clusters of min-max scaled features ``x`` against labels ``y``."""
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{self.name}: the encoder features hold inf or NaN; they cannot be clustered.")
        k = min(self.num_classes, x.shape[0])
        if k < self.num_classes:
            log.warning(
                "%s: %d samples, fewer than the %d clusters; using %d.", self.name, k, self.num_classes, k
            )
        clusters = kmeans(
            minmax_scale(x), k, seed=self.seed, n_init=self.n_init, max_iter=self.max_iter, tol=self.tol
        )
        return purity(y, clusters)

    def on_epoch_start(self, data: EpochData) -> None:
        """At a diagnosis epoch: measure each modality's purity gap and softly re-initialise its encoder."""
        if self.epoch not in self.reinit_epochs:
            return
        if self.optimizer_state == "reset" and self.optimizer is None:
            raise DriverError(
                f"{self.name} with optimizer_state='reset' drops the optimizer state of the parameters it "
                "re-initialises: call balancer.check_optimizer(optimizer) once after building the optimizer "
                "(found no optimizer)."
            )
        train, y_train = self._features(data, "train")
        held, y_held = self._features(data, "heldout")
        p_train = torch.stack([self._purity(train[m], y_train) for m in self.modalities])
        p_held = torch.stack([self._purity(held[m], y_held) for m in self.modalities])
        figures = torch.stack([p_train, p_held, reinit_strength(p_train, p_held, self.move_lambda)])
        if is_distributed():  # every rank computed the same; rank 0's figures make it certain
            dist.broadcast(figures, 0)
        strength = figures[2].clamp(0, 1)
        for i, m in enumerate(self.modalities):
            reinitialise(
                m, self.model.encoders[m], self.initial, float(strength[i]), optimizer=self.optimizer,
                optimizer_state=self.optimizer_state, batchnorm=self.batchnorm,
            )  # fmt: skip
        self.strength = strength.float().to(self.device)
        row: dict[str, Any] = {"epoch": self.epoch}
        for key, values in zip(("purity_train", "purity_heldout", "strength"), figures.tolist(), strict=True):
            row[key] = dict(zip(self.modalities, values, strict=True))
        row["gap"] = {m: abs(row["purity_train"][m] - row["purity_heldout"][m]) for m in self.modalities}
        self.diagnoses = [*self.diagnoses, row]
        log.info("Re-learning diagnosis %d at epoch %d: %s", len(self.diagnoses), self.epoch, row)
