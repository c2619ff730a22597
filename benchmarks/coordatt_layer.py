""" CoordAttention layer speed and training memory against two references, side by side.

References: (a) the authors' formulation rebuilt from the spec (tests/authors_coordatt.py) and
(b) timm's `CoordAttn` set to the paper's widths (`rd_channels=max(8, C // 32)`, biased convs,
hard-swish). Shapes are those of MobileNetV2's CA blocks. The implementations are interleaved
over several rounds, each going first in turn, and medians reported (each sample the mean of at
least three calls); peak memory is the high-water mark of bytes allocated during one training step
(forward + backward), read from the profiler's allocation records.

    python benchmarks/coordatt_layer.py [--rounds 7] [--threads 2] [--channels-last]

`ours` is the layer as it runs by default (eager float32 CPU: its C kernels, where they are built),
`ours_ops` the same layer with them turned off (`use_native_kernel = False`): PyTorch ops throughout.

`--channels-last` puts the modules and the inputs in channels_last memory format, as
`timm.create_model(...).to(memory_format=torch.channels_last)` pipelines run them.
"""
import argparse
import os
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'tests'))
from authors_coordatt import AuthorsCoordAtt  # noqa: E402

from timm.layers.coord_attn import CoordAttn  # noqa: E402
from torch.profiler._memory_profiler import Action  # noqa: E402
from timm_coordatt import CoordAttention  # noqa: E402

from in_turn import positive_int  # noqa: E402

SHAPES = [(96, 112), (144, 56), (192, 28), (384, 14), (576, 14), (960, 7)]  # (C, H=W)


def _ours_without_kernel(channels: int) -> CoordAttention:
    m = CoordAttention(channels)
    m.use_native_kernel = False
    return m


IMPLS: Dict[str, Callable[[int], nn.Module]] = {
    'ours': CoordAttention,
    'ours_ops': _ours_without_kernel,
    'authors': lambda c: AuthorsCoordAtt(c, c),
    'timm_coord': lambda c: CoordAttn(c, rd_channels=max(8, c // 32), bias=True),
}


def time_call(fn: Callable[[], None], repeat: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat * 1e3


def train_step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    def step():
        xr = x.detach().requires_grad_()
        module(xr).backward(grad)
    return step


def infer(module: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run():
        with torch.inference_mode():
            module(x)
    return run


def peak_train_memory(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> int:
    """High-water mark of bytes allocated during one training step, beyond the inputs.

    Replays the profiler's tensor lifetime records (creations and destructions), the data behind
    `torch.profiler.profile.export_memory_timeline`.
    """
    step = train_step(module, x, grad)
    with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU],
            profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    live = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        if action == Action.CREATE:
            live += size
        elif action == Action.DESTROY:
            live -= size
        peak = max(peak, live)
    return peak


def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--rounds', type=positive_int, default=7)
    parser.add_argument('--threads', type=positive_int, default=2)
    parser.add_argument('--channels-last', action='store_true', help='channels_last modules and inputs')
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    print(f'command: python benchmarks/coordatt_layer.py --rounds {args.rounds} --threads {args.threads}'
          + (' --channels-last' if args.channels_last else ''))
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, {memory_format}, '
          f'medians of {args.rounds} interleaved rounds (ms)')

    header = (f"{'C/H/W':>12} | {'case':<9} | " + ' | '.join(f'{n:>10}' for n in IMPLS)
              + ' | ours vs authors | ours vs timm')
    print(header)
    print('-' * len(header))
    for c, hw in SHAPES:
        modules = {name: make(c).to(memory_format=memory_format) for name, make in IMPLS.items()}
        cases = {}
        for batch, mode in ((1, 'infer'), (32, 'infer'), (32, 'train')):
            x = torch.randn(batch, c, hw, hw).contiguous(memory_format=memory_format)
            grad = torch.randn_like(x)
            repeat = max(3, int(2e6 // x.numel()))
            for m in modules.values():
                m.train(mode == 'train')
            calls = {
                n: train_step(m, x, grad) if mode == 'train' else infer(m, x) for n, m in modules.items()}
            times = {n: [] for n in modules}
            names = list(calls)
            for r in range(args.rounds):
                for n in names[r % len(names):] + names[:r % len(names)]:  # each goes first in turn
                    times[n].append(time_call(calls[n], repeat))
            cases[f'{mode} b{batch}'] = {n: statistics.median(t) for n, t in times.items()}
            if mode == 'train':
                cases['peak MB'] = {n: peak_train_memory(m, x, grad) / 2 ** 20 for n, m in modules.items()}
        for case, res in cases.items():
            print(f'{c:>4}/{hw:>3}/{hw:<3} | {case:<9} | ' + ' | '.join(f'{res[n]:>10.2f}' for n in IMPLS)
                  + f" | {res['authors'] / res['ours']:>14.2f}x | {res['timm_coord'] / res['ours']:>11.2f}x")


if __name__ == '__main__':
    main()
