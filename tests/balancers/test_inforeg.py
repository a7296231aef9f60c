"""InfoReg: the code rule re-enacted literally from the authors' ``main.py``; the paper rule's formulas."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_toy_batch, make_toy_model
from torch import Tensor, nn

import equimodal as em
from equimodal.balancers.inforeg import fisher_traces, regulation_coefficients, window_growth
from equimodal.testing import drive_step


def two_signal_batch(step: int, n: int = 16) -> tuple[dict[str, Tensor], Tensor]:
    """A batch where the label shows more in ``m0`` on even steps and more in ``m1`` on odd ones."""
    g = torch.Generator().manual_seed(1000 + step)
    y = torch.randint(0, 3, (n,), generator=g)
    strong, weak = (2.5, 0.3) if step % 2 == 0 else (0.3, 2.5)
    x0, x1 = torch.randn(n, 5, generator=g), torch.randn(n, 6, generator=g)
    x0[:, 0] += strong * y.float()
    x1[:, 0] += weak * y.float()
    return {"m0": x0, "m1": x1}, y


def official_epochs(model: nn.Module, epochs: int, steps: int, lr: float) -> list[dict[str, object]]:
    """The official ``train_epoch`` (main.py lines 231-604), InfoReg path, re-enacted on a toy model.

    Literal but for names: ``audio_net``/``visual_net`` are ``encoders.m0``/``m1``; ``head`` is the concat
    fusion's ``fc``; the Fisher layers are ``(Conv1d, Linear)`` where theirs are ``(Conv2d, Linear)``
    (the toy encoder's convolution is 1-D). The three logging-only backward passes (lines 406-453) end
    in ``zero_grad`` and change nothing, so they are left out here (the cost benchmark keeps them).
    """
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    criterion = nn.CrossEntropyLoss()
    softmax, tanh = nn.Softmax(dim=1), nn.Tanh()
    audio_trace_list = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0]  # line 694
    audio_net, visual_net = model.encoders["m0"], model.encoders["m1"]
    head = model.fusion.fc
    log: list[dict[str, object]] = []
    for epoch in range(epochs):
        if epoch == 0:  # lines 237-243
            k = 1
        else:
            tr1 = sum(audio_trace_list[-10:]) / 10
            tr2 = sum(audio_trace_list[-11:-1]) / 10
            k = (tr1 - tr2) / tr1
        global_model = copy.deepcopy(model)  # line 259
        fim_audio = {}
        for name, module in audio_net.named_modules():  # lines 303-307
            if isinstance(module, (nn.Conv1d, nn.Linear)) and module.weight.requires_grad:
                fim_audio[name] = torch.zeros_like(module.weight)
        for step in range(steps):
            batch, label = two_signal_batch(epoch * steps + step)
            optimizer.zero_grad()
            a, v = audio_net(batch["m0"]), visual_net(batch["m1"])
            out = head(torch.cat((a, v), 1))
            d = a.shape[1]
            out_v = torch.mm(v, torch.transpose(head.weight[:, d:], 0, 1)) + head.bias / 2  # line 361
            out_a = torch.mm(a, torch.transpose(head.weight[:, :d], 0, 1)) + head.bias / 2  # line 363
            loss = criterion(out, label)
            loss_out_v = criterion(out_v, label)
            loss_out_a = criterion(out_a, label)
            loss_out_v.backward(retain_graph=True)  # lines 456-458
            loss_out_a.backward(retain_graph=True)
            loss.backward()
            score_v = sum([softmax(out_v)[i][label[i]] for i in range(out_v.size(0))])  # lines 460-461
            score_a = sum([softmax(out_a)[i][label[i]] for i in range(out_a.size(0))])
            if (score_a > score_v) and k > 0.05:  # lines 465-485
                gap = tanh(score_a - score_v)
                beta = 0.95 * torch.exp(gap)
                beta2 = 0
            elif (score_a < score_v) and k > 0.05:
                gap = tanh(score_v - score_a)
                beta2 = 0.1 * torch.exp(gap)
                beta = 0
            else:
                beta = 0
                beta2 = 0
            with torch.no_grad():  # lines 489-495 (their parameters are leaves; the edit is not recorded)
                for model_param, global_model_param in zip(
                    model.parameters(), global_model.parameters(), strict=True
                ):
                    if model_param.requires_grad and any(model_param is p for p in audio_net.parameters()):
                        model_param.grad += beta * (model_param - global_model_param)
                    if model_param.requires_grad and any(model_param is p for p in visual_net.parameters()):
                        model_param.grad += beta2 * (model_param - global_model_param)
            for name, module in audio_net.named_modules():  # lines 507-511
                if name in fim_audio:
                    fim_audio[name] += module.weight.grad * module.weight.grad
                    fim_audio[name].detach_()
            optimizer.step()
            log.append(
                {
                    "k": float(k),
                    "beta": float(beta.detach()) if torch.is_tensor(beta) else float(beta),
                    "beta2": float(beta2.detach()) if torch.is_tensor(beta2) else float(beta2),
                    "trace": sum(f.mean().item() for f in fim_audio.values()),
                    "params": {n: p.detach().clone() for n, p in model.named_parameters()},
                }
            )
        audio_trace_list.append(sum(f.mean().item() for f in fim_audio.values()))  # lines 569-595
    return log


def test_code_rule_equals_a_literal_reenactment_of_the_official_train_epoch() -> None:
    """Coefficients, window, Fisher trace and every parameter after every step, over 12 epochs."""
    epochs, steps, lr = 12, 2, 0.2  # the window closes at epoch 11
    model = make_toy_model(2)
    twin = copy.deepcopy(model)
    ref = official_epochs(twin, epochs, steps, lr)
    balancer = em.create_balancer("inforeg", model, rule="code")
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    seen = {"audio": 0, "visual": 0, "closed": 0}
    for epoch in range(epochs):
        balancer.start_epoch(epoch)
        for step in range(steps):
            batch, y = two_signal_batch(epoch * steps + step)
            drive_step(balancer, model, batch, y, opt)
            want, got = ref[epoch * steps + step], balancer.stats()
            where = f"epoch {epoch} step {step}"
            assert got["window"] == float(want["k"] > 0.05), where
            assert got["growth"] == pytest.approx(want["k"], rel=1e-5, abs=1e-7), where
            assert got["coef/m0"] == pytest.approx(want["beta"], rel=1e-5, abs=1e-7), where
            assert got["coef/m1"] == pytest.approx(want["beta2"], rel=1e-5, abs=1e-7), where
            assert got["trace/m0"] == pytest.approx(want["trace"], rel=1e-4), where
            for name, p in model.named_parameters():
                torch.testing.assert_close(p.detach(), want["params"][name], rtol=1e-4, atol=1e-6)
            seen["audio"] += want["beta"] > 0
            seen["visual"] += want["beta2"] > 0
            seen["closed"] += want["k"] <= 0.05
    assert min(seen.values()) > 0, f"every branch of the official rule must be exercised: {seen}"


def test_paper_coefficient_is_exp_beta_tanh_of_the_mean_log_probability_gap() -> None:
    """``a = exp(0.9 tanh(D))`` for the stronger modality, D from batch means of log true-class probabilities
    (Eq. 8 read as a performance score, Eqs. 10 and 16)."""
    model = make_toy_model(2)
    balancer = em.create_balancer("inforeg", model, warmup_epochs=0)
    balancer.start_epoch(0)
    batch, y = make_toy_batch(2, 16, seed=4)
    out = model(batch)
    balancer.loss(out, y).backward()
    logp = {
        m: torch.log_softmax(out.unimodal_logits[m].detach(), 1)[torch.arange(16), y].mean()
        for m in ("m0", "m1")
    }
    gap = logp["m1"] - logp["m0"]
    coefs = balancer.coefficients()
    strong = 1 if gap > 0 else 0
    torch.testing.assert_close(coefs[strong], torch.exp(0.9 * torch.tanh(gap.abs())))
    assert coefs[1 - strong] == 0
    balancer.before_step()


def test_the_paper_rule_regulates_nothing_in_the_first_two_epochs_then_per_modality_windows() -> None:
    """Algorithm 1: epochs 0 and 1 only train and measure; from epoch 2 each modality's own trace growth
    (Eq. 11) opens its window."""
    model = make_toy_model(2)
    balancer = em.create_balancer("inforeg", model, threshold=-1.0)  # every window open once allowed
    stats = run_epochs(balancer, model, 3)
    for s in stats[:4]:  # epochs 0 and 1, two steps each
        assert s["window/m0"] == s["window/m1"] == 0.0 and s["coef/m0"] == s["coef/m1"] == 0.0
    assert stats[4]["window/m0"] == stats[4]["window/m1"] == 1.0
    assert max(stats[4]["coef/m0"], stats[4]["coef/m1"]) > 0
    history = balancer.history
    own = [float(window_growth(history[:, i])) for i in range(2)]
    assert [stats[4]["growth/m0"], stats[4]["growth/m1"]] == pytest.approx(own)


def test_proximal_gradient_is_a_times_the_distance_to_the_epoch_start_weights() -> None:
    """The balancer's gradient minus plain CE's is ``a (w - w_prev)`` on the strongest encoder, 0 elsewhere."""
    model = make_toy_model(3)
    balancer = em.create_balancer("inforeg", model, warmup_epochs=0)
    balancer.start_epoch(0)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch, y = make_toy_batch(3, 16, seed=9)
    model.zero_grad()
    F.cross_entropy(model(batch).logits, y).backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    balancer.loss(model(batch), y).backward()
    coefs, lowest = balancer.coefficients(), int(balancer.scores.argmin())
    balancer.before_step()
    assert int((coefs > 0).sum()) == 2  # every modality but the lowest scorer (Eqs. 9-10)
    assert coefs[lowest] == 0
    for n, p in model.named_parameters():
        m = n.split(".")[1] if n.startswith("encoders.") else None
        a = coefs[balancer.modalities.index(m)] if m else torch.zeros(())
        torch.testing.assert_close(p.grad, plain[n] + a * (p.detach() - start[n]))


def test_window_growth_and_traces_match_their_definitions() -> None:
    traces = [3.0, 5.0, 4.0, 4.5]
    for smoothing in (1, 3):
        history = torch.zeros(smoothing + 1)
        padded = [0.0] * smoothing
        for t in traces:
            history = torch.cat([history[1:], torch.tensor([t])])
            padded.append(t)
            new, old = sum(padded[-smoothing:]) / smoothing, sum(padded[-smoothing - 1 : -1]) / smoothing
            assert float(window_growth(history)) == pytest.approx((new - old) / new)
    assert float(window_growth(torch.zeros(3))) == 0.0  # no trace: closed, not a division by zero
    g = [torch.randn(4, 3), torch.randn(5)]
    torch.testing.assert_close(
        fisher_traces([g], "sum", torch.device("cpu"))[0], sum((t * t).sum() for t in g)
    )
    torch.testing.assert_close(
        fisher_traces([g], "layer_mean", torch.device("cpu"))[0], sum((t * t).mean() for t in g)
    )


def test_regulation_of_the_paper_and_of_the_code_for_three_modalities() -> None:
    scores, ones, on = torch.tensor([0.5, 0.9, 0.6]), torch.ones(3), torch.tensor(True)
    # paper (Eqs. 9-10): m1 above m0 and m2, mean gap 0.35; m2 above m0, gap 0.1; m0 is the lowest
    paper = regulation_coefficients(scores, 0.9, ones, on, "above_lower")
    want = [0.0, math.exp(0.9 * math.tanh(0.35)), math.exp(0.9 * math.tanh(0.1))]
    torch.testing.assert_close(paper, torch.tensor(want))
    # code: only the strongest, against the mean of the others
    code = regulation_coefficients(scores, 0.9, ones, on, "strongest")
    torch.testing.assert_close(code, torch.tensor([0.0, math.exp(0.9 * math.tanh(0.9 - 0.55)), 0.0]))
    windows = torch.tensor([True, False, True])  # m1's window closed: only m2 is pulled
    torch.testing.assert_close(
        regulation_coefficients(scores, 0.9, ones, windows, "above_lower"), paper * windows
    )
    for rule in ("above_lower", "strongest"):
        assert not regulation_coefficients(scores, 0.9, ones, torch.tensor(False), rule).any()
        tie = regulation_coefficients(torch.tensor([0.7, 0.7]), 0.9, torch.ones(2), on, rule)
        assert not tie.any()
        two = torch.tensor([0.2, 0.6])  # two modalities: both rules pick the stronger with D = 0.4
        torch.testing.assert_close(
            regulation_coefficients(two, 0.9, torch.ones(2), on, rule),
            torch.tensor([0.0, math.exp(0.9 * math.tanh(0.4))]),
        )


def run_epochs(balancer: em.Balancer, model: nn.Module, epochs: int) -> list[dict[str, float]]:
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    out = []
    for epoch in range(epochs):
        balancer.start_epoch(epoch)
        for step in range(2):
            drive_step(balancer, model, *make_toy_batch(2, 16, seed=10 * epoch + step), opt)
            out.append(balancer.stats())
    return out


def test_the_window_closes_and_the_pull_stops_when_the_trace_stops_growing() -> None:
    model = make_toy_model(2)
    stats = run_epochs(em.create_balancer("inforeg", model, threshold=0.5, warmup_epochs=0), model, 6)
    for m in ("m0", "m1"):
        windows = [s[f"window/{m}"] for s in stats]
        assert windows[0] == 1.0 and 0.0 in windows
        for s in stats:
            if s[f"window/{m}"] == 0.0:
                assert s[f"coef/{m}"] == 0.0 and s[f"growth/{m}"] <= 0.5


def test_outside_the_window_the_step_is_plain_training_and_the_anchor_waits() -> None:
    model = make_toy_model(2)
    twin = copy.deepcopy(model)
    balancer = em.create_balancer("inforeg", model, start_epoch=2)
    run_epochs(balancer, model, 2)
    run_epochs(em.create_balancer("none", twin), twin, 2)
    for (n, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q), n
    assert balancer.anchor is None and balancer.epochs_traced == 0


def test_restarting_the_same_epoch_after_a_resume_keeps_the_anchor_and_trace() -> None:
    model = make_toy_model(2)
    balancer = em.create_balancer("inforeg", model)
    run_epochs(balancer, model, 2)
    state = balancer.state_dict()
    fresh = em.create_balancer("inforeg", model)
    fresh.load_state_dict(state)
    fresh.start_epoch(1)  # a driver restarting epoch 1 after the resume
    torch.testing.assert_close(fresh.anchor, state["anchor"])
    torch.testing.assert_close(fresh.epoch_trace, state["epoch_trace"])
    assert fresh.epochs_traced == 1 and fresh.trace_steps == 2


def test_a_non_finite_step_adds_nothing_and_leaves_the_trace() -> None:
    model = make_toy_model(2)
    balancer = em.create_balancer("inforeg", model)
    run_epochs(balancer, model, 1)
    before = balancer.epoch_trace.clone()
    batch, y = make_toy_batch(2, 16, seed=3)
    balancer.loss(model(batch), y).backward()
    next(model.encoders["m0"].parameters()).grad.fill_(float("inf"))
    balancer.before_step()
    assert balancer.stats()["coef/m0"] == balancer.stats()["coef/m1"] == 0.0
    assert torch.equal(balancer.epoch_trace, before)


def test_code_rule_adds_the_unimodal_losses() -> None:
    model = make_toy_model(2)
    batch, y = make_toy_batch(2, 16, seed=5)
    out = model(batch)
    balancer = em.create_balancer("inforeg", model, rule="code")
    balancer.start_epoch(0)
    want = F.cross_entropy(out.logits, y) + sum(
        F.cross_entropy(out.unimodal_logits[m], y) for m in ("m0", "m1")
    )
    torch.testing.assert_close(balancer.loss(out, y), want)
    paper = em.create_balancer("inforeg", model)
    paper.start_epoch(0)
    torch.testing.assert_close(paper.loss(out, y), F.cross_entropy(out.logits, y))


def test_code_rule_presets_and_per_modality_scales() -> None:
    b = em.create_balancer("inforeg", make_toy_model(2), rule="code")
    assert (b.threshold, b.beta, b.score, b.smoothing, b.window_on, b.trace) == (
        0.05,
        1.0,
        "sum",
        10,
        "m0",
        "layer_mean",
    )
    torch.testing.assert_close(b.scales, torch.tensor([0.95, 0.1]))
    b3 = em.create_balancer(
        "inforeg", make_toy_model(3), rule="code", scale={"m0": 0.9, "m1": 0.1, "m2": 0.2}
    )
    torch.testing.assert_close(b3.scales, torch.tensor([0.9, 0.1, 0.2]))
    assert (b.score_kind, b.regulate, b.warmup_epochs) == ("prob", "strongest", 0)
    p = em.create_balancer("inforeg", make_toy_model(2))
    assert (p.threshold, p.beta, p.score, p.smoothing, p.window_on, p.trace, p.unimodal_loss) == (
        0.04,
        0.9,
        "mean",
        1,
        "each",
        "sum",
        0.0,
    )
    assert (p.score_kind, p.regulate, p.warmup_epochs) == ("log_prob", "above_lower", 2)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"rule": "released"}, "'rule' must be one of 'paper', 'code', found 'released'"),
        ({"threshold": float("nan")}, "'threshold' must be a finite number"),
        ({"beta": -1.0}, "'beta' must be a finite number >= 0, found -1.0"),
        ({"smoothing": 0}, "'smoothing' must be an integer >= 1"),
        ({"score": "max"}, "'score' must be one of 'mean', 'sum', found 'max'"),
        ({"trace": "full"}, "'trace' must be one of 'sum', 'layer_mean', found 'full'"),
        ({"score_kind": "loss"}, "'score_kind' must be one of 'log_prob', 'prob', found 'loss'"),
        ({"regulate": "all"}, "'regulate' must be one of 'above_lower', 'strongest', found 'all'"),
        ({"warmup_epochs": -1}, "'warmup_epochs' must be an integer >= 0, found -1"),
        (
            {"window_on": "audio"},
            r"'window_on' must be 'each', 'all' or a modality name \(m0, m1, m2\), found 'audio'",
        ),
        (
            {"rule": "code"},
            r"rule='code' has per-modality betas for two modalities.*has 3.*scale=\{name: value\}",
        ),
        ({"scale": {"m0": 1.0, "audio": 2.0}}, r"found unknown \['audio'\] and missing \['m1', 'm2'\]"),
        (
            {"scale": {"m0": 1.0, "m1": -1.0, "m2": 1.0}},
            r"'scale\[m1\]' must be a finite number >= 0, found -1.0",
        ),
    ],
)
def test_bad_options_are_refused_naming_the_option(options: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        em.create_balancer("inforeg", make_toy_model(3), **options)
