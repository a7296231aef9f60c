"""Finding a balancer's own heads left out of the user's optimizer, at the second optimizer step.

A balancer that trains parameters of its own (the unimodal heads of ``mmpareto``, ``gblending``,
``own_signal``) cannot see the user's optimizer in a two-call loop. It can see whether the heads move:
at one ``before_step`` it keeps a copy of the heads, whether their gradient is finite and non-zero, and a
copy of a small sample of the model's trainable parameters; at the next one it compares (one host sync).

- The heads moved: the optimizer holds them; nothing is checked again (no more syncs).
- The heads had a usable gradient and did not move while the model did: the optimizer stepped without
  them, so the check returns what is wrong, and the balancer raises ``DriverError`` at the second step.
- Nothing moved (a learning rate of 0 for every group during a warm-up, a step that GradScaler skipped)
  or the heads had no usable gradient: no verdict yet; the next comparison spans twice as many steps, so
  a long warm-up costs a logarithmic number of syncs.

Heads frozen on purpose (``requires_grad=False``) are never checked, and heads held by a second optimizer
that steps with the model's move like any other. What cannot be told apart from heads left out: a
learning rate of 0 for the heads' group alone while the model trains, or a second optimizer that steps
the heads less often than the model's optimizer steps the model. Freeze the heads instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

# Elements of the model's trainable parameters copied as the "did the optimizer step" reference: the
# smallest tensors first (biases, norms), so the copy is small for any model size.
MODEL_SAMPLE = 1 << 16


def read_flags(flags: Tensor) -> list[bool]:
    """The one host sync of a comparison: a device vector of flags as Python bools."""
    return [bool(v) for v in flags.tolist()]


def _flat(params: list[nn.Parameter]) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


@dataclass
class _Snapshot:
    """The state at the start of a comparison window (device tensors only: taking it costs no sync)."""

    heads: Tensor
    grad_ok: Tensor
    params: list[nn.Parameter]
    values: list[Tensor]


class StepCheck:
    """Find an optimizer that steps the model but not the balancer's heads.

    Call it once per optimizer step, in ``before_step`` (gradients ready, the step not yet taken); the base
    class does, for every balancer with parameters of its own, and raises ``DriverError`` with the message
    it returns.

    Args:
        method: the balancer's name, for the error message.
    """

    def __init__(self, method: str) -> None:
        self.method = method
        self.done = False
        self._calls = 0
        self._window = 1
        self._due = 0
        self._snap: _Snapshot | None = None

    def __call__(self, heads: list[nn.Parameter], model: nn.Module) -> str | None:
        """Snapshot or compare (see the module docstring); a no-op once the heads were seen to move.

        Returns what is wrong (the optimizer does not hold the heads), or ``None``.
        """
        trainable = [p for p in heads if p.requires_grad]
        if self.done or not trainable:
            return None
        self._calls += 1
        if self._snap is not None and self._calls >= self._due:
            problem = self._compare(trainable)
            self._snap = None
            if self.done or problem is not None:
                return problem
        if self._snap is None:
            self._snap = self._take(trainable, model)
            self._due = self._calls + self._window
        return None

    def _take(self, heads: list[nn.Parameter], model: nn.Module) -> _Snapshot | None:
        """The heads, their gradient's usability and the model sample, copied on the device."""
        grads = [p.grad for p in heads if p.grad is not None]
        if not grads:
            return None
        finite = torch.stack([torch.isfinite(g).all() for g in grads]).all()
        grad_ok = finite & torch.stack([g.ne(0).any() for g in grads]).any()
        own = {id(p) for p in heads}
        candidates = sorted(
            (p for p in model.parameters() if p.requires_grad and p.grad is not None and id(p) not in own),
            key=lambda p: p.numel(),
        )
        sample: list[nn.Parameter] = []
        size = 0
        for p in candidates:
            if sample and size + p.numel() > MODEL_SAMPLE:
                break
            sample.append(p)
            size += p.numel()
        return _Snapshot(_flat(heads), grad_ok, sample, [p.detach().clone() for p in sample])

    def _compare(self, heads: list[nn.Parameter]) -> str | None:
        """Read the window's verdict (one sync): done, the problem, or widen the next window."""
        snap = self._snap
        now = _flat(heads)
        if now.shape != snap.heads.shape or now.device != snap.heads.device:  # heads moved device: restart
            return None
        changed = [
            (p.detach() != v).any().to(now.device) for p, v in zip(snap.params, snap.values, strict=True)
        ]
        model_moved = torch.stack(changed).any() if changed else now.new_zeros((), dtype=torch.bool)
        grad_ok, heads_moved, model_stepped = read_flags(
            torch.stack([snap.grad_ok.to(now.device), now.ne(snap.heads).any(), model_moved])
        )
        if heads_moved:
            self.done = True
        elif grad_ok and model_stepped:
            return (
                f"{self.method} trains unimodal heads of its own, but the optimizer left them unchanged while it "
                "stepped the model (at the last step they had a gradient): it does not hold them. Build it "
                "with `torch.optim.SGD([*model.parameters(), *balancer.parameters()], ...)`. A second "
                "optimizer for the heads must step with the model's; to keep the heads fixed on purpose, "
                "freeze them: `for p in balancer.parameters(): p.requires_grad_(False)`."
            )
        else:
            self._window *= 2
        return None
