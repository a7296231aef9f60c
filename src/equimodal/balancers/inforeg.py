"""InfoReg: information acquisition regulation (Huang, Wei, Yang, Hu, "Adaptive Unimodal Regulation for
Balanced Multimodal Information Acquisition", CVPR 2025).

The pure math (:func:`window_growth`, :func:`regulation_coefficients`, :func:`fisher_traces`) is kept in
small functions that the fidelity tests re-enact against the authors' ``main.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..types import MultimodalOutput
from .base import Balancer, Batch
from .ogm import true_class_scores
from .registry import register_balancer

log = logging.getLogger(__name__)

Rule = Literal["paper", "code"]
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

# What each rule means by every option left at None: (paper, code).
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {
        "threshold": 0.04,
        "beta": 0.9,
        "scale": 1.0,
        "score": "mean",
        "score_kind": "log_prob",
        "regulate": "above_lower",
        "smoothing": 1,
        "window_on": "each",
        "warmup_epochs": 2,
        "trace": "sum",
        "trace_includes_proximal": False,
        "unimodal_loss": 0.0,
    },
    "code": {
        "threshold": 0.05,
        "beta": 1.0,
        "scale": (0.95, 0.1),  # (first modality, second modality): audio_net, visual_net in main.py
        "score": "sum",
        "score_kind": "prob",
        "regulate": "strongest",
        "smoothing": 10,
        "window_on": "first",
        "warmup_epochs": 0,
        "trace": "layer_mean",
        "trace_includes_proximal": True,
        "unimodal_loss": 1.0,
    },
}


def window_growth(history: Tensor) -> Tensor:
    """Relative growth of a smoothed trace, ``(mean(h[1:]) - mean(h[:-1])) / mean(h[1:])``.

    ``history`` holds the last ``S + 1`` epoch traces, oldest first (zeros before the first epoch, as the
    official list starts with ten zeros), one column per series when it is 2-D; both means are over ``S``
    epochs. A zero newest mean gives 0.
    """
    new, old = history[1:].sum(0), history[:-1].sum(0)
    return (new - old) / new.clamp_min(torch.finfo(history.dtype).tiny)


def regulation_coefficients(
    scores: Tensor, beta: float, scale: Tensor, window: Tensor, regulate: str = "above_lower"
) -> Tensor:
    """Proximal coefficients ``a_m = scale_m * exp(beta * tanh(D_m))`` where modality m is regulated, else 0.

    ``regulate="above_lower"`` (the paper's Eqs. 9, 10 and 16): ``D_m`` is the mean of ``s_m - s_k`` over
    the modalities k that score lower than m, and every modality with such a k (``D_m > 0``) inside its
    window is regulated; the lowest scorer never is. ``"strongest"`` (the code's ``if/elif`` for any M):
    only the modality with the largest score, with ``D = s_m - mean_{k != m} s_k > 0``. For two
    modalities both pick the stronger one with ``D = s_strong - s_weak``. ``window`` is a bool per
    modality or one for all. Ties (``D = 0``) regulate nobody, as in the official code.
    """
    m = scores.shape[0]
    if regulate == "strongest":
        gap = scores - (scores.sum() - scores) / (m - 1)
        chosen = torch.arange(m, device=scores.device) == scores.argmax()  # one_hot would read the host
    else:
        diff = scores[:, None] - scores[None, :]  # s_m - s_k
        lower = diff > 0
        gap = torch.where(lower, diff, torch.zeros_like(diff)).sum(1) / lower.sum(1).clamp_min(1)
        chosen = lower.any(1)
    chosen = chosen & (gap > 0) & window
    return torch.where(chosen, scale * torch.exp(beta * torch.tanh(gap)), torch.zeros_like(scores))


def batch_scores(logits: Tensor, target: Tensor, kind: str) -> Tensor:
    """The batch sum of a modality's score: ``"log_prob"``, ``sum_i log softmax(o)_{i, y_i}`` (the paper's
    Eq. 8 read as a performance score, see :class:`InfoReg`); ``"prob"``, the true-class probabilities
    (the code's ``score_a``/``score_v``)."""
    if kind == "prob":
        return true_class_scores(logits, target)
    return torch.log_softmax(logits.detach().float(), dim=1).gather(1, target[:, None]).sum()


def fisher_traces(grads: Sequence[Sequence[Tensor]], how: str, device: torch.device) -> Tensor:
    """Per modality, the step's contribution to the trace of the empirical Fisher information.

    ``how="sum"``: ``sum g^2`` over the given gradients (the paper's ``Tr(F) = sum grad^2``);
    ``"layer_mean"``: ``sum_layers mean(g^2)``, the official code's reduction (one mean per layer weight).
    A modality without gradients contributes 0.
    """
    out = []
    for gs in grads:
        if not gs:
            out.append(torch.zeros((), device=device))
            continue
        sq = torch.stack(torch._foreach_norm(list(gs), 2)).float().pow(2)
        if how == "layer_mean":
            sq = sq / torch.tensor([g.numel() for g in gs], dtype=sq.dtype, device=sq.device)
        out.append(sq.sum().to(device))
    return torch.stack(out)


@register_balancer("inforeg")
class InfoReg(Balancer):
    """InfoReg (Huang et al., CVPR'25): a proximal pull on the better-performing encoders in their prime
    learning window.

    Per epoch the balancer accumulates, per encoder, the trace of the empirical Fisher information
    ``Tr(F_m) = sum_steps sum g^2`` of its gradients (Eq. 7). At each epoch start modality m's *prime
    learning window* is open while the relative growth of its trace, ``(Tr_{t-1} - Tr_{t-2}) / Tr_{t-1}``
    (Eq. 11), exceeds ``threshold``; the paper's Algorithm 1 regulates nothing in epochs 0 and 1
    (``warmup_epochs=2``). Inside the window, per optimizer step, each modality that scores above some
    other (``D_m``, the mean of ``s_m - s_k`` over the lower-scoring k, Eqs. 9-10) gets the gradient of
    ``(a/2) ||w - w_prev||^2`` (Eq. 12) added to its encoder's gradients, ``g += a (w - w_prev)``, with
    ``w_prev`` its weights at the start of the epoch (= the end of the previous one) and
    ``a = scale_m exp(beta tanh D_m)`` (Eq. 16, :func:`regulation_coefficients`). It slows the modalities
    that acquire information fastest while they acquire most.

    The score: the paper's Eq. 8 writes ``s_m = E[-log softmax(o_m)_y]``, a loss, yet calls the modality
    with the smallest ``s`` the lowest-performing and regulates the modalities above it; both hold only
    for a performance score. We read Eq. 8 as ``s_m = E[log softmax(o_m)_y]`` (``score_kind="log_prob"``,
    higher is better), which regulates the information-sufficient modalities as the text and Algorithm 1
    say; the code's score is the true-class probability (``"prob"``).

    ``rule="paper"`` (default) is the paper's rule; ``rule="code"`` is the rule of the released code
    (``main.py`` ``train_epoch``), which differs on every point below. Each option left at ``None``
    takes its rule's value; setting one overrides it.

    Args:
        model: a model following the contract (``unimodal_logits`` give the scores).
        rule: ``"paper"`` or ``"code"`` (the presets below).
        threshold: the window's ``K``. Paper 0.04; code 0.05 (``main.py`` line 465, ``k > 0.05``).
        beta: the exponent's scale. Paper 0.9 (``a = exp(0.9 tanh D)``); code 1 (``0.95 * torch.exp(gap)``,
            lines 467-468 and 475-476).
        scale: ``scale_m``, a number for every modality or a mapping keyed by modality name. Paper 1;
            code 0.95 for the first modality (their ``audio_net``) and 0.1 for the second
            (``visual_net``), lines 468 and 476; for ``M != 2`` with ``rule="code"`` give it by name.
        score: ``"mean"`` (paper: the batch mean, Eq. 8's expectation, so ``tanh D`` is graded) or
            ``"sum"`` (code, lines 460-461: batch *sums*, so ``tanh`` saturates at 1 for any gap of a
            few samples).
        score_kind: ``"log_prob"`` (paper, Eq. 8 as a performance score, see above) or ``"prob"`` (code:
            the true-class softmax probability).
        regulate: ``"above_lower"`` (paper, Eqs. 9-10: every modality that scores above another, each
            with its own ``D_m``) or ``"strongest"`` (code: only the best-scoring modality, ``D`` against
            the mean of the others; the same choice as the paper's for two modalities).
        smoothing: epochs in the moving average of the trace. Paper 1 (consecutive epochs); code 10
            (lines 240-243, a 10-epoch mean over a list that starts with ten zeros, line 694).
        window_on: whose trace opens a modality's window: ``"each"`` (paper, Eq. 11: its own),
            ``"all"`` (the sum over the encoders, the whole network's acquisition) or a modality name; the
            code uses the audio trace only (line 240), i.e. the first modality (``"first"``).
        warmup_epochs: completed epochs before any regulation. Paper 2 (Algorithm 1: ``t < 2`` only
            trains and measures the trace); code 0 (``k = 1`` at epoch 0, and 1 at epoch 1 from the
            zero-padded list, so its window is open from the start).
        trace: ``"sum"`` (paper: ``sum g^2`` over every encoder parameter) or ``"layer_mean"`` (code,
            lines 507-514 and 569-577: the mean of ``g^2`` of each Conv/Linear weight, summed over
            layers; biases and norm layers left out).
        trace_includes_proximal: measure the trace after the proximal gradient is added (code: the
            Fisher accumulation at line 501 follows the edit at line 489) or before (paper, ours: the
            Fisher information of the loss).
        unimodal_loss: weight of ``sum_m CE(unimodal_logits_m)`` added to the fused CE. Paper 0 (InfoReg);
            code 1 (lines 456-458 backpropagate the CE of the fused head's slices, the paper's InfoReg*).
            With a fusion that cannot be split the unimodal logits come from auxiliary heads on
            detached features, which the base class trains already; the term is then dropped (logged).
        start_epoch, end_epoch: the balancer's window (default: every epoch; the code runs 50 epochs
            and decides by itself, ``modulation_starts``/``ends`` are not read by its InfoReg path).
        seed: unused (no random draws).

    The authors train with SGD (lr 2e-3, momentum 0.9, weight decay 1e-4, StepLR 30 / 0.1), batch 64,
    50 epochs (``main.py`` lines 39-45, 714-715).

    Deviations from the official code, each an option above except: any ``M >= 2`` (with
    ``regulate="strongest"`` the strongest modality against the mean of the others; for two modalities
    exactly their ``if/elif``); the per-layer trace finds weights by module type (Linear, Conv1d/2d/3d) rather than Conv2d/Linear
    modules by name; a zero smoothed trace closes the window (their code divides by zero after epoch
    0); scores summed over gradient-accumulation micro-batches and all-reduced under DDP; a parameter
    without a gradient in a step is not pulled (their ``grad +=`` fails on it); a non-finite step
    (AMP overflow) adds nothing and leaves the trace as it was. Not reproduced: three logging-only
    backward passes per step, the ``O(P^2)`` identity search over parameters, the per-step
    ``.item()`` reads, the unused ``calculate_proximal_term*`` functions.

    Cost: no extra forward or backward pass; one copy of the encoders' weights (the anchor, kept in
    ``state_dict``) and per step one elementwise pass over the encoder weights. ``stats()``:
    ``coef/<m>`` (``a_m`` applied this step, 0 when not regulated), ``window/<m>`` (1 inside modality
    m's window; one ``window`` when a single trace decides), ``growth/<m>`` (or ``growth``: the window's
    relative growth this epoch), ``trace/<m>`` (this epoch's accumulated trace).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        rule: Rule = "paper",
        threshold: float | None = None,
        beta: float | None = None,
        scale: float | Mapping[str, float] | None = None,
        score: Literal["mean", "sum"] | None = None,
        score_kind: Literal["log_prob", "prob"] | None = None,
        regulate: Literal["above_lower", "strongest"] | None = None,
        smoothing: int | None = None,
        window_on: str | None = None,
        warmup_epochs: int | None = None,
        trace: Literal["sum", "layer_mean"] | None = None,
        trace_includes_proximal: bool | None = None,
        unimodal_loss: float | None = None,
        **options: Any,
    ) -> None:
        super().__init__(model, **options)
        self.check_option("rule", rule, choices=tuple(PRESETS))
        preset = PRESETS[rule]
        self.rule = rule

        def given(key: str, value: Any) -> Any:  # the option, or the rule's value where it is None
            return preset[key] if value is None else value

        self.threshold = self.check_option("threshold", given("threshold", threshold))
        self.beta = self.check_option("beta", given("beta", beta), low=0)
        self.unimodal_loss = self.check_option("unimodal_loss", given("unimodal_loss", unimodal_loss), low=0)
        self.score = self.check_option("score", given("score", score), choices=("mean", "sum"))
        self.score_kind = self.check_option(
            "score_kind", given("score_kind", score_kind), choices=("log_prob", "prob")
        )
        self.regulate = self.check_option(
            "regulate", given("regulate", regulate), choices=("above_lower", "strongest")
        )
        self.warmup_epochs = self.check_option(
            "warmup_epochs", given("warmup_epochs", warmup_epochs), low=0, integer=True
        )
        self.trace = self.check_option("trace", given("trace", trace), choices=("sum", "layer_mean"))
        self.smoothing = self.check_option("smoothing", given("smoothing", smoothing), low=1, integer=True)
        self.trace_includes_proximal = self.check_option(
            "trace_includes_proximal",
            given("trace_includes_proximal", trace_includes_proximal),
            choices=(True, False),
        )
        self.window_on = self._window_on(preset["window_on"] if window_on is None else window_on)
        self.scales = self._scales(preset["scale"] if scale is None else scale, rule)
        if self.unimodal_loss and getattr(model, "auxiliary_heads", False):
            log.warning(
                "inforeg: this model's unimodal logits come from auxiliary heads on detached features; "
                "the unimodal_loss term would not reach the encoders and is dropped."
            )
        self.targets = {m: self.encoder_params(m) for m in self.modalities}
        self.layers = {m: self._layer_weights(m) for m in self.modalities}
        num = len(self.modalities)
        self.add_stat("scores", torch.zeros(num))  # summed true-class (log-)probabilities
        self.add_stat("count", torch.zeros(()))  # samples behind them
        self.add_state("anchor", None, rollback=False)  # flat encoder weights at the epoch's start
        self.add_state("anchor_epoch", None)  # the epoch the anchor was taken at
        self.add_state("epoch_trace", torch.zeros(num))  # this epoch's Tr(F_m)
        self.add_state("trace_steps", 0)  # steps accumulated into epoch_trace
        self.add_state("history", torch.zeros(self.smoothing + 1, num))  # epoch traces, oldest first
        self.add_state("epochs_traced", 0)
        self.add_state("growth", torch.ones(num))  # relative growth behind each modality's window
        open_now = self.warmup_epochs == 0  # the paper regulates from its third epoch (Algorithm 1: t >= 2)
        self.add_state("window", torch.full((num,), open_now, dtype=torch.bool))  # per modality
        self._views: tuple[Tensor, dict[str, list[Tensor]]] | None = None

    # ------------------------------------------------------------------ options
    def _window_on(self, value: str) -> str:
        if value == "first":
            return self.modalities[0]
        if value not in ("each", "all") and value not in self.modalities:
            raise ValueError(
                f"Balancer 'inforeg' option 'window_on' must be 'each', 'all' or a modality name "
                f"({', '.join(self.modalities)}), found {value!r}."
            )
        return value

    def _window_growth(self) -> Tensor:
        """Each modality's window growth: its own trace's (``"each"``), or the summed trace's or one
        modality's, the same for every modality."""
        history = self.history
        if self.window_on == "all":
            history = history.sum(1, keepdim=True)
        elif self.window_on != "each":
            i = self.modalities.index(self.window_on)
            history = history[:, i : i + 1]
        return window_growth(history).expand(len(self.modalities)).clone()

    def _scales(self, value: Any, rule: str) -> Tensor:
        if isinstance(value, tuple):  # the code preset: by position, for the two modalities it has
            if len(self.modalities) != 2:
                raise ValueError(
                    f"Balancer 'inforeg' with rule='code' has per-modality betas for two modalities "
                    f"(audio 0.95, visual 0.1); this model has {len(self.modalities)} "
                    f"({', '.join(self.modalities)}): give scale={{name: value}} for each of them."
                )
            value = dict(zip(self.modalities, value, strict=True))
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - set(self.modalities))
            missing = [m for m in self.modalities if m not in value]
            if unknown or missing:
                raise ValueError(
                    f"Balancer 'inforeg' option 'scale' needs one value per modality "
                    f"({', '.join(self.modalities)}); found unknown {unknown} and missing {missing}."
                )
            values = [self.check_option(f"scale[{m}]", value[m], low=0) for m in self.modalities]
        else:
            values = [self.check_option("scale", value, low=0)] * len(self.modalities)
        return torch.tensor(values)

    def _layer_weights(self, modality: str) -> list[nn.Parameter]:
        mods = self.model.encoders[modality].modules()
        return [mod.weight for mod in mods if isinstance(mod, _LAYERS) and mod.weight.requires_grad]

    # ------------------------------------------------------------------ epoch work
    @torch.no_grad()
    def set_epoch(self, epoch: int) -> None:
        """Start an epoch: close the last epoch's trace, decide the window, take the weights' anchor.

        Done once per epoch (a resumed run that restarts the same epoch keeps its loaded anchor).
        """
        super().set_epoch(epoch)
        if not self.active or self.anchor_epoch == self.epoch:
            return
        device = self.device
        if self.trace_steps:
            newest = self.epoch_trace.to(device).float()[None]
            self.history = torch.cat([self.history.to(device)[1:], newest])
            self.epochs_traced += 1
        if self.epochs_traced:
            self.growth = self._window_growth()
            self.window = (self.growth > self.threshold) & (self.epochs_traced >= self.warmup_epochs)
        self.epoch_trace = torch.zeros(len(self.modalities), device=device)
        self.trace_steps = 0
        params = [p for m in self.modalities for p in self.targets[m]]
        self.anchor = torch.cat([p.detach().reshape(-1) for p in params]) if params else None
        self.anchor_epoch = self.epoch

    def _anchor_views(self) -> dict[str, list[Tensor]]:
        """Per modality, views of the flat anchor shaped like its encoder parameters."""
        if self._views is None or self._views[0] is not self.anchor:
            parts = self.anchor.split([p.numel() for m in self.modalities for p in self.targets[m]])
            views, i = {}, 0
            for m in self.modalities:
                views[m] = [parts[i + j].view_as(p) for j, p in enumerate(self.targets[m])]
                i += len(self.targets[m])
            self._views = (self.anchor, views)
        return self._views[1]

    # ------------------------------------------------------------------ step hooks
    def observe(self, out: MultimodalOutput, target: Tensor, batch: Batch | None) -> None:
        """Add each modality's summed score (``score_kind``) and the number of samples."""
        scores = [batch_scores(out.unimodal_logits[m], target, self.score_kind) for m in self.modalities]
        self.accumulate("scores", torch.stack(scores))
        self.accumulate("count", torch.full((), float(target.shape[0]), device=target.device))

    def objective(self, out: MultimodalOutput, target: Tensor, batch: Batch | None) -> Tensor:
        """Fused CE, plus ``unimodal_loss`` times the unimodal CEs (the code rule's InfoReg*)."""
        loss = F.cross_entropy(out.logits, target)
        if self.unimodal_loss and not getattr(self.model, "auxiliary_heads", False):
            uni = sum(F.cross_entropy(out.unimodal_logits[m], target) for m in self.modalities)
            loss = loss + self.unimodal_loss * uni
        return loss

    def coefficients(self) -> Tensor:
        """This step's ``a_m`` (0 outside the window, for modalities not regulated, in a non-finite step)."""
        scores = self.scores / self.count.clamp_min(1) if self.score == "mean" else self.scores
        scale = self.scales.to(scores.device)
        window = self.window.to(scores.device)
        coefs = regulation_coefficients(scores, self.beta, scale, window, self.regulate)
        return torch.where(self.step_finite, coefs, torch.zeros_like(coefs))

    @torch.no_grad()
    def adjust_gradients(self) -> None:
        """Add ``a_m (w - w_prev)`` to the strongest encoder's gradients; accumulate the Fisher trace."""
        coefs = self.coefficients()
        if not self.trace_includes_proximal:
            step_trace = self._step_trace()
        if self.anchor is not None:
            views = self._anchor_views()
            for i, m in enumerate(self.modalities):
                pairs = [(p, a) for p, a in zip(self.targets[m], views[m], strict=True) if p.grad is not None]
                if not pairs:
                    continue
                params, anchors = zip(*pairs, strict=True)
                pull = torch._foreach_sub([p.detach() for p in params], list(anchors))
                torch._foreach_mul_(pull, coefs[i])
                torch._foreach_add_([p.grad for p in params], pull)
        if self.trace_includes_proximal:
            step_trace = self._step_trace()
        finite = self.step_finite
        self.epoch_trace = self.epoch_trace + torch.where(finite, step_trace, torch.zeros_like(step_trace))
        self.trace_steps += 1
        self.record("coef", coefs)
        each = self.window_on == "each"  # one window per modality, else one for all
        self.record("window", self.window.float() if each else self.window[0].float())
        self.record("growth", self.growth if each else self.growth[0])
        self.record("trace", self.epoch_trace)

    def _step_trace(self) -> Tensor:
        source = self.layers if self.trace == "layer_mean" else self.targets
        grads = [[p.grad for p in source[m] if p.grad is not None] for m in self.modalities]
        return fisher_traces(grads, self.trace, self.epoch_trace.device)
