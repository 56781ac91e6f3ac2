"""End to end: the hardening issue's findings 2-7, with real daemons and real sockets.

Each test reproduces one breakage found by hostile tests (see the issue) and checks the
runtime survives it:

2. SIGKILLs from outside never trip the start-up breaker; real start-up failures do.
3. A result whose unpickling raises a ``BaseException`` becomes that task's MiraiError;
   the dispatcher (private thread or the user's asyncio loop) goes on.
4. Hundreds of remote daemons vanishing at once: no recursion, the next task resolves.
5. Running out of file descriptors: a failed respawn is retried; half-open
   unauthenticated tcp connections neither starve the host nor stay open.
6. ``everywhere(fn)`` where ``fn`` kills the daemon trips the breaker: no respawn loop.
7. Liveness does not depend on the daemon's GIL; a SIGKILLed remote daemon is noticed
   from its closed connection, not from missing pings; a daemon the host gave up on that
   speaks again is told to exit.

No sleep stands in for "the task has started" (a file the task creates does), and no
assertion is a wall-clock ceiling: the bounded waits only turn a hang into a message.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import queue
import resource
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from conftest import child_pids, pid_alive

import asyncmirai as am
from asyncmirai import _protocol

pytestmark = pytest.mark.timeout(120)

PY = sys.executable
#: The directory holding the asyncmirai package under test (hosts started here use it).
PKG_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(am.__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))

_started: list[subprocess.Popen[bytes]] = []  # helper processes, killed by pid at teardown


@pytest.fixture(autouse=True)
def _cleanup() -> Iterator[None]:
    yield
    for p in _started:
        if p.poll() is None:
            p.kill()
        p.wait(10)
    _started.clear()
    am.daemons(0)  # conftest's guard then checks that no daemon process survived


# -------------------------------------------------------------------------- helpers


def wait_until(pred: Callable[[], object], timeout: float, what: str) -> Any:
    """Poll ``pred`` until it returns something truthy (returned); fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


def wait_connections(k: int, compute: str = "default", timeout: float = 30) -> None:
    wait_until(lambda: am.status(compute).connections == k, timeout, f"{k} connection(s)")


def outcome(m: Any, timeout: float, what: str) -> tuple[str, Any]:
    """``("value", v)`` or ``("error", exc)`` of a handle; fail if it does not resolve."""
    try:
        return "value", m.result(timeout)
    except TimeoutError as exc:  # MiraiTimeout is one too: tell them apart
        if not m.done():
            pytest.fail(f"{what} did not resolve within {timeout} s (hang)")
        return "error", exc
    except Exception as exc:
        return "error", exc


def connected_pids(compute: str = "default") -> set[int]:
    return {r.pid for r in am.status(compute).daemons}


def profile(compute: str = "default") -> Any:
    from asyncmirai import _api

    return _api.profiles[compute]


def env_for_children() -> dict[str, str]:
    """The environment of a process we start: it imports the package under test."""
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([PKG_ROOT, HERE, *sys.path]))
    return env


def sh_launch(cmd: str) -> subprocess.Popen[bytes]:
    """Run an ``am.launch_remote()`` command the way its users must: on ``sh -s``'s stdin
    (it may carry a here-document), ``exec``'d so the process *is* the daemon."""
    assert cmd.startswith(shlex.quote(sys.executable) + " "), cmd
    p = subprocess.Popen(["sh", "-s"], stdin=subprocess.PIPE, env=env_for_children())
    _started.append(p)
    assert p.stdin is not None
    p.stdin.write(f"exec {cmd}\n".encode())
    p.stdin.close()
    return p


class Host:
    """A helper Python process with a line protocol on stdout (read with a deadline)."""

    def __init__(self, code: str, *args: str) -> None:
        self.p = subprocess.Popen(
            [PY, "-c", textwrap.dedent(code), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env_for_children(),
            cwd=HERE,
        )
        _started.append(self.p)
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.p.stdout is not None
        for raw in self.p.stdout:
            self.lines.put(raw.decode(errors="replace").rstrip("\n"))
        self.lines.put("<EOF>")

    def expect(self, prefix: str, timeout: float) -> str:
        """The next line starting with ``prefix`` (other lines are kept for messages)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                line = self.lines.get(timeout=max(0.0, left))
            except queue.Empty:
                line = "<TIMEOUT>"
            if line.startswith(prefix):
                return line[len(prefix) :].strip()
            self.seen.append(line)
            if line in ("<EOF>", "<TIMEOUT>"):
                out = "\n".join(self.seen[-40:])
                pytest.fail(f"host never printed {prefix!r} ({line}); its output:\n{out}")

    def send(self, line: str) -> None:
        assert self.p.stdin is not None
        self.p.stdin.write(line.encode() + b"\n")
        self.p.stdin.flush()

    def close(self, timeout: float = 30) -> None:
        assert self.p.stdin is not None
        self.p.stdin.close()
        self.p.wait(timeout)


# ------------------------------------------------------------- functions run remotely


class Boom(BaseException):
    """A BaseException that is neither SystemExit nor KeyboardInterrupt."""


def raise_boom() -> None:
    raise Boom("raised while unpickling")


def raise_keyboard_interrupt() -> None:
    raise KeyboardInterrupt("raised while unpickling")


class Hostile:
    """Pickles fine on the daemon; unpickling it on the host raises a BaseException."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        if self.kind == "SystemExit":
            return (sys.exit, (7,))
        if self.kind == "Boom":
            return (raise_boom, ())
        return (raise_keyboard_interrupt, ())


def hostile_result(kind: str) -> Hostile:
    return Hostile(kind)


def exit_nine() -> None:
    os._exit(9)


def hold_gil(seconds: int) -> tuple[str, int]:
    """Block in C *holding the GIL* (``PyDLL`` does not release it): the daemon's Python
    threads (its pinger included) cannot run meanwhile."""
    ctypes.PyDLL(None).sleep(seconds)
    return ("held", os.getpid())


def touch_then_sleep(path: str, seconds: float) -> None:
    Path(path).touch()
    time.sleep(seconds)


# ------------------------------------------------ 2. breakers that trip on the right thing


def test_sigkills_from_outside_never_trip_the_breaker() -> None:
    """SIGKILL a connected daemon, then its replacement before it connects, three times:
    the profile keeps serving and gets back to 3 connections."""
    am.daemons(3)
    wait_connections(3)
    early_kills = 0
    killed: set[int] = set()
    for _ in range(3):
        before = set(child_pids())
        # a daemon killed in an earlier round may still be listed until the host sees it
        alive = wait_until(lambda: connected_pids() - killed, 30, "a live connected daemon")
        victim = next(iter(alive))
        os.kill(victim, signal.SIGKILL)
        killed.add(victim)

        def replacement(before: set[int] = before, victim: int = victim) -> set[int]:
            return set(child_pids()) - before - {victim}

        for pid in wait_until(replacement, 30, "a replacement daemon"):
            if pid not in connected_pids():
                early_kills += 1
            os.kill(pid, signal.SIGKILL)
            killed.add(pid)
    assert early_kills >= 3, "the replacements connected before they could be killed"
    # the host has seen the kills (else a task could go to a dead daemon, and fail)
    wait_until(lambda: not killed & connected_pids(), 30, "the host to see the kills")
    kind, got = outcome(am.mirai(os.getpid), 30, "a task after the kills")
    assert kind == "value", f"the profile stopped serving: {got!r}"
    wait_connections(3)  # respawns went on
    kind, got = outcome(am.mirai(os.getpid), 30, "a task after the respawns")
    assert kind == "value" and got in connected_pids()


def test_daemons_failing_at_startup_give_a_clear_error() -> None:
    """Daemons that really cannot start trip the breaker: a clear DaemonError, no hang.
    (The counterpart of the test above; the old breaker did this too.)"""
    am.daemons(2, env={"PYTHONMALLOC": "no-such-allocator"})  # the interpreter cannot start
    kind, err = outcome(am.mirai(os.getpid), 60, "a task on daemons that cannot start")
    assert kind == "error" and isinstance(err, am.DaemonError), repr(err)
    assert "before they connect" in str(err) or "dying" in str(err), str(err)


# ---------------------------------------- 3. a result whose unpickling raises BaseException

KINDS = ["SystemExit", "Boom", "KeyboardInterrupt"]


@pytest.mark.parametrize("kind", KINDS)
def test_hostile_result_private_thread_mode(kind: str) -> None:
    with am.daemons(1):
        pid = am.mirai(os.getpid).result(30)
        state, err = outcome(am.mirai(hostile_result, kind), 20, f"a result raising {kind}")
        assert state == "error" and isinstance(err, am.MiraiError), repr(err)
        assert kind in str(err)
        # the dispatcher thread goes on, and so does the daemon
        state, got = outcome(am.mirai(os.getpid), 20, "the next task")
        assert (state, got) == ("value", pid)


@pytest.mark.parametrize("kind", KINDS)
def test_hostile_result_asyncio_mode(kind: str) -> None:
    async def main() -> tuple[Any, int, int]:
        async with am.daemons(1):
            pid = await am.mirai(os.getpid)
            m = am.mirai(hostile_result, kind)
            try:
                await asyncio.wait_for(asyncio.ensure_future(m), 20)
            except asyncio.TimeoutError:
                if not m.done():
                    pytest.fail(f"a result raising {kind} did not resolve (hang)")
                raise
            except am.MiraiError as exc:
                err: Any = exc
            else:
                err = None
            await asyncio.sleep(0)  # the loop goes on
            again = await asyncio.wait_for(asyncio.ensure_future(am.mirai(os.getpid)), 20)
            return err, pid, again

    try:
        err, pid, again = asyncio.run(main())
    except (SystemExit, KeyboardInterrupt, Boom) as exc:
        pytest.fail(f"{exc!r} escaped into the user's event loop")
    assert isinstance(err, am.MiraiError) and kind in str(err), repr(err)
    assert again == pid


# ---------------------------------------------------- 4. many daemons vanishing at once

FAKE_DAEMONS = r"""
import os, resource, sys
import zmq
from asyncmirai import _protocol

url, n = sys.argv[1], int(sys.argv[2])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
ctx = zmq.Context()
ctx.setsockopt(zmq.MAX_SOCKETS, n + 64)
socks = []
for i in range(n):
    token = os.urandom(8)
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.ROUTING_ID, b"t" + token)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(url)
    hello = _protocol.Hello(os.getpid(), "fake-node", "task", token, f"fake-{i}")
    s.send_multipart(_protocol.encode(hello))
    socks.append(s)
print("READY", flush=True)
sys.stdin.readline()  # idle until killed
"""


def test_hundreds_of_daemons_vanishing_at_once(
    caplog: pytest.LogCaptureFixture, request: pytest.FixtureRequest
) -> None:
    """400 idle "remote" daemons (cheap: DEALER sockets of one helper process that speak
    Hello, like an array job's daemons) and 2 local ones vanish at once (SIGKILL): the next
    task resolves after the local respawn, without a RecursionError."""
    n_fake, n_local = 400, 2
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n_fake + 256:  # the host (this process) holds one connection per daemon
        if hard < n_fake + 256:
            pytest.skip(f"needs {n_fake + 256} file descriptors (hard limit {hard})")
        resource.setrlimit(resource.RLIMIT_NOFILE, (n_fake + 256, hard))
        request.addfinalizer(lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard)))
    caplog.set_level(logging.WARNING)
    d = am.daemons(n_local, transport="zmq", liveness=300)  # no ping can catch them
    wait_connections(n_local)
    assert am.mirai(os.getpid).result(30) in connected_pids()
    fake = Host(FAKE_DAEMONS, d.url, str(n_fake))
    fake.expect("READY", 30)
    wait_connections(n_fake + n_local)
    victims = [fake.p.pid, *(r.pid for r in am.status().daemons if r.local)]
    assert len(victims) == 1 + n_local
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    fake.p.wait(10)
    wait_until(lambda: not any(pid_alive(p) for p in victims), 10, "the daemons to die")
    # The next tasks: sent while the host still counts the dead as idle.
    ms = [am.mirai(os.getpid, _retries=3) for _ in range(4)]
    for m in ms:
        kind, got = outcome(m, 60, "a task after the daemons vanished")
        assert kind == "value", f"{got!r}"
    assert "RecursionError" not in caplog.text
    assert "maximum recursion depth" not in caplog.text


# ----------------------------------------------------------- 5. file descriptors

EMFILE_HOST = r"""
import logging, os, resource, signal, sys, threading, time
import asyncmirai as am

failed_respawn = threading.Event()


class Watch(logging.Handler):
    def emit(self, record):
        text = record.getMessage()
        exc = record.exc_info[1] if record.exc_info else None
        if "could not start" in text or isinstance(exc, OSError):
            failed_respawn.set()  # new code: a warning; old code: a callback's traceback


logging.getLogger().addHandler(Watch())
logging.getLogger().addHandler(logging.StreamHandler(sys.stdout))
logging.getLogger().setLevel(logging.WARNING)
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
am.daemons(1)
deadline = time.monotonic() + 30
while am.status().connections < 1 and time.monotonic() < deadline:
    time.sleep(0.01)
(pid,) = [r.pid for r in am.status().daemons]
assert am.mirai(os.getpid).result(30) == pid
hog = []
try:
    while True:
        hog.append(os.open("/dev/null", os.O_RDONLY))
except OSError:
    pass
print("EXHAUSTED", len(hog), flush=True)
os.kill(pid, signal.SIGKILL)
saw = failed_respawn.wait(20)
m = am.mirai(int, "42")  # no daemon now: it waits for the respawn
for fd in hog:
    os.close(fd)
print("FAILED_RESPAWN_LOGGED" if saw else "NO_FAILED_RESPAWN_LOGGED", flush=True)
try:
    print("RESULT", m.result(30), flush=True)
except Exception as exc:
    print("RESULT_ERROR", repr(exc), flush=True)
am.daemons(0)
print("DONE", flush=True)
"""


def test_a_respawn_that_hits_emfile_is_retried() -> None:
    host = Host(EMFILE_HOST)
    host.expect("EXHAUSTED", 60)
    line = host.expect("FAILED_RESPAWN_LOGGED", 30)
    assert line == ""
    value = host.expect("RESULT", 60)
    assert value == "42", f"the task submitted meanwhile gave {value!r}"
    host.expect("DONE", 30)
    host.close()


HALF_OPEN_HOST = r"""
import os, resource, sys, time
import asyncmirai as am

soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
d = am.daemons(url="tcp://127.0.0.1:0")
am.launch_local(1)
deadline = time.monotonic() + 30
while am.status().connections < 1 and time.monotonic() < deadline:
    time.sleep(0.01)
(pid,) = [r.pid for r in am.status().daemons]
assert am.mirai(os.getpid).result(30) == pid
print("URL", d.url, flush=True)
sys.stdin.readline()  # the test holds its half-open connections now
try:
    print("RESULT", am.mirai(os.getpid).result(60) == pid, flush=True)
except Exception as exc:
    print("RESULT_ERROR", repr(exc), flush=True)
sys.stdin.readline()
am.daemons(0)
print("DONE", flush=True)
"""


def test_half_open_tcp_connections_do_not_starve_the_host() -> None:
    """An unauthenticated peer holds 1,100 connections that never handshake, against a
    host whose soft fd limit is 1,024: tasks still run, and the host closes a half-open
    connection by itself (the peer sees EOF)."""
    n = 1100
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < n + 256:
        pytest.skip(f"needs {n + 256} file descriptors (hard limit {hard})")
    host = Host(HALF_OPEN_HOST)
    url = host.expect("URL", 60)
    addr, port = url[len("tcp://") :].rsplit(":", 1)
    conns: list[socket.socket] = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, n + 256), hard))
    try:
        first = socket.create_connection((addr, int(port)), timeout=10)
        opened = time.monotonic()
        conns.append(first)
        for _ in range(n - 1):  # non-blocking: the host's accept queue may be full
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex((addr, int(port)))
            conns.append(s)
        host.send("go")
        assert host.expect("RESULT", 90) == "True"
        # The first connection was accepted at once; it never handshakes: the host drops
        # it after its handshake deadline (HANDSHAKE_DEADLINE_MS, 5 s; libzmq's is 30 s).
        first.settimeout(0.5)
        eof = False
        while not eof:
            try:
                eof = first.recv(4096) == b""  # the host's ZMTP greeting, then EOF
            except TimeoutError:
                if time.monotonic() > opened + 20:
                    pytest.fail("the host kept a half-open connection for 20 s (deadline 5 s)")
            except ConnectionResetError:
                eof = True
    finally:
        for s in conns:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    host.send("done")
    host.expect("DONE", 30)
    host.close()


# -------------------------------------------- 6. an everywhere() that kills its daemons


def test_everywhere_that_kills_daemons_trips_the_breaker() -> None:
    n = 2
    am.daemons(n)
    wait_connections(n)
    seen: set[int] = set(child_pids())
    stop = threading.Event()

    def watch() -> None:  # every daemon process that ever exists
        while not stop.is_set():
            seen.update(child_pids())
            time.sleep(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        kind, err = outcome(am.everywhere(exit_nine), 60, "everywhere(exit_nine)")
        assert kind == "error" and isinstance(err, am.DaemonError), f"it gave {err!r}"
        assert "exit_nine" in str(err), str(err)
        kind, err = outcome(am.mirai(os.getpid), 60, "a task after the setup killed them")
        assert kind == "error" and isinstance(err, am.DaemonError), f"it gave {err!r}"
        # a bounded window after the breaker tripped: no respawn loop
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        watcher.join(5)
    # the n originals, their n replacements and at most the breaker's 3 early failures
    assert len(seen) <= 2 * n + 3, f"{len(seen)} daemon processes: a respawn loop"


# ---------------------------------------------------- 7. liveness without the GIL


def test_a_task_holding_the_gil_is_not_mistaken_for_a_lost_daemon() -> None:
    """A daemon the host did not start (so only the connection tells it is alive; a
    process the host started is watched as a process) holds its GIL 4x ``liveness``."""
    am.daemons(url="tcp://127.0.0.1:0", liveness=1.0)
    (cmd,) = am.launch_remote(1)
    p = sh_launch(cmd)
    wait_connections(1)
    (pid,) = connected_pids()
    assert pid == p.pid
    kind, got = outcome(am.mirai(hold_gil, 4), 60, "a task holding the GIL for 4 s")
    assert (kind, got) == ("value", ("held", pid)), f"{got!r}"
    assert am.mirai(os.getpid).result(30) == pid  # the same daemon serves on
    assert connected_pids() == {pid}


def test_a_sigkilled_remote_daemon_is_noticed_from_its_connection(tmp_path: Path) -> None:
    am.daemons(url="tcp://127.0.0.1:0", liveness=300)  # pings cannot be what notices
    (cmd,) = am.launch_remote(1)
    p = sh_launch(cmd)
    wait_connections(1)
    assert connected_pids() == {p.pid}
    flag = tmp_path / "started"
    m = am.mirai(touch_then_sleep, str(flag), 120)
    wait_until(flag.exists, 30, "the task to start")
    os.kill(p.pid, signal.SIGKILL)
    kind, err = outcome(m, 30, "the task of a SIGKILLed remote daemon")
    assert kind == "error" and isinstance(err, am.DaemonError), f"it gave {err!r}"
    p.wait(10)


def test_a_daemon_the_host_does_not_know_is_told_to_exit() -> None:
    d = am.daemons(url="tcp://127.0.0.1:0")
    prof = profile()
    server_public = prof.curve_server[0]
    client_public, client_secret = prof.curve_client
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    try:
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.ROUTING_ID, b"t" + os.urandom(8))
        s.curve_serverkey = server_public
        s.curve_publickey = client_public
        s.curve_secretkey = client_secret
        s.connect(d.url)
        s.send_multipart(_protocol.encode(_protocol.Ping(current=None, done=None)))
        if not s.poll(15_000):
            pytest.fail("a daemon unknown to the host pinged it and got no answer in 15 s")
        msg = _protocol.decode(s.recv_multipart())
        assert isinstance(msg, _protocol.Exit), f"got {msg!r}"
    finally:
        s.close(0)
        ctx.term()
