"""The wire protocol, sans I/O: frozen message types, ``encode`` and ``decode``.

Every message is a list of frames:

* frame 0: a msgpack header ``[version, kind, id, descriptors, extra, inline_body]``;
* frame 1: the body (pickle protocol 5 bytes) unless it is small enough to travel inline
  in the header (then ``inline_body`` holds it and this frame is absent);
* following frames: out-of-band buffers described by ``descriptors`` (see ``_codecs``).

Nothing here touches a socket (h11 is the model): the dispatcher and the daemon own the
transport and call ``encode``/``decode``.  A frame list from a peer that does not decode
raises :class:`RemoteProtocolError`; asking to encode something impossible raises
:class:`LocalProtocolError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import msgpack

from ._errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "MAX_BUFFERS",
    "MAX_HEADER_BYTES",
    "PROTOCOL_VERSION",
    "Cancel",
    "Cancelled",
    "Exit",
    "Hello",
    "Message",
    "Output",
    "Ping",
    "Refuse",
    "Result",
    "Drop",
    "Put",
    "Retire",
    "Setup",
    "Task",
    "Welcome",
    "decode",
    "encode",
]

PROTOCOL_VERSION = 2  # 2: Put and Drop (am.put)
#: Headers are small (descriptors of tensors); anything larger is hostile or broken.
MAX_HEADER_BYTES = 1 << 20
#: Out-of-band frames one message may carry.
MAX_BUFFERS = 1 << 16

# Kind codes on the wire.  Never renumber: bump PROTOCOL_VERSION instead.
_HELLO, _WELCOME, _REFUSE, _TASK, _RESULT, _CANCEL, _CANCELLED = 1, 2, 3, 4, 5, 6, 7
_SETUP, _EXIT, _PING, _OUTPUT, _RETIRE = 8, 9, 10, 11, 12
_PUT, _DROP = 13, 14

_EMPTY = b""


@dataclass(frozen=True, slots=True)
class Hello:
    """Daemon -> host, first message on each of the daemon's two sockets.

    ``role`` is ``"task"`` for the socket that carries tasks and results, ``"ctrl"`` for
    the one that carries cancels and pings.  ``token`` ties the two together.
    """

    pid: int
    host: str
    role: str
    token: bytes
    launch: str = ""
    version: int = PROTOCOL_VERSION


@dataclass(frozen=True, slots=True)
class Welcome:
    """Host -> daemon: accepted; ``body`` is the pickled daemon configuration."""

    body: bytes


@dataclass(frozen=True, slots=True)
class Refuse:
    """Host -> daemon: not accepted (e.g. protocol version mismatch); the daemon exits."""

    reason: str


@dataclass(frozen=True, slots=True)
class Task:
    """Host -> daemon: evaluate a call.  ``extra`` carries per-task options (seed ...)."""

    id: int
    body: Any
    descriptors: list[Any] = field(default_factory=list)
    buffers: Sequence[Any] = ()
    extra: Any = None


@dataclass(frozen=True, slots=True)
class Setup:
    """Host -> daemon: an ``everywhere()`` call; replayed to daemons that connect later.

    ``extra`` carries options as a Task's does (the trace context of the call)."""

    id: int
    body: Any
    descriptors: list[Any] = field(default_factory=list)
    buffers: Sequence[Any] = ()
    extra: Any = None


@dataclass(frozen=True, slots=True)
class Result:
    """Daemon -> host: the outcome of a Task or Setup.

    ``ok`` true: the body is the pickled value; false: the pickled error record.
    """

    id: int
    ok: bool
    body: Any
    descriptors: list[Any] = field(default_factory=list)
    buffers: Sequence[Any] = ()


@dataclass(frozen=True, slots=True)
class Cancel:
    """Host -> daemon (control socket): stop task ``id`` if queued or running.

    With ``revoke`` only a task that has not started is taken back (it is answered with
    ``Cancelled(revoked=True)`` and the host runs it elsewhere); a started one goes on.
    """

    id: int
    revoke: bool = False


@dataclass(frozen=True, slots=True)
class Cancelled:
    """Daemon -> host: task ``id`` was stopped (or, ``revoked``, never started)."""

    id: int
    revoked: bool = False


@dataclass(frozen=True, slots=True)
class Exit:
    """Host -> daemon: shut down now."""

    reason: str = ""


@dataclass(frozen=True, slots=True)
class Ping:
    """Daemon -> host (control socket): liveness, sent periodically.

    ``current`` is the task running now and ``done`` the last one it replied to;
    ``drops`` counts the task connection's disconnects so far and ``done_drops`` what it
    was when that reply was sent.  With them the host tells a task or a result lost in a
    connection drop (ZeroMQ does not resend across reconnects) from one in flight.
    """

    current: int | None = None
    done: int | None = None
    drops: int = 0
    done_drops: int = 0


@dataclass(frozen=True, slots=True)
class Output:
    """Daemon -> host: a chunk of the daemon's stdout or stderr (``output=True``), or
    (``stream == "log"``) one logging record, msgpack-encoded (``daemons(log_level=)``)."""

    stream: str
    data: bytes


@dataclass(frozen=True, slots=True)
class Retire:
    """Daemon -> host: it reached maxtasks/idletime/walltime and exits after this."""

    reason: str


@dataclass(frozen=True, slots=True)
class Put:
    """Host -> daemon: cache object ``id`` (``am.put``), sent before the first task that
    uses it on this daemon."""

    id: int
    body: Any
    descriptors: list[Any] = field(default_factory=list)
    buffers: Sequence[Any] = ()


@dataclass(frozen=True, slots=True)
class Drop:
    """Host -> daemon: forget cached object ``id`` (its reference was collected)."""

    id: int


Message = Union[  # noqa: UP007 - a runtime alias on 3.10
    Hello,
    Welcome,
    Refuse,
    Task,
    Setup,
    Result,
    Cancel,
    Cancelled,
    Exit,
    Ping,
    Output,
    Retire,
    Put,
    Drop,
]

_pack = msgpack.Packer(use_bin_type=True).pack

#: Bodies up to this size travel inside the header frame: one frame instead of two for
#: small tasks, which on the per-task path saves a zmq send/recv pair on each side.
INLINE_BODY_BYTES = 16 * 1024


def _header(kind: int, id: int = 0, descriptors: Any = None, extra: Any = None) -> bytes:
    try:
        return bytes(_pack([PROTOCOL_VERSION, kind, id, descriptors, extra, None]))
    except (TypeError, ValueError, OverflowError) as exc:
        raise LocalProtocolError(f"cannot encode message header: {exc}") from exc


def _payload(
    kind: int, id: int, descriptors: Any, extra: Any, body: Any, buffers: Sequence[Any]
) -> list[Any]:
    try:
        if len(body) <= INLINE_BODY_BYTES:
            return [_pack([PROTOCOL_VERSION, kind, id, descriptors or None, extra, body]), *buffers]
        return [
            _pack([PROTOCOL_VERSION, kind, id, descriptors or None, extra, None]),
            body,
            *buffers,
        ]
    except (TypeError, ValueError, OverflowError) as exc:
        raise LocalProtocolError(f"cannot encode message header: {exc}") from exc


def encode_task(
    id: int, body: Any, descriptors: Any, buffers: Sequence[Any], extra: Any = None
) -> list[Any]:
    """Frames of a :class:`Task` (the hot path: no message object is built)."""
    return _payload(_TASK, id, descriptors, extra, body, buffers)


def encode_result(
    id: int, ok: bool, body: Any, descriptors: Any, buffers: Sequence[Any]
) -> list[Any]:
    """Frames of a :class:`Result` (the hot path: no message object is built)."""
    return _payload(_RESULT, id, descriptors, ok, body, buffers)


def encode(msg: Message) -> list[Any]:
    """Encode ``msg`` into the list of frames to send (bytes and buffer objects).

    Raises:
        LocalProtocolError: the message cannot be put on the wire.
    """
    cls = type(msg)
    if cls is Task:
        assert isinstance(msg, Task)
        return _payload(_TASK, msg.id, msg.descriptors, msg.extra, msg.body, msg.buffers)
    if cls is Result:
        assert isinstance(msg, Result)
        return _payload(_RESULT, msg.id, msg.descriptors, msg.ok, msg.body, msg.buffers)
    if cls is Setup:
        assert isinstance(msg, Setup)
        return _payload(_SETUP, msg.id, msg.descriptors, msg.extra, msg.body, msg.buffers)
    if cls is Cancel:
        assert isinstance(msg, Cancel)
        return [_header(_CANCEL, msg.id, extra=msg.revoke)]
    if cls is Cancelled:
        assert isinstance(msg, Cancelled)
        return [_header(_CANCELLED, msg.id, extra=msg.revoked)]
    if cls is Ping:
        assert isinstance(msg, Ping)
        return [_header(_PING, extra=[msg.current, msg.done, msg.drops, msg.done_drops])]
    if cls is Hello:
        assert isinstance(msg, Hello)
        extra = [msg.pid, msg.host, msg.role, msg.token, msg.launch]
        return [_pack([msg.version, _HELLO, 0, None, extra, None])]
    if cls is Welcome:
        assert isinstance(msg, Welcome)
        return [_header(_WELCOME), msg.body]
    if cls is Refuse:
        assert isinstance(msg, Refuse)
        return [_header(_REFUSE, extra=msg.reason)]
    if cls is Exit:
        assert isinstance(msg, Exit)
        return [_header(_EXIT, extra=msg.reason)]
    if cls is Output:
        assert isinstance(msg, Output)
        return [_header(_OUTPUT, extra=msg.stream), msg.data]
    if cls is Retire:
        assert isinstance(msg, Retire)
        return [_header(_RETIRE, extra=msg.reason)]
    if cls is Put:
        assert isinstance(msg, Put)
        return _payload(_PUT, msg.id, msg.descriptors, None, msg.body, msg.buffers)
    if cls is Drop:
        assert isinstance(msg, Drop)
        return [_header(_DROP, msg.id)]
    raise LocalProtocolError(f"not a protocol message: {msg!r}")


def _bad(why: str) -> RemoteProtocolError:
    return RemoteProtocolError(why)


def _nbytes(frame: Any) -> int:
    try:
        return len(memoryview(frame).cast("B"))
    except TypeError:
        raise _bad(f"frame of type {type(frame).__name__} is not bytes-like") from None


def decode(frames: Sequence[Any]) -> Message:
    """Decode frames received from a peer into a message.

    ``frames`` are bytes-like objects (bytes, memoryviews, zmq frame buffers).  Out-of-band
    buffers are passed through untouched (zero copy).

    Raises:
        RemoteProtocolError: the frames are malformed, truncated, oversized, of an unknown
            kind, or (for anything but ``Hello``) of another protocol version.
    """
    if not frames:
        raise _bad("empty message")
    head = frames[0]
    if (len(head) if type(head) is bytes else _nbytes(head)) > MAX_HEADER_BYTES:
        raise _bad("header frame too large")
    if len(frames) > MAX_BUFFERS + 2:
        raise _bad("too many frames")
    try:
        header = msgpack.unpackb(
            head, raw=False, use_list=True, strict_map_key=False, max_bin_len=MAX_HEADER_BYTES
        )
    except Exception as exc:  # msgpack raises several types for garbage
        raise _bad(f"header is not msgpack: {exc}") from None
    if type(header) is not list or len(header) < 5:
        raise _bad("header is not a 6-item array")
    version, kind, id, descriptors, extra = header[:5]
    if type(kind) is not int or type(id) is not int or type(version) is not int:
        raise _bad("header fields have wrong types")
    if kind == _HELLO:  # readable by every version, so a mismatch can be refused
        return _decode_hello(version, extra)
    if kind == _REFUSE:  # readable by every version: it is how a mismatch is reported
        return Refuse(str(extra))
    if version != PROTOCOL_VERSION:
        raise _bad(f"protocol version {version} (this side speaks {PROTOCOL_VERSION})")
    if len(header) != 6:
        raise _bad("header is not a 6-item array")
    if descriptors is not None and type(descriptors) is not list:
        raise _bad("descriptors are not an array")
    n = len(frames)
    if kind == _TASK or kind == _RESULT or kind == _SETUP or kind == _PUT:
        inline = header[5]
        if inline is not None:
            if type(inline) is not bytes:
                raise _bad("inline body is not bytes")
            body = inline
            bufs = frames[1:]
        elif n < 2:
            raise _bad("payload message without a body frame")
        else:
            body = frames[1]
            bufs = frames[2:]
        desc = descriptors or []
        if kind == _TASK:
            return Task(id, body, desc, bufs, extra)
        if kind == _RESULT:
            if type(extra) is not bool:
                raise _bad("result without an ok flag")
            return Result(id, extra, body, desc, bufs)
        if kind == _PUT:
            return Put(id, body, desc, bufs)
        return Setup(id, body, desc, bufs, extra)
    if kind == _CANCEL:
        return Cancel(id, extra is True)
    if kind == _CANCELLED:
        return Cancelled(id, extra is True)
    if kind == _PING:
        if type(extra) is list and len(extra) == 4:
            current, done, drops, done_drops = extra
            if (
                (current is None or type(current) is int)
                and (done is None or type(done) is int)
                and type(drops) is int
                and type(done_drops) is int
            ):
                return Ping(current, done, drops, done_drops)
        raise _bad("malformed ping")
    if kind == _WELCOME:
        if n < 2:
            raise _bad("welcome without a body")
        return Welcome(bytes(frames[1]))
    if kind == _EXIT:
        return Exit(str(extra or ""))
    if kind == _OUTPUT:
        if n < 2 or extra not in ("stdout", "stderr", "log"):
            raise _bad("malformed output message")
        return Output(extra, bytes(frames[1]))
    if kind == _RETIRE:
        return Retire(str(extra))
    if kind == _DROP:
        return Drop(id)
    raise _bad(f"unknown message kind {kind}")


def _decode_hello(version: int, extra: Any) -> Hello:
    if type(extra) is not list or len(extra) < 5:
        raise _bad("malformed hello")
    pid, host, role, token, launch = extra[:5]
    if (
        type(pid) is not int
        or type(host) is not str
        or role not in ("task", "ctrl")
        or type(token) is not bytes
        or type(launch) is not str
        or len(token) > 64
    ):
        raise _bad("malformed hello fields")
    return Hello(pid, host, role, token, launch, version)
