"""``sarcasm``: multimodal Twitter sarcasm detection (2 classes; text + image) from a prepared folder.

Prepare the folder first with ``equimodal prepare sarcasm --raw DIR --out DIR`` (layout:
:mod:`equimodal.prepare.image_text`). Samples: ``text`` token ids ``(max_tokens,)`` and ``image``
``(3, image_size, image_size)`` normalised with the mean/std the official code uses for Sarcasm
(its default, (0.4846, 0.4989, 0.5307) / (0.2440, 0.2487, 0.2574)); no augmentation. Classes:
``not_sarcastic`` (0), ``sarcastic`` (1). Default encoders: ``bert`` and ``resnet50`` (see
:mod:`equimodal.data.image_text`).
"""

from __future__ import annotations

from ..prepare.sarcasm import DATASET
from .base import MultimodalDataset
from .image_text import load_image_text
from .registry import register_dataset

MEAN = (0.4846, 0.4989, 0.5307)
STD = (0.2440, 0.2487, 0.2574)


@register_dataset(DATASET)
def load_sarcasm(
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
    """Sarcasm from a folder written by ``equimodal prepare sarcasm`` (modalities ``text``, ``image``).

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
