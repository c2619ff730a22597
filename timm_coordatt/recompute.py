""" Training with less memory: CoordAttention outputs recomputed in backward instead of stored.

A CA block's output is a new full-size tensor that the host block's next layer (the 1x1 projection
conv in MobileNetV2, EfficientNet and MobileNeXt blocks) saves for its backward. The block keeps its
own input and the two small gates anyway, so that output can be rebuilt as `x * a_h * a_w` when
backward needs it: one more product per block, one full-size tensor per block less held between
forward and backward (most of CA's training-memory overhead).

    with timm_coordatt.recompute_ca_outputs():
        loss = loss_fn(model(x), target)
    loss.backward()

Only the forward pass needs to run inside the context. Works in plain eager execution; compiled,
scripted and traced models are unaffected (torch.compile's own partitioner already recomputes cheap
products).
"""
import threading
from contextlib import contextmanager
from typing import Iterator, NamedTuple, Optional, Union

import torch

from . import native

__all__ = ['recompute_ca_outputs', 'recompute_active', 'mark_recomputable']

_state = threading.local()


class _Recipe(NamedTuple):
    """How to rebuild a CA output, and the versions that make the rebuild valid."""
    x: torch.Tensor
    a_h: torch.Tensor
    a_w: torch.Tensor
    x_version: int
    out_version: int


def recompute_active() -> bool:
    return getattr(_state, 'active', False)


def mark_recomputable(out: torch.Tensor, x: torch.Tensor, a_h: torch.Tensor, a_w: torch.Tensor) -> None:
    """Record that `out` equals `x * a_h * a_w`, for the pack hook of `recompute_ca_outputs`."""
    out._ca_recipe = _Recipe(x, a_h, a_w, x._version, out._version)


def _pack(t: torch.Tensor) -> Union[torch.Tensor, _Recipe]:
    recipe: Optional[_Recipe] = getattr(t, '_ca_recipe', None)
    if recipe is None or t._version != recipe.out_version:  # changed in place since: store it
        return t
    return recipe


def _unpack(saved: Union[torch.Tensor, _Recipe]) -> torch.Tensor:
    if isinstance(saved, torch.Tensor):
        return saved
    if saved.x._version != saved.x_version:
        raise RuntimeError(
            'A CoordAttention input was modified in place after the forward pass, so its output cannot be '
            f'recomputed for backward (input version {saved.x_version} at forward, {saved.x._version} now). '
            'Run that forward outside timm_coordatt.recompute_ca_outputs().')
    if native.gate_supported(saved.x, saved.a_h, saved.a_w):  # the C kernel rounds as the products below
        return native.gate(saved.x, saved.a_h, saved.a_w)
    with torch.no_grad():
        # the same products, in the same order, as the forward: a bitwise-identical tensor
        return torch.mul(saved.x, saved.a_h).mul_(saved.a_w)


@contextmanager
def recompute_ca_outputs() -> Iterator[None]:
    """Within it, CoordAttention outputs that later layers save for backward are recomputed then instead."""
    previous = recompute_active()
    _state.active = True
    try:
        with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
            yield
    finally:
        _state.active = previous
