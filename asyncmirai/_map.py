"""Many tasks at once: ``mirai_map``, ``race``, ``collect`` and ``as_completed``.

All of them work from asyncio and trio (the waiting is done by a small notifier that
knows both), and from sync code through ``.result()``.
"""

from __future__ import annotations

import contextvars
import functools
import itertools
import threading
import time
from collections import deque
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Callable,
    Generator,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
    Sized,
)
from typing import Any, Generic, TypeVar

from . import _otel
from ._errors import MiraiCancelled, error_from_record
from ._handle import Mirai

__all__ = ["MiraiMap", "as_completed", "collect", "mirai_map", "race"]

T = TypeVar("T")


class _Notifier:
    """Wake one waiting coroutine from any thread; asyncio or trio."""

    def __init__(self) -> None:
        import sniffio

        self.lib = sniffio.current_async_library()
        self._flag = False
        self._lock = threading.Lock()
        self._arm()

    def _arm(self) -> None:
        if self.lib == "asyncio":
            import asyncio

            self.loop = asyncio.get_running_loop()
            self.tid = threading.get_ident()
            self.fut: Any = self.loop.create_future()
        else:
            import trio

            self.token = trio.lowlevel.current_trio_token()
            self.event: Any = trio.Event()

    def notify(self) -> None:
        with self._lock:
            self._flag = True
        if self.lib == "asyncio":
            fut = self.fut
            if threading.get_ident() == self.tid:
                if not fut.done():
                    fut.set_result(None)
            else:
                try:
                    self.loop.call_soon_threadsafe(_set, fut)
                except RuntimeError:  # the waiter's loop has closed: nobody to wake
                    pass
        else:
            import trio

            try:
                self.token.run_sync_soon(self.event.set)
            except trio.RunFinishedError:
                pass

    async def wait(self) -> None:
        with self._lock:
            if self._flag:
                self._flag = False
                return
        if self.lib == "asyncio":
            await self.fut
        else:
            await self.event.wait()
        with self._lock:
            self._flag = False
        self._arm()


def _set(fut: Any) -> None:
    if not fut.done():
        fut.set_result(None)


def _ok(m: Mirai[Any]) -> bool:
    """A resolved handle holds a value (not an error, not cancelled)."""
    return not m.cancelled() and m.exception() is None


def _value_or_exc(m: Mirai[Any]) -> Any:
    """A resolved handle's value, or its error as an object."""
    if m.cancelled():
        return MiraiCancelled(f"mirai {m.id} was cancelled")
    exc = m.exception()
    return m.result() if exc is None else exc


async def _as_completed_indices(ms: Sequence[Mirai[Any]]) -> AsyncIterator[int]:
    ready: deque[int] = deque()
    notifier = _Notifier()
    for i, m in enumerate(ms):

        def cb(_: Mirai[Any], i: int = i) -> None:
            ready.append(i)
            notifier.notify()

        m.add_done_callback(cb)
    left = len(ms)
    while left:
        while not ready:
            await notifier.wait()
        left -= 1
        yield ready.popleft()


async def as_completed(
    ms: Iterable[Mirai[T]], *, return_exceptions: bool = False
) -> AsyncIterator[tuple[int, T]]:
    """Yield ``(index, value)`` for each mirai as it resolves.

    Args:
        return_exceptions: yield a failed task's exception as its value instead of raising.
    """
    items = list(ms)
    async for i in _as_completed_indices(items):
        m = items[i]
        if return_exceptions:
            yield i, _value_or_exc(m)
        else:
            yield i, m.result()


async def race(ms: Iterable[Mirai[Any]]) -> int:
    """Return the index of the first mirai to resolve (the others keep running)."""
    items = list(ms)
    if not items:
        raise ValueError("race() of no mirai")
    for i, m in enumerate(items):
        if m.done():
            return i
    async for i in _as_completed_indices(items):
        return i
    raise AssertionError("unreachable")


async def collect(ms: Iterable[Mirai[T]], *, return_exceptions: bool = False) -> list[T]:
    """Await all mirai; return their values in order.

    Args:
        return_exceptions: put a failed task's exception in its place instead of raising
            the first error (remaining tasks are then left running).
    """
    items = list(ms)
    async for i in _as_completed_indices(items):
        m = items[i]
        if not return_exceptions and not _ok(m):
            m.result()  # raises the first error to occur
    return [(_value_or_exc(m) if return_exceptions else m.result()) for m in items]


class MiraiMap(Generic[T]):
    """Handle of a :func:`mirai_map`: awaitable, ``.result()``, and ``async for``.

    ``await`` (or ``.result()``) gives a list in input order, or a dict with the input's
    keys.  A failed element is its exception object in place (like
    ``gather(return_exceptions=True)``), unless ``_stop=True``: then the first error
    cancels every remaining task and is raised.  ``async for key, value in handle`` yields
    as tasks complete.  ``mirai_map(..., _window=k)`` returns a lazy variant of this
    handle that reads its input as results are taken (see ``_WindowedMap``).
    """

    def __init__(
        self,
        keys: list[Any] | None,
        mirai: list[Mirai[Any]],
        sizes: list[int] | None,
        stop: bool,
        progress: Any,
    ) -> None:
        self.keys = keys
        self.mirai = mirai
        self._sizes = sizes
        self._index = {m.id: i for i, m in enumerate(mirai)} if sizes is not None else {}
        self._stop = stop
        self._progress = progress
        self._first_error: BaseException | None = None
        # The bar is updated from the dispatcher's callbacks: do it in the caller's
        # context, so that output routed by context variables (Jupyter's parent header)
        # reaches the cell that called mirai_map().
        self._ctx = contextvars.copy_context()
        self._lock = threading.Lock()
        self._pending = len(mirai)
        self._all_done = threading.Event()
        if not mirai:
            self._all_done.set()
            self._close_progress()
        for m in mirai:
            m.add_done_callback(self._on_done)

    def __len__(self) -> int:
        return len(self.keys) if self.keys is not None else sum(self._sizes or [len(self.mirai)])

    def _on_done(self, m: Mirai[Any]) -> None:
        stop_now = False
        with self._lock:
            self._pending -= 1
            ok = _ok(m)
            if not ok and self._first_error is None:
                self._first_error = _value_or_exc(m)
                stop_now = self._stop
            elif ok and self._sizes is not None and self._first_error is None:
                errors = m.result()[1]
                if errors:
                    self._first_error = error_from_record(errors[min(errors)])
                    stop_now = self._stop
            last = self._pending == 0
        bar = self._progress
        if bar is not None:
            n = 1
            if self._sizes is not None:  # a chunk: (values, errors) -> its size
                n = len(m.result()[0]) if ok else self._sizes[self._index[m.id]]
            self._ctx.copy().run(bar.update, n)
        if stop_now:
            self.cancel()
        if last:
            self._close_progress()
            self._all_done.set()

    def _close_progress(self) -> None:
        if self._progress is not None:
            try:
                self._ctx.copy().run(self._progress.close)
            except Exception:
                pass

    def done(self) -> bool:
        """True once every task has resolved."""
        return self._all_done.is_set()

    def cancel(self) -> None:
        """Cancel every task of the map that has not resolved."""
        for m in self.mirai:
            if not m.done():
                m.cancel()

    def _values(self) -> list[Any]:
        if self._stop and self._first_error is not None:
            raise self._first_error
        if self._sizes is None:
            flat = [_value_or_exc(m) for m in self.mirai]
        else:
            flat = []
            for m, size in zip(self.mirai, self._sizes, strict=True):
                if _ok(m):
                    flat.extend(_unpack_chunk(m.result()))
                else:
                    flat.extend([_value_or_exc(m)] * size)
        return flat

    def _shape(self, flat: list[Any]) -> Any:
        if self.keys is not None:
            return dict(zip(self.keys, flat, strict=True))
        return flat

    def result(self, timeout: float | None = None) -> Any:
        """Block until done (or the first error with ``_stop``); return the results."""
        for m in self.mirai:
            m._check_not_dispatcher_thread()
            break
        # with _stop, the first error cancels the rest, so everything resolves promptly
        if not self._all_done.wait(timeout):
            raise TimeoutError("mirai_map not resolved in time")
        return self._shape(self._values())

    def __await__(self) -> Generator[Any, None, Any]:
        return self._wait().__await__()

    async def _wait(self) -> Any:
        try:
            async for _ in _as_completed_indices(self.mirai):
                if self._stop and self._first_error is not None:
                    self.cancel()
                    raise self._first_error
        except BaseException:
            self.cancel()
            raise
        return self._shape(self._values())

    async def __aiter__(self) -> AsyncIterator[tuple[Any, Any]]:
        try:
            async for i in _as_completed_indices(self.mirai):
                m = self.mirai[i]
                if self._stop and self._first_error is not None:
                    self.cancel()
                    raise self._first_error
                if self._sizes is None:
                    key = self.keys[i] if self.keys is not None else i
                    yield key, _value_or_exc(m)
                else:
                    start = sum(self._sizes[:i])
                    values = (
                        _unpack_chunk(m.result()) if _ok(m) else [_value_or_exc(m)] * self._sizes[i]
                    )
                    for j, v in enumerate(values):
                        idx = start + j
                        yield (self.keys[idx] if self.keys is not None else idx), v
        except BaseException:
            self.cancel()
            raise


def _is_async_iterable(obj: Any) -> bool:
    return hasattr(obj, "__aiter__") and not hasattr(obj, "__iter__")


def _queue_full() -> tuple[type[BaseException], ...]:
    """``am.QueueFull`` where the package has it (a memory budget refuses to block)."""
    import asyncmirai

    cls = getattr(asyncmirai, "QueueFull", None)
    return (cls,) if isinstance(cls, type) and issubclass(cls, BaseException) else ()


class _Deadline(Exception):
    """``.result(timeout)`` ran out (kept apart from tasks' own ``MiraiTimeout``)."""


# (function, args, keyword arguments, index of the first element, elements, source ended)
_Call = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any], int, int, bool]
# (handle, index of its first element, elements)
_Entry = tuple[Mirai[Any], int, int]


class _WindowedMap(MiraiMap[T]):
    """The handle of ``mirai_map(..., _window=k)``: the input is read as results are taken.

    At most ``k`` tasks are submitted and not yet handed to the consumer (so at most ``k``
    unresolved).  Whoever consumes the map drives it: each result taken frees a slot,
    and the consumer reads the next element and submits it before going on.  A plain
    iterable's first window is read and submitted by ``mirai_map()`` itself, an async
    iterable's by the first ``await`` / ``async for``; if nobody consumes the map,
    nothing more is read.  One consumer, once: ``await`` / ``.result()`` (plain
    iterables only) give the ordered list (or dict), kept for later calls; ``async for``
    yields ``(index, value)`` (``(key, value)`` for a dict) as completed and keeps
    nothing, so an unbounded source streams in constant memory.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        iterables: tuple[Any, ...],
        window: int,
        chunksize: int | None,
        stop: bool,
        progress: bool,
        opts: dict[str, Any],
        kwargs: dict[str, Any],
    ) -> None:
        # No MiraiMap.__init__: its bookkeeping assumes every handle up front.
        from ._api import _profile

        self._fn = fn
        self._opts = opts
        self._kwargs = kwargs
        self._window = window
        self._chunk = chunksize if chunksize is not None and chunksize > 1 else None
        self._stop = stop
        self._single = single = len(iterables) == 1
        src = iterables[0]
        self._is_async = single and _is_async_iterable(src)
        if not single and any(_is_async_iterable(it) for it in iterables):
            raise TypeError("mirai_map() zips plain iterables only; zip async ones yourself")
        self.keys: list[Any] | None = None
        self._it: Iterator[Any] = iter(())
        self._ait: AsyncIterator[Any] | None = None
        total: int | None = None
        if single and isinstance(src, Mapping):
            self.keys = []
            self._it = iter(src.items())
            total = len(src)
        elif self._is_async:
            self._ait = src.__aiter__()
        elif single:
            self._it = iter(src)
            total = len(src) if isinstance(src, Sized) else None
        else:
            self._it = zip(*iterables, strict=False)
            if all(isinstance(it, Sized) for it in iterables):
                total = min(len(it) for it in iterables)
        self._total = total
        self._prof = _profile(opts["_compute"])  # no daemons: raise now, not at the await
        self._lock = threading.Lock()
        self._pulled = 0  # elements read from the source
        self._ntasks = 0
        self._exhausted = False
        self._stopped = False
        self._carry: _Call | None = None  # read, not yet submitted (the queue was full)
        self._inflight: dict[int, _Entry] = {}
        self._ready: deque[_Entry] = deque()  # resolved, not yet handed to the consumer
        self._waker: Callable[[], None] | None = None
        self._first_error = None
        self._mode: str | None = None
        self._driving = False
        self._results: list[Any] = []
        self._outcome: tuple[bool, Any] | None = None
        self._ctx = contextvars.copy_context()
        self._progress = _make_progress(total, progress)
        self._bar_closed = False
        # Tracing on: one parent span in the caller's context, the tasks' spans its
        # children whenever they are submitted; it ends when the map finishes.
        attrs: dict[str, Any] = {"asyncmirai.map.window": window}
        if total is not None:
            attrs["asyncmirai.map.size"] = total
        self._group = _otel.group(f"mirai_map {_otel.span_name(fn)}", attrs)
        if self._group is not None:
            self._group.more = True
        if not self._is_async:
            try:
                self._fill_sync(initial=True)
            except BaseException:
                self.cancel()
                self._close_progress()
                if self._group is not None:
                    self._group.close()
                raise

    # -- the handle's surface -------------------------------------------------------
    @property
    def mirai(self) -> list[Mirai[Any]]:
        """The tasks submitted and not yet handed to the consumer (a snapshot)."""
        with self._lock:
            return [e[0] for e in self._inflight.values()] + [e[0] for e in self._ready]

    @mirai.setter
    def mirai(self, value: list[Mirai[Any]]) -> None:
        raise AttributeError("a windowed mirai_map's tasks are read-only")

    def __len__(self) -> int:
        if self._total is not None:
            return self._total
        if self._exhausted:
            return self._pulled
        raise TypeError("a windowed mirai_map over an iterator has no length until read")

    def __bool__(self) -> bool:
        return True

    def done(self) -> bool:
        """True once the input is read (or the map stopped) and no task is unresolved."""
        with self._lock:
            return self._finished_locked(ready_too=False)

    def cancel(self) -> None:
        """Stop reading the input and cancel every task in flight."""
        with self._lock:
            self._stopped = True
            self._carry = None
            ms = [e[0] for e in self._inflight.values()]
        for m in ms:
            m.cancel()
        self._maybe_finish()

    # -- bookkeeping ----------------------------------------------------------------
    def _finished_locked(self, ready_too: bool = True) -> bool:
        return (
            (self._exhausted or self._stopped)
            and not self._inflight
            and self._carry is None
            and not (ready_too and self._ready)
        )

    def _room_locked(self) -> bool:
        return (
            not self._stopped
            and (self._carry is not None or not self._exhausted)
            and len(self._inflight) + len(self._ready) < self._window
        )

    def _maybe_finish(self) -> None:
        with self._lock:
            if self._bar_closed or not self._finished_locked(ready_too=False):
                return
            self._bar_closed = True
        self._close_progress()
        if self._group is not None:
            self._group.finish({"asyncmirai.map.size": self._pulled})

    def _mark_exhausted(self) -> None:
        with self._lock:
            self._exhausted = True
        self._maybe_finish()

    def _on_resolved(self, t: int, m: Mirai[Any]) -> None:
        """Done callback (the dispatcher's thread, or the submitting one in sync mode)."""
        ok = _ok(m)
        errors = m.result()[1] if ok and self._chunk is not None else None
        bar = self._progress
        with self._lock:
            entry = self._inflight.pop(t)
            stop_now = False
            if self._first_error is None and not ok:
                self._first_error = _value_or_exc(m)
                stop_now = self._stop
            elif self._first_error is None and errors:
                self._first_error = error_from_record(errors[min(errors)])
                stop_now = self._stop
            if bar is not None and not self._bar_closed:
                n = len(m.result()[0]) if ok and self._chunk is not None else entry[2]
                self._ctx.copy().run(bar.update, n)
            self._ready.append(entry)
            waker = self._waker
        if stop_now:
            self.cancel()
        self._maybe_finish()
        if waker is not None:
            waker()

    # -- reading and submitting -----------------------------------------------------
    def _prepare(self, rows: list[Any], last: bool) -> _Call:
        from ._call import run_chunk

        start = self._pulled
        self._pulled += len(rows)
        if self.keys is not None:
            self.keys.extend(k for k, _ in rows)
            rows = [v for _, v in rows]
        if self._chunk is not None:
            ckw = {**self._kwargs, "__single__": True} if self._single else dict(self._kwargs)
            return run_chunk, (self._fn, rows, ckw), dict(self._opts), start, len(rows), last
        args = (rows[0],) if self._single else tuple(rows[0])
        return self._fn, args, {**self._opts, **self._kwargs}, start, 1, last

    def _take_carry(self) -> tuple[bool, _Call | None]:
        """(room?, the carried call if any): the caller reads the source if room and none."""
        with self._lock:
            if not self._room_locked():
                return False, None
            call, self._carry = self._carry, None
            return True, call

    def _read_sync(self) -> _Call | None:
        n = self._chunk or 1
        rows = list(itertools.islice(self._it, n))
        if not rows:
            self._mark_exhausted()
            return None
        return self._prepare(rows, len(rows) < n)

    async def _read_async(self) -> _Call | None:
        if self._ait is None:
            return self._read_sync()
        n = self._chunk or 1
        rows: list[Any] = []
        while len(rows) < n:
            try:
                rows.append(await self._ait.__anext__())
            except StopAsyncIteration:
                break
        if not rows:
            self._mark_exhausted()
            return None
        return self._prepare(rows, len(rows) < n)

    def _register(self, m: Mirai[Any], call: _Call) -> None:
        if self._group is not None:
            self._group.follow([m])
        with self._lock:
            t = self._ntasks
            self._ntasks += 1
            self._inflight[t] = (m, call[3], call[4])
            stopped = self._stopped
        m.add_done_callback(functools.partial(self._on_resolved, t))
        if stopped:
            m.cancel()
        if call[5]:
            self._mark_exhausted()

    def _fill_sync(self, initial: bool = False) -> None:
        """Read and submit until the window is full (the calling thread)."""
        from ._api import mirai

        full = _queue_full() if initial else ()
        while True:
            room, call = self._take_carry()
            if not room:
                return
            if call is None:
                call = self._read_sync()
                if call is None:
                    return
            group = self._group
            token = group.enter() if group is not None else None
            try:
                m = mirai(call[0], *call[1], **call[2])
            except full:  # mirai_map() on a loop thread with a full budget: keep it for later
                with self._lock:
                    self._carry = call
                return
            finally:
                if group is not None:
                    group.leave(token)
            self._register(m, call)

    async def _fill_async(self) -> None:
        """Read and submit until the window is full (the consuming task)."""
        from . import _api

        submit = getattr(_api, "submit", None)  # waits for room under a memory budget
        while True:
            room, call = self._take_carry()
            if not room:
                return
            if call is None:
                call = await self._read_async()
                if call is None:
                    return
            group = self._group
            token = group.enter() if group is not None else None
            try:
                if submit is not None:
                    m = await submit(call[0], *call[1], **call[2])
                else:
                    m = _api.mirai(call[0], *call[1], **call[2])
            finally:
                if group is not None:
                    group.leave(token)
            self._register(m, call)

    # -- consuming ------------------------------------------------------------------
    def _attach(self, mode: str) -> _Notifier:
        """Claim the map for one async consumer and wake it on each resolution."""
        self._claim(mode)
        notifier = _Notifier()
        with self._lock:
            self._waker = notifier.notify
        return notifier

    def _claim(self, mode: str) -> None:
        with self._lock:
            if self._driving:
                raise RuntimeError(
                    "a windowed mirai_map has one consumer at a time "
                    "(one await, async for or .result())"
                )
            if self._mode == "iter" or (self._mode is not None and self._mode != mode):
                raise RuntimeError(
                    "a windowed mirai_map is consumed once: awaited (or .result()), "
                    "or iterated with async for, which keeps no results"
                )
            self._mode = mode
            self._driving = True

    def _release(self) -> None:
        with self._lock:
            self._driving = False
            self._waker = None

    def _pop_ready(self) -> _Entry | None:
        with self._lock:
            return self._ready.popleft() if self._ready else None

    async def _next_async(self, notifier: _Notifier) -> _Entry | None:
        """The next resolved task (refilling the window first), or None at the end."""
        while True:
            entry = self._pop_ready()
            await self._fill_async()  # the slot just freed is used before going on
            if entry is not None:
                return entry
            with self._lock:
                if self._ready:
                    continue
                finished = self._finished_locked()
            if finished:
                return None
            await notifier.wait()

    def _next_sync(self, event: threading.Event, deadline: float | None) -> _Entry | None:
        while True:
            entry = self._pop_ready()
            self._fill_sync()
            if entry is not None:
                return entry
            with self._lock:
                event.clear()  # before looking, so a resolution after the look sets it
                if self._ready:
                    continue
                finished = self._finished_locked()
            if finished:
                return None
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise _Deadline
            event.wait(left)

    def _check_stop(self) -> None:
        if self._stop and self._first_error is not None:
            self.cancel()
            if self._mode == "collect":
                self._outcome = (False, self._first_error)
            raise self._first_error

    def _unpack(self, entry: _Entry) -> list[Any]:
        m, _, size = entry
        if self._chunk is None:
            return [_value_or_exc(m)]
        return _unpack_chunk(m.result()) if _ok(m) else [_value_or_exc(m)] * size

    def _store(self, entry: _Entry) -> None:
        start = entry[1]
        values = self._unpack(entry)
        end = start + len(values)
        if len(self._results) < end:
            self._results.extend([None] * (end - len(self._results)))
        self._results[start:end] = values

    def _finish_collect(self) -> Any:
        results = self._results
        for i in range(len(results), self._pulled):  # read, never submitted (cancelled)
            results.append(MiraiCancelled(f"element {i} was read but not submitted"))
        self._outcome = (True, self._shape(results))
        return self._outcome[1]

    def _replay(self) -> Any:
        assert self._outcome is not None
        ok, value = self._outcome
        if not ok:
            raise value
        return value

    async def _wait(self) -> Any:
        if self._outcome is not None:
            return self._replay()
        notifier = self._attach("collect")
        try:
            while (entry := await self._next_async(notifier)) is not None:
                self._check_stop()
                self._store(entry)
            self._check_stop()
        except BaseException:
            self.cancel()
            raise
        finally:
            self._release()
        return self._finish_collect()

    def result(self, timeout: float | None = None) -> Any:
        """Drive the map from this thread until done; return the results.

        Raises:
            TypeError: the input is an async iterable (``await`` the map instead).
            TimeoutError: ``timeout`` elapsed (the map is left as it is: call again).
        """
        if self._outcome is not None:
            return self._replay()
        if self._is_async:
            raise TypeError("this mirai_map reads an async iterable: await it, or async for")
        self._prof.check_may_block()
        self._claim("collect")
        deadline = None if timeout is None else time.monotonic() + timeout
        event = threading.Event()
        with self._lock:
            self._waker = event.set
        try:
            while (entry := self._next_sync(event, deadline)) is not None:
                self._check_stop()
                self._store(entry)
            self._check_stop()
        except _Deadline:
            raise TimeoutError("mirai_map not resolved in time") from None
        except BaseException:
            self.cancel()
            raise
        finally:
            self._release()
        return self._finish_collect()

    async def __aiter__(self) -> AsyncIterator[tuple[Any, Any]]:
        notifier = self._attach("iter")
        try:
            while (entry := await self._next_async(notifier)) is not None:
                self._check_stop()
                start = entry[1]
                for j, v in enumerate(self._unpack(entry), start):
                    yield (self.keys[j] if self.keys is not None else j), v
            self._check_stop()
        except BaseException:
            self.cancel()
            raise
        finally:
            self._release()


def _unpack_chunk(result: tuple[list[Any], dict[int, Any]]) -> list[Any]:
    values, errors = result
    if errors:
        values = list(values)
        for i, record in errors.items():
            values[i] = error_from_record(record)
    return values


def _make_progress(total: int | None, enabled: bool) -> Any:
    """A tqdm bar, or None; ``total=None`` (a generator's unknown length) shows a count."""
    if not enabled:
        return None
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tqdm.auto warns (on import) without ipywidgets
        try:
            from tqdm.auto import tqdm
        except ImportError:  # pragma: no cover - tqdm is a dependency
            return None
        return tqdm(total=total, desc="mirai_map", unit="task")


def mirai_map(
    fn: Callable[..., T],
    /,
    *iterables: Iterable[Any] | AsyncIterable[Any],
    _progress: bool = False,
    _stop: bool = False,
    _chunksize: int | None = None,
    _window: int | None = None,
    _timeout: float | None = None,
    _retries: int = 0,
    _compute: str | None = None,
    **kwargs: Any,
) -> MiraiMap[T]:
    """Map ``fn`` over iterables like builtin ``map``: one task per element (or chunk).

    ``mirai_map(fn, xs, ys)`` runs ``fn(x, y)`` for each pair; a single dict in gives a
    dict out (same keys, mapped values).  Extra keyword arguments are passed to every call.

    Args:
        _progress: show a progress bar (tqdm; terminals and notebooks).
        _stop: at the first error cancel every remaining task and raise it; otherwise
            a failed element's exception is returned in its place.
        _chunksize: elements per task, for tiny functions (results keep their order).
        _window: read the input lazily (a generator, or an async iterable such as an async
            generator) and keep at most this many *tasks* submitted and not yet handed to
            the consumer, so at most this many unresolved: with ``_chunksize`` the window
            counts chunks, so ``_window * _chunksize`` elements.  A new element is pulled
            only when the consumer takes a result; see :class:`MiraiMap` for what
            drives that.  Without ``_window`` the input is read whole and every task is
            submitted at once.
        _timeout / _retries / _compute: as for :func:`mirai`, per task.

    Returns:
        a :class:`MiraiMap` handle.

    Raises:
        ValueError: ``_chunksize`` or ``_window`` is not a positive int.
        TypeError: no iterable; an async iterable without ``_window``; several iterables
            of which one is async (zip them yourself).
    """
    from ._api import mirai
    from ._call import run_chunk

    if not iterables:
        raise TypeError("mirai_map() needs at least one iterable")
    if _chunksize is not None and (not isinstance(_chunksize, int) or _chunksize < 1):
        raise ValueError(f"_chunksize must be a positive int, got {_chunksize!r}")
    if _window is not None:
        if isinstance(_window, bool) or not isinstance(_window, int) or _window < 1:
            raise ValueError(f"_window must be a positive int (tasks in flight), got {_window!r}")
        opts0: dict[str, Any] = {"_timeout": _timeout, "_retries": _retries, "_compute": _compute}
        return _WindowedMap(fn, iterables, _window, _chunksize, _stop, _progress, opts0, kwargs)
    if any(_is_async_iterable(it) for it in iterables):
        raise TypeError("mirai_map() reads an async iterable only lazily: pass _window=")
    keys: list[Any] | None = None
    single = len(iterables) == 1
    if single and isinstance(iterables[0], Mapping):
        keys = list(iterables[0].keys())
        items: list[Any] = list(iterables[0].values())
    elif single:
        items = list(iterables[0])  # type: ignore[arg-type]
    else:
        items = list(zip(*iterables, strict=False))  # like map(): stop at the shortest
    opts: dict[str, Any] = {"_timeout": _timeout, "_retries": _retries, "_compute": _compute}
    bar = _make_progress(len(items), _progress)
    # Tracing on: one parent span, the tasks' spans its children (None otherwise).
    group = _otel.group(f"mirai_map {_otel.span_name(fn)}", {"asyncmirai.map.size": len(items)})
    token = group.enter() if group is not None else None
    try:
        if _chunksize is None or _chunksize == 1:
            if single:
                ms = [mirai(fn, x, **opts, **kwargs) for x in items]
            else:
                ms = [mirai(fn, *row, **opts, **kwargs) for row in items]
            handle: MiraiMap[T] = MiraiMap(keys, ms, None, _stop, bar)
        else:
            # One iterable: ship the elements themselves (no 1-tuples to build and unpack).
            ckw = {**kwargs, "__single__": True} if single else kwargs
            chunks = [items[i : i + _chunksize] for i in range(0, len(items), _chunksize)]
            ms = [mirai(run_chunk, fn, chunk, ckw, **opts) for chunk in chunks]  # type: ignore[arg-type]
            handle = MiraiMap(keys, ms, [len(c) for c in chunks], _stop, bar)
    except BaseException:
        if bar is not None:
            bar.close()
        if group is not None:
            group.close()
        raise
    finally:
        if group is not None:
            group.leave(token)
    if group is not None:
        group.follow(ms)
    return handle
