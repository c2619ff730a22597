""" What the A/B scripts in benchmarks/ share: the CA/baseline pairs they take, and calls timed in turn. """
import argparse
import statistics
import time
from typing import Callable, Dict, List, Sequence, Tuple

from timm_coordatt.model_benchmark import PAIRS

DEFAULT_PAIRS = [f'{ca}:{base}' for ca, base in PAIRS]


def add_pairs_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--pairs', nargs='+', default=DEFAULT_PAIRS, metavar='CA:BASELINE')


def model_pairs(parser: argparse.ArgumentParser, texts: Sequence[str]) -> List[Tuple[str, str]]:
    """(CA model, baseline) of each CA:BASELINE given to --pairs; a usage error for anything else."""
    pairs = [tuple(t.split(':')) for t in texts]
    if any(len(p) != 2 or not all(p) for p in pairs):
        parser.error(f'--pairs expected CA:BASELINE model names, got {list(texts)}')
    return pairs


def time_in_turn(calls: Dict[str, Callable[[], object]], rounds: int, warmup: int) -> Tuple[List[float], List[float]]:
    """Median ms of each call over `rounds` rounds in which every call runs once, each going first in
    turn, after `warmup` calls each; and the median of each call's per-round ratio to the first one's
    (calls taken next to each other share the machine's state)."""
    names = list(calls)
    for call in calls.values():
        for _ in range(warmup):
            call()
    seconds = {name: [] for name in names}
    for i in range(rounds):
        first = i % len(names)
        for name in names[first:] + names[:first]:
            start = time.perf_counter()
            calls[name]()
            seconds[name].append(time.perf_counter() - start)
    medians = [statistics.median(seconds[name]) * 1e3 for name in names]
    ratios = [statistics.median(a / b for a, b in zip(seconds[name], seconds[names[0]])) for name in names[1:]]
    return medians, ratios
