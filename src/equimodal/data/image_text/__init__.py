"""Image-text datasets: tweets with their image, read as the official AMSS text-image code reads them.

One loader (:mod:`.loader`) and one preparer (:mod:`.prepare`) serve every dataset of the family; what
differs between them is data, an :class:`~.spec.ImageTextSpec` each, registered under its own name for
both ``load_dataset`` and ``equimodal prepare``:

- ``sarcasm``: multimodal Twitter sarcasm detection (Cai, Cai and Wan, ACL 2019), 2 classes
  (``not_sarcastic`` 0, ``sarcastic`` 1); docs in ``sarcasm.md``, presets ``sarcasm`` and ``sarcasm-tiny``.
- ``twitter15``: multimodal Twitter-2015 target sentiment (Yu and Jiang, IJCAI 2019), 3 classes
  (``negative`` 0, ``neutral`` 1, ``positive`` 2); the tsv's target replaces ``$T$`` in the tweet; docs in
  ``twitter15.md``, presets ``twitter15`` and ``twitter15-tiny``.

Add a dataset of the same form by registering one more spec with :func:`register_image_text`.
"""

from __future__ import annotations

from functools import partial

from ...prepare import register_preparer
from ..registry import register_dataset
from .loader import load_image_text
from .prepare import prepare_image_text
from .spec import ImageTextSpec

__all__ = [
    "SARCASM",
    "TWITTER15",
    "ImageTextSpec",
    "load_image_text",
    "prepare_image_text",
    "register_image_text",
]


def register_image_text(spec: ImageTextSpec) -> ImageTextSpec:
    """Register ``spec.dataset`` as a dataset and a preparer: the family's loader and preparer, ``spec`` bound.

    Both take the same options for every spec (see :func:`~.loader.load_image_text` and
    :func:`~.prepare.prepare_image_text`). Returns ``spec``.
    """
    register_dataset(spec.dataset)(partial(load_image_text, spec))
    register_preparer(spec.dataset)(partial(prepare_image_text, spec))
    return spec


SARCASM = register_image_text(
    ImageTextSpec(
        dataset="sarcasm",
        labels={"0": "not_sarcastic", "1": "sarcastic"},
        splits={"train": ("train.tsv",), "val": ("valid.tsv", "dev.tsv", "val.tsv"), "test": ("test.tsv",)},
        official_counts={"train": 19816, "val": 2410, "test": 2409},
        target=False,
        source="Multimodal Twitter sarcasm detection (Cai, Cai and Wan, ACL 2019), tsv files of the AMSS release",
        mean=(0.4846, 0.4989, 0.5307),  # the official code's default normalisation, used for Sarcasm
        std=(0.2440, 0.2487, 0.2574),
    )
)
TWITTER15 = register_image_text(
    ImageTextSpec(
        dataset="twitter15",
        labels={"0": "negative", "1": "neutral", "2": "positive"},
        splits={"train": ("train.tsv",), "val": ("dev.tsv", "valid.tsv", "val.tsv"), "test": ("test.tsv",)},
        official_counts={"train": 3197, "val": 1122, "test": 1037},
        target=True,
        source="Multimodal Twitter-2015 target-oriented sentiment (Yu and Jiang, IJCAI 2019), released tsv files",
        mean=(0.42455, 0.44051, 0.47076),  # the official Twitter15 normalisation
        std=(0.24485, 0.24617, 0.25451),
    )
)
