"""Worker processes that end with their parent.

Caches are decoded by a pool of processes. If the parent is killed (SIGKILL, the OOM killer, a
closed terminal), the workers of a plain ``ProcessPoolExecutor`` wait for work forever: the
queue they read stays open because they hold its other end themselves. :func:`worker_pool` gives
workers bound to their parent: on Linux the kernel kills them when it dies
(``PR_SET_PDEATHSIG``), and everywhere a thread in each worker ends it once the parent is gone.

Workers never keep a cache locked either way: :func:`kshot.services.files.file_lock` is a POSIX
record lock, which belongs to its process and is not inherited by children.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor

#: Seconds between a worker's checks that its parent still runs (where the kernel cannot tell it).
PARENT_CHECK_SECONDS = 0.5


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """A process pool of ``workers`` processes that end when this process ends."""
    context = None
    if sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods():
        # Workers are this process's own children (a fork server's would be the server's).
        context = multiprocessing.get_context("fork")
    return ProcessPoolExecutor(workers, mp_context=context, initializer=bind_to_parent,
                               initargs=(os.getpid(),))


def bind_to_parent(parent: int) -> None:
    """Run in a new worker: end it when process ``parent`` ends."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # it died before the line above took effect
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="kshot-parent-watch").start()


def _watch_parent(parent: int) -> None:
    while True:
        time.sleep(PARENT_CHECK_SECONDS)
        if os.getppid() != parent:
            os._exit(1)
