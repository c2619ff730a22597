""" Model benchmark smoke test on tiny settings: table shape, medians and ratios as reported, the printed
command line, the memory measurement on a known allocation pattern. No timing assertions. """
import argparse
import dataclasses
import inspect
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import timm
import torch

import timm_coordatt  # registers the models
from timm_coordatt import model_benchmark
from timm_coordatt.cli import main
from timm_coordatt.model_benchmark import (
    PROFILE_WARMUP_STEPS, BenchmarkConfig, Failure, _compiled_alone, _runner, _time_in_turn, add_arguments,
    format_profile, format_results, peak_memory, profile_mode, profile_overhead, run_benchmark)

PAIR = ('mobilenetv2_050_ca', 'mobilenetv2_050')
# for the interpreters the tests start: this package, wherever the tests imported it from
PACKAGE_ENV = dict(os.environ, PYTHONPATH=str(Path(timm_coordatt.__file__).resolve().parents[1]))
TINY = BenchmarkConfig(
    pairs=(PAIR,), img_size=32, infer_batch_sizes=(1, 2), train_batch_size=2, rounds=2, min_time=0., min_calls=2,
    modes=('eager', 'channels_last'), threads=1, fresh_process=False)


@pytest.fixture(scope='module')
def results():
    return run_benchmark(TINY)


def test_rows_and_medians(results):
    metrics = ['infer b1', 'infer b2', 'train b2', 'train memory b2']
    assert [(r.mode, r.metric) for r in results] == [(m, k) for m in TINY.modes for k in metrics]
    for r in results:
        assert (r.ca_model, r.baseline) == PAIR
        units = {'infer b1': 'ms', 'infer b2': 'img/s', 'train b2': 'img/s', 'train memory b2': 'MiB'}
        assert r.unit == units[r.metric]
        rounds = 1 if r.unit == 'MiB' else TINY.rounds
        assert len(r.baseline_samples) == len(r.ca_samples) == rounds
        assert r.baseline_value == statistics.median(r.baseline_samples) > 0
        assert r.ca_value == statistics.median(r.ca_samples) > 0
        # throughput: less is worse; latency and memory: more is worse
        expected = r.baseline_value / r.ca_value - 1 if r.unit == 'img/s' else r.ca_value / r.baseline_value - 1
        assert r.overhead == pytest.approx(expected)
        assert r.goal == {'infer b1': 0.10, 'infer b2': 0.10, 'train b2': 0.15, 'train memory b2': 0.10}[r.metric]
        assert r.met == (r.overhead <= r.goal)


def test_text_table_ratios_come_from_the_printed_medians(results):
    out = format_results(results, TINY, 'text')
    lines = out.splitlines()
    command = lines[0].removeprefix('command: ')
    # the printed command reproduces the configuration
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(shlex.split(command)[2:])
    assert shlex.split(command)[:2] == ['timm-coordatt', 'benchmark']
    assert BenchmarkConfig(
        pairs=tuple(args.pairs), img_size=args.img_size, infer_batch_sizes=tuple(args.infer_batch_sizes),
        train_batch_size=args.train_batch_size, rounds=args.rounds, min_time=args.min_time, min_calls=args.min_calls,
        modes=tuple(args.modes), threads=args.threads, device=args.device,
        fresh_process=not args.one_process) == TINY

    header = lines[3].split('  ')
    assert [h.strip() for h in header if h.strip()] == [
        'pair (CA / baseline)', 'mode', 'metric', 'unit', 'baseline', 'CA', 'CA/baseline', 'rounds', 'overhead', 'goal']
    rows = [line for line in lines[5:] if line.startswith(PAIR[0])]
    assert len(rows) == len(results)
    for line, r in zip(rows, results):
        cells = line.split()
        # ... unit baseline CA ratio lowest-highest overhead '<=' goal met|MISSED
        base, ca, ratio = float(cells[-8]), float(cells[-7]), float(cells[-6])
        assert ratio == pytest.approx(ca / base, rel=0.01, abs=2e-3)
        lowest, highest = map(float, cells[-5].split('-'))
        per_round = [c / b for c, b in zip(r.ca_samples, r.baseline_samples)]
        assert (lowest, highest) == (pytest.approx(min(per_round), abs=6e-4), pytest.approx(max(per_round), abs=6e-4))
        assert cells[-1] in ('met', 'MISSED')


def test_cli_json(capsys):
    assert main(['benchmark', '--pairs', ':'.join(PAIR), '--img-size', '32', '--infer-batch-sizes', '1',
                 '--train-batch-size', '2', '--rounds', '1', '--min-time', '0', '--modes', 'eager',
                 '--threads', '1', '--format', 'json']) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc['command'].startswith('timm-coordatt benchmark --pairs mobilenetv2_050_ca:mobilenetv2_050 ')
    assert [r['metric'] for r in doc['results']] == ['infer b1', 'train b2', 'train memory b2']
    for r in doc['results']:
        assert r['ratio'] == pytest.approx(r['ca_value'] / r['baseline_value'])
        assert r['round_ratios'] == pytest.approx([c / b for c, b in zip(r['ca_samples'], r['baseline_samples'])])


def test_each_pair_and_mode_in_a_fresh_process():
    # what a spawned process measures comes back whole; a model registered only here is unknown there
    cfg = dataclasses.replace(TINY, modes=('channels_last',), infer_batch_sizes=(1,), rounds=1, fresh_process=True)
    assert '--one-process' not in cfg.command() and '--one-process' in TINY.command()
    fresh = run_benchmark(cfg)
    assert [(r.metric, r.mode, r.unit) for r in fresh] == [
        ('infer b1', 'channels_last', 'ms'), ('train b2', 'channels_last', 'img/s'),
        ('train memory b2', 'channels_last', 'MiB')]
    assert all(r.baseline_value > 0 and r.ca_value > 0 for r in fresh)
    assert 'each pair and mode in a fresh process' in format_results(fresh, cfg)

    @timm.models.register_model
    def benchmark_test_only_here(pretrained=False, **kwargs):
        return timm.create_model('mobilenetv2_050', **kwargs)
    try:
        only_here = dataclasses.replace(cfg, pairs=(('mobilenetv2_050_ca', 'benchmark_test_only_here'),))
        assert run_benchmark(dataclasses.replace(only_here, fresh_process=False))
        with pytest.raises(RuntimeError, match='benchmark_test_only_here'):
            run_benchmark(only_here)
        # or, with a list for them, the failures are kept there, as the worker reported them
        failures = []
        assert run_benchmark(only_here, failures=failures) == []
        assert failures == [Failure(
            'mobilenetv2_050_ca', 'benchmark_test_only_here', 'channels_last', 'RuntimeError',
            'Unknown model (benchmark_test_only_here)')]
    finally:
        timm.models._registry._model_entrypoints.pop('benchmark_test_only_here', None)


def test_peak_memory_of_a_known_allocation_pattern():
    keep = [torch.ones(3_000_000)]  # allocated before: neither it nor its release counts

    def fn():
        a = torch.empty(1_000_000)
        b = torch.empty(500_000)  # noqa: F841
        del a
        c = torch.empty(2_000_000)  # noqa: F841  (peak: b + c live)
        keep.clear()

    assert peak_memory(fn, torch.device('cpu')) == 4 * (500_000 + 2_000_000)


def test_peak_memory_ignores_frees_of_earlier_profiled_memory():
    """A block allocated in an earlier measured call and freed in this one (garbage collected during
    it, say) is not this call's: the profiler reports its free, which must not lower the count."""
    keep = []
    peak_memory(lambda: keep.append(torch.empty(1_000_000)), torch.device('cpu'))

    def fn():
        keep.clear()
        a = torch.empty(500_000)  # noqa: F841

    assert peak_memory(fn, torch.device('cpu')) == 4 * 500_000


def test_bad_input(capsys):
    assert main(['benchmark', '--pairs', 'mobilenetv2_ca:no_such_model']) == 2
    assert 'unknown model(s): no_such_model' in capsys.readouterr().err
    # an A/A run would time one model as both (the samples are kept by model name)
    assert main(['benchmark', '--pairs', 'mobilenetv2_050:mobilenetv2_050']) == 2
    assert 'pairs mobilenetv2_050:mobilenetv2_050 pair a model with itself' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(['benchmark', '--pairs', 'mobilenetv2_ca'])
    assert 'expected CA_MODEL:BASELINE' in capsys.readouterr().err
    with pytest.raises(ValueError, match='rounds'):
        BenchmarkConfig(pairs=(PAIR,), rounds=0)
    with pytest.raises(ValueError, match='min_calls=0'):
        BenchmarkConfig(pairs=(PAIR,), min_calls=0)
    assert main(['benchmark', '--device', 'nonsense']) == 2
    assert "device must be cpu or cuda[:N], got 'nonsense'" in capsys.readouterr().err


def test_store_ca_outputs():
    # big enough activations for the saved CA outputs to make the peak
    lean_cfg = dataclasses.replace(TINY, img_size=128, infer_batch_sizes=(1,), train_batch_size=4, modes=('eager',),
                                   rounds=1)
    cfg = dataclasses.replace(lean_cfg, store_ca_outputs=True)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args(shlex.split(cfg.command())[2:]).store_ca_outputs
    held, lean = ({r.metric: r for r in run_benchmark(c)}['train memory b4'] for c in (cfg, lean_cfg))
    assert lean.ca_value < held.ca_value
    assert lean.baseline_value == held.baseline_value  # the baseline has no CA outputs to hold


@pytest.fixture
def clock(monkeypatch):
    """A clock of the test's own, which the calls move: sleeps of 1 ms took 2-6 ms on a busy machine."""
    now = [0.]
    monkeypatch.setattr(model_benchmark, 'time', types.SimpleNamespace(perf_counter=lambda: now[0]))
    return now


def test_samples_take_calls_in_turn(clock):
    """The models' calls alternate within a sample until each has run for min_time."""
    calls = []

    def model(name: str, seconds: float):
        def call():
            calls.append(name)
            clock[0] += seconds
        return call

    per_call = _time_in_turn([model('a', 0.001), model('b', 0.003)], torch.device('cpu'), 0.02)
    # until the faster one too has run for min_time: 20 calls of a (and of b, in turn)
    assert calls == ['a', 'b'] * 20
    assert per_call == pytest.approx([0.001, 0.003])


def test_samples_take_at_least_min_calls(clock):
    """However short min_time, a sample holds min_calls calls of each model in turn, and is their median:
    one slow call (a training step's page faults) among three is left out."""
    calls = []

    def model(name: str):
        def call():
            calls.append(name)
            clock[0] += 0.04 if len(calls) == 3 else 0.002  # a's second call is slow
        return call

    per_call = _time_in_turn([model('a'), model('b')], torch.device('cpu'), 0., min_calls=3)
    assert calls == ['a', 'b'] * 3
    assert per_call == pytest.approx([0.002, 0.002])


def test_a_stalled_call_does_not_move_the_sample(clock):
    """A sample is the median of its calls: one call stalled by something else on the machine is left out."""
    calls = []

    def stalled_once():
        calls.append(None)
        clock[0] += 0.05 if len(calls) == 2 else 0.001

    def steady():
        clock[0] += 0.001

    per_call = _time_in_turn([stalled_once, steady], torch.device('cpu'), 0.02)
    # each until it has run for 0.02 s: the steady one's 20 calls; the mean would be 3.45 ms
    assert len(calls) == 20
    assert per_call == pytest.approx([0.001, 0.001])


def test_models_run_in_the_mode_of_each_metric(monkeypatch):
    """Inference timed in eval mode, training steps in train mode (the mode set outside the timed calls)."""
    seen = []
    create = timm.create_model

    def create_recording(name, **kwargs):
        model = create(name, **kwargs)
        model.register_forward_pre_hook(lambda m, args: seen.append((torch.is_inference_mode_enabled(), m.training)))
        return model

    monkeypatch.setattr(timm, 'create_model', create_recording)
    run_benchmark(dataclasses.replace(TINY, modes=('eager',), rounds=1))
    assert {inference for inference, _ in seen} == {True, False}
    assert all(training != inference for inference, training in seen)


def test_profile_steps_in_the_first_eager_layout(monkeypatch):
    """`--profile`: both models in the first mode of `--modes` that runs eagerly, profiled after the
    warm-up steps; ops only the CA model runs show up against a baseline of zero."""
    layouts = []
    create = timm.create_model

    def create_recording(name, **kwargs):
        model = create(name, **kwargs)
        model.register_forward_pre_hook(lambda m, args: layouts.append(
            (name, args[0].is_contiguous(memory_format=torch.channels_last))))
        return model

    monkeypatch.setattr(timm, 'create_model', create_recording)
    cfg = dataclasses.replace(TINY, modes=('compile', 'channels_last'))
    assert profile_mode(cfg) == 'channels_last'
    rows = profile_overhead(PAIR, cfg)
    steps = PROFILE_WARMUP_STEPS + 1
    assert layouts == [(PAIR[0], True)] * steps + [(PAIR[1], True)] * steps
    assert rows[-1][0] == 'total' and rows[-1][1] > 0 and rows[-1][2] > 0
    assert any(base == 0 and ca > 0 for _, base, ca in rows[:-1])
    assert 'channels_last training step after' in format_profile(PAIR, rows, mode=profile_mode(cfg))


def test_compiled_models_keep_graphs_of_their_own():
    """Compile mode: two models of one class each get a cache of compiled graphs of their own, as each
    would compiled alone (sharing `forward`'s code, a call would first check the other model's guards)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    torch._dynamo.reset()
    models = [timm.create_model(PAIR[1]).eval() for _ in range(2)]
    compiled = [_compiled_alone(m) for m in models]
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        for model, fn in zip(models, compiled):
            torch.testing.assert_close(fn(x), model(x), rtol=1e-4, atol=1e-5)
    codes = [inspect.unwrap(fn).__code__ for fn in compiled]
    assert codes[0] is not codes[1]
    assert [len(_debug_get_cache_entry_list(code)) for code in codes] == [1, 1]


def test_invalid_options_are_refused(capsys):
    # nan passed `min_time < 0` and a sample never reached it; inf neither
    for min_time in (float('nan'), float('inf')):
        with pytest.raises(ValueError, match=f'min_time must be a finite number of seconds >= 0, got {min_time}'):
            BenchmarkConfig(pairs=(PAIR,), min_time=min_time)
    assert main(['benchmark', '--pairs', ':'.join(PAIR), '--min-time', 'nan']) == 2
    assert 'min_time must be a finite number' in capsys.readouterr().err
    # a batch size given twice made two rows of one metric, each with both tasks' samples
    with pytest.raises(ValueError, match=r'infer_batch_sizes must be distinct, got \[2, 1, 2\]'):
        BenchmarkConfig(pairs=(PAIR,), infer_batch_sizes=(2, 1, 2))
    assert main(['benchmark', '--pairs', ':'.join(PAIR), '--infer-batch-sizes', '2', '2']) == 2
    assert 'infer_batch_sizes must be distinct, got [2, 2]' in capsys.readouterr().err
    assert main(['benchmark', '--pairs', ':'.join(PAIR), ':'.join(PAIR)]) == 2
    assert f"pairs must be distinct, got ['{':'.join(PAIR)}', '{':'.join(PAIR)}']" in capsys.readouterr().err
    assert main(['benchmark', '--pairs', ':'.join(PAIR), '--modes', 'eager', 'eager']) == 2
    assert "modes must be distinct, got ['eager', 'eager']" in capsys.readouterr().err


def test_the_command_gives_min_time_exactly():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for min_time in (0.1234567, 1234567., 2.5e-7, 0., 3):
        command = BenchmarkConfig(pairs=(PAIR,), min_time=min_time).command()
        assert parser.parse_args(shlex.split(command)[2:]).min_time == min_time


def test_both_models_get_the_same_data(monkeypatch):
    """The CA model and its baseline get the same images and targets, whatever their inits draw."""
    cfg = dataclasses.replace(TINY, infer_batch_sizes=(1, 3), train_batch_size=4)
    seen = {}
    create, cross_entropy = timm.create_model, torch.nn.functional.cross_entropy

    def create_recording(name, **kwargs):
        model = create(name, **kwargs)
        model.register_forward_pre_hook(lambda m, args: seen.setdefault(name, []).append(args[0].clone()))
        return model

    def cross_entropy_recording(logits, target, **kwargs):
        seen['targets'].append(target.clone())
        return cross_entropy(logits, target, **kwargs)

    monkeypatch.setattr(timm, 'create_model', create_recording)
    monkeypatch.setattr(torch.nn.functional, 'cross_entropy', cross_entropy_recording)
    seen['targets'] = []
    for name in PAIR:
        runner = _runner(name, 'eager', cfg, torch.device('cpu'))
        runner.model.eval()
        for infer in runner.infer.values():
            infer()
        runner.model.train()
        runner.train()
    (ca, base), targets = (seen[n] for n in PAIR), seen['targets']
    assert [x.shape[0] for x in ca] == [1, 3, 4] and len(targets) == 2
    assert all(torch.equal(a, b) for a, b in zip(ca, base))
    assert torch.equal(*targets)


def _benchmark_args(*extra):
    return ['benchmark', '--img-size', '32', '--infer-batch-sizes', '1', '--train-batch-size', '2', '--rounds', '1',
            '--min-time', '0', '--min-calls', '1', '--modes', 'eager', '--threads', '1', *extra]


def test_a_failing_pair_and_mode_leaves_the_others_results(capsys):
    """A pair that cannot run (a ViT at 32x32, or a compiler missing) is named on stderr in a line, the
    other pairs' results printed, and the exit code 1; in the JSON output it is listed under failures."""
    vit = f'{PAIR[0]}:vit_tiny_patch16_224'
    assert main(_benchmark_args('--pairs', ':'.join(PAIR), vit, '--one-process', '--format', 'json')) == 1
    out, err = capsys.readouterr()
    doc = json.loads(out)
    assert [(r['baseline'], r['metric']) for r in doc['results']] == [
        (PAIR[1], 'infer b1'), (PAIR[1], 'train b2'), (PAIR[1], 'train memory b2')]
    message = "Input height (32) doesn't match model (224)."
    assert doc['failures'] == [dict(ca_model=PAIR[0], baseline='vit_tiny_patch16_224', mode='eager',
                                    error='AssertionError', message=message)]
    assert err.splitlines()[-1] == (
        f'timm-coordatt benchmark: error: {PAIR[0]} vs vit_tiny_patch16_224, eager: AssertionError: {message}')
    assert 'Traceback' not in err

    # text, with --profile, which fails for the ViT too
    assert main(_benchmark_args('--pairs', vit, ':'.join(PAIR), '--one-process', '--profile')) == 1
    out, err = capsys.readouterr()
    assert [line.split()[0] for line in out.splitlines() if line.startswith(PAIR[0])] == [PAIR[0]] * 3
    assert 'self time per op' in out
    assert [line.split(', ')[1].split(':')[0] for line in err.splitlines() if 'error:' in line] == [
        'eager', 'profile']


def test_ctrl_c_is_no_failure(monkeypatch, capsys):
    """Ctrl-C (or SIGTERM's SystemExit) ends the run, failures collected or not."""
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(model_benchmark, '_measure_pair', interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_benchmark(TINY, failures=[])
    assert main(_benchmark_args('--pairs', ':'.join(PAIR), '--one-process')) == 130
    assert capsys.readouterr().err.splitlines()[-1] == 'timm-coordatt benchmark: interrupted'


def _alive(pid: int) -> bool:
    try:
        return Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0] != 'Z'
    except FileNotFoundError:
        return False


def _blocked_signals(pid: int):
    """Signal numbers process `pid` blocks (its main thread's mask, from /proc)."""
    mask = int(Path(f'/proc/{pid}/status').read_text().split('SigBlk:')[1].split()[0], 16)
    return {n for n in range(1, mask.bit_length() + 1) if mask >> (n - 1) & 1}


def _workers_of(pid: int):
    """Live spawned multiprocessing children of process `pid` (from /proc)."""
    found = []
    for entry in filter(str.isdigit, os.listdir('/proc')):
        try:
            ppid = int(Path(f'/proc/{entry}/stat').read_text().rsplit(')', 1)[1].split()[1])
            cmdline = Path(f'/proc/{entry}/cmdline').read_bytes()
        except (FileNotFoundError, ProcessLookupError):  # ended meanwhile
            continue
        if ppid == pid and b'spawn_main' in cmdline and _alive(int(entry)):
            found.append(int(entry))
    return found


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='reads /proc')
@pytest.mark.parametrize('stop', ['SIGTERM', 'SIGKILL', 'Ctrl-C'])
def test_the_worker_ends_with_the_main_process(stop):
    """However the main process ends, its worker stops measuring: SIGTERM (`timeout`, a job scheduler),
    SIGKILL (the worker notices its parent gone) or a terminal's Ctrl-C, which reaches both."""
    if stop == 'Ctrl-C' and signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        pytest.skip('SIGINT is ignored here, and so in the processes started from here')
    proc = subprocess.Popen(
        [sys.executable, '-m', 'timm_coordatt', *_benchmark_args('--pairs', ':'.join(PAIR), '--rounds', '1000')],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=PACKAGE_ENV, start_new_session=True)
    workers = []
    try:
        deadline = time.monotonic() + 120
        while not (workers := _workers_of(proc.pid)):
            assert proc.poll() is None and time.monotonic() < deadline, 'no worker started'
            time.sleep(0.05)
        if stop == 'Ctrl-C':
            # held back from the worker for good, so that it cannot print a traceback before it is stopped
            assert signal.SIGINT in _blocked_signals(workers[0])
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(getattr(signal, stop))
        _, err = proc.communicate(timeout=60)
        deadline = time.monotonic() + 60
        while _alive(workers[0]):
            assert time.monotonic() < deadline, f'the worker outlived the main process ({stop})'
            time.sleep(0.05)
    finally:  # whatever the test left running
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in filter(_alive, workers):
            os.kill(pid, signal.SIGKILL)
    assert proc.returncode == {'SIGTERM': 128 + signal.SIGTERM, 'SIGKILL': -signal.SIGKILL, 'Ctrl-C': 130}[stop], err
    if stop == 'Ctrl-C':
        assert 'Traceback' not in err and err.splitlines()[-1] == 'timm-coordatt benchmark: interrupted'


SIGNAL_WHILE_STARTING = '''
import os, signal, sys
import multiprocessing.util
from timm_coordatt.cli import main
spawn = multiprocessing.util.spawnv_passfds
def spawn_then_stop(path, args, passfds):
    pid = spawn(path, args, passfds)
    if 'spawn_main' in repr(args):  # the worker, not the resource tracker: stopped while it is being started
        print('worker', pid, file=sys.stderr, flush=True)
        {stop}
    return pid
multiprocessing.util.spawnv_passfds = spawn_then_stop
sys.argv[0] = 'timm-coordatt'
sys.exit(main(sys.argv[1:]))
'''


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='reads /proc')
@pytest.mark.parametrize('stop', ['Ctrl-C', 'SIGTERM'])
def test_a_stop_while_the_worker_starts(stop, tmp_path):
    """A Ctrl-C or SIGTERM in the middle of the worker's start (a busy machine, a quick hand) ends the run as
    one later does: no traceback from the worker (whose input was not yet written), and no worker left to
    measure on, which the main process would wait for at exit."""
    if stop == 'Ctrl-C' and signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        pytest.skip('SIGINT is ignored here, and so in the processes started from here')
    script = tmp_path / 'stop_while_starting.py'
    script.write_text(SIGNAL_WHILE_STARTING.format(stop={
        'Ctrl-C': 'os.killpg(0, signal.SIGINT)',  # a terminal's: the whole process group, the worker too
        'SIGTERM': 'os.kill(os.getpid(), signal.SIGTERM)'}[stop]))
    proc = subprocess.Popen(
        [sys.executable, str(script), *_benchmark_args('--pairs', ':'.join(PAIR), '--rounds', '1000')],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=PACKAGE_ENV, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    worker = int(err.split('worker ', 1)[1].split()[0])
    deadline = time.monotonic() + 60
    while _alive(worker):
        assert time.monotonic() < deadline, f'the worker outlived the main process ({stop})'
        time.sleep(0.05)
    assert proc.returncode == {'Ctrl-C': 130, 'SIGTERM': 128 + signal.SIGTERM}[stop], err
    assert 'Traceback' not in err, err
    if stop == 'Ctrl-C':
        assert err.splitlines()[-1] == 'timm-coordatt benchmark: interrupted', err


def test_a_script_without_main_guard_is_told_so(tmp_path):
    """The workers are spawned, and import the script that started them: without an
    `if __name__ == '__main__':` guard, the worker runs the benchmark again, and the script is told why."""
    script = tmp_path / 'unguarded.py'
    script.write_text(
        'from timm_coordatt.model_benchmark import BenchmarkConfig, run_benchmark\n'
        f'run_benchmark(BenchmarkConfig(pairs=({PAIR!r},), img_size=16, infer_batch_sizes=(1,), train_batch_size=2, '
        'rounds=1, min_time=0., min_calls=1, modes=("eager",), threads=1))\n')
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=PACKAGE_ENV)
    assert proc.returncode == 1
    assert "without an `if __name__ == '__main__':` guard" in proc.stderr.splitlines()[-1], proc.stderr[-3000:]


def test_stderr_has_the_progress_lines_only():
    """The profiler's backend logs each profiled call on stderr (`profiler_start`, and `gpuGetDeviceCount
    failed` on CUDA builds without a GPU): the CLI keeps its workers and itself (`--profile`) quiet."""
    env = {k: v for k, v in PACKAGE_ENV.items() if k != 'KINETO_LOG_LEVEL'}
    proc = subprocess.run(
        [sys.executable, '-m', 'timm_coordatt', 'benchmark', '--pairs', ':'.join(PAIR), '--img-size', '16',
         '--infer-batch-sizes', '1', '--train-batch-size', '2', '--rounds', '1', '--min-time', '0', '--modes', 'eager',
         '--threads', '1', '--profile'], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.splitlines() == [f'[{PAIR[0]} vs {PAIR[1]}, eager]'], proc.stderr[-3000:]
    assert 'train memory b2' in proc.stdout and f'{PAIR[0]} vs {PAIR[1]}' in proc.stdout
