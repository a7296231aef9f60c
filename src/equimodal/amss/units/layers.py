"""Unit builders per layer type: Linear layers declared as head projections, ``nn.MultiheadAttention``
and recurrent layers (``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` and their cells)."""

from __future__ import annotations

from torch import nn

from .tensor import UnitTensor
from .weights import join, make_unit, trainable, weight_of


def heads_of_linear(
    name: str, module: nn.Module, num_heads: int, layout: str, modality: str
) -> UnitTensor | None:
    """The head units of a Linear declared as a head projection: ``out/H`` consecutive rows each
    (``"rows"``: q, k, v) or ``in/H`` consecutive columns (``"cols"``: the output projection).

    Raises:
        TypeError: the module is not an ``nn.Linear``.
        ValueError: ``num_heads`` does not divide the split dimension.
    """
    if not isinstance(module, nn.Linear):
        raise TypeError(
            f"Heads were declared on {name} ({type(module).__name__}); only nn.Linear is supported."
        )
    size = module.out_features if layout == "rows" else module.in_features
    if num_heads < 1 or size % num_heads:
        dim = "output" if layout == "rows" else "input"
        raise ValueError(
            f"Head count {num_heads} does not divide the {dim} size {size} of {name} (expected a divisor of "
            f"{size}). Pass the attention layer's true number of heads."
        )
    return make_unit(
        name, module, "weight", modality, "head_rows" if layout == "rows" else "head_cols", num_heads
    )


def mha_units(name: str, mha: nn.MultiheadAttention, modality: str) -> list[UnitTensor]:
    """The heads of ``nn.MultiheadAttention``: ``E/H`` rows of q, k and v (``in_proj_weight``, three
    groups, or the separate ``q/k/v_proj_weight``) and ``E/H`` columns of ``out_proj``."""
    h = mha.num_heads
    if mha.embed_dim % h:
        raise ValueError(f"{name}: num_heads {h} does not divide embed_dim {mha.embed_dim}.")
    found = [
        make_unit(
            name, mha, "in_proj_weight", modality, "head_rows", h, label=join(name, "in_proj"), groups=3
        ),
        *(
            make_unit(name, mha, f"{p}_proj_weight", modality, "head_rows", h, label=join(name, f"{p}_proj"))
            for p in "qkv"
        ),
        make_unit(join(name, "out_proj"), mha.out_proj, "weight", modality, "head_cols", h),
    ]
    return [u for u in found if u is not None]


def rnn_units(name: str, rnn: nn.Module, modality: str) -> list[UnitTensor]:
    """One ``"gate_rows"`` tensor per layer and direction (``weight_ih`` with ``weight_hh`` as member)."""
    hidden = int(rnn.hidden_size)  # type: ignore[arg-type]
    if isinstance(rnn, nn.RNNBase):
        gates = {"LSTM": 4, "GRU": 3}.get(rnn.mode, 1)
        dirs = ("", "_reverse") if rnn.bidirectional else ("",)
        cells = [f"_l{k}{d}" for k in range(rnn.num_layers) for d in dirs]
    else:
        gates = {nn.LSTMCell: 4, nn.GRUCell: 3}.get(type(rnn), 1)
        cells = [""]
    out: list[UnitTensor] = []
    for sfx in cells:
        label = join(name, sfx[1:]) if sfx else name
        parts = [weight_of(rnn, f"weight_{k}{sfx}", name) for k in ("ih", "hh")]
        parts = [w for w in parts if w is not None and trainable(w.param)]
        for w in parts:
            if w.param.shape[0] != gates * hidden:
                raise ValueError(
                    f"{join(name, w.names[0])}: expected {gates} x {hidden} gate rows, found {w.param.shape[0]}."
                )
        if parts:
            first, rest = parts[0], parts[1:]
            members = first.members + tuple(t for w in rest for t in (w.param, *w.members))
            names = first.names + tuple(n for w in rest for n in w.names)
            out.append(
                UnitTensor(
                    first.param,
                    modality,
                    label,
                    "gate_rows",
                    1,
                    hidden,
                    code_units=hidden,
                    members=members,
                    gates=gates,
                    param_names=tuple(join(name, n) for n in names),
                )  # fmt: skip
            )
        if getattr(rnn, "proj_size", 0):
            proj = make_unit(
                name, rnn, f"weight_hr{sfx}", modality, "rows", rnn.proj_size, label=f"{label}.proj"
            )
            out += [proj] if proj is not None else []
    return out
