"""am.executor() against the concurrent.futures.Executor contract, behaviour by behaviour
(what CPython's own executor tests check: submit, map, exceptions, cancel, running,
shutdown with and without wait, cancel_futures, context manager, wait/as_completed,
after interpreter shutdown)."""

from __future__ import annotations

import concurrent.futures as cf
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import asyncmirai as am

pytestmark = pytest.mark.timeout(90)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(am.__file__)))


def square(x: int) -> int:
    return x * x


def divide(a: int, b: int) -> float:
    return a / b


def started_then_wait(started: str, gate: str) -> int:
    with open(started, "w"):
        pass
    deadline = time.monotonic() + 60
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.005)
    return os.getpid()


def wait_path(path: str) -> None:
    deadline = time.monotonic() + 30
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.005)


@pytest.fixture
def ex() -> object:
    with am.daemons(1):
        e = am.executor()
        yield e
        e.shutdown(wait=True)


def test_submit_and_map(ex: cf.Executor) -> None:
    assert ex.submit(square, 7).result(30) == 49
    assert list(ex.map(square, range(10), timeout=60)) == [x * x for x in range(10)]
    assert list(ex.map(divide, [6, 8], [3, 4])) == [2.0, 2.0]


def test_exceptions_have_the_calls_own_type(ex: cf.Executor) -> None:
    fut = ex.submit(divide, 1, 0)
    with pytest.raises(ZeroDivisionError):
        fut.result(30)
    assert isinstance(fut.exception(30), ZeroDivisionError)
    with pytest.raises(ZeroDivisionError):
        list(ex.map(divide, [1, 2], [1, 0]))


def test_running_future_cannot_be_cancelled_queued_one_can(ex: cf.Executor, tmp_path: Path) -> None:
    started, gate = str(tmp_path / "started"), str(tmp_path / "gate")
    running = ex.submit(started_then_wait, started, gate)
    wait_path(started)
    assert running.running() and not running.done()
    assert running.cancel() is False
    assert not running.cancelled()
    queued = ex.submit(square, 3)
    assert not queued.running()
    assert queued.cancel() is True and queued.cancelled()
    with pytest.raises(cf.CancelledError):
        queued.result()
    open(gate, "w").close()
    assert running.result(30) > 0 and not running.cancelled()


def test_shutdown_cancel_futures_cancels_only_queued(tmp_path: Path) -> None:
    with am.daemons(1):
        ex = am.executor()
        started, gate = str(tmp_path / "started"), str(tmp_path / "gate")
        running = ex.submit(started_then_wait, started, gate)
        wait_path(started)
        queued = [ex.submit(square, i) for i in range(3)]
        ex.shutdown(wait=False, cancel_futures=True)
        assert all(f.cancelled() for f in queued)
        with pytest.raises(RuntimeError, match="after shutdown"):
            ex.submit(square, 1)
        open(gate, "w").close()
        assert running.result(30) > 0


def test_context_manager_waits(tmp_path: Path) -> None:
    with am.daemons(1):
        with am.executor() as ex:
            futs = [ex.submit(square, i) for i in range(5)]
        assert all(f.done() for f in futs)
        assert [f.result() for f in futs] == [0, 1, 4, 9, 16]


def test_wait_and_as_completed(ex: cf.Executor) -> None:
    futs = [ex.submit(square, i) for i in range(6)]
    done, pending = cf.wait(futs, timeout=60)
    assert not pending and len(done) == 6
    assert sorted(f.result() for f in cf.as_completed(futs, timeout=60)) == [
        i * i for i in range(6)
    ]
    first = cf.wait([ex.submit(divide, 1, 0), ex.submit(square, 2)], return_when=cf.FIRST_EXCEPTION)
    assert any(isinstance(f.exception(), ZeroDivisionError) for f in first.done)


def test_map_timeout(ex: cf.Executor, tmp_path: Path) -> None:
    gate = str(tmp_path / "gate")
    it = ex.map(started_then_wait, [str(tmp_path / "s")], [gate], timeout=0.2)
    with pytest.raises(TimeoutError):
        list(it)
    open(gate, "w").close()


def _run_script(tmp_path: Path, body: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "host.py"
    script.write_text(body)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.dirname(__file__)]))
    return subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=env
    )


def test_shutdown_wait_false_lets_pending_futures_finish_before_exit(tmp_path: Path) -> None:
    out = tmp_path / "done.txt"
    r = _run_script(
        tmp_path,
        f"""
import asyncmirai as am, time

def slow_write(path, i):
    time.sleep(0.3)
    with open(path, "a") as f:
        f.write(f"{{i}}\\n")
    return i

am.daemons(2)
ex = am.executor()
futs = [ex.submit(slow_write, {str(out)!r}, i) for i in range(4)]
ex.shutdown(wait=False)
print("main done")
""",
    )
    assert r.returncode == 0, r.stderr
    assert sorted(out.read_text().split()) == ["0", "1", "2", "3"]


def test_submit_after_interpreter_shutdown_raises_the_standard_error(tmp_path: Path) -> None:
    r = _run_script(
        tmp_path,
        """
import asyncmirai as am, atexit

am.daemons(1)
ex = am.executor()

def late():
    try:
        ex.submit(abs, -1)
    except RuntimeError as e:
        print("late:", e)

atexit.register(late)
""",
    )
    assert r.returncode == 0, r.stderr
    assert "late: cannot schedule new futures after interpreter shutdown" in r.stdout
