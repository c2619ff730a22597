""" torch.compile inference of the CA models: the C kernel as one op against the compiled PyTorch formulation.

For each pair (CA model / baseline), in one process, compiled with the default inductor backend
(`dynamic=False`), each through a function of its own as the benchmark compiles them (before 2026-12-05's
session 21 they shared their class's dynamo cache), inference at each batch size (eval,
`torch.inference_mode`), calls in turn (each variant first in turn):
- `baseline`: the baseline model;
- `kernel_op`: the CA model as it compiles by default, each CA block one call of the C kernel
  (`timm_coordatt::coord_attention_block_inference_`);
- `formulation`: the same CA model with `use_native_kernel = False` on its blocks, so that inductor
  compiles the block's PyTorch ops (means and its 1x1 convs, as compiled training gets them).
With `--split`, where the kernel op's time goes, four more:
- `unchecked`: the CA model as it compiles, each block handing the op its folded weights without the
  check that they are current (each block's `_folded_params` replaced by the weights it returned);
- `op_call`: each block's call of the op without its work: the block's input made channels_last and
  handed, with the block's key, to an op of this script's own, defined and registered as the kernel op
  is, that returns at once (its dispatch from the compiled graph, its guards and the graph around it);
- `identity`: the CA blocks replaced by identities: the rest of the network, as the baseline;
- `one_pass`: each CA block replaced by one in-place pass (`x.mul_(1.0)`), which inductor fuses into the
  kernel before it: the least a block of compiled ops would add.
Models are `settled` first (benchmarks/in_turn.py): one training-mode forward at batch 32, as the
benchmark's warm-up leaves them (BN statistics, and the allocator's state, which moves batch 1 most).
Prints the medians of the per-call times and the medians of the per-call ratios to the baseline.
Compiling takes about a minute a model and batch size.

    python benchmarks/compiled_inference_ab.py [--calls 30] [--batch-sizes 1 32] [--threads 2]
        [--channels-last] [--split] [--pairs mobilenetv2_ca:mobilenetv2_100 ...]
"""
import argparse
from functools import partial
from typing import Callable, Dict

import timm
import torch
from torch import nn

from timm_coordatt import CoordAttention
from timm_coordatt.model_benchmark import _compiled_alone

from in_turn import OnePass, add_pairs_argument, model_pairs, positive_int, replace_blocks, settled, time_in_turn

VARIANTS = ('baseline', 'kernel_op', 'formulation')
SPLIT_VARIANTS = ('unchecked', 'op_call', 'identity', 'one_pass')


# `op_call`'s op: the kernel op's schema, defined and registered as timm_coordatt/coordinate_attention.py does it
_library = torch.library.Library('timm_coordatt_benchmark', 'DEF')
_library.define('op_call_(Tensor(a!) x, Tensor key) -> ()')


def _op_call_(x: torch.Tensor, key: torch.Tensor) -> None:
    pass


_library.impl('op_call_', _op_call_, 'CPU')
torch.library.register_fake('timm_coordatt_benchmark::op_call_', lambda *args: None, lib=_library)


class OpCall(nn.Module):
    """A CA block's compiled call of the kernel op (an in-place block's: the models' blocks are) without the
    kernel: the same input, layout and key, an op that returns at once."""

    def __init__(self, block: CoordAttention):
        super().__init__()
        self.key = block._kernel_key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        torch.ops.timm_coordatt_benchmark.op_call_.default(x, self.key)
        return x


def _unchecked(block: CoordAttention) -> CoordAttention:
    params = block._folded_params()
    block._folded_params = lambda: params
    return block


def _compiled(name: str, memory_format: torch.memory_format, variant: str) -> Callable:
    torch.manual_seed(0)
    model = settled(timm.create_model(name).to(memory_format=memory_format))
    if variant == 'formulation':
        for block in model.modules():
            if isinstance(block, CoordAttention):
                block.use_native_kernel = False
    elif variant in SPLIT_VARIANTS:
        make = {'unchecked': _unchecked, 'op_call': OpCall, 'identity': lambda block: nn.Identity(),
                'one_pass': lambda block: OnePass()}
        model = replace_blocks(model, make[variant])
    return _compiled_alone(model)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--calls', type=positive_int, default=30, help='calls of each variant (default: %(default)s)')
    parser.add_argument('--batch-sizes', type=positive_int, nargs='+', default=[1, 32])
    parser.add_argument('--threads', type=positive_int, default=2)
    parser.add_argument('--channels-last', action='store_true', help='models and inputs channels_last')
    parser.add_argument('--split', action='store_true',
                        help='also the CA model with its weight check skipped, and with an op that does nothing, '
                             "identities and one pass in its blocks' place")
    add_pairs_argument(parser)
    args = parser.parse_args()
    pairs = model_pairs(parser, args.pairs)
    torch.set_num_threads(args.threads)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    print(f'command: python benchmarks/compiled_inference_ab.py --calls {args.calls} --batch-sizes '
          f'{" ".join(map(str, args.batch_sizes))} --threads {args.threads}'
          + (' --channels-last' if args.channels_last else '') + (' --split' if args.split else '')
          + f' --pairs {" ".join(args.pairs)}')
    print(f'torch {torch.__version__}, inductor, {args.threads} threads, 224x224, '
          f'{args.calls} calls of each variant in turn')
    variants = VARIANTS + (SPLIT_VARIANTS if args.split else ())
    print(f'{"CA model":>18} | {"batch":>5} | ' + ' | '.join(f'{v + " ms":>14}' for v in variants)
          + ' | ' + ' | '.join(f'{v + "/base":>16}' for v in variants[1:]))
    for ca_name, base_name in pairs:
        for batch_size in args.batch_sizes:
            models: Dict[str, Callable] = {
                v: _compiled(base_name if v == 'baseline' else ca_name, memory_format, v) for v in variants}
            x = torch.randn(batch_size, 3, 224, 224).contiguous(memory_format=memory_format)
            with torch.inference_mode():  # the warm-up calls compile
                medians, ratios = time_in_turn({v: partial(m, x) for v, m in models.items()}, args.calls, warmup=3)
            print(f'{ca_name:>18} | {batch_size:>5} | ' + ' | '.join(f'{m:14.2f}' for m in medians)
                  + ' | ' + ' | '.join(f'{r:16.3f}' for r in ratios), flush=True)


if __name__ == '__main__':
    main()
