""" Whole models in one process: the baseline, the CA model with its C kernels, and without them.

For each pair (mobilenetv2_ca / mobilenetv2_100, mobilenext_ca / mobilenext_100, efficientnet_b0_ca /
efficientnet_b0) and each memory format, times batch-1 and batch-32 inference and a batch-32 training
step (forward, cross-entropy, backward, SGD step) of three runs: the baseline, the CA model as it runs
by default (`kernels`), and the same CA model with its CA blocks' kernels turned off
(`use_native_kernel = False`: PyTorch ops). The runs are interleaved over rounds, each going first in
turn; medians of the rounds, reported as CA/baseline time ratios. One process and one CA model for
both CA runs, so the kernels' share is measured apart from the machine's drift between runs.

    python benchmarks/model_kernels_ab.py [--rounds 5] [--threads 2] [--metrics b1 b32 train]
        [--pairs mobilenetv2_ca:mobilenetv2_100 ...]
"""
import argparse
import statistics
import time
from typing import Callable, Dict

import timm
import torch
import torch.nn.functional as F

import timm_coordatt  # noqa: F401  (registers the models)
from timm_coordatt import CoordAttention

from in_turn import add_pairs_argument, model_pairs

CALLS = {'b1': 10, 'b32': 2, 'train': 2}  # calls a sample


def _use_kernels(model: torch.nn.Module, on: bool) -> None:
    for m in model.modules():
        if isinstance(m, CoordAttention):
            m.use_native_kernel = on


def _step(model: torch.nn.Module, metric: str, x: torch.Tensor, target: torch.Tensor,
          optimizer: torch.optim.Optimizer) -> Callable[[], None]:
    def infer():
        with torch.inference_mode():
            model(x)

    def train():
        F.cross_entropy(model(x), target).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return train if metric == 'train' else infer


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--metrics', nargs='+', default=list(CALLS), choices=list(CALLS))
    add_pairs_argument(parser)
    args = parser.parse_args()
    pairs = model_pairs(parser, args.pairs)
    torch.set_num_threads(args.threads)
    print(f'command: python benchmarks/model_kernels_ab.py --rounds {args.rounds} --threads {args.threads} '
          f'--metrics {" ".join(args.metrics)} --pairs {" ".join(args.pairs)}')
    print(f'torch {torch.__version__}, {args.threads} threads, 224x224, medians of {args.rounds} interleaved rounds')
    print(f'{"metric":>6} | {"CA model":>18} | {"layout":>13} | {"baseline ms":>11} | '
          f'{"CA/baseline kernels":>19} | {"CA/baseline ops":>15}')
    for metric in args.metrics:
        batch = 1 if metric == 'b1' else 32
        for ca_name, base_name in pairs:
            for channels_last in (False, True):
                memory_format = torch.channels_last if channels_last else torch.contiguous_format
                torch.manual_seed(0)
                # the mode set once, not in the timed calls (`train()` walks every module: 1-2 ms)
                models = {n: timm.create_model(n).to(memory_format=memory_format).train(metric == 'train')
                          for n in (base_name, ca_name)}
                x = torch.randn(batch, 3, 224, 224).contiguous(memory_format=memory_format)
                target = torch.randint(0, 1000, (batch,))
                steps = {n: _step(m, metric, x, target, torch.optim.SGD(m.parameters(), lr=0.0))
                         for n, m in models.items()}
                runs: Dict[str, Callable[[], None]] = {}
                for run, (name, kernels) in {'baseline': (base_name, None), 'kernels': (ca_name, True),
                                             'ops': (ca_name, False)}.items():
                    def timed(name=name, kernels=kernels):
                        if kernels is not None:
                            _use_kernels(models[name], kernels)
                        start = time.perf_counter()
                        for _ in range(CALLS[metric]):
                            steps[name]()
                        return (time.perf_counter() - start) / CALLS[metric]
                    runs[run] = timed
                for timed in runs.values():  # warm-up: allocator, optimizer state, folded weights
                    timed()
                samples = {run: [] for run in runs}
                order = list(runs)
                for r in range(args.rounds):
                    for run in order[r % 3:] + order[:r % 3]:
                        samples[run].append(runs[run]())
                median = {run: statistics.median(s) for run, s in samples.items()}
                layout = 'channels_last' if channels_last else 'contiguous'
                print(f'{metric:>6} | {ca_name:>18} | {layout:>13} | {median["baseline"] * 1e3:11.1f} | '
                      f'{median["kernels"] / median["baseline"]:19.3f} | {median["ops"] / median["baseline"]:15.3f}',
                      flush=True)


if __name__ == '__main__':
    main()
