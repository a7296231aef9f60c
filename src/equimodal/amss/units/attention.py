"""Transformers-style attention found by structure, not by class name: q/k/v ``Linear`` children and a
head count or head size attribute (BERT, RoBERTa, ViT, BART, CLIP, T5, DistilBERT, LLaMA, ...)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

QKV_NAMES: tuple[tuple[str, str, str], ...] = (
    ("query", "key", "value"),
    ("q_proj", "k_proj", "v_proj"),
    ("q_lin", "k_lin", "v_lin"),
    ("q", "k", "v"),
)
"""Names of the q/k/v ``Linear`` children of transformers' attention modules (BERT, BART/LLaMA, DistilBERT, T5)."""
OUT_NAMES = ("out_proj", "o_proj", "out_lin", "o", "dense")
"""Names of an output projection held by the attention module itself."""
HEAD_COUNT_ATTRS = ("num_attention_heads", "num_heads", "n_heads")
HEAD_SIZE_ATTRS = ("attention_head_size", "head_dim", "key_value_proj_dim")


@dataclass(frozen=True, eq=False)
class AttentionSpec:
    """The projections of a transformers-style attention module, found by :func:`attention_spec`.

    Attributes:
        qkv: ``(child name, Linear)`` of the query, key and value projections.
        out: the output projection when the module holds it (``out_proj``, ``o_proj``, ...), else ``None``.
        head_size: rows of q/k/v (columns of the output projection) per head.
    """

    qkv: tuple[tuple[str, nn.Linear], ...]
    out: tuple[str, nn.Linear] | None
    head_size: int


def _positive_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _head_size(module: nn.Module, width: int) -> int | None:
    """Head size from the module's attributes: a head size, else ``width / head count``; ``None``: neither."""
    for attr in HEAD_SIZE_ATTRS:
        size = _positive_int(getattr(module, attr, None))
        if size is not None:
            return size
    config = getattr(module, "config", None)
    counts = [getattr(module, a, None) for a in HEAD_COUNT_ATTRS]
    counts.append(getattr(config, "num_attention_heads", None))
    heads = next((h for h in map(_positive_int, counts) if h is not None), None)
    if heads is None:
        return None
    if width % heads:
        raise ValueError(
            f"{type(module).__name__}: {heads} attention heads do not divide the query width {width}. Exclude "
            "the module (exclude=[module]) or declare its heads (heads={linear: (num_heads, 'rows')})."
        )
    return width // heads


def attention_spec(module: nn.Module) -> AttentionSpec | None:
    """The q/k/v (and output) projections of a transformers-style attention module, or ``None``.

    A module qualifies when it has ``nn.Linear`` children named as one of :data:`QKV_NAMES` and a head
    count or head size attribute (:data:`HEAD_COUNT_ATTRS`, :data:`HEAD_SIZE_ATTRS`, or
    ``config.num_attention_heads``), as ``BertSelfAttention`` (``query``/``key``/``value``,
    ``num_attention_heads``) or ``BartAttention`` (``q_proj``/..., ``num_heads``) have.

    Raises:
        ValueError: the head size does not divide a projection.
    """
    if isinstance(module, nn.MultiheadAttention):
        return None
    children = dict(module.named_children())
    for names in QKV_NAMES:
        linears = [children.get(n) for n in names]
        if all(isinstance(lin, nn.Linear) for lin in linears):
            break
    else:
        return None
    qkv = tuple(zip(names, linears, strict=True))
    size = _head_size(module, qkv[0][1].out_features)
    if size is None:
        return None
    out = next(((n, children[n]) for n in OUT_NAMES if isinstance(children.get(n), nn.Linear)), None)
    widths = [(n, lin.out_features) for n, lin in qkv] + ([(out[0], out[1].in_features)] if out else [])
    bad = [(n, w) for n, w in widths if w % size]
    if bad:
        raise ValueError(
            f"{type(module).__name__}: head size {size} does not divide the width of {bad} (expected multiples "
            f"of {size}). Exclude the module (exclude=[module]) or declare its heads with heads=..."
        )
    return AttentionSpec(qkv, out, size)  # type: ignore[arg-type]


def is_attention(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.MultiheadAttention)
        or getattr(module, "amss_heads", None) is not None
        or attention_spec(module) is not None
    )


def sibling_outputs(visited: Sequence[tuple[str, nn.Module]]) -> dict[int, int]:
    """``id(Linear) -> head size`` of BERT-style output projections: the ``output.dense`` next to attention.

    In ``BertAttention`` (and ViT's, RoBERTa's, ...) the self-attention module holds q/k/v and its sibling
    ``output`` (``BertSelfOutput``) holds the output projection ``dense``. Only visited (not skipped or
    excluded) attention modules count; the FFN's ``BertOutput.dense`` is never next to one.
    """
    ids = {id(m) for _, m in visited}
    found: dict[int, int] = {}
    for _, module in visited:
        children = dict(module.named_children())
        output = children.get("output")
        dense = getattr(output, "dense", None) if output is not None else None
        if not isinstance(dense, nn.Linear):
            continue
        for child_name, child in children.items():
            spec = attention_spec(child) if child_name != "output" and id(child) in ids else None
            if spec is not None and spec.out is None and dense.in_features == spec.qkv[0][1].out_features:
                found[id(dense)] = spec.head_size
    return found
