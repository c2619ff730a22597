""" Whole models in one process: the baseline, the CA model with its C kernels, and without them.

For each pair (mobilenetv2_ca / mobilenetv2_100, mobilenext_ca / mobilenext_100, efficientnet_b0_ca /
efficientnet_b0) and each memory format, times batch-1 and batch-32 inference and a batch-32 training
step (forward, cross-entropy, backward, SGD step) of three runs: the baseline, the CA model as it runs
by default (`kernels`), and the same CA model with its CA blocks' kernels turned off
(`use_native_kernel = False`: PyTorch ops). Models are `settled` first (benchmarks/in_turn.py); the runs
are interleaved over rounds, the baseline first and each CA run right after the other in half the rounds
(they share the model's weights, which the second may find in the caches); medians of each run, and the
medians of each round's CA/baseline time ratios. One process and one CA model for both CA runs, so the
kernels' share is measured apart from the machine's drift between runs.

    python benchmarks/model_kernels_ab.py [--rounds 5] [--threads 2] [--metrics b1 b32 train]
        [--pairs mobilenetv2_ca:mobilenetv2_100 ...]
"""
import argparse
from typing import Callable

import timm
import torch
import torch.nn.functional as F

import timm_coordatt  # noqa: F401  (registers the models)
from timm_coordatt import CoordAttention

from in_turn import add_pairs_argument, model_pairs, positive_int, settled, time_in_turn

CALLS = {'b1': 10, 'b32': 2, 'train': 2}  # calls a sample


def _run(step: Callable[[], None], calls: int, blocks=(), kernels: bool = True) -> Callable[[], None]:
    """`calls` calls of `step`, the CA `blocks`' kernels switched on or off first."""
    def run():
        for block in blocks:
            block.use_native_kernel = kernels
        for _ in range(calls):
            step()
    return run


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
    parser.add_argument('--rounds', type=positive_int, default=5)
    parser.add_argument('--threads', type=positive_int, default=2)
    parser.add_argument('--metrics', nargs='+', default=list(CALLS), choices=list(CALLS))
    add_pairs_argument(parser)
    args = parser.parse_args()
    pairs = model_pairs(parser, args.pairs)
    torch.set_num_threads(args.threads)
    print(f'command: python benchmarks/model_kernels_ab.py --rounds {args.rounds} --threads {args.threads} '
          f'--metrics {" ".join(args.metrics)} --pairs {" ".join(args.pairs)}')
    print(f'torch {torch.__version__}, {args.threads} threads, 224x224, medians of {args.rounds} interleaved rounds; '
          'ratios: medians of each round\'s')
    print(f'{"metric":>6} | {"CA model":>18} | {"layout":>13} | {"baseline ms":>11} | '
          f'{"CA/baseline kernels":>19} | {"CA/baseline ops":>15}')
    for metric in args.metrics:
        batch = 1 if metric == 'b1' else 32
        for ca_name, base_name in pairs:
            for channels_last in (False, True):
                memory_format = torch.channels_last if channels_last else torch.contiguous_format
                torch.manual_seed(0)
                # the mode set once, not in the timed calls (`train()` walks every module: 1-2 ms)
                models = {n: settled(timm.create_model(n).to(memory_format=memory_format)).train(metric == 'train')
                          for n in (base_name, ca_name)}
                x = torch.randn(batch, 3, 224, 224).contiguous(memory_format=memory_format)
                target = torch.randint(0, 1000, (batch,))
                steps = {n: _step(m, metric, x, target, torch.optim.SGD(m.parameters(), lr=0.0))
                         for n, m in models.items()}
                # the blocks listed once: walking the model's modules in a timed call costs more than their flags
                blocks = [m for m in models[ca_name].modules() if isinstance(m, CoordAttention)]
                runs = {'baseline': _run(steps[base_name], CALLS[metric]),
                        'kernels': _run(steps[ca_name], CALLS[metric], blocks, True),
                        'ops': _run(steps[ca_name], CALLS[metric], blocks, False)}
                # warm-up: allocator, optimizer state, folded weights; one model for both CA runs: each
                # right after the other in half the rounds
                (base_ms, _, _), (kernels_ratio, ops_ratio) = time_in_turn(
                    runs, args.rounds, warmup=1,
                    orders=[('baseline', 'kernels', 'ops'), ('baseline', 'ops', 'kernels')])
                layout = 'channels_last' if channels_last else 'contiguous'
                print(f'{metric:>6} | {ca_name:>18} | {layout:>13} | {base_ms / CALLS[metric]:11.1f} | '
                      f'{kernels_ratio:19.3f} | {ops_ratio:15.3f}', flush=True)


if __name__ == '__main__':
    main()
