"""The trainable tensors behind a layer's weight, reparametrized or not, and the :class:`UnitTensor` of it.

``torch.nn.utils.parametrizations.weight_norm`` (and the older ``torch.nn.utils.weight_norm``) with
``dim=0`` is masked through the parametrization (``v`` split like the weight, ``g`` joining the unit of
its row); any other reparametrization is refused with a ``ValueError`` naming the parameter, never
skipped silently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils import parametrize

from .tensor import ROW_KINDS, UnitKind, UnitTensor


def join(prefix: str, name: str) -> str:
    """A qualified name: ``prefix.name`` (``name`` alone without a prefix)."""
    return f"{prefix}.{name}" if prefix else name


def trainable(p: object) -> bool:
    """Whether ``p`` is a trained Parameter with units: requires grad, at least 2-D, not empty."""
    return isinstance(p, nn.Parameter) and p.requires_grad and p.dim() >= 2 and p.numel() > 0


@dataclass(frozen=True)
class Weight:
    """The trainable tensors behind a module's weight: ``param`` partitioned like the weight, ``members``
    (weight norm's ``g``) partitioned along dim 0 only; ``names`` relative to the module."""

    param: nn.Parameter
    members: tuple[nn.Parameter, ...]
    names: tuple[str, ...]


def _refuse(where: str, what: str, attr: str) -> ValueError:
    return ValueError(
        f"{where} is reparametrized ({what}); AMSS cannot tell which entries of the trained tensors form "
        "one of its units, and will not skip it silently. Supported: torch.nn.utils.parametrizations."
        "weight_norm (or torch.nn.utils.weight_norm) with dim=0 on a weight whose units are rows (conv "
        "filters, Linear rows, q/k/v heads, RNN gates). Remove the reparametrization (torch.nn.utils."
        f"parametrize.remove_parametrizations(module, {attr!r}); for the hook API remove_spectral_norm or "
        "remove_weight_norm), or keep the module out of masking (module.amss_skip = True, or exclude=[module])."
    )


def _reparametrization(module: nn.Module, attr: str) -> tuple[str, int | None] | None:
    """``(what, dim)`` when ``module.attr`` is reparametrized (``dim``: a weight norm's), else ``None``."""
    if parametrize.is_parametrized(module, attr):
        plist = module.parametrizations[attr]
        kinds = [type(p).__name__ for p in plist]
        if kinds == ["_WeightNorm"]:
            return "torch.nn.utils.parametrizations.weight_norm", getattr(plist[0], "dim", None)
        return f"torch.nn.utils.parametrize with {', '.join(kinds)}", None
    for hook in module._forward_pre_hooks.values():
        if getattr(hook, "name", None) == attr and type(hook).__name__ == "WeightNorm":
            return "torch.nn.utils.weight_norm", getattr(hook, "dim", None)
    return None


def _trained_behind(module: nn.Module, attr: str) -> bool:
    """Whether a trainable tensor stands behind ``module.attr`` (itself, or what it is computed from)."""
    if parametrize.is_parametrized(module, attr):
        return any(p.requires_grad for p in module.parametrizations[attr].parameters())
    return any(p.requires_grad for n, p in module.named_parameters(recurse=False) if n.startswith(attr))


def weight_of(
    module: nn.Module, attr: str, where: str, *, rows: bool = True, units: str = "columns"
) -> Weight | None:
    """The trainable tensors of ``module.attr``, or ``None`` (absent, or not a trained tensor).

    Args:
        module: the layer.
        attr: its weight attribute.
        where: the qualified module name, for errors.
        rows: whether the units split dim 0 (weight norm's ``g`` can then join them).
        units: what the units are when they do not (for errors).

    Raises:
        ValueError: the weight is reparametrized in a way whose units cannot be mapped.
    """
    full = join(where, attr)
    reparam = _reparametrization(module, attr)
    if (reparam is not None or isinstance(getattr(module, attr, None), Tensor)) and not _trained_behind(
        module, attr
    ):
        return None  # frozen: nothing to mask, whatever the parametrization
    if reparam is not None:
        what, dim = reparam
        if not what.endswith("weight_norm"):
            raise _refuse(full, what, attr)
        if dim != 0:
            raise _refuse(full, f"{what} with dim={dim}: its g does not follow the output rows", attr)
        if not rows:
            raise _refuse(full, f"{what}: its g is per output row, but these units are {units}", attr)
        if what == "torch.nn.utils.weight_norm":
            g, v = getattr(module, f"{attr}_g"), getattr(module, f"{attr}_v")
            names = (f"{attr}_v", f"{attr}_g")
        else:
            plist = module.parametrizations[attr]
            g, v = plist.original0, plist.original1
            names = (f"parametrizations.{attr}.original1", f"parametrizations.{attr}.original0")
        if not isinstance(v, nn.Parameter):
            return None
        members = (g,) if isinstance(g, nn.Parameter) and g.requires_grad else ()
        if members and (g.dim() != v.dim() or g.shape[0] != v.shape[0]):
            raise _refuse(full, f"{what} with g of shape {tuple(g.shape)}", attr)
        return Weight(v, members, names[: 1 + len(members)])
    w = getattr(module, attr, None)
    if isinstance(w, nn.Parameter):
        return Weight(w, (), (attr,))
    if isinstance(w, Tensor):
        hooks = ", ".join(type(h).__name__ for h in module._forward_pre_hooks.values()) or "no hook"
        raise _refuse(full, f"a tensor computed from other parameters, forward pre-hooks: {hooks}", attr)
    return None


def make_unit(
    where: str,
    module: nn.Module,
    attr: str,
    modality: str,
    kind: UnitKind,
    units: int,
    *,
    label: str | None = None,
    groups: int = 1,
    conv_groups: int = 1,
) -> UnitTensor | None:
    """A :class:`UnitTensor` for ``module.attr`` when it is trained, else ``None``."""
    desc = {"input_channels": "input channels", "filter_elements": "single weights"}.get(kind, "columns")
    w = weight_of(module, attr, where, rows=kind in ROW_KINDS, units=desc)
    if w is None or not trainable(w.param):
        return None
    names = tuple(join(where, n) for n in w.names)
    return UnitTensor(
        w.param, modality, label or where, kind, groups, units, code_units=units, members=w.members,
        param_names=names, conv_groups=conv_groups,
    )  # fmt: skip


def conv_unit(name: str, conv: _ConvNd, modality: str, conv_units: str) -> UnitTensor | None:
    """The units of a (non-transposed) conv weight for ``conv_units`` (see :mod:`equimodal.amss.units`)."""
    if conv_units == "input_channels":
        return make_unit(
            name, conv, "weight", modality, "input_channels", conv.in_channels, conv_groups=conv.groups
        )
    if conv_units == "weights":
        per_filter = (conv.in_channels // conv.groups) * math.prod(conv.kernel_size)
        return make_unit(
            name, conv, "weight", modality, "filter_elements", per_filter, groups=conv.out_channels
        )
    return make_unit(name, conv, "weight", modality, "filters", conv.out_channels)
