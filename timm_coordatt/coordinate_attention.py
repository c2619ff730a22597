""" Coordinate Attention

Paper: `Coordinate Attention for Efficient Mobile Network Design` - https://arxiv.org/abs/2103.02907
(Hou, Zhou, Feng, CVPR 2021).

The block pools the input along each spatial axis, encodes both strips with one shared 1x1 conv
(+ BN + hard-swish), and turns them back into a height gate `a_h` and a width gate `a_w`:
`y = x * a_h * a_w`. Unlike timm's `CoordAttn` it defaults to the paper's widths
(`max(8, C // 32)`), biased convs and its own hard-swish, whatever the host block's activation.
"""
import functools
import itertools
import numbers
import operator
import sys
import weakref
from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils._python_dispatch import _disable_current_modes
from torchvision.ops.misc import FrozenBatchNorm2d

from timm.layers import LayerType, create_act_layer, get_norm_layer, register_notrace_function

from . import native
from .recompute import mark_recomputable, recompute_active

__all__ = ['CoordAttention', 'CoordAttentionFactory', 'coord_gate']

# The checks of every call, looked up once: in a network's forward each module dict and Python
# wrapper passed through per call is a cache miss or more (torch.compile knows these functions by
# identity, whatever their name here)
_is_compiling = torch.compiler.is_compiling
_is_tracing = torch._C._is_tracing  # torch.jit.is_tracing() without its wrapper
# any transform, not only x's: over the parameters alone (`grad` of a head's weights, a `vmap` ensemble with a
# shared input) x is a plain tensor and the weights are wrapped
_functorch_active = torch._C._are_functorch_transforms_active
_dispatch_modes = torch._C._len_torch_dispatch_stack
# a batched backward (`torch.autograd.grad(..., is_grads_batched=True)`, vectorized jacobians) hands the backward
# functions gradients of torch's older vmap, which have no memory of their own either
_is_legacy_batched = torch._C._functorch.is_legacy_batchedtensor
_Tensor = torch.Tensor
# forward-mode AD (`torch.autograd.forward_ad.dual_level()`) is on while its level is >= 0
_forward_ad = torch.autograd.forward_ad


@torch.jit.unused
def _is_functorch() -> bool:
    """Inside a torch.func transform (grad, vmap, ...): no data pointers, no custom autograd.Function."""
    return not _is_compiling() and _functorch_active()


def _autocast_on_cpu() -> bool:
    return torch.is_autocast_enabled('cpu')


def _is_channels_last(x: torch.Tensor) -> bool:
    if not torch.jit.is_scripting() and _is_functorch():
        return False  # vmap cannot answer for channels_last: the contiguous paths take any layout
    # an empty tensor is contiguous in every format: its strides say which it was made in
    return x.is_contiguous(memory_format=torch.channels_last) and (
        not x.is_contiguous() or x.numel() == 0 and x.stride(1) < x.stride(3))


def _is_eager(x: torch.Tensor) -> bool:
    """Plain eager execution: no compiler, exporter, tracer, torch.func transform or forward-mode AD watching
    (the C kernels and the custom autograd Functions, which have no jvp, would drop the tangents), no dispatch
    mode (`FlopCounterMode`, `FakeTensorMode`: the kernels' work is unseen by it, and a fake tensor's memory is
    not there) and x a plain tensor (a tensor subclass, such as a wrapper without memory of its own, an FX proxy)."""
    return not (_is_compiling() or _is_tracing() or type(x) is not _Tensor or _dispatch_modes()
                or _functorch_active() or _forward_ad._current_level >= 0)


def _references(t: torch.Tensor) -> Tuple[int, int, int]:
    """What holds `t`: references to its Python object (this call's included), to the tensor, and to
    its memory (a Python storage object's included)."""
    return sys.getrefcount(t), t._use_count(), torch._C._storage_Use_Count(t.untyped_storage()._cdata)


class _ReferencesProbe(torch.autograd.Function):
    """Records `_references` of the gradient a backward receives (`_owned_gradient_references`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, record: List[Tuple[int, int, int]]) -> torch.Tensor:
        ctx.record = record
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.record.append(_references(grad))
        return None, None


@functools.lru_cache(maxsize=None)
def _owned_gradient_references() -> Tuple[int, int, int]:
    """`_references` of a gradient that only autograd held, as a backward that calls it first receives
    it. More references are someone else's: a gradient autograd also hands another function (an add's
    two inputs get the same tensor), a user's `grad_outputs`, one a hook kept, a view sharing its memory."""
    record = []
    with torch.enable_grad():
        # mul's backward makes the probe's gradient, as the next layer's backward makes a block's
        _ReferencesProbe.apply(torch.zeros(2, requires_grad=True), record).mul(2).sum().backward()
    return record[0]


# which backward (graph task) runs: `_GateGradient`'s part is for the pooling's backward in the same one
_graph_task_id = torch._C._current_graph_task_id


def _batched(grad: torch.Tensor) -> bool:
    """Whether a backward function runs batched (torch.func, or a batched backward): PyTorch ops there."""
    return not _is_compiling() and (_functorch_active() or _is_legacy_batched(grad))


class _GateGradient:
    """The gate product's gradient for x, handed from `_CoordGate`'s backward to `_StripPool`'s.

    x feeds both the product and the pooling, so autograd would add two full-size gradients for it
    (and the pooling's is a full-size broadcast already). `_CoordGate` instead passes on what its
    part is made of, and `_StripPool`, whose backward autograd runs later (the gates depend on the
    strips), writes x's whole gradient in one pass: over the product's gradient where nothing else
    holds that, which saves a full-size allocation a block (and the page faults of its first writes).
    Only within one backward: one that stops short of the pooling (the gradients of CA's weights alone)
    leaves its part to no later one.
    """
    __slots__ = ('pending', 'owned_references')

    def __init__(self):
        # the product's gradient, a_h, a_w, whether autograd alone held that gradient, and the backward's id
        self.pending: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool, int]] = None
        self.owned_references = _owned_gradient_references()


class _StripPool(torch.autograd.Function):
    """`_pool_strips` for eager float32 CPU training, in the C kernels: one pass over x forward, and
    one pass writing x's whole gradient backward (with the gate product's, see `_GateGradient`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, gate_gradient: _GateGradient) -> torch.Tensor:
        ctx.shape, ctx.channels_last, ctx.gate_gradient = x.shape, _is_channels_last(x), gate_gradient
        return native.strips(x)

    @staticmethod
    def backward(ctx, grad_strips: torch.Tensor):
        pending, ctx.gate_gradient.pending = ctx.gate_gradient.pending, None
        if pending is not None and pending[4] != _graph_task_id():
            pending = None
        if pending is None and (torch.is_grad_enabled() or _batched(grad_strips)):
            # double backward (then `_CoordGate` kept its part), a batched one: differentiable ops
            h, w = ctx.shape[2], ctx.shape[3]
            grad_x = grad_strips[:, :, :h].unsqueeze(3) / w + grad_strips[:, :, h:].unsqueeze(2) / h
            return grad_x, None
        if pending is None:
            return native.strips_backward(grad_strips, ctx.shape, ctx.channels_last), None
        # in the layout of the product's gradient and saved gates, which saved-tensor hooks may have changed from
        # x's (`save_on_cpu(pin_memory=True)` unpacks contiguous copies)
        return native.strips_backward(grad_strips, ctx.shape, native.layout(pending[0]), pending[:3], pending[3]), None


class _CoordGate(torch.autograd.Function):
    """`x * a_h * a_w` that saves only `x` and the two small gates for backward.

    Autograd's own version also keeps the full-size `x * a_h`; recomputing the products from the
    gates instead saves one activation-sized tensor per block and the allocation it costs. With
    `use_native` (eager float32 CPU) the product and its backward run in the C kernels, one pass each;
    given a `_GateGradient`, the backward leaves x's gradient to `_StripPool`.
    """

    @staticmethod
    def forward(
            ctx,
            x: torch.Tensor,
            a_h: torch.Tensor,
            a_w: torch.Tensor,
            use_native: bool,
            gate_gradient: Optional[_GateGradient] = None,
    ) -> torch.Tensor:
        ctx.save_for_backward(x, a_h, a_w)
        ctx.use_native, ctx.gate_gradient = use_native, gate_gradient
        if use_native:
            return native.gate(x, a_h, a_w)
        return torch.mul(x, a_h).mul_(a_w)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        gate_gradient = ctx.gate_gradient
        batched = _batched(grad_out)
        # before anything else holds the gradient, as `_owned_gradient_references` measured it
        owned = gate_gradient is not None and not batched and _references(grad_out) == gate_gradient.owned_references
        x, a_h, a_w = ctx.saved_tensors
        if (ctx.use_native and not torch.is_grad_enabled() and not batched  # double backward needs differentiable ops
                and grad_out.dtype == x.dtype and grad_out.stride() == x.stride()):
            if gate_gradient is not None:
                _, grad_a_h, grad_a_w = native.gate_backward(x, a_h, a_w, grad_out, with_grad_x=False)
                gate_gradient.pending = (grad_out, a_h, a_w, owned, _graph_task_id())
                return None, grad_a_h, grad_a_w, None, None
            return (*native.gate_backward(x, a_h, a_w, grad_out), None, None)
        if gate_gradient is not None:
            # x's gradient is all here: none left from an earlier backward through the graph (retain_graph) for
            # `_StripPool` to add
            gate_gradient.pending = None
        gx = grad_a_h = grad_a_w = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            gx = x * grad_out  # in x's memory format
            if not batched and _is_channels_last(gx):
                # reductions of (N, H, W, C) views, C contiguous (matmul would copy them to NCHW),
                # both products in one temporary
                gx_nhwc = gx.permute(0, 2, 3, 1)
                tmp = None
                if ctx.needs_input_grad[1]:
                    tmp = gx_nhwc * a_w.permute(0, 2, 3, 1)
                    grad_a_h = tmp.sum(2, keepdim=True).permute(0, 3, 1, 2)
                if ctx.needs_input_grad[2]:
                    buffer = None if torch.is_grad_enabled() else tmp  # `out=` is not differentiable
                    grad_a_w = torch.mul(gx_nhwc, a_h.permute(0, 2, 3, 1), out=buffer).sum(1, keepdim=True)
                    grad_a_w = grad_a_w.permute(0, 3, 1, 2)
            else:
                # strip reductions as batched matmuls, no second full-size temporary
                if ctx.needs_input_grad[1]:
                    grad_a_h = torch.matmul(gx, a_w.transpose(-1, -2))
                if ctx.needs_input_grad[2]:
                    grad_a_w = torch.matmul(a_h.transpose(-1, -2), gx)
        grad_x = None
        if ctx.needs_input_grad[0]:
            # into the buffer of `grad_out * x` once reduced, one fresh full-size tensor rather than
            # two; not when building a graph for double backward, where `out=` is not differentiable, nor batched
            buffer = None if torch.is_grad_enabled() or batched else gx
            grad_x = torch.mul(grad_out, a_h, out=buffer).mul_(a_w)
        return grad_x, grad_a_h, grad_a_w, None, None


class _StripMLP(torch.autograd.Function):
    """`CoordAttention._gates_of_strips` for eager float32 CPU training with the paper's layers (batch
    norm, a frozen one, or none; hard-swish, sigmoid): the convs, activations and their backward in the C kernels
    (`native.strip_mlp_forward`, `strip_mlp_backward`), the norm in torch's batch norm ops, where
    autograd ran a dozen small ops a block forward and more backward (batched matmuls of a few
    thousand multiply-adds, copies, weight gradients per sample summed after). The gates come out in
    the strips' layout, as the product takes them. Double backward runs the PyTorch ops."""

    @staticmethod
    def forward(ctx, strips: torch.Tensor, h: int, bn: Optional[nn.Module], w1: torch.Tensor,
                b1: Optional[torch.Tensor], bn_weight: Optional[torch.Tensor], bn_bias: Optional[torch.Tensor],
                w_h: torch.Tensor, b_h: Optional[torch.Tensor], w_w: torch.Tensor, b_w: Optional[torch.Tensor]):
        n, c, length = strips.shape
        rd = w1.shape[0]
        s = strips.transpose(1, 2).contiguous()  # (N, L, C): channels_last strips already are
        w_gates_t = torch.cat([w_h.reshape(c, rd), w_w.reshape(c, rd)]).t().contiguous()
        b_gates = None if b_h is None else torch.cat([b_h, b_w])
        ctx.bn, ctx.training, ctx.running = bn is not None, False, (None, None)
        statistics = []

        def norm(y1: torch.Tensor) -> torch.Tensor:
            if bn is None:
                return y1
            if type(bn) is FrozenBatchNorm2d:  # its running statistics, never updated
                factor, ctx.training, ctx.running = 0.0, False, (bn.running_mean, bn.running_var)
            else:
                # nn.BatchNorm2d.forward's: running statistics updated in training (momentum None: a
                # cumulative average), used in eval mode where it has them
                factor = 0.0 if bn.momentum is None else bn.momentum
                if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
                    bn.num_batches_tracked.add_(1)
                    factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
                ctx.training = bn.training or (bn.running_mean is None and bn.running_var is None)
                with_running_stats = not bn.training or bn.track_running_stats
                ctx.running = (bn.running_mean, bn.running_var) if with_running_stats else (None, None)
            ctx.eps = bn.eps
            z, mean, invstd = torch.native_batch_norm(
                y1, bn_weight, bn_bias, *ctx.running, ctx.training, factor, bn.eps)
            statistics.extend((mean, invstd))
            return z

        y1, z, hh, a_h, a_w = native.strip_mlp_forward(s, h, w1.reshape(rd, c), b1, norm, w_gates_t, b_gates)
        a_h, a_w = a_h.transpose(1, 2).unsqueeze(3), a_w.transpose(1, 2).unsqueeze(2)
        if strips.stride(1) != 1:  # contiguous strips, of a contiguous x: its gates too, which the product keeps
            a_h, a_w = a_h.contiguous(), a_w.contiguous()
        # the strips (N, L, C) and the gates (N, H, C), (N, W, C) as backward takes them are copies or views
        # of these: nothing full of the strips' size saved twice
        ctx.save_for_backward(strips, w1, b1, bn_weight, bn_bias, w_h, b_h, w_w, b_w, y1, z, hh, a_h, a_w, w_gates_t,
                              *statistics)
        return a_h, a_w

    @staticmethod
    def backward(ctx, grad_a_h: torch.Tensor, grad_a_w: torch.Tensor):
        if torch.is_grad_enabled() or _batched(grad_a_h):  # double backward, a batched one: differentiable ops
            return _StripMLP._differentiable_backward(ctx, grad_a_h, grad_a_w)
        strips, w1, b1, bn_weight, bn_bias, w_h, b_h, w_w, b_w, y1, z, hh, a_h, a_w, w_gates_t, *statistics = \
            ctx.saved_tensors
        c, rd = strips.shape[1], w1.shape[0]

        def norm_backward(grad_z: torch.Tensor) -> torch.Tensor:
            if not ctx.bn:
                return grad_z
            ctx.grad_bn = torch.ops.aten.native_batch_norm_backward(
                grad_z, y1, bn_weight, *ctx.running, *statistics, ctx.training, ctx.eps,
                [True, ctx.needs_input_grad[5], ctx.needs_input_grad[6]])  # none for frozen norms' buffers
            return ctx.grad_bn[0]

        # (N, C, H, 1) tensors laid out channels_last are (N, H, C) already: no copies
        grad_s, grad_w1, grad_b1, grad_w_gates_t, grad_b_gates = native.strip_mlp_backward(
            *(g.flatten(2).transpose(1, 2).contiguous() for g in (grad_a_h, grad_a_w, a_h, a_w)), z, hh,
            strips.transpose(1, 2).contiguous(), norm_backward, w1.reshape(rd, c), w_gates_t)
        grad_bn_weight, grad_bn_bias = ctx.grad_bn[1:] if ctx.bn else (None, None)
        grad_b_h, grad_b_w = (None, None) if b_h is None else grad_b_gates.split([c, c])
        return (grad_s.transpose(1, 2), None, None, grad_w1.view(w1.shape), None if b1 is None else grad_b1,
                grad_bn_weight, grad_bn_bias, grad_w_gates_t[:, :c].t().reshape(w_h.shape), grad_b_h,
                grad_w_gates_t[:, c:].t().reshape(w_w.shape), grad_b_w)

    @staticmethod
    def _differentiable_backward(ctx, grad_a_h: torch.Tensor, grad_a_w: torch.Tensor):
        saved = ctx.saved_tensors  # once: activation checkpointing unpacks each saved tensor only once
        inputs = saved[:9]  # strips, w1, b1, bn_weight, bn_bias, w_h, b_h, w_w, b_w
        strips, w1, b1, bn_weight, bn_bias, w_h, b_h, w_w, b_w = inputs
        h = saved[12].shape[2]
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():  # the forward again, to differentiate (a batched backward runs without grad)
            y = _conv1x1(strips, w1.flatten(1), b1)
            if ctx.bn:  # batch statistics again (no running ones to update), or the running ones
                running = (None, None) if ctx.training else ctx.running
                y = F.batch_norm(y, *running, bn_weight, bn_bias, ctx.training, 0.0, ctx.eps)
            y = F.hardswish(y)
            a_h = torch.sigmoid(_conv1x1(y[:, :, :h], w_h.flatten(1), b_h)).unsqueeze(3)
            a_w = torch.sigmoid(_conv1x1(y[:, :, h:], w_w.flatten(1), b_w)).unsqueeze(2)
        positions = (0, 3, 4, 5, 6, 7, 8, 9, 10)  # of the inputs among forward's arguments
        wanted = [i for i, t in enumerate(inputs) if t is not None and ctx.needs_input_grad[positions[i]]]
        grads = torch.autograd.grad((a_h, a_w), [inputs[i] for i in wanted], (grad_a_h, grad_a_w),
                                    create_graph=create_graph, allow_unused=True)
        result: List[Optional[torch.Tensor]] = [None] * 11
        for i, g in zip(wanted, grads):
            result[positions[i]] = g
        return tuple(result)


def _gates_like(x: torch.Tensor, a_h: torch.Tensor, a_w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    # under autocast the gates come out in half precision while x may be float32: promoted as
    # `x * a_h * a_w` would promote them, so that the kernels and the backward's matmuls get one dtype
    dtype = torch.promote_types(x.dtype, a_h.dtype)
    a_h, a_w = a_h.to(dtype), a_w.to(dtype)
    if _is_channels_last(x):
        # gates with C contiguous, as in x: the broadcast products then run vectorised (2-3x faster)
        return a_h.contiguous(memory_format=torch.channels_last), a_w.contiguous(memory_format=torch.channels_last)
    return a_h.contiguous(), a_w.contiguous()


@register_notrace_function  # a leaf for FX: tracing cannot branch on requires_grad
def coord_gate(x: torch.Tensor, a_h: torch.Tensor, a_w: torch.Tensor, use_native_kernel: bool = True) -> torch.Tensor:
    """Apply the height gate `a_h` (N, C, H, 1) and width gate `a_w` (N, C, 1, W) to `x`.

    With autograd, eager float32 CPU products and their backward run in the C kernels
    (timm_coordatt/native.py) unless `use_native_kernel` is False.
    """
    if torch.jit.is_scripting():
        return x * a_h * a_w
    a_h, a_w = _gates_like(x, a_h, a_w)
    if torch.is_grad_enabled() and (x.requires_grad or a_h.requires_grad or a_w.requires_grad):
        if _compiling_for_inductor() and x.device.type == 'cpu':
            # what the compiled backward then saves is x and the gates, and it recomputes the output
            # for the next layer's backward; differentiating the plain product instead, inductor held
            # the outputs (MobileNetV2, batch 32: training memory +17% over the baseline's, against +3%)
            return _CoordGate.apply(x, a_h, a_w, False)
        if _is_eager(x):
            out = _CoordGate.apply(x, a_h, a_w, use_native_kernel and native.gate_supported(x, a_h, a_w))
            if recompute_active():
                mark_recomputable(out, x, a_h, a_w)
            return out
    if not _is_eager(x):
        # tracers, torch.func (no ctx in forward there) and other devices' compilers differentiate the plain
        # product (on CUDA, inductor's compiled backward of `_CoordGate` gave input gradients unlike eager's: an
        # H200, contiguous input); and trace it with or without autograd (`torch.jit.trace` checks its trace
        # by tracing again under no_grad)
        return x * a_h * a_w
    # nothing to differentiate: one output allocation, the second product in place
    return torch.mul(x, a_h).mul_(a_w)


torch.fx.wrap('coord_gate')


def _strips_nlc(x: torch.Tensor) -> torch.Tensor:
    """Both strips of a channels_last `x`, (N, H + W, C): reduced in its (N, H, W, C) view, where C
    is contiguous; reducing the NCHW view of such a tensor is 3-4x slower."""
    # a view per sum: one shared view would add their full-size (expanded) gradients out of place
    # before passing them on; separate ones are added in place into x's gradient
    return torch.cat([_mean_by_sum(x.permute(0, 2, 3, 1), 2), _mean_by_sum(x.permute(0, 2, 3, 1), 1)], dim=1)


def _mean_by_sum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x's mean over `dim` as a sum divided in place: its backward is a free expand, where mean's writes a
    full-size tensor. Half-precision sums accumulate in float32, as `mean` does: a row of 56 activations
    of 1200 overflows float16."""
    if x.dtype == torch.float16 or x.dtype == torch.bfloat16:
        return x.sum(dim, dtype=torch.float32).div_(x.shape[dim]).to(x.dtype)
    return x.sum(dim).div_(x.shape[dim])


@functools.lru_cache(maxsize=32)
def _pooling_matrix(h: int, w: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(H * W, H + W) weights: `x.view(N * C, H * W) @ P` gives `_pool_strips(x)` in one matmul."""
    with torch.inference_mode(False):  # cached: usable with autograd, whichever mode built it
        i = torch.arange(h * w, device=device)
        p = torch.zeros(h * w, h + w, dtype=dtype, device=device)
        p[i, i // w] = 1 / w
        p[i, h + i % w] = 1 / h
    return p


@register_notrace_function  # a leaf for FX: it branches on the memory format and the size
def _pool_strips(x: torch.Tensor, matmul_max_hw: int = 16) -> torch.Tensor:
    """The mean over W and the mean over H side by side, (N, C, H + W).

    Small maps (H + W <= `matmul_max_hw`) pool in one matmul with an averaging matrix: H + W
    multiply-adds an element, but no reductions over rows of a few elements (which vectorise
    poorly), no cat, no divides. Eager only: a traced or exported graph would keep the matrix of
    one size. Otherwise sums divided in place (`_mean_by_sum`).
    """
    if _is_channels_last(x):
        return _strips_nlc(x).transpose(1, 2)
    n, c, h, w = x.shape
    if not torch.jit.is_scripting():
        if _is_eager(x) and h + w <= matmul_max_hw:  # eager first: no guard on symbolic sizes
            pooling = _pooling_matrix(h, w, x.dtype, x.device)
            return torch.mm(x.reshape(n * c, h * w), pooling).view(n, c, h + w)
    return torch.cat([_mean_by_sum(x, 3), _mean_by_sum(x, 2)], dim=2)


torch.fx.wrap('_pool_strips')


@register_notrace_function  # a leaf for FX: it branches on the batch size
def _conv1x1(y: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """A 1x1 conv of (N, C, L) strips with a (C_out, C) weight.

    As one batched matmul: CPU conv1d takes a slow im2col path for most of these shapes (2-4x
    slower at batch 32, up to 20x for a stacked conv_h|conv_w). Except for a batch of samples with a
    large weight (960 <-> 30 channels in MobileNetV2), where the batched matmul is the slower one.
    """
    if y.shape[0] > 1 and weight.numel() > 2 ** 14:
        return F.conv1d(y, weight.unsqueeze(2), bias)
    weight = weight.expand(y.shape[0], -1, -1)
    if bias is None:
        return torch.bmm(weight, y)
    return torch.baddbmm(bias.unsqueeze(1), weight, y)


torch.fx.wrap('_conv1x1')


def _compiling_for_inductor() -> bool:
    """Under torch.compile, not torch.export (whose graphs keep the eager formulation)."""
    return torch.compiler.is_compiling() and not torch.compiler.is_exporting()


@register_notrace_function
def _check_input(x: torch.Tensor, channels: int) -> None:
    if x.dim() != 4 or x.shape[1] != channels or x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(
            'CoordAttention expected a 4-D (N, C, H, W) input with C={} and H, W >= 1, got shape {}'.format(
                channels, list(x.shape)))


torch.fx.wrap('_check_input')


class _FoldedParams(NamedTuple):
    """CoordAttention's inference weights: conv1 with bn1 folded in, conv_h and conv_w stacked."""
    w1: torch.Tensor  # (rd, C)
    b1: Optional[torch.Tensor]
    w_hw: torch.Tensor  # (2C, rd)
    b_hw: Optional[torch.Tensor]
    native: Optional[native.InferenceWeights]  # for the C kernel, where it is built and takes them


class _FoldRecord(NamedTuple):
    """`_FoldedParams` and what they were folded from: the optimizer steps taken before (`_optimizer_steps`),
    the block's layers, each source tensor's owner (a layer's `_parameters` or `_buffers`) and name there,
    the sources (None: no bias), the tensors among them, their versions and data pointers, and the norm (None:
    none) with its eps and whether its mode matters (a batch norm in training mode normalises by the batch's
    statistics: nothing to fold)."""
    optimizer_steps: int
    layers: Tuple[nn.Module, ...]
    owners: Tuple[dict, ...]
    names: Tuple[str, ...]
    sources: Tuple[Optional[torch.Tensor], ...]
    tensors: Tuple[torch.Tensor, ...]
    versions: Tuple[int, ...]
    data_ptrs: Tuple[int, ...]
    norm: Optional[nn.Module]
    eps: float
    batch_norm: bool
    params: Optional[_FoldedParams]


_tensor_version = operator.attrgetter('_version')
_data_ptr = torch.Tensor.data_ptr
_is_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
# every hook registered anywhere takes the next number of this counter: while it stands, no hook was added
_RemovableHandle = torch.utils.hooks.RemovableHandle
_has_any_global_hook = nn.modules.module._has_any_global_hook

# Fused optimizer steps (`torch.optim.AdamW(..., fused=True)`, and SGD's, Adam's) write the parameters
# without bumping their versions: every step of a `torch.optim.Optimizer` is counted, and a
# block's inference folds again after one.
_optimizer_steps = 0


def _count_optimizer_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


register_optimizer_step_post_hook(_count_optimizer_step)

# the batch norms inference folds (in eval mode the same map of the running statistics; SyncBatchNorm's
# training, which reduces across processes, runs as a layer)
_BATCH_NORMS = (nn.BatchNorm2d, nn.SyncBatchNorm)
# and with the frozen one (running statistics only), the norms whose statistics fold into conv1
_FOLDED_NORMS = (*_BATCH_NORMS, FrozenBatchNorm2d)


BatchNormStats = Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], float]


def _fold_weights(
        w1: torch.Tensor,
        b1: Optional[torch.Tensor],
        bn: Optional[BatchNormStats],
        w_h: torch.Tensor,
        b_h: Optional[torch.Tensor],
        w_w: torch.Tensor,
        b_w: Optional[torch.Tensor],
        native_activations: bool,
) -> _FoldedParams:
    """conv1 (weight `w1`, bias `b1`) with the eval-mode BN `bn` = (running mean, running var, weight,
    bias, eps) folded in (None: no norm), conv_h and conv_w stacked; the C kernel's weights too where
    it computes the block's activations (`native_activations`) in float32 on the CPU."""
    w1 = w1.flatten(1)
    if bn is not None:
        # in float32 at least, as batch norm itself computes half precision
        dtype = torch.promote_types(w1.dtype, torch.float32)
        mean, var, gamma, beta, eps = bn
        scale = torch.rsqrt(var.to(dtype) + eps)
        if gamma is not None:  # each of the affine pair may be None, as batch norm takes them
            scale = scale * gamma.to(dtype)
        shift = 0. if beta is None else beta.to(dtype)
        bias = 0. if b1 is None else b1.to(dtype)
        b1 = ((bias - mean.to(dtype)) * scale + shift).to(w1.dtype)
        w1 = (w1.to(dtype) * scale[:, None]).to(w1.dtype)
    else:
        # copies, as folding makes: the kernel reads its weights by address, and moving a parameter's storage
        # (`share_memory_()`, or sending it to another process) frees the memory without a version bump
        w1, b1 = w1.clone(), None if b1 is None else b1.clone()
    w_hw = torch.cat([w_h, w_w]).flatten(1)
    b_hw = None if b_h is None else torch.cat([b_h, b_w])
    w1 = w1.contiguous()
    weights = None
    if native_activations and all(t is None or (t.dtype == torch.float32 and t.is_cpu) for t in (w1, b1, w_hw, b_hw)):
        weights = native.InferenceWeights(w1, b1, w_hw.t().contiguous(), b_hw)
    return _FoldedParams(w1, b1, w_hw, b_hw, weights)


# Compiled graphs pass the op below a block's `_kernel_key`, a one-element tensor of its own holding a
# number no other block gets: one graph input a block, guarded like any tensor but not by value or
# identity, so one graph serves every instance. Given the block's ten parameters and statistics
# instead, their guards and dispatch cost a compiled MobileNetV2 6.5% of its baseline's batch-1
# latency. The op finds the block by the key's address, which it reads without a dispatch, and
# failing that by its number: inductor's freezing passes a copy of the key.
_blocks_by_key_address: 'weakref.WeakValueDictionary[int, CoordAttention]' = weakref.WeakValueDictionary()
_blocks_by_key: 'weakref.WeakValueDictionary[int, CoordAttention]' = weakref.WeakValueDictionary()
_next_key = itertools.count()


def _coord_attention_block_inference_(x: torch.Tensor, key: torch.Tensor) -> None:
    """The inference kernel of the block whose `_kernel_key` is `key`, in place on `x` (float32 CPU,
    channels_last or contiguous), with the block's weights folded as in eager inference."""
    module = _blocks_by_key_address.get(key.data_ptr())
    if module is None and key.numel() == 1:
        module = _blocks_by_key.get(int(key))
    if module is None:
        raise RuntimeError(f'timm_coordatt::coord_attention_block_inference_ expected the key of a live '
                           f'CoordAttention, got {key}')
    params = module._folded_params()
    weights = None if params is None else params.native
    if params is None and not module._plain_layers():
        # pruned, or a weight norm applied, since compiling (dynamo does not guard hooks): the block as eager
        # inference runs it, calling its layers
        out = module._forward_inference(x)
        if out is not x:
            x.copy_(out)
        return
    if weights is None or not native.built:
        w1 = module.conv1.weight
        raise RuntimeError(
            'timm_coordatt::coord_attention_block_inference_ expected a block with float32 CPU parameters, a '
            f'foldable norm, the paper\'s activations and the built C kernels, got {w1.dtype} on {w1.device}, '
            f'{type(module.bn1).__name__}, {type(module.act).__name__}, {type(module.gate).__name__} '
            f'(kernels built: {native.built})')
    channels_last = native.layout(x)
    if channels_last is None or x.shape[1] != weights.channels:
        raise ValueError(f'timm_coordatt::coord_attention_block_inference_ expected a float32 CPU '
                         f'(N, {weights.channels}, H, W) x, contiguous or channels_last, got {x.dtype} on '
                         f'{x.device}, shape {tuple(x.shape)}, strides {x.stride()}')
    native.run_inference(x, x, weights, channels_last)


# torch.compile calls the inference kernel as one opaque op rather than compiling the PyTorch
# formulation (torch.export and exporters, which must be self-contained, never see it). Defined with
# `torch.library.Library`: its dispatch adds 3 us a call where `torch.library.custom_op`'s autograd
# and view handling, needless here, add 8 (9 against 15 us at 1x32x7x7, the function alone 6).
_library = torch.library.Library('timm_coordatt', 'DEF')
_library.define('coord_attention_block_inference_(Tensor(a!) x, Tensor key) -> ()')
_library.impl('coord_attention_block_inference_', _coord_attention_block_inference_, 'CPU')
torch.library.register_fake('timm_coordatt::coord_attention_block_inference_', lambda *args: None, lib=_library)


def _positive_int(name: str, value) -> int:
    """`value` as an int (numpy's integers too), or a ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f'CoordAttention expected {name} to be a positive int, got {value!r}')
    return int(value)


class CoordAttention(nn.Module):
    """Coordinate Attention block of Hou et al., defaults as in the paper.

    Args:
        channels: Input (= output) channels.
        reduction: Reduction ratio r of the shared 1x1 conv, `rd_channels = max(min_channels, channels // r)`.
        rd_channels: Explicit reduced width, overrides `reduction` and `min_channels`.
        min_channels: Lower bound of the reduced width.
        bias: Bias on the three 1x1 convs (the paper uses biased convs).
        act_layer: Activation after the shared conv (hard-swish in the paper), None for none.
        norm_layer: Norm after the shared conv (BatchNorm in the paper), None for none.
        gate_layer: Gate activation of both directions (sigmoid in the paper), None for none.
        inplace: In inference (eval mode, no autograd), write the output into the input tensor. Only
            for hosts that do not read the input again; training always allocates a new output.
    """

    # Below this many gate values (N * C * (H + W)), inference runs conv_h and conv_w as one conv
    # over both strips: at batch 1 an op costs more than the wasted half of the multiply-adds.
    stacked_gates_max = 2 ** 16
    # Inputs up to this many elements (about L2-sized in float32) take the inference paths for small
    # tensors, where the cost of an op outweighs the cost of touching an element.
    small_input_max = 2 ** 17
    # Eager float32 CPU inference, and the gate product of training with its backward, run in the C
    # kernels (timm_coordatt/native.py) where they are built; False (on an instance or the class)
    # runs PyTorch ops throughout.
    use_native_kernel = True
    # Contiguous inputs train the MLP on the strips in the C kernels (channels_last ones always) where
    # H + W is at most this: their strips and gates are transposed to and from the kernels' (H + W, C)
    # rows, which on larger maps costs more than the kernels save (0.73-0.92x at 28x28 and 56x56).
    native_mlp_contiguous_max_hw = 28

    def __init__(
            self,
            channels: int,
            reduction: int = 32,
            rd_channels: Optional[int] = None,
            min_channels: int = 8,
            bias: bool = True,
            act_layer: Optional[LayerType] = nn.Hardswish,
            norm_layer: Optional[LayerType] = nn.BatchNorm2d,
            gate_layer: Optional[LayerType] = nn.Sigmoid,
            inplace: bool = False,
            device=None,
            dtype=None,
    ):
        super().__init__()
        channels = _positive_int('channels', channels)
        if rd_channels is None:
            reduction, min_channels = _positive_int('reduction', reduction), _positive_int('min_channels', min_channels)
            rd_channels = max(min_channels, channels // reduction)
        else:
            rd_channels = _positive_int('rd_channels', rd_channels)
        if isinstance(norm_layer, str):
            norm_layer = get_norm_layer(norm_layer)
        dd = {'device': device, 'dtype': dtype}
        self.channels = channels
        self.conv1 = nn.Conv2d(channels, rd_channels, 1, bias=bias, **dd)
        # device and dtype only where given: a frozen batch norm (torchvision's, as timm freezes) takes neither
        self.bn1 = norm_layer(rd_channels, **{k: v for k, v in dd.items() if v is not None}) \
            if norm_layer is not None else nn.Identity()
        self.act = create_act_layer(act_layer) if act_layer is not None else nn.Identity()
        self.conv_h = nn.Conv2d(rd_channels, channels, 1, bias=bias, **dd)
        self.conv_w = nn.Conv2d(rd_channels, channels, 1, bias=bias, **dd)
        self.gate = create_act_layer(gate_layer) if gate_layer is not None else nn.Identity()
        self.inplace = inplace
        self._inference_params: Optional[_FoldRecord] = None
        self._hooks_checked = -1  # the hook counter when the layers were last found without hooks
        self._register()

    def _register(self) -> None:
        """Registers the block for compiled graphs' kernel op, with a key of its own."""
        number = next(_next_key)
        # a plain CPU tensor also where the block is built (or copied) inside a torch.func transform or a
        # dispatch mode (FakeTensorMode): the op finds the block by its memory
        with torch._C._DisableFuncTorch(), _disable_current_modes():
            self._kernel_key = torch.tensor([number], device='cpu')
        _blocks_by_key[number] = self
        _blocks_by_key_address[self._kernel_key.data_ptr()] = self

    def __getstate__(self):
        # a copy folds its own weights; and this block folds again: pickled for another process
        # (torch.multiprocessing), its tensors move to shared memory, which `_fold_record` keeps no fold of
        self._inference_params = None
        state = self.__dict__.copy()
        # a copy registers a key of its own; pickled, this one's would move to shared memory (the op finds
        # blocks by their keys' addresses)
        del state['_kernel_key']
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault('_hooks_checked', -1)  # pickled by a version without it
        self._register()  # a copy (`copy.deepcopy`, pickle) is a block of its own, not the original's

    def gates(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The height gate `a_h` (N, C, H, 1) and the width gate `a_w` (N, C, 1, W) for `x`."""
        _check_input(x, self.channels)
        h, w = x.shape[-2:]
        if not torch.jit.is_scripting():
            if not _is_eager(x):
                # graphs (compiled, exported, traced) get means and the block's own 1x1 convs: quantizers (FX,
                # PT2E, ONNX Runtime) quantize the convs and fuse conv1 with bn1, exporters write them as convs,
                # and inductor compiles them well, where the eager formulation's strided sums and batched
                # matmuls compile to slow kernels (MobileNetV2's compiled training step at 1.23-1.32x its
                # baseline's, against 1.05-1.06x this way); the strips as the authors lay them out, (N, C,
                # H + W, 1) from the start: made from (N, C, H + W) strips, inductor failed to compile the
                # backward with dynamic H and W (a size guard it could not decide)
                # not for FX's symbolic trace (feature extractors, FX quantization), whose graphs of both modes
                # then have the same nodes: torchvision's `create_feature_extractor` warns where they differ
                if self._foldable_norm() and not _compiling_for_inductor() and not isinstance(x, torch.fx.Proxy):
                    return self._gates_by_layers_apart(x)
                return self._gates_by_layers(
                    torch.cat([x.mean(3, keepdim=True), x.mean(2, keepdim=True).transpose(2, 3)], dim=2), h, w)
        return self._gates_of_strips(_pool_strips(x), h, w)

    @torch.jit.unused
    def _gates_by_layers_apart(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The gates with each strip through the layers on its own, for exported and traced graphs where the norm
        works per channel (eval mode): no concatenation, transposes or split of the strips, whose sizes converters
        freeze (ncnn: a net converted at one size was wrong at others) or cannot take at run time (CoreML with
        flexible H and W). Exported at a fixed size, the pooling is `avg_pool2d`, which ExecuTorch's XNNPACK
        delegate runs (a mean over one axis left each block on portable kernels between XNNPACK parts: MobileNetV2
        + CA at 2.2x its baseline's latency, 1.2x so; benchmarks/executorch_xnnpack.py)."""
        h, w = x.shape[-2:]
        if torch.compiler.is_exporting() and isinstance(h, int) and isinstance(w, int):
            s_h, s_w = F.avg_pool2d(x, (1, w)), F.avg_pool2d(x, (h, 1))
        else:
            s_h, s_w = x.mean(3, keepdim=True), x.mean(2, keepdim=True)
        a_h = self.gate(self.conv_h(self.act(self.bn1(self.conv1(s_h)))))
        a_w = self.gate(self.conv_w(self.act(self.bn1(self.conv1(s_w)))))
        return a_h, a_w

    def _gates_of_strips(self, y: torch.Tensor, h: int, w: int) -> Tuple[torch.Tensor, torch.Tensor]:
        if not torch.jit.is_scripting():
            if not self._plain_layers():
                return self._gates_by_layers(y.unsqueeze(3), h, w)
        # The 1x1 convs as matmuls on the strips (same weights, flattened), with no transposes: the
        # norm sees the usual contiguous (N, C, L, 1) layout and so does its gradient. That matters:
        # CPU batch norm's backward is wrong when input and gradient differ in memory format, and
        # transposed strips add size-1 guards that break `torch.export` with dynamic H and W.
        y = _conv1x1(y, self.conv1.weight.flatten(1), self.conv1.bias)
        y = self.act(self.bn1(y.unsqueeze(3))).squeeze(3)
        y_h, y_w = torch.split(y, [h, w], dim=2)
        a_h = self.gate(_conv1x1(y_h, self.conv_h.weight.flatten(1), self.conv_h.bias))
        a_w = self.gate(_conv1x1(y_w, self.conv_w.weight.flatten(1), self.conv_w.bias))
        return a_h.unsqueeze(3), a_w.unsqueeze(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if not self.training and not torch.is_grad_enabled() and _is_eager(x):
                return self._forward_inference(x)
            if self._compiled_kernel_applies(x):
                # channels_last: the layout inductor gives the convs around the block (copies otherwise)
                x = x.contiguous(memory_format=torch.channels_last) if self.inplace else torch.clone(
                    x, memory_format=torch.channels_last)
                torch.ops.timm_coordatt.coord_attention_block_inference_.default(x, self._kernel_key)
                return x
            if self._native_training(x):
                return self._forward_training(x)
        a_h, a_w = self.gates(x)
        if torch.jit.is_scripting():
            return coord_gate(x, a_h, a_w)
        return coord_gate(x, a_h, a_w, self.use_native_kernel)

    def _native_training(self, x: torch.Tensor) -> bool:
        """Whether the pooling and the product run in the C kernels: autograd for x, eager float32 CPU."""
        return (self.use_native_kernel and torch.is_grad_enabled() and _is_eager(x)  # eager first: FX proxies
                and x.requires_grad and native.strips_supported(x))

    def _native_mlp(self, x: torch.Tensor) -> bool:
        """Whether training runs the MLP on the strips in the C kernels: the paper's activations, batch norm
        (or a frozen one) or none, float32 CPU weights, no CPU autocast (which would run the convs in
        bfloat16), and x channels_last or its H + W small."""
        bn = self.bn1
        return ((_is_channels_last(x) or x.shape[2] + x.shape[3] <= self.native_mlp_contiguous_max_hw)
                and self._native_activations() and type(bn) in (nn.BatchNorm2d, FrozenBatchNorm2d, nn.Identity)
                and self._plain_layers()
                and self.conv1.weight.dtype == torch.float32 and self.conv1.weight.is_cpu
                and not _autocast_on_cpu())

    @torch.jit.unused
    def _compiled_kernel_applies(self, x: torch.Tensor) -> bool:
        """Inference under torch.compile (not export) that the C kernel computes: the compiled graph calls it.
        The parameters are not read here (each read would be a graph input and its guard): their dtype and
        device are the input's, or the convs would fail, and the op checks them."""
        return (not self.training and not torch.is_grad_enabled()
                and _compiling_for_inductor()
                and self.use_native_kernel and native.available()
                and self._foldable_norm() and self._native_activations() and self._plain_layer_types()
                and x.dim() == 4 and x.shape[1] == self.channels and x.dtype == torch.float32
                and x.device.type == 'cpu')

    @torch.jit.unused
    def _gates_by_layers(self, y: torch.Tensor, h: int, w: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """The gates of the strips `y` (N, C, H + W, 1) by calling the block's layers, their hooks,
        parametrizations and subclasses' forwards included."""
        # contiguous: CPU batch norm's backward is wrong where its input and gradient differ in memory format
        y = self.act(self.bn1(self.conv1(y.contiguous())))
        y_h, y_w = torch.split(y, [h, w], dim=2)
        z_h, z_w = self.conv_h(y_h), self.conv_w(y_w)
        if _is_compiling():
            # compiled training saves the gates apart from a tensor they would be views of (+1 gates' memory)
            return self.gate(z_h), self.gate(z_w).transpose(2, 3)
        # the gate called once, on both: attribution methods that keep a layer's input and output per call
        # (captum's DeepLift) refuse a layer called twice
        a_h, a_w = torch.split(self.gate(torch.cat([z_h, z_w], dim=2)), [h, w], dim=2)
        return a_h, a_w.transpose(2, 3)

    @torch.jit.unused
    def _plain_layers(self) -> bool:
        """Whether the fast paths, which read the layers' weights rather than call the layers, compute
        what the layers would: plain `nn.Conv2d`s (no quantization-aware subclass) whose weights and
        biases are registered parameters, and a batch norm (or frozen one) whose weight and bias are
        registered too. Pruning (`torch.nn.utils.prune`), weight norm and parametrizations compute a
        weight when the layer is called (pre-hook or property) and unregister the parameter. And no hooks
        on the layers: MAC counters (thop, ptflops, torchinfo) count what their hooks see called."""
        if self._hooked_layers():
            return False
        for conv in (self.conv1, self.conv_h, self.conv_w):
            if type(conv) is not nn.Conv2d or 'weight' not in conv._parameters or 'bias' not in conv._parameters:
                return False
        bn = self.bn1
        owner = bn._parameters if type(bn) in _BATCH_NORMS else bn._buffers if type(bn) is FrozenBatchNorm2d else None
        return owner is None or ('weight' in owner and 'bias' in owner)

    @torch.jit.unused
    def _hooked_layers(self) -> bool:
        """Whether hooks, the block's layers' own or global ones, watch its layers: forward hooks and pre-hooks,
        backward hooks (a full backward hook fires only for a layer called)."""
        return bool(_has_any_global_hook()) or any(
            m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
            for m in self._modules.values())

    @torch.jit.unused
    def _unhooked(self, cached: _FoldRecord) -> bool:
        """No hooks on the layers and the folded tensors' memory where it was; noted with the hook counter, so
        that the check of the folded weights reads only the counter until a hook is added anywhere. Tools that
        work through hooks write through `.data`, unseen by the versions: `torch.nn.utils.prune.remove` puts
        the pruned weight into the parameter so, and with no call between pruning and it the block never saw
        the pruning hook."""
        if self._hooked_layers() or tuple(map(_data_ptr, cached.tensors)) != cached.data_ptrs:
            return False
        object.__setattr__(self, '_hooks_checked', _RemovableHandle.next_id)  # not through Module.__setattr__
        return True

    @torch.jit.unused
    def _plain_layer_types(self) -> bool:
        """`_plain_layers` as compiled graphs check it: plain `nn.Conv2d`s (parametrizations and
        quantization-aware convs are subclasses; dynamo guards the types) and no forward pre-hooks on the
        layers (pruning, weight norm and spectral norm compute the weight in one; dynamo does not guard
        hooks, so the kernel op checks the layers again). Reading the layers' parameter dicts here would
        guard every tensor in them: 8 tensor guards a block, 4 points of a compiled MobileNetV2's batch-1
        latency."""
        return (all(type(conv) is nn.Conv2d and not conv._forward_pre_hooks
                    for conv in (self.conv1, self.conv_h, self.conv_w))
                and not self.bn1._forward_pre_hooks)

    @torch.jit.unused
    def _forward_training(self, x: torch.Tensor) -> torch.Tensor:
        """`forward` with autograd, the pooling and the product in the C kernels, and x's gradient
        written in one pass (`_GateGradient`)."""
        _check_input(x, self.channels)
        gate_gradient = _GateGradient()
        strips = _StripPool.apply(x, gate_gradient)
        if self._native_mlp(x):
            bn = None if isinstance(self.bn1, nn.Identity) else self.bn1
            a_h, a_w = _StripMLP.apply(
                strips, x.shape[2], bn, self.conv1.weight, self.conv1.bias, None if bn is None else bn.weight,
                None if bn is None else bn.bias, self.conv_h.weight, self.conv_h.bias, self.conv_w.weight,
                self.conv_w.bias)
        else:
            a_h, a_w = self._gates_of_strips(strips, x.shape[2], x.shape[3])
        a_h, a_w = _gates_like(x, a_h, a_w)
        out = _CoordGate.apply(x, a_h, a_w, True, gate_gradient)
        if recompute_active():
            mark_recomputable(out, x, a_h, a_w)
        return out

    @torch.jit.unused
    def _forward_inference(self, x: torch.Tensor) -> torch.Tensor:
        """`forward` in eager inference: the C kernel where it computes the block, else BN folded into
        conv1 and fewer ops; optionally in place."""
        # the C kernel's checks, kept to a few on this per-call path: `params.native` exists only for
        # the paper's activations and float32 CPU weights
        params = self._folded_params()
        weights = params.native if params is not None and self.use_native_kernel and native.enabled else None
        channels_last = None if weights is None else native.layout(x)
        if channels_last is not None and x.shape[1] == self.channels:
            return native.run_inference(x, x if self.inplace else torch.empty_like(x), weights, channels_last)
        _check_input(x, self.channels)
        channels_last, small = _is_channels_last(x), x.numel() <= self.small_input_max
        if params is None:
            a_h, a_w = self.gates(x)
        else:
            w1, b1, w_hw, b_hw = params.w1, params.b1, params.w_hw, params.b_hw
            n, c, h, w = x.shape
            if channels_last:
                # strips as (N, L, C) rows, like x: one matmul each, gates with C contiguous as in x
                y = self.act(F.linear(_strips_nlc(x), w1, b1))
                a = self.gate(F.linear(y, w_hw, b_hw))
                a_h, a_w = a[:, :h, :c].transpose(1, 2), a[:, h:, c:].transpose(1, 2)
            else:
                # pooling by matmul is also the faster at H + W = 28 for small inputs (fewer ops)
                s = _pool_strips(x, 28 if small else 16)
                y = self.act(_conv1x1(s, w1, b1))
                if n * c * (h + w) <= self.stacked_gates_max:
                    a = self.gate(_conv1x1(y, w_hw, b_hw))
                    a_h, a_w = a[:, :c, :h], a[:, c:, h:]
                else:
                    b_h, b_w = (None, None) if b_hw is None else (b_hw[:c], b_hw[c:])
                    a_h = self.gate(_conv1x1(y[:, :, :h], w_hw[:c], b_h))
                    a_w = self.gate(_conv1x1(y[:, :, h:], w_hw[c:], b_w))
            a_h, a_w = a_h.unsqueeze(3), a_w.unsqueeze(2)
        if small and not channels_last:
            # the full gate, then a plain product: at this size cheaper than a second product
            # broadcasting over rows of W elements (channels_last rows are C long, no such cost)
            gate = a_h * a_w
            if self.inplace:
                return x.mul_(gate)
            # into the gate unless x's dtype is wider (autocast's half-precision gates): x * gate promotes
            return gate.mul_(x) if gate.dtype == x.dtype else x * gate
        return torch.mul(x, a_h, out=x if self.inplace else None).mul_(a_w)

    def _folded_params(self) -> Optional[_FoldedParams]:
        """conv1 with bn1 folded in and conv_h, conv_w stacked; None for a norm that cannot be folded
        or layers whose weights are not plain parameters (`_plain_layers`).

        Cached while the layers and the source tensors stay the same objects at the same versions, the
        norm keeps its eps and eval mode and no optimizer steps, so in-place updates (optimizer steps, fused
        ones too, BN statistics, EMA) and replaced or unregistered parameters or layers fold again; so do
        moving the module (`_apply`) and loading a state dict. Writes through `.data` (`p.data = t` as
        `vector_to_parameters` makes, `p.data.mul_(2)`), which PyTorch leaves out of the version counters, are
        not seen (reading the data pointers on every call cost 0.5-1.5 points of channels_last batch 1; they are
        read after a hook was registered anywhere, as pruning does: `_unhooked`), nor are tensors
        swapped by `torch.utils.swap_tensors` at equal versions, nor in-place writes to inference tensors (parameters
        created under `torch.inference_mode()`, which can change only in place inside it, and have no
        versions): those are checked by identity.
        """
        cached = self._inference_params
        if cached is not None:
            # C loops (map) over the layers and tensors: in a network's forward they are out of the
            # caches, and every step of a Python loop over them adds misses (docs/benchmark-results.md)
            norm = cached.norm
            try:
                current = (cached.optimizer_steps == _optimizer_steps
                           and (self._hooks_checked == _RemovableHandle.next_id or self._unhooked(cached))
                           and tuple(self._modules.values()) == cached.layers
                           and all(map(operator.is_, map(operator.getitem, cached.owners, cached.names),
                                       cached.sources))
                           and tuple(map(_tensor_version, cached.tensors)) == cached.versions
                           and (norm is None or (norm.eps == cached.eps and not (cached.batch_norm and norm.training))))
            except KeyError:  # a parameter unregistered since (pruning, a parametrization)
                current = False
            if current:
                return cached.params
        # none kept while the layers cannot be folded: a norm back from training mode refolds, whether or
        # not its statistics have versions
        self._inference_params = None
        if not self._foldable_norm() or not self._plain_layers():
            return None
        # what is folded, read first: a write while folding (another thread's EMA update) refolds next call
        record = self._fold_record()
        params = self._fold(self.bn1)
        self._inference_params = None if record is None else record._replace(params=params)
        return params

    def _fold_record(self) -> Optional[_FoldRecord]:
        """What the folded weights are folded from, read from the layers' own dicts (`params` left to fill
        in); None where a statistic is not registered."""
        optimizer_steps = _optimizer_steps
        modules = self._modules
        owners = [(modules[name]._parameters, key)
                  for name in ('conv1', 'conv_h', 'conv_w') for key in ('weight', 'bias')]
        bn = modules['bn1']
        norm = bn if type(bn) in _FOLDED_NORMS else None
        if type(bn) in _BATCH_NORMS:
            # batch norm updates its running statistics without a version bump, but counts the update in
            # num_batches_tracked with one (the strip MLP's kernels too): BN-only passes (recalibration,
            # a training-mode forward of a frozen backbone) refold
            owners += [(bn._parameters, 'weight'), (bn._parameters, 'bias'), (bn._buffers, 'running_mean'),
                       (bn._buffers, 'running_var'), (bn._buffers, 'num_batches_tracked')]
        elif type(bn) is FrozenBatchNorm2d:
            owners += [(bn._buffers, name) for name in ('weight', 'bias', 'running_mean', 'running_var')]
        try:
            sources = tuple(owner[name] for owner, name in owners)
            tensors = tuple(t for t in sources if t is not None and not t.is_inference())
            versions = tuple(map(_tensor_version, tensors))
        except KeyError:
            return None
        if any(map(_is_functorch_wrapped, tensors)):  # made inside a torch.func transform: no memory to point at
            return None
        # in shared memory (`model.share_memory()`, tensors received from another process) other processes
        # write unseen by this one's versions (Hogwild training, a spawned worker's model): folded every call
        if any(t.is_cpu and t.untyped_storage().is_shared() for t in tensors):
            return None
        data_ptrs = tuple(map(_data_ptr, tensors))
        return _FoldRecord(optimizer_steps, tuple(modules.values()), tuple(o for o, _ in owners),
                           tuple(n for _, n in owners), sources, tensors, versions, data_ptrs, norm,
                           0.0 if norm is None else norm.eps, type(bn) in _BATCH_NORMS, None)

    def _fold(self, bn: nn.Module) -> _FoldedParams:
        stats = (bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps) if type(bn) in _FOLDED_NORMS else None
        return _fold_weights(self.conv1.weight, self.conv1.bias, stats, self.conv_h.weight, self.conv_h.bias,
                             self.conv_w.weight, self.conv_w.bias, self._native_activations())

    def _foldable_norm(self) -> bool:
        """No norm, batch norm (or SyncBatchNorm) in eval mode with running statistics, or a frozen one (as
        `timm.layers.freeze_batch_norm_2d` leaves detection and segmentation backbones). A batch norm in
        training mode in an eval-mode block (BN recalibration, test-time adaptation) normalises by the
        batch and updates its statistics: the block calls it."""
        bn = self.bn1
        return (isinstance(bn, nn.Identity) or type(bn) is FrozenBatchNorm2d
                or (type(bn) in _BATCH_NORMS and not bn.training
                    # without the statistics batch norm normalises by the batch's in eval mode too
                    and bn.running_mean is not None and bn.running_var is not None))

    def _native_activations(self) -> bool:
        """The C kernel is built and computes this block's activations (the paper's)."""
        return native.built and type(self.act) is nn.Hardswish and type(self.gate) is nn.Sigmoid

    def _apply(self, fn, recurse=True):
        self._inference_params = None
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._inference_params = None
        super()._load_from_state_dict(*args, **kwargs)


class CoordAttentionFactory:
    """Creates `CoordAttention` inside host blocks (what `get_attn('ca')` returns).

    Host blocks pass their own `act_layer` (timm's EfficientNet blocks pass swish or ReLU6); the
    paper keeps hard-swish inside the block whatever the host uses, so the host's activation is
    ignored. So is the squeeze-and-excitation width the host is configured with, `rd_ratio` and
    `rd_divisor` (NFNet's and RegNetZ's `attn_kwargs`, EfficientNet's `se_ratio`): the block keeps the
    paper's reduction. Keyword arguments given here win over those the host passes, e.g.
    `se_layer=CoordAttentionFactory(reduction=16, act_layer='relu')`. Pass the `CoordAttention`
    class itself to let the host choose the activation (not in hosts that pass `rd_ratio`: NFNet, RegNetZ).
    """

    def __init__(self, **kwargs):
        self.kwargs = kwargs

    def __call__(
            self,
            channels: int,
            act_layer: Optional[LayerType] = None,
            rd_ratio: Optional[float] = None,
            rd_divisor: Optional[int] = None,
            **host_kwargs,
    ) -> CoordAttention:
        return CoordAttention(channels, **{**host_kwargs, **self.kwargs})

    def __repr__(self) -> str:
        args = ', '.join(f'{k}={v!r}' for k, v in self.kwargs.items())
        return f'{type(self).__name__}({args})'
