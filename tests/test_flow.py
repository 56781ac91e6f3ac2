"""Flow control with real daemons: the memory budget, submit/try_mirai, task states and
counters (issue: bounded queues).  Tasks are held on a gate file, never on a sleep."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import anyio
import pytest

import asyncmirai as am
from asyncmirai._budget import parse_size

pytestmark = pytest.mark.timeout(90)

BLOB = b"x" * 10_000


def wait_file(path: str) -> int:
    """A task that runs until the test creates ``path`` (its gate)."""
    deadline = time.monotonic() + 60
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.005)
    return os.getpid()


def started_then_wait(started: str, gate: str) -> int:
    with open(started, "w"):
        pass
    return wait_file(gate)


def size_of(b: bytes) -> int:
    return len(b)


def touch(path: str) -> None:
    with open(path, "w"):
        pass


def touch_with(path: str, blob: bytes) -> None:
    touch(path)


def wait_until(cond: object, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def block_daemons(tmp_path: Path, n: int) -> tuple[str, list[am.Mirai[int]]]:
    """Occupy ``n`` daemons until the returned gate file exists."""
    gate = str(tmp_path / "gate")
    started = [str(tmp_path / f"started-{i}") for i in range(n)]
    ms = [am.mirai(started_then_wait, s, gate) for s in started]
    wait_until(lambda: all(os.path.exists(s) for s in started), "the blockers to start")
    return gate, ms


async def ablock_daemons(tmp_path: Path, n: int) -> tuple[str, list[am.Mirai[int]]]:
    """:func:`block_daemons` for a test whose loop runs the dispatcher."""
    gate = str(tmp_path / "gate")
    started = [str(tmp_path / f"started-{i}") for i in range(n)]
    ms = [am.mirai(started_then_wait, s, gate) for s in started]
    with anyio.fail_after(30):
        while not all(os.path.exists(s) for s in started):
            await anyio.sleep(0.01)
    return gate, ms


def test_parse_size() -> None:
    assert parse_size("512MB") == 512 * 10**6
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("100 kib") == 100 * 1024
    assert parse_size(4096) == 4096
    assert parse_size(None) is None
    for bad in ("lots", "5 parsecs", 0, -1, "0MB", True):
        with pytest.raises(ValueError):
            parse_size(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="memory"):
        am.daemons(1, memory="a lot")
    with pytest.raises(ValueError, match="concurrency"):
        am.daemons(1, concurrency=0)
    assert not am.daemons_set()


def test_budget_holds_with_several_producer_threads(tmp_path: Path) -> None:
    capacity = 5 * (len(BLOB) + 200)
    with am.daemons(2, memory=capacity):
        gate, blockers = block_daemons(tmp_path, 2)
        handles: list[am.Mirai[int]] = []
        lock = threading.Lock()

        def produce(k: int) -> None:
            for _ in range(k):
                m = am.mirai(size_of, BLOB)  # blocks while the budget is full
                with lock:
                    handles.append(m)

        threads = [threading.Thread(target=produce, args=(30,)) for _ in range(4)]
        for t in threads:
            t.start()
        # the producers fill the budget and block: nothing beyond it is queued
        full = capacity - len(BLOB) - 200
        wait_until(lambda: am.status().memory["queued"] > full, "a full budget")
        assert any(t.is_alive() for t in threads)
        assert am.status().memory["queued"] <= capacity
        touch(gate)
        for t in threads:
            t.join(60)
        assert [m.result(60) for m in handles] == [len(BLOB)] * 120
        mem = am.status().memory
        assert mem["capacity"] == capacity and mem["queued"] == 0
        # A prefetched task taken back (revoked) for a daemon that went idle is readmitted
        # whatever the budget (admitted work is never refused): while the producers keep
        # the queue full, that one task may top it up once (seen once in a full run).
        assert 0 < mem["peak"] <= capacity + len(BLOB) + 200
        assert [m.result(10) for m in blockers]
        assert am.info()["completed"] == 122


@pytest.mark.anyio
async def test_event_loop_thread_gets_queue_full_and_try_mirai_none(tmp_path: Path) -> None:
    async with am.daemons(1, memory=len(BLOB) + 500):
        gate, blockers = await ablock_daemons(tmp_path, 1)
        first = am.mirai(size_of, BLOB)  # the queue was empty: admitted
        with pytest.raises(am.QueueFull, match="am.submit"):
            am.mirai(size_of, BLOB)
        assert am.try_mirai(size_of, BLOB) is None
        assert am.status().memory["queued"] < 2 * len(BLOB)
        touch(gate)
        assert await first == len(BLOB)
        m = am.try_mirai(size_of, BLOB)
        assert m is not None and await m == len(BLOB)


@pytest.mark.anyio
async def test_submit_waits_for_room_and_cancelling_it_submits_nothing(tmp_path: Path) -> None:
    async with am.daemons(1, memory=len(BLOB) + 500):
        gate, _ = await ablock_daemons(tmp_path, 1)
        queued = am.mirai(size_of, BLOB)
        marker = str(tmp_path / "ran")
        with anyio.move_on_after(0.2) as scope:  # the wait is cancelled (no room)
            await am.submit(touch_with, marker, BLOB)
        assert scope.cancelled_caught
        submitted = am.info()["submitted"]

        async def later() -> int:
            m = await am.submit(size_of, BLOB)  # waits until `queued` leaves the queue
            return await m

        async with anyio.create_task_group() as tg:
            results: list[int] = []

            async def run() -> None:
                results.append(await later())

            tg.start_soon(run)
            await anyio.sleep(0)
            assert am.info()["submitted"] == submitted  # still waiting for room
            touch(gate)
        assert results == [len(BLOB)] and await queued == len(BLOB)
        assert not os.path.exists(marker)  # the cancelled submit never ran
        assert am.info()["submitted"] == submitted + 1


def test_a_task_larger_than_the_budget_is_admitted_when_the_queue_is_empty() -> None:
    big = b"y" * 100_000
    with am.daemons(1, memory="10KB"):
        assert am.mirai(size_of, big).result(30) == len(big)
        assert am.status().memory["peak"] > 10_000


def test_task_states(tmp_path: Path) -> None:
    with am.daemons(1):
        gate, (blocker,) = block_daemons(tmp_path, 1)
        queued = am.mirai(size_of, b"abc")
        assert blocker.state == "running"
        assert queued.state == "queued"
        touch(gate)
        assert queued.result(30) == 3
        assert queued.state == "done" and blocker.state == "done"


def test_counters(tmp_path: Path) -> None:
    def crash() -> None:
        os._exit(3)

    def fail() -> None:
        raise ValueError("no")

    with am.daemons(1):
        assert am.mirai(size_of, b"ab").result(30) == 2
        with pytest.raises(am.MiraiError):
            am.mirai(fail).result(30)
        with pytest.raises(am.MiraiTimeout):
            am.mirai(wait_file, str(tmp_path / "never"), _timeout=0.5).result(30)
        gate, (blocker,) = block_daemons(tmp_path, 1)
        c = am.mirai(size_of, b"x")
        c.cancel()
        touch(gate)
        blocker.result(30)
        with pytest.raises(am.DaemonError):
            am.mirai(crash, _retries=1).result(30)
        info = am.info()
        assert info["submitted"] == 6  # a retry is not a new submission
        assert info["completed"] == 3  # a value, an error, the blocker
        assert info["cancelled"] == 1
        assert info["timed_out"] == 1
        assert info["retried"] == 1
        assert info["respawned"] >= 2  # the crash twice
        assert info["failed"] == 3  # the error, the timeout, the crash
