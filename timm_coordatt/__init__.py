""" Coordinate Attention (Hou, Zhou, Feng, CVPR 2021) for timm.

`import timm_coordatt` adds the `'ca'` attention layer to timm's factory and registers the
`*_ca` models (and the MobileNeXt family) with `timm.create_model`.
"""
from .coordinate_attention import CoordAttention, CoordAttentionFactory, coord_gate
from .recompute import recompute_ca_outputs, set_recompute_ca_outputs
from .attn_factory import register as register_attn, unregister as unregister_attn
from . import efficientnet_ca
from . import mobilenext

__version__ = '0.1.0'

register_attn()
