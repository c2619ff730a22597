""" CoordAttention against the authors' formulation rebuilt from the spec, plus options, dtypes,
bad input and export/compilation paths. """
import copy
import pickle
import warnings
from functools import partial
from multiprocessing.reduction import ForkingPickler

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch
from torch import nn
from torch.autograd import forward_ad
from torch.nn.utils import parametrizations, parametrize, prune

from authors_coordatt import AuthorsCoordAtt
from model_helpers import add_to_parameters, randomise_
from timm.layers import GroupNorm1, freeze_batch_norm_2d
from torchvision.ops.misc import FrozenBatchNorm2d
from timm_coordatt import CoordAttention, coord_gate, coordinate_attention, native
from timm_coordatt.model_benchmark import peak_memory

SHAPES = [(2, 32, 7, 9), (1, 64, 1, 13), (3, 16, 5, 1), (2, 40, 1, 1), (1, 24, 3, 50), (4, 96, 14, 14)]


def _randomise_(module: nn.Module) -> nn.Module:
    """Non-trivial weights and BN statistics, so eval mode exercises every parameter."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if t.is_floating_point():
                values = torch.rand(t.shape, generator=gen) + 0.5 if 'running_var' in name else \
                    torch.randn(t.shape, generator=gen) * 0.5
                t.copy_(values)
    return module


@pytest.fixture(params=['native', 'torch'])
def inference_kernel(request, monkeypatch):
    """Eager float32 CPU inference runs the C kernel where it is built (see test_native.py), else
    PyTorch ops: both are checked."""
    monkeypatch.setattr(native, 'enabled', request.param == 'native')
    return request.param


def _pair(channels: int):
    authors = _randomise_(AuthorsCoordAtt(channels, channels))
    ours = CoordAttention(channels)
    ours.load_state_dict(authors.state_dict())  # same names: conv1, bn1, conv_h, conv_w
    return ours, authors


# float64 shows the formulas are the same; float32 that the error stays at rounding level. With
# few values per BN channel (N * (H + W) = 4) training-mode BN amplifies rounding differences, so
# the float32 inputs are seeded.
TOLERANCES = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-5)}


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('training', [False, True])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_matches_authors_block(shape, training, dtype):
    torch.manual_seed(0)
    ours, authors = _pair(shape[1])
    ours.to(dtype).train(training)
    authors.to(dtype).train(training)
    x = torch.randn(shape, dtype=dtype)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad = torch.randn(shape, dtype=dtype)
    y1, y2 = ours(x1), authors(x2)
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(y1, y2, rtol=rtol, atol=atol / 10)
    y1.backward(grad)
    y2.backward(grad)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=rtol, atol=atol)
    for (name, p1), (_, p2) in zip(ours.named_parameters(), authors.named_parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=rtol * 10, atol=atol, msg=name)
    if training:  # BN running statistics advance identically
        torch.testing.assert_close(ours.bn1.running_mean, authors.bn1.running_mean)
        torch.testing.assert_close(ours.bn1.running_var, authors.bn1.running_var)


# the inference path pools by matmul or by sums, runs conv_h and conv_w stacked or separately and
# gates with the full gate or two products, depending on the input's size: shapes on both sides
INFERENCE_SHAPES = SHAPES + [(64, 96, 14, 14)]


def test_inference_shapes_cover_every_path():
    small, stacked = CoordAttention.small_input_max, CoordAttention.stacked_gates_max
    numel = [n * c * h * w for n, c, h, w in INFERENCE_SHAPES]
    pool_by_matmul = [h + w <= 16 or (h + w <= 28 and size <= small)
                      for (n, c, h, w), size in zip(INFERENCE_SHAPES, numel)]
    gates_stacked = [n * c * (h + w) <= stacked for n, c, h, w in INFERENCE_SHAPES]
    assert set(pool_by_matmul) == set(gates_stacked) == {size <= small for size in numel} == {False, True}


@pytest.mark.parametrize('shape', INFERENCE_SHAPES)
@pytest.mark.parametrize('grad_mode', [torch.no_grad, torch.inference_mode])
def test_inference_matches_authors_block(shape, grad_mode, inference_kernel):
    ours, authors = _pair(shape[1])
    ours.eval()
    authors.eval()
    x = torch.randn(shape)
    with grad_mode():
        torch.testing.assert_close(ours(x), authors(x), rtol=1e-5, atol=1e-6)
        # neither contiguous nor channels_last
        x = torch.randn(shape[:2] + shape[:1:-1]).transpose(2, 3)
        torch.testing.assert_close(ours(x), authors(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('channels_last', [False, True])
def test_inplace_inference(channels_last, inference_kernel):
    ours, authors = _pair(32)
    ours.eval().inplace = True
    authors.eval()
    x = torch.randn(2, 32, 9, 7)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = authors(x)
        x_ours = x.clone()
        y = ours(x_ours)
    assert y.data_ptr() == x_ours.data_ptr()
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    # with autograd recording (training, or eval as Grad-CAM runs it) the input is left alone
    for training in (False, True):
        ours.train(training)
        x_grad = x.clone().requires_grad_()
        y = ours(x_grad)
        assert y.data_ptr() != x_grad.data_ptr()
        torch.testing.assert_close(x_grad.detach(), x, rtol=0, atol=0)
    # and so does the default module in inference
    x_default = x.clone()
    with torch.no_grad():
        CoordAttention(32).eval()(x_default)
    torch.testing.assert_close(x_default, x, rtol=0, atol=0)


@pytest.mark.parametrize('channels_last', [False, True])
def test_inplace_inference_counts_as_an_inplace_write(channels_last, inference_kernel):
    """A tensor autograd saved, then gated in place under no_grad: backward must refuse it, as after any
    in-place op, rather than run on the overwritten values."""
    block = CoordAttention(16, inplace=True).eval()
    w = torch.randn(16, 16, requires_grad=True)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    z = torch.einsum('oc,nchw->nohw', w, torch.randn(2, 16, 7, 7)).contiguous(memory_format=memory_format)
    z = z.exp()  # saves its output
    assert native.layout(z) == channels_last
    with torch.no_grad():
        block(z)
    with pytest.raises(RuntimeError, match='modified by an inplace operation'):
        z.sum().backward()


def test_inference_follows_parameter_changes(inference_kernel):
    """The folded inference weights are cached; every kind of update must reach them."""
    torch.manual_seed(0)  # seeded: after the SGD step below the blocks differ by rounding, for some draws by over 1e-6
    ours, authors = _pair(24)
    x = torch.randn(2, 24, 5, 6)

    def check():
        ours.eval()
        authors.eval()
        with torch.no_grad():
            torch.testing.assert_close(ours(x), authors(x), rtol=1e-5, atol=1e-6)

    check()
    with torch.no_grad():  # load_state_dict copies in place
        for p in authors.parameters():
            p.mul_(1.5)
    ours.load_state_dict(authors.state_dict())
    check()
    with torch.no_grad():  # a direct in-place edit of a BN statistic
        ours.bn1.running_var.mul_(3)
        authors.bn1.running_var.mul_(3)
    check()
    # training steps: BN statistics and, through the optimizer, every weight move
    for m in (ours, authors):
        m.train()
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        m(x).square().sum().backward()
        opt.step()
    check()
    # a parameter of a layer replaced by another tensor
    new_weight = torch.randn_like(ours.conv_w.weight)
    ours.conv_w.weight, authors.conv_w.weight = nn.Parameter(new_weight.clone()), nn.Parameter(new_weight.clone())
    check()
    # other weights for one call (torch.func swaps the module's tensors), then its own again
    other = {name: torch.randn_like(t) for name, t in authors.state_dict().items() if t.is_floating_point()}
    other['bn1.running_var'] = other['bn1.running_var'].abs()
    with torch.no_grad():
        torch.testing.assert_close(torch.func.functional_call(ours, other, (x,)),
                                   torch.func.functional_call(authors, other, (x,)), rtol=1e-5, atol=1e-6)
    check()
    # a layer replaced: the activation (where the kernel runs only the paper's), the shared conv
    ours.act = authors.act = nn.ReLU()
    check()
    conv1 = nn.Conv2d(24, ours.conv1.out_channels, 1)
    ours.conv1, authors.conv1 = conv1, copy.deepcopy(conv1)
    check()
    ours.double()
    authors.double()
    x = x.double()
    check()


@pytest.mark.parametrize('optimizer', [partial(torch.optim.AdamW, lr=0.1, fused=True),
                                       partial(torch.optim.SGD, lr=0.5, fused=True)])
@pytest.mark.parametrize('inference_between', [False, True])
def test_inference_follows_fused_optimizer_steps(optimizer, inference_between, inference_kernel):
    """Fused optimizer steps write the parameters without bumping their versions; with the norm in eval
    mode (fine-tuning with BN frozen) nothing else moves them: inference must still see every step, also
    when it ran between the backward and the step."""
    torch.manual_seed(0)
    ours, authors = _pair(24)
    x = torch.randn(2, 24, 5, 6)

    def check():
        with torch.no_grad():
            torch.testing.assert_close(ours(x), authors(x), rtol=1e-5, atol=1e-6)

    for m in (ours, authors):
        m.eval()
    check()  # folded
    optimizers = [optimizer(m.parameters()) for m in (ours, authors)]
    versions = [p._version for p in ours.parameters()]
    for _ in range(2):
        for m in (ours, authors):
            m(x.requires_grad_()).square().sum().backward()
        if inference_between:
            check()
        for opt in optimizers:
            opt.step()
        check()
    assert [p._version for p in ours.parameters()] == versions  # the steps this test is about


@pytest.mark.parametrize('write', ['vector_to_parameters', 'data', 'swap_tensors'])
def test_inference_refolds_after_to_following_data_writes(write, inference_kernel):
    """Writes through `.data` (as `torch.nn.utils.vector_to_parameters` makes) bypass the version counters, and
    swapped tensors may have the same versions; the documented remedy, `model.to(...)` even to where the model
    is, refolds."""
    ours, authors = _pair(24)
    x = torch.randn(2, 24, 5, 6)
    with torch.no_grad():
        ours.eval()(x)  # folded
        for m in (ours, authors):
            if write == 'vector_to_parameters':
                torch.nn.utils.vector_to_parameters(torch.nn.utils.parameters_to_vector(m.parameters()) * 1.5,
                                                    m.parameters())
            for p in m.parameters():
                if write == 'data':
                    p.data.mul_(1.5)
                elif write == 'swap_tensors':
                    torch.utils.swap_tensors(p, nn.Parameter(p * 1.5))
        ours.to('cpu')
        torch.testing.assert_close(ours(x), authors.eval()(x), rtol=1e-5, atol=1e-6)


def test_inference_after_data_writes_reads_memory_of_its_own(inference_kernel):
    # without a norm conv1's bias is folded as it is: `.data` swapped for the same values (unseen, documented)
    # must leave the folded weights valid, whatever takes the parameter's old memory after
    ours = _randomise_(CoordAttention(16, norm_layer=None)).eval()
    x = torch.randn(1, 16, 7, 7)
    with torch.no_grad():
        expected = ours(x)
        ours.conv1.bias.data = ours.conv1.bias.clone()
        junk = [torch.full((16,), 100.0) for _ in range(50)]  # noqa: F841  (where the old bias was)
        torch.testing.assert_close(ours(x), expected, rtol=0, atol=0)


def test_inference_refolds_after_a_write_while_folding(monkeypatch, inference_kernel):
    """An in-place update from another thread (an EMA) can land while a block folds its weights: the next
    call must fold again, not keep what was folded from the old values."""
    ours, authors = _pair(24)
    ours.eval()
    authors.eval()
    x = torch.randn(2, 24, 5, 6)
    fold = coordinate_attention._fold_weights

    def fold_then_write(*args, **kwargs):
        params = fold(*args, **kwargs)
        with torch.no_grad():
            for m in (ours, authors):
                m.conv1.weight.mul_(1.5)
        return params

    monkeypatch.setattr(coordinate_attention, '_fold_weights', fold_then_write)
    with torch.no_grad():
        ours(x)
    monkeypatch.setattr(coordinate_attention, '_fold_weights', fold)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), authors(x), rtol=1e-5, atol=1e-6)


def test_float64_inference_matches_authors_block(inference_kernel):
    ours, authors = _pair(32)
    ours.double().eval()
    authors.double().eval()
    x = torch.randn(2, 32, 7, 9, dtype=torch.float64)
    with torch.no_grad():  # batch norm folded in float64, not float32
        torch.testing.assert_close(ours(x), authors(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('mode', ['eval', 'eval_inplace', 'eval_autograd', 'train'])
def test_forward_mode_ad(mode, inference_kernel):
    """Tangents through the block (`torch.autograd.forward_ad`) as through the authors' block."""
    ours, authors = _pair(16)
    ours.train(mode == 'train')
    authors.train(mode == 'train')
    ours.inplace = mode == 'eval_inplace'
    x, tangent = torch.randn(2, 16, 5, 7), torch.randn(2, 16, 5, 7)
    results = []
    for m in (ours, authors):
        with forward_ad.dual_level(), torch.set_grad_enabled(mode in ('eval_autograd', 'train')):
            y, y_tangent = forward_ad.unpack_dual(m(forward_ad.make_dual(x.clone(), tangent)))
            assert y_tangent is not None
            results.append((y.detach().clone(), y_tangent.detach().clone()))
    (y1, t1), (y2, t2) = results
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(t1, t2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('memory_format', [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize('input_grad', [False, True])
def test_inference_follows_batch_norm_statistics(memory_format, input_grad, inference_kernel):
    """Training-mode forwards alone (a frozen backbone whose norms still train, BN recalibration) move
    the running statistics, which batch norm updates without a version bump: inference refolds. With
    `input_grad` training runs the C kernels' strip MLP, without it PyTorch's layers."""
    torch.manual_seed(0)
    ours, authors = _pair(24)
    x = torch.randn(2, 24, 5, 6).contiguous(memory_format=memory_format)

    def check():
        ours.eval()
        authors.eval()
        with torch.no_grad():
            torch.testing.assert_close(ours(x), authors(x), rtol=1e-5, atol=1e-6)

    check()  # folded
    batch = (torch.randn(2, 24, 5, 6) * 3 + 1).contiguous(memory_format=memory_format)
    for m in (ours, authors):
        m.train()(batch.clone().requires_grad_(input_grad))
    torch.testing.assert_close(ours.bn1.running_var, authors.bn1.running_var)
    check()


@pytest.mark.parametrize('memory_format', [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize('folded_before', [False, True])
def test_inference_with_norm_in_training_mode(memory_format, folded_before, inference_kernel):
    """An eval-mode block whose batch norm alone trains (BN recalibration, test-time adaptation:
    `model.eval()`, then `.train()` on the norms, forwards without autograd) normalises by the batch
    and updates the running statistics, as the authors' block does; back in eval mode it folds them."""
    torch.manual_seed(0)
    ours, authors = _pair(24)
    x = (torch.randn(2, 24, 5, 6) * 3 + 1).contiguous(memory_format=memory_format)
    for m in (ours, authors):
        m.eval()
    with torch.no_grad():
        if folded_before:
            ours(x)
        for m in (ours, authors):
            m.bn1.train()
        for _ in range(2):
            torch.testing.assert_close(ours(x), authors(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.bn1.running_var, authors.bn1.running_var)
        assert ours.bn1.num_batches_tracked == authors.bn1.num_batches_tracked == 2
        for m in (ours, authors):
            m.bn1.eval()
        torch.testing.assert_close(ours(x), authors(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('missing', ['weight', 'bias', 'stats'])
def test_inference_with_parts_of_the_norm_missing(missing, inference_kernel):
    # batch norm applies its weight and bias each where given, and without running statistics normalises by
    # the batch's, in eval mode too
    ours = _randomise_(CoordAttention(24)).eval()
    for name in ['running_mean', 'running_var'] if missing == 'stats' else [missing]:
        setattr(ours.bn1, name, None)
    x = torch.randn(3, 24, 5, 6)
    with torch.no_grad():
        # the paper's block, calling its layers
        h, w = x.shape[2:]
        y = torch.cat([x.mean(3, keepdim=True), x.mean(2, keepdim=True).transpose(2, 3)], dim=2)
        y_h, y_w = ours.act(ours.bn1(ours.conv1(y))).split([h, w], dim=2)
        expected = x * ours.gate(ours.conv_h(y_h)) * ours.gate(ours.conv_w(y_w)).transpose(2, 3)
        torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('norm', ['batch', 'frozen'])
def test_inference_follows_norm_eps(norm, inference_kernel):
    """The fold depends on the norm's eps, a float attribute with no version: changed, inference refolds."""
    ours, authors = _pair(24)
    if norm == 'frozen':
        freeze_batch_norm_2d(ours)
        freeze_batch_norm_2d(authors)
    x = torch.randn(2, 24, 5, 6)
    with torch.no_grad():
        ours.eval()(x)  # folded
        ours.bn1.eps = authors.bn1.eps = 0.5
        torch.testing.assert_close(ours(x), authors.eval()(x), rtol=1e-5, atol=1e-6)


class _Doubled(nn.Module):
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return 2 * weight


class _RoundingConv(nn.Conv2d):
    """A conv whose forward changes its weight, as quantization-aware training's do."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, torch.round(self.weight, decimals=1), self.bias)


def _prune(m: nn.Module) -> None:
    for conv in (m.conv1, m.conv_h, m.conv_w):
        prune.l1_unstructured(conv, 'weight', amount=0.5)
        prune.l1_unstructured(conv, 'bias', amount=0.3)


def _parametrize(m: nn.Module) -> None:
    parametrize.register_parametrization(m.conv_h, 'weight', _Doubled())
    parametrize.register_parametrization(m.bn1, 'weight', _Doubled())


def _weight_norm(m: nn.Module) -> None:
    parametrizations.weight_norm(m.conv1)


def _subclassed_conv(m: nn.Module) -> None:
    conv = _RoundingConv(m.conv_w.in_channels, m.conv_w.out_channels, 1)
    conv.load_state_dict(m.conv_w.state_dict())
    m.conv_w = conv


@pytest.mark.parametrize('transform', [_prune, _parametrize, _weight_norm, _subclassed_conv])
@pytest.mark.parametrize('cached_first', [False, True])
def test_layers_computing_their_weights(transform, cached_first, inference_kernel):
    """Pruned, weight-normed, parametrized or subclassed layers compute their weights when called: the
    block then calls them (training and inference), as the authors' block does, whether or not it had
    folded the plain weights before (`cached_first`)."""
    torch.manual_seed(0)
    ours, authors = _pair(40)
    x = torch.randn(3, 40, 6, 5)
    if cached_first:
        with torch.no_grad():
            ours.eval()(x)
    for m in (ours, authors):
        transform(m)
    for m in (ours, authors):  # two training steps: the masked or parametrized weights train
        m.train()
        opt = torch.optim.SGD(m.parameters(), lr=0.01)
        for _ in range(2):
            opt.zero_grad()
            m(x.clone().requires_grad_()).square().sum().backward()
            opt.step()
    grads = [dict((name, p.grad) for name, p in m.named_parameters()) for m in (ours, authors)]
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][name], rtol=1e-4, atol=1e-4, msg=name)
    for m in (ours, authors):
        m.eval()
    for memory_format in (torch.contiguous_format, torch.channels_last):
        xm = x.contiguous(memory_format=memory_format)
        with torch.inference_mode():
            torch.testing.assert_close(ours(xm), authors(xm), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('memory_format', [torch.contiguous_format, torch.channels_last])
def test_pruning_made_permanent_between_calls(memory_format, inference_kernel):
    """`prune.remove` right after pruning, with no call between (measure, prune, measure): the block never
    saw the pruning hook, and the pruned weights reach the parameters through `.data`, unseen by their
    versions; the folded weights follow them."""
    torch.manual_seed(0)
    ours, authors = _pair(40)
    x = torch.randn(3, 40, 6, 5).contiguous(memory_format=memory_format)
    with torch.no_grad():
        ours.eval()(x)
    for m in (ours, authors):
        _prune(m)
        for conv in (m.conv1, m.conv_h, m.conv_w):
            prune.remove(conv, 'weight')
            prune.remove(conv, 'bias')
    assert (ours.conv1.weight == 0).float().mean() == 0.5
    with torch.no_grad():
        torch.testing.assert_close(ours(x), authors.eval()(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('make_copy', [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))])
def test_copies_fold_their_own_weights(make_copy, inference_kernel):
    """A copy of a block that has folded its weights computes with its own: not with the original's
    folded tensors, which the original frees or refolds. Parameters given to a block as they are
    (`assign=True`: version 0, as a copy's; no norm, whose copied statistics are at version 1) once
    let a copy's cache pass as current."""
    authors = _randomise_(AuthorsCoordAtt(40, 40))
    authors.bn1 = nn.Identity()
    block = CoordAttention(40, norm_layer=None).eval()
    block.load_state_dict({k: v.clone() for k, v in authors.state_dict().items()}, assign=True)
    x = torch.randn(2, 40, 6, 5)
    with torch.no_grad():
        block(x)  # folds
        folded = block._inference_params.params
        twin = make_copy(block)
        for t in folded:  # the original's folded weights, overwritten
            if isinstance(t, torch.Tensor):
                t.fill_(float('nan'))
        if folded.native is not None:
            for t in folded.native.tensors:
                if t is not None:
                    t.fill_(float('nan'))
        torch.testing.assert_close(twin(x), authors.eval()(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('share', ['share_memory', 'pickled'])
def test_inference_follows_other_processes_writing_shared_memory(share):
    """Another process writing the parameters through shared memory (Hogwild training after
    `model.share_memory()`; a block pickled to a spawned process, which moves its tensors to shared memory)
    bumps no version in this one: the block folds shared weights at every call."""
    ours, authors = _pair(24)
    ours.eval()
    authors.eval()
    x = torch.randn(2, 24, 5, 6)
    if share == 'share_memory':
        ours.share_memory()
    with torch.no_grad():
        ours(x)  # folds
        ours(x)  # and the fold checked
    writer = torch.multiprocessing.get_context('spawn').Process(target=add_to_parameters, args=(ours, 0.25))
    writer.start()
    writer.join()
    assert writer.exitcode == 0 and ours.conv1.weight.is_shared()
    add_to_parameters(authors, 0.25)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), authors(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('kwargs', [
    dict(bias=False),
    dict(norm_layer=None),
    dict(norm_layer=partial(nn.BatchNorm2d, affine=False)),
    dict(norm_layer=GroupNorm1),  # cannot be folded: inference runs the norm as a layer
    dict(norm_layer=partial(nn.BatchNorm2d, track_running_stats=False)),
])
def test_inference_options(kwargs, inference_kernel):
    """The inference path against the module's autograd path (checked against the authors above)."""
    m = _randomise_(CoordAttention(40, **kwargs)).eval()
    for shape in [(1, 40, 6, 3), (64, 40, 14, 14)]:
        x = torch.randn(shape)
        expected = m(x)  # autograd enabled: the general path
        with torch.inference_mode():
            torch.testing.assert_close(m(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('convert, norm_type', [(freeze_batch_norm_2d, FrozenBatchNorm2d),
                                                (nn.SyncBatchNorm.convert_sync_batchnorm, nn.SyncBatchNorm)])
def test_frozen_or_sync_batch_norm(convert, norm_type, inference_kernel):
    """`timm.layers.freeze_batch_norm_2d` (detection and segmentation fine-tuning) turns bn1 into
    torchvision's FrozenBatchNorm2d, `--sync-bn` into SyncBatchNorm: inference folds either as it folds
    batch norm, following changes to its statistics; training runs a frozen norm as the eval-mode batch
    norm it is."""
    torch.manual_seed(0)
    ours, authors = _pair(40)
    x = torch.randn(2, 40, 6, 5)
    with torch.no_grad():
        ours.eval()(x)  # folded with the batch norm first
    ours = convert(ours)
    assert type(ours.bn1) is norm_type
    assert ours._folded_params() is not None  # the inference path that folds (and runs the kernel)

    def check():
        authors.eval()
        for memory_format in (torch.contiguous_format, torch.channels_last):
            xm = x.contiguous(memory_format=memory_format)
            with torch.inference_mode():
                torch.testing.assert_close(ours(xm), authors(xm), rtol=1e-5, atol=1e-6)

    check()
    with torch.no_grad():
        for m in (ours, authors):
            m.bn1.running_var.mul_(3)
            m.bn1.weight.add_(0.5)
    check()
    if norm_type is nn.SyncBatchNorm:  # its training needs a process group
        return
    ours.train()
    authors.train()
    authors.bn1.eval()
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = ours(x1), authors(x2)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-6)
    y1.square().sum().backward()
    y2.square().sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-5)
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, authors.get_parameter(name).grad, rtol=1e-4, atol=1e-5, msg=name)


def test_inference_low_precision_and_inference_parameters():
    x = torch.randn(2, 32, 9, 5)
    m = _randomise_(CoordAttention(32)).eval().to(torch.bfloat16)
    expected = m(x.to(torch.bfloat16)).float()
    with torch.no_grad():
        torch.testing.assert_close(m(x.to(torch.bfloat16)).float(), expected, rtol=2e-2, atol=2e-2)
    with torch.inference_mode():  # parameters created here are inference tensors, without versions
        m = _randomise_(CoordAttention(32)).eval()
        expected = m.gates(x)
        y = m(x)
    torch.testing.assert_close(y, x * expected[0] * expected[1])


def test_inference_parameters_cached_by_identity(inference_kernel):
    """Parameters created under `torch.inference_mode()` are inference tensors, without versions: their
    fold is kept while they stay the same objects (refolding every call cost MobileNetV2 14% at batch 1),
    and made anew after a norm's training-mode passes, a state dict load or a replaced parameter."""
    with torch.inference_mode():
        ours, authors = _pair(24)
        ours.eval()
        authors.eval()
        x = torch.randn(2, 24, 5, 6)
        torch.testing.assert_close(ours(x), authors(x), rtol=1e-5, atol=1e-6)
        assert ours._inference_params is not None and ours.conv1.weight.is_inference()
        for m in (ours, authors):  # BN recalibration
            m.bn1.train()
        torch.testing.assert_close(ours(x * 3 + 1), authors(x * 3 + 1), rtol=1e-5, atol=1e-6)
        for m in (ours, authors):
            m.bn1.eval()
        torch.testing.assert_close(ours(x), authors(x), rtol=1e-5, atol=1e-6)
        authors.conv1.weight.mul_(1.5)
        ours.load_state_dict(authors.state_dict())
        torch.testing.assert_close(ours(x), authors(x), rtol=1e-5, atol=1e-6)
        weight = torch.randn_like(ours.conv_h.weight)
        ours.conv_h.weight, authors.conv_h.weight = nn.Parameter(weight), nn.Parameter(weight.clone())
        torch.testing.assert_close(ours(x), authors(x), rtol=1e-5, atol=1e-6)


def test_paper_defaults():
    for channels, mip in [(16, 8), (96, 8), (384, 12), (576, 18), (960, 30)]:
        m = CoordAttention(channels)
        assert m.conv1.weight.shape == (mip, channels, 1, 1)
        assert m.conv_h.weight.shape == m.conv_w.weight.shape == (channels, mip, 1, 1)
        assert all(c.bias is not None for c in (m.conv1, m.conv_h, m.conv_w))
        assert isinstance(m.bn1, nn.BatchNorm2d) and isinstance(m.act, nn.Hardswish)
        assert isinstance(m.gate, nn.Sigmoid)


def test_options():
    m = CoordAttention(64, reduction=4, min_channels=2)
    assert m.conv1.out_channels == 16
    assert CoordAttention(64, reduction=32, min_channels=4).conv1.out_channels == 4
    m = CoordAttention(64, rd_channels=5, bias=False, act_layer='relu', norm_layer=None, gate_layer='hard_sigmoid')
    assert m.conv1.out_channels == 5 and m.conv1.bias is None
    assert isinstance(m.act, nn.ReLU) and isinstance(m.bn1, nn.Identity) and isinstance(m.gate, nn.Hardsigmoid)
    x = torch.randn(2, 64, 6, 4)
    a_h, a_w = m.gates(x)
    assert a_h.shape == (2, 64, 6, 1) and a_w.shape == (2, 64, 1, 4)
    torch.testing.assert_close(m(x), x * a_h * a_w)


@pytest.mark.parametrize('channels', [0, -3, 2.5, None, True, '64'])
def test_bad_channels(channels):
    with pytest.raises(ValueError, match=f'expected channels to be a positive int, got {channels!r}'):
        CoordAttention(channels)


@pytest.mark.parametrize('name, value', [
    ('reduction', 0), ('reduction', 2.5), ('reduction', '4'), ('min_channels', 2.5), ('min_channels', 0),
    ('rd_channels', 0), ('rd_channels', 4.5), ('rd_channels', False)])
def test_bad_widths(name, value):
    with pytest.raises(ValueError, match=f'expected {name} to be a positive int, got {value!r}'):
        CoordAttention(32, **{name: value})


def test_widths_and_layers_as_timm_gives_them():
    # numpy's integers (a width computed with numpy), as nn.Conv2d takes them
    m = CoordAttention(np.int64(64), reduction=np.int32(8))
    assert m.channels == 64 and type(m.channels) is int and m.conv1.out_channels == 8
    # a norm by timm's name; torchvision's frozen batch norm (no device/dtype arguments); None: no layer
    m = CoordAttention(64, norm_layer='batchnorm2d', act_layer=None, gate_layer=None).eval()
    assert type(m.bn1) is nn.BatchNorm2d and isinstance(m.act, nn.Identity) and isinstance(m.gate, nn.Identity)
    x = torch.randn(2, 64, 5, 3)
    with torch.no_grad():
        y = m.bn1(m.conv1(torch.cat([x.mean(3, keepdim=True), x.mean(2, keepdim=True).transpose(2, 3)], 2)))
        a_h, a_w = m.conv_h(y[:, :, :5]), m.conv_w(y[:, :, 5:]).transpose(2, 3)
        torch.testing.assert_close(m(x), x * a_h * a_w)
    frozen = CoordAttention(64, norm_layer=FrozenBatchNorm2d).eval()
    assert type(frozen.bn1) is FrozenBatchNorm2d
    with torch.no_grad():
        frozen.bn1.running_mean.uniform_(-1, 1), frozen.bn1.running_var.uniform_(0.5, 2)
    batch_norm = CoordAttention(64).eval()
    batch_norm.load_state_dict(frozen.state_dict())  # the same weights and statistics
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), batch_norm(x))


@pytest.mark.parametrize('shape', [(32, 8, 8), (1, 16, 8, 8), (1, 32, 8, 8, 2), (2, 32, 0, 5), (2, 32, 5, 0)])
@pytest.mark.parametrize('mode', ['train', 'eval'])
def test_bad_input(shape, mode):
    m = CoordAttention(32).train(mode == 'train')
    with torch.set_grad_enabled(mode == 'train'), pytest.raises(
            ValueError, match=r'C=32 and H, W >= 1, got shape \[' + ', '.join(map(str, shape))):
        m(torch.randn(shape, requires_grad=mode == 'train'))


def test_batch_one_training():
    m = CoordAttention(32).train()
    x = torch.randn(1, 32, 1, 1, requires_grad=True)
    m(x).sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize('training', [False, True])
def test_channels_last(training):
    m = _randomise_(CoordAttention(48)).train(training)
    x = torch.randn(3, 48, 10, 7)
    xc = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    x = x.requires_grad_()
    y, yc = m(x), copy.deepcopy(m)(xc)
    assert yc.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(yc, y, rtol=1e-5, atol=1e-6)
    yc.sum().backward()
    y.sum().backward()
    torch.testing.assert_close(xc.grad, x.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('memory_format', [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize('training, grad', [(False, False), (False, True), (True, True)])
def test_empty_batch_keeps_the_layout(memory_format, training, grad):
    m = CoordAttention(32).train(training)
    x = torch.randn(0, 32, 8, 6).contiguous(memory_format=memory_format).requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        y = m(x)
    assert y.shape == x.shape and y.stride() == x.stride()


@pytest.mark.parametrize('dtype,tol', [(torch.float16, 2e-2), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize('training', [False, True])
def test_low_precision(dtype, tol, training):
    ours, authors = _pair(32)
    ours.to(dtype).train(training)
    authors.train(training)
    x = torch.randn(2, 32, 9, 5)
    xl = x.to(dtype).requires_grad_()
    y = ours(xl)
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), authors(x), rtol=tol, atol=tol)
    y.float().sum().backward()
    assert xl.grad.dtype == dtype and torch.isfinite(xl.grad.float()).all()


@pytest.mark.parametrize('memory_format', [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize('training', [False, True])
def test_float16_pooling_of_large_activations(memory_format, training):
    """A row of 40 activations of 2000 on average sums to 80,000, past float16's 65,504, where their mean is
    well within it: the strips accumulate in float32, as the authors' mean does. Their block in float16 is
    the measure of float16's rounding (gate logits of a few thousand)."""
    torch.manual_seed(0)
    ours, authors = _pair(16)
    authors_half = copy.deepcopy(authors).half().train(training)
    ours.half().train(training)
    authors.train(training)
    x = (4000 * torch.rand(1, 16, 40, 40)).contiguous(memory_format=memory_format)
    xl = x.half().requires_grad_(training)
    with torch.set_grad_enabled(training):
        y = ours(xl)
    with torch.no_grad():
        expected = authors(x)
        rounding = (authors_half(x.half()).float() - expected).abs().max()
    assert torch.isfinite(y).all()
    assert (y.float() - expected).abs().max() <= 2 * rounding
    if training:
        y.float().mean().backward()
        assert torch.isfinite(xl.grad).all()


@pytest.mark.parametrize('dtype,tol', [(torch.float16, 2e-2), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize('memory_format', [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize('use_native_kernel', [True, False])
def test_autocast_with_float32_input(dtype, tol, memory_format, use_native_kernel):
    """A float32 input under autocast (as after a norm that autocast keeps in float32): the gates come
    out in half precision and the product promotes them, as in the authors' formulation; the C
    kernels and the PyTorch backward take the promoted gates."""
    ours, authors = _pair(32)
    ours.use_native_kernel = use_native_kernel
    x = torch.randn(2, 32, 9, 5).contiguous(memory_format=memory_format)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast('cpu', dtype=dtype):
        y1, y2 = ours(x1), authors(x2)
    assert y1.dtype == y2.dtype == torch.float32
    torch.testing.assert_close(y1, y2, rtol=tol, atol=tol)  # gates rounded to half precision in both
    y1.square().sum().backward()
    y2.square().sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=tol, atol=tol)


@pytest.mark.parametrize('dtype,tol', [(torch.float16, 2e-2), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize('use_native_kernel', [True, False])
@pytest.mark.parametrize('view', [False, True])
def test_autocast_inference_with_float32_input(dtype, tol, use_native_kernel, view):
    """Inference under autocast gives a float32 input a float32 output, as the authors' product does, also
    where the block's small-input path multiplies by the full gate (a strided view of x: no C kernel)."""
    ours, authors = _pair(32)
    ours.eval().use_native_kernel = use_native_kernel
    authors.eval()
    x = torch.randn(2, 32, 9, 6)
    x = x[..., :5] if view else x[..., :5].contiguous()
    with torch.no_grad(), torch.autocast('cpu', dtype=dtype):
        y1, y2 = ours(x), authors(x)
    assert y1.dtype == y2.dtype == torch.float32
    torch.testing.assert_close(y1, y2, rtol=tol, atol=tol)


def _gate_inputs(memory_format: torch.memory_format):
    """x and the two gates in float64; channels_last takes the backward's NHWC reductions."""
    x = torch.randn(2, 3, 4, 5, dtype=torch.double).contiguous(memory_format=memory_format)
    return x, torch.rand(2, 3, 4, 1, dtype=torch.double), torch.rand(2, 3, 1, 5, dtype=torch.double)


MEMORY_FORMATS = [torch.contiguous_format, torch.channels_last]


@pytest.mark.parametrize('second', ['create_graph', 'channels_last_gradient'])
def test_a_backward_of_the_parameters_alone_leaves_nothing_for_the_next(second):
    """A first backward asking for the parameters' gradients only (retain_graph) runs the product's backward but
    not the pooling's; a second one for x whose product backward takes PyTorch ops (double backward, a
    gradient laid out unlike x) must not get the first one's part of x's gradient."""
    torch.manual_seed(0)
    block = CoordAttention(16).train()
    x = torch.randn(2, 16, 7, 9)
    g1, g2 = torch.randn_like(x) * 100, torch.randn_like(x)
    if second == 'channels_last_gradient':
        g2 = g2.contiguous(memory_format=torch.channels_last)

    def grad_x(use_native_kernel):
        b = copy.deepcopy(block)
        b.use_native_kernel = use_native_kernel
        x_ = x.clone().requires_grad_()
        y = b(x_)
        torch.autograd.grad(y, list(b.parameters()), g1, retain_graph=True)
        return torch.autograd.grad(y, x_, g2, create_graph=second == 'create_graph')[0]

    torch.testing.assert_close(grad_x(True), grad_x(False), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('memory_format', MEMORY_FORMATS)
def test_a_later_backward_from_the_gates_gets_no_earlier_part(memory_format):
    """The same first backward, then one from the gates (a forward hook exposes them) to x: it reaches the
    pooling without the product, and x's gradient is the gates' alone: d sum(a_h) / dx of the paper's block."""
    torch.manual_seed(0)
    ours, authors = _pair(16)
    ours.train()
    x = torch.randn(2, 16, 5, 6).contiguous(memory_format=memory_format)
    gates = []
    ours.gate.register_forward_hook(lambda module, args, out: gates.append(out))  # a_h, then a_w (transposed)
    x1 = x.clone().requires_grad_()
    y = ours(x1)
    g = torch.linspace(-1, 1, y.numel()).view(y.shape).contiguous(memory_format=memory_format)
    torch.autograd.grad(y, ours.conv_h.weight, g, retain_graph=True)
    n, c, h, w = x.shape
    grad, = torch.autograd.grad(gates[0][:, :, :h].sum(), x1)  # a_h
    x2 = x.clone().requires_grad_()
    strips = torch.cat([x2.mean(3, keepdim=True), x2.mean(2, keepdim=True).transpose(2, 3)], dim=2)
    a_h = torch.sigmoid(authors.conv_h(authors.act(authors.bn1(authors.conv1(strips)))[:, :, :h]))
    expected, = torch.autograd.grad(a_h.sum(), x2)
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('memory_format', MEMORY_FORMATS)
def test_coord_gate_gradcheck(memory_format):
    inputs = [t.requires_grad_() for t in _gate_inputs(memory_format)]
    assert torch.autograd.gradcheck(coord_gate, inputs)


@pytest.mark.parametrize('memory_format', MEMORY_FORMATS)
@pytest.mark.parametrize('needs_grad', [(True, False, False), (False, True, False), (False, False, True)])
def test_coord_gate_partial_grads(needs_grad, memory_format):
    """Each input alone: the backward skips the other gradients (and the temporary they share)."""
    inputs = [t.requires_grad_(r) for t, r in zip(_gate_inputs(memory_format), needs_grad)]
    assert torch.autograd.gradcheck(coord_gate, inputs)


@pytest.mark.parametrize('memory_format', MEMORY_FORMATS)
def test_coord_gate_double_backward(memory_format):
    inputs = [t.requires_grad_() for t in _gate_inputs(memory_format)]
    assert torch.autograd.gradgradcheck(coord_gate, inputs)


@pytest.mark.parametrize('memory_format', MEMORY_FORMATS)
def test_second_order_gradients_under_activation_checkpointing(memory_format):
    """A second-order optimizer (adahessian) with grad checkpointing: the recomputed block's backward builds the
    gradients' graph, each saved tensor unpacked once (checkpointing refuses a second unpack), and the
    second-order gradients are the authors' block's (in float64; to float32's rounding of the largest: conv1's
    bias, before a training-mode norm, has gradients of rounding size only)."""
    torch.manual_seed(0)
    ours, authors = _pair(24)
    x = torch.randn(4, 24, 7, 6).contiguous(memory_format=memory_format)

    def second_order(block, checkpointed):
        x_ = x.to(next(block.parameters()).dtype).requires_grad_()
        y = torch.utils.checkpoint.checkpoint(block, x_, use_reentrant=False) if checkpointed else block(x_)
        inputs = [x_, *block.parameters()]
        grads = torch.autograd.grad((y * y).sum(), inputs, create_graph=True)
        return torch.autograd.grad(sum((g * g).sum() for g in grads), inputs)

    refs = second_order(authors.double().train(), False)
    scale = max(ref.abs().max().item() for ref in refs)
    for ref, got in zip(refs, second_order(ours.train(), True)):
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6 * scale)


def test_coord_gate_saves_less_for_backward():
    """Only the input and the two small gates are kept for backward, not `x * a_h`."""
    m = CoordAttention(16).train()
    x = torch.randn(4, 16, 32, 32, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        m(x)
    full_size = [t for t in saved if t.numel() == x.numel()]
    assert len({t.data_ptr() for t in full_size}) == 1 and full_size[0].data_ptr() == x.data_ptr()


def test_torchscript():
    ours = _randomise_(CoordAttention(24))
    scripted = torch.jit.script(copy.deepcopy(ours))
    for training in (False, True):
        ours.train(training)
        scripted.train(training)
        x = torch.randn(2, 24, 6, 11)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1, y2 = ours(x1), scripted(x2)
        torch.testing.assert_close(y1, y2)
        y1.sum().backward()
        y2.sum().backward()
        torch.testing.assert_close(x1.grad, x2.grad)


@pytest.mark.parametrize('grad', [False, True])
def test_jit_trace_passes_its_check(grad):
    # torch.jit.trace checks its trace by tracing again under no_grad: both traces must record the same ops
    ours = _randomise_(CoordAttention(24)).eval()
    x = torch.randn(2, 24, 6, 11)
    with torch.set_grad_enabled(grad):
        traced = torch.jit.trace(ours, x)  # check_trace=True: raises TracingCheckError where the traces differ
    y = torch.randn(2, 24, 6, 11)
    with torch.no_grad():
        torch.testing.assert_close(traced(y), ours(y))


def test_fx_trace():
    """The traced graph calls the block's layers, as FX quantization (`prepare_fx`) needs to find its convs."""
    ours = _randomise_(CoordAttention(24)).eval()
    traced = torch.fx.symbolic_trace(ours)
    for shape in [(1, 24, 5, 5), (3, 24, 2, 9)]:
        x = torch.randn(shape)
        torch.testing.assert_close(traced(x), ours(x))
    called = [n.target for n in traced.graph.nodes if n.op == 'call_module']
    assert {'conv1', 'bn1', 'act', 'conv_h', 'conv_w'} <= set(called)


def test_fx_graphs_of_both_modes_have_the_same_nodes():
    """torchvision's `create_feature_extractor` (timm's `feature_cls='fx'` features too) traces the model in
    train and in eval mode, and warns where the nodes differ."""
    from torchvision.models.feature_extraction import get_graph_node_names
    train_nodes, eval_nodes = get_graph_node_names(nn.Sequential(nn.Conv2d(3, 24, 1), CoordAttention(24)))
    assert train_nodes == eval_nodes
    assert '1.conv_h' in eval_nodes
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        timm.create_model('mobilenetv2_050_ca', features_only=True, feature_cls='fx')
    assert not [w for w in caught if 'nodes obtained by tracing' in str(w.message)]


@pytest.mark.parametrize('backend', ['x86', 'qnnpack'])
def test_fx_quantization_quantizes_the_convs(backend):
    """Post-training int8 quantization (FX graph mode) makes the block's three convs quantized convs, conv1 with
    bn1 fused into it, as for the authors' block: they were left in float, unseen, once."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
    torch.manual_seed(0)
    ours, authors = _pair(32)
    x = torch.randn(4, 32, 8, 6)
    quantized = []
    for m in (ours.eval(), authors.eval()):
        prepared = prepare_fx(copy.deepcopy(m), get_default_qconfig_mapping(backend), (x,))
        prepared(x)
        quantized.append(convert_fx(prepared))
    kinds = [{name: type(getattr(q, name)).__name__ for name in ('conv1', 'conv_h', 'conv_w')} for q in quantized]
    assert kinds[0] == kinds[1] == dict.fromkeys(('conv1', 'conv_h', 'conv_w'), 'Conv2d')
    assert all('quantized' in type(getattr(quantized[0], name)).__module__ for name in ('conv1', 'conv_h', 'conv_w'))
    assert not hasattr(quantized[0], 'bn1')  # fused into conv1
    with torch.no_grad():
        expected = authors(x)
        errors = [((q(x) - expected).norm() / expected.norm()).item() for q in quantized]
    assert errors[0] < 1.5 * errors[1], errors


def test_compile_fullgraph():
    ours = _randomise_(CoordAttention(24)).train()
    compiled = torch.compile(copy.deepcopy(ours), fullgraph=True, backend='aot_eager')
    x = torch.randn(2, 24, 6, 5)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.testing.assert_close(compiled(x2), ours(x1))
    ours(x1).sum().backward()
    compiled(x2).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)


def test_compiled_training_holds_no_output():
    """Compiled (inductor) CPU training holds CA's input and gates, not its output as well: the
    backward recomputes the output for the next layer. Measured against the host without CA, in
    full-size tensors (C x H x W x batch): differentiating the plain product held one more."""
    x = torch.randn(16, 8, 32, 32)
    full_size = 16 * 64 * 32 * 32 * 4

    def compiled_step_peak(attn: nn.Module) -> float:
        torch.manual_seed(0)
        host = nn.Sequential(nn.Conv2d(8, 64, 1), nn.ReLU(), attn, nn.Conv2d(64, 8, 1)).train()
        eager = copy.deepcopy(host)
        torch._dynamo.reset()
        compiled = torch.compile(host)

        def step():
            compiled(x).sum().backward()
            for p in compiled.parameters():
                p.grad = None

        step()  # compiles
        peak = peak_memory(step, torch.device('cpu')) / full_size
        compiled(x).sum().backward()
        eager(x).sum().backward()
        # sums of 16K terms, summed differently: errors on the scale of the largest gradients (conv1's
        # bias, whose gradient BN makes zero up to rounding, came out 1e-3 compiled, 1e-8 eager)
        scale = max(q.grad.abs().max().item() for q in eager.parameters())
        for p, q in zip(compiled.parameters(), eager.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5 * scale)
        return peak

    without_ca = compiled_step_peak(nn.Identity())
    with_ca = compiled_step_peak(_randomise_(CoordAttention(64)))
    assert with_ca - without_ca < 1.6, (with_ca, without_ca)


def _capturing_backend(graphs: list):
    """A torch.compile backend that keeps each captured graph and runs it as captured."""
    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    return backend


def _compile_capturing(module: nn.Module, graphs: list):
    # each test compiles afresh: dynamo's recompile limit counts compilations of `forward` across tests
    torch._dynamo.reset()
    return torch.compile(module, backend=_capturing_backend(graphs), fullgraph=True)


@pytest.mark.parametrize('channels_last', [False, True])
def test_compiled_training_graph(channels_last):
    """torch.compile gets means and the block's own 1x1 convs, which inductor compiles well, not the
    eager formulation's strided sums and batched matmuls; the gradients are the authors' block's."""
    ours, authors = _pair(24)
    graphs = []
    compiled = _compile_capturing(ours.train(), graphs)
    x = torch.randn(4, 24, 7, 9)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.testing.assert_close(compiled(x1), authors.train()(x2), rtol=1e-5, atol=1e-5)
    compiled(x1).pow(2).sum().backward()
    authors(x2).pow(2).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-5)
    for p, q in zip(ours.parameters(), authors.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5)
    targets = {node.target for gm in graphs for node in gm.graph.nodes if node.op == 'call_function'}
    assert sum(node.target is torch.conv2d for node in graphs[0].graph.nodes) == 3
    assert not targets & {torch.bmm, torch.baddbmm, torch.matmul, torch.mm, torch.conv1d}


@pytest.mark.parametrize('training', [True, False])
def test_compiled_with_dynamic_sizes_differentiates(training):
    """A lone block compiled with dynamic H and W, with autograd (training; input gradients in eval mode, as
    Grad-CAM takes them): one graph for every size, the authors' block's gradients."""
    ours, authors = _pair(24)
    ours.train(training)
    authors.train(training)
    torch._dynamo.reset()
    compiled = torch.compile(ours, dynamic=True)
    for shape in [(2, 24, 9, 7), (1, 24, 5, 12)]:
        x = torch.randn(shape)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        compiled(x1).pow(2).sum().backward()
        authors(x2).pow(2).sum().backward()
        torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-5)


def _kernel_op_calls(graphs: list) -> int:
    op = torch.ops.timm_coordatt.coord_attention_block_inference_.default
    return sum(node.target is op for gm in graphs for node in gm.graph.nodes)


@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('inplace', [False, True])
def test_compiled_inference_calls_the_kernel(channels_last, inplace):
    """Compiled inference calls the eager kernel as one op, in the layout inductor gives the convs."""
    ours, authors = _pair(32)
    ours.eval().inplace = inplace
    authors.eval()
    x = torch.randn(2, 32, 9, 7)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    graphs = []
    compiled = _compile_capturing(ours, graphs)
    with torch.no_grad():
        x_ours = x.clone()
        y = compiled(x_ours)
        torch.testing.assert_close(y, authors(x), rtol=1e-5, atol=1e-6)
    assert _kernel_op_calls(graphs) == 1
    # the input and the block's key: its parameters, as graph inputs, would each add a guard and dispatch
    assert [node.op for node in graphs[0].graph.nodes].count('placeholder') == 2
    assert y.is_contiguous(memory_format=torch.channels_last)
    if not inplace:
        torch.testing.assert_close(x_ours, x, rtol=0, atol=0)
    # with autograd, and with the kernels off, the compiled graph is the PyTorch formulation
    graphs.clear()
    torch.testing.assert_close(compiled(x.clone()), authors(x), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        ours.use_native_kernel = False
        torch.testing.assert_close(compiled(x.clone()), authors(x), rtol=1e-5, atol=1e-6)
    assert graphs and _kernel_op_calls(graphs) == 0


def _compiled_eval_pair():
    """A block and the authors' in eval mode, an input, and the block compiled, capturing its graphs."""
    ours, authors = _pair(32)
    for m in (ours, authors):
        m.eval()
    graphs = []
    return ours, authors, torch.randn(2, 32, 9, 7), graphs, _compile_capturing(ours, graphs)


@pytest.mark.parametrize('transform, kernel_calls', [(freeze_batch_norm_2d, 1), (_prune, 0)])
def test_compiled_inference_frozen_or_pruned(transform, kernel_calls):
    """Compiled inference folds a frozen norm into the kernel op as eager does, and calls a pruned
    block's layers (their pre-hooks build the weights) instead of the op."""
    ours, authors = _pair(32)
    x = torch.randn(2, 32, 9, 7)
    for m in (ours, authors):
        transform(m)  # in place (freeze_batch_norm_2d replaces the block's children)
        m.eval()
    graphs = []
    compiled = _compile_capturing(ours, graphs)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), authors(x), rtol=1e-5, atol=1e-6)
    assert _kernel_op_calls(graphs) == kernel_calls


@pytest.mark.parametrize('transform, graphs_after', [(_prune, 1), (_parametrize, 2)])
def test_compiled_inference_guards_no_block_parameter(transform, graphs_after):
    """The compiled graph does not guard the block's parameters, which the op reads itself (their tensor
    guards cost a compiled MobileNetV2 4 points at batch 1): freezing them keeps the graph. Pruned or
    parametrized after compiling, the block computes what its layers do: a parametrization (a subclass)
    compiles them, pruning (a pre-hook, which dynamo does not guard) keeps the graph and the op calls them."""
    ours, authors, x, graphs, compiled = _compiled_eval_pair()
    with torch.no_grad():
        compiled(x)
        ours.requires_grad_(False)
        torch.testing.assert_close(compiled(x), authors(x), rtol=1e-5, atol=1e-6)
        assert len(graphs) == 1 and _kernel_op_calls(graphs) == 1
        for m in (ours, authors):
            transform(m)
        torch.testing.assert_close(compiled(x), authors(x), rtol=1e-5, atol=1e-6)
    assert len(graphs) == graphs_after and _kernel_op_calls(graphs[1:]) == 0


@pytest.mark.parametrize('compiled_in_eval_first', [False, True])
def test_compiled_inference_with_norm_in_training_mode(compiled_in_eval_first):
    """A compiled eval-mode block whose norm trains calls its layers (batch statistics, updated), not the op;
    a graph compiled with the norm in eval mode is not reused for it."""
    ours, authors, x, graphs, compiled = _compiled_eval_pair()
    with torch.no_grad():
        if compiled_in_eval_first:
            torch.testing.assert_close(compiled(x), authors(x), rtol=1e-5, atol=1e-6)
            graphs.clear()
        for m in (ours, authors):
            m.bn1.train()
        torch.testing.assert_close(compiled(x), authors(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.bn1.running_mean, authors.bn1.running_mean)
    assert graphs and _kernel_op_calls(graphs) == 0


def test_compiled_inference_follows_parameter_changes():
    """The op folds the block's weights as they are at the call, like eager inference."""
    ours, authors = _pair(24)
    ours.eval()
    authors.eval()
    torch._dynamo.reset()
    compiled = torch.compile(ours, backend='aot_eager', fullgraph=True)
    x = torch.randn(2, 24, 5, 6)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), authors(x), rtol=1e-5, atol=1e-6)
        for module in (ours, authors):
            module.conv1.weight.mul_(1.5)
            module.bn1.running_var.add_(0.25)
        torch.testing.assert_close(compiled(x), authors(x), rtol=1e-5, atol=1e-6)
        _randomise_(authors.conv_w)
        ours.load_state_dict(authors.state_dict())
        torch.testing.assert_close(compiled(x), authors(x), rtol=1e-5, atol=1e-6)


def test_compiled_inference_of_many_models():
    """One compiled graph serves every block of the same shape (no recompilation per instance, no
    limit on their number), each with its own weights, copies and unpickled ones included, and follows
    replaced parameters."""
    graphs = []
    first = _randomise_(CoordAttention(16)).eval()
    blocks = [first] + [copy.deepcopy(first) for _ in range(10)] + [pickle.loads(pickle.dumps(first))]
    torch._dynamo.reset()
    run = torch.compile(lambda block, x: block(x), backend=_capturing_backend(graphs), fullgraph=True)
    x = torch.randn(1, 16, 6, 6)
    with torch.no_grad():
        for i, block in enumerate(blocks):  # more than dynamo's recompile limit (8)
            block.conv_h.weight.mul_(i - 5.5)
        for _ in range(2):
            for block in blocks:
                # the same kernel as eager on the channels_last copy the op runs on: the same bits
                expected = block._forward_inference(x.contiguous(memory_format=torch.channels_last))
                torch.testing.assert_close(run(block, x), expected, rtol=0, atol=0)
                # another tensor, at the same version as the one it replaces
                block.conv_w.weight = nn.Parameter(torch.randn_like(block.conv_w.weight))
    assert len(graphs) == 1 and _kernel_op_calls(graphs) == 1


def test_compiled_inference_inductor_freezing():
    """Inductor's freezing folds parameters into constants and passes the op a copy of the block's key."""
    ours, authors = _pair(24)
    ours.eval()
    torch._dynamo.reset()
    compiled = torch.compile(ours, fullgraph=True)
    x = torch.randn(2, 24, 10, 7)
    with torch.no_grad(), torch._inductor.config.patch(freezing=True):
        torch.testing.assert_close(compiled(x), authors.eval()(x), rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def test_compiled_inference_inductor():
    ours, authors = _pair(24)
    ours.eval()
    torch._dynamo.reset()
    compiled = torch.compile(ours, fullgraph=True)  # inductor
    x = torch.randn(2, 24, 10, 7)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), authors.eval()(x), rtol=1e-5, atol=1e-6)


def test_pickling_for_another_process_leaves_the_kernel_key():
    """torch.multiprocessing's pickler moves the tensors it pickles to shared memory: the block's key, by whose
    address the compiled graphs' op finds the block, stays where it was (the copy registers its own)."""
    block = CoordAttention(8).eval()
    address = block._kernel_key.data_ptr()
    twin = ForkingPickler.loads(ForkingPickler.dumps(block))
    assert block._kernel_key.data_ptr() == address and not block._kernel_key.is_shared()
    assert coordinate_attention._blocks_by_key_address[address] is block
    assert coordinate_attention._blocks_by_key_address[twin._kernel_key.data_ptr()] is twin


def test_kernel_op_bad_input():
    op = torch.ops.timm_coordatt.coord_attention_block_inference_
    block = CoordAttention(8).eval()
    double = copy.deepcopy(block).double()
    with pytest.raises(ValueError, match=r'expected a float32 CPU \(N, 8, H, W\) x, contiguous or channels_last, '
                                         r'got torch.float32 on cpu, shape \(1, 4, 2, 2\)'):
        op(torch.randn(1, 4, 2, 2), block._kernel_key)
    with pytest.raises(RuntimeError, match=r'expected a block with float32 CPU parameters.*got torch.float64 on cpu'):
        op(torch.randn(1, 8, 2, 2), double._kernel_key)
    with pytest.raises(RuntimeError, match=r'expected the key of a live CoordAttention, got tensor\(\[-1\]\)'):
        op(torch.randn(1, 8, 2, 2), torch.tensor([-1]))


def test_torch_export():
    ours = _randomise_(CoordAttention(24)).eval()
    dims = {'x': {0: torch.export.Dim('batch'), 2: torch.export.Dim('h'), 3: torch.export.Dim('w')}}
    with torch.no_grad():  # as for inference, where torch.compile would call the kernel op
        exported = torch.export.export(ours, (torch.randn(2, 24, 6, 5),), dynamic_shapes=dims)
    # self-contained: none of this package's ops; the block's convs as convs (pt2e quantizers look for them),
    # conv1 once a strip: no concatenation or split of the strips, whose sizes converters freeze (ncnn) or cannot
    # take at run time (CoreML)
    assert not [n for n in exported.graph.nodes if 'timm_coordatt' in str(n.target)]
    targets = [n.target for n in exported.graph.nodes if n.op == 'call_function']
    assert targets.count(torch.ops.aten.conv2d.default) == 4
    assert not [t for t in targets if 'split' in str(t) or 'cat' in str(t)]
    for shape in [(1, 24, 3, 9), (4, 24, 12, 7)]:
        x = torch.randn(shape)
        torch.testing.assert_close(exported.module()(x), ours(x))


def test_torch_export_at_a_fixed_size_pools_with_avg_pool():
    """ExecuTorch's XNNPACK delegate runs `avg_pool2d`, not a mean over one axis (which left each block on
    portable kernels between XNNPACK parts): exported at a fixed size, the strips are average pools."""
    ours = _randomise_(CoordAttention(24)).eval()
    x = torch.randn(2, 24, 6, 5)
    with torch.no_grad():
        exported = torch.export.export(ours, (x,))
        targets = [n.target for n in exported.graph.nodes if n.op == 'call_function']
        assert targets.count(torch.ops.aten.avg_pool2d.default) == 2 and torch.ops.aten.mean.dim not in targets
        torch.testing.assert_close(exported.module()(x), ours(x))


@pytest.mark.parametrize('strict', [False, True])
def test_torch_export_for_training_keeps_the_gradients(strict):
    """An exported training graph (fine-tuning it, pt2e quantization-aware training) differentiates the plain
    product: strict export traces with dynamo, where a custom autograd Function's backward would be dropped."""
    torch.manual_seed(0)
    ours = _randomise_(CoordAttention(24)).train()
    x = torch.randn(2, 24, 6, 5)
    exported = torch.export.export(ours, (x,), strict=strict).module()
    x_exported, x_eager = x.clone().requires_grad_(), x.clone().requires_grad_()
    exported(x_exported).square().sum().backward()
    ours(x_eager).square().sum().backward()
    torch.testing.assert_close(x_exported.grad, x_eager.grad, rtol=1e-4, atol=1e-5)
    for name, p in exported.named_parameters():
        torch.testing.assert_close(p.grad, ours.get_parameter(name).grad, rtol=1e-4, atol=1e-5, msg=name)


def test_onnx_dynamic(tmp_path):
    ours = _randomise_(CoordAttention(24)).eval()
    path = tmp_path / 'ca.onnx'
    dims = {'x': {0: torch.export.Dim('batch'), 2: torch.export.Dim('h'), 3: torch.export.Dim('w')}}
    torch.onnx.export(ours, (torch.randn(2, 24, 6, 5),), str(path), dynamic_shapes=dims, dynamo=True)
    # convs as Conv nodes, which runtimes fuse with the norm and quantizers quantize (MatMuls stayed float),
    # conv1 once a strip: no Split of sizes taken at export
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    assert ops.count('Conv') == 4 and not {'MatMul', 'Split', 'Concat'} & set(ops)
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    for shape in [(1, 24, 7, 7), (3, 24, 20, 5), (2, 24, 1, 33)]:
        x = torch.randn(shape)
        (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        torch.testing.assert_close(torch.from_numpy(out), ours(x), rtol=1e-5, atol=1e-5)


class _Wrapped(torch.Tensor):
    """A wrapper tensor subclass without memory of its own (as tensor-parallel and quantized tensors are),
    running every op on the tensor it wraps."""

    @staticmethod
    def __new__(cls, elem: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(
            cls, elem.shape, strides=elem.stride(), dtype=elem.dtype, device=elem.device,
            requires_grad=elem.requires_grad)

    def __init__(self, elem: torch.Tensor):
        self.elem = elem

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        unwrap = partial(torch.utils._pytree.tree_map_only, _Wrapped, lambda t: t.elem)
        out = func(*unwrap(args), **unwrap(kwargs or {}))
        return torch.utils._pytree.tree_map_only(torch.Tensor, _Wrapped, out)


def _gate_flops(block: CoordAttention, x: torch.Tensor) -> int:
    """The block's 1x1 convs in FLOPs, from the paper: conv1 on the H + W pooled positions, conv_h on H, conv_w
    on W."""
    n, c, h, w = x.shape
    return 2 * n * (h + w) * (c * block.conv1.out_channels + block.conv1.out_channels * c)


@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('training', [False, True])
def test_dispatch_modes_and_tensor_subclasses_see_the_pytorch_ops(training, channels_last):
    """Under a dispatch mode (FlopCounterMode, FakeTensorMode, make_fx's) and for a tensor subclass the block runs
    PyTorch ops, which they see (the C kernels read memory that a fake or wrapper tensor does not have)."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.utils.flop_counter import FlopCounterMode
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    block = _randomise_(CoordAttention(32)).train(training)
    x = torch.randn(2, 32, 9, 6).contiguous(memory_format=memory_format)
    with torch.set_grad_enabled(training):
        expected = copy.deepcopy(block)(x)
        counter = FlopCounterMode(display=False)
        with counter:
            out = copy.deepcopy(block)(x)
        torch.testing.assert_close(out, expected)
        assert counter.get_total_flops() == _gate_flops(block, x)

        wrapped = copy.deepcopy(block)(_Wrapped(x))
        assert type(wrapped) is _Wrapped
        torch.testing.assert_close(wrapped.elem, expected)

        copied = copy.deepcopy(block)
        with FakeTensorMode(allow_non_fake_inputs=True):
            fake = copied(x)
            if training:
                fake.sum().backward()
    assert isinstance(fake, FakeTensor) and fake.shape == x.shape
    if not training:
        # make_fx records under a dispatch mode: the graph holds the block's ops, not an empty output
        with torch.no_grad():
            graph = make_fx(copy.deepcopy(block))(x)
            other = torch.randn_like(x)
            torch.testing.assert_close(graph(other), block(other))


@pytest.mark.parametrize('name, baseline', [('mobilenetv2_050_ca', 'mobilenetv2_050'),
                                            ('mobilenext_050_ca', 'mobilenext_050')])
def test_flop_counter_counts_the_blocks(name, baseline):
    """torch's FlopCounterMode on a CA model in inference: the baseline's FLOPs and the CA blocks' convs."""
    from torch.utils.flop_counter import FlopCounterMode
    model, base = timm.create_model(name).eval(), timm.create_model(baseline).eval()
    inputs = []
    for m in model.modules():
        if isinstance(m, CoordAttention):
            m.register_forward_pre_hook(lambda m, args: inputs.append((m, args[0].shape)))
    x = torch.randn(1, 3, 96, 96)
    counts = []
    with torch.no_grad():
        for m in (model, base):
            counter = FlopCounterMode(display=False)
            with counter:
                m(x)
            counts.append(counter.get_total_flops())
    assert len(inputs) == sum(isinstance(m, CoordAttention) for m in model.modules())
    assert counts[0] == counts[1] + sum(_gate_flops(m, torch.empty(shape)) for m, shape in inputs)


@pytest.mark.parametrize('training, grad', [(False, False), (True, False), (True, True)])
def test_hooks_on_the_layers_see_them_called(training, grad):
    """MAC counters that hook every layer (thop, ptflops, torchinfo) see the blocks' convs called, also where the
    folded weights were cached before; without the hooks the blocks fold again."""
    model = randomise_(timm.create_model('mobilenetv2_050_ca')).train(training)
    base = randomise_(timm.create_model('mobilenetv2_050')).train(training)
    x = torch.randn(2, 3, 64, 64)
    if not training:
        with torch.no_grad():
            model(x)  # folded weights cached before the hooks come
    reference = copy.deepcopy(model)

    def hooked(m):
        macs, blocks = [0], []

        def count(conv, args, out):
            macs[0] += out.numel() * conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]
        handles = [c.register_forward_hook(count) for c in m.modules() if isinstance(c, nn.Conv2d)]
        handles += [b.register_forward_pre_hook(lambda b, args: blocks.append((b, args[0].shape)))
                    for b in m.modules() if isinstance(b, CoordAttention)]
        with torch.set_grad_enabled(grad):
            out = m(x)
        for h in handles:
            h.remove()
        return macs[0], blocks, out

    macs, blocks, out = hooked(model)
    base_macs, _, _ = hooked(base)
    assert len(blocks) == 16
    assert macs == base_macs + sum(_gate_flops(b, torch.empty(shape)) // 2 for b, shape in blocks)
    with torch.set_grad_enabled(grad):
        # training-mode batch norm over the strips' few positions magnifies the two paths' rounding
        torch.testing.assert_close(out, reference(x), **(dict(rtol=1e-3, atol=2e-4) if training else {}))
    if not training:
        with torch.no_grad():
            model(x)
        assert all(b._inference_params is not None for b, _ in blocks)


@pytest.mark.parametrize('training, grad', [(False, False), (False, True), (True, True)])
def test_hooked_layers_are_called_once(training, grad):
    """Attribution methods that keep a layer's input and output per call (captum's DeepLift and DeepLiftShap
    hook the sigmoid) need each layer called once a forward: the gate on both directions' logits, a_h's then
    a_w's, as the authors' block computes them."""
    ours, authors = _pair(16)
    ours.train(training)
    authors.train(training)
    x = torch.randn(2, 16, 5, 6)
    outputs = {name: [] for name, _ in ours.named_children()}
    for name, layer in ours.named_children():
        layer.register_forward_hook(lambda layer, args, out, name=name: outputs[name].append(out))
    with torch.set_grad_enabled(grad):
        ours(x.clone().requires_grad_(grad))
        h, w = x.shape[2:]
        strips = torch.cat([x.mean(3, keepdim=True), x.mean(2, keepdim=True).transpose(2, 3)], dim=2)
        y_h, y_w = authors.act(authors.bn1(authors.conv1(strips))).split([h, w], dim=2)
        expected = torch.cat([authors.conv_h(y_h).sigmoid(), authors.conv_w(y_w).sigmoid()], dim=2)
    assert {name: len(outs) for name, outs in outputs.items()} == dict.fromkeys(outputs, 1)
    torch.testing.assert_close(outputs['gate'][0], expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('global_hook', [False, True])
def test_backward_hooks_on_the_layers_fire(global_hook):
    """Full backward hooks on the block's convs (per-layer gradient monitors), the layers' own or global ones,
    fire with the gradients the authors' block, which calls its convs, gives them."""
    ours = _randomise_(CoordAttention(32)).train()
    authors = AuthorsCoordAtt(32, 32).train()
    authors.load_state_dict(ours.state_dict())  # same names: conv1, bn1, conv_h, conv_w
    x, grad = torch.randn(2, 32, 9, 6), torch.randn(2, 32, 9, 6)
    seen = []
    for block in (ours, authors):
        outputs = {}
        names = {block.get_submodule(name): name for name in ('conv1', 'conv_h', 'conv_w')}

        def hook(module, grad_input, grad_output):
            if module in names:
                outputs[names[module]] = grad_output[0].flatten()  # (N, C, W, 1) and (N, C, 1, W) alike
        handles = ([nn.modules.module.register_module_full_backward_hook(hook)] if global_hook else
                   [m.register_full_backward_hook(hook) for m in names])
        try:
            block(x.clone().requires_grad_()).backward(grad)
        finally:
            for h in handles:
                h.remove()
        seen.append(outputs)
    assert set(seen[0]) == {'conv1', 'conv_h', 'conv_w'}
    for name, expected in seen[1].items():
        torch.testing.assert_close(seen[0][name], expected, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize('channels_last', [False, True])
def test_saved_tensor_hooks_that_change_the_layout(channels_last):
    """Saved-tensor hooks may unpack another layout than x's (`save_on_cpu(pin_memory=True)` unpacks contiguous
    copies): training gives the authors' block's gradients, for a contiguous output gradient too."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    ours = _randomise_(CoordAttention(32)).train()
    authors = AuthorsCoordAtt(32, 32).train()
    authors.load_state_dict(ours.state_dict())
    x, grad = torch.randn(2, 32, 9, 6).contiguous(memory_format=memory_format), torch.randn(2, 32, 9, 6)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    contiguous_copies = (lambda t: t.detach().clone(memory_format=torch.contiguous_format), lambda t: t)
    with torch.autograd.graph.saved_tensors_hooks(*contiguous_copies):
        out = ours(xs[0])
    out.backward(grad)
    authors(xs[1]).backward(grad)
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-4, atol=1e-5)
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, authors.get_parameter(name).grad, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('training', [False, True])
def test_batched_backward(training, channels_last):
    """A batched backward (`is_grads_batched`, as vectorized jacobians run it) through the training paths gives
    the rows that backward gives one at a time; the custom backward functions run PyTorch ops there."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    block = _randomise_(CoordAttention(16)).train(training)
    x = torch.randn(2, 16, 3, 4).contiguous(memory_format=memory_format).requires_grad_()
    out = block(x)
    rows = torch.randn(5, *out.shape)
    params = [x, block.conv1.weight, block.conv_h.bias]
    looped = [torch.autograd.grad(out, params, row, retain_graph=True) for row in rows]
    batched = torch.autograd.grad(out, params, rows, is_grads_batched=True)
    for i, grads in enumerate(batched):
        torch.testing.assert_close(grads, torch.stack([g[i] for g in looped]), rtol=1e-4, atol=1e-5)


def test_vmap_runs_pytorch_ops():
    """torch.func.vmap hands the block batched tensors, which have no data pointers for the C kernels."""
    torch.manual_seed(0)
    block = CoordAttention(16).eval()
    x = torch.randn(3, 2, 16, 6, 5)
    with torch.no_grad():
        expected = torch.stack([block(xi) for xi in x])
        torch.testing.assert_close(torch.func.vmap(block)(x), expected)


def test_built_or_copied_inside_a_transform():
    """A block built or deep-copied inside a torch.func transform (a meta-learning inner loop) works as any layer
    does, there and after it (its weights then have no memory of their own to point at)."""
    block = _randomise_(CoordAttention(16)).eval()
    x = torch.randn(1, 16, 4, 5)
    copies = []

    def loss(t):
        torch.manual_seed(0)
        copies.append(copy.deepcopy(block))
        return (copies[-1](t) + CoordAttention(16).eval()(t)).sum()

    x1 = x.clone().requires_grad_()
    loss(x1).backward()
    torch.testing.assert_close(torch.func.grad(loss)(x), x1.grad)
    torch.testing.assert_close(torch.func.jacrev(loss)(x), x1.grad)
    with torch.no_grad():
        torch.testing.assert_close(copies[-1](x), block(x))


@pytest.mark.parametrize('channels_last', [False, True])
def test_torch_func_over_the_parameters_with_a_plain_input(channels_last):
    """Transforms that wrap the weights but not x (`grad` of a head's weights on fixed features, a `vmap` ensemble
    with a shared input) run the PyTorch ops: no data pointers or custom autograd.Function for wrapped weights."""
    torch.manual_seed(0)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 16, 6, 5).contiguous(memory_format=memory_format)
    blocks = [_randomise_(CoordAttention(16)) for _ in range(3)]
    authors = AuthorsCoordAtt(16, 16)
    authors.load_state_dict(blocks[0].state_dict())  # same names: conv1, bn1, conv_h, conv_w

    # grad of the weights (in eval mode: a training-mode batch norm updates its statistics, which torch.func
    # refuses), as the authors' layout computes them
    blocks[0].eval(), authors.eval()
    params = {k: v.detach() for k, v in blocks[0].named_parameters()}
    grads = torch.func.grad(lambda p: torch.func.functional_call(blocks[0], p, (x,)).square().sum())(params)
    authors(x).square().sum().backward()
    for name, g in grads.items():
        torch.testing.assert_close(g, authors.get_parameter(name).grad, rtol=1e-4, atol=1e-5, msg=name)

    # an ensemble in inference: stacked weights, one input for all
    stacked = {k: torch.stack([dict(b.named_parameters())[k].detach() for b in blocks]) for k in params}
    buffers = {k: torch.stack([dict(b.named_buffers())[k] for b in blocks]) for k, _ in blocks[0].named_buffers()}
    for b in blocks[1:]:
        b.eval()
    with torch.no_grad():
        ensemble = torch.func.vmap(
            lambda p, bufs: torch.func.functional_call(blocks[0], (p, bufs), (x,)), randomness='same')(stacked, buffers)
        torch.testing.assert_close(ensemble, torch.stack([b(x.clone()) for b in blocks]), rtol=1e-5, atol=1e-6)
