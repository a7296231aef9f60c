"""``equimodal prepare sarcasm``: the multimodal Twitter sarcasm dataset (Cai et al., ACL 2019).

Raw layout (the AMSS text-image release)::

    RAW/train.tsv  RAW/valid.tsv (or dev.tsv / val.tsv)  RAW/test.tsv
    RAW/images/<ImageID>.jpg

Each tsv has a header naming ``Label`` (0 not sarcastic, 1 sarcastic), ``String`` (the tweet) and
``ImageID`` (the image's file name without ``.jpg``; names with the extension are accepted too). The
split files are the official split (19 816 / 2 410 / 2 409). The prepared layout and what is skipped
are described in :mod:`equimodal.prepare.image_text`; load it with the ``sarcasm`` dataset.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import register_preparer
from .image_text import ImageTextSpec, prepare_image_text

DATASET = "sarcasm"
SPEC = ImageTextSpec(
    dataset=DATASET,
    labels={"0": "not_sarcastic", "1": "sarcastic"},
    splits={"train": ("train.tsv",), "val": ("valid.tsv", "dev.tsv", "val.tsv"), "test": ("test.tsv",)},
    official_counts={"train": 19816, "val": 2410, "test": 2409},
    target=False,
    source="Multimodal Twitter sarcasm detection (Cai, Cai and Wan, ACL 2019), tsv files of the AMSS release",
)


@register_preparer(DATASET)
def prepare_sarcasm(
    raw: Path, out: Path, *, workers: int, image_size: int = 256, image_dir: str = "images"
) -> dict[str, Any]:
    """Prepare Sarcasm: texts as UTF-8 files, images as RGB JPEG with shorter side ``image_size``.

    Args:
        raw: the folder holding the tsv files and the image folder.
        out: the prepared folder (resumable).
        workers: processes converting images.
        image_size: shorter side of the saved images (0: original size); the loader resizes to 224 x 224.
        image_dir: the image folder, relative to ``raw``.
    """
    return prepare_image_text(SPEC, raw, out, workers=workers, image_size=image_size, image_dir=image_dir)
