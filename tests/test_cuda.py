""" The CUDA paths, where a GPU is present (skipped elsewhere): the C kernels are CPU-only, so on CUDA
the block runs PyTorch ops throughout, in training, in folded inference, in half precision, with CA
outputs recomputed, compiled by inductor, measured by the benchmark, and trained by the CLI. """
import copy

import pytest
import torch

from timm_coordatt import CoordAttention
from timm_coordatt.model_benchmark import BenchmarkConfig, run_benchmark

from test_cli_train import _train_with
from test_coordinate_attention import SHAPES, _pair
from test_recompute import _host, check_recompute_by_default

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
CUDA = torch.device('cuda')


@pytest.fixture(autouse=True)
def exact_cuda_math():
    """IEEE float32 convolutions (cuDNN would use TF32 for the authors' convs, not for our matmuls)
    and deterministic algorithms, so gradients can be compared bit for bit."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.allow_tf32, torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = (
        False, True, False)
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def _cuda_pair(channels: int, memory_format=torch.contiguous_format):
    ours, authors = _pair(channels)
    return (m.to(CUDA, memory_format=memory_format) for m in (ours, authors))


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('training', [False, True])
@pytest.mark.parametrize('memory_format', [torch.contiguous_format, torch.channels_last])
def test_matches_authors_block(shape, training, memory_format):
    """In float64 against the authors' block on the CPU, the exact reference. PyTorch's CUDA hard-swish
    multiplies by 1/6 rounded to float32 whatever the dtype (3e-8 relative), which the gates carry
    into the output at up to 3e-7 (measured on an H200): float64 here shows the formulas are the same
    to far below float32 rounding, not to float64's."""
    torch.manual_seed(0)
    ours, authors = _pair(shape[1])
    ours.to(CUDA, torch.float64, memory_format=memory_format).train(training)
    authors.double().train(training)
    x = torch.randn(shape, dtype=torch.float64).contiguous(memory_format=memory_format)
    grad = torch.randn_like(x)
    x1, x2 = x.to(CUDA, copy=True).requires_grad_(), x.clone().requires_grad_()
    y1, y2 = ours(x1), authors(x2)
    torch.testing.assert_close(y1.cpu(), y2, rtol=2e-6, atol=1e-8)
    y1.backward(grad.to(CUDA))
    y2.backward(grad)
    pairs = [('x', x1.grad, x2.grad)] + [
        (name, p1.grad, p2.grad) for (name, p1), (_, p2) in zip(ours.named_parameters(), authors.named_parameters())]
    # conv1's bias before a train-mode BN has a gradient of rounding size only: atol from the largest
    atol = 1e-6 * max(e.abs().max().item() for _, _, e in pairs)
    for name, g, e in pairs:
        torch.testing.assert_close(g.cpu(), e, rtol=2e-6, atol=atol, msg=lambda m: f'{name}: {m}')


@pytest.mark.parametrize('shape', SHAPES + [(64, 96, 14, 14)])
@pytest.mark.parametrize('memory_format', [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize('inplace', [False, True])
def test_inference_matches_authors_block(shape, memory_format, inplace):
    """Eval without autograd: BN folded into conv1, float32, each of the inference path's branches."""
    ours, authors = _cuda_pair(shape[1], memory_format=memory_format)
    ours.eval().inplace = inplace
    authors.eval()
    x = torch.randn(shape, device=CUDA).contiguous(memory_format=memory_format)
    with torch.no_grad():
        expected = authors(x)
        x_ours = x.clone()
        y = ours(x_ours)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    assert (y.data_ptr() == x_ours.data_ptr()) == inplace


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
@pytest.mark.parametrize('training', [False, True])
def test_autocast(dtype, training):
    """Under autocast the block follows the authors' module (which autocast runs the same way) to
    half-precision rounding, forward and backward."""
    ours, authors = _cuda_pair(96)
    ours.train(training)
    authors.train(training)
    x = torch.randn(8, 96, 14, 14, device=CUDA)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast('cuda', dtype=dtype):
        y1, y2 = ours(x1), authors(x2)
    assert y1.dtype == y2.dtype
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=5e-3, atol=5e-3)
    torch.testing.assert_close(y1.float(), y2.float(), **tol)
    y1.float().square().mean().backward()
    y2.float().square().mean().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=5e-2, atol=1e-5)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_half_module_inference(dtype):
    """A module converted to half precision: folding computes in float32 and rounds once."""
    ours, authors = _cuda_pair(64)
    reference = authors.eval()
    ours = ours.to(dtype).eval()
    x = torch.randn(2, 64, 28, 28, device=CUDA)
    with torch.no_grad():
        y = ours(x.to(dtype))
        expected = reference(x)
    assert y.dtype == dtype
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=5e-3, atol=5e-3)
    torch.testing.assert_close(y.float(), expected, **tol)


@pytest.mark.parametrize('name', ['mobilenetv2_050_ca', 'mobilenext_050_ca', 'efficientnet_b0_ca'])
def test_registered_models_recompute_by_default(name):
    """As on the CPU, with CUDA's peak memory counter."""
    check_recompute_by_default(name, torch.randn(8, 3, 96, 96, device=CUDA))


@pytest.mark.parametrize('memory_format', [torch.contiguous_format, torch.channels_last])
def test_inductor(memory_format):
    """torch.compile's default backend (Triton kernels) against eager: inference and a training step."""
    torch._dynamo.reset()
    model = _host(32, blocks=2).to(CUDA, memory_format=memory_format)
    compiled = torch.compile(copy.deepcopy(model))
    x = torch.randn(4, 8, 20, 12, device=CUDA).contiguous(memory_format=memory_format)
    with torch.no_grad():
        torch.testing.assert_close(compiled.eval()(x), model.eval()(x), rtol=1e-4, atol=1e-5)
    # a random projection of the output as the loss: gradients of order one (the host ends in a
    # train-mode BN, whose normalised output's mean square has gradients of rounding size only)
    projection = torch.randn(4, 8, 20, 12, device=CUDA)

    def grads(m):
        xg = x.detach().requires_grad_()
        (m.train()(xg) * projection).sum().backward()
        return [xg.grad] + [p.grad for p in m.parameters()]

    expected = grads(model)
    # fused kernels sum in other orders: within 1e-4 of the largest gradient (a conv bias before a
    # train-mode BN has a gradient of rounding size only)
    atol = 1e-4 * max(e.abs().max().item() for e in expected)
    for i, (g, e) in enumerate(zip(grads(compiled), expected)):
        torch.testing.assert_close(g, e, rtol=1e-3, atol=atol, msg=lambda m: f'gradient {i}: {m}')


def test_benchmark_on_cuda():
    config = BenchmarkConfig(
        pairs=(('mobilenetv2_050_ca', 'mobilenetv2_050'),), img_size=64, infer_batch_sizes=(1, 4),
        train_batch_size=4, rounds=2, min_time=0., modes=('eager', 'channels_last'), threads=1, device='cuda')
    rows = run_benchmark(config)
    assert {(r.mode, r.metric) for r in rows} == {
        (mode, metric) for mode in config.modes for metric in ('infer b1', 'infer b4', 'train b4', 'train memory b4')}
    # CUDA's peak counter: at least the CA model's activations, a few MiB at this size
    assert all(r.ca_value > 0 and r.baseline_value > 0 for r in rows)
    assert all(r.ca_value > 1 for r in rows if r.unit == 'MiB')


def test_module_follows_the_device():
    """Folded inference weights cached on the CPU are dropped when the module moves to CUDA."""
    ca = CoordAttention(32).eval()
    x = torch.randn(1, 32, 6, 6)
    with torch.no_grad():
        expected = ca(x)
        torch.testing.assert_close(ca.to(CUDA)(x.to(CUDA)).cpu(), expected, rtol=1e-5, atol=1e-6)


def test_train_cli_float16(tmp_path):
    """`timm-coordatt train` on CUDA with float16 autocast and loss scaling: finite weights that moved."""
    records = _train_with(tmp_path, '--device', 'cuda', '--amp', '--amp-dtype', 'float16', '--channels-last')
    assert records[0]['train_loss'] > 0
