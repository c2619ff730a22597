""" The training step with CA outputs recomputed in backward (the default) against held, in one process.

For each pair (CA model / baseline) and memory format, three runs of a batch-32 training step
(forward, cross-entropy, backward, SGD step): the baseline, the CA model as it runs by default
(`recomputed`), and the same CA model with `set_recompute_ca_outputs(model, False)` (`held`), in
turn over rounds, each going first in turn. Prints the medians of the step times and the peak
memory of a step (what torch allocates and holds at once), with ratios to the baseline.

    python benchmarks/recompute_ab.py [--rounds 8] [--threads 2] [--layouts contiguous channels_last]
        [--pairs mobilenetv2_ca:mobilenetv2_100 ...]
"""
import argparse
import statistics
import time

import timm
import torch
import torch.nn.functional as F

from timm_coordatt import set_recompute_ca_outputs
from timm_coordatt.model_benchmark import peak_memory

from in_turn import add_pairs_argument, model_pairs

LAYOUTS = {'contiguous': torch.contiguous_format, 'channels_last': torch.channels_last}
MIB = 2 ** 20


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--rounds', type=int, default=8)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--layouts', nargs='+', default=list(LAYOUTS), choices=list(LAYOUTS))
    add_pairs_argument(parser)
    args = parser.parse_args()
    pairs = model_pairs(parser, args.pairs)
    torch.set_num_threads(args.threads)
    print('command: python benchmarks/recompute_ab.py ' + ' '.join(
        [f'--rounds {args.rounds}', f'--threads {args.threads}', f'--batch-size {args.batch_size}',
         '--layouts', *args.layouts, '--pairs', *args.pairs]))
    print(f'torch {torch.__version__}, {args.threads} threads, batch {args.batch_size}, 224x224, '
          f'medians of {args.rounds} rounds in turn')
    header = ('CA model', 'layout', 'baseline ms', 'held ms', 'recomputed ms', 'held/base', 'recomputed/base',
              'memory held/base', 'memory recomputed/base')
    print(' | '.join(header))
    for ca_name, base_name in pairs:
        for layout in args.layouts:
            x = torch.randn(args.batch_size, 3, 224, 224).contiguous(memory_format=LAYOUTS[layout])
            target = torch.randint(0, 1000, (args.batch_size,))
            steps = {}
            for run, name in (('baseline', base_name), ('recomputed', ca_name), ('held', ca_name)):
                torch.manual_seed(0)
                model = timm.create_model(name).train().to(memory_format=LAYOUTS[layout])
                if run == 'held':
                    set_recompute_ca_outputs(model, False)
                optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

                def step(model=model, optimizer=optimizer):
                    F.cross_entropy(model(x), target).backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)

                step(), step()  # warm-up: allocator, optimizer state
                steps[run] = step
            times = {run: [] for run in steps}
            for r in range(args.rounds):
                for run in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
                    start = time.perf_counter()
                    steps[run]()
                    times[run].append(time.perf_counter() - start)
            ms = {run: statistics.median(t) * 1e3 for run, t in times.items()}
            memory = {run: peak_memory(step, torch.device('cpu')) / MIB for run, step in steps.items()}
            print(' | '.join([
                ca_name, layout, f'{ms["baseline"]:.0f}', f'{ms["held"]:.0f}', f'{ms["recomputed"]:.0f}',
                f'{ms["held"] / ms["baseline"]:.3f}', f'{ms["recomputed"] / ms["baseline"]:.3f}',
                f'{memory["held"] / memory["baseline"]:.3f}', f'{memory["recomputed"] / memory["baseline"]:.3f}']))


if __name__ == '__main__':
    main()
