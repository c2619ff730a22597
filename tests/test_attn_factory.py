""" `'ca'` through every route timm resolves attention by name, and nothing else changed. """
import dataclasses
import importlib
import subprocess
import sys
import threading

import pytest
import timm
import torch
from timm.layers import EcaModule, SEModule, create_attn
from timm.layers.cbam import CbamModule
from timm.layers.coord_attn import CoordAttn  # not exported by timm.layers before 1.0.31
from timm.models import byobnet, cspnet, maxxvit, nfnet, vovnet
from torch import nn

import timm_coordatt
from timm_coordatt import CoordAttention, attn_factory


# timm's own names and classes, read before this package could have touched the factory
EXISTING = [('se', SEModule), ('eca', EcaModule), ('cbam', CbamModule), ('coord', CoordAttn)]


def get_attn(name):
    return timm.layers.get_attn(name)  # looked up at call time: registration rebinds it


def _ca_blocks(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, CoordAttention)]


@pytest.fixture
def unregistered():
    timm_coordatt.unregister_attn()
    yield
    timm_coordatt.register_attn()


def test_get_attn_and_create_attn():
    factory = importlib.import_module('timm.layers.create_attn')
    for get in (get_attn, factory.get_attn):
        layer = get('ca')(64)
        assert isinstance(layer, CoordAttention) and layer.conv1.out_channels == 8
    assert isinstance(get_attn('CA')(32), CoordAttention)
    layer = create_attn('ca', 384)
    assert isinstance(layer, CoordAttention) and layer.conv1.out_channels == 12


def test_host_activation_is_ignored_unless_asked():
    assert isinstance(get_attn('ca')(64, act_layer=nn.SiLU).act, nn.Hardswish)
    assert isinstance(timm_coordatt.CoordAttentionFactory(act_layer='relu')(64, act_layer=nn.SiLU).act, nn.ReLU)
    assert isinstance(CoordAttention(64, act_layer=nn.SiLU).act, nn.SiLU)


def test_factory_keywords_win_over_the_hosts():
    """What the factory is given is what the user asked for: it wins over what a host passes (an
    `attn_kwargs` of ByobNet's, say); the host's other keywords pass through."""
    factory = timm_coordatt.CoordAttentionFactory(reduction=16, gate_layer='hard_sigmoid')
    ca = factory(256, reduction=8, gate_layer='sigmoid', inplace=True)
    assert ca.conv1.out_channels == 256 // 16
    assert type(ca.gate) is type(CoordAttention(8, gate_layer='hard_sigmoid').gate) is not nn.Sigmoid
    assert ca.inplace


@pytest.mark.parametrize('name,cls', EXISTING)
def test_existing_names_unchanged(name, cls):
    assert get_attn(name) is cls
    assert type(create_attn(name, 64)) is cls
    assert get_attn(None) is None and get_attn('') is None


def test_unknown_name_still_fails():
    with pytest.raises(AssertionError, match='Invalid attn module'):
        get_attn('definitely_not_an_attention')


def test_resnet_block_args():
    model = timm.create_model('resnet50', block_args=dict(attn_layer='ca'))
    blocks = [b for stage in (model.layer1, model.layer2, model.layer3, model.layer4) for b in stage]
    assert len(blocks) == 16
    for block in blocks:
        assert isinstance(block.se, CoordAttention)
        assert block.se.channels == block.conv3.out_channels
        assert block.se.conv1.out_channels == max(8, block.se.channels // 32)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_efficientnet_se_layer_is_efficientnet_b0_ca():
    model = timm.create_model('efficientnet_b0', se_layer='ca')
    reference = timm.create_model('efficientnet_b0_ca')
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert shapes == {k: v.shape for k, v in reference.state_dict().items()}
    blocks = _ca_blocks(model)
    assert len(blocks) == 16  # every block of efficientnet_b0 had SE
    for ca in blocks:
        assert isinstance(ca.act, nn.Hardswish)  # not the host's SiLU
        assert ca.conv1.out_channels == max(8, ca.channels // 32)
    assert not any(isinstance(m, timm.models._efficientnet_blocks.SqueezeExcite) for m in model.modules())


def test_byobnet_route():
    cfg = dataclasses.replace(byobnet.model_cfgs['seresnext26ts'], attn_layer='ca')
    model = byobnet.ByobNet(cfg, num_classes=10)
    assert len(_ca_blocks(model)) == 8
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_nfnet_route():
    cfg = dataclasses.replace(nfnet.model_cfgs['nf_resnet26'], attn_layer='ca')
    model = nfnet.NormFreeNet(cfg, num_classes=10)
    assert len(_ca_blocks(model)) == 8
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)


@pytest.mark.parametrize('module, name', [(nfnet, 'nf_regnet_b0'), (byobnet, 'regnetz_b16')])
def test_hosts_sized_for_se_get_the_papers_reduction(module, name):
    # these configs pass squeeze-and-excitation widths (attn_kwargs=dict(rd_ratio=...)) to their attention
    base = module.model_cfgs[name]
    assert 'rd_ratio' in base.attn_kwargs
    se = (nfnet.NormFreeNet if module is nfnet else byobnet.ByobNet)(base, num_classes=10)
    model = (nfnet.NormFreeNet if module is nfnet else byobnet.ByobNet)(
        dataclasses.replace(base, attn_layer='ca'), num_classes=10)
    se_widths = [m.fc1.in_channels for m in se.modules() if isinstance(m, SEModule)]
    blocks = _ca_blocks(model)
    assert blocks and [ca.channels for ca in blocks] == se_widths  # CA where the host had SE
    for ca in blocks:
        assert ca.conv1.out_channels == max(8, ca.channels // 32)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_cspnet_route():
    base = cspnet.model_cfgs['cspresnet50']
    cfg = dataclasses.replace(base, stages=dataclasses.replace(base.stages, attn_layer=('ca',) * 4))
    model = cspnet.CspNet(cfg, num_classes=10)
    assert len(_ca_blocks(model)) == sum(base.stages.depth)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_vovnet_route():
    cfg = dict(vovnet.model_cfgs['ese_vovnet19b_dw'], attn='ca')
    model = vovnet.VovNet(cfg, num_classes=10)
    assert len(_ca_blocks(model)) == 4
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_maxvit_route():
    base = maxxvit.model_cfgs['maxvit_pico_rw']
    cfg = dataclasses.replace(base, conv_cfg=dataclasses.replace(base.conv_cfg, attn_layer='ca'))
    model = maxxvit.MaxxVit(cfg, num_classes=10, img_size=64)
    assert len(_ca_blocks(model)) == sum(base.depths)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_unregister_restores_originals(unregistered):
    factory = importlib.import_module('timm.layers.create_attn')
    assert not attn_factory.is_registered()
    for name in ('timm.layers', 'timm.models._efficientnet_builder', 'timm.models.resnet', 'timm.models.byobnet'):
        assert sys.modules[name].get_attn is factory.get_attn
    with pytest.raises(AssertionError, match='Invalid attn module'):
        get_attn('ca')
    with pytest.raises(AssertionError, match='Invalid attn module'):
        timm.create_model('resnet18', block_args=dict(attn_layer='ca'))
    assert factory.get_attn('se') is SEModule


def test_register_is_idempotent_and_thread_safe(unregistered):
    factory = importlib.import_module('timm.layers.create_attn')
    original = factory.get_attn
    threads = [threading.Thread(target=timm_coordatt.register_attn) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    timm_coordatt.register_attn()
    wrapped = factory.get_attn
    assert wrapped.__wrapped_by_timm_coordatt__ is original  # wrapped exactly once
    for name in attn_factory._IMPORTERS:
        if name in sys.modules:
            assert sys.modules[name].get_attn is wrapped
    assert isinstance(wrapped('ca')(32), CoordAttention)


def test_survives_modules_imported_later():
    """In a fresh interpreter: register first, then import the deprecated shim, which binds get_attn."""
    code = (
        'import timm_coordatt, sys\n'
        'assert "timm.models.layers" not in sys.modules\n'
        'import timm.models.layers as shim\n'
        'from timm_coordatt import CoordAttention\n'
        'assert isinstance(shim.get_attn("ca")(64), CoordAttention)\n'
        'assert isinstance(shim.create_attn("ca", 64), CoordAttention)\n'
        'import importlib; importlib.reload(timm_coordatt)\n'  # a second import of the package: still one wrap
        'import timm.layers.create_attn as f\n'
        'f = sys.modules["timm.layers.create_attn"]\n'
        'assert not hasattr(f.get_attn.__wrapped_by_timm_coordatt__, "__wrapped_by_timm_coordatt__")\n'
        'print("ok")\n'
    )
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith('ok')
