"""The reference trainer: a plain loop written only against the public API.

It calls ``balancer.loss`` and ``balancer.before_step`` exactly as a user's own loop would, plus
the optional hooks for the methods that declare them (``prepare_epoch``, ``train_step``,
``predict``). Model selection uses the validation split only; the selected checkpoint is evaluated
once on test. Outputs (all written atomically) in the run folder: ``config.yaml``,
``metrics.csv`` (a row per epoch), ``best.pt``, ``last.pt`` (for resuming) and ``summary.json``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from .balancers import Balancer, EpochData, create_balancer
from .balancers.registry import BALANCERS
from .config import Config, config_to_dict, save_config
from .data import load_dataset
from .data.base import MultimodalDataset, TensorSplit
from .distributed import rank as dist_rank
from .io import atomic_savez, atomic_torch_save, atomic_write_text
from .metrics import accuracy, fit_linear_probe, imbalance, macro_f1, probe_accuracy
from .models import MultimodalClassifier
from .models.encoders import create_encoder
from .types import MultimodalOutput, check_batch

log = logging.getLogger(__name__)


def select_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU; any other value is passed to ``torch.device``."""
    local = int(os.environ.get("LOCAL_RANK", 0))
    if name == "auto":
        return torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:  # "cuda" means this process's GPU under torchrun
        device = torch.device("cuda", local)
    return device


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model(cfg: Config, dataset: MultimodalDataset) -> MultimodalClassifier:
    """The dataset's default encoders (with config overrides) and the configured fusion head.

    The whole dataset is checked once here (every modality present, finite values), so the model is
    built with ``validate_inputs=False``: no per-batch check, hence no host sync per step for it.
    """
    for split in (dataset.train, dataset.val, dataset.test):
        check_batch(split.inputs, dataset.modalities)
    encoders = dataset.default_encoders()
    unknown = [m for m in cfg.model.encoders if m not in encoders]
    if unknown:
        raise ValueError(
            f"model.encoders names modality {unknown}, but dataset {dataset.name!r} has {dataset.modalities}."
        )
    for m, spec in cfg.model.encoders.items():
        if not isinstance(spec, dict) or "name" not in spec:
            raise TypeError(f"model.encoders.{m} must be a mapping with a 'name' key, found {spec!r}.")
        kwargs = {k: v for k, v in spec.items() if k != "name"}
        encoders[m] = create_encoder(spec["name"], **kwargs)
    return MultimodalClassifier(
        encoders,
        dataset.num_classes,
        fusion=cfg.model.fusion,
        validate_inputs=False,
        **cfg.model.fusion_options,
    )


def build_optimizer(cfg: Config, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """SGD, Adam or AdamW from the config."""
    o = cfg.optim
    params = [p for p in params if p.requires_grad]
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    raise ValueError(f"Unknown optimizer {o.name!r}; expected one of sgd, adam, adamw (set optim.name).")


def build_scheduler(
    cfg: Config, optimizer: torch.optim.Optimizer
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Per-epoch LR schedule: none, step, multistep or cosine."""
    o = cfg.optim
    if o.schedule == "none":
        return None
    if o.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, o.step_size, o.gamma)
    if o.schedule == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, list(o.milestones), o.gamma)
    if o.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(cfg.train.epochs, 1))
    raise ValueError(
        f"Unknown schedule {o.schedule!r}; expected one of none, step, multistep, cosine (set optim.schedule)."
    )


def stratified_holdout(labels: Tensor, fraction: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Split indices into (kept, heldout) with about ``fraction`` of every class held out."""
    kept, held = [], []
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=generator)]
        n = max(1, round(fraction * idx.numel())) if idx.numel() > 1 else 0
        held.append(idx[:n])
        kept.append(idx[n:])
    return torch.cat(kept).sort().values, torch.cat(held).sort().values


@dataclass
class EvalResult:
    """Evaluation of one split (``logits`` are the evaluated logits, kept for ensembles)."""

    loss: float
    accuracy: float
    macro_f1: float
    unimodal: dict[str, float]
    logits: Tensor | None = None
    labels: Tensor | None = None

    def as_dict(self, prefix: str) -> dict[str, float]:
        out = {f"{prefix}_loss": self.loss, f"{prefix}_acc": self.accuracy, f"{prefix}_f1": self.macro_f1}
        out.update({f"{prefix}_acc_{m}": a for m, a in self.unimodal.items()})
        out[f"{prefix}_imbalance"] = imbalance(self.unimodal)
        return out


@torch.no_grad()
def evaluate(
    model: nn.Module,
    balancer: Balancer,
    split: TensorSplit,
    batch_size: int,
    device: torch.device,
    num_classes: int,
    transform: Callable[[dict[str, Tensor]], MultimodalOutput] | None = None,
) -> EvalResult:
    """Fused accuracy (through ``balancer.predict``), macro-F1, loss and each modality's unimodal accuracy."""
    was_training = model.training
    model.eval()
    preds, targets, losses = [], [], []
    uni: dict[str, list[Tensor]] = {m: [] for m in balancer.modalities}
    for batch, y in split.batches(batch_size, device=device):
        out = transform(batch) if transform is not None else model(batch)
        logits = balancer.predict(out)
        losses.append(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
        preds.append(logits.float().cpu())
        targets.append(y)
        uni_logits = balancer.predict_unimodal(out)
        for m in balancer.modalities:
            uni[m].append(uni_logits[m].argmax(1))
    model.train(was_training)
    all_logits, target = torch.cat(preds), torch.cat(targets).cpu()
    pred = all_logits.argmax(1)
    return EvalResult(
        loss=float(torch.stack(losses).sum()) / max(len(target), 1),
        accuracy=accuracy(pred, target),
        macro_f1=macro_f1(pred, target, num_classes),
        unimodal={m: accuracy(torch.cat(v).cpu(), target) for m, v in uni.items()},
        logits=all_logits,
        labels=target,
    )


@torch.no_grad()
def encoder_features(
    model: nn.Module, split: TensorSplit, batch_size: int, device: torch.device
) -> dict[str, Tensor]:
    """Frozen pooled features of every modality over a split (eval mode)."""
    model.eval()
    feats: dict[str, list[Tensor]] = {}
    for batch, _ in split.batches(batch_size, device=device):
        out = model(batch)
        if out.features is None:
            raise ValueError(
                "Linear probes need `features` in the model output; return them or set train.probe=false."
            )
        for m, f in out.features.items():
            feats.setdefault(m, []).append(f.flatten(1).float().cpu())
    return {m: torch.cat(v) for m, v in feats.items()}


def removal_accuracy(
    model: MultimodalClassifier,
    balancer: Balancer,
    split: TensorSplit,
    batch_size: int,
    device: torch.device,
    nc: int,
) -> dict[str, float]:
    """Fused accuracy with each modality's features zeroed at test time (how much the model leans on it)."""
    result = {}
    for m in balancer.modalities:

        def drop(batch: dict[str, Tensor], m: str = m) -> MultimodalOutput:
            feats = model.encode(batch)
            feats[m] = torch.zeros_like(feats[m])
            fused, uni = model.fusion(feats)
            return MultimodalOutput(fused, uni, feats)

        result[m] = evaluate(model, balancer, split, batch_size, device, nc, transform=drop).accuracy
    return result


def run_epoch(
    train_model: nn.Module,
    balancer: Balancer,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    batches: Iterable[tuple[dict[str, Tensor], Tensor]],
    grad_accum: int,
    use_amp: bool,
) -> tuple[float, dict[str, float]]:
    """One training epoch through the balancer's hooks; returns the mean loss and mean per-step stats.

    Two-call balancers: ``loss`` per micro-batch, ``before_step`` once per optimizer step after
    ``unscale_``; a short tail group of micro-batches is rescaled to a mean gradient like the full
    groups. Balancers that own their step get ``grad_accum`` micro-batches per ``train_step`` call.
    """
    total_loss: Tensor | float = 0.0  # summed on the device: no host sync per step
    n_batches, micro = 0, 0
    stat_sums: dict[str, float] = {}
    stat_counts: dict[str, int] = {}
    group: list[tuple[dict[str, Tensor], Tensor]] = []

    def record_stats() -> None:
        for k, v in balancer.stats().items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                stat_sums[k] = stat_sums.get(k, 0.0) + float(v)
                stat_counts[k] = stat_counts.get(k, 0) + 1

    def optimizer_step(micro_batches: int) -> None:
        scaler.unscale_(optimizer)
        if micro_batches != grad_accum:
            grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            torch._foreach_mul_(grads, grad_accum / micro_batches)
        balancer.before_step()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        record_stats()

    def owned_step() -> Tensor:
        """One ``train_step`` over the grouped micro-batches; returns their summed mean losses."""
        inputs = {k: torch.cat([b[k] for b, _ in group]) for k in group[0][0]}
        target = torch.cat([y for _, y in group])
        loss = balancer.train_step(inputs, target, optimizer, micro_batches=len(group)) * len(group)
        group.clear()
        record_stats()
        return loss

    own_step = balancer.requirements.own_step
    for batch, y in batches:
        n_batches += 1
        if own_step:
            group.append((batch, y))
            if len(group) == grad_accum:
                total_loss = total_loss + owned_step().detach().float()
            continue
        with torch.autocast(y.device.type, enabled=use_amp):
            loss = balancer.loss(train_model(batch), y, batch=batch)
        scaler.scale(loss / grad_accum).backward()
        total_loss = total_loss + loss.detach().float()
        micro += 1
        if micro == grad_accum:
            optimizer_step(micro)
            micro = 0
    if micro:
        optimizer_step(micro)
    if group:
        total_loss = total_loss + owned_step().detach().float()
    return float(total_loss) / max(n_batches, 1), {k: v / stat_counts[k] for k, v in stat_sums.items()}


def _balancer_kwargs(name: str, options: dict[str, Any], seed: int) -> dict[str, Any]:
    """The configured options, plus ``seed=train.seed`` when the balancer takes a seed."""
    kwargs = dict(options)
    if "seed" in BALANCERS.options(name):
        kwargs.setdefault("seed", seed)
    return kwargs


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def _progress(enabled: bool) -> Any:
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
        transient=True,
    )


def train(
    cfg: Config,
    out_dir: str | Path | None = None,
    *,
    dataset: MultimodalDataset | None = None,
    resume: bool = True,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train and evaluate one run; returns the summary (also written to ``out_dir/summary.json``).

    Args:
        cfg: the resolved configuration.
        out_dir: run folder; ``None`` keeps everything in memory.
        dataset: a preloaded dataset (else ``load_dataset(cfg.data.name, seed=cfg.train.seed, ...)``).
        resume: continue from ``out_dir/last.pt`` when it exists and matches the config.
        on_epoch: called with each epoch's metrics row.
    """
    t = cfg.train
    if t.num_threads > 0:
        torch.set_num_threads(t.num_threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    own_group = world > 1 and not dist.is_initialized()
    if own_group:  # launched by torchrun: the process group is ours to create and to close
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist_rank()
    device = select_device(t.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    seed_everything(t.seed)
    out = Path(out_dir) if out_dir is not None else None
    main_proc = rank == 0
    if out is not None and main_proc:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")

    if "seed" in cfg.data.options:
        raise ValueError(
            "data.options.seed is not allowed: the dataset split and pairing follow train.seed. "
            "Set train.seed instead."
        )
    ds = dataset or load_dataset(cfg.data.name, seed=t.seed, **cfg.data.options)
    model = build_model(cfg, ds).to(device)
    balancer = create_balancer(
        cfg.balancer.name, model, **_balancer_kwargs(cfg.balancer.name, cfg.balancer.options, t.seed)
    )
    req = balancer.requirements  # the one place the trainer learns what this balancer needs
    optimizer = build_optimizer(cfg, list(model.parameters()) + list(balancer.parameters()))
    scheduler = build_scheduler(cfg, optimizer)
    train_model: nn.Module = model
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=req.unused_parameters,
        )

    split_gen = torch.Generator().manual_seed(t.seed + 7919)
    train_split, heldout = ds.train, None
    if req.heldout_fraction > 0:
        kept, held = stratified_holdout(ds.train.labels, req.heldout_fraction, split_gen)
        train_split, heldout = ds.train.subset(kept), ds.train.subset(held)

    use_amp = t.amp and device.type == "cuda"
    if use_amp and req.own_step:
        raise ValueError(
            f"Balancer {cfg.balancer.name!r} runs its own optimisation step, which has no AMP loss scaling; "
            "set train.amp=false."
        )
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    rows: list[dict[str, Any]] = []
    best: dict[str, Any] = {"epoch": -1, "val_acc": -math.inf, "val_loss": math.inf}
    start_epoch = 0
    epoch_times: list[float] = []
    if resume and out is not None and (out / "last.pt").exists():
        ckpt = torch.load(out / "last.pt", map_location=device, weights_only=False)
        if ckpt.get("config") == config_to_dict(cfg):
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            balancer.load_state_dict(ckpt["balancer"])
            if scheduler is not None and ckpt.get("scheduler") is not None:
                scheduler.load_state_dict(ckpt["scheduler"])
            scaler.load_state_dict(ckpt["scaler"])
            rows, best, start_epoch = ckpt["rows"], ckpt["best"], ckpt["epoch"] + 1
            epoch_times = list(ckpt.get("epoch_times", []))
            torch.set_rng_state(ckpt["rng"])
            log.info("Resumed %s at epoch %d", out, start_epoch)
        else:
            log.warning("Ignoring %s: it was written with another config", out / "last.pt")

    loader_gen = torch.Generator().manual_seed(t.seed)
    progress = _progress(t.progress and main_proc)
    epoch_task = progress.add_task("train", total=t.epochs, info="") if progress else None
    if progress:
        progress.start()
        progress.update(epoch_task, completed=start_epoch)
    best_state: dict[str, Any] | None = None
    try:
        for epoch in range(start_epoch, t.epochs):
            loader_gen.manual_seed(t.seed * 100003 + epoch)
            balancer.set_epoch(epoch)
            tic = time.perf_counter()

            def batches(split: TensorSplit, shuffle: bool, g: torch.Generator | None = None):
                return split.batches(
                    cfg.data.batch_size,
                    shuffle=shuffle,
                    generator=g,
                    rank=rank,
                    world_size=world,
                    device=device,
                )

            if req.epoch_data:
                # Shuffled (the splits are stored class by class), same order on every rank.
                epoch_gen = torch.Generator().manual_seed(t.seed * 100003 + epoch + 50021)
                balancer.prepare_epoch(
                    EpochData(
                        train=lambda g=epoch_gen: batches(train_split, True, g),
                        heldout=(lambda: batches(heldout, False)) if heldout is not None else None,
                        device=device,
                    )
                )
            train_model.train()
            train_loss, step_stats = run_epoch(
                train_model,
                balancer,
                optimizer,
                scaler,
                batches(train_split, True, loader_gen),
                t.grad_accum,
                use_amp,
            )
            if scheduler is not None:
                scheduler.step()
            epoch_time = time.perf_counter() - tic
            epoch_times.append(epoch_time)
            val = evaluate(model, balancer, ds.val, cfg.data.eval_batch_size, device, ds.num_classes)
            row: dict[str, Any] = {
                "epoch": epoch,
                "train_loss": train_loss,
                "epoch_time": epoch_time,
            }
            row.update(val.as_dict("val"))
            row.update({f"bal_{k}": v for k, v in step_stats.items()})
            rows.append(row)
            improved = val.accuracy > best["val_acc"] or (
                val.accuracy == best["val_acc"] and val.loss < best["val_loss"]
            )
            if improved:
                best = {"epoch": epoch, "val_acc": val.accuracy, "val_loss": val.loss}
                best_state = {
                    "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
                    "balancer": balancer.state_dict(),
                    "epoch": epoch,
                }
                if out is not None and main_proc:
                    atomic_torch_save({**best_state, "config": config_to_dict(cfg)}, out / "best.pt")
            if out is not None and main_proc:
                _write_csv(out / "metrics.csv", rows)
                atomic_torch_save(
                    {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "balancer": balancer.state_dict(),
                        "scaler": scaler.state_dict(),
                        "scheduler": scheduler.state_dict() if scheduler is not None else None,
                        "rows": rows,
                        "epoch_times": epoch_times,
                        "best": best,
                        "epoch": epoch,
                        "rng": torch.get_rng_state(),
                        "config": config_to_dict(cfg),
                    },
                    out / "last.pt",
                )
            if on_epoch is not None:
                on_epoch(row)
            if progress:
                progress.update(
                    epoch_task, advance=1, info=f"val acc {val.accuracy:.3f}  loss {row['train_loss']:.3f}"
                )
    finally:
        if progress:
            progress.stop()

    if best_state is None and out is not None and (out / "best.pt").exists():
        best_state = torch.load(out / "best.pt", map_location=device, weights_only=False)
    if best_state is not None:
        model.load_state_dict(best_state["model"])
        balancer.load_state_dict(best_state["balancer"])
    bs = cfg.data.eval_batch_size
    val = evaluate(model, balancer, ds.val, bs, device, ds.num_classes)
    test = evaluate(model, balancer, ds.test, bs, device, ds.num_classes)
    summary: dict[str, Any] = {
        "dataset": ds.name,
        "balancer": cfg.balancer.name,
        "seed": t.seed,
        "modalities": ds.modalities,
        "selected_epoch": best["epoch"],
        "epochs": t.epochs,
        "time_per_epoch": float(np.median(epoch_times)) if epoch_times else float("nan"),
        "val": val.as_dict("val"),
        "test": test.as_dict("test"),
    }
    if isinstance(model, MultimodalClassifier):
        summary["test"].update(
            {
                f"test_removed_{m}": a
                for m, a in removal_accuracy(model, balancer, ds.test, bs, device, ds.num_classes).items()
            }
        )
    if t.probe:
        tr = encoder_features(model, train_split, bs, device)
        va = encoder_features(model, ds.val, bs, device)
        te = encoder_features(model, ds.test, bs, device)
        for m in ds.modalities:
            probe = fit_linear_probe(tr[m], train_split.labels, ds.num_classes)
            summary["val"][f"val_probe_{m}"] = probe_accuracy(probe, va[m], ds.val.labels)
            summary["test"][f"test_probe_{m}"] = probe_accuracy(probe, te[m], ds.test.labels)
    summary["config"] = config_to_dict(cfg)
    if out is not None and main_proc:
        atomic_savez(
            out / "predictions.npz",
            val_logits=val.logits.numpy(),
            val_labels=val.labels.numpy(),
            test_logits=test.logits.numpy(),
            test_labels=test.labels.numpy(),
            train_label_counts=torch.bincount(train_split.labels, minlength=ds.num_classes).numpy(),
        )
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    if own_group:
        dist.barrier()
        dist.destroy_process_group()
    return summary
