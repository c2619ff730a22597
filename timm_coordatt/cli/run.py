""" `timm-coordatt run SCRIPT [ARGS]`: run a Python script with this package imported first.

timm has no plugin discovery, so its own scripts (`train.py`, `validate.py`, `benchmark.py`,
`inference.py`) only know this package's models when something imports it first. `run` does that,
then executes the script as `python SCRIPT ARGS` would (as `__main__`, with its folder first on
`sys.path` and `sys.argv` set), so `--model mobilenetv2_ca` works there unchanged, also under
`torchrun --nproc_per_node=N -m timm_coordatt run train.py ...`.
"""
import argparse
import importlib.util
import os
import runpy
import sys


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        'run', help="run a Python script (e.g. timm's train.py) with timm_coordatt's models registered",
        description='Run SCRIPT as `python SCRIPT ARGS` would, after importing timm_coordatt so that its '
                    'models and the "ca" attention layer are known to timm. `-m MODULE` runs a module instead.')
    p.add_argument('-m', dest='module', action='store_true', help='SCRIPT is a module name (like python -m)')
    p.add_argument('script', metavar='SCRIPT', help='path of the script (or module name with -m)')
    p.add_argument('script_args', nargs=argparse.REMAINDER, metavar='ARGS', help="the script's own arguments")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    import timm_coordatt  # noqa: F401  registers the models and the attention layer with timm

    if not args.module and not os.path.isfile(args.script):
        print(f'timm-coordatt run: error: no such script: {args.script}', file=sys.stderr)
        return 2
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    sys.argv = [args.script, *args.script_args]
    try:
        if args.module:
            sys.path.insert(0, os.getcwd())
            if not _module_exists(args.script):
                print(f'timm-coordatt run: error: no module named {args.script}', file=sys.stderr)
                return 2
            runpy.run_module(args.script, run_name='__main__', alter_sys=True)
        else:
            sys.path.insert(0, os.path.dirname(os.path.abspath(args.script)))
            runpy.run_path(args.script, run_name='__main__')
    except SystemExit as e:
        # the script's own exit status, as `python SCRIPT` would return it
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    finally:
        sys.argv, sys.path = saved_argv, saved_path
    return 0


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError as e:
        if e.name and (name == e.name or name.startswith(e.name + '.')):
            return False  # a parent package missing
        raise  # a package of the module failed to import: its own error, as `python -m` shows it
    except ValueError:  # an empty or relative name
        return False
