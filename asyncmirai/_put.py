"""``am.put(obj)``: data sent to each daemon at most once, then referenced by tasks.

A :class:`PutRef` is encoded once, when it is made (tensors and arrays inside as
out-of-band frames, as for any task).  Passed at any depth in a task's arguments it
pickles as a reference; the scheduler sends the object to a daemon before the first task
there that uses it (daemons that connect or respawn later get it on first use), and the
daemon's unpickler returns its cached copy, the same object for every task.  When the
reference is garbage-collected on the host, the daemons drop it; a reset drops
everything (the daemons exit).

A daemon caches at most :data:`~asyncmirai._scheduler.PUT_CACHE_ENTRIES` objects: past
that, the host drops the least recently used one there and sends it again if a later
task needs it.
"""

from __future__ import annotations

import contextvars
import itertools
import weakref
from typing import Any

from . import _codecs, _protocol

__all__ = ["PUT_REFS", "PutRef", "put"]

#: Set while a task's arguments are encoded: the references met go to the task's job.
PUT_REFS: contextvars.ContextVar[list[PutRef] | None] = contextvars.ContextVar(
    "asyncmirai_put_refs", default=None
)
_ids = itertools.count(1)


class PutRef:
    """A reference to an object sent once to each daemon (see :func:`put`)."""

    __slots__ = ("id", "compute", "frames", "drop_frames", "nbytes", "__weakref__")

    def __init__(self, id: int, compute: str, frames: list[Any]) -> None:
        self.id = id
        self.compute = compute
        self.frames = frames  # the Put message, kept for daemons that need it later
        self.drop_frames = _protocol.encode(_protocol.Drop(id))
        self.nbytes = sum(f.nbytes if isinstance(f, memoryview) else len(f) for f in frames)

    def __repr__(self) -> str:
        return f"<PutRef {self.id} of {self.nbytes:,} bytes on {self.compute!r}>"

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        from ._call import fetch_put

        refs = PUT_REFS.get()
        if refs is None:
            raise TypeError(f"{self!r} can only be sent as an argument of a task")
        refs.append(self)
        return (fetch_put, (self.id,))


def put(obj: Any, *, compute: str | None = None) -> PutRef:
    """Send ``obj`` to each daemon of the profile at most once; return a reference.

    Pass the reference (at any depth) in a task's arguments where ``obj`` would go: the
    function receives the daemon's cached ``obj``, the same object for every task on that
    daemon.  The object is encoded now; it goes to a daemon before the first task there
    that uses it.  It stays cached until the reference is garbage-collected on the host
    or the profile resets.

    Args:
        obj: Any object a task argument may be (tensors travel out of band, zero-copy).
        compute: the profile (default: the current one, see :func:`using`).

    Raises:
        SerializationError: ``obj`` cannot be serialized.
        RuntimeError: no daemons are set for the profile.
    """
    from ._api import _profile
    from ._errors import SerializationError

    prof = _profile(compute)
    pid = next(_ids)
    try:
        body, desc, bufs = _codecs.dumps(obj, prof.table)
    except Exception as exc:
        raise SerializationError(
            f"put(): cannot serialize an object of type {type(obj).__qualname__}: {exc}"
        ) from exc
    ref = PutRef(pid, prof.compute, _protocol.encode(_protocol.Put(pid, body, desc, bufs)))
    if not prof.sync:
        weakref.finalize(ref, prof.forget_put, pid)
    else:
        from ._call import store_put

        store_put(pid, obj)  # sync mode: the "daemon" is this process
        weakref.finalize(ref, _drop_local, pid)
    return ref


def _drop_local(pid: int) -> None:
    from ._call import drop_put

    drop_put(pid)
