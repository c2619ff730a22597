""" `timm-coordatt models`: which models it lists, its numbers against coordatt.md, and its output formats. """
import json

import pytest
import timm

import timm_coordatt  # noqa: F401  (registers the models)
from timm_coordatt.cli import main
from timm_coordatt.cli.models import table_models

# the baselines the papers compare with, registered by timm (MobileNetV2, EfficientNet-B0) or this package
BASELINES = ('mobilenetv2_100', 'efficientnet_b0', 'mobilenext_100')


def run_cli(capsys, *args):
    assert main(['models', *args]) == 0
    return capsys.readouterr().out


def test_lists_every_ca_model_and_the_baselines():
    names = table_models()
    assert set(timm.list_models('*_ca')) | set(BASELINES) <= set(names)
    assert len(names) == len(set(names))
    # no other timm model sneaks in
    others = [n for n in names if n not in BASELINES and not n.endswith('_ca') and not n.startswith('mobilenext')]
    assert others == []


def test_json_numbers_match_the_reference(capsys):
    rows = json.loads(run_cli(capsys, '--format', 'json', '--filter', 'mobilenetv2_ca'))
    assert [r['name'] for r in rows] == ['mobilenetv2_ca']
    row = rows[0]
    # coordatt.md section 3, counted from the authors' definition: 3,950,648 params, 306.7M MACs, 310.5M +muls
    assert row['params'] == 3_950_648
    assert row['macs'] == pytest.approx(306.7e6, rel=0.01)
    assert row['macs'] + row['ca_muls'] == pytest.approx(310.5e6, rel=0.01)
    assert row['input_size'] == [3, 224, 224]
    # the paper's row: 3.95M / 310M / 74.3%; the authors' checkpoint is published as mobilenetv2_ca.in1k
    assert row['paper'] == {'params_m': 3.95, 'madds_m': 310, 'top1': 74.3,
                            'source': 'arXiv:2103.02907', 'approximate': False}
    assert row['pretrained'] is True and row['pretrained_tag'] == 'in1k'


def test_markdown_has_a_header_and_one_row_per_model(capsys):
    out = run_cli(capsys, '--format', 'markdown', '--filter', 'efficientnet_b0*')
    lines = [line for line in out.splitlines() if line.startswith('|')]
    header, separator, rows = lines[0], lines[1], lines[2:]
    assert header.startswith('| model |') and 'paper top-1 (%)' in header
    assert set(separator) <= set('|-:') and separator.count('|') == header.count('|')
    cells = {r.split('|')[1].strip(): [c.strip() for c in r.split('|')[2:-1]] for r in rows}
    assert sorted(cells) == ['efficientnet_b0', 'efficientnet_b0_ca']
    assert all(r.count('|') == header.count('|') for r in rows)
    titles = [c.strip() for c in header.split('|')[2:-1]]
    base, ca = (dict(zip(titles, cells[n])) for n in ('efficientnet_b0', 'efficientnet_b0_ca'))
    # coordatt.md: the paper's EfficientNet-b0 + CA values are approximate, the SE baseline's are not
    assert (ca['paper params (M)'], ca['paper M-Adds (M)'], ca['paper top-1 (%)']) == ('~5.4', '~400', '~77.8')
    assert (base['paper params (M)'], base['paper M-Adds (M)'], base['paper top-1 (%)']) == ('5.3', '390', '77.3')
    # coordatt.md: 5,381,804 params with SE replaced by CA; timm's efficientnet_b0 has 5,288,548
    assert (ca['params (M)'], base['params (M)']) == ('5.382', '5.289')
    assert base['weights'].startswith('yes') and ca['weights'] == 'no'


def test_text_format_and_bad_filter(capsys):
    out = run_cli(capsys, '--filter', 'mobilenext_ca')
    lines = out.splitlines()
    assert lines[0].split()[0] == 'model' and set(lines[1]) == {'-'}
    assert lines[2].split()[0] == 'mobilenext_ca'
    # mobilenext.md: paper layout with CA in all 20 blocks, 4,067,935 params
    assert '4.068' in lines[2].split()
    assert main(['models', '--filter', 'resnet50']) == 2
    assert "no model matches 'resnet50'" in capsys.readouterr().err
