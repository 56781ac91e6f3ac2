"""The dispatcher: the I/O shell around the scheduler, on ONE event loop thread.

It owns the channels (a bound ROUTER socket for daemons that dial in, a socketpair per
local daemon), reads and decodes their messages, feeds them to the pure
:class:`~asyncmirai._scheduler.Scheduler` as events, performs the actions it emits (send,
resolve, kill, spawn), and arms one timer for its next deadline.  Every decision lives in
the scheduler; this file only moves bytes and keeps the clock.

Other threads reach it through :meth:`Dispatcher.post`: submissions and cancels from one
thread are queued in order and drained in one loop hand-off, however many there are.

**A caller's thread may drive the I/O itself** (:meth:`Dispatcher.submit_direct`,
:meth:`Dispatcher.wait`).  With the dispatcher on a private thread (plain scripts,
notebooks without a running loop), a task used to cost four wake-ups in a row: caller ->
loop thread (post) -> daemon -> loop thread (result) -> caller.  Each is a cross-CPU
wake-up of tens of microseconds on a small VM, which made ``.result()`` about 2.5x an
in-loop ``await``.  Now a caller that is not on the loop's thread takes ``lock`` and
submits and sends itself, and a caller blocked in ``Mirai.result()`` reads the socketpair
of the daemon running its task and resolves the handle on its own thread: daemon ->
caller, as in-loop.  Everything here holds ``lock`` (an ``RLock``: resolving a handle may
submit again on the same thread), loop-side callbacks included; what only the loop's
thread may do (spawn, kill, arm the timer, watch fds) is handed to it.  A caller never
*waits* for the lock (only ``acquire(blocking=False)``): the loop thread may run user
callbacks while holding it, and those may wait for a lock that caller holds.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import zmq

from . import _codecs, _otel, _protocol
from ._errors import MiraiError, RemoteProtocolError, error_from_record
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
from ._scheduler import (
    CANCEL,
    CTRL_CHANNEL,
    ERROR,
    EXIT,
    KILL,
    RESOLVE,
    SEND,
    SPAWN,
    TASK_CHANNEL,
    VALUE,
    WELCOME,
    Daemon,
    Job,
    Scheduler,
    Setup,
)
from ._transport import SPIN, LoopChannel, poll_briefly

__all__ = ["Dispatcher"]

log = logging.getLogger("asyncmirai")

_monotonic = time.monotonic
_NOBLOCK = zmq.NOBLOCK
_POLLIN = zmq.POLLIN
_EVENTS = zmq.EVENTS
_RCVMORE = zmq.RCVMORE
_SNDMORE = zmq.SNDMORE
#: Seconds an unauthenticated tcp peer may hold a connection without completing the
#: CurveZMQ handshake (libzmq's default is 30).
HANDSHAKE_DEADLINE_MS = 5000
_SUBMIT, _CANCEL, _EVERYWHERE = 0, 1, 2
#: Short one-frame tasks a daemon may hold ahead of its running one under a backlog
#: (``Scheduler(prefetch_depth=)``).
PREFETCH_DEPTH = 8


class Dispatcher:
    """Channels, one timer and a :class:`Scheduler` (see module doc).  Loop thread only,
    except :meth:`post`."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        ctx: zmq.Context[Any],
        url: str,
        *,
        welcome: bytes,
        codecs: _codecs.TableRef,
        hostname: str,
        local_target: int = 0,
        cancel_grace: float = 2.0,
        liveness: float = 30.0,
        curve_secret: bytes | None = None,
        concurrency: int = 1,
        budget: Any = None,
        spawn: Callable[[int], None] | None = None,
        kill: Callable[[Daemon], None] | None = None,
        on_output: Callable[[Daemon, Output], None] | None = None,
    ) -> None:
        self.loop = loop
        self.lock = threading.RLock()
        self.tid = threading.get_ident()  # made on the loop's thread
        # Waiting threads may take a channel's watch from the loop (LoopChannel.claimed)
        # only where handing it back from their thread is safe: asyncio's selector loops.
        self.claims = isinstance(loop, asyncio.selector_events.BaseSelectorEventLoop)
        # The loop polls (see _spin_after) until this time, for this daemon's answer.
        self._spin_until = 0.0
        self._spin_d: Daemon | None = None
        self._spin_h: asyncio.Handle | None = None
        self.codecs = codecs
        self.welcome = _protocol.encode(Welcome(welcome))
        self.spawn = spawn or (lambda k: None)
        self.kill = kill or (lambda d: None)
        self.on_output = on_output
        self.obs = _otel.RECORDS  # traced or measured tasks (empty unless OpenTelemetry is on)
        self.sched = Scheduler(
            local_target=local_target,
            hostname=hostname,
            cancel_grace=cancel_grace,
            concurrency=concurrency,
            budget=budget,
            wall=time.time,
            prefetch_depth=PREFETCH_DEPTH,
        )
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # Liveness from libzmq's heartbeats, in its C I/O thread: a daemon busy in C code
        # holding its GIL still answers them; a dead or partitioned one closes the
        # connection, which the monitor below reports.
        ivl = max(100, min(1000, int(liveness * 1000 / 3)))
        sock.setsockopt(zmq.HEARTBEAT_IVL, ivl)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, max(ivl, int(liveness * 1000)))
        sock.setsockopt(zmq.HEARTBEAT_TTL, max(ivl, int(liveness * 1000)))
        sock.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_DEADLINE_MS)
        if curve_secret is not None:
            sock.curve_server = True
            sock.curve_secretkey = curve_secret
        if url.startswith("tcp://[") or "::" in url:
            sock.setsockopt(zmq.IPV6, 1)
        sock.bind(url)
        self.url = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.sock = sock
        self.monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._send = sock.send_multipart
        self._send_one = sock.send
        self._recv_one = sock.recv
        self._getsockopt = sock.getsockopt
        self.by_ident: dict[bytes, Daemon] = {}  # task and control identities
        self.by_fd: dict[int, Daemon] = {}  # connection fd (remote daemons) -> daemon
        self.channels: dict[bytes, LoopChannel] = {}  # local daemons' socketpairs
        self.told_to_exit: set[bytes] = set()
        self.closed = False
        self._pending: deque[tuple[int, Any]] = deque()
        self._drain_posted = False
        self._check_scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._fd = sock.getsockopt(zmq.FD)
        self._mon_fd = self.monitor.getsockopt(zmq.FD)
        loop.add_reader(self._fd, self._on_readable)
        loop.add_reader(self._mon_fd, self._on_monitor)
        # A safety net for the edge-triggered zmq FD (and the monitor's) once a second.
        self._safety = loop.call_later(1.0, self._safety_tick)

    # -- events from the profile ---------------------------------------------------
    def submit(self, job: Job) -> None:
        """Queue or send ``job`` (loop thread)."""
        with self.lock:
            self.sched.submit(job, _monotonic())
            self.flush()

    def submit_direct(self, job: Job) -> bool:
        """Queue or send ``job`` from another thread, without a hop to the loop thread
        (see the module doc); False when the lock is busy (then :meth:`post` it)."""
        lock = self.lock
        if not lock.acquire(False):
            return False
        try:
            if self._pending:  # posted earlier from some thread: those go first
                self._drain_locked()
            self.sched.submit(job, _monotonic())
            self.flush()
        finally:
            lock.release()
        return True

    def cancel(self, job: Job) -> None:
        """Cancel ``job`` (loop thread); its handle is resolved as cancelled already."""
        with self.lock:
            self.sched.cancel(job, _monotonic())
            self.flush()

    def everywhere(self, item: Setup) -> None:
        """Run a setup on every daemon now and later (loop thread)."""
        with self.lock:
            self.sched.everywhere(item)
            self.flush()

    def forget_put(self, put_id: int) -> None:
        """Daemons drop an ``am.put`` object (loop thread)."""
        with self.lock:
            if not self.closed:
                self.sched.forget_put(put_id)
                self.flush()

    def add_local(self, k: int) -> None:
        """Start ``k`` more local daemons (loop thread)."""
        with self.lock:
            self.sched.add_local(k)
            self.flush()

    def counters(self) -> dict[str, int]:
        """A copy of the scheduler's counters (any thread)."""
        with self.lock:
            return dict(self.sched.counters)

    def watch(self, handle: Any, loop: asyncio.AbstractEventLoop) -> Callable[[], None] | None:
        """From the thread of another asyncio loop that awaits ``handle``: read the
        socketpair of the daemon running its task on *that* loop until it resolves, so
        the answer wakes the awaiting loop directly instead of going through ours.
        Returns what ends the watch (call it on that loop's thread), or None when the
        task has no local daemon yet or the loops are not both selector loops."""
        if not self.claims or not isinstance(loop, _SelectorLoop) or loop is self.loop:
            return None
        job = handle._job
        d = job.daemon if job is not None else None
        if d is None or self.closed:
            return None
        ch = self.channels.get(d.ident)
        if ch is None or ch.eof or not self.lock.acquire(False):
            return None
        try:
            ch.watch_from(loop, lambda: self._read_for(ch, loop))
        finally:
            self.lock.release()
        # Ended one loop turn later, not at once: a coroutine that awaits one task after
        # another starts its next await (which counts the watch up again) before that,
        # so the channel stays watched by that loop, with no epoll_ctl per await.

        def end() -> None:
            try:
                loop.call_soon(self._unwatch, ch, loop)
            except RuntimeError:  # that loop is closing: now, then
                self._unwatch(ch, loop)

        return end

    def _read_for(self, ch: LoopChannel, loop: asyncio.AbstractEventLoop) -> None:
        """The reader :meth:`watch` puts on an awaiting loop."""
        if not self.lock.acquire(timeout=0.002):
            return  # busy (briefly, as a rule): the fd is still readable, we come back
        try:
            if ch.eof or ch.closed:
                # ended: stop watching here, so the loop's thread sees it and closes
                ch.unwatch_from(loop, all=True)
                return
            ch.read()
        finally:
            self.lock.release()

    def _unwatch(self, ch: LoopChannel, loop: asyncio.AbstractEventLoop) -> None:
        with self.lock:
            ch.unwatch_from(loop)

    def wait(self, handle: Any, timeout: float | None) -> bool:
        """Block until ``handle`` resolves (a thread other than the loop's): read the
        socketpair of the daemon running its task here, or sleep until another thread
        resolves it.  False if ``timeout`` passed first."""
        tid = threading.get_ident()
        waker = _waker()
        r = waker.r

        def wake(_: Any) -> None:
            if threading.get_ident() != tid:
                waker.poke()

        handle.add_done_callback(wake)
        deadline = None if timeout is None else _monotonic() + timeout
        poller = select.poll()
        poller.register(r, select.POLLIN)
        watched = -1
        lock = self.lock
        claimed: LoopChannel | None = None
        spin = SPIN
        try:
            while handle._state == 0:  # PENDING
                ch = None
                job = handle._job
                d = job.daemon if job is not None else None
                if d is not None and not self.closed:
                    ch = self.channels.get(d.ident)
                    if ch is not None and ch.eof:
                        ch = None  # ended: the loop's thread must see it
                if claimed is not None and claimed is not ch:
                    with lock:  # the task moved (retried elsewhere) or its daemon ended
                        claimed.unclaim()
                    claimed = None
                # Never wait long for the lock (the loop's thread may hold it while a
                # user callback waits for something this thread holds): a short try,
                # then back to poll; whoever holds it reads unclaimed channels and
                # pokes us if it resolves the handle.
                if ch is not None and lock.acquire(timeout=0.002):
                    try:
                        if claimed is None and self.claims:
                            ch.claim()
                            claimed = ch
                        ch.read()
                    finally:
                        lock.release()
                    if handle._state != 0:
                        break
                fd = ch.fd if ch is not None else -1
                if fd != watched:
                    if watched >= 0:
                        poller.unregister(watched)
                    if fd >= 0:
                        poller.register(fd, select.POLLIN)
                    watched = fd
                ready = []
                if spin and fd >= 0:  # once: a short task's answer is near (see SPIN)
                    spin = 0.0
                    ready = poll_briefly(poller, SPIN)
                if ready:
                    pass
                elif deadline is None:
                    ready = poller.poll()
                else:
                    left = deadline - _monotonic()
                    if left <= 0:
                        return bool(handle._state != 0)
                    ready = poller.poll(left * 1000)
                for f, _ in ready:
                    if f == r:
                        try:
                            os.read(r, 4096)
                        except BlockingIOError:
                            pass
            return True
        finally:
            if claimed is not None:
                with lock:  # blocking: brief, and this thread waits anyway
                    claimed.unclaim()

    def post(self, kind: int, item: Any) -> None:
        """From another thread: an event for the loop, in order, one hand-off per batch."""
        self._pending.append((kind, item))
        if not self._drain_posted:
            self._drain_posted = True
            self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self.lock:
            self._drain_locked()

    def _drain_locked(self) -> None:
        self._drain_posted = False  # before draining: a later post schedules again
        pending = self._pending
        sched = self.sched
        now = _monotonic()
        while pending:
            kind, item = pending.popleft()
            if kind == _SUBMIT:
                sched.submit(item, now)
            elif kind == _CANCEL:
                sched.cancel(item, now)
            else:
                sched.everywhere(item)
        self.flush()

    def process_exited(self, pid: int, returncode: int | None, reason: str) -> None:
        """A local daemon process exited: read what it sent last, then forget it."""
        with self.lock:
            self._on_readable()  # its last result may be waiting in the socket
            d = self.sched.procs.get(pid)
            if d is not None:
                for ident in (d.ident, d.ctrl_ident):  # or in its socketpair
                    ch = self.channels.get(ident) if ident is not None else None
                    if ch is not None and not ch.closed:
                        ch.read()
            self.sched.process_exited(pid, returncode, reason, _monotonic())
            self.flush()

    def spawned(self, pid: int) -> None:
        """The supervisor started local daemon ``pid``."""
        self.sched.spawned(pid)

    def spawn_failed(self, exc: BaseException) -> None:
        """The supervisor could not start a local daemon."""
        self.sched.spawn_failed(exc, _monotonic())

    # -- performing the scheduler's actions ----------------------------------------
    def flush(self) -> None:
        """Perform the scheduler's actions, in order, until there are none left (holding
        ``lock``).  On another thread, from the first action only the loop's thread may
        perform (spawn, kill) on, the rest is handed to it."""
        out = self.sched.out
        obs = self.obs
        corked: list[LoopChannel] = []  # channels with writes held back until the end
        try:
            self._perform(out, obs, corked)
        finally:
            for ch in corked:
                ch.uncork()
        if self.sched._heap:  # most tasks have no deadline: no call at all
            if threading.get_ident() != self.tid:
                self._to_loop(self._arm_locked)
            else:
                self._arm()

    def _spin_after(self, d: Daemon) -> None:
        """A short task went to local daemon ``d`` from the loop's thread with nothing
        else queued (a sequential caller): keep the loop polling (``call_soon`` makes
        its next ``epoll`` not wait) for up to ``SPIN`` seconds, so the answer is read
        without the loop's thread being woken from its sleep.  Only for a daemon whose
        tasks take less than ``SPIN`` on average (``d.pace``)."""
        if len(d.running) != 1 or d.ahead or threading.get_ident() != self.tid:
            return
        self._spin_until = time.perf_counter() + SPIN
        self._spin_d = d
        if self._spin_h is None:
            self._spin_h = self.loop.call_soon(self._spin_tick)

    def _spin_tick(self) -> None:
        self._spin_h = None
        d = self._spin_d
        if d is not None and d.running and time.perf_counter() < self._spin_until:
            self._spin_h = self.loop.call_soon(self._spin_tick)
        else:
            self._spin_d = None

    def _perform(self, out: Any, obs: Any, corked: list[LoopChannel]) -> None:
        while out:
            act = out.popleft()
            op = act[0]
            if (op == KILL or op == SPAWN) and threading.get_ident() != self.tid:
                out.appendleft(act)
                self._to_loop(self._flush_locked)
                return
            if op == SEND:
                d = act[1]
                frames = act[2]
                if type(frames) is bytes:  # a one-frame task is kept bare (see _api)
                    frames = (frames,)
                if len(out) and (ch := self.channels.get(d.ident)) is not None:
                    if not ch.corked:  # more may follow for it: one write for them all
                        ch.corked = True
                        corked.append(ch)
                if d.alive and not self._to(d.ident, frames):
                    self.sched.send_failed(d, act[3], _monotonic())
                else:
                    if obs and act[3] is not None and (rec := obs.get(act[3].id)) is not None:
                        _otel.sent(rec, d)
                    if d.pace < SPIN and d.local and not self.sched.queued:  # SPIN 0: never
                        self._spin_after(d)
            elif op == RESOLVE:
                act[1]._resolve(act[2], act[3])
            elif op == CANCEL:
                d = act[1]
                if d.alive and d.ctrl_ident is not None:
                    self._to(d.ctrl_ident, _protocol.encode(Cancel(act[2], revoke=act[3])))
            elif op == WELCOME:
                d = act[1]
                if d.alive and not self._to(d.ident, self.welcome):
                    self.sched.send_failed(d, None, _monotonic())
            elif op == EXIT:
                d, reason, where = act[1], act[2], act[3]
                frames = _protocol.encode(Exit(reason))
                if where & TASK_CHANNEL and d.ident is not None:
                    self._to(d.ident, frames)
                if where & CTRL_CHANNEL and d.ctrl_ident is not None:
                    self._to(d.ctrl_ident, frames)
            elif op == KILL:
                self.kill(act[1])
            elif op == SPAWN:
                self._spawn(act[1])

    def _to_loop(self, fn: Callable[[], None]) -> None:
        try:
            self.loop.call_soon_threadsafe(fn)
        except RuntimeError:  # the loop closed (reset)
            pass

    def _flush_locked(self) -> None:
        with self.lock:
            self.flush()

    def _arm_locked(self) -> None:
        with self.lock:
            self._arm()

    def _spawn(self, k: int) -> None:
        """Perform a SPAWN; a spawner that raises (EMFILE from a socketpair, say) before
        it reported each of the ``k`` daemons has those reported failed, so the scheduler
        retries them with backoff instead of counting them as starting forever."""
        before = self.sched.spawning
        try:
            self.spawn(k)
        except OSError as exc:
            now = _monotonic()
            for _ in range(k - (before - self.sched.spawning)):
                self.sched.spawn_failed(exc, now)

    def _arm(self) -> None:
        """One timer, at the scheduler's next deadline."""
        if self.closed:
            return
        when = self.sched.next_deadline()
        if when is None:
            return
        timer = self._timer
        if timer is not None:
            if self._timer_at <= when:
                return  # fires first; it re-arms for the rest
            timer.cancel()
        self._timer_at = when
        self._timer = self.loop.call_at(
            self.loop.time() + max(0.0, when - _monotonic()), self._tick
        )

    def _tick(self) -> None:
        with self.lock:
            self._timer = None
            if self.closed:
                return
            self.sched.tick(_monotonic())
            self.flush()

    def _to(self, ident: Any, frames: Any) -> bool:
        """Send one message on a daemon's channel; False if that peer is gone."""
        ch = self.channels.get(ident)
        if ch is not None:
            return ch.send(frames)
        if ident is None:
            return False
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

    # -- channels ------------------------------------------------------------------
    def add_channel(self, ch: LoopChannel) -> None:
        """Register a local daemon's socketpair end (messages arrive as from the ROUTER)."""
        self.channels[ch.ident] = ch

    def on_channel_message(self, ident: bytes, msgs: list[list[Any]]) -> None:
        """Messages from a local daemon's socketpair (what one read brought): handled,
        then one flush, so the tasks they free up go out in one write."""
        if not self.closed:
            for frames in msgs:
                self._handle(ident, frames, None)
            self.flush()

    def channel_closed(self, ch: LoopChannel) -> None:
        """A socketpair reached end of stream: the process exit watcher does the rest."""
        self.channels.pop(ch.ident, None)

    def _schedule_check(self) -> None:
        # The zmq FD is edge-triggered and a send can consume the edge of an incoming
        # message, so after sending we look at EVENTS; only if a message is waiting do we
        # schedule a read (cheaper than an unconditional extra loop turn).
        if not self.closed and not self._check_scheduled and self._getsockopt(_EVENTS) & _POLLIN:
            self._check_scheduled = True
            if threading.get_ident() == self.tid:
                self.loop.call_soon(self._on_readable)
            else:
                self._to_loop(self._on_readable)

    def _on_readable(self) -> None:
        with self.lock:
            self._read_router()

    def _read_router(self) -> None:
        self._check_scheduled = False
        if self.closed:
            return
        recv = self._recv_one
        get = self._getsockopt
        for _ in range(10_000):  # bounded so one busy socket cannot starve the loop
            try:
                if not get(_EVENTS) & _POLLIN:
                    break
                # Multipart messages arrive atomically: all parts are here once the first is.
                ident = recv(_NOBLOCK)
                first = recv(_NOBLOCK, copy=False)
                frames: list[Any] = [first.bytes]
                while get(_RCVMORE):  # body and tensor frames: zero copy
                    frames.append(recv(_NOBLOCK, copy=False).buffer)
            except zmq.ZMQError as exc:  # socket closed under us
                log.debug("recv failed: %s", exc)
                break
            self._handle(ident, frames, first)
        else:
            self._check_scheduled = True
            self.loop.call_soon(self._on_readable)
        self.flush()

    def _on_monitor(self) -> None:
        with self.lock:
            self._read_monitor()

    def _read_monitor(self) -> None:
        """Connections of remote daemons that closed (killed, or heartbeats timed out)."""
        mon = self.monitor
        now = _monotonic()
        while not self.closed:
            try:
                if not mon.getsockopt(_EVENTS) & _POLLIN:
                    break
                ev = mon.recv_multipart(_NOBLOCK)
            except zmq.ZMQError:
                break
            fd = int.from_bytes(ev[0][2:6], "little")
            d = self.by_fd.pop(fd, None)
            if d is not None:
                self.sched.disconnected(d, now)
        self.flush()

    def _safety_tick(self) -> None:
        if self.closed:
            return
        self._on_readable()
        self._on_monitor()
        with self.lock:  # loops that closed while watching a channel: hand it back
            for ch in list(self.channels.values()):
                for other in [lp for lp in ch.watchers if lp.is_closed()]:
                    ch.unwatch_from(other, all=True)
        self._safety = self.loop.call_later(1.0, self._safety_tick)

    # -- messages ------------------------------------------------------------------
    def _handle(self, ident: bytes, frames: list[Any], first: Any) -> None:
        try:
            msg = _protocol.decode(frames)
        except RemoteProtocolError as exc:
            log.warning("asyncmirai: dropped a malformed message from %r: %s", ident, exc)
            return
        sched = self.sched
        d = self.by_ident.get(ident)
        cls = type(msg)
        if d is not None and d.alive:
            if first is not None:  # a message proves the connection on this fd is up
                self._note_fd(first, d)
            if cls is Result:
                r: Result = msg  # type: ignore[assignment]
                if self.obs and (rec := self.obs.get(r.id)) is not None:
                    _otel.received(rec, frames)
                sched.result(d, r.id, *self._outcome(d, r), _monotonic())
            elif cls is Ping:
                p: Ping = msg  # type: ignore[assignment]
                sched.ping(d, p.current, p.done, p.drops, p.done_drops, _monotonic())
            elif cls is Cancelled:
                sched.cancelled(d, msg.id, msg.revoked, _monotonic())  # type: ignore[union-attr]
            elif cls is Retire:
                sched.retire(d, msg.reason)  # type: ignore[union-attr]
            elif cls is Output:
                sched.seen(d, _monotonic())
                if self.on_output is not None:
                    self.on_output(d, msg)  # type: ignore[arg-type]
            return
        if cls is Hello:
            self._on_hello(ident, msg, first)  # type: ignore[arg-type]
            return
        # A daemon we gave up on (or forgot at reset) that speaks again: tell it to exit,
        # once, so it does not linger as a zombie.
        if ident not in self.told_to_exit and len(self.told_to_exit) < 100_000:
            self.told_to_exit.add(ident)
            log.warning(
                "asyncmirai: %s from an unknown daemon %r: told it to exit", cls.__name__, ident
            )
            self._to(ident, _protocol.encode(Exit("unknown to the host")))

    def _note_fd(self, first: Any, d: Daemon) -> None:
        try:
            fd = first.get(zmq.SRCFD)
        except zmq.ZMQError:
            return
        if fd > 0 and self.by_fd.get(fd) is not d:
            self.by_fd[fd] = d

    def _on_hello(self, ident: bytes, msg: Hello, first: Any) -> None:
        if msg.version != PROTOCOL_VERSION:
            reason = (
                f"protocol version mismatch: daemon speaks {msg.version}, host speaks "
                f"{PROTOCOL_VERSION}; install the same asyncmirai version on both sides"
            )
            log.error("asyncmirai: refused daemon pid %s on %s: %s", msg.pid, msg.host, reason)
            self._to(ident, _protocol.encode(Refuse(reason)))
            return
        d = self.sched.hello(
            ident,
            msg.role,
            msg.token,
            pid=msg.pid,
            host=msg.host,
            launch=msg.launch,
            reliable=ident in self.channels,
            now=_monotonic(),
        )
        if d is None:  # after reset
            self._to(ident, _protocol.encode(Exit("daemons were reset")))
            return
        self.by_ident[ident] = d
        if first is not None:
            self._note_fd(first, d)

    def _outcome(self, d: Daemon, msg: Result) -> tuple[int, Any]:
        """Decode a result (skipped for one nobody waits for).  Under BaseException: a
        hostile or broken result (``__reduce__`` = ``sys.exit``) becomes the task's error
        and never reaches the loop."""
        job = d.running.get(msg.id)
        if (job is None or job.done) and msg.id not in self.sched.setup_ids:
            return VALUE, None  # a late reply: dropped by the scheduler
        try:
            if msg.ok:
                return VALUE, _codecs.loads(
                    msg.body, msg.descriptors, msg.buffers, self.codecs.table
                )
            record = _codecs.loads(msg.body, msg.descriptors, msg.buffers, _codecs.DEFAULT_TABLE)
            return ERROR, error_from_record(record)
        except BaseException as exc:  # noqa: BLE001 - see docstring
            return ERROR, _decode_failure(exc)

    # -- introspection and shutdown ------------------------------------------------
    def status(self) -> dict[str, Any]:
        """Counters and per-daemon rows (loop thread)."""
        with self.lock:
            return {"url": self.url, **self.sched.status()}

    def close(self, reason: str = "daemons were reset") -> None:
        """Fail every unresolved task with DaemonError, tell daemons to exit, close."""
        with self.lock:
            self._close(reason)

    def _close(self, reason: str) -> None:
        if self.closed:
            return
        self._drain_locked()
        self.sched.close(reason)
        self.flush()
        self.closed = True
        for t in (self._timer, self._safety):
            if t is not None:
                t.cancel()
        for ch in list(self.channels.values()):
            ch.close()
        self.channels.clear()
        for fd in (self._fd, self._mon_fd):
            try:
                self.loop.remove_reader(fd)
            except Exception:  # the loop may be closed already
                pass
        try:
            self.sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self.monitor.close(linger=0)
        self.sock.close(linger=200)


_local = threading.local()
_SelectorLoop = asyncio.selector_events.BaseSelectorEventLoop


class _Waker:
    """A thread's pipe for being woken while it waits in :meth:`Dispatcher.wait`.

    Closed when nothing refers to it any more: neither its thread (a thread-local) nor a
    handle's callback that may still poke it, so a poke never hits a reused fd."""

    __slots__ = ("r", "w")

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        os.set_blocking(self.w, False)

    def poke(self) -> None:
        try:
            os.write(self.w, b"!")
        except OSError:  # full: a poke is pending anyway
            pass

    def __del__(self) -> None:
        for fd in (self.r, self.w):
            try:
                os.close(fd)
            except OSError:
                pass


def _waker() -> _Waker:
    waker: _Waker | None = getattr(_local, "waker", None)
    if waker is None:
        waker = _local.waker = _Waker()
    return waker


def _decode_failure(exc: BaseException) -> MiraiError:
    err = MiraiError(
        type(exc).__qualname__, f"the result could not be deserialized on the host: {exc}"
    )
    err.__cause__ = exc
    return err
