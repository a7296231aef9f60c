"""``before_step()`` of AMSS / AMSS+ on the audio-visual ResNet18 pair, against its goals.

The model is AMSS's CREMA-D audio-visual pair: two ResNet18 from scratch with GELU
(``create_encoder("resnet18", in_channels=1 | 3, activation="gelu")``), audio on a 1x257x188
log-spectrogram, visual on one 3x224x224 frame (``--small``: 1x128x94 and 3x112x112), concat fusion
into 6 classes, SGD (lr 1e-3, momentum 0.9, weight decay 1e-4), batch 16, CPU, 2 threads by default.

Per round, interleaved (in an order rotated every round), on one of four fixed batches:

- a plain step (``none``), an ``amss`` step and an ``amss_plus`` step, each ``zero_grad`` + forward +
  ``balancer.loss`` + backward + ``before_step()`` + ``optimizer.step()``; ``before_step()`` is also timed
  alone;
- for context, a *naive* masking pass on the same model's gradients after a plain forward + backward:
  the per-parameter Python loop in the style the issue describes for the official code (per masked
  tensor: a full-size ``grad ** 2`` temporary, per-unit sums, ``torch.multinomial`` without
  replacement, a 0/1 mask, ``grad.mul_``; per output row for the fusion head's column blocks), written
  here from that description (ratios fixed at 0.5; the optimizer does not step after it).

Printed: medians (quartiles) of ``before_step()`` alone and of the step ratios to the plain step of the
same round, with the goals and PASS / FAIL: ``before_step()`` at most 12 ms, an AMSS+ step at most 1.03 x
a plain step; the naive pass's time; and the gradient bytes the vectorised pass reads and writes
(masked weights x 4 B x 2: one read and one write of each masked gradient element by the multiply; the
norms read every element once more) with the implied GB/s.

Run:
    python benchmarks/before_step.py                   # CREMA-D sizes, 2 threads, 30 rounds (~3-5 minutes on 2 quiet cores)
    python benchmarks/before_step.py --small           # 1x128x94 + 3x112x112 (~1-2 minutes)
    python benchmarks/before_step.py --device cuda     # a GPU (under a minute)
    python benchmarks/before_step.py --smoke           # tiny inputs, 3 rounds (~20 s)
"""

from __future__ import annotations

import argparse
import math
import statistics
from typing import Any

import torch
from steptime import device_sync, timed_step
from torch import Tensor, nn

import equimodal as em
from equimodal.amss.units import UnitTensor
from equimodal.models.encoders import create_encoder

METHODS = ("none", "amss", "amss_plus")
NUM_CLASSES = 6
BEFORE_STEP_GOAL_MS = 12.0
STEP_RATIO_GOAL = 1.03
NAIVE_RATIO = 0.5
Batch = dict[str, Tensor]


def build(
    args: argparse.Namespace, device: torch.device
) -> tuple[nn.Module, list[tuple[Batch, Tensor]], str]:
    """The ResNet18 pair and four fixed batches; returns a line saying which input sizes."""
    torch.manual_seed(0)
    audio, frame = (
        ((1, 32, 24), 32) if args.smoke else ((1, 128, 94), 112) if args.small else ((1, 257, 188), 224)
    )
    encoders = {
        "audio": create_encoder("resnet18", in_channels=1, activation="gelu"),
        "visual": create_encoder("resnet18", in_channels=3, activation="gelu"),
    }
    model = em.MultimodalClassifier(encoders, NUM_CLASSES, fusion="concat", validate_inputs=False).to(device)
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(4):
        x = {
            "audio": torch.randn(args.batch, *audio, generator=g).to(device),
            "visual": torch.randn(args.batch, 3, frame, frame, generator=g).to(device),
        }
        batches.append((x, torch.randint(0, NUM_CLASSES, (args.batch,), generator=g).to(device)))
    label = f"audio {'x'.join(map(str, audio))}, visual 3x{frame}x{frame}, batch {args.batch}"
    return model, batches, label


@torch.no_grad()
def naive_mask(units: list[UnitTensor], generator: torch.Generator) -> None:
    """A per-parameter Python loop of AMSS masking (the style the issue describes for the official code).

    For each masked tensor: a full-size ``grad ** 2``, per-unit sums, the scores normalised into a
    distribution, ``ceil(0.5 * N)`` units drawn by ``torch.multinomial`` without replacement, a 0/1 mask
    built on the host side of the loop, and ``grad *= mask``. Fusion-head column blocks loop over output
    rows, each row's weights being its units.
    """
    for u in units:
        grad = u.param.grad
        if u.kind in ("filters", "rows"):
            rows = [grad]
        elif u.kind == "row_elements":
            rows = [grad[c, u.columns] for c in range(grad.shape[0])]
        else:
            raise ValueError(f"the naive pass handles filters, rows and fusion blocks, found {u.kind!r}.")
        for g in rows:
            sq = g**2
            score = sq.sum(dim=tuple(range(1, g.dim()))) if g.dim() > 1 else sq
            prob = score / score.sum().clamp_min(1e-30)
            n = math.ceil(NAIVE_RATIO * prob.numel())
            idx = torch.multinomial(prob + 1e-12, n, replacement=False, generator=generator)
            mask = torch.zeros_like(prob)
            mask[idx] = 1.0
            g.mul_(mask.view(-1, *([1] * (g.dim() - 1))))


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile)."""
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def fmt(xs: list[float], scale: float = 1.0, digits: int = 3) -> str:
    q1, med, q3 = quartiles([x * scale for x in xs])
    return f"{med:.{digits}f} [{q1:.{digits}f}, {q3:.{digits}f}]"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds (each steps every method once)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--small", action="store_true", help="inputs 1x128x94 and 3x112x112")
    parser.add_argument("--smoke", action="store_true", help="tiny inputs, batch 2, 3 rounds: a sanity run")
    args = parser.parse_args()
    if args.smoke:
        args.rounds, args.warmup, args.batch = 3, 1, 2
    return args


def timed_rounds(args, model, batches, balancers, opt, units, device) -> dict[str, Any]:
    """Step every method (and the naive masking loop) once per round, in rotating order; returns the
    whole-step times and ratios to the plain step per method, and the masking times."""
    sync = device_sync(device)
    naive_gen = torch.Generator(device=device).manual_seed(0)
    step: dict[str, list[float]] = {m: [] for m in METHODS}
    ratio: dict[str, list[float]] = {m: [] for m in METHODS}
    mask: dict[str, list[float]] = {m: [] for m in METHODS}
    naive: list[float] = []
    items = [*METHODS, "naive"]
    for r in range(args.warmup + args.rounds):
        x, y = batches[r % len(batches)]
        this: dict[str, float] = {}
        shift = r % len(items)
        for name in items[shift:] + items[:shift]:
            bal = balancers["none" if name == "naive" else name]
            naive_step = name == "naive"
            masking = (lambda: naive_mask(units, naive_gen)) if naive_step else None
            this[name], masked = timed_step(
                model, bal, opt, x, y, sync, masking=masking, update=not naive_step
            )
            if r >= args.warmup:
                (naive if naive_step else mask[name]).append(masked)
        if r >= args.warmup:
            for name in METHODS:
                step[name].append(this[name])
                ratio[name].append(this[name] / this["none"])
    opt.zero_grad(set_to_none=True)
    return {"step": step, "ratio": ratio, "mask": mask, "naive": naive}


def print_table(times: dict[str, Any], weights: int) -> None:
    """The markdown table: before_step against its goal, step ratios, shares, the naive loop, bandwidth."""
    step, ratio, mask, naive = times["step"], times["ratio"], times["mask"], times["naive"]
    print("| what | median [quartiles] | goal | result |")
    print("|---|---|---|---|")
    for name in ("amss", "amss_plus"):
        ms = statistics.median(mask[name]) * 1e3
        verdict = "PASS" if ms <= BEFORE_STEP_GOAL_MS else "FAIL"
        print(
            f"| `{name}` before_step (ms) | {fmt(mask[name], 1e3, 2)} | <= {BEFORE_STEP_GOAL_MS:g} ms | {verdict} |"
        )
    for name in ("amss", "amss_plus"):
        med = statistics.median(ratio[name])
        goal, verdict = (
            (f"<= {STEP_RATIO_GOAL:g}", "PASS" if med <= STEP_RATIO_GOAL else "FAIL")
            if name == "amss_plus"
            else ("(context)", "-")
        )
        print(f"| `{name}` step / plain step | {fmt(ratio[name])} | {goal} | {verdict} |")
    for name in ("amss", "amss_plus"):
        share = statistics.median(mask[name]) / statistics.median(step["none"])
        print(f"| `{name}` before_step / plain step (medians) | {share:.2%} | - | - |")
    print(f"| naive per-parameter loop (ms, for context) | {fmt(naive, 1e3, 2)} | - | - |")
    gbytes = weights * 4 * 2 / 1e9
    for name in ("amss", "amss_plus"):
        rate = gbytes / statistics.median(mask[name])
        print(
            f"| `{name}` gradient bytes read + written (masked weights x 4 B x 2) | {gbytes * 1e3:.0f} MB "
            f"= {rate:.1f} GB/s over before_step | - | - |"
        )


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, batches, label = build(args, device)
    balancers = {name: em.create_balancer(name, model, seed=0) for name in METHODS}
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    units = [u for us in balancers["amss"].units.values() for u in us]
    weights = sum(
        t[:, u.columns].numel() if u.columns is not None else t.numel() for u in units for t in u.tensors
    )
    times = timed_rounds(args, model, batches, balancers, opt, units, device)
    print(
        f"# before_step of AMSS / AMSS+ on the audio-visual ResNet18 pair: torch {torch.__version__}, "
        f"device {device}, {args.threads} thread(s), {label}, {args.rounds} rounds after {args.warmup} "
        f"warm-up{', SMOKE' if args.smoke else ''}\n"
    )
    print(
        f"{len(units)} masked tensors, {weights / 1e6:.2f} M masked weights; plain step "
        f"{fmt(times['step']['none'], 1e3, 1)} ms\n"
    )
    print_table(times, weights)


if __name__ == "__main__":
    main()
