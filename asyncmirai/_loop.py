"""The event loop a profile's dispatcher runs on: borrowed, or owned on a private thread.

When ``daemons()`` is called inside a running loop, the dispatcher lives on that loop
(lowest latency: no thread between the caller and the sockets).  Otherwise (plain
scripts, trio programs, worker threads) it gets a private asyncio loop on a daemon
thread.  Either way everything the dispatcher owns is touched on that loop's thread
only; :meth:`LoopOwner.on_loop` hops there from anywhere else.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable
from typing import TypeVar

from ._threads import start_thread

__all__ = ["LoopOwner"]

R = TypeVar("R")


class LoopOwner:
    """Borrows the running loop, or starts a private one on a thread (see module doc)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.thread: threading.Thread | None = None
        self.thread_id = 0
        self.loop: asyncio.AbstractEventLoop
        try:
            self.loop = asyncio.get_running_loop()
            self.thread_id = threading.get_ident()
            return
        except RuntimeError:
            pass
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            self.thread_id = threading.get_ident()
            asyncio.set_event_loop(self.loop)
            self.loop.call_soon(ready.set)
            self.loop.run_forever()

        self.thread = start_thread(run, name=f"asyncmirai-{name}")
        ready.wait()

    def on_thread(self) -> bool:
        """True on the loop's thread."""
        return threading.get_ident() == self.thread_id

    def is_dispatcher_thread(self) -> bool:
        """True on the loop's thread while the loop runs (blocking there would deadlock)."""
        return threading.get_ident() == self.thread_id and self.loop.is_running()

    def on_loop(self, fn: Callable[[], R]) -> R:
        """Run ``fn`` on the loop's thread and return its result (blocking)."""
        loop = self.loop
        if self.on_thread() or not loop.is_running() or loop.is_closed():
            return fn()
        fut: concurrent.futures.Future[R] = concurrent.futures.Future()

        def call() -> None:
            try:
                fut.set_result(fn())
            except BaseException as exc:
                fut.set_exception(exc)

        loop.call_soon_threadsafe(call)
        return fut.result()

    def check_open(self) -> None:
        """Raise a clear error once the borrowed loop has closed."""
        if self.loop.is_closed():
            raise RuntimeError(
                f"the event loop that compute profile {self.name!r} was started on has "
                "closed; reset it with am.daemons(0) (or use `async with am.daemons(n)`), "
                "then start daemons again"
            )

    def stop(self) -> None:
        """Stop and close a private loop (from another thread); a borrowed one is left."""
        thread = self.thread
        if thread is None or thread is threading.current_thread():
            return
        try:
            self.loop.call_soon_threadsafe(self.loop.stop)
        except RuntimeError:  # closed already
            return
        thread.join(5)
        self.loop.close()
