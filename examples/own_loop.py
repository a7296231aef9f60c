"""A user's own model and loop with an equimodal balancer: the two changed lines are marked.

The model below is not built with equimodal's classes: it only follows the contract (an
``encoders`` ModuleDict and a forward that returns ``MultimodalOutput``). Run it with
``python examples/own_loop.py [balancer]`` (default ``amss_plus``); it drives every registered balancer,
reading ``balancer.requirements`` for the few that need more than the two calls.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import equimodal


class TwoTowerNet(nn.Module):
    """Audio (Conv1d over MFCC-like frames) and image (Conv2d) towers, sum of per-tower heads."""

    def __init__(self, num_classes: int = 10, declare_sizes: bool = True) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict(
            {
                "audio": nn.Sequential(
                    nn.Conv1d(13, 32, 5, padding=2), nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten()
                ),
                "image": nn.Sequential(
                    nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
                ),
            }
        )
        self.heads = nn.ModuleDict({"audio": nn.Linear(32, num_classes), "image": nn.Linear(16, num_classes)})
        # Sizes read by the balancers that build heads of their own (mmpareto, gblending, own_signal: one
        # head per modality; mla: one shared head). Without them those balancers ask for options instead:
        # feature_dims={"audio": 32, "image": 16} (one size per modality) or, for mla, feature_dim=32 (the
        # shared head's width), and num_classes=10.
        if declare_sizes:
            self.encoders["audio"].out_dim, self.encoders["image"].out_dim = 32, 16
            self.num_classes = num_classes

    def forward(self, batch: dict[str, Tensor]) -> equimodal.MultimodalOutput:
        feats = {m: enc(batch[m]) for m, enc in self.encoders.items()}
        uni = {m: self.heads[m](f) for m, f in feats.items()}
        return equimodal.MultimodalOutput(uni["audio"] + uni["image"], uni, feats)


def synthetic_loader(steps: int, batch_size: int = 32, seed: int = 0) -> list[dict[str, Tensor]]:
    """Toy data in which the audio carries the label more strongly than the image."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(steps):
        y = torch.randint(0, 10, (batch_size,), generator=g)
        audio = torch.randn(batch_size, 13, 20, generator=g) + y.float()[:, None, None] * 0.3
        image = torch.randn(batch_size, 1, 8, 8, generator=g) + y.float()[:, None, None, None] * 0.1
        batches.append({"audio": audio, "image": image, "label": y})
    return batches


def main(
    name: str = "amss_plus", steps: int = 60, epochs: int = 3, declare_sizes: bool = True, **options: object
) -> list[float]:
    torch.manual_seed(0)
    model = TwoTowerNet(declare_sizes=declare_sizes)
    balancer = equimodal.create_balancer(name, model, **options)  # added line
    # Most balancers need only the lines marked "added"; `requirements` says what else one needs.
    req = balancer.requirements
    optimizer = torch.optim.SGD([*model.parameters(), *balancer.parameters()], lr=0.05, momentum=0.9)
    train = synthetic_loader(steps // epochs)
    heldout = synthetic_loader(2, seed=1)  # a part of train kept out of training (never val/test)
    # a DataLoader, a list or a callable; batches as (inputs, labels) or, as here, dicts with a "label" key;
    # read only by the balancers that work per epoch (pmr, gblending, mslr)
    epoch_data = equimodal.EpochData(train=train, heldout=heldout, device=torch.device("cpu"))
    if req.epoch_plan:  # sample_valuation, modality_valuation, remix plan each epoch's data themselves
        samples = [{k: v[i] for k, v in b.items()} for b in train for i in range(len(b["label"]))]
        train = balancer.planned_loader(samples, batch_size=32)  # built once; follows each epoch's plan
        indexed = equimodal.indexed_loader(samples, batch_size=64)  # fixed order, with sample indices
        epoch_data = equimodal.EpochData(
            train=train, heldout=heldout, device=torch.device("cpu"), indexed=indexed, size=len(samples)
        )
    losses = []
    for epoch in range(epochs):
        balancer.start_epoch(epoch, epoch_data)  # added line
        for batch in train:
            y = batch["label"]
            if req.own_step:  # mla runs the whole step itself
                balancer.train_step(batch, y, optimizer)
                with torch.no_grad():
                    out = model(batch)
            else:
                out = model(batch)
                loss = balancer.loss(out, y, batch=batch)  # was: F.cross_entropy(out.logits, y)
                loss.backward()
                balancer.before_step()  # added line
                optimizer.step()
                optimizer.zero_grad()
            losses.append(float(F.cross_entropy(balancer.predict(out).detach(), y)))
    return losses


if __name__ == "__main__":
    losses = main(*(sys.argv[1:2] or ["amss_plus"]))
    print(f"fused CE: first 10 steps {sum(losses[:10]) / 10:.3f}, last 10 steps {sum(losses[-10:]) / 10:.3f}")
