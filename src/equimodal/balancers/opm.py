"""OPM and OGM+: on-the-fly prediction and gradient modulation (Wei, Hu, Du and Wen, "On-the-fly
Modulation for Balanced Multimodal Learning", T-PAMI 2024; the journal version of OGM).

OPM acts in the forward pass: each step it drops the dominant modality's feature for a random part of
the batch before the fusion, with a probability that grows with how far that modality leads. OGM+ is
the code's ``--use_OGM_plus`` gradient variant: the weak modality's encoder gradients are multiplied by a
constant (4). The pure math (:func:`opm_drop_probabilities`, :func:`opm_theta`, :func:`opm_drop`,
:func:`ogm_plus_coefficients`) is kept in small functions.

Official code (GeWu-Lab/BML_TPAMI2024): ``code/models/Classifier.py`` (``custom_autograd`` l.9-21,
``Modality_drop.execute_drop`` l.31-55, ``calcu_q`` l.58-72, ``Classifier.forward`` l.93-153),
``code/main.py`` (``train`` l.77-176: warm-up l.91, sample removal l.95-101, OGM / OGM+ coefficients
l.116-169), ``code/scripts/train_opm.sh``, ``code/scripts/train_ogm.sh``, ``code/config.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..distributed import all_reduce_grads, all_reduce_sum, is_distributed
from ..models.fusion import Fusion
from ..types import MultimodalOutput
from .base import Balancer, Batch, split_batch
from .ogm import OGM, REFERENCES, Reference, score_ratios, true_class_scores
from .registry import register_balancer


def opm_drop_probabilities(scores: Tensor, q_base: float, lam: float, reference: str = "mean") -> Tensor:
    """OPM's per-modality drop probabilities ``q`` from the true-class scores (``calcu_q`` of the code).

    The dominant modality ``m`` (largest score) gets ``q_m = clip(q_base (1 + lam tanh(relu(rho_m - 1))),
    0, 1)`` when ``tanh(relu(rho_m - 1)) > 0`` (so ``q`` jumps from 0 to ``q_base`` as ``rho_m`` crosses 1),
    ``rho_m = s_m / ref(s_others)`` (:func:`~equimodal.balancers.ogm.score_ratios`); every other modality
    gets ``q = 0``. For two modalities ``rho`` is the code's ``performance_1 / performance_2``.
    """
    ratios = score_ratios(scores, reference)
    lead = torch.tanh(torch.relu(ratios - 1))
    dominant = torch.arange(scores.shape[0], device=scores.device) == scores.argmax()
    q = torch.where(dominant & (lead > 0), q_base * (1 + lam * lead), torch.zeros_like(lead))
    return q.clamp(0.0, 1.0)


def opm_theta(q: Tensor, dims: Sequence[int]) -> Tensor:
    """``theta = sum_m d_m q_m / sum_m d_m``: the expected share of dropped feature entries (``execute_drop``).

    ``dims`` are the feature sizes ``d_m`` (host numbers: no tensor is built from them, so no host sync).
    """
    total = sum(dims)
    return sum(q[i] * (d / total) for i, d in enumerate(dims))  # type: ignore[return-value]


def opm_drop(features: Mapping[str, Tensor], keep: Tensor, scale: Tensor) -> tuple[dict[str, Tensor], Tensor]:
    """Zero each modality's feature where ``keep`` is false and multiply every feature by ``scale``.

    Args:
        features: modality -> ``(B, ...)`` features, in modality order.
        keep: ``(M, B)`` booleans, whether sample ``i`` keeps modality ``m``'s feature.
        scale: 0-d, ``1 / (1 - theta)`` when the drop runs, 1 otherwise.

    Returns:
        The dropped, rescaled features, and a ``(B,)`` boolean: whether the sample keeps any modality (the
        code's ``update_flag``; samples without one are removed from the loss).
    """
    out = {}
    for i, (m, z) in enumerate(features.items()):
        k = keep[i].to(z.dtype).reshape(-1, *([1] * (z.dim() - 1)))
        out[m] = z * k * scale.to(z.dtype)
    return out, keep.any(0)


@register_balancer("opm")
class OPM(Balancer):
    """OPM (Wei et al., T-PAMI'24): drop the dominant modality's feature before the fusion, per sample.

    Each step, from this batch's unimodal logits (those of the undropped features, as the code's ``t1``,
    ``t2``), ``s_m = sum_i softmax(o_m)_{i, y_i}`` (summed over micro-batches, all-reduced over ranks) gives
    ``q`` (:func:`opm_drop_probabilities`). With probability ``p_exe`` the drop runs: sample ``i`` keeps
    modality ``m``'s feature with probability ``1 - q_m``, and every feature (kept ones of every modality) is
    multiplied by ``1 / (1 - theta)``, ``theta = sum d_m q_m / sum d_m`` (:func:`opm_theta`; ``d_m`` the
    feature size). The loss is the fused cross-entropy, averaged over the samples that keep at least one
    modality. Evaluation is untouched: nothing is dropped outside :meth:`train_step`.

    How it runs: OPM owns its step (``train_step``; ``requirements.own_step``). It runs the model's forward
    once per micro-batch with forward hooks, installed only for that call, that read the features; once
    every micro-batch's scores are in, it computes the fused logits of the loss on the dropped features.
    When ``model.fusion`` is an equimodal ``Fusion`` (every ``MultimodalClassifier``), the hook reads the
    features the fusion receives and the dropped ones go through ``model.fusion`` again: no extra encoder
    forward (the code has none either: it scores the batch's own features), one extra fusion-head forward
    per micro-batch. For any other model (one that only follows the contract), the features are the
    encoders' outputs, and the dropped ones replace them in a second forward of the model, in which the
    encoders run without gradients and in eval mode (their outputs are discarded; batch-norm statistics and
    dropout draws are not touched): an extra encoder forward, without backward.

    Args:
        model: a model following the contract.
        q_base: the base drop probability of the dominant modality. Default 0.5, the value of the authors'
            ``scripts/train_opm.sh`` and of ``main.py``'s argparse default, which the script's runs use
            (``config.py`` holds 0.4, but ``main.py`` overwrites it with its argparse value).
        lam: how much the lead raises ``q`` (``lambda``); default 0.5 (script, argparse and config agree).
        p_exe: probability that the drop runs in a step; default 0.7 (script, argparse and config agree).
        reference: for ``M >= 3``, what the dominant modality's score is compared with: the mean (default),
            minimum, sum or maximum of the others' (as :class:`~equimodal.balancers.ogm.OGM`; all give the
            code's rule for ``M = 2``). Only the one dominant modality is dropped.
        start_epoch: first epoch of the method. Default 6: the code's warm-up (``main.py`` l.91,
            ``warm_up = 1 if epoch <= 5``, 0-based epochs) drops nothing in epochs 0-5.
        end_epoch: last epoch (default ``None``: no end, as the code).
        seed: seed of the draws (whether the drop runs, and the per-sample masks), identical on all ranks.

    Deviations from the official code: any ``M >= 2`` (``reference``); the draws come from the balancer's
    seeded generator (the code uses numpy's and torch's global ones); scores and ``q`` are those of the
    whole optimizer step under gradient accumulation and DDP (so k micro-batches equal one batch k times
    larger; under DDP every rank takes the same ``p_exe`` decision and, from draws for the batch of all
    ranks, the masks of its shard ``rank::world``, so that two ranks equal one process on the whole batch
    with equal shards, as a ``DistributedSampler`` gives; the loss is the mean over all ranks' kept samples); a step
    in which every sample lost every modality (impossible while only one modality has ``q > 0``, as here
    and in the code) still calls ``optimizer.step()`` with a zero loss, where the code skips the batch.
    ``Classifier.py`` l.53 ends with a stray ``]`` (a ``SyntaxError``: the file does not import as
    released); we read it as ``torch.chunk(cleaned_fea, num_mod, dim=0)``. The code's rescaling
    (``custom_autograd``) divides the output and the gradient by ``1 - theta``, which is a plain division.

    ``stats()``: ``q/<m>`` (drop probabilities), ``dropped/<m>`` (share of this step's samples whose feature
    was dropped; 0 when the drop did not run), ``executed`` (1 when it ran), ``scale`` (``1 / (1 - theta)``
    applied, 1 when it did not run), ``removed`` (share of samples removed from the loss).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        q_base: float = 0.5,
        lam: float = 0.5,
        p_exe: float = 0.7,
        reference: Reference = "mean",
        start_epoch: int = 6,
        **options: Any,
    ) -> None:
        super().__init__(model, start_epoch=start_epoch, **options)
        q_base = self.check_option("q_base", q_base, low=0, high=1)
        p_exe = self.check_option("p_exe", p_exe, low=0, high=1)
        lam = self.check_option("lam", lam, low=0)
        reference = self.check_option("reference", reference, choices=REFERENCES)
        fusion = getattr(model, "fusion", None)
        self.fusion: nn.Module | None = fusion if isinstance(fusion, Fusion) else None
        self.q_base, self.lam, self.p_exe = float(q_base), float(lam), float(p_exe)
        self.reference = reference

    def own_step(
        self, batch: Batch, target: Tensor, optimizer: torch.optim.Optimizer, micro_batches: int
    ) -> Tensor:
        """Forward every micro-batch, choose ``q`` from the step's scores, drop, then backward and step."""
        optimizer.zero_grad(set_to_none=True)
        chunks = split_batch(batch, target, micro_batches)
        outs, feats = zip(*(self._forward(x) for x, _ in chunks), strict=True)
        for out, (_, y) in zip(outs, chunks, strict=True):
            self.validate_output(out, y)
        scores = torch.stack(
            [
                sum(
                    true_class_scores(o.unimodal_logits[m], y) for o, (_, y) in zip(outs, chunks, strict=True)
                )
                for m in self.modalities
            ]
        )
        q = opm_drop_probabilities(all_reduce_sum(scores), self.q_base, self.lam, self.reference)
        keep, scale, executed = self._draw(q, feats[0], target.shape[0])
        kept = keep.any(0)
        world = dist.get_world_size() if is_distributed() else 1  # DDP averages the ranks' gradients
        denom = all_reduce_sum(kept.sum().to(torch.float32)).clamp_min(1) / world
        total, start = target.new_zeros((), dtype=torch.float32), 0
        for out, feat, (inputs, y) in zip(outs, feats, chunks, strict=True):
            part = keep[:, start : start + y.shape[0]]
            start += y.shape[0]
            dropped, flags = opm_drop(feat, part, scale)
            fused = self._fuse(inputs, dropped)
            ce = F.cross_entropy(fused, y, reduction="none")
            loss = (ce * flags.to(ce.dtype)).sum() / denom + self.auxiliary_loss(out, y) * (
                y.shape[0] / target.shape[0]
            )
            loss.backward()
            total = total + loss.detach().float()
        all_reduce_grads([p for group in optimizer.param_groups for p in group["params"]])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.record("q", q)
        self.record("dropped", (~keep).float().mean(1))
        self.record("executed", executed.float())
        self.record("scale", scale)
        self.record("removed", 1 - kept.float().mean())
        return total

    def _forward(self, inputs: Batch) -> tuple[MultimodalOutput, dict[str, Tensor]]:
        """The model's forward, with the features the fusion receives (fusion path) or the encoders' outputs
        (encoder path), read by forward hooks that live only during this call."""
        seen: dict[str, list[Any]] = {}

        def keep(name: str) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
                seen.setdefault(name, []).append(args[0] if self.fusion is not None else output)

            return hook

        modules = {"fusion": self.fusion} if self.fusion is not None else dict(self.model.encoders.items())
        handles = [mod.register_forward_hook(keep(name)) for name, mod in modules.items()]
        try:
            out = self.model(inputs)
        finally:
            for h in handles:
                h.remove()
        calls = {name: len(seen.get(name, [])) for name in modules}
        if any(n != 1 for n in calls.values()):
            raise ValueError(
                f"opm expects each of {list(modules)} to be called once per forward of the model, found {calls} "
                "calls. A model that calls them more often (or through other modules) cannot have its "
                "features dropped by opm."
            )
        if self.fusion is None:
            return out, {m: seen[m][0] for m in self.modalities}
        features = seen["fusion"][0]
        if not isinstance(features, Mapping) or list(features) != self.modalities:
            found = list(features) if isinstance(features, Mapping) else type(features).__name__
            raise ValueError(
                f"opm: model.fusion must be called with the dict of modality features {self.modalities} as its "
                f"first argument (an equimodal Fusion), found {found}."
            )
        return out, dict(features)

    def _fuse(self, inputs: Batch, features: dict[str, Tensor]) -> Tensor:
        """The fused logits on the (dropped) features: ``model.fusion(features)`` (fusion path), or a second
        forward of the model whose encoders' outputs are replaced by ``features`` (encoder path: the encoders
        then run without gradients and in eval mode, so that nothing but the fused logits changes)."""
        if self.fusion is not None:
            result = self.fusion(features)
            return result[0] if isinstance(result, tuple) else result
        calls = dict.fromkeys(self.modalities, 0)
        saved: dict[str, tuple[bool, dict[nn.Module, bool]]] = {}

        def before(name: str) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
                saved[name] = (torch.is_grad_enabled(), {sub: sub.training for sub in module.modules()})
                torch.set_grad_enabled(False)
                module.eval()

            return hook

        def after(name: str) -> Callable[..., Tensor]:
            def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Tensor:
                grad, modes = saved.pop(name)
                torch.set_grad_enabled(grad)
                for sub, mode in modes.items():
                    sub.training = mode
                calls[name] += 1
                return features[name]

            return hook

        handles = []
        for m, enc in self.model.encoders.items():
            handles += [enc.register_forward_pre_hook(before(m)), enc.register_forward_hook(after(m))]
        try:
            out = self.model(inputs)
        finally:
            for h in handles:
                h.remove()
        if any(n != 1 for n in calls.values()):  # pragma: no cover - the first forward checked this
            raise ValueError(
                f"opm: the encoders were called {calls} times in the second forward, expected once."
            )
        return out.logits

    def _draw(self, q: Tensor, features: dict[str, Tensor], n: int) -> tuple[Tensor, Tensor, Tensor]:
        """Whether the drop runs (probability ``p_exe``) and the ``(M, n)`` keep masks; on the device."""
        gen = self.generator(q.device)
        executed = torch.rand((), generator=gen, device=gen.device).to(q.device) >= 1 - self.p_exe
        rank, world = (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)
        # draws for the batch of all ranks, in the sharding order rank::world (equal shards, as a
        # DistributedSampler gives): DDP ranks take the masks of one process on the whole batch
        draws = torch.rand((len(self.modalities), n * world), generator=gen, device=gen.device)
        draws = draws[:, rank::world].to(q.device)
        keep = (draws < (1 - q)[:, None]) | ~executed
        dims = [z[0].numel() for z in features.values()]
        scale = torch.where(
            executed, 1 / (1 - opm_theta(q, dims)), torch.ones((), dtype=q.dtype, device=q.device)
        )
        return keep, scale, executed


def ogm_plus_coefficients(ratios: Tensor, boost: float) -> Tensor:
    """OGM+ coefficients: ``boost`` for a weak modality (``rho < 1``), 1 for the others (``main.py`` l.128-136)."""
    return torch.where(ratios < 1, torch.full_like(ratios, boost), torch.ones_like(ratios))


@register_balancer("ogm_plus")
class OGMPlus(OGM):
    """OGM+ (Wei et al., T-PAMI'24 code, ``--use_OGM_plus``): multiply the weak modality's gradients by 4.

    The scores and ratios are OGM's (:class:`~equimodal.balancers.ogm.OGM`; the code computes them as for
    OGM, ``main.py`` l.119-120); instead of shrinking the dominant modality's encoder gradients, the
    others' (``rho_m < 1``) are multiplied by ``boost`` (:func:`ogm_plus_coefficients`), with OGM-GE's
    Gaussian noise added (the code's default ``--modulation OGM_GE``; the OGM+ branch only changes the
    coefficients). The code also carries a commented-out ``1 + tanh(alpha relu(rho))``; it runs the
    constant 4.

    Args:
        model: a model following the contract.
        boost: the weak modality's coefficient; default 4 (``main.py`` l.131, l.136).
        noise: add OGM-GE's ``N(0, std(grad) + 1e-8)`` noise (default True: ``--modulation`` defaults to
            ``OGM_GE`` and neither script sets it); False is the code's ``--modulation OGM``.
        reference, modulate: as :class:`~equimodal.balancers.ogm.OGM` (the code: two modalities, 4-D conv
            weights only, ``modulate="conv"``).
        start_epoch: first modulated epoch; default 6 (the code's warm-up, ``main.py`` l.91 and l.116).
        end_epoch: last modulated epoch; default 60 (``scripts/train_ogm.sh``, ``--modulation_ends 60``).
        seed: seed of the noise generator.

    Deviations from the code: any ``M >= 2`` (every modality with ``rho_m < 1`` is boosted); at an exact
    tie (``rho = 1``) nothing is boosted, where the code boosts its first modality; ``modulate`` defaults to
    every encoder weight (``"conv"`` is the code's); the rest as :class:`~equimodal.balancers.ogm.OGM`.
    Why a name of its own and not an option of ``opm`` or ``ogm``: it acts on gradients in the two-call
    loop (``opm`` owns its step), the code turns it on independently of OPM's feature drop, and its
    defaults (window 6-60, noise on) differ from ``ogm``'s. ``stats()``: ``k/<m>``, ``ratio/<m>``.
    """

    gradient_noise: ClassVar[bool] = True

    def __init__(
        self,
        model: nn.Module,
        *,
        boost: float = 4.0,
        noise: bool = True,
        start_epoch: int = 6,
        end_epoch: int | None = 60,
        **options: Any,
    ) -> None:
        if "alpha" in options:
            raise ValueError(
                "ogm_plus has no option alpha: its weak modality's gradients are multiplied by the constant "
                f"boost (found alpha={options['alpha']!r}); use boost=<factor>, or the ogm balancer for alpha."
            )
        super().__init__(model, start_epoch=start_epoch, end_epoch=end_epoch, **options)
        boost = self.check_option("boost", boost, low=0, open_low=True, hint="the code: 4")
        self.boost = float(boost)
        self.gradient_noise = bool(noise)  # type: ignore[misc]

    def coefficients(self, ratios: Tensor) -> Tensor:
        """``boost`` for each weak modality (``rho < 1``), 1 for the others."""
        return ogm_plus_coefficients(ratios, self.boost)
