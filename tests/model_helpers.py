""" Weights and losses under which whole-model comparisons can fail.

At timm's initialisation a CA model's eval-mode logits are 1e-8 to 1e-4 (each block scales its input by
about sigmoid(0)^2 = 1/4, and eval-mode batch norm does not scale it back), below `assert_close`'s
absolute tolerances; and in training mode the gradients of `out.sum()` all but cancel in the batch norms
before the head (MobileNeXt's median 2e-6). `randomise_` and `projected` give outputs and gradients of
order one.
"""
import json
import math
from pathlib import Path

import safetensors.torch
import timm
import torch
from torch import nn


def randomise_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and BN statistics of a scale that keeps 17 blocks of activations finite and O(1)
    (eval-mode logits about 0.5); the model's mode is left as it is."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if 'running_var' in name:
                values = torch.rand(t.shape, generator=gen) + 0.5
            elif t.dim() > 1:  # conv / linear weights: unit-gain fan-in scaling
                values = torch.randn(t.shape, generator=gen) / math.sqrt(t[0].numel())
            elif name.endswith('weight'):  # BN scale
                values = torch.rand(t.shape, generator=gen) * 0.5 + 0.75
            else:  # biases, running means
                values = torch.randn(t.shape, generator=gen) * 0.1
            t.copy_(values)
    return model


def projected(out: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A loss: `out` projected on a fixed random tensor, whose gradient no batch norm cancels."""
    projection = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return (out * projection.to(out.device)).sum()


def add_to_parameters(model: nn.Module, value: float) -> None:
    """Adds `value` to every parameter in place: what a process sharing the model's memory (a Hogwild
    trainer) writes, given as a spawned process's target."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(value)


def create_as_transformers_does(folder) -> nn.Module:
    """The model of a timm Hub folder as transformers' timm wrapper (`TimmWrapperForImageClassification`) builds
    it: `timm.create_model(architecture, pretrained=False, num_classes=<the config's>, **model_args)`, then
    the weights."""
    folder = Path(folder)
    config = json.loads((folder / 'config.json').read_text(encoding='utf-8'))
    model = timm.create_model(config['architecture'], pretrained=False, num_classes=config['num_classes'],
                              **config.get('model_args', {}))
    model.load_state_dict(safetensors.torch.load_file(folder / 'model.safetensors'))
    return model
