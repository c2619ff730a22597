""" `timm-coordatt run SCRIPT [ARGS]`: run a Python script with this package imported first.

timm has no plugin discovery, so its own scripts (`train.py`, `validate.py`, `benchmark.py`,
`inference.py`) only know this package's models when something imports it first. `run` does that,
then executes the script as `python SCRIPT ARGS` would (as `__main__`, with its folder first on
`sys.path` and `sys.argv` set), so `--model mobilenetv2_ca` works there unchanged, also under
`torchrun --nproc_per_node=N -m timm_coordatt run train.py ...`. Processes the script starts by fork or
forkserver know the models too; those it spawns import only the script (see docs/training.md).
"""
import argparse
import functools
import importlib.util
import multiprocessing
import os
import runpy
import sys
from typing import List


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        'run', help="run a Python script (e.g. timm's train.py) with timm_coordatt's models registered",
        description='Run SCRIPT as `python SCRIPT ARGS` would, after importing timm_coordatt so that its '
                    'models and the "ca" attention layer are known to timm. `-m MODULE` runs a module instead.')
    p.add_argument('-m', dest='module', action='store_true', help='SCRIPT is a module name (like python -m)')
    p.add_argument('script', metavar='SCRIPT', help='path of the script (or module name with -m)')
    p.add_argument('script_args', nargs=argparse.REMAINDER, metavar='ARGS', help="the script's own arguments")
    p.set_defaults(func=functools.partial(_main, parser=p))


def _main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import timm_coordatt  # noqa: F401  registers the models and the attention layer with timm

    if not args.module:
        problem = _not_runnable(args.script)
        if problem:
            print(f'timm-coordatt run: error: {problem}', file=sys.stderr)
            return 2
    if 'forkserver' in multiprocessing.get_all_start_methods():
        # the forkserver (Python 3.14's default start method on Linux) forks the script's workers from itself
        multiprocessing.set_forkserver_preload(['timm_coordatt'])
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    sys.argv = [args.script, *_script_args(parser.parsed_args)]
    try:
        if args.module:
            sys.path.insert(0, os.getcwd())
            if not _module_exists(args.script):
                print(f'timm-coordatt run: error: no module named {args.script}', file=sys.stderr)
                return 2
            runpy.run_module(args.script, run_name='__main__', alter_sys=True)
        else:
            script = os.path.abspath(args.script)  # `__file__` absolute, as Python makes it
            if not os.path.isdir(script):  # runpy puts a folder on sys.path itself
                sys.path.insert(0, os.path.dirname(script))
            runpy.run_path(script, run_name='__main__')
    except SystemExit as e:
        # the script's own exit status, as `python SCRIPT` would return it
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    finally:
        sys.argv, sys.path = saved_argv, saved_path
    return 0


def _not_runnable(script: str) -> str:
    """Why `python SCRIPT` could not run `script` (a file, or a folder with a `__main__.py`), or ''."""
    if os.path.isdir(script):
        return '' if os.path.isfile(os.path.join(script, '__main__.py')) else \
            f'{script} is a folder without a __main__.py; expected a Python script'
    return '' if os.path.isfile(script) else f'no such script: {script}'


def _script_args(given: List[str]) -> List[str]:
    """The arguments after SCRIPT in `run`'s command line `given`, exactly (argparse drops a `--` right
    after SCRIPT)."""
    i = 0
    while given[i] in ('-m', '--'):  # run's own option, the end of its options
        i += 1
    return given[i + 1:]


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError as e:
        if e.name and (name == e.name or name.startswith(e.name + '.')):
            return False  # a parent package missing
        raise  # a package of the module failed to import: its own error, as `python -m` shows it
    except ValueError:  # an empty or relative name
        return False
