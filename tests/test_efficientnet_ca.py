""" mobilenetv2_*_ca and efficientnet_b0_ca: where CA sits, names shared with timm's baselines,
and the timm model API (features, intermediates, checkpointing, heads, export). """
import copy
from functools import partial

import onnxruntime as ort
import pytest
import timm
import torch
from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual
from torch import nn

from model_helpers import projected, randomise_

import timm_coordatt  # noqa: F401
from timm_coordatt import CoordAttention, CoordAttentionFactory

MBV2 = {'mobilenetv2_ca': 'mobilenetv2_100', 'mobilenetv2_050_ca': 'mobilenetv2_050',
        'mobilenetv2_075_ca': 'mobilenetv2_075', 'mobilenetv2_140_ca': 'mobilenetv2_140'}


def test_registered():
    names = set(timm.list_models('*_ca'))
    assert set(MBV2) | {'efficientnet_b0_ca'} <= names
    assert timm.is_model('mobilenetv2_ca.in1k')


@pytest.mark.parametrize('name,baseline', MBV2.items())
def test_mobilenetv2_ca_placement_and_names(name, baseline):
    model, base = timm.create_model(name), timm.create_model(baseline)
    blocks = [b for stage in model.blocks for b in stage]
    assert isinstance(blocks[0], DepthwiseSeparableConv) and isinstance(blocks[0].se, nn.Identity)
    for block in blocks[1:]:  # every expansion-6 block, after the depthwise conv, on the hidden width
        assert isinstance(block, InvertedResidual)
        assert isinstance(block.se, CoordAttention)
        assert block.se.channels == block.conv_dw.out_channels == 6 * block.conv_pw.in_channels
        assert block.se.conv1.out_channels == max(8, block.se.channels // 32)
        assert isinstance(block.se.act, nn.Hardswish)  # not the host's ReLU6
    ours = {k: v.shape for k, v in model.state_dict().items() if '.se.' not in k}
    assert ours == {k: v.shape for k, v in base.state_dict().items()}


def test_efficientnet_b0_ca_replaces_every_se():
    model, base = timm.create_model('efficientnet_b0_ca'), timm.create_model('efficientnet_b0')
    base_se = [b.se for stage in base.blocks for b in stage]
    ours_ca = [b.se for stage in model.blocks for b in stage]
    assert len(ours_ca) == len(base_se) == 16
    for se, ca in zip(base_se, ours_ca):
        assert isinstance(ca, CoordAttention) and ca.channels == se.conv_reduce.in_channels
    ours = {k: v.shape for k, v in model.state_dict().items() if '.se.' not in k}
    assert ours == {k: v.shape for k, v in base.state_dict().items() if '.se.' not in k}


def _ca_blocks(model):
    return [m for m in model.modules() if isinstance(m, CoordAttention)]


@pytest.mark.parametrize('name', ['mobilenetv2_050_ca', 'efficientnet_b0_ca'])
def test_se_layer_given_replaces_ca(name):
    default = timm.create_model(name)
    shapes = {k: v.shape for k, v in default.state_dict().items()}
    assert default._forward_pre_hooks and all(ca.inplace for ca in _ca_blocks(default))
    # 'ca': the same blocks, gating a new tensor in inference
    same = timm.create_model(name, se_layer='ca')
    assert {k: v.shape for k, v in same.state_dict().items()} == shapes
    assert len(_ca_blocks(same)) == len(_ca_blocks(default)) and not any(ca.inplace for ca in _ca_blocks(same))
    # an ablation of the reduction
    for ca in _ca_blocks(timm.create_model(name, se_layer=CoordAttentionFactory(reduction=16))):
        assert ca.conv1.out_channels == max(8, ca.channels // 16)
    # another attention in CA's places: no CA blocks, so no recompute hooks
    se = timm.create_model(name, se_layer='se')
    assert not _ca_blocks(se) and not se._forward_pre_hooks
    assert sum(type(m).__name__ == 'SEModule' for m in se.modules()) == len(_ca_blocks(default))


@pytest.mark.parametrize('kwargs,overwritten', [({}, True), (dict(se_layer='ca'), False)])
def test_block_inputs_kept_by_hooks(kwargs, overwritten):
    """The registered blocks gate in place in inference, so a hook that keeps a block's input without
    cloning it sees the block's output (as with timm's in-place activations); `se_layer='ca'` does not."""
    model = timm.create_model('mobilenetv2_050_ca', **kwargs).eval()
    kept = []
    for ca in _ca_blocks(model):
        ca.register_forward_pre_hook(lambda module, args: kept.append((args[0], args[0].clone())))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert len(kept) == 16
    assert [not torch.equal(x, clone) for x, clone in kept] == [overwritten] * 16


def test_pretrained_cfg():
    model = timm.create_model('mobilenetv2_ca')
    cfg = model.pretrained_cfg
    for key in ('input_size', 'crop_pct', 'interpolation', 'mean', 'std', 'first_conv', 'classifier',
                'license', 'paper_ids', 'paper_name', 'origin_url'):
        assert cfg.get(key), key
    names = dict(model.named_modules())
    assert cfg['first_conv'] in names and cfg['classifier'] in names
    data = timm.data.resolve_data_config(model=model)
    assert data['input_size'] == (3, 224, 224) and data['crop_pct'] == 0.875


@pytest.mark.parametrize('num_classes', [0, 10])
def test_heads(num_classes):
    model = timm.create_model('mobilenetv2_050_ca', num_classes=num_classes).eval()
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert out.shape == (2, num_classes or model.num_features)
    pre = model.forward_head(model.forward_features(x), pre_logits=True)
    assert pre.shape == (2, model.num_features)
    model.reset_classifier(5)
    assert model(x).shape == (2, 5)


@pytest.mark.parametrize('in_chans', [1, 4])
def test_in_chans(in_chans):
    model = timm.create_model('mobilenetv2_050_ca', in_chans=in_chans)
    assert model(torch.randn(1, in_chans, 64, 64)).shape == (1, 1000)


def test_features_only():
    model = timm.create_model('mobilenetv2_ca', features_only=True, out_indices=(1, 2, 3, 4))
    feats = model(torch.randn(1, 3, 128, 128))
    assert model.feature_info.channels() == [24, 32, 96, 320]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    for f, c, r in zip(feats, model.feature_info.channels(), model.feature_info.reduction()):
        assert f.shape == (1, c, 128 // r, 128 // r)


@pytest.mark.parametrize('name', ['mobilenetv2_050_ca', 'efficientnet_b0_ca'])
@pytest.mark.parametrize('kwargs', [dict(bn_momentum=0.01, bn_eps=1e-3),
                                    dict(norm_layer=partial(nn.BatchNorm2d, momentum=0.01, eps=1e-3))], ids=str)
def test_norm_arguments_reach_ca(name, kwargs):
    """A model's norm is CA's too: timm's train.py --bn-momentum / --bn-eps, a norm_layer."""
    model = timm.create_model(name, **kwargs)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    ca_norms = [m.bn1 for m in model.modules() if isinstance(m, CoordAttention)]
    assert len(ca_norms) == 16
    assert [(m.momentum, m.eps) for m in norms] == [(0.01, 1e-3)] * len(norms)
    assert all(any(m is n for n in norms) for m in ca_norms)


@pytest.mark.parametrize('name', ['mobilenetv2_050_ca', 'efficientnet_b0_ca'])
@pytest.mark.parametrize('feature_kwargs', [
    dict(feature_cls='list'), dict(feature_cls='dict'), dict(feature_cls='hook'), dict(feature_cls='getter'),
    dict(feature_cls='fx'), dict(feature_cfg=dict(feature_cls='list'))], ids=str)
def test_feature_extractors(name, feature_kwargs):
    """Every extractor of timm's returns the classifier's intermediates (timm's list and dict ones fail on its
    own EfficientNets, whose feature_info names modules inside `blocks`)."""
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = randomise_(timm.create_model(name)).eval().forward_intermediates(
            x, indices=[1, 3], intermediates_only=True)
        model = randomise_(timm.create_model(name, features_only=True, out_indices=(1, 3), **feature_kwargs)).eval()
        out = model(x)
    torch.testing.assert_close(list(out.values()) if isinstance(out, dict) else out, expected)


def test_forward_intermediates():
    model = timm.create_model('mobilenetv2_050_ca').eval()
    x = torch.randn(1, 3, 96, 96)
    final, inter = model.forward_intermediates(x)
    assert [t.shape[1] for t in inter] == [f['num_chs'] for f in model.feature_info]
    torch.testing.assert_close(final, model.forward_features(x))


def test_grad_checkpointing_unchanged():
    torch.manual_seed(0)
    model = timm.create_model('mobilenetv2_050_ca', drop_rate=0.0).train()
    ckpt = copy.deepcopy(model)
    ckpt.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 64, 64)
    y1, y2 = model(x), ckpt(x)
    torch.testing.assert_close(y1, y2)
    projected(y1).backward()
    projected(y2).backward()
    for (name, p1), (_, p2) in zip(model.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_group_matcher_and_drop_path():
    model = timm.create_model('mobilenetv2_050_ca', drop_path_rate=0.1, drop_rate=0.2)
    groups = model.group_matcher()
    assert 'stem' in groups and 'blocks' in groups
    assert model.drop_rate == 0.2
    assert any(type(m).__name__ == 'DropPath' for m in model.modules())


def test_torchscript():
    model = randomise_(timm.create_model('mobilenetv2_050_ca')).eval()
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(torch.jit.script(model)(x), model(x))


def test_jit_trace():
    model = randomise_(timm.create_model('mobilenetv2_050_ca')).eval()
    x = torch.randn(1, 3, 64, 64)
    traced = torch.jit.trace(model, x)  # with its check: a second trace under no_grad records the same ops
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))


def test_torch_export_and_onnx(tmp_path):
    model = randomise_(timm.create_model('mobilenetv2_050_ca')).eval()
    dims = {'x': {2: torch.export.Dim('h', min=64, max=512), 3: torch.export.Dim('w', min=64, max=512)}}
    example = (torch.randn(1, 3, 64, 64),)
    exported = torch.export.export(model, example, dynamic_shapes=dims)
    path = tmp_path / 'model.onnx'
    torch.onnx.export(model, example, str(path), dynamic_shapes=dims, dynamo=True)
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    for size in [(64, 64), (96, 128)]:
        x = torch.randn(1, 3, *size)
        expected = model(x)
        torch.testing.assert_close(exported.module()(x), expected, rtol=1e-4, atol=1e-4)
        (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        torch.testing.assert_close(torch.from_numpy(out), expected, rtol=1e-4, atol=1e-4)


def test_compile_fullgraph():
    model = timm.create_model('mobilenetv2_050_ca').train()
    compiled = torch.compile(copy.deepcopy(model), fullgraph=True, backend='aot_eager')
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
    compiled(x).sum().backward()
