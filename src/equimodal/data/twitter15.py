"""``twitter15``: multimodal Twitter-2015 target sentiment (3 classes; text + image) from a prepared folder.

Prepare the folder first with ``equimodal prepare twitter15 --raw DIR --out DIR`` (layout:
:mod:`equimodal.prepare.image_text`; the texts have the target in place of ``$T$``). Samples: ``text``
token ids ``(max_tokens,)`` and ``image`` ``(3, image_size, image_size)`` normalised with the official
Twitter15 mean/std (0.42455, 0.44051, 0.47076) / (0.24485, 0.24617, 0.25451); no augmentation.
Classes: ``negative`` (0), ``neutral`` (1), ``positive`` (2). Default encoders: ``bert`` and
``resnet50`` (see :mod:`equimodal.data.image_text`).
"""

from __future__ import annotations

from ..prepare.twitter15 import DATASET
from .base import MultimodalDataset
from .image_text import load_image_text
from .registry import register_dataset

MEAN = (0.42455, 0.44051, 0.47076)
STD = (0.24485, 0.24617, 0.25451)


@register_dataset(DATASET)
def load_twitter15(
    *,
    root: str,
    tokenizer: str,
    seed: int = 0,
    max_tokens: int = 128,
    special_tokens: bool = False,
    image_size: int = 224,
    bert: str | None = None,
    resnet50: str | None = None,
) -> MultimodalDataset:
    """Twitter15 from a folder written by ``equimodal prepare twitter15`` (modalities ``text``, ``image``).

    Args:
        root: the prepared folder.
        tokenizer: a local ``tokenizer.json`` or tokenizer folder (bert-base-uncased's in the official
            recipe); required, nothing is downloaded.
        seed: recorded for the splits' samplers (there is no random transform).
        max_tokens: token ids per text, zero-padded (official 128).
        special_tokens: add the tokenizer's special tokens (``[CLS]``/``[SEP]``); the official code adds
            none (``tokenize`` + ``convert_tokens_to_ids``).
        image_size: side of the square image (official 224).
        bert: local BERT checkpoint folder of the default text encoder (required unless
            ``model.encoders.text`` replaces it).
        resnet50: local file with torchvision ``resnet50`` weights for the default image encoder
            (``None``: random init; the official model starts from ImageNet weights).
    """
    return load_image_text(
        DATASET, root=root, seed=seed, tokenizer=tokenizer, max_tokens=max_tokens, special_tokens=special_tokens,
        image_size=image_size, bert=bert, resnet50=resnet50, mean=MEAN, std=STD,
    )  # fmt: skip
