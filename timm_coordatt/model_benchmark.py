""" Whole-model cost of Coordinate Attention: each CA model against its baseline, side by side in one process.

For every pair and execution mode (eager, channels_last, torch.compile) it measures inference latency at
batch 1, inference throughput at larger batches, training-step throughput (forward, cross-entropy,
backward, SGD step) and the peak memory of a training step. The two models' calls alternate, over several
rounds (alternating which goes first), and medians are reported, since timings on a shared machine drift
by more than the difference being measured. Used by `timm-coordatt benchmark` and
`benchmarks/model_overhead.py`.
"""
import argparse
import json
import math
import multiprocessing
import os
import shlex
import signal
import statistics
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from timm.optim import create_optimizer_v2

from .recompute import set_recompute_ca_outputs

__all__ = [
    'BenchmarkConfig', 'Result', 'Failure', 'WorkerError', 'GOALS', 'MODES', 'PAIRS', 'default_pairs', 'peak_memory',
    'run_benchmark', 'profile_overhead', 'profile_mode', 'results_dict', 'format_results', 'format_profile',
    'add_arguments', 'run_from_args', 'quiet_profiler_logs', 'sigterm_exits',
]

MODES = ('eager', 'channels_last', 'compile')
FORMATS = ('text', 'markdown', 'json')
# the CA models and the baselines the papers compare them with
PAIRS = (
    ('mobilenetv2_ca', 'mobilenetv2_100'),
    ('efficientnet_b0_ca', 'efficientnet_b0'),
    ('mobilenext_ca', 'mobilenext_100'),
)
# largest acceptable overhead of CA over its baseline, by kind of measurement (the project's goals)
GOALS = {'infer': 0.10, 'train': 0.15, 'memory': 0.10}


def default_pairs() -> Tuple[Tuple[str, str], ...]:
    """The pairs of `PAIRS` whose models are registered."""
    return tuple(p for p in PAIRS if all(timm.is_model(n) for n in p))


@dataclass(frozen=True)
class BenchmarkConfig:
    """What to measure. `min_time`: seconds each model runs in a timed sample (at least one call; the
    two models' calls alternate within it)."""
    pairs: Tuple[Tuple[str, str], ...] = field(default_factory=default_pairs)
    img_size: int = 224
    infer_batch_sizes: Tuple[int, ...] = (1, 32)
    train_batch_size: int = 32
    rounds: int = 5
    min_time: float = 0.5
    # calls of each model a sample takes at least: a training step of these models runs 0.5-1.2 s, so
    # with `min_time` alone a sample was one step, and one step's page faults moved a round by 20-85 points
    min_calls: int = 3
    modes: Tuple[str, ...] = ('eager', 'channels_last')
    threads: int = 2
    device: str = 'cpu'
    # the CA models' training keeps the CA outputs for backward (`set_recompute_ca_outputs(model, False)`)
    store_ca_outputs: bool = False
    # each (pair, mode) measured in a process of its own: the state that earlier pairs and modes leave
    # glibc's heap in moved a training row by up to 35 points (docs/benchmark-results.md), as a user's
    # training, one model a process, never sees. Off: all in the calling process (models registered
    # only there, monkeypatched code)
    fresh_process: bool = True

    def __post_init__(self):
        if not self.pairs:
            raise ValueError('expected at least one (CA model, baseline) pair, got none')
        unknown = [n for p in self.pairs for n in p if not timm.is_model(n)]
        if unknown:
            raise ValueError(f'unknown model(s): {", ".join(unknown)}; expected registered timm model names')
        same = [f'{ca}:{base}' for ca, base in self.pairs if ca == base]
        if same:  # each model's samples are kept under its name: one model would be timed as both
            raise ValueError(f'pairs {", ".join(same)} pair a model with itself; expected two different models')
        bad_modes = [m for m in self.modes if m not in MODES]
        if not self.modes or bad_modes:
            raise ValueError(f'modes must be a non-empty subset of {MODES}, got {list(self.modes)}')
        sizes = (self.img_size, self.train_batch_size, self.rounds, self.min_calls, self.threads) + tuple(
            self.infer_batch_sizes)
        if min(sizes) < 1 or not self.infer_batch_sizes:
            raise ValueError(
                'img_size, batch sizes, rounds, min_calls and threads must be >= 1 (and at least one inference batch '
                f'size), got img_size={self.img_size}, infer_batch_sizes={list(self.infer_batch_sizes)}, '
                f'train_batch_size={self.train_batch_size}, rounds={self.rounds}, min_calls={self.min_calls}, '
                f'threads={self.threads}')
        # one given twice made two rows of one metric, each with both tasks' samples
        pairs = [f'{ca}:{base}' for ca, base in self.pairs]
        for name, values in (('pairs', pairs), ('modes', list(self.modes)),
                             ('infer_batch_sizes', list(self.infer_batch_sizes))):
            if len(set(values)) != len(values):
                raise ValueError(f'{name} must be distinct, got {values}')
        # nan passes `< 0`, and a sample would never reach it (nor inf)
        if not (math.isfinite(self.min_time) and self.min_time >= 0):
            raise ValueError(f'min_time must be a finite number of seconds >= 0, got {self.min_time}')
        try:
            device_type = torch.device(self.device).type
        except RuntimeError:  # not a device name torch knows
            device_type = None
        if device_type not in ('cpu', 'cuda'):
            raise ValueError(f'device must be cpu or cuda[:N], got {self.device!r}')

    def command(self, prog: str = 'timm-coordatt benchmark') -> str:
        """The command line that reproduces this configuration, every option spelled out."""
        args = ['--pairs', *(f'{ca}:{base}' for ca, base in self.pairs),
                '--img-size', str(self.img_size),
                '--infer-batch-sizes', *map(str, self.infer_batch_sizes),
                '--train-batch-size', str(self.train_batch_size),
                '--rounds', str(self.rounds),
                '--min-time', repr(float(self.min_time)),  # repr: the float that was given, to the last digit
                '--min-calls', str(self.min_calls),
                '--modes', *self.modes,
                '--threads', str(self.threads),
                '--device', self.device] + (['--store-ca-outputs'] if self.store_ca_outputs else []) + (
                    [] if self.fresh_process else ['--one-process'])
        return f'{prog} {shlex.join(args)}'


@dataclass(frozen=True)
class Result:
    """Medians of one measurement for a CA model and its baseline, with every round's sample."""
    ca_model: str
    baseline: str
    mode: str
    metric: str  # 'infer b<N>', 'train b<N>' or 'train memory b<N>'
    unit: str  # 'ms' (batch-1 latency), 'img/s' (throughput) or 'MiB' (peak memory)
    baseline_value: float
    ca_value: float
    baseline_samples: Tuple[float, ...]
    ca_samples: Tuple[float, ...]

    @property
    def ratio(self) -> float:
        """CA / baseline of the reported medians."""
        return self.ca_value / self.baseline_value

    @property
    def round_ratios(self) -> Tuple[float, ...]:
        """CA / baseline of each round's samples, taken next to each other: how far the rounds spread."""
        return tuple(ca / base for ca, base in zip(self.ca_samples, self.baseline_samples))

    @property
    def overhead(self) -> float:
        """Extra cost of CA as a fraction: more time, less throughput (baseline / CA - 1), or more memory."""
        return 1 / self.ratio - 1 if self.unit == 'img/s' else self.ratio - 1

    @property
    def goal(self) -> float:
        return GOALS['memory' if 'memory' in self.metric else self.metric.split()[0]]

    @property
    def met(self) -> bool:
        return self.overhead <= self.goal


@dataclass(frozen=True)
class Failure:
    """A (pair, mode) that raised instead of being measured ('profile' as the mode: its `--profile`)."""
    ca_model: str
    baseline: str
    mode: str
    error: str  # the exception's type name
    message: str

    def __str__(self) -> str:
        first_line = self.message.splitlines()[0] if self.message else ''
        return f'{self.ca_model} vs {self.baseline}, {self.mode}: {self.error}: {first_line}'


class WorkerError(RuntimeError):
    """An exception raised in the worker process of a (pair, mode): its type name, message and traceback."""

    def __init__(self, error: str, message: str, worker_traceback: str):
        super().__init__(f'{error}: {message}\n\nin the worker process:\n{worker_traceback}')
        self.error = error
        self.message = message


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _time_in_turn(fns: Sequence[Callable[[], None]], device: torch.device, min_time: float,
                  min_calls: int = 1) -> List[float]:
    """Seconds per call of each of `fns`: the median of its calls, made in turn (A, B, A, B, ...)
    until each has run for `min_time` and `min_calls` times. The machine's drift, over seconds
    here, falls on all alike rather than on whichever ran in a slow stretch, and the median leaves out
    calls that something else on the machine stalled (one stall of 50 ms moves the mean of 25 calls of
    20 ms by 10%)."""
    times: List[List[float]] = [[] for _ in fns]
    totals = [0.] * len(fns)
    while True:
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            _sync(device)
            times[i].append(time.perf_counter() - start)
            totals[i] += times[i][-1]
        if min(totals) >= min_time and len(times[0]) >= min_calls:
            return [statistics.median(t) for t in times]


def quiet_profiler_logs() -> None:
    """Silences the lines the profiler's backend (kineto) writes on stderr each time it runs (`profiler_start`,
    and `gpuGetDeviceCount failed` on CUDA builds without a GPU), which read like failures between the
    benchmark's own lines, unless `KINETO_LOG_LEVEL` is set. Kineto reads it once, when the profiler first
    runs in the process: for processes of the benchmark's own (its CLI, workers and scripts), not a caller's."""
    os.environ.setdefault('KINETO_LOG_LEVEL', '6')  # above its highest level (5): none


def _cpu_allocations(fn: Callable[[], None]) -> List[Tuple[int, int, int]]:
    """(time, bytes, address) of every CPU allocation (+) and free (-) by torch during one call of `fn`."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # the profiler's raw allocation records (what its memory timeline is built from); the public
    # `events()` folds them into the enclosing ops, losing the order of allocations and frees
    records = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == 'cpu':
            records.append((node.start_time_ns, node.extra_fields.alloc_size, node.extra_fields.ptr))
    return sorted(records)


def peak_memory(fn: Callable[[], None], device: torch.device) -> int:
    """High-water mark of the bytes torch allocates during one call of `fn` and holds at once.

    CUDA: the caching allocator's peak counter, above what was allocated before the call. CPU: the running
    sum of the allocations and frees the profiler records for torch's CPU allocator (process RSS would
    mostly show the allocator's caching and page reuse, not what the call needs). Memory allocated before
    the call, and its release, is not counted on either.
    """
    if device.type == 'cuda':
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    # the profiler also records frees of blocks allocated in an earlier profiled call (garbage that a
    # collection inside this one releases, say): only frees of this call's own blocks count
    held = {}
    live = peak = 0
    for _, nbytes, address in _cpu_allocations(fn):
        if nbytes > 0:
            held[address] = nbytes
        elif held.pop(address, None) is None:
            continue
        live += nbytes
        peak = max(peak, live)
    return peak


@dataclass
class _Runner:
    """One model prepared for a mode: its inference call by batch size and its training step, each
    to be timed with the model in eval and train mode respectively (`model.train(...)`, set outside
    the timed calls: it walks every module, about 1-2 ms for these models)."""
    model: nn.Module
    infer: Dict[int, Callable[[], None]]
    train: Callable[[], None]


def _compiled_alone(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """`model` compiled as a deployment compiles it, one static graph per batch size and train/eval,
    through a function of its own: dynamo keeps compiled graphs per code object, and a pair's models,
    of one class, share `forward`'s, so each call would first check the other model's guards (0.15 ms
    a call at batch 1)."""
    def call(x: torch.Tensor) -> torch.Tensor:
        return model(x)

    call.__code__ = call.__code__.replace()  # a code object of this model's own
    return torch.compile(call, dynamic=False)


def _runner(name: str, mode: str, cfg: BenchmarkConfig, device: torch.device) -> _Runner:
    torch.manual_seed(0)
    memory_format = torch.channels_last if mode == 'channels_last' else torch.contiguous_format
    model = timm.create_model(name).to(device=device, memory_format=memory_format)
    if cfg.store_ca_outputs:
        set_recompute_ca_outputs(model, False)
    optimizer = create_optimizer_v2(model, 'sgd', lr=0.01, momentum=0.9)
    net = _compiled_alone(model) if mode == 'compile' else model
    # the data from a generator of its own: the global one is where each model's init left it, and the
    # CA model and its baseline must get the same images and targets (drawn on the CPU, the same on any device)
    data_rng = torch.Generator().manual_seed(0)

    def images(batch_size: int) -> torch.Tensor:
        x = torch.randn(batch_size, 3, cfg.img_size, cfg.img_size, generator=data_rng).to(device)
        return x.contiguous(memory_format=memory_format)

    def infer_fn(x: torch.Tensor) -> Callable[[], None]:
        def infer():
            with torch.inference_mode():
                net(x)
        return infer

    x_train = images(cfg.train_batch_size)
    target = torch.randint(0, model.num_classes, (cfg.train_batch_size,), generator=data_rng).to(device)

    def train():
        loss = F.cross_entropy(net(x_train), target)
        loss.backward()
        optimizer.step()
        # gradients freed at the end, so each step (and its memory peak) starts without them
        optimizer.zero_grad(set_to_none=True)

    return _Runner(model, {b: infer_fn(images(b)) for b in cfg.infer_batch_sizes}, train)


@contextmanager
def _threads(num_threads: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _pair_results(pair: Tuple[str, str], mode: str, cfg: BenchmarkConfig, device: torch.device) -> List[Result]:
    ca_name, base_name = pair
    runners = {n: _runner(n, mode, cfg, device) for n in (base_name, ca_name)}

    def set_training(training: bool) -> None:
        for r in runners.values():
            r.model.train(training)

    # (metric, unit, batch size, training mode, the timed call of each model)
    tasks = [(f'infer b{b}', 'ms' if b == 1 else 'img/s', b, False, {n: r.infer[b] for n, r in runners.items()})
             for b in cfg.infer_batch_sizes]
    tasks.append((f'train b{cfg.train_batch_size}', 'img/s', cfg.train_batch_size, True,
                  {n: r.train for n, r in runners.items()}))
    for _, _, _, training, fns in tasks:  # warm-up: compilation, allocator caches, optimizer state
        set_training(training)
        for fn in fns.values():
            fn()
            fn()
    samples = {(metric, n): [] for metric, _, _, _, _ in tasks for n in runners}
    for rnd in range(cfg.rounds):
        order = (base_name, ca_name) if rnd % 2 == 0 else (ca_name, base_name)
        for metric, unit, batch_size, training, fns in tasks:
            set_training(training)
            for n, seconds in zip(order, _time_in_turn([fns[n] for n in order], device, cfg.min_time, cfg.min_calls)):
                samples[metric, n].append(seconds * 1e3 if unit == 'ms' else batch_size / seconds)
    results = [
        Result(ca_name, base_name, mode, metric, unit,
               statistics.median(samples[metric, base_name]), statistics.median(samples[metric, ca_name]),
               tuple(samples[metric, base_name]), tuple(samples[metric, ca_name]))
        for metric, unit, _, _, _ in tasks]
    set_training(True)
    memory = {n: peak_memory(r.train, device) / 2 ** 20 for n, r in runners.items()}
    results.append(Result(
        ca_name, base_name, mode, f'train memory b{cfg.train_batch_size}', 'MiB',
        memory[base_name], memory[ca_name], (memory[base_name],), (memory[ca_name],)))
    return results


def run_benchmark(cfg: BenchmarkConfig, progress: Optional[Callable[[str], None]] = None,
                  failures: Optional[List[Failure]] = None) -> List[Result]:
    """Measure every pair in every mode of `cfg`; `progress` gets a line before each (pair, mode).

    A (pair, mode) that raises ends the run, unless `failures` is given: then it is appended there and the
    other pairs and modes are measured. With `cfg.fresh_process` (each in a spawned worker process), a
    script calling this needs an `if __name__ == '__main__':` guard, as the workers import its main module.
    """
    device = torch.device(cfg.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f'device {cfg.device!r} requested but CUDA is not available')
    measure = _in_fresh_process if cfg.fresh_process else _measure_pair
    results = []
    for pair in cfg.pairs:
        for mode in cfg.modes:
            if progress:
                progress(f'{pair[0]} vs {pair[1]}, {mode}')
            try:
                results += measure(pair, mode, cfg)
            except Exception as e:  # not KeyboardInterrupt or SystemExit: those end the run
                if failures is None:
                    raise
                failures.append(_failure(pair, mode, e))
    return results


def _failure(pair: Tuple[str, str], mode: str, e: Exception) -> Failure:
    error, message = (e.error, e.message) if isinstance(e, WorkerError) else (type(e).__name__, str(e))
    return Failure(pair[0], pair[1], mode, error, message)


def _measure_pair(pair: Tuple[str, str], mode: str, cfg: BenchmarkConfig) -> List[Result]:
    with _threads(cfg.threads):
        return _pair_results(pair, mode, cfg, torch.device(cfg.device))


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM that arrive in the block are handled when it ends, and SIGINT is blocked in the
    processes it starts, which keep the mask for good: a terminal's Ctrl-C reaches the whole process group,
    and the worker, which this process stops, would print a traceback of its own (the standard library
    starts its resource tracker so too). The mask alone would not do: any other thread of this process
    (torch starts some) takes a process-wide SIGINT, and the exception would interrupt the start halfway."""
    if not hasattr(signal, 'pthread_sigmask'):  # Windows: no signal masks
        yield
        return
    # started beforehand: the tracker's first start unblocks SIGINT in this thread when it is done, which
    # would leave the first worker open to Ctrl-C
    resource_tracker.ensure_running()
    received = []
    handled = (signal.SIGINT, signal.SIGTERM) if threading.current_thread() is threading.main_thread() else ()
    previous_handlers = {s: signal.signal(s, lambda sig, frame: received.append(sig)) for s in handled}
    previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
        for sig in received:
            signal.raise_signal(sig)  # to the handler the caller set (Ctrl-C: KeyboardInterrupt)


def _in_fresh_process(pair: Tuple[str, str], mode: str, cfg: BenchmarkConfig) -> List[Result]:
    """`_measure_pair` in a worker process spawned for it, stopped whichever way this call ends."""
    # spawned, not forked: a fork would inherit this process's heap (and its CUDA state)
    context = multiprocessing.get_context('spawn')
    receiver, sender = context.Pipe(duplex=False)
    worker = context.Process(target=_worker, args=(pair, mode, cfg, sender))
    try:
        with _signals_deferred():
            worker.start()
        sender.close()  # the worker's end is then its alone: reading it ends when the worker does
        outcome = receiver.recv()
    except EOFError:  # the worker ended without reporting
        outcome = None
    except BaseException:  # Ctrl-C, SIGTERM's SystemExit, ...: the measurement is not wanted any more
        if worker.pid is not None:
            worker.terminate()
        raise
    finally:
        sender.close()
        if worker.pid is not None:
            worker.join()
        receiver.close()
    if outcome is None:
        what = f'the worker process measuring {pair[0]} vs {pair[1]} ({mode})'
        if worker.exitcode == 1:  # an exception before `_worker` ran
            raise RuntimeError(
                f'{what} exited before measuring (code 1, its traceback above), as it does when a script calls '
                "run_benchmark without an `if __name__ == '__main__':` guard: the spawned worker imports the script")
        raise RuntimeError(f'{what} ended without a result, exit code {worker.exitcode}'
                           + (f' (signal {-worker.exitcode})' if worker.exitcode < 0 else ''))
    results, error = outcome
    if error:
        raise WorkerError(*error)
    return results


def _worker(pair: Tuple[str, str], mode: str, cfg: BenchmarkConfig, sender: Connection) -> None:
    """A worker process's run: `_measure_pair`'s results sent back, or its exception's type name, message
    and traceback (as text: not every exception survives pickling)."""
    threading.Thread(target=_exit_with_parent, daemon=True).start()
    quiet_profiler_logs()
    try:
        outcome = _measure_pair(pair, mode, cfg), None
    except Exception as e:
        outcome = None, (type(e).__name__, str(e), traceback.format_exc())
    sender.send(outcome)


def _exit_with_parent() -> None:
    """Ends this worker process as soon as its parent has ended, however (SIGKILL too): nobody is left to
    read what it measures."""
    multiprocessing.parent_process().join()
    os._exit(1)


def _op_times(fn: Callable[[], None], device: torch.device) -> Dict[str, float]:
    """Self time (ms) per op name of one call of `fn`: device time on CUDA, CPU time otherwise."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    with profile(activities=activities) as prof:
        fn()
        _sync(device)
    attr = 'self_device_time_total' if device.type == 'cuda' else 'self_cpu_time_total'
    return {e.key: getattr(e, attr) / 1e3 for e in prof.key_averages()}


# training steps before the profiled one: the heap's high-water mark moves during the first steps, and
# the op that first writes new pages pays for their faults (2-5x its time), in either model
PROFILE_WARMUP_STEPS = 3


def profile_mode(cfg: BenchmarkConfig) -> str:
    """The mode `--profile` profiles: the first of `cfg.modes` that runs eagerly (eager by default)."""
    return next((m for m in cfg.modes if m != 'compile'), 'eager')


def profile_overhead(
        pair: Tuple[str, str],
        cfg: BenchmarkConfig,
        top: int = 12,
) -> List[Tuple[str, float, float]]:
    """Where the CA model spends more than its baseline in one training step (`profile_mode(cfg)`, after
    `PROFILE_WARMUP_STEPS` steps).

    Returns the `top` ops with the largest self-time difference as (op, baseline ms, CA ms), then a
    ('total', ...) row.
    """
    device = torch.device(cfg.device)
    with _threads(cfg.threads):
        runners = {n: _runner(n, profile_mode(cfg), cfg, device) for n in pair}
        times = {}
        for n, r in runners.items():
            r.model.train()
            for _ in range(PROFILE_WARMUP_STEPS):
                r.train()
            times[n] = _op_times(r.train, device)
    ca, base = (times[n] for n in pair)
    ops = sorted(set(ca) | set(base), key=lambda k: base.get(k, 0.) - ca.get(k, 0.))[:top]
    rows = [(op, base.get(op, 0.), ca.get(op, 0.)) for op in ops]
    return rows + [('total', sum(base.values()), sum(ca.values()))]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool, left: int = 3) -> str:
    """Aligned text or markdown table; the first `left` columns are left-aligned, the rest right-aligned."""
    cells = [list(header)] + [list(r) for r in rows]
    if markdown:
        lines = ['| ' + ' | '.join(c) + ' |' for c in cells]
        lines.insert(1, '|' + '|'.join('---' if i < left else '---:' for i in range(len(header))) + '|')
        return '\n'.join(lines)
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    lines = ['  '.join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in cells]
    lines.insert(1, '-' * len(lines[0]))
    return '\n'.join(lines)


RESULT_HEADER = ('pair (CA / baseline)', 'mode', 'metric', 'unit', 'baseline', 'CA', 'CA/baseline', 'rounds',
                 'overhead', 'goal')


def _environment(cfg: BenchmarkConfig) -> str:
    device = torch.device(cfg.device)
    return (f'torch {torch.__version__}, {device.type}'
            + (f' ({torch.cuda.get_device_name(device)})' if device.type == 'cuda' else '')
            + f', {cfg.threads} threads, {cfg.img_size}x{cfg.img_size}, medians of {cfg.rounds} rounds, '
            + 'calls in turn (median call per sample)'
            + (', each pair and mode in a fresh process' if cfg.fresh_process else '')
            + (', CA outputs held for backward' if cfg.store_ca_outputs else ''))


def results_dict(results: Sequence[Result], cfg: BenchmarkConfig, command: Optional[str] = None) -> Dict:
    """Everything `format_results` shows, JSON-ready, with each result's per-round samples."""
    return {
        'command': command or cfg.command(), 'environment': _environment(cfg), 'config': asdict(cfg),
        'results': [dict(asdict(r), ratio=r.ratio, round_ratios=r.round_ratios, overhead=r.overhead, goal=r.goal,
                         met=r.met) for r in results],
    }


def format_results(results: Sequence[Result], cfg: BenchmarkConfig, fmt: str = 'text',
                   command: Optional[str] = None) -> str:
    """Results as a text or markdown table (with the command line and environment) or as JSON."""
    if fmt == 'json':
        return json.dumps(results_dict(results, cfg, command), indent=2)
    if fmt not in FORMATS:
        raise ValueError(f'format must be one of {FORMATS}, got {fmt!r}')
    rows = [(f'{r.ca_model} / {r.baseline}', r.mode, r.metric, r.unit,
             f'{r.baseline_value:.2f}', f'{r.ca_value:.2f}', f'{r.ratio:.3f}',
             f'{min(r.round_ratios):.3f}-{max(r.round_ratios):.3f}', f'{r.overhead:+.1%}',
             f'<= {r.goal:.0%} ' + ('met' if r.met else 'MISSED'))
            for r in results]
    met = sum(r.met for r in results)
    return '\n'.join([
        f'command: {command or cfg.command()}', _environment(cfg), '',
        _table(RESULT_HEADER, rows, markdown=fmt == 'markdown'), '',
        f'goals met: {met} of {len(results)}. CA/baseline is the ratio of the medians; rounds, the lowest and highest '
        f'CA/baseline of the rounds\' own samples (taken next to each other); overhead is the extra time '
        f'(for img/s: baseline/CA - 1) or memory of CA. Memory: peak bytes torch allocates during one training '
        f'step and holds at once (parameters, optimizer state and batch, allocated before it, not counted).',
    ])


def format_profile(
        pair: Tuple[str, str],
        rows: Sequence[Tuple[str, float, float]],
        markdown: bool = False,
        mode: str = 'eager',
) -> str:
    header = ('op', 'baseline ms', 'CA ms', 'CA - baseline ms')
    body = [(op, f'{b:.2f}', f'{c:.2f}', f'{c - b:+.2f}') for op, b, c in rows]
    return (f'self time per op, one {mode} training step after {PROFILE_WARMUP_STEPS} warm-up steps: '
            f'{pair[0]} vs {pair[1]}\n' + _table(header, body, markdown, left=1))


def _pair(text: str) -> Tuple[str, str]:
    ca, sep, base = text.partition(':')
    if not sep or not ca or not base:
        raise argparse.ArgumentTypeError(f'expected CA_MODEL:BASELINE, got {text!r}')
    return ca, base


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's options, shared by the CLI subcommand and the script in benchmarks/."""
    d = BenchmarkConfig()
    parser.add_argument(
        '--pairs', nargs='+', type=_pair, metavar='CA:BASELINE',
        help='pairs to compare (default: ' + ' '.join(f'{ca}:{base}' for ca, base in d.pairs) + ')')
    parser.add_argument(
        '--img-size', type=int, default=d.img_size, metavar='N', help='image size (default: %(default)s)')
    parser.add_argument(
        '--infer-batch-sizes', nargs='+', type=int, default=list(d.infer_batch_sizes), metavar='N',
        help='inference batch sizes; batch 1 is reported as latency, larger ones as throughput (default: 1 32)')
    parser.add_argument(
        '--train-batch-size', type=int, default=d.train_batch_size, metavar='N',
        help='training-step batch size (default: %(default)s)')
    parser.add_argument(
        '--rounds', type=int, default=d.rounds, metavar='N',
        help='interleaved rounds; medians are reported (default: %(default)s)')
    parser.add_argument(
        '--min-time', type=float, default=d.min_time, metavar='SECONDS',
        help="seconds each model runs in a timed sample; the models' calls alternate (default: %(default)s)")
    parser.add_argument(
        '--min-calls', type=int, default=d.min_calls, metavar='N',
        help="calls of each model a timed sample takes at least, whatever --min-time; the sample is their median "
             '(default: %(default)s)')
    parser.add_argument(
        '--modes', nargs='+', choices=MODES, default=list(d.modes), metavar='MODE',
        help=f'execution modes among {", ".join(MODES)}; compile is slow to warm up (default: eager channels_last)')
    parser.add_argument(
        '--threads', type=int, default=d.threads, metavar='N', help='torch threads (default: %(default)s)')
    parser.add_argument('--device', default=d.device, help='cpu or cuda[:N] (default: %(default)s)')
    parser.add_argument(
        '--store-ca-outputs', action='store_true',
        help='the CA models hold their CA outputs for backward (timm_coordatt.set_recompute_ca_outputs(model, '
             'False)) instead of recomputing them, as they do by default')
    parser.add_argument(
        '--one-process', action='store_true',
        help='measure every pair and mode in this process, not each in a fresh one (what ran before moves the '
             "training rows: glibc's heap)")
    parser.add_argument('--format', choices=FORMATS, default='text', help='output format (default: %(default)s)')
    parser.add_argument(
        '--profile', action='store_true',
        help='also print the ops where each CA model spends more time than its baseline (a training step in the '
             'first of --modes that runs eagerly)')


@contextmanager
def sigterm_exits() -> Iterator[None]:
    """SIGTERM (`kill`, `timeout`, a job scheduler's stop) unwinds like Ctrl-C: worker processes stop, temporary
    files go. Off the main thread (the CLI's `main` called from a worker thread) the host's handling stays: Python
    runs signal handlers in the main thread only."""
    def stop(signum, frame):
        raise SystemExit(128 + signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_from_args(args: argparse.Namespace, prog: str) -> int:
    """Run the benchmark described by parsed `add_arguments` options and print the results: 0, or 1 if a
    (pair, mode) failed (each named on stderr, the others' results printed), 2 for bad options."""
    quiet_profiler_logs()
    try:
        cfg = BenchmarkConfig(
            pairs=tuple(args.pairs) if args.pairs else default_pairs(), img_size=args.img_size,
            infer_batch_sizes=tuple(args.infer_batch_sizes), train_batch_size=args.train_batch_size,
            rounds=args.rounds, min_time=args.min_time, min_calls=args.min_calls, modes=tuple(args.modes),
            threads=args.threads,
            device=args.device, store_ca_outputs=args.store_ca_outputs, fresh_process=not args.one_process)
    except ValueError as e:
        print(f'{prog}: error: {e}', file=sys.stderr)
        return 2
    failures: List[Failure] = []
    profiles = {}
    try:
        with sigterm_exits():
            results = run_benchmark(cfg, lambda line: print(f'[{line}]', file=sys.stderr, flush=True), failures)
            for pair in cfg.pairs if args.profile else ():
                try:
                    profiles[pair] = profile_overhead(pair, cfg)
                except Exception as e:
                    failures.append(_failure(pair, 'profile', e))
    except ValueError as e:  # before any measurement: CUDA asked for, not available
        print(f'{prog}: error: {e}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f'{prog}: interrupted', file=sys.stderr)
        return 130
    command = cfg.command(prog) + (' --profile' if args.profile else '') + f' --format {args.format}'
    if args.format == 'json':
        doc = results_dict(results, cfg, command)
        if profiles:
            doc['profile'] = {f'{ca}:{base}': [dict(op=op, baseline_ms=b, ca_ms=c) for op, b, c in rows]
                              for (ca, base), rows in profiles.items()}
        doc['failures'] = [asdict(f) for f in failures]
        print(json.dumps(doc, indent=2))
    else:
        print(format_results(results, cfg, args.format, command))
        for pair, rows in profiles.items():
            print()
            print(format_profile(pair, rows, markdown=args.format == 'markdown', mode=profile_mode(cfg)))
    for failure in failures:
        print(f'{prog}: error: {failure}', file=sys.stderr)
    return 1 if failures else 0
