"""Tests for the U2-Net family in ``tasks.model``: sizes, shapes, dtypes, errors, gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tasks.model.blocks import RSU4F, RSU7
from tasks.model.config import MODEL_NAMES, StageWidths, U2NetConfig
from tasks.model.u2net import U2Net, U2NetOutput, build_model, count_parameters

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def u2netp_eval() -> U2Net:
    torch.manual_seed(0)
    return build_model("u2netp").eval()


@pytest.mark.parametrize(
    ("name", "expected"),
    [("u2net", 44_009_869), ("u2netp", 1_131_181)],
)
def test_parameter_counts_match_the_paper(name: str, expected: int) -> None:
    model = build_model(name)
    assert count_parameters(model) == expected
    assert count_parameters(model, trainable_only=True) == expected


def test_count_parameters_trainable_only_skips_frozen() -> None:
    model = build_model("u2netp")
    model.stage1.requires_grad_(False)
    frozen = sum(p.numel() for p in model.stage1.parameters())
    assert frozen > 0
    assert count_parameters(model, trainable_only=True) == 1_131_181 - frozen
    assert count_parameters(model) == 1_131_181


def test_registry_names_and_normalisation() -> None:
    assert MODEL_NAMES == ("u2net", "u2netp")
    model = build_model("U2-NetP", in_channels=4, out_channels=2)
    assert isinstance(model, U2Net)
    assert (model.in_channels, model.out_channels) == (4, 2)
    assert count_parameters(model) == count_parameters(build_model("u2netp", 4, 2))


def test_unknown_name_lists_valid_names_and_suggests_closest() -> None:
    with pytest.raises(ValueError) as info:
        build_model("u2netq")
    message = str(info.value)
    assert "'u2netq'" in message
    assert "'u2net'" in message and "'u2netp'" in message
    assert "did you mean 'u2net'?" in message

    with pytest.raises(ValueError) as info:
        build_model("u2netplus")
    assert "did you mean 'u2netp'?" in str(info.value)

    with pytest.raises(ValueError) as info:
        build_model("bisenet")
    assert "did you mean" not in str(info.value)
    assert "'u2net', 'u2netp'" in str(info.value)


def test_output_shapes_at_training_size(u2netp_eval: U2Net) -> None:
    with torch.no_grad():
        out = u2netp_eval(torch.randn(1, 3, 320, 320))
    assert isinstance(out, U2NetOutput)
    assert len(out.sides) == 6
    maps = out.all()
    assert len(maps) == 7 and maps[0] is out.fused
    assert all(m.shape == (1, 1, 320, 320) for m in maps)


def test_output_shapes_at_odd_size(u2netp_eval: U2Net) -> None:
    with torch.no_grad():
        out = u2netp_eval(torch.randn(2, 3, 97, 131))
    assert [tuple(m.shape) for m in out.all()] == [(2, 1, 97, 131)] * 7
    assert all(torch.isfinite(m).all() for m in out.all())


def test_multi_channel_input_and_output() -> None:
    model = build_model("u2netp", in_channels=4, out_channels=2).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 4, 48, 33))
    assert [tuple(m.shape) for m in out.all()] == [(1, 2, 48, 33)] * 7


def test_outputs_are_logits_not_probabilities(u2netp_eval: U2Net) -> None:
    with torch.no_grad():
        out = u2netp_eval(torch.randn(1, 3, 64, 64))
    values = torch.cat([m.flatten() for m in out.all()])
    assert (values < 0).any() and (values > 1).any()

    model = build_model("u2netp").eval()
    with torch.no_grad():
        model.outconv.weight.zero_()
        model.outconv.bias.fill_(-3.0)
        fused = model(torch.randn(1, 3, 32, 32)).fused
    # A sigmoid at the end would give 0.047 here.
    assert torch.equal(fused, torch.full_like(fused, -3.0))


def test_channels_last_input_gives_the_same_result(u2netp_eval: U2Net) -> None:
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        reference = u2netp_eval(x).fused
        model_cl = build_model("u2netp").eval()
        model_cl.load_state_dict(u2netp_eval.state_dict())
        model_cl = model_cl.to(memory_format=torch.channels_last)
        out = model_cl(x.contiguous(memory_format=torch.channels_last)).fused
    assert out.shape == (1, 1, 64, 80)
    scale = reference.abs().max()
    assert (out - reference).abs().max() <= 1e-4 * scale


def test_bfloat16_autocast_forward(u2netp_eval: U2Net) -> None:
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        reference = u2netp_eval(x).fused
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = u2netp_eval(x)
    assert out.fused.dtype == torch.bfloat16
    assert [tuple(m.shape) for m in out.all()] == [(1, 1, 64, 64)] * 7
    assert all(torch.isfinite(m).all() for m in out.all())
    correlation = torch.corrcoef(torch.stack([reference.flatten(), out.fused.float().flatten()]))[0, 1]
    assert correlation > 0.99


def test_wrong_channel_count_says_expected_and_got(u2netp_eval: U2Net) -> None:
    with pytest.raises(ValueError) as info:
        u2netp_eval(torch.randn(1, 4, 64, 64))
    message = str(info.value)
    assert "built for 3 input channels but got 4" in message
    assert "alpha" in message and "in_channels=4" in message

    with pytest.raises(ValueError, match=r"channels-last.*permute\(0, 3, 1, 2\)"):
        u2netp_eval(torch.randn(1, 64, 64, 3))


def test_non_4d_input_is_rejected_with_a_hint(u2netp_eval: U2Net) -> None:
    with pytest.raises(ValueError, match=r"4-D tensor.*got 3-D shape \(3, 64, 64\).*unsqueeze\(0\)"):
        u2netp_eval(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="got 2-D"):
        u2netp_eval(torch.randn(64, 64))


def test_integer_images_are_rejected(u2netp_eval: U2Net) -> None:
    with pytest.raises(TypeError, match=r"floating-point.*torch\.uint8.*float\(\) / 255"):
        u2netp_eval(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(TypeError, match="expects a torch.Tensor, got list"):
        u2netp_eval([[0.0]])  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [(31, 320), (320, 16), (8, 8)])
def test_too_small_input_names_the_minimum_and_suggests_resizing(
    u2netp_eval: U2Net, size: tuple[int, int]
) -> None:
    height, width = size
    with pytest.raises(ValueError) as info:
        u2netp_eval(torch.randn(1, 3, height, width))
    message = str(info.value)
    assert f"{height}×{width} px is too small" in message
    assert "at least 32×32 px" in message
    assert "resize" in message and "320×320" in message


def test_minimum_size_works_and_single_tiny_training_image_is_explained() -> None:
    model = build_model("u2netp")
    assert model(torch.randn(2, 3, 32, 32)).fused.shape == (2, 1, 32, 32)
    with pytest.raises(ValueError, match=r"batch of at least 2.*model\.eval\(\)"):
        model(torch.randn(1, 3, 32, 32))
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).fused.shape == (1, 1, 32, 32)


def test_one_training_step_gives_finite_gradients_everywhere() -> None:
    torch.manual_seed(1)
    model = build_model("u2netp").train()
    x = torch.randn(2, 3, 64, 64)
    target = (torch.rand(2, 1, 64, 64) > 0.5).float()
    out = model(x)
    loss = sum(F.binary_cross_entropy_with_logits(m, target) for m in out.all())
    assert torch.isfinite(loss)
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, f"no gradient for {name}"
        assert torch.isfinite(param.grad).all(), f"non-finite gradient for {name}"
    assert all(p.grad.abs().sum() > 0 for p in model.parameters() if p.dim() == 4)


@pytest.mark.parametrize("size", [(33, 47), (64, 64)])
def test_rsu_blocks_keep_the_spatial_size(size: tuple[int, int]) -> None:
    x = torch.randn(2, 5, *size)
    assert RSU7(5, 4, 6)(x).shape == (2, 6, *size)
    assert RSU4F(5, 4, 6)(x).shape == (2, 6, *size)


def test_weight_init_defaults() -> None:
    model = build_model("u2netp")
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert bns and convs
    assert all(torch.all(bn.weight == 1) and torch.all(bn.bias == 0) for bn in bns)
    assert all(torch.all(c.bias == 0) for c in convs)
    # Kaiming fan-out (ReLU) for a body conv: std = sqrt(2 / (out_channels * 3 * 3)).
    weight = model.stage1.rebnconv1.conv_s1.weight
    expected = (2.0 / (weight.shape[0] * 9)) ** 0.5
    assert abs(weight.std().item() - expected) < 0.1 * expected


def test_state_dict_keys_follow_the_reference_layout() -> None:
    keys = build_model("u2net").state_dict()
    assert keys["stage1.rebnconv7.conv_s1.weight"].shape == (32, 32, 3, 3)
    assert keys["stage1d.rebnconv1d.conv_s1.weight"].shape == (64, 32, 3, 3)
    assert keys["stage5d.rebnconvin.conv_s1.weight"].shape == (512, 1024, 3, 3)
    assert keys["stage6.rebnconv4.conv_s1.weight"].shape == (256, 256, 3, 3)
    assert keys["side6.weight"].shape == (1, 512, 3, 3)
    assert keys["outconv.weight"].shape == (1, 6, 1, 1)
    assert not any(k.startswith(("_", "pool")) or "._" in k for k in keys)


def test_config_validation() -> None:
    widths = (StageWidths(16, 64),)
    with pytest.raises(ValueError, match="6 encoder stages and 5 decoder stages, got 1 and 5"):
        U2NetConfig(encoder=widths, decoder=widths * 5)
    with pytest.raises(ValueError, match="decoder stage 2 must be"):
        U2NetConfig(encoder=widths * 6, decoder=(widths[0], StageWidths(0, 64), *widths * 3))
    with pytest.raises(ValueError, match="in_channels must be a positive integer"):
        build_model("u2netp", in_channels=0)
