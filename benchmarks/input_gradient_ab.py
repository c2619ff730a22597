""" x's gradient in training written over the product's gradient (as the blocks do where autograd alone holds
that gradient) against into a new tensor, in one process.

Kernel: `native.strips_backward` at the shapes of MobileNetV2's CA blocks (batch 1 and 32, both layouts),
the two variants in turn over rounds, each going first in turn (medians, us a call; each variant writes
over a tensor of its own, so that neither finds the other's output in the caches). `--models`: a training
step of each CA model (batch 32, both layouts) with the blocks' ownership check as it runs and switched off
(every gradient taken as held elsewhere), in turn, each step profiled: the median self time of the op
that writes x's gradient (`_StripPoolBackward`), ms a step.

    python benchmarks/input_gradient_ab.py [--rounds 15] [--threads 2] [--models] [--steps 5]
"""
import argparse
import statistics
import time

import timm
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from timm_coordatt import coordinate_attention, native

from in_turn import positive_int

SHAPES = [(1, 144, 56, 56), (1, 960, 7, 7), (32, 96, 112, 112), (32, 144, 56, 56), (32, 384, 14, 14),
          (32, 960, 7, 7)]
MODELS = ('mobilenetv2_ca', 'mobilenext_ca', 'efficientnet_b0_ca')
LAYOUTS = {'contiguous': torch.contiguous_format, 'channels_last': torch.channels_last}


def kernel_table(rounds: int) -> None:
    print('shape | layout | new tensor us | over the gradient us | new/over')
    for shape in SHAPES:
        n, c, h, w = shape
        for layout, memory_format in LAYOUTS.items():
            grad = torch.randn(shape).contiguous(memory_format=memory_format)
            a_h = torch.rand(n, c, h, 1).contiguous(memory_format=memory_format)
            a_w = torch.rand(n, c, 1, w).contiguous(memory_format=memory_format)
            grad_strips = torch.randn(n, c, h + w)
            channels_last = memory_format == torch.channels_last
            grads = {'new': grad.clone(), 'over': grad.clone()}
            calls = 3 if n > 1 else 200
            seconds = {name: [] for name in grads}
            for i in range(rounds):
                for name in (('new', 'over') if i % 2 == 0 else ('over', 'new')):
                    start = time.perf_counter()
                    for _ in range(calls):
                        native.strips_backward(grad_strips, shape, channels_last, (grads[name], a_h, a_w),
                                               over_grad=name == 'over')
                    seconds[name].append((time.perf_counter() - start) / calls)
            new, over = (statistics.median(seconds[name]) * 1e6 for name in ('new', 'over'))
            print(f'{"x".join(map(str, shape))} | {layout} | {new:.1f} | {over:.1f} | {new / over:.2f}x')


def model_table(steps: int) -> None:
    owned_references = coordinate_attention._owned_gradient_references
    print('CA model | layout | x\'s gradient ms, new tensor | over the gradient | new/over')
    for name in MODELS:
        for layout, memory_format in LAYOUTS.items():
            torch.manual_seed(0)
            model = timm.create_model(name).train().to(memory_format=memory_format)
            x = torch.randn(32, 3, 224, 224).contiguous(memory_format=memory_format)
            target = torch.randint(0, 1000, (32,))

            def step():
                F.cross_entropy(model(x), target).backward()
                model.zero_grad(set_to_none=True)
            step()
            ms = {'new': [], 'over': []}
            for i in range(steps):
                for variant in (('over', 'new') if i % 2 == 0 else ('new', 'over')):
                    # the blocks read the check's reference when they build a step's graph
                    coordinate_attention._owned_gradient_references = (
                        owned_references if variant == 'over' else lambda: None)
                    step()
                    with profile(activities=[ProfilerActivity.CPU]) as prof:
                        step()
                    ms[variant].append(sum(e.self_cpu_time_total for e in prof.key_averages()
                                           if e.key == '_StripPoolBackward') / 1e3)
            coordinate_attention._owned_gradient_references = owned_references
            new, over = statistics.median(ms['new']), statistics.median(ms['over'])
            print(f'{name} | {layout} | {new:.1f} | {over:.1f} | {new / over:.2f}x')


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--rounds', type=positive_int, default=15)
    parser.add_argument('--threads', type=positive_int, default=2)
    parser.add_argument('--models', action='store_true', help='also the op in the CA models\' training steps')
    parser.add_argument('--steps', type=positive_int, default=5, help='profiled steps of each variant (--models)')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f'command: python benchmarks/input_gradient_ab.py --rounds {args.rounds} --threads {args.threads}'
          + (f' --models --steps {args.steps}' if args.models else ''))
    print(f'torch {torch.__version__}, {args.threads} threads, medians')
    kernel_table(args.rounds)
    if args.models:
        model_table(args.steps)


if __name__ == '__main__':
    main()
