"""One GPU check of the CREMA-D workload, for anyone with a CUDA device (about 3-5 minutes).

Prints one table with three parts, each measured side by side in this process:

1. **recipe**: a few hundred optimizer steps of the ``cremad`` recipe (two ResNet18s with GELU, concat
   head into 6 classes, SGD lr 0.01 momentum 0.9 weight decay 1e-4, AMSS with T = 0.2) through
   equimodal's epoch fitter, on synthetic tensors of CREMA-D size (a 1x257x188 log-spectrogram and one
   3x224x224 frame), batch 64: steps per second, peak memory, and whether every loss stayed finite;
2. **overhead**: the step time of ``amss`` and ``amss_plus`` against plain joint training (``none``) at
   batch 8 and 64 (forward + loss + backward + ``before_step`` + ``optimizer.step``, interleaved rounds,
   CUDA-synchronised), and the ``before_step`` call alone;
3. **bf16**: the same AMSS+ step under ``torch.autocast(dtype=torch.bfloat16)``: step time against fp32,
   finite losses and gradients, the masked fraction still within its bounds.

Run it from the repository root on a machine with a GPU and torch installed::

    bash benchmarks/gpu_check.sh            # the machine's python3 and torch; equimodal from src/
    python benchmarks/gpu_check.py --steps 300 --rounds 20   # where equimodal is installed
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch

import equimodal as em
from equimodal.data.base import TensorSplit, make_loader
from equimodal.engine.fitting import EpochFitter, StepContext
from equimodal.models.encoders import create_encoder

SIZES = {"audio": (1, 257, 188), "visual": (3, 224, 224)}  # CREMA-D; --smoke shrinks them


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_and_batch(
    batch: int, device: torch.device
) -> tuple[torch.nn.Module, dict[str, torch.Tensor], torch.Tensor]:
    torch.manual_seed(0)
    encoders = {
        "audio": create_encoder("resnet18", in_channels=1, activation="gelu"),
        "visual": create_encoder("resnet18", in_channels=3, activation="gelu"),
    }
    model = em.MultimodalClassifier(encoders, 6, validate_inputs=False).to(device)
    g = torch.Generator().manual_seed(1)
    x = {m: torch.randn(batch, *shape, generator=g).to(device) for m, shape in SIZES.items()}
    return model, x, torch.randint(0, 6, (batch,), generator=g).to(device)


def recipe(steps: int, device: torch.device, batch: int = 64) -> list[tuple[str, str]]:
    """``steps`` steps of the cremad recipe with AMSS through the epoch fitter."""
    n = batch * 8
    model, _, _ = model_and_batch(1, device)
    g = torch.Generator().manual_seed(2)
    inputs = {m: torch.randn(n, *shape, generator=g) for m, shape in SIZES.items()}
    split = TensorSplit(inputs, torch.randint(0, 6, (n,), generator=g))
    balancer = em.create_balancer("amss", model, temperature=0.2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    fitter = EpochFitter(StepContext(model, balancer, opt, scaler, 1, False, device))
    loader = make_loader(split, batch, train=True, seed=0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses, done, epoch = [], 0, 0
    sync(device)
    tic = time.perf_counter()
    while done < steps:
        loader.sampler.set_epoch(epoch)
        balancer.set_epoch(epoch)
        state = fitter.fit(loader, epoch=epoch)
        losses.append(state.mean_loss)
        stats = state.mean_stats()
        done += len(loader)
        epoch += 1
    sync(device)
    seconds = time.perf_counter() - tic
    finite = all(math.isfinite(v) for v in losses)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return [
        (
            f"recipe: steps (batch {batch}, AMSS T=0.2)",
            f"{done} in {seconds:.1f} s = {done / seconds:.1f} steps/s",
        ),
        ("recipe: every epoch's loss finite", f"{finite} (first {losses[0]:.3f}, last {losses[-1]:.3f})"),
        ("recipe: peak GPU memory", f"{peak:.2f} GiB"),
        (
            "recipe: last step k/audio, k/visual",
            f"{stats.get('k/audio', float('nan')):.2f}, {stats.get('k/visual', float('nan')):.2f}",
        ),
    ]


def timed_step(model, balancer, opt, x, y, bf16: bool) -> tuple[float, float, float]:
    """One step; returns (step seconds, before_step seconds, loss)."""
    device = y.device
    sync(device)
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = balancer.loss(model(x), y)
    loss.backward()
    sync(device)
    t1 = time.perf_counter()
    balancer.before_step()
    sync(device)
    t2 = time.perf_counter()
    opt.step()
    sync(device)
    return time.perf_counter() - t0, t2 - t1, float(loss.detach())


def overhead(
    batch: int, rounds: int, device: torch.device, bf16: bool = False
) -> dict[str, tuple[float, float, bool]]:
    """Median step and before_step times of none / amss / amss_plus, interleaved."""
    model, x, y = model_and_batch(batch, device)
    names = ("none", "amss", "amss_plus")
    balancers = {n: em.create_balancer(n, model, seed=0) for n in names}
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    times: dict[str, list[tuple[float, float, float]]] = {n: [] for n in names}
    for r in range(rounds + 3):
        for n in names:
            t = timed_step(model, balancers[n], opt, x, y, bf16)
            if r >= 3:
                times[n].append(t)
    return {
        n: (
            statistics.median(t[0] for t in v),
            statistics.median(t[1] for t in v),
            all(math.isfinite(t[2]) for t in v),
        )
        for n, v in times.items()
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=300, help="steps of the recipe")
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds of the overhead comparison")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes on any device: checks the script runs"
    )
    args = parser.parse_args()
    if args.smoke:
        SIZES.update(audio=(1, 32, 24), visual=(3, 32, 32))
        args.steps, args.rounds = 4, 1
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False).", file=sys.stderr)
        return 2
    else:
        device = torch.device("cuda")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rows = [("device", f"{name}, torch {torch.__version__}, sizes {SIZES}")]
    rows += recipe(args.steps, device, 4 if args.smoke else 64)
    for batch in (8, 64):
        res = overhead(batch, args.rounds, device)
        base = res["none"][0]
        for n in ("amss", "amss_plus"):
            step, mask, _ = res[n]
            rows.append(
                (
                    f"overhead: {n} / none, batch {batch}",
                    f"{step / base:.3f} (step {step * 1e3:.1f} ms, before_step {mask * 1e3:.2f} ms)",
                )
            )
    # bf16 autocast on a CPU without bf16 units is emulated and slow (minutes at batch 64): the smoke run
    # only checks that this path runs, at batch 8
    size = 8 if args.smoke else 64
    fp32, bf16 = overhead(size, args.rounds, device), overhead(size, args.rounds, device, bf16=True)
    rows.append(
        (
            f"bf16: amss_plus step, bf16 / fp32, batch {size}",
            f"{bf16['amss_plus'][0] / fp32['amss_plus'][0]:.3f}",
        )
    )
    rows.append(("bf16: every loss finite", str(bf16["amss_plus"][2])))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
