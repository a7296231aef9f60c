"""Optimizer-step time and peak memory of every registered balancer, relative to plain joint training.

Two workloads, each one model shared by all balancers (``equimodal.list_balancers()`` but those that plan
their epochs' data or need mid fusion, which ``benchmarks/epoch_cost.py`` measures in epochs):

- ``av``: the audio-visual ResNet18 pair of AMSS's CREMA-D setup: audio
  ``create_encoder("resnet18", in_channels=1, activation="gelu")`` on a 1x257x188 log-spectrogram,
  visual ``create_encoder("resnet18", in_channels=3, activation="gelu")`` on one 3x224x224 frame
  (``--small``: 1x128x94 and 3x112x112), concat fusion into 6 classes, batch 16;
- ``transformer``: two ``transformer`` encoders (d_model 128, 4 heads, 2 layers, feed-forward 256) on an
  audio-like sequence of 100 80-d frames and a text-like sequence of 50 300-d word vectors, concat fusion
  into 6 classes, batch 16 (about 50-200 ms a step on one CPU core).

Each balancer is driven by :func:`equimodal.testing.drive_step` (it makes every call
``balancer.requirements`` asks for: ``train_step`` for MLA, ``batch=`` for AGM, ...) with SGD (lr 1e-3,
momentum 0.9, weight decay 1e-4) over the model's and every balancer's own parameters. ``drive_step``
also returns copies of the gradients, which a training loop does not make, so the model is handed to
it through a thin wrapper whose ``named_parameters()`` is empty: that copy (one read and one write of
every gradient) is not timed. ``unimodal`` is built with ``modality=`` the first modality, as in the
contract tests.

Step time: per round, one step of every balancer (in an order rotated each round, so no balancer
always follows the same one), on one of four fixed batches; the ratio to ``none``'s step of the same
round, median and quartiles over the rounds.

Epoch-level work (``prepare_epoch``: G-Blending's model copies, PMR's prototypes, MSLR's held-out
accuracy) is not in the step time. It is timed once at epoch 0 (before the rounds) and once at epoch 1
(after them) over ``--epoch-batches`` training batches and one held-out batch, and printed in ms and in
plain steps per training batch of that epoch (its per-step cost in an epoch of that many batches; it
scales with the epoch's length). G-Blending (online) redoes its epoch-0 work every ``super_epoch``
epochs (10 by default), so its epoch-1 figure is 0.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` during each balancer's step (peak reset
before it), median over rounds, its ratio to ``none``'s, and the same for the peak over the memory
allocated at the step's start (the step's own gradients, activations and temporaries). On CPU, for each balancer a fresh
subprocess builds the workload, does the epoch-level work and one plain step on a throw-away copy of the
model (so that every process has loaded the same kernels), resets the peak resident set size (Linux
``/proc/self/clear_refs``, after ``malloc_trim``), reads the peak (``VmHWM`` in ``/proc/self/status``), takes
``--memory-steps`` steps and reads it again: the increase is the process RSS growth of the steps
(gradients, momentum buffers, activations, the balancer's own state), printed in MiB and relative to
``none``'s. It is process RSS, so allocator caching blurs it by a few MiB.

Run:
    python benchmarks/balancer_cost.py --small                      # CPU, 1 thread, 10 rounds (~5 minutes)
    python benchmarks/balancer_cost.py                              # CPU, CREMA-D sizes (~15 minutes)
    python benchmarks/balancer_cost.py --device cuda --rounds 30    # a GPU (~2-3 minutes)
    python benchmarks/balancer_cost.py --smoke                      # tiny sizes, 2 rounds: a sanity run (~1 min)

(Times for a quiet machine; about a third of each is the CPU memory subprocesses, ``--memory-steps 0``
skips them, and G-Blending's epoch-0 work, which trains 30 model copies' steps.)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

import equimodal as em
from equimodal.balancers import Balancer, EpochData, get_balancer_class
from equimodal.models.encoders import create_encoder
from equimodal.testing import drive_step, start_epoch

WORKLOADS = ("av", "transformer")
NUM_CLASSES = 6
NUM_BATCHES = 4  # fixed batches cycled over the rounds (the model is not fit to a single batch)
Batch = dict[str, Tensor]


def step_level_balancers() -> list[str]:
    """Every registered balancer but those that plan their epochs' data (they cost whole passes and copies,
    not step time) or need a mid-fusion model: ``benchmarks/epoch_cost.py`` measures those in epochs."""
    return [
        n for n in em.list_balancers()
        if not (get_balancer_class(n).plans_data or get_balancer_class(n).model_fusion)
    ]  # fmt: skip


def options_for(name: str, model: nn.Module) -> dict[str, Any]:
    """Constructor options a balancer needs besides the model (as in the contract tests)."""
    if name == "umt":  # the cost of the teachers' forward passes: copies of the encoders stand in for them
        return {"teachers": {m: copy.deepcopy(e) for m, e in model.encoders.items()}}
    return {"modality": next(iter(model.encoders))} if name == "unimodal" else {}


@dataclass
class Workload:
    """One model, its fixed batches, and a line saying what it is."""

    model: nn.Module
    batches: list[tuple[Batch, Tensor]]
    heldout: tuple[Batch, Tensor]
    label: str


def build_workload(name: str, args: argparse.Namespace, device: torch.device) -> Workload:
    """The ``av`` or ``transformer`` model (seeded) and ``NUM_BATCHES`` + 1 random batches on ``device``."""
    torch.manual_seed(0)
    b = args.batch
    if name == "av":
        width = 8 if args.smoke else 64
        audio, frame = (
            ((1, 32, 24), 32) if args.smoke else ((1, 128, 94), 112) if args.small else ((1, 257, 188), 224)
        )
        encoders = {
            "audio": create_encoder("resnet18", in_channels=1, activation="gelu", base_channels=width),
            "visual": create_encoder("resnet18", in_channels=3, activation="gelu", base_channels=width),
        }
        shapes = {"audio": audio, "visual": (3, frame, frame)}
        label = (
            f"av: ResNet18 pair (GELU, base width {width}), audio {'x'.join(map(str, audio))}, "
            f"visual 3x{frame}x{frame}, concat, {NUM_CLASSES} classes, batch {b}"
        )
    elif name == "transformer":
        d, frames, words = (32, 12, 8) if args.smoke else (128, 100, 50)
        encoders = {
            "audio": create_encoder("transformer", in_dim=80, d_model=d, num_heads=4, num_layers=2),
            "text": create_encoder("transformer", in_dim=300, d_model=d, num_heads=4, num_layers=2),
        }
        shapes = {"audio": (frames, 80), "text": (words, 300)}
        label = (
            f"transformer: two pre-norm transformers (d_model {d}, 4 heads, 2 layers, ff {2 * d}), "
            f"audio {frames}x80, text {words}x300, concat, {NUM_CLASSES} classes, batch {b}"
        )
    else:
        raise ValueError(f"workload must be one of {WORKLOADS}, found {name!r}.")
    model = em.MultimodalClassifier(encoders, NUM_CLASSES, fusion="concat", validate_inputs=False).to(device)
    g = torch.Generator().manual_seed(1)

    def batch() -> tuple[Batch, Tensor]:
        x = {m: torch.randn(b, *s, generator=g).to(device) for m, s in shapes.items()}
        return x, torch.randint(0, NUM_CLASSES, (b,), generator=g).to(device)

    batches = [batch() for _ in range(NUM_BATCHES)]
    return Workload(model, batches, batch(), label)


class _Forward:
    """The model's forward for :func:`drive_step`, without parameters, so that it copies no gradient."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, batch: Batch) -> Any:
        return self.model(batch)

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return iter(())


def epoch_data(work: Workload, num_batches: int, device: torch.device) -> EpochData:
    train = [work.batches[i % len(work.batches)] for i in range(num_batches)]
    return EpochData(train=lambda: iter(train), heldout=lambda: iter([work.heldout]), device=device)


def make_balancers(names: list[str], model: nn.Module) -> tuple[dict[str, Balancer], torch.optim.Optimizer]:
    balancers = {n: em.create_balancer(n, model, seed=0, **options_for(n, model)) for n in names}
    params = [*model.parameters()] + [p for b in balancers.values() for p in b.parameters()]
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=1e-4)
    return balancers, opt


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile)."""
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def fmt_ratio(xs: list[float]) -> str:
    q1, med, q3 = quartiles(xs)
    return f"{med:.3f} [{q1:.3f}, {q3:.3f}]"


# ---------------------------------------------------------------------- CPU memory: one subprocess each
def _reset_peak_rss() -> bool:
    """Release freed heap to the OS and reset the peak RSS to the current RSS (Linux); False if unsupported."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # glibc only
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_kib() -> int:
    """This process's peak RSS in KiB: ``VmHWM`` (which ``clear_refs`` resets), else ``ru_maxrss``.

    ``getrusage().ru_maxrss`` cannot be used after a reset: at ``exec`` the kernel carries the forking
    parent's peak RSS into it, so a child forked from a large parent reads the parent's peak.
    """
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _warm_up(work: Workload) -> None:
    """One plain step on a throw-away copy of the model, so that every process has touched the same code
    pages and one-off state (libtorch's kernels, the autograd engine) before its peak is reset."""
    clone = copy.deepcopy(work.model)
    opt = torch.optim.SGD(clone.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    x, y = work.batches[0]
    torch.nn.functional.cross_entropy(clone(x).logits, y).backward()
    opt.step()
    del clone, opt


def rss_worker(args: argparse.Namespace) -> None:
    """Child process: one balancer's peak RSS increase over ``--memory-steps`` steps, as one JSON line."""
    device = torch.device("cpu")
    work = build_workload(args.workload, args, device)
    balancers, opt = make_balancers([args.rss_worker], work.model)
    bal = balancers[args.rss_worker]
    start_epoch(bal, 0, epoch_data(work, 1, device))
    _warm_up(work)
    reset = _reset_peak_rss()
    before = _peak_rss_kib()
    for i in range(args.memory_steps):
        x, y = work.batches[i % len(work.batches)]
        drive_step(bal, _Forward(work.model), x, y, opt)
    after = _peak_rss_kib()
    print(json.dumps({"increase_kib": after - before, "before_kib": before, "reset": reset}))


def rss_increases(names: list[str], workload: str, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Run :func:`rss_worker` for each balancer in a fresh subprocess."""
    out = {}
    for name in names:
        cmd = [sys.executable, __file__, "--rss-worker", name, "--workload", workload]
        cmd += ["--batch", str(args.batch), "--threads", str(args.threads)]
        cmd += ["--memory-steps", str(args.memory_steps)]
        cmd += ["--small"] * args.small + ["--smoke"] * args.smoke
        # A fixed mmap threshold (glibc) stops the threshold from growing after frees, so every buffer of
        # 64 KiB or more is mapped on allocation and unmapped on free: RSS then follows live memory, and a
        # small model's step no longer hides inside heap pages that the warm-up left behind.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"memory subprocess for {name} on {workload} failed:\n{proc.stderr}")
        out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


# ---------------------------------------------------------------------- timing, interleaved
def time_epoch_work(
    balancers: Mapping[str, Balancer], epoch: int, data: EpochData, sync: Callable[[], None]
) -> dict[str, float]:
    """``set_epoch`` + ``prepare_epoch`` of each balancer that uses epoch data, in seconds."""
    out = {}
    for name, bal in balancers.items():
        sync()
        t0 = time.perf_counter()
        start_epoch(bal, epoch, data)
        sync()
        if bal.requirements.epoch_data:
            out[name] = time.perf_counter() - t0
    return out


def measure(workload: str, names: list[str], args: argparse.Namespace, device: torch.device) -> None:
    sync: Callable[[], None] = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    memory = rss_increases(names, workload, args) if device.type == "cpu" and args.memory_steps else {}
    work = build_workload(workload, args, device)
    balancers, opt = make_balancers(names, work.model)
    data = epoch_data(work, args.epoch_batches, device)
    epoch0 = time_epoch_work(balancers, 0, data, sync)
    fwd = _Forward(work.model)
    step: dict[str, list[float]] = {n: [] for n in names}
    ratio: dict[str, list[float]] = {n: [] for n in names}
    peak: dict[str, list[float]] = {n: [] for n in names}
    extra: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.warmup + args.rounds):
        x, y = work.batches[r % len(work.batches)]
        shift = r % len(names)
        this: dict[str, float] = {}
        for name in names[shift:] + names[:shift]:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                start = torch.cuda.memory_allocated(device)
            sync()
            t0 = time.perf_counter()
            drive_step(balancers[name], fwd, x, y, opt)
            sync()
            this[name] = time.perf_counter() - t0
            if device.type == "cuda" and r >= args.warmup:
                peak[name].append(torch.cuda.max_memory_allocated(device) / 2**20)
                extra[name].append(peak[name][-1] - start / 2**20)
        if r >= args.warmup:
            for name in names:
                step[name].append(this[name])
                ratio[name].append(this[name] / this["none"])
    epoch1 = time_epoch_work(balancers, 1, data, sync)
    base = statistics.median(step["none"])
    print(f"\n### {work.label}\n")
    print(f"{args.rounds} rounds after {args.warmup} warm-up, device {device}, {args.threads} thread(s)\n")
    mem_head = (
        "peak allocated (MiB) | peak / none's | peak over the step's start / none's"
        if device.type == "cuda"
        else f"process RSS increase over {args.memory_steps} steps (MiB) | increase / none's"
    )
    head = f"| balancer | step (ms) | step / none's: median [quartiles] | {mem_head} | epoch-level work |"
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    for name in names:
        med = statistics.median(step[name]) * 1e3
        if device.type == "cuda":
            p, p0 = statistics.median(peak[name]), statistics.median(peak["none"])
            e, e0 = statistics.median(extra[name]), statistics.median(extra["none"])
            mem = f"{p:.0f} | {p / p0:.3f} | {e:.0f} / {e0:.0f} = {e / max(e0, 1e-9):.2f}"
        elif memory:
            inc, inc0 = memory[name]["increase_kib"] / 1024, memory["none"]["increase_kib"] / 1024
            mem = f"{inc:.0f} | {inc / inc0:.2f}" if inc0 > 0 else f"{inc:.0f} | n/a"
        else:
            mem = "- | -"
        if name in epoch0:
            per = [epoch0[name], epoch1.get(name, 0.0)]
            epoch = "; ".join(
                f"epoch {e}: {s * 1e3:.0f} ms = {s / base / args.epoch_batches:.2f} steps/batch"
                for e, s in enumerate(per)
            )
        else:
            epoch = "none"
        print(f"| {name} | {med:.1f} | {fmt_ratio(ratio[name])} | {mem} | {epoch} |")
    print(
        f"\nEpoch-level work: prepare_epoch over {args.epoch_batches} training batch(es) + 1 held-out batch, "
        "divided by a plain step and by the training batches (its cost per step of such an epoch)."
    )
    gb = balancers.get("gblending")
    if gb is not None:
        print(
            f"G-Blending ({gb.mode}) recomputes its weights every {gb.super_epoch} epochs, training "
            f"{len(gb.head_names)} model copies for {gb.super_epoch_len} epochs each: its epoch-0 cost recurs "
            "every super_epoch epochs."
        )
    if memory:
        reset = all(m["reset"] for m in memory.values())
        print(
            "Memory is process RSS (Linux VmHWM, in a fresh process per balancer); peak reset before the "
            f"steps: {'yes' if reset else 'no (clear_refs unavailable: the figure includes setup)'}."
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--rounds", type=int, default=10, help="timed rounds (each steps every balancer once)"
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--small", action="store_true", help="av inputs 1x128x94 and 3x112x112 (CPU)")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated: av,transformer")
    parser.add_argument("--balancers", default="", help="comma-separated subset (default: all registered)")
    parser.add_argument(
        "--memory-steps", type=int, default=3, help="steps per CPU memory subprocess (0: skip)"
    )
    parser.add_argument("--epoch-batches", type=int, default=1, help="training batches of the epoch data")
    parser.add_argument("--smoke", action="store_true", help="tiny models and inputs, 2 rounds: a sanity run")
    parser.add_argument("--rss-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workload", default="av", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.smoke:
        args.rounds, args.warmup, args.batch = 2, 1, 4
        args.memory_steps = min(args.memory_steps, 1)
    if args.rss_worker:
        rss_worker(args)
        return
    names = [n for n in args.balancers.split(",") if n] or step_level_balancers()
    names = ["none", *[n for n in names if n != "none"]]
    device = torch.device(args.device)
    print(
        f"# Balancer cost relative to `none`: torch {torch.__version__}, device {device}, "
        f"{args.threads} thread(s){', SMOKE (tiny sizes)' if args.smoke else ''}"
    )
    for workload in [w for w in args.workloads.split(",") if w]:
        measure(workload, names, args, device)


if __name__ == "__main__":
    main()
