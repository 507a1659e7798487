"""A first SIGTERM or SIGINT inside stop_requests asks for a stop; a second acts as before."""

from __future__ import annotations

import os
import signal

import pytest

from kshot.errors import TrainingStopped
from kshot.services.stopping import stop_requests


def test_first_signal_asks_second_acts_and_handlers_are_restored():
    # Python's own Ctrl-C handler, whatever this process inherited (a job started with `&`
    # ignores SIGINT: the next test).
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        with stop_requests() as request:
            assert not request.requested
            os.kill(os.getpid(), signal.SIGINT)
            assert request.requested and request.signal_name == "SIGINT"
            with pytest.raises(KeyboardInterrupt):  # the second Ctrl-C: Python's own handler
                os.kill(os.getpid(), signal.SIGINT)
        assert {s: signal.getsignal(s) for s in before} == before
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_a_signal_the_process_ignores_stays_ignored():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a shell's `cmd &` starts a job
    try:
        with stop_requests() as request:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)
            assert not request.requested
    finally:
        signal.signal(signal.SIGINT, previous)


def test_disabled_installs_nothing():
    before = signal.getsignal(signal.SIGTERM)
    with stop_requests(enabled=False) as request:
        assert signal.getsignal(signal.SIGTERM) is before and not request.requested


def test_a_stop_exits_with_the_signals_status():
    assert TrainingStopped("stopped", signal.SIGTERM).exit_status == 143
