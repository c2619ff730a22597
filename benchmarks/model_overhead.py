""" Whole-model overhead of Coordinate Attention: each CA model against its baseline, side by side.

A script form of `timm-coordatt benchmark` (same options, same output; see timm_coordatt/model_benchmark.py):

    python benchmarks/model_overhead.py [--pairs mobilenetv2_ca:mobilenetv2_100 ...] [--modes eager compile]
"""
import argparse
import sys

from timm_coordatt.model_benchmark import add_arguments, run_from_args


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(), 'python benchmarks/model_overhead.py')


if __name__ == '__main__':
    sys.exit(main())
