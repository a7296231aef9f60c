"""CREMA-D preparation throughput and the data-loading share of a ``cremad`` training step (CPU).

1. ``prepare``: writes a raw tree of clips of CREMA-D's real size (a 2.5 s 16 kHz mono wav and a 2.5 s
   480x360 30 fps flv per clip, written with PyAV; 24 clips over 6 actors by default), then times
   ``equimodal prepare cremad`` on it with ``--workers`` processes (clips per second; the time to write
   the raw tree is not counted).
2. ``loading``: on the prepared folder, the ``cremad`` loader (full-size 257x188 spectrograms, one frame
   at 224x224) feeds the official model (two ResNet18, GELU, concat head) with SGD, batch 8, for
   ``--steps`` steps after 2 warm-up steps, with 0 and 2 ``DataLoader`` workers (all prepared clips,
   repeated so that the steps fall in one epoch; labels are random, they only feed the loss). Printed: the time spent
   in ``next(loader)`` against the whole step (load + forward + backward + SGD step), and the time of one
   sample's read (spectrogram + JPEG decode + RandomResizedCrop + flip + normalise).

Run (from the repository root):
    .venv/bin/python benchmarks/prepare_cremad.py                  # 24 clips, 2 workers, 10 steps
    .venv/bin/python benchmarks/prepare_cremad.py --clips 48 --steps 20 --keep /tmp/cremad-bench
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import soundfile
import torch

from equimodal.data import load_dataset
from equimodal.data.base import FileSplit, LoaderOptions, make_loader
from equimodal.models import MultimodalClassifier
from equimodal.prepare import prepare

EMOTIONS = ("ANG", "DIS", "FEA", "HAP", "NEU", "SAD")
SENTENCES = ("DFA", "IEO", "IOM", "ITH", "ITS", "IWL", "IWW", "MTI", "TAI", "TIE", "TSI", "WSI")


def write_clip(raw: Path, key: str, rng: np.random.Generator, seconds: float = 2.5) -> None:
    """A 16 kHz wav (a voiced tone plus noise) and a 480x360 30 fps flv (a moving textured gradient)."""
    t = np.arange(int(16000 * seconds)) / 16000
    wave = 0.2 * np.sin(2 * np.pi * rng.uniform(100, 300) * t) + 0.02 * rng.standard_normal(t.size)
    soundfile.write(str(raw / "AudioWAV" / f"{key}.wav"), wave.astype(np.float32), 16000)
    base = np.linspace(0, 180, 480)[None, :, None] + rng.integers(0, 40, (360, 480, 3))
    with av.open(str(raw / "VideoFlash" / f"{key}.flv"), "w", format="flv") as out:
        stream = out.add_stream("flv", rate=30)
        stream.width, stream.height, stream.pix_fmt = 480, 360, "yuv420p"
        for i in range(int(30 * seconds)):
            image = np.roll(base, 4 * i, axis=1).clip(0, 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def make_raw(raw: Path, clips: int, actors: int = 6) -> None:
    (raw / "AudioWAV").mkdir(parents=True)
    (raw / "VideoFlash").mkdir()
    rng = np.random.default_rng(0)
    for i in range(clips):
        key = f"{1001 + i % actors}_{SENTENCES[i // actors % 12]}_{EMOTIONS[i % 6]}_XX"
        write_clip(raw, key, rng)


def bench_prepare(raw: Path, out: Path, workers: int) -> dict:
    tic = time.perf_counter()
    info = prepare("cremad", raw, out, workers=workers, val_actors=1, test_actors=1)
    seconds = time.perf_counter() - tic
    n = info["clips"]["prepared_now"]
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / max(n, 1) / 1024
    print(
        f"prepare: {n} clips in {seconds:.2f} s with {workers} workers = {n / seconds:.2f} clips/s "
        f"({size:.0f} KiB per prepared clip on disk)"
    )
    return info


def bench_loading(out: Path, workers: int, steps: int, batch: int = 8) -> None:
    torch.manual_seed(0)
    ds = load_dataset("cremad", root=str(out))
    model = MultimodalClassifier(ds.default_encoders(), ds.num_classes, "concat")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    # every prepared clip, repeated so that one epoch holds all the steps (no epoch boundary inside)
    rows = len(ds.train.reader.keys)
    records = torch.arange(rows).repeat(-(-(steps + 2) * batch // rows))
    labels = torch.cat([ds.train.labels, ds.val.labels, ds.test.labels])  # labels only feed the loss
    split = FileSplit(
        ds.train.reader, records, labels[torch.randint(0, len(labels), (len(records),))], train=True
    )
    loader = make_loader(split, batch, train=True, options=LoaderOptions(num_workers=workers))
    load_times, step_times = [], []
    batches = iter(loader)
    for step in range(steps + 2):
        tic = time.perf_counter()
        batch_, y = next(batches)
        loaded = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(batch_).logits, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step >= 2:
            load_times.append(loaded - tic)
            step_times.append(time.perf_counter() - tic)
    load, total = sum(load_times), sum(step_times)
    print(
        f"loading, num_workers={workers}: step {statistics.median(step_times) * 1e3:.0f} ms (median), "
        f"next(loader) {statistics.median(load_times) * 1e3:.0f} ms (median); loading share "
        f"{100 * load / total:.1f} % of {len(step_times)} steps"
    )


def bench_sample(out: Path, repeats: int = 50) -> None:
    ds = load_dataset("cremad", root=str(out))
    reader = ds.train.reader
    reader(0, torch.Generator().manual_seed(0))  # warm-up
    tic = time.perf_counter()
    for i in range(repeats):
        reader(i % len(reader.keys), torch.Generator().manual_seed(i))
    print(f"one training sample read: {(time.perf_counter() - tic) / repeats * 1e3:.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=24)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument(
        "--keep", type=Path, help="a new folder to write the raw and prepared trees in (else a temporary one)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        raw, out = root / "raw", root / "prepared"
        tic = time.perf_counter()
        make_raw(raw, args.clips)
        print(f"raw tree: {args.clips} clips of 2.5 s written in {time.perf_counter() - tic:.1f} s")
        bench_prepare(raw, out, args.workers)
        bench_sample(out)
        for workers in (0, 2):
            bench_loading(out, workers, args.steps)


if __name__ == "__main__":
    main()
