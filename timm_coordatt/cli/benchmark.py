""" `timm-coordatt benchmark`: speed and training memory of each CA model against its baseline.

    timm-coordatt benchmark                                  # the paper's pairs, eager + channels_last, CPU
    timm-coordatt benchmark --pairs mobilenetv2_ca:mobilenetv2_100 --modes eager compile --profile
"""
import argparse

from ..model_benchmark import add_arguments, run_from_args

PROG = 'timm-coordatt benchmark'


def run(args: argparse.Namespace) -> int:
    return run_from_args(args, PROG)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        'benchmark', help='inference/training speed and training memory of CA models against their baselines',
        description='Each CA model against its baseline, side by side in one process (a fresh one for each pair '
                    'and mode, unless --one-process): inference latency at '
                    'batch 1, throughput at larger batches, training-step throughput and peak training memory, '
                    "in eager, channels_last and torch.compile modes. The models' calls alternate, over several "
                    'rounds and medians reported, with ratios CA/baseline and the command line.')
    add_arguments(parser)
    parser.set_defaults(func=run)
