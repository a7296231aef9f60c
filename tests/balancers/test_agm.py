"""AGM: the coefficients reach what each modality's response reaches (encoder, head columns, bias share),
and the defaults are the authors'.

Expected values are computed here from the observed coefficients (never stored floats).
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
import torch.nn.functional as F
from conftest import make_toy_batch, make_toy_model
from torch import Tensor, nn

import equimodal as em
from equimodal.balancers.agm import AGM, head_blocks

Grads = dict[str, Tensor]


def agm_step(model: nn.Module, batch: dict[str, Tensor], y: Tensor, **options: object) -> tuple[Grads, dict]:
    balancer = em.create_balancer("agm", model, clip=None, **options)
    balancer.set_epoch(0)
    model.zero_grad(set_to_none=True)
    balancer.loss(model(batch), y, batch=batch).backward()
    balancer.before_step()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, balancer.stats()


def plain_grads(model: nn.Module, batch: dict[str, Tensor], y: Tensor) -> Grads:
    model.zero_grad(set_to_none=True)
    out = model(batch)
    loss = F.cross_entropy(out.logits, y)
    if getattr(model, "auxiliary_heads", False):
        loss = loss + sum(F.cross_entropy(o, y) for o in out.unimodal_logits.values())
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_defaults_are_the_authors_runs() -> None:
    params = inspect.signature(AGM.__init__).parameters
    assert params["alpha"].default == 1.5  # author, CREMA-D, continuous modulation (issue thread)
    assert params["max_gap"].default == 10.0  # authors' 2-modality scripts; 7 is BalanceBenchmark's
    balancer = em.create_balancer("agm", make_toy_model(2))
    assert (balancer.alpha, balancer.max_gap, balancer.last_epoch) == (1.5, 10.0, None)
    assert em.create_balancer("agm", make_toy_model(2), max_gap=None).max_gap is None
    with pytest.raises(ValueError, match="max_gap"):
        em.create_balancer("agm", make_toy_model(2), max_gap=float("inf"))


@pytest.mark.parametrize("num", [2, 3])
def test_concat_head_columns_and_bias_are_scaled(num: int) -> None:
    model = make_toy_model(num)
    batch, y = make_toy_batch(num, 32, seed=4)
    ref = plain_grads(copy.deepcopy(model), batch, y)
    grads, stats = agm_step(model, batch, y, alpha=2.0)
    k = [stats[f"k/m{i}"] for i in range(num)]
    assert max(k) - min(k) > 1e-3  # the coefficients differ, so the check below has teeth
    start = 0
    for i in range(num):
        d = model.encoders[f"m{i}"].out_dim
        cols = slice(start, start + d)
        start += d
        torch.testing.assert_close(
            grads["fusion.fc.weight"][:, cols], ref["fusion.fc.weight"][:, cols] * k[i]
        )
        for n, g in grads.items():
            if n.startswith(f"encoders.m{i}."):
                torch.testing.assert_close(g, ref[n] * k[i])
    torch.testing.assert_close(grads["fusion.fc.bias"], ref["fusion.fc.bias"] * sum(k) / num)


def test_sum_fusion_scales_each_own_head_with_its_bias() -> None:
    model = make_toy_model(2, fusion="sum")
    batch, y = make_toy_batch(2, 32, seed=4)
    ref = plain_grads(copy.deepcopy(model), batch, y)
    grads, stats = agm_step(model, batch, y, alpha=2.0)
    for m in ("m0", "m1"):
        for part in ("weight", "bias"):
            n = f"fusion.heads.{m}.{part}"
            torch.testing.assert_close(grads[n], ref[n] * stats[f"k/{m}"])


def test_fusion_without_declared_blocks_keeps_its_joint_gradient() -> None:
    model = make_toy_model(2, fusion="film")
    assert head_blocks(model, ["m0", "m1"]) == ({"m0": [], "m1": []}, [])
    batch, y = make_toy_batch(2, 32, seed=4)
    ref = plain_grads(copy.deepcopy(model), batch, y)
    grads, stats = agm_step(model, batch, y, alpha=2.0)
    for n, g in grads.items():
        scale = stats[f"k/{n.split('.')[1]}"] if n.startswith("encoders.") else 1.0
        torch.testing.assert_close(g, ref[n] * scale)


def test_head_blocks_split_a_shared_bias_among_its_modalities() -> None:
    model = make_toy_model(3)
    blocks, biases = head_blocks(model, ["m0", "m1", "m2"])
    assert [b for b, _ in biases] == [model.fusion.fc.bias] and biases[0][1] == ["m0", "m1", "m2"]
    assert all(blocks[m][0][0] is model.fusion.fc.weight for m in blocks)
    own = make_toy_model(2, fusion="sum")
    _, own_biases = head_blocks(own, ["m0", "m1"])
    assert [(b, ms) for b, ms in own_biases] == [
        (own.fusion.heads["m0"].bias, ["m0"]),
        (own.fusion.heads["m1"].bias, ["m1"]),
    ]
