"""One format for a balancer's refused option: ``Balancer 'NAME' option 'KEY' must be ..., found ....``"""

from __future__ import annotations

import math

import pytest

from equimodal.balancers import get_balancer_class
from equimodal.balancers.options import checked_option
from equimodal.testing import toy_model


@pytest.mark.parametrize(
    ("value", "rules", "expected"),
    [
        (0.5, {"low": 0, "high": 1}, 0.5),
        (1, {"low": 0, "high": 1}, 1.0),
        (3.0, {"low": 1, "integer": True}, 3),
        (None, {"low": 0, "allow_none": True}, None),
        ("b", {"choices": ("a", "b")}, "b"),
        (False, {"choices": (True, False)}, False),
        (-2.5, {}, -2.5),
    ],
)
def test_a_valid_value_comes_back_as_its_kind(value, rules, expected) -> None:
    got = checked_option("m", "k", value, **rules)
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize(
    ("value", "rules", "words"),
    [
        (0.0, {"low": 0, "open_low": True}, "a finite number > 0, found 0.0."),
        (1.0, {"low": 0, "high": 1, "open_high": True}, "a finite number in [0, 1), found 1.0."),
        (math.nan, {"low": 0}, "a finite number >= 0, found nan."),
        (math.inf, {}, "a finite number, found inf."),
        (True, {"low": 0}, "a finite number >= 0, found True."),
        ("3", {"low": 0}, "a finite number >= 0, found '3'."),
        (2.5, {"low": 1, "integer": True}, "an integer >= 1, found 2.5."),
        (
            -1,
            {"low": 0, "allow_none": True, "hint": "None: off"},
            "a finite number >= 0 or None, found -1 (None: off).",
        ),
        ("c", {"choices": ("a", "b")}, "one of 'a', 'b', found 'c'."),
        ("bb", {"choices": ("a", "b"), "hint": "h"}, "one of 'a', 'b', found 'bb' (h; did you mean 'b'?)."),
        (1, {"choices": (True, False)}, "True or False, found 1."),
        ("x", {"choices": ("a", "b", "c"), "allow_none": True}, "one of 'a', 'b', 'c' or None, found 'x'."),
    ],
)
def test_a_refused_value_is_named_in_one_format(value, rules, words) -> None:
    with pytest.raises(ValueError) as err:
        checked_option("m", "k", value, **rules)
    assert str(err.value) == f"Balancer 'm' option 'k' must be {words}"


@pytest.mark.parametrize(
    ("name", "options", "words"),
    [
        (
            "cml",
            {"subsets": "all"},
            "Balancer 'cml' option 'subsets' must be one of 'chain', 'each', found 'all'.",
        ),
        (
            "inforeg",
            {"smoothing": 0},
            "Balancer 'inforeg' option 'smoothing' must be an integer >= 1, found 0.",
        ),
        ("agm", {"alpha": 0}, "Balancer 'agm' option 'alpha' must be a finite number > 0, found 0"),
        ("pmr", {"momentum": 1.0}, "Balancer 'pmr' option 'momentum' must be a finite number in [0, 1)"),
        ("mslr", {"window": 0}, "Balancer 'mslr' option 'window' must be an integer >= 1, found 0."),
        (
            "gblending",
            {"mode": "x"},
            "Balancer 'gblending' option 'mode' must be one of 'online', 'offline', found 'x'.",
        ),
        ("ogm_plus", {"boost": -1}, "Balancer 'ogm_plus' option 'boost' must be a finite number > 0"),
    ],
)
def test_balancers_built_by_hand_refuse_in_that_format(name, options, words) -> None:
    """Built by hand (no registry coercion in between), through the class itself."""
    with pytest.raises(ValueError) as err:
        get_balancer_class(name)(toy_model(), **options)
    assert str(err.value).startswith(words)
