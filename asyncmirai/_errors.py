"""The exceptions asyncmirai raises, in one place (httpcore's ``_exceptions`` habit)."""

from __future__ import annotations

import pickle
import threading
from typing import Any

__all__ = [
    "DaemonError",
    "LocalProtocolError",
    "MiraiCancelled",
    "MiraiError",
    "MiraiTimeout",
    "ProtocolError",
    "QueueFull",
    "RemoteProtocolError",
    "SerializationError",
    "error_class",
    "error_from_record",
    "make_error",
]


class MiraiError(Exception):
    """The task's function raised on the daemon.

    Attributes:
        type_name: the remote exception's type: ``"ValueError"`` for builtins, else its
            module-qualified name, e.g. ``"mypkg.errors.BadInput"``.
        message: ``str()`` of the remote exception.
        remote_traceback: the formatted traceback, as text, from the daemon.

    The original exception is this error's ``__cause__`` when it could be unpickled on the
    host, and the error is then also an instance of the original's class (a cached
    subclass of both, as Ray does), so ``except ZeroDivisionError`` catches it.  When that
    class cannot be subclassed (or is not an ``Exception``), it is a plain MiraiError.
    """

    def __init__(self, type_name: str, message: str, remote_traceback: str = "") -> None:
        # Not super(): in a subclass of (MiraiError, Original), the next __init__ in the
        # MRO is the original class's, whose signature is unknown.
        Exception.__init__(self, f"{type_name}: {message}" if message else type_name)
        self.type_name = type_name
        self.message = message
        self.remote_traceback = remote_traceback

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        original = _ORIGINAL.get(type(self))
        if original is not None:
            return (_rebuild, (original, self.type_name, self.message, self.remote_traceback))
        return (type(self), (self.type_name, self.message, self.remote_traceback))

    def __str__(self) -> str:
        base = f"{self.type_name}: {self.message}" if self.message else self.type_name
        if self.remote_traceback:
            return f"{base}\n\nRemote traceback:\n{self.remote_traceback.rstrip()}"
        return base


# dynamic subclass -> the original class, and back (cached, one class per original)
_ORIGINAL: dict[type, type] = {}
_SUBCLASS: dict[type, type[MiraiError] | None] = {}
_SUBCLASS_LOCK = threading.Lock()


def error_class(original: type) -> type[MiraiError]:
    """The cached subclass of both MiraiError and ``original`` (MiraiError itself when
    ``original`` cannot be subclassed)."""
    original = _ORIGINAL.get(original, original)  # one of ours: its original class
    cls = _SUBCLASS.get(original, False)
    if cls is not False:
        return cls or MiraiError  # type: ignore[return-value]
    with _SUBCLASS_LOCK:
        made: type[MiraiError] | None = None
        if issubclass(original, Exception) and not issubclass(original, MiraiError):
            try:
                made = type(
                    f"MiraiError_{original.__name__}",
                    (MiraiError, original),
                    {
                        "__module__": __name__,
                        "__qualname__": f"MiraiError[{original.__qualname__}]",
                    },
                )
            except TypeError:  # final classes, layout conflicts
                made = None
        _SUBCLASS[original] = made
        if made is not None:
            _ORIGINAL[made] = original
        return made or MiraiError


def _rebuild(original: type, type_name: str, message: str, tb: str) -> MiraiError:
    return error_class(original)(type_name, message, tb)


def make_error(name: str, message: str, tb: str, original: BaseException | None) -> MiraiError:
    """The MiraiError for a failed task; an instance of ``original``'s class too."""
    cls = MiraiError if original is None else error_class(type(original))
    err = cls(name, message, tb)
    if original is not None:
        err.__cause__ = original
    return err


def error_from_record(record: Any) -> MiraiError:
    """The MiraiError for a daemon's error record ``(type name, message, traceback,
    pickled exception or None)``; the original exception becomes its ``__cause__`` and,
    where its class can be subclassed, the error is an instance of that class too."""
    name, message, tb, blob = record
    original = None
    if blob is not None:
        try:
            original = pickle.loads(blob)
        except BaseException:  # noqa: BLE001 - absent class, or a hostile SystemExit
            original = None
        if not isinstance(original, BaseException):
            original = None
    if original is None:  # not unpicklable: its class may still be known here
        cls = _known_class(str(name))
        if cls is not None:
            return error_class(cls)(str(name), str(message), str(tb))
    return make_error(str(name), str(message), str(tb), original)


def _known_class(type_name: str) -> type | None:
    """The exception class named ``module.qualname`` if its module is loaded already
    (nothing is imported on the strength of a name from a daemon)."""
    import builtins
    import sys

    module, _, qualname = type_name.rpartition(".")
    obj: Any = sys.modules.get(module) if module else builtins
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, type) and issubclass(obj, Exception) else None


class DaemonError(Exception):
    """The daemon running the task died, or the profile was reset, before it resolved."""


class MiraiTimeout(TimeoutError):
    """The task's ``_timeout`` elapsed; the work was cancelled on the daemon."""


class MiraiCancelled(Exception):
    """Raised by ``Mirai.result()`` (and executors) for a cancelled task."""


class SerializationError(TypeError, pickle.PicklingError):
    """An argument (or the function) of a task cannot be serialized; nothing was sent.

    Both a ``TypeError`` and a ``pickle.PicklingError``, so either ``except`` catches it.
    """


class ProtocolError(Exception):
    """A message did not follow the asyncmirai wire protocol."""


class LocalProtocolError(ProtocolError):
    """We were asked to encode something the protocol cannot carry (our caller's fault)."""


class RemoteProtocolError(ProtocolError):
    """A peer sent frames that do not decode (the peer's fault): dropped and logged."""


class QueueFull(Exception):
    """The profile's memory budget is full and ``mirai()`` was called on a thread that
    runs an event loop (where it must not block): use ``await am.submit(...)`` or
    ``am.try_mirai(...)``."""
