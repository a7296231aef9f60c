"""How the AMSS / AMSS+ masking cost grows with the number of units and modalities, against backward.

The masking pass is ``balancer.before_step()`` of ``amss`` and ``amss_plus`` (the significance, the
ratios and :meth:`equimodal.amss.masker.GradientMasker.apply`: one norm per masked tensor, one sampling
call over the padded ``(groups, units)`` matrix, one ``_foreach_mul_``). It is timed against
``loss.backward()`` of the same model and batch, in the same round: per round, for each method,
forward + ``balancer.loss`` (untimed), ``loss.backward()`` (timed), ``before_step()`` (timed); the ratio
is taken within the round, median and quartiles over rounds. Sizes run one after another (each model is
built, measured and freed), methods interleave within each round.

Synthetic models (concat fusion into 6 classes, every modality alike), two families:

- ``linear``: per modality ``--blocks`` residual blocks ``x + W2 relu(W1 x)`` on ``(batch, tokens,
  width)`` sequences, ``W1: Linear(width, h)`` (``h`` units: output rows of ``width`` weights) and
  ``W2: Linear(h, width)`` (``width`` units of ``h`` weights); ``h`` is set so that the model has about
  ``U`` units in all (1e3 ... 1e7, stopping at ``--max-units``);
- ``conv``: per modality ``--blocks`` residual blocks ``x + C2 relu(C1 x)`` on ``(batch, channels, side,
  side)`` maps, ``C1: Conv2d(channels, h, 3)`` (``h`` filters of ``9 * channels`` weights) and ``C2:
  Conv2d(h, channels, 1)``.

Then the number of modalities M (2, 4, 8, 16) at a fixed total of ``--m-units`` units (``linear``).

Printed per size and method: masking ms, backward ms, their ratio (median [quartiles]), masking ms per
million masked weights and per million units, and the growth exponent of the masking time from the
previous size (``log(t1 / t0) / log(U1 / U0)``: 1 is linear). ``padded`` is the size of the masker's
padded ``(groups, largest group)`` matrix, on which the sampling works: with groups of very different
sizes (a wide ``W1`` next to a narrow ``W2``) it exceeds the number of units.

The ratio to backward falls as the batch grows (backward's work grows with the rows through each layer,
the masking does not): ``--batch``/``--tokens``/``--side`` set them (defaults: 8 x 16 = 128 rows per
linear layer, 8 x 4 x 4 = 128 positions per conv; real models put more through each weight: a
transformer at batch 16 x 128 tokens 2048 rows, AMSS's ResNet18 on 224 frames about 1,300 multiply-adds
per weight per sample, so their ratios are lower than these).

Run:
    python benchmarks/masking_scale.py                              # 1 thread, up to 1e7 units (~30 minutes, ~16 GB)
    python benchmarks/masking_scale.py --threads 16                 # a many-core machine (~5-10 minutes)
    python benchmarks/masking_scale.py --max-units 1e6              # a small machine (~3 minutes, ~2 GB)
    python benchmarks/masking_scale.py --smoke                      # up to 1e4 units, 2 rounds (~5 s)
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import time
from collections.abc import Iterable

import torch
from torch import Tensor, nn

import equimodal as em

METHODS = ("amss", "amss_plus")
NUM_CLASSES = 6
SIZES = (1e3, 1e4, 1e5, 1e6, 1e7)
MODALITY_COUNTS = (2, 4, 8, 16)


class LinearStack(nn.Module):
    """Residual blocks ``x + W2 relu(W1 x)`` over ``(B, T, width)``; the feature is the token mean."""

    def __init__(self, width: int, hidden: int, blocks: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, width))
            for _ in range(blocks)
        )
        self.out_dim = width

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = x + block(x)
        return x.mean(1)


class ConvStack(nn.Module):
    """Residual blocks ``x + C2 relu(C1 x)`` over ``(B, C, S, S)``; the feature is the spatial mean."""

    def __init__(self, channels: int, hidden: int, blocks: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(channels, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, channels, 1)
            )
            for _ in range(blocks)
        )
        self.out_dim = channels

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = x + block(x)
        return x.mean((2, 3))


def build(
    family: str, units: float, modalities: int, args: argparse.Namespace
) -> tuple[nn.Module, dict[str, Tensor], Tensor]:
    """A model of about ``units`` mask units over ``modalities`` modalities, and one batch."""
    torch.manual_seed(0)
    width = args.width if family == "linear" else args.channels
    hidden = max(1, round(units / (modalities * args.blocks)) - width)
    g = torch.Generator().manual_seed(1)
    encoders: dict[str, nn.Module] = {}
    batch: dict[str, Tensor] = {}
    for i in range(modalities):
        if family == "linear":
            encoders[f"m{i}"] = LinearStack(width, hidden, args.blocks)
            batch[f"m{i}"] = torch.randn(args.batch, args.tokens, width, generator=g)
        else:
            encoders[f"m{i}"] = ConvStack(width, hidden, args.blocks)
            batch[f"m{i}"] = torch.randn(args.batch, width, args.side, args.side, generator=g)
    model = em.MultimodalClassifier(encoders, NUM_CLASSES, fusion="concat", validate_inputs=False)
    return model, batch, torch.randint(0, NUM_CLASSES, (args.batch,), generator=g)


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile)."""
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def measure(
    family: str, units: float, modalities: int, args: argparse.Namespace
) -> dict[str, dict[str, float]]:
    """Median masking and backward times (s) of each method, their ratio's quartiles, and the sizes."""
    model, batch, y = build(family, units, modalities, args)
    balancers = {m: em.create_balancer(m, model, seed=0) for m in METHODS}
    unit_tensors = [u for us in balancers["amss"].units.values() for u in us]
    num_units = sum(u.num_units for u in unit_tensors)
    num_weights = sum(
        t[:, u.columns].numel() if u.columns is not None else t.numel()
        for u in unit_tensors
        for t in u.tensors
    )
    backward: dict[str, list[float]] = {m: [] for m in METHODS}
    mask: dict[str, list[float]] = {m: [] for m in METHODS}
    ratio: dict[str, list[float]] = {m: [] for m in METHODS}
    for r in range(args.warmup + args.rounds):
        for name in METHODS if r % 2 == 0 else METHODS[::-1]:
            bal = balancers[name]
            model.zero_grad(set_to_none=True)
            loss = bal.loss(model(batch), y)
            t0 = time.perf_counter()
            loss.backward()
            t1 = time.perf_counter()
            bal.before_step()
            t2 = time.perf_counter()
            del loss
            if r >= args.warmup:
                backward[name].append(t1 - t0)
                mask[name].append(t2 - t1)
                ratio[name].append((t2 - t1) / (t1 - t0))
    padded = balancers["amss"].masker.layout().norms.numel()
    out = {}
    for name in METHODS:
        q1, med, q3 = quartiles(ratio[name])
        out[name] = {
            "units": num_units, "weights": num_weights, "tensors": len(unit_tensors), "padded": padded,
            "backward": statistics.median(backward[name]), "mask": statistics.median(mask[name]),
            "ratio": med, "q1": q1, "q3": q3,
        }  # fmt: skip
    del model, balancers, batch
    gc.collect()
    return out


HEADER = (
    "| {key} | units | masked weights | tensors | padded | backward (ms) | method | before_step (ms) "
    "| before_step / backward: median [quartiles] | ms per M weights | ms per M units | growth exponent |"
)


def print_rows(key: str, rows: Iterable[tuple[str, dict[str, dict[str, float]]]], growth_of: bool) -> None:
    """Print the table, a row as each size is measured (``growth_of``: print the growth exponent)."""
    head = HEADER.format(key=key)
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    prev: dict[str, dict[str, float]] = {}
    for label, res in rows:
        for name in METHODS:
            s = res[name]
            growth = "-"
            if growth_of and name in prev:
                growth = f"{math.log(s['mask'] / prev[name]['mask']) / math.log(s['units'] / prev[name]['units']):.2f}"
            print(
                f"| {label} | {s['units']:.3g} | {s['weights']:.3g} | {s['tensors']:.0f} | {s['padded']:.3g} "
                f"| {s['backward'] * 1e3:.2f} | {name} | {s['mask'] * 1e3:.2f} "
                f"| {s['ratio']:.3f} [{s['q1']:.3f}, {s['q3']:.3f}] | {s['mask'] * 1e3 / (s['weights'] / 1e6):.3f} "
                f"| {s['mask'] * 1e3 / (s['units'] / 1e6):.3f} | {growth} |",
                flush=True,
            )
            prev[name] = s


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per size")
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed rounds first (builds the masker's layout)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--max-units", type=float, default=1e7, help="largest size of the units sweep")
    parser.add_argument("--m-units", type=float, default=1e6, help="total units of the modality sweep")
    parser.add_argument("--families", default="linear,conv", help="comma-separated: linear,conv")
    parser.add_argument("--blocks", type=int, default=4, help="residual blocks per modality")
    parser.add_argument("--width", type=int, default=16, help="linear: token width (weights per W1 row)")
    parser.add_argument("--channels", type=int, default=4, help="conv: channels between blocks")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16, help="linear: tokens per sample")
    parser.add_argument("--side", type=int, default=4, help="conv: map side")
    parser.add_argument("--smoke", action="store_true", help="up to 1e4 units, M in (2, 4), 2 rounds")
    args = parser.parse_args()
    counts: tuple[int, ...] = MODALITY_COUNTS
    if args.smoke:
        args.rounds, args.warmup, args.max_units, args.m_units, counts = 2, 1, 1e4, 1e4, (2, 4)
    torch.set_num_threads(args.threads)
    print(
        f"# AMSS masking cost against backward: torch {torch.__version__}, CPU, {args.threads} thread(s), "
        f"{args.rounds} rounds{', SMOKE' if args.smoke else ''}; linear: batch {args.batch} x {args.tokens} "
        f"tokens x width {args.width}; conv: batch {args.batch} x {args.channels} x {args.side} x {args.side}; "
        f"{args.blocks} blocks per modality\n"
    )
    sizes = [u for u in SIZES if u <= args.max_units]
    families = [f for f in args.families.split(",") if f]
    for family in families:
        print(f"\n## Units sweep, {family}, M = 2\n")
        print_rows("family", ((family, measure(family, u, 2, args)) for u in sizes), True)
    print(f"\n## Modalities sweep, linear, about {args.m_units:.0e} units in all\n")
    print_rows("M", ((str(m), measure("linear", args.m_units, m, args)) for m in counts), False)


if __name__ == "__main__":
    main()
