"""One registry implementation behind balancers, datasets, encoders and fusions: same names, same errors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from conftest import make_toy_model

import equimodal as em
from equimodal.models import create_fusion, list_fusions, register_fusion
from equimodal.models.fusion import ConcatFusion

# kind -> (list, create with one good option set, a good option name, a close typo of it, a bad value)
KINDS: dict[str, tuple[Callable[[], list[str]], Callable[..., Any], str, str, str, Any]] = {
    "balancer": (em.list_balancers, lambda n, **o: em.create_balancer(n, make_toy_model(2), **o), "ogm", "alpha", "alpah", "strong"),
    "dataset": (em.list_datasets, lambda n, **o: em.load_dataset(n, **o), "mfeat", "seed", "sed", "two"),
    "encoder": (em.list_encoders, lambda n, **o: em.create_encoder(n, in_dim=4, **o), "mlp", "dropout", "droput", "high"),
    "fusion": (list_fusions, lambda n, **o: create_fusion(n, {"a": 4, "b": 4}, 3, **o), "gated", "hidden", "hiden", "wide"),
}  # fmt: skip


@pytest.mark.parametrize("kind", KINDS)
def test_unknown_name_gets_close_matches_and_the_valid_list(kind: str) -> None:
    names, create, good, *_ = KINDS[kind]
    with pytest.raises(ValueError, match=rf"Unknown {kind} '{good[:-1]}x'\. Did you mean '{good}'\?") as info:
        create(good[:-1] + "x")
    assert all(n in str(info.value) for n in names())


@pytest.mark.parametrize("kind", KINDS)
def test_unknown_option_gets_close_matches_and_the_valid_options(kind: str) -> None:
    _, create, good, option, typo, _ = KINDS[kind]
    with pytest.raises(
        TypeError, match=rf"unknown option\(s\) \['{typo}'\]\. Did you mean '{option}'"
    ) as info:
        create(good, **{typo: 1})
    assert "Valid options: " in str(info.value) and option in str(info.value).split("Valid options:")[1]


@pytest.mark.parametrize("kind", KINDS)
def test_mistyped_option_value_is_named(kind: str) -> None:
    _, create, good, option, _, bad = KINDS[kind]
    with pytest.raises((TypeError, ValueError), match=rf"{kind.capitalize()} '{good}' option '{option}'"):
        create(good, **{option: bad})


def test_literal_options_get_their_choices_and_close_matches() -> None:
    with pytest.raises(
        ValueError,
        match=r"option 'mode' must be one of 'keep', 'dynamic', found 'dinamic'\. Did you mean 'dynamic'",
    ):
        em.create_balancer("mslr", make_toy_model(2), mode="dinamic")


def test_string_options_are_converted_to_the_option_type() -> None:
    bal = em.create_balancer("ogm", make_toy_model(2), alpha="0.3")
    assert bal.alpha == 0.3
    enc = em.create_encoder("mlp", in_dim="4", dropout="0.5")
    assert enc.out_dim > 0
    with pytest.raises(TypeError, match="expects a number, found the string 'x'"):
        em.create_balancer("agm", make_toy_model(2), alpha="x")


def test_the_decorator_sets_the_name_once() -> None:
    assert all(em.balancers.get_balancer_class(n).name == n for n in em.list_balancers())
    assert ConcatFusion.name == "concat"

    @register_fusion("concat_copy_for_test")
    class Copy(ConcatFusion):
        pass

    assert Copy.name == "concat_copy_for_test" and "concat_copy_for_test" in list_fusions()
    with pytest.raises(ValueError, match="already registered"):
        register_fusion("concat_copy_for_test")(Copy)
    with pytest.raises(TypeError, match="expects a Fusion subclass"):
        register_fusion("not_a_fusion")(int)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="expects a Balancer subclass"):
        em.register_balancer("not_a_balancer")(int)  # type: ignore[arg-type]
