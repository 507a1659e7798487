"""Stopping a long run when asked, at a step boundary, with nothing lost.

A cluster scheduler (or ``kill``) ends a job with SIGTERM; a person at a terminal presses
Ctrl-C (SIGINT). By default either ends the process where it stands, and a run resumes from its
last checkpoint: up to ``checkpoint_every`` outer steps are trained again. Inside
:func:`stop_requests` the first such signal only sets a flag; the trainer finishes the outer step
it is in, writes its checkpoint and raises :class:`TrainingStopped`. A second signal acts at
once, as it would have without kshot (for a step that takes too long).

Python delivers signals to the main thread only, so elsewhere (and for a signal the process
ignores, as a shell's ``cmd &`` ignores SIGINT) nothing is installed.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

from kshot.errors import TrainingStopped

__all__ = ["STOP_SIGNALS", "StopRequest", "TrainingStopped", "stop_requests"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Whether a stop was asked for, and by which signal."""

    def __init__(self) -> None:
        self.signal_number: int | None = None

    @property
    def requested(self) -> bool:
        return self.signal_number is not None

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signal_number).name if self.signal_number is not None else ""


@contextlib.contextmanager
def stop_requests(enabled: bool = True) -> Iterator[StopRequest]:
    """A context in which SIGTERM and SIGINT ask for a stop instead of ending the process."""
    request = StopRequest()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous: dict[int, object] = {}

    def ask(signum, frame):
        if request.requested:  # the second time: what the signal did before
            signal.signal(signum, previous[signum])
            signal.raise_signal(signum)
            return
        request.signal_number = signum

    for signum in STOP_SIGNALS:
        current = signal.getsignal(signum)
        if current is signal.SIG_IGN or current is None:
            continue
        previous[signum] = current
        signal.signal(signum, ask)
    try:
        yield request
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
