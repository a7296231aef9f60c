"""Mask units of AMSS (Yang et al., TPAMI 2025): which parameter blocks are kept or dropped together.

Units are found by module type wherever the module sits in an encoder, never by parameter-name
substrings, and every layer type is masked by default:

============================== ========================================== ===========================
module                          unit                                       sampling groups
============================== ========================================== ===========================
``Conv1d`` / ``Conv2d`` /       ``conv_units="filters"`` (default): one    the whole tensor
``Conv3d``                      output filter ``W[o]``
                                ``conv_units="input_channels"``: one       the whole tensor
                                input channel ``c``: every weight that
                                reads it (``W[:, c]``; grouped convs: the
                                filters of ``c``'s group, see below)
                                ``conv_units="weights"``: one single       each output filter ``o``
                                weight ``W[o, i, *k]``                     (its ``in/groups * prod(k)``
                                                                           weights)
``nn.MultiheadAttention``       a head: ``E/H`` consecutive rows of each   q, k and v each one group;
                                of q, k, v (``in_proj_weight`` or the       ``out_proj`` one group
                                separate ``q/k/v_proj_weight``); ``E/H``
                                consecutive *columns* of ``out_proj``
transformers-style attention    a head: ``d_head`` consecutive rows of     q, k and v each one group;
(Linear children ``query/key/   each of q, k, v; ``d_head`` consecutive    the output projection one
value``, ``q_proj/k_proj/       *columns* of the output projection         group
v_proj``, ``q_lin/...``,        (a child ``out_proj/o_proj/out_lin/o/
``q/k/v``, plus a head count    dense``, or the sibling ``output.dense``
or head size attribute)         of BERT-style ``BertAttention``)
``Linear`` declared a head      ``out/H`` consecutive rows (``"rows"``:    the whole tensor
projection                      q, k, v) or ``in/H`` columns (``"cols"``:
                                the output projection)
other ``Linear``                one output row (neuron)                    the whole tensor
``nn.LSTM`` / ``nn.GRU`` /      a hidden unit ``j``: its gate rows         one group per layer and
``nn.RNN`` (and the ``*Cell``   ``j, H+j, ...`` of ``weight_ih`` *and*     direction, spanning both
modules)                        ``weight_hh`` together (LSTM ``proj_size``  tensors
                                projections ``weight_hr``: output rows)
fusion-head block of modality   one weight element ``W[c, j]``, ``j`` in   each output row ``c``
m (``model.fusion.              the modality's column slice of a weight
modality_blocks()``)            shared by the modalities (a concat head)
============================== ========================================== ===========================

Selection (the defaults): a module (and everything under it) carrying ``amss_skip = True`` is never
visited (equimodal's ResNet encoders mark their stems and downsample convolutions this way); norm
layers, embeddings and biases are never masked (the official code masks weights only); every Linear is
masked (``linear_rows=True``); ``linear_rows="auto"`` is the previous, code-faithful rule (plain Linear
layers only in encoders without conv, attention or RNN units: no BERT FFN or ResNet projection) and
``linear_rows=False`` never masks plain Linear rows. The first convolution of an encoder is *not*
skipped implicitly: mark it ``amss_skip`` or pass it in ``exclude``.

Conv units (``conv_units``): ``"filters"`` (default, the official code) keeps or drops whole output
filters. ``"input_channels"`` keeps or drops input channels: unit ``c`` is every weight reading input
channel ``c``, i.e. the slice ``W[:, c]`` along weight dim 1; in a grouped conv (``groups = G``) input
channel ``c = g * in/G + j`` is read only by the filters of its group ``g``, so the unit is
``W[g*out/G:(g+1)*out/G, j]`` (a depthwise conv's input channel is then exactly its filters); there are
``in_channels`` units in one group. ``"weights"`` makes every single weight a unit, scored by its own
squared gradient; the units of one output filter (its ``in/groups * prod(kernel)`` weights) form one
sampling group, as the official fusion-head elements are sampled per output row, so ``ceil(k * n)``
weights of every filter are kept (``n`` = weights per filter) and the masker's padded matrix is
``sum(out_channels) x max(weights per filter)`` instead of ``tensors x max(numel)``: for two ResNet18
encoders and a 6-class concat head, 7 692 x 4 608 = 35.4 M entries for 22.0 M weights (1.6x), against
44 x 2.36 M = 104 M (4.7x) with one group per tensor. A step still needs about 60 bytes of temporaries
per entry (scores, keys, a sort): about 1 GB per ResNet18 encoder, against about 1 MB for filters.

Layer kinds (``layer_kinds``): every unit has a layer kind, ``"conv"`` (Conv1d/2d/3d), ``"attention"``
(``nn.MultiheadAttention``, transformers attention q/k/v/output projections, BERT's sibling
``output.dense``, Linear layers declared as head projections), ``"linear"`` (every other Linear's rows:
FFN neurons, MLPs, projections) or ``"rnn"`` (RNN hidden units and LSTM projections). ``layer_kinds``
(default ``None``: all four) masks only the units of the kinds it names; the others are left unmasked
and listed with the reason by :func:`~equimodal.amss.explain.describe_units`. It applies after
``include`` / ``exclude`` and ``linear_rows`` (a Linear is masked only when both allow it), and never to
the fusion head (``mask_fusion`` decides that). A modality with no unit of the selected kinds is masked
through its fusion-head block only (with a warning), or refused when it has none.

Shared parameters: a Parameter reachable twice in one modality (tied weights, a module used twice) is
masked exactly once, with the units of its first occurrence in module order; a Parameter masked in the
encoders of two modalities is refused (each modality is masked with its own ratio): exclude it from one.

Reparametrized weights: ``torch.nn.utils.parametrizations.weight_norm`` (and the older
``torch.nn.utils.weight_norm``) with ``dim=0`` is masked through the parametrization: ``v``
(``original1`` / ``weight_v``) is partitioned like the weight and ``g`` (``original0`` / ``weight_g``,
one entry per output row) joins the unit of its row. Any other reparametrization (``spectral_norm``,
``orthogonal``, ``weight_norm`` with another ``dim``, weight norm on an output projection whose units
are columns or on a conv whose units are input channels or single weights) raises a ``ValueError``
naming the parameter, rather than being skipped silently.

Fusion heads (``mask_fusion``): ``True`` / ``"concat"`` (default, the official code) masks only column
blocks of a weight shared by the modalities (the concat head); ``"all"`` also masks heads that give each
modality its own weight (``sum``, ``weighted``); ``False`` masks no fusion head. FiLM, gated and
attention fusions declare no blocks and are never masked.

Transformers attention is found by structure, not by class name: a module with ``nn.Linear``
children named as one of the q/k/v triples above and an int ``num_attention_heads`` / ``num_heads`` /
``n_heads`` (or ``config.num_attention_heads``) or head size ``attention_head_size`` / ``head_dim`` /
``key_value_proj_dim`` (BERT, RoBERTa, ViT, BART, CLIP, T5, DistilBERT, LLaMA, ...). The head size
``d_head`` splits every projection, so grouped-query k/v projections get fewer heads than q. GPT-2's
fused ``Conv1D`` projection is not recognised: declare it with ``heads`` if needed.

Selection API for a user's own model: one :class:`UnitSelection` holds ``include`` / ``exclude`` (a
callable ``(name, module) -> bool`` or a collection of modules), ``heads`` (``{linear_module: (num_heads,
"rows" | "cols")}``, or the attribute ``amss_heads = (num_heads, "rows" | "cols")`` on the module),
``linear_rows``, ``conv_units``, ``layer_kinds``, ``mask_encoders`` and ``mask_fusion``; the balancer
(``units=``), :func:`discover_units`, :func:`scan_units`, :func:`encoder_units` and
:func:`equimodal.amss.explain.describe_units` take it (or keyword shortcuts that build one).
:func:`~equimodal.amss.explain.describe_units` lists what is masked and why everything else is not.

The package's modules follow these seams: :mod:`.tensor` (a masked tensor and its views),
:mod:`.selection` (the unit-selection part and its checks), :mod:`.weights` (the tensors behind a weight,
reparametrized or not), :mod:`.layers` (unit builders per layer type), :mod:`.attention`
(transformers-style attention), :mod:`.scan` (the encoder scan) and :mod:`.model` (fusion heads and the
model scan).
"""

from .attention import (
    HEAD_COUNT_ATTRS,
    HEAD_SIZE_ATTRS,
    OUT_NAMES,
    QKV_NAMES,
    AttentionSpec,
    attention_spec,
)
from .model import ModelScan, discover_units, fusion_label, fusion_units, scan_fusion, scan_units
from .scan import EncoderScan, encoder_units, scan_encoder
from .selection import (
    CONV_UNITS,
    LAYER_KINDS,
    LINEAR_ROWS,
    MASK_FUSION,
    UNIT_OPTIONS,
    ConvUnits,
    HeadDeclarations,
    HeadLayout,
    LayerKind,
    LayerKinds,
    LinearRows,
    MaskFusion,
    ModuleSelector,
    UnitSelection,
    check_conv_units,
    check_layer_kinds,
    unit_selection,
)
from .tensor import ROW_KINDS, UnitKind, UnitTensor

__all__ = [
    "CONV_UNITS",
    "HEAD_COUNT_ATTRS",
    "HEAD_SIZE_ATTRS",
    "LAYER_KINDS",
    "LINEAR_ROWS",
    "MASK_FUSION",
    "OUT_NAMES",
    "QKV_NAMES",
    "ROW_KINDS",
    "UNIT_OPTIONS",
    "AttentionSpec",
    "ConvUnits",
    "EncoderScan",
    "HeadDeclarations",
    "HeadLayout",
    "LayerKind",
    "LayerKinds",
    "LinearRows",
    "MaskFusion",
    "ModelScan",
    "ModuleSelector",
    "UnitKind",
    "UnitSelection",
    "UnitTensor",
    "attention_spec",
    "check_conv_units",
    "check_layer_kinds",
    "discover_units",
    "encoder_units",
    "fusion_label",
    "fusion_units",
    "scan_encoder",
    "scan_fusion",
    "scan_units",
    "unit_selection",
]
