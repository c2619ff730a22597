""" Coordinate Attention vs Squeeze-and-Excitation vs no attention on the embedded grid task.

Trains the same small network three times per seed, differing only in the attention layer after
the depthwise conv of each expansion-6 block (the MobileNetV2 0.5 layout of `mobilenetv2_050_ca`):
  ca    Coordinate Attention (this package's layer, reduction 32, min 8 channels)
  se    Squeeze-and-Excitation (timm's EfficientNet SE, reduction 24 as in the CA paper's SE
        baseline, min 8 channels)
  none  no attention
Every run goes through `timm-coordatt train` with the same options (the defaults unless given);
the table reports the validation top-1 after the last epoch (mean ± sample std over seeds, median,
each seed's) and the median seconds a run took.

    python benchmarks/attention_on_grid_task.py --seeds 0 1 2
"""
import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from functools import partial

from torch import nn

import timm
import timm_coordatt  # noqa: F401  registers 'ca' with timm's attention factory
from timm.models import build_model_with_cfg, register_model
from timm.models._efficientnet_blocks import SqueezeExcite
from timm.models._efficientnet_builder import decode_arch_def, round_channels
from timm.models._registry import generate_default_cfgs
from timm.models.efficientnet import EfficientNet
from timm_coordatt import CoordAttentionFactory
from timm_coordatt.cli import main as cli_main
from timm_coordatt.training import CONFIG_FILE

ATTENTION = {
    'ca': CoordAttentionFactory(),
    # rd_round_fn floors the reduced width at 8 like CA's, so the two layers have a similar size
    'se': partial(SqueezeExcite, rd_round_fn=lambda c: max(8, round(c))),
    'none': None,
}


def _build(variant: str, attention: str, pretrained: bool = False, **kwargs) -> EfficientNet:
    """MobileNetV2 0.5 (timm's layout) with `attention` in every expansion-6 block."""
    # timm's builder divides the `_se` ratio by the expansion (6): 0.25 gives SE a reduced width of
    # 1/24 of the expanded channels; CA ignores the ratio and uses its own reduction. Without `_se`
    # the builder adds no attention (EfficientNet would swap se_layer=None for its own SE).
    se = '_se0.25' if ATTENTION[attention] is not None else ''
    arch_def = [
        ['ds_r1_k3_s1_c16'],
        [f'ir_r2_k3_s2_e6_c24{se}'],
        [f'ir_r3_k3_s2_e6_c32{se}'],
        [f'ir_r4_k3_s2_e6_c64{se}'],
        [f'ir_r3_k3_s1_e6_c96{se}'],
        [f'ir_r3_k3_s2_e6_c160{se}'],
        [f'ir_r1_k3_s1_e6_c320{se}'],
    ]
    round_chs_fn = partial(round_channels, multiplier=0.5)
    return build_model_with_cfg(
        EfficientNet, variant, pretrained,
        block_args=decode_arch_def(arch_def), num_features=1280, stem_size=32, round_chs_fn=round_chs_fn,
        act_layer=nn.ReLU6, se_layer=ATTENTION[attention], **kwargs)


default_cfgs = generate_default_cfgs({f'grid_mbv2_050_{a}': {'num_classes': 1000} for a in ATTENTION})


@register_model
def grid_mbv2_050_ca(pretrained: bool = False, **kwargs) -> EfficientNet:
    return _build('grid_mbv2_050_ca', 'ca', pretrained, **kwargs)


@register_model
def grid_mbv2_050_se(pretrained: bool = False, **kwargs) -> EfficientNet:
    return _build('grid_mbv2_050_se', 'se', pretrained, **kwargs)


@register_model
def grid_mbv2_050_none(pretrained: bool = False, **kwargs) -> EfficientNet:
    return _build('grid_mbv2_050_none', 'none', pretrained, **kwargs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--attention', nargs='+', choices=list(ATTENTION), default=list(ATTENTION))
    parser.add_argument('--output', help='keep the runs here (default: a temporary directory)')
    parser.add_argument('--results-file', help='write the per-run results as JSON lines here')
    args, train_args = parser.parse_known_args()
    # every other option goes to `timm-coordatt train` unchanged, e.g. --epochs 4 --img-size 48
    # (argparse takes abbreviations: --mod is --model to train)
    options = [a.split('=')[0] for a in train_args if a.startswith('--') and len(a.split('=')[0]) > 2]
    own = sorted({r for a in options for r in ('--model', '--seed', '--output', '--resume') if r.startswith(a)})
    if own:
        parser.error(f'{", ".join(own)}: set by this script for each run; expected other train options')
    for name in ('seeds', 'attention'):
        values = getattr(args, name)
        if len(set(values)) != len(values):
            parser.error(f'--{name} expected distinct values, got {" ".join(map(str, values))}')
    if args.results_file:
        try:  # before hours of training
            open(args.results_file, 'a').close()
        except OSError as e:
            parser.error(f'--results-file {args.results_file}: {e.strerror}')

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = args.output or tmp
        for seed in args.seeds:
            for attention in args.attention:
                model = f'grid_mbv2_050_{attention}'
                run = os.path.join(root, f'{model}-seed{seed}')
                start = time.perf_counter()
                rc = cli_main(['train', '--model', model, '--seed', str(seed), '--output', run, *train_args])
                if rc != 0:
                    return rc
                with open(os.path.join(run, 'metrics.jsonl')) as f:
                    last = [json.loads(line) for line in f][-1]
                with open(os.path.join(run, CONFIG_FILE)) as f:
                    num_classes = json.load(f)['num_classes']  # the task's: --grid squared
                params = sum(p.numel() for p in timm.create_model(model, num_classes=num_classes).parameters())
                result = {'attention': attention, 'seed': seed, 'params': params, 'val_top1': last['val_top1'],
                          'val_loss': last['val_loss'], 'epochs': last['epoch'],
                          'seconds': time.perf_counter() - start}
                results.append(result)
                print(json.dumps(result), file=sys.stderr, flush=True)
                if args.results_file:
                    with open(args.results_file, 'a') as f:
                        f.write(json.dumps(result) + '\n')

    options = ['--seeds', *map(str, args.seeds), '--attention', *args.attention] + (
        ['--output', args.output] if args.output else []) + (
        ['--results-file', args.results_file] if args.results_file else [])
    print(f'\ncommand: python benchmarks/attention_on_grid_task.py {shlex.join(options + train_args)}')
    print(f'validation top-1 (%) on the {results[0]["epochs"]}-epoch grid task, {len(args.seeds)} seeds')
    print('| attention | params | top-1 (%) mean ± std | median | per seed | median s per run |')
    print('|---|---:|---:|---:|---|---:|')
    for attention in args.attention:
        rows = [r for r in results if r['attention'] == attention]
        top1 = [r['val_top1'] for r in rows]
        std = statistics.stdev(top1) if len(top1) > 1 else 0.
        seconds = statistics.median(r['seconds'] for r in rows)
        print(f'| {attention} | {rows[0]["params"]:,} | {statistics.mean(top1):.1f} ± {std:.1f} | '
              f'{statistics.median(top1):.1f} | {", ".join(f"{t:.1f}" for t in top1)} | {seconds:.0f} |')
    return 0


if __name__ == '__main__':
    sys.exit(main())
