""" The C inference kernel of CoordAttention (timm_coordatt/csrc/coord_attention.c).

Built with the package when a C compiler is at hand (`pip install` compiles it; it is optional).
`CoordAttention` uses it in eager CPU inference on float32 inputs, contiguous or channels_last, when
the block has the paper's hard-swish and sigmoid and a foldable norm; everything else (other
dtypes and devices, training, autograd, TorchScript, tracing, torch.compile, export) runs the
PyTorch formulation. Set the environment variable `TIMM_COORDATT_NATIVE=0` to turn it off.
"""
import os
from typing import Optional

import torch

try:
    from . import _native
except ImportError:  # built without a C compiler
    _native = None

__all__ = ['available', 'coord_attention_inference']


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
