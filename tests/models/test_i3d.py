"""Inception-I3D: shapes, the common port's state-dict naming, "SAME" padding, local weights."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from equimodal.amss.units import encoder_units
from equimodal.models import create_encoder
from equimodal.models.i3d import InceptionI3D, same_padding


def test_full_width_feature_is_1024_and_has_the_i3d_size() -> None:
    model = InceptionI3D(in_channels=3).eval()
    assert model.out_dim == 1024
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(12.29e6, rel=0.01)  # I3D: ~12.3 M
    with torch.no_grad():
        y = model(torch.randn(2, 3, 8, 32, 32))
    assert y.shape == (2, 1024) and torch.isfinite(y).all()


def test_narrow_width_runs_on_any_clip_size_and_is_found_by_amss() -> None:
    model = create_encoder("i3d", in_channels=2, width_multiplier=0.0625)
    assert model.out_dim == 64
    for shape in [(3, 2, 8, 32, 32), (2, 2, 5, 17, 23), (2, 2, 1, 9, 9)]:
        assert model(torch.randn(*shape)).shape == (shape[0], 64)
    units = encoder_units(model, "flow")
    assert len(units) == 57 and all(u.kind == "filters" for u in units)  # every Conv3d, none skipped
    assert units[0].param is model.Conv3d_1a_7x7.conv3d.weight
    with pytest.raises(ValueError, match=r"\(B, 2, T, H, W\)"):
        model(torch.randn(1, 3, 8, 32, 32))
    with pytest.raises(ValueError, match="width_multiplier must be positive"):
        InceptionI3D(width_multiplier=0.0)


def test_state_dict_uses_the_common_port_names_and_shapes() -> None:
    sd = InceptionI3D(in_channels=3).state_dict()
    stem = {
        "Conv3d_1a_7x7.conv3d.weight": (64, 3, 7, 7, 7),
        "Conv3d_1a_7x7.bn.weight": (64,),
        "Conv3d_1a_7x7.bn.bias": (64,),
        "Conv3d_1a_7x7.bn.running_mean": (64,),
        "Conv3d_1a_7x7.bn.running_var": (64,),
        "Conv3d_2b_1x1.conv3d.weight": (64, 64, 1, 1, 1),
        "Conv3d_2c_3x3.conv3d.weight": (192, 64, 3, 3, 3),
    }
    mixed_3b = {
        "Mixed_3b.b0.conv3d.weight": (64, 192, 1, 1, 1),
        "Mixed_3b.b1a.conv3d.weight": (96, 192, 1, 1, 1),
        "Mixed_3b.b1b.conv3d.weight": (128, 96, 3, 3, 3),
        "Mixed_3b.b2a.conv3d.weight": (16, 192, 1, 1, 1),
        "Mixed_3b.b2b.conv3d.weight": (32, 16, 3, 3, 3),
        "Mixed_3b.b3b.conv3d.weight": (32, 192, 1, 1, 1),
        "Mixed_3b.b3b.bn.running_var": (32,),
        "Mixed_5c.b0.conv3d.weight": (384, 832, 1, 1, 1),
    }
    for key, shape in {**stem, **mixed_3b}.items():
        assert tuple(sd[key].shape) == shape, key
    assert not any("bias" in k and "conv3d" in k for k in sd)  # convs have no bias (BN follows)
    blocks = sorted({k.split(".")[0] for k in sd if k.startswith("Mixed_")})
    assert blocks == ["Mixed_3b", "Mixed_3c", "Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f",
                      "Mixed_5b", "Mixed_5c"]  # fmt: skip
    bn = InceptionI3D(width_multiplier=0.0625).Mixed_4c.b1b.bn
    assert (bn.eps, bn.momentum) == (1e-3, 0.01)  # TensorFlow's batch-norm settings, as the port


@pytest.mark.parametrize("size", [1, 7, 8, 16, 17, 224])
@pytest.mark.parametrize(("kernel", "stride"), [(7, 2), (3, 2), (3, 1), (2, 2), (1, 1)])
def test_same_padding_matches_tensorflow(size: int, kernel: int, stride: int) -> None:
    pads = same_padding((size, size, size), (kernel,) * 3, (stride,) * 3)
    front, back = pads[0], pads[1]
    total = max(kernel - stride, 0) if size % stride == 0 else max(kernel - size % stride, 0)
    assert (front, back) == (total // 2, total - total // 2)
    assert (size + front + back - kernel) // stride + 1 == math.ceil(size / stride)  # TF's SAME output size


def test_loads_its_own_state_dict_strictly(tmp_path: Path) -> None:
    source = InceptionI3D(in_channels=1, width_multiplier=0.125)
    torch.nn.init.normal_(source.Mixed_4d.b2b.conv3d.weight)
    source.Mixed_4d.b2b.bn.running_mean.fill_(0.5)
    sd = source.state_dict()
    sd["logits.conv3d.weight"] = torch.zeros(25, 128, 1, 1, 1)  # the port's classifier: ignored
    sd["logits.conv3d.bias"] = torch.zeros(25)
    path = tmp_path / "i3d.pt"
    torch.save(sd, path)
    loaded = create_encoder("i3d", in_channels=1, width_multiplier=0.125, weights=str(path))
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.randn(1, 1, 4, 16, 16)
    assert torch.allclose(source.eval()(x), loaded.eval()(x))
    old = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(old, tmp_path / "old.pt")  # files of old PyTorch versions lack num_batches_tracked
    InceptionI3D(in_channels=1, width_multiplier=0.125, weights=str(tmp_path / "old.pt"))


def test_weights_errors_name_the_keys(tmp_path: Path) -> None:
    sd = InceptionI3D(in_channels=1, width_multiplier=0.125).state_dict()
    sd["Mixed_3b.b0.conv.weight"] = sd.pop("Mixed_3b.b0.conv3d.weight")
    torch.save(sd, tmp_path / "renamed.pt")
    with pytest.raises(ValueError, match=r"missing keys: Mixed_3b\.b0\.conv3d\.weight.*unexpected keys: "
                                         r"Mixed_3b\.b0\.conv\.weight"):  # fmt: skip
        InceptionI3D(in_channels=1, width_multiplier=0.125, weights=str(tmp_path / "renamed.pt"))
    torch.save(InceptionI3D(in_channels=3, width_multiplier=0.125).state_dict(), tmp_path / "rgb.pt")
    with pytest.raises(ValueError, match=r"Conv3d_1a_7x7\.conv3d\.weight: file \(8, 3, 7, 7, 7\)"):
        InceptionI3D(in_channels=1, width_multiplier=0.125, weights=str(tmp_path / "rgb.pt"))
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        InceptionI3D(weights=str(tmp_path / "absent.pt"))
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(TypeError, match="expected a state dict"):
        InceptionI3D(weights=str(tmp_path / "list.pt"))


@pytest.mark.slow
def test_official_clip_size_gives_the_8x7x7_map_that_avgpool_8_7_7_covers() -> None:
    model = InceptionI3D(in_channels=3).eval()
    x = torch.randn(1, 3, 64, 224, 224)
    with torch.no_grad():
        for module in model.children():
            x = module(x)
        pooled = torch.nn.functional.avg_pool3d(x, (8, 7, 7))
    assert x.shape == (1, 1024, 8, 7, 7)
    assert torch.allclose(pooled.flatten(1), x.mean(dim=(2, 3, 4)), atol=1e-5)  # = the global average
