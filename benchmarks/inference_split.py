""" Where a CA model's batch-1 inference time goes: the CA blocks' kernel against their Python.

For each pair (CA model / baseline) and memory format, in one process, calls in turn (each variant
first in turn), single images:
- `baseline`: the baseline model;
- `ca`: the CA model as it runs;
- `kernel_only`: the same CA model with each CA block calling its C kernel directly, with none of
  the block's per-call Python (mode, layout and cache checks): what the kernels alone cost;
- `identity`: the same CA model with its CA blocks replaced by identities: the rest of the network,
  which should cost what the baseline does;
- `one_pass`: the same CA model with each CA block replaced by one in-place pass of torch's own over
  its input (`x.mul_(1.0)`): the least a block that reads and writes its tensor costs the network, its
  own time and the layers after it, which then run on an input written anew.
Models are `settled` first (benchmarks/in_turn.py): one training-mode forward at batch 32, as the
benchmark's warm-up leaves them (BN statistics, and the allocator's state, which moves batch 1 most).
Prints the medians of the per-call times and the median of the per-call ratios to the baseline
(calls taken next to each other share the machine's state). `--freeze-bn`: both models with their batch
norms frozen after settling (`timm.layers.freeze_batch_norm_2d`), as detection backbones are fine-tuned.
`--inference-params`: both models created under `torch.inference_mode()` (as a script decorated with it
builds them): their parameters are inference tensors, which have no version counters.

    python benchmarks/inference_split.py [--calls 150] [--threads 2] [--freeze-bn] [--inference-params]
        [--pairs mobilenetv2_ca:mobilenetv2_100 ...]
"""
import argparse
from functools import partial
from typing import Dict

import timm
import torch
from timm.layers import freeze_batch_norm_2d
from torch import nn

import timm_coordatt  # noqa: F401  (registers the models)
from timm_coordatt import CoordAttention, native

from in_turn import OnePass, add_pairs_argument, model_pairs, positive_int, replace_blocks, settled, time_in_turn


class _KernelOnly(nn.Module):
    """A CA block's inference as one kernel call, its checks made once here instead of every call."""

    def __init__(self, block: CoordAttention):
        super().__init__()
        self.weights = block._folded_params().native
        if self.weights is None or not native.available():
            raise SystemExit('the C kernels are not built or not enabled')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return native.run_inference(x, x, self.weights, not x.is_contiguous())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--calls', type=positive_int, default=150, help='calls of each variant (default: %(default)s)')
    parser.add_argument('--threads', type=positive_int, default=2)
    parser.add_argument('--freeze-bn', action='store_true',
                        help='batch norms frozen (timm.layers.freeze_batch_norm_2d), as detection and '
                             'segmentation backbones are fine-tuned')
    parser.add_argument('--inference-params', action='store_true',
                        help='models created under torch.inference_mode(): inference-tensor parameters')
    add_pairs_argument(parser)
    args = parser.parse_args()
    pairs = model_pairs(parser, args.pairs)
    torch.set_num_threads(args.threads)
    print(f'command: python benchmarks/inference_split.py --calls {args.calls} --threads {args.threads} '
          f'{"--freeze-bn " if args.freeze_bn else ""}{"--inference-params " if args.inference_params else ""}'
          f'--pairs {" ".join(args.pairs)}')
    print(f'torch {torch.__version__}, {args.threads} threads, batch 1, 224x224, '
          f'{args.calls} calls of each variant in turn')
    variants = ['baseline', 'ca', 'kernel_only', 'identity', 'one_pass']
    print(f'{"CA model":>18} | {"layout":>13} | ' + ' | '.join(f'{v + " ms":>14}' for v in variants)
          + ' | ' + ' | '.join(f'{v + "/base":>16}' for v in variants[1:]))
    for ca_name, base_name in pairs:
        for channels_last in (False, True):
            memory_format = torch.channels_last if channels_last else torch.contiguous_format
            torch.manual_seed(0)
            prepare = freeze_batch_norm_2d if args.freeze_bn else lambda model: model
            with torch.inference_mode(args.inference_params):
                ca = prepare(settled(timm.create_model(ca_name).to(memory_format=memory_format)))
                models: Dict[str, nn.Module] = {
                    'baseline': prepare(settled(timm.create_model(base_name).to(memory_format=memory_format))),
                    'ca': ca,
                    'kernel_only': replace_blocks(ca, _KernelOnly),
                    'identity': replace_blocks(ca, lambda block: nn.Identity()),
                    'one_pass': replace_blocks(ca, lambda block: OnePass()),
                }
            x = torch.randn(1, 3, 224, 224).contiguous(memory_format=memory_format)
            with torch.inference_mode():  # warm-up: folded weights, allocator, oneDNN primitives
                medians, ratios = time_in_turn({v: partial(m, x) for v, m in models.items()}, args.calls, warmup=5)
            layout = 'channels_last' if channels_last else 'contiguous'
            print(f'{ca_name:>18} | {layout:>13} | ' + ' | '.join(f'{m:14.2f}' for m in medians)
                  + ' | ' + ' | '.join(f'{r:16.3f}' for r in ratios), flush=True)


if __name__ == '__main__':
    main()
