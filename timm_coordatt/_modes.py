""" Modes a tool switches a model into for a while, each module's own setting restored after. """
from contextlib import contextmanager
from typing import Iterator

from torch import nn


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """`model.eval()` inside the `with` block; afterwards each module gets back its own mode, not the
    model's (`model.train()` would also switch the frozen BatchNorms of a fine-tuning model to training)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


@contextmanager
def no_grad_checkpointing(model: nn.Module) -> Iterator[nn.Module]:
    """Gradient checkpointing (timm's `set_grad_checkpointing`) off inside the `with` block: timm's
    `checkpoint_seq` calls a stage's blocks itself, so hooks on the stage would not fire."""
    switched = [m for m in model.modules() if getattr(m, 'grad_checkpointing', False) is True]
    for m in switched:
        m.grad_checkpointing = False
    try:
        yield model
    finally:
        for m in switched:
            m.grad_checkpointing = True
