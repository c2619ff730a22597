""" MobileNetV2 and EfficientNet with Coordinate Attention

Built on timm's EfficientNet machinery, so every parameter outside the attention layers has the
same name and shape as in timm's `mobilenetv2_*` / `efficientnet_b0`.

- `mobilenetv2_*_ca`: CA after the depthwise conv of every expansion-6 inverted residual, not in
  the first (expansion-1) block, exactly where the authors' `mbv2_ca.py` has it.
- `efficientnet_b0_ca`: every Squeeze-and-Excitation of `efficientnet_b0` replaced by CA.

Paper: `Coordinate Attention for Efficient Mobile Network Design` - https://arxiv.org/abs/2103.02907
"""
from functools import partial
from typing import Any, Dict

from torch import nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import LayerType
from timm.models import register_model
from timm.models._efficientnet_builder import decode_arch_def, resolve_act_layer, resolve_bn_args, round_channels
from timm.models._registry import generate_default_cfgs
from timm.models.efficientnet import EfficientNet, _create_effnet, _gen_efficientnet

from .coordinate_attention import CoordAttention, CoordAttentionFactory
from .hub import hub_id
from .pretrained import prepare_pretrained
from .recompute import set_recompute_ca_outputs

__all__ = []

PAPER = dict(
    paper_ids='arXiv:2103.02907',
    paper_name='Coordinate Attention for Efficient Mobile Network Design',
    origin_url='https://github.com/houqb/CoordAttention',
)


def _ca_inplace(norm_layer: LayerType) -> CoordAttentionFactory:
    """CA with the model's norm, so that `bn_momentum`, `bn_eps` and `norm_layer` reach its batch norm too; in
    place, as timm's InvertedResidual and DepthwiseSeparableConv never read the attention's input again."""
    return CoordAttentionFactory(inplace=True, norm_layer=norm_layer)


def _norm_layer(kwargs: Dict[str, Any]) -> LayerType:
    """The norm layer timm's EfficientNet builders make of `norm_layer` or the `bn_*` arguments (taken from
    `kwargs`)."""
    return kwargs.pop('norm_layer', None) or partial(nn.BatchNorm2d, **resolve_bn_args(kwargs))


def _with_recompute(model: EfficientNet) -> EfficientNet:
    """CA outputs recomputed in backward, where a `se_layer` given to the builder left CA blocks."""
    if any(isinstance(m, CoordAttention) for m in model.modules()):
        set_recompute_ca_outputs(model)
    return model


def _flat_feature_cfg(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """`kwargs` with the blocks flattened where timm wraps an EfficientNet in a generic feature extractor
    (`feature_cls` or `feature_cfg` given): its feature_info names modules inside `blocks`, which the list and
    dict extractors find only so (timm's own `efficientnet_b0` fails there)."""
    if kwargs.get('features_only') and ('feature_cls' in kwargs or 'feature_cfg' in kwargs):
        return {**kwargs, 'feature_cfg': {'flatten_sequential': True, **(kwargs.get('feature_cfg') or {})}}
    return kwargs


def _gen_mobilenetv2_ca(variant: str, channel_multiplier: float = 1.0, pretrained: bool = False, **kwargs):
    """MobileNetV2 (timm's layout) with CA in every expansion-6 block; `_se` marks where it goes."""
    arch_def = [
        ['ds_r1_k3_s1_c16'],
        ['ir_r2_k3_s2_e6_c24_se0.25'],
        ['ir_r3_k3_s2_e6_c32_se0.25'],
        ['ir_r4_k3_s2_e6_c64_se0.25'],
        ['ir_r3_k3_s1_e6_c96_se0.25'],
        ['ir_r3_k3_s2_e6_c160_se0.25'],
        ['ir_r1_k3_s1_e6_c320_se0.25'],
    ]
    round_chs_fn = partial(round_channels, multiplier=channel_multiplier)
    norm_layer = _norm_layer(kwargs)
    model_kwargs = dict(
        block_args=decode_arch_def(arch_def),
        num_features=max(1280, round_chs_fn(1280)),
        stem_size=32,
        round_chs_fn=round_chs_fn,
        norm_layer=norm_layer,
        act_layer=resolve_act_layer(kwargs, 'relu6'),
        se_layer=kwargs.pop('se_layer', _ca_inplace(norm_layer)),
        **_flat_feature_cfg(kwargs),
    )
    return _with_recompute(_create_effnet(variant, pretrained, **prepare_pretrained(variant, pretrained, model_kwargs)))


def _cfg(url: str = '', **kwargs):
    return {
        'url': url, 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bicubic',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'conv_stem', 'classifier': 'classifier',
        'license': 'mit', **PAPER, **kwargs,
    }


default_cfgs = generate_default_cfgs({
    # the authors' released checkpoint (74.3% top-1), converted by `timm_coordatt.convert`;
    # evaluated as they did: resize 256, centre crop 224, bilinear
    'mobilenetv2_ca.in1k': _cfg(hf_hub_id=hub_id('mobilenetv2_ca.in1k'), interpolation='bilinear'),
    'mobilenetv2_050_ca.in1k': _cfg(),
    'mobilenetv2_075_ca.in1k': _cfg(),
    'mobilenetv2_140_ca.in1k': _cfg(),
    'efficientnet_b0_ca.in1k': _cfg(),
})


@register_model
def mobilenetv2_ca(pretrained: bool = False, **kwargs) -> EfficientNet:
    """MobileNetV2 1.0 + Coordinate Attention (paper: 3.95M params, 74.3% top-1)."""
    return _gen_mobilenetv2_ca('mobilenetv2_ca', 1.0, pretrained=pretrained, **kwargs)


@register_model
def mobilenetv2_050_ca(pretrained: bool = False, **kwargs) -> EfficientNet:
    """MobileNetV2 0.5 + Coordinate Attention."""
    return _gen_mobilenetv2_ca('mobilenetv2_050_ca', 0.5, pretrained=pretrained, **kwargs)


@register_model
def mobilenetv2_075_ca(pretrained: bool = False, **kwargs) -> EfficientNet:
    """MobileNetV2 0.75 + Coordinate Attention."""
    return _gen_mobilenetv2_ca('mobilenetv2_075_ca', 0.75, pretrained=pretrained, **kwargs)


@register_model
def mobilenetv2_140_ca(pretrained: bool = False, **kwargs) -> EfficientNet:
    """MobileNetV2 1.4 + Coordinate Attention."""
    return _gen_mobilenetv2_ca('mobilenetv2_140_ca', 1.4, pretrained=pretrained, **kwargs)


@register_model
def efficientnet_b0_ca(pretrained: bool = False, **kwargs) -> EfficientNet:
    """EfficientNet-B0 with every Squeeze-and-Excitation replaced by Coordinate Attention."""
    norm_layer = _norm_layer(kwargs)
    kwargs = prepare_pretrained('efficientnet_b0_ca', pretrained, {
        'se_layer': _ca_inplace(norm_layer), 'norm_layer': norm_layer, **_flat_feature_cfg(kwargs)})
    return _with_recompute(_gen_efficientnet(
        'efficientnet_b0_ca', channel_multiplier=1.0, depth_multiplier=1.0, pretrained=pretrained, **kwargs))
