"""``bert``: a BERT text encoder (``transformers.BertModel``) from a local checkpoint folder or a config.

The official text-image model encodes token ids with BERT-base-uncased and projects the pooled output
(``[CLS]`` through BERT's pooler, tanh) with ``Linear(768, 256)``. This encoder does the same with
``transformers.BertModel``:

- ``path``: a local folder written by ``save_pretrained`` (``config.json`` and the weights), loaded
  with ``from_pretrained(path, local_files_only=True)``; nothing is ever downloaded.
- ``config``: the keyword arguments of ``transformers.BertConfig`` (random init), for tests and the
  ``-tiny`` presets.

Input: token ids ``(B, L)`` long, padded with id 0 (as the image-text loaders write them). Deviation
from the official code, on by default: the attention mask is built from the padding (``ids != 0``),
so padding tokens are not attended to. ``attention_mask=False`` reproduces the official code, which
passes no mask (every padding token is attended to). AMSS finds BERT's attention heads by itself
(q/k/v rows and ``attention.output.dense`` columns per head, see :mod:`equimodal.amss.units`).

Token ids outside the vocabulary are an error naming the fix (one host sync per step for the check;
on CUDA an out-of-range id would otherwise be an unrecoverable device assert).

``transformers`` is an optional dependency (``pip install 'equimodal[text]'``), imported only when a
``bert`` encoder is built.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import Tensor, nn

from .encoders import _check_input, register_encoder

TEXT_INSTALL = "pip install 'equimodal[text]'"
PAD_ID = 0


def import_transformers() -> ModuleType:
    """``transformers``, or an ``ImportError`` naming the install command."""
    try:
        return importlib.import_module("transformers")
    except ImportError as err:
        raise ImportError(
            f"The bert encoder needs the 'transformers' package (import failed: {err}). Install it with: "
            f"{TEXT_INSTALL}"
        ) from err


@register_encoder("bert")
class BertEncoder(nn.Module):
    """BERT's pooled output, projected to ``out_dim``: token ids ``(B, L)`` -> ``(B, out_dim)``.

    Args:
        path: a local BERT checkpoint folder (``save_pretrained`` layout), e.g. bert-base-uncased.
        config: instead, ``transformers.BertConfig(**config)`` with random weights (e.g. ``{"vocab_size": 64,
            "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32}``).
        out_dim: size of the projection ``Linear(hidden, out_dim)`` (official 256); ``None``: no projection,
            ``out_dim = hidden``.
        attention_mask: mask padding tokens (id 0) out of attention (default). ``False`` reproduces the
            official code, which passes no attention mask to BERT.

    Raises:
        ValueError: neither or both of ``path`` and ``config``, or an unusable config.
        FileNotFoundError: ``path`` is not a folder.
        ImportError: ``transformers`` is not installed.
    """

    def __init__(
        self,
        path: str | None = None,
        config: dict[str, Any] | None = None,
        out_dim: int | None = 256,
        attention_mask: bool = True,
    ) -> None:
        super().__init__()
        if (path is None) == (config is None):
            raise ValueError(
                "The bert encoder needs exactly one of `path` (a local checkpoint folder, e.g. "
                "--set model.encoders.text.path=PATH or --set data.options.bert=PATH) and `config` (BertConfig "
                f"options for a randomly initialised BERT); found path={path!r}, config={config!r}."
            )
        if out_dim is not None and out_dim < 1:
            raise ValueError(f"bert out_dim must be >= 1 or None (no projection), found {out_dim}.")
        transformers = import_transformers()
        self.bert = _from_path(transformers, path) if path is not None else _from_config(transformers, config)
        hidden = int(self.bert.config.hidden_size)
        self.proj: nn.Module = nn.Identity() if out_dim is None else nn.Linear(hidden, out_dim)
        self.out_dim = hidden if out_dim is None else int(out_dim)
        self.vocab_size = int(self.bert.config.vocab_size)
        self.max_len = int(self.bert.config.max_position_embeddings)
        self.attention_mask = bool(attention_mask)

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, (2,), "(B, L) token ids", self)
        if x.is_floating_point() or x.is_complex():
            raise TypeError(f"BertEncoder expects integer token ids (long), found dtype {x.dtype}.")
        if x.shape[1] > self.max_len:
            raise ValueError(
                f"BertEncoder got {x.shape[1]} tokens, more than its {self.max_len} positions; lower the "
                "loader's max_tokens (--set data.options.max_tokens=...)."
            )
        top = int(x.max()) if x.numel() else 0
        if top >= self.vocab_size or (x.numel() and int(x.min()) < 0):
            raise ValueError(
                f"BertEncoder got token id {top} outside its vocabulary of {self.vocab_size} ids: the tokenizer "
                "does not belong to this BERT. Use the checkpoint's own tokenizer, or raise config.vocab_size."
            )
        mask = (x != PAD_ID).long() if self.attention_mask else None
        out = self.bert(input_ids=x, attention_mask=mask)
        return self.proj(out.pooler_output)


def _from_path(transformers: ModuleType, path: str) -> nn.Module:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"BERT checkpoint folder {str(folder)!r} not found: pass a local folder holding config.json and "
            "the weights (written by save_pretrained, e.g. a downloaded bert-base-uncased); nothing is "
            "downloaded."
        )
    try:
        return transformers.BertModel.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"Cannot load a BERT checkpoint from {str(folder)!r} ({type(err).__name__}: {err}). The folder "
            "needs config.json and pytorch_model.bin or model.safetensors."
        ) from err


def _from_config(transformers: ModuleType, config: dict[str, Any] | None) -> nn.Module:
    if not isinstance(config, dict):
        raise TypeError(f"bert config must be a mapping of BertConfig options, found {config!r}.")
    try:
        cfg = transformers.BertConfig(**config)
    except (TypeError, ValueError) as err:
        raise ValueError(f"Invalid bert config {config!r}: {err}") from err
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ValueError(
            f"bert config: num_attention_heads ({cfg.num_attention_heads}) must divide hidden_size "
            f"({cfg.hidden_size})."
        )
    return transformers.BertModel(cfg)
