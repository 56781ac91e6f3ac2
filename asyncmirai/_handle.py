"""``Mirai``: the awaitable handle of one task, resolved exactly once.

A handle is resolved on the dispatcher's thread and may be awaited from any asyncio or
trio loop on any thread, or waited on with ``.result()`` from plain threads.  The first
resolution wins (value, error, timeout or cancel); every later one is ignored, which is
what makes "a cancel racing completion resolves one way only" true.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Callable, Generator
from typing import Any, Generic, Protocol, TypeVar

from ._errors import MiraiCancelled

_get_running_loop = asyncio.events._get_running_loop

__all__ = ["HandleOwner", "Mirai"]

T = TypeVar("T")

PENDING, VALUE, ERROR, CANCELLED = 0, 1, 2, 3

# One lock for all handles: held for a few instructions, never while calling out.
_LOCK = threading.Lock()

#: Set while a task's arguments are encoded: handles met at any depth that have no value
#: yet (or failed) are collected here, so the task waits for them (futures as arguments).
ARGUMENT_HANDLES: contextvars.ContextVar[list[Mirai[Any]] | None] = contextvars.ContextVar(
    "asyncmirai_argument_handles", default=None
)


def _set_future(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class HandleOwner(Protocol):
    """Whoever runs the work behind a handle (a profile): the handle knows only this."""

    #: The event loop that resolves the handles (None: no loop, sync mode).
    loop: Any

    def cancel(self, handle: Mirai[Any]) -> bool:
        """Cancel the work; True if this call resolved the handle as cancelled."""

    def check_may_block(self) -> None:
        """Raise RuntimeError if blocking here could never see the handle resolve."""

    def state(self, handle: Mirai[Any]) -> str:
        """``"queued"`` or ``"running"`` for a pending handle."""

    def wait(self, handle: Mirai[Any], timeout: float | None) -> bool:
        """Block until the handle resolves (maybe doing the I/O that resolves it);
        False if ``timeout`` seconds passed first."""

    def watch(self, handle: Mirai[Any], loop: Any) -> Callable[[], None] | None:
        """While ``loop`` awaits the handle, let it do the I/O that resolves it (when
        that loop is not the owner's); returns what ends that, or None."""


class Mirai(Generic[T]):
    """Handle of a task running on a daemon: ``await`` it, or call :meth:`result`.

    Awaiting works from asyncio and trio, from the loop that started the profile and from
    other loops and threads.  Cancelling the awaiting task cancels the task on the daemon.
    """

    __slots__ = ("id", "_state", "_value", "_callbacks", "_owner", "_job", "__weakref__")

    def __init__(self, id: int, owner: HandleOwner | None = None, job: Any = None) -> None:
        self.id = id
        self._state = PENDING
        self._value: Any = None
        # Created on the first callback: most handles are awaited once or never.
        self._callbacks: list[Callable[[Mirai[Any]], None]] | None = None
        self._owner = owner
        self._job = job  # the owner's record of the work (opaque here)

    def __repr__(self) -> str:
        state = ("pending", "resolved", "errored", "cancelled")[self._state]
        return f"<Mirai id={self.id} {state}>"

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """As a task's argument, a handle travels as its value (futures as arguments)."""
        from ._call import identity

        deps = ARGUMENT_HANDLES.get()
        if deps is not None:
            deps.append(self)
        if self._state == VALUE:
            return (identity, (self._value,))
        if deps is None:
            raise TypeError(
                f"{self!r} has no value to send: pass it as an argument of am.mirai(), "
                "am.submit() or am.mirai_map() (the task then waits for it), or await it"
            )
        return (identity, (None,))  # a placeholder: encoded again once it resolves

    # -- resolution (owner side) ---------------------------------------------------
    def _resolve(self, state: int, value: Any) -> bool:
        """Resolve once; returns False (and changes nothing) if already resolved."""
        with _LOCK:
            if self._state != PENDING:
                return False
            self._state = state
            self._value = value
            callbacks = self._callbacks
            self._callbacks = None
        self._job = None
        if callbacks:
            for cb in callbacks:
                try:
                    cb(self)
                except Exception:  # a waiter's loop may be closed: not our problem
                    pass
        return True

    def add_done_callback(self, fn: Callable[[Mirai[T]], None]) -> None:
        """Call ``fn(self)`` once resolved (at once if already), on the resolving thread."""
        with _LOCK:
            if self._state == PENDING:
                if self._callbacks is None:
                    self._callbacks = [fn]
                else:
                    self._callbacks.append(fn)
                return
        fn(self)

    # -- inspection ----------------------------------------------------------------
    def done(self) -> bool:
        """True once the task has a value, an error, or was cancelled."""
        return self._state != PENDING

    def cancelled(self) -> bool:
        """True if the task was cancelled."""
        return self._state == CANCELLED

    def _outcome(self) -> T:
        state = self._state
        if state == VALUE:
            return self._value  # type: ignore[no-any-return]
        if state == CANCELLED:
            raise MiraiCancelled(f"mirai {self.id} was cancelled")
        raise self._value

    @property
    def state(self) -> str:
        """``"queued"``, ``"running"`` (on a daemon) or ``"done"``."""
        if self._state != PENDING:
            return "done"
        owner = self._owner
        return "queued" if owner is None else owner.state(self)

    def _check_not_dispatcher_thread(self) -> None:
        owner = self._owner
        if owner is not None:
            owner.check_may_block()

    def result(self, timeout: float | None = None) -> T:
        """Block until resolved and return the value (for sync code and other threads).

        Raises:
            MiraiError: the function raised on the daemon.
            DaemonError: the daemon died or the profile was reset.
            MiraiTimeout: the task's ``_timeout`` elapsed.
            MiraiCancelled: the task was cancelled.
            TimeoutError: ``timeout`` elapsed first (the task goes on).
            RuntimeError: called on the dispatcher's own loop thread (would deadlock).
        """
        if self._state == PENDING:
            owner = self._owner
            if owner is not None:
                owner.check_may_block()
                resolved = owner.wait(self, timeout)
            else:
                event = threading.Event()
                self.add_done_callback(lambda _: event.set())
                resolved = event.wait(timeout)
            if not resolved:
                raise TimeoutError(f"mirai {self.id} not resolved within {timeout} s")
        return self._outcome()

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """Wait like :meth:`result`; return the error instead of raising it (None if ok).

        Raises:
            MiraiCancelled: the task was cancelled.
        """
        try:
            self.result(timeout)
        except TimeoutError as exc:
            if self._state == PENDING:
                raise
            return exc
        except MiraiCancelled as exc:
            if self._state == CANCELLED:
                raise
            # An error that is also a MiraiCancelled (a chained task whose argument was
            # cancelled, a function that raised it): this task was not cancelled.
            return exc
        except Exception as exc:
            return exc
        return None

    def cancel(self) -> bool:
        """Cancel the task: dequeue it, or interrupt it on its daemon (which survives).

        Returns True if this call cancelled it, False if it had already resolved.
        """
        if self._state != PENDING:
            return False
        owner = self._owner
        if owner is None:
            return self._resolve(CANCELLED, None)
        return owner.cancel(self)

    # -- awaiting ------------------------------------------------------------------
    def __await__(self) -> Generator[Any, None, T]:
        if self._state == PENDING:
            loop = _get_running_loop()
            try:
                if loop is not None:  # asyncio: wait on a future of the awaiting loop
                    fut = loop.create_future()
                    tid = threading.get_ident()

                    def wake(_: Mirai[Any]) -> None:
                        if threading.get_ident() == tid:
                            _set_future(fut)
                        else:
                            loop.call_soon_threadsafe(_set_future, fut)

                    self.add_done_callback(wake)
                    owner = self._owner
                    unwatch = None
                    if owner is not None and loop is not owner.loop and self._state == PENDING:
                        unwatch = owner.watch(self, loop)  # another loop awaits
                    try:
                        yield from fut
                    finally:
                        if unwatch is not None:
                            unwatch()
                else:
                    yield from self._wait_other().__await__()
            except BaseException:
                # The awaiting task was cancelled (or interrupted): cancel the work too.
                if self._state == PENDING:
                    self.cancel()
                raise
        if self._state == CANCELLED and _get_running_loop() is not None:
            raise asyncio.CancelledError(f"mirai {self.id} was cancelled")
        return self._outcome()

    async def _wait_other(self) -> None:
        import sniffio

        lib = sniffio.current_async_library()
        if lib != "trio":  # pragma: no cover - other anyio backends
            raise RuntimeError(f"cannot await a Mirai from {lib!r}")
        await self._wait_trio()

    async def _wait_trio(self) -> None:
        import trio

        token = trio.lowlevel.current_trio_token()
        event = trio.Event()

        def wake(_: Mirai[Any]) -> None:
            try:
                token.run_sync_soon(event.set)
            except trio.RunFinishedError:
                pass

        self.add_done_callback(wake)
        await event.wait()
