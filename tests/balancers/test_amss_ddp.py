"""Two gloo processes on CPU: AMSS's masks and statistics are identical on both DDP ranks."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import make_toy_batch, make_toy_model
from torch.nn.parallel import DistributedDataParallel

import equimodal as em

WORLD = 2


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = make_toy_model(2, seed=0)
        ddp = DistributedDataParallel(model)
        balancer = em.create_balancer("amss_plus", model, seed=11, k_min=0.3, k_max=0.7)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        records = []
        for step in range(3):
            batch, y = make_toy_batch(2, 8, seed=100 * step + rank)  # different data on each rank
            opt.zero_grad()
            balancer.loss(ddp(batch), y).backward()
            balancer.before_step()
            masks = [(u.param.grad != 0).clone() for us in balancer.units.values() for u in us]
            records.append({"masks": masks, "stats": balancer.stats()})
            opt.step()
        torch.save(records, os.path.join(out_dir, f"rank{rank}.pt"))
        del ddp  # a DDP wrapper that outlives its gloo group can abort the process at exit
    finally:
        gc.collect()
        dist.destroy_process_group()


@pytest.mark.ddp
def test_ranks_draw_identical_masks(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for a, b in zip(r0, r1, strict=True):
        assert a["stats"] == b["stats"]
        assert all(torch.equal(x, y) for x, y in zip(a["masks"], b["masks"], strict=True))
    # the statistics were all-reduced: rho equals that of the union of both ranks' first batches
    model = make_toy_model(2, seed=0)
    balancer = em.create_balancer("amss_plus", model, seed=11, k_min=0.3, k_max=0.7)
    parts = [make_toy_batch(2, 8, seed=r) for r in range(WORLD)]
    for batch, y in parts:
        balancer.loss(model(batch), y)
    model.zero_grad()
    sum(torch.nn.functional.cross_entropy(model(b).logits, y) for b, y in parts).backward()
    balancer.before_step()
    for m in ("m0", "m1"):
        assert balancer.stats()[f"rho/{m}"] == pytest.approx(r0[0]["stats"][f"rho/{m}"], rel=1e-5, abs=1e-6)
