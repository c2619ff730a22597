""" Parameters and MACs of every model against the figures in coordatt.md / mobilenext.md.

MACs are counted independently with fvcore (convs, linears and CoordAttention's strip matmuls, at
224x224) and compared with the references within 1%; the package's own counter (used by
`timm-coordatt models`) must agree with fvcore.
"""
import pytest
import timm
import torch
from fvcore.nn import FlopCountAnalysis
from fvcore.nn.jit_handles import get_shape
from torch.nn.utils import prune

import timm_coordatt  # noqa: F401
from timm_coordatt.complexity import count_complexity


# model: (params, MACs in millions or None where the references give none)
REFERENCE = {
    'mobilenetv2_100': (3_504_872, 300.8),
    'mobilenetv2_ca': (3_950_648, 306.7),
    'mobilenetv2_075_ca': (2_891_631, 212.6),
    'mobilenetv2_050_ca': (2_095_568, 99.0),
    'efficientnet_b0': (5_288_548, 385.8),
    'efficientnet_b0_ca': (5_381_804, None),
    'mobilenext_100': (3_567_624, 319.3),
    'mobilenext_ca': (4_067_935, 325.4),
}
# with the 2·C·H·W element-wise products of CA, as the paper's M-Adds count them
REFERENCE_WITH_MULS = {'mobilenetv2_ca': 310.5, 'mobilenext_ca': 330.1}


def _baddbmm_macs(inputs, outputs) -> int:
    """fvcore has no handle for baddbmm (CoordAttention's strip convs): (B, n, m) @ (B, m, p)."""
    (b, n, m), p = get_shape(inputs[1]), get_shape(inputs[2])[-1]
    return b * n * m * p


def _fvcore_macs(model: torch.nn.Module) -> int:
    analysis = FlopCountAnalysis(model.eval(), torch.zeros(1, 3, 224, 224))
    analysis.set_op_handle('aten::baddbmm', _baddbmm_macs)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    by_op = analysis.by_operator()
    return by_op['conv'] + by_op['linear'] + by_op['baddbmm'] + by_op['bmm']


@pytest.mark.parametrize('name', list(REFERENCE))
def test_params_and_macs(name):
    params, macs = REFERENCE[name]
    model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == params
    counted = count_complexity(model)
    assert counted.params == params
    fv = _fvcore_macs(model)
    assert counted.macs == fv
    if macs is not None:
        assert abs(fv / 1e6 - macs) / macs < 0.01, f'{name}: {fv / 1e6:.1f}M MACs, reference {macs}M'
    if name in REFERENCE_WITH_MULS:
        ref = REFERENCE_WITH_MULS[name]
        assert abs(counted.macs_with_muls / 1e6 - ref) / ref < 0.01
    else:
        assert counted.ca_muls == 0 if 'ca' not in name else counted.ca_muls > 0


# MobileNetV2's inverted-residual table (expansion t, out channels c, blocks n, stride s) after its stride-2 stem
MOBILENETV2_BLOCKS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                      (6, 320, 1, 1)]


def test_ca_muls_are_two_products_per_element_of_each_blocks_input():
    """`ca_muls` against a count from the table: CA sits on the hidden (expanded) channels of every block
    with expansion 6, after the depthwise conv (its stride applied), and multiplies each element twice."""
    expected, in_chs, size = 0, 32, 224 // 2
    for t, c, n, s in MOBILENETV2_BLOCKS:
        size //= s  # the first block of a stage strides
        for _ in range(n):
            if t == 6:
                expected += 2 * in_chs * t * size * size
            in_chs = c
    assert count_complexity(timm.create_model('mobilenetv2_ca')).ca_muls == expected


def test_counting_leaves_each_modules_mode():
    # fine-tuning with a frozen BatchNorm: the model trains, that layer stays in eval mode
    model = timm.create_model('mobilenetv2_050_ca').train()
    model.bn1.eval()
    modes = {name: m.training for name, m in model.named_modules()}
    count_complexity(model)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert modes[''] and not modes['bn1']


def test_macs_of_ca_blocks_whose_convs_run_as_layers():
    # pruning reparametrizes conv1's weight: the block calls its layers (their hooks fire), each MAC counted once
    model = timm.create_model('mobilenetv2_050_ca')
    plain = count_complexity(model)
    prune.identity(model.blocks[1][0].se.conv1, 'weight')
    assert count_complexity(model).macs == plain.macs == _fvcore_macs(timm.create_model('mobilenetv2_050_ca'))
