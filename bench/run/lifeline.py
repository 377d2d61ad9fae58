"""Tie a child process's life to its parent's, and turn SIGTERM into the Ctrl-C path."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time
from typing import Iterator

PR_SET_PDEATHSIG = 1  # linux/prctl.h
WATCH_INTERVAL_S = 0.5


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: handled wherever Ctrl-C is (workers ended, the run left resumable)."""


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises Terminated; the previous handler is restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def interrupt(signum, frame):
        raise Terminated(f"terminated by {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def die_with_parent(parent_pid: int, signum: int = signal.SIGKILL) -> str:
    """End this process with signum once parent_pid is no longer its parent; returns how
    that is watched ("prctl" or "thread").

    parent_pid comes from the parent itself (not os.getppid() here): a parent that died
    before this call has already handed the child to init, and that must count as gone."""
    how = "prctl" if _set_parent_death_signal(signum) else _start_watchdog(parent_pid, signum)
    # The kernel only signals deaths after prctl: one before it shows as a changed parent.
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signum)
    return how


def _set_parent_death_signal(signum: int) -> bool:
    """Linux: the kernel sends signum when the thread that forked us exits; False elsewhere."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _start_watchdog(parent_pid: int, signum: int) -> str:
    """A daemon thread that polls the parent pid (where prctl is not available)."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(WATCH_INTERVAL_S)
        os.kill(os.getpid(), signum)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()
    return "thread"
