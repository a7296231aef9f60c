"""Image and clip transforms: boxes inside the image, draws only from the given generator, shapes."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from equimodal.data import transforms as T


@settings(max_examples=60, deadline=None)
@given(st.integers(8, 400), st.integers(8, 400), st.integers(0, 10_000))
def test_resized_crop_box_lies_inside_and_respects_scale(height: int, width: int, seed: int) -> None:
    top, left, h, w = T.resized_crop_box(height, width, torch.Generator().manual_seed(seed))
    assert top >= 0 and left >= 0 and top + h <= height and left + w <= width and h > 0 and w > 0
    assert h * w <= height * width


def test_random_transforms_follow_the_generator_only() -> None:
    img = torch.rand(3, 40, 60)
    a = T.random_resized_crop(img, 16, torch.Generator().manual_seed(3))
    torch.manual_seed(0)  # the global RNG must not matter
    b = T.random_resized_crop(img, 16, torch.Generator().manual_seed(3))
    torch.manual_seed(99)
    c = T.random_resized_crop(img, 16, torch.Generator().manual_seed(4))
    assert a.shape == (3, 16, 16) and torch.equal(a, b) and not torch.equal(a, c)
    flips = {
        bool(torch.equal(T.maybe_hflip(img, torch.Generator().manual_seed(s)), img.flip(-1)))
        for s in range(20)
    }
    assert flips == {True, False}


def test_resize_crop_normalize_and_frame_window() -> None:
    clip = torch.rand(5, 3, 30, 40)
    assert T.resize(clip, (12, 16)).shape == (5, 3, 12, 16) and T.resize(clip[0], 8).shape == (3, 8, 8)
    box = T.center_crop_box(30, 40, 20)
    assert box == (5, 10, 20, 20) and T.crop(clip, box).shape == (5, 3, 20, 20)
    assert T.center_crop_box(10, 10, 20) == (0, 0, 10, 10)
    x = torch.ones(3, 2, 2)
    out = T.normalize(x, T.IMAGENET_MEAN, T.IMAGENET_STD)
    assert math.isclose(float(out[0, 0, 0]), (1 - 0.485) / 0.229, rel_tol=1e-6)
    assert T.frame_window(80, 64, None) == list(range(8, 72))
    starts = {T.frame_window(80, 64, torch.Generator().manual_seed(s), max_start=16)[0] for s in range(200)}
    assert min(starts) == 0 and max(starts) == 16
    assert T.frame_window(3, 5, None) == [0, 1, 2, 2, 2]
