"""The daemon: a persistent process that evaluates tasks sent by the host.

Started as a fresh interpreter (``python -m asyncmirai daemon URL``) for local, ssh and
cluster launches alike.  It has two channels to the host:

* the *task* channel, owned by the main thread: tasks in, results out.  Calls run in the
  main thread so a cancel can interrupt them with a real signal (``time.sleep`` and
  blocking I/O wake up; pure Python loops see it at the next bytecode).
* the *control* channel, owned by a control thread: cancels and exit requests in, and the
  host-liveness watch.

Local daemons get both channels as inherited socketpairs (``fd://T/C``, see
``_transport``); they die with the host through ``PR_SET_PDEATHSIG`` and end of stream.
Remote daemons dial the host's ROUTER with two ZeroMQ DEALER sockets (CurveZMQ on tcp);
the control thread pings the host and watches the connection with a socket monitor:
when it is gone for ``autoexit`` seconds the daemon exits, so no daemon outlives its host.

With ``concurrency`` k > 1 (sent in the Welcome configuration) the host sends up to k
tasks before any finishes.  The main thread still decodes every task and calls its
function; a plain function runs there, one at a time, as above.  An ``async def`` call
returns a coroutine at once: it is handed to a third thread that runs an asyncio loop
(started with the first coroutine), and the main thread goes back to receiving.  That
thread sends the coroutine's result itself, so the task channel becomes shared: sends
are serialized (see ``_SharedChannel`` and ``_SharedZmq``).  With k == 1 nothing of
this exists and the per-task path is as it always was.
"""

from __future__ import annotations

import ctypes
import gc
import io
import os
import pickle
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, NoReturn, Union

from . import _codecs, _protocol
from ._call import CODE, apply_seed, drop_put, error_record, eval_code, store_put
from ._errors import RemoteProtocolError
from ._protocol import (
    Cancel,
    Cancelled,
    Drop,
    Exit,
    Hello,
    Output,
    Ping,
    Put,
    Refuse,
    Retire,
    Setup,
    Task,
    Welcome,
)
from ._threads import start_thread
from ._transport import SPIN, BlockingChannel

if TYPE_CHECKING:
    import argparse
    import asyncio

    import zmq

    from . import _otel

__all__ = ["main", "register_serial", "run_daemon"]

#: Exit codes a daemon uses, so the host can say why one went away.
EXIT_OK = 0
EXIT_REFUSED = 3
EXIT_HOST_GONE = 4


class _HostCancel(BaseException):
    """Raised in the main thread by the SIGINT handler when the host cancels the task.

    A BaseException so that ``except Exception`` in user code does not swallow it.
    """


def _set_pdeathsig(parent: int) -> None:
    """Ask Linux to SIGKILL us when the process that started us dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(EXIT_HOST_GONE)


def _kill_group() -> None:
    """SIGKILL the rest of this daemon's process group: what its tasks started.

    Only when the daemon leads its group (local daemons: the host starts each in a new
    session); a remote daemon shares its launcher's group and leaves it alone.  The
    host also kills the group after reaping a local daemon, for members forked while
    this scan ran.
    """
    me = os.getpid()
    try:
        if os.getpgrp() != me:
            return
        names = os.listdir("/proc")
    except OSError:
        return
    for name in names:
        if not name.isdigit() or int(name) == me:
            continue
        try:
            if os.getpgid(int(name)) == me:
                os.kill(int(name), signal.SIGKILL)
        except OSError:
            continue


#: True while the cyclic GC is off for start-up (``python -m asyncmirai`` turns it off
#: before importing this module); see ``_resume_gc``.
_GC_PAUSED = False


def _resume_gc() -> None:
    """End of start-up (handshake done, no task run yet): the cyclic GC on again.

    With it off, importing the daemon runs no collections over the ~15,000 objects the
    imports create and keep (~4-5 ms of a ~60 ms start, measured on 3.11).  They are
    frozen first (``gc.freeze``: moved out of every generation, O(1)), so the first task
    does not pay a young collection over all of them (~1.5 ms) and full collections later
    skip them.  The cost: ``gc.get_objects()``/``get_referrers()`` in a task do not see
    those start-up objects, and the few hundred cyclic garbage objects the imports left
    are kept.  The user's own modules, imported by tasks, are collected as usual.
    """
    global _GC_PAUSED
    if _GC_PAUSED:
        _GC_PAUSED = False
        gc.freeze()
        gc.enable()


def _exit(code: int) -> NoReturn:
    """End the daemon now (no interpreter teardown), and its process group with it."""
    _kill_group()
    os._exit(code)


class _Forked:
    """The task end in a process that a task forked (see ``Daemon._after_fork_child``).

    The child never reads or writes the host's channel: if it falls back into the
    daemon's loop (a task that forks and returns in both processes), it exits quietly.
    """

    def send(self, frames: Sequence[Any]) -> None:
        self._leave()

    def recv(self) -> list[Any]:
        self._leave()

    def poll(self, timeout: float | None) -> bool:
        self._leave()

    def close(self) -> None:
        pass

    @staticmethod
    def _leave() -> NoReturn:
        for f in (sys.stdout, sys.stderr):
            try:
                f.flush()
            except Exception:
                pass
        os._exit(EXIT_OK)


_RCVMORE = 13  # zmq.RCVMORE, without importing zmq in local daemons


class _ZmqEnd:
    """The daemon's task socket when it dials the host over ZeroMQ."""

    def __init__(self, sock: zmq.Socket[Any]) -> None:
        self.sock = sock

    def send(self, frames: Sequence[Any]) -> None:
        if len(frames) == 1:
            self.sock.send(frames[0])
        else:
            self.sock.send_multipart(frames, copy=False)

    def recv(self) -> list[Any]:
        sock = self.sock
        frames: list[Any] = [sock.recv()]  # small header: a copy is cheapest
        while sock.getsockopt(_RCVMORE):  # body and tensor frames: zero copy
            frames.append(sock.recv(copy=False).buffer)
        return frames

    def poll(self, timeout: float | None) -> bool:
        return bool(self.sock.poll(None if timeout is None else int(timeout * 1000)))

    def close(self) -> None:
        self.sock.close(linger=1000)


class _ChannelEnd(BlockingChannel):
    """The daemon's task socketpair end (local daemons)."""

    def close(self) -> None:
        self.sock.close()


class _SharedChannel:
    """A socketpair task end shared by the main thread and the coroutine thread.

    Only the main thread receives; both send, one message at a time.  A socket pair is
    full duplex, so a send from one thread while the other waits in ``recv`` is safe.
    """

    def __init__(self, inner: _ChannelEnd) -> None:
        self.inner = inner
        self.lock = threading.Lock()

    def send(self, frames: Sequence[Any]) -> None:
        with self.lock:
            self.inner.send(frames)

    def recv(self) -> list[Any]:
        return self.inner.recv()

    def poll(self, timeout: float | None) -> bool:
        return self.inner.poll(timeout)

    def close(self) -> None:
        # Not while a send is half done (a bounded wait: the host may have stopped reading).
        got = self.lock.acquire(timeout=2.0)
        try:
            self.inner.close()
        finally:
            if got:
                self.lock.release()


class _SharedZmq:
    """A ZeroMQ task socket shared by the main thread and the coroutine thread.

    ZeroMQ sockets are not thread-safe, so one thread at a time touches it, under
    ``cond``'s lock, except while the main thread waits for a message: it then polls
    with the socket to itself (``polling``), and a sender that wants the socket wakes it
    through a pipe and waits for it to step out.  The main thread does not poll again
    while a sender waits.
    """

    def __init__(self, inner: _ZmqEnd) -> None:
        import zmq

        self.inner = inner
        self.cond = threading.Condition()
        self.polling = False
        self.waiting = 0
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.poller = zmq.Poller()
        self.poller.register(inner.sock, zmq.POLLIN)
        self.poller.register(self.wake_r, zmq.POLLIN)

    def send(self, frames: Sequence[Any]) -> None:
        with self.cond:
            if self.polling:
                self.waiting += 1
                try:
                    try:
                        os.write(self.wake_w, b"\0")
                    except BlockingIOError:  # the pipe is full of wake-ups already
                        pass
                    while self.polling:
                        self.cond.wait()
                finally:
                    self.waiting -= 1
                try:
                    self.inner.send(frames)
                finally:
                    self.cond.notify_all()  # the main thread waits for ``waiting == 0``
                return
            self.inner.send(frames)

    def _wait(self, timeout: float | None) -> bool:
        """Main thread: True once a message can be received (False: ``timeout`` passed)."""
        sock = self.inner.sock
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self.cond:
                while self.waiting:
                    self.cond.wait()
                self.polling = True
            try:
                if deadline is None:
                    ms = None
                else:
                    ms = max(0, int((deadline - time.monotonic()) * 1000))
                ready = dict(self.poller.poll(ms))
            finally:
                with self.cond:
                    self.polling = False
                    try:
                        while os.read(self.wake_r, 4096):
                            pass
                    except BlockingIOError:
                        pass
                    self.cond.notify_all()
            if sock in ready:
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False

    def recv(self) -> list[Any]:
        self._wait(None)
        with self.cond:
            return self.inner.recv()  # a whole message is there: this does not block

    def poll(self, timeout: float | None) -> bool:
        return self._wait(timeout)

    def close(self) -> None:
        with self.cond:
            self.inner.close()


class _Forward(io.TextIOBase):
    """A daemon's stdout or stderr, forwarded to the host as Output messages.

    Only the main thread owns the task socket, so text written from other threads waits
    in the buffer until the main thread flushes (after each task at the latest).
    """

    def __init__(self, name: str, daemon: Daemon) -> None:
        self.name = name
        self.daemon = daemon
        self.parts: list[str] = []
        self.size = 0
        self.lock = threading.Lock()

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        with self.lock:
            self.parts.append(s)
            self.size += len(s)
            big = self.size > 65536
        if big:
            self.flush()
        return len(s)

    def flush(self) -> None:
        me = threading.get_ident()
        if me != self.daemon.main_ident and me != self.daemon.coro_ident:
            return
        with self.lock:  # held over the send: two flushing threads keep the text in order
            text = "".join(self.parts)
            self.parts.clear()
            self.size = 0
            if text:
                self.daemon.task.send(_protocol.encode(Output(self.name, text.encode())))


_End = Union[_ZmqEnd, _ChannelEnd, _Forked, _SharedChannel, _SharedZmq]  # noqa: UP007 - 3.10
_CURRENT: Daemon | None = None


def register_serial(configs: Sequence[_codecs.SerialConfig]) -> None:
    """Setup call sent by ``everywhere(_serial=...)``: extend this daemon's codec table."""
    d = _CURRENT
    if d is not None:
        d.table = d.table.extend(configs)


class Daemon:
    """One daemon process's state.  Create, then :meth:`run` (blocks until exit)."""

    def __init__(
        self,
        url: str,
        *,
        launch: str = "",
        autoexit: float = 5.0,
        ping: float = 1.0,
        curve: tuple[bytes, bytes, bytes] | None = None,
    ) -> None:
        self.url = url
        self.launch = launch
        self.autoexit = autoexit
        self.ping_interval = ping
        token = os.urandom(8)
        self.token = token
        self.ctx: zmq.Context[Any] | None = None
        self.ctrl_sock: zmq.Socket[Any] | None = None
        self.ctrl_channel: BlockingChannel | None = None
        self.task: _End
        if url.startswith("fd://"):  # local daemon: socketpairs inherited from the host
            task_fd, ctrl_fd = (int(x) for x in url[len("fd://") :].split("/"))
            self.task = _ChannelEnd(socket.socket(fileno=task_fd))
            self.ctrl_channel = BlockingChannel(socket.socket(fileno=ctrl_fd))
        else:
            import zmq  # only daemons that dial over ZeroMQ pay for importing it

            self.ctx = zmq.Context()
            task_sock = self._dial(b"t" + token, curve)
            self.task = _ZmqEnd(task_sock)
            self.ctrl_sock = self._dial(b"c" + token, curve)
            # Created here, on the task socket's own thread; read by the control thread.
            self.task_monitor = task_sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.table = _codecs.DEFAULT_TABLE
        self.lock = threading.Lock()
        self.current: int | None = None  # task id running in the main thread
        self.cancel_target: int | None = None
        self.precancelled: set[int] = set()
        self.revoked: set[int] = set()
        self.seen: set[int] = set()  # ids of tasks this daemon has taken up (recent)
        self.seen_order: deque[int] = deque()
        self.async_task: Any = None  # asyncio.Task of a running coroutine
        self.loop: Any = None  # asyncio loop, created on first coroutine
        # concurrency > 1: coroutines run on their own loop in the coroutine thread
        self.concurrency = 1
        self.coro_loop: asyncio.AbstractEventLoop | None = None
        self.coro_ident: int | None = None  # the coroutine thread
        self.coro_ids: set[int] = set()  # coroutine tasks handed over, not yet answered
        self.coro_cancels: set[int] = set()  # ... of which the host cancelled these
        self.coro_tasks: dict[int, asyncio.Future[Any]] = {}  # coroutine thread only
        self.coro_inbox: deque[tuple[int, Any]] = deque()  # main thread -> coroutine thread
        self.coro_posted = False
        self.coro_last = 0.0  # when the last coroutine finished (idletime)
        self.finishing = 0  # coroutines that returned and whose reply is being sent
        self.exiting = False
        self.finish_cond = threading.Condition(self.lock)
        self.main_ident = threading.get_ident()
        self.maxtasks: int | None = None
        self.idletime: float | None = None
        self.walltime: float | None = None
        self.forwarders: list[_Forward] = []
        self.done = 0
        self.last_done: int | None = None  # last task replied to (reported in pings)
        self.drops = 0  # disconnects of the task connection (ZeroMQ daemons)
        self.done_drops = 0  # ``drops`` when the last reply was sent
        self.retiring = False
        self.started = time.monotonic()
        self.pid = os.getpid()
        self.forked_from: int | None = None  # set in a process forked by a task
        self.held: tuple[Any, ...] = ()

    def _dial(self, ident: bytes, curve: tuple[bytes, bytes, bytes] | None) -> zmq.Socket[Any]:
        import zmq

        assert self.ctx is not None
        s = self.ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.ROUTING_ID, ident)
        s.setsockopt(zmq.LINGER, 2000)
        s.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        s.setsockopt(zmq.HEARTBEAT_TIMEOUT, max(3000, int(self.autoexit * 1000)))
        s.setsockopt(zmq.RECONNECT_IVL, 100)
        s.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        if curve is not None:
            server_key, public, secret = curve
            s.curve_serverkey = server_key
            s.curve_publickey = public
            s.curve_secretkey = secret
        if self.url.startswith("tcp://[") or "::" in self.url:
            s.setsockopt(zmq.IPV6, 1)
        s.connect(self.url)
        return s  # type: ignore[no-any-return]

    # -- control thread ------------------------------------------------------------
    def _ctrl_loop_channel(self) -> None:
        """Control path of a local daemon: end of stream means the host is gone."""
        ch = self.ctrl_channel
        assert ch is not None
        ch.send(_protocol.encode(self._hello("ctrl")))
        while True:
            try:
                frames = ch.recv()
            except (EOFError, OSError, RemoteProtocolError):
                _exit(EXIT_HOST_GONE)
            self._on_control(frames, ch.send)

    def _ctrl_loop(self) -> None:
        if self.ctrl_channel is not None:
            return self._ctrl_loop_channel()
        import zmq

        ctrl = self.ctrl_sock
        assert ctrl is not None
        # Connected means the handshake succeeded: a daemon the host refuses (wrong
        # CurveZMQ keys) reconnects forever at the TCP level, so it must count as gone.
        failed = (
            zmq.EVENT_HANDSHAKE_FAILED_AUTH
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
        )
        mon = ctrl.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | failed
        )
        refused = False
        poller = zmq.Poller()
        poller.register(ctrl, zmq.POLLIN)
        poller.register(mon, zmq.POLLIN)
        task_mon = self.task_monitor
        poller.register(task_mon, zmq.POLLIN)
        ctrl.send_multipart(_protocol.encode(self._hello("ctrl")))
        gone_since: float | None = time.monotonic()
        next_ping = 0.0
        period = max(50, int(min(self.ping_interval, self.autoexit / 4) * 1000))
        while True:
            events = dict(poller.poll(period))
            now = time.monotonic()
            if task_mon in events:
                while task_mon.poll(0):
                    task_mon.recv_multipart()
                    self.drops += 1
                # The host counts a disconnect as loss after a short grace: a ping soon
                # after (the task socket reconnects within ~0.1 s) says we are here.
                next_ping = min(next_ping, now + 0.3)
            if mon in events:
                while mon.poll(0):
                    ev = mon.recv_multipart()
                    code = int.from_bytes(ev[0][:2], "little")
                    if code == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                        gone_since = None
                        next_ping = now  # (re)connected: tell the host at once
                        continue
                    if code & failed and not refused:
                        refused = True
                        print(
                            "asyncmirai daemon: handshake with the host failed (wrong "
                            "CurveZMQ keys?); exiting after --autoexit seconds",
                            file=sys.stderr,
                            flush=True,
                        )
                    if gone_since is None:
                        gone_since = now
            if ctrl in events:
                while ctrl.poll(0):
                    self._on_control(
                        ctrl.recv_multipart(), lambda f: ctrl.send_multipart(f, zmq.NOBLOCK)
                    )
            if gone_since is not None and now - gone_since > self.autoexit:
                _exit(EXIT_HOST_GONE)
            if now >= next_ping:
                # Never block: with no handshaken peer a DEALER send waits forever, and
                # this loop is what enforces autoexit.
                try:
                    ping = Ping(self.current, self.last_done, self.drops, self.done_drops)
                    ctrl.send_multipart(_protocol.encode(ping), zmq.NOBLOCK)
                except zmq.Again:
                    pass
                next_ping = now + self.ping_interval

    def _on_control(self, frames: list[Any], send: Any) -> None:
        """A message on the control channel: a cancel or revoke (acknowledged through
        ``send``), or exit now."""
        try:
            msg = _protocol.decode(frames)
        except RemoteProtocolError:
            return
        if isinstance(msg, Cancel):
            if self._on_cancel(msg.id, msg.revoke):
                send(_protocol.encode(Cancelled(msg.id, revoked=True)))
        elif isinstance(msg, Exit):
            _exit(EXIT_OK)

    def _on_cancel(self, task_id: int, revoke: bool = False) -> bool:
        """Handle a cancel (control thread).  Returns True when a revoke was granted:
        the caller acknowledges it, and the main thread will skip that task unseen."""
        with self.lock:
            if revoke:  # take back a prefetched task, only if it has not started
                if task_id in self.seen:
                    return False  # started or done already: it runs to its normal end
                if len(self.revoked) > 10_000:
                    self.revoked.clear()
                self.revoked.add(task_id)
                return True
            if self.current == task_id:
                if self.async_task is not None and self.loop is not None:
                    self.loop.call_soon_threadsafe(self.async_task.cancel)
                else:
                    self.cancel_target = task_id
                    signal.pthread_kill(self.main_ident, signal.SIGINT)
            elif task_id in self.coro_ids:  # a coroutine on the coroutine thread
                if task_id not in self.coro_cancels and self.coro_loop is not None:
                    self.coro_cancels.add(task_id)
                    self.coro_loop.call_soon_threadsafe(self._cancel_coro, task_id)
            else:
                if len(self.precancelled) > 10_000:  # stale ids of tasks that finished
                    self.precancelled.clear()
                self.precancelled.add(task_id)
        return False

    def _sigint(self, signum: int, frame: Any) -> None:
        # Runs in the main thread between bytecodes.  Only a cancel aimed at the task that
        # is running *now* raises; a late signal for a finished task is ignored.
        if self.cancel_target is not None and self.cancel_target == self.current:
            self.cancel_target = None
            raise _HostCancel()

    # -- main thread ---------------------------------------------------------------
    def _hello(self, role: str) -> Hello:
        return Hello(
            os.getpid(),
            socket.gethostname(),
            role,
            self.token,
            self.launch,
            _protocol.PROTOCOL_VERSION,
        )

    def _configure(self, body: bytes) -> None:
        cfg = pickle.loads(body)
        serial = cfg.get("serial") or ()
        if serial:
            self.table = _codecs.CodecTable(serial)
        os.environ.update(cfg.get("env") or {})
        self.maxtasks = cfg.get("maxtasks")
        self.idletime = cfg.get("idletime")
        self.walltime = cfg.get("walltime")
        if cfg.get("log_level") is not None:  # daemons(log_level=): records to the host
            from ._logs import install

            install(self, cfg["log_level"])
        self.concurrency = max(1, int(cfg.get("concurrency") or 1))
        if self.concurrency == 1:
            if isinstance(self.task, _ChannelEnd):
                self.task.spin = SPIN  # one task at a time: poll briefly for the next
        else:  # a second thread will send results: share the task end
            if isinstance(self.task, _ChannelEnd):
                self.task = _SharedChannel(self.task)
            elif isinstance(self.task, _ZmqEnd):
                self.task = _SharedZmq(self.task)
            # Coroutines will run here: import asyncio now rather than inside the first
            # coroutine task (~20 ms on this machine's 3.11).  In this thread: importing
            # it from a helper thread while a task imports other modules deadlocked on
            # the import locks (found by a stress run; logging, concurrent.futures).
            import asyncio  # noqa: F401

    def _after_fork_child(self) -> None:
        """In a process forked by a task: cut it off from the host's channels.

        The socketpair ends are closed (in the child only: the daemon keeps its own), the
        ZeroMQ sockets are dropped unused (libzmq's threads do not survive a fork), and
        the task end is replaced by one that ends the child if it ever comes back to the
        daemon's loop.  Output goes to the real stdout/stderr again.
        """
        self.forked_from = self.pid
        self.pid = os.getpid()
        self.held = (self.task, self.ctrl_sock, self.ctx)  # never finalized in the child
        inner = self.task.inner if isinstance(self.task, (_SharedChannel, _SharedZmq)) else None
        if isinstance(self.task, _ChannelEnd):
            self.task.close()
        elif isinstance(inner, _ChannelEnd):
            inner.sock.close()  # not under the shared lock: another thread may hold it
        if self.ctrl_channel is not None:
            self.ctrl_channel.sock.close()
        self.task = _Forked()
        self.coro_loop = None  # the coroutine thread does not exist in this process
        self.ctrl_channel = None
        self.ctrl_sock = None
        if self.forwarders:
            self.forwarders = []
            sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
        try:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        except ValueError:  # forked from a thread other than the main one
            pass

    def run(self) -> int:
        """Handshake, then evaluate tasks until told to exit.  Returns the exit code."""
        global _CURRENT
        _CURRENT = self
        os.register_at_fork(after_in_child=self._after_fork_child)
        signal.signal(signal.SIGINT, self._sigint)
        end = self.task
        end.send(_protocol.encode(self._hello("task")))
        start_thread(self._ctrl_loop, name="asyncmirai-ctrl")
        while True:  # handshake
            msg = _protocol.decode(end.recv())
            if isinstance(msg, Welcome):
                self._configure(msg.body)
                break
            if isinstance(msg, Refuse):
                print(f"asyncmirai daemon: refused by host: {msg.reason}", file=sys.stderr)
                return EXIT_REFUSED
            if isinstance(msg, Exit):
                return EXIT_OK
        _resume_gc()
        end = self.task  # shared between threads now if concurrency > 1
        multi = self.concurrency > 1
        run_task = self._run_task_multi if multi else self._run_task
        idle = self.idletime
        while True:
            if idle is not None and not self.retiring and not end.poll(idle):
                if multi and not self._idle_multi(idle):
                    continue
                self._retire("idletime")
                continue
            try:
                frames = end.recv()
            except EOFError:
                return EXIT_HOST_GONE
            try:
                msg = _protocol.decode(frames)
            except RemoteProtocolError as exc:
                print(f"asyncmirai daemon: dropped a bad message: {exc}", file=sys.stderr)
                continue
            if isinstance(msg, Task):
                run_task(msg)
            elif isinstance(msg, Setup):
                self._run_setup(msg)
            elif isinstance(msg, Put):  # an am.put object, before the task that uses it
                self._store_put(msg)
            elif isinstance(msg, Drop):
                drop_put(msg.id)
            elif isinstance(msg, Exit):
                # After a Retire the host answers Exit; tasks it sent before seeing the
                # Retire arrive first (one ordered socket), so none is dropped.  (An exit
                # that must not wait comes on the control channel.)
                if multi:
                    self._finish_coroutines()
                return EXIT_OK

    def _store_put(self, msg: Put) -> None:
        """Cache an ``am.put`` object; one that fails to decode is stored as its error,
        raised by every task that uses it."""
        try:
            store_put(msg.id, _codecs.loads(msg.body, msg.descriptors, msg.buffers, self.table))
        except Exception as exc:
            print(
                f"asyncmirai daemon: am.put object {msg.id} failed to decode: {exc}",
                file=sys.stderr,
            )
            drop_put(msg.id)

    def _retire_reason(self) -> str:
        if self.retiring:
            return ""
        if self.maxtasks is not None and self.done >= self.maxtasks:
            return "maxtasks"
        if self.walltime is not None and time.monotonic() - self.started >= self.walltime:
            return "walltime"
        return ""

    def _retire(self, reason: str) -> None:
        """Tell the host we retire; keep serving until it answers Exit."""
        with self.lock:  # with coroutines, two threads may decide it at once
            if self.retiring:
                return
            self.retiring = True
        self.task.send(_protocol.encode(Retire(reason)))

    def _payload(self, body: Any, descriptors: list[Any], buffers: Sequence[Any]) -> Any:
        kind, fn, args, kwargs = _codecs.loads(body, descriptors, buffers, self.table)
        if kind == CODE:
            return eval_code(fn, dict(kwargs))
        result = fn(*args, **kwargs)
        if hasattr(result, "__await__"):
            return self._await(result)
        return result

    def _await(self, awaitable: Any) -> Any:
        import asyncio

        if self.loop is None:
            self.loop = asyncio.new_event_loop()
        loop = self.loop

        async def runner() -> Any:
            return await awaitable

        task = loop.create_task(runner())
        with self.lock:
            self.async_task = task
        try:
            return loop.run_until_complete(task)
        except asyncio.CancelledError:
            if self.current is not None and task.cancelled():
                raise _HostCancel() from None
            raise
        finally:
            with self.lock:
                self.async_task = None

    def _run_task(self, msg: Task) -> None:
        tid = msg.id
        try:
            try:
                # Inside the try: a cancel signal may land right after ``current`` is set.
                with self.lock:
                    if tid in self.revoked:  # taken back (and acknowledged) already
                        self.revoked.discard(tid)
                        return
                    self.seen.add(tid)
                    self.seen_order.append(tid)
                    if len(self.seen_order) > 4096:
                        self.seen.discard(self.seen_order.popleft())
                    if self.retiring:  # arrived after we said we retire: run elsewhere
                        self.task.send(_protocol.encode(Cancelled(tid, revoked=True)))
                        return
                    if tid in self.precancelled:
                        self.precancelled.discard(tid)
                        raise _HostCancel()
                    self.current = tid
                span = None
                if msg.extra:
                    apply_seed(msg.extra.get("seed"))
                    from . import _otel  # on first use: most daemons never trace

                    span = _otel.daemon_span(msg.extra, tid)  # None unless traced here
                if span is None:
                    value = self._payload(msg.body, msg.descriptors, msg.buffers)
                else:
                    with span:
                        value = self._payload(msg.body, msg.descriptors, msg.buffers)
                ok = True
            except _HostCancel:
                raise
            except BaseException as exc:  # the user's error, whatever it is
                value, ok = error_record(exc), False
            with self.lock:
                self.current = None
                self.cancel_target = None
        except _HostCancel:
            with self.lock:
                self.current = None
                self.cancel_target = None
            self.done += 1
            self._maybe_retire()
            self.task.send(_protocol.encode(Cancelled(tid)))
            self.last_done = tid
            return
        self.done += 1
        self._maybe_retire()  # before the reply, so the host never sends us another task
        self._reply(tid, ok, value)
        self.done_drops = self.drops
        self.last_done = tid

    def _maybe_retire(self) -> None:
        why = self._retire_reason()
        if why:
            self._retire(why)

    # -- concurrency > 1 -----------------------------------------------------------
    def _run_task_multi(self, msg: Task) -> None:
        """``_run_task`` when the daemon runs several tasks at once (main thread).

        The function is called here: a plain one runs to its end (and may be cancelled
        by SIGINT, as with one task at a time); an awaitable it returns is handed to the
        coroutine thread, which replies for it, and this returns at once.
        """
        tid = msg.id
        value: Any = None
        inner: Any = None  # a traced coroutine's own awaitable (``value`` wraps it)
        span: _otel._RunSpan | None = None
        try:
            try:
                with self.lock:
                    if tid in self.revoked:
                        self.revoked.discard(tid)
                        return
                    self.seen.add(tid)
                    self.seen_order.append(tid)
                    if len(self.seen_order) > 4096:
                        self.seen.discard(self.seen_order.popleft())
                    if self.retiring:
                        self.task.send(_protocol.encode(Cancelled(tid, revoked=True)))
                        return
                    if tid in self.precancelled:
                        self.precancelled.discard(tid)
                        raise _HostCancel()
                    self.current = tid
                if msg.extra:
                    apply_seed(msg.extra.get("seed"))
                    if "otel" in msg.extra:
                        from . import _otel

                        span = _otel.daemon_span(msg.extra, tid)  # None unless traced here
                kind, fn, args, kwargs = _codecs.loads(
                    msg.body, msg.descriptors, msg.buffers, self.table
                )
                if kind == CODE:
                    if span is None:
                        value = eval_code(fn, dict(kwargs))
                    else:
                        with span:
                            value = eval_code(fn, dict(kwargs))
                else:
                    value = fn(*args, **kwargs) if span is None else span.call(fn, args, kwargs)
                    if hasattr(value, "__await__"):
                        if span is not None:  # ends when the coroutine does, on its loop
                            inner, value = value, _otel.traced(span, value)
                        loop = self._coroutine_loop()
                        with self.lock:
                            # A cancel that found this task in ``current`` chose SIGINT;
                            # its signal may not have been handled yet: honour it here.
                            # Otherwise no SIGINT aims at this task and nothing below
                            # can raise _HostCancel.
                            if self.cancel_target == tid:
                                self.cancel_target = None
                                raise _HostCancel()
                            self.current = None
                            self.coro_ids.add(tid)
                            # Batched: a burst of k tasks wakes the coroutine thread once
                            # (one self-pipe write), not k times.  A cancel posted later
                            # still runs after the drain that starts this task.
                            self.coro_inbox.append((tid, value))
                            if not self.coro_posted:
                                self.coro_posted = True
                                loop.call_soon_threadsafe(self._drain_coros)
                        return
                ok = True
            except _HostCancel:
                raise
            except BaseException as exc:
                value, ok = error_record(exc), False
            with self.lock:
                self.current = None
                self.cancel_target = None
        except _HostCancel:
            with self.lock:
                self.current = None
                self.cancel_target = None
            for aw in (value, inner):  # coroutines that will never run
                close = getattr(aw, "close", None)
                if close is not None and hasattr(aw, "__await__"):
                    close()
            if span is not None:
                span.finish(_HostCancel, None)
            why = self._count_done()
            if why:
                self.task.send(_protocol.encode(Retire(why)))
            self.task.send(_protocol.encode(Cancelled(tid)))
            self.last_done = tid
            return
        why = self._count_done()
        if why:  # before the reply, so the host sends no other task
            self.task.send(_protocol.encode(Retire(why)))
        self._reply(tid, ok, value)
        self.done_drops = self.drops
        self.last_done = tid

    def _count_done(self) -> str:
        """One more task finished.  Returns why the daemon retires now, or "": the
        caller then sends Retire before the reply (once: ``retiring`` is set here)."""
        with self.lock:
            self.done += 1
            why = self._retire_reason()
            if why:
                self.retiring = True
        return why

    def _coroutine_loop(self) -> asyncio.AbstractEventLoop:
        """The coroutine thread's loop; started on first use (main thread)."""
        loop = self.coro_loop
        if loop is not None:
            return loop
        import asyncio

        loop = asyncio.new_event_loop()
        # Set before the thread starts: calls queued before its loop runs wait for it.
        self.coro_loop = loop

        def serve() -> None:
            self.coro_ident = threading.get_ident()
            asyncio.set_event_loop(loop)
            while True:
                try:
                    loop.run_forever()
                    return  # stopped (exit)
                except BaseException:
                    # KeyboardInterrupt or SystemExit from a task leaves run_forever;
                    # the task holds it as its exception and is answered as an error.
                    continue

        threading.Thread(target=serve, name="asyncmirai-coroutines", daemon=True).start()
        return loop

    def _drain_coros(self) -> None:
        """Coroutine thread: start every coroutine the main thread handed over."""
        self.coro_posted = False  # before draining: a later hand-over posts again
        inbox = self.coro_inbox
        while inbox:
            tid, awaitable = inbox.popleft()
            self._start_coro(tid, awaitable)

    def _start_coro(self, tid: int, awaitable: Any) -> None:
        """Coroutine thread: run the task's awaitable; ``_coro_done`` replies for it."""
        import asyncio

        loop = self.coro_loop
        assert loop is not None
        try:
            fut = asyncio.ensure_future(awaitable, loop=loop)
        except BaseException as exc:  # not something this loop can await
            fut = loop.create_future()
            fut.set_exception(exc)
        self.coro_tasks[tid] = fut
        fut.add_done_callback(lambda f: self._coro_done(tid, f))

    def _cancel_coro(self, tid: int) -> None:
        """Coroutine thread: the host cancelled ``tid`` (it may have finished already)."""
        fut = self.coro_tasks.get(tid)
        if fut is not None:
            fut.cancel()

    def _coro_done(self, tid: int, fut: asyncio.Future[Any]) -> None:
        """Coroutine thread: answer a finished coroutine, exactly once."""
        self.coro_tasks.pop(tid, None)
        with self.lock:
            if self.exiting:
                return
            self.coro_ids.discard(tid)
            asked = tid in self.coro_cancels
            self.coro_cancels.discard(tid)
            self.finishing += 1
            self.coro_last = time.monotonic()
        try:
            why = self._count_done()
            if why:
                self.task.send(_protocol.encode(Retire(why)))
            if fut.cancelled():
                if asked:
                    self.task.send(_protocol.encode(Cancelled(tid)))
                    self.last_done = tid
                    return
                import asyncio

                value, ok = error_record(asyncio.CancelledError()), False
            else:
                exc = fut.exception()
                if exc is None:
                    value, ok = fut.result(), True
                else:
                    value, ok = error_record(exc), False
            self._reply(tid, ok, value)
            self.done_drops = self.drops
            self.last_done = tid
        except BaseException as exc:  # the task end is gone; the main thread sees it too
            print(f"asyncmirai daemon: cannot reply for task {tid}: {exc!r}", file=sys.stderr)
        finally:
            with self.lock:
                self.finishing -= 1
                self.finish_cond.notify_all()

    def _setup_multi(self, msg: Setup) -> Any:
        """An ``everywhere()`` call when coroutines run on the coroutine thread: an
        awaitable it returns runs there too (so what it creates, a client or a pool,
        belongs to the loop the tasks run on); the main thread waits for it."""
        kind, fn, args, kwargs = _codecs.loads(msg.body, msg.descriptors, msg.buffers, self.table)
        if kind == CODE:
            return eval_code(fn, dict(kwargs))
        value = fn(*args, **kwargs)
        if not hasattr(value, "__await__"):
            return value
        import asyncio

        async def runner() -> Any:
            return await value

        return asyncio.run_coroutine_threadsafe(runner(), self._coroutine_loop()).result()

    def _idle_multi(self, idle: float) -> bool:
        """No message for ``idle`` seconds: is the daemon really idle (no coroutine runs
        and none finished within ``idle`` seconds)?"""
        with self.lock:
            if self.coro_ids or self.finishing:
                return False
            return time.monotonic() - self.coro_last >= idle

    def _finish_coroutines(self) -> None:
        """Exit on the task channel (the host's answer to Retire): the coroutines still
        in flight run to their end (or their cancel) and reply first.  The host sends no
        new task after a Retire; to end at once it sends Exit on the control channel."""
        with self.lock:
            while self.coro_ids or self.finishing:
                self.finish_cond.wait()
            self.exiting = True

    def forward_output(self) -> None:
        """Send what is printed to stdout/stderr to the host (remote daemons)."""
        self.forwarders = [_Forward("stdout", self), _Forward("stderr", self)]
        sys.stdout, sys.stderr = self.forwarders

    def _flush_output(self) -> None:
        for f in self.forwarders:
            f.flush()

    def _run_setup(self, msg: Setup) -> None:
        from . import _otel

        try:
            with _otel.setup_span(msg.extra, msg.id):
                if self.concurrency > 1:
                    value, ok = self._setup_multi(msg), True
                else:
                    value, ok = self._payload(msg.body, msg.descriptors, msg.buffers), True
        except BaseException as exc:
            value, ok = error_record(exc), False
        self._reply(msg.id, ok, value)

    def _reply(self, tid: int, ok: bool, value: Any) -> None:
        if self.forwarders:  # what the task printed arrives before its result
            self._flush_output()
        try:
            body, desc, bufs = _codecs.dumps(value, self.table)
        except BaseException as exc:
            err = TypeError(
                f"result of type {type(value).__qualname__} cannot be serialized: {exc}"
            )
            body, desc, bufs = _codecs.dumps(error_record(err), _codecs.DEFAULT_TABLE)
            ok = False
        self.task.send(_protocol.encode_result(tid, ok, body, desc, bufs))


def _parser() -> argparse.ArgumentParser:
    """The ``daemon`` sub-command's parser: what it accepts, its help and its errors."""
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m asyncmirai daemon",
        description="Start an asyncmirai daemon that dials the host at URL and runs its tasks.",
    )
    p.add_argument("url", help="host URL, e.g. ipc:///tmp/x/sock or tcp://10.0.0.1:5555")
    p.add_argument("--launch", default="", help="launch id given by the host (bookkeeping)")
    p.add_argument("--parent", type=int, default=0, help="pid of the local host: exit when it dies")
    p.add_argument(
        "--autoexit",
        type=float,
        default=5.0,
        help="seconds without a connection to the host before exiting (default 5)",
    )
    p.add_argument("--ping", type=float, default=1.0, help="seconds between liveness pings")
    p.add_argument(
        "--output",
        action="store_true",
        help="send this daemon's stdout/stderr to the host (shown there, prefixed)",
    )
    p.add_argument("--curve-server-key", help="host's CurveZMQ public key (Z85)")
    p.add_argument("--curve-public-key", help="this daemon's CurveZMQ public key (Z85)")
    p.add_argument(
        "--secret-fd",
        type=int,
        metavar="N",
        help="read this daemon's CurveZMQ secret key (one Z85 line) from fd N (0: stdin)",
    )
    p.add_argument(
        "--secret-file",
        metavar="PATH",
        help="read the secret key from PATH (mode 0600, owned by this user), then delete it",
    )
    # Secrets never go on a command line (/proc/PID/cmdline is world-readable).
    p.add_argument("--curve-secret-key", help=argparse.SUPPRESS)
    return p


# The parser's options that take a value, with their types and defaults, for _fast_args.
_FAST_OPTIONS: dict[str, tuple[Callable[[str], Any], Any]] = {
    "--launch": (str, ""),
    "--parent": (int, 0),
    "--autoexit": (float, 5.0),
    "--ping": (float, 1.0),
    "--curve-server-key": (str, None),
    "--curve-public-key": (str, None),
    "--secret-fd": (int, None),
    "--secret-file": (str, None),
}


def _fast_args(argv: Sequence[str]) -> Any:
    """What ``_parser().parse_args(argv)`` returns, for the plain argvs that hosts and
    launchers write (``URL`` and exact ``--option VALUE``, ``--option=VALUE``,
    ``--output``); None for anything else, which then goes through argparse.

    Why: building and running the argparse parser cost ~5 ms of a local daemon's ~60 ms
    start to its handshake (importing argparse, and shutil with bz2/lzma for the help
    width; compiling its regexes: measured on 3.11).  Anything unusual (help, an
    abbreviation, ``--``, a value that starts with "-" or does not convert, a repeated
    URL, the refused ``--curve-secret-key``) returns None, so argparse still decides
    what is accepted and writes every message.  tests/test_startup.py checks both agree.
    """
    values: dict[str, Any] = {}
    url = None
    output = False
    it = iter(argv)
    for tok in it:
        if not tok.startswith("-"):
            if url is not None:
                return None
            url = tok
            continue
        if tok == "--output":
            output = True
            continue
        name, eq, value = tok.partition("=")
        spec = _FAST_OPTIONS.get(name)
        if spec is None:
            return None
        if not eq:
            value = next(it, "")
            if value.startswith("-"):
                return None
        if not value:
            return None
        try:
            values[name] = spec[0](value)
        except ValueError:
            return None
    if url is None:
        return None
    ns = {k[2:].replace("-", "_"): values.get(k, d) for k, (_, d) in _FAST_OPTIONS.items()}
    return SimpleNamespace(url=url, output=output, curve_secret_key=None, **ns)


def run_daemon(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m asyncmirai daemon``; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    args = _fast_args(argv)
    if args is None:
        args = _parser().parse_args(argv)
    if args.parent:
        _set_pdeathsig(args.parent)
    if args.curve_secret_key is not None:
        _parser().error(
            "--curve-secret-key is not accepted: a key on the command line is readable by "
            "every local user; pass it with --secret-fd N (e.g. 0: stdin) or --secret-file"
        )
    curve = None
    public = (args.curve_server_key, args.curve_public_key)
    given = args.secret_fd is not None or args.secret_file is not None
    if any(public) or given:
        if not all(public) or not given:
            _parser().error(
                "--curve-server-key, --curve-public-key and a secret key (--secret-fd or "
                "--secret-file) go together"
            )
        if args.secret_fd is not None and args.secret_file is not None:
            _parser().error("give --secret-fd or --secret-file, not both")
        from ._security import SecretError, read_secret_fd, read_secret_file

        try:
            if args.secret_fd is not None:
                secret = read_secret_fd(args.secret_fd)
            else:
                secret = read_secret_file(args.secret_file)
        except SecretError as exc:
            _parser().error(str(exc))
        curve = (public[0].encode(), public[1].encode(), secret)
    d = Daemon(args.url, launch=args.launch, autoexit=args.autoexit, ping=args.ping, curve=curve)
    if args.output:
        d.forward_output()
    code = d.run()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: the host may already be gone and zmq's linger must not
    # keep us alive; results were flushed by LINGER on close.
    d.task.close()
    _exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m asyncmirai`` dispatcher for sub-commands."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m asyncmirai daemon URL [options]   (see: daemon --help)")
        return 0 if argv else 2
    if argv[0] == "daemon":
        return run_daemon(argv[1:])
    print(f"unknown command {argv[0]!r}; try: python -m asyncmirai daemon --help", file=sys.stderr)
    return 2
