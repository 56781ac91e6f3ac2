"""The pure scheduler alone: no process, no socket, a fake clock.

``Harness`` plays the dispatcher: it feeds events to :class:`Scheduler` and performs its
actions by recording them.  The Hypothesis state machine at the end interleaves every
kind of event with simulated daemons that answer what was really sent to them.
"""

from __future__ import annotations

import os
import signal
from collections import deque
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from asyncmirai._errors import DaemonError, MiraiTimeout
from asyncmirai._scheduler import (
    BREAKER_TRIPS_AT,
    CANCEL,
    CANCELLED,
    CTRL_CHANNEL,
    ERROR,
    EXIT,
    KILL,
    LOST_AFTER,
    RECONNECT_GRACE,
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

pytestmark = pytest.mark.timeout(120)

HOST = "thishost"


class Handle:
    """Stands for a Mirai: records how it was resolved."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.outcomes: list[tuple[int, Any]] = []

    def __repr__(self) -> str:
        return f"<Handle {self.name}>"


class Harness:
    """A fake dispatcher around a scheduler, with a fake clock."""

    def __init__(self, fail_sends: bool = False, **kw: Any) -> None:
        kw.setdefault("hostname", HOST)
        self.s = Scheduler(**kw)
        self.now = 0.0
        self.fail_sends = fail_sends
        self.sent: list[tuple[Daemon, Any, Job | None]] = []
        self.cancels: list[tuple[Daemon, int, bool]] = []
        self.exits: list[tuple[Daemon, str, int]] = []
        self.kills: list[Daemon] = []
        self.spawns: list[int] = []
        self.welcomed: list[Daemon] = []
        self.tokens = 0
        self.pids = 1000
        self.ids = 0

    # -- performing actions ----------------------------------------------------
    def flush(self) -> None:
        out = self.s.out
        while out:
            act = out.popleft()
            op = act[0]
            if op == SEND:
                d = act[1]
                if not d.alive:
                    continue
                if self.fail_sends:
                    self.s.send_failed(d, act[3], self.now)
                    continue
                self.sent.append((d, act[2], act[3]))
            elif op == RESOLVE:
                act[1].outcomes.append((act[2], act[3]))
            elif op == CANCEL:
                self.cancels.append((act[1], act[2], act[3]))
            elif op == EXIT:
                self.exits.append((act[1], act[2], act[3]))
            elif op == WELCOME:
                self.welcomed.append(act[1])
            elif op == KILL:
                self.kills.append(act[1])
            elif op == SPAWN:
                self.spawns.append(act[1])

    # -- events ----------------------------------------------------------------
    def job(self, retries: int = 0, timeout: float | None = None) -> Job:
        self.ids += 1
        return Job(self.ids, Handle(f"t{self.ids}"), [b"task %d" % self.ids], retries, timeout)

    def submit(self, **kw: Any) -> Job:
        job = self.job(**kw)
        self.s.submit(job, self.now)
        self.flush()
        return job

    def connect(self, *, local: bool = False, reliable: bool = False) -> Daemon:
        self.tokens += 1
        self.pids += 1
        token = b"tok%d" % self.tokens
        if local:
            self.s.spawned(self.pids)
        d = self.s.hello(b"c" + token, "ctrl", token, pid=self.pids, host=HOST, now=self.now)
        d = self.s.hello(
            b"t" + token, "task", token, pid=self.pids, host=HOST, reliable=reliable, now=self.now
        )
        assert d is not None
        self.flush()
        return d

    def result(self, d: Daemon, job: Job | Setup, value: Any = "ok", state: int = VALUE) -> None:
        self.s.result(d, job.id, state, value, self.now)
        self.flush()

    def advance(self, dt: float) -> None:
        self.now += dt
        self.s.tick(self.now)
        self.flush()

    def tasks_sent_to(self, d: Daemon) -> list[Job]:
        return [j for dd, _, j in self.sent if dd is d and j is not None]


def task_of(d: Daemon) -> Job | None:
    """The task a single-slot daemon runs."""
    return next(iter(d.running.values()), None)


def outcome(job: Job) -> tuple[int, Any]:
    (out,) = job.handle.outcomes
    return out


# -- unit tests ------------------------------------------------------------------------
def test_fifo_to_one_daemon() -> None:
    h = Harness()
    jobs = [h.submit() for _ in range(3)]
    assert not h.sent and h.s.queued == 3
    d = h.connect()
    assert h.welcomed == [d]
    for expected in jobs:
        assert h.sent[-1][2] is expected
        h.result(d, expected, value=expected.id)
    assert [outcome(j) for j in jobs] == [(VALUE, j.id) for j in jobs]
    assert h.s.idle == {d: None} and h.s.status()["completed"] == 3


def test_idle_daemon_gets_the_task_at_once() -> None:
    h = Harness()
    d = h.connect()
    job = h.submit()
    assert h.sent == [(d, job.frames, job)] or h.sent[0][2] is job
    assert h.s.job_state(job) == "running" and d not in h.s.idle


def test_prefetch_under_backlog_on_reliable_channels_only() -> None:
    h = Harness()
    d = h.connect(reliable=True)
    r = h.connect(reliable=False)
    for _ in range(8):
        h.submit()
    h.result(d, task_of(d))  # d is made idle again under a backlog of 5 > 2 daemons
    assert task_of(d) is not None and len(d.ahead) == 1  # prefetched
    assert h.s.job_state(d.ahead[0]) == "queued"
    assert not r.ahead  # unreliable (zmq) channel: never prefetched
    h.result(r, task_of(r))
    assert not r.ahead
    assert h.s.status()["awaiting"] == h.s.queued + 1


def test_no_prefetch_with_coroutine_slots() -> None:
    # a daemon with slots starts whatever it receives: a prefetch would run k + 1 at once
    h = Harness(concurrency=3)
    d = h.connect(reliable=True)
    for _ in range(20):
        h.submit()
    assert len(d.running) == 3 and not d.ahead
    h.result(d, next(iter(d.running.values())))
    assert len(d.running) == 3 and not d.ahead


def test_no_prefetch_without_backlog() -> None:
    h = Harness()
    d = h.connect(reliable=True)
    h.connect(reliable=True)
    for _ in range(3):
        h.submit()
    h.result(d, task_of(d))
    assert not d.ahead


def test_idle_daemon_revokes_a_prefetched_task() -> None:
    h = Harness()
    busy = h.connect(reliable=True)
    for _ in range(4):
        h.submit()
    h.result(busy, task_of(busy))  # backlog 2 > 1 daemon: busy takes one and prefetches one
    assert len(busy.ahead) == 1
    prefetched = busy.ahead[0]
    # drain the queue so that a new daemon finds nothing queued
    while h.s.queued:
        h.s._pop()
    idle = h.connect(reliable=True)
    assert (busy, prefetched.id, True) in h.cancels
    assert h.s.idle == {idle: None}
    h.s.cancelled(busy, prefetched.id, True, h.now)  # granted: it never started
    h.flush()
    assert task_of(idle) is prefetched and not busy.ahead
    assert h.tasks_sent_to(idle) == [prefetched]


def test_replay_reaches_a_new_daemon_in_order_before_any_task() -> None:
    h = Harness()
    h1 = Handle("s1")
    s1 = Setup(101, [b"s1"], h1, need_more=0)
    s2 = Setup(102, [b"s2"], Handle("s2"), need_more=0)
    h.s.everywhere(s1)
    h.s.everywhere(s2)
    h.flush()
    assert h1.outcomes == [(VALUE, [])]  # nobody connected, nobody expected
    job = h.submit()
    d = h.connect()
    assert [f for dd, f, _ in h.sent if dd is d] == [[b"s1"], [b"s2"]]
    assert task_of(d) is None and not d.ready
    h.result(d, s1)
    assert task_of(d) is None
    h.result(d, s2)
    assert d.ready and d.running.get(job.id) is job


def test_everywhere_waits_for_expected_local_daemons() -> None:
    h = Harness(local_target=2)
    handle = Handle("s")
    item = Setup(7, [b"s"], handle, need_more=2)
    h.s.everywhere(item)
    h.flush()
    d1 = h.connect(local=True)
    h.result(d1, item, value=1)
    assert not handle.outcomes  # one expected daemon has not connected yet
    d2 = h.connect(local=True)
    h.result(d2, item, value=2)
    assert handle.outcomes == [(VALUE, [1, 2])]


def test_retire_handshake() -> None:
    h = Harness()
    d = h.connect()
    job = h.submit()
    h.s.retire(d, "maxtasks")
    h.flush()
    assert (d, "retired", TASK_CHANNEL) in h.exits
    assert d.alive  # it finishes its task first
    queued = h.submit()
    assert queued.daemon is None  # a retiring daemon gets nothing new
    h.result(d, job)
    assert not d.alive and outcome(job) == (VALUE, "ok")
    assert h.s.queued == 1


def test_retries_then_daemon_error() -> None:
    h = Harness()
    d1 = h.connect()
    job = h.submit(retries=1)
    h.s.gone(d1, "killed")
    h.flush()
    assert not job.handle.outcomes and h.s.queued == 1 and job.retries == 0
    d2 = h.connect()
    assert d2.running.get(job.id) is job
    h.s.gone(d2, "killed again")
    h.flush()
    state, err = outcome(job)
    assert state == ERROR and isinstance(err, DaemonError) and "killed again" in str(err)
    assert h.s.counters["retried"] == 1


def test_timeout_cancels_then_kills_after_grace() -> None:
    h = Harness(cancel_grace=2.0)
    d = h.connect()
    job = h.submit(timeout=5.0)
    assert h.s.next_deadline() == 5.0
    h.advance(4.9)
    assert not job.handle.outcomes
    h.advance(0.1)
    state, err = outcome(job)
    assert state == ERROR and isinstance(err, MiraiTimeout)
    assert h.cancels == [(d, job.id, False)]
    assert h.s.next_deadline() == 7.0
    h.advance(2.0)
    assert h.kills == [d] and (d, "cancel overdue", CTRL_CHANNEL) in h.exits
    assert not d.alive  # a remote one is forgotten at once


def test_cancel_acknowledged_in_time_keeps_the_daemon() -> None:
    h = Harness()
    d = h.connect()
    job = h.submit()
    h.s.cancel(job, h.now)
    h.flush()
    assert outcome(job) == (CANCELLED, None)
    h.s.cancelled(d, job.id, False, h.now)
    h.flush()
    h.advance(10)
    assert not h.kills and d.alive and h.s.idle == {d: None}


def test_cancel_of_queued_task_never_sends_it() -> None:
    h = Harness()
    a, b = h.submit(), h.submit()
    h.s.cancel(a, h.now)
    h.flush()
    assert h.s.queued == 1
    d = h.connect()
    assert h.tasks_sent_to(d) == [b]


def test_lost_task_message_is_resent_after_a_drop() -> None:
    h = Harness()
    d = h.connect()
    job = h.submit()
    h.now = LOST_AFTER + 1
    # the daemon runs nothing, answered nothing, and its channel dropped once
    h.s.ping(d, None, None, 1, 0, h.now)
    h.flush()
    assert d.running.get(job.id) is job and len(h.tasks_sent_to(d)) == 2


def test_lost_result_fails_the_task() -> None:
    h = Harness()
    d = h.connect()
    job = h.submit()
    h.now = LOST_AFTER + 1
    h.s.ping(d, None, job.id, 1, 0, h.now)
    h.flush()
    state, err = outcome(job)
    assert state == ERROR and "lost in a connection drop" in str(err)


def test_ping_without_a_drop_changes_nothing() -> None:
    h = Harness()
    d = h.connect()
    job = h.submit()
    h.now = 100.0
    h.s.ping(d, None, None, 0, 0, h.now)
    h.flush()
    assert d.running.get(job.id) is job and not job.handle.outcomes


def test_busy_daemon_is_never_lost_by_silence() -> None:
    # finding 7: a task holding the GIL for long sends no pings; that is not "lost"
    h = Harness()
    d = h.connect()
    job = h.submit()
    h.advance(3600)
    assert d.alive and d.running.get(job.id) is job and not job.handle.outcomes


def test_disconnect_is_loss_after_grace_unless_it_reconnects() -> None:
    h = Harness()
    d = h.connect()
    job = h.submit(retries=1)
    h.s.disconnected(d, h.now)
    h.advance(RECONNECT_GRACE / 2)
    h.s.seen(d)  # reconnected
    h.advance(RECONNECT_GRACE)
    assert d.alive
    h.s.disconnected(d, h.now)
    h.advance(RECONNECT_GRACE)
    assert not d.alive and h.s.queued == 1 and not job.handle.outcomes


def test_coroutine_slots_take_tasks_round_the_daemons() -> None:
    """concurrency > 1: a new task goes to the daemon that has waited longest with a free
    slot, so 4 tasks on 4 daemons spread one each instead of filling one daemon's slots
    (a plain function runs one at a time per daemon)."""
    h = Harness(concurrency=8)
    ds = [h.connect() for _ in range(4)]
    jobs = [h.submit() for _ in range(4)]
    assert sorted(len(d.running) for d in ds) == [1, 1, 1, 1]
    [h.submit() for _ in range(8)]
    assert sorted(len(d.running) for d in ds) == [3, 3, 3, 3]
    for d, j in zip(ds, jobs, strict=True):
        h.result(d, j)
    assert sorted(len(d.running) for d in ds) == [2, 2, 2, 2]
    [h.submit() for _ in range(20)]
    assert sorted(len(d.running) for d in ds) == [7, 7, 7, 7]


def test_a_disconnected_daemon_gets_no_new_task_until_it_is_back() -> None:
    h = Harness()
    a = h.connect()
    b = h.connect()
    h.s.disconnected(a, h.now)
    jobs = [h.submit(retries=0) for _ in range(2)]
    assert h.tasks_sent_to(a) == []  # b took one, the other waits in the queue
    assert h.tasks_sent_to(b) == [jobs[0]] and h.s.queued == 1
    h.s.seen(a, h.now)  # a reconnected within the grace: it takes the waiting task
    h.flush()
    assert h.tasks_sent_to(a) == [jobs[1]] and h.s.queued == 0
    h.advance(2 * RECONNECT_GRACE)
    assert a.alive and not any(j.handle.outcomes for j in jobs)


def test_reset_fails_everything_once() -> None:
    h = Harness()
    d = h.connect()
    running = h.submit()
    queued = h.submit()
    handle = Handle("s")
    h.s.everywhere(Setup(50, [b"s"], handle, need_more=3))
    h.s.close("reset")
    h.flush()
    for j in (running, queued):
        state, err = outcome(j)
        assert state == ERROR and isinstance(err, DaemonError)
    assert handle.outcomes[0][0] == ERROR and len(handle.outcomes) == 1
    assert (d, "reset", TASK_CHANNEL | CTRL_CHANNEL) in h.exits
    late = h.submit()
    assert outcome(late)[0] == ERROR


# -- findings of the hardening issue, at the scheduler level ---------------------------
def test_outside_sigkills_before_connect_do_not_trip_the_breaker() -> None:
    # finding 2: SIGKILL a connected daemon, then its replacements before they connect
    h = Harness(local_target=3)
    h.s.add_local(0)
    h.flush()
    assert h.spawns == [3]
    daemons = [h.connect(local=True) for _ in range(3)]
    h.s.process_exited(daemons[0].pid, -signal.SIGKILL, "killed by SIGKILL", h.now)
    for _ in range(5):
        h.s.spawned(5000 + _)
        h.s.process_exited(5000 + _, -signal.SIGKILL, "killed by SIGKILL", h.now)
    h.flush()
    assert h.s.broken is None
    job = h.submit()
    assert job.daemon in daemons[1:]


def test_breaker_trips_on_startup_failures_healthy_daemons_keep_serving_and_a_connect_heals() -> (
    None
):
    h = Harness(local_target=3)
    healthy = h.connect(local=True)
    for i in range(BREAKER_TRIPS_AT):
        h.s.spawned(6000 + i)
        h.s.process_exited(6000 + i, 1, "exited with code 1", h.now)
    h.flush()
    assert h.s.broken is not None and "before they connect" in h.s.broken
    spawns_before = list(h.spawns)
    a = h.submit()
    assert a.daemon is healthy  # still served
    b = h.submit()  # queued behind a
    h.result(healthy, a)
    assert task_of(healthy) is b
    # the healthy daemon dies: nothing serves, queued work fails with the breaker's error
    c = h.submit()
    h.s.process_exited(healthy.pid, -signal.SIGKILL, "killed", h.now)
    h.flush()
    assert outcome(c)[0] == ERROR and "keep dying" in str(outcome(c)[1])
    assert h.spawns == spawns_before  # no respawn loop
    d = h.submit()
    assert outcome(d)[0] == ERROR
    # a daemon that connects heals the breaker and tops the profile up again
    h.connect()
    assert h.s.broken is None and h.spawns[-1] >= 1


def test_many_daemons_vanishing_at_once_is_not_a_recursion() -> None:
    # finding 4: 400 idle daemons whose sends all fail
    h = Harness()
    daemons = [h.connect() for _ in range(400)]
    h.fail_sends = True
    job = h.submit()
    assert all(not d.alive for d in daemons)
    assert job.daemon is None and h.s.queued == 1  # not left assigned to a dead daemon
    assert not job.handle.outcomes


def test_failed_send_requeues_without_using_a_retry() -> None:
    h = Harness()
    d = h.connect()
    h.fail_sends = True
    job = h.submit(retries=0)
    assert not d.alive and not job.handle.outcomes and h.s.queued == 1
    h.fail_sends = False
    d2 = h.connect()
    assert d2.running.get(job.id) is job


def test_everywhere_that_kills_daemons_trips_the_breaker() -> None:
    # finding 6: the replayed setup os._exit()s every daemon that runs it
    h = Harness(local_target=2)
    h.s.add_local(0)
    h.flush()
    handle = Handle("setup")
    item = Setup(9, [b"kill"], handle, need_more=2, label="everywhere(boom)")
    h.s.everywhere(item)
    queued = h.submit()
    for _ in range(10):
        d = h.connect(local=True)
        h.s.process_exited(d.pid, 9, "exited with code 9", h.now)
        h.flush()
        if h.s.broken:
            break
    assert h.s.broken is not None and "everywhere(boom)" in h.s.broken
    ((state, err),) = handle.outcomes
    assert state == ERROR and isinstance(err, DaemonError) and "everywhere(boom)" in str(err)
    assert outcome(queued)[0] == ERROR and "everywhere(boom)" in str(outcome(queued)[1])
    spawns = len(h.spawns)
    h.advance(60)
    assert len(h.spawns) == spawns


def test_spawn_failure_is_retried_with_backoff() -> None:
    # finding 5: EMFILE at respawn
    h = Harness(local_target=1)
    h.s.add_local(0)
    h.flush()
    assert h.spawns == [1]
    h.s.spawn_failed(OSError(24, "Too many open files"), h.now)
    first = h.s.next_deadline()
    assert first is not None and first > h.now
    h.advance(first - h.now)
    assert h.spawns == [1, 1]
    h.s.spawn_failed(OSError(24, "Too many open files"), h.now)
    second = h.s.next_deadline()
    assert second is not None and second - h.now > first  # backed off
    h.advance(second - h.now)
    assert h.spawns == [1, 1, 1]
    h.s.spawned(4242)
    assert h.s.next_deadline() is None


def test_dispatch_structures_are_constant_time() -> None:
    # the idle set is a dict (no list scan); picking a daemon never iterates all of them
    h = Harness()
    for _ in range(2000):
        h.connect()
    assert isinstance(h.s.idle, dict) and len(h.s.idle) == 2000
    job = h.submit()
    assert job.daemon is not None and job.daemon not in h.s.idle


# -- the state machine --------------------------------------------------------------
class FakeBudget:
    """Counts what the scheduler gives back and forces in."""

    def __init__(self) -> None:
        self.queued = 0

    def give(self, n: int) -> None:
        self.queued -= n
        assert self.queued >= 0, "gave back more than was taken"

    def force(self, n: int) -> None:
        self.queued += n


class SimDaemon:
    """A daemon that answers what it was sent, in order (a FIFO inbox)."""

    def __init__(self, d: Daemon, setups_before: list[int]) -> None:
        self.d = d
        self.inbox: deque[tuple[str, int]] = deque()
        self.precancelled: set[int] = set()
        self.setups_before = setups_before  # setups registered before it connected
        self.setups_seen: list[int] = []
        self.got_task = False


class SchedulerMachine(RuleBasedStateMachine):
    """Random interleavings of every event; invariants after every step."""

    @initialize(
        local=st.integers(0, 3), slots=st.sampled_from([1, 1, 3]), depth=st.sampled_from([1, 3])
    )
    def setup(self, local: int, slots: int, depth: int) -> None:
        self.budget = FakeBudget()
        self.slots = slots
        self.depth = depth
        self.s = Scheduler(
            local_target=local,
            hostname=HOST,
            cancel_grace=2.0,
            concurrency=slots,
            budget=self.budget,
            prefetch_depth=depth,
        )
        self.now = 0.0
        self.handles: dict[int, Handle] = {}
        self.jobs: list[Job] = []
        self.setup_items: list[Setup] = []
        self.sims: dict[Daemon, SimDaemon] = {}
        self.spawned_pids: list[int] = []
        self.next_pid = 100
        self.next_id = 0
        self.tokens = 0
        self.first_sent: list[int] = []  # submission index of each job when first sent
        self.sent_once: set[int] = set()
        self.closed = False
        self.s.add_local(0)
        self.flush()

    # -- actions ---------------------------------------------------------------
    def flush(self) -> None:
        out = self.s.out
        while out:
            act = out.popleft()
            op = act[0]
            if op == SEND:
                d, frames, job = act[1], act[2], act[3]
                if not d.alive:
                    continue
                sim = self.sims[d]
                if job is None:  # a setup
                    sid = int(frames[0].split()[1])
                    sim.inbox.append(("setup", sid))
                    sim.setups_seen.append(sid)
                else:
                    if not sim.got_task:
                        sim.got_task = True
                        # replay reached it in order before its first task
                        assert sim.setups_seen[: len(sim.setups_before)] == sim.setups_before
                    if job.id not in self.sent_once:
                        self.first_sent.append(job.id)
                        self.sent_once.add(job.id)
                    sim.inbox.append(("task", job.id))
                    tasks = sum(1 for k, _ in sim.inbox if k == "task")
                    assert tasks <= self.slots + self.depth, "prefetched deeper than allowed"
            elif op == RESOLVE:
                act[1].outcomes.append((act[2], act[3]))
                assert len(act[1].outcomes) == 1, f"{act[1]} resolved twice"
            elif op == CANCEL:
                d, tid, revoke = act[1], act[2], act[3]
                sim = self.sims.get(d)
                if sim is None or not d.alive:
                    continue
                if ("task", tid) in sim.inbox:
                    if revoke:
                        sim.inbox.remove(("task", tid))
                        self.s.cancelled(d, tid, True, self.now)
                    else:
                        sim.precancelled.add(tid)
            elif op == KILL:
                d = act[1]
                if d.alive and d.local:
                    self.s.process_exited(d.pid, -signal.SIGKILL, "killed", self.now)
                elif d.alive:
                    self.s.gone(d, "killed", self.now)
            elif op == SPAWN:
                for _ in range(act[1]):
                    self.next_pid += 1
                    self.s.spawned(self.next_pid)
                    self.spawned_pids.append(self.next_pid)

    # -- rules -------------------------------------------------------------------
    @rule(
        retries=st.integers(0, 2),
        timeout=st.one_of(st.none(), st.floats(0.5, 20)),
        nbytes=st.integers(0, 100),
        one_frame=st.booleans(),
    )
    def submit(self, retries: int, timeout: float | None, nbytes: int, one_frame: bool) -> None:
        self.next_id += 1
        h = Handle(f"t{self.next_id}")
        frames: Any = b"task %d" % self.next_id  # bare bytes: prefetched deep when fast
        if not one_frame:
            frames = [frames, b"buffer"]
        job = Job(self.next_id, h, frames, retries, timeout, nbytes)
        self.handles[job.id] = h
        self.jobs.append(job)
        self.budget.queued += nbytes  # taken by the profile before submit
        self.s.submit(job, self.now)
        self.flush()

    @precondition(lambda self: self.jobs)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        job = data.draw(st.sampled_from(self.jobs))
        self.s.cancel(job, self.now)
        self.flush()

    @rule(reliable=st.booleans())
    def connect_remote(self, reliable: bool) -> None:
        self._connect(None, reliable)

    @precondition(lambda self: self.spawned_pids)
    @rule(data=st.data())
    def connect_local(self, data: st.DataObject) -> None:
        pid = data.draw(st.sampled_from(self.spawned_pids))
        self.spawned_pids.remove(pid)
        self._connect(pid, True)

    def _connect(self, pid: int | None, reliable: bool) -> None:
        self.tokens += 1
        if pid is None:
            self.next_pid += 1
            pid = 10_000 + self.next_pid
        token = b"%d" % self.tokens
        before = [i.id for i in self.s.setups]
        d = self.s.hello(
            b"t" + token, "task", token, pid=pid, host=HOST, reliable=reliable, now=self.now
        )
        if d is None:
            return
        if self.tokens % 2:
            d.pace = 0.0  # as if its tasks were short: prefetched up to ``depth`` ahead
        self.sims[d] = SimDaemon(d, before)
        self.s.hello(b"c" + token, "ctrl", token, pid=pid, host=HOST, now=self.now)
        self.flush()

    @precondition(lambda self: self.spawned_pids)
    @rule(data=st.data(), code=st.sampled_from([1, 9, -signal.SIGKILL, -signal.SIGSEGV]))
    def local_dies_before_connect(self, data: st.DataObject, code: int) -> None:
        pid = data.draw(st.sampled_from(self.spawned_pids))
        self.spawned_pids.remove(pid)
        self.s.process_exited(pid, code, "died", self.now)
        self.flush()

    def _alive(self) -> list[SimDaemon]:
        return [sim for d, sim in self.sims.items() if d.alive]

    @precondition(lambda self: any(d.alive for d in self.sims))
    @rule(data=st.data())
    def daemon_step(self, data: st.DataObject) -> None:
        """The daemon takes the next message of its inbox and answers it."""
        sim = data.draw(st.sampled_from(self._alive()))
        if not sim.inbox:
            return
        # Setups come first and run in order; coroutine slots may finish out of order.
        started = 1
        if sim.inbox[0][0] == "task":
            started = min(self.slots, sum(1 for k, _ in sim.inbox if k == "task"))
        kind, tid = sim.inbox[data.draw(st.integers(0, started - 1))]
        sim.inbox.remove((kind, tid))
        if kind == "setup":
            self.s.result(sim.d, tid, VALUE, "setup-ok", self.now)
        elif tid in sim.precancelled:
            self.s.cancelled(sim.d, tid, False, self.now)
        else:
            self.s.result(sim.d, tid, VALUE, tid, self.now)
        self.flush()

    @precondition(lambda self: any(d.alive for d in self.sims))
    @rule(data=st.data())
    def crash(self, data: st.DataObject) -> None:
        sim = data.draw(st.sampled_from(self._alive()))
        if sim.d.local:
            self.s.process_exited(sim.d.pid, -signal.SIGKILL, "killed", self.now)
        else:
            self.s.disconnected(sim.d, self.now)
            self.now += RECONNECT_GRACE
            self.s.tick(self.now)
        self.flush()

    @precondition(lambda self: any(d.alive and not d.retiring for d in self.sims))
    @rule(data=st.data())
    def retire(self, data: st.DataObject) -> None:
        sim = data.draw(st.sampled_from([s for s in self._alive() if not s.d.retiring]))
        self.s.retire(sim.d, "maxtasks")
        self.flush()

    @precondition(lambda self: any(d.alive and not d.local for d in self.sims))
    @rule(data=st.data(), drops=st.integers(0, 2))
    def ping(self, data: st.DataObject, drops: int) -> None:
        sim = data.draw(st.sampled_from([s for s in self._alive() if not s.d.local]))
        tasks = [t for k, t in sim.inbox if k == "task"]
        current = tasks[0] if tasks else None
        self.s.ping(sim.d, current, None, sim.d.drops, sim.d.drops, self.now)
        self.flush()

    @rule(fn=st.integers(0, 3))
    def everywhere(self, fn: int) -> None:
        self.next_id += 1
        h = Handle(f"s{self.next_id}")
        item = Setup(self.next_id, [b"setup %d" % self.next_id], h, need_more=0)
        self.handles[item.id] = h
        self.setup_items.append(item)
        self.s.everywhere(item)
        self.flush()

    @rule(dt=st.floats(0.01, 10))
    def tick(self, dt: float) -> None:
        self.now += dt
        self.s.tick(self.now)
        self.flush()

    @precondition(lambda self: not self.closed)
    @rule()
    def spawn_fails(self) -> None:
        self.s.spawn_failed(OSError(24, "EMFILE"), self.now)
        self.flush()

    @precondition(lambda self: not self.closed)
    @rule(dice=st.integers(0, 9))
    def reset(self, dice: int) -> None:
        if dice:  # rare: a closed scheduler has little left to explore
            return
        self.s.close("reset")
        self.closed = True
        self.flush()

    # -- invariants --------------------------------------------------------------
    @invariant()
    def resolved_at_most_once(self) -> None:
        for h in self.handles.values():
            assert len(h.outcomes) <= 1

    @invariant()
    def no_task_on_two_daemons(self) -> None:
        where: dict[int, int] = {}
        for sim in self._alive():
            for kind, tid in sim.inbox:
                if kind == "task":
                    where[tid] = where.get(tid, 0) + 1
        for tid, n in where.items():
            assert n == 1, f"task {tid} is on {n} daemons"

    @invariant()
    def fifo_first_dispatch(self) -> None:
        assert self.first_sent == sorted(self.first_sent)

    @invariant()
    def scheduler_bookkeeping(self) -> None:
        s = self.s
        live_queued = sum(1 for j in s.queue if j.inq)
        assert live_queued == s.queued
        for d in s.idle:
            assert d.alive and len(d.running) < d.slots and not d.retiring
            assert d.disconnected_at is None  # no new task into a dropped connection
        for d in s.daemons.values():
            assert len(d.running) <= d.slots
            if d.ahead:
                assert len(d.running) == d.slots
                assert len(d.ahead) <= self.depth
                assert all(j.daemon is d for j in d.ahead)
        # the budget holds exactly the bytes of the jobs waiting in the queue
        assert self.budget.queued == sum(j.nbytes for j in s.queue if j.inq)

    def teardown(self) -> None:
        if not hasattr(self, "s"):
            return
        self.s.close("end")
        self.flush()
        for h in self.handles.values():
            assert len(h.outcomes) == 1, f"{h} resolved {len(h.outcomes)} times"


SchedulerMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("SCHEDULER_EXAMPLES", "150")),
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestSchedulerMachine = SchedulerMachine.TestCase
