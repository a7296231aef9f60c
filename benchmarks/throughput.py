"""Training throughput of equimodal's epoch fitter against a hand-written PyTorch loop.

Both loops run over the *same* ``DataLoader``, model and balancer, interleaved round by round in one
process, so machine noise hits both alike. The hand-written loop is the README's two-call loop::

    for batch, y in loader:
        out = model(batch); balancer.loss(out, y, batch=batch).backward()
        balancer.before_step(); optimizer.step(); optimizer.zero_grad()

and equimodal's is :class:`equimodal.engine.fitting.EpochFitter` (what ``equimodal train`` runs each epoch: it
also moves batches to the device, runs autocast and the GradScaler when enabled, queues the non-finite
flags of every micro-batch (read every 50 steps), averages the balancer's statistics every step, and
calls the trainer's between-step hook, here with what it does when no checkpoint or log line is due). Printed per workload: samples per second of each (medians), the median
and quartiles of the ratio of adjacent epochs (pairing cancels the machine's slow drifts; goal: at least
0.97), and the data-loading share of the hand-written loop's epoch (time spent waiting
for the next batch over the epoch's time).

Workloads:

- ``memory``: an in-memory :class:`~equimodal.data.base.TensorSplit` (512 samples of a 13x32 sequence
  and a 1x32x32 image; conv1d + cnn encoders);
- ``overhead``: a tiny MLP pair (about 1 ms a step), to show the fitter's own cost per step in
  microseconds (it moves batches to the device and averages the balancer's statistics);
- ``disk``: a manifest of on-disk ``.npy`` (13x32), ``.wav`` (0.5 s at 16 kHz, as a log-spectrogram)
  and ``.png`` (32x32 grey) files written by this script (256 samples), loaded by the ``manifest``
  dataset with 0 and 2 ``DataLoader`` workers.

Run:
    python benchmarks/throughput.py                # 20 rounds (about 10 minutes on 2 cores)
    python benchmarks/throughput.py --quick        # 1 round: a sanity run
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import equimodal as em
from equimodal.data.base import LoaderOptions, TensorSplit, make_loader
from equimodal.engine.fitting import EpochFitter, StepContext
from equimodal.models.encoders import create_encoder
from equimodal.utils.interrupt import StopRequest

BALANCERS = ("none", "amss_plus")


def memory_encoders() -> dict[str, torch.nn.Module]:
    return {"audio": create_encoder("conv1d", in_channels=13), "image": create_encoder("cnn", in_channels=1)}


def memory_split(n: int = 512) -> TensorSplit:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (n,), generator=g)
    inputs = {
        "audio": torch.randn(n, 13, 32, generator=g) + 0.1 * y[:, None, None],
        "image": torch.randn(n, 1, 32, 32, generator=g) + 0.1 * y[:, None, None, None],
    }
    return TensorSplit(inputs, y)


def disk_manifest(root: Path, n: int = 256) -> Path:
    """Write ``n`` samples of npy / wav / png files and their manifest; returns the manifest's path."""
    import soundfile
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        label = i % 8
        np.save(root / f"f{i}.npy", (rng.standard_normal((13, 32)) + 0.1 * label).astype(np.float32))
        wave = 0.1 * rng.standard_normal(8000) + 0.05 * np.sin(np.arange(8000) * (label + 1) / 50)
        soundfile.write(root / f"a{i}.wav", wave.astype(np.float32), 16000)
        pixels = np.clip(rng.normal(128 + 8 * label, 30, (32, 32)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(root / f"i{i}.png")
        rows.append({"label": label, "feat": f"f{i}.npy", "audio": f"a{i}.wav", "image": f"i{i}.png"})
    path = root / "manifest.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def hand_written_epoch(model, balancer, optimizer, loader, epoch: int) -> tuple[float, float, int]:
    """The README's loop over one epoch; returns (seconds, seconds waiting for data, samples)."""
    loader.sampler.set_epoch(epoch)
    balancer.set_epoch(epoch)
    model.train()
    waited, samples = 0.0, 0
    tic = time.perf_counter()
    it = iter(loader)
    while True:
        t0 = time.perf_counter()
        try:
            batch, y = next(it)
        except StopIteration:
            break
        waited += time.perf_counter() - t0
        out = model(batch)
        balancer.loss(out, y, batch=batch).backward()
        balancer.before_step()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        samples += len(y)
    return time.perf_counter() - tic, waited, samples


def fitter_epoch(model, balancer, optimizer, loader, epoch: int) -> tuple[float, float, int]:
    """equimodal's epoch fitter over one epoch; returns (seconds, 0, samples)."""
    loader.sampler.set_epoch(epoch)
    balancer.set_epoch(epoch)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    fitter = EpochFitter(StepContext(model, balancer, optimizer, scaler, 1, False, torch.device("cpu")))
    stop = StopRequest()
    tic = time.perf_counter()

    def after_step(state, check) -> None:  # what the trainer does between steps when nothing is due
        state.seconds = time.perf_counter() - tic
        stop.requested(state.steps, 1, torch.device("cpu"))

    fitter.fit(loader, epoch=epoch, after_step=after_step)
    return time.perf_counter() - tic, 0.0, len(loader.sampler)


def measure(
    label: str, split, encoders: Callable[[], dict], classes: int, rounds: int, workers: int
) -> list[tuple[str, ...]]:
    rows = []
    for name in BALANCERS:
        torch.manual_seed(0)
        model = em.MultimodalClassifier(encoders(), classes, validate_inputs=False)
        balancer = em.create_balancer(name, model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        opts = LoaderOptions(num_workers=workers, persistent_workers=workers > 0)
        loader = make_loader(split, 32, train=True, seed=1, options=opts)
        hand_written_epoch(model, balancer, optimizer, loader, 0)  # warm-up (workers start, caches fill)
        fitter_epoch(model, balancer, optimizer, loader, 0)
        hand, ours, ratios, share = [], [], [], []
        for r in range(rounds):  # adjacent epochs of the two loops, in alternating order: paired ratios
            speed = {}
            for fn in (hand_written_epoch, fitter_epoch)[:: 1 if r % 2 == 0 else -1]:
                seconds, waited, samples = fn(model, balancer, optimizer, loader, r + 1)
                speed[fn] = samples / seconds
                if fn is hand_written_epoch:
                    share.append(waited / seconds)
            hand.append(speed[hand_written_epoch])
            ours.append(speed[fitter_epoch])
            ratios.append(speed[fitter_epoch] / speed[hand_written_epoch])
        q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
        rows.append((
            label, str(workers), name, f"{statistics.median(hand):.0f}", f"{statistics.median(ours):.0f}",
            f"{statistics.median(ratios):.3f} [{q1:.3f}, {q3:.3f}]", f"{100 * statistics.median(share):.1f}%",
        ))  # fmt: skip
        print(" | ".join(rows[-1]), flush=True)
    return rows


def overhead_per_step(rounds: int) -> None:
    """The fitter's own cost per step, in microseconds: both loops on a tiny MLP pair (about 1 ms a step)."""
    g = torch.Generator().manual_seed(0)
    n = 2048
    split = TensorSplit(
        {m: torch.randn(n, 8, generator=g) for m in ("a", "b")}, torch.randint(0, 3, (n,), generator=g)
    )
    for name in BALANCERS:
        encoders = {m: create_encoder("mlp", in_dim=8, hidden=(8,)) for m in ("a", "b")}
        model = em.MultimodalClassifier(encoders, 3, validate_inputs=False)
        balancer = em.create_balancer(name, model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        loader = make_loader(split, 32, train=True, seed=1)
        hand_written_epoch(model, balancer, optimizer, loader, 0)
        fitter_epoch(model, balancer, optimizer, loader, 0)
        diffs, step = [], []
        for r in range(max(rounds, 5)):
            a = hand_written_epoch(model, balancer, optimizer, loader, r)[0]
            b = fitter_epoch(model, balancer, optimizer, loader, r)[0]
            diffs.append((b - a) / len(loader) * 1e6)
            step.append(a / len(loader) * 1e3)
        print(
            f"overhead | 0 | {name} | hand-written step {statistics.median(step):.2f} ms | equimodal adds "
            f"{statistics.median(diffs):.0f} us per step (median of paired epochs)",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=20, help="timed epochs of each loop")
    parser.add_argument("--quick", action="store_true", help="1 round")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the model")
    args = parser.parse_args()
    rounds = 1 if args.quick else args.rounds
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {rounds} round(s), batch 32, CPU")
    print(
        "workload | workers | balancer | hand-written samples/s | equimodal samples/s | "
        "ratio, median of paired epochs [quartiles] | data-loading share"
    )
    rows = []
    overhead_per_step(rounds)
    rows += measure("memory", memory_split(), memory_encoders, 10, rounds, 0)
    with tempfile.TemporaryDirectory() as tmp:
        path = disk_manifest(Path(tmp))
        ds = em.load_dataset(
            "manifest",
            path=str(path),
            audio_seconds=0.5,
            image_size=32,
            image_mode="L",
            n_fft=256,
            hop_length=128,
        )
        for workers in (0, 2):
            rows += measure("disk", ds.train, ds.default_encoders, ds.num_classes, rounds, workers)


if __name__ == "__main__":
    main()
