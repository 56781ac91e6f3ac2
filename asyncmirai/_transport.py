"""The same-host transport: multi-frame messages over a Unix stream socket pair.

Why (measured on the 2-vCPU dev VM; the "transport seam" of the design card): a ZeroMQ round trip
wakes four threads per direction (app, I/O thread, I/O thread, app), and every cross-CPU
wake-up costs tens of microseconds in this VM; a socketpair wakes only the two processes.
Local daemons therefore talk to the dispatcher over a socketpair each (one for tasks,
one for control), created by the host and inherited by the daemon (``fd://T/C``).
Remote daemons, and local ones started with ``transport="zmq"``, use ZeroMQ.

Wire format of one message: ``u32 nframes``, ``nframes x u64 length``, then the frames
that travel in the stream.  A frame of at least ``SHM_FRAME`` bytes travels instead as a
memfd passed with ``SCM_RIGHTS`` (its length has the top bit set): the sender copies it
once into the memfd and seals it (``F_SEAL_WRITE``, ``F_SEAL_SHRINK``, ``F_SEAL_GROW``:
nobody can change or truncate it any more), the receiver checks the seals and maps it
``MAP_PRIVATE``, so the tensor or array that wraps the mapping is writable copy-on-write
and no other process's writes can reach it.  One copy per direction instead of the two a
socket needs (into and out of the kernel), as torch's own shared-memory pickling does.
Smaller frames of at least ``BIG_FRAME`` bytes are received straight into their own
buffer (``recv_into``).

Passing on without a copy: a received segment keeps its (sealed) memfd open for as long as
its mapping lives.  When a frame to send is a prefix of such a mapping and
``/proc/self/pagemap`` shows that no page of it was written here (every page is either
not mapped yet or still the memfd's own page: a write would have made it a private
anonymous copy), the same sealed memfd is passed on instead of a new copy.  That is
safe for the same reason as the first send: the bytes under a sealed memfd can never
change, and every process maps it privately.  A task that returns its (unmodified)
argument, or a host that forwards a result to another task, moves no bytes at all;
a modified buffer is copied as before.  Nothing is pooled or reused for writing: a
memfd, once sealed and handed over, is never written again (a pool of pre-faulted
memfds would have to hand out memory some other process may still map).

Measured on the 2-vCPU dev VM (512 MiB, medians of 5; page faults are expensive
here: a first-touch copy runs at ~2 GB/s against ~12 GB/s into pages already mapped):

* sender, ``os.write`` into a fresh memfd: 195-210 ms (kept; no zeroing, the kernel
  allocates each page as it copies).  ``ftruncate`` + ``mmap(MAP_SHARED)`` + memcpy:
  405-470 ms (every 4 KiB write fault allocates and zeroes a page); the same after
  ``fallocate``: 404 ms, after ``MADV_POPULATE_WRITE``: 422 ms; ``fallocate`` then
  ``os.write``: 119 + 112 ms.  Chunks of 8 MiB / 64 MiB / 1 GiB per ``os.write``: no
  difference.  Huge pages: shmem THP is off on this kernel (``shmem_enabled=never``)
  and ``MFD_HUGETLB`` needs reserved hugetlb pages (``nr_hugepages=0``): not used.
  Splitting the write over threads: shmem writes take the inode lock; no gain.
* sealing: ~2 ms.
* receiver, ``mmap(MAP_PRIVATE)``: ~0 ms, pages fault in lazily (64 KiB fault-around
  on reads).  Copying the mapping out again (a task that returns a modified tensor):
  254 ms; with ``MADV_POPULATE_READ`` first: 53 + 208 ms, i.e. no gain, and pure loss
  when the pages are never read or the segment is passed on: not used.
  ``MAP_POPULATE`` on a writable private mapping would copy every page: not used.
* passing a received segment on: ~1-2 ms (``pread`` of 1 MiB of pagemap) instead
  of ~250 ms.
* freeing a 512 MiB memfd's pages when its last reference goes: ~65 ms.  A kept fd
  is therefore closed by a helper thread after the mapping is gone (``_close_later``),
  off the path of the next message: a 512 MiB round trip through a daemon went from
  ~275 ms (205 of them the copy) to ~200 ms, i.e. from 3.9 to 5.4 GB/s.
* two threads writing halves (one memfd or two): no gain on this VM (341 ms for one
  thread, 371 and 381 ms for two, measured under load); page allocation does not scale.
"""

from __future__ import annotations

import array
import ctypes
import mmap
import os
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ._errors import RemoteProtocolError

if TYPE_CHECKING:
    import asyncio

__all__ = ["BlockingChannel", "FrameReader", "LoopChannel"]

RECV_CHUNK = 256 * 1024
BIG_FRAME = 64 * 1024
SHM_FRAME = 1 << 20
MAX_FRAMES = 1 << 16
MAX_FRAME_BYTES = 1 << 40
MAX_FDS = 200  # per message; the kernel allows 253 per sendmsg
IOV_MAX = 512  # below the kernel's 1024 limit on buffers per sendmsg
_SHM_BIT = 1 << 63
_HAS_MEMFD = hasattr(os, "memfd_create")
_ANC_SPACE = socket.CMSG_SPACE(MAX_FDS * 4)
_CMSG_CLOEXEC = getattr(socket, "MSG_CMSG_CLOEXEC", 0)  # Linux; elsewhere fds stay inheritable

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


def _byte_view(frame: Any) -> memoryview:
    mv = frame if type(frame) is memoryview else memoryview(frame)
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    return mv


#: Seals a shared-memory frame must carry: its bytes and size can no longer change.
_SEALS = 0
if _HAS_MEMFD:
    import fcntl

    _SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW


# -- received segments that can be passed on unchanged ---------------------------------------

#: mapping address -> (memfd, mapped bytes) of every received segment still mapped whose
#: memfd we kept.  Guarded by ``_seg_lock``; a segment's fd leaves the table before it
#: is closed, so a looked-up fd is never closed, or its number reused, before it is
#: duplicated.
_segments: dict[int, tuple[int, int]] = {}
_seg_lock = threading.RLock()
_PAGE = mmap.PAGESIZE
_PAGEMAP = "/proc/self/pagemap"
#: pagemap entry, top byte: bit 7 = present, bit 6 = swapped, bit 5 = file page or
#: shared.  A page of a private file mapping was written here iff it is present and
#: not the file's page (copy-on-write made it anonymous) or it is in swap (only
#: anonymous pages of a private mapping go to swap).
_WRITTEN = bytes(1 if (b & 0xA0) == 0x80 or b & 0x40 else 0 for b in range(256))
_pagemap_ok: bool | None = None  # None: not checked yet


def _keep_max() -> int:
    """Kept memfds at most: one fd each, so a fraction of the fd limit."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft == resource.RLIM_INFINITY or soft <= 0:
            soft = 1 << 16
    except (ImportError, OSError, ValueError):
        soft = 1024
    return min(256, soft // 16)


_KEEP_MAX = _keep_max()


def _written(addr: int, nbytes: int) -> bool:
    """True unless every page of ``[addr, addr + nbytes)`` is provably unwritten here."""
    first, last = addr // _PAGE, (addr + nbytes - 1) // _PAGE
    try:
        fd = os.open(_PAGEMAP, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return True
    try:
        step = 1 << 20  # entries per read: 8 MiB of pagemap for 4 GiB of mapping
        for page in range(first, last + 1, step):
            count = min(step, last + 1 - page)
            data = os.pread(fd, 8 * count, 8 * page)
            if len(data) != 8 * count or 1 in data[7::8].translate(_WRITTEN):
                return True
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def _check_pagemap() -> bool:
    """Does pagemap tell written from unwritten pages here?  (Sandboxes may fake it.)"""
    try:
        fd = os.memfd_create("asyncmirai-probe", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, 2 * _PAGE)
            mm = mmap.mmap(fd, 2 * _PAGE, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        try:
            mm[0] = 1  # page 0: written (copy-on-write), page 1: read only
            mm[_PAGE]  # noqa: B018 - fault the page in
            c = ctypes.c_char.from_buffer(mm)
            addr = ctypes.addressof(c)
            del c
            return _written(addr, _PAGE) and not _written(addr + _PAGE, _PAGE)
        finally:
            mm.close()
    except (OSError, ValueError, BufferError):
        return False


# Closing a segment's last reference frees its pages: ~65 ms for 512 MiB here, and it
# fell on the critical path (a daemon drops the previous task's argument when the next
# task arrives: 512 MiB round trips took 275 ms, 205 of them the copy).  So a kept fd is
# closed by a helper thread instead, after the mapping is gone: round trips ~200 ms.
_closing: list[int] = []
_closing_cv = threading.Condition(threading.RLock())  # RLock: __del__ may run inside
_closer: threading.Thread | None = None
_closing_now = 0


def _close_later(fd: int) -> None:
    global _closer
    with _closing_cv:
        _closing.append(fd)
        if _closer is None or not _closer.is_alive():
            try:
                from ._threads import start_thread

                _closer = start_thread(_close_loop, name="asyncmirai-segment-closer")
            except RuntimeError:  # interpreter shutdown: no new threads
                _closing.remove(fd)
                os.close(fd)
                return
        _closing_cv.notify()


def _close_loop() -> None:
    global _closing_now
    while True:
        with _closing_cv:
            while not _closing:
                _closing_cv.wait()
            fds = _closing[:]
            del _closing[:]
            _closing_now += len(fds)
        _close_all(fds)
        with _closing_cv:
            _closing_now -= len(fds)
            _closing_cv.notify_all()


def drain_closes(timeout: float | None = None) -> bool:
    """Wait until every segment fd handed to the closer thread is closed (tests)."""
    with _closing_cv:
        return _closing_cv.wait_for(lambda: not _closing and not _closing_now, timeout)


def _after_fork_in_child() -> None:
    global _closer, _closing_cv, _closing_now, _seg_lock
    _closer, _closing_now = None, 0
    _closing_cv = threading.Condition(threading.RLock())  # another thread may hold them
    _seg_lock = threading.RLock()
    _close_all(_closing)
    del _closing[:]


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _Segment(mmap.mmap):
    """A received memfd, mapped privately; may keep its fd to pass it on unchanged."""

    _addr = 0
    _fd = -1

    def _keep(self, fd: int, size: int) -> bool:
        global _pagemap_ok
        if _pagemap_ok is None:
            _pagemap_ok = _check_pagemap()
        if not _pagemap_ok or len(_segments) >= _KEEP_MAX:
            return False
        c = ctypes.c_char.from_buffer(self)
        addr = ctypes.addressof(c)
        del c
        with _seg_lock:
            self._addr, self._fd = addr, fd
            _segments[addr] = (fd, size)
        return True

    def _forget(self) -> None:
        fd = self._fd
        if fd < 0:
            return
        with _seg_lock:
            self._fd = -1
            if _segments.get(self._addr, (-1, 0))[0] == fd:
                del _segments[self._addr]
        _close_later(fd)  # still open: nobody can look it up, its number is not reused

    def close(self) -> None:
        self._forget()
        super().close()

    def __del__(self) -> None:  # runs before the mapping goes away
        try:
            self._forget()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def _pass_on(mv: memoryview) -> int | None:
    """A new fd of the received sealed memfd whose mapping ``mv`` is an unwritten prefix of."""
    if not _segments or mv.readonly:
        return None
    try:
        c = ctypes.c_char.from_buffer(mv)
    except (TypeError, ValueError, BufferError):
        return None
    addr = ctypes.addressof(c)
    del c
    n = mv.nbytes
    with _seg_lock:
        seg = _segments.get(addr)
        if seg is None or seg[1] < n:
            return None
        fd = os.dup(seg[0])
    if _written(addr, n):
        os.close(fd)
        return None
    return fd


def _to_memfd(frame: Any) -> int:
    """A sealed memfd holding ``frame``: a received one passed on, or a new copy."""
    mv = _byte_view(frame)
    fd = _pass_on(mv)
    if fd is not None:
        return fd
    # os.write, not mmap + memcpy: 195-210 ms against 405-470 ms for 512 MiB (see above)
    fd = os.memfd_create("asyncmirai-frame", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        off, n = 0, mv.nbytes
        while off < n:
            off += os.write(fd, mv[off : off + (1 << 30)])
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS | fcntl.F_SEAL_SEAL)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _encode(frames: Sequence[Any]) -> tuple[list[Any], list[int]]:
    """Stream parts (prefix first) and memfds of one message."""
    lengths = []
    parts: list[Any] = [b""]
    fds: list[int] = []
    try:
        for f in frames:
            n = _nbytes(f)
            if n >= SHM_FRAME and _HAS_MEMFD and len(fds) < MAX_FDS:
                fds.append(_to_memfd(f))
                lengths.append(n | _SHM_BIT)
            else:
                lengths.append(n)
                if n:
                    parts.append(f)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    parts[0] = _u32.pack(len(frames)) + _lengths_struct(len(frames)).pack(*lengths)
    return parts, fds


def _scm(fds: list[int]) -> list[tuple[int, int, bytes]]:
    if not fds:
        return []
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class FrameReader:
    """Incremental parser of the wire format; pulls bytes (and fds) from a socket."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.lengths: list[int] | None = None
        self.frames: list[Any] = []
        self.fds: deque[int] = deque()
        self.big: bytearray | None = None
        self.bigmv: memoryview | None = None
        self.bigpos = 0
        # One reusable receive buffer: ``sock.recv(n)`` would allocate n bytes per call
        # (mmap/munmap for large n), which showed up as system time per task.
        self.rbuf = bytearray(RECV_CHUNK)
        self.rview = memoryview(self.rbuf)

    def close(self) -> None:
        """Close file descriptors received but not yet used."""
        _close_all(list(self.fds))
        self.fds.clear()

    def _recv(self, sock: socket.socket, into: memoryview) -> int:
        # recvmsg, never recv: a plain recv would silently drop passed file descriptors.
        n, anc, flags, _ = sock.recvmsg_into([into], _ANC_SPACE, _CMSG_CLOEXEC)
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
                self.fds.extend(fds)
        if flags & socket.MSG_CTRUNC:
            raise RemoteProtocolError("file descriptors were truncated")
        return n

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
                    n = self._recv(sock, self.bigmv[self.bigpos :])
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
                    got = self._recv(sock, self.rview)
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

    def _map(self, size: int) -> memoryview:
        if not self.fds:
            raise RemoteProtocolError("a shared-memory frame arrived without its descriptor")
        fd = self.fds.popleft()
        try:
            # Unsealed, the sender (or anyone holding the fd) could still write to the
            # pages under our tensor, or truncate it (SIGBUS on access): refuse.
            if fcntl.fcntl(fd, fcntl.F_GET_SEALS) & _SEALS != _SEALS:
                raise RemoteProtocolError("shared-memory frame is not sealed against writes")
            if size == 0:  # mmap would map the whole file
                raise RemoteProtocolError("empty shared-memory frame")
            if os.fstat(fd).st_size < size:  # mapping past the end would SIGBUS on access
                raise RemoteProtocolError("shared-memory frame smaller than announced")
            # Private: writable for us (copy-on-write), invisible to everyone else.  Lazy:
            # no MAP_POPULATE / MADV_POPULATE_READ (no gain, see the module docstring).
            mm = _Segment(fd, size, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
            if mm._keep(fd, size):
                fd = -1  # the segment closes it when it is unmapped
        finally:
            if fd >= 0:
                os.close(fd)
        return memoryview(mm)

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
                if max(x & ~_SHM_BIT for x in lengths) > MAX_FRAME_BYTES:
                    raise RemoteProtocolError("frame too large")
                self.lengths = lengths
                self.frames = []
                pos += 4 + 8 * n
            lengths = self.lengths
            frames = self.frames
            while len(frames) < len(lengths):
                size = lengths[len(frames)]
                if size & _SHM_BIT:
                    frames.append(self._map(size & ~_SHM_BIT))
                    continue
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


class _Pending:
    """Bytes still to write, and the fds to send with the first of them."""

    __slots__ = ("view", "fds")

    def __init__(self, view: memoryview, fds: list[int]) -> None:
        self.view = view
        self.fds = fds


class LoopChannel:
    """Host end of a daemon's socketpair, driven by an asyncio loop (non-blocking).

    Made on the loop's thread, which watches it.  Another thread may read and send on it
    too while it holds ``lock`` (the dispatcher's, which every loop-side callback here
    takes as well): a caller blocked in ``Mirai.result()`` reads its own result instead
    of waiting for the loop thread to read it and wake it (see ``Dispatcher.wait``).
    What only the loop's thread may do (watch for writability, close) is handed to it.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        ident: bytes,
        on_message: Callable[[bytes, list[list[Any]]], None],
        on_close: Callable[[LoopChannel], None],
        lock: threading.RLock | None = None,
    ) -> None:
        self.loop = loop
        self.sock = sock
        self.ident = ident
        self.on_message = on_message
        self.on_close = on_close
        self.lock = lock if lock is not None else threading.RLock()
        self.tid = threading.get_ident()  # the loop's thread
        self.reader = FrameReader()
        self.pending: deque[_Pending] = deque()
        self.closed = False
        self.corked = False  # sends queue up until uncork(): one syscall for a burst
        self.eof = False  # seen by another thread; the loop's thread closes
        # Threads waiting in Dispatcher.wait that read this channel themselves.  While
        # there are any, the loop's thread stops watching it (``unwatched``) instead of
        # racing them for each message; the last one to leave watches it again.
        self.claimed = 0
        self.unwatched = False
        self.watchers: dict[asyncio.AbstractEventLoop, int] = {}  # other loops reading it
        sock.setblocking(False)
        self.fd = sock.fileno()
        loop.add_reader(self.fd, self._on_readable)

    def _on_readable(self) -> None:
        with self.lock:
            if self.claimed and not self.closed:
                self.loop.remove_reader(self.fd)
                self.unwatched = True
                return
            self.read()

    def claim(self) -> None:
        """A thread starts waiting on this channel (holding ``lock``): the first one
        takes the watch from the loop, so its thread is not woken for what we read."""
        if not self.claimed and not self.unwatched and not self.closed:
            self.loop.remove_reader(self.fd)
            self.unwatched = True
        self.claimed += 1

    def unclaim(self) -> None:
        """A waiting thread leaves (holding ``lock``): the last one hands the watch back.

        ``add_reader`` from this thread: done only for asyncio's selector loops, where it
        is one ``epoll_ctl`` and a dict update (see ``Dispatcher.wait``)."""
        self.claimed -= 1
        if not self.claimed and self.unwatched and not self.closed:
            self.unwatched = False
            self.loop.add_reader(self.fd, self._on_readable)

    def read(self) -> None:
        """Read and deliver what has arrived (any thread, holding ``lock``)."""
        if self.closed or self.eof:
            if self.eof and not self.closed and threading.get_ident() == self.tid:
                self._eof()
            return
        msgs: list[list[Any]] = []
        try:
            alive = self.reader.pump(self.sock, msgs, False)
        except (OSError, RemoteProtocolError):
            alive = False
        if msgs:  # all that one read brought, at once: one flush of what they cause
            self.on_message(self.ident, msgs)
        if not alive and not self.closed:
            self._broken()

    def _broken(self) -> None:
        """End of stream or a failed write: close now on the loop's thread; from another
        thread, mark it and let the loop's thread close (it sees the end of stream too:
        the fd stays readable)."""
        self.eof = True
        if threading.get_ident() == self.tid:
            self._eof()
        else:
            self.loop.call_soon_threadsafe(self._on_readable)

    def _eof(self) -> None:
        self.close()
        self.on_close(self)

    def send(self, frames: Sequence[Any]) -> bool:
        """Queue ``frames`` as one message; False if the channel is closed."""
        if self.closed:
            return False
        if len(frames) == 1 and type(frames[0]) is bytes:
            data = _u32.pack(1) + _lengths_struct(1).pack(len(frames[0])) + frames[0]
            if self.corked or self.pending:
                was_idle = not self.pending
                self.pending.append(_Pending(memoryview(data), []))
                if was_idle and not self.corked:
                    self._write()
                    if self.pending and not self.closed:
                        self._watch_writable()
                return not self.closed
            try:
                sent = self.sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._broken()
                return False
            if sent < len(data):
                self.pending.append(_Pending(memoryview(data)[sent:], []))
                self._watch_writable()
            return True
        parts, fds = _encode(frames)
        views = [_byte_view(p) for p in parts]
        entries = [_Pending(v, []) for v in views if v.nbytes]
        entries[0].fds = fds
        was_idle = not self.pending
        self.pending.extend(entries)
        if was_idle and not self.corked:
            self._write()
            if self.pending and not self.closed:
                self._watch_writable()
        return not self.closed

    def uncork(self) -> None:
        """Write what queued up while corked (``corked`` is set by the sender, the
        dispatcher's flush): one ``sendmsg`` for a burst of small messages."""
        self.corked = False
        if self.pending and not self.closed:
            self._write()
            if self.pending and not self.closed:
                self._watch_writable()

    def _watch_writable(self) -> None:
        if threading.get_ident() == self.tid:
            self.loop.add_writer(self.fd, self._on_writable)
        else:
            self.loop.call_soon_threadsafe(self._on_writable)

    def _on_writable(self) -> None:
        with self.lock:
            self._write()
            if self.pending and not self.closed:
                self.loop.add_writer(self.fd, self._on_writable)

    def _write(self) -> None:
        if self.closed:
            return
        pending = self.pending
        while pending:
            batch: list[_Pending] = []
            fds: list[int] = []
            for e in pending:  # a message's fds must not trail its own bytes
                if len(batch) == IOV_MAX or (batch and len(fds) + len(e.fds) > MAX_FDS):
                    break
                batch.append(e)
                fds.extend(e.fds)
            try:
                sent = self.sock.sendmsg([e.view for e in batch], _scm(fds))
            except BlockingIOError:
                return
            except OSError:
                self._broken()
                return
            # the kernel holds its own references now (they may arrive early: that is
            # fine, the reader keeps them in order until a length asks for one)
            for e in batch:
                if e.fds:
                    _close_all(e.fds)
                    e.fds = []
            while sent and pending:
                head = pending[0]
                if sent >= head.view.nbytes:
                    sent -= head.view.nbytes
                    pending.popleft()
                else:
                    head.view = head.view[sent:]
                    sent = 0
        if threading.get_ident() == self.tid:
            try:
                self.loop.remove_writer(self.fd)
            except Exception:  # the loop may be closed
                pass

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
        for e in self.pending:
            _close_all(e.fds)
        self.pending.clear()
        self.reader.close()
        if not self.watchers:  # else the last to stop watching closes it: an fd
            self.sock.close()  # number reused while still in their selector would clash

    def watch_from(self, loop: asyncio.AbstractEventLoop, reader: Callable[[], None]) -> None:
        """Another loop reads this channel while it awaits (holding ``lock``, on that
        loop's thread); counted per loop."""
        n = self.watchers.get(loop, 0)
        if not n:
            self.claim()
            loop.add_reader(self.fd, reader)
        self.watchers[loop] = n + 1

    def unwatch_from(self, loop: asyncio.AbstractEventLoop, all: bool = False) -> None:
        """One await on ``loop`` ends (or all of them, ``all``): the last hands back."""
        n = self.watchers.get(loop, 0)
        if n > 1 and not all:
            self.watchers[loop] = n - 1
            return
        if not n:
            return
        del self.watchers[loop]
        if not loop.is_closed():
            loop.remove_reader(self.fd)
        if self.closed:
            if not self.watchers:
                self.sock.close()
        else:
            self.unclaim()


def _spin_seconds(default_us: float = 200.0) -> float:
    try:
        us = float(os.environ.get("ASYNCMIRAI_SPIN_US", default_us))
    except ValueError:
        us = default_us
    return max(0.0, min(us, 10_000.0)) * 1e-6


#: Seconds a local daemon polls for its next task after a reply (adaptive, see
#: ``BlockingChannel.recv``), a thread blocked in ``Mirai.result()`` polls its
#: daemon's socketpair before it sleeps (once per call, ``Dispatcher.wait``), and the
#: caller's event loop keeps polling after it sent a short task with nothing queued
#: (``Dispatcher._spin_after``).  Waking a
#: blocked process costs tens of microseconds on a VM: a sequential round trip of a
#: tiny task went from 129 to 69 us (anyio.to_process: 132 us) with the daemon polling
#: 200 us (100 us: 74; 400 us: 64), same run.  ``ASYNCMIRAI_SPIN_US=0`` in the
#: environment turns polling off (local daemons inherit the host's environment).
SPIN = _spin_seconds()


def poll_briefly(poller: select.poll, seconds: float) -> list[tuple[int, int]]:
    """``poller.poll(0)`` until something is ready or ``seconds`` pass (never blocks)."""
    clock = time.perf_counter
    deadline = clock() + seconds
    while True:
        ready = poller.poll(0)
        if ready or clock() >= deadline:
            return ready


class BlockingChannel:
    """Daemon end of a socketpair: blocking send/recv, used by one thread."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(True)
        self.sock = sock
        self.reader = FrameReader()
        self.ready: deque[list[Any]] = deque()
        # Seconds to poll for the next message before blocking (0: never); see recv.
        self.spin = 0.0
        self.spinning = True  # the last message came within ``spin``: poll for the next
        self.poller = select.poll()
        self.poller.register(sock, select.POLLIN)

    def recv(self) -> list[Any]:
        """Block until a message arrives.  Raises EOFError when the host is gone.

        With ``spin`` set, first poll the socket for up to ``spin`` seconds: a blocked
        process's wake-up costs tens of microseconds on a VM, more than the host needs
        to send the next task of a sequential loop, so the daemon that is still awake
        answers sooner.  Adaptive: once a message takes longer than ``spin`` to come,
        polling stops until one again arrives within ``spin`` of asking, so an idle or
        slowly fed daemon burns no CPU beyond one ``spin`` per gap.
        """
        if self.ready:
            return self.ready.popleft()
        spin = self.spin
        if spin:
            start = time.perf_counter()
            if self.spinning and not poll_briefly(self.poller, spin):
                self.spinning = False
        while not self.ready:
            if not self.reader.pump(self.sock, self.ready, True):
                raise EOFError("host closed the channel")
        if spin and not self.spinning:
            self.spinning = time.perf_counter() - start < spin
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
            data = _u32.pack(1) + _lengths_struct(1).pack(len(frames[0])) + frames[0]
            self.sock.sendall(data)
            return
        parts, fds = _encode(frames)
        try:
            views = [v for v in (_byte_view(p) for p in parts) if v.nbytes]
            anc = _scm(fds)
            while views:
                sent = self.sock.sendmsg(views[:IOV_MAX], anc)
                anc = []
                while sent and views:
                    head = views[0]
                    if sent >= head.nbytes:
                        sent -= head.nbytes
                        views.pop(0)
                    else:
                        views[0] = head[sent:]
                        sent = 0
        finally:
            _close_all(fds)
