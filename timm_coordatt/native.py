""" The C kernels of CoordAttention (timm_coordatt/csrc/coord_attention.c).

Built with the package when a C compiler is at hand (`pip install` compiles it; it is optional).
In eager execution on float32 CPU tensors, contiguous or channels_last, `CoordAttention` runs
- inference in one call (`coord_attention_inference`), when the block has the paper's hard-swish
  and sigmoid and a foldable norm;
- in training, the pooling of both strips (`strips`), the gate product `x * a_h * a_w` (`gate`) and
  their backward (`gate_backward`, `strips_backward`, the latter writing the input's whole gradient,
  both paths', in one pass): one pass each over the full-size tensors instead of several; and the
  small MLP on the strips, forward and backward (`strip_mlp_forward`, `strip_mlp_backward`), in place
  of a dozen small ops.
Everything else (other dtypes and devices, TorchScript, tracing, torch.compile, export, torch.func
transforms, dispatch modes, tensor subclasses, double backward) runs the PyTorch formulation.
`TIMM_COORDATT_NATIVE=0` (or `false`, `no`, `off`) in the environment when the package is imported, or
`timm_coordatt.native.enabled = False` at any time, turns the kernels off.
"""
import importlib.util
import os
import warnings
from typing import Callable, Optional, Sequence, Tuple

import torch

try:
    from . import _native
except ImportError as e:
    _native = None
    # no file at all: built without a C compiler (or a checkout not built), the PyTorch ops, quietly; a file
    # that does not load is a damaged build, or another architecture's. (`from . import` raises a plain
    # ImportError for a missing submodule, not ModuleNotFoundError.)
    if importlib.util.find_spec(f'{__package__}._native') is not None:
        warnings.warn(f'timm_coordatt: the C kernels do not load ({e}); CoordAttention runs PyTorch ops instead. '
                      f'Reinstall the package to rebuild them.', RuntimeWarning)

__all__ = [
    'built', 'enabled', 'available', 'layout', 'InferenceWeights', 'coord_attention_inference', 'run_inference',
    'gate_supported', 'gate', 'gate_backward',
    'strips_supported', 'strips', 'strips_backward', 'strip_mlp_forward', 'strip_mlp_backward',
]

_MAX_THREADS = 64  # CA_MAX_THREADS


built = _native is not None
# looked up once for the per-call path of inference: in a network's forward, each lookup in torch's
# module dict there is a cache miss
_float32, _channels_last, _get_num_threads = torch.float32, torch.channels_last, torch.get_num_threads
_increment_version = torch._C._increment_version  # torch.autograd.graph.increment_version's own call
# read once: the check runs on every CoordAttention call, where an environment lookup costs more
# than the rest of the call's Python
enabled = os.environ.get('TIMM_COORDATT_NATIVE', '1').strip().lower() not in ('0', 'false', 'no', 'off')


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
        # detached: memory of their own to hold while the kernel has its address, even where a tensor is a
        # parameter (a block's conv1 bias without a norm) whose `.data` is replaced later
        self.tensors = tuple(None if t is None else t.detach() for t in (w1, b1, w_gates_t, b_gates))
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
    # written outside PyTorch: a tensor autograd saved (the input, written in place) must read as changed, as
    # after `mul_`
    _increment_version((out,))
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
        over_grad: bool = False,
) -> torch.Tensor:
    """The gradient of `strips` for an input of `shape` and layout, for `grad_strips` (N, C, H + W).

    With `gated = (grad, a_h, a_w)` it adds the gradient of the gate product `x * a_h * a_w` for
    `grad`, `(grad * a_h) * a_w`, in the same pass: the input's whole gradient, written once, and with
    `over_grad` written over `grad` (which the caller must own) instead of into a new tensor.
    """
    n, c, h, w = shape
    if tuple(grad_strips.shape) != (n, c, h + w) or grad_strips.dtype != torch.float32 or not grad_strips.is_cpu:
        raise ValueError(f'native strips_backward expected a float32 CPU grad_strips of shape {(n, c, h + w)}, '
                         f'got {grad_strips.dtype} on {grad_strips.device}, shape {tuple(grad_strips.shape)}')
    channels_last = channels_last and c > 1 and h * w > 1  # else both layouts are one: contiguous, as `strips`
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    pointers = (0, 0, 0)
    if gated is None:
        if over_grad:
            raise ValueError('native strips_backward expected gated = (grad, a_h, a_w) to write over, got None')
        grad_x = torch.empty(shape, memory_format=memory_format)
    else:
        grad, a_h, a_w = gated
        if tuple(grad.shape) != (n, c, h, w) or _check_gate(grad, a_h, a_w) != channels_last:
            raise ValueError(f'native strips_backward expected grad {(n, c, h, w)}, a_h and a_w in the layout of the '
                             f'input ({memory_format}), got {[(tuple(t.shape), t.stride()) for t in gated]}')
        grad_x = grad if over_grad else torch.empty_like(grad)
        pointers = (grad.data_ptr(), a_h.data_ptr(), a_w.data_ptr())
    # the kernel's layout: (N, C, L) rows, channels_last (N, L, C); a copy only if the gradient differs
    grad_strips = grad_strips.transpose(1, 2).contiguous() if channels_last else grad_strips.contiguous()
    _native.strips_backward(grad_strips.data_ptr(), *pointers, grad_x.data_ptr(), n, c, h, w, channels_last,
                            torch.get_num_threads())
    return grad_x


def _partial_rows(n: int) -> int:
    """The threads the kernels split n samples over (ca_split): one row of weight-gradient sums each."""
    return max(1, min(torch.get_num_threads(), _MAX_THREADS, n))


def strip_mlp_forward(
        s: torch.Tensor, h: int, w1: torch.Tensor, b1: Optional[torch.Tensor],
        norm: Callable[[torch.Tensor], torch.Tensor],
        w_gates_t: torch.Tensor, b_gates: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The MLP on the (N, L, C) strips `s` (the first `h` of the L positions the H-strip's) in training:
    conv1 (`w1` (rd, C), `b1`), `norm` (torch's, on conv1's output), hard-swish, the gate convs with
    sigmoid (`w_gates_t` (rd, 2C) = [w_h^T | w_w^T], `b_gates` (2C)). Returns conv1's, the norm's and
    hard-swish's outputs (N, rd, L) and the gates a_h (N, H, C), a_w (N, W, C)."""
    n, length, c = s.shape
    rd = w1.shape[0]
    _check_mlp(s=s, w1=w1, b1=b1, w_gates_t=w_gates_t, b_gates=b_gates, shapes=(
        (n, length, c), (rd, c), (rd,), (rd, 2 * c), (2 * c,)))
    threads = torch.get_num_threads()
    y1 = s.new_empty((n, rd, length))
    _native.mlp_conv1(s.data_ptr(), y1.data_ptr(), w1.data_ptr(), _address(b1), n, c, h, length - h, rd, threads)
    z = norm(y1).contiguous()
    _check_mlp(z=z, shapes=((n, rd, length),))
    hh, a_h, a_w = torch.empty_like(y1), s.new_empty((n, h, c)), s.new_empty((n, length - h, c))
    _native.mlp_gates(z.data_ptr(), hh.data_ptr(), a_h.data_ptr(), a_w.data_ptr(), w_gates_t.data_ptr(),
                      _address(b_gates), n, c, h, length - h, rd, threads)
    return y1, z, hh, a_h, a_w


def strip_mlp_backward(
        grad_a_h: torch.Tensor, grad_a_w: torch.Tensor, a_h: torch.Tensor, a_w: torch.Tensor, z: torch.Tensor,
        hh: torch.Tensor, s: torch.Tensor, norm_backward: Callable[[torch.Tensor], torch.Tensor], w1: torch.Tensor,
        w_gates_t: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward of `strip_mlp_forward` for the gates' gradients `grad_a_h` (N, H, C) and `grad_a_w`
    (N, W, C), `norm_backward` taking the norm's output's gradient to conv1's output's. Returns the
    strips' gradient (N, L, C), w1's, b1's, the gate convs' weights' (rd, 2C) and biases' (2C)."""
    n, length, c = s.shape
    rd, h = w1.shape[0], a_h.shape[1]
    _check_mlp(grad_a_h=grad_a_h, grad_a_w=grad_a_w, a_h=a_h, a_w=a_w, z=z, hh=hh, shapes=(
        (n, h, c), (n, length - h, c)) * 2 + ((n, rd, length),) * 2)
    threads, rows = torch.get_num_threads(), _partial_rows(n)
    grad_p, grad_z = torch.empty_like(s), torch.empty_like(z)
    gates_sums = s.new_zeros((rows, rd * 2 * c + 2 * c))
    _native.mlp_gates_backward(grad_a_h.data_ptr(), grad_a_w.data_ptr(), a_h.data_ptr(), a_w.data_ptr(), z.data_ptr(),
                               hh.data_ptr(), w_gates_t.data_ptr(), grad_p.data_ptr(), grad_z.data_ptr(),
                               gates_sums.data_ptr(), n, c, h, length - h, rd, threads)
    grad_y1 = norm_backward(grad_z).contiguous()
    grad_s = grad_p  # read by now: its buffer takes the strips' gradient
    conv1_sums = s.new_zeros((rows, rd * c + rd))
    _native.mlp_conv1_backward(grad_y1.data_ptr(), s.data_ptr(), w1.data_ptr(), grad_s.data_ptr(),
                               conv1_sums.data_ptr(), n, c, h, length - h, rd, threads)
    grad_w_gates_t, grad_b_gates = gates_sums[0].split([rd * 2 * c, 2 * c])
    grad_w1, grad_b1 = conv1_sums[0].split([rd * c, rd])
    return grad_s, grad_w1.view(rd, c), grad_b1, grad_w_gates_t.view(rd, 2 * c), grad_b_gates


def _address(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _check_mlp(shapes: Sequence[Sequence[int]], **tensors: Optional[torch.Tensor]) -> None:
    for (name, t), shape in zip(tensors.items(), shapes):
        if t is not None and (t.dtype != _float32 or not t.is_cpu or tuple(t.shape) != tuple(shape)
                              or not t.is_contiguous()):
            raise ValueError(f'native strip MLP expected {name} a contiguous float32 CPU tensor of shape '
                             f'{tuple(shape)}, got {t.dtype} on {t.device}, shape {tuple(t.shape)}, '
                             f'strides {t.stride()}')
