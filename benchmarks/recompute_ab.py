""" The training step with CA outputs recomputed in backward (the default) against held, in one process.

For each pair (CA model / baseline) and memory format, three runs of a batch-32 training step
(forward, cross-entropy, backward, SGD step): the baseline, the CA model as it runs by default
(`recomputed`), and the same CA model with `set_recompute_ca_outputs(model, False)` (`held`), in
turn over rounds, each going first in turn. Prints the medians of the step times, the medians of each
round's time ratios to the baseline, and the peak memory of a step (what torch allocates and holds at
once) as ratios to the baseline's.

    python benchmarks/recompute_ab.py [--rounds 8] [--threads 2] [--layouts contiguous channels_last]
        [--pairs mobilenetv2_ca:mobilenetv2_100 ...]
"""
import argparse

import timm
import torch
import torch.nn.functional as F

from timm_coordatt import set_recompute_ca_outputs
from timm_coordatt.model_benchmark import peak_memory

from in_turn import add_pairs_argument, model_pairs, positive_int, time_in_turn

LAYOUTS = {'contiguous': torch.contiguous_format, 'channels_last': torch.channels_last}
MIB = 2 ** 20


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--rounds', type=positive_int, default=8)
    parser.add_argument('--threads', type=positive_int, default=2)
    parser.add_argument('--batch-size', type=positive_int, default=32)
    parser.add_argument('--layouts', nargs='+', default=list(LAYOUTS), choices=list(LAYOUTS))
    add_pairs_argument(parser)
    args = parser.parse_args()
    pairs = model_pairs(parser, args.pairs)
    torch.set_num_threads(args.threads)
    print('command: python benchmarks/recompute_ab.py ' + ' '.join(
        [f'--rounds {args.rounds}', f'--threads {args.threads}', f'--batch-size {args.batch_size}',
         '--layouts', *args.layouts, '--pairs', *args.pairs]))
    print(f'torch {torch.__version__}, {args.threads} threads, batch {args.batch_size}, 224x224, '
          f'medians of {args.rounds} rounds in turn; time ratios: medians of each round\'s')
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
                steps[run] = step
            # warm-up: allocator, optimizer state
            (base_ms, recomputed_ms, held_ms), (recomputed_ratio, held_ratio) = time_in_turn(
                steps, args.rounds, warmup=2)
            memory = {run: peak_memory(step, torch.device('cpu')) / MIB for run, step in steps.items()}
            print(' | '.join([
                ca_name, layout, f'{base_ms:.0f}', f'{held_ms:.0f}', f'{recomputed_ms:.0f}',
                f'{held_ratio:.3f}', f'{recomputed_ratio:.3f}',
                f'{memory["held"] / memory["baseline"]:.3f}', f'{memory["recomputed"] / memory["baseline"]:.3f}']))


if __name__ == '__main__':
    main()
