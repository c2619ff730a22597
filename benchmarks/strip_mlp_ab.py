""" The MLP on the strips in training: its C kernels (`_StripMLP`) against the PyTorch ops, in one process.

For each pair, a batch-32 training step (forward, cross-entropy, backward, SGD step) of the baseline, of
the CA model with the strip MLP in the C kernels (as it trains by default) and of the same CA model
with that MLP in PyTorch ops (the pooling and product stay in their kernels), calls in turn; then the
MLP alone, forward and backward, at each CA block's shape, both ways (the kernels at every block: in
training, contiguous inputs take them only where H + W <= `CoordAttention.native_mlp_contiguous_max_hw`):

    python benchmarks/strip_mlp_ab.py [--rounds 12] [--threads 2] [--channels-last] [--freeze-bn]
        [--pairs mobilenetv2_ca:mobilenetv2_100 ...]

`--freeze-bn`: the models' batch norms frozen (`timm.layers.freeze_batch_norm_2d`), as detection and
segmentation backbones are fine-tuned.

The training steps are noisy where glibc maps large activations anew each step (the kernel's page faults);
`MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000` in the environment keeps them in the process.
"""
import argparse

import timm
import torch
import torch.nn.functional as F
from timm.layers import freeze_batch_norm_2d
from timm.optim import create_optimizer_v2

from in_turn import add_pairs_argument, model_pairs, positive_int, time_in_turn
from timm_coordatt import CoordAttention
from timm_coordatt import coordinate_attention

_native_mlp = CoordAttention._native_mlp


def _set_native_mlp(on: bool) -> None:
    """The C strip MLP where the block supports it (on), or the PyTorch ops (off)."""
    CoordAttention._native_mlp = _native_mlp if on else (lambda self, x: False)


def _training_step(name: str, memory_format: torch.memory_format, native_mlp: bool, freeze_bn: bool):
    torch.manual_seed(0)
    model = timm.create_model(name).to(memory_format=memory_format).train()
    if freeze_bn:
        model = freeze_batch_norm_2d(model)
    optimizer = create_optimizer_v2(model, 'sgd', lr=0.01, momentum=0.9)
    x = torch.randn(32, 3, 224, 224).contiguous(memory_format=memory_format)
    target = torch.randint(0, 1000, (32,))

    def step():
        _set_native_mlp(native_mlp)
        F.cross_entropy(model(x), target).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model, step


def _mlp_calls(block: CoordAttention, shape, channels_last: bool):
    """The block's strip MLP, forward and backward, on random (N, C, H + W) strips: C kernels, PyTorch ops."""
    n, c, h, w = shape
    strips = torch.randn(n, h + w, c).transpose(1, 2) if channels_last else torch.randn(n, c, h + w)
    strips.requires_grad_()
    grads = torch.randn(n, c, h, 1), torch.randn(n, c, 1, w)
    bn = None if isinstance(block.bn1, torch.nn.Identity) else block.bn1

    def kernels():
        gates = coordinate_attention._StripMLP.apply(
            strips, h, bn, block.conv1.weight, block.conv1.bias, None if bn is None else bn.weight,
            None if bn is None else bn.bias, block.conv_h.weight, block.conv_h.bias, block.conv_w.weight,
            block.conv_w.bias)
        torch.autograd.backward(gates, grads)

    def ops():
        torch.autograd.backward(block._gates_of_strips(strips, h, w), grads)
    return {'kernels': kernels, 'ops': ops}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_pairs_argument(parser)
    parser.add_argument('--rounds', type=positive_int, default=12)
    parser.add_argument('--threads', type=positive_int, default=2)
    parser.add_argument('--channels-last', action='store_true')
    parser.add_argument('--freeze-bn', action='store_true',
                        help='batch norms frozen (timm.layers.freeze_batch_norm_2d)')
    args = parser.parse_args()
    pairs = model_pairs(parser, args.pairs)
    torch.set_num_threads(args.threads)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    print(f'command: python benchmarks/strip_mlp_ab.py --rounds {args.rounds} --threads {args.threads}'
          f'{" --channels-last" if args.channels_last else ""}{" --freeze-bn" if args.freeze_bn else ""} '
          f'--pairs {" ".join(args.pairs)}')
    print(f'torch {torch.__version__}, {args.threads} threads, {memory_format}, medians of {args.rounds} rounds'
          f'{", batch norms frozen" if args.freeze_bn else ""}')
    for ca_name, base_name in pairs:
        _, base = _training_step(base_name, memory_format, True, args.freeze_bn)
        ca_model, ca_kernels = _training_step(ca_name, memory_format, True, args.freeze_bn)
        _, ca_ops = _training_step(ca_name, memory_format, False, args.freeze_bn)
        medians, ratios = time_in_turn({'baseline': base, 'mlp kernels': ca_kernels, 'mlp ops': ca_ops},
                                       args.rounds, warmup=2)
        print(f'\n{ca_name} vs {base_name}, training step (ms; CA/baseline: median of per-round ratios)')
        for label, ms, ratio in zip(('baseline', 'mlp kernels', 'mlp ops'), medians, [1.0] + ratios):
            print(f'  {label:12s} {ms:9.1f}  {ratio:6.3f}')

        shapes = []
        hooks = [m.register_forward_pre_hook(lambda m, a: shapes.append((m, tuple(a[0].shape))))
                 for m in ca_model.modules() if isinstance(m, CoordAttention)]
        with torch.no_grad():
            ca_model(torch.randn(1, 3, 224, 224).contiguous(memory_format=memory_format))
        for hook in hooks:
            hook.remove()
        _set_native_mlp(True)
        print('  strip MLP alone, forward + backward, batch 32 (ms):')
        totals = [0., 0.]
        for block, (_, c, h, w) in shapes:
            (kernels, ops), _ = time_in_turn(_mlp_calls(block, (32, c, h, w), args.channels_last), args.rounds, 2)
            totals = [totals[0] + kernels, totals[1] + ops]
            print(f'    {c:4d}x{h:3d}x{w:<3d} rd {block.conv1.out_channels:3d}  kernels {kernels:6.3f}  '
                  f'ops {ops:6.3f}  {ops / kernels:5.2f}x')
        print(f'    all blocks          kernels {totals[0]:6.2f}  ops {totals[1]:6.2f}  {totals[1] / totals[0]:5.2f}x')


if __name__ == '__main__':
    main()
