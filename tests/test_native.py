""" The C kernels (timm_coordatt/native.py): built, equal to the authors' block and to autograd, used
exactly where they support the block and input, and strict about what they are given. """
import copy
import ctypes
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Dict
from unittest import mock

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from authors_coordatt import AuthorsCoordAtt
from timm.layers import GroupNorm1, freeze_batch_norm_2d
from timm_coordatt import CoordAttention, coordinate_attention, native


@pytest.fixture(autouse=True)
def kernel_on(monkeypatch):
    monkeypatch.setattr(native, 'enabled', True)


class _AtenOps(TorchDispatchMode):
    """The ATen ops a block of code runs, as it runs without this mode: the block takes any active dispatch mode
    for one that must see its work (FlopCounterMode, FakeTensorMode: tests/test_coordinate_attention.py) and runs
    PyTorch ops under it, so the count of active modes it reads leaves this one out while it is on."""

    def __init__(self):
        super().__init__()
        self.ops = []
        self._uncounted = mock.patch.object(
            coordinate_attention, '_dispatch_modes', lambda: torch._C._len_torch_dispatch_stack() > 1)

    def __enter__(self):
        self._uncounted.start()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._uncounted.stop()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _aten_ops(module: nn.Module, x: torch.Tensor):
    """The ops of an inference call, after a first call has folded (and cached) the weights."""
    with torch.inference_mode():
        module(x.clone())
        with _AtenOps() as mode:
            module(x)
    return mode.ops


def _randomised(module: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5 if 'running_var' in name else
                        torch.randn(t.shape, generator=gen))
    return module.eval()


def test_kernel_is_built():
    """`pip install` compiles it wherever there is a C compiler (every CI machine has one)."""
    assert native.available()


def test_switch_turns_it_off(monkeypatch):
    monkeypatch.setattr(native, 'enabled', False)
    assert not native.available()


@pytest.mark.parametrize('value, expected', [('0', 'False'), ('false', 'False'), ('Off', 'False'), ('no ', 'False'),
                                             ('1', 'True'), ('', 'True')])
def test_environment_at_import_turns_it_off(value, expected):
    code = 'from timm_coordatt import native; print(native.available())'
    env = {**os.environ, 'TIMM_COORDATT_NATIVE': value}
    result = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == expected


def test_kernels_that_do_not_load_are_reported(tmp_path):
    """Without a compiler there are no kernels, quietly; a build that is there but does not load says so."""
    # a copy under another name: an editable install's import hook would otherwise find the original
    package = tmp_path / 'timm_coordatt_copy'
    shutil.copytree(os.path.dirname(native.__file__), package, ignore=shutil.ignore_patterns('__pycache__'))
    # this Python's build: a source tree installed editable for two Pythons holds one for each
    built = package / os.path.basename(native._native.__file__)
    code = 'from timm_coordatt_copy import native; print(native.built)'
    env = {**os.environ, 'PYTHONPATH': str(tmp_path)}

    def run():
        return subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, check=True)
    loaded = run()
    assert (loaded.stdout.strip(), loaded.stderr) == ('True', '')
    built.unlink()  # installed without a compiler, or a checkout never built (torch.hub's)
    missing = run()
    assert (missing.stdout.strip(), missing.stderr) == ('False', '')
    built.write_bytes(b'not a shared library')
    damaged = run()
    assert damaged.stdout.strip() == 'False'
    assert 'RuntimeWarning: timm_coordatt: the C kernels do not load' in damaged.stderr


# 1 x W, H x 1, 1 x 1, very non-square, rows shorter and longer than a vector (rows of up to 64
# run whole vectors of 8 to 64 over several rows, the last rows of a plane plain loops, longer rows
# plain loops throughout; the product stages 16 rows at a time, so 19, 20 and 37 rows cross that
# boundary, and takes rows of whole vectors over 16 in plain loops); C and rd (rd = 10 at C = 320)
# not multiples of the kernel's blocking (the shared conv takes rows four at a time, positions two at a
# time, and the rows past the last four, positions four at a time: rd = 10 and L = 13 leave every
# remainder); batches split over threads unevenly
SHAPES = [(1, 320, 14, 14), (1, 320, 7, 6), (3, 24, 1, 13), (2, 16, 9, 1), (5, 40, 1, 1), (1, 24, 3, 50),
          (3, 96, 7, 11), (2, 24, 5, 7), (1, 8, 37, 6), (1, 16, 19, 12), (1, 16, 19, 28), (1, 8, 20, 17),
          (2, 8, 17, 56), (1, 8, 3, 64), (1, 8, 4, 65)]
# 16 MiB and more (CA_AHEAD_MIN_BYTES): the channels_last training kernels also ask for lines ahead, up to
# each sample's end
LARGE_SHAPE = (2, 48, 210, 210)


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('inplace', [False, True])
def test_matches_authors_block(shape, channels_last, inplace):
    authors = _randomised(AuthorsCoordAtt(shape[1], shape[1]))
    ours = CoordAttention(shape[1], inplace=inplace).eval()
    ours.load_state_dict(authors.state_dict())
    x = torch.randn(shape) * 3
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():  # the reference in float64: the kernel's float32 error is rounding only
        expected = authors.double()(x.double()).float()
    # nothing but the kernel and, out of place, the output's allocation
    assert _aten_ops(ours, x.clone()) == ([] if inplace else ['empty_like'])
    with torch.inference_mode():
        y = ours(x)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
    assert (y.data_ptr() == x.data_ptr()) == inplace
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize('kwargs', [dict(bias=False), dict(norm_layer=None), dict(rd_channels=5)])
def test_options(kwargs):
    """Missing biases, no norm, a reduced width of 5: against the module's autograd path."""
    m = _randomised(CoordAttention(48, **kwargs))
    x = torch.randn(3, 48, 6, 10)
    expected = m(x)  # autograd recording: the PyTorch formulation
    assert _aten_ops(m, x) == ['empty_like']
    with torch.inference_mode():
        torch.testing.assert_close(m(x), expected, rtol=1e-5, atol=1e-5)


# samples split over threads, each whole; one sample shared by them, contiguous (a shared channels_last
# sample adds the threads' partial sums over H, rounded differently for each number of threads)
@pytest.mark.parametrize('shape, channels_last', [
    ((7, 64, 9, 9), False), ((7, 64, 9, 9), True), ((1, 320, 7, 6), False)])
def test_same_result_whatever_the_threads(shape, channels_last):
    m = _randomised(CoordAttention(shape[1]))
    x = torch.randn(shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    threads = torch.get_num_threads()
    outputs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            with torch.inference_mode():
                outputs.append(m(x))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(outputs[0], y) for y in outputs[1:])


def test_one_model_serves_python_threads_at_once():
    """An inference server's threads call one model at once (the kernels release the GIL): each call's
    strips and gates stay its own (each thread has its workspace, sized for its inputs) and the folded
    weights are shared; every output equal to the same call made alone."""
    m = _randomised(CoordAttention(96)).eval()
    inputs = [torch.randn(n, 96, h, w) for n, h, w in [(1, 56, 56), (1, 7, 7), (3, 14, 14), (1, 28, 5), (2, 9, 30)]]
    inputs += [x.contiguous(memory_format=torch.channels_last) for x in inputs]
    with torch.inference_mode():
        expected = [m(x) for x in inputs]
    start = threading.Barrier(len(inputs))

    def serve(i: int) -> bool:
        start.wait()
        with torch.inference_mode():
            return all(torch.equal(m(inputs[i]), expected[i]) for _ in range(30))

    with ThreadPoolExecutor(len(inputs)) as pool:
        assert list(pool.map(serve, range(len(inputs)))) == [True] * len(inputs)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        'arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks', 'fsmblks', 'uordblks', 'fordblks', 'keepcost')]


def test_threads_that_end_free_their_workspaces():
    """A server with a thread per request: each thread (and the OpenMP workers of its parallel regions) grows a
    workspace in the kernels, which must be freed when the thread ends. glibc's count of allocated bytes
    (mallinfo2: in use in every arena, and mapped), not RSS, which freed memory kept by the allocator inflates."""
    libc = ctypes.CDLL(None)
    if not hasattr(libc, 'mallinfo2'):
        pytest.skip('needs glibc >= 2.33 (mallinfo2)')
    libc.mallinfo2.restype = _MallInfo2

    def allocated_mib() -> float:
        info = libc.mallinfo2()
        return (info.uordblks + info.hblkhd) / 2 ** 20

    m = _randomised(CoordAttention(256)).eval()
    inputs = [torch.randn(1, 256, 56, 56), torch.randn(2, 256, 56, 56)]  # a team on one sample, a sample a thread

    def request():
        with torch.inference_mode():
            for x in inputs:
                m(x)

    def requests(count: int):
        for _ in range(count):
            thread = threading.Thread(target=request)
            thread.start()
            thread.join()

    requests(5)
    before = allocated_mib()
    requests(50)
    # each thread's workspaces take about 0.8 MiB: 39 MiB kept before they were freed
    assert allocated_mib() - before < 10


def test_kernel_runs_in_torchs_openmp_threads():
    """torch's CPU wheels bring an OpenMP runtime: the kernels share its threads."""
    assert native._native.threading() == 'openmp'


def test_pthreads_without_an_openmp_runtime():
    """Loaded where no OpenMP runtime is (a process without torch), the kernels split samples over
    pthreads of their own: here the gate product of 5 samples on 3 threads, against torch's."""
    n, c, h, w = 5, 3, 2, 4
    x, a_h, a_w = _gates((n, c, h, w), channels_last=False)
    client = textwrap.dedent(f"""
        import array, importlib.util, json, sys
        spec = importlib.util.spec_from_file_location('timm_coordatt._native', {native._native.__file__!r})
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        x, a_h, a_w = (array.array('f', values) for values in json.loads(sys.stdin.read()))
        out = array.array('f', bytes(4 * len(x)))
        address = lambda a: a.buffer_info()[0]
        module.gate(address(x), address(a_h), address(a_w), address(out), {n}, {c}, {h}, {w}, False, 3)
        print(json.dumps([module.threading(), 'torch' in sys.modules, out.tolist()]))
    """)
    inputs = json.dumps([t.flatten().tolist() for t in (x, a_h, a_w)])
    proc = subprocess.run([sys.executable, '-c', client], input=inputs, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    threading, torch_loaded, out = json.loads(proc.stdout)
    assert (threading, torch_loaded) == ('pthreads', False)
    assert torch.equal(torch.tensor(out).view(n, c, h, w), torch.mul(x, a_h).mul_(a_w))


@pytest.mark.parametrize('channels_last', [False, True])
def test_fewer_samples_than_threads(channels_last):
    """Then the threads share each sample (channels, rows, conv rows), also more threads than rows or
    channel blocks; against the authors' block in float64."""
    authors = _randomised(AuthorsCoordAtt(40, 40))
    ours = CoordAttention(40).eval()
    ours.load_state_dict(authors.state_dict())
    threads = torch.get_num_threads()
    try:
        for shape in [(1, 40, 9, 13), (2, 40, 1, 6), (1, 40, 3, 2)]:
            x = torch.randn(shape) * 3
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                expected = authors.double()(x.double()).float()
            for n in (1, 2, 3, 5):
                torch.set_num_threads(n)
                with torch.inference_mode():
                    torch.testing.assert_close(ours(x), expected, rtol=1e-4, atol=1e-4)
    finally:
        torch.set_num_threads(threads)


def _fallbacks():
    """Module and input the kernel does not cover; each must run PyTorch ops."""
    x = torch.randn(2, 32, 8, 6)
    plain = _randomised(CoordAttention(32))
    return {
        'float64': (_randomised(CoordAttention(32).double()), x.double()),
        'bfloat16': (_randomised(CoordAttention(32)).bfloat16(), x.bfloat16()),
        'relu': (_randomised(CoordAttention(32, act_layer='relu')), x),
        'hard_sigmoid gate': (_randomised(CoordAttention(32, gate_layer='hard_sigmoid')), x),
        'group norm': (_randomised(CoordAttention(32, norm_layer=GroupNorm1)), x),
        'batch statistics': (
            _randomised(CoordAttention(32, norm_layer=partial(nn.BatchNorm2d, track_running_stats=False))), x),
        'strided input': (plain, x.transpose(2, 3)),
        'empty batch': (plain, x[:0]),
    }


@pytest.mark.parametrize('case', list(_fallbacks()))
def test_unsupported_blocks_and_inputs_run_pytorch_ops(case):
    module, x = _fallbacks()[case]
    ops = _aten_ops(module, x)
    assert any(op in ops for op in ('mm', 'bmm', 'baddbmm', 'sum', 'linear', 'addmm', 'native_group_norm')), ops


def test_training_and_autograd_run_pytorch_ops():
    m = _randomised(CoordAttention(32))
    x = torch.randn(2, 32, 8, 6)
    for training, grad in [(True, False), (False, True)]:
        m.train(training)
        with torch.set_grad_enabled(grad), _AtenOps() as mode:
            m(x)
        assert 'sigmoid' in mode.ops


def test_turned_off_runs_pytorch_ops(monkeypatch):
    m = _randomised(CoordAttention(32))
    monkeypatch.setattr(native, 'enabled', False)
    assert 'sigmoid' in _aten_ops(m, torch.randn(2, 32, 8, 6))


def test_kernel_weights_keep_their_memory():
    # a block without a norm hands over its conv1 bias parameter itself: replacing the parameter's `.data`
    # must not free what the kernel reads, whatever takes the freed memory after
    torch.manual_seed(0)
    w1, b1, wg, bg = torch.randn(8, 16), nn.Parameter(torch.randn(8)), torch.randn(8, 32), torch.randn(32)
    weights = native.InferenceWeights(w1, b1, wg, bg)
    x = torch.randn(2, 16, 5, 6)
    expected = native.coord_attention_inference(x, torch.empty_like(x), weights)
    b1.data = torch.zeros(8)
    junk = [torch.full((8,), 100.0) for _ in range(50)]  # noqa: F841  (where the old bias was)
    torch.testing.assert_close(native.coord_attention_inference(x, torch.empty_like(x), weights), expected,
                               rtol=0, atol=0)


@pytest.mark.parametrize('move', ['share_memory_', 'queue'])
def test_folded_weights_survive_a_move_to_shared_memory(move):
    """Without a norm nothing is folded into conv1: its weights must still be the kernel's own copies, since
    moving a parameter's storage to shared memory (as torch.multiprocessing does to a tensor sent to another
    process) frees its memory with no version bump, and later calls read them unchecked."""
    torch.manual_seed(0)
    m = _randomised(CoordAttention(256, norm_layer=None)).eval()
    reference = copy.deepcopy(m)
    x = torch.randn(2, 256, 14, 14)
    with torch.inference_mode():
        m(x)
        m(x)  # the folded weights cached and checked
    if move == 'share_memory_':
        for p in m.parameters():
            p.share_memory_()
    else:
        torch.multiprocessing.get_context('spawn').SimpleQueue().put(m.state_dict())
    assert m.conv1.weight.untyped_storage().is_shared()
    junk = [torch.full_like(p, 1e3) for p in m.parameters() for _ in range(20)]  # noqa: F841  (in the freed memory)
    with torch.inference_mode():
        torch.testing.assert_close(m(x), reference(x), rtol=0, atol=0)


def test_kernel_checks_its_arguments():
    w1, b1, wg, bg = torch.randn(8, 8), torch.randn(8), torch.randn(8, 16), torch.randn(16)
    with pytest.raises(ValueError, match='float32 CPU tensors, got w1: torch.float64'):
        native.InferenceWeights(w1.double(), b1, wg, bg)
    with pytest.raises(ValueError, match=r'w_gates_t of shape \(8, 16\), got \(16, 8\)'):
        native.InferenceWeights(w1, b1, wg.t().contiguous(), bg)
    with pytest.raises(ValueError, match='contiguous float32 CPU tensors, got w1'):
        native.InferenceWeights(w1.t(), b1, wg, bg)
    weights = native.InferenceWeights(w1, b1, wg, bg)
    x = torch.randn(2, 8, 4, 5)
    call = native.coord_attention_inference
    with pytest.raises(ValueError,
                       match=r'float32 CPU \(N, 8, H, W\) x, contiguous or channels_last, got torch.float64'):
        call(x.double(), x.double(), weights)
    with pytest.raises(ValueError, match=r'shape \(2, 9, 4, 5\)'):
        call(torch.randn(2, 9, 4, 5), torch.randn(2, 9, 4, 5), weights)
    with pytest.raises(ValueError, match='out laid out as x'):
        call(x, torch.empty(2, 8, 5, 4), weights)
    with pytest.raises(ValueError, match='out laid out as x'):
        call(x, torch.empty_like(x, memory_format=torch.channels_last), weights)
    with pytest.raises(ValueError, match='contiguous or channels_last, got .* strides'):
        call(x.transpose(2, 3), torch.empty(2, 8, 5, 4), weights)
    with pytest.raises(ValueError, match=r'non-empty .* shape \(0, 8, 4, 5\)'):
        call(x[:0], x[:0], weights)


# training: the gate product and its backward

def _gates(shape, channels_last: bool):
    n, c, h, w = shape
    x, a_h, a_w = torch.randn(shape), torch.rand(n, c, h, 1), torch.rand(n, c, 1, w)
    if channels_last:
        x, a_h, a_w = (t.contiguous(memory_format=torch.channels_last) for t in (x, a_h, a_w))
    return x, a_h, a_w


def _assert_gate_gradients_close(grad_a_h, grad_a_w, x, a_h, a_w, grad):
    """The gates' gradients, each a sum of W (or H) terms x * grad * the other gate, against those sums in
    float64, within 1e-5 of the sum of the terms' magnitudes: float32 summation error grows with that, not
    with the result, so a tolerance relative to the result fails at random where the terms cancel. A wrong
    or missing term is off by about 1/W (1/H) of that sum."""
    x, a_h, a_w, grad = (t.double() for t in (x, a_h, a_w, grad))
    for name, ours, terms, dim in (('grad_a_h', grad_a_h, x * grad * a_w, 3),
                                   ('grad_a_w', grad_a_w, x * grad * a_h, 2)):
        error = (ours.double() - terms.sum(dim, keepdim=True)).abs()
        bound = 1e-5 * terms.abs().sum(dim, keepdim=True)
        assert (error <= bound).all(), f'{name}: the largest error {(error / bound).max():.2f}x its bound'


@pytest.mark.parametrize('shape', SHAPES + [LARGE_SHAPE])
@pytest.mark.parametrize('channels_last', [False, True])
def test_gate_kernels_match_autograd(shape, channels_last):
    x, a_h, a_w = _gates(shape, channels_last)
    assert native.gate_supported(x, a_h, a_w)
    # bit for bit the PyTorch product, so that recompute_ca_outputs() rebuilds the same tensor
    assert torch.equal(native.gate(x, a_h, a_w), torch.mul(x, a_h).mul_(a_w))
    grad = torch.randn_like(x)
    leaves = [t.clone().requires_grad_() for t in (x, a_h, a_w)]
    (leaves[0] * leaves[1] * leaves[2]).backward(grad)
    grads = native.gate_backward(x, a_h, a_w, grad)
    torch.testing.assert_close(grads[0], leaves[0].grad, rtol=1e-5, atol=1e-5)
    _assert_gate_gradients_close(grads[1], grads[2], x, a_h, a_w, grad)
    for ours, expected in zip(grads, leaves):
        assert ours.stride() == expected.stride()


class _FullSizeOps(_AtenOps):
    """The ops that return a tensor of `shape` (full-size products and their gradients)."""

    def __init__(self, shape):
        super().__init__()
        self.shape = shape

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.shape == self.shape:
            self.ops.append(func.overloadpacket.__name__)
        return out


def _strips_reference(x: torch.Tensor) -> torch.Tensor:
    """Both strips as the paper writes them: average pools to (H, 1) and (1, W), side by side."""
    return torch.cat([x.mean(3), x.mean(2)], dim=2)


@pytest.mark.parametrize('shape', SHAPES + [LARGE_SHAPE])
@pytest.mark.parametrize('channels_last', [False, True])
def test_strip_kernels_match_autograd(shape, channels_last):
    x, a_h, a_w = _gates(shape, channels_last)
    strips = native.strips(x)
    torch.testing.assert_close(strips, _strips_reference(x), rtol=1e-5, atol=1e-6)
    grad_strips, grad = torch.randn(strips.shape), torch.randn_like(x)
    # the pooling's gradient alone, then with the gate product's added in the same pass
    leaf = x.clone().requires_grad_()
    _strips_reference(leaf).backward(grad_strips)
    grad_x = native.strips_backward(grad_strips, x.shape, channels_last)
    torch.testing.assert_close(grad_x, leaf.grad, rtol=1e-5, atol=1e-6)
    assert grad_x.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    leaf = x.clone().requires_grad_()
    torch.autograd.backward([_strips_reference(leaf), leaf * a_h * a_w], [grad_strips, grad])
    grad_x = native.strips_backward(grad_strips, x.shape, channels_last, (grad, a_h, a_w))
    torch.testing.assert_close(grad_x, leaf.grad, rtol=1e-5, atol=1e-5)
    # the gate kernel leaves x's gradient to it then, and still gives the gates'
    grad_x, grad_a_h, grad_a_w = native.gate_backward(x, a_h, a_w, grad, with_grad_x=False)
    assert grad_x is None
    _assert_gate_gradients_close(grad_a_h, grad_a_w, x, a_h, a_w, grad)


@pytest.mark.parametrize('shape', [(2, 8, 6, 7), (1, 16, 5, 14), (1, 8, 4, 28)])
def test_gate_gradients_keep_each_row_to_itself(shape):
    # short rows are read in whole vectors running on into the next row: infinities at the start of
    # rows 1 and 3 must reach only the sums that contain them (their rows', column 0's), as autograd's do
    x, a_h, a_w = _gates(shape, channels_last=False)
    x[:, :, 1::2, 0] = float('inf')
    grad = torch.randn_like(x)
    _, grad_a_h, grad_a_w = native.gate_backward(x, a_h, a_w, grad, with_grad_x=False)
    gates = [t.clone().requires_grad_() for t in (a_h, a_w)]
    (x * gates[0] * gates[1]).backward(grad)
    assert grad_a_h[:, :, 0::2].isfinite().all() and grad_a_w[..., 1:].isfinite().all()
    torch.testing.assert_close(grad_a_h, gates[0].grad, rtol=1e-5, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(grad_a_w, gates[1].grad, rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize('shape', [(2, 8, 7, 7), (1, 8, 37, 6), (2, 16, 9, 1), (1, 8, 5, 14)])
def test_pooling_keeps_each_row_to_itself(shape):
    # short rows are pooled in whole vectors running on into the next row (and, up to 8 elements, eight
    # rows summed at once): infinities at the start of odd rows must reach only their rows' means and
    # column 0's
    x = torch.randn(shape)
    x[:, :, 1::2, 0] = float('inf')
    strips = native.strips(x)
    h = shape[2]
    assert strips[:, :, 1:h:2].isinf().all() and strips[:, :, 0:h:2].isfinite().all()
    assert strips[:, :, h].isinf().all() and strips[:, :, h + 1:].isfinite().all()
    torch.testing.assert_close(strips, _strips_reference(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('shape', [(2, 8, 6, 7), (1, 16, 5, 14)])
def test_input_gradient_keeps_each_row_to_itself(shape):
    # x's gradient on short rows is stored in whole vectors running on into the next row, which then
    # overwrites them: infinities at the start of rows 1 and 3 of the incoming gradient stay there
    x, a_h, a_w = _gates(shape, channels_last=False)
    grad = torch.randn_like(x)
    grad[:, :, 1::2, 0] = float('inf')
    n, c, h, w = shape
    grad_strips = torch.randn(n, c, h + w)
    grad_x = native.strips_backward(grad_strips, x.shape, False, (grad, a_h, a_w))
    leaf = x.clone().requires_grad_()
    torch.autograd.backward([_strips_reference(leaf), leaf * a_h * a_w], [grad_strips, grad])
    assert grad_x[:, :, 0::2].isfinite().all() and grad_x[..., 1:].isfinite().all()
    torch.testing.assert_close(grad_x, leaf.grad, rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize('shape', SHAPES + [LARGE_SHAPE])
@pytest.mark.parametrize('channels_last', [False, True])
def test_input_gradient_written_over_the_gradient(shape, channels_last):
    # x's gradient written over the product's gradient, as training does where autograd owns it: the
    # same bits as into a new tensor (short rows' whole-vector stores would overwrite the next row's
    # gradient before it is read)
    x, a_h, a_w = _gates(shape, channels_last)
    n, c, h, w = shape
    grad, grad_strips = torch.randn_like(x), torch.randn(n, c, h + w)
    grad[:, :, 1::2, 0] = float('inf')
    expected = native.strips_backward(grad_strips, x.shape, channels_last, (grad, a_h, a_w))
    buffer = grad.clone()
    grad_x = native.strips_backward(grad_strips, x.shape, channels_last, (buffer, a_h, a_w), over_grad=True)
    assert grad_x.data_ptr() == buffer.data_ptr()
    assert torch.equal(grad_x, expected)
    with pytest.raises(ValueError, match=r'expected gated = \(grad, a_h, a_w\) to write over, got None'):
        native.strips_backward(grad_strips, x.shape, channels_last, over_grad=True)


def _block_and_reference(channels: int = 16):
    ours = _randomised(CoordAttention(channels)).train()
    authors = _randomised(AuthorsCoordAtt(channels, channels)).train()
    authors.load_state_dict(ours.state_dict())
    return ours, authors


@pytest.mark.skipif(not hasattr(torch.Tensor, '_use_count'), reason='this torch cannot tell who holds a tensor')
@pytest.mark.parametrize('shape', [(2, 16, 7, 7), (2, 16, 12, 20)])
@pytest.mark.parametrize('channels_last', [False, True])
def test_input_gradient_takes_the_gradient_autograd_owns(shape, channels_last):
    # the block's output feeds one layer, whose backward makes a gradient no one else holds: x's
    # gradient is written over it (and autograd then hands that tensor on as x.grad)
    ours, authors = _block_and_reference(shape[1])
    x = torch.randn(shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    seen = []
    y = ours(x1)
    y.register_hook(lambda g: seen.append(g.data_ptr()))  # the address only: a reference would share it
    y.tanh().sum().backward()
    authors(x2).tanh().sum().backward()
    assert x1.grad.data_ptr() == seen[0]
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-5)


def _shared_gradient_cases():
    """Ways the gradient of a block's output is held elsewhere too: functions of the block, x and another
    input z returning what backward starts from, its gradient (None: a scalar's) and the tensors that must
    come out of backward as they do with the authors' block. z's layers come first, so that autograd runs
    theirs after the block's."""
    def add(block, x, z):  # an add hands its two inputs the same gradient tensor
        t = z.tanh()
        return (block(x) + t).tanh().sum(), None, []

    def cat(block, x, z):  # cat's backward hands out views of one tensor (in x's layout: the kernels')
        t = z.tanh()
        return torch.cat([t, block(x)]).tanh().sum(), None, []

    def kept_by_hook(block, x, z):
        y, kept = block(x), []
        y.register_hook(kept.append)
        return y.tanh().sum(), None, kept

    def users(block, x, z):  # a user's gradient for the output itself, in its layout
        y = block(x)
        grad = torch.empty_like(y).copy_(torch.linspace(-1, 1, y.numel()).view(y.shape))
        return y, grad, [grad]
    return [add, cat, kept_by_hook, users]


@pytest.mark.parametrize('case', _shared_gradient_cases(), ids=lambda f: f.__name__)
@pytest.mark.parametrize('channels_last', [False, True])
def test_input_gradient_leaves_gradients_held_elsewhere(case, channels_last):
    ours, authors = _block_and_reference()
    x, z = torch.randn(2, 16, 7, 9), torch.randn(2, 16, 7, 9)
    if channels_last:
        x, z = (t.contiguous(memory_format=torch.channels_last) for t in (x, z))
    results = []
    for block in (ours, authors):
        leaves = [t.clone().requires_grad_() for t in (x, z)]
        out, grad, held = case(block, *leaves)
        out.backward(grad)
        results.append([t.grad for t in leaves] + held)
    for got, expected in zip(*results):
        if expected is not None:
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('shape', [(2, 8, 6, 7), (1, 16, 5, 14), (1, 8, 4, 28), (2, 8, 3, 3)])
def test_gate_rows_keep_each_channel_to_itself(shape):
    # a_w's rows and the strips' gradient's are read in whole vectors running on into the next
    # channel's: infinities at the start of odd channels' must reach only those channels' results
    x, a_h, a_w = _gates(shape, channels_last=False)
    n, c, h, w = shape
    a_w[:, 1::2, :, 0] = float('inf')
    grad, grad_strips = torch.randn_like(x), torch.randn(n, c, h + w)
    grad_strips[:, 1::2, 0] = float('inf')
    out = native.gate(x, a_h, a_w)
    _, grad_a_h, grad_a_w = native.gate_backward(x, a_h, a_w, grad, with_grad_x=False)
    grad_x = native.strips_backward(grad_strips, x.shape, False, (grad, a_h, a_w))
    leaf, gates = x.clone().requires_grad_(), [t.clone().requires_grad_() for t in (a_h, a_w)]
    expected_out = leaf * gates[0] * gates[1]
    torch.autograd.backward([_strips_reference(leaf), expected_out], [grad_strips, grad])
    for name, got, expected in [('out', out, expected_out), ('grad_a_h', grad_a_h, gates[0].grad),
                                ('grad_a_w', grad_a_w, gates[1].grad), ('grad_x', grad_x, leaf.grad)]:
        assert got[:, 0::2].isfinite().all(), name
        torch.testing.assert_close(got[:, 0::2], expected[:, 0::2].detach(), rtol=1e-5, atol=1e-5, msg=name)


def test_strip_kernels_check_their_arguments():
    x, a_h, a_w = _gates((2, 8, 4, 5), channels_last=False)
    with pytest.raises(ValueError, match='contiguous or channels_last, got torch.float32 on cpu, shape'):
        native.strips(x.transpose(2, 3))
    with pytest.raises(ValueError,
                       match=r'grad_strips of shape \(2, 8, 9\), got torch.float32 on cpu, shape \(2, 8, 8\)'):
        native.strips_backward(torch.randn(2, 8, 8), x.shape, False)
    with pytest.raises(ValueError, match='a_h and a_w in the layout of the input'):
        native.strips_backward(torch.randn(2, 8, 9), x.shape, True, (x, a_h, a_w))
    assert not native.strips_supported(x.double())


@pytest.mark.parametrize('channels_last', [False, True])
def test_gradient_for_the_input_alone(channels_last):
    """`autograd.grad` for x only (the gates' parameters not asked for): x's gradient still comes
    whole from the pooling's backward, as with PyTorch ops."""
    m = _randomised(CoordAttention(24)).train()
    x = torch.randn(3, 24, 6, 9)
    if channels_last:
        m, x = m.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    grad = torch.randn_like(x)
    grads = {}
    for use_native in (True, False):
        m.use_native_kernel = use_native
        (grads[use_native],) = torch.autograd.grad(m(x), x, grad)
    torch.testing.assert_close(grads[True], grads[False], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('channels_last', [False, True])
def test_training_step_uses_gate_kernels(channels_last):
    x = torch.randn(4, 48, 10, 6)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ops = {}
    for use_native in (True, False):
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        m = _randomised(CoordAttention(48)).train().to(memory_format=memory_format)
        m.use_native_kernel = use_native
        xr = x.clone().requires_grad_()
        with _FullSizeOps(x.shape) as mode:
            m(xr).backward(torch.randn_like(x).contiguous(memory_format=memory_format))
        ops[use_native] = mode.ops
    # PyTorch ops: x * a_h, the product's gradient products, the sum of x's two gradients; the
    # kernels: no full-size op but the output's and x's gradient's allocations
    assert 'mul' in ops[False] and 'add' in ops[False]
    assert [op for op in ops[True] if op not in ('empty_like', 'empty', 'randn_like', 'detach')] == [], ops[True]


def _train_step(m: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    """Output, x's and every parameter's gradient and the buffers after one training forward and backward."""
    x = x.clone().requires_grad_()
    out = m(x)
    out.backward(grad)
    return (out.detach(), x.grad, {k: p.grad for k, p in m.named_parameters()},
            {k: b.clone() for k, b in m.named_buffers()})


@pytest.mark.parametrize('norm', ['batch', 'batch_eval', 'cumulative', 'frozen', 'none'])
@pytest.mark.parametrize('bias', [True, False])
@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('shape,threads', [((4, 48, 10, 6), 2), ((3, 100, 7, 9), 2), ((2, 96, 5, 4), 3),
                                           ((5, 40, 3, 11), 1)])
def test_strip_mlp_kernels_match_pytorch(shape, threads, channels_last, bias, norm):
    """The MLP on the strips in the C kernels (`_StripMLP`) against the PyTorch formulation: output, every
    gradient and the norm's running statistics (also with momentum None, frozen in eval mode, and
    torchvision's FrozenBatchNorm2d, as `timm.layers.freeze_batch_norm_2d` leaves it)."""
    c = shape[1]
    m = CoordAttention(c, reduction=8, bias=bias, norm_layer=None if norm == 'none' else nn.BatchNorm2d)
    m = _randomised(m).train()  # widths: rd = 12, 12, 12, 8 (rows not in fours, channels not in 32s)
    if norm == 'batch_eval':
        m.bn1.eval()  # frozen statistics, as when fine-tuning detection backbones
    if norm == 'cumulative':
        m.bn1.momentum = None
    if norm == 'frozen':
        m = freeze_batch_norm_2d(m)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    gen = torch.Generator().manual_seed(1)
    x, grad = (torch.randn(shape, generator=gen).contiguous(memory_format=memory_format) for _ in range(2))
    reference = copy.deepcopy(m)
    reference.use_native_kernel = False
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)  # 3 threads for 2 samples: the weights' sums over fewer rows than threads
    try:
        ours, expected = _train_step(m, x, grad), _train_step(reference, x, grad)
        ours_again, expected_again = _train_step(m, x, grad), _train_step(reference, x, grad)  # the updated statistics
    finally:
        torch.set_num_threads(previous)
    for got, want in ((ours, expected), (ours_again, expected_again)):
        # float32 sums in other orders, the kernels' exp: x's gradient of about unit size differs by up to 4e-5
        torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-4)
        assert got[2].keys() == want[2].keys()
        for name in want[2]:
            torch.testing.assert_close(got[2][name], want[2][name], rtol=1e-4, atol=1e-4, msg=lambda e: f'{name}: {e}')
        for name in want[3]:
            torch.testing.assert_close(got[3][name], want[3][name], rtol=1e-5, atol=1e-6, msg=lambda e: f'{name}: {e}')


@pytest.mark.parametrize('channels_last,size,kernels', [
    (False, 9, True), (True, 9, True), (False, 15, False), (True, 15, True)])
def test_training_runs_the_strip_mlp_in_the_kernels(channels_last, size, kernels):
    """No matmul, conv, activation or norm op of the strips' MLP but torch's batch norm, forward and backward;
    PyTorch's ops where the block has other layers, and for contiguous inputs with H + W over 28."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(4, 32, size, size + 1).contiguous(memory_format=memory_format).requires_grad_()
    mlp_ops = {'bmm', 'baddbmm', 'mm', 'addmm', 'convolution', 'sigmoid', 'hardswish', 'sigmoid_backward',
               'hardswish_backward'}
    blocks = {'paper': (CoordAttention(32), kernels), 'relu': (CoordAttention(32, act_layer=nn.ReLU), False),
              'group_norm': (CoordAttention(32, norm_layer=GroupNorm1), False),
              'frozen_norm': (freeze_batch_norm_2d(CoordAttention(32)), kernels)}
    for name, (m, expect_kernels) in blocks.items():
        m = _randomised(m).train()
        with _AtenOps() as mode:
            m(x).backward(torch.randn_like(x))
        ran = set(mode.ops) & mlp_ops
        assert (ran == set()) == expect_kernels, (name, ran)
        if expect_kernels:
            assert {'native_batch_norm', 'native_batch_norm_backward'} <= set(mode.ops)


def test_strip_mlp_kernels_check_their_arguments():
    s, w1 = torch.randn(2, 9, 16), torch.randn(8, 16)
    with pytest.raises(ValueError, match=r'w_gates_t a contiguous float32 CPU tensor of shape \(8, 32\), got '
                                         r'torch.float32 on cpu, shape \(32, 8\)'):
        native.strip_mlp_forward(s, 4, w1, None, lambda y: y, torch.randn(32, 8), None)
    with pytest.raises(ValueError, match=r'expected s a contiguous float32 CPU tensor'):
        native.strip_mlp_forward(s.double(), 4, w1, None, lambda y: y, torch.randn(8, 32), None)
    with pytest.raises(ValueError, match=r'expected z a contiguous float32 CPU tensor of shape \(2, 8, 9\)'):
        native.strip_mlp_forward(s, 4, w1, None, lambda y: y[:, :4], torch.randn(8, 32), None)


def test_gate_backward_falls_back_for_other_gradient_layouts():
    """A gradient laid out unlike x (channels_last here) takes the PyTorch backward, with the same result."""
    authors = _randomised(AuthorsCoordAtt(32, 32)).train()
    ours = CoordAttention(32).train()
    ours.load_state_dict(authors.state_dict())
    x = torch.randn(3, 32, 7, 5)
    grad = torch.randn_like(x).contiguous(memory_format=torch.channels_last)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours(x1).backward(grad)
    authors(x2).backward(grad)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('frozen_norm', ['no', 'eval_mode', 'frozen_batch_norm'])
def test_double_backward_runs_pytorch_ops(frozen_norm):
    m = _randomised(CoordAttention(16)).train()
    if frozen_norm == 'eval_mode':
        m.bn1.eval()
    if frozen_norm == 'frozen_batch_norm':
        m = freeze_batch_norm_2d(m)
    x = torch.randn(2, 16, 5, 4, requires_grad=True)
    grads = {}
    for use_native in (True, False):
        m.use_native_kernel = use_native
        y = m(x)
        (g,) = torch.autograd.grad(y, x, torch.ones_like(y), create_graph=True)
        (gg,) = torch.autograd.grad(g.square().sum(), x)
        grads[use_native] = (g.detach(), gg)
    for a, b in zip(grads[True], grads[False]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_gate_kernels_check_their_arguments():
    x, a_h, a_w = _gates((2, 8, 4, 5), channels_last=False)
    with pytest.raises(ValueError, match=r'a_h \(N, C, H, 1\)'):
        native.gate(x, a_w, a_h)
    with pytest.raises(ValueError, match='all contiguous or all channels_last'):
        native.gate(x.contiguous(memory_format=torch.channels_last), a_h, a_w)
    with pytest.raises(ValueError, match='expected grad laid out as x'):
        native.gate_backward(x, a_h, a_w, torch.randn(2, 8, 5, 4).transpose(2, 3))
    assert not native.gate_supported(x.double(), a_h.double(), a_w.double())


def _vm_flags(address: int) -> list:
    """The VmFlags of the mapping holding `address` (Linux /proc/self/smaps)."""
    with open('/proc/self/smaps') as f:
        inside = False
        for line in f:
            head = line.split()[0]
            if '-' in head and not head.endswith(':'):
                start, end = (int(v, 16) for v in head.split('-'))
                inside = start <= address < end
            elif inside and head == 'VmFlags:':
                return line.split()[1:]
    raise AssertionError(f'no mapping holds {address:#x}')


@pytest.mark.skipif(not os.path.exists('/proc/self/smaps'), reason='needs Linux /proc/self/smaps')
def test_fresh_large_outputs_keep_the_default_pages():
    """A fresh output is left to the system's paging, as PyTorch's own ops leave theirs: advised into
    transparent huge pages, its first writes stalled on the kernel's compaction of memory (a 154 MB
    training product 10-164 ms against 41-48 ms in 4 kB pages, the models' training steps 1-7 points
    slower in 12 of 13 in-process A/Bs)."""
    import mmap
    block = CoordAttention(64).eval()
    x = torch.randn(4, 64, 128, 128)  # 16 MiB
    mapping = mmap.mmap(-1, x.numel() * 4 + (2 << 20))  # a mapping of its own, untouched
    try:
        out = torch.frombuffer(mapping, dtype=torch.float32, count=x.numel()).view(x.shape)
        native.coord_attention_inference(x, out, block._folded_params().native)
        with torch.no_grad():
            torch.testing.assert_close(out, block(x))
        assert 'hg' not in _vm_flags(out.data_ptr() + (4 << 20))
        del out
    finally:
        mapping.close()


def test_model_gradients_as_close_to_float64_with_the_kernels():
    """One training step of a registered CA model (the main job's, at its 48 px): with all the C kernels each
    parameter's gradient is about as close to a float64 model's as with PyTorch's ops only: rounding, not
    another function. The host blocks take SiLU: with ReLU6, an activation within rounding of a clip point
    takes the other branch in float32 than in float64 for one set of kernels and not the other, moving
    gradients by up to 1% (seen with PyTorch's ops too, at other seeds). Float32 alone is 1e-5 to 3e-4 off
    here, the kernels within a third of that bound, so this catches errors of a few hundredths of a percent.
    (The convs' biases before a norm, whose exact gradients are 0, are left out.)"""
    torch.manual_seed(0)
    model = timm.create_model('mobilenetv2_050_ca', num_classes=9, act_layer='silu').train()
    x, y = torch.randn(8, 3, 48, 48), torch.randint(0, 9, (8,))

    def gradients(dtype: torch.dtype, kernels: bool) -> Dict[str, torch.Tensor]:
        m = copy.deepcopy(model).to(dtype)
        enabled, native.enabled = native.enabled, kernels
        try:
            F.cross_entropy(m(x.to(dtype)), y).backward()
        finally:
            native.enabled = enabled
        return {n: p.grad.double() for n, p in m.named_parameters()}

    exact = gradients(torch.float64, False)
    with_kernels, with_ops = gradients(torch.float32, True), gradients(torch.float32, False)
    largest = max(g.norm() for g in exact.values())
    for name, g in exact.items():
        if g.norm() < 1e-6 * largest:
            continue
        error_kernels, error_ops = ((grads[name] - g).norm() / g.norm() for grads in (with_kernels, with_ops))
        assert error_kernels <= 3 * max(error_ops, 1e-4), (name, float(error_kernels), float(error_ops))
