"""dgl: the authors' two backward passes re-enacted (fidelity), the stop-gradients both ways, the bias of the
concat unimodal logits, the clipping, separate heads for fusions that cannot be split, and bad options."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import make_toy_batch, make_toy_model
from torch import Tensor, nn

import equimodal as em
from equimodal.types import MultimodalOutput


# ------------------------------------------------------------------ the authors' model and step, re-enacted
class TheirConcat(nn.Module):
    """``ConcatFusion_DGL`` (models/fusion_modules.py lines 45-59): fused on detached features, unimodal
    logits ``fc_out([x, 0])`` and ``fc_out([0, y])``."""

    def __init__(self, fc: nn.Linear) -> None:
        super().__init__()
        self.fc_out = copy.deepcopy(fc)

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        output = self.fc_out(torch.cat((x, y), dim=1).detach())
        x_out = self.fc_out(torch.cat((x, torch.zeros_like(y)), dim=1))
        y_out = self.fc_out(torch.cat((torch.zeros_like(x), y), dim=1))
        return x_out, y_out, output


class TheirSum(nn.Module):
    """``SumFusion_DGL`` (lines 16-30)."""

    def __init__(self, heads: nn.ModuleDict) -> None:
        super().__init__()
        self.fc_x, self.fc_y = copy.deepcopy(heads["m0"]), copy.deepcopy(heads["m1"])

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        outx, outy = self.fc_x(x), self.fc_y(y)
        output = self.fc_x(x.detach()) + self.fc_y(y.detach())
        return outx, outy, output


class TheirModel(nn.Module):
    """``AVClassifier_DGL`` (models/basic_model.py lines 10-86) on our toy encoders."""

    def __init__(self, ours: nn.Module) -> None:
        super().__init__()
        self.audio_net = copy.deepcopy(ours.encoders["m0"])
        self.visual_net = copy.deepcopy(ours.encoders["m1"])
        fusion = ours.fusion
        self.fusion_module = TheirConcat(fusion.fc) if hasattr(fusion, "fc") else TheirSum(fusion.heads)

    def forward(self, audio: Tensor, visual: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        a_out, v_out, out = self.fusion_module(self.audio_net(audio), self.visual_net(visual))
        return out, a_out, v_out


def their_step(
    model: TheirModel, batch: dict[str, Tensor], label: Tensor, alpha: float, max_norm: float
) -> None:
    """``main_dgl.py`` train_epoch lines 97-129: two backward passes, the fusion's unimodal gradients
    dropped in between, then the whole model clipped (under DataParallel, as they run it)."""
    wrapped = nn.Module()
    wrapped.module = model  # their parameter names start with "module."
    criterion = nn.CrossEntropyLoss()
    for p in wrapped.parameters():
        p.grad = None
    out, out_a, out_v = model(batch["m0"], batch["m1"])
    loss_v = criterion(out_v, label)
    loss_a = criterion(out_a, label)
    loss_f = criterion(out, label)
    loss_unimodal = (loss_a + loss_v) * alpha
    loss_unimodal.backward(retain_graph=True)
    for name, parms in wrapped.named_parameters():
        layer = str(name).split(".")[1]
        if "fusion" in layer:
            parms.grad = None
    loss_f.backward()
    nn.utils.clip_grad_norm_(wrapped.parameters(), max_norm=max_norm, norm_type=2)


def our_step(bal: em.Balancer, batch: dict[str, Tensor], y: Tensor) -> None:
    bal.model.zero_grad(set_to_none=True)
    bal.loss(bal.model(batch), y).backward()
    bal.before_step()


def pairs(ours: nn.Module, theirs: TheirModel) -> list[tuple[str, Tensor, Tensor]]:
    """(name, our gradient, their gradient) for every parameter, matched by role."""
    found = [
        (f"m0.{n}", p, dict(theirs.audio_net.named_parameters())[n])
        for n, p in ours.encoders["m0"].named_parameters()
    ]
    found += [
        (f"m1.{n}", p, dict(theirs.visual_net.named_parameters())[n])
        for n, p in ours.encoders["m1"].named_parameters()
    ]
    if hasattr(ours.fusion, "fc"):
        found += [
            (f"fc.{n}", p, getattr(theirs.fusion_module.fc_out, n))
            for n, p in ours.fusion.fc.named_parameters()
        ]
    else:
        for m, their in (("m0", theirs.fusion_module.fc_x), ("m1", theirs.fusion_module.fc_y)):
            found += [
                (f"head.{m}.{n}", p, getattr(their, n)) for n, p in ours.fusion.heads[m].named_parameters()
            ]
    return found


@pytest.mark.parametrize("fusion", ["concat", "sum"])
@pytest.mark.parametrize("clip", [40.0, 0.05])  # 40: the authors' value (inactive here); 0.05: clipping acts
def test_fidelity_one_backward_equals_their_two(fusion: str, clip: float) -> None:
    ours = make_toy_model(2, fusion=fusion, seed=3)
    theirs = TheirModel(ours)
    batch, y = make_toy_batch(2, seed=4)
    bal = em.create_balancer("dgl", ours, alpha=4.0, clip_norm=clip)
    assert bal.heads is None and not list(bal.parameters())
    our_step(bal, batch, y)
    their_step(theirs, batch, y, alpha=4.0, max_norm=clip)
    for name, mine, their in pairs(ours, theirs):
        assert mine.grad is not None and their.grad is not None, name
        torch.testing.assert_close(mine.grad, their.grad, msg=name)
    scale = bal.stats()["clip_scale"]
    assert (scale < 1.0) == (clip < 1.0)


def test_fidelity_their_logged_figure_and_unimodal_logits() -> None:
    ours = make_toy_model(2, seed=5)
    theirs = TheirModel(ours)
    batch, y = make_toy_batch(2, seed=6)
    bal = em.create_balancer("dgl", ours)
    our_step(bal, batch, y)
    their_step(theirs, batch, y, alpha=4.0, max_norm=40.0)
    stats = bal.stats()
    for m, net in (("m0", theirs.audio_net), ("m1", theirs.visual_net)):
        their_sum = sum(torch.abs(p.grad).mean().item() for p in net.parameters())  # lines 132-143
        assert stats[f"grad_sum/{m}"] == pytest.approx(their_sum, rel=1e-5)
    with torch.no_grad():
        _, out_a, out_v = theirs(batch["m0"], batch["m1"])
        uni = bal.predict_unimodal(ours(batch))
    torch.testing.assert_close(uni["m0"], out_a)
    torch.testing.assert_close(uni["m1"], out_v)
    losses = [F.cross_entropy(out_a, y), F.cross_entropy(out_v, y)]
    assert [stats["uni_loss/m0"], stats["uni_loss/m1"]] == pytest.approx([float(v) for v in losses], rel=1e-5)


# ------------------------------------------------------------------ mechanism
def _split_grads(model: nn.Module, loss: Tensor) -> dict[str, Tensor]:
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True, retain_graph=True)
    return {
        n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), grads, strict=True)
    }


@pytest.mark.parametrize("bias", ["full", "share"])
def test_encoders_learn_only_unimodal_and_the_head_only_fused(bias: str) -> None:
    """M = 3: encoder gradients are alpha * the unimodal CEs' and nothing else, the head's are the fused CE's."""
    model = make_toy_model(3, seed=7)
    batch, y = make_toy_batch(3, seed=8)
    bal = em.create_balancer("dgl", model, alpha=2.5, clip_norm=None, unimodal_bias=bias)
    out = model(batch)
    b = model.fusion.fc.bias
    rest = b * (2.0 / 3.0) if bias == "full" else 0.0
    uni = sum(F.cross_entropy(out.unimodal_logits[m] + rest, y) for m in bal.modalities)
    from_uni = _split_grads(model, 2.5 * uni)
    from_fused = _split_grads(model, F.cross_entropy(out.logits, y))
    our_step(bal, batch, y)
    for name, p in model.named_parameters():
        expected = from_fused[name] if name.startswith("fusion.") else from_uni[name]
        torch.testing.assert_close(p.grad, expected, msg=name)
        if not name.startswith("fusion."):  # the fused CE would have moved the encoders too
            assert not torch.allclose(from_fused[name], torch.zeros_like(p)), name


def test_bias_option_changes_encoder_gradients_only_for_concat() -> None:
    grads = {}
    for fusion in ("concat", "sum"):
        for bias in ("full", "share"):
            model = make_toy_model(2, fusion=fusion, seed=9)
            with torch.no_grad():
                for p in model.fusion.parameters():
                    if p.dim() == 1:
                        p.add_(1.0)  # a bias far from zero
            bal = em.create_balancer("dgl", model, unimodal_bias=bias)
            our_step(bal, *make_toy_batch(2, seed=10))
            grads[fusion, bias] = torch.cat([p.grad.flatten() for p in model.encoders.parameters()])
    assert not torch.allclose(grads["concat", "full"], grads["concat", "share"])
    torch.testing.assert_close(grads["sum", "full"], grads["sum", "share"])


def test_separate_heads_for_a_fusion_that_cannot_be_split() -> None:
    model = make_toy_model(2, fusion="film", seed=11)
    batch, y = make_toy_batch(2, seed=12)
    bal = em.create_balancer("dgl", model, alpha=3.0, clip_norm=None)
    assert bal.heads is not None and bal.requirements.parameters
    with pytest.raises(ValueError, match="cannot be split"):
        em.create_balancer("dgl", model, heads="shared")
    out = model(batch)
    own = sum(F.cross_entropy(bal.heads.linears[m](out.features[m]), y) for m in bal.modalities)
    from_uni = _split_grads(model, 3.0 * own)
    fused = _split_grads(model, F.cross_entropy(out.logits, y))
    opt = torch.optim.SGD([*model.parameters(), *bal.parameters()], lr=0.1)
    our_step(bal, batch, y)
    for name, p in model.encoders.named_parameters():
        torch.testing.assert_close(p.grad, from_uni[f"encoders.{name}"], msg=name)
    for name, p in model.fusion.named_parameters():
        if not name.startswith("aux."):  # the auxiliary heads learn from their own CE (base class)
            torch.testing.assert_close(p.grad, fused[f"fusion.{name}"], msg=name)
    assert all(p.grad is not None for p in bal.parameters())
    opt.step()
    assert set(bal.predict_unimodal(model(batch))) == set(bal.modalities)


def test_clip_scale_and_grad_sum_are_recorded_without_a_host_read_in_the_step() -> None:
    model = make_toy_model(2, seed=13)
    bal = em.create_balancer("dgl", model, clip_norm=1e-3)
    our_step(bal, *make_toy_batch(2, seed=14))
    stats = bal.stats()
    assert stats["clip_scale"] < 1.0
    total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert float(total) == pytest.approx(1e-3, rel=1e-3)  # clipped to clip_norm
    assert {"fused_loss", "uni_loss/m0", "grad_sum/m1"} <= set(stats)
    unclipped = em.create_balancer("dgl", make_toy_model(2, seed=13), clip_norm=None)
    our_step(unclipped, *make_toy_batch(2, seed=14))
    assert "clip_scale" not in unclipped.stats()


def test_a_non_finite_step_is_not_clipped() -> None:
    model = make_toy_model(2, seed=15)
    bal = em.create_balancer("dgl", model, clip_norm=1e-3)
    out = model(make_toy_batch(2, seed=16)[0])
    bal.loss(out, make_toy_batch(2, seed=16)[1]).backward()
    model.encoders["m0"].fc.weight.grad[0, 0] = float("inf")
    before = model.encoders["m1"].fc.weight.grad.clone()
    bal.before_step()
    torch.testing.assert_close(model.encoders["m1"].fc.weight.grad, before)
    assert bal.stats()["clip_scale"] == 1.0


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"alpha": 0.0}, "'alpha' must be a finite number > 0, found 0.0"),
        ({"alpha": float("nan")}, "'alpha'"),
        ({"clip_norm": -1.0}, "'clip_norm' must be a finite number > 0 or None"),
        ({"unimodal_bias": "half"}, "'unimodal_bias' must be one of 'full', 'share', found 'half'"),
        ({"heads": "own"}, "'heads' must be one of 'shared', 'separate', found 'own'"),
    ],
)
def test_bad_options_are_named(options: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        em.create_balancer("dgl", make_toy_model(2), **options)


class NoFusion(nn.Module):
    """A contract model written by hand: no ``fusion`` attribute, a linear head per tower, summed."""

    def __init__(self, aux: bool = False) -> None:
        super().__init__()
        torch.manual_seed(21)
        self.encoders = nn.ModuleDict(
            {f"m{i}": nn.Sequential(nn.Linear(5 + i, 6), nn.Tanh()) for i in range(3)}
        )
        self.heads = nn.ModuleDict({m: nn.Linear(6, 3) for m in self.encoders})
        self.aux = aux
        for enc in self.encoders.values():
            enc.out_dim = 6  # type: ignore[assignment]
        self.num_classes = 3

    @property
    def auxiliary_heads(self) -> bool:
        return self.aux

    def forward(self, batch: dict[str, Tensor]) -> MultimodalOutput:
        feats = {m: enc(batch[m]) for m, enc in self.encoders.items()}
        uni = {m: self.heads[m](feats[m].detach() if self.aux else feats[m]) for m in feats}
        return MultimodalOutput(torch.stack(list(uni.values())).sum(0), uni, feats)


@pytest.mark.parametrize("aux", [False, True])
def test_a_model_without_a_fusion_module_gets_the_same_split(aux: bool) -> None:
    """Routed through the features: encoders get alpha * the unimodal CEs' gradient, the heads the fused
    CE's (with ``aux``, the unimodal CEs come from the balancer's own heads)."""
    model = NoFusion(aux)
    batch, y = make_toy_batch(3, seed=22)
    bal = em.create_balancer("dgl", model, alpha=1.5, clip_norm=None)
    assert (bal.heads is not None) == aux
    out = model(batch)
    if aux:
        uni = sum(F.cross_entropy(bal.heads.linears[m](out.features[m]), y) for m in bal.modalities)
    else:
        uni = sum(F.cross_entropy(out.unimodal_logits[m], y) for m in bal.modalities)
    fused = F.cross_entropy(out.logits, y)
    if aux:  # the base class's term: the model's auxiliary heads learn from their own CE
        fused = fused + sum(F.cross_entropy(out.unimodal_logits[m], y) for m in bal.modalities)
    from_uni, from_fused = _split_grads(model, 1.5 * uni), _split_grads(model, fused)
    loss = bal.loss(out, y)
    torch.testing.assert_close(loss, fused + 1.5 * uni)  # the value is the authors' two losses
    model.zero_grad(set_to_none=True)
    loss.backward()
    bal.before_step()
    for name, p in model.named_parameters():
        expected = from_uni[name] if name.startswith("encoders.") else from_fused[name]
        torch.testing.assert_close(p.grad, expected, msg=name)


def test_features_missing_or_detached_are_refused() -> None:
    model = make_toy_model(2)
    bal = em.create_balancer("dgl", model)
    batch, y = make_toy_batch(2)
    out = model(batch)
    with pytest.raises(ValueError, match="features=None"):
        bal.loss(MultimodalOutput(out.logits, out.unimodal_logits, None), y)
    other = NoFusion()
    routed = em.create_balancer("dgl", other)
    out = other(make_toy_batch(3)[0])
    detached = {m: z.detach() for m, z in out.features.items()}
    with pytest.raises(ValueError, match="do not require grad"):
        routed.loss(MultimodalOutput(out.logits, out.unimodal_logits, detached), make_toy_batch(3)[1])


def test_cost_benchmark_runs_both_steps(capsys: pytest.CaptureFixture[str]) -> None:
    """``benchmarks/dgl_cost.py --smoke``: our step and the authors' (two backward passes, ``.item()`` per
    parameter, a CSV row) both run and the ratio is printed."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "dgl_cost.py"
    spec = importlib.util.spec_from_file_location("dgl_cost", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--smoke"])
    assert result["ours_ms"] > 0 and result["theirs_ms"] > 0 and result["ratio"] > 0
    assert "ratio theirs / ours" in capsys.readouterr().out
