""" `timm-coordatt validate`: top-1 / top-5 and loss of a model on an ImageFolder (or the embedded task). """
import argparse
import json
import os
import sys

import torch

from . import HelpFormatter, add_model_kwargs


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        'validate', help='top-1 / top-5 accuracy and loss on an ImageFolder',
        description="Evaluate a model with its own data config (input size, crop, interpolation, mean/std "
                    "from resolve_data_config). Folder names are matched to the model's label names when its "
                    "config has them (e.g. a run directory of `train`), else taken in timm's order (2 before 10). "
                    "With no --data-dir, evaluates on the embedded grid task's validation split.",
        formatter_class=HelpFormatter)
    add_model_arguments(p, batch_size=64)
    p.add_argument('--data-dir', metavar='DIR', help='ImageFolder root, or a root with a val/validation folder')
    p.add_argument('--grid', type=int, default=3, help='embedded task: cells per side')
    p.add_argument('--grid-val-samples', type=int, default=500, help='embedded task: validation images')
    p.add_argument('--workers', type=int, default=2, help='data loading processes')
    p.add_argument('--results-file', metavar='FILE', help='also write the results as JSON to FILE')
    p.set_defaults(func=_main)


def add_model_arguments(p: argparse.ArgumentParser, batch_size: int) -> None:
    """The model, its weights and how to run it: shared by `validate` and `predict`."""
    p.add_argument('--model', required=True, help='timm model name, local-dir:RUN_DIR or hf-hub:ID')
    p.add_argument('--checkpoint', metavar='FILE', help='weights to use (safetensors or torch file)')
    p.add_argument('--use-ema', action='store_true',
                   help="the checkpoint's EMA weights instead of its plain ones, where it has both")
    p.add_argument('--pretrained', action='store_true', help="the model's pretrained weights")
    add_model_kwargs(p, example="block_args={'attn_layer': 'ca'} for a model trained with them")
    p.add_argument('--img-size', type=int, help="input size (default: the model's data config)")
    p.add_argument('--batch-size', '-b', type=int, default=batch_size, help='images per forward pass')
    p.add_argument('--channels-last', action='store_true', help='channels-last memory layout')
    p.add_argument('--amp', action='store_true', help='mixed precision, in --amp-dtype')
    p.add_argument('--amp-dtype', choices=('float16', 'bfloat16'),
                   help='with --amp (default: float16 on CUDA, bfloat16 on CPU)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='cpu, cuda or cuda:N')


def _main(args: argparse.Namespace) -> int:
    from ..training import UsageError, validate
    try:
        if args.results_file:  # before the evaluation, which may take long
            _prepare_results_file(args.results_file)
        results = validate(args)
    except UsageError as e:
        print(f'timm-coordatt validate: error: {e}', file=sys.stderr)
        return 2
    print(f'{results["model"]}: top-1 {results["top1"]:.3f}%  top-5 {results["top5"]:.3f}%  '
          f'loss {results["loss"]:.4f}  ({results["images"]} images, {results["img_size"]}px)')
    if args.results_file:
        from ..training import write_text
        try:
            write_text(args.results_file, json.dumps(results, indent=2) + '\n')
        except OSError as e:  # its folder taken away or made read-only during the evaluation
            print(f'timm-coordatt validate: error: cannot write --results-file {args.results_file} '
                  f'({e.strerror or e})', file=sys.stderr)
            return 2
    return 0


def _prepare_results_file(path: str) -> None:
    """The folder of `path` created; UsageError where the file cannot go."""
    from ..training import UsageError, check_can_create, written_in_place
    if os.path.isdir(path):
        raise UsageError(f'--results-file {path} is a directory; expected a file name')
    if written_in_place(path):  # /dev/stdout, a FIFO
        if not os.access(path, os.W_OK):
            raise UsageError(f'--results-file {path}: cannot write to it')
        return
    folder = os.path.dirname(os.path.realpath(path))  # through a link: where the file it points to goes
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UsageError(f'--results-file {path}: cannot create its folder ({e})') from None
    check_can_create(path, '--results-file')
