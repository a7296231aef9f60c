"""``equimodal prepare twitter15``: multimodal Twitter-2015 target sentiment (Yu and Jiang, IJCAI 2019).

Raw layout (the released multimodal Twitter-2015 tsv files)::

    RAW/train.tsv  RAW/dev.tsv (or valid.tsv / val.tsv)  RAW/test.tsv
    RAW/images/<ImageID>          (the ImageIDs carry the extension, e.g. 1860693.jpg)

The header is ``index	#1 Label	#2 ImageID	#3 String	#3 String``. Column mapping (by alias, see
:mod:`equimodal.prepare.image_text`): ``#1 Label`` is the label (0 negative, 1 neutral, 2 positive),
``#2 ImageID`` the image, the first ``#3 String`` the tweet with the aspect target replaced by the
mark ``$T$``, and the second ``#3 String`` the target; the text saved is the tweet with ``$T$``
replaced by the target. ``index`` is ignored. A tweet with several targets has one row per target,
all naming the same image, which is prepared once. The split files are the official split
(3 197 / 1 122 / 1 037).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import register_preparer
from .image_text import ImageTextSpec, prepare_image_text

DATASET = "twitter15"
SPEC = ImageTextSpec(
    dataset=DATASET,
    labels={"0": "negative", "1": "neutral", "2": "positive"},
    splits={"train": ("train.tsv",), "val": ("dev.tsv", "valid.tsv", "val.tsv"), "test": ("test.tsv",)},
    official_counts={"train": 3197, "val": 1122, "test": 1037},
    target=True,
    source="Multimodal Twitter-2015 target-oriented sentiment (Yu and Jiang, IJCAI 2019), released tsv files",
)


@register_preparer(DATASET)
def prepare_twitter15(
    raw: Path, out: Path, *, workers: int, image_size: int = 256, image_dir: str = "images"
) -> dict[str, Any]:
    """Prepare Twitter15: texts (``$T$`` replaced by the target) as UTF-8 files, images as RGB JPEG.

    Args:
        raw: the folder holding the tsv files and the image folder.
        out: the prepared folder (resumable).
        workers: processes converting images.
        image_size: shorter side of the saved images (0: original size); the loader resizes to 224 x 224.
        image_dir: the image folder, relative to ``raw`` (the release names it ``twitter2015_images``).
    """
    return prepare_image_text(SPEC, raw, out, workers=workers, image_size=image_size, image_dir=image_dir)
