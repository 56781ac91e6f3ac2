"""The memory budget of a compute profile: payload bytes of tasks waiting in its queue.

``daemons(n, memory="512MB")`` bounds what a producer can pile up in the host while the
daemons are busy.  A task takes its payload bytes from the budget before it is submitted
(``mirai()`` blocks for room on a plain thread, raises :class:`QueueFull` on a thread
that runs an event loop; ``await submit()`` waits asynchronously; ``try_mirai()`` gives
up); the scheduler gives them back when the task leaves the queue for a daemon, or is
cancelled or resolved while queued.  A task bigger than the whole budget is admitted
when the queue is empty, so no task is refused forever.  A task that comes back to the
queue (a retry after a crash, a revoked prefetch) is forced in: admitted work is never
refused, so the budget may be exceeded by such returns only.

Thread-safe: producers on any thread, the scheduler on the dispatcher's loop thread.
Waiters are :class:`~asyncmirai._handle.Mirai` handles without an owner, so one waiter
works for a blocked thread, an asyncio task and a trio task alike.
"""

from __future__ import annotations

import re
import threading
from collections import deque
from typing import Any

from ._handle import VALUE, Mirai

__all__ = ["Budget", "parse_size"]

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_size(value: int | str | None) -> int | None:
    """Bytes from an int, or a string such as ``"512MB"`` (10^6) or ``"2GiB"`` (2^30).

    Raises:
        ValueError: not a positive size.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"memory must be a number of bytes or a size string, got {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str):
        m = _SIZE.match(value)
        unit = m.group(2).lower() if m else ""
        if m is None or unit not in _UNITS:
            raise ValueError(
                f"memory={value!r} is not a size: use bytes (an int) or a string such as "
                "'512MB', '100KiB' or '2GiB'"
            )
        n = int(float(m.group(1)) * _UNITS[unit])
    else:
        raise ValueError(f"memory must be an int or a size string, got {type(value).__name__}")
    if n <= 0:
        raise ValueError(f"memory must be positive, got {value!r}")
    return n


class Budget:
    """Bytes of queued payloads: taken by producers, given back by the scheduler."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.queued = 0
        self.peak = 0
        self._lock = threading.Lock()
        self._waiters: deque[Mirai[None]] = deque()

    def _fits(self, n: int) -> bool:
        return self.queued == 0 or self.queued + n <= self.capacity

    def try_take(self, n: int) -> bool:
        """Take ``n`` bytes if there is room now."""
        with self._lock:
            if not self._fits(n):
                return False
            self._add(n)
            return True

    def _take_or_wait(self, n: int) -> Mirai[None] | None:
        """Take ``n`` bytes (None), or register and return a waiter to retry on."""
        with self._lock:
            if self._fits(n):
                self._add(n)
                return None
            waiter: Mirai[None] = Mirai(0)
            self._waiters.append(waiter)
            return waiter

    def take(self, n: int) -> None:
        """Take ``n`` bytes, blocking this thread until there is room."""
        while (waiter := self._take_or_wait(n)) is not None:
            waiter.result()

    async def take_async(self, n: int) -> None:
        """Take ``n`` bytes, waiting asynchronously (asyncio or trio) for room.

        Cancelling the wait takes nothing."""
        while (waiter := self._take_or_wait(n)) is not None:
            try:
                await waiter
            except BaseException:
                with self._lock:
                    try:
                        self._waiters.remove(waiter)
                    except ValueError:  # woken meanwhile: pass the wake-up on
                        self._wake_locked()
                raise

    def _add(self, n: int) -> None:
        self.queued += n
        if self.queued > self.peak:
            self.peak = self.queued

    def give(self, n: int) -> None:
        """``n`` bytes left the queue: wake the waiters (they retry in order)."""
        with self._lock:
            self.queued -= n
            self._wake_locked()

    def force(self, n: int) -> None:
        """``n`` bytes came back to the queue (retry, revoke): never refused."""
        with self._lock:
            self._add(n)

    def _wake_locked(self) -> None:
        waiters = self._waiters
        self._waiters = deque()
        for w in waiters:
            w._resolve(VALUE, None)

    def snapshot(self) -> dict[str, Any]:
        """``{"queued", "peak", "capacity"}`` in bytes."""
        with self._lock:
            return {"queued": self.queued, "peak": self.peak, "capacity": self.capacity}
