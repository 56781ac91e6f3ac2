"""Weak points of issue 9: a task that forks, grandchildren, the profile's temp directory.

* A child forked by a task must never touch the daemon's task channel: follow-up tasks
  run in the daemon itself and do not hang.
* What a task starts (``subprocess``, ``multiprocessing``) does not outlive reset.
* The profile's private directory goes when the host gets SIGTERM, and a stale one (its
  host was SIGKILLed) goes at the next profile start; a live host's stays.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import asyncmirai as am

try:
    from tests.servers import pid_alive, wait_for
except ImportError:  # tests/ itself on sys.path (rootdir-less runs)
    from servers import pid_alive, wait_for  # type: ignore[no-redef]

pytestmark = pytest.mark.timeout(90)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(am.__file__)))
PY = sys.executable


@pytest.fixture(autouse=True)
def _reset_default() -> Iterator[None]:
    yield
    am.daemons(0)


def wait_connections(k: int, timeout: float = 30) -> None:
    wait_for(lambda: am.status().connections == k, timeout, f"{k} daemon connection(s)")


# ------------------------------------------------------------------------------ fork


def fork_and_return(go: str) -> tuple[int, int]:
    """Fork; the child waits for the file ``go``, then returns into the daemon's loop
    like the parent did (as a task that forgets ``os._exit`` in the child would)."""
    pid = os.fork()
    if pid == 0:
        deadline = time.monotonic() + 60
        while not os.path.exists(go) and time.monotonic() < deadline:
            time.sleep(0.01)
        return (os.getpid(), 0)
    return (os.getpid(), pid)


@pytest.mark.parametrize("transport", ["pipe", "zmq"])
def test_forked_child_cannot_touch_the_task_channel(tmp_path: Path, transport: str) -> None:
    if transport == "pipe":
        am.daemons(1)
    else:
        am.daemons(1, url="tcp://127.0.0.1:0", transport="zmq")
    wait_connections(1)
    (daemon,) = (r.pid for r in am.status().daemons)
    go = str(tmp_path / "go")
    parent, child = am.mirai(fork_and_return, go).result(30)
    assert parent == daemon and child not in (0, daemon)
    Path(go).touch()  # the child now falls back into the daemon's loop
    wait_for(lambda: not pid_alive(child), 30, "the forked child to leave")
    for _ in range(20):
        assert am.mirai(os.getpid).result(30) == daemon
    assert am.status().connections == 1


def fork_pool() -> list[int]:
    """A multiprocessing (fork) pool inside a task: its workers are forked daemons too."""
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(2) as pool:
        return sorted(set(pool.map(_pid, range(8))))


def _pid(_: int) -> int:
    return os.getpid()


def test_multiprocessing_fork_inside_a_task() -> None:
    am.daemons(1)
    wait_connections(1)
    (daemon,) = (r.pid for r in am.status().daemons)
    workers = am.mirai(fork_pool).result(60)
    assert workers and daemon not in workers
    assert [am.mirai(os.getpid).result(30) for _ in range(5)] == [daemon] * 5


# ----------------------------------------------------------------------- grandchildren


def start_grandchildren() -> tuple[int, list[int]]:
    """Start a ``sleep`` subprocess and a multiprocessing child, and return their pids."""
    import multiprocessing

    sleeper = subprocess.Popen(["sleep", "300"])
    child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(300,))
    child.start()
    return os.getpid(), [sleeper.pid, child.pid]


@pytest.mark.parametrize("how", ["reset", "crash"])
def test_grandchildren_do_not_outlive_their_daemon(how: str) -> None:
    am.daemons(1)
    wait_connections(1)
    daemon, kids = am.mirai(start_grandchildren).result(30)
    assert all(pid_alive(k) for k in kids)
    if how == "reset":
        am.daemons(0)
    else:  # the daemon dies mid-run (killed from outside); the profile respawns it
        os.kill(daemon, signal.SIGKILL)
    wait_for(lambda: not any(pid_alive(k) for k in kids), 30, f"grandchildren gone ({how})")


HOST_THAT_WAITS = """
import os, sys, time
sys.path.insert(0, {tests!r})
import asyncmirai as am
from test_hardening import start_grandchildren
am.daemons(2)
daemon, kids = am.mirai(start_grandchildren).result(60)
other = am.mirai(os.getpid).result(60)
print(daemon, other, *kids, flush=True)
sys.stdin.read()  # until the test SIGKILLs this process
"""


def first_line_then_sigkill(code: str) -> list[str]:
    """Run ``code`` as a host program; return the first line it prints, split; then
    SIGKILL it (it waits on its stdin until then)."""
    host = subprocess.Popen(
        [PY, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        assert host.stdout is not None
        return host.stdout.readline().split()
    finally:
        host.kill()
        host.wait(30)


def test_grandchildren_do_not_outlive_a_host_that_is_sigkilled() -> None:
    """The host gets SIGKILL: its daemons die by the parent-death signal, and what
    their tasks started dies with them (the guard process kills their groups)."""
    tests = os.path.dirname(os.path.abspath(__file__))
    pids = [int(p) for p in first_line_then_sigkill(HOST_THAT_WAITS.format(tests=tests))]
    assert len(pids) == 4, pids  # all alive when printed: a task started the last two
    # the daemons, the sleep subprocess and the multiprocessing child: all gone
    wait_for(lambda: not any(pid_alive(p) for p in pids), 30, "daemons and grandchildren gone")


GUARD_FD_CLOSED = """
import os, signal, subprocess, sys, time
from asyncmirai import _guard

def group() -> subprocess.Popen:
    return subprocess.Popen(["sleep", "300"], start_new_session=True)

a = group()
_guard.guard_group(a.pid)
fd = _guard._sock.fileno()
os.close(fd)  # a program closing a descriptor it does not own: that guard sees EOF
r, w = os.pipe()  # takes the number over
assert w == fd or r == fd, (r, w, fd)
b = group()
_guard.guard_group(b.pid)  # must not write into the pipe: a new guard is started
os.set_blocking(r, False)
try:
    leaked = os.read(r, 100)
except BlockingIOError:
    leaked = b""
assert leaked == b"", leaked
a.wait(30)  # the first guard killed what it listed at EOF
assert a.returncode == -signal.SIGKILL, a.returncode
assert b.poll() is None  # listed with the new guard, which still runs
print("B", b.pid, flush=True)
sys.stdin.read()
"""


def test_guard_survives_a_closed_descriptor_and_never_writes_to_its_reuse() -> None:
    line = first_line_then_sigkill(GUARD_FD_CLOSED)  # its asserts passed if it printed
    assert line[:1] == ["B"], line
    b = int(line[1])
    wait_for(lambda: not pid_alive(b), 30, "the new guard to kill the second group")


# -------------------------------------------------------------------------- signals


def blocked_signals(status: str) -> set[int]:
    """The signals blocked by a thread or process, from its ``/proc/.../status``."""
    for line in Path(status).read_text().splitlines():
        if line.startswith("SigBlk:"):
            mask = int(line.split()[1], 16)
            return {s for s in range(1, 65) if mask >> (s - 1) & 1}
    raise AssertionError(f"no SigBlk in {status}")


PROGRAM_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGALRM}


@pytest.mark.parametrize("url", [None, "tcp://127.0.0.1:0"])
def test_signals_reach_the_main_thread_and_daemons_can_be_stopped(url: str | None) -> None:
    """Our threads block the program's signals (so the kernel delivers them to the main
    thread, whose handlers then run even while it blocks in a syscall); the daemons we
    start, also from those threads (a respawn), have none of them blocked."""
    before = {t.ident for t in threading.enumerate()}
    am.daemons(1, url=url)
    wait_connections(1)
    first = am.mirai(os.getpid).result(30)
    ours = [t for t in threading.enumerate() if t.ident not in before]
    assert any(t.name.startswith("asyncmirai-") for t in ours), ours
    for t in ours:
        masked = blocked_signals(f"/proc/self/task/{t.native_id}/status")
        assert PROGRAM_SIGNALS <= masked, (t.name, sorted(PROGRAM_SIGNALS - masked))
    assert not PROGRAM_SIGNALS & blocked_signals("/proc/self/status")  # the main thread
    os.kill(first, signal.SIGKILL)  # the dispatcher's thread starts its replacement
    wait_for(
        lambda: am.status().connections == 1 and am.mirai(os.getpid).result(30) != first,
        30,
        "a respawned daemon",
    )
    second = am.mirai(os.getpid).result(30)
    for pid in (second,):
        assert not PROGRAM_SIGNALS & blocked_signals(f"/proc/{pid}/status")
    am.daemons(0)  # SIGTERM-based shutdown works
    wait_for(lambda: not pid_alive(second), 30, "the respawned daemon to stop")


# --------------------------------------------------------------------- the temp dir

HOST = """
import os, sys, time
import asyncmirai as am
from asyncmirai._profile import profiles
if sys.argv[1] == "handled":
    import signal
    signal.signal(signal.SIGTERM, lambda *a: (print("handled", flush=True), os._exit(7)))
am.daemons(1)
print(profiles["default"].tmpdir, flush=True)
while am.status().connections < 1:
    time.sleep(0.02)
print("ready", am.mirai(os.getpid).result(30), flush=True)
sys.stdin.read()
"""


class Host:
    """A host program in a subprocess with one local daemon."""

    def __init__(self, mode: str = "plain") -> None:
        self.proc = subprocess.Popen(
            [PY, "-c", HOST, mode],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=dict(os.environ, PYTHONPATH=ROOT),
        )
        assert self.proc.stdout is not None
        self.tmpdir = self.proc.stdout.readline().decode().strip()
        ready = self.proc.stdout.readline().decode().split()
        assert ready[:1] == ["ready"], ready
        self.daemon = int(ready[1])
        assert os.path.isdir(self.tmpdir)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def hosts() -> Iterator[list[Host]]:
    made: list[Host] = []
    yield made
    for h in made:
        h.close()


def test_sigterm_removes_the_profile_dir(hosts: list[Host]) -> None:
    host = Host()
    hosts.append(host)
    host.proc.send_signal(signal.SIGTERM)
    assert host.proc.wait(30) == -signal.SIGTERM  # still dies of SIGTERM
    assert not os.path.exists(host.tmpdir)
    wait_for(lambda: not pid_alive(host.daemon), 10, "the daemon to die with its host")


def test_sigterm_handler_of_the_program_is_kept(hosts: list[Host]) -> None:
    host = Host("handled")
    hosts.append(host)
    host.proc.send_signal(signal.SIGTERM)
    assert host.proc.wait(30) == 7  # the program's own handler ran, not ours
    assert host.proc.stdout is not None and host.proc.stdout.readline() == b"handled\n"


def test_stale_profile_dir_is_removed_at_next_start(hosts: list[Host]) -> None:
    dead = Host()  # SIGKILL: no handler can run, the directory stays behind
    alive = Host()
    hosts += [dead, alive]
    dead.proc.send_signal(signal.SIGKILL)
    dead.proc.wait(10)
    assert os.path.isdir(dead.tmpdir)
    am.daemons(1)
    assert not os.path.exists(dead.tmpdir)
    assert os.path.isdir(alive.tmpdir)  # its host still runs: left alone
