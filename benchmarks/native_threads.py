""" The C inference kernel at batch 1 on one thread and on several, side by side.

At batch 1 the kernel's threads share the one sample (channels, rows of pixels, rows of the shared
conv, with a barrier between steps), in the threads of torch's OpenMP pool. This times that against
the same kernel on one thread, at the shapes of MobileNetV2's CA blocks, both memory formats,
interleaved over rounds, each thread count going first in turn (medians, microseconds a call).

    python benchmarks/native_threads.py [--rounds 9] [--threads 2]
"""
import argparse
import statistics
import time

import torch

from timm_coordatt import CoordAttention, native

from in_turn import positive_int

SHAPES = [(32, 112), (96, 56), (144, 56), (144, 28), (192, 28), (192, 14), (384, 14), (576, 14), (576, 7), (960, 7)]


def _time_call(x: torch.Tensor, out: torch.Tensor, weights: native.InferenceWeights, threads: int,
               min_time: float = 0.05) -> float:
    torch.set_num_threads(threads)
    calls, start = 0, time.perf_counter()
    while True:
        native.coord_attention_inference(x, out, weights)
        calls += 1
        elapsed = time.perf_counter() - start
        if calls >= 3 and elapsed >= min_time:
            return elapsed / calls * 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--rounds', type=positive_int, default=9)
    parser.add_argument('--threads', type=positive_int, default=2)
    args = parser.parse_args()
    if not native.available():
        raise SystemExit('the C kernel is not built (or TIMM_COORDATT_NATIVE=0)')
    print(f'command: python benchmarks/native_threads.py --rounds {args.rounds} --threads {args.threads}')
    print(f'torch {torch.__version__}, threading: {native._native.threading()}, batch 1, '
          f'medians of {args.rounds} interleaved rounds (us a call)')
    print(f'{"layout":>13} | {"C/H/W":>11} | {"1 thread":>9} | {f"{args.threads} threads":>9} | speed-up')
    counts = (1, args.threads)
    for channels_last in (False, True):
        for channels, size in SHAPES:
            # the kernel as the module calls it, with the module's folded weights, into a separate
            # output (in place, repeated calls would shrink x towards denormals)
            weights = CoordAttention(channels).eval()._folded_params().native
            x = torch.randn(1, channels, size, size)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            out = torch.empty_like(x)
            samples = {n: [] for n in counts}
            for n in counts:  # warm-up: allocator, thread pool
                _time_call(x, out, weights, n, min_time=0.0)
            for r in range(args.rounds):
                for n in counts[r % 2:] + counts[:r % 2]:
                    samples[n].append(_time_call(x, out, weights, n))
            one, many = (statistics.median(samples[n]) for n in counts)
            layout = 'channels_last' if channels_last else 'contiguous'
            print(f'{layout:>13} | {f"{channels}/{size}/{size}":>11} | {one:9.1f} | {many:9.1f} | {one / many:7.2f}x')


if __name__ == '__main__':
    main()
