"""Many coroutines per daemon (``daemons(n, concurrency=k)``), the daemon's side.

These tests play the host by hand: they start ``python -m asyncmirai daemon`` with
socket pairs (or a ZeroMQ ROUTER) of their own, send the Welcome with ``concurrency`` in
its configuration, then tasks, cancels and revokes, and read what the daemon answers.
"Started" is always a marker file a task writes, and tasks wait for a file the test
creates: no sleep stands in for an event.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

from asyncmirai import _codecs, _protocol
from asyncmirai._call import CALL
from asyncmirai._protocol import (
    Cancel,
    Cancelled,
    Exit,
    Hello,
    Message,
    Output,
    Ping,
    Result,
    Retire,
    Setup,
    Welcome,
)
from asyncmirai._transport import BlockingChannel

pytestmark = pytest.mark.timeout(60)

WAIT = 30.0  # seconds before a wait that should succeed gives up (a timeout, not a claim)


# -- task functions (resolved by reference in the daemon: this module is importable) ----
async def wait_go(marker: str, go: str, value: Any) -> Any:
    """Say it started (``marker``), then wait, without blocking the loop, for ``go``."""
    Path(marker).touch()
    try:
        while not os.path.exists(go):
            await asyncio.sleep(0.005)
    except asyncio.CancelledError:
        Path(marker + ".cancelled").touch()
        raise
    return value


def plain_wait_go(marker: str, go: str, value: Any) -> Any:
    """A plain function: the same, blocking the main thread."""
    Path(marker).touch()
    while not os.path.exists(go):
        time.sleep(0.005)
    return value


def plain_wait_go_pid(marker: str, go: str) -> int:
    """``plain_wait_go``, returning the daemon's pid."""
    return int(plain_wait_go(marker, go, os.getpid()))


async def async_fail(msg: str) -> None:
    await asyncio.sleep(0)
    raise ValueError(msg)


async def async_print(text: str) -> str:
    await asyncio.sleep(0)
    print(text, flush=True)
    return text


async def async_random() -> float:
    return random.random()  # before any await: the task's own seed is in force


SETUP_LOOP: list[Any] = []


async def remember_loop() -> int:
    SETUP_LOOP.append(asyncio.get_running_loop())
    return len(SETUP_LOOP)


async def same_loop_as_setup() -> bool:
    return SETUP_LOOP[-1] is asyncio.get_running_loop()


def hard_exit(code: int) -> None:
    os._exit(code)


async def on_loop_thread() -> tuple[bool, int]:
    import threading

    return threading.current_thread() is threading.main_thread(), os.getpid()


def wait_files(paths: list[Path], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        missing = [str(p) for p in paths if not p.exists()]
        assert time.monotonic() < deadline, f"never appeared: {missing}"
        time.sleep(0.005)


# -- a host played by hand -------------------------------------------------------------
class Host:
    """One daemon process and the host's ends of its two channels."""

    def __init__(self, cfg: dict[str, Any], transport: str, tmp: Path, output: bool) -> None:
        self.transport = transport
        env = os.environ.copy()
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p or os.getcwd() for p in sys.path))
        argv = [sys.executable, "-m", "asyncmirai", "daemon"]
        pass_fds: tuple[int, ...] = ()
        self.zsock: Any = None
        if transport == "pipe":
            t_host, t_child = socket.socketpair()
            c_host, c_child = socket.socketpair()
            pass_fds = (t_child.fileno(), c_child.fileno())
            argv.append(f"fd://{pass_fds[0]}/{pass_fds[1]}")
        else:
            import zmq

            self.zctx = zmq.Context()
            self.zsock = self.zctx.socket(zmq.ROUTER)
            self.zsock.setsockopt(zmq.LINGER, 0)
            url = f"ipc://{tmp}/host.sock"
            self.zsock.bind(url)
            argv += [url, "--autoexit", "30"]
        if output:
            argv.append("--output")
        self.log = open(tmp / "daemon.log", "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self.log,
            env=env,
            pass_fds=pass_fds,
            start_new_session=True,
        )
        self.backlog: list[Message] = []  # task-channel messages read while waiting
        if transport == "pipe":
            t_child.close()
            c_child.close()
            self.task = BlockingChannel(t_host)
            self.ctrl = BlockingChannel(c_host)
            hellos = [self._decode(self.task.recv()), self._decode(self.ctrl.recv())]
        else:
            hellos = []
            while len(hellos) < 2:
                ident, *frames = self._zrecv(WAIT)
                msg = self._decode(frames)
                if isinstance(msg, Hello):
                    hellos.append(msg)
                    if msg.role == "task":
                        self.t_ident = ident
                    else:
                        self.c_ident = ident
        assert sorted(h.role for h in hellos) == ["ctrl", "task"]
        self.send_task_frames(_protocol.encode(Welcome(cloudpickle.dumps(cfg, protocol=5))))

    @staticmethod
    def _decode(frames: list[Any]) -> Message:
        return _protocol.decode(frames)

    def _zrecv(self, timeout: float) -> list[Any]:
        assert self.zsock.poll(int(timeout * 1000)), "no message from the daemon in time"
        return list(self.zsock.recv_multipart())

    def send_task_frames(self, frames: list[Any]) -> None:
        if self.transport == "pipe":
            self.task.send(frames)
        else:
            self.zsock.send_multipart([self.t_ident, *frames])

    def send(self, tid: int, fn: Any, *args: Any, extra: Any = None, **kwargs: Any) -> None:
        body, desc, bufs = _codecs.dumps((CALL, fn, args, kwargs), _codecs.DEFAULT_TABLE)
        self.send_task_frames(_protocol.encode_task(tid, body, desc, bufs, extra))

    def send_exit(self) -> None:
        self.send_task_frames(_protocol.encode(Exit("test")))

    def cancel(self, tid: int, revoke: bool = False) -> None:
        frames = _protocol.encode(Cancel(tid, revoke))
        if self.transport == "pipe":
            self.ctrl.send(frames)
        else:
            self.zsock.send_multipart([self.c_ident, *frames])

    def _next(self, role: str, timeout: float) -> Message:
        """The next message from the daemon on ``role``'s channel (pings skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"no message from the daemon on {role} in time"
            if self.transport == "pipe":
                ch = self.task if role == "task" else self.ctrl
                assert ch.poll(left), f"no message from the daemon on {role} in time"
                msg = self._decode(ch.recv())
            else:
                ident, *frames = self._zrecv(left)
                msg = self._decode(frames)
                if ident != (self.t_ident if role == "task" else self.c_ident):
                    if not isinstance(msg, Ping):
                        assert role == "ctrl", f"control message while reading tasks: {msg}"
                        self.ctrl_backlog.append(msg)
                    continue
            if not isinstance(msg, Ping):
                return msg

    ctrl_backlog: list[Message]

    def recv(self, timeout: float = WAIT) -> Message:
        return self._next("task", timeout)

    def recv_ctrl(self, timeout: float = WAIT) -> Message:
        if self.transport != "pipe" and getattr(self, "ctrl_backlog", None):
            return self.ctrl_backlog.pop(0)
        return self._next("ctrl", timeout)

    def results(self, n: int) -> dict[int, Any]:
        """Read ``n`` replies; ``{id: value | Cancelled | ("error", type name)}``."""
        out: dict[int, Any] = {}
        while len(out) < n:
            msg = self.recv()
            if isinstance(msg, Result):
                value = _codecs.loads(msg.body, msg.descriptors, msg.buffers, _codecs.DEFAULT_TABLE)
                out[msg.id] = value if msg.ok else ("error", value[0])
            elif isinstance(msg, Cancelled):
                assert msg.id not in out, f"task {msg.id} answered twice"
                out[msg.id] = msg
            else:
                self.backlog.append(msg)
        return out

    def exit_code(self, timeout: float = WAIT) -> int:
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # by pid: only the process this test started
        self.proc.wait()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # what its tasks started, if any
        except OSError:
            pass
        self.log.close()
        if self.transport == "pipe":
            self.task.sock.close()
            self.ctrl.sock.close()
        else:
            self.zsock.close(linger=0)
            self.zctx.term()


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Any]:
    hosts: list[Host] = []

    def make(transport: str = "pipe", output: bool = False, **cfg: Any) -> Host:
        cfg.setdefault("concurrency", 4)
        h = Host(cfg, transport, tmp_path, output)
        hosts.append(h)
        return h

    yield make
    for h in hosts:
        h.close()


def _files(tmp: Path, name: str, n: int) -> list[Path]:
    return [tmp / f"{name}{i}" for i in range(n)]


# -- the daemon, driven directly ---------------------------------------------------------
@pytest.mark.parametrize("transport", ["pipe", "zmq"])
def test_k_coroutines_run_at_once(start: Any, tmp_path: Path, transport: str) -> None:
    h = start(transport)
    started = _files(tmp_path, "started", 4)
    go = tmp_path / "go"
    for i in range(4):
        h.send(i + 1, wait_go, str(started[i]), str(go), i * 10)
    wait_files(started)  # all four run before any may finish
    go.touch()
    assert h.results(4) == {1: 0, 2: 10, 3: 20, 4: 30}
    # they ran on the coroutine thread, and the daemon still takes tasks afterwards
    h.send(5, on_loop_thread)
    (res,) = h.results(1).values()
    assert res == (False, h.proc.pid)
    h.send_exit()
    assert h.exit_code() == 0
    assert h.backlog == []


@pytest.mark.parametrize("transport", ["pipe", "zmq"])
def test_cancel_stops_only_its_coroutine(start: Any, tmp_path: Path, transport: str) -> None:
    h = start(transport)
    started = _files(tmp_path, "started", 4)
    go = tmp_path / "go"
    for i in range(4):
        h.send(i + 1, wait_go, str(started[i]), str(go), i)
    wait_files(started)
    h.cancel(2)
    msg = h.recv()  # the others wait for ``go``: this can only be the cancelled one
    assert msg == Cancelled(2)
    assert Path(f"{started[1]}.cancelled").exists()
    h.cancel(2)  # a second cancel (or a timeout racing a cancel) answers nothing more
    go.touch()
    assert h.results(3) == {1: 0, 3: 2, 4: 3}
    h.send(9, wait_go, str(tmp_path / "s9"), str(go), "after")
    assert h.results(1) == {9: "after"}  # nothing else (no second Cancelled) came first
    assert h.backlog == []


def test_plain_function_runs_while_coroutines_progress(start: Any, tmp_path: Path) -> None:
    h = start()
    a, b, p = tmp_path / "a", tmp_path / "b", tmp_path / "p"
    go_async, go_plain = tmp_path / "go_async", tmp_path / "go_plain"
    h.send(1, wait_go, str(a), str(go_async), "a")
    h.send(2, wait_go, str(b), str(go_async), "b")
    h.send(3, plain_wait_go, str(p), str(go_plain), "p")
    wait_files([a, b, p])
    go_async.touch()  # the plain function still blocks the main thread ...
    assert h.results(2) == {1: "a", 2: "b"}  # ... and the coroutines finish and reply
    go_plain.touch()
    assert h.results(1) == {3: "p"}


def test_cancel_plain_function_leaves_coroutines(start: Any, tmp_path: Path) -> None:
    h = start()
    a, p = tmp_path / "a", tmp_path / "p"
    go, never = tmp_path / "go", tmp_path / "never"
    h.send(1, wait_go, str(a), str(go), "a")
    h.send(2, plain_wait_go, str(p), str(never), "p")
    wait_files([a, p])
    h.cancel(2)  # SIGINT to the main thread, as with one task at a time
    assert h.recv() == Cancelled(2)
    go.touch()
    assert h.results(1) == {1: "a"}


def test_cancel_before_start_and_revoke(start: Any, tmp_path: Path) -> None:
    h = start()
    go = tmp_path / "go"
    s1 = tmp_path / "s1"
    h.send(1, wait_go, str(s1), str(go), 1)
    wait_files([s1])
    h.cancel(1, revoke=True)  # started: a revoke is refused (not acknowledged) ...
    h.cancel(7, revoke=True)  # ... while one for a task not seen yet is granted
    assert h.recv_ctrl() == Cancelled(7, revoked=True)  # the first control reply
    h.send(7, wait_go, str(tmp_path / "s7"), str(go), 7)  # skipped, unseen
    h.cancel(8)  # a cancel that arrives before its task: the task is answered Cancelled
    h.cancel(9, revoke=True)  # its ack says the control thread has taken the cancel too
    assert h.recv_ctrl() == Cancelled(9, revoked=True)
    h.send(8, wait_go, str(tmp_path / "s8"), str(go), 8)
    assert h.recv() == Cancelled(8)
    go.touch()
    assert h.results(1) == {1: 1}
    assert not (tmp_path / "s7").exists()
    assert not (tmp_path / "s8").exists()


def test_errors_seeds_and_output(start: Any, tmp_path: Path) -> None:
    h = start(output=True)
    h.send(1, async_fail, "nope")
    assert h.results(1) == {1: ("error", "ValueError")}
    h.send(2, async_random, extra={"seed": 1234})
    assert h.results(1) == {2: random.Random(1234).random()}
    h.send(3, async_print, "hello from a coroutine")
    msg = h.recv()  # what a coroutine printed arrives before its result
    assert isinstance(msg, Output) and msg.stream == "stdout"
    assert msg.data == b"hello from a coroutine\n"
    assert h.results(1) == {3: "hello from a coroutine"}


def test_async_setup_runs_on_the_tasks_loop(start: Any) -> None:
    """An ``everywhere()`` coroutine (a client, a pool) lives on the loop tasks use."""
    h = start()
    body, desc, bufs = _codecs.dumps((CALL, remember_loop, (), {}), _codecs.DEFAULT_TABLE)
    h.send_task_frames(_protocol.encode(Setup(100, body, desc, bufs)))
    assert h.results(1) == {100: 1}
    h.send(1, same_loop_as_setup)
    assert h.results(1) == {1: True}


def test_maxtasks_counts_coroutines_and_retires(start: Any, tmp_path: Path) -> None:
    h = start(maxtasks=3)
    started = _files(tmp_path, "started", 3)
    go = tmp_path / "go"
    for i in range(3):
        h.send(i + 1, wait_go, str(started[i]), str(go), i)
    wait_files(started)
    go.touch()
    got = []
    while len(got) < 4:
        msg = h.recv()
        got.append(msg.reason if isinstance(msg, Retire) else msg.id)  # type: ignore[union-attr]
    assert got[3] != "maxtasks"  # Retire goes before the last reply
    assert sorted(x for x in got if x != "maxtasks") == [1, 2, 3]  # type: ignore[type-var]
    h.send(4, wait_go, str(tmp_path / "s4"), str(go), 4)  # sent before the host saw Retire
    assert h.recv() == Cancelled(4, revoked=True)
    h.send_exit()
    assert h.exit_code() == 0


def test_retiring_daemon_serves_coroutines_in_flight(start: Any, tmp_path: Path) -> None:
    """maxtasks reached while another coroutine still runs: the host answers the Retire
    with Exit at once (on the task channel), and the daemon still finishes that
    coroutine and replies for it before it exits."""
    h = start(maxtasks=1)
    a, b = tmp_path / "a", tmp_path / "b"
    go_a, go_b = tmp_path / "go_a", tmp_path / "go_b"
    h.send(1, wait_go, str(a), str(go_a), "a")
    h.send(2, wait_go, str(b), str(go_b), "b")
    wait_files([a, b])
    go_a.touch()
    assert h.recv() == Retire("maxtasks")
    assert h.results(1) == {1: "a"}
    h.send_exit()
    go_b.touch()
    assert h.results(1) == {2: "b"}
    assert h.exit_code() == 0


def test_crash_in_plain_task_ends_the_daemon(start: Any, tmp_path: Path) -> None:
    h = start()
    started = _files(tmp_path, "started", 2)
    go = tmp_path / "never"
    h.send(1, wait_go, str(started[0]), str(go), 1)
    h.send(2, wait_go, str(started[1]), str(go), 2)
    wait_files(started)
    h.send(3, hard_exit, 7)
    assert h.exit_code() == 7  # the host fails the tasks that were in flight
    with pytest.raises(EOFError):
        h.task.recv()


def test_concurrency_one_keeps_coroutines_on_the_main_thread(start: Any) -> None:
    h = start(concurrency=1)
    h.send(1, on_loop_thread)
    (res,) = h.results(1).values()
    assert res == (True, h.proc.pid)


_ARRIVES = """
def asyncio_arrives(timeout):
    deadline = time.monotonic() + timeout
    while "asyncio" not in sys.modules:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True
"""


def test_a_coroutine_daemon_imports_asyncio_before_its_first_coroutine(start: Any) -> None:
    # A plain task sees asyncio arrive without any coroutine task: the import (~20 ms)
    # is not paid inside the first coroutine task.  With concurrency=1 nothing imports it.
    # The function is sent by value (this module imports asyncio: by reference, loading
    # it in the daemon would import asyncio too).
    ns: dict[str, Any] = {"time": time, "sys": sys, "__name__": "not_importable"}
    exec(_ARRIVES, ns)
    asyncio_arrives = ns["asyncio_arrives"]
    h = start(concurrency=1)
    h.send(1, asyncio_arrives, 0.5)
    assert h.results(1) == {1: False}
    h = start(concurrency=4)
    h.send(1, asyncio_arrives, WAIT)
    assert h.results(1) == {1: True}


# -- end to end: am.daemons(n, concurrency=k) ------------------------------------------
async def _appear(paths: list[Path], timeout: float = WAIT) -> None:
    import anyio

    with anyio.fail_after(timeout):
        while not all(p.exists() for p in paths):
            await anyio.sleep(0.005)


@pytest.mark.anyio
@pytest.mark.parametrize("transport", ["pipe", "zmq"])
async def test_e2e_coroutines_share_one_daemon(tmp_path: Path, transport: str) -> None:
    import asyncmirai as am

    started = _files(tmp_path, "started", 4)
    go = tmp_path / "go"
    async with am.daemons(1, concurrency=4, transport=transport):
        ms = [am.mirai(wait_go, str(started[i]), str(go), i) for i in range(4)]
        await _appear(started)  # all four started on the one daemon before any finished
        assert not any(m.done() for m in ms)
        go.touch()
        assert [await m for m in ms] == [0, 1, 2, 3]


@pytest.mark.anyio
async def test_e2e_plain_tasks_spread_over_the_daemons(tmp_path: Path) -> None:
    """Four plain functions on four daemons with 8 slots each run at once, one per
    daemon (packed on one daemon they would run one after another in its main thread)."""
    import asyncmirai as am

    started = _files(tmp_path, "started", 4)
    go = tmp_path / "go"
    async with am.daemons(4, concurrency=8):
        import anyio

        with anyio.fail_after(WAIT):
            while am.status().connections < 4:
                await anyio.sleep(0.01)
        ms = [am.mirai(plain_wait_go_pid, str(started[i]), str(go)) for i in range(4)]
        await _appear(started)  # all four started before any may finish
        go.touch()
        assert len({await m for m in ms}) == 4


@pytest.mark.anyio
async def test_e2e_cancel_one_coroutine_leaves_the_others(tmp_path: Path) -> None:
    import asyncmirai as am

    started = _files(tmp_path, "started", 4)
    go = tmp_path / "go"
    async with am.daemons(1, concurrency=4):
        ms = [am.mirai(wait_go, str(started[i]), str(go), i) for i in range(4)]
        await _appear(started)
        assert ms[1].cancel() is True
        await _appear([Path(f"{started[1]}.cancelled")])  # stopped on the daemon
        with pytest.raises(am.MiraiCancelled):
            ms[1].result()
        assert not any(ms[i].done() for i in (0, 2, 3))  # still waiting for go
        assert not any(Path(f"{started[i]}.cancelled").exists() for i in (0, 2, 3))
        go.touch()
        assert [await ms[i] for i in (0, 2, 3)] == [0, 2, 3]


@pytest.mark.anyio
async def test_e2e_timeout_stops_only_its_coroutine(tmp_path: Path) -> None:
    import asyncmirai as am

    started = _files(tmp_path, "started", 2)
    go, never = tmp_path / "go", tmp_path / "never"
    async with am.daemons(1, concurrency=2):
        ok = am.mirai(wait_go, str(started[1]), str(go), "ok")
        await _appear([started[1]])  # the daemon is up: the next task starts at once
        slow = am.mirai(wait_go, str(started[0]), str(never), "slow", _timeout=1.0)
        with pytest.raises(am.MiraiTimeout):
            await slow
        await _appear([Path(f"{started[0]}.cancelled")])  # stopped on the daemon
        assert not ok.done()
        go.touch()
        assert await ok == "ok"


@pytest.mark.anyio
async def test_e2e_crash_fails_every_task_on_the_daemon(tmp_path: Path) -> None:
    import asyncmirai as am

    started = _files(tmp_path, "started", 3)
    never = tmp_path / "never"
    async with am.daemons(1, concurrency=4):
        ms = [am.mirai(wait_go, str(started[i]), str(never), i) for i in range(3)]
        await _appear(started)
        crash = am.mirai(hard_exit, 9)
        for m in [*ms, crash]:
            with pytest.raises(am.DaemonError):
                await m


@pytest.mark.anyio
async def test_e2e_crash_retries_requeue_the_coroutines(tmp_path: Path) -> None:
    import asyncmirai as am

    started = _files(tmp_path, "started", 3)
    go = tmp_path / "go"
    async with am.daemons(1, concurrency=4):
        ms = [am.mirai(wait_go, str(started[i]), str(go), i, _retries=1) for i in range(3)]
        await _appear(started)
        for p in started:
            p.unlink()
        crash = am.mirai(hard_exit, 9)
        with pytest.raises(am.DaemonError):
            await crash
        await _appear(started)  # all three run again, on the daemon started in its place
        go.touch()
        assert [await m for m in ms] == [0, 1, 2]
