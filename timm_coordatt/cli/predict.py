""" `timm-coordatt predict`: top-k labels for image files. """
import argparse
import json
import sys

from . import HelpFormatter
from .validate import add_model_arguments


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        'predict', help='top-k labels for image files',
        description="Classify image files (or every image in a directory) with a model's own data config. "
                    "Labels are the model's label names (a run directory of `train` records them), ImageNet "
                    "class names for 1000-class heads, else class indices.",
        formatter_class=HelpFormatter)
    p.add_argument('images', nargs='+', metavar='IMAGE', help='image files or directories of images')
    add_model_arguments(p, batch_size=32)
    p.add_argument('--topk', type=int, default=5, help='labels per image')
    p.add_argument('--json', action='store_true', help='print the results as JSON')
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from ..training import UsageError, predict
    try:
        results = predict(args)
    except UsageError as e:
        print(f'timm-coordatt predict: error: {e}', file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for result in results:
        print(result['file'])
        for p in result['predictions']:
            print(f'  {p["probability"]:7.2%}  {p["label"]}')
    return 0
