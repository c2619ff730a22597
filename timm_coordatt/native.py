""" The C kernels of CoordAttention (timm_coordatt/csrc/coord_attention.c).

Built with the package when a C compiler is at hand (`pip install` compiles it; it is optional).
In eager execution on float32 CPU tensors, contiguous or channels_last, `CoordAttention` runs
- inference in one call (`coord_attention_inference`), when the block has the paper's hard-swish
  and sigmoid and a foldable norm;
- in training, the gate product `x * a_h * a_w` and its backward (`gate`, `gate_backward`): one pass
  each over the full-size tensors instead of several.
Everything else (other dtypes and devices, TorchScript, tracing, torch.compile, export, double
backward) runs the PyTorch formulation. Set the environment variable `TIMM_COORDATT_NATIVE=0` to
turn the kernels off.
"""
import os
from typing import Optional, Tuple

import torch

try:
    from . import _native
except ImportError:  # built without a C compiler
    _native = None

__all__ = ['available', 'InferenceWeights', 'coord_attention_inference', 'gate_supported', 'gate', 'gate_backward']


def available() -> bool:
    """Whether the kernel was built and is not turned off by `TIMM_COORDATT_NATIVE=0`."""
    return _native is not None and os.environ.get('TIMM_COORDATT_NATIVE', '1') != '0'


class InferenceWeights:
    """The block's inference weights, checked once: `w1` (rd, C) with BN folded in, `w_gates_t` (rd, 2C)
    the transposed conv_h and conv_w weights side by side, biases `b1` (rd,) and `b_gates` (2C,) or
    None; float32, CPU, contiguous. Holds the tensors, so the addresses handed to C stay valid."""

    def __init__(
            self,
            w1: torch.Tensor,
            b1: Optional[torch.Tensor],
            w_gates_t: torch.Tensor,
            b_gates: Optional[torch.Tensor],
    ):
        rd, c = w1.shape
        tensors = dict(w1=w1, b1=b1, w_gates_t=w_gates_t, b_gates=b_gates)
        expected = dict(w1=(rd, c), b1=(rd,), w_gates_t=(rd, 2 * c), b_gates=(2 * c,))
        for name, t in tensors.items():
            if t is None:
                continue
            if t.dtype != torch.float32 or t.device.type != 'cpu' or not t.is_contiguous():
                raise ValueError(f'InferenceWeights expected contiguous float32 CPU tensors, got {name}: '
                                 f'{t.dtype} on {t.device}, strides {t.stride()}')
            if tuple(t.shape) != expected[name]:
                raise ValueError(f'InferenceWeights expected {name} of shape {expected[name]}, got {tuple(t.shape)}')
        self.channels, self.rd_channels = c, rd
        self.tensors = (w1, b1, w_gates_t, b_gates)
        self.addresses = tuple(0 if t is None else t.data_ptr() for t in self.tensors)


def coord_attention_inference(x: torch.Tensor, out: torch.Tensor, weights: InferenceWeights) -> torch.Tensor:
    """`out = x * a_h * a_w`, hard-swish after the folded conv1, sigmoid gates; `out` may be `x`.

    `x`, `out`: float32 CPU (N, C, H, W), both contiguous or both channels_last.
    """
    if x.dtype != torch.float32 or not x.is_cpu or x.dim() != 4 or x.shape[1] != weights.channels:
        raise ValueError(f'coord_attention_inference expected a float32 CPU (N, {weights.channels}, H, W) x, '
                         f'got {x.dtype} on {x.device}, shape {tuple(x.shape)}')
    channels_last = not x.is_contiguous()
    if (channels_last and not x.is_contiguous(memory_format=torch.channels_last)) or (
            out.dtype != x.dtype or out.device != x.device or out.shape != x.shape or out.stride() != x.stride()):
        raise ValueError(f'coord_attention_inference expected x contiguous or channels_last and out laid out as x, '
                         f'got x {tuple(x.shape)} {x.stride()}, out {tuple(out.shape)} {out.stride()} {out.dtype}')
    _native.forward(x.data_ptr(), out.data_ptr(), *x.shape, weights.rd_channels, *weights.addresses,
                    channels_last, torch.get_num_threads())
    return out


def _gate_layout(x: torch.Tensor, a_h: torch.Tensor, a_w: torch.Tensor) -> Optional[bool]:
    """channels_last (True) or contiguous (False) if the kernels take `x` with these gates, else None."""
    if not all(t.dtype == torch.float32 and t.is_cpu for t in (x, a_h, a_w)):
        return None
    n, c, h, w = x.shape
    if tuple(a_h.shape) != (n, c, h, 1) or tuple(a_w.shape) != (n, c, 1, w) or x.numel() == 0:
        return None
    for memory_format, channels_last in ((torch.contiguous_format, False), (torch.channels_last, True)):
        if all(t.is_contiguous(memory_format=memory_format) for t in (x, a_h, a_w)):
            return channels_last
    return None


def gate_supported(x: torch.Tensor, a_h: torch.Tensor, a_w: torch.Tensor) -> bool:
    """Whether `gate` and `gate_backward` take these tensors (4-D float32 CPU, one memory format)."""
    return available() and x.dim() == 4 and _gate_layout(x, a_h, a_w) is not None


def _check_gate(x: torch.Tensor, a_h: torch.Tensor, a_w: torch.Tensor, **full_size: torch.Tensor) -> bool:
    channels_last = _gate_layout(x, a_h, a_w) if x.dim() == 4 else None
    if channels_last is None:
        raise ValueError(
            'native gate kernels expected float32 CPU x (N, C, H, W), a_h (N, C, H, 1), a_w (N, C, 1, W), all '
            f'contiguous or all channels_last, got {[(tuple(t.shape), t.dtype, t.stride()) for t in (x, a_h, a_w)]}')
    for name, t in full_size.items():
        if t.dtype != x.dtype or t.shape != x.shape or t.stride() != x.stride():
            raise ValueError(f'native gate kernels expected {name} laid out as x {tuple(x.shape)} {x.stride()}, '
                             f'got {tuple(t.shape)} {t.stride()} {t.dtype}')
    return channels_last


def gate(x: torch.Tensor, a_h: torch.Tensor, a_w: torch.Tensor) -> torch.Tensor:
    """`x * a_h * a_w`, bit for bit as `torch.mul(x, a_h).mul_(a_w)` computes it, in one pass."""
    channels_last = _check_gate(x, a_h, a_w)
    out = torch.empty_like(x)
    _native.gate(x.data_ptr(), a_h.data_ptr(), a_w.data_ptr(), out.data_ptr(), *x.shape, channels_last,
                 torch.get_num_threads())
    return out


def gate_backward(
        x: torch.Tensor, a_h: torch.Tensor, a_w: torch.Tensor, grad: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of `x * a_h * a_w` for `grad`, in one pass: for x, a_h and a_w."""
    channels_last = _check_gate(x, a_h, a_w, grad=grad)
    grad_x, grad_a_h, grad_a_w = torch.empty_like(x), torch.empty_like(a_h), torch.empty_like(a_w)
    _native.gate_backward(
        x.data_ptr(), a_h.data_ptr(), a_w.data_ptr(), grad.data_ptr(),
        grad_x.data_ptr(), grad_a_h.data_ptr(), grad_a_w.data_ptr(), *x.shape, channels_last,
        torch.get_num_threads())
    return grad_x, grad_a_h, grad_a_w
