"""Overhead of the AMSS / AMSS+ balancers (Yang et al., TPAMI 2025) on the audio-visual ResNet18 pair.

Builds the official audio-visual model: two ResNet18 encoders from scratch (GELU, as in the official
code), audio on a 1x257x188 log-spectrogram, visual on one RGB frame, concat fusion into 6 classes
(CREMA-D), SGD (lr 0.01, momentum 0.9, weight decay 1e-4), batch 8. On CPU the frame defaults to
3x112x112 (``--frame 224`` for the official size). The ResNet stems and downsample convs carry
``amss_skip``, so 16 convs per encoder plus the two fusion-head blocks are masked.

It times, side by side and interleaved in one run (one step of each method per round, same model, same
batch), the optimizer step = forward + loss + backward + ``before_step`` + ``optimizer.step`` of plain
joint training (``none``), ``amss`` and ``amss_plus``, and the ``before_step`` call alone, then prints
the medians and the ratios to ``none``.

Run:
    python benchmarks/amss_overhead.py            # 30 rounds, 1 thread, CPU (a few minutes)
    python benchmarks/amss_overhead.py --quick    # 3 rounds: a sanity run
    python benchmarks/amss_overhead.py --device cuda --frame 224 --rounds 50
"""

from __future__ import annotations

import argparse
import logging
import statistics

import torch
from steptime import device_sync, timed_step

import equimodal as em
from equimodal.models.encoders import create_encoder

log = logging.getLogger("amss_overhead")
METHODS = ("none", "amss", "amss_plus")


def build(
    frame: int, device: torch.device, batch_size: int = 8
) -> tuple[torch.nn.Module, dict[str, torch.Tensor], torch.Tensor]:
    """The audio-visual ResNet18 pair with a concat head, and one batch (8 by default)."""
    torch.manual_seed(0)
    encoders = {
        "audio": create_encoder("resnet18", in_channels=1, activation="gelu"),
        "visual": create_encoder("resnet18", in_channels=3, activation="gelu"),
    }
    model = em.MultimodalClassifier(encoders, 6, fusion="concat", validate_inputs=False).to(device)
    g = torch.Generator().manual_seed(1)
    batch = {
        "audio": torch.randn(batch_size, 1, 257, 188, generator=g).to(device),
        "visual": torch.randn(batch_size, 3, frame, frame, generator=g).to(device),
    }
    return model, batch, torch.randint(0, 6, (batch_size,), generator=g).to(device)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds (each runs every method once)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--frame", type=int, default=112, help="visual frame size (official: 224)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8, help="batch size (the official timing used 8)")
    parser.add_argument("--quick", action="store_true", help="3 rounds, 1 warm-up: a sanity run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.quick:
        args.rounds, args.warmup = 3, 1
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = device_sync(device)

    model, batch, y = build(args.frame, device, args.batch)
    balancers = {name: em.create_balancer(name, model, seed=0) for name in METHODS}
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    units = balancers["amss"].units
    num_t = sum(len(u) for u in units.values())
    num_w = sum(
        u.param[:, u.columns].numel() if u.columns else u.param.numel() for us in units.values() for u in us
    )
    log.info(
        "device %s, threads %d, batch %d, audio 1x257x188, visual 3x%dx%d; %d masked tensors, %.1f M weights",
        device, args.threads, args.batch, args.frame, args.frame, num_t, num_w / 1e6,
    )  # fmt: skip

    step_t: dict[str, list[float]] = {m: [] for m in METHODS}
    mask_t: dict[str, list[float]] = {m: [] for m in METHODS}
    for r in range(args.warmup + args.rounds):
        for name in METHODS:
            whole, masking = timed_step(model, balancers[name], opt, batch, y, sync)
            if r >= args.warmup:
                step_t[name].append(whole)
                mask_t[name].append(masking)
        if r >= args.warmup:
            log.info(
                "round %d: %s",
                r - args.warmup + 1,
                "  ".join(f"{m} {step_t[m][-1] * 1e3:.0f} ms" for m in METHODS),
            )

    base = statistics.median(step_t["none"])
    log.info("\nmedian over %d rounds (interleaved)", args.rounds)
    log.info("%-10s %12s %8s %16s %14s", "method", "step (ms)", "ratio", "before_step (ms)", "mask/none step")
    for name in METHODS:
        med, mask = statistics.median(step_t[name]), statistics.median(mask_t[name])
        log.info(
            "%-10s %12.1f %8.3f %16.2f %13.2f%%", name, med * 1e3, med / base, mask * 1e3, 100 * mask / base
        )
    s = balancers["amss_plus"].stats()
    log.info(
        "last amss_plus step: %s",
        ", ".join(f"{k}={v:.3f}" for k, v in s.items() if k.startswith(("k/", "kept"))),
    )


if __name__ == "__main__":
    main()
