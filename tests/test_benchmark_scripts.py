""" The scripts in benchmarks/: what the A/B scripts share (benchmarks/in_turn.py), the order in which calls are
timed, and the options each script takes. """
import importlib
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from timm_coordatt import CoordAttention, native

BENCHMARKS = Path(__file__).resolve().parents[1] / 'benchmarks'
sys.path.insert(0, str(BENCHMARKS))
from in_turn import time_in_turn  # noqa: E402


def _recording(names):
    sequence = []
    return sequence, {name: (lambda name=name: sequence.append(name)) for name in names}


def test_calls_go_first_in_turn_by_default():
    sequence, calls = _recording('abc')
    medians, ratios = time_in_turn(calls, rounds=4, warmup=1)
    assert sequence == list('abc' + 'abc' + 'bca' + 'cab' + 'abc')  # the warm-up, then the rounds
    assert len(medians) == 3 and len(ratios) == 2


def test_orders_are_taken_one_after_the_other():
    # two builds of one model: each right after the other in half the rounds
    sequence, calls = _recording(['base', 'before', 'after'])
    time_in_turn(calls, rounds=4, warmup=0, orders=[('base', 'before', 'after'), ('base', 'after', 'before')])
    assert sequence == ['base', 'before', 'after', 'base', 'after', 'before'] * 2


def test_orders_must_hold_every_call_once():
    _, calls = _recording('abc')
    with pytest.raises(ValueError, match=r"orders of the calls \['a', 'b', 'c'\], got \[\('a', 'b'\)\]"):
        time_in_turn(calls, rounds=2, warmup=0, orders=[('a', 'b')])
    with pytest.raises(ValueError, match='orders of the calls'):
        time_in_turn(calls, rounds=2, warmup=0, orders=[('a', 'b', 'c', 'c')])


# The scripts' main() run in this process (imported from benchmarks/, as in_turn is): bad options must stop them with
# a usage error before their header, so before any model is built.

def _main(monkeypatch, script, *args):
    monkeypatch.setattr(sys, 'argv', [f'{script}.py', *map(str, args)])
    threads = torch.get_num_threads()
    try:
        return importlib.import_module(script).main()
    finally:
        torch.set_num_threads(threads)  # as --threads left it


def _usage_error(monkeypatch, capsys, script, *args):
    with pytest.raises(SystemExit) as exit_info:
        _main(monkeypatch, script, *args)
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2 and out == ''
    return err.splitlines()[-1]


@pytest.mark.parametrize('script, option', [
    ('coordatt_layer', '--rounds'), ('coordatt_layer', '--threads'), ('native_threads', '--rounds'),
    ('native_threads', '--threads'), ('recompute_ab', '--batch-size'), ('recompute_ab', '--rounds'),
    ('model_kernels_ab', '--rounds'), ('strip_mlp_ab', '--rounds'), ('inference_split', '--calls'),
    ('compiled_inference_ab', '--calls'), ('compiled_inference_ab', '--batch-sizes'), ('input_gradient_ab', '--steps'),
])
@pytest.mark.parametrize('value', ['0', '-2', 'two'])
def test_counts_threads_and_batch_sizes_must_be_positive(monkeypatch, capsys, script, option, value):
    error = _usage_error(monkeypatch, capsys, script, option, value)
    assert f"argument {option}: expected a positive integer, got '{value}'" in error


@pytest.mark.parametrize('args', [['--model-calls', '0'], ['--min-time', '-1'], ['--min-time', 'nan']])
def test_native_ab_counts_and_seconds_are_checked(monkeypatch, capsys, args):
    error = _usage_error(monkeypatch, capsys, 'native_ab', 'before.so', *args)
    assert f'argument {args[0]}: expected' in error


@pytest.mark.parametrize('pairs, message', [
    ('foo:mobilenetv2_100', 'unknown model(s) foo'),
    ('mobilenetv2_ca:bar', 'unknown model(s) bar'),
    ('mobilenetv2_ca:mobilenetv2_ca', 'mobilenetv2_ca:mobilenetv2_ca pairs a model with itself'),
    ('mobilenetv2_100:mobilenetv2_ca', 'mobilenetv2_100 has no CoordAttention blocks'),
])
@pytest.mark.parametrize('script', ['model_kernels_ab', 'strip_mlp_ab'])
def test_pairs_must_be_known_models_a_ca_model_first(monkeypatch, capsys, script, pairs, message):
    assert message in _usage_error(monkeypatch, capsys, script, '--pairs', pairs)


@pytest.mark.parametrize('args, message', [
    (['--train'], '--train goes with --models'),
    (['--models', '--ops'], '--ops goes with --models --train'),
])
def test_native_ab_options_that_go_with_others(monkeypatch, capsys, args, message):
    assert message in _usage_error(monkeypatch, capsys, 'native_ab', 'before.so', *args)


def test_native_ab_before_must_be_a_build(monkeypatch, capsys, tmp_path):
    not_a_build = tmp_path / 'before.so'
    not_a_build.write_text('not a shared library')
    for before in (not_a_build, tmp_path / 'missing.so'):
        assert f'cannot load {before} as a build of timm_coordatt/_native' in _usage_error(
            monkeypatch, capsys, 'native_ab', before)


@pytest.mark.skipif(not native.built, reason='the C kernels are not built')
def test_native_ab_models_refuse_kernels_turned_off(monkeypatch, capsys, tmp_path):
    # TIMM_COORDATT_NATIVE=0, as read at import: the CA blocks would call neither build
    monkeypatch.setattr(native, 'enabled', False)
    before = tmp_path / 'before.so'
    shutil.copy(native._native.__file__, before)
    with pytest.raises(SystemExit, match='TIMM_COORDATT_NATIVE turns the kernels off'):
        _main(monkeypatch, 'native_ab', before, '--models', '--model-calls', 1,
              '--pairs', 'mobilenetv2_ca:mobilenetv2_100')
    assert capsys.readouterr().out == ''


@pytest.mark.parametrize('script', ['coordatt_layer', 'strip_mlp_ab', 'model_overhead'])
def test_help_shows_the_description(monkeypatch, capsys, script):
    with pytest.raises(SystemExit):
        _main(monkeypatch, script, '--help')
    description = importlib.import_module(script).__doc__.splitlines()[0].strip()
    assert description in capsys.readouterr().out.replace('\n', ' ')


@pytest.mark.skipif(importlib.util.find_spec('executorch') is not None, reason='ExecuTorch is installed')
def test_executorch_benchmark_says_what_to_install():
    run = subprocess.run([sys.executable, str(BENCHMARKS / 'executorch_xnnpack.py')], capture_output=True, text=True)
    assert run.returncode == 1 and run.stdout == ''
    assert 'expected ExecuTorch' in run.stderr and 'pip install --no-deps executorch==' in run.stderr


class _Stop(Exception):
    pass


def _tiny_model(name, **kwargs):
    """In timm.create_model's place: a model of a few ms a step, CA models with a CoordAttention block."""
    attention = [CoordAttention(8)] if name.endswith('_ca') else []
    return nn.Sequential(nn.Conv2d(3, 8, 1), *attention, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 1000))


@pytest.fixture
def timed_in_turn(monkeypatch):
    """Tiny models in timm.create_model's place; record(script) lists the calls and orders of each of the
    script's time_in_turn calls."""
    monkeypatch.setattr(timm, 'create_model', _tiny_model)
    taken = []

    def recording(calls, rounds, warmup, orders=None):
        taken.append((list(calls), orders))
        return time_in_turn(calls, rounds, warmup, orders)

    def record(script):
        monkeypatch.setattr(importlib.import_module(script), 'time_in_turn', recording, raising=False)
        return taken
    return record


def test_model_kernels_ab_takes_each_ca_run_right_after_the_other_in_half_the_rounds(monkeypatch, timed_in_turn):
    # one CA model for both: the run right after the other may find its weights in the caches
    taken = timed_in_turn('model_kernels_ab')
    _main(monkeypatch, 'model_kernels_ab', '--rounds', 2, '--threads', 1, '--metrics', 'b1',
          '--pairs', 'mobilenetv2_ca:mobilenetv2_100')
    assert len(taken) == 2  # both layouts
    for names, orders in taken:
        assert names == ['baseline', 'kernels', 'ops']
        followed = [tuple(order[i:i + 2]) for order in orders for i in range(2)]
        assert followed.count(('kernels', 'ops')) == followed.count(('ops', 'kernels')) > 0


def test_recompute_ab_takes_each_run_first_in_turn(monkeypatch, capsys, timed_in_turn):
    taken = timed_in_turn('recompute_ab')
    _main(monkeypatch, 'recompute_ab', '--rounds', 3, '--threads', 1, '--batch-size', 2, '--layouts', 'contiguous',
          '--pairs', 'mobilenetv2_ca:mobilenetv2_100')
    (names, orders), = taken
    assert names == ['baseline', 'recomputed', 'held'] and orders is None  # time_in_turn's rotation


def test_compiled_inference_ab_split_builds_each_variant(monkeypatch, capsys, timed_in_turn):
    taken = timed_in_turn('compiled_inference_ab')
    script = importlib.import_module('compiled_inference_ab')
    built = []
    monkeypatch.setattr(script, '_compiled_alone', lambda model: built.append(model) or model)  # eager: no compiling
    _main(monkeypatch, 'compiled_inference_ab', '--calls', 1, '--batch-sizes', 1, '--threads', 1, '--split',
          '--pairs', 'mobilenetv2_ca:mobilenetv2_100')
    (names, _), = taken
    assert names == ['baseline', 'kernel_op', 'formulation', 'unchecked', 'op_call', 'identity', 'one_pass']
    models = dict(zip(names, built))

    def blocks(variant):
        return [m for m in models[variant].modules() if isinstance(m, CoordAttention)]
    assert blocks('baseline') == blocks('op_call') == blocks('identity') == blocks('one_pass') == []
    # the op's call as the kernel op's block makes it, with a key of the same kind, and nothing done
    call, = [m for m in models['op_call'].modules() if type(m).__name__ == 'OpCall']
    assert call.key.shape == blocks('kernel_op')[0]._kernel_key.shape == (1,)
    x = torch.randn(1, 8, 4, 4)
    assert torch.equal(call(x.clone()), x) and call(x).is_contiguous(memory_format=torch.channels_last)
    assert any(isinstance(m, nn.Identity) for m in models['identity'].modules())
    assert any(type(m).__name__ == 'OnePass' for m in models['one_pass'].modules())
    assert [b.use_native_kernel for b in blocks('formulation')] == [False]
    # the kernel op's block checks its folded weights against the layers, the unchecked one does not
    for variant, stays in (('kernel_op', False), ('unchecked', True)):
        block, = blocks(variant)
        params = block._folded_params()
        with torch.no_grad():
            block.conv1.weight.add_(1.0)
        assert (block._folded_params() is params) == stays, variant
    assert capsys.readouterr().out.splitlines()[0] == (
        'command: python benchmarks/compiled_inference_ab.py --calls 1 --batch-sizes 1 --threads 1 --split '
        '--pairs mobilenetv2_ca:mobilenetv2_100')


def test_strip_mlp_ab_prints_its_command(monkeypatch, capsys):
    def stop(*args, **kwargs):
        raise _Stop
    strip_mlp_ab = importlib.import_module('strip_mlp_ab')
    monkeypatch.setattr(strip_mlp_ab, '_training_step', stop)
    with pytest.raises(_Stop):
        _main(monkeypatch, 'strip_mlp_ab', '--rounds', 2, '--threads', 1, '--freeze-bn',
              '--pairs', 'mobilenetv2_ca:mobilenetv2_100')
    assert capsys.readouterr().out.splitlines()[0] == (
        'command: python benchmarks/strip_mlp_ab.py --rounds 2 --threads 1 --freeze-bn '
        '--pairs mobilenetv2_ca:mobilenetv2_100')


@pytest.mark.parametrize('args, message', [
    (['--model', 'mobilenetv2_050'], '--model: set by this script for each run'),
    (['--epochs', '1', '--resume=runs'], '--resume: set by this script for each run'),
    (['--seeds', '0', '0'], '--seeds expected distinct values, got 0 0'),
    (['--attention', 'ca', 'ca'], '--attention expected distinct values, got ca ca'),
    (['--results-file', 'missing/results.jsonl'], '--results-file missing/results.jsonl: No such file or directory'),
])
def test_attention_on_grid_task_checks_its_options_before_training(args, message, tmp_path):
    # a fresh interpreter, as the script registers its models
    run = subprocess.run([sys.executable, str(BENCHMARKS / 'attention_on_grid_task.py'), *args],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 2 and message in run.stderr.splitlines()[-1], run.stderr
    assert list(tmp_path.iterdir()) == []  # no run trained or written


def test_attention_on_grid_task_counts_the_parameters_of_the_tasks_head(tmp_path):
    # --grid 2: four classes, not the default grid's nine; a fresh interpreter, as the script registers its models
    train = ['--grid', '2', '--img-size', '16', '--epochs', '1', '--batch-size', '2', '--grid-samples', '4',
             '--grid-val-samples', '2', '--workers', '0']
    run = subprocess.run(
        [sys.executable, str(BENCHMARKS / 'attention_on_grid_task.py'), '--seeds', '0', '--attention', 'none',
         '--output', str(tmp_path), *train], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    command = next(line for line in lines if line.startswith('command: '))
    assert command == ('command: python benchmarks/attention_on_grid_task.py --seeds 0 --attention none '
                       f'--output {tmp_path} ' + ' '.join(train))
    row = next(line for line in lines if line.startswith('| none |'))
    model = timm.create_model('mobilenetv2_050', num_classes=4)  # the same network, without attention
    assert row.split(' | ')[1] == f'{sum(p.numel() for p in model.parameters()):,}'
