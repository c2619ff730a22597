""" `timm-coordatt train`: fine-tune any timm model on an ImageFolder, or on the embedded grid task. """
import argparse
import copy
import functools
import sys
from typing import Set

import torch

from . import HelpFormatter, add_model_kwargs

DEFAULT_MODEL = 'mobilenetv2_050_ca'


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        'train', help='fine-tune a model (default: a small CA model on the embedded grid task)',
        description='Fine-tune any timm model (the *_ca models of this package included) on an ImageFolder '
                    'directory, or, with no --data-dir, on an embedded task generated on the fly whose labels '
                    'depend on where a target shape is. Writes config.json + model.safetensors (loadable with '
                    '--model local-dir:RUN), best/, metrics.jsonl and a resumable training_state.pt. Launch '
                    'with torchrun --nproc_per_node=N -m timm_coordatt train ... for DistributedDataParallel.',
        formatter_class=HelpFormatter)

    g = p.add_argument_group('data')
    g.add_argument('--data-dir', metavar='DIR',
                   help='ImageFolder root: DIR/train + DIR/val (or validation), or DIR/<class>/<image> with '
                        '--val-fraction held out; default: the embedded grid task')
    g.add_argument('--val-fraction', type=float, default=0.1,
                   help='fraction held out for validation when DIR has no validation folder')
    g.add_argument('--grid', type=int, default=3, help='embedded task: cells per side (grid**2 classes)')
    g.add_argument('--grid-samples', type=int, default=4000, help='embedded task: training images')
    g.add_argument('--grid-val-samples', type=int, default=500, help='embedded task: validation images')
    g.add_argument('--img-size', type=int, help="input size (default: the model's, 48 for the embedded task)")
    g.add_argument('--no-aug', action='store_true', help='no training augmentation (always off for the embedded task)')
    g.add_argument('--workers', type=int, default=2, help='data loading processes per training process')

    g = p.add_argument_group('model')
    g.add_argument('--model', default=DEFAULT_MODEL, help='timm model name, local-dir:DIR or hf-hub:ID')
    g.add_argument('--pretrained', action='store_true', help="start from the model's pretrained weights")
    g.add_argument('--initial-checkpoint', metavar='FILE',
                   help='start from these weights (safetensors or torch file); the classifier is re-initialised '
                        'when the number of classes differs or the file has none (a backbone\'s weights)')
    add_model_kwargs(g, example='drop_rate=0.2')
    g.add_argument('--freeze', type=int, default=0, metavar='N',
                   help="freeze the first N layer groups of the model's group_matcher (stem = 1), BN statistics "
                        "included")
    g.add_argument('--grad-checkpointing', action='store_true', help='trade compute for activation memory')
    g.add_argument('--recompute-ca', action=argparse.BooleanOptionalAction, default=None,
                   help='recompute CoordAttention outputs in backward instead of holding them (less memory, same '
                        'gradients; eager only): the registered CA models do by default, --recompute-ca makes any '
                        'model with CA blocks do it, --no-recompute-ca turns it off')
    g.add_argument('--channels-last', action='store_true', help='channels-last memory layout')
    g.add_argument('--compile', action='store_true', help='torch.compile the training model')
    g.add_argument('--sync-bn', action='store_true', help='SyncBatchNorm across processes (distributed only)')

    g = p.add_argument_group('optimisation')
    g.add_argument('--epochs', type=int, default=4, help='passes over the training images')
    g.add_argument('--batch-size', '-b', type=int, default=32, help='images per step and process')
    g.add_argument('--opt', default='adamw', help='any timm.optim optimizer name')
    g.add_argument('--lr', type=float, default=3e-3, help='peak learning rate (for the global batch)')
    g.add_argument('--weight-decay', type=float, default=0.05, help="the optimizer's weight decay")
    g.add_argument('--momentum', type=float, default=0.9, help='for optimizers with momentum')
    g.add_argument('--layer-decay', type=float, help='layer-wise learning-rate decay (e.g. 0.75)')
    g.add_argument('--clip-grad', type=float, help='clip the gradient norm to this value')
    g.add_argument('--sched', default='cosine', choices=('cosine', 'tanh', 'poly', 'wsd', 'constant', 'none'),
                   help='learning-rate schedule, stepped every update (none: --lr throughout)')
    g.add_argument('--warmup-epochs', type=float,
                   help='linear warm-up from --warmup-lr (default: 1 epoch, none with --epochs 1 or --sched none)')
    g.add_argument('--warmup-lr', type=float, default=1e-5, help='learning rate the warm-up starts from')
    g.add_argument('--min-lr', type=float, default=1e-5, help='learning rate the schedule ends at')
    g.add_argument('--smoothing', type=float, default=0.1, help='label smoothing')
    g.add_argument('--model-ema', action='store_true', help='keep (and validate) an EMA of the weights')
    g.add_argument('--model-ema-decay', type=float, default=0.998, help='decay of the EMA per update')
    g.add_argument('--amp', action='store_true', help='mixed precision, in --amp-dtype')
    g.add_argument('--amp-dtype', choices=('float16', 'bfloat16'),
                   help='with --amp (default: float16 with loss scaling on CUDA, bfloat16 on CPU)')

    g = p.add_argument_group('run')
    g.add_argument('--output', metavar='DIR', help='run directory (default: output/train/<time>-<model>)')
    g.add_argument('--resume', metavar='DIR', help='continue the interrupted or finished run in DIR')
    g.add_argument('--seed', type=int, default=42, help='initial weights, data order, augmentation')
    g.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                   help='cpu, cuda or cuda:N')
    p.set_defaults(func=functools.partial(_main, parser=p))


def _given_options(parser: argparse.ArgumentParser) -> Set[str]:
    """The destinations of the options on the command line `parser` last parsed, whatever their values (none
    known where the parser does not keep its arguments)."""
    if not hasattr(parser, 'parsed_args'):
        return set()
    quiet = copy.deepcopy(parser)
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
    return set(vars(quiet.parse_args(parser.parsed_args))) - {'func'}  # the one default set_defaults gives


def _main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from ..training import UsageError, fit
    given = _given_options(parser)
    defaults = {k: parser.get_default(k) for k in vars(args) if k not in given}
    try:
        return fit(args, defaults)
    except UsageError as e:
        print(f'timm-coordatt train: error: {e}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print('timm-coordatt train: aborted; the checkpoint saved last (if any) is kept', file=sys.stderr)
        return 130
