"""greedy (Wu et al., ICML 2022): the official guided-training rule re-enacted, its windows, its options."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import equimodal as em
from equimodal.models.encoders import create_encoder
from equimodal.models.mmtm import MMTMClassifier
from equimodal.testing import toy_batch, toy_model


class OfficialGuided:
    """``Bias_Mitigation_Strong`` (official ``src/callbacks.py``) re-enacted with host floats, reading the
    parameters by name as the official code does (``mmtm`` -> gates, ``net_view_i`` -> encoder + head)."""

    def __init__(self, epsilon: float, window: int, starting_epoch: int) -> None:
        self.eps, self.q, self.start = epsilon, window, starting_epoch
        self.bypass, self.main = [0.0, 0.0], [0.0, 0.0]
        self.curation, self.caring, self.unlock, self.d = False, None, False, None

    def on_epoch_begin(self, epoch: int) -> None:  # the official epochs count from 1
        if epoch >= self.start:
            self.unlock = True

    def compute_bdr(self, model: torch.nn.Module) -> float:
        wn_b, gn_b, wn_m, gn_m = [0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]
        for name, p in model.named_parameters():
            wn, gn = (p**2).sum().item(), (p.grad**2).sum().item()
            if name.startswith("gates."):
                own = [i for i, m in enumerate(("m0", "m1")) if f".excite.{m}." in name]
                for i in own or [0, 1]:
                    wn_b[i] += wn
                    gn_b[i] += gn
            else:
                for i, m in enumerate(("m0", "m1")):
                    if f"encoders.{m}." in name or f"heads.{m}." in name:
                        wn_m[i] += wn
                        gn_m[i] += gn
        for i in range(2):
            self.bypass[i] += gn_b[i] / wn_b[i]
            self.main[i] += gn_m[i] / wn_m[i]
        return math.log10(self.bypass[0] / self.main[0]) - math.log10(self.bypass[1] / self.main[1])

    def on_backward_end(self, model: torch.nn.Module) -> None:
        if not self.unlock:
            self.d = self.compute_bdr(model)
            self.curation, self.caring = False, 0
        elif not self.curation:
            self.d = self.compute_bdr(model)
            if abs(self.d) > self.eps:
                self.curation, self.step = True, 0
                self.caring = 1 if self.d < 0 else 0
            else:
                self.curation, self.caring = False, 0
        else:
            self.step += 1
            if self.step == self.q:
                self.curation = False


def _train(balancer: em.Balancer, model: torch.nn.Module, epochs: int, steps: int, each=None) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for epoch in range(epochs):
        balancer.start_epoch(epoch)
        for step in range(steps):
            batch, y = toy_batch(2, 16, seed=100 * epoch + step)
            opt.zero_grad()
            out = model(batch)
            loss = balancer.loss(out, y, batch=batch)
            loss.backward()
            if each is not None:
                each(epoch, out, y, loss)
            balancer.before_step()
            opt.step()


@pytest.mark.parametrize("epsilon", [0.01, 0.0005])
def test_windows_and_d_follow_the_official_guided_callback(epsilon: float) -> None:
    """Fidelity: the speeds, d, the window's modality and its length equal the official callback's."""
    model = toy_model(2, fusion="mmtm")
    bal = em.create_balancer("greedy", model, epsilon=epsilon, window=3)
    official = OfficialGuided(epsilon, 3, starting_epoch=2)  # the official epochs count from 1
    windows = 0
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for epoch in range(3):
        bal.start_epoch(epoch)
        official.on_epoch_begin(epoch + 1)
        for step in range(10):
            batch, y = toy_batch(2, 16, seed=100 * epoch + step)
            opt.zero_grad()
            out = model(batch)
            loss = bal.loss(out, y, batch=batch)
            torch.testing.assert_close(loss, sum(F.cross_entropy(u, y) for u in out.unimodal_logits.values()))
            loss.backward()
            expected = [float(official.curation and official.caring == i) for i in range(2)]
            computes = not official.curation
            official.on_backward_end(model)
            bal.before_step()
            stats = bal.stats()
            assert [stats["window/m0"], stats["window/m1"]] == expected, (epoch, step)
            if computes:
                assert stats["d"] == pytest.approx(official.d, rel=1e-4, abs=1e-5), (epoch, step)
            windows += sum(expected) > 0
            opt.step()
    assert windows > 0


def test_no_window_before_starting_epoch_and_windows_after_it() -> None:
    """Mechanism: epoch 0 accumulates but opens no window; from epoch 1 windows of `window` steps open, and
    inside one the chosen modality's excitation is its running average (the same for every sample)."""
    model = toy_model(2, fusion="mmtm")
    bal = em.create_balancer("greedy", model, epsilon=0.0, window=4)
    rows: list[tuple[int, dict[str, float]]] = []
    gate_out: list[dict[str, torch.Tensor]] = []
    hook = model.gates[1].register_forward_hook(lambda mod, args, out: gate_out.append((args[0], out)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for epoch in range(2):
        bal.start_epoch(epoch)
        for step in range(12):
            batch, y = toy_batch(2, 16, seed=10 * epoch + step)
            opt.zero_grad()
            override = model.gates[1].override
            values = None if override is None else {m: v.clone() for m, v in override[1].items()}
            bal.loss(model(batch), y, batch=batch).backward()
            bal.before_step()
            rows.append((epoch, bal.stats()))
            opt.step()
            x, out = gate_out[-1]
            for m in ("m0", "m1"):
                if rows[-1][1][f"window/{m}"]:
                    torch.testing.assert_close(out[m], x[m] * values[m])
    hook.remove()
    windows = [(e, s["window/m0"] + s["window/m1"]) for e, s in rows]
    assert all(w == 0 for e, w in windows if e == 0)
    flags = [w for e, w in windows if e == 1]
    assert flags[0] == 0 and sum(flags) > 0
    first = flags.index(1)
    assert flags[first : first + 4] == [1, 1, 1, 1]  # a window lasts `window` steps
    assert first + 4 == len(flags) or flags[first + 4] == 0  # then a step decides again


def test_running_average_is_the_mean_of_the_batch_means_and_the_official_first_option() -> None:
    for source in ("own", "first"):
        model = toy_model(2, fusion="mmtm")
        bal = em.create_balancer("greedy", model, average_source=source, starting_epoch=5)
        means: list[dict[str, torch.Tensor]] = []
        gate = model.gates[0]

        def each(epoch, out, y, loss, gate=gate, means=means) -> None:  # noqa: ANN001
            means.append({m: s / y.shape[0] for m, s in gate.excitation_sums.items()})

        _train(bal, model, 1, 5, each)
        for m in ("m0", "m1"):
            tracked = "m0" if source == "first" else m
            expected = torch.stack([r[tracked] for r in means]).mean(0)
            torch.testing.assert_close(gate.override[1][m], expected)
        assert not bool(gate.override[0].any())  # no window before starting_epoch


def test_a_late_fusion_model_and_bad_options_are_refused_naming_them() -> None:
    with pytest.raises(ValueError, match=r"needs mid fusion through MMTM gates.*model\.fusion=mmtm"):
        em.create_balancer("greedy", toy_model(2))
    model = toy_model(2, fusion="mmtm")
    for key, value, words in [
        ("epsilon", -1.0, "epsilon' must be"),
        ("window", 0, "window' must be"),
        ("objective", "both", "objective' must be"),
        ("average_source", "visual", "average_source' must be"),
    ]:
        with pytest.raises(ValueError, match=f"{words}.*found"):
            em.create_balancer("greedy", model, **{key: value})
    mlps = {
        "a": create_encoder("mlp", in_dim=4, hidden=(8,)),
        "b": create_encoder("mlp", in_dim=5, hidden=(6,)),
    }
    with pytest.raises(ValueError, match="'average_source' must be 'own' for gates of unequal widths"):
        em.create_balancer("greedy", MMTMClassifier(mlps, 3), average_source="first")


def test_fused_objective_and_three_modalities_window_goes_to_the_largest_bdr() -> None:
    model = toy_model(3, fusion="mmtm")
    bal = em.create_balancer("greedy", model, objective="fused", epsilon=0.0, starting_epoch=0)
    batch, y = toy_batch(3, 16)
    bal.start_epoch(0)
    out = model(batch)
    loss = bal.loss(out, y, batch=batch)
    torch.testing.assert_close(loss, F.cross_entropy(out.logits, y))
    loss.backward()
    bal.before_step()
    s = bal.stats()
    bdr = torch.tensor([s[f"bdr/m{i}"] for i in range(3)])
    assert s["d"] == pytest.approx(float(bdr.max() - bdr.min()))
    assert int(bal.caring) == int(bdr.argmax()) and int(bal.remaining) == 5


def test_outside_its_epoch_window_the_gates_are_restored() -> None:
    model = toy_model(2, fusion="mmtm")
    bal = em.create_balancer("greedy", model, epsilon=0.0, starting_epoch=0, end_epoch=0)
    _train(bal, model, 1, 2)
    assert bool(model.gates[0].override[0].any())  # a window is open at the end of epoch 0
    bal.start_epoch(1)
    assert all(g.override is None for g in model.gates)
