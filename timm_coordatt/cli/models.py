""" `timm-coordatt models`: every model of this package and its baselines, with our counts and the paper's.

    timm-coordatt models                     # aligned text
    timm-coordatt models --format markdown   # README table
    timm-coordatt models --format json --filter 'mobilenetv2*'
"""
import argparse
import json
import sys
from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence, Tuple

import timm
import torch

from ..complexity import count_complexity
from ..paper import CA_PAPER, MOBILENEXT_PAPER, PAPER_RESULTS, PaperResult
from ..pretrained import list_package_models

__all__ = ['ModelRow', 'table_models', 'model_row', 'format_rows']

FORMATS = ('text', 'markdown', 'json')
_SOURCES = {CA_PAPER: 'CA', MOBILENEXT_PAPER: 'MobileNeXt'}


@dataclass(frozen=True)
class ModelRow:
    name: str
    input_size: Tuple[int, int, int]
    params: int
    macs: int  # Conv2d + Linear multiply-accumulates at `input_size`
    ca_muls: int  # element-wise products of the CA blocks, which the paper's M-Adds appear to count
    pretrained: bool  # the default pretrained config names a weight source
    pretrained_tag: str
    paper: Optional[PaperResult]


def table_models(pattern: str = '*') -> List[str]:
    """This package's models and the registered baselines the papers report, in timm's order."""
    names = set(list_package_models()) | {n for n in PAPER_RESULTS if timm.is_model(n)}
    return [n for n in timm.list_models(pattern) if n in names]


@torch.no_grad()
def model_row(name: str) -> ModelRow:
    """Build `name` with random weights and count it at the input size of its default pretrained config."""
    cfg = timm.models.get_pretrained_cfg(name)
    complexity = count_complexity(timm.create_model(name), tuple(cfg.input_size))
    return ModelRow(
        name=name,
        input_size=tuple(cfg.input_size),
        params=complexity.params,
        macs=complexity.macs,
        ca_muls=complexity.ca_muls,
        pretrained=bool(cfg.has_weights),
        pretrained_tag=cfg.tag or '',
        paper=PAPER_RESULTS.get(name),
    )


def _paper_value(value: Optional[float], paper: PaperResult, spec: str = 'g') -> str:
    if value is None:
        return '-'
    return ('~' if paper.approximate else '') + format(value, spec)


_HEADER = (
    'model', 'input', 'params (M)', 'MACs (M)', 'MACs+CA muls (M)',
    'paper params (M)', 'paper M-Adds (M)', 'paper top-1 (%)', 'paper', 'weights')
_NUMERIC = tuple(2 <= i <= 7 for i in range(len(_HEADER)))  # right-aligned columns


def _cells(row: ModelRow) -> Tuple[str, ...]:
    p = row.paper
    return (
        row.name,
        'x'.join(map(str, row.input_size[1:])),
        f'{row.params / 1e6:.3f}',
        f'{row.macs / 1e6:.1f}',
        f'{(row.macs + row.ca_muls) / 1e6:.1f}',
        _paper_value(p.params_m, p) if p else '-',
        _paper_value(p.madds_m, p) if p else '-',
        _paper_value(p.top1, p, '.1f') if p else '-',
        _SOURCES[p.source] if p else '-',
        f'yes ({row.pretrained_tag})' if row.pretrained else 'no',
    )


_NOTES = (
    f'MACs: Conv2d + Linear multiply-accumulates at the model\'s default input size; +CA muls adds the '
    f'2*C*H*W element-wise products of each CA block. paper: CA = {CA_PAPER}, MobileNeXt = {MOBILENEXT_PAPER}; '
    f'~ = recalled, not verified against the paper. weights: the default pretrained tag names a weight source.'
)


def format_rows(rows: Sequence[ModelRow], fmt: str = 'text') -> str:
    """The rows as an aligned text table, a markdown table or a JSON list."""
    if fmt == 'json':
        return json.dumps([asdict(r) for r in rows], indent=2)
    cells = [_HEADER] + [_cells(r) for r in rows]
    if fmt == 'markdown':
        lines = ['| ' + ' | '.join(c) + ' |' for c in cells]
        lines.insert(1, '|' + '|'.join('---:' if right else '---' for right in _NUMERIC) + '|')
        return '\n'.join(lines + ['', _NOTES])
    if fmt == 'text':
        widths = [max(len(c[i]) for c in cells) for i in range(len(_HEADER))]
        lines = ['  '.join(c.rjust(w) if right else c.ljust(w) for c, w, right in zip(r, widths, _NUMERIC))
                 for r in cells]
        lines.insert(1, '-' * len(lines[0]))
        return '\n'.join(lines + ['', _NOTES])
    raise ValueError(f'format must be one of {FORMATS}, got {fmt!r}')


def run(args: argparse.Namespace) -> int:
    names = table_models(args.filter)
    if not names:
        print(f'timm-coordatt models: error: no model matches {args.filter!r}; '
              f'expected a pattern matching some of: {", ".join(table_models())}', file=sys.stderr)
        return 2
    print(format_rows([model_row(n) for n in names], args.format))
    return 0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        'models', help="list the models with parameters, MACs, the paper's numbers and published weights",
        description='Every model this package registers and the baselines the papers compare them with: '
                    'parameters, MACs at the default input size (counted on a random-weight model), the '
                    "papers' parameters / M-Adds / top-1, and whether pretrained weights are published.")
    parser.add_argument('--format', choices=FORMATS, default='text', help='output format (default: text)')
    parser.add_argument('--filter', default='*', help="timm-style wildcard on model names (default: '*')")
    parser.set_defaults(func=run)
