"""One registry implementation behind balancers, datasets, encoders and fusions: same names, same errors."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Literal

import pytest
from conftest import make_toy_model

import equimodal as em
from equimodal.engine.config import load_config
from equimodal.models import create_fusion, list_fusions, register_fusion
from equimodal.models.fusion import ConcatFusion
from equimodal.registry import FALSE_WORDS, TRUE_WORDS, Registry, coerce_option, coerce_value

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
    with pytest.raises(TypeError, match=": expected a number, found the string 'x'"):
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


# ------------------------------------------------------------------ one coercer for config and options
@pytest.mark.parametrize("word", [*TRUE_WORDS, *FALSE_WORDS])
def test_one_list_of_true_false_words_for_config_fields_and_options(word: str) -> None:
    expected = word in TRUE_WORDS
    for spelled in (word, word.upper()):
        assert load_config(None, [f"train.amp='{spelled}'"]).train.amp is expected
        ds = em.load_dataset("mfeat", views="fac,mor", pix_image=spelled)
        assert ds.info["options"]["pix_image"] is expected


def test_config_fields_and_options_convert_the_same_way() -> None:
    # what a field of type T accepts, an option annotated T accepts, with the same message otherwise
    cases: list[tuple[Any, Any, Any]] = [
        (int, "1e3", 1000), (int, 2.0, 2), (float, "5", 5.0), (float, 3, 3.0), (bool, 1, True),
        (bool, "off", False), (str, 2.0, "2"), (str, 7, "7"), (tuple[int, ...], "[3,4]", (3, 4)),
        (tuple[float, ...], 2, (2.0,)), (dict[str, Any], {"a": "1e-3", "b": ["2"]}, {"a": 0.001, "b": [2.0]}),
        (Any, "1e-3", 0.001), (int | None, None, None),
    ]  # fmt: skip
    for tp, value, expected in cases:
        got = coerce_value(value, tp, "x")
        assert got == expected and type(got) is type(expected), (tp, value, got)
        assert coerce_option("W", "x", value, inspect.Parameter.empty, tp) == expected


@pytest.mark.parametrize(
    ("tp", "value", "message"),
    [
        (int, "many", "x: expected an integer, found the string 'many'."),
        (int, 2.5, "x: expected an integer, found float 2.5."),
        (int, float("inf"), "x: expected an integer, found float inf."),
        (float, True, "x: expected a number, found bool True."),
        (bool, 2, "x: expected true or false, found int 2."),
        (bool, "2", "x: expected true or false, found the string '2'."),
        (str, [1], "x: expected a string, found list [1]."),
        (int, None, "x: expected an integer, found None."),
        (tuple[int, ...], {"a": 1}, "x: expected a list, found dict {'a': 1}."),
        (dict[str, Any], "a=1", "x: expected a mapping, found the string 'a=1'."),
        (Literal["a", "b"], None, "x: expected one of 'a', 'b', found None."),
    ],
)
def test_a_value_that_cannot_be_converted_names_what_was_expected_and_found(
    tp: Any, value: Any, message: str
) -> None:
    with pytest.raises(TypeError) as info:
        coerce_value(value, tp, "x")
    assert str(info.value) == message


def test_literal_choices_and_untyped_options() -> None:
    with pytest.raises(
        ValueError, match=r"x must be one of 'last', 'mean', found 'maen'\. Did you mean 'mean'"
    ):
        coerce_value("maen", Literal["last", "mean"], "x")
    assert coerce_value(None, Literal["a"] | None, "x") is None
    marker = object()  # no annotation and no plain default: any value, unconverted
    assert coerce_option("W", "k", marker, None) is marker
    assert coerce_option("W", "k", "2", 1) == 2  # no annotation: the default's type
    with pytest.raises(TypeError, match="W option 'k': expected an integer, found the string 'a'"):
        coerce_option("W", "k", "a", 1)


def test_a_class_inherits_the_options_it_passes_on_with_kwargs() -> None:
    """A subclass that ends in ``**options`` (passed to ``super().__init__``) has its own options and its
    bases', checked and coerced by name and type; one without ``**`` stops the chain."""
    reg: Registry[type] = Registry("widget", skip=1)  # the model, as for balancers

    class Base:
        def __init__(self, model: object, *, start: int = 0, seed: int = 0) -> None:
            self.start, self.seed = start, seed

    @reg.decorator("mid")
    class Mid(Base):
        def __init__(self, model: object, *, alpha: float = 1.0, start: int = 5, **options: object) -> None:
            super().__init__(model, start=start, **options)
            self.alpha = alpha

    @reg.decorator("closed")
    class Closed(Mid):
        def __init__(self, model: object, *, beta: bool = False) -> None:
            super().__init__(model)

    assert reg.options("mid") == {"alpha": 1.0, "start": 5, "seed": 0}  # the subclass's default wins
    assert reg.check("mid", {"seed": "3", "alpha": "0.5"}) == {"seed": 3, "alpha": 0.5}
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['sed'\]\. Did you mean 'seed'"):
        reg.check("mid", {"sed": 1})
    with pytest.raises(TypeError, match="option 'seed'"):
        reg.check("mid", {"seed": "many"})
    assert reg.options("closed") == {"beta": False}
