""" Registers Coordinate Attention in timm's attention factory as `'ca'`.

timm's `get_attn` is an if/elif chain without a registry, and several timm modules hold their own
from-imported reference to it. Registration wraps the function once and rebinds every reference,
so `attn_layer='ca'` / `se_layer='ca'` resolve everywhere while every other name goes to timm's
original unchanged. `unregister()` puts the originals back.
"""
import functools
import importlib
import sys
import threading
from typing import Callable, Dict

from .coordinate_attention import CoordAttentionFactory

__all__ = ['ATTN_LAYERS', 'register', 'unregister', 'is_registered']

# names this package adds to timm's attention factory
ATTN_LAYERS: Dict[str, Callable] = {'ca': CoordAttentionFactory()}

_FACTORY_MODULE = 'timm.layers.create_attn'
# timm modules that bind `get_attn` by `from ... import get_attn`
_IMPORTERS = (
    'timm.layers',
    'timm.models._efficientnet_builder',
    'timm.models.byobnet',
    'timm.models.cspnet',
    'timm.models.gcvit',
    'timm.models.nfnet',
    'timm.models.resnet',
    'timm.models.layers',
)
_lock = threading.Lock()


def _wrap(original: Callable) -> Callable:
    @functools.wraps(original)
    def get_attn(attn_type):
        if isinstance(attn_type, str) and attn_type.lower() in ATTN_LAYERS:
            return ATTN_LAYERS[attn_type.lower()]
        return original(attn_type)

    get_attn.__wrapped_by_timm_coordatt__ = original
    return get_attn


def _rebind(new: Callable, old: Callable) -> None:
    for name in (_FACTORY_MODULE,) + _IMPORTERS:
        module = sys.modules.get(name)  # only rebinds modules already imported; later ones import the new one
        if module is not None and getattr(module, 'get_attn', None) is old:
            module.get_attn = new


def is_registered() -> bool:
    factory = importlib.import_module(_FACTORY_MODULE)
    return hasattr(factory.get_attn, '__wrapped_by_timm_coordatt__')


def register() -> None:
    """Make the names in `ATTN_LAYERS` resolvable by timm's `get_attn` / `create_attn`. Idempotent."""
    with _lock:
        factory = importlib.import_module(_FACTORY_MODULE)
        current = factory.get_attn
        if hasattr(current, '__wrapped_by_timm_coordatt__'):
            original = current.__wrapped_by_timm_coordatt__
        else:
            original = current
            factory.get_attn = _wrap(original)
        # modules imported since (or bound to the original) follow the wrapped function
        _rebind(factory.get_attn, original)


def unregister() -> None:
    """Restore timm's own `get_attn` everywhere it was rebound."""
    with _lock:
        factory = importlib.import_module(_FACTORY_MODULE)
        current = factory.get_attn
        if hasattr(current, '__wrapped_by_timm_coordatt__'):
            _rebind(current.__wrapped_by_timm_coordatt__, current)
