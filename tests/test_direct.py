"""Callers off the dispatcher's thread drive the I/O themselves (``Dispatcher.wait``).

A plain script's ``m.result()`` reads the daemon's socketpair on its own thread while the
loop thread stands aside; when nobody waits, the loop thread reads again.  Every task
still resolves exactly once, whoever reads.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import asyncmirai as am
from asyncmirai._profile import profiles

pytestmark = pytest.mark.timeout(120)


def wait_for_file(path: str, value: int) -> int:
    deadline = time.monotonic() + 60
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.005)
    return value


def announce_then_wait(started: str, go: str) -> int:
    Path(started).write_text(str(os.getpid()))
    return wait_for_file(go, os.getpid())


def until(cond: object, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


@contextlib.contextmanager
def loop_stuck() -> Iterator[None]:
    """The default profile's dispatcher loop blocked in a callback inside the block."""
    entered, gate = threading.Event(), threading.Event()

    def stuck() -> None:
        entered.set()
        gate.wait(60)

    profiles["default"].loop.call_soon_threadsafe(stuck)
    assert entered.wait(30)
    try:
        yield
    finally:
        gate.set()


def test_result_needs_no_loop_thread() -> None:
    """With the loop thread stuck in a callback, a script still submits, and its
    result() reads the answer itself (before: both were hops through that thread)."""
    with am.daemons(1):
        am.mirai(abs, -1).result(30)  # connected
        with loop_stuck():
            me = threading.get_ident()
            for i in range(20):
                m = am.mirai(abs, -i)
                resolved_on = []
                m.add_done_callback(lambda _, r=resolved_on: r.append(threading.get_ident()))
                assert m.result(30) == i
                assert resolved_on == [me]
        assert am.mirai(abs, -2).result(30) == 2  # and the loop thread reads again


def test_after_a_timed_out_wait_the_loop_thread_reads_again(tmp_path: Path) -> None:
    go = str(tmp_path / "go")
    with am.daemons(1):
        m = am.mirai(wait_for_file, go, 7)
        with pytest.raises(TimeoutError):
            m.result(0.05)  # the caller claimed the channel, then gave it back
        done = threading.Event()
        m.add_done_callback(lambda _: done.set())
        Path(go).touch()
        assert done.wait(30)  # nobody waits in result(): the loop thread read it
        assert m.result(0) == 7


def test_many_threads_submit_and_wait_each_resolves_once() -> None:
    with am.daemons(3):
        results: dict[int, list[int]] = {}
        errors: list[BaseException] = []

        def worker(k: int) -> None:
            try:
                out = []
                for i in range(150):
                    m = am.mirai(divmod, k * 1000 + i, 1000)
                    if i % 7 == 0:
                        m.cancel()
                        continue
                    out.append(m.result(60)[1])
                results[k] = out
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(100)
        assert not errors, errors[:3]
        for k in range(8):
            assert results[k] == [i for i in range(150) if i % 7], k
        counters = profiles["default"].info()
        assert counters["completed"] + counters["cancelled"] == counters["submitted"]


def test_waiter_sees_its_daemon_die(tmp_path: Path) -> None:
    started, go = str(tmp_path / "started"), str(tmp_path / "go")
    with am.daemons(1):
        m = am.mirai(announce_then_wait, started, go)
        until(lambda: os.path.exists(started), "the task to start")
        pid = int(Path(started).read_text())
        killer = threading.Timer(0.05, os.kill, (pid, signal.SIGKILL))
        killer.start()  # while this thread waits in result()
        with pytest.raises(am.DaemonError):
            m.result(60)
        killer.join()
        assert am.mirai(abs, -3).result(60) == 3  # respawned, and read again


def test_reset_from_another_thread_while_waiting(tmp_path: Path) -> None:
    started, go = str(tmp_path / "started"), str(tmp_path / "go")
    am.daemons(1)
    m = am.mirai(announce_then_wait, started, go)
    until(lambda: os.path.exists(started), "the task to start")
    resetter = threading.Timer(0.05, am.daemons, (0,))
    resetter.start()
    with pytest.raises(am.DaemonError):
        m.result(60)
    resetter.join()


def test_another_loop_awaiting_reads_its_answers_itself() -> None:
    """Daemons started outside any loop, awaited from ``asyncio.run``: with the
    dispatcher's loop stuck, the awaiting loop reads the socketpairs itself."""
    import asyncio

    with am.daemons(2):
        am.mirai(abs, -1).result(30)

        async def main() -> list[int]:
            one = [await am.mirai(abs, -i) for i in range(10)]  # one at a time
            return one

        with loop_stuck():
            assert asyncio.run(main()) == list(range(10))

        async def many() -> list[int]:  # queued ones resolve through the loop thread
            return await asyncio.gather(*(am.mirai(abs, -i) for i in range(500)))

        assert asyncio.run(many()) == list(range(500))
        assert am.mirai(abs, -2).result(30) == 2


def test_reset_while_another_loop_awaits(tmp_path: Path) -> None:
    import asyncio

    started, go = str(tmp_path / "started"), str(tmp_path / "go")
    am.daemons(1)

    async def main() -> None:
        m = am.mirai(announce_then_wait, started, go)
        while not os.path.exists(started):
            await asyncio.sleep(0.005)
        resetter = threading.Timer(0.05, am.daemons, (0,))
        resetter.start()
        with pytest.raises(am.DaemonError):
            await m
        resetter.join()

    asyncio.run(main())
    am.daemons(1)  # a new profile works after the watched channel was closed
    assert am.mirai(abs, -4).result(30) == 4
    am.daemons(0)


def test_blocking_in_a_done_callback_is_refused_not_deadlocked() -> None:
    """A done-callback runs on the thread that resolved the handle, holding the
    dispatcher's lock (a script's thread now, as the loop's thread before): a blocking
    result() there raises at once, as it always did on the loop's thread."""
    with am.daemons(1):
        am.mirai(abs, -1).result(30)
        seen: list[BaseException] = []

        def blocks(_: object) -> None:
            try:
                am.mirai(abs, -2).result(30)
            except RuntimeError as exc:
                seen.append(exc)

        m = am.mirai(abs, -3)
        m.add_done_callback(blocks)
        assert m.result(30) == 3
        until(lambda: bool(seen), "the callback to run")
        assert "done-callback" in str(seen[0]) or "event loop" in str(seen[0])
        assert am.mirai(abs, -4).result(30) == 4  # nothing stuck


def test_a_loop_closed_while_watching_gives_the_channel_back(tmp_path: Path) -> None:
    """An awaiting loop that closes before its watch ends (its hand-back is scheduled on
    it and never runs): the dispatcher's once-a-second check takes the channel back, and
    answers nobody waits for are read again."""
    import asyncio

    go = str(tmp_path / "go")
    with am.daemons(1):
        am.mirai(abs, -1).result(30)
        m = am.mirai(wait_for_file, go, 5)
        until(lambda: m.state == "running", "the task to be sent")
        d = profiles["default"].dispatcher
        assert d is not None
        other = asyncio.new_event_loop()
        assert d.watch(m, other) is not None  # claimed for a loop that never runs
        other.close()
        done = threading.Event()
        m.add_done_callback(lambda _: done.set())
        Path(go).touch()
        assert done.wait(30)
        assert m.result(0) == 5


def test_the_callers_loop_polls_only_while_a_short_task_is_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """In-loop, a sequential caller's short task keeps the loop polling (no sleep in
    ``epoll``) until its answer is read, and not one iteration longer; a task that takes
    longer than the polling window on average never starts it (checked with the window
    set to 0, as ``ASYNCMIRAI_SPIN_US=0`` does)."""
    import asyncio

    from asyncmirai import _dispatcher

    monkeypatch.setattr(_dispatcher, "SPIN", 0.05)  # wide: this machine's round trip fits

    async def main() -> None:
        async with am.daemons(1):
            disp = profiles["default"].dispatcher
            assert disp is not None
            await am.mirai(abs, 0)  # connected
            m = am.mirai(abs, -1)  # its average task time starts at 1 s: over SPIN
            assert disp._spin_h is None
            assert await m == 1
            for i in range(60):  # the daemon's average task time drops under SPIN
                assert await am.mirai(abs, -i) == i
            m = am.mirai(abs, -7)
            assert disp._spin_h is not None  # polling while it is out
            assert await m == 7
            for _ in range(10):  # a loop iteration or two after the answer: stopped
                if disp._spin_h is None:
                    break
                await asyncio.sleep(0)
            assert disp._spin_h is None
            ms = [am.mirai(abs, -i) for i in range(50)]  # a burst: it ends polling too
            assert await asyncio.gather(*ms) == list(range(50))
            for _ in range(10):
                if disp._spin_h is None:
                    break
                await asyncio.sleep(0)
            assert disp._spin_h is None

    asyncio.run(main())
    monkeypatch.setattr(_dispatcher, "SPIN", 0.0)  # off (ASYNCMIRAI_SPIN_US=0): never

    async def off() -> None:
        async with am.daemons(1):
            disp = profiles["default"].dispatcher
            assert disp is not None
            for i in range(20):
                m = am.mirai(abs, -i)
                assert disp._spin_h is None
                assert await m == i

    asyncio.run(off())
