""" Coordinate Attention

Paper: `Coordinate Attention for Efficient Mobile Network Design` - https://arxiv.org/abs/2103.02907
(Hou, Zhou, Feng, CVPR 2021).

The block pools the input along each spatial axis, encodes both strips with one shared 1x1 conv
(+ BN + hard-swish), and turns them back into a height gate `a_h` and a width gate `a_w`:
`y = x * a_h * a_w`. Unlike timm's `CoordAttn` it defaults to the paper's widths
(`max(8, C // 32)`), biased convs and its own hard-swish, whatever the host block's activation.
"""
from typing import Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from timm.layers import LayerType, create_act_layer, register_notrace_function

__all__ = ['CoordAttention', 'CoordAttentionFactory', 'coord_gate']


class _CoordGate(torch.autograd.Function):
    """`x * a_h * a_w` that saves only `x` and the two small gates for backward.

    Autograd's own version also keeps the full-size `x * a_h`; recomputing the products from the
    gates instead saves one activation-sized tensor per block and the allocation it costs.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, a_h: torch.Tensor, a_w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, a_h, a_w)
        return torch.mul(x, a_h).mul_(a_w)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, a_h, a_w = ctx.saved_tensors
        gx = grad_a_h = grad_a_w = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            gx = grad_out * x
            # strip reductions as batched matmuls, no second full-size temporary
            if ctx.needs_input_grad[1]:
                grad_a_h = torch.matmul(gx, a_w.transpose(-1, -2))
            if ctx.needs_input_grad[2]:
                grad_a_w = torch.matmul(a_h.transpose(-1, -2), gx)
        grad_x = None
        if ctx.needs_input_grad[0]:
            # into the buffer of `grad_out * x` once reduced, one fresh full-size tensor rather than
            # two; not when building a graph for double backward, where `out=` is not differentiable
            buffer = None if torch.is_grad_enabled() else gx
            grad_x = torch.mul(grad_out, a_h, out=buffer).mul_(a_w)
        return grad_x, grad_a_h, grad_a_w


@register_notrace_function  # a leaf for FX: tracing cannot branch on requires_grad
def coord_gate(x: torch.Tensor, a_h: torch.Tensor, a_w: torch.Tensor) -> torch.Tensor:
    """Apply the height gate `a_h` (N, C, H, 1) and width gate `a_w` (N, C, 1, W) to `x`."""
    if torch.jit.is_scripting():
        return x * a_h * a_w
    if torch.is_grad_enabled() and (x.requires_grad or a_h.requires_grad or a_w.requires_grad):
        return _CoordGate.apply(x, a_h, a_w)
    # nothing to differentiate: one output allocation, the second product in place
    return torch.mul(x, a_h).mul_(a_w)


torch.fx.wrap('coord_gate')


@register_notrace_function
def _check_input(x: torch.Tensor, channels: int) -> None:
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(
            'CoordAttention expected a 4-D (N, C, H, W) input with C={}, got shape {}'.format(
                channels, list(x.shape)))


torch.fx.wrap('_check_input')


class CoordAttention(nn.Module):
    """Coordinate Attention block of Hou et al., defaults as in the paper.

    Args:
        channels: Input (= output) channels.
        reduction: Reduction ratio r of the shared 1x1 conv, `rd_channels = max(min_channels, channels // r)`.
        rd_channels: Explicit reduced width, overrides `reduction` and `min_channels`.
        min_channels: Lower bound of the reduced width.
        bias: Bias on the three 1x1 convs (the paper uses biased convs).
        act_layer: Activation after the shared conv (hard-swish in the paper).
        norm_layer: Norm after the shared conv, None for none (BatchNorm in the paper).
        gate_layer: Gate activation of both directions (sigmoid in the paper).
    """

    def __init__(
            self,
            channels: int,
            reduction: int = 32,
            rd_channels: Optional[int] = None,
            min_channels: int = 8,
            bias: bool = True,
            act_layer: LayerType = nn.Hardswish,
            norm_layer: Optional[LayerType] = nn.BatchNorm2d,
            gate_layer: LayerType = nn.Sigmoid,
            device=None,
            dtype=None,
    ):
        super().__init__()
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f'CoordAttention expected channels to be a positive int, got {channels!r}')
        if rd_channels is None:
            if reduction < 1 or min_channels < 1:
                raise ValueError(
                    f'CoordAttention expected reduction >= 1 and min_channels >= 1, '
                    f'got reduction={reduction!r}, min_channels={min_channels!r}')
            rd_channels = max(min_channels, channels // reduction)
        elif rd_channels < 1:
            raise ValueError(f'CoordAttention expected rd_channels >= 1, got {rd_channels!r}')
        dd = {'device': device, 'dtype': dtype}
        self.channels = channels
        self.conv1 = nn.Conv2d(channels, rd_channels, 1, bias=bias, **dd)
        self.bn1 = norm_layer(rd_channels, **dd) if norm_layer is not None else nn.Identity()
        self.act = create_act_layer(act_layer)
        self.conv_h = nn.Conv2d(rd_channels, channels, 1, bias=bias, **dd)
        self.conv_w = nn.Conv2d(rd_channels, channels, 1, bias=bias, **dd)
        self.gate = create_act_layer(gate_layer)

    def gates(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The height gate `a_h` (N, C, H, 1) and the width gate `a_w` (N, C, 1, W) for `x`."""
        _check_input(x, self.channels)
        h, w = x.shape[-2:]
        # Both strips side by side as (N, C, H + W). Sums: their backward is a free expand where
        # mean's writes a full-size tensor.
        y = torch.cat([x.sum(3).div_(w), x.sum(2).div_(h)], dim=2)
        # The 1x1 convs as conv1d on the strips (same weights, flattened), with no transposes: the
        # norm sees the usual contiguous (N, C, L, 1) layout and so does its gradient. That matters:
        # CPU batch norm's backward is wrong when input and gradient differ in memory format, and
        # transposed strips add size-1 guards that break `torch.export` with dynamic H and W.
        y = F.conv1d(y, self.conv1.weight.flatten(2), self.conv1.bias)
        y = self.act(self.bn1(y.unsqueeze(3))).squeeze(3)
        y_h, y_w = torch.split(y, [h, w], dim=2)
        a_h = self.gate(F.conv1d(y_h, self.conv_h.weight.flatten(2), self.conv_h.bias))
        a_w = self.gate(F.conv1d(y_w, self.conv_w.weight.flatten(2), self.conv_w.bias))
        return a_h.unsqueeze(3), a_w.unsqueeze(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a_h, a_w = self.gates(x)
        return coord_gate(x, a_h, a_w)


class CoordAttentionFactory:
    """Creates `CoordAttention` inside host blocks (what `get_attn('ca')` returns).

    Host blocks pass their own `act_layer` (timm's EfficientNet blocks pass swish or ReLU6); the
    paper keeps hard-swish inside the block whatever the host uses, so the host's activation is
    ignored. Keyword arguments given here win over those the host passes, e.g.
    `se_layer=CoordAttentionFactory(reduction=16, act_layer='relu')`. Pass the `CoordAttention`
    class itself to let the host choose the activation.
    """

    def __init__(self, **kwargs):
        self.kwargs = kwargs

    def __call__(self, channels: int, act_layer: Optional[LayerType] = None, **host_kwargs) -> CoordAttention:
        return CoordAttention(channels, **{**host_kwargs, **self.kwargs})

    def __repr__(self) -> str:
        args = ', '.join(f'{k}={v!r}' for k, v in self.kwargs.items())
        return f'{type(self).__name__}({args})'
