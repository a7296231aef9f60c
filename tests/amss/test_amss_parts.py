"""AMSS's options as parts (RatioRule, Significance, Sampler, UnitSelection), the flat-option mapping and
the presets (equimodal.amss.parts)."""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any

import pytest
import torch
from conftest import make_toy_batch, make_toy_model
from torch import Tensor, nn

import equimodal as em
from equimodal.amss.explain import describe_units, unit_options
from equimodal.amss.parts import FLAT_OPTIONS, PARTS, PRESETS, RatioRule, Sampler, Significance, resolve_parts
from equimodal.amss.units import UnitSelection, discover_units, encoder_units
from equimodal.balancers.amss import AMSS
from equimodal.balancers.registry import BALANCERS
from equimodal.engine.config import load_config

# ------------------------------------------------------------------------------------ the parts
# (build, what the message names, the value found): a ValueError but for the three TypeErrors below
BAD_VALUES: list[tuple[Any, str, str]] = [
    (lambda: RatioRule(temperature=0.0), "temperature must be a finite number > 0", "0.0"),
    (lambda: RatioRule(k_min=0.0), r"k_min must lie in \(0, 1\]", "0.0"),
    (lambda: RatioRule(k_min=0.8, k_max=0.5), r"k_min \(0.8\) must be <= k_max", "0.5"),
    (lambda: RatioRule(form="softmax"), "ratio form must be one of 'one_minus_softmax'", "'softmax'"),
    (lambda: RatioRule(fixed=1.5), r"ratio must lie in \(0, 1\]", "1.5"),
    (lambda: RatioRule(fallback={"m0": 0.0}), r"fallback_ratio must lie in \(0, 1\]", "0.0"),
    (lambda: RatioRule(momentum=1.0), r"rho_momentum \(RatioRule.momentum\) must lie in \[0, 1\)", "1.0"),
    (lambda: Significance("probe"), "significance must be 'confidence' or 'speed'", "'probe'"),
    (lambda: Significance(label_entropy="bits"), "label_entropy must be one of 'exact'", "'bits'"),
    (lambda: Significance(feature_entropy="max"), "feature_entropy must be one of 'mean'", "'max'"),
    (lambda: Significance(head_weight=-1.0), "head_weight must be a finite number >= 0", "-1.0"),
    (lambda: Sampler("random"), "sampler must be one of 'adaptive', 'topk'", "'random'"),
    (lambda: Sampler(score="fisher"), "score must be one of 'gn'", "'fisher'"),
    (lambda: Sampler(rounding="round"), "rounding must be one of 'ceil', 'floor'", "'round'"),
    (lambda: Sampler(reweight="unbiased"), "reweight must be one of 'none'", "'unbiased'"),
    (lambda: Sampler(inclusion="exact"), "inclusion must be one of 'conditional'", "'exact'"),
    (lambda: Sampler(max_weight=0.5), "max_weight must be >= 1 or None", "0.5"),
    (lambda: Sampler(score_floor=math.nan), "score_floor must be a finite number >= 0", "nan"),
    (lambda: Sampler(code_bias=-0.1), "code_bias must be >= 0", "-0.1"),
    (lambda: UnitSelection(mask_encoders="yes"), "mask_encoders must be True or False", "'yes'"),
    (lambda: UnitSelection(mask_fusion="some"), "mask_fusion must be True, False, 'concat'", "'some'"),
    (lambda: UnitSelection(linear_rows="never"), "linear_rows must be True, False or 'auto'", "'never'"),
    (lambda: UnitSelection(conv_units="rows"), "conv_units must be one of 'filters'", "'rows'"),
    (lambda: UnitSelection(layer_kinds="ffn"), r"unknown layer kind\(s\)", "'ffn'"),
    (lambda: UnitSelection(heads={nn.Linear(2, 2): (2, "diag")}), "head declaration", "'diag'"),
]
BAD_TYPES: list[tuple[Any, str, str]] = [
    (lambda: UnitSelection(include=3), "include must be a callable", "int"),
    (lambda: UnitSelection(heads=[nn.Linear(2, 2)]), "heads must map Linear modules", "list"),
]


@pytest.mark.parametrize(
    ("build", "exc", "option", "found"),
    [(b, ValueError, o, f) for b, o, f in BAD_VALUES] + [(b, TypeError, o, f) for b, o, f in BAD_TYPES],
)
def test_a_part_checks_itself_naming_the_option_and_what_was_found(
    build: Any, exc: type, option: str, found: str
) -> None:
    with pytest.raises(exc, match=option) as info:
        build()
    assert found in str(info.value)


def test_parts_are_frozen_and_keep_their_defaults() -> None:
    for cls in PARTS.values():
        part = cls()
        field = dataclasses.fields(cls)[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(part, field, None)
    assert UnitSelection(layer_kinds="linear, conv").layer_kinds == ("conv", "linear")
    assert UnitSelection().layer_kinds == ("conv", "attention", "linear", "rnn")
    assert RatioRule(fixed=1).fixed == 1.0 and isinstance(RatioRule(fixed=1).fixed, float)
    with pytest.raises(ValueError, match="fallback_ratio must map every modality"):
        RatioRule(fallback={"m0": 0.4}).fallback_ratios(["m0", "m1"])
    assert RatioRule(fallback={"m1": 0.3, "m0": 0.4}).fallback_ratios(["m0", "m1"]) == [0.4, 0.3]


# ------------------------------------------------------------------------------ the flat mapping
def test_every_part_field_has_exactly_one_flat_option_in_the_signature() -> None:
    targets = sorted(FLAT_OPTIONS.values())
    assert len(set(targets)) == len(targets)
    assert targets == sorted((p, f.name) for p, cls in PARTS.items() for f in dataclasses.fields(cls))
    params = inspect.signature(AMSS).parameters
    for name, (part, field) in FLAT_OPTIONS.items():
        default = next(f.default for f in dataclasses.fields(PARTS[part]) if f.name == field)
        if name not in PARTS:  # ratio, sampler, significance: the part or its plain shorthand
            assert params[name].default == default, name
    assert BALANCERS.options("amss_plus")["max_weight"] == 10.0
    assert (
        "temperature" in inspect.signature(AMSS.__init__).parameters
    )  # what benchmarks/tune_on_val.py reads


def train_step(balancer: AMSS, model: nn.Module, seed: int = 0) -> list[Tensor]:
    batch, y = make_toy_batch(2, 16, seed=seed)
    model.zero_grad()
    balancer.loss(model(batch), y).backward()
    balancer.before_step()
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize(
    ("flat", "parts"),
    [
        (
            {
                "temperature": 0.5,
                "ratio_form": "softmax_neg",
                "k_min": 0.2,
                "rho_momentum": 0.5,
                "fallback_ratio": 0.4,
            },
            {"ratio": RatioRule(temperature=0.5, form="softmax_neg", k_min=0.2, momentum=0.5, fallback=0.4)},
        ),
        ({"ratio": "0.3", "stable_softmax": "false"}, {"ratio": RatioRule(fixed=0.3, stable_softmax=False)}),
        (
            {"significance": "speed", "offset": 1.0, "feature_entropy": "none"},
            {"significance": Significance("speed", offset=1.0, feature_entropy="none")},
        ),
        ({"sampler": "topk", "rounding": "floor"}, {"sampler": Sampler("topk", rounding="floor")}),
        (
            {"reweight": "inverse_inclusion", "max_weight": "10"},
            {"sampler": Sampler(reweight="inverse_inclusion", max_weight=10.0)},
        ),
        (
            {"conv_units": "weights", "layer_kinds": "conv", "mask_fusion": False},
            {"units": UnitSelection(conv_units="weights", layer_kinds=["conv"], mask_fusion=False)},
        ),
    ],
)
def test_flat_options_and_their_part_build_the_same_balancer(flat: dict, parts: dict) -> None:
    model = make_toy_model(2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    from_flat = em.create_balancer("amss", model, seed=3, **flat)  # through the registry, strings coerced
    grads_flat = [train_step(from_flat, model, seed=s) for s in range(3)]
    model.load_state_dict(state)
    from_parts = AMSS(model, seed=3, **parts)
    grads_parts = [train_step(from_parts, model, seed=s) for s in range(3)]
    assert from_flat.parts == from_parts.parts
    assert from_flat.parts != AMSS(model).parts
    for a, b in zip(grads_flat, grads_parts, strict=True):
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)
    assert from_flat.stats() == from_parts.stats()


def test_parts_pass_through_create_balancer_and_wrong_types_are_named() -> None:
    model = make_toy_model(2)
    bal = em.create_balancer("amss_plus", model, ratio=RatioRule(temperature=0.5), sampler=Sampler("topk"))
    assert (bal.parts.ratio.temperature, bal.masker.sampler, bal.masker.reweight) == (
        0.5,
        "topk",
        "inverse_inclusion",
    )
    with pytest.raises(TypeError, match="option 'units': expected a UnitSelection or None, found the string"):
        em.create_balancer("amss", model, units="conv")
    with pytest.raises(TypeError, match="units must be a UnitSelection or None"):
        AMSS(model, units="conv")  # type: ignore[arg-type]


def test_typos_get_close_matches_with_and_without_the_registry() -> None:
    model = make_toy_model(2)
    with pytest.raises(TypeError, match="unknown option.*Did you mean 'temperature'"):
        em.create_balancer("amss", model, temprature=0.5)
    with pytest.raises(
        TypeError,
        match=r"Balancer 'amss' got unknown option\(s\) \['temprature'\]. Did you mean 'temperature'",
    ):
        AMSS(model, temprature=0.5)
    with pytest.raises(ValueError, match="option 'ratio_form' must be one of .* Did you mean 'softmax_own'"):
        em.create_balancer("amss", model, ratio_form="softmax_onw")
    with pytest.raises(TypeError, match="option 'temperature': expected a number, found the string 'hot'"):
        em.create_balancer("amss", model, temperature="hot")


@pytest.mark.parametrize(
    ("flat", "part", "field"),
    [
        ({"temperature": 0.5}, {"ratio": RatioRule(k_min=0.2)}, "RatioRule.temperature"),
        ({"ratio_form": "softmax_neg"}, {"ratio": RatioRule()}, "RatioRule.form"),
        ({"offset": 3.0}, {"significance": Significance()}, "Significance.offset"),
        ({"rounding": "floor"}, {"sampler": Sampler("topk")}, "Sampler.rounding"),
        ({"conv_units": "weights"}, {"units": UnitSelection()}, "UnitSelection.conv_units"),
    ],
)
def test_a_flat_option_and_its_part_together_is_an_error_naming_both(
    flat: dict, part: dict, field: str
) -> None:
    name, value = next(iter(flat.items()))
    (part_name,) = part
    for build in (
        lambda: em.create_balancer("amss", make_toy_model(2), **flat, **part),
        lambda: AMSS(make_toy_model(2), **flat, **part),
    ):
        with pytest.raises(ValueError, match="both set") as info:
            build()
        message = str(info.value)
        assert f"{name}={value!r}" in message and f"{part_name}={type(part[part_name]).__name__}(" in message
        assert field in message


# ------------------------------------------------------------------------------------- presets
def test_the_presets_set_the_documented_switches() -> None:
    model = make_toy_model(2)
    code = em.create_balancer("amss", model, preset="official_code").parts
    assert (code.ratio.stable_softmax, code.units.linear_rows, code.sampler.reweight) == (
        False,
        "auto",
        "none",
    )
    assert code.significance == Significance() and code.ratio.form == "one_minus_softmax"
    plus = em.create_balancer("amss_plus", model, preset="official_code")
    assert (plus.masker.reweight, plus.masker.score_floor) == ("code", 0.0)  # the official AMSS+ weights
    av = em.create_balancer("amss", model, preset="official_av").parts
    assert (av.significance.label_entropy, av.units.mask_fusion, av.ratio.stable_softmax) == (
        "av_code",
        False,
        False,
    )
    it = em.create_balancer("amss", model, preset="official_it").parts
    assert (it.ratio.form, it.significance.label_entropy, it.significance.feature_entropy) == (
        "softmax_own",
        "exact_bits",
        "none",
    )
    assert it.sampler.code_block_norm and it.units.mask_fusion is True
    nv = em.create_balancer("amss", model, preset="official_nv")
    assert (nv.parts.significance.feature_entropy, nv.parts.sampler.rounding) == ("nv_code", "floor")
    assert {u.kind for us in nv.units.values() for u in us} == {"row_elements"}  # B3: the fusion head only
    assert set(PRESETS) == {"official_code", "official_av", "official_it", "official_nv"}


def test_a_flat_option_overrides_a_preset_and_a_part_must_agree_with_it() -> None:
    model = make_toy_model(2)
    assert (
        em.create_balancer("amss", model, preset="official_av", mask_fusion=True).parts.units.mask_fusion
        is True
    )
    agreeing = UnitSelection(mask_fusion=False, linear_rows="auto", conv_units="weights")
    bal = em.create_balancer("amss", model, preset="official_av", units=agreeing)
    assert bal.parts.units is agreeing
    with pytest.raises(
        ValueError,
        match=r"the preset sets mask_fusion=False, but the part units=UnitSelection\(...\) has mask_fusion=True",
    ):
        em.create_balancer("amss", model, preset="official_av", units=UnitSelection(linear_rows="auto"))
    with pytest.raises(ValueError, match="option 'preset' must be one of .* Did you mean .*'official_av'"):
        em.create_balancer("amss", model, preset="oficial_av")
    with pytest.raises(ValueError, match="preset must be one of 'official_code'"):
        resolve_parts({}, preset="official")


# ------------------------------------------------------------------------ one UnitSelection everywhere
def test_the_unit_selection_is_the_one_argument_of_discovery_and_report() -> None:
    model = make_toy_model(2)
    sel = UnitSelection(layer_kinds="conv", mask_fusion=False)
    names = lambda units: {m: [u.name for u in us] for m, us in units.items()}  # noqa: E731
    assert names(discover_units(model, ["m0", "m1"], sel)) == names(
        discover_units(model, ["m0", "m1"], layer_kinds="conv", mask_fusion=False)
    )
    assert [u.name for u in encoder_units(model.encoders["m0"], "m0", sel)] == ["conv"]
    report = describe_units(model, units=sel)
    assert report.selection is sel and names(report.units) == names(AMSS(model, units=sel).units)
    assert names(describe_units(model, layer_kinds="conv", mask_fusion=False).units) == names(report.units)
    assert unit_options("amss", preset="official_nv").mask_encoders is False
    with pytest.raises(TypeError, match="a UnitSelection or keyword options, found both"):
        discover_units(model, ["m0", "m1"], sel, conv_units="weights")
    with pytest.raises(
        TypeError, match=r"UnitSelection got unknown option\(s\) \['linear_row'\]. Did you mean 'linear_rows'"
    ):
        encoder_units(model.encoders["m0"], "m0", linear_row=False)
    with pytest.raises(ValueError, match="both set UnitSelection.conv_units"):
        describe_units(model, units=sel, conv_units="weights")


def test_a_configs_flat_options_are_checked_through_the_mapping() -> None:
    cfg = load_config("amss_nv", ["balancer.options.preset=official_nv", "balancer.options.ratio=0.3"])
    assert cfg.balancer.options["preset"] == "official_nv"  # the shipped preset's options, and a preset, pass
    with pytest.raises(TypeError, match="unknown option.*Did you mean 'temperature'"):
        load_config("amss_av", ["balancer.options.temprature=0.5"])
    with pytest.raises(ValueError, match="option 'conv_units' must be one of .* Did you mean 'filters'"):
        load_config("amss_av", ["balancer.options.conv_units=filter"])
    with pytest.raises(TypeError, match="option 'k_min': expected a number"):
        load_config("amss_av", ["balancer.options.k_min=low"])
