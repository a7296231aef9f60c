"""InfoReg's training step: ours (``rule="code"``) against a faithful re-enactment of the official step.

The official ``main.py`` ``train_epoch`` (GeWu-Lab/InfoReg_CVPR2025) does, per step, besides the training
backward passes: three logging-only backward passes, each followed by a clone and concatenation of every
encoder gradient and a ``.item()`` (lines 401-453); the true-class scores as a Python sum over samples
(lines 460-461); the proximal edit with an identity search of every model parameter among the encoders'
parameters, ``O(P^2)`` (lines 489-495); Fisher accumulators for every Conv/Linear weight of the model
(lines 501-523); a ``.item()`` per 4-D encoder gradient (lines 525-540) and per loss (lines 549-551). Ours
does the same training computation (fused CE plus the unimodal CEs, the same coefficient, the same pull
``beta_m (w - w_epoch_start)``, the per-layer Fisher trace) in one backward pass with no host read.

Both run on one model (the audio-visual ResNet18 pair of ``balancer_cost.py``, concat fusion, 6 classes,
SGD lr 2e-3, momentum 0.9, weight decay 1e-4), alternating per round on the same batch; the table gives
the median step time of each and their ratio. The per-epoch model copy of the official code (line 259)
and our per-epoch anchor copy are timed once, apart.

Run:
    python benchmarks/inforeg_cost.py                    # CPU, small inputs (~1 minute)
    python benchmarks/inforeg_cost.py --device cuda --rounds 50 --size full
    python benchmarks/inforeg_cost.py --smoke            # a sanity run (seconds)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import equimodal as em
from equimodal.models.encoders import create_encoder

SIZES = {
    "smoke": ((1, 32, 24), (3, 32, 32), 8),
    "small": ((1, 128, 94), (3, 112, 112), 4),
    "full": (None, None, 0),
}


def build(size: str, device: torch.device) -> tuple[nn.Module, dict[str, Tensor], Tensor]:
    """The audio-visual ResNet18 pair and one batch of 16 (``full``: 1x257x188 and 3x224x224 inputs)."""
    audio_shape, visual_shape, width = SIZES[size]
    audio_shape, visual_shape = audio_shape or (1, 257, 188), visual_shape or (3, 224, 224)
    extra = {"base_channels": width} if width else {}
    encoders = {
        "audio": create_encoder("resnet18", in_channels=1, activation="gelu", **extra),
        "visual": create_encoder("resnet18", in_channels=3, activation="gelu", **extra),
    }
    model = em.MultimodalClassifier(encoders, 6, fusion="concat", validate_inputs=False).to(device)
    g = torch.Generator().manual_seed(0)
    batch = {
        "audio": torch.randn(16, *audio_shape, generator=g),
        "visual": torch.randn(16, *visual_shape, generator=g),
    }
    y = torch.randint(0, 6, (16,), generator=g)
    return model, {k: v.to(device) for k, v in batch.items()}, y.to(device)


def official_step(
    model: nn.Module, anchor: nn.Module, opt: torch.optim.Optimizer, batch: dict, y: Tensor
) -> None:
    """One step of the official ``train_epoch`` (InfoReg path), module names mapped to ours."""
    audio_net, visual_net, head = model.encoders["audio"], model.encoders["visual"], model.fusion.fc
    named = list(model.named_parameters())
    rec_a = [(n, p) for n, p in named if n.startswith("encoders.audio")]
    rec_v = [(n, p) for n, p in named if n.startswith("encoders.visual")]
    opt.zero_grad()
    a, v = audio_net(batch["audio"]), visual_net(batch["visual"])
    d = a.shape[1]
    out = head(torch.cat((a, v), 1))
    out_v = torch.mm(v, head.weight[:, d:].t()) + head.bias / 2
    out_a = torch.mm(a, head.weight[:, :d].t()) + head.bias / 2
    loss, loss_v, loss_a = F.cross_entropy(out, y), F.cross_entropy(out_v, y), F.cross_entropy(out_a, y)
    for which, lt in (("both", loss), ("audio", loss_a), ("visual", loss_v)):  # logging only
        lt.backward(retain_graph=True)
        groups = {"both": (rec_a, rec_v), "audio": (rec_a,), "visual": (rec_v,)}[which]
        for rec in groups:
            flat = torch.cat(
                [(p.grad.clone() if p.grad is not None else torch.zeros_like(p)).flatten() for _, p in rec]
            )
            torch.mean(flat).item()
        opt.zero_grad()
    loss_v.backward(retain_graph=True)
    loss_a.backward(retain_graph=True)
    loss.backward()
    sm = nn.Softmax(dim=1)
    score_v = sum([sm(out_v)[i][y[i]] for i in range(out_v.size(0))])
    score_a = sum([sm(out_a)[i][y[i]] for i in range(out_a.size(0))])
    beta = beta2 = 0
    if score_a > score_v:
        beta = 0.95 * torch.exp(torch.tanh(score_a - score_v))
    elif score_a < score_v:
        beta2 = 0.1 * torch.exp(torch.tanh(score_v - score_a))
    with torch.no_grad():
        for p, q in zip(model.parameters(), anchor.parameters(), strict=True):
            if p.requires_grad and any(p is r for r in audio_net.parameters()):
                p.grad += beta * (p - q)
            if p.requires_grad and any(p is r for r in visual_net.parameters()):
                p.grad += beta2 * (p - q)
    fims = getattr(model, "_fims", None) or {}
    for name, module in model.named_modules():  # `fim` and the per-part accumulators: two passes
        if isinstance(module, (nn.Conv2d, nn.Linear)) and module.weight.grad is not None:
            for key in (name, "part." + name):
                fims[key] = fims.get(key, 0) + (module.weight.grad * module.weight.grad).detach()
    model._fims = fims
    for _, p in named:
        if p.grad is not None and p.grad.dim() == 4:
            torch.sum(p.grad**2).item()
    opt.step()
    loss.item(), loss_a.item(), loss_v.item()


def median_ms(times: list[float]) -> float:
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="tiny inputs, 3 rounds")
    args = parser.parse_args()
    if args.smoke:
        args.size, args.rounds = "smoke", 3
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    ours_model, batch, y = build(args.size, device)
    theirs_model = copy.deepcopy(ours_model)
    balancer = em.create_balancer("inforeg", ours_model, rule="code")
    sgd = dict(lr=2e-3, momentum=0.9, weight_decay=1e-4)
    opt_ours = torch.optim.SGD(ours_model.parameters(), **sgd)
    opt_theirs = torch.optim.SGD(theirs_model.parameters(), **sgd)
    t0 = time.perf_counter()
    balancer.start_epoch(0)
    sync()
    anchor_ms = 1e3 * (time.perf_counter() - t0)
    t0 = time.perf_counter()
    anchor = copy.deepcopy(theirs_model)
    sync()
    copy_ms = 1e3 * (time.perf_counter() - t0)
    ours, theirs = [], []
    for r in range(args.rounds + 1):  # round 0 warms up
        for who in ("ours", "theirs") if r % 2 == 0 else ("theirs", "ours"):
            sync()
            t0 = time.perf_counter()
            if who == "ours":
                opt_ours.zero_grad(set_to_none=True)
                balancer.loss(ours_model(batch), y).backward()
                balancer.before_step()
                opt_ours.step()
            else:
                official_step(theirs_model, anchor, opt_theirs, batch, y)
            sync()
            if r:
                (ours if who == "ours" else theirs).append(time.perf_counter() - t0)
    print(f"### InfoReg step, {args.size} ResNet18 pair, batch 16, {device}, {args.rounds} rounds")
    print("| step | median ms | ratio to ours |")
    print("|---|---|---|")
    print(f"| ours (rule='code') | {median_ms(ours):.1f} | 1.00 |")
    print(f"| official re-enacted | {median_ms(theirs):.1f} | {median_ms(theirs) / median_ms(ours):.2f} |")
    print(f"per epoch: our anchor copy {anchor_ms:.1f} ms, their model deepcopy {copy_ms:.1f} ms")


if __name__ == "__main__":
    main()
