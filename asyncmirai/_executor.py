"""``am.executor()``: a ``concurrent.futures.Executor`` over a compute profile.

So ``loop.run_in_executor(am.executor(), fn, x)``, ``executor.map`` and libraries that
accept an executor run their work on daemons.  The standard contract holds:

* ``future.result()`` raises the call's own exception type (the ``am.MiraiError`` it
  raises is also an instance of the original class);
* ``running()`` is true once the call is on a daemon, and ``cancel()`` then returns False
  (running calls are not interrupted; ``am.mirai`` handles keep their interrupting
  ``cancel()``);
* the program does not exit while futures are pending, even after ``shutdown(wait=False)``
  (as ``ThreadPoolExecutor``): they finish before the profiles are reset at exit;
* after interpreter shutdown, ``submit`` raises the standard ``RuntimeError``.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from ._errors import MiraiCancelled
from ._handle import Mirai

__all__ = ["MiraiExecutor", "executor"]

T = TypeVar("T")

_executors: weakref.WeakSet[MiraiExecutor] = weakref.WeakSet()
_global_lock = threading.Lock()
_interpreter_shutdown = False
_hook_installed = False


def _at_threading_exit() -> None:
    """Before atexit handlers (which reset the profiles): let pending futures finish."""
    global _interpreter_shutdown
    with _global_lock:
        _interpreter_shutdown = True
        live = list(_executors)
    for ex in live:
        ex._wait_pending()


def _install_hook() -> None:
    global _hook_installed
    with _global_lock:
        if _hook_installed:
            return
        _hook_installed = True
    # What concurrent.futures.thread uses: runs when the main thread finishes, before
    # atexit callbacks, so the daemons are still there to finish the work.
    threading._register_atexit(_at_threading_exit)  # type: ignore[attr-defined]


class _Future(cf.Future[T]):
    """A concurrent Future backed by a mirai (see module doc)."""

    _mirai: Mirai[Any] | None = None

    def running(self) -> bool:
        if super().running():
            return True
        m = self._mirai
        return m is not None and not super().done() and m.state == "running"

    def cancel(self) -> bool:
        m = self._mirai
        if m is not None and not super().done() and m.state == "running":
            return False  # running calls cannot be cancelled (the Executor contract)
        return super().cancel()

    def result(self, timeout: float | None = None) -> T:
        if not self.done() and self._mirai is not None:
            self._mirai._check_not_dispatcher_thread()
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if not self.done() and self._mirai is not None:
            self._mirai._check_not_dispatcher_thread()
        return super().exception(timeout)


class MiraiExecutor(cf.Executor):
    """An Executor whose work items are mirai on the ``compute`` profile's daemons."""

    def __init__(self, compute: str | None = None) -> None:
        from ._api import _name

        self.compute = _name(compute)  # the current profile (am.using) when None
        self._shutdown = False
        self._lock = threading.Lock()
        self._live: dict[cf.Future[Any], Mirai[Any]] = {}
        _install_hook()
        with _global_lock:
            _executors.add(self)

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> cf.Future[T]:
        """Run ``fn(*args, **kwargs)`` on a daemon; return a concurrent Future.

        Raises:
            RuntimeError: after :meth:`shutdown`, or after interpreter shutdown.
        """
        from ._api import mirai

        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if _interpreter_shutdown:
                raise RuntimeError("cannot schedule new futures after interpreter shutdown")
        m = mirai(fn, *args, _compute=self.compute, **kwargs)
        fut: _Future[T] = _Future()
        fut._mirai = m
        with self._lock:
            self._live[fut] = m

        def on_mirai(h: Mirai[Any]) -> None:
            with self._lock:
                self._live.pop(fut, None)
            if h.cancelled():
                fut.cancel()
                return
            if not fut.set_running_or_notify_cancel():
                return
            exc = h.exception()
            if exc is None:
                fut.set_result(h.result())
            else:
                fut.set_exception(exc)

        def on_future(f: cf.Future[Any]) -> None:
            if f.cancelled():
                m.cancel()

        fut.add_done_callback(on_future)
        m.add_done_callback(on_mirai)
        return fut

    def _wait_pending(self) -> None:
        with self._lock:
            live = list(self._live)
        for fut in live:
            try:
                fut.exception()
            except (cf.CancelledError, MiraiCancelled, RuntimeError):
                pass

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting work; with ``cancel_futures`` cancel queued calls; with ``wait``
        block until pending calls finish.  Without ``wait``, pending calls still finish
        before the program exits."""
        with self._lock:
            self._shutdown = True
            live = list(self._live.items())
        if cancel_futures:
            for fut, m in live:
                if m.state == "queued":
                    fut.cancel()
        if wait:
            self._wait_pending()


def executor(compute: str | None = None) -> MiraiExecutor:
    """Return a ``concurrent.futures.Executor`` that runs work on the profile's daemons
    (default: the current profile, see ``am.using``)."""
    return MiraiExecutor(compute)
