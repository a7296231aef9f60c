"""AMSS heads on transformers attention, found automatically: BERT's q/k/v rows and output columns per
head (as the official text-image code masks them), other naming schemes, and an AMSS step on a tiny BERT."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import equimodal as em
from equimodal.amss.units import attention_spec, discover_units, encoder_units
from equimodal.models import MultimodalClassifier, create_encoder

transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)

HIDDEN, HEADS, LAYERS = 16, 2, 2
DH = HIDDEN // HEADS
TINY_BERT = {
    "vocab_size": 30,
    "hidden_size": HIDDEN,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "intermediate_size": 32,
    "max_position_embeddings": 16,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}


def tiny_model() -> MultimodalClassifier:
    torch.manual_seed(0)
    encoders = {
        "text": create_encoder("bert", config=TINY_BERT, out_dim=8),
        "other": create_encoder("mlp", in_dim=6, hidden=(8,)),
    }
    return MultimodalClassifier(encoders, num_classes=3)


def batch(n: int = 12) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 30, (n, 10), generator=g)
    ids[:, 7:] = 0  # padding
    return {"text": ids, "other": torch.randn(n, 6, generator=g)}, torch.arange(n) % 3


def test_bert_units_are_exactly_the_attention_heads_with_the_official_rule() -> None:
    units = discover_units(tiny_model(), ["text", "other"], linear_rows="auto")["text"]
    encoder = [u for u in units if u.kind != "row_elements"]
    assert len(encoder) == LAYERS * 4  # q, k, v rows and output columns of each layer, nothing else
    prefix = "encoders.text.bert.encoder.layer"
    expected = []
    for i in range(LAYERS):
        expected += [(f"{prefix}.{i}.attention.self.{p}", "head_rows") for p in ("query", "key", "value")]
        expected.append((f"{prefix}.{i}.attention.output.dense", "head_cols"))
    assert [(u.name, u.kind) for u in encoder] == expected
    assert all((u.groups, u.units, u.code_units) == (1, HEADS, HEADS) for u in encoder)
    assert sum(u.num_units for u in encoder) == LAYERS * 4 * HEADS
    # FFN, embeddings, pooler and the projection are not masked (official); the fusion block is
    assert [u.name for u in units if u.kind == "row_elements"] == ["fusion[text]"]


def test_bert_default_masks_heads_and_every_linear() -> None:
    units = discover_units(tiny_model(), ["text", "other"])["text"]
    prefix = "encoders.text.bert.encoder.layer"
    expected = []
    for i in range(LAYERS):
        expected += [
            (f"{prefix}.{i}.attention.self.{p}", "head_rows", HEADS) for p in ("query", "key", "value")
        ]
        expected.append((f"{prefix}.{i}.attention.output.dense", "head_cols", HEADS))
        expected.append((f"{prefix}.{i}.intermediate.dense", "rows", 32))  # FFN neurons
        expected.append((f"{prefix}.{i}.output.dense", "rows", HIDDEN))
    expected += [("encoders.text.bert.pooler.dense", "rows", HIDDEN), ("encoders.text.proj", "rows", 8)]
    assert [(u.name, u.kind, u.units) for u in units if u.kind != "row_elements"] == expected


def test_head_norms_follow_head_boundaries() -> None:
    model = tiny_model()
    units = encoder_units(model.encoders["text"], "text")
    query, out = units[0], units[3]
    g = torch.randn(HIDDEN, HIDDEN)
    torch.testing.assert_close(
        query.sq_norms(g), torch.stack([g[h * DH : (h + 1) * DH].pow(2).sum() for h in range(HEADS)])
    )
    torch.testing.assert_close(
        out.sq_norms(g), torch.stack([g[:, h * DH : (h + 1) * DH].pow(2).sum() for h in range(HEADS)])
    )


def test_amss_step_zeroes_whole_heads() -> None:
    model = tiny_model()
    bal = em.create_balancer(
        "amss", model, temperature=0.5, k_max=0.5, seed=3, linear_rows="auto"
    )  # 1 head kept
    inputs, y = batch()
    bal.loss(model(inputs), y).backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    bal.before_step()
    stats = bal.stats()
    assert all(math.isfinite(v) for v in stats.values())
    k = stats["k/text"]
    kept_per_tensor = math.ceil(k * HEADS)
    assert kept_per_tensor == 1
    grads = dict(model.named_parameters())
    for u in (u for u in bal.units["text"] if u.kind in ("head_rows", "head_cols")):
        name = u.name + ".weight"
        now, old = grads[name].grad, before[name]
        blocks = [(now[h * DH : (h + 1) * DH], old[h * DH : (h + 1) * DH]) if u.kind == "head_rows"
                  else (now[:, h * DH : (h + 1) * DH], old[:, h * DH : (h + 1) * DH]) for h in range(HEADS)]  # fmt: skip
        kept = [bool(torch.equal(a, b)) for a, b in blocks]
        zero = [bool((a == 0).all()) for a, _ in blocks]
        assert all(kz != z for kz, z in zip(kept, zero, strict=True)), name  # each head: all kept or all zero
        assert sum(kept) == kept_per_tensor, name
        assert torch.isfinite(now).all()
    for n in ("encoders.text.bert.encoder.layer.0.intermediate.dense.weight", "encoders.text.bert.embeddings.word_embeddings.weight",
              "encoders.text.bert.encoder.layer.1.attention.self.query.bias", "encoders.text.proj.weight"):  # fmt: skip
        assert torch.equal(grads[n].grad, before[n]), n  # never masked


def test_selection_still_applies_to_found_attention() -> None:
    bert = create_encoder("bert", config=TINY_BERT)
    layer0 = bert.bert.encoder.layer[0].attention
    layer0.self.query.amss_skip = True
    names = [u.name for u in encoder_units(bert, "t", linear_rows="auto")]
    assert "bert.encoder.layer.0.attention.self.query" not in names and len(names) == 7
    names = [u.name for u in encoder_units(bert, "t", exclude=[layer0.self], linear_rows="auto")]
    assert names[0].startswith("bert.encoder.layer.1.")  # the excluded attention loses its output columns too
    declared = encoder_units(bert, "t", heads={layer0.self.key: (4, "rows")})
    assert [u.units for u in declared if u.name.endswith("layer.0.attention.self.key")] == [4]
    rows = encoder_units(bert, "t")
    assert any(u.name.endswith("intermediate.dense") and u.kind == "rows" for u in rows)
    assert not any(u.name.endswith("intermediate.dense") for u in encoder_units(bert, "t", linear_rows=False))


def test_other_naming_schemes_and_grouped_query_heads() -> None:
    llama = transformers.LlamaModel(
        transformers.LlamaConfig(
            vocab_size=30,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=8,
        )  # fmt: skip
    )
    units = encoder_units(llama, "t", linear_rows=False)
    assert [(u.name.rsplit(".", 1)[-1], u.kind, u.units) for u in units] == [
        ("q_proj", "head_rows", 4), ("k_proj", "head_rows", 2), ("v_proj", "head_rows", 2), ("o_proj", "head_cols", 4),
    ]  # fmt: skip

    class Attn(nn.Module):  # a user's own module in DistilBERT's naming, found by structure
        def __init__(self) -> None:
            super().__init__()
            self.n_heads = 3
            self.q_lin, self.k_lin, self.v_lin, self.out_lin = (nn.Linear(6, 6) for _ in range(4))

    spec = attention_spec(Attn())
    assert spec is not None and spec.head_size == 2 and spec.out is not None and spec.out[0] == "out_lin"
    bad = Attn()
    bad.n_heads = 4
    with pytest.raises(ValueError, match="4 attention heads do not divide the query width 6"):
        encoder_units(nn.Sequential(bad), "t")
    plain = nn.Module()
    plain.query, plain.key, plain.value = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
    assert attention_spec(plain) is None  # no head count: plain Linear layers
    assert [u.kind for u in encoder_units(plain, "t")] == ["rows"] * 3


def test_transformers_vit_conv_patch_embedding_does_not_turn_off_the_linears() -> None:
    config = transformers.ViTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=24,
    )  # fmt: skip
    vit = transformers.ViTModel(config)
    units = encoder_units(vit, "v")
    kinds = [(u.kind, u.num_units) for u in units]
    assert units[0].param is vit.embeddings.patch_embeddings.projection.weight and kinds[0] == ("filters", 16)
    assert kinds.count(("head_rows", 4)) == 3 * 2 and kinds.count(("head_cols", 4)) == 2  # every head
    assert kinds.count(("rows", 24)) == 2 and kinds.count(("rows", 16)) == 2 + 1  # FFN neurons, pooler
    assert len(units) == 1 + 2 * 6 + 1
    assert {u.kind for u in encoder_units(vit, "v", linear_rows="auto")} == {
        "filters",
        "head_rows",
        "head_cols",
    }
