""" `timm-coordatt` / `python -m timm_coordatt`: one subcommand per module in this package.

Each subcommand module defines `add_parser(subparsers)`, which registers its parser and sets
`func` (called with the parsed arguments, returning the exit code).
"""
import argparse
import importlib
import os
import sys
from typing import List, Optional

from timm.utils import ParseKwargs

# subcommand modules, in the order `--help` lists them
COMMANDS = (
    'train',
    'validate',
    'predict',
    'run',
    'attention',
    'models',
    'benchmark',
    'convert',
    'publish',
)


class _Parser(argparse.ArgumentParser):
    """Keeps the arguments it parsed, so that a subcommand can tell the options given on its command line
    from those left at their defaults (`train --resume` refuses changes to the former)."""

    def parse_known_args(self, args=None, namespace=None):
        self.parsed_args = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds an option's default to its help, unless it has none to show (None, empty) or the help already
    says it in words (`default: the model's`)."""

    def _get_help_string(self, action):
        if action.default is None or action.default in ({}, [], ()) or 'default' in (action.help or ''):
            return action.help
        return super()._get_help_string(action)


class _ModelKwargs(ParseKwargs):
    """timm's KEY=VALUE parser, with a usage error rather than a traceback for an item without '='."""

    def __call__(self, parser, namespace, values, option_string=None):
        bad = [value for value in values if value and '=' not in value]
        if bad:
            parser.error(f'{option_string} expected KEY=VALUE items, got {" ".join(bad)}')
        super().__call__(parser, namespace, values, option_string)


def add_model_kwargs(parser, example: str) -> None:
    """`--model-kwargs KEY=VALUE ...`, as timm's scripts take it: extra `timm.create_model` arguments."""
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=_ModelKwargs, metavar='KEY=VALUE',
                        help=f'extra timm.create_model arguments, e.g. {example}')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='timm-coordatt',
        description='Coordinate Attention models for timm: train, validate, predict, run timm scripts, '
                    'inspect attention, list models, benchmark, convert and publish.')
    subparsers = parser.add_subparsers(dest='command', metavar='COMMAND', required=True, parser_class=_Parser)
    for name in COMMANDS:
        importlib.import_module(f'{__name__}.{name}').add_parser(subparsers)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    from ..model_benchmark import sigterm_exits
    args = build_parser().parse_args(argv)
    try:
        with sigterm_exits():  # `train` stops after its step instead, within
            return args.func(args)
    except KeyboardInterrupt:  # Ctrl-C: what was being written is removed (`atomic_write`), no traceback
        print(f'timm-coordatt {args.command}: interrupted', file=sys.stderr)
        return 130
    except BrokenPipeError:  # `timm-coordatt models | head`: the reader stopped early, fine for a Unix tool
        # Python's advice: stdout to devnull, so that the flush at exit does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == '__main__':
    sys.exit(main())
