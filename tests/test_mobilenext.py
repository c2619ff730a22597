""" MobileNeXt (+CA) models, checked against the facts in shared/reference/mobilenext.md.

Expected numbers below (parameter counts, hidden widths, layouts) are the reference's, counted from the
authors' definitions; the block reference is a plain nn.Sequential written from the block table.
"""
import copy
import json
import os
import warnings
from functools import partial

import pytest
import torch
import torch.nn as nn

from model_helpers import projected, randomise_

import timm
import timm_coordatt  # noqa: F401  registers the models
from timm.models._manipulate import group_parameters
from timm_coordatt.coordinate_attention import CoordAttention
from timm_coordatt.mobilenext import MobileNeXt, SandglassBlock

MODELS = (
    'mobilenext_050', 'mobilenext_075', 'mobilenext_100', 'mobilenext_140',
    'mobilenext_050_ca', 'mobilenext_075_ca', 'mobilenext_ca', 'mobilenext_140_ca',
)


@pytest.fixture(autouse=True, scope='module')
def _single_thread():
    # tiny tensors: intra-op threads only add overhead, and thrash on a busy machine
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _randomize_bn(module: nn.Module) -> None:
    """Non-trivial BN affine params and running stats, so a wrong BN mapping shows in the outputs."""
    g = torch.Generator().manual_seed(1)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = torch.rand(n, generator=g) + 0.5
            m.bias.data = torch.randn(n, generator=g) * 0.1
            m.running_mean = torch.randn(n, generator=g) * 0.1
            m.running_var = torch.rand(n, generator=g) + 0.5


# ---------------------------------------------------------------------------------------------------------------
# sizes

@pytest.mark.parametrize('model_name, kwargs, expected', [
    ('mobilenext_100', {}, 3_567_624),
    ('mobilenext_ca', {}, 4_067_935),
    ('mobilenext_100', dict(layout='authors'), 3_535_416),
    ('mobilenext_ca', dict(layout='authors'), 3_971_626),
    ('mobilenext_100', dict(layout='paper', attn_layer='ca'), 4_067_935),  # 'ca' through timm's attn factory
])
def test_param_counts(model_name, kwargs, expected):
    model = timm.create_model(model_name, device='meta', **kwargs)
    assert _num_params(model) == expected


@pytest.mark.parametrize('width, expected_m', [(1.4, 6.13), (0.75, 2.77), (0.5, 2.15), (0.35, 1.91)])
def test_authors_width_table(width, expected_m):
    model = MobileNeXt(width_multiplier=width, layout='authors', device='meta')
    assert round(_num_params(model) / 1e6, 2) == expected_m


def test_hidden_widths():
    model = timm.create_model('mobilenext_100', device='meta')
    hidden = [blk.conv_pwl.conv.out_channels for stage in model.stages for blk in stage]
    assert hidden == [16, 32, 32, 32, 32, 48, 48, 48, 64, 64, 64, 64, 96, 96, 96, 96, 160, 160, 160, 208]


def test_width_multiplier_channels():
    model = timm.create_model('mobilenext_050', device='meta')
    assert model.stem.conv.out_channels == 16
    assert [stage[-1].conv_pw.conv.out_channels for stage in model.stages] == [48, 72, 96, 144, 192, 288, 480, 1280]
    assert model.num_features == 1280  # the last 1280 is kept below width 1
    model = timm.create_model('mobilenext_140', device='meta')
    assert model.stem.conv.out_channels == 48 and model.num_features == 1792


# ---------------------------------------------------------------------------------------------------------------
# layouts

def _has_dw(module: nn.Module) -> bool:
    conv = getattr(module, 'conv', None)
    return isinstance(conv, nn.Conv2d) and conv.groups == conv.in_channels > 1


def test_paper_layout_full_blocks_with_ca_everywhere():
    model = timm.create_model('mobilenext_ca', device='meta')
    blocks = [blk for stage in model.stages for blk in stage]
    assert len(blocks) == 20
    for blk in blocks:
        assert _has_dw(blk.conv_dw1) and _has_dw(blk.conv_dw2)
        assert isinstance(blk.attn, CoordAttention)
        in_chs = blk.conv_dw1.conv.in_channels
        assert blk.attn.channels == in_chs
        assert blk.attn.conv1.out_channels == max(8, in_chs // 32)
        assert isinstance(blk.attn.act, nn.Hardswish)  # CA keeps its own activation
    assert sum(blk.has_skip for blk in blocks) == 12


def test_authors_layout_stage_entries():
    # (M, N) of the width-changing blocks -> (first dw, last dw) in the authors' code
    expected = {
        (32, 96): (True, True), (96, 144): (True, True),
        (144, 192): (False, True), (192, 288): (False, True), (384, 576): (False, True),
        (288, 384): (False, False), (576, 960): (False, False),
        (960, 1280): (True, True),
    }
    model = timm.create_model('mobilenext_ca', layout='authors', device='meta')
    found = {}
    for stage in model.stages:
        for blk in stage:
            in_chs, out_chs = blk.conv_pwl.conv.in_channels, blk.conv_pw.conv.out_channels
            dw = (_has_dw(blk.conv_dw1), _has_dw(blk.conv_dw2))
            if in_chs != out_chs:
                found[(in_chs, out_chs)] = dw
                assert not blk.has_skip
            else:
                assert dw == (True, True) and blk.has_skip
            # CA only where a first depthwise conv exists
            assert isinstance(blk.attn, CoordAttention) == dw[0]
    assert found == expected


def test_bad_layout():
    with pytest.raises(ValueError, match=r"layout must be one of \('paper', 'authors'\), got 'author'"):
        timm.create_model('mobilenext_050', layout='author', device='meta')


# ---------------------------------------------------------------------------------------------------------------
# block vs. a plain reference written from the block table

def _plain_sandglass(m: int, hidden: int, n: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(m, m, 3, 1, 1, groups=m, bias=False), nn.BatchNorm2d(m), nn.ReLU6(),
        nn.Conv2d(m, hidden, 1, bias=False), nn.BatchNorm2d(hidden),
        nn.Conv2d(hidden, n, 1, bias=False), nn.BatchNorm2d(n), nn.ReLU6(),
        nn.Conv2d(n, n, 3, stride, 1, groups=n, bias=False), nn.BatchNorm2d(n),
    )


def _copy_into_plain(block: SandglassBlock, plain: nn.Sequential) -> None:
    pairs = [(block.conv_dw1, 0), (block.conv_pwl, 3), (block.conv_pw, 5), (block.conv_dw2, 8)]
    for cna, i in pairs:
        plain[i].weight.data.copy_(cna.conv.weight)
        plain[i + 1].load_state_dict(cna.bn.state_dict())


@pytest.mark.parametrize('m, n, stride, reduction, hidden', [
    (96, 96, 1, 6, 16),     # identity shortcut
    (192, 192, 1, 6, 32),   # 192 // 6 = 32
    (144, 192, 2, 6, 32),   # ceil(192 / 6) = 32 > 144 // 6
    (32, 96, 2, 2, 16),     # first block
])
def test_block_matches_plain_reference(m, n, stride, reduction, hidden):
    torch.manual_seed(0)
    block = SandglassBlock(m, n, stride=stride, reduction=reduction)
    _randomize_bn(block)
    block.eval()
    plain = _plain_sandglass(m, hidden, n, stride).eval()
    _copy_into_plain(block, plain)
    x = torch.randn(2, m, 12, 10)
    with torch.no_grad():
        expected = plain(x)
        if stride == 1 and m == n:
            expected = expected + x
        torch.testing.assert_close(block(x), expected)


@pytest.mark.parametrize('m, n, stride, dw_last, hidden', [
    (144, 192, 2, True, 32),   # authors' stride-2 stage entry: pw-pw-dw
    (288, 384, 1, False, 64),  # authors' stride-1 stage entry: pw-pw
])
def test_authors_entry_block_matches_plain_reference(m, n, stride, dw_last, hidden):
    torch.manual_seed(0)
    block = SandglassBlock(m, n, stride=stride, dw_first=False, dw_last=dw_last)
    _randomize_bn(block)
    block.eval()
    plain = _plain_sandglass(m, hidden, n, stride).eval()
    pairs = [(block.conv_pwl, 3), (block.conv_pw, 5)] + ([(block.conv_dw2, 8)] if dw_last else [])
    for cna, i in pairs:
        plain[i].weight.data.copy_(cna.conv.weight)
        plain[i + 1].load_state_dict(cna.bn.state_dict())
    x = torch.randn(2, m, 12, 10)
    with torch.no_grad():
        torch.testing.assert_close(block(x), plain[3:](x) if dw_last else plain[3:8](x))


def test_block_bad_args():
    with pytest.raises(ValueError, match='cannot downsample'):
        SandglassBlock(288, 384, stride=2, dw_last=False)
    with pytest.raises(ValueError, match='stride 1 or 2'):
        SandglassBlock(96, 96, stride=3)


def test_block_attention_after_first_dw():
    torch.manual_seed(0)
    block = SandglassBlock(384, 384, reduction=6, attn_layer=CoordAttention)
    _randomize_bn(block)
    block.eval()
    plain = _plain_sandglass(384, 64, 384, 1).eval()
    _copy_into_plain(block, plain)
    x = torch.randn(2, 384, 7, 9)
    with torch.no_grad():
        expected = plain[3:](block.attn(plain[:3](x))) + x
        torch.testing.assert_close(block(x), expected)


def test_attn_layer_given_replaces_ca():
    default = timm.create_model('mobilenext_050_ca')
    blocks = [m for m in default.modules() if isinstance(m, CoordAttention)]
    assert default._forward_pre_hooks and blocks and all(ca.inplace for ca in blocks)
    # 'ca': the same blocks, gating a new tensor in inference (hooks keeping a block's input see it unchanged)
    same = timm.create_model('mobilenext_050_ca', attn_layer='ca')
    assert {k: v.shape for k, v in same.state_dict().items()} == {k: v.shape for k, v in default.state_dict().items()}
    assert not any(m.inplace for m in same.modules() if isinstance(m, CoordAttention))
    # another attention in CA's places: no CA blocks, so no recompute hooks
    se = timm.create_model('mobilenext_050_ca', attn_layer='se')
    assert not se._forward_pre_hooks and not any(isinstance(m, CoordAttention) for m in se.modules())
    assert sum(type(m).__name__ == 'SEModule' for m in se.modules()) == len(blocks)


def test_identity_tensor_multiplier():
    torch.manual_seed(0)
    block = SandglassBlock(96, 96, identity_tensor_multiplier=0.5)
    _randomize_bn(block)
    block.eval()
    plain = _plain_sandglass(96, 16, 96, 1).eval()
    _copy_into_plain(block, plain)
    x = torch.randn(2, 96, 8, 8)
    with torch.no_grad():
        expected = plain(x)
        expected[:, :48] += x[:, :48]
        torch.testing.assert_close(block(x), expected)

    # trains without autograd complaining about in-place updates, the gradient reaches the input
    block.train()
    x.requires_grad_(True)
    block(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()

    model = timm.create_model('mobilenext_050', identity_tensor_multiplier=0.25, device='meta')
    assert {blk.identity_chs / blk.out_chs for stage in model.stages for blk in stage if blk.has_skip} == {0.25}


@pytest.mark.parametrize('multiplier', [0., 1.5, -0.5])
def test_identity_tensor_multiplier_range(multiplier):
    with pytest.raises(ValueError, match=r'identity_tensor_multiplier must be in \(0, 1\]'):
        SandglassBlock(96, 96, identity_tensor_multiplier=multiplier)


def test_identity_tensor_multiplier_leaving_no_shortcut_channel():
    with pytest.raises(ValueError, match=r'leaves none of the 96 channels for the shortcut \(round\(96 \* 0.001\) = 0'):
        timm.create_model('mobilenext_050', identity_tensor_multiplier=0.001, device='meta')
    assert SandglassBlock(96, 48, stride=2, identity_tensor_multiplier=0.001).identity_chs == 0  # no shortcut anyway


def test_drop_path_only_on_shortcut_blocks():
    model = timm.create_model('mobilenext_050', drop_path_rate=0.2, device='meta')
    rates = []
    for stage in model.stages:
        for blk in stage:
            if blk.has_skip:
                rates.append(blk.drop_path.drop_prob)
            else:
                assert isinstance(blk.drop_path, nn.Identity)
    assert len(rates) == 12 and rates == sorted(rates) and 0 < rates[0] and rates[-1] < 0.2


# ---------------------------------------------------------------------------------------------------------------
# timm model API

EXPECTED_FEATURES_050 = dict(channels=[16, 72, 96, 192, 1280], reduction=[2, 4, 8, 16, 32])


@pytest.fixture(scope='module')
def model_050_ca():
    return randomise_(timm.create_model('mobilenext_050_ca')).eval()


def test_feature_info_and_intermediates(model_050_ca):
    model = model_050_ca
    assert [f['num_chs'] for f in model.feature_info] == EXPECTED_FEATURES_050['channels']
    assert [f['reduction'] for f in model.feature_info] == EXPECTED_FEATURES_050['reduction']
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        assert [(t.shape[1], t.shape[2], t.shape[3]) for t in intermediates] == [
            (c, 64 // r, 96 // r) for c, r in zip(*EXPECTED_FEATURES_050.values())]
        torch.testing.assert_close(final, model.forward_features(x))
        torch.testing.assert_close(final, intermediates[-1])
        selected = model.forward_intermediates(x, indices=[1, 3], stop_early=True, intermediates_only=True)
        torch.testing.assert_close(selected, [intermediates[1], intermediates[3]])


def test_norm_layer_reaches_ca():
    """The model's norm is CA's too."""
    model = timm.create_model('mobilenext_050_ca', norm_layer=partial(nn.BatchNorm2d, momentum=0.01, eps=1e-3))
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    ca_norms = [m.bn1 for m in model.modules() if isinstance(m, CoordAttention)]
    assert len(ca_norms) == 20 and all(any(m is n for n in norms) for m in ca_norms)
    assert [(m.momentum, m.eps) for m in norms] == [(0.01, 1e-3)] * len(norms)


@pytest.mark.parametrize('kwargs, layout', [
    ({}, 'paper'), (dict(feature_cls='getter'), 'paper'), ({}, 'authors'),
    (dict(feature_cfg=dict(feature_cls='dict')), 'paper')], ids=str)
def test_features_only(kwargs, layout):
    out_indices = (1, 3, 4)
    model = timm.create_model(
        'mobilenext_050', features_only=True, out_indices=out_indices, layout=layout, **kwargs).eval()
    channels = [EXPECTED_FEATURES_050['channels'][i] for i in out_indices]
    reductions = [EXPECTED_FEATURES_050['reduction'][i] for i in out_indices]
    assert model.feature_info.channels() == channels
    assert model.feature_info.reduction() == reductions
    with torch.no_grad():
        outs = model(torch.randn(2, 3, 64, 64))
    outs = list(outs.values()) if isinstance(outs, dict) else outs
    assert [tuple(o.shape) for o in outs] == [(2, c, 64 // r, 64 // r) for c, r in zip(channels, reductions)]


# the paper's stages: blocks n and stride s of the first block
PAPER_STAGES = [(1, 2), (1, 1), (3, 2), (3, 2), (4, 1), (4, 2), (3, 1), (1, 1)]


@pytest.mark.parametrize('output_stride', [16, 8])
@pytest.mark.parametrize('layout', ['paper', 'authors'])
def test_output_stride_dilates_past_it(output_stride, layout):
    torch.manual_seed(0)
    reference = randomise_(timm.create_model('mobilenext_050_ca', features_only=True, layout=layout)).eval()
    model = timm.create_model('mobilenext_050_ca', features_only=True, layout=layout, output_stride=output_stride)
    model.load_state_dict(reference.state_dict())  # the same weights: dilation changes no shape
    model.eval()
    # DeepLab's rule: a stride that would pass output_stride becomes 1; that block keeps the dilation before it,
    # the later blocks' depthwise convs dilate by the stride
    expected, stride, dilation = [], 2, 1
    for n, s in PAPER_STAGES:
        next_dilation = dilation
        if stride * s > output_stride:
            next_dilation, s = dilation * s, 1
        stride *= s
        expected += [(s, dilation)] + [(1, next_dilation)] * (n - 1)
        dilation = next_dilation
    blocks = [m for m in model.modules() if isinstance(m, SandglassBlock)]
    assert len(blocks) == len(expected)
    for block, (s, d) in zip(blocks, expected):
        depthwise = [m.conv for m in (block.conv_dw1, block.conv_dw2) if not isinstance(m, nn.Identity)]
        if isinstance(block.conv_dw2, nn.Identity):
            assert s == 1  # the authors' layout drops the last depthwise conv only where it does not stride
        else:
            assert block.conv_dw2.conv.stride == (s, s)
        assert all(c.dilation == (d, d) for c in depthwise)
    assert model.feature_info.reduction() == [min(r, output_stride) for r in EXPECTED_FEATURES_050['reduction']]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        outs, reference_outs = model(x), reference(x)
    assert [tuple(o.shape[-2:]) for o in outs] == [(64 // r, 64 // r) for r in model.feature_info.reduction()]
    # the levels before output_stride are the same computation
    kept = sum(r < output_stride for r in EXPECTED_FEATURES_050['reduction']) + 1
    for o, r in zip(outs[:kept], reference_outs[:kept]):
        torch.testing.assert_close(o, r)
    with pytest.raises(ValueError, match='MobileNeXt output_stride must be 8, 16 or 32, got 4'):
        timm.create_model('mobilenext_050', output_stride=4)


def test_grad_checkpointing_equal():
    torch.manual_seed(0)
    model = timm.create_model('mobilenext_050_ca', drop_rate=0.).train()
    model_ckpt = copy.deepcopy(model)
    model_ckpt.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 64, 64)
    outs = []
    for m in (model, model_ckpt):
        out = m(x)
        projected(out).backward()
        outs.append(out)
    torch.testing.assert_close(outs[1], outs[0])
    for (name, p0), p1 in zip(model.named_parameters(), model_ckpt.parameters()):
        torch.testing.assert_close(p1.grad, p0.grad, msg=name)
    # train mode (batch statistics): the recompute in backward updates the BN running stats a second time
    final, _ = model_ckpt.forward_intermediates(x)
    torch.testing.assert_close(final, model.forward_features(x))


def test_head_api():
    x = torch.randn(2, 3, 64, 64)
    model = timm.create_model('mobilenext_050', num_classes=0).eval()
    assert model.num_features == model.head_hidden_size == 1280
    assert isinstance(model.get_classifier(), nn.Identity)
    with torch.no_grad():
        assert model(x).shape == (2, 1280)
        model.reset_classifier(10)
        assert model(x).shape == (2, 10) and model.get_classifier().in_features == 1280
        features = model.forward_features(x)
        assert features.shape == (2, 1280, 2, 2)
        torch.testing.assert_close(model.forward_head(features, pre_logits=True), features.mean((2, 3)))
        model.reset_classifier(0, '')
        assert model(x).shape == (2, 1280, 2, 2)
    model = timm.create_model('mobilenext_050', global_pool='catavgmax', num_classes=5, drop_rate=0.5)
    assert model.head_hidden_size == 2560 and model.drop_rate == 0.5
    assert model.get_classifier().in_features == 2560


@pytest.mark.parametrize('in_chans', [1, 4])
def test_in_chans(in_chans):
    model = timm.create_model('mobilenext_050', in_chans=in_chans, num_classes=3).eval()
    assert model.stem.conv.in_channels == in_chans
    with torch.no_grad():
        assert model(torch.randn(1, in_chans, 32, 32)).shape == (1, 3)


def test_group_matcher():
    model = timm.create_model('mobilenext_050', device='meta')
    fine = group_parameters(model, model.group_matcher(coarse=False))
    coarse = group_parameters(model, model.group_matcher(coarse=True))
    # stem, one group per stage / block, then the classifier (matched by nothing, timm puts it last)
    assert len(coarse) == 1 + 8 + 1 and len(fine) == 1 + 20 + 1
    for groups in (coarse, fine):
        ordered = [groups[k] for k in sorted(groups)]
        assert all(n.startswith('stem.') for n in ordered[0])
        assert sorted(ordered[-1]) == ['classifier.bias', 'classifier.weight']
        assert sum(len(v) for v in ordered) == len(list(model.parameters()))


@pytest.mark.parametrize('model_name', MODELS)
def test_pretrained_cfg(model_name):
    model = timm.create_model(model_name, device='meta')
    cfg = model.pretrained_cfg
    assert cfg['tag'] == 'in1k' and cfg['url'] == '' and not cfg.get('hf_hub_id')
    assert cfg['num_classes'] == 1000 and cfg['input_size'] == (3, 224, 224) and cfg['pool_size'] == (7, 7)
    assert cfg['license'] == 'bsd-3-clause-clear'
    assert cfg['paper_name'] and cfg['origin_url'].startswith('https://github.com/')
    paper_ids = cfg['paper_ids'] if isinstance(cfg['paper_ids'], tuple) else (cfg['paper_ids'],)
    assert 'arXiv:2007.02269' in paper_ids
    assert ('arXiv:2103.02907' in paper_ids) == model_name.endswith('_ca')
    state_dict = model.state_dict()
    assert cfg['first_conv'] + '.weight' in state_dict and cfg['classifier'] + '.weight' in state_dict
    data_cfg = timm.data.resolve_data_config(model=model)
    assert data_cfg['input_size'] == (3, 224, 224)
    assert data_cfg['interpolation'] == 'bicubic' and data_cfg['crop_pct'] == 0.875
    # the CA class is set inside the entrypoint, never recorded as a (non-JSON) create_model kwarg
    # (recent timm keeps the kwargs in `_model_args` and writes them to an exported config.json)
    json.dumps(getattr(model, '_model_args', {}))


# ---------------------------------------------------------------------------------------------------------------
# scripting and export (width 0.5 + CA, low resolution)

def test_torchscript(model_050_ca):
    x = torch.randn(1, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)  # torch.jit.script deprecation
        scripted = torch.jit.script(model_050_ca)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model_050_ca(x))


def test_torch_export_dynamic_hw(model_050_ca):
    h, w = torch.export.Dim('h', min=64, max=512), torch.export.Dim('w', min=64, max=512)
    exported = torch.export.export(model_050_ca, (torch.randn(1, 3, 64, 64),), dynamic_shapes={'x': {2: h, 3: w}})
    for size in ((64, 64), (96, 80)):
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            torch.testing.assert_close(exported.module()(x), model_050_ca(x))


def test_torch_compile_fullgraph():
    torch.manual_seed(0)
    # float64: eager pools small maps by matmul, the compiled graph by sums; training-mode BN over a few
    # values amplifies that rounding difference past float32 tolerances
    model = timm.create_model('mobilenext_050_ca', drop_rate=0.).train().double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    expected = model(x)
    projected(expected).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    # fullgraph fails on any graph break during capture (CA's custom autograd function included); the 'eager'
    # backend runs the captured graph as is, which keeps the test free of a C++ toolchain and fast
    compiled = torch.compile(model, fullgraph=True, backend='eager')
    out = compiled(x)
    projected(out).backward()
    torch.testing.assert_close(out, expected)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g)


def test_onnx_dynamic_hw(model_050_ca, tmp_path):
    import onnxruntime as ort
    path = os.fspath(tmp_path / 'mobilenext_050_ca.onnx')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # the TorchScript-based exporter is deprecated, and much faster here
        torch.onnx.export(
            model_050_ca, (torch.randn(1, 3, 64, 64),), path, dynamo=False,
            input_names=['x'], output_names=['logits'], dynamic_axes={'x': {0: 'n', 2: 'h', 3: 'w'}})
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    for shape in ((1, 3, 64, 64), (2, 3, 96, 80)):
        x = torch.randn(*shape)
        with torch.no_grad():
            expected = model_050_ca(x).numpy()
        (actual,) = session.run(None, {'x': x.numpy()})
        torch.testing.assert_close(torch.from_numpy(actual), torch.from_numpy(expected), rtol=1e-4, atol=1e-4)
