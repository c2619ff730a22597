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

__all__ = ['available', 'coord_attention_inference', 'gate_supported', 'gate', 'gate_backward']


def available() -> bool:
    """Whether the kernel was built and is not turned off by `TIMM_COORDATT_NATIVE=0`."""
    return _native is not None and os.environ.get('TIMM_COORDATT_NATIVE', '1') != '0'


def _address(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def coord_attention_inference(
        x: torch.Tensor,
        out: torch.Tensor,
        w1: torch.Tensor,
        b1: Optional[torch.Tensor],
        w_gates_t: torch.Tensor,
        b_gates: Optional[torch.Tensor],
) -> torch.Tensor:
    """`out = x * a_h * a_w`, hard-swish after `w1` (BN folded in), sigmoid gates; `out` may be `x`.

    `x`, `out`: float32 CPU (N, C, H, W), both contiguous or both channels_last. Weights float32 CPU
    and contiguous: `w1` (rd, C), `w_gates_t` (rd, 2C) the transposed conv_h and conv_w weights side
    by side, biases `b1` (rd,) and `b_gates` (2C,) or None.
    """
    n, c, h, w = x.shape
    rd = w1.shape[0]
    channels_last = not x.is_contiguous()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    tensors = dict(x=x, out=out, w1=w1, b1=b1, w_gates_t=w_gates_t, b_gates=b_gates)
    for name, t in tensors.items():
        if t is not None and (t.dtype != torch.float32 or t.device.type != 'cpu'):
            raise ValueError(f'coord_attention_inference expected float32 CPU tensors, got {name}: {t.dtype} on {t.device}')
    expected = dict(out=(n, c, h, w), w1=(rd, c), b1=(rd,), w_gates_t=(rd, 2 * c), b_gates=(2 * c,))
    for name, shape in expected.items():
        t = tensors[name]
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f'coord_attention_inference expected {name} of shape {shape}, got {tuple(t.shape)}')
    if not (x.is_contiguous(memory_format=memory_format) and out.is_contiguous(memory_format=memory_format)):
        raise ValueError('coord_attention_inference expected x and out both contiguous or both channels_last')
    if not all(t is None or t.is_contiguous() for t in (w1, b1, w_gates_t, b_gates)):
        raise ValueError('coord_attention_inference expected contiguous weights and biases')
    _native.forward(
        x.data_ptr(), out.data_ptr(), n, c, h, w, rd,
        w1.data_ptr(), _address(b1), w_gates_t.data_ptr(), _address(b_gates), channels_last,
        torch.get_num_threads())
    return out


def _gate_layout(x: torch.Tensor, a_h: torch.Tensor, a_w: torch.Tensor) -> Optional[bool]:
    """channels_last (True) or contiguous (False) if the kernels take `x` with these gates, else None."""
    if not all(t.dtype == torch.float32 and t.device.type == 'cpu' for t in (x, a_h, a_w)):
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
