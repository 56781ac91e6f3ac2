"""The exceptions asyncmirai raises, in one place (httpcore's ``_exceptions`` habit)."""

from __future__ import annotations

import pickle
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
    "error_from_record",
]


class MiraiError(Exception):
    """The task's function raised on the daemon.

    Attributes:
        type_name: the remote exception's type: ``"ValueError"`` for builtins, else its
            module-qualified name, e.g. ``"mypkg.errors.BadInput"``.
        message: ``str()`` of the remote exception.
        remote_traceback: the formatted traceback, as text, from the daemon.

    The original exception is this error's ``__cause__`` when it could be unpickled on the
    host.
    """

    def __init__(self, type_name: str, message: str, remote_traceback: str = "") -> None:
        super().__init__(f"{type_name}: {message}" if message else type_name)
        self.type_name = type_name
        self.message = message
        self.remote_traceback = remote_traceback

    def __reduce__(self) -> tuple[type[MiraiError], tuple[str, str, str]]:
        return (type(self), (self.type_name, self.message, self.remote_traceback))

    def __str__(self) -> str:
        base = f"{self.type_name}: {self.message}" if self.message else self.type_name
        if self.remote_traceback:
            return f"{base}\n\nRemote traceback:\n{self.remote_traceback.rstrip()}"
        return base


def error_from_record(record: Any) -> MiraiError:
    """The MiraiError for a daemon's error record ``(type name, message, traceback,
    pickled exception or None)``; the original exception becomes its ``__cause__``."""
    name, message, tb, blob = record
    err = MiraiError(str(name), str(message), str(tb))
    if blob is not None:
        try:
            err.__cause__ = pickle.loads(blob)
        except BaseException:  # noqa: BLE001 - absent class, or a hostile SystemExit
            pass
    return err


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
