"""Model construction: BlurPool placement, zero-init residuals, channels_last, weight-decay groups by module type."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from training.model import BlurPoolConv2d, apply_blurpool, build_model, build_optimizer, param_groups, unwrap


def strided_convs(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and max(m.stride) > 1]


def test_blurpool_wraps_exactly_the_strided_convs_with_16_plus_inputs():
    plain = build_model("resnet50", 10, channels_last=False)
    expected = {n for n, m in strided_convs(plain) if m.in_channels >= 16}
    # resnet50: conv2 and downsample.0 of the first block of layers 2-4; the stem conv has 3 inputs.
    assert expected == {f"layer{i}.0.{c}" for i in (2, 3, 4) for c in ("conv2", "downsample.0")}
    model = build_model("resnet50", 10, blurpool=True, channels_last=False)
    wrapped = {n for n, m in model.named_modules() if isinstance(m, BlurPoolConv2d)}
    assert wrapped == expected
    assert isinstance(model.conv1, nn.Conv2d) and not isinstance(model.conv1, BlurPoolConv2d)
    # no strided conv is left unwrapped except the stem
    assert [n for n, m in strided_convs(model) if not n.endswith(".conv")] == ["conv1"]


def test_blurpool_is_a_normalised_binomial_blur_and_keeps_shapes():
    conv = nn.Conv2d(16, 8, 3, stride=2, padding=1, bias=False)
    wrapped = BlurPoolConv2d(conv)
    k = wrapped.blur_filter
    assert k.shape == (16, 1, 3, 3)
    torch.testing.assert_close(k[0, 0], torch.tensor([[1, 2, 1], [2, 4, 2], [1, 2, 1]]) / 16.0)
    x = torch.randn(2, 16, 12, 12)
    assert wrapped(x).shape == conv(x).shape
    # a constant image stays constant after the blur (away from the zero-padded border)
    const = torch.ones(1, 16, 8, 8)
    blurred = nn.functional.conv2d(const, k, padding=1, groups=16)
    torch.testing.assert_close(blurred[..., 1:-1, 1:-1], torch.ones(1, 16, 6, 6))
    assert apply_blurpool(nn.Sequential(nn.Conv2d(3, 16, 3, stride=2))) == 0


def test_zero_init_residual_zeroes_last_bn_of_each_block():
    model = build_model("resnet50", 10, zero_init_residual=True, channels_last=False)
    blocks = [m for m in model.modules() if type(m).__name__ == "Bottleneck"]
    assert len(blocks) == 16
    assert all(torch.count_nonzero(b.bn3.weight) == 0 for b in blocks)
    assert all(torch.count_nonzero(b.bn2.weight) > 0 for b in blocks)
    default = build_model("resnet50", 10, channels_last=False)
    assert all(torch.count_nonzero(b.bn3.weight) > 0 for b in default.modules() if type(b).__name__ == "Bottleneck")


def test_channels_last_model():
    model = build_model("resnet18", 7)
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert model.fc.out_features == 7
    with pytest.raises(ValueError, match="unknown arch"):
        build_model("vgg16", 10)


def test_weight_decay_groups_by_module_type():
    model = build_model("resnet50", 10, blurpool=True)
    groups, counts = param_groups(model, 1e-4)
    decay, no_decay = ({id(p) for p in g["params"]} for g in groups)
    assert groups[0]["weight_decay"] == 1e-4 and groups[1]["weight_decay"] == 0.0
    bn_params = {id(p) for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
    # the downsample BatchNorms are named "downsample.1", which name matching on "bn" would miss
    assert id(model.layer1[0].downsample[1].weight) in bn_params
    biases = {id(model.fc.bias)}
    conv_linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert no_decay == bn_params | biases
    assert decay == conv_linear_weights
    assert not decay & no_decay
    assert len(decay) + len(no_decay) == len(list(model.parameters()))
    assert counts["decay_tensors"] == len(decay) and counts["no_decay_tensors"] == len(no_decay)
    assert counts["decay_params"] + counts["no_decay_params"] == sum(p.numel() for p in model.parameters())


def test_optimizer_step_leaves_bn_untouched_by_weight_decay():
    model = build_model("resnet18", 4, channels_last=False)
    opt, _ = build_optimizer(model, weight_decay=0.5, momentum=0.0, nesterov=False)
    for g in opt.param_groups:
        g["lr"] = 1.0
    bn_w = model.bn1.weight.detach().clone()
    conv_w = model.conv1.weight.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    torch.testing.assert_close(model.bn1.weight, bn_w)  # zero grad, no decay: unchanged
    torch.testing.assert_close(model.conv1.weight, conv_w * 0.5)  # zero grad, decay 0.5 at lr 1: halved


def test_unwrap_strips_compile_wrapper():
    model = build_model("resnet18", 4, channels_last=False)
    compiled = torch.compile(model)  # compilation is lazy: nothing is compiled until called
    assert unwrap(compiled) is model
    assert set(unwrap(compiled).state_dict()) == set(model.state_dict())
