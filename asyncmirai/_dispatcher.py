"""The dispatcher: one ROUTER socket, a FIFO queue, and the state of every daemon.

Everything here runs on ONE asyncio loop thread (the caller's loop, or the profile's
private loop thread); other threads reach it with ``loop.call_soon_threadsafe``.

Deviation from DESIGN.md §2, measured: instead of one long-lived coroutine per daemon,
each daemon's state lives in a :class:`DaemonConn` object that the socket's reader callback
updates directly.  A coroutine per daemon costs one extra loop wake-up (a future set, a
task step) per message; on the 2-vCPU dev VM that was ~15 us of a ~100 us round trip.
The state machine is the same: a daemon is *idle* (no task), *busy* (one task in flight,
maybe being cancelled) or gone; a task is only ever sent to an idle daemon.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import zmq

from . import _codecs, _protocol
from ._errors import (
    DaemonError,
    MiraiError,
    MiraiTimeout,
    RemoteProtocolError,
    error_from_record,
)
from ._handle import CANCELLED, ERROR, VALUE, Mirai
from ._protocol import (
    PROTOCOL_VERSION,
    Cancel,
    Cancelled,
    Exit,
    Hello,
    Output,
    Ping,
    Refuse,
    Result,
    Retire,
    Welcome,
)
from ._transport import LoopChannel

__all__ = ["DaemonConn", "Dispatcher", "SetupItem"]

log = logging.getLogger("asyncmirai")

_Again = zmq.Again
_NOBLOCK = zmq.NOBLOCK
#: A remote daemon whose pings, this long after a task was sent, say it neither runs nor
#: ran it, lost the task message in a connection drop.
LOST_AFTER = 3.0
_POLLIN = zmq.POLLIN
_EVENTS = zmq.EVENTS
_RCVMORE = zmq.RCVMORE
_SNDMORE = zmq.SNDMORE


class DaemonConn:
    """What the dispatcher knows about one connected daemon."""

    __slots__ = (
        "token",
        "ident",
        "ctrl_ident",
        "pid",
        "host",
        "launch",
        "task",
        "setups_pending",
        "done",
        "connected_at",
        "last_seen",
        "retiring",
        "alive",
        "local",
        "cancel_timer",
        "sent_at",
        "next",
        "drops",
        "sent_drops",
    )

    def __init__(self, token: bytes) -> None:
        self.token = token
        self.ident = b""
        self.ctrl_ident = b""
        self.pid = 0
        self.host = ""
        self.launch = ""
        self.task: Mirai[Any] | None = None  # the task in flight, if any
        self.setups_pending = 0
        self.done = 0
        self.connected_at = time.time()
        self.last_seen = time.monotonic()
        self.retiring = False
        self.alive = True
        self.local = False
        self.cancel_timer: asyncio.TimerHandle | None = None
        self.sent_at = 0.0  # when the task in flight was sent
        self.next: Mirai[Any] | None = None  # prefetched behind ``task`` (local daemons)
        self.drops = 0  # task-connection disconnects the daemon reported (pings)
        self.sent_drops = 0  # ``drops`` when the task in flight was sent

    @property
    def idle(self) -> bool:
        return self.task is None and self.setups_pending == 0 and not self.retiring

    def row(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "host": self.host,
            "launch": self.launch,
            "busy": self.task is not None,
            "tasks_done": self.done,
            "connected_at": self.connected_at,
            "local": self.local,
        }


class SetupItem:
    """One ``everywhere()`` call: its frames (replayed later) and who still owes a reply."""

    __slots__ = ("id", "frames", "handle", "waiting", "need_more", "results", "error")

    def __init__(self, id: int, frames: list[Any], handle: Mirai[Any], need_more: int) -> None:
        self.id = id
        self.frames = frames
        self.handle = handle
        self.waiting: set[bytes] = set()
        self.need_more = need_more
        self.results: list[Any] = []
        self.error: BaseException | None = None

    def maybe_resolve(self) -> None:
        if self.waiting or self.need_more > 0 or self.handle.done():
            return
        if self.error is not None:
            self.handle._resolve(ERROR, self.error)
        else:
            self.handle._resolve(VALUE, self.results)


class Dispatcher:
    """Routes tasks to idle daemons over a bound ROUTER socket (see module doc)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        ctx: zmq.Context[Any],
        url: str,
        *,
        welcome: bytes,
        table: _codecs.CodecTable,
        cancel_grace: float = 2.0,
        liveness: float = 30.0,
        curve_secret: bytes | None = None,
        on_kill: Callable[[DaemonConn], None] | None = None,
        on_output: Callable[[DaemonConn, Output], None] | None = None,
        is_local: Callable[[DaemonConn], bool] | None = None,
        expected_local: int = 0,
        prefetch: bool = True,
    ) -> None:
        self.loop = loop
        self.table = table
        self.welcome = welcome
        self.cancel_grace = cancel_grace
        self.liveness = liveness
        self.on_kill = on_kill
        self.on_output = on_output
        self.is_local = is_local or (lambda d: False)  # is it one of the host's processes?
        self.prefetch = prefetch
        self.revoking: set[int] = set()
        self.prefetched = False  # some daemon may hold a prefetched task (cleared by a scan)
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 10_000)
        if curve_secret is not None:
            sock.curve_server = True
            sock.curve_secretkey = curve_secret
        if url.startswith("tcp://[") or "::" in url:
            sock.setsockopt(zmq.IPV6, 1)
        sock.bind(url)
        self.url = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.sock = sock
        self._send = sock.send_multipart
        self._send_one = sock.send
        self._recv_one = sock.recv
        self._getsockopt = sock.getsockopt
        self.queue: deque[Mirai[Any]] = deque()
        self.idle: list[DaemonConn] = []
        self.daemons: dict[bytes, DaemonConn] = {}  # by token
        self.by_ident: dict[bytes, DaemonConn] = {}  # task and ctrl identities
        self.setups: list[SetupItem] = []
        self.channels: dict[bytes, LoopChannel] = {}  # local daemons' socketpairs
        self.setup_ids: dict[int, SetupItem] = {}
        self.expected_local = expected_local
        self.completed = 0
        self.closed = False
        self._check_scheduled = False
        self._fd = sock.getsockopt(zmq.FD)
        loop.add_reader(self._fd, self._on_readable)
        self._liveness_timer = loop.call_later(1.0, self._liveness_tick)

    # -- sending -------------------------------------------------------------------
    def add_channel(self, ch: LoopChannel) -> None:
        """Register a local daemon's socketpair end (messages arrive as from the ROUTER)."""
        self.channels[ch.ident] = ch

    def on_channel_message(self, ident: bytes, frames: list[Any]) -> None:
        """A message from a local daemon's socketpair."""
        if self.closed:
            return
        try:
            self._handle(ident, frames)
        except Exception:  # never let one message kill the dispatcher
            log.exception("asyncmirai dispatcher: error handling a message")

    def channel_closed(self, ch: LoopChannel) -> None:
        """A socketpair reached end of stream: the process exit watcher does the rest."""
        self.channels.pop(ch.ident, None)

    def _to(self, ident: bytes, frames: list[Any]) -> bool:
        """Send one message to a daemon socket; False if that peer is gone."""
        ch = self.channels.get(ident)
        if ch is not None:
            return ch.send(frames)
        try:
            if len(frames) == 1:  # small message: identity + one header frame
                self._send_one(ident, _SNDMORE)
                self._send_one(frames[0])
            else:
                self._send([ident, *frames], copy=False)
        except zmq.ZMQError:  # unknown or vanished peer (ROUTER_MANDATORY)
            return False
        finally:
            self._schedule_check()
        return True

    # -- submission ----------------------------------------------------------------
    def submit(self, m: Mirai[Any]) -> None:
        """Queue ``m`` (or send it at once to an idle daemon).  Loop thread only."""
        if m._state:  # cancelled before it got here
            return
        if self.closed:
            m._resolve(ERROR, DaemonError("daemons were reset before the task was dispatched"))
            return
        if m.timeout is not None and m.timer is None:
            m.timer = self.loop.call_later(m.timeout, self._on_timeout, m)
        idle = self.idle
        if idle and not self.queue:
            self._send_task(idle.pop(), m)
        else:
            self.queue.append(m)

    def _send_task(self, d: DaemonConn, m: Mirai[Any]) -> None:
        if d.task is None:
            d.task = m
            d.sent_at = time.monotonic()
            d.sent_drops = d.drops
        else:
            d.next = m
            self.prefetched = True
        m.daemon = d
        frames = m.frames
        assert frames is not None
        if not self._to(d.ident, frames):  # peer vanished: requeue, forget the daemon
            if d.task is m:
                d.task = None
            else:
                d.next = None
            m.daemon = None
            self.queue.appendleft(m)
            self._lost(d, "send failed")

    def _pop(self) -> Mirai[Any] | None:
        queue = self.queue
        while queue:
            m = queue.popleft()
            if not m._state:  # skip tasks cancelled or timed out while queued
                return m
        return None

    def _pump(self) -> None:
        """Hand queued tasks to idle daemons."""
        idle = self.idle
        while self.queue and idle:
            m = self._pop()
            if m is None:
                break
            self._send_task(idle.pop(), m)

    def _make_idle(self, d: DaemonConn) -> None:
        """Give ``d`` work: a task if it has none and, under a backlog, one more to start
        as soon as it finishes (prefetch: the daemon never waits for our round trip)."""
        if not d.alive or d.retiring or d.setups_pending:
            return
        if d.task is None:
            m = self._pop()
            if m is None:
                if d not in self.idle:
                    self.idle.append(d)
                self._revoke_for_idle()
                return
            self._send_task(d, m)
        if (
            self.prefetch
            and d.next is None
            # a backlog that keeps every daemon busy anyway: FIFO order is unaffected
            and len(self.queue) > max(len(self.daemons), self.expected_local)
            and d.ident in self.channels  # only over a reliable local channel
        ):
            m = self._pop()
            if m is not None:
                self._send_task(d, m)

    def _revoke_for_idle(self) -> None:
        """A daemon is idle with nothing queued: take back a task prefetched behind a busy
        one (if it has not started), so it runs here instead of waiting there."""
        if not self.prefetched:  # the sequential case: nothing to scan
            return
        found = False
        for d in self.daemons.values():
            m = d.next
            if m is None:
                continue
            found = True
            if not m._state and m.id not in self.revoking and d.ctrl_ident:
                self.revoking.add(m.id)
                self._to(d.ctrl_ident, _protocol.encode(Cancel(m.id, revoke=True)))
                return
        self.prefetched = found

    # -- cancel and timeout --------------------------------------------------------
    def cancel(self, m: Mirai[Any], state: int = CANCELLED, value: Any = None) -> bool:
        """Resolve ``m`` as cancelled (or timed out) and stop it on its daemon."""
        if not m._resolve(state, value):
            return False
        self.stop_cancelled(m)
        return True

    def stop_cancelled(self, m: Mirai[Any]) -> None:
        """Stop an already-resolved task on its daemon, if it is running on one."""
        d = m.daemon
        if d is None or not d.alive:
            return
        if d.task is m:
            # Without a control channel yet, the cancel goes when it says hello.
            if d.ctrl_ident:
                self._to(d.ctrl_ident, _protocol.encode(Cancel(m.id)))
            d.cancel_timer = self.loop.call_later(self.cancel_grace, self._cancel_overdue, d, m)
        elif d.next is m and d.ctrl_ident:  # prefetched: it will be skipped, never run
            self._to(d.ctrl_ident, _protocol.encode(Cancel(m.id)))

    def _on_timeout(self, m: Mirai[Any]) -> None:
        m.timer = None
        self.cancel(m, ERROR, MiraiTimeout(f"mirai {m.id} timed out after {m.timeout} s"))

    def _cancel_overdue(self, d: DaemonConn, m: Mirai[Any]) -> None:
        d.cancel_timer = None
        if d.task is not m or not d.alive:
            return
        log.warning(
            "daemon pid %s did not stop task %s within %.1f s of a cancel: killing it",
            d.pid,
            m.id,
            self.cancel_grace,
        )
        if self.on_kill is not None:
            self.on_kill(d)
        if d.ctrl_ident:
            self._to(d.ctrl_ident, _protocol.encode(Exit("cancel overdue")))
        if not d.local:
            self._lost(d, "killed after an overdue cancel")

    # -- everywhere ----------------------------------------------------------------
    def everywhere(self, item: SetupItem) -> None:
        """Send a setup call to every daemon now, and remember it for later ones."""
        self.setups.append(item)
        self.setup_ids[item.id] = item
        connected = [d for d in self.daemons.values() if d.alive and d.ident and not d.retiring]
        item.need_more = max(0, item.need_more - len(connected))
        for d in connected:
            self._send_setup(d, item)
        item.maybe_resolve()

    def _send_setup(self, d: DaemonConn, item: SetupItem) -> None:
        if d in self.idle:
            self.idle.remove(d)
        d.setups_pending += 1
        item.waiting.add(d.token)
        if not self._to(d.ident, item.frames):
            self._lost(d, "send failed")

    # -- receiving -----------------------------------------------------------------
    def _schedule_check(self) -> None:
        # The zmq FD is edge-triggered and a send can consume the edge of an incoming
        # message, so after sending we look at EVENTS; only if a message is waiting do we
        # schedule a read (cheaper than an unconditional extra loop turn).
        if self.closed:
            return
        if not self._check_scheduled and self._getsockopt(_EVENTS) & _POLLIN:
            self._check_scheduled = True
            self.loop.call_soon(self._on_readable)

    def _on_readable(self) -> None:
        self._check_scheduled = False
        if self.closed:
            return
        recv = self._recv_one
        get = self._getsockopt
        handle = self._handle
        for _ in range(10_000):  # bounded so one busy socket cannot starve the loop
            try:
                if not get(_EVENTS) & _POLLIN:
                    return
                # Multipart messages arrive atomically: all parts are here once the first is.
                ident = recv(_NOBLOCK)
                frames: list[Any] = [recv(_NOBLOCK)]
                while get(_RCVMORE):  # body and tensor frames: zero copy
                    frames.append(recv(_NOBLOCK, copy=False).buffer)
            except zmq.ZMQError as exc:  # socket closed under us
                log.debug("recv failed: %s", exc)
                return
            try:
                handle(ident, frames)
            except Exception:  # never let one message kill the dispatcher
                log.exception("asyncmirai dispatcher: error handling a message")
        self._check_scheduled = True
        self.loop.call_soon(self._on_readable)

    def _handle(self, ident: bytes, frames: list[Any]) -> None:
        d = self.by_ident.get(ident)
        try:
            msg = _protocol.decode(frames)
        except RemoteProtocolError as exc:
            log.warning("asyncmirai: dropped a malformed message from %r: %s", ident, exc)
            return
        cls = type(msg)
        if d is not None:
            d.last_seen = time.monotonic()
            if cls is Result:
                self._on_result(d, msg)  # type: ignore[arg-type]
                return
            if cls is Ping:
                self._on_ping(d, msg)  # type: ignore[arg-type]
                return
            if cls is Cancelled:
                if msg.revoked:  # type: ignore[union-attr]
                    self._on_revoked(d, msg.id)  # type: ignore[union-attr]
                else:
                    self._task_finished(d, msg.id)  # type: ignore[union-attr]
                return
            if cls is Retire:
                d.retiring = True
                if d in self.idle:
                    self.idle.remove(d)
                # On the task socket, after any task already sent to it: the daemon
                # answers those with Cancelled(revoked=True) and we run them elsewhere.
                self._to(d.ident, _protocol.encode(Exit("retired")))
                if d.task is None:
                    self._lost(d, f"retired ({msg.reason})")  # type: ignore[union-attr]
                return
            if cls is Output:
                if self.on_output is not None:
                    self.on_output(d, msg)  # type: ignore[arg-type]
                return
        if cls is Hello:
            self._on_hello(ident, msg)  # type: ignore[arg-type]
            return
        log.warning("asyncmirai: dropped %s from unknown peer %r", cls.__name__, ident)

    def _on_hello(self, ident: bytes, msg: Hello) -> None:
        if msg.version != PROTOCOL_VERSION:
            reason = (
                f"protocol version mismatch: daemon speaks {msg.version}, host speaks "
                f"{PROTOCOL_VERSION}; install the same asyncmirai version on both sides"
            )
            log.error("asyncmirai: refused daemon pid %s on %s: %s", msg.pid, msg.host, reason)
            self._to(ident, _protocol.encode(Refuse(reason)))
            return
        if self.closed:
            return
        d = self.daemons.get(msg.token)
        if d is None:
            d = DaemonConn(msg.token)
            self.daemons[msg.token] = d
        d.pid, d.host, d.launch = msg.pid, msg.host, msg.launch
        self.by_ident[ident] = d
        if msg.role == "ctrl":
            d.ctrl_ident = ident
            m = d.task
            if m is not None and m._state:  # cancelled before we could reach its daemon
                self._to(ident, _protocol.encode(Cancel(m.id)))
            return
        if d.ident:  # duplicate hello on the task socket (reconnect): ignore
            return
        d.ident = ident
        d.connected_at = time.time()
        d.local = self.is_local(d)
        if not self._to(ident, _protocol.encode(Welcome(self.welcome))):
            return
        for item in self.setups:  # replay everywhere() calls, in order
            if item.need_more > 0 and not item.handle.done():
                item.need_more -= 1
                self._send_setup(d, item)
            else:
                d.setups_pending += 1
                self._to(ident, item.frames)
        self._make_idle(d)
        self._schedule_check()

    def _on_result(self, d: DaemonConn, msg: Result) -> None:
        m = d.task
        if m is not None and m.id == msg.id:
            if not m._state:  # not already cancelled / timed out
                if msg.ok:
                    try:
                        value = _codecs.loads(msg.body, msg.descriptors, msg.buffers, self.table)
                    except Exception as exc:
                        m._resolve(ERROR, _decode_failure(exc))
                    else:
                        m._resolve(VALUE, value)
                else:
                    m._resolve(ERROR, self._remote_error(msg))
            d.done += 1
            self.completed += 1
            self._task_finished(d, msg.id)
            return
        item = self.setup_ids.get(msg.id)
        if item is not None:
            d.setups_pending -= 1
            if d.token in item.waiting:
                item.waiting.discard(d.token)
                if msg.ok:
                    try:
                        item.results.append(
                            _codecs.loads(msg.body, msg.descriptors, msg.buffers, self.table)
                        )
                    except Exception as exc:
                        item.error = item.error or _decode_failure(exc)
                else:
                    item.error = item.error or self._remote_error(msg)
                item.maybe_resolve()
            elif not msg.ok:
                err = self._remote_error(msg)
                log.warning("asyncmirai: everywhere() replay failed on pid %s: %s", d.pid, err)
            self._make_idle(d)
            return
        # A late reply for a task that was requeued elsewhere: drop it.

    def _on_ping(self, d: DaemonConn, ping: Ping) -> None:
        """Catch a task or a result lost in a connection drop (ZeroMQ reconnects do not
        resend): the daemon says what it runs and what it last answered."""
        d.drops = ping.drops
        m = d.task
        if m is None or ping.current == m.id or d.sent_at > time.monotonic() - LOST_AFTER:
            return
        if ping.done == m.id:
            if ping.drops == ping.done_drops:
                return  # no disconnect since the reply was sent: it is in flight
        elif ping.drops == d.sent_drops:
            return  # no disconnect since we sent it: it is on its way
        d.task = None
        m.daemon = None
        if ping.done == m.id:  # it ran, but its reply was lost
            if not m._state:
                if m.retries > 0:
                    m.retries -= 1
                    self.queue.appendleft(m)
                else:
                    m._resolve(
                        ERROR,
                        DaemonError(
                            f"the result of mirai {m.id} was lost in a connection drop "
                            f"with daemon pid {d.pid} on {d.host}"
                        ),
                    )
        elif not m._state:  # the task message never arrived: it never ran
            log.warning("asyncmirai: mirai %s was lost on the way to pid %s: resent", m.id, d.pid)
            self.queue.appendleft(m)
        self._make_idle(d)
        self._pump()

    def _on_revoked(self, d: DaemonConn, tid: int) -> None:
        """``d`` gave task ``tid`` back unstarted (a revoke, or it retires): run it elsewhere.
        It may sit in either slot: the control channel's acknowledgement can overtake the
        result of the task before it."""
        self.revoking.discard(tid)
        if d.next is not None and d.next.id == tid:
            m, d.next = d.next, None
        elif d.task is not None and d.task.id == tid:
            m, d.task, d.next = d.task, d.next, None
            if d.task is not None:
                d.sent_at = time.monotonic()
            if d.cancel_timer is not None:
                d.cancel_timer.cancel()
                d.cancel_timer = None
        else:
            return
        m.daemon = None
        if not m._state:
            self.queue.appendleft(m)
            self._pump()  # to the idle daemon that asked for it, if any
        if d.retiring:
            if d.task is None:
                self._lost(d, "retired")
        elif d.task is None:
            self._make_idle(d)

    def _task_finished(self, d: DaemonConn, tid: int) -> None:
        m = d.task
        if m is None or m.id != tid:
            return
        d.task, d.next = d.next, None  # a prefetched task starts now
        if d.task is not None:
            d.sent_at = time.monotonic()
        m.daemon = None
        self.revoking.discard(tid)
        if d.cancel_timer is not None:
            d.cancel_timer.cancel()
            d.cancel_timer = None
        if d.retiring:
            if d.task is None:
                self._lost(d, "retired")
        else:
            self._make_idle(d)

    def _remote_error(self, msg: Result) -> BaseException:
        try:
            record = _codecs.loads(msg.body, msg.descriptors, msg.buffers, _codecs.DEFAULT_TABLE)
            return error_from_record(record)
        except Exception as exc:
            return _decode_failure(exc)

    # -- daemon loss ---------------------------------------------------------------
    def _lost(self, d: DaemonConn, reason: str) -> None:
        """Forget ``d``; its task fails with DaemonError or is requeued under retries."""
        if not d.alive:
            return
        d.alive = False
        self.daemons.pop(d.token, None)
        self.by_ident.pop(d.ident, None)
        self.by_ident.pop(d.ctrl_ident, None)
        if d in self.idle:
            self.idle.remove(d)
        if d.cancel_timer is not None:
            d.cancel_timer.cancel()
            d.cancel_timer = None
        for item in self.setups:
            if d.token in item.waiting:
                item.waiting.discard(d.token)
                item.maybe_resolve()
        nxt, d.next = d.next, None
        if nxt is not None:  # prefetched, never started: back to the head of the queue
            nxt.daemon = None
            if not nxt._state:
                self.queue.appendleft(nxt)
        m, d.task = d.task, None
        if m is not None:
            m.daemon = None
            if not m._state:
                if m.retries > 0 and not self.closed:
                    m.retries -= 1
                    self.queue.appendleft(m)
                else:
                    where = f"daemon pid {d.pid} on {d.host}" if d.pid else "daemon"
                    m._resolve(
                        ERROR, DaemonError(f"{where} was lost running mirai {m.id}: {reason}")
                    )
        if not self.closed:
            self._pump()

    def lost_pid(self, pid: int, reason: str) -> bool:
        """A local process exited: forget its connection (drains replies first)."""
        self._on_readable()  # its last result may be waiting in the socket
        for d in list(self.daemons.values()):
            if d.pid == pid and d.local:
                for ident in (d.ident, d.ctrl_ident):  # or in its socketpair
                    ch = self.channels.get(ident)
                    if ch is not None and not ch.closed:
                        ch._on_readable()
                if not d.alive:
                    return True
                self._lost(d, reason)
                return True
        return False

    def _liveness_tick(self) -> None:
        if self.closed:
            return
        self._on_readable()  # a busy loop may have starved us: read first, judge after
        now = time.monotonic()
        for d in list(self.daemons.values()):
            if not d.local and d.ident and now - d.last_seen > self.liveness:
                self._lost(d, f"no heartbeat for {self.liveness:.0f} s")
        self._liveness_timer = self.loop.call_later(1.0, self._liveness_tick)

    # -- introspection and shutdown ------------------------------------------------
    def status(self) -> dict[str, Any]:
        live = [d for d in self.daemons.values() if d.ident and d.alive]
        return {
            "connections": len(live),
            "url": self.url,
            "awaiting": sum(1 for m in self.queue if not m._state)
            + sum(1 for d in live if d.next is not None and not d.next._state),
            "executing": sum(1 for d in live if d.task is not None),
            "completed": self.completed,
            "daemons": [d.row() for d in live],
        }

    def close(self, reason: str = "daemons were reset") -> None:
        """Fail every unresolved task with DaemonError, tell daemons to exit, close."""
        if self.closed:
            return
        self.closed = True
        err = f"{reason} before the task resolved"
        while self.queue:
            self.queue.popleft()._resolve(ERROR, DaemonError(err))
        for d in list(self.daemons.values()):
            for m in (d.task, d.next):
                if m is not None:
                    m._resolve(ERROR, DaemonError(err))
            for ident in (d.ctrl_ident, d.ident):
                if ident:
                    self._to(ident, _protocol.encode(Exit(reason)))
            if d.cancel_timer is not None:
                d.cancel_timer.cancel()
        for item in self.setups:
            item.handle._resolve(ERROR, DaemonError(err))
        self._liveness_timer.cancel()
        for ch in list(self.channels.values()):
            ch.close()
        self.channels.clear()
        try:
            self.loop.remove_reader(self._fd)
        except Exception:  # the loop may be closed already
            pass
        self.sock.close(linger=200)


def _decode_failure(exc: BaseException) -> MiraiError:
    err = MiraiError(
        type(exc).__qualname__, f"the result could not be deserialized on the host: {exc}"
    )
    err.__cause__ = exc
    return err
