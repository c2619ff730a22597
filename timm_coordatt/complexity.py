""" Parameter and multiply-accumulate counts, as the paper tables count them.

MACs are those of every Conv2d and Linear in a forward pass (one multiply-accumulate per weight
use, CoordAttention's strip convs included); `ca_muls` adds the element-wise products `x * a_h * a_w`
of each CoordAttention block (2·C·H·W), which the paper's M-Adds appear to include.
"""
from dataclasses import dataclass
from typing import Tuple

import torch
from torch import nn

from ._modes import eval_mode
from .coordinate_attention import CoordAttention

__all__ = ['Complexity', 'count_complexity']


@dataclass(frozen=True)
class Complexity:
    params: int
    macs: int
    ca_muls: int

    @property
    def macs_with_muls(self) -> int:
        return self.macs + self.ca_muls


def _conv_macs(module: nn.Conv2d, output: torch.Tensor) -> int:
    kh, kw = module.kernel_size
    return output.numel() * (module.in_channels // module.groups) * kh * kw


@torch.no_grad()
def count_complexity(model: nn.Module, input_size: Tuple[int, int, int] = (3, 224, 224)) -> Complexity:
    """Count parameters and MACs of `model` for one image of `input_size` (C, H, W)."""
    counts = {'macs': 0, 'ca_muls': 0}

    def hook(module, args, output):
        if isinstance(module, nn.Conv2d):
            counts['macs'] += _conv_macs(module, output)
        elif isinstance(module, nn.Linear):
            counts['macs'] += output.numel() * module.in_features
        else:  # CoordAttention: x * a_h, then * a_w
            counts['ca_muls'] += 2 * output.numel()
            # its 1x1 convs: conv1 over H + W positions, conv_h over H, conv_w over W
            n, c, h, w = output.shape
            counts['macs'] += 2 * n * (h + w) * c * module.conv1.out_channels

    # counted by their block's hook: they mostly run functionally on the strips (their hooks do not fire),
    # but are called as layers where pruned or parametrized
    strip_convs = {id(conv) for m in model.modules() if isinstance(m, CoordAttention)
                   for conv in (m.conv1, m.conv_h, m.conv_w)}
    handles = [
        m.register_forward_hook(hook) for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear, CoordAttention)) and id(m) not in strip_convs]
    try:
        with eval_mode(model):
            param = next(model.parameters())
            model(torch.zeros(1, *input_size, device=param.device, dtype=param.dtype))
    finally:
        for h in handles:
            h.remove()
    return Complexity(sum(p.numel() for p in model.parameters()), counts['macs'], counts['ca_muls'])
