"""Many tasks at once: ``mirai_map``, ``race``, ``collect`` and ``as_completed``.

All of them work from asyncio and trio (the waiting is done by a small notifier that
knows both), and from sync code through ``.result()``.
"""

from __future__ import annotations

import contextvars
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Generator, Iterable, Mapping, Sequence
from typing import Any, Generic, TypeVar

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
                self.loop.call_soon_threadsafe(_set, fut)
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
    as tasks complete.
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
                        _unpack_chunk(m.result())
                        if _ok(m)
                        else [_value_or_exc(m)] * self._sizes[i]
                    )
                    for j, v in enumerate(values):
                        idx = start + j
                        yield (self.keys[idx] if self.keys is not None else idx), v
        except BaseException:
            self.cancel()
            raise


def _unpack_chunk(result: tuple[list[Any], dict[int, Any]]) -> list[Any]:
    values, errors = result
    if errors:
        values = list(values)
        for i, record in errors.items():
            values[i] = error_from_record(record)
    return values


def _make_progress(total: int, enabled: bool) -> Any:
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
    *iterables: Iterable[Any],
    _progress: bool = False,
    _stop: bool = False,
    _chunksize: int | None = None,
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
        _timeout / _retries / _compute: as for :func:`mirai`, per task.

    Returns:
        a :class:`MiraiMap` handle.
    """
    from ._api import mirai
    from ._call import run_chunk

    if not iterables:
        raise TypeError("mirai_map() needs at least one iterable")
    if _chunksize is not None and (not isinstance(_chunksize, int) or _chunksize < 1):
        raise ValueError(f"_chunksize must be a positive int, got {_chunksize!r}")
    keys: list[Any] | None = None
    single = len(iterables) == 1
    if single and isinstance(iterables[0], Mapping):
        keys = list(iterables[0].keys())
        items: list[Any] = list(iterables[0].values())
    elif single:
        items = list(iterables[0])
    else:
        items = list(zip(*iterables, strict=False))  # like map(): stop at the shortest
    opts: dict[str, Any] = {"_timeout": _timeout, "_retries": _retries, "_compute": _compute}
    bar = _make_progress(len(items), _progress)
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
        raise
    return handle
