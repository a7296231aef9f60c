"""Bad outputs and labels reaching a balancer raise errors that say what was expected and found."""

from __future__ import annotations

import pytest
import torch
from conftest import make_toy_batch, make_toy_model
from torch import nn

import equimodal as em
from equimodal.types import MultimodalOutput, modality_names


@pytest.fixture
def setup():
    model = make_toy_model(2)
    batch, y = make_toy_batch(2, 8)
    return model, em.create_balancer("none", model), model(batch), y


def test_output_must_be_multimodal_output(setup) -> None:
    _, bal, out, y = setup
    with pytest.raises(
        TypeError, match="Expected the model to return equimodal.MultimodalOutput, found tuple"
    ):
        bal.loss(tuple(out), y)


def test_missing_unimodal_logits_names_the_modality(setup) -> None:
    _, bal, out, y = setup
    bad = MultimodalOutput(out.logits, {"m0": out.unimodal_logits["m0"]}, out.features)
    with pytest.raises(ValueError, match=r"`unimodal_logits` is missing modality \['m1'\]"):
        bal.loss(bad, y)


def test_unimodal_logits_of_wrong_shape(setup) -> None:
    _, bal, out, y = setup
    bad = MultimodalOutput(out.logits, {**out.unimodal_logits, "m1": out.logits[:, :2]}, out.features)
    with pytest.raises(ValueError, match=r"unimodal_logits\['m1'\] has shape \(8, 2\), expected \(8, 3\)"):
        bal.loss(bad, y)


def test_labels_out_of_range_wrong_dtype_or_shape(setup) -> None:
    _, bal, out, y = setup
    with pytest.raises(ValueError, match=r"Labels must lie in \[0, 2\] for 3 classes, found range \[0, 5\]"):
        bal.loss(out, torch.tensor([0, 1, 2, 5, 0, 1, 2, 0]))
    with pytest.raises(TypeError, match="Expected integer class labels"):
        bal.loss(out, y.float())
    with pytest.raises(ValueError, match=r"Expected labels of shape \(8,\)"):
        bal.loss(out, torch.nn.functional.one_hot(y, 3))


def test_model_without_encoders_or_with_one_modality() -> None:
    with pytest.raises(TypeError, match="Expected a model with `encoders: nn.ModuleDict`"):
        em.create_balancer("none", nn.Linear(2, 2))
    one = nn.Module()
    one.encoders = nn.ModuleDict({"a": nn.Linear(2, 2)})
    with pytest.raises(ValueError, match=r"at least 2 modalities.*found 1"):
        modality_names(one)


def test_unknown_balancer_option_lists_valid_ones() -> None:
    with pytest.raises(TypeError, match=r"Balancer 'ogm' got unknown option\(s\) \['alfa'\].*alpha"):
        em.create_balancer("ogm", make_toy_model(2), alfa=0.3)
