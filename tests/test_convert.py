""" `timm_coordatt.convert` against the authors' MobileNetV2 + CA, rebuilt here from the spec.

The reference model follows the authors' `mbv2_ca.py` as described in coordatt.md section 4 (their
module names and ordering, CA with `conv1`/`bn1`/`conv2`/`conv3`, AdaptiveAvgPool strips and a
hand-written h_swish, Dropout + Linear classifier); its state dict is checked against the
published key/shape/dtype listing before it is used.
"""
import argparse
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from authors_coordatt import AuthorsCheckpointCoordAtt
from model_helpers import create_as_transformers_does, randomise_

from timm_coordatt.cli import COMMANDS
from timm_coordatt.cli import convert as convert_cli
from timm_coordatt.convert import ConversionError, convert

# the key/shape listing of the authors' checkpoint, in this project's workspace (not shipped: a clone or an
# sdist skips the one test that reads it)
TSV = Path(__file__).resolve().parents[2] / 'shared' / 'reference' / 'official_mbv2_ca_state_dict.tsv'


# --- the authors' model, from the spec -------------------------------------------------------

def _make_divisible(v: float, divisor: int) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def conv_3x3_bn(inp: int, oup: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup), nn.ReLU6(inplace=True))


def conv_1x1_bn(inp: int, oup: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden_dim = round(inp * expand_ratio)
        self.identity = stride == 1 and inp == oup
        if expand_ratio == 1:
            self.conv = nn.Sequential(
                nn.Conv2d(hidden_dim, hidden_dim, 3, stride, 1, groups=hidden_dim, bias=False),
                nn.BatchNorm2d(hidden_dim),
                nn.ReLU6(inplace=True),
                nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
                nn.BatchNorm2d(oup),
            )
        else:
            self.conv = nn.Sequential(
                nn.Conv2d(inp, hidden_dim, 1, 1, 0, bias=False),
                nn.BatchNorm2d(hidden_dim),
                nn.ReLU6(inplace=True),
                nn.Conv2d(hidden_dim, hidden_dim, 3, stride, 1, groups=hidden_dim, bias=False),
                nn.BatchNorm2d(hidden_dim),
                nn.ReLU6(inplace=True),
                AuthorsCheckpointCoordAtt(hidden_dim, hidden_dim),
                nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
                nn.BatchNorm2d(oup),
            )

    def forward(self, x):
        return x + self.conv(x) if self.identity else self.conv(x)


class MBV2_CA(nn.Module):
    cfgs = [  # t, c, n, s
        [1, 16, 1, 1],
        [6, 24, 2, 2],
        [6, 32, 3, 2],
        [6, 64, 4, 2],
        [6, 96, 3, 1],
        [6, 160, 3, 2],
        [6, 320, 1, 1],
    ]

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0):
        super().__init__()
        input_channel = _make_divisible(32 * width_mult, 8)
        layers = [conv_3x3_bn(3, input_channel, 2)]
        for t, c, n, s in self.cfgs:
            output_channel = _make_divisible(c * width_mult, 8)
            for i in range(n):
                layers.append(InvertedResidual(input_channel, output_channel, s if i == 0 else 1, t))
                input_channel = output_channel
        self.features = nn.Sequential(*layers)
        output_channel = _make_divisible(1280 * width_mult, 8) if width_mult > 1.0 else 1280
        self.conv = conv_1x1_bn(input_channel, output_channel)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Sequential(nn.Dropout(0.1), nn.Linear(output_channel, num_classes))

    def forward(self, x):
        x = self.conv(self.features(x))
        return self.classifier(self.avgpool(x).flatten(1))


# --- helpers -----------------------------------------------------------------------------------

def _read_tsv():
    rows = []
    for line in TSV.read_text().splitlines():
        if line.startswith('#') or not line.strip():
            continue
        key, shape, dtype = line.split('\t')
        rows.append((key, tuple(int(s) for s in shape.strip('()').split(',') if s.strip()), dtype))
    return rows


@pytest.fixture(scope='module')
def authors():
    return randomise_(MBV2_CA()).eval()


@pytest.fixture(scope='module')
def converted(authors, tmp_path_factory):
    """The bare state dict, converted once (shared by the tests that only inspect the result)."""
    tmp = tmp_path_factory.mktemp('converted')
    torch.save(authors.state_dict(), tmp / 'mbv2_ca.pth')
    return convert(tmp / 'mbv2_ca.pth', tmp / 'out')


def _load(out_dir: Path) -> nn.Module:
    return timm.create_model(f'local-dir:{out_dir}', pretrained=True).eval()


@torch.no_grad()
def _logits(model: nn.Module):
    """Logits for random inputs of two sizes (the same inputs on every call)."""
    gen = torch.Generator().manual_seed(1)
    return [model(torch.randn(1, 3, *size, generator=gen)) for size in ((224, 224), (160, 128))]


@pytest.fixture(scope='module')
def authors_logits(authors):
    logits = _logits(authors)
    assert all(ref.abs().max() > 0.1 for ref in logits)  # a meaningful comparison, not near-zero outputs
    return logits


def _assert_same_logits(model: nn.Module, expected) -> None:
    for out, ref in zip(_logits(model), expected):
        assert (out - ref).abs().max().item() < 1e-5


# --- tests -------------------------------------------------------------------------------------

@pytest.mark.skipif(not TSV.is_file(), reason=f'the authors\' checkpoint listing is not at {TSV}')
def test_reference_model_matches_published_layout(authors):
    rows = _read_tsv()
    assert len(rows) == 490
    sd = authors.state_dict()
    assert [k for k, _, _ in rows] == list(sd)
    for key, shape, dtype in rows:
        assert tuple(sd[key].shape) == shape, key
        assert str(sd[key].dtype) == f'torch.{dtype}', key


def _wrap(sd, form):
    module = {f'module.{k}': v for k, v in sd.items()}
    return {
        'bare': sd, 'state_dict': {'state_dict': sd, 'epoch': 199}, 'model': {'model': sd},
        'module': module, 'state_dict+module': {'state_dict': module, 'best_acc1': torch.tensor(74.3)},
        # a training script's arguments beside the weights, as timm's train.py keeps them
        'state_dict+args': {'state_dict': sd, 'args': argparse.Namespace(arch='mbv2_ca', lr=0.05)},
    }[form]


@pytest.mark.parametrize('form', ['bare', 'state_dict', 'model', 'module', 'state_dict+module', 'state_dict+args'])
def test_convert_each_wrapper_reproduces_authors_logits(authors, authors_logits, tmp_path, form):
    ckpt = tmp_path / 'mbv2_ca.pth'
    torch.save(_wrap(authors.state_dict(), form), ckpt)
    out = convert(ckpt, tmp_path / 'out')
    assert sorted(p.name for p in out.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    _assert_same_logits(_load(out), authors_logits)


def test_converted_folder_is_a_timm_hub_folder(converted):
    config = json.loads((converted / 'config.json').read_text())
    assert config['architecture'] == 'mobilenetv2_ca'
    assert config['num_classes'] == 1000
    assert config['pretrained_cfg']['first_conv'] == 'conv_stem'
    # loads through a plain file overlay too, identically
    via_file = timm.create_model(
        'mobilenetv2_ca', pretrained=True, pretrained_cfg_overlay=dict(file=str(converted / 'model.safetensors')))
    for (k, a), b in zip(_load(converted).state_dict().items(), via_file.state_dict().values()):
        assert torch.equal(a, b), k
    # and as transformers' timm wrapper builds it
    torch.testing.assert_close(create_as_transformers_does(converted).state_dict(), via_file.state_dict())
    card = (converted / 'README.md').read_text()
    assert 'import timm_coordatt' in card
    assert card.index('import timm_coordatt', card.index('transformers')) < card.index("pipeline('image-class")
    # any checkpoint in the authors' layout, not necessarily their released weights
    assert "from a checkpoint of the authors' `mbv2_ca.py`" in card and 'weights released by' not in card
    assert 'license: mit' in card and '@inproceedings{hou2021coordinate' in card


def test_converted_files_follow_the_umask(converted):
    umask = os.umask(0o022)
    os.umask(umask)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in converted.iterdir()}
    assert modes == dict.fromkeys(['README.md', 'config.json', 'model.safetensors'], oct(0o666 & ~umask))


def test_convert_other_num_classes(tmp_path):
    authors = randomise_(MBV2_CA(num_classes=10), seed=3).eval()
    torch.save({'state_dict': authors.state_dict()}, tmp_path / 'ckpt.pth')
    # the model card's usage would name this package's ImageNet-1k repository
    with pytest.raises(ConversionError, match="classifier has 10 classes, not ImageNet-1k's 1000: give the Hub "
                                              "repository its model card will load it from"):
        convert(tmp_path / 'ckpt.pth', tmp_path / 'out')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['ckpt.pth']
    out = convert(tmp_path / 'ckpt.pth', tmp_path / 'out', repo_id='me/birds')
    model = _load(out)
    assert model.num_classes == 10
    _assert_same_logits(model, _logits(authors))
    assert "timm.create_model('hf-hub:me/birds', pretrained=True)" in (out / 'README.md').read_text()


def test_convert_ema_weights_on_request(authors, authors_logits, tmp_path):
    other = randomise_(MBV2_CA(), seed=5).state_dict()
    torch.save({'state_dict': other, 'state_dict_ema': authors.state_dict(), 'epoch': 3}, tmp_path / 'ckpt.pth')
    _assert_same_logits(_load(convert(tmp_path / 'ckpt.pth', tmp_path / 'ema', use_ema=True)), authors_logits)
    plain = _load(convert(tmp_path / 'ckpt.pth', tmp_path / 'plain'))
    assert torch.equal(plain.conv_stem.weight, other['features.0.0.weight'])


def test_refuses_ema_weights_that_are_not_there(authors, tmp_path):
    torch.save({'state_dict': authors.state_dict(), 'epoch': 3}, tmp_path / 'ckpt.pth')
    with pytest.raises(ConversionError, match="holds no EMA weights .*top-level keys: 'state_dict', 'epoch'"):
        convert(tmp_path / 'ckpt.pth', tmp_path / 'out', use_ema=True)


def _assert_refused(tmp_path, sd, *needles):
    torch.save(sd, tmp_path / 'bad.pth')
    with pytest.raises(ConversionError) as info:
        convert(tmp_path / 'bad.pth', tmp_path / 'out')
    for needle in needles:
        assert needle in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['bad.pth']  # no output, no leftover temp folder


def test_refuses_ema_weights_alone_naming_them(authors, tmp_path):
    _assert_refused(tmp_path, {'state_dict_ema': authors.state_dict()},
                    "entries 'state_dict_ema' are not tensors", "'state_dict_ema' / 'model_ema', with --use-ema")


def test_refuses_a_state_dict_with_other_things_beside_it_naming_them(authors, tmp_path):
    _assert_refused(tmp_path, dict(authors.state_dict(), epoch=3), "entries 'epoch' are not tensors")


def test_refuses_a_dict_with_keys_that_are_not_names(authors, tmp_path):
    _assert_refused(tmp_path, dict(authors.state_dict(), **{'0': None}) | {0: torch.zeros(3)},
                    "entries '0', 0 are not tensors under names")


@pytest.mark.parametrize('repo_id', ['not a valid repo!!', 'birds', 'me/birds/v2'])
def test_refuses_a_repo_id_the_hub_would_refuse(authors, tmp_path, repo_id):
    """The model card names the repository: checked before anything is written, as `publish` checks it."""
    torch.save(authors.state_dict(), tmp_path / 'ckpt.pth')
    expected = f'expected a Hub repository id <user or org>/<name>, got {repo_id!r}'
    with pytest.raises(ConversionError, match=re.escape(expected)):
        convert(tmp_path / 'ckpt.pth', tmp_path / 'out', repo_id=repo_id)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['ckpt.pth']


def test_refuses_missing_key(authors, tmp_path):
    sd = dict(authors.state_dict())
    del sd['features.5.conv.6.conv3.bias']
    _assert_refused(tmp_path, sd, '1 missing keys', 'features.5.conv.6.conv3.bias')


def test_refuses_unexpected_key(authors, tmp_path):
    sd = dict(authors.state_dict(), **{'features.18.conv.0.weight': torch.zeros(8, 8, 1, 1)})
    _assert_refused(tmp_path, sd, '1 unexpected keys', 'features.18.conv.0.weight')


def test_refuses_wrong_shape(authors, tmp_path):
    sd = dict(authors.state_dict(), **{'features.0.0.weight': torch.zeros(16, 3, 3, 3)})
    _assert_refused(tmp_path, sd, '1 shape mismatches', 'features.0.0.weight (16, 3, 3, 3) (expected (32, 3, 3, 3))')


def test_refuses_other_width(tmp_path):
    _assert_refused(tmp_path, MBV2_CA(width_mult=0.5).state_dict(), 'shape mismatches', 'features.0.0.weight')


def test_refuses_pickled_module(authors, tmp_path):
    _assert_refused(tmp_path, authors, 'weights_only=True',
                    'it holds a test_convert.MBV2_CA, which only unpickling arbitrary code could read')


@pytest.mark.parametrize('content', [b'', b'hello'])  # the unpickler raises EOFError, KeyError
def test_refuses_files_that_are_not_checkpoints(content, tmp_path):
    (tmp_path / 'bad.pth').write_bytes(content)
    with pytest.raises(ConversionError, match=r'not a PyTorch checkpoint .* can read .*: not a file torch\.save wrote'):
        convert(tmp_path / 'bad.pth', tmp_path / 'out')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['bad.pth']


def test_refuses_an_out_dir_under_a_file(authors, tmp_path):
    torch.save(authors.state_dict(), tmp_path / 'ckpt.pth')
    (tmp_path / 'file').write_text('')
    with pytest.raises(ConversionError, match='cannot create .*file/out'):
        convert(tmp_path / 'ckpt.pth', tmp_path / 'file' / 'out')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['ckpt.pth', 'file']


@pytest.mark.skipif(not os.path.isdir('/proc/self'), reason='needs Linux /proc, a folder no one can write to')
def test_refuses_an_out_dir_that_cannot_be_written(authors, tmp_path):
    torch.save(authors.state_dict(), tmp_path / 'ckpt.pth')
    with pytest.raises(ConversionError, match=r'^cannot create /proc/timm_coordatt_out: cannot write in /proc \('):
        convert(tmp_path / 'ckpt.pth', '/proc/timm_coordatt_out')
    # before the checkpoint is read and converted
    with pytest.raises(ConversionError, match='cannot create /proc/timm_coordatt_out'):
        convert(tmp_path / 'missing.pth', '/proc/timm_coordatt_out')


def test_cli_stopped_by_sigterm_leaves_nothing(authors, tmp_path):
    # SIGTERM (kill, timeout, a scheduler) while the files are being written: the process sends it to itself
    torch.save(authors.state_dict(), tmp_path / 'ckpt.pth')
    script = (
        'import os, signal, sys\n'
        'import timm_coordatt.convert as c\n'
        'save_for_hf = c.save_for_hf\n'
        'def save_then_stop(model, folder, **kwargs):\n'
        '    save_for_hf(model, folder, **kwargs)\n'
        '    os.kill(os.getpid(), signal.SIGTERM)\n'
        'c.save_for_hf = save_then_stop\n'
        'from timm_coordatt.cli import main\n'
        'sys.exit(main(sys.argv[1:]))\n')
    proc = subprocess.run([sys.executable, '-c', script, 'convert', str(tmp_path / 'ckpt.pth'), str(tmp_path / 'out')],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ['ckpt.pth']  # no output, no temporary folder


def test_refuses_existing_out_dir(authors, tmp_path):
    torch.save(authors.state_dict(), tmp_path / 'ckpt.pth')
    (tmp_path / 'out').mkdir()
    with pytest.raises(ConversionError, match='already exists'):
        convert(tmp_path / 'ckpt.pth', tmp_path / 'out')
    assert list((tmp_path / 'out').iterdir()) == []


def test_self_check_catches_a_shape_preserving_wrong_mapping(authors, tmp_path, monkeypatch):
    # conv_h and conv_w have the same shapes: only the logits can tell a swap apart
    from timm_coordatt import convert as convert_module
    swapped = dict(convert_module._IR_LAYOUT, **{'conv.6.conv2': 'se.conv_w', 'conv.6.conv3': 'se.conv_h'})
    monkeypatch.setattr(convert_module, '_IR_LAYOUT', swapped)
    _assert_refused(tmp_path, authors.state_dict(), 'Self-check failed')


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog='timm-coordatt')
    convert_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(list(argv))
    return args.func(args)


def test_cli(authors, tmp_path, capsys):
    assert 'convert' in COMMANDS
    torch.save({'model': authors.state_dict()}, tmp_path / 'ckpt.pth')
    assert _cli('convert', str(tmp_path / 'ckpt.pth'), str(tmp_path / 'out')) == 0
    assert (tmp_path / 'out' / 'model.safetensors').is_file()
    assert _cli('convert', str(tmp_path / 'missing.pth'), str(tmp_path / 'out2')) == 2
    assert 'missing.pth does not exist' in capsys.readouterr().err
    assert not (tmp_path / 'out2').exists()
