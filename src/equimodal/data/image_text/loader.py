"""The image-text loader (``sarcasm``, ``twitter15``): the reader, the default encoders, the loader.

A prepared folder (:mod:`equimodal.data.image_text.prepare`) holds one text file and one JPEG per sample.
Each sample is read as the official text-image pipeline reads it:

- ``text``: the tokenizer's ids of the text, cut or zero-padded to ``max_tokens`` (``(max_tokens,)``
  long; official 128). As in the official code (``tokenize`` then ``convert_tokens_to_ids``) no special
  tokens are added by default, so there is no ``[CLS]``/``[SEP]`` and BERT pools the first word piece;
  ``special_tokens=True`` adds the tokenizer's own (``[CLS] ... [SEP]``; a text longer than
  ``max_tokens`` then loses its final ``[SEP]``).
- ``image``: ``Resize((image_size, image_size))`` (bilinear, Pillow) of the prepared image, in [0, 1],
  normalised with the dataset's mean and std; ``(3, image_size, image_size)`` float.

There is no augmentation, in training either (the official pipeline has none), so the reader ignores
its generator. The tokenizer is a local ``tokenizer.json`` or a transformers tokenizer folder; nothing
is downloaded.

Default encoders (the official model): ``text`` -> ``bert`` from the local checkpoint folder given as
the loader option ``bert``, ``image`` -> ``resnet50`` (optionally ImageNet weights from the local file
``resnet50``), both projected to 256-d. They are built lazily, when the model is assembled, so an
encoder replaced through ``model.encoders`` is never built (nor its checkpoint read): the ``-tiny``
presets replace both and need no checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ...models.encoders import create_encoder
from ..base import MultimodalDataset
from ..media import TEXT_INSTALL, MediaError, decoded, read_image, require, token_ids
from ..prepared import Rows, load_prepared
from ..transforms import normalize
from .spec import ImageTextSpec, Triple

MODALITIES = ("text", "image")


class TextTokenizer:
    """A local tokenizer, loaded lazily (it pickles as its path into workers).

    Args:
        path: a ``tokenizer.json`` (``tokenizers.Tokenizer.from_file``) or a transformers tokenizer folder
            (``AutoTokenizer.from_pretrained(path, local_files_only=True)``). Nothing is downloaded.
        special_tokens: add the tokenizer's special tokens (``[CLS]``, ``[SEP]``); the official code adds none.
    """

    def __init__(self, path: str | Path, special_tokens: bool = False) -> None:
        self.path = Path(path).expanduser()
        self.special_tokens = bool(special_tokens)
        self._tok: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "special_tokens": self.special_tokens, "_tok": None}

    def _load(self) -> Any:
        if self._tok is None:
            if self.path.is_dir():
                transformers = require("transformers", TEXT_INSTALL, "a tokenizer folder")
                self._tok = transformers.AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
            else:
                tokenizers = require("tokenizers", TEXT_INSTALL, "a tokenizer.json")
                self._tok = tokenizers.Tokenizer.from_file(str(self.path))
        return self._tok

    @property
    def vocab_size(self) -> int:
        """The number of token ids (every id is below it)."""
        tok = self._load()
        return int(tok.get_vocab_size()) if hasattr(tok, "get_vocab_size") else len(tok)

    def encode(self, text: str) -> list[int]:
        """The token ids of ``text`` (with special tokens only if :attr:`special_tokens`)."""
        out = self._load().encode(text, add_special_tokens=self.special_tokens)
        return list(out.ids) if hasattr(out, "ids") else list(out)


@dataclass(frozen=True)
class ImageTextReader:
    """Reads one sample's token ids and normalised image (no random transform: ``generator`` is unused).

    Holds paths and settings only (the tokenizer pickles as its path), so it pickles into workers.

    Attributes:
        root: the prepared folder.
        texts: per manifest row, the text file relative to ``root``.
        images: per manifest row, the image file relative to ``root``.
        tokenizer: the local tokenizer.
        max_tokens: token ids per text.
        image_size: side of the square image.
        mean: per-channel mean of the normalisation.
        std: per-channel std of the normalisation.
    """

    root: str
    texts: tuple[str, ...]
    images: tuple[str, ...]
    tokenizer: TextTokenizer
    max_tokens: int
    image_size: int
    mean: Triple
    std: Triple

    def __call__(self, index: int, generator: torch.Generator | None) -> dict[str, Tensor]:
        return {"text": self.text(index), "image": self.image(index)}

    def text(self, index: int) -> Tensor:
        """Row ``index``'s token ids ``(max_tokens,)`` long, zero-padded."""
        path = Path(self.root) / self.texts[index]
        try:
            text = decoded("UTF-8 text", lambda: path.read_bytes().decode("utf-8"))
        except MediaError as err:
            raise self._error("text", path, err) from err
        return token_ids(self.tokenizer.encode(text.strip()), self.max_tokens)

    def image(self, index: int) -> Tensor:
        """Row ``index``'s image ``(3, image_size, image_size)``, normalised."""
        path = Path(self.root) / self.images[index]
        try:
            pixels = read_image(path, size=self.image_size, mode="RGB")
        except MediaError as err:
            raise self._error("image", path, err) from err
        return normalize(pixels, self.mean, self.std)

    def _error(self, what: str, path: Path, err: Exception) -> ValueError:
        return ValueError(
            f"The prepared {what} file {str(path)!r} {err}. The prepared folder is damaged: rerun `equimodal "
            f"prepare` into {self.root} (it resumes) or into a new folder."
        )


class LazyEncoders(MutableMapping[str, nn.Module]):
    """``modality -> encoder`` whose entries are built when first read; a replaced entry is never built.

    Args:
        factories: ``modality -> builder`` in modality order.
    """

    def __init__(self, factories: Mapping[str, Callable[[], nn.Module]]) -> None:
        self._factories = dict(factories)
        self._order = list(factories)
        self._built: dict[str, nn.Module] = {}

    def __getitem__(self, key: str) -> nn.Module:
        if key not in self._built:
            if key not in self._factories:
                raise KeyError(key)
            self._built[key] = self._factories[key]()
        return self._built[key]

    def __setitem__(self, key: str, value: nn.Module) -> None:
        if key not in self._order:
            self._order.append(key)
        self._built[key] = value

    def __delitem__(self, key: str) -> None:
        if key not in self._order:
            raise KeyError(key)
        self._order.remove(key)
        self._built.pop(key, None)
        self._factories.pop(key, None)

    def __contains__(self, key: object) -> bool:
        return key in self._order

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._order))

    def __len__(self) -> int:
        return len(self._order)


def local_tokenizer(path: str, dataset: str, special_tokens: bool = False) -> TextTokenizer:
    """The tokenizer at ``path`` (a ``tokenizer.json``, or a folder: its ``tokenizer.json`` if it has one,
    else a transformers tokenizer folder), loaded once here so a bad path fails now.

    Raises:
        FileNotFoundError: nothing at ``path``.
        ValueError: it cannot be loaded as a tokenizer.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(
            f"{dataset}: no tokenizer at {str(p)!r}. Pass --set data.options.tokenizer=PATH: a tokenizer.json "
            "or a local tokenizer folder (e.g. the bert-base-uncased checkpoint folder); nothing is downloaded."
        )
    if p.is_dir() and (p / "tokenizer.json").is_file():
        p = p / "tokenizer.json"
    tok = TextTokenizer(p, special_tokens)
    try:
        tok.vocab_size  # noqa: B018 - loads it
    except ImportError:
        raise
    except Exception as err:  # tokenizers / transformers raise their own types on bad files
        raise ValueError(
            f"{dataset}: {str(p)!r} cannot be loaded as a tokenizer ({type(err).__name__}: {err}). Pass a "
            "tokenizer.json written by the tokenizers library or a transformers tokenizer folder."
        ) from err
    return tok


def _bert(dataset: str, path: str | None) -> nn.Module:
    if path is None:
        raise ValueError(
            f"The default {dataset} text encoder is BERT (bert-base-uncased in the official recipe) from a local "
            "checkpoint folder: pass --set data.options.bert=PATH (a folder with config.json and the weights; "
            "nothing is downloaded), or replace the encoder with model.encoders.text (e.g. name: bert, config: "
            "{...} for a randomly initialised one, as the -tiny presets do)."
        )
    return create_encoder("bert", path=path)


def default_encoders(dataset: str, bert: str | None, resnet50: str | None) -> LazyEncoders:
    """The official encoders, built lazily: ``bert`` (path ``bert``) and ``resnet50`` (weights ``resnet50``)."""
    return LazyEncoders(
        {
            "text": partial(_bert, dataset, bert),
            "image": partial(create_encoder, "resnet50", weights=resnet50),
        }
    )


def _reader(
    rows: Rows,
    folder: Path,
    *,
    tokenizer: TextTokenizer,
    max_tokens: int,
    image_size: int,
    mean: Triple,
    std: Triple,
) -> ImageTextReader:
    texts = tuple(r["text"] for r in rows)
    images = tuple(r["image"] for r in rows)
    return ImageTextReader(str(folder), texts, images, tokenizer, max_tokens, image_size, mean, std)


def load_image_text(
    spec: ImageTextSpec,
    /,
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
    """The image-text dataset ``spec`` describes, from a folder its preparer wrote (modalities ``text``, ``image``).

    Registered for each dataset with ``spec`` bound (``load_dataset("sarcasm", root=...)``).

    Args:
        spec: what differs between the datasets (name, classes, image mean and std, ...).
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

    Raises:
        FileNotFoundError / ValueError: not a prepared folder of the dataset, a bad tokenizer, or
            ``max_tokens`` / ``image_size`` below 1.
    """
    dataset, mean, std = spec.dataset, spec.mean, spec.std
    if max_tokens < 1 or image_size < 1:
        raise ValueError(
            f"{dataset}: max_tokens and image_size must be >= 1, found max_tokens={max_tokens}, "
            f"image_size={image_size} (official 128 and 224)."
        )
    tok = local_tokenizer(tokenizer, dataset, special_tokens)
    read = partial(_reader, tokenizer=tok, max_tokens=max_tokens, image_size=image_size, mean=mean, std=std)
    info = {
        "tokenizer": str(tok.path),
        "max_tokens": max_tokens,
        "special_tokens": special_tokens,
        "image_size": image_size,
        "mean": list(mean),
        "std": list(std),
        "augmentation": "none (official)",
    }
    return load_prepared(
        dataset,
        root,
        modalities=list(MODALITIES),
        reader=read,
        encoders=partial(default_encoders, dataset, bert, resnet50),  # type: ignore[arg-type]
        seed=seed,
        info=info,
    )
