""" MobileNeXt, with and without Coordinate Attention

Paper: `Rethinking Bottleneck Structure for Efficient Mobile Network Design` - https://arxiv.org/abs/2007.02269
(Zhou, Hou, Chen, Feng, Yan, ECCV 2020). Authors' code: https://github.com/yitu-opensource/MobileNeXt

The sandglass block flips the inverted residual: depthwise convs and the identity shortcut work on the
wide tensors, the 1x1 convs squeeze to a narrow hidden width in between. `mobilenext_*_ca` add
Coordinate Attention (https://arxiv.org/abs/2103.02907) after the first depthwise conv of every block.

Two layouts:
- `'paper'` (default): every block is the full dw-pw-pw-dw sandglass. The CA paper's MobileNeXt + CA
  row (4.09M params, 330M M-Adds) is only reached by this layout.
- `'authors'`: the authors' released code, where the stage-entry blocks that change the width drop one
  or both depthwise convs (3.54M params for width 1.0, as their training log prints).
"""
import math
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ConvNormAct, DropPath, LayerType, create_attn, create_classifier, make_divisible
from timm.models import build_model_with_cfg, register_model
from timm.models._efficientnet_builder import efficientnet_init_weights
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq
from timm.models._registry import generate_default_cfgs

from .coordinate_attention import CoordAttention, CoordAttentionFactory
from .pretrained import prepare_pretrained
from .recompute import set_recompute_ca_outputs

__all__ = ['MobileNeXt', 'SandglassBlock', 'sandglass_hidden_chs']

LAYOUTS = ('paper', 'authors')

# Stages at width 1.0: reduction t, output channels c, blocks n, stride s of the first block, and which
# convs the first block has in the authors' layout (the other blocks are always the full sandglass).
_ARCH = (
    (2, 96, 1, 2, 'dw-pw-pw-dw'),
    (6, 144, 1, 1, 'dw-pw-pw-dw'),
    (6, 192, 3, 2, 'pw-pw-dw'),
    (6, 288, 3, 2, 'pw-pw-dw'),
    (6, 384, 4, 1, 'pw-pw'),
    (6, 576, 4, 2, 'pw-pw-dw'),
    (6, 960, 3, 1, 'pw-pw'),  # the arXiv v1 table says 2 blocks, the first author confirmed 3
    (6, 1280, 1, 1, 'dw-pw-pw-dw'),
)
_STEM_CHS = 32


def sandglass_hidden_chs(in_chs: int, out_chs: int, reduction: int) -> int:
    """Hidden (reduced) width of a sandglass block, the authors' rule.

    `in_chs // reduction`, raised to `ceil(out_chs / 6)` rounded to a multiple of 16 when narrower than
    `out_chs / 6`, so the bottleneck of the channel-expanding blocks does not get too thin.
    """
    hidden_chs = in_chs // reduction
    if hidden_chs < out_chs / 6:
        hidden_chs = make_divisible(math.ceil(out_chs / 6), 16)
    return hidden_chs


class SandglassBlock(nn.Module):
    """Sandglass block: dw3x3 (BN, act) -> [attn] -> 1x1 reduce (BN) -> 1x1 expand (BN, act) -> dw3x3 stride s (BN).

    The identity shortcut (stride 1 and `in_chs == out_chs` only) joins the two wide ends.
    `identity_tensor_multiplier` < 1 adds it to the first `round(out_chs * multiplier)` channels only,
    the authors' option to save memory traffic on devices.
    """

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            stride: int = 1,
            dilation: int = 1,
            reduction: int = 6,
            dw_first: bool = True,
            dw_last: bool = True,
            attn_layer: Optional[LayerType] = None,
            act_layer: LayerType = nn.ReLU6,
            norm_layer: LayerType = nn.BatchNorm2d,
            identity_tensor_multiplier: float = 1.0,
            drop_path_rate: float = 0.,
            device=None,
            dtype=None,
    ):
        """
        Args:
            in_chs: Input channels M.
            out_chs: Output channels N.
            stride: Stride of the last depthwise conv.
            dilation: Dilation of both depthwise convs.
            reduction: Reduction ratio t of the hidden width (see `sandglass_hidden_chs`).
            dw_first: Keep the first depthwise conv (False only in the authors' stage-entry blocks).
            dw_last: Keep the last depthwise conv (False only in the authors' stride-1 stage-entry blocks).
            attn_layer: Attention on the M channels after the first depthwise conv, e.g. `'ca'`, `'se'`
                or a layer class; None for none.
            act_layer: Activation after the first depthwise conv and the expanding 1x1 conv.
            norm_layer: Normalization layer.
            identity_tensor_multiplier: Fraction of the channels the shortcut is added to, in (0, 1].
            drop_path_rate: Stochastic depth rate of the residual branch (blocks with a shortcut only).
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if stride not in (1, 2):
            raise ValueError(f'SandglassBlock expected stride 1 or 2, got {stride!r}')
        if not dw_last and stride != 1:
            raise ValueError('SandglassBlock without its last depthwise conv cannot downsample, got stride 2')
        if not 0. < identity_tensor_multiplier <= 1.:
            raise ValueError(
                f'identity_tensor_multiplier must be in (0, 1], got {identity_tensor_multiplier!r}')
        hidden_chs = sandglass_hidden_chs(in_chs, out_chs, reduction)
        self.out_chs = out_chs
        self.has_skip = stride == 1 and in_chs == out_chs
        self.identity_chs = round(out_chs * identity_tensor_multiplier)
        if self.has_skip and self.identity_chs == 0:
            raise ValueError(
                f'identity_tensor_multiplier {identity_tensor_multiplier!r} leaves none of the {out_chs} channels '
                f'for the shortcut (round({out_chs} * {identity_tensor_multiplier!r}) = 0)')

        self.conv_dw1 = ConvNormAct(
            in_chs, in_chs, 3, dilation=dilation, groups=in_chs, norm_layer=norm_layer, act_layer=act_layer, **dd,
        ) if dw_first else nn.Identity()
        attn = create_attn(attn_layer, in_chs, **dd)
        self.attn = attn if attn is not None else nn.Identity()
        self.conv_pwl = ConvNormAct(in_chs, hidden_chs, 1, norm_layer=norm_layer, apply_act=False, **dd)
        self.conv_pw = ConvNormAct(hidden_chs, out_chs, 1, norm_layer=norm_layer, act_layer=act_layer, **dd)
        self.conv_dw2 = ConvNormAct(
            out_chs, out_chs, 3, stride=stride, dilation=dilation, groups=out_chs, norm_layer=norm_layer,
            apply_act=False, **dd,
        ) if dw_last else nn.Identity()
        self.drop_path = DropPath(drop_path_rate) if self.has_skip and drop_path_rate > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv_dw1(x)
        x = self.attn(x)
        x = self.conv_pwl(x)
        x = self.conv_pw(x)
        x = self.conv_dw2(x)
        if self.has_skip:
            x = self.drop_path(x)
            if self.identity_chs == self.out_chs:
                x = x + shortcut
            else:
                # concat instead of an in-place slice update, which autograd and exporters dislike
                k = self.identity_chs
                x = torch.cat([x[:, :k] + shortcut[:, :k], x[:, k:]], dim=1)
        return x


class MobileNeXt(nn.Module):
    """MobileNeXt: stem conv3x3 s2 -> 8 stages of sandglass blocks -> global pool -> dropout -> linear.

    There is no 1x1 conv before the pooling: the last stage already outputs 1280 channels.
    """

    def __init__(
            self,
            num_classes: int = 1000,
            in_chans: int = 3,
            output_stride: int = 32,
            width_multiplier: float = 1.0,
            layout: str = 'paper',
            attn_layer: Optional[LayerType] = None,
            identity_tensor_multiplier: float = 1.0,
            act_layer: LayerType = nn.ReLU6,
            norm_layer: LayerType = nn.BatchNorm2d,
            global_pool: str = 'avg',
            drop_rate: float = 0.2,
            drop_path_rate: float = 0.,
            device=None,
            dtype=None,
    ):
        """
        Args:
            num_classes: Number of classifier classes, 0 for no classifier.
            in_chans: Number of input channels.
            output_stride: Reduction of the last feature map: 32, or 16 or 8 for dense prediction, where the
                stages past it keep their resolution and dilate their depthwise convs instead (as timm's
                EfficientNet builder does).
            width_multiplier: Channel multiplier; stem and stage widths are rounded to multiples of 8, the
                last stage keeps 1280 channels for multipliers below 1.
            layout: `'paper'` (every block is the full sandglass) or `'authors'` (the authors' code, whose
                width-changing stage-entry blocks drop one or both depthwise convs).
            attn_layer: Attention after the first depthwise conv of every block, e.g. `'ca'`; in the
                authors' layout only blocks with a first depthwise conv get it.
            identity_tensor_multiplier: Fraction of channels the shortcuts are added to, in (0, 1].
            act_layer: Activation of the stem and blocks.
            norm_layer: Normalization layer.
            global_pool: Global pooling type.
            drop_rate: Dropout rate before the classifier.
            drop_path_rate: Stochastic depth rate, increasing linearly to this value over the blocks.
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if layout not in LAYOUTS:
            raise ValueError(f'MobileNeXt layout must be one of {LAYOUTS}, got {layout!r}')
        if width_multiplier <= 0:
            raise ValueError(f'MobileNeXt width_multiplier must be > 0, got {width_multiplier!r}')
        if output_stride not in (8, 16, 32):
            raise ValueError(f'MobileNeXt output_stride must be 8, 16 or 32, got {output_stride!r}')
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.layout = layout
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        stem_chs = make_divisible(_STEM_CHS * width_multiplier, 8)
        self.stem = ConvNormAct(in_chans, stem_chs, 3, stride=2, norm_layer=norm_layer, act_layer=act_layer, **dd)
        self.feature_info = [dict(num_chs=stem_chs, reduction=2, module='stem')]

        num_blocks = sum(n for _, _, n, _, _ in _ARCH)
        block_idx = 0
        net_stride, dilation = 2, 1
        prev_chs = stem_chs
        stages = []
        for stage_idx, (t, c, n, s, authors_entry) in enumerate(_ARCH):
            # past output_stride the stage keeps the resolution; its first block's depthwise convs keep the
            # dilation before (the last one was the strided conv), the later blocks' dilate by the stride
            next_dilation = dilation
            if net_stride * s > output_stride:
                next_dilation, s = dilation * s, 1
            out_chs = make_divisible(c * width_multiplier, 8)
            if stage_idx == len(_ARCH) - 1:
                out_chs = max(c, out_chs)  # the feature width is not reduced below 1280
            blocks = []
            for i in range(n):
                entry = authors_entry if layout == 'authors' and i == 0 else 'dw-pw-pw-dw'
                dw_first = entry.startswith('dw')
                blocks.append(SandglassBlock(
                    prev_chs,
                    out_chs,
                    stride=s if i == 0 else 1,
                    dilation=dilation if i == 0 else next_dilation,
                    reduction=t,
                    dw_first=dw_first,
                    dw_last=entry.endswith('dw'),
                    # attention sits on the first depthwise conv's output, no such conv, no attention
                    attn_layer=attn_layer if dw_first else None,
                    act_layer=act_layer,
                    norm_layer=norm_layer,
                    identity_tensor_multiplier=identity_tensor_multiplier,
                    drop_path_rate=drop_path_rate * block_idx / num_blocks,
                    **dd,
                ))
                prev_chs = out_chs
                block_idx += 1
            net_stride *= s
            dilation = next_dilation
            stages.append(nn.Sequential(*blocks))
            # one feature level per reduction: the last stage before the next downsampling
            if stage_idx == len(_ARCH) - 1 or _ARCH[stage_idx + 1][3] > 1:
                self.feature_info.append(dict(num_chs=out_chs, reduction=net_stride, module=f'stages.{stage_idx}'))
        self.stages = nn.Sequential(*stages)
        # stage index of each feature level, -1 for the stem
        self.stage_ends = [-1] + [int(f['module'].split('.')[-1]) for f in self.feature_info[1:]]

        self.num_features = prev_chs
        self.global_pool, self.classifier = create_classifier(
            self.num_features, self.num_classes, pool_type=global_pool, **dd)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()

        efficientnet_init_weights(self)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Union[str, List]]:
        return dict(
            stem=r'^stem',
            blocks=r'^stages\.(\d+)' if coarse else r'^stages\.(\d+)\.(\d+)',
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the classifier (`num_classes=0` removes it); the pooling is kept if `global_pool` is None."""
        weight = self.stem.conv.weight  # the new classifier follows the model's device and dtype
        dd = {'device': weight.device, 'dtype': weight.dtype}
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        self.global_pool, self.classifier = create_classifier(
            self.num_features, self.num_classes, pool_type=global_pool, **dd)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.global_pool.train(self.training)
        self.classifier.train(self.training)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward features that returns intermediates.

        Args:
            x: Input image tensor.
            indices: Take last n feature levels if int, all if None, select matching indices if sequence.
            norm: Unused, MobileNeXt has no final norm.
            stop_early: Stop iterating over stages when the last desired intermediate is hit.
            output_fmt: Shape of intermediate feature outputs, only 'NCHW'.
            intermediates_only: Only return intermediate features.
        """
        assert output_fmt in ('NCHW',), 'Output shape must be NCHW.'
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.stage_ends), indices)
        # stem is index 0, stage i is index i + 1
        take_indices = [self.stage_ends[i] + 1 for i in take_indices]
        max_index = self.stage_ends[max_index]

        feat_idx = 0
        x = self.stem(x)
        if feat_idx in take_indices:
            intermediates.append(x)

        if torch.jit.is_scripting() or not stop_early:  # can't slice stages in torchscript
            stages = self.stages
        else:
            stages = self.stages[:max_index + 1]
        for feat_idx, stage in enumerate(stages, start=1):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint_seq(stage, x)
            else:
                x = stage(x)
            if feat_idx in take_indices:
                intermediates.append(x)

        if intermediates_only:
            return intermediates

        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Prune the stages after the last feature level in `indices` and (by default) the classifier."""
        take_indices, max_index = feature_take_indices(len(self.stage_ends), indices)
        num_chs = self.feature_info[max_index]['num_chs']
        last_stage = self.stage_ends[max_index]
        if last_stage < len(self.stages) - 1:
            self.stages = self.stages[:last_stage + 1]
            # features now end at the kept level, the classifier was sized for the final width
            self.num_features = num_chs
            prune_head = True
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.stages, x, flatten=True)
        else:
            x = self.stages(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate > 0.:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        x = self.forward_head(x)
        return x


def _create_mobilenext(variant: str, pretrained: bool = False, **kwargs) -> MobileNeXt:
    model = build_model_with_cfg(
        MobileNeXt,
        variant,
        pretrained,
        feature_cfg={'flatten_sequential': True, **(kwargs.pop('feature_cfg', None) or {})},
        **prepare_pretrained(variant, pretrained, kwargs),
    )
    if any(isinstance(m, CoordAttention) for m in model.modules()):
        set_recompute_ca_outputs(model)
    return model


def _cfg(url: str = '', **kwargs):
    return {
        'url': url, 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bicubic',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.conv', 'classifier': 'classifier',
        # licence of the authors' MobileNeXt code (The Clear BSD License); no weights are published
        'license': 'bsd-3-clause-clear',
        'paper_ids': 'arXiv:2007.02269',
        'paper_name': 'Rethinking Bottleneck Structure for Efficient Mobile Network Design',
        'origin_url': 'https://github.com/yitu-opensource/MobileNeXt',
        **kwargs,
    }


def _cfg_ca(**kwargs):
    return _cfg(
        paper_ids=('arXiv:2007.02269', 'arXiv:2103.02907'),
        paper_name='Coordinate Attention for Efficient Mobile Network Design',
        **kwargs,
    )


default_cfgs = generate_default_cfgs({
    'mobilenext_050.in1k': _cfg(),
    'mobilenext_075.in1k': _cfg(),
    'mobilenext_100.in1k': _cfg(),
    'mobilenext_140.in1k': _cfg(),
    'mobilenext_050_ca.in1k': _cfg_ca(),
    'mobilenext_075_ca.in1k': _cfg_ca(),
    'mobilenext_ca.in1k': _cfg_ca(),
    'mobilenext_140_ca.in1k': _cfg_ca(),
})


@register_model
def mobilenext_050(pretrained: bool = False, **kwargs) -> MobileNeXt:
    """MobileNeXt 0.5 (paper: 2.1M params)."""
    return _create_mobilenext('mobilenext_050', pretrained, width_multiplier=0.5, **kwargs)


@register_model
def mobilenext_075(pretrained: bool = False, **kwargs) -> MobileNeXt:
    """MobileNeXt 0.75 (paper: 2.5M params)."""
    return _create_mobilenext('mobilenext_075', pretrained, width_multiplier=0.75, **kwargs)


@register_model
def mobilenext_100(pretrained: bool = False, **kwargs) -> MobileNeXt:
    """MobileNeXt 1.0 (paper: 3.5M params, 74.0% top-1)."""
    return _create_mobilenext('mobilenext_100', pretrained, width_multiplier=1.0, **kwargs)


@register_model
def mobilenext_140(pretrained: bool = False, **kwargs) -> MobileNeXt:
    """MobileNeXt 1.4 (paper: 6.1M params)."""
    return _create_mobilenext('mobilenext_140', pretrained, width_multiplier=1.4, **kwargs)


def _create_mobilenext_ca(variant: str, pretrained: bool = False, **kwargs) -> MobileNeXt:
    """MobileNeXt with CA, whose norm is the model's (`norm_layer`), gating in place: the sandglass block never
    reads the attention's input again."""
    attn_layer = CoordAttentionFactory(inplace=True, norm_layer=kwargs.get('norm_layer', nn.BatchNorm2d))
    return _create_mobilenext(variant, pretrained, **{'attn_layer': attn_layer, **kwargs})


@register_model
def mobilenext_050_ca(pretrained: bool = False, **kwargs) -> MobileNeXt:
    """MobileNeXt 0.5 + Coordinate Attention."""
    return _create_mobilenext_ca('mobilenext_050_ca', pretrained, width_multiplier=0.5, **kwargs)


@register_model
def mobilenext_075_ca(pretrained: bool = False, **kwargs) -> MobileNeXt:
    """MobileNeXt 0.75 + Coordinate Attention."""
    return _create_mobilenext_ca('mobilenext_075_ca', pretrained, width_multiplier=0.75, **kwargs)


@register_model
def mobilenext_ca(pretrained: bool = False, **kwargs) -> MobileNeXt:
    """MobileNeXt 1.0 + Coordinate Attention (CA paper: 4.09M params, 330M M-Adds, 75.2% top-1)."""
    return _create_mobilenext_ca('mobilenext_ca', pretrained, width_multiplier=1.0, **kwargs)


@register_model
def mobilenext_140_ca(pretrained: bool = False, **kwargs) -> MobileNeXt:
    """MobileNeXt 1.4 + Coordinate Attention."""
    return _create_mobilenext_ca('mobilenext_140_ca', pretrained, width_multiplier=1.4, **kwargs)
