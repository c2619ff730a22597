""" What the A/B scripts in benchmarks/ share: their options' types, the CA/baseline pairs they take,
models settled as the benchmark has them, CA blocks replaced, and calls timed in turn. """
import argparse
import copy
import math
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import timm
import torch
from torch import nn

from timm_coordatt import CoordAttention
from timm_coordatt.model_benchmark import PAIRS, quiet_profiler_logs

quiet_profiler_logs()  # imported by the scripts only: their tables without the profiler's log lines
DEFAULT_PAIRS = [f'{ca}:{base}' for ca, base in PAIRS]


def positive_int(text: str) -> int:
    """argparse type of counts, thread numbers and batch sizes: 0 would crash the script after its header, or
    time nothing and print ratios as if it had."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f'expected a positive integer, got {text!r}')
    return value


def non_negative_seconds(text: str) -> float:
    """argparse type of minimum times: a sample would never reach nan or inf seconds."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f'expected a finite number of seconds >= 0, got {text!r}')
    return value


def add_pairs_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--pairs', nargs='+', default=DEFAULT_PAIRS, metavar='CA:BASELINE')


def model_pairs(parser: argparse.ArgumentParser, texts: Sequence[str]) -> List[Tuple[str, str]]:
    """(CA model, baseline) of each CA:BASELINE given to --pairs; a usage error for anything else: names timm
    does not know, a model paired with itself, a CA model without CoordAttention blocks (whose kernels the
    scripts switch and time)."""
    pairs = [tuple(t.split(':')) for t in texts]
    if any(len(p) != 2 or not all(p) for p in pairs):
        parser.error(f'--pairs expected CA:BASELINE model names, got {list(texts)}')
    unknown = sorted({name for pair in pairs for name in pair if not timm.is_model(name)})
    if unknown:
        parser.error(f'--pairs: unknown model(s) {", ".join(unknown)}; expected registered timm model names')
    for ca_name, base_name in pairs:
        if ca_name == base_name:
            parser.error(f'--pairs: {ca_name}:{base_name} pairs a model with itself')
        if not _has_coord_attention(ca_name):
            parser.error(f'--pairs: {ca_name} has no CoordAttention blocks; expected CA:BASELINE, the CA model first')
    return pairs


def _has_coord_attention(name: str) -> bool:
    # built on the meta device: the modules without their weights' memory or initialisation
    with torch.device('meta'):
        model = timm.create_model(name)
    return any(isinstance(m, CoordAttention) for m in model.modules())


def settled(model: nn.Module, batch_size: int = 32) -> nn.Module:
    """`model` in eval mode after one training-mode forward of a random batch (no autograd), as
    `timm-coordatt benchmark`'s training warm-up leaves its models: batch norm statistics from data,
    and glibc's malloc past the frees of large blocks that raise its mmap threshold, so that batch-1
    activations come from its heap. Before that each is a new mapping faulted in on every call, which
    slows a fresh process's batch-1 calls by up to 1.5x and reads CA's overhead 3-4 points lower."""
    with torch.no_grad():
        model.train()(torch.randn(batch_size, 3, 224, 224))
    return model.eval()


class OnePass(nn.Module):
    """One in-place elementwise pass over the input, torch's: the floor of any block that touches its tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mul_(1.0)


def replace_blocks(model: nn.Module, make: Callable[[CoordAttention], nn.Module]) -> nn.Module:
    """A copy of `model` with each CoordAttention block replaced by `make(block)`."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, CoordAttention):
                setattr(parent, name, make(child))
    return model


def time_in_turn(calls: Dict[str, Callable[[], object]], rounds: int, warmup: int,
                 orders: Optional[Sequence[Sequence[str]]] = None) -> Tuple[List[float], List[float]]:
    """Median ms of each call over `rounds` rounds in which every call runs once, each going first in
    turn (or in `orders`, one after the other), after `warmup` calls each; and the median of each call's
    per-round ratio to the first one's (calls taken next to each other share the machine's state).

    Calls of one model (the same weights) that differ in something else (a build of the kernels) take
    `orders` in which each follows the other equally often: the one that runs right after the other may
    find the model's weights in the caches, and with the rotation the same one would follow in two rounds
    of three.
    """
    names = list(calls)
    if orders is None:
        orders = [names[first:] + names[:first] for first in range(len(names))]
    elif any(sorted(order) != sorted(names) for order in orders):
        raise ValueError(f'time_in_turn expected orders of the calls {names}, got {orders}')
    for call in calls.values():
        for _ in range(warmup):
            call()
    seconds = {name: [] for name in names}
    for i in range(rounds):
        for name in orders[i % len(orders)]:
            start = time.perf_counter()
            calls[name]()
            seconds[name].append(time.perf_counter() - start)
    medians = [statistics.median(seconds[name]) * 1e3 for name in names]
    ratios = [statistics.median(a / b for a, b in zip(seconds[name], seconds[names[0]])) for name in names[1:]]
    return medians, ratios
