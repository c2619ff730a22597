""" Each CA model against its baseline as ExecuTorch runs them: exported at a fixed size (`torch.export`),
lowered to the XNNPACK delegate, timed in one process with the two models' calls in turn.

Prints, per model, how many XNNPACK parts the program has and which ops run outside them (on ExecuTorch's
portable kernels), the error against eager PyTorch, the median latency and CA/baseline. ExecuTorch is not a
dependency of the package; it pins no torch of its own when installed without its dependencies:

    pip install --no-deps executorch==1.5.1 torchao==0.18.0 && pip install flatbuffers ruamel.yaml pyaml tabulate
    python benchmarks/executorch_xnnpack.py [--img-size 224] [--rounds 100] [--pairs CA:BASELINE ...]
"""
import argparse
import os
import shlex
import sys
import tempfile

import timm
import torch

import timm_coordatt  # noqa: F401  registers the models
from in_turn import add_pairs_argument, model_pairs, positive_int, time_in_turn

INSTALL = ('pip install --no-deps executorch==1.5.1 torchao==0.18.0 && '
           'pip install flatbuffers ruamel.yaml pyaml tabulate')
try:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime
except ImportError as e:
    sys.exit(f'executorch_xnnpack.py: expected ExecuTorch ({e}); install it with: {INSTALL}')


def _name(target) -> str:
    return str(target) if isinstance(target, torch._ops.OpOverload) else getattr(target, '__name__', str(target))


def lower(model: torch.nn.Module, x: torch.Tensor, path: str):
    """The model's XNNPACK program, written to `path` and loaded for running; the count of its delegated parts and
    the ops outside them."""
    program = to_edge_transform_and_lower(
        torch.export.export(model, (x,)), partitioner=[XnnpackPartitioner()]).to_executorch()
    targets = [_name(n.target) for n in program.exported_program().graph_module.graph.nodes if n.op == 'call_function']
    parts = sum('executorch_call_delegate' in t for t in targets)
    outside = sorted({t for t in targets if 'executorch_call_delegate' not in t and 'getitem' not in t})
    with open(path, 'wb') as f:
        f.write(program.buffer)
    return Runtime.get().load_program(path).load_method('forward'), parts, outside


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    add_pairs_argument(parser)
    parser.add_argument('--img-size', type=positive_int, default=224)
    parser.add_argument('--rounds', type=positive_int, default=100, help='calls of each model, in turn')
    args = parser.parse_args()
    pairs = model_pairs(parser, args.pairs)
    torch.manual_seed(0)
    x = torch.randn(1, 3, args.img_size, args.img_size)
    print('command: python benchmarks/executorch_xnnpack.py ' + shlex.join(sys.argv[1:]))
    print(f'torch {torch.__version__}, {args.img_size}x{args.img_size}, batch 1, '
          f'medians of {args.rounds} calls in turn')
    print(f'{"model":18s} {"XNNPACK parts":>13s} {"rel. error":>10s} {"ms":>7s} {"CA/base":>7s}  outside XNNPACK')
    with tempfile.TemporaryDirectory() as folder:
        for pair in pairs:
            calls, rows = {}, []
            for name in reversed(pair):  # the baseline first: time_in_turn's ratios are to the first call
                model = timm.create_model(name).eval()
                with torch.no_grad():
                    expected = model(x)
                method, parts, outside = lower(model, x, os.path.join(folder, f'{name}.pte'))
                error = ((method.execute([x])[0] - expected).abs().max() / expected.abs().max()).item()
                calls[name] = lambda method=method: method.execute([x])
                rows.append((name, parts, error, outside))
            medians, (ratio,) = time_in_turn(calls, rounds=args.rounds, warmup=5)
            for (name, parts, error, outside), ms, shown in zip(rows, medians, ('', f'{ratio:.2f}')):
                print(f'{name:18s} {parts:13d} {error:10.1e} {ms:7.2f} {shown:>7s}  {", ".join(outside) or "-"}')


if __name__ == '__main__':
    main()
