""" `recompute_ca_outputs`: same gradients, less memory held for backward, no silent staleness. """
import contextlib

import pytest
import torch
from torch import nn

from timm_coordatt import CoordAttention, recompute_ca_outputs
from timm_coordatt.model_benchmark import peak_memory
from timm_coordatt.recompute import recompute_active


def _host(channels: int = 32, blocks: int = 1) -> nn.Module:
    """CA blocks between two convs, as in inverted residuals: the 1x1 conv after each saves its input."""
    torch.manual_seed(0)
    return nn.Sequential(*[
        nn.Sequential(
            nn.Conv2d(8, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU6(inplace=True),
            CoordAttention(channels), nn.Conv2d(channels, 8, 1), nn.BatchNorm2d(8))
        for _ in range(blocks)])


def _grads(model: nn.Module, x: torch.Tensor, context) -> list:
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    with context():
        out = model(x)
    out.square().mean().backward()
    return [x.grad] + [p.grad for p in model.parameters()]


@pytest.mark.parametrize('memory_format', [torch.contiguous_format, torch.channels_last])
def test_same_gradients(memory_format):
    model = _host().to(memory_format=memory_format).train()
    x = torch.randn(4, 8, 12, 10).contiguous(memory_format=memory_format)
    expected = _grads(model, x, contextlib.nullcontext)
    for g, e in zip(_grads(model, x, recompute_ca_outputs), expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0)  # the recomputed output is bitwise the same


def test_holds_less():
    """The peak comes when backward starts, with every block's saved tensors held: one CA output
    each less, but for the one rebuilt while the last block's backward runs."""
    blocks = 4
    model = _host(64, blocks).train()
    x = torch.randn(8, 8, 32, 32)
    ca_output_bytes = 8 * 64 * 32 * 32 * 4

    def step(context):
        def fn():
            model.zero_grad(set_to_none=True)
            with context():
                out = model(x)
            out.sum().backward()
        return fn

    plain, lean = (peak_memory(step(c), torch.device('cpu')) for c in (contextlib.nullcontext, recompute_ca_outputs))
    assert plain - lean >= (blocks - 1) * ca_output_bytes, (plain, lean)


def test_input_changed_in_place_raises():
    ca, conv = CoordAttention(16).train(), nn.Conv2d(16, 4, 1)
    leaf = torch.randn(2, 16, 6, 6, requires_grad=True)
    x = leaf * 1
    with recompute_ca_outputs():
        out = conv(ca(x))
    with torch.no_grad():
        x.add_(1)
    with pytest.raises(RuntimeError, match='modified in place after the forward pass'):
        out.sum().backward()


def test_output_changed_in_place_is_stored():
    """An output changed in place before a layer saves it is stored as usual, not rebuilt stale."""
    ca, conv = CoordAttention(16).train(), nn.Conv2d(16, 4, 1)
    x = torch.randn(2, 16, 6, 6)

    def run(context):
        conv.zero_grad(set_to_none=True)
        with context():
            y = ca(x.requires_grad_())
            y.add_(1)
            out = conv(y)
        out.square().sum().backward()
        return conv.weight.grad

    torch.testing.assert_close(run(recompute_ca_outputs), run(contextlib.nullcontext), rtol=0, atol=0)


def test_context_state():
    assert not recompute_active()
    with recompute_ca_outputs():
        assert recompute_active()
        with recompute_ca_outputs():
            assert recompute_active()
        assert recompute_active()
    assert not recompute_active()
    with pytest.raises(ValueError):
        with recompute_ca_outputs():
            raise ValueError
    assert not recompute_active()
