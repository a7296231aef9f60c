"""Step time of ``dgl`` against a faithful re-enactment of the authors' DGL step, side by side.

The authors' step (``main_dgl.py`` ``train_epoch``, lines 97-158): one forward, ``alpha (CE_a + CE_v)``
backward with ``retain_graph``, every fusion-module gradient set to ``None`` by a loop over the parameter
names, the fused CE backward, ``clip_grad_norm_(max_norm=40)``, then per encoder a Python loop of
``abs(grad).mean().item()`` over its parameters, a CSV row appended to a file opened for it, the
optimizer step, and three ``.item()`` for the epoch's running losses. Ours: ``balancer.loss`` (one
backward) and ``before_step`` (clipping and the same figure kept on the device), then the step.

Both run the same architecture from the same initial weights with SGD (lr 2e-3, momentum 0.9, weight
decay 1e-4, the authors' optimizer), on the same batches; each round times one step of each, in
alternating order. Printed: the median step time of each, and the ratio theirs / ours (median over the
rounds of the per-round ratio, with quartiles). Encoders: the AV ResNet18 pair of ``balancer_cost.py``
(1x128x94 spectrogram, 3x112x112 frame, batch 16, 6 classes); ``--smoke``: two small MLPs.

Run:
    python benchmarks/dgl_cost.py                          # CPU, ResNet18 pair, 20 rounds
    python benchmarks/dgl_cost.py --device cuda --rounds 50
    python benchmarks/dgl_cost.py --smoke                  # tiny sizes, a few seconds
"""

from __future__ import annotations

import argparse
import copy
import csv
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor, nn

import equimodal as em
from equimodal.models.encoders import create_encoder

NUM_CLASSES = 6


def build(
    smoke: bool, device: torch.device
) -> tuple[em.MultimodalClassifier, list[tuple[dict[str, Tensor], Tensor]]]:
    """The model and four fixed batches."""
    torch.manual_seed(0)
    if smoke:
        shapes = {"audio": (40,), "visual": (60,)}
        encoders = {
            m: nn.Sequential(nn.Linear(s[0], 32), nn.ReLU(), nn.Linear(32, 16)) for m, s in shapes.items()
        }
        for enc in encoders.values():
            enc.out_dim = 16  # type: ignore[assignment]
    else:
        shapes = {"audio": (1, 128, 94), "visual": (3, 112, 112)}
        encoders = {
            "audio": create_encoder("resnet18", in_channels=1, activation="gelu"),
            "visual": create_encoder("resnet18", in_channels=3, activation="gelu"),
        }
    model = em.MultimodalClassifier(encoders, NUM_CLASSES, fusion="concat", validate_inputs=False).to(device)
    g = torch.Generator().manual_seed(1)
    batches = [
        (
            {m: torch.randn(16, *s, generator=g).to(device) for m, s in shapes.items()},
            torch.randint(0, NUM_CLASSES, (16,), generator=g).to(device),
        )
        for _ in range(4)
    ]
    return model, batches


class TheirModel(nn.Module):
    """``AVClassifier_DGL`` with ``ConcatFusion_DGL`` on the same encoders, under a ``module.`` prefix as
    DataParallel names them (their name test reads the second dotted part)."""

    def __init__(self, ours: em.MultimodalClassifier) -> None:
        super().__init__()
        self.audio_net = copy.deepcopy(ours.encoders["audio"])
        self.visual_net = copy.deepcopy(ours.encoders["visual"])
        self.fusion_module = nn.Module()
        self.fusion_module.fc_out = copy.deepcopy(ours.fusion.fc)

    def forward(self, audio: Tensor, visual: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x, y = self.audio_net(audio), self.visual_net(visual)
        fc = self.fusion_module.fc_out
        out = fc(torch.cat((x, y), 1).detach())
        return out, fc(torch.cat((x, torch.zeros_like(y)), 1)), fc(torch.cat((torch.zeros_like(x), y), 1))


def their_step(
    wrapped: nn.Module, opt: torch.optim.Optimizer, batch: dict[str, Tensor], label: Tensor, log: Path
) -> float:
    """The authors' step, as ``main_dgl.py`` lines 97-158 do it (printing left out)."""
    model = wrapped.module
    criterion = nn.CrossEntropyLoss()
    opt.zero_grad()
    out, out_a, out_v = model(batch["audio"], batch["visual"])
    loss_v, loss_a, loss_f = criterion(out_v, label), criterion(out_a, label), criterion(out, label)
    ((loss_a + loss_v) * 4.0).backward(retain_graph=True)
    for name, parms in wrapped.named_parameters():
        if "fusion" in str(name).split(".")[1]:
            parms.grad = None
    loss_f.backward()
    nn.utils.clip_grad_norm_(wrapped.parameters(), max_norm=40, norm_type=2)
    audio_grad_sum = sum(torch.abs(p.grad).mean().item() for p in model.audio_net.parameters())
    visual_grad_sum = sum(torch.abs(p.grad).mean().item() for p in model.visual_net.parameters())
    with log.open("a", newline="") as f:
        csv.writer(f).writerow([audio_grad_sum, visual_grad_sum])
    opt.step()
    return loss_f.item() + loss_a.item() + loss_v.item()  # their running sums (lines 156-158)


def sgd(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=2e-3, momentum=0.9, weight_decay=1e-4)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="tiny MLP encoders, 5 rounds")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rounds = 5 if args.smoke else args.rounds
    model, batches = build(args.smoke, device)
    wrapped = nn.Module()
    wrapped.module = TheirModel(model).to(device)
    balancer = em.create_balancer("dgl", model)
    ours_opt, their_opt = sgd([*model.parameters(), *balancer.parameters()]), sgd(list(wrapped.parameters()))

    def ours(batch: dict[str, Tensor], y: Tensor) -> None:
        ours_opt.zero_grad(set_to_none=True)
        balancer.loss(model(batch), y).backward()
        balancer.before_step()
        ours_opt.step()

    times: dict[str, list[float]] = {"ours": [], "theirs": []}
    with tempfile.TemporaryDirectory() as folder:
        log = Path(folder) / "audio_visual_grad_vanilla.csv"
        steps = {"ours": ours, "theirs": lambda b, y: their_step(wrapped, their_opt, b, y, log)}
        for r in range(rounds + 1):  # round 0 warms up
            order = ["ours", "theirs"] if r % 2 else ["theirs", "ours"]
            for who in order:
                batch, y = batches[r % len(batches)]
                sync()
                t0 = time.perf_counter()
                steps[who](batch, y)
                sync()
                if r:
                    times[who].append(time.perf_counter() - t0)
    ratios = sorted(t / o for t, o in zip(times["theirs"], times["ours"], strict=True))
    q1, med, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
    result = {
        "ours_ms": 1e3 * statistics.median(times["ours"]),
        "theirs_ms": 1e3 * statistics.median(times["theirs"]),
        "ratio": med,
    }
    print(f"device {device}, {'smoke (MLP encoders)' if args.smoke else 'ResNet18 pair'}, {rounds} rounds")
    print("| step | median ms |")
    print("|---|---|")
    print(f"| ours (dgl balancer, one backward) | {result['ours_ms']:.2f} |")
    print(f"| theirs (two backward, .item() per parameter, CSV row) | {result['theirs_ms']:.2f} |")
    print(f"ratio theirs / ours: {med:.2f} (quartiles {q1:.2f}-{q3:.2f})")
    return result


if __name__ == "__main__":
    main()
