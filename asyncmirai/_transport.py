"""The same-host transport: multi-frame messages over a Unix stream socket pair.

Why (measured on the 2-vCPU dev VM, DESIGN.md §2 "transport seam"): a ZeroMQ round trip
wakes four threads per direction (app, I/O thread, I/O thread, app), and every cross-CPU
wake-up costs tens of microseconds in this VM; a socketpair wakes only the two processes.
Local daemons therefore talk to the dispatcher over a socketpair each (one for tasks,
one for control), created by the host and inherited by the daemon (``fd://T/C``).
Remote daemons, and local ones started with ``transport="zmq"``, use ZeroMQ.

Wire format of one message: ``u32 nframes``, ``nframes x u64 length``, then the frames.
Large frames (>= 64 KiB) are received straight into their own buffer (``recv_into``), so
a tensor's bytes are copied once, by the kernel, into memory the tensor then owns.
"""

from __future__ import annotations

import select
import socket
import struct
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncio

from ._errors import RemoteProtocolError

__all__ = ["BlockingChannel", "FrameReader", "LoopChannel", "frame_prefix"]

RECV_CHUNK = 256 * 1024
BIG_FRAME = 64 * 1024
MAX_FRAMES = 1 << 16
MAX_FRAME_BYTES = 1 << 40
IOV_MAX = 512  # below the kernel's 1024 limit on buffers per sendmsg

_u32 = struct.Struct("<I")
_lengths: dict[int, struct.Struct] = {}


def _lengths_struct(n: int) -> struct.Struct:
    s = _lengths.get(n)
    if s is None:
        s = _lengths[n] = struct.Struct(f"<{n}Q")
    return s


def _nbytes(frame: Any) -> int:
    if type(frame) is bytes:
        return len(frame)
    return memoryview(frame).nbytes


def frame_prefix(frames: Sequence[Any]) -> bytes:
    """The header that precedes ``frames`` on the wire."""
    n = len(frames)
    return _u32.pack(n) + _lengths_struct(n).pack(*[_nbytes(f) for f in frames])


class FrameReader:
    """Incremental parser of the wire format; pulls bytes from a socket."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.lengths: list[int] | None = None
        self.frames: list[Any] = []
        self.big: bytearray | None = None
        self.bigmv: memoryview | None = None
        self.bigpos = 0
        # One reusable receive buffer: ``sock.recv(n)`` would allocate n bytes per call
        # (mmap/munmap for large n), which showed up as system time per task.
        self.rbuf = bytearray(RECV_CHUNK)
        self.rview = memoryview(self.rbuf)

    def pump(
        self, sock: socket.socket, out: list[list[Any]] | deque[list[Any]], block: bool
    ) -> bool:
        """Read from ``sock``; append complete messages to ``out``.

        Non-blocking mode reads what is there (a short read means drained); blocking mode
        reads until at least one message is complete.  Returns False at end of stream.

        Raises:
            RemoteProtocolError: the stream is not in the wire format.
        """
        while True:
            if self.big is not None:
                assert self.bigmv is not None
                try:
                    n = sock.recv_into(self.bigmv[self.bigpos :])
                except BlockingIOError:
                    return True
                if n == 0:
                    return False
                self.bigpos += n
                if self.bigpos < len(self.big):
                    continue
                self.frames.append(self.bigmv)
                self.big = self.bigmv = None
                self._parse(out)
            else:
                try:
                    got = sock.recv_into(self.rbuf)
                except BlockingIOError:
                    return True
                if not got:
                    return False
                self.buf += self.rview[:got]
                self._parse(out)
                if not block and got < RECV_CHUNK and self.big is None:
                    return True  # drained; the loop calls us again when more arrives
            if block and out:
                return True

    def _parse(self, out: list[list[Any]] | deque[list[Any]]) -> None:
        buf = self.buf
        pos = 0
        end = len(buf)
        while True:
            if self.lengths is None:
                if end - pos < 4:
                    break
                (n,) = _u32.unpack_from(buf, pos)
                if n == 0 or n > MAX_FRAMES:
                    raise RemoteProtocolError(f"bad frame count {n}")
                if end - pos < 4 + 8 * n:
                    break
                lengths = list(_lengths_struct(n).unpack_from(buf, pos + 4))
                if max(lengths) > MAX_FRAME_BYTES:
                    raise RemoteProtocolError("frame too large")
                self.lengths = lengths
                self.frames = []
                pos += 4 + 8 * n
            lengths = self.lengths
            frames = self.frames
            while len(frames) < len(lengths):
                size = lengths[len(frames)]
                avail = end - pos
                if avail >= size:
                    if size >= BIG_FRAME:
                        frames.append(memoryview(bytearray(buf[pos : pos + size])))
                    else:
                        frames.append(bytes(buf[pos : pos + size]))
                    pos += size
                elif size >= BIG_FRAME:  # receive the rest straight into its own buffer
                    big = bytearray(size)
                    big[:avail] = buf[pos:end]
                    self.big = big
                    self.bigmv = memoryview(big)
                    self.bigpos = avail
                    del buf[:]
                    return
                else:
                    del buf[:pos]
                    return
            out.append(frames)
            self.lengths = None
            self.frames = []
        del buf[:pos]


def _views(parts: Sequence[Any]) -> list[memoryview]:
    out = []
    for p in parts:
        mv = p if type(p) is memoryview else memoryview(p)
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        if mv.nbytes:
            out.append(mv)
    return out


class LoopChannel:
    """Host end of a daemon's socketpair, driven by an asyncio loop (non-blocking)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        ident: bytes,
        on_message: Callable[[bytes, list[Any]], None],
        on_close: Callable[[LoopChannel], None],
    ) -> None:
        self.loop = loop
        self.sock = sock
        self.ident = ident
        self.on_message = on_message
        self.on_close = on_close
        self.reader = FrameReader()
        self.pending: deque[memoryview] = deque()
        self.closed = False
        sock.setblocking(False)
        self.fd = sock.fileno()
        loop.add_reader(self.fd, self._on_readable)

    def _on_readable(self) -> None:
        msgs: list[list[Any]] = []
        try:
            alive = self.reader.pump(self.sock, msgs, False)
        except (OSError, RemoteProtocolError):
            alive = False
        for frames in msgs:
            self.on_message(self.ident, frames)
        if not alive and not self.closed:
            self.close()
            self.on_close(self)

    def send(self, frames: Sequence[Any]) -> bool:
        """Queue ``frames`` as one message; False if the channel is closed."""
        if self.closed:
            return False
        if len(frames) == 1 and not self.pending and type(frames[0]) is bytes:
            data = frame_prefix(frames) + frames[0]
            try:
                sent = self.sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self.close()
                return False
            if sent == len(data):
                return True
            self.pending.append(memoryview(data)[sent:])
            self.loop.add_writer(self.fd, self._on_writable)
            return True
        parts = [frame_prefix(frames), *frames]
        if self.pending:
            self.pending.extend(_views(parts))
            return True
        if len(parts) <= IOV_MAX:
            try:
                sent = self.sock.sendmsg(parts)
            except BlockingIOError:
                sent = 0
            except OSError:
                self.close()
                return False
            total = sum(_nbytes(p) for p in parts)
            if sent == total:
                return True
        else:
            sent = 0
        views = _views(parts)
        # drop what was already written
        while sent and views:
            head = views[0]
            if sent >= head.nbytes:
                sent -= head.nbytes
                views.pop(0)
            else:
                views[0] = head[sent:]
                sent = 0
        self.pending.extend(views)
        self.loop.add_writer(self.fd, self._on_writable)
        return True

    def _on_writable(self) -> None:
        pending = self.pending
        while pending:
            batch = [pending[i] for i in range(min(IOV_MAX, len(pending)))]
            try:
                sent = self.sock.sendmsg(batch)
            except BlockingIOError:
                return
            except OSError:
                self.close()
                self.on_close(self)
                return
            while sent and pending:
                head = pending[0]
                if sent >= head.nbytes:
                    sent -= head.nbytes
                    pending.popleft()
                else:
                    pending[0] = head[sent:]
                    sent = 0
        self.loop.remove_writer(self.fd)

    def close(self) -> None:
        """Stop watching and close the socket (idempotent)."""
        if self.closed:
            return
        self.closed = True
        try:
            self.loop.remove_reader(self.fd)
            self.loop.remove_writer(self.fd)
        except Exception:  # the loop may be closed
            pass
        self.pending.clear()
        self.sock.close()


class BlockingChannel:
    """Daemon end of a socketpair: blocking send/recv, used by one thread."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(True)
        self.sock = sock
        self.reader = FrameReader()
        self.ready: deque[list[Any]] = deque()

    def recv(self) -> list[Any]:
        """Block until a message arrives.  Raises EOFError when the host is gone."""
        while not self.ready:
            if not self.reader.pump(self.sock, self.ready, True):
                raise EOFError("host closed the channel")
        return self.ready.popleft()

    def poll(self, timeout: float | None) -> bool:
        """True if a message can be received within ``timeout`` seconds."""
        if self.ready:
            return True
        r, _, _ = select.select([self.sock], [], [], timeout)
        return bool(r)

    def send(self, frames: Sequence[Any]) -> None:
        """Send one message (all of it)."""
        if len(frames) == 1 and type(frames[0]) is bytes:
            self.sock.sendall(frame_prefix(frames) + frames[0])
            return
        views = _views([frame_prefix(frames), *frames])
        while views:
            sent = self.sock.sendmsg(views[:IOV_MAX])
            while sent and views:
                head = views[0]
                if sent >= head.nbytes:
                    sent -= head.nbytes
                    views.pop(0)
                else:
                    views[0] = head[sent:]
                    sent = 0
