"""The ``resnet50`` (torchvision naming, local weights) and ``bert`` (transformers, local or config) encoders."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from equimodal.amss.units import encoder_units
from equimodal.models import create_encoder
from equimodal.models.resnet50 import ResNet50

torch.set_num_threads(1)

TINY_BERT = {
    "vocab_size": 30,
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "max_position_embeddings": 32,
}


@pytest.fixture(scope="module")
def resnet() -> ResNet50:
    torch.manual_seed(0)
    return ResNet50()


# ----------------------------------------------------------------------------------------- resnet50
def test_resnet50_output_shape_and_projection(resnet: ResNet50) -> None:
    x = torch.randn(2, 3, 32, 32)
    resnet.eval()
    assert resnet.out_dim == 256 and resnet(x).shape == (2, 256)
    plain = create_encoder("resnet50", out_dim=None).eval()
    assert plain.out_dim == 2048 and plain(x).shape == (2, 2048)
    assert not any(k.startswith("fc.") for k in plain.state_dict())
    with pytest.raises(ValueError, match="3 input channels, found 1"):
        resnet(torch.randn(1, 1, 32, 32))


def test_resnet50_parameter_names_follow_torchvision(resnet: ResNet50) -> None:
    keys = list(resnet.state_dict())
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    block = ["layer1.0.conv1.weight", *(f"layer1.0.bn1.{s}" for s in bn)]
    block += ["layer1.0.conv2.weight", *(f"layer1.0.bn2.{s}" for s in bn)]
    block += ["layer1.0.conv3.weight", *(f"layer1.0.bn3.{s}" for s in bn)]
    block += ["layer1.0.downsample.0.weight", *(f"layer1.0.downsample.1.{s}" for s in bn)]
    assert [k for k in keys if k.startswith("layer1.0.")] == block
    assert keys[:6] == ["conv1.weight", *(f"bn1.{s}" for s in bn)] and keys[-2:] == ["fc.weight", "fc.bias"]
    blocks = {k.split(".")[0]: set() for k in keys if k.startswith("layer")}
    for k in keys:
        if k.startswith("layer"):
            blocks[k.split(".")[0]].add(int(k.split(".")[1]))
    assert {name: len(ids) for name, ids in blocks.items()} == {
        "layer1": 3,
        "layer2": 4,
        "layer3": 6,
        "layer4": 3,
    }
    assert not any("downsample" in k for k in keys if k.startswith("layer1.1."))
    assert resnet.state_dict()["layer4.2.conv3.weight"].shape == (2048, 512, 1, 1)
    assert sum(p.numel() for n, p in resnet.named_parameters() if not n.startswith("fc.")) == 23_508_032


def test_resnet50_amss_units_are_the_bottleneck_convs(resnet: ResNet50) -> None:
    units = encoder_units(resnet, "image", linear_rows=False)  # the official text-image choice
    assert len(units) == 48 and all(u.kind == "filters" for u in units)
    assert {u.name.rsplit(".", 1)[-1] for u in units} == {"conv1", "conv2", "conv3"}
    assert all(u.name.startswith("layer") for u in units)  # no stem, no downsample, no fc
    every = encoder_units(resnet, "image")  # the default: every layer type, the fc projection's rows too
    assert len(every) == 49 and every[-1].kind == "rows" and every[-1].name.endswith("fc")


def test_resnet50_weights_round_trip_and_errors(resnet: ResNet50, tmp_path: Path) -> None:
    state = {k: v.clone() for k, v in resnet.state_dict().items()}
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, 2048), torch.randn(1000)  # torchvision's head
    path = tmp_path / "resnet50.pth"
    torch.save(state, path)
    loaded = create_encoder("resnet50", weights=str(path))
    for k, v in loaded.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(v, state[k]), k
    assert loaded.fc.weight.shape == (256, 2048)  # the projection is fresh, fc.* is ignored
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "wrapped.pth")
    wrapped = ResNet50(weights=str(tmp_path / "wrapped.pth"))
    assert torch.equal(wrapped.layer3[5].bn2.running_var, state["layer3.5.bn2.running_var"])
    state["layer2.0.conv9.weight"] = state.pop("layer2.0.conv2.weight")
    torch.save(state, tmp_path / "renamed.pth")
    with pytest.raises(
        ValueError, match=r"missing keys \[layer2.0.conv2.weight\], unexpected keys \[layer2.0.conv9"
    ):
        ResNet50(weights=str(tmp_path / "renamed.pth"))
    with pytest.raises(ValueError, match=r"conv1.weight: \(64, 3, 7, 7\) \(expected \(64, 1, 7, 7\)\)"):
        ResNet50(in_channels=1, weights=str(path))
    with pytest.raises(FileNotFoundError, match="not found"):
        ResNet50(weights=str(tmp_path / "absent.pth"))


# --------------------------------------------------------------------------------------------- bert
def test_bert_from_config_and_from_a_local_folder(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    enc = create_encoder("bert", config=TINY_BERT).eval()
    ids = torch.randint(1, 30, (3, 7))
    assert enc.out_dim == 256 and enc(ids).shape == (3, 256)
    assert create_encoder("bert", config=TINY_BERT, out_dim=None).out_dim == 16
    enc.bert.save_pretrained(tmp_path / "ckpt")
    again = create_encoder("bert", path=str(tmp_path / "ckpt")).eval()
    for (name, a), (_, b) in zip(enc.bert.state_dict().items(), again.bert.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    again.proj.load_state_dict(enc.proj.state_dict())
    torch.testing.assert_close(again(ids), enc(ids))


def test_bert_attention_mask_option() -> None:
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    masked = create_encoder("bert", config=TINY_BERT, out_dim=None).eval()  # the pooled output itself
    official = create_encoder("bert", config=TINY_BERT, out_dim=None, attention_mask=False).eval()
    official.load_state_dict(masked.state_dict())
    short = torch.randint(1, 30, (2, 5))
    padded = torch.cat([short, torch.zeros(2, 6, dtype=torch.long)], 1)
    with torch.no_grad():
        # masked: padding changes nothing; official (no mask): the padding tokens are attended to
        masked_gap = (masked(padded) - masked(short)).abs().max()
        official_gap = (official(padded) - official(short)).abs().max()
        assert masked_gap < 1e-6 and official_gap > 1e-4 > 100 * masked_gap
        torch.testing.assert_close(official(short), masked(short))  # no padding: the same
        assert torch.isfinite(masked(torch.zeros(1, 4, dtype=torch.long))).all()  # an all-padding row


def test_bert_errors(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    with pytest.raises(ValueError, match="exactly one of `path`"):
        create_encoder("bert")
    with pytest.raises(FileNotFoundError, match="not found"):
        create_encoder("bert", path=str(tmp_path / "none"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="Cannot load a BERT checkpoint"):
        create_encoder("bert", path=str(tmp_path / "empty"))
    enc = create_encoder("bert", config=TINY_BERT)
    with pytest.raises(ValueError, match="token id 30 outside its vocabulary of 30"):
        enc(torch.tensor([[1, 30]]))
    with pytest.raises(ValueError, match="more than its 32 positions"):
        enc(torch.ones(1, 33, dtype=torch.long))
    with pytest.raises(TypeError, match="integer token ids"):
        enc(torch.ones(1, 3))


def test_bert_without_transformers_is_a_clear_import_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now fails
    with pytest.raises(ImportError, match=r"pip install 'equimodal\[text\]'"):
        create_encoder("bert", config=TINY_BERT)


def test_equimodal_imports_without_transformers() -> None:
    code = (
        "import sys; sys.modules['transformers'] = None; sys.modules['tokenizers'] = None\n"
        "import equimodal, equimodal.data, equimodal.prepare\n"
        "equimodal.prepare.list_preparers()\n"
        "from equimodal.models import create_encoder\n"
        "assert create_encoder('resnet50', out_dim=8).out_dim == 8\n"
        "assert 'bert' in equimodal.models.list_encoders()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
