"""The balancer contract suite, for built-in balancers and for your own.

:func:`check_balancer` runs every check below on a balancer (a registered name or a ``Balancer``
subclass) with toy models of 2, 3 and 4 modalities, and raises ``AssertionError`` naming the first
broken promise. The same functions are the project's own contract tests, run over every registered
balancer::

    import equimodal.testing

    equimodal.testing.check_balancer(MyBalancer)                     # or a registered name
    equimodal.testing.check_balancer("unimodal", options=lambda model: {"modality": "m0"})

The checks:

- :func:`check_finite_step`: one step gives finite gradients and parameters and changes the model;
  ``stats()`` maps strings to floats.
- :func:`check_joint_outside_window`: before ``start_epoch`` and after ``end_epoch`` a step is exactly
  joint training.
- :func:`check_state_round_trip`: a fresh balancer loaded from ``state_dict()`` (through
  ``torch.save``/``torch.load(weights_only=True)``) continues identically.
- :func:`check_deterministic`: the same seed gives bit-identical steps.
- :func:`check_accumulation`: k micro-batches give the update of one batch k times larger.
- :func:`check_overflow_tolerated`: a dropped inf/NaN step (an AMP overflow, or a NaN micro-batch that a
  driver skips) does not raise and leaves the next steps finite.
- :func:`check_two_call_loop`: a bare two-call loop (and the README's loop, which adds ``start_epoch`` and
  ``batch=``) either trains exactly as the fully driven method or raises
  :class:`~equimodal.balancers.DriverError` at its first call, naming the call it needs.
- :func:`check_host_reads`: a step that logs nothing reads nothing on the host (``.item()``,
  ``.tolist()``, ``.cpu()``, ``bool(t)``, ...), or at most the ``step_host_reads`` the balancer declares
  for a host decision its method needs by nature.
- :func:`check_epoch_plan`: a balancer that plans its epochs' data, driven by a hand-written loop over
  ``balancer.planned_loader``, trains each planned epoch on exactly the plan's entries (its copies, zeroed
  modalities and weights), refuses a batch that is not from the plan, and restores the plan from its state.
- :func:`check_aux_fusion`: a FiLM model (auxiliary unimodal heads) trains, or is refused at
  construction with a message naming the fusion.
- :func:`check_ranks_agree` (not part of :func:`check_balancer`: it forks two processes): under DDP every
  rank ends with the same parameters and state.

Every check builds the toy model the balancer needs (:func:`toy_model_for`: mid fusion through MMTM
gates for a balancer whose ``model_fusion`` is ``"mmtm"``, such as greedy; late concat fusion otherwise).

:func:`drive_step` is the reference way to drive any balancer for one optimizer step: it reads
``balancer.requirements`` and makes every call the balancer needs. :class:`HostReads` counts host reads
(every one stalls a GPU until its queued work is done) over any block of code.
"""

from __future__ import annotations

import copy
import io
import re
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from .balancers import Balancer, DriverError, EpochData, create_balancer
from .balancers.base import split_batch
from .balancers.plan import INDEX_KEY, PLAN_WEIGHT_KEY, PLAN_ZEROED_KEY
from .balancers.registry import get_balancer_class
from .models import MMTMClassifier, MultimodalClassifier
from .models.encoders import MLP
from .models.mmtm import MMTM_FUSION

BalancerSpec = str | type[Balancer]
Options = Mapping[str, Any] | Callable[[nn.Module], Mapping[str, Any]] | None
Params = dict[str, Tensor]

__all__ = [
    "HostReads",
    "ToyEncoder",
    "check_accumulation",
    "check_aux_fusion",
    "check_balancer",
    "check_deterministic",
    "check_epoch_plan",
    "check_finite_step",
    "check_host_reads",
    "check_joint_outside_window",
    "check_overflow_tolerated",
    "check_ranks_agree",
    "check_state_round_trip",
    "check_two_call_loop",
    "drive_step",
    "planned_batch",
    "start_epoch",
    "toy_batch",
    "toy_epoch_data",
    "toy_model",
    "toy_model_for",
]


class ToyEncoder(nn.Module):
    """Conv1d + Linear encoder, so that conv filters, neurons and biases all exist."""

    def __init__(self, in_dim: int, out_dim: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * in_dim, out_dim)
        self.out_dim = out_dim

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.fc(torch.relu(self.conv(x.unsqueeze(1))).flatten(1)))


def toy_model(
    num_modalities: int = 2, num_classes: int = 3, fusion: str = "concat", seed: int = 0
) -> MultimodalClassifier | MMTMClassifier:
    """A toy classifier with modalities ``m0 .. m{M-1}`` of input sizes 5, 6, 7, ...

    ``fusion="mmtm"`` gives mid fusion instead: two-stage MLP encoders (8 units per stage) with an MMTM
    gate after each stage (:class:`~equimodal.models.MMTMClassifier`).
    """
    torch.manual_seed(seed)
    if fusion == MMTM_FUSION:
        mlps = {f"m{i}": MLP(5 + i, hidden=(8, 8)) for i in range(num_modalities)}
        return MMTMClassifier(mlps, num_classes, gates=(1, 2))
    encoders = {f"m{i}": ToyEncoder(5 + i) for i in range(num_modalities)}
    return MultimodalClassifier(encoders, num_classes, fusion=fusion)


def toy_model_for(spec: BalancerSpec, num_modalities: int = 2) -> nn.Module:
    """:func:`toy_model` with the fusion the balancer needs (its ``model_fusion``; concat otherwise)."""
    cls = get_balancer_class(spec) if isinstance(spec, str) else spec
    return toy_model(num_modalities, fusion=cls.model_fusion or "concat")


def toy_batch(
    num_modalities: int = 2, batch_size: int = 16, num_classes: int = 3, seed: int = 0
) -> tuple[dict[str, Tensor], Tensor]:
    """A batch whose label is encoded in every modality, more strongly in later ones (losses can fall)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (batch_size,), generator=g)
    batch = {}
    for i in range(num_modalities):
        x = torch.randn(batch_size, 5 + i, generator=g)
        x[:, 0] += (1.0 + i) * y.float()
        batch[f"m{i}"] = x
    return batch, y


def toy_epoch_data(num_modalities: int = 2) -> EpochData:
    """Epoch data over two toy training batches and one held-out batch; ``indexed`` is the same 32
    training samples in a fixed order, with their indices (``size=32``)."""
    train = [toy_batch(num_modalities, 16, seed=11), toy_batch(num_modalities, 16, seed=12)]
    heldout = [toy_batch(num_modalities, 12, seed=13)]
    indexed = []
    for k, (inputs, y) in enumerate(train):
        n = y.shape[0]
        extra = {INDEX_KEY: torch.arange(k * n, (k + 1) * n), PLAN_WEIGHT_KEY: torch.ones(n)}
        indexed.append(({**inputs, **extra}, y))
    return EpochData(
        train=lambda: iter(train), heldout=lambda: iter(heldout), device=torch.device("cpu"),
        indexed=lambda: iter(indexed), size=32,
    )  # fmt: skip


def planned_batch(
    balancer: Balancer, batch: Mapping[str, Tensor], target: Tensor
) -> tuple[dict[str, Tensor], Tensor]:
    """``batch`` as a planned loader would hand it to a balancer that plans its data (others: unchanged).

    Without a plan each sample keeps its place, gains its index and weight 1. With one, position j holds the
    plan's entry j (cycling when the plan is shorter than the batch): the batch's sample at the entry's
    index modulo the batch size, with the entry's modalities zeroed and its weight.
    """
    if not balancer.requirements.epoch_plan or PLAN_WEIGHT_KEY in batch:
        return dict(batch), target
    n = target.shape[0]
    plan = balancer.epoch_plan
    if plan is None:
        return {**batch, INDEX_KEY: torch.arange(n), PLAN_WEIGHT_KEY: torch.ones(n)}, target
    entries = torch.arange(n) % len(plan)
    where = plan.indices[entries] % n
    zeroed = plan.zeroed_at(entries)
    out: dict[str, Tensor] = {}
    for j, m in enumerate(plan.modalities):
        x = batch[m][where]
        cut = zeroed[:, j].to(x.device).view(-1, *([1] * (x.dim() - 1)))
        out[m] = torch.where(cut, torch.zeros_like(x), x)
    out[INDEX_KEY] = plan.indices[entries]
    out[PLAN_WEIGHT_KEY] = torch.ones(n) if plan.weights is None else plan.weights[entries]
    out[PLAN_ZEROED_KEY] = zeroed
    return out, target[where]


def build(spec: BalancerSpec, model: nn.Module, options: Options = None, **extra: Any) -> Balancer:
    """Build ``spec`` (a name or a class) for ``model`` with ``options`` (a mapping or ``model -> mapping``)."""
    opts = dict(options(model) if callable(options) else (options or {}))
    opts.update(extra)
    return create_balancer(spec, model, **opts) if isinstance(spec, str) else spec(model, **opts)


def start_epoch(balancer: Balancer, epoch: int, data: EpochData | None = None) -> None:
    """:meth:`~equimodal.Balancer.start_epoch` with ``data``, toy epoch data by default."""
    balancer.start_epoch(epoch, data if data is not None else toy_epoch_data(len(balancer.modalities)))


def optimizer_for(model: nn.Module, balancer: Balancer, lr: float = 0.1) -> torch.optim.Optimizer:
    """Plain SGD over the model's and the balancer's own parameters."""
    return torch.optim.SGD([*model.parameters(), *balancer.parameters()], lr=lr)


def drive_step(
    balancer: Balancer,
    model: nn.Module,
    batch: Mapping[str, Tensor],
    target: Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    micro_batches: int = 1,
) -> Params:
    """One optimizer step making every call ``balancer.requirements`` asks for.

    Returns the gradients as handed to the optimizer (empty for balancers that own their step). A balancer
    that plans its data gets the batch through :func:`planned_batch`.
    """
    batch, target = planned_batch(balancer, batch, target)
    if balancer.requirements.own_step:
        balancer.train_step(batch, target, optimizer, micro_batches=micro_batches)
        return {}
    optimizer.zero_grad(set_to_none=True)
    n = target.shape[0]
    for chunk, y in split_batch(batch, target, micro_batches):
        (balancer.loss(model(chunk), y, batch=chunk) * (y.shape[0] / n)).backward()
    balancer.before_step()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    optimizer.step()
    return grads


def snapshot(model: nn.Module, balancer: Balancer) -> Params:
    """Copies of the model's and the balancer's own parameters."""
    out = {n: p.detach().clone() for n, p in model.named_parameters()}
    out.update({f"balancer.{i}": p.detach().clone() for i, p in enumerate(balancer.parameters())})
    return out


def assert_same(
    a: Mapping[str, Tensor], b: Mapping[str, Tensor], *, exact: bool = False, what: str = ""
) -> None:
    """Assert two dicts of tensors hold the same keys and (to float tolerance, or exactly) the same values."""
    assert a.keys() == b.keys(), f"{what}: different tensors {sorted(set(a) ^ set(b))}"
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), f"{what}: {k} differs"
        else:
            torch.testing.assert_close(
                a[k], b[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{what}: {k}: {m}"
            )


def _one_step(
    balancer: Balancer, model: nn.Module, num: int, *, epoch: int = 0, seed: int = 1, prepare: bool = True
) -> tuple[Params, Params]:
    batch, y = toy_batch(num, 16, seed=seed)
    if prepare:
        start_epoch(balancer, epoch)
    grads = drive_step(balancer, model, batch, y, optimizer_for(model, balancer))
    return grads, snapshot(model, balancer)


def check_finite_step(spec: BalancerSpec, num_modalities: int = 2, options: Options = None) -> None:
    """One step: finite gradients and parameters, some parameter changed, ``stats()`` of str -> float."""
    model = toy_model_for(spec, num_modalities)
    balancer = build(spec, model, options)
    before = snapshot(model, balancer)
    grads, params = _one_step(balancer, model, num_modalities)
    assert all(bool(torch.isfinite(g).all()) for g in grads.values()), "non-finite gradient after a step"
    assert all(bool(torch.isfinite(p).all()) for p in params.values()), "non-finite parameter after a step"
    assert any(not torch.equal(before[n], params[n]) for n in params), "the step changed no parameter"
    stats = balancer.stats()
    assert all(isinstance(k, str) and isinstance(v, float) for k, v in stats.items()), f"stats(): {stats}"


def check_joint_outside_window(spec: BalancerSpec, num_modalities: int = 2, options: Options = None) -> None:
    """Before its ``start_epoch`` and after its ``end_epoch`` a balancer's step equals joint training exactly."""
    for window, epoch in (({"start_epoch": 3}, 1), ({"start_epoch": 0, "end_epoch": 1}, 2)):
        model = toy_model_for(spec, num_modalities)
        twin = copy.deepcopy(model)
        balancer = build(spec, model, options, **window)
        grads, params = _one_step(balancer, model, num_modalities, epoch=epoch)
        ref_grads, ref_params = _one_step(create_balancer("none", twin), twin, num_modalities, epoch=epoch)
        where = f"in epoch {epoch}, outside the window {window}"
        if grads:
            assert_same(grads, ref_grads, what=f"gradients {where}")
        own = {k: v for k, v in params.items() if not k.startswith("balancer.")}
        assert_same(own, ref_params, what=f"parameters {where}")


def check_state_round_trip(spec: BalancerSpec, num_modalities: int = 2, options: Options = None) -> None:
    """A fresh balancer loaded from ``state_dict()`` continues exactly as the original."""
    model = toy_model_for(spec, num_modalities)
    first = build(spec, model, options, seed=5)
    _one_step(first, model, num_modalities, seed=1)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    twin = copy.deepcopy(model)
    fresh = build(spec, twin, options, seed=5)
    fresh.load_state_dict(state)
    assert fresh.epoch == first.epoch and fresh.num_steps == first.num_steps, "epoch/steps not restored"
    grads, params = _one_step(first, model, num_modalities, seed=2, prepare=False)
    grads2, params2 = _one_step(fresh, twin, num_modalities, seed=2, prepare=False)
    assert_same(grads, grads2, what="gradients after load_state_dict")
    assert_same(params, params2, what="parameters after load_state_dict")


def check_deterministic(spec: BalancerSpec, num_modalities: int = 2, options: Options = None) -> None:
    """Two balancers with the same seed take bit-identical steps."""
    model = toy_model_for(spec, num_modalities)
    twin = copy.deepcopy(model)
    grads, params = _one_step(build(spec, model, options, seed=7), model, num_modalities)
    grads2, params2 = _one_step(build(spec, twin, options, seed=7), twin, num_modalities)
    assert_same(grads, grads2, exact=True, what="same seed")
    assert_same(params, params2, exact=True, what="same seed")


def check_accumulation(
    spec: BalancerSpec, num_modalities: int = 2, options: Options = None, micro_batches: int = 2
) -> None:
    """Three steps with k micro-batches per step give the updates of three steps on one batch k times larger.

    Each micro-batch's loss is weighted by its share of the samples, as in :func:`drive_step`. A
    balancer whose loss depends on statistics of each micro-batch (``micro_batch_statistics``, e.g.
    PMR's weak-modality choice) can only match when every micro-batch has the whole batch's
    statistics, so for it the larger batch is k copies of one micro-batch.
    """
    model = toy_model_for(spec, num_modalities)
    twin = copy.deepcopy(model)
    whole, split = build(spec, model, options, seed=3), build(spec, twin, options, seed=3)
    opt_whole, opt_split = optimizer_for(model, whole), optimizer_for(twin, split)
    start_epoch(whole, 0)
    start_epoch(split, 0)
    for step in range(3):
        batch, y = toy_batch(num_modalities, 16, seed=20 + step)
        if whole.micro_batch_statistics:
            part, y_part = toy_batch(num_modalities, 16 // micro_batches, seed=20 + step)
            batch = {m: x.repeat(micro_batches, *([1] * (x.dim() - 1))) for m, x in part.items()}
            y = y_part.repeat(micro_batches)
        g1 = drive_step(whole, model, batch, y, opt_whole)
        g2 = drive_step(split, twin, batch, y, opt_split, micro_batches=micro_batches)
        assert_same(g1, g2, what=f"gradients of step {step} with {micro_batches} micro-batches")
        assert_same(snapshot(model, whole), snapshot(twin, split), what=f"parameters after step {step}")


def check_overflow_tolerated(spec: BalancerSpec, num_modalities: int = 2, options: Options = None) -> None:
    """A step that is dropped for inf/NaN passes ``before_step`` and leaves the next steps finite.

    Two such steps: an AMP overflow (one gradient holds inf; the ``GradScaler`` skips the step) and a
    micro-batch whose inputs, hence logits, loss and gradients, hold NaN (what the reference trainer's
    ``on_nonfinite="skip"`` drops: it sets the gradients to NaN and calls ``before_step`` without an
    optimizer step). Either way the balancer must not raise, and must not carry what it saw into the
    next steps: their gradients and parameters stay finite.
    """
    for scenario in ("overflow", "nan_batch"):
        model = toy_model_for(spec, num_modalities)
        balancer = build(spec, model, options)
        if balancer.requirements.own_step:
            return  # an owned step runs no GradScaler path and is never skipped by a driver
        start_epoch(balancer, 0)
        batch, y = planned_batch(balancer, *toy_batch(num_modalities, 16, seed=1))  # a plan made at epoch 0
        out = model(batch)
        if scenario == "nan_batch":  # the first sample's logits are NaN, as if its inputs were
            poison = torch.ones(16, 1).index_fill_(0, torch.tensor([0]), float("nan"))
            out = out._replace(
                logits=out.logits * poison,
                unimodal_logits={m: v * poison for m, v in out.unimodal_logits.items()},
            )
        balancer.loss(out, y, batch=batch).backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if scenario == "overflow":
            next(model.encoders[balancer.modalities[0]].parameters()).grad.fill_(float("inf"))
        else:
            torch._foreach_mul_(grads, float("nan"))
        balancer.before_step()  # must not raise: this step is dropped
        model.zero_grad(set_to_none=True)
        for seed in (2, 3):
            grads_after, params = _one_step(balancer, model, num_modalities, seed=seed, prepare=False)
            assert all(bool(torch.isfinite(g).all()) for g in grads_after.values()), (
                f"non-finite gradient {seed - 1} step(s) after a dropped step ({scenario})"
            )
            assert all(bool(torch.isfinite(p).all()) for p in params.values()), (
                f"non-finite parameter {seed - 1} step(s) after a dropped step ({scenario})"
            )


_NEEDED_CALL = re.compile(r"train_step\(|start_epoch\(|set_epoch\(|prepare_epoch\(|batch=")


def _loop(balancer: Balancer, model: nn.Module, num: int, style: str, calls: list[int] | None = None) -> None:
    """Two epochs of two steps of a hand-written loop: ``"bare"``, ``"readme"`` or ``"driven"``.

    ``calls`` (a one-element list) counts the balancer calls that returned.
    """
    opt = optimizer_for(model, balancer)
    calls = calls if calls is not None else [0]
    for epoch in range(2):
        if style == "driven":
            start_epoch(balancer, epoch)
        elif style == "readme":
            balancer.start_epoch(epoch)
        for step in range(2):
            batch, y = toy_batch(num, 16, seed=100 * epoch + step)
            if style == "driven":
                drive_step(balancer, model, batch, y, opt)
                continue
            out = model(batch)
            loss = balancer.loss(out, y, batch=batch) if style == "readme" else balancer.loss(out, y)
            calls[0] += 1
            loss.backward()
            balancer.before_step()
            calls[0] += 1
            opt.step()
            opt.zero_grad()


def check_two_call_loop(spec: BalancerSpec, num_modalities: int = 2, options: Options = None) -> str:
    """A bare two-call loop and the README's loop either equal the fully driven method or raise at once.

    Returns ``"honoured"`` when both loops train exactly as :func:`drive_step` does, or names the
    loops that were refused (``"refused: bare"``, ``"refused: bare, readme"``).
    """
    refused = []
    for style in ("bare", "readme"):
        model = toy_model_for(spec, num_modalities)
        twin = copy.deepcopy(model)
        balancer = build(spec, model, options, seed=3)
        calls = [0]
        try:
            _loop(balancer, model, num_modalities, style, calls)
        except DriverError as err:
            assert calls[0] == 0, f"{style} loop: refused only after {calls[0]} calls ({err})"
            assert _NEEDED_CALL.search(str(err)), (
                f"{style} loop: the error does not name the call needed: {err}"
            )
            refused.append(style)
            continue
        reference = build(spec, twin, options, seed=3)
        _loop(reference, twin, num_modalities, "driven")
        assert_same(
            snapshot(model, balancer), snapshot(twin, reference), exact=True,
            what=f"{style} loop against the fully driven method",
        )  # fmt: skip
    return f"refused: {', '.join(refused)}" if refused else "honoured"


def check_aux_fusion(spec: BalancerSpec, options: Options = None) -> bool:
    """A FiLM model trains (finite), or construction is refused with a ``ValueError`` naming the fusion.

    Returns whether the balancer accepted the model.
    """
    model = toy_model(2, fusion="film")
    try:
        balancer = build(spec, model, options)
    except ValueError as err:
        assert "fusion" in str(err).lower(), f"refusal of a FiLM model does not name the fusion: {err}"
        return False
    grads, params = _one_step(balancer, model, 2)
    assert all(bool(torch.isfinite(t).all()) for t in [*grads.values(), *params.values()]), (
        "non-finite (FiLM)"
    )
    return True


# ------------------------------------------------------------------------------------------ host reads
HOST_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")
"""The ``Tensor`` methods :class:`HostReads` counts: each copies device memory to the host."""

SYNC_OPS = frozenset(
    ("_local_scalar_dense", "nonzero", "masked_select", "_unique", "_unique2", "unique_dim",
     "unique_consecutive", "equal", "is_nonzero", "lift_fresh")
)  # fmt: skip
"""Operators the host waits for: those whose output size or value it needs (also boolean-mask indexing),
and ``lift_fresh``, a tensor built from host values (``torch.tensor(...)``, ``t.new_tensor(...)``), whose
copy to a GPU waits for the queued work (``torch.full``/``new_full`` fill on the device instead)."""


def _bool_index(args: tuple[Any, ...]) -> bool:
    indices = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()
    return any(isinstance(t, Tensor) and t.dtype in (torch.bool, torch.uint8) for t in indices)


class _SyncOps(TorchDispatchMode):
    """Sees the operators that synchronise with the host, however they were reached (no ``Tensor`` method)."""

    def __init__(self, reads: HostReads) -> None:
        super().__init__()
        self.reads = reads

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        name = func._overloadpacket.__name__
        bool_index = name in ("index", "index_put", "index_put_") and _bool_index(args)
        if self.reads.depth == 0 and (name in SYNC_OPS or bool_index):
            self.reads.add(f"aten.{name}")
        return func(*args, **(kwargs or {}))


class HostReads:
    """Count host reads while the block runs: ``with HostReads() as reads: ...``; then ``reads.calls``.

    On a GPU every read of a device value on the host (``.item()``, ``.tolist()``, ``.cpu()``, ``.numpy()``,
    ``bool(t)``, ``float(t)``, ``int(t)``, ``t.__index__()``, ``torch.nonzero``, a boolean-mask index, ...)
    waits for all queued work, and so does a tensor built from host values (``torch.tensor(...)``: its copy
    to the GPU), so a training step should make none. This wraps those ``Tensor`` methods
    with counters and watches the operators that synchronise (:data:`SYNC_OPS`) with a dispatch mode (a
    dispatch mode alone misses ``tolist`` and ``cpu``). It works on the CPU, where nothing actually waits,
    so the tests that use it need no GPU. Not re-entrant; the methods are restored on exit.

    Attributes:
        calls: one entry per read, ``"Tensor.item at ogm.py:120 (adjust_gradients)"``: what was called and
            the innermost caller outside torch.
    """

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.depth = 0
        self._saved: dict[str, Any] = {}
        self._mode: _SyncOps | None = None

    def add(self, what: str) -> None:
        """Record one read of ``what`` with its caller."""
        torch_dir = str(Path(torch.__file__).parent)
        frames = [f for f in traceback.extract_stack()[:-1] if f.filename != __file__]
        caller = next((f for f in reversed(frames) if not f.filename.startswith(torch_dir)), None)
        where = f" at {Path(caller.filename).name}:{caller.lineno} ({caller.name})" if caller else ""
        self.calls.append(what + where)

    def _wrap(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def counted(tensor: Tensor, *args: Any, **kwargs: Any) -> Any:
            if self.depth == 0:
                self.add(f"Tensor.{name}")
            self.depth += 1
            try:
                return original(tensor, *args, **kwargs)
            finally:
                self.depth -= 1

        counted.host_reads = self  # type: ignore[attr-defined]
        return counted

    def __enter__(self) -> HostReads:
        if hasattr(torch.Tensor.item, "host_reads"):
            raise RuntimeError("HostReads blocks cannot be nested: one counts every read already.")
        for name in HOST_METHODS:
            if name in vars(torch.Tensor):
                self._saved[name] = vars(torch.Tensor)[name]
            setattr(torch.Tensor, name, self._wrap(name, getattr(torch.Tensor, name)))
        self._mode = _SyncOps(self)
        self._mode.__enter__()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._mode is not None:
            self._mode.__exit__(kind, error, tb)
        for name in HOST_METHODS:
            if name in self._saved:
                setattr(torch.Tensor, name, self._saved[name])
            else:
                delattr(torch.Tensor, name)
        self._saved.clear()


def step_host_reads(
    balancer: Balancer,
    model: nn.Module,
    batch: Mapping[str, Tensor],
    target: Tensor,
    optimizer: torch.optim.Optimizer,
) -> list[str]:
    """The host reads of one optimizer step that logs nothing (no ``stats()``).

    Counted: ``loss``, ``backward`` and ``before_step`` (the model's forward and ``optimizer.step()`` are
    the user's); for a balancer that owns its step, the whole ``train_step``.
    """
    batch, target = planned_batch(balancer, batch, target)
    if balancer.requirements.own_step:
        with HostReads() as reads:
            balancer.train_step(batch, target, optimizer)
        return reads.calls
    optimizer.zero_grad(set_to_none=True)
    out = model(batch)
    with HostReads() as reads:
        balancer.loss(out, target, batch=batch).backward()
        balancer.before_step()
    optimizer.step()
    return reads.calls


def check_host_reads(spec: BalancerSpec, num_modalities: int = 2, options: Options = None) -> int:
    """A step that logs nothing reads the host at most ``balancer.step_host_reads`` times (0 unless the method
    declares a host decision of its own); returns the count.

    Measured at the fourth step: the first ``loss()`` reads the labels' range once, and heads of the
    balancer's own are compared with the model at the second step to find an optimizer that does not
    hold them. The toy model's own input check (``validate_inputs``: a read per modality in every
    forward, the balancer's extra forwards included) is off, as in the reference trainer's models.
    """
    model = toy_model_for(spec, num_modalities)
    model.validate_inputs = False
    balancer = build(spec, model, options)
    start_epoch(balancer, 0)
    optimizer = optimizer_for(model, balancer)
    for seed in range(3):
        drive_step(balancer, model, *toy_batch(num_modalities, 16, seed=seed), optimizer)
    reads = step_host_reads(balancer, model, *toy_batch(num_modalities, 16, seed=3), optimizer)
    budget = balancer.step_host_reads
    assert len(reads) <= budget, (
        f"{len(reads)} host read(s) in a step that logs nothing, {budget} declared (step_host_reads): "
        + "; ".join(reads)
    )
    return len(reads)


# ------------------------------------------------------------------------------------------ DDP ranks
def _same(a: Any, b: Any, where: str) -> None:
    """Assert two state values (tensors, plain data, nested) are identical."""
    if isinstance(a, Tensor) and isinstance(b, Tensor):  # bit-identical; NaN (e.g. an EMA not started) too
        same = a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))
        assert same and torch.equal(a.isnan(), b.isnan()), f"{where} differs between the ranks"
    elif isinstance(a, Mapping) and isinstance(b, Mapping):
        assert a.keys() == b.keys(), f"{where}: different entries {sorted(set(a) ^ set(b), key=str)}"
        for k in a:
            _same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where} differs between the ranks: {a!r} and {b!r}"


def _rank_worker(
    rank: int, spec: BalancerSpec, num_modalities: int, options: Options, world_size: int, folder: str
) -> None:
    """One DDP rank of :func:`check_ranks_agree`: two epochs of two steps on data of its own, then save."""
    import gc

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=world_size)
    try:
        model = toy_model_for(spec, num_modalities)
        balancer = build(spec, model, options, seed=3)
        req = balancer.requirements
        wrapped = DistributedDataParallel(model, find_unused_parameters=req.unused_parameters)
        optimizer = optimizer_for(model, balancer)
        for epoch in range(2):
            start_epoch(balancer, epoch)
            for step in range(2):
                batch, y = toy_batch(num_modalities, 8, seed=1000 * rank + 10 * epoch + step)
                batch, y = planned_batch(balancer, batch, y)  # a balancer that plans its data gets its plan
                if req.own_step:  # the owned step averages the gradients over ranks itself
                    balancer.train_step(batch, y, optimizer)
                    continue
                optimizer.zero_grad(set_to_none=True)
                balancer.loss(wrapped(batch), y, batch=batch).backward()
                balancer.before_step()
                optimizer.step()
        result = {"params": snapshot(model, balancer), "state": balancer.state_dict()}
        torch.save(result, Path(folder) / f"rank{rank}.pt")
        del wrapped  # a DDP wrapper that outlives its gloo group can abort the process at exit
    finally:
        gc.collect()
        dist.destroy_process_group()


def check_ranks_agree(
    spec: BalancerSpec, num_modalities: int = 2, options: Options = None, world_size: int = 2
) -> None:
    """Under DDP every rank ends with the same parameters and balancer state.

    ``world_size`` processes (gloo, on the CPU) train a DDP-wrapped toy model for two epochs of two steps,
    each rank on data of its own, as under torchrun. DDP averages the gradients; what a balancer measures
    on its own shard must be all-reduced (a declared statistic is) and its random draws must agree
    (``self.generator``), or the ranks drift apart. The processes are forked (Linux), so a balancer class
    defined in a script, a notebook or a test works as well as a registered name.
    """
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as folder:
        args = (spec, num_modalities, options, world_size, folder)
        mp.start_processes(_rank_worker, args=args, nprocs=world_size, join=True, start_method="fork")
        results = [torch.load(Path(folder) / f"rank{r}.pt", weights_only=True) for r in range(world_size)]
    for r, other in enumerate(results[1:], 1):
        assert_same(
            results[0]["params"], other["params"], exact=True, what=f"parameters of rank {r} and rank 0"
        )
        _same(results[0]["state"], other["state"], f"state_dict() of rank {r} and rank 0")


def toy_samples(num_modalities: int = 2) -> list[dict[str, Tensor]]:
    """The 32 training samples of :func:`toy_epoch_data`, one mapping each (modalities and ``"label"``)."""
    samples = []
    for inputs, y in toy_epoch_data(num_modalities).batches("train"):
        for i in range(y.shape[0]):
            samples.append({**{m: x[i] for m, x in inputs.items()}, "label": y[i]})
    return samples


def check_epoch_plan(
    spec: BalancerSpec, num_modalities: int = 2, options: Options = None, max_epochs: int = 12
) -> str:
    """A planner's epochs train on exactly its plan through ``planned_loader``; others: ``"no plan"``.

    Drives a hand-written loop over :func:`toy_samples` (``planned_loader`` built once, the indexed split
    from ``indexed_loader``) for up to ``max_epochs`` epochs, until two planned epochs have passed. In each
    planned epoch the batches hold as many entries as the plan, with as many zeroed rows per modality and
    the same total weight; a batch that is not from the plan raises ``DriverError``; a fresh balancer
    loaded from the state holds the same plan. Returns what it saw (``"planned epochs [1, 2]: 40 entries"``).
    """
    model = toy_model_for(spec, num_modalities)
    balancer = build(spec, model, options)
    if not balancer.requirements.epoch_plan:
        return "no plan"
    from .balancers.plan import indexed_loader

    samples = toy_samples(num_modalities)
    loader = balancer.planned_loader(samples, batch_size=8)
    data = EpochData(
        train=loader, heldout=toy_epoch_data(num_modalities).heldout, device=torch.device("cpu"),
        indexed=indexed_loader(samples, batch_size=16), size=len(samples),
    )  # fmt: skip
    opt = optimizer_for(model, balancer)
    planned: list[int] = []
    entries = 0
    for epoch in range(max_epochs):
        balancer.start_epoch(epoch, data)
        plan = balancer.epoch_plan
        count, zeroed, weight = 0, torch.zeros(num_modalities), 0.0
        for batch in loader:
            y = batch.pop("label")
            count += y.shape[0]
            for j, m in enumerate(balancer.modalities):
                zeroed[j] += float((batch[m].flatten(1).abs().sum(1) == 0).sum())
            weight += float(batch[PLAN_WEIGHT_KEY].sum())
            drive_step(balancer, model, batch, y, opt)
        if plan is None:
            assert count == len(samples), f"epoch {epoch} without a plan trained on {count} of {len(samples)}"
            continue
        planned.append(epoch)
        entries = len(plan)
        assert count == len(plan), f"epoch {epoch}: {count} samples trained, the plan has {len(plan)} entries"
        if plan.zeroed is not None:
            expected = plan.zeroed.sum(0).float()
            assert torch.equal(zeroed, expected), (
                f"epoch {epoch}: zeroed rows {zeroed.tolist()}, plan {expected.tolist()}"
            )
        total = float(plan.weights.sum()) if plan.weights is not None else float(len(plan))
        assert abs(weight - total) < 1e-3 * max(1.0, total), (
            f"epoch {epoch}: weights sum {weight}, plan {total}"
        )
        inputs, y = toy_batch(num_modalities, 8)
        try:
            balancer.loss(model(inputs), y, batch=inputs)
        except DriverError:
            pass
        else:
            raise AssertionError(f"epoch {epoch}: a batch that is not from the plan was accepted")
        twin = build(spec, toy_model_for(spec, num_modalities), options)
        buffer = io.BytesIO()
        torch.save(balancer.state_dict(), buffer)
        buffer.seek(0)
        twin.load_state_dict(torch.load(buffer, weights_only=True))
        assert twin.epoch_plan is not None and torch.equal(twin.epoch_plan.indices, plan.indices), (
            f"epoch {epoch}: the plan did not survive state_dict()/load_state_dict()"
        )
        if len(planned) == 2:
            break
    assert planned, f"no epoch was planned in {max_epochs} epochs (a warm-up longer than that?)"
    return f"planned epochs {planned}: {entries} entries"


CHECKS: dict[str, Callable[..., Any]] = {
    "finite_step": check_finite_step,
    "joint_outside_window": check_joint_outside_window,
    "state_round_trip": check_state_round_trip,
    "deterministic": check_deterministic,
    "accumulation": check_accumulation,
    "overflow_tolerated": check_overflow_tolerated,
    "two_call_loop": check_two_call_loop,
    "epoch_plan": check_epoch_plan,
    "host_reads": check_host_reads,
}


def check_balancer(
    spec: BalancerSpec, *, options: Options = None, modalities: Sequence[int] = (2, 3, 4)
) -> dict[str, Any]:
    """Run the whole contract suite on ``spec`` for each number of modalities; returns what each check said.

    Raises:
        AssertionError: naming the check, the number of modalities and what broke.
    """
    results: dict[str, Any] = {}
    for num in modalities:
        for name, check in CHECKS.items():
            try:
                results[f"{name}/M{num}"] = check(spec, num, options)
            except AssertionError as err:
                raise AssertionError(f"{name} with {num} modalities: {err}") from err
    results["aux_fusion"] = check_aux_fusion(spec, options)
    return results
