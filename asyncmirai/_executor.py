"""``am.executor()``: a ``concurrent.futures.Executor`` over a compute profile.

So ``loop.run_in_executor(am.executor(), fn, x)``, ``executor.map`` and libraries that
accept an executor run their work on daemons.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from ._errors import MiraiCancelled
from ._handle import CANCELLED, VALUE, Mirai

__all__ = ["MiraiExecutor", "executor"]

T = TypeVar("T")


class _Future(cf.Future[T]):
    """A concurrent Future that refuses to block the dispatcher's own loop thread."""

    _mirai: Mirai[Any] | None = None

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

    def __init__(self, compute: str = "default") -> None:
        self.compute = compute
        self._shutdown = False
        self._lock = threading.Lock()
        self._live: dict[cf.Future[Any], Mirai[Any]] = {}

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> cf.Future[T]:
        """Run ``fn(*args, **kwargs)`` on a daemon; return a concurrent Future."""
        from ._api import mirai

        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
        m = mirai(fn, *args, _compute=self.compute, **kwargs)
        fut: _Future[T] = _Future()
        fut._mirai = m
        with self._lock:
            self._live[fut] = m

        def on_mirai(h: Mirai[Any]) -> None:
            with self._lock:
                self._live.pop(fut, None)
            if h._state == CANCELLED:
                fut.cancel()
                return
            if not fut.set_running_or_notify_cancel():
                return
            if h._state == VALUE:
                fut.set_result(h._value)
            else:
                fut.set_exception(h._value)

        def on_future(f: cf.Future[Any]) -> None:
            if f.cancelled():
                m.cancel()

        fut.add_done_callback(on_future)
        m.add_done_callback(on_mirai)
        return fut

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting work; with ``cancel_futures`` cancel queued tasks; maybe wait."""
        with self._lock:
            self._shutdown = True
            live = list(self._live.items())
        if cancel_futures:
            for fut, m in live:
                if m.state == "queued":
                    fut.cancel()
        if wait:
            for fut, _ in live:
                try:
                    fut.exception()
                except (cf.CancelledError, MiraiCancelled):
                    pass


def executor(compute: str = "default") -> MiraiExecutor:
    """Return a ``concurrent.futures.Executor`` that runs work on the profile's daemons."""
    return MiraiExecutor(compute)
