"""The code in docs/custom_balancer.md runs and its balancer behaves as described."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import make_toy_batch, make_toy_model

import equimodal as em
import equimodal.testing

DOC = Path(__file__).resolve().parents[1] / "docs" / "custom_balancer.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)


def test_custom_balancer_example_runs_and_scales_gradients() -> None:
    exec(compile(_blocks()[0], str(DOC), "exec"), {})
    model = make_toy_model(2)
    twin = make_toy_model(2)
    batch, y = make_toy_batch(2, 16)
    ours, plain = em.create_balancer("confidence_scale", model), em.create_balancer("none", twin)
    for bal, mod in ((ours, model), (plain, twin)):
        bal.loss(mod(batch), y).backward()
        bal.before_step()
    scale = ours.stats()
    assert set(scale) == {"scale/m0", "scale/m1"}
    for i, m in enumerate(["m0", "m1"]):
        got = model.encoders[m].fc.weight.grad
        ref = twin.encoders[m].fc.weight.grad
        assert torch.allclose(got, ref * scale[f"scale/{m}"], atol=1e-6), i
    assert torch.equal(model.fusion.fc.weight.grad, twin.fusion.fc.weight.grad)  # the head is untouched


def test_custom_balancer_passes_the_contract_suite() -> None:
    blocks = _blocks()
    namespace: dict = {}
    exec(compile(blocks[0], str(DOC), "exec"), namespace)
    exec(compile(blocks[1], str(DOC), "exec"), namespace)  # check_balancer(ConfidenceScale)
    results = em.testing.check_balancer(namespace["ConfidenceScale"], modalities=(2,))
    assert results["two_call_loop/M2"] == "honoured" and results["host_reads/M2"] == 0


@pytest.mark.ddp
def test_custom_balancer_keeps_ddp_ranks_identical() -> None:
    """The example under two gloo processes, each on data of its own: its declared statistic is reduced."""
    namespace: dict = {}
    exec(compile(_blocks()[0], str(DOC), "exec"), namespace)
    em.testing.check_ranks_agree(namespace["ConfidenceScale"])


def test_the_planner_example_plans_copies_and_passes_the_contract_suite() -> None:
    from equimodal.balancers.registry import BALANCERS

    blocks = _blocks()
    planner = next(b for b in blocks if "copy_mistakes" in b)
    namespace: dict = {}
    try:
        exec(compile(planner, str(DOC), "exec"), namespace)
        cls = namespace["CopyMistakes"]
        results = em.testing.check_balancer(cls, modalities=(2, 3))
        assert results["epoch_plan/M2"].startswith("planned epochs [0, 1]")
        model = make_toy_model(2)
        balancer = cls(model)
        balancer.start_epoch(0, em.testing.toy_epoch_data(2))
        plan = balancer.epoch_plan
        extra = len(plan) - 32
        assert extra > 0 and int(plan.zeroed.sum()) == extra  # one modality zeroed per copy
        assert bool((plan.zeroed.sum(1)[32:] == 1).all())
    finally:
        BALANCERS._items.pop("copy_mistakes", None)
        BALANCERS._owners.pop("copy_mistakes", None)
