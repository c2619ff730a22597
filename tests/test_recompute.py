""" `recompute_ca_outputs` and the registered models' default (`set_recompute_ca_outputs`): same gradients,
less memory held for backward, no silent staleness, no scope outliving a forward. """
import contextlib
import copy
import gc
import weakref

import pytest
import timm
import torch
from torch import nn

from timm_coordatt import CoordAttention, recompute_ca_outputs, set_recompute_ca_outputs
from timm_coordatt.model_benchmark import peak_memory
from timm_coordatt.recompute import _pack, recompute_active


def _host(channels: int = 32, blocks: int = 1) -> nn.Module:
    """CA blocks between two convs, as in inverted residuals: the 1x1 conv after each saves its input."""
    torch.manual_seed(0)
    return nn.Sequential(*[
        nn.Sequential(
            nn.Conv2d(8, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU6(inplace=True),
            CoordAttention(channels), nn.Conv2d(channels, 8, 1), nn.BatchNorm2d(8))
        for _ in range(blocks)])


def _grads(model: nn.Module, x: torch.Tensor, context) -> list:
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    with context():
        out = model(x)
    out.square().mean().backward()
    return [x.grad] + [p.grad for p in model.parameters()]


@pytest.mark.parametrize('memory_format', [torch.contiguous_format, torch.channels_last])
def test_same_gradients(memory_format):
    model = _host().to(memory_format=memory_format).train()
    x = torch.randn(4, 8, 12, 10).contiguous(memory_format=memory_format)
    expected = _grads(model, x, contextlib.nullcontext)
    for g, e in zip(_grads(model, x, recompute_ca_outputs), expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0)  # the recomputed output is bitwise the same


def test_holds_less():
    """The peak comes when backward starts, with every block's saved tensors held: one CA output
    each less, but for the one rebuilt while the last block's backward runs."""
    blocks = 4
    model = _host(64, blocks).train()
    x = torch.randn(8, 8, 32, 32)
    ca_output_bytes = 8 * 64 * 32 * 32 * 4

    def step(context):
        def fn():
            model.zero_grad(set_to_none=True)
            with context():
                out = model(x)
            out.sum().backward()
        return fn

    plain, lean = (peak_memory(step(c), torch.device('cpu')) for c in (contextlib.nullcontext, recompute_ca_outputs))
    assert plain - lean >= (blocks - 1) * ca_output_bytes, (plain, lean)


def test_input_changed_in_place_raises():
    ca, conv = CoordAttention(16).train(), nn.Conv2d(16, 4, 1)
    leaf = torch.randn(2, 16, 6, 6, requires_grad=True)
    x = leaf * 1
    with recompute_ca_outputs():
        out = conv(ca(x))
    with torch.no_grad():
        x.add_(1)
    with pytest.raises(RuntimeError, match='modified in place after the forward pass'):
        out.sum().backward()


def test_output_changed_in_place_is_stored():
    """An output changed in place before a layer saves it is stored as usual, not rebuilt stale."""
    ca, conv = CoordAttention(16).train(), nn.Conv2d(16, 4, 1)
    x = torch.randn(2, 16, 6, 6)

    def run(context):
        conv.zero_grad(set_to_none=True)
        with context():
            y = ca(x.requires_grad_())
            y.add_(1)
            out = conv(y)
        out.square().sum().backward()
        return conv.weight.grad

    torch.testing.assert_close(run(recompute_ca_outputs), run(contextlib.nullcontext), rtol=0, atol=0)


def test_a_graph_dropped_without_backward_is_freed():
    """A skipped step, `retain_graph=True`, gradients of some parameters only: the forward's tensors go with
    the graph, as without the hooks (a saved output held as is would hold its node: a cycle gc cannot see)."""
    model = timm.create_model('mobilenetv2_050_ca').train()
    x = torch.randn(2, 3, 32, 32)

    def ca_inputs_alive_after(use):
        inputs = []
        handles = [m.register_forward_hook(lambda m, args, out: inputs.append(weakref.ref(args[0])))
                   for m in model.modules() if isinstance(m, CoordAttention)]
        use(model(x))
        for h in handles:
            h.remove()
        gc.collect()
        assert inputs
        return [i for i, ref in enumerate(inputs) if ref() is not None]

    assert ca_inputs_alive_after(lambda out: None) == []
    assert ca_inputs_alive_after(lambda out: out.sum().backward(retain_graph=True)) == []
    assert ca_inputs_alive_after(lambda out: torch.autograd.grad(out.sum(), model.classifier.weight)) == []


def test_other_saved_tensors_changed_in_place_raise():
    """Tensors handed to saved-tensor hooks lose autograd's own version check; the hooks check them."""
    ca, conv = CoordAttention(16).train(), nn.Conv2d(16, 4, 1)
    x = torch.randn(2, 16, 6, 6, requires_grad=True)
    for context in (contextlib.nullcontext, recompute_ca_outputs):
        with context():
            prob = torch.sigmoid(conv(ca(x)))  # sigmoid saves its output
        prob.mul_(0.5)
        with pytest.raises(RuntimeError, match='modified by an inplace operation'):
            prob.sum().backward()


def test_a_forward_interrupted_by_ctrl_c_leaves_no_scope():
    """`always_call` exit hooks run after an Exception only: after a KeyboardInterrupt the next forward closes
    the interrupted one's scope."""
    model = timm.create_model('mobilenetv2_050_ca').train()
    other = set_recompute_ca_outputs(timm.create_model('mobilenetv2_050_ca'), False).train()
    x = torch.randn(2, 3, 32, 32)

    def interrupt(module, args, out):
        raise KeyboardInterrupt

    handle = model.blocks[2].register_forward_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        model(x)
    handle.remove()
    model(x).sum().backward()
    assert not recompute_active()
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None
    assert _scopes_seen(other, x) == {(False, None)}  # no scope left for a model without recomputation


def test_context_state():
    assert not recompute_active()
    with recompute_ca_outputs():
        assert recompute_active()
        with recompute_ca_outputs():
            assert recompute_active()
        assert recompute_active()
    assert not recompute_active()
    with pytest.raises(ValueError):
        with recompute_ca_outputs():
            raise ValueError
    assert not recompute_active()


# ---------------------------------------------------------------------------------------------------------------
# on by default in the registered CA models (`set_recompute_ca_outputs`)

def _ca_output_bytes(model: nn.Module, x: torch.Tensor) -> list:
    sizes = []
    handles = [m.register_forward_hook(lambda m, args, out: sizes.append(out.numel() * out.element_size()))
               for m in model.modules() if isinstance(m, CoordAttention)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return sizes


def check_recompute_by_default(name: str, x: torch.Tensor) -> None:
    """Bit-identical gradients with the CA outputs of model `name` recomputed, and every CA output but
    the largest (the one rebuilt at the peak, in the worst case) not held; on x's device."""
    torch.manual_seed(0)
    lean = timm.create_model(name, drop_rate=0.).to(x.device).train()
    held = set_recompute_ca_outputs(copy.deepcopy(lean), False)
    for g, e in zip(_grads(lean, x, contextlib.nullcontext), _grads(held, x, contextlib.nullcontext)):
        torch.testing.assert_close(g, e, rtol=0, atol=0)

    def step(model):
        def fn():
            model.zero_grad(set_to_none=True)
            model(x).sum().backward()
        return fn

    sizes = _ca_output_bytes(lean, x)
    saved = peak_memory(step(held), x.device) - peak_memory(step(lean), x.device)
    assert saved >= sum(sizes) - max(sizes), (saved, sizes)


@pytest.mark.parametrize('name', ['mobilenetv2_050_ca', 'mobilenext_050_ca', 'efficientnet_b0_ca'])
def test_registered_models_recompute_by_default(name):
    check_recompute_by_default(name, torch.randn(4, 3, 64, 64))


def test_no_scope_outlives_a_forward():
    model = timm.create_model('mobilenetv2_050_ca').train()
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 5, 32, 32))  # the stem conv rejects 5 channels
    with torch.no_grad():
        model(x)
    model.eval()(x)
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None
    assert not recompute_active()


@pytest.mark.parametrize('name, feature_cls', [
    ('mobilenext_050_ca', None), ('mobilenext_050_ca', 'dict'), ('mobilenext_050_ca', 'getter'),
    ('mobilenetv2_050_ca', None), ('mobilenetv2_050_ca', 'getter'),
])
def test_feature_wrappers_script_and_train_with_their_hooks(name, feature_cls):
    # TorchScript compiles the exit hook with the wrapper: its output must be typed as the wrapper's forward returns
    torch.manual_seed(0)
    kwargs = dict(feature_cls=feature_cls) if feature_cls else {}
    model = timm.create_model(name, features_only=True, out_indices=(1, 3), **kwargs)
    x = torch.randn(2, 3, 64, 64)
    features = model.train()(x)
    features = features.values() if isinstance(features, dict) else features
    sum(f.sum() for f in features).backward()
    assert not recompute_active() and torch._C._autograd._top_saved_tensors_default_hooks(False) is None
    model.eval()
    scripted = torch.jit.script(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))


def test_nested_models_close_only_their_own_scopes():
    """A CA model inside another's training forward: run in eval mode (its hooks then record nothing)
    or raising, it leaves the outer model's scope open until the outer forward ends."""
    inner = timm.create_model('mobilenetv2_050_ca')
    seen = []

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            self.inner.eval()
            self.inner(x)
            seen.append(recompute_active())
            self.inner.train()
            with pytest.raises(RuntimeError):
                self.inner(torch.randn(2, 5, 32, 32))  # the stem conv rejects 5 channels
            seen.append(recompute_active())
            return self.inner(x)

    outer = set_recompute_ca_outputs(Outer()).train()
    outer(torch.randn(2, 3, 32, 32)).sum().backward()
    assert seen == [True, True]
    assert not recompute_active()
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None


def _scopes_seen(model: nn.Module, x: torch.Tensor) -> set:
    """(recompute active, innermost pack hook) as each CA block of `model` sees them."""
    seen = set()
    handles = [m.register_forward_pre_hook(lambda m, args: seen.add(
        (recompute_active(), (torch._C._autograd._top_saved_tensors_default_hooks(False) or (None,))[0])))
        for m in model.modules() if isinstance(m, CoordAttention)]
    model(x)
    for h in handles:
        h.remove()
    return seen


def test_only_training_forwards_and_other_hooks_win():
    model = timm.create_model('mobilenetv2_050_ca')
    x = torch.randn(2, 3, 32, 32)
    assert _scopes_seen(model.train(), x) == {(True, _pack)}
    assert _scopes_seen(model.eval(), x) == {(False, None)}
    with torch.no_grad():
        assert _scopes_seen(model.train(), x) == {(False, None)}

    def own_pack(t):
        return t

    with torch.autograd.graph.saved_tensors_hooks(own_pack, lambda t: t):  # e.g. save_on_cpu
        assert _scopes_seen(model.train(), x) == {(False, own_pack)}
    with recompute_ca_outputs():  # an outer scope of ours: no second one
        assert _scopes_seen(model, x) == {(True, _pack)}


def test_set_recompute_ca_outputs_toggles():
    model = timm.create_model('mobilenetv2_050_ca').train()
    x = torch.randn(2, 3, 32, 32)
    hooks = (len(model._forward_pre_hooks), len(model._forward_hooks))
    set_recompute_ca_outputs(model, False)
    assert _scopes_seen(model, x) == {(False, None)}
    set_recompute_ca_outputs(model)
    set_recompute_ca_outputs(model)
    assert (len(model._forward_pre_hooks), len(model._forward_hooks)) == hooks == (1, 1)
    assert _scopes_seen(model, x) == {(True, _pack)}
    # any model with CA blocks, timm's own included
    resnet = set_recompute_ca_outputs(timm.create_model('resnet18', block_args=dict(attn_layer='ca')).train())
    assert _scopes_seen(resnet, x) == {(True, _pack)}


def test_double_backward_sees_the_rebuilt_output():
    """A gradient penalty (backward with create_graph) differentiates through the rebuilt output: autograd
    gives the unpacked tensor the saved one's history."""
    model = _host(16).train()
    x = torch.randn(2, 8, 10, 12)

    def penalty_grads(context):
        model.zero_grad(set_to_none=True)
        with context():
            out = model(x)
        grads = torch.autograd.grad(out.square().sum(), list(model.parameters()), create_graph=True)
        sum(g.square().sum() for g in grads).backward()
        return [p.grad for p in model.parameters()]

    for g, e in zip(penalty_grads(recompute_ca_outputs), penalty_grads(contextlib.nullcontext)):
        torch.testing.assert_close(g, e)


def test_torch_func_transforms_run_without_a_scope():
    """torch.func forbids saved-tensor hooks (and custom autograd Functions without setup_context): its
    gradients of a registered model in train mode are autograd's, up to rounding."""
    torch.manual_seed(0)
    # in float64: float32's rounding, amplified by train-mode BN over 4 samples, moved some weights'
    # gradients by 1% for some random draws
    model = timm.create_model('mobilenetv2_050_ca', drop_rate=0.).double().train()
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.clone() for k, v in model.named_buffers()}  # BN statistics: the transform's inputs
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64)

    def loss(p, b):
        return torch.func.functional_call(model, {**p, **b}, (x,)).square().mean()

    grads = torch.func.grad(loss)(params, buffers)
    model.zero_grad(set_to_none=True)
    # against the same ops under autograd (torch.func runs PyTorch ops, not the C kernels)
    for m in model.modules():
        if isinstance(m, CoordAttention):
            m.use_native_kernel = False
    model(x).square().mean().backward()
    # rounding differs (other op orders): within 1e-10 of the largest gradient
    atol = 1e-10 * max(p.grad.abs().max().item() for p in model.parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-7, atol=atol, msg=lambda m: f'{name}: {m}')
