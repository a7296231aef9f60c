"""Encoders: every registered name maps its documented input to ``(B, out_dim)``; ResNet18 details."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import equimodal as em
from equimodal.models import create_encoder, list_encoders, register_encoder
from equimodal.models.encoders import BasicBlock, ConvEncoder

torch.set_num_threads(1)

B = 2
# name -> (options, one input sample's shape); tiny sizes so the suite stays fast.
CASES: dict[str, tuple[dict[str, Any], tuple[int, ...]]] = {
    "mlp": ({"in_dim": 10, "hidden": (12, 6), "dropout": 0.1}, (10,)),
    "cnn": ({"in_channels": 1, "channels": (4, 6)}, (1, 16, 15)),
    "conv1d": ({"in_channels": 13, "channels": (4, 6)}, (13, 9)),
    "gru": ({"in_channels": 13, "hidden_size": 5}, (13, 9)),
    "resnet18": ({"in_channels": 1, "base_channels": 2}, (1, 16, 16)),
    "transformer": ({"in_dim": 6, "d_model": 8, "num_heads": 2, "num_layers": 1}, (5, 6)),
    "avd_image": ({}, (1, 8, 8)),
    "avd_audio": ({}, (13, 32)),
    "text_embedding": ({"vocab_size": 11, "dim": 8}, (5,)),
    "i3d": ({"in_channels": 2, "width_multiplier": 0.0625}, (2, 4, 16, 16)),
    "resnet50": ({"out_dim": 8}, (3, 32, 32)),
    "bert": (
        {"config": {"vocab_size": 11, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
                    "intermediate_size": 16, "max_position_embeddings": 16}, "out_dim": 6},
        (5,),
    ),
}  # fmt: skip
TOKEN_INPUTS = {"text_embedding", "bert"}  # these take integer token ids, not floats


def sample_input(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A batch of inputs for encoder ``name``: token ids in [1, 11) or standard-normal floats."""
    return torch.randint(1, 11, (B, *shape)) if name in TOKEN_INPUTS else torch.randn(B, *shape)


def test_every_registered_encoder_has_a_case() -> None:
    assert sorted(CASES) == list_encoders()


@pytest.mark.parametrize("name", list_encoders())
def test_output_shape_and_out_dim(name: str) -> None:
    torch.manual_seed(0)
    kwargs, shape = CASES[name]
    enc = create_encoder(name, **kwargs)
    assert isinstance(enc, nn.Module)
    assert isinstance(enc.out_dim, int) and enc.out_dim > 0
    out = enc(sample_input(name, shape))
    assert out.shape == (B, enc.out_dim)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", list_encoders())
def test_gradients_reach_every_parameter(name: str) -> None:
    torch.manual_seed(0)
    kwargs, shape = CASES[name]
    enc = create_encoder(name, **kwargs).train()
    enc(sample_input(name, shape)).square().sum().backward()
    for pname, p in enc.named_parameters():
        assert p.grad is not None, f"{name}: no gradient for {pname}"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient for {pname}"


@pytest.mark.parametrize(
    ("name", "kwargs", "shape"),
    [
        ("cnn", {}, (1, 16, 15)),
        ("cnn", {}, (1, 8, 8)),
        ("cnn", {"in_channels": 3, "channels": (4, 4, 4)}, (3, 8, 8)),
        ("conv1d", {}, (13, 6)),
        ("conv1d", {}, (13, 1)),
        ("gru", {"bidirectional": True, "num_layers": 2, "hidden_size": 4}, (13, 6)),
        ("mlp", {"in_dim": 64}, (1, 8, 8)),
        ("transformer", {"in_dim": 4, "d_model": 8, "num_heads": 4, "pool": "mean"}, (3, 4)),
    ],
)
def test_documented_input_variants(name: str, kwargs: dict[str, Any], shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    enc = create_encoder(name, **kwargs)
    assert enc(torch.randn(B, *shape)).shape == (B, enc.out_dim)


def test_sequence_encoders_share_the_channels_first_layout() -> None:
    x = torch.randn(B, 13, 7)  # (B, C, T)
    conv, gru = create_encoder("conv1d", channels=(4,)), create_encoder("gru", hidden_size=3)
    assert conv(x).shape == (B, 4)
    assert gru(x).shape == (B, 3)
    with pytest.raises(ValueError, match=r"\(B, C, T\)"):
        gru(torch.randn(13, 7))


def test_gru_bidirectional_doubles_out_dim() -> None:
    assert create_encoder("gru", hidden_size=5, bidirectional=True).out_dim == 10


def test_transformer_exposes_heads_and_pools() -> None:
    torch.manual_seed(0)
    x = torch.randn(B, 4, 6)
    for pool in ("cls", "mean"):
        enc = create_encoder("transformer", in_dim=6, d_model=8, num_heads=2, num_layers=1, pool=pool)
        assert enc.num_heads == 2
        assert enc(x).shape == (B, 8)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        create_encoder("transformer", in_dim=6, d_model=8, num_heads=3)
    with pytest.raises(ValueError, match="pool.? must be"):
        create_encoder("transformer", in_dim=6, pool="max")
    with pytest.raises(ValueError, match="max_len=3"):
        create_encoder("transformer", in_dim=6, d_model=8, num_heads=2, max_len=3)(x)


def _convs(enc: nn.Module) -> list[nn.Module]:
    return [m for m in enc.modules() if isinstance(m, nn.Conv1d | nn.Conv2d)]


@pytest.mark.parametrize(
    ("name", "shape", "expected"),
    [
        ("avd_image", (1, 8, 8), [(1, 32, 3), (32, 32, 3), (32, 64, 3), (64, 64, 3)]),
        ("avd_audio", (13, 32), [(13, 32, 5), (32, 64, 5), (64, 64, 3)]),
    ],
)
def test_avd_encoders_follow_the_recipe(
    name: str, shape: tuple[int, ...], expected: list[tuple[int, ...]]
) -> None:
    enc = create_encoder(name)
    convs = _convs(enc)
    assert [(c.in_channels, c.out_channels, c.kernel_size[0]) for c in convs] == expected
    assert all(c.bias is None for c in convs)
    # each conv is followed by BatchNorm and ReLU
    for block in (m for m in enc.modules() if isinstance(m, nn.Sequential) and _convs(m) == [m[0]]):
        assert isinstance(block[1], nn.BatchNorm1d | nn.BatchNorm2d) and isinstance(block[2], nn.ReLU)
    pools = [m for m in enc.modules() if isinstance(m, nn.MaxPool1d | nn.MaxPool2d)]
    assert len(pools) == (1 if name == "avd_image" else 2)
    assert enc.out_dim == 64
    # padding keeps sizes: only the max-pools shrink the input
    x = torch.randn(B, *shape)
    h = enc.body(x)
    assert h.shape[2:] == tuple(s // 2 ** len(pools) for s in shape[1:])


def test_resnet18_standard_architecture() -> None:
    torch.manual_seed(0)
    enc = create_encoder("resnet18", in_channels=3)
    assert enc.out_dim == 512
    # torchvision's resnet18 holds 11_689_512 parameters, of which the 1000-way fc holds 512_000 + 1000
    assert sum(p.numel() for p in enc.parameters()) == 11_689_512 - 513_000
    widths = [layer[0].conv1.out_channels for layer in (enc.layer1, enc.layer2, enc.layer3, enc.layer4)]
    assert widths == [64, 128, 256, 512]
    assert all(len(layer) == 2 and isinstance(layer[0], BasicBlock) for layer in (enc.layer1, enc.layer4))


def test_resnet18_marks_stem_and_downsample_convs_for_skipping() -> None:
    enc = create_encoder("resnet18", base_channels=2)
    skipped = [m for m in enc.modules() if getattr(m, "amss_skip", False)]
    assert enc.stem[0] in skipped
    downsample = [
        m.downsample[0]
        for m in enc.modules()
        if isinstance(m, BasicBlock) and isinstance(m.downsample, nn.Sequential)
    ]
    assert len(downsample) == 3
    assert set(map(id, skipped)) == {id(enc.stem[0]), *map(id, downsample)}
    assert all(isinstance(m, nn.Conv2d) for m in skipped)


def test_resnet18_spectrogram_input() -> None:
    torch.manual_seed(0)
    enc = create_encoder("resnet18", in_channels=1, base_channels=2, activation="gelu")
    assert enc(torch.randn(B, 1, 257, 188)).shape == (B, 16)
    assert any(isinstance(m, nn.GELU) for m in enc.modules())
    assert not any(isinstance(m, nn.ReLU) for m in enc.modules())


def test_resnet18_multi_frame_pools_over_frames_and_space() -> None:
    torch.manual_seed(0)
    enc = create_encoder("resnet18", in_channels=3, base_channels=2).eval()
    frames = torch.randn(B, 3, 3, 16, 16)  # (B, T, C, H, W)
    out = enc(frames)
    assert out.shape == (B, 16)
    # every frame has the same spatial size, so pooling (T, H, W) together = mean of per-frame features
    per_frame = torch.stack([enc(frames[:, t]) for t in range(frames.shape[1])], 1).mean(1)
    torch.testing.assert_close(out, per_frame)
    enc.train()
    enc(frames).sum().backward()
    assert all(p.grad is not None for p in enc.parameters())


def test_resnet18_init() -> None:
    torch.manual_seed(0)
    enc = create_encoder("resnet18", in_channels=3, base_channels=8)
    conv = enc.layer3[0].conv1  # fan_out = 32 * 3 * 3
    expected_std = (2.0 / (conv.out_channels * 9)) ** 0.5
    assert abs(conv.weight.std().item() - expected_std) < 0.15 * expected_std
    bn = enc.layer3[0].bn1
    assert torch.all(bn.bias == 0) and abs(bn.weight.mean().item() - 1.0) < 0.05


def test_resnet18_bad_inputs() -> None:
    enc = create_encoder("resnet18", in_channels=1, base_channels=2)
    with pytest.raises(ValueError, match=r"built for 1 input channels, found 3"):
        enc(torch.randn(B, 3, 16, 16))
    with pytest.raises(ValueError, match=r"\(B, T, C, H, W\)"):
        enc(torch.randn(16, 16))
    with pytest.raises(ValueError, match="'relu' or 'gelu'"):
        create_encoder("resnet18", activation="tanh")


def test_bad_inputs_and_options() -> None:
    with pytest.raises(ValueError, match=r"expects \(B, 10\).*found shape \(2, 9\)"):
        create_encoder("mlp", in_dim=10)(torch.randn(B, 9))
    with pytest.raises(ValueError, match="at least one hidden size"):
        create_encoder("mlp", in_dim=10, hidden=())
    with pytest.raises(ValueError, match=r"\(B, C, H, W\).*found shape \(1, 8, 8\)"):
        create_encoder("cnn")(torch.randn(1, 8, 8))
    with pytest.raises(ValueError, match="at least one"):
        ConvEncoder(2, 1, ["M"])
    with pytest.raises(ValueError, match=r"\(out_channels, kernel_size\) or 'M'"):
        ConvEncoder(1, 1, [8])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="dims 1"):
        ConvEncoder(3, 1, [(4, 3)])


def test_unknown_encoder_name_suggests_close_matches() -> None:
    with pytest.raises(ValueError, match=r"Unknown encoder 'resnet'.*Did you mean .*'resnet18'") as info:
        create_encoder("resnet")
    assert "transformer" in str(info.value)  # the valid list


def test_unknown_option_lists_valid_ones() -> None:
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['width'\].*base_channels"):
        create_encoder("resnet18", width=2)


def test_missing_required_option_is_named() -> None:
    with pytest.raises(TypeError, match=r"Encoder 'mlp' needs option\(s\) \['in_dim'\]"):
        create_encoder("mlp")


def test_register_encoder_refuses_duplicates_and_non_callables() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_encoder("mlp")(lambda: nn.Identity())
    with pytest.raises(TypeError, match="class or function"):
        register_encoder("not_callable")(3)  # type: ignore[type-var]
    assert "not_callable" not in list_encoders()


def test_encoders_build_a_multimodal_classifier() -> None:
    torch.manual_seed(0)
    model = em.MultimodalClassifier(
        {"image": create_encoder("avd_image"), "audio": create_encoder("avd_audio")}, num_classes=10
    )
    out = model({"image": torch.randn(B, 1, 8, 8), "audio": torch.randn(B, 13, 32)})
    assert out.logits.shape == (B, 10)
    assert {m: f.shape for m, f in out.features.items()} == {"image": (B, 64), "audio": (B, 64)}


def test_transformer_layouts_turn_images_and_channel_first_sequences_into_tokens() -> None:
    image = torch.randn(2, 1, 8, 8)
    rows = create_encoder("transformer", in_dim=8, layout="image_rows")
    tokens = create_encoder("transformer", in_dim=8)
    tokens.load_state_dict(rows.state_dict())
    rows.eval(), tokens.eval()
    torch.testing.assert_close(rows(image), tokens(image[:, 0]))  # each image row is a token
    seq = torch.randn(2, 13, 32)
    first = create_encoder("transformer", in_dim=13, layout="channels_first")
    plain = create_encoder("transformer", in_dim=13)
    plain.load_state_dict(first.state_dict())
    first.eval(), plain.eval()
    torch.testing.assert_close(first(seq), plain(seq.transpose(1, 2)))
    with pytest.raises(
        ValueError, match="option 'layout' must be one of 'tokens', 'channels_first', 'image_rows'"
    ):
        create_encoder("transformer", in_dim=8, layout="columns")
