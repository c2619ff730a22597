""" What the A/B scripts in benchmarks/ share (benchmarks/in_turn.py): the order in which calls are timed. """
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
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
