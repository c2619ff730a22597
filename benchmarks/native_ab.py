""" Two builds of the C kernels side by side: the installed one against another build of `_native`.

For work on timm_coordatt/csrc: keep a build of the version to compare against, e.g.

    git stash && pip install -e . && cp timm_coordatt/_native*.so /tmp/before.so && git stash pop && pip install -e .
    python benchmarks/native_ab.py /tmp/before.so [--rounds 15] [--threads 2]

Times, in one process, each build going first in turn, at the shapes of MobileNetV2's CA blocks (batch
1, and two at batch 32) in both memory formats: the inference kernel out of place and in place (as
the registered models run it; each in-place call on a fresh copy of the input, the copy's time, taken
in the same rounds, subtracted: repeated calls in place would shrink x towards denormals), and the
training pooling and product, the latter also into a freshly allocated output each call
(`gate_fresh`, as training allocates it: the page faults of new memory included), and their backward
(`gate_backward`: the gates' gradients; `strips_backward`: x's whole gradient, the pooling's and the
product's). Prints medians (us a call), before/after (> 1: the installed build is faster) and whether
both builds' outputs are bit for bit the same.

With `--models`, the registered models instead: each pair's baseline and its CA model with each build,
eval mode at batch 1 in both memory formats (`settled` first, benchmarks/in_turn.py), calls in turn
(`--model-calls` each; each build right after the other in half the rounds, the baseline first), where a
kernel call pays for what the model around it left in the caches:

    python benchmarks/native_ab.py /tmp/before.so --models [--pairs CA:BASELINE ...]

With `--models --train`, training steps instead (batch 32, forward, cross-entropy, backward, SGD step,
as `timm-coordatt benchmark` takes them), `--model-calls` steps of each, where the kernels' fresh
full-size outputs pay for their pages:

    python benchmarks/native_ab.py /tmp/before.so --models --train --model-calls 25

With `--models --train --ops`, the CA model's own ops in such steps instead: each build in turn for
`--model-calls` steps, each profiled (`torch.profiler`) after an unprofiled one, and the medians of their
self time in the CA blocks' autograd Functions and in `ConvolutionBackward0` (which recomputes the CA
outputs for the next conv's backward). A kernel's share of a step is a few milliseconds, well inside the
steps' spread from one to the next; the ops' own times move far less:

    python benchmarks/native_ab.py /tmp/before.so --models --train --ops --model-calls 6
"""
import argparse
import importlib.machinery
import importlib.util
import statistics
import time
from typing import Callable, Dict

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile
from timm.optim import create_optimizer_v2

from in_turn import add_pairs_argument, model_pairs, non_negative_seconds, positive_int, settled, time_in_turn
from timm_coordatt import CoordAttention, native

SHAPES = [(1, 144, 56, 56), (1, 192, 28, 28), (1, 384, 14, 14), (1, 576, 14, 14), (1, 960, 7, 7),
          (32, 144, 56, 56), (32, 960, 7, 7)]
OPS = ('infer', 'infer_inplace', 'strips', 'gate', 'gate_fresh', 'gate_backward', 'strips_backward')


def _load(path: str):
    loader = importlib.machinery.ExtensionFileLoader('timm_coordatt_before._native', path)
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _per_call(fn: Callable[[], None], min_time: float) -> float:
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if calls >= 3 and elapsed >= min_time:
            return elapsed / calls * 1e6


def _calls(lib, op: str, shape, channels_last: bool, threads: int) -> Dict[str, Callable[[], torch.Tensor]]:
    """The op's call through `lib`, returning its output, and (in place) the input copy alone."""
    torch.manual_seed(0)  # the same inputs and weights for both builds
    n, c, h, w = shape
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    source = torch.randn(shape).contiguous(memory_format=memory_format)
    x, out = torch.empty_like(source), torch.empty_like(source)
    if op.startswith('infer'):
        weights = CoordAttention(c).eval()._folded_params().native
        in_place = op == 'infer_inplace'
        src, dst = (x, x) if in_place else (source, out)

        def copy():
            x.copy_(source)

        def call():
            if in_place:
                copy()
            lib.forward(src.data_ptr(), dst.data_ptr(), n, c, h, w, weights.rd_channels, *weights.addresses,
                        channels_last, threads)
            return dst
        return {'call': call, 'copy': copy if in_place else None}
    a_h, a_w = torch.rand(n, c, h, 1), torch.rand(n, c, 1, w)
    a_h, a_w = a_h.contiguous(memory_format=memory_format), a_w.contiguous(memory_format=memory_format)
    strips = torch.empty((n, h + w, c) if channels_last else (n, c, h + w))
    grad, grad_strips = torch.randn_like(source), torch.randn_like(strips)
    grad_gates = torch.empty(n * c * (h + w))  # the gates' gradients, (a_h's, a_w's), in one tensor to compare
    grad_a_h, grad_a_w = grad_gates.split([n * c * h, n * c * w])

    def call():
        if op == 'strips':
            lib.strips(source.data_ptr(), strips.data_ptr(), n, c, h, w, channels_last, threads)
            return strips
        if op == 'gate_backward':  # the gates' gradients only, as training asks for them
            lib.gate_backward(source.data_ptr(), a_h.data_ptr(), a_w.data_ptr(), grad.data_ptr(), 0,
                              grad_a_h.data_ptr(), grad_a_w.data_ptr(), n, c, h, w, channels_last, threads)
            return grad_gates
        if op == 'strips_backward':  # x's whole gradient: the pooling's and the gate product's
            lib.strips_backward(grad_strips.data_ptr(), grad.data_ptr(), a_h.data_ptr(), a_w.data_ptr(),
                                out.data_ptr(), n, c, h, w, channels_last, threads)
            return out
        target = torch.empty_like(source) if op == 'gate_fresh' else out
        lib.gate(source.data_ptr(), a_h.data_ptr(), a_w.data_ptr(), target.data_ptr(), n, c, h, w, channels_last,
                 threads)
        return target
    return {'call': call, 'copy': None}


def _training_step(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    optimizer = create_optimizer_v2(model.train(), 'sgd', lr=0.01, momentum=0.9)
    target = torch.randint(0, model.num_classes, (x.shape[0],))

    def step():
        F.cross_entropy(model(x), target).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def _model_rows(libs, pairs, calls: int, train: bool) -> None:
    """Each pair's baseline and CA model with each build, at batch 1 in eval mode or training steps
    at batch 32, calls in turn."""
    print(f'{"CA model":>15} | {"layout":>13} | {"baseline ms":>11} | {"before ms":>9} | {"after ms":>9} | '
          f'before/base | after/base')
    for ca_name, base_name in pairs:
        for memory_format in (torch.contiguous_format, torch.channels_last):
            torch.manual_seed(0)
            base = settled(timm.create_model(base_name).to(memory_format=memory_format))
            ca = settled(timm.create_model(ca_name).to(memory_format=memory_format))
            x = torch.randn(32 if train else 1, 3, 224, 224).contiguous(memory_format=memory_format)
            base_call, ca_call = (_training_step(base, x), _training_step(ca, x)) if train else (
                lambda: base(x), lambda: ca(x))

            def with_build(lib):
                def call():
                    native._native = lib  # what the blocks' kernel calls go through
                    ca_call()
                return call
            try:
                with torch.inference_mode(not train):
                    # one model with either build: each build right after the other in half the rounds
                    (base_ms, before_ms, after_ms), (before_ratio, after_ratio) = time_in_turn(
                        {'baseline': base_call, 'before': with_build(libs['before']),
                         'after': with_build(libs['after'])}, calls, warmup=2 if train else 3,
                        orders=[('baseline', 'before', 'after'), ('baseline', 'after', 'before')])
            finally:
                native._native = libs['after']
            layout = 'channels_last' if memory_format == torch.channels_last else 'contiguous'
            print(f'{ca_name:>15} | {layout:>13} | {base_ms:11.2f} | {before_ms:9.2f} | {after_ms:9.2f} | '
                  f'{before_ratio:11.3f} | {after_ratio:10.3f}', flush=True)


# the CA blocks' autograd Functions, and the node whose saved input, a CA output, is recomputed
CA_OPS = ('_StripPool', '_StripMLP', '_CoordGate', '_CoordGateBackward', '_StripMLPBackward', '_StripPoolBackward',
          'ConvolutionBackward0')


def _op_rows(libs, pairs, steps: int) -> None:
    """Each pair's CA model with each build in turn: the median self time (ms) of its ops in a training step."""
    print(f'{"CA model":>15} | {"layout":>13} | {"op":>20} | {"before ms":>9} | {"after ms":>9} | before/after')
    for ca_name, _ in pairs:
        for memory_format in (torch.contiguous_format, torch.channels_last):
            torch.manual_seed(0)
            model = timm.create_model(ca_name).to(memory_format=memory_format)
            step = _training_step(model, torch.randn(32, 3, 224, 224).contiguous(memory_format=memory_format))
            times = {name: {op: [] for op in CA_OPS + ('step',)} for name in libs}
            try:
                for r in range(steps):
                    for name in (('before', 'after') if r % 2 == 0 else ('after', 'before')):
                        native._native = libs[name]
                        step()
                        with profile(activities=[ProfilerActivity.CPU]) as prof:
                            step()
                        self_ms = {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()}
                        for op in CA_OPS:
                            times[name][op].append(self_ms.get(op, 0.0))
                        times[name]['step'].append(sum(self_ms.values()))
            finally:
                native._native = libs['after']
            layout = 'channels_last' if memory_format == torch.channels_last else 'contiguous'
            for op in CA_OPS + ('step',):
                before, after = (statistics.median(times[name][op]) for name in ('before', 'after'))
                print(f'{ca_name:>15} | {layout:>13} | {op:>20} | {before:9.2f} | {after:9.2f} | '
                      f'{before / after if after else float("nan"):12.2f}', flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('before', help='path of the other build of timm_coordatt/_native (a .so or .pyd)')
    parser.add_argument('--rounds', type=positive_int, default=15, help='rounds of the kernels (not --models)')
    parser.add_argument('--threads', type=positive_int, default=2)
    parser.add_argument('--min-time', type=non_negative_seconds, default=0.02,
                        help='seconds of calls per sample of the kernels (not --models)')
    parser.add_argument('--models', action='store_true', help='time the registered models instead of the kernels')
    parser.add_argument('--model-calls', type=positive_int, default=300, help='calls of each model (--models)')
    parser.add_argument('--train', action='store_true', help='with --models: training steps at batch 32')
    parser.add_argument('--ops', action='store_true',
                        help='with --models --train: the CA model\'s ops\' self time in its steps with each build')
    add_pairs_argument(parser)
    args = parser.parse_args()
    if args.train and not args.models:
        parser.error('--train goes with --models')
    if args.ops and not (args.models and args.train):
        parser.error('--ops goes with --models --train')
    pairs = model_pairs(parser, args.pairs)
    try:
        before = _load(args.before)
    except (ImportError, OSError) as e:
        parser.error(f'cannot load {args.before} as a build of timm_coordatt/_native: {e}')
    if not native.built:
        raise SystemExit('the installed package has no C kernels to compare')
    if args.models and not native.available():
        raise SystemExit('TIMM_COORDATT_NATIVE turns the kernels off: the CA blocks of --models would call '
                         'neither build')
    torch.set_num_threads(args.threads)
    libs = {'before': before, 'after': native._native}
    if args.models:
        print(f'command: python benchmarks/native_ab.py {args.before} --models {"--train " if args.train else ""}'
              f'{"--ops " if args.ops else ""}--model-calls {args.model_calls} --threads {args.threads} '
              f'--pairs {" ".join(args.pairs)}')
        if args.ops:
            print(f'torch {torch.__version__}, {args.threads} threads, training steps at batch 32, 224x224, '
                  f'medians of {args.model_calls} profiled steps of each build in turn (self time); after = the '
                  'installed build')
            _op_rows(libs, pairs, args.model_calls)
            return
        what = 'training steps at batch 32' if args.train else 'batch 1, eval'
        print(f'torch {torch.__version__}, {args.threads} threads, {what}, 224x224, medians of '
              f'{args.model_calls} calls in turn; after = the installed build; ratios: medians of each round\'s')
        _model_rows(libs, pairs, args.model_calls, args.train)
        return
    print(f'command: python benchmarks/native_ab.py {args.before} --rounds {args.rounds} --threads {args.threads} '
          f'--min-time {args.min_time}')
    print(f'torch {torch.__version__}, {args.threads} threads, medians of {args.rounds} interleaved rounds '
          f'(us a call); after = the installed build')
    print(f'{"layout":>13} | {"N/C/H/W":>15} | {"op":>13} | {"before":>9} | {"after":>9} | before/after | same bits')
    for channels_last in (False, True):
        for shape in SHAPES:
            for op in OPS:
                calls = {name: _calls(lib, op, shape, channels_last, args.threads) for name, lib in libs.items()}
                same = torch.equal(calls['before']['call']().clone(), calls['after']['call']())
                samples = {name: [] for name in libs}
                copies = []
                for r in range(args.rounds):
                    for name in (('before', 'after') if r % 2 == 0 else ('after', 'before')):
                        samples[name].append(_per_call(calls[name]['call'], args.min_time))
                    if calls['after']['copy'] is not None:
                        copies.append(_per_call(calls['after']['copy'], args.min_time))
                copy = statistics.median(copies) if copies else 0.0
                before, after = (statistics.median(samples[name]) - copy for name in libs)
                layout = 'channels_last' if channels_last else 'contiguous'
                print(f'{layout:>13} | {"/".join(map(str, shape)):>15} | {op:>13} | {before:9.1f} | {after:9.1f} | '
                      f'{before / after:12.2f} | {"yes" if same else "NO":>9}', flush=True)


if __name__ == '__main__':
    main()
