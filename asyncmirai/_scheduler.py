"""The scheduler, sans I/O: every task and daemon state of one compute profile.

This is the h11 ``Connection`` of the project.  It owns the FIFO queue, the daemons
(idle, busy, prefetched, retiring, replaying ``everywhere()`` setups), retries, timeouts
as deadlines, cancels, revokes, the detection of tasks and results lost in a connection
drop, and the decisions to spawn, respawn and kill local daemons with their circuit
breaker.  It touches no socket, loop, thread or clock:

* events come in as method calls (:meth:`Scheduler.submit`, :meth:`Scheduler.result`,
  :meth:`Scheduler.hello`, :meth:`Scheduler.process_exited`, :meth:`Scheduler.tick` ...),
  each with ``now`` when time matters;
* actions go out through :attr:`Scheduler.out`, a worklist of tuples the caller performs
  in order (``SEND`` frames to a daemon, ``CANCEL`` on its control channel, ``EXIT``,
  ``RESOLVE`` a handle, ``KILL`` a local process, ``SPAWN`` local daemons), and
  :meth:`Scheduler.next_deadline` says when to call :meth:`Scheduler.tick` again.

Performing an action never calls back into the scheduler recursively: a failed send is
reported as a new event (:meth:`Scheduler.send_failed`) whose actions join the end of
the worklist.  So 400 daemons vanishing at once is a loop, not a recursion.

The I/O shell is ``_dispatcher``; the tests in ``tests/test_scheduler.py`` drive this
module alone with a fake clock and a Hypothesis state machine.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import logging
import signal
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

from ._errors import DaemonError, MiraiTimeout

__all__ = [
    "CANCEL",
    "EXIT",
    "KILL",
    "RESOLVE",
    "SEND",
    "SPAWN",
    "WELCOME",
    "Daemon",
    "Job",
    "Scheduler",
    "Setup",
]

log = logging.getLogger("asyncmirai")

# Outcome states a handle resolves to (the same numbers as ``_handle``).
VALUE, ERROR, CANCELLED = 1, 2, 3

# Actions: (SEND, daemon, frames, job_or_None) on the task channel; (CANCEL, daemon,
# task_id, revoke) on the control channel; (EXIT, daemon, reason, channels); (WELCOME,
# daemon); (RESOLVE, handle, state, value); (KILL, daemon); (SPAWN, k).
SEND, CANCEL, EXIT, WELCOME, RESOLVE, KILL, SPAWN = range(7)
# Which channels an EXIT goes on: the task channel orders it after tasks already sent;
# the control channel reaches a daemon whose main thread is stuck.
TASK_CHANNEL, CTRL_CHANNEL, BOTH_CHANNELS = 1, 2, 3

# Deadline kinds in the heap.
_TIMEOUT, _GRACE, _DISCONNECT, _RESPAWN = range(4)

#: A remote daemon whose pings, this long after a task was sent, say it neither runs nor
#: ran it, lost the task message in a connection drop.
LOST_AFTER = 3.0
#: Seconds a remote daemon may stay disconnected (ZeroMQ reconnects on its own) before
#: it is declared lost.  Disconnects come from the kernel (a closed tcp connection) or
#: libzmq's heartbeats, both independent of the daemon's GIL.
RECONNECT_GRACE = 1.5
#: A daemon whose tasks take less than this on average (seconds, from one result to the
#: next) is sent up to ``prefetch_depth`` tasks ahead under a backlog.
FAST_TASK = 0.002
#: Consecutive start-up failures of local daemons that trip the breaker.
BREAKER_TRIPS_AT = 3
#: Backoff of a respawn whose ``spawn`` failed (EMFILE, ENOMEM): first and last delay.
RESPAWN_BACKOFF = (0.1, 5.0)
#: ``am.put`` objects a daemon caches at most: past it the least recently used one is
#: dropped there (and sent again when a later task needs it).
PUT_CACHE_ENTRIES = 256
#: Exit statuses that mean "killed from outside", not "failed to start".
_OUTSIDE_KILLS = frozenset((-signal.SIGKILL, -signal.SIGTERM))


class Job:
    """The scheduler's record of one task (the handle is the user's side of it)."""

    __slots__ = (
        "id",
        "handle",
        "frames",
        "retries",
        "timeout",
        "daemon",
        "done",
        "inq",
        "revoking",
        "nbytes",
        "refs",
    )

    def __init__(
        self,
        id: int,
        handle: Any,
        frames: Any,
        retries: int = 0,
        timeout: float | None = None,
        nbytes: int = 0,
    ) -> None:
        self.id = id
        self.handle = handle
        self.nbytes = nbytes  # payload bytes, counted in the memory budget while queued
        self.refs: Any = None  # am.put references its arguments hold (sent first)
        self.frames = frames  # released once the job is done
        self.retries = retries
        self.timeout = timeout
        self.daemon: Daemon | None = None  # where it was sent (running or prefetched)
        self.done = False  # resolved (value, error, timeout, cancel, reset)
        self.inq = False  # counted in the queue (a cancelled one stays there, skipped)
        self.revoking = False  # a revoke is on its way to its daemon

    def __repr__(self) -> str:
        return f"<Job {self.id}{' done' if self.done else ''}>"


class Setup:
    """One ``everywhere()`` call: replayed to every daemon, resolved once the daemons it
    waits for have answered."""

    __slots__ = ("id", "frames", "handle", "label", "waiting", "need_more", "results", "error")

    def __init__(self, id: int, frames: Any, handle: Any, need_more: int, label: str = "") -> None:
        self.id = id
        self.frames = frames
        self.handle = handle
        self.label = label or f"everywhere() call {id}"
        self.waiting: set[Daemon] = set()
        self.need_more = need_more  # daemons that have not connected yet but count
        self.results: list[Any] = []
        self.error: BaseException | None = None


class Daemon:
    """What the scheduler knows about one connected daemon.

    ``ident`` and ``ctrl_ident`` are the transport's addresses of its two channels: opaque
    here, used by the I/O shell.
    """

    __slots__ = (
        "token",
        "ident",
        "ctrl_ident",
        "pid",
        "host",
        "launch",
        "local",
        "reliable",
        "slots",
        "running",
        "puts",
        "ahead",
        "replay",
        "ready",
        "retiring",
        "alive",
        "done",
        "connected_at",
        "sent_at",
        "pace",
        "drops",
        "sent_drops",
        "disconnected_at",
        "__weakref__",
    )

    def __init__(self, token: bytes) -> None:
        self.token = token
        self.ident: Any = None
        self.ctrl_ident: Any = None
        self.pid = 0
        self.host = ""
        self.launch = ""
        self.local = False  # a process this host started (the supervisor watches it)
        self.reliable = False  # an ordered, lossless channel: prefetch allowed
        self.slots = 1  # tasks it may run at once (``daemons(concurrency=)``)
        self.running: dict[int, Job] = {}  # sent to run, by id (at most ``slots``)
        self.ahead: deque[Job] = deque()  # prefetched behind a full ``running``, in order
        self.pace = 1.0  # seconds per task, a moving average (decides prefetch depth)
        self.puts: dict[int, Any] = {}  # am.put ids it holds -> their Drop, LRU first
        self.replay: deque[Setup] = deque()  # setups sent to it and not yet answered
        self.ready = False  # connected and its setups replayed: healthy
        self.retiring = False
        self.alive = True
        self.done = 0
        self.connected_at = 0.0
        self.sent_at = 0.0
        self.drops = 0  # disconnects of its task channel it reported (pings)
        self.sent_drops = 0  # ``drops`` when its (single) task was sent
        self.disconnected_at: float | None = None

    def __repr__(self) -> str:
        return f"<Daemon pid={self.pid} {'alive' if self.alive else 'gone'}>"

    def row(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "host": self.host,
            "launch": self.launch,
            "busy": bool(self.running),
            "tasks": list(self.running),
            "tasks_done": self.done,
            "connected_at": self.connected_at,
            "local": self.local,
        }


class Scheduler:
    """Pure state machine of one compute profile (see the module doc).

    Args:
        local_target: local daemons the profile keeps running (respawned when they go).
        hostname: this host's name, to tell local daemons from remote ones with the
            same pid.
        cancel_grace: seconds a cancelled task may take to stop before its daemon is
            killed.
        prefetch: send one more task to a busy daemon under a backlog (reliable
            channels only).
        prefetch_depth: how many tasks a daemon may hold behind its running one when
            its tasks are short (under :data:`FAST_TASK` seconds each on average) and
            travel in one frame: a daemon that finds its next task already in its socket
            never sleeps between tasks, so the host's send need not wake it (measured:
            a send that wakes a sleeping daemon costs ~45 us of the host's time on the
            2-vCPU VM, against a few us otherwise).  Other tasks: one.
        concurrency: tasks each daemon may run at once (its coroutine slots).
        budget: the memory budget of queued payloads: an object with ``give(n)`` (bytes
            left the queue) and ``force(n)`` (bytes came back to it: a retry or a revoke,
            never refused).  It is thread-safe and owned by the profile, which takes
            bytes from it before ``submit``; None: unbounded.
        wall: a wall clock for ``connected_at`` in status rows (the only clock read
            here, and only for display).
    """

    def __init__(
        self,
        *,
        local_target: int = 0,
        hostname: str = "",
        cancel_grace: float = 2.0,
        prefetch: bool = True,
        prefetch_depth: int = 1,
        concurrency: int = 1,
        budget: Any = None,
        wall: Callable[[], float] = lambda: 0.0,
    ) -> None:
        self.out: deque[tuple[Any, ...]] = deque()
        self.queue: deque[Job] = deque()  # FIFO; done jobs are skipped lazily
        self.queued = 0  # jobs in ``queue`` not done
        # Daemons with a free slot: an insertion-ordered set, O(1) add/remove/pick.  With
        # one slot each, the last one added is picked (a plain dict's popitem).  With
        # coroutine slots (concurrency > 1) the first one is picked and put back last if
        # it still has room: tasks go round the daemons instead of filling one daemon's
        # k slots while the others idle (plain functions run one at a time per daemon:
        # 4 of them on 4 daemons with concurrency=8 took 4x as long packed on one).
        self.idle: dict[Daemon, None] = OrderedDict() if concurrency > 1 else {}
        self._pick: Callable[[], tuple[Daemon, None]] = (
            functools.partial(self.idle.popitem, last=False)  # type: ignore[call-arg]
            if concurrency > 1
            else self.idle.popitem
        )
        self.prefetched: dict[Daemon, None] = {}  # daemons holding tasks in ``ahead``
        self.daemons: dict[bytes, Daemon] = {}  # connected, by token
        self.procs: dict[int, Daemon | None] = {}  # local processes: pid -> connection
        self.setups: list[Setup] = []
        self.setup_ids: dict[int, Setup] = {}
        self.local_target = local_target
        self.hostname = hostname
        self.cancel_grace = cancel_grace
        self.prefetch = prefetch
        self.prefetch_depth = prefetch_depth
        self.concurrency = concurrency
        self.budget = budget
        self.wall = wall
        self.spawning = 0  # SPAWNs emitted and not yet answered by spawned/spawn_failed
        self.respawn_at: float | None = None
        self.backoff = RESPAWN_BACKOFF[0]
        self.early_failures = 0
        self.broken: str | None = None
        self.closed = False
        self.counters = dict.fromkeys(
            ("submitted", "completed", "failed", "cancelled", "retried", "timed_out", "respawned"),
            0,
        )
        self._heap: list[tuple[float, int, int, Any, Any]] = []
        self._seq = itertools.count()

    # -- deadlines -----------------------------------------------------------------
    def _at(self, when: float, kind: int, a: Any, b: Any = None) -> None:
        heapq.heappush(self._heap, (when, next(self._seq), kind, a, b))

    def next_deadline(self) -> float | None:
        """When :meth:`tick` must next be called (None: no deadline)."""
        heap = self._heap
        while heap and not self._pending(heap[0]):
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def _pending(self, entry: tuple[float, int, int, Any, Any]) -> bool:
        """Is a heap entry still meaningful (else it is dropped lazily)?"""
        kind, a, b = entry[2], entry[3], entry[4]
        if kind == _TIMEOUT:
            return not a.done
        if kind == _GRACE:
            return a.alive and a.running.get(b.id) is b
        if kind == _DISCONNECT:
            return a.alive and a.disconnected_at is not None
        return self.respawn_at == entry[0] and not self.closed

    def tick(self, now: float) -> None:
        """Fire every deadline that is due at ``now``."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            if not self._pending(entry):
                continue
            kind, a, b = entry[2], entry[3], entry[4]
            if kind == _TIMEOUT:
                self.counters["timed_out"] += 1
                self._cancel(
                    a, now, ERROR, MiraiTimeout(f"mirai {a.id} timed out after {a.timeout} s")
                )
            elif kind == _GRACE:
                self._overdue(a, b)
            elif kind == _DISCONNECT:
                due = a.disconnected_at + RECONNECT_GRACE  # the same sum as when armed
                if due <= now:
                    self.gone(a, "its connection closed", now)
                else:
                    self._at(due, _DISCONNECT, a)
            else:
                self.respawn_at = None
                self._top_up()

    # -- submission ----------------------------------------------------------------
    def submit(self, job: Job, now: float = 0.0) -> None:
        """A new task: send it to a daemon with a free slot, or queue it (FIFO).

        With a budget, ``job.nbytes`` were taken from it by the caller: they are given
        back when the job leaves the queue (or at once if it never enters it)."""
        self.counters["submitted"] += 1
        if job.done:  # cancelled before it reached us
            self._give(job)
            return
        if self.closed:
            self._give(job)
            self._resolve(
                job, ERROR, DaemonError("daemons were reset before the task was dispatched")
            )
            return
        if job.timeout is not None:
            self._at(now + job.timeout, _TIMEOUT, job)
        if self.broken is not None and not self._serving():
            self._give(job)
            self._resolve(job, ERROR, DaemonError(self.broken))
            return
        idle = self.idle
        if idle and not self.queued:
            if self.budget is not None:
                self._give(job)
            d, _ = self._pick()
            # _send for a daemon with a free slot, inlined: the per-task path
            running = d.running
            running[job.id] = job
            d.sent_at = now
            d.sent_drops = d.drops
            job.daemon = d
            if job.refs:
                self._send_puts(d, job.refs)
            self.out.append((SEND, d, job.frames, job))
            if len(running) < d.slots:
                idle[d] = None
        else:
            self.queue.append(job)
            job.inq = True
            self.queued += 1

    def _give(self, job: Job) -> None:
        if self.budget is not None and job.nbytes:
            self.budget.give(job.nbytes)

    def _send(self, d: Daemon, job: Job, now: float) -> None:
        if len(d.running) < d.slots:
            d.running[job.id] = job
            d.sent_at = now
            d.sent_drops = d.drops
        else:
            d.ahead.append(job)
            self.prefetched[d] = None
        job.daemon = d
        if job.refs:
            self._send_puts(d, job.refs)
        self.out.append((SEND, d, job.frames, job))

    def _send_puts(self, d: Daemon, refs: Any) -> None:
        """``am.put`` objects go to a daemon before the first task there that uses them."""
        puts = d.puts
        for ref in refs:
            if ref.id in puts:
                puts[ref.id] = puts.pop(ref.id)  # most recently used last
                continue
            self.out.append((SEND, d, ref.frames, None))
            # The Drop message only: holding the reference would keep it from ever
            # being collected on the host.
            puts[ref.id] = ref.drop_frames
        while len(puts) > PUT_CACHE_ENTRIES:
            old_id = next(iter(puts))
            self.out.append((SEND, d, puts.pop(old_id), None))

    def forget_put(self, put_id: int) -> None:
        """An ``am.put`` reference was collected on the host: daemons drop the object."""
        for d in self.daemons.values():
            drop = d.puts.pop(put_id, None)
            if drop is not None:
                self.out.append((SEND, d, drop, None))

    def _pop(self) -> Job | None:
        queue = self.queue
        while queue:
            job = queue.popleft()
            if job.inq:
                job.inq = False
                self.queued -= 1
                if self.budget is not None and job.nbytes:
                    self.budget.give(job.nbytes)
                return job
        return None

    def _requeue(self, job: Job) -> None:
        """Back to the head of the queue (it never ran, or it is retried)."""
        job.daemon = None
        job.revoking = False
        if job.done:
            return
        if self.closed:
            self._resolve(job, ERROR, DaemonError("daemons were reset before the task resolved"))
            return
        self.queue.appendleft(job)
        job.inq = True
        self.queued += 1
        if self.budget is not None and job.nbytes:
            self.budget.force(job.nbytes)  # admitted work is never refused

    def _serving(self) -> bool:
        """Is some daemon connected and healthy (so queued work will be served)?"""
        return any(d.ready and not d.retiring for d in self.daemons.values())

    def _pump(self, now: float) -> None:
        """Hand queued tasks to daemons with free slots."""
        idle = self.idle
        while self.queued and idle:
            job = self._pop()
            if job is None:
                break
            d, _ = self._pick()
            self._send(d, job, now)
            if len(d.running) < d.slots:
                idle[d] = None

    def _make_idle(self, d: Daemon, now: float) -> None:
        """Give ``d`` work if it can take some: tasks for its free slots and, under a
        backlog, one more to start as soon as a slot frees (prefetch: the daemon never
        waits for our round trip)."""
        if not d.alive or d.retiring or d.replay or d.disconnected_at is not None:
            return
        while len(d.running) < d.slots:
            job = self._pop()
            if job is None:
                self.idle[d] = None
                if not d.running and self.prefetched:
                    self._revoke_for(now)
                return
            self._send(d, job, now)
        self.idle.pop(d, None)
        if (
            self.prefetch
            and d.reliable
            and d.slots == 1  # with coroutine slots a daemon would start it at once: k+1
        ):
            depth = self.prefetch_depth if d.pace < FAST_TASK else 1
            # a backlog that keeps every daemon busy anyway: FIFO order is unaffected
            floor = max(len(self.daemons), self.local_target)
            ahead = d.ahead
            while len(ahead) < depth and self.queued > floor:
                job = self._pop()
                if job is None:
                    break
                self._send(d, job, now)
                if type(job.frames) is not bytes:
                    break  # a task with out-of-band frames (tensors): one at a time

    def _revoke_for(self, now: float) -> None:
        """A daemon is idle with nothing queued: take back one task prefetched behind a
        busy daemon (if it has not started), so it runs on the idle one.

        ``prefetched`` holds only candidates: a daemon leaves it when its revoke is sent
        (or its prefetched task finished, started or was cancelled), so this is O(1)
        amortised however many daemons there are."""
        prefetched = self.prefetched
        while prefetched:
            d = next(iter(prefetched))
            for job in reversed(d.ahead):  # the last one: the furthest from starting
                if not job.done and not job.revoking:
                    job.revoking = True
                    self.out.append((CANCEL, d, job.id, True))
                    if job is d.ahead[0]:
                        del prefetched[d]  # nothing more to take back from it
                    return
            del prefetched[d]

    # -- cancel and timeout --------------------------------------------------------
    def cancel(self, job: Job, now: float = 0.0) -> None:
        """The user cancelled ``job`` (its handle is resolved as cancelled already or
        is resolved by the RESOLVE this emits)."""
        if not job.done:
            self.counters["cancelled"] += 1
        self._cancel(job, now, CANCELLED, None)

    def _cancel(self, job: Job, now: float, state: int, value: Any) -> None:
        if job.done:
            return
        self._resolve(job, state, value)
        if job.inq:  # still in the queue: skipped when popped
            job.inq = False
            self.queued -= 1
            self._give(job)
            return
        d = job.daemon
        if d is None or not d.alive:
            return
        if d.running.get(job.id) is job:
            self.out.append((CANCEL, d, job.id, False))
            self._at(now + self.cancel_grace, _GRACE, d, job)
        elif job in d.ahead:  # prefetched: the daemon skips it, never runs it
            self.out.append((CANCEL, d, job.id, False))

    def _overdue(self, d: Daemon, job: Job) -> None:
        log.warning(
            "daemon pid %s did not stop task %s within %.1f s of a cancel: killing it",
            d.pid,
            job.id,
            self.cancel_grace,
        )
        self.out.append((KILL, d))
        self.out.append((EXIT, d, "cancel overdue", CTRL_CHANNEL))
        if not d.local:  # a local one is forgotten when its process exits
            self.gone(d, "killed after an overdue cancel")

    def _resolve(self, job: Job, state: int, value: Any) -> None:
        job.done = True
        job.frames = None
        if state == ERROR:
            self.counters["failed"] += 1
        self.out.append((RESOLVE, job.handle, state, value))

    # -- everywhere ----------------------------------------------------------------
    def everywhere(self, item: Setup) -> None:
        """Run a setup on every daemon now, and on every daemon that connects later."""
        if self.closed:
            self.out.append((RESOLVE, item.handle, ERROR, DaemonError("daemons were reset")))
            return
        self.setups.append(item)
        self.setup_ids[item.id] = item
        connected = [
            d for d in self.daemons.values() if d.alive and d.ident is not None and not d.retiring
        ]
        item.need_more = max(0, item.need_more - len(connected))
        for d in connected:
            item.waiting.add(d)
            self._send_setup(d, item)
        self._maybe_resolve_setup(item)

    def _send_setup(self, d: Daemon, item: Setup) -> None:
        self.idle.pop(d, None)
        d.replay.append(item)
        self.out.append((SEND, d, item.frames, None))

    def _maybe_resolve_setup(self, item: Setup) -> None:
        if item.waiting or item.need_more > 0 or item.handle is None:
            return
        handle, item.handle = item.handle, None
        if item.error is not None:
            self.out.append((RESOLVE, handle, ERROR, item.error))
        else:
            self.out.append((RESOLVE, handle, VALUE, item.results))

    # -- messages from daemons -----------------------------------------------------
    def hello(
        self,
        ident: Any,
        role: str,
        token: bytes,
        *,
        pid: int,
        host: str,
        launch: str = "",
        reliable: bool = False,
        now: float = 0.0,
    ) -> Daemon | None:
        """A daemon's channel said hello.  Returns its record (None after reset)."""
        if self.closed:
            return None
        d = self.daemons.get(token)
        if d is None:
            d = Daemon(token)
            d.pid, d.host, d.launch = pid, host, launch
            self.daemons[token] = d
        if role == "ctrl":
            d.ctrl_ident = ident
            for job in d.running.values():  # cancelled before we could reach it
                if job.done:
                    self.out.append((CANCEL, d, job.id, False))
            return d
        if d.ident is not None:  # a duplicate hello on the task channel: ignore
            return d
        d.ident = ident
        d.reliable = reliable
        d.slots = self.concurrency
        d.connected_at = self.wall()
        if pid in self.procs and host == self.hostname and self.procs[pid] is None:
            d.local = True
            self.procs[pid] = d
        self.out.append((WELCOME, d))
        for item in self.setups:  # replay everywhere() calls, in order, before any task
            if item.need_more > 0 and item.handle is not None:
                item.need_more -= 1
                item.waiting.add(d)
            self._send_setup(d, item)
        if not d.replay:
            self._ready(d, now)
        return d

    def _ready(self, d: Daemon, now: float) -> None:
        """``d`` is connected and has replayed every setup: healthy."""
        d.ready = True
        self.early_failures = 0
        self.backoff = RESPAWN_BACKOFF[0]
        if self.broken is not None:  # a healthy daemon heals the breaker
            log.warning("asyncmirai: a daemon connected: the profile serves again")
            self.broken = None
            self._top_up()
        self._make_idle(d, now)

    def result(self, d: Daemon, tid: int, state: int, value: Any, now: float = 0.0) -> None:
        """``d`` answered task or setup ``tid`` with a value (``VALUE``) or an error."""
        if d.disconnected_at is not None:  # a reply: connected again
            self.seen(d, now)
        job = d.running.get(tid)
        if job is not None:
            d.pace += (now - d.sent_at - d.pace) * 0.25
            counters = self.counters
            if not job.done:  # _resolve, inlined: the per-task path
                counters["completed"] += 1
                job.done = True
                if state == ERROR:
                    counters["failed"] += 1
                self.out.append((RESOLVE, job.handle, state, value))
            d.done += 1
            self._finished(d, job, now)
            return
        item = self.setup_ids.get(tid)
        if item is not None and d.replay and d.replay[0] is item:
            d.replay.popleft()
            if d in item.waiting:
                item.waiting.discard(d)
                if state == VALUE:
                    item.results.append(value)
                elif item.error is None:
                    item.error = value
                self._maybe_resolve_setup(item)
            elif state != VALUE:
                log.warning(
                    "asyncmirai: %s failed on replay to pid %s: %s", item.label, d.pid, value
                )
            if not d.replay and not d.ready:
                self._ready(d, now)
            else:
                self._make_idle(d, now)
        # else: a late reply for a task that was requeued elsewhere: dropped

    def cancelled(self, d: Daemon, tid: int, revoked: bool, now: float = 0.0) -> None:
        """``d`` acknowledged a cancel (the task stopped) or a revoke (never started)."""
        if d.disconnected_at is not None:  # a reply: connected again
            self.seen(d, now)
        if not revoked:
            job = d.running.get(tid)
            if job is not None:
                self._finished(d, job, now)
            return
        job = next((j for j in d.ahead if j.id == tid), None)
        if job is not None:
            d.ahead.remove(job)
            if not d.ahead:
                self.prefetched.pop(d, None)
        elif tid in d.running:
            # The acknowledgement may overtake the result of the task before it.
            job = d.running.pop(tid)
            self._promote(d, now)
        else:
            return
        self._requeue(job)
        self._pump(now)  # to the idle daemon that asked for it, if any
        if d.retiring:
            if not d.running:
                self.gone(d, "retired")
        else:
            self._make_idle(d, now)

    def _promote(self, d: Daemon, now: float) -> None:
        """A slot freed: the first prefetched task (if any) runs now."""
        ahead = d.ahead
        if ahead and len(d.running) < d.slots:
            nxt = ahead.popleft()
            if not ahead:
                self.prefetched.pop(d, None)
            d.running[nxt.id] = nxt
            d.sent_at = now
            d.sent_drops = d.drops

    def _finished(self, d: Daemon, job: Job, now: float) -> None:
        del d.running[job.id]
        job.daemon = None
        job.frames = None
        if d.ahead:
            self._promote(d, now)
        if d.retiring:
            if not d.running:
                self.gone(d, "retired")
        else:
            self._make_idle(d, now)

    def ping(
        self,
        d: Daemon,
        current: int | None,
        done: int | None,
        drops: int,
        done_drops: int,
        now: float,
    ) -> None:
        """A remote daemon's ping: catch a task or a result lost in a connection drop
        (ZeroMQ reconnects do not resend): it says what it runs and last answered."""
        if d.disconnected_at is not None:  # back within its grace: it takes work again
            self.seen(d, now)
        d.drops = drops
        if d.slots != 1 or len(d.running) != 1:  # pings name one task: single-slot only
            return
        job = next(iter(d.running.values()))
        if current == job.id or d.sent_at > now - LOST_AFTER:
            return
        if done == job.id:
            if drops == done_drops:
                return  # no disconnect since the reply was sent: it is in flight
        elif drops == d.sent_drops:
            return  # no disconnect since we sent it: it is on its way
        del d.running[job.id]
        job.daemon = None
        if done == job.id:  # it ran, but its reply was lost
            self._retry_or_fail(
                job,
                f"the result of mirai {job.id} was lost in a connection drop "
                f"with daemon pid {d.pid} on {d.host}",
            )
        elif not job.done:  # the task message never arrived: it never ran
            log.warning("asyncmirai: mirai %s was lost on the way to pid %s: resent", job.id, d.pid)
            self._requeue(job)
        self._make_idle(d, now)
        self._pump(now)

    def _retry_or_fail(self, job: Job, message: str) -> None:
        """A job that may have run was lost with its daemon: again under ``_retries``,
        else it fails with DaemonError."""
        if job.done:
            return
        if job.retries > 0 and not self.closed:
            job.retries -= 1
            self.counters["retried"] += 1
            self._requeue(job)
        else:
            self._resolve(job, ERROR, DaemonError(message))

    def retire(self, d: Daemon, reason: str) -> None:
        """``d`` retires (maxtasks, idletime, walltime): tasks already sent to it come back
        revoked, and it is told to exit after them."""
        d.disconnected_at = None
        d.retiring = True
        self.idle.pop(d, None)
        # On the task channel, after any task already sent: ordered, so none is dropped.
        self.out.append((EXIT, d, "retired", TASK_CHANNEL))
        if not d.running:
            self.gone(d, f"retired ({reason})")

    def seen(self, d: Daemon, now: float = 0.0) -> None:
        """Any sign of life from ``d`` (it reconnected)."""
        if d.disconnected_at is not None:
            d.disconnected_at = None
            self._reconnected(d, now)

    def _reconnected(self, d: Daemon, now: float) -> None:
        """``d`` is back within its grace: it takes new work again."""
        if d.alive and d.ready:
            self._make_idle(d, now)

    def disconnected(self, d: Daemon, now: float) -> None:
        """A channel of remote daemon ``d`` lost its connection; it is lost unless it
        reconnects within :data:`RECONNECT_GRACE`.  Meanwhile it gets no new task: a
        task sent into a dead connection would wait out the grace, then fail (or spend
        a retry); 400 daemons vanishing at once could take every retry of a task."""
        if d.alive and d.disconnected_at is None:
            d.disconnected_at = now
            self.idle.pop(d, None)
            self._at(now + RECONNECT_GRACE, _DISCONNECT, d)

    def send_failed(self, d: Daemon, job: Job | None, now: float = 0.0) -> None:
        """A SEND to ``d`` could not be delivered: ``job`` never ran; ``d`` is gone."""
        if job is not None and job.daemon is d:
            if d.running.get(job.id) is job:
                del d.running[job.id]
            elif job in d.ahead:
                d.ahead.remove(job)
                if not d.ahead:
                    self.prefetched.pop(d, None)
            self._requeue(job)
        self.gone(d, "a send to it failed")
        if d.local:
            self.out.append((KILL, d))

    # -- daemon loss and local processes --------------------------------------------
    def gone(self, d: Daemon, reason: str, now: float = 0.0) -> None:
        """Forget ``d``: its running task fails with DaemonError (or is requeued under
        ``_retries``), a prefetched one goes back to the head of the queue, a setup it
        was running fails its ``everywhere()`` handle."""
        if not d.alive:
            return
        d.alive = False
        self.daemons.pop(d.token, None)
        self.idle.pop(d, None)
        self.prefetched.pop(d, None)
        where = f"daemon pid {d.pid} on {d.host}" if d.pid else "a daemon"
        culprit = d.replay[0] if d.replay else None
        for item in self.setups:
            if d in item.waiting:
                item.waiting.discard(d)
                if item is culprit and item.error is None:
                    item.error = DaemonError(f"{where} was lost running {item.label}: {reason}")
                self._maybe_resolve_setup(item)
        ahead, d.ahead = d.ahead, deque()
        for nxt in reversed(ahead):  # prefetched, never started: back at the head
            self._requeue(nxt)
        running, d.running = d.running, {}
        for job in reversed(running.values()):  # requeued at the head: keep their order
            job.daemon = None
            self._retry_or_fail(job, f"{where} was lost running mirai {job.id}: {reason}")
        if not self.closed:
            self._pump(now)
            self._check_broken()

    def spawned(self, pid: int) -> None:
        """A SPAWN produced process ``pid``."""
        self.spawning = max(0, self.spawning - 1)
        self.procs[pid] = None
        self.backoff = RESPAWN_BACKOFF[0]

    def spawn_failed(self, error: BaseException, now: float) -> None:
        """A SPAWN failed (EMFILE, ENOMEM ...): retried with exponential backoff."""
        self.spawning = max(0, self.spawning - 1)
        log.warning(
            "asyncmirai: could not start a local daemon (%s): retrying in %.1f s",
            error,
            self.backoff,
        )
        if self.respawn_at is None:
            self.respawn_at = now + self.backoff
            self._at(self.respawn_at, _RESPAWN, None)
        self.backoff = min(self.backoff * 2, RESPAWN_BACKOFF[1])

    def process_exited(
        self, pid: int, returncode: int | None, reason: str, now: float = 0.0
    ) -> None:
        """Local process ``pid`` exited (``returncode`` as ``Popen`` gives it)."""
        if pid not in self.procs:
            return
        d = self.procs.pop(pid)
        retired = d is not None and d.retiring
        started = d is not None and d.ready
        if d is not None:
            self.gone(d, reason, now)
        if self.closed:
            return
        if not started and not retired and returncode not in _OUTSIDE_KILLS:
            # It died on its own before it was healthy: a start-up failure.
            self.early_failures += 1
            if self.early_failures >= BREAKER_TRIPS_AT:
                culprit = None
                if d is not None and d.replay:
                    culprit = d.replay[0]
                what = f"while replaying {culprit.label}" if culprit else "before they connect"
                self._trip(f"local daemons keep dying {what} ({reason})", culprit)
                return
        if self.broken is None:
            self.counters["respawned"] += 1
            self._top_up()

    def _top_up(self) -> None:
        """Spawn local daemons until the profile has ``local_target`` of them."""
        if self.closed or self.broken is not None or self.respawn_at is not None:
            return
        k = self.local_target - len(self.procs) - self.spawning
        if k > 0:
            self.spawning += k
            self.out.append((SPAWN, k))

    def add_local(self, k: int) -> None:
        """The user asked for ``k`` more local daemons (``launch_local``)."""
        self.local_target += k
        if self.broken is not None:
            self.broken = None
            self.early_failures = 0
        self._top_up()

    def _trip(self, message: str, culprit: Setup | None) -> None:
        self.broken = message
        log.error("asyncmirai: %s; not respawning (a daemon that connects heals this)", message)
        err = DaemonError(message)
        if culprit is not None and culprit.handle is not None:
            culprit.error = culprit.error or err
            culprit.need_more = 0
            culprit.waiting.clear()
            self._maybe_resolve_setup(culprit)
        for item in self.setups:  # those waiting for daemons that will never come
            if item.handle is not None and item.need_more > 0:
                item.need_more = 0
                item.error = item.error or err
                self._maybe_resolve_setup(item)
        self._check_broken()

    def _check_broken(self) -> None:
        """Under a tripped breaker, queued tasks fail once no healthy daemon serves."""
        if self.broken is None or self._serving():
            return
        err = self.broken
        while self.queued:
            job = self._pop()
            if job is None:
                break
            self._resolve(job, ERROR, DaemonError(err))

    # -- introspection and reset ---------------------------------------------------
    def job_state(self, job: Job) -> str:
        """``"queued"``, ``"running"`` or ``"done"``."""
        if job.done:
            return "done"
        d = job.daemon
        return "running" if d is not None and d.running.get(job.id) is job else "queued"

    def status(self) -> dict[str, Any]:
        live = [d for d in self.daemons.values() if d.ident is not None and d.alive]
        return {
            "connections": len(live),
            "awaiting": self.queued + sum(1 for d in live for j in d.ahead if not j.done),
            "executing": sum(len(d.running) for d in live),
            "completed": self.counters["completed"],
            "daemons": [d.row() for d in live],
        }

    def close(self, reason: str = "daemons were reset") -> None:
        """Fail every unresolved task with DaemonError and tell daemons to exit."""
        if self.closed:
            return
        self.closed = True
        err = f"{reason} before the task resolved"
        while self.queued:
            job = self._pop()
            if job is None:
                break
            self._resolve(job, ERROR, DaemonError(err))
        for d in list(self.daemons.values()):
            for job in [*d.running.values(), *d.ahead]:
                if not job.done:
                    self._resolve(job, ERROR, DaemonError(err))
            self.out.append((EXIT, d, reason, BOTH_CHANNELS))
            d.alive = False
        self.daemons.clear()
        self.idle.clear()
        self.prefetched.clear()
        for item in self.setups:
            if item.handle is not None:
                handle, item.handle = item.handle, None
                self.out.append((RESOLVE, handle, ERROR, DaemonError(err)))
        self._heap.clear()
