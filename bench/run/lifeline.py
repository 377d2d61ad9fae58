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
TIED_PID_ENV = "BENCH_TIED_PID"  # the pid of a command started by tied_command


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


def main(argv: list[str]) -> int:
    """`python -m bench.run.lifeline PARENT_PID SIGNAL COMMAND...`: run COMMAND (exec'd in this
    process) so that it receives SIGNAL when PARENT_PID, the caller, is gone."""
    parent_pid, signum, command = int(argv[0]), int(argv[1]), argv[2:]
    # The death signal survives exec, so it guards a program we cannot edit (torchrun);
    # the watchdog thread of other platforms would not, and there the command runs untied.
    _set_parent_death_signal(signum)
    if os.getppid() != parent_pid:
        return 128 + signum  # the caller died before the tie: do not start the command
    # exec keeps the pid: the command's own children can tie themselves to it by this pid
    # without trusting os.getppid(), which reads 1 once the command has died.
    os.environ[TIED_PID_ENV] = str(os.getpid())
    os.execvp(command[0], command)
    return 127  # not reached: execvp replaces this process or raises


def tied_command(command: list[str], signum: int = signal.SIGTERM) -> list[str]:
    """command, wrapped to receive signum when this process (its launcher) is gone."""
    return [sys.executable, "-m", "bench.run.lifeline", str(os.getpid()), str(int(signum)),
            *command]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
