""" Training with less memory: CoordAttention outputs recomputed in backward instead of stored.

A CA block's output is a new full-size tensor that the host block's next layer (the 1x1 projection
conv in MobileNetV2, EfficientNet and MobileNeXt blocks) saves for its backward. The block keeps its
own input and the two small gates anyway, so that output can be rebuilt as `x * a_h * a_w` when
backward needs it: one more product per block, one full-size tensor per block less held between
forward and backward (most of CA's training-memory overhead), bit-identical gradients.

The registered CA models do this in every eager training forward (`set_recompute_ca_outputs`, on
by default); for any other model, wrap the forward pass:

    with timm_coordatt.recompute_ca_outputs():
        loss = loss_fn(model(x), target)
    loss.backward()

or call `set_recompute_ca_outputs(model)` once. Compiled, scripted and traced models are unaffected
(torch.compile's own partitioner already recomputes cheap products).
"""
import sys
import threading
import typing
from contextlib import contextmanager
from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple, Union

import torch
from torch import nn

from timm.models._features import FeatureGetterNet

from . import native

__all__ = ['recompute_ca_outputs', 'set_recompute_ca_outputs', 'recompute_active', 'mark_recomputable']

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


class _Saved(NamedTuple):
    """Any other saved tensor: detached, and its version when saved.

    Kept as is, a tensor saved by the node that made it (an output: a sigmoid's, the strip MLP's gates) would
    hold that node through its `grad_fn`, a cycle that only backward breaks: a graph dropped without one
    (a skipped step, `retain_graph=True`, a gradient of some parameters only) would never be freed. And
    tensors given to saved-tensor hooks lose autograd's check for in-place changes: it is done here.
    """
    tensor: torch.Tensor
    version: int


def _pack(t: torch.Tensor) -> Union[_Saved, _Recipe]:
    recipe: Optional[_Recipe] = getattr(t, '_ca_recipe', None)
    if recipe is None or t._version != recipe.out_version:  # changed in place since: store it
        return _Saved(t.detach(), t._version)  # the detached tensor shares the version counter
    return recipe


def _unpack(saved: Union[_Saved, _Recipe]) -> torch.Tensor:
    if isinstance(saved, _Saved):
        if saved.tensor._version != saved.version:
            raise RuntimeError(
                'one of the variables needed for gradient computation has been modified by an inplace '
                f'operation: [{saved.tensor.type()} {list(saved.tensor.shape)}] is at version '
                f'{saved.tensor._version}; expected version {saved.version} instead.')
        return saved.tensor  # autograd gives it back its grad_fn
    if saved.x._version != saved.x_version:
        raise RuntimeError(
            'A CoordAttention input was modified in place after the forward pass, so its output cannot be '
            f'recomputed for backward (input version {saved.x_version} at forward, {saved.x._version} now). '
            'Run that forward outside timm_coordatt.recompute_ca_outputs(), or turn it off for the model '
            'with timm_coordatt.set_recompute_ca_outputs(model, False).')
    if native.gate_supported(saved.x, saved.a_h, saved.a_w):  # the C kernel rounds as the products below
        return native.gate(saved.x, saved.a_h, saved.a_w)
    with torch.no_grad():
        # the same products, in the same order, as the forward: a bitwise-identical tensor
        return torch.mul(saved.x, saved.a_h).mul_(saved.a_w)


class _Scope:
    """The saved-tensor hooks of one `recompute_ca_outputs` scope, entered and left explicitly."""

    def __init__(self):
        self.hooks = torch.autograd.graph.saved_tensors_hooks(_pack, _unpack)
        self.previous = recompute_active()

    def enter(self) -> '_Scope':
        self.hooks.__enter__()
        _state.active = True
        return self

    def exit(self) -> None:
        _state.active = self.previous
        self.hooks.__exit__(None, None, None)


@contextmanager
def recompute_ca_outputs() -> Iterator[None]:
    """Within it, CoordAttention outputs that later layers save for backward are recomputed then instead."""
    scope = _Scope().enter()
    try:
        yield
    finally:
        scope.exit()


# (pack, unpack) of the innermost saved-tensor hooks, or None; what torch.utils.checkpoint asks
_top_saved_tensors_hooks = torch._C._autograd._top_saved_tensors_default_hooks


@torch.jit.unused
def _enter_model(module: nn.Module) -> None:
    """Open a scope for this forward if it trains eagerly and saved-tensor hooks may be set (torch.func
    transforms forbid them) but none are: those of activation checkpointing or `save_on_cpu` win; an
    outer scope of ours already covers it. Inference returns at once, leaving no entry for
    `_exit_model` to pop: these hooks run on every call, and in a network's batch-1 forward, where
    their objects are out of the caches, the bookkeeping alone cost 0.3-0.8% of MobileNetV2's time."""
    if not (module.training and torch.is_grad_enabled()) or torch.compiler.is_compiling():
        return  # inference; or compiled, where the graph decides what it saves
    scopes = _state.__dict__.setdefault('model_scopes', [])
    if scopes:
        _close_interrupted(scopes)
    scope = None
    if (not torch.jit.is_tracing() and torch._C._autograd._saved_tensors_hooks_is_enabled()
            and _top_saved_tensors_hooks(False) is None):
        scope = _Scope().enter()
    # tagged with the module, the exit hook pops its own entry only; and with the frame of the module's call,
    # which tells an entry whose forward was interrupted
    scopes.append((module, scope, sys._getframe(2)))


def _close_interrupted(scopes: list) -> None:
    """Close the scopes of forwards that ended without their exit hook: `always_call` hooks run after an
    `Exception`, not after Ctrl-C (KeyboardInterrupt) or SystemExit, which would leave the hooks on in this
    thread for good (and the model referenced)."""
    running = set()
    frame = sys._getframe(1)
    while frame is not None:
        running.add(id(frame))  # the entries hold their frames: no other frame can have taken their ids
        frame = frame.f_back
    while scopes and id(scopes[-1][2]) not in running:
        scope = scopes.pop()[1]
        if scope is not None:
            scope.exit()


@torch.jit.unused
def _exit_model(module: nn.Module) -> None:
    if torch.compiler.is_compiling():
        return
    scopes = _state.__dict__.get('model_scopes')
    if scopes and scopes[-1][0] is module:
        scope = scopes.pop()[1]
        if scope is not None:
            scope.exit()


# Forward hooks typed for TorchScript, which compiles a module's hooks with it (their bodies are
# skipped there) and wants the exit hook's output typed as the forward returns it: one exit hook per
# output type of the supported forwards (models, timm's feature wrappers).
def _recompute_pre_hook(module: nn.Module, args: Tuple[torch.Tensor]) -> None:
    if not torch.jit.is_scripting():
        _enter_model(module)


def _recompute_hook(module: nn.Module, args: Tuple[torch.Tensor], output: torch.Tensor) -> None:
    if not torch.jit.is_scripting():
        _exit_model(module)


def _recompute_features_hook(module: nn.Module, args: Tuple[torch.Tensor], output: List[torch.Tensor]) -> None:
    if not torch.jit.is_scripting():
        _exit_model(module)


def _recompute_feature_dict_hook(
        module: nn.Module, args: Tuple[torch.Tensor], output: Dict[str, torch.Tensor]) -> None:
    if not torch.jit.is_scripting():
        _exit_model(module)


def _recompute_intermediates_hook(
        module: nn.Module,
        args: Tuple[torch.Tensor],
        output: Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]],
) -> None:
    if not torch.jit.is_scripting():
        _exit_model(module)


# by the forward's return type; others (and none) get `_recompute_hook`
_EXIT_HOOKS = {
    List[torch.Tensor]: _recompute_features_hook,
    list: _recompute_features_hook,
    Dict[str, torch.Tensor]: _recompute_feature_dict_hook,
    Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]: _recompute_intermediates_hook,
}


def _forward_returns(model: nn.Module):
    """The annotated return type of `model`'s forward, None if it has none or one that cannot be resolved
    (which TorchScript would not take either). timm's `FeatureGetterNet` returns what the wrapped model's
    `forward_intermediates` does, and TorchScript types its unannotated forward so."""
    forward = type(model.model).forward_intermediates if isinstance(model, FeatureGetterNet) else type(model).forward
    try:
        return typing.get_type_hints(forward).get('return')
    except (NameError, TypeError):
        return None


def set_recompute_ca_outputs(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Run every eager training forward of `model` (train mode, autograd on) as if inside
    `recompute_ca_outputs()`, or (`enabled=False`) no longer; by forward hooks on `model`.

    The registered CA models come with it on. A forward under other saved-tensor hooks (activation
    checkpointing around the whole model, `torch.autograd.graph.save_on_cpu`) is left to those.
    Returns `model`.
    """
    for hooks in (model._forward_pre_hooks, model._forward_hooks):
        for key in [k for k, hook in hooks.items()
                    if hook is _recompute_pre_hook or hook is _recompute_hook or hook in _EXIT_HOOKS.values()]:
            del hooks[key]
            model._forward_hooks_always_called.pop(key, None)
    if enabled:
        exit_hook = _EXIT_HOOKS.get(_forward_returns(model), _recompute_hook)
        model.register_forward_pre_hook(_recompute_pre_hook)
        # also after an exception in forward: the scope must not outlive the call
        model.register_forward_hook(exit_hook, always_call=True)
    return model
