"""Our threads leave the program's signals to its main thread.

Python runs signal handlers in the main thread, but the kernel delivers a process-directed
signal (``kill``, Ctrl-C, a job scheduler's SIGTERM) to *any* thread that does not block
it.  When that is one of our background threads, the main thread is not interrupted: a
program blocked in ``sys.stdin.read()``, ``lock.acquire()`` or ``select()`` does not run
its SIGTERM or SIGINT handler until the call returns on its own, which may be never.  (CI
caught exactly this: a host program's SIGTERM handler did not run because the signal
landed on the dispatcher thread.)

So every thread asyncmirai starts for itself blocks the asynchronous signals, as
libzmq's own I/O threads do, and the kernel picks the main thread.  Threads that run
*user* code (the daemon's coroutine thread, ``asyncio.run`` for a coroutine called from
sync code) are left alone: what they start would inherit the mask.

A child inherits the signal mask of the thread that forks it, so the child processes we
start from those threads (daemons, ``ssh``, ``sbatch``) go through :func:`popen`, which
unblocks the signals for the child: a daemon with SIGTERM blocked could not be stopped.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import subprocess

#: Process-directed signals a program may handle; synchronous ones (SIGSEGV, SIGFPE,
#: SIGPIPE) go to the faulting thread whatever the mask, and blocking them only hurts.
ASYNC_SIGNALS: frozenset[signal.Signals] = frozenset(
    getattr(signal, name)
    for name in (
        "SIGINT",
        "SIGTERM",
        "SIGHUP",
        "SIGQUIT",
        "SIGUSR1",
        "SIGUSR2",
        "SIGALRM",
        "SIGCHLD",
        "SIGWINCH",
    )
    if hasattr(signal, name)
)


@contextlib.contextmanager
def signals_blocked() -> Iterator[None]:
    """Block :data:`ASYNC_SIGNALS` in this thread inside the block.

    Threads started inside inherit the mask (the way to wrap a library's own
    ``start()``, such as pyzmq's ``ThreadAuthenticator``).
    """
    old = signal.pthread_sigmask(signal.SIG_BLOCK, ASYNC_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def start_thread(
    target: Callable[..., object],
    *,
    name: str,
    args: tuple[Any, ...] = (),
    daemon: bool = True,
) -> threading.Thread:
    """Start a thread of ours: one that never receives the program's signals."""
    t = threading.Thread(target=target, name=name, args=args, daemon=daemon)
    with signals_blocked():
        t.start()
    return t


def popen(*args: Any, **kwargs: Any) -> subprocess.Popen[Any]:
    """``subprocess.Popen`` whose child starts with :data:`ASYNC_SIGNALS` unblocked."""
    import subprocess  # here: daemons import this module and never start processes

    old = signal.pthread_sigmask(signal.SIG_UNBLOCK, ASYNC_SIGNALS)
    try:
        return subprocess.Popen(*args, **kwargs)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
