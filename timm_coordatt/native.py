""" The C kernels of CoordAttention (timm_coordatt/csrc/coord_attention.c).

Built with the package when a C compiler is at hand (`pip install` compiles it; it is optional).
In eager execution on float32 CPU tensors, contiguous or channels_last, `CoordAttention` runs
- inference in one call (`coord_attention_inference`), when the block has the paper's hard-swish
  and sigmoid and a foldable norm;
- in training, the pooling of both strips (`strips`), the gate product `x * a_h * a_w` (`gate`) and
  their backward (`gate_backward`, `strips_backward`, the latter writing the input's whole gradient,
  both paths', in one pass): one pass each over the full-size tensors instead of several.
Everything else (other dtypes and devices, TorchScript, tracing, torch.compile, export, torch.func
transforms, double backward) runs the PyTorch formulation. `TIMM_COORDATT_NATIVE=0` in the environment when the package
is imported, or `timm_coordatt.native.enabled = False` at any time, turns the kernels off.
"""
import os
from typing import Optional, Sequence, Tuple

import torch

try:
    from . import _native
except ImportError:  # built without a C compiler
    _native = None

__all__ = [
    'built', 'enabled', 'available', 'layout', 'InferenceWeights', 'coord_attention_inference', 'run_inference', 'gate_supported', 'gate', 'gate_backward',
    'strips_supported', 'strips', 'strips_backward',
]


built = _native is not None
# looked up once for the per-call path of inference: in a network's forward, each lookup in torch's
# module dict there is a cache miss
_float32, _channels_last, _get_num_threads = torch.float32, torch.channels_last, torch.get_num_threads
# read once: the check runs on every CoordAttention call, where an environment lookup costs more
# than the rest of the call's Python
enabled = os.environ.get('TIMM_COORDATT_NATIVE', '1') != '0'


def available() -> bool:
    """Whether the kernels were `built` and are not turned off (`enabled`)."""
    return built and enabled


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
    channels_last = layout(x)
    if channels_last is None or x.shape[1] != weights.channels:
        raise ValueError(f'coord_attention_inference expected a non-empty float32 CPU (N, {weights.channels}, H, W) x, '
                         f'contiguous or channels_last, got {x.dtype} on {x.device}, shape {tuple(x.shape)}, '
                         f'strides {x.stride()}')
    if out.dtype != x.dtype or out.device != x.device or out.shape != x.shape or out.stride() != x.stride():
        raise ValueError(f'coord_attention_inference expected out laid out as x {tuple(x.shape)} {x.stride()}, '
                         f'got {tuple(out.shape)} {out.stride()} {out.dtype}')
    return run_inference(x, out, weights, channels_last)


def run_inference(x: torch.Tensor, out: torch.Tensor, weights: InferenceWeights, channels_last: bool) -> torch.Tensor:
    """`coord_attention_inference` without its checks, for callers that made them (`layout(x)` is
    `channels_last`, `out` laid out as x): the per-call path of `CoordAttention`."""
    _native.forward(x.data_ptr(), out.data_ptr(), *x.shape, weights.rd_channels, *weights.addresses,
                    channels_last, _get_num_threads())
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
        x: torch.Tensor, a_h: torch.Tensor, a_w: torch.Tensor, grad: torch.Tensor, with_grad_x: bool = True,
) -> Tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """The gradients of `x * a_h * a_w` for `grad`, in one pass: for x (None without `with_grad_x`),
    a_h and a_w."""
    channels_last = _check_gate(x, a_h, a_w, grad=grad)
    grad_x = torch.empty_like(x) if with_grad_x else None
    grad_a_h, grad_a_w = torch.empty_like(a_h), torch.empty_like(a_w)
    _native.gate_backward(
        x.data_ptr(), a_h.data_ptr(), a_w.data_ptr(), grad.data_ptr(),
        0 if grad_x is None else grad_x.data_ptr(), grad_a_h.data_ptr(), grad_a_w.data_ptr(), *x.shape,
        channels_last, torch.get_num_threads())
    return grad_x, grad_a_h, grad_a_w


def layout(x: torch.Tensor) -> Optional[bool]:
    """channels_last (True) or contiguous (False) for a non-empty 4-D float32 CPU tensor, else None:
    the layouts the kernels take."""
    if x.dim() != 4 or x.dtype != _float32 or not x.is_cpu or x.numel() == 0:
        return None
    if x.is_contiguous():
        return False
    return True if x.is_contiguous(memory_format=_channels_last) else None


def strips_supported(x: torch.Tensor) -> bool:
    """Whether `strips` takes `x` (4-D float32 CPU, contiguous or channels_last)."""
    return available() and layout(x) is not None


def strips(x: torch.Tensor) -> torch.Tensor:
    """The mean over W and the mean over H side by side, (N, C, H + W), in one pass over `x`.

    For a channels_last `x`, a transposed view of an (N, H + W, C) tensor (C contiguous, as in x).
    """
    channels_last = layout(x)
    if channels_last is None:
        raise ValueError('native strips expected a float32 CPU (N, C, H, W) x, contiguous or channels_last, '
                         f'got {x.dtype} on {x.device}, shape {tuple(x.shape)}, strides {x.stride()}')
    n, c, h, w = x.shape
    out = x.new_empty((n, h + w, c) if channels_last else (n, c, h + w))
    _native.strips(x.data_ptr(), out.data_ptr(), n, c, h, w, channels_last, torch.get_num_threads())
    return out.transpose(1, 2) if channels_last else out


def strips_backward(
        grad_strips: torch.Tensor,
        shape: Sequence[int],
        channels_last: bool,
        gated: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
) -> torch.Tensor:
    """The gradient of `strips` for an input of `shape` and layout, for `grad_strips` (N, C, H + W).

    With `gated = (grad, a_h, a_w)` it adds the gradient of the gate product `x * a_h * a_w` for
    `grad`, `(grad * a_h) * a_w`, in the same pass: the input's whole gradient, written once.
    """
    n, c, h, w = shape
    if tuple(grad_strips.shape) != (n, c, h + w) or grad_strips.dtype != torch.float32 or not grad_strips.is_cpu:
        raise ValueError(f'native strips_backward expected a float32 CPU grad_strips of shape {(n, c, h + w)}, '
                         f'got {grad_strips.dtype} on {grad_strips.device}, shape {tuple(grad_strips.shape)}')
    channels_last = channels_last and c > 1 and h * w > 1  # else both layouts are one: contiguous, as `strips`
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    pointers = (0, 0, 0)
    if gated is None:
        grad_x = torch.empty(shape, memory_format=memory_format)
    else:
        grad, a_h, a_w = gated
        if tuple(grad.shape) != (n, c, h, w) or _check_gate(grad, a_h, a_w) != channels_last:
            raise ValueError(f'native strips_backward expected grad {(n, c, h, w)}, a_h and a_w in the layout of the '
                             f'input ({memory_format}), got {[(tuple(t.shape), t.stride()) for t in gated]}')
        grad_x = torch.empty_like(grad)
        pointers = (grad.data_ptr(), a_h.data_ptr(), a_w.data_ptr())
    # the kernel's layout: (N, C, L) rows, channels_last (N, L, C); a copy only if the gradient differs
    grad_strips = grad_strips.transpose(1, 2).contiguous() if channels_last else grad_strips.contiguous()
    _native.strips_backward(grad_strips.data_ptr(), *pointers, grad_x.data_ptr(), n, c, h, w, channels_last,
                            torch.get_num_threads())
    return grad_x
