"""Cancellation, timeouts, crashes, retries, lifecycle limits, orphans and bad input."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import anyio
import helpers_mod
import pytest
import zmq
from conftest import pid_alive, wait_dead

import asyncmirai as am

pytestmark = pytest.mark.timeout(90)


async def _connected(n: int, compute: str = "default", timeout: float = 20) -> None:
    with anyio.fail_after(timeout):
        while am.status(compute).connections < n:
            await anyio.sleep(0.01)


def _wait_connected(n: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while am.status().connections < n:
        assert time.monotonic() < deadline
        time.sleep(0.01)


# -- cancel -----------------------------------------------------------------------------
@pytest.mark.anyio
@pytest.mark.parametrize("transport", ["pipe", "zmq"])
@pytest.mark.parametrize("fn", [helpers_mod.busy_loop, helpers_mod.sleep_then])
async def test_cancel_running_task_frees_the_same_daemon(fn: object, transport: str) -> None:
    async with am.daemons(1, transport=transport):
        pid = await am.mirai(helpers_mod.getpid)
        args = (60,) if fn is helpers_mod.busy_loop else (60, None)
        m = am.mirai(fn, *args)  # type: ignore[arg-type]
        await anyio.sleep(0.3)
        t0 = time.monotonic()
        assert m.cancel() is True
        assert m.cancel() is False
        assert await am.mirai(helpers_mod.getpid) == pid  # same process, reused
        assert time.monotonic() - t0 < 1.0
        assert m.cancelled()
        with pytest.raises(am.MiraiCancelled):
            m.result()


@pytest.mark.anyio
async def test_cancel_queued_task_never_runs(tmp_path: Path) -> None:
    async with am.daemons(1):
        blocker = am.mirai(helpers_mod.sleep_then, 0.5, "b")
        flag = str(tmp_path / "ran")
        queued = am.mirai(helpers_mod.touch, flag)
        assert queued.cancel()
        assert await blocker == "b"
        assert await am.mirai(helpers_mod.inc, 1) == 2
        assert not os.path.exists(flag)
        assert am.status().completed == 2


@pytest.mark.anyio
async def test_cancelling_the_awaiter_cancels_the_mirai() -> None:
    async with am.daemons(1):
        pid = await am.mirai(helpers_mod.getpid)
        m = am.mirai(helpers_mod.sleep_then, 60, None)
        with anyio.move_on_after(0.3):
            await m
        assert m.cancelled()
        t0 = time.monotonic()
        assert await am.mirai(helpers_mod.getpid) == pid
        assert time.monotonic() - t0 < 1.0
        m2 = am.mirai(helpers_mod.busy_loop, 60)
        with pytest.raises(TimeoutError):
            with anyio.fail_after(0.3):
                await m2
        assert m2.cancelled()
        assert await am.mirai(helpers_mod.getpid) == pid


async def test_asyncio_timeout_and_task_cancel_cancel_the_mirai() -> None:
    async def main() -> None:
        async with am.daemons(1):
            pid = await am.mirai(helpers_mod.getpid)
            m = am.mirai(helpers_mod.sleep_then, 60, None)
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3):
                    await m
            assert m.cancelled()
            m2 = am.mirai(helpers_mod.sleep_then, 60, None)
            task = asyncio.ensure_future(_await(m2))
            await asyncio.sleep(0.3)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert m2.cancelled()
            assert await am.mirai(helpers_mod.getpid) == pid
            m3 = am.mirai(helpers_mod.sleep_then, 60, None)
            m3.cancel()
            with pytest.raises(asyncio.CancelledError):
                await m3

    await asyncio.wait_for(main(), 60)


test_asyncio_timeout_and_task_cancel_cancel_the_mirai = pytest.mark.anyio(  # type: ignore[assignment]
    pytest.mark.parametrize("anyio_backend", ["asyncio"])(
        test_asyncio_timeout_and_task_cancel_cancel_the_mirai
    )
)


async def _await(m: am.Mirai[object]) -> object:
    return await m


@pytest.mark.anyio
async def test_uninterruptible_task_kills_and_respawns_daemon() -> None:
    async with am.daemons(1, cancel_grace=0.5):
        pid = await am.mirai(helpers_mod.getpid)
        m = am.mirai(helpers_mod.stubborn, 60)
        await anyio.sleep(0.3)
        m.cancel()
        with anyio.fail_after(20):
            new = await am.mirai(helpers_mod.getpid)
        assert new != pid
        assert wait_dead([pid], 5) == []
        assert m.cancelled()


@pytest.mark.anyio
async def test_timeout_raises_mirai_timeout_and_daemon_is_reused() -> None:
    async with am.daemons(1):
        pid = await am.mirai(helpers_mod.getpid)
        m = am.mirai(helpers_mod.sleep_then, 60, None, _timeout=0.3)
        with pytest.raises(am.MiraiTimeout) as ei:
            await m
        assert isinstance(ei.value, TimeoutError)
        t0 = time.monotonic()
        assert await am.mirai(helpers_mod.getpid) == pid
        assert time.monotonic() - t0 < 1.0
        assert await am.mirai(helpers_mod.inc, 1, _timeout=30) == 2


# -- crashes ----------------------------------------------------------------------------
@pytest.mark.anyio
@pytest.mark.parametrize(
    "how,expect", [("exit", "code 7"), ("kill", "SIGKILL"), ("segv", "SIGSEGV")]
)
async def test_crash_fails_only_its_task_and_daemon_is_respawned(how: str, expect: str) -> None:
    async with am.daemons(1, transport="zmq" if how == "kill" else "pipe"):
        await am.everywhere(helpers_mod.set_state, "setup", "done")
        pid = await am.mirai(helpers_mod.getpid)
        crash = am.mirai(helpers_mod.die, how)
        queued = [am.mirai(helpers_mod.inc, i) for i in range(5)]
        with pytest.raises(am.DaemonError, match=expect):
            await crash
        assert [await m for m in queued] == [1, 2, 3, 4, 5]
        assert await am.mirai(helpers_mod.getpid) != pid
        # the respawned daemon got the everywhere() replay
        assert await am.mirai(helpers_mod.get_state, "setup") == "done"
        assert am.status().connections == 1


@pytest.mark.anyio
async def test_retries_requeue_a_crashed_task(tmp_path: Path) -> None:
    async with am.daemons(1):
        flag = str(tmp_path / "crashed-once")
        assert await am.mirai(helpers_mod.die_once, flag, _retries=1) == "second try"
        flag2 = str(tmp_path / "crashed-twice")
        with pytest.raises(am.DaemonError):
            await am.mirai(helpers_mod.die_once, flag2, _retries=0)


def test_chaos_every_task_resolves_exactly_once() -> None:
    """400 tasks on 2 daemons while daemons are repeatedly SIGKILLed."""
    rng = random.Random(1)
    with am.daemons(2):
        _wait_connected(2)
        ms = [am.mirai(helpers_mod.sleep_then, rng.random() * 0.004, i) for i in range(400)]
        resolutions: dict[int, int] = {}
        for m in ms:
            m.add_done_callback(
                lambda h: resolutions.__setitem__(h.id, resolutions.get(h.id, 0) + 1)
            )
        kills = 0
        deadline = time.monotonic() + 60
        while not all(m.done() for m in ms) and time.monotonic() < deadline:
            time.sleep(0.05)
            if kills < 8:
                rows = am.status().daemons
                if rows:
                    os.kill(rng.choice(rows).pid, signal.SIGKILL)
                    kills += 1
        values, errors = 0, 0
        for i, m in enumerate(ms):
            exc = m.exception(30)
            if exc is None:
                assert m.result() == i
                values += 1
            else:
                assert isinstance(exc, am.DaemonError), exc
                errors += 1
        assert values + errors == 400 and kills >= 4
        assert errors <= kills
        assert all(resolutions[m.id] == 1 for m in ms)
        assert len(resolutions) == 400


# -- lifecycle options ------------------------------------------------------------------
@pytest.mark.anyio
async def test_maxtasks_retires_and_replaces_daemons() -> None:
    async with am.daemons(1, maxtasks=2):
        pids = [await am.mirai(helpers_mod.getpid) for _ in range(6)]
        assert len(set(pids)) == 3 and pids[0] == pids[1] and pids[2] == pids[3]
        await _connected(1)


@pytest.mark.anyio
async def test_idletime_and_walltime_retire_daemons() -> None:
    async with am.daemons(1, idletime=0.3):
        a = await am.mirai(helpers_mod.getpid)
        await anyio.sleep(1.5)
        b = await am.mirai(helpers_mod.getpid)
        assert a != b and not pid_alive(a)
    async with am.daemons(1, walltime=0.5):
        a = await am.mirai(helpers_mod.getpid)
        await am.mirai(helpers_mod.sleep_then, 0.6, None)
        b = await am.mirai(helpers_mod.getpid)
        assert a != b


# -- orphans ----------------------------------------------------------------------------
def test_host_killed_with_sigkill_leaves_no_daemons(tmp_path: Path) -> None:
    script = tmp_path / "host.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys, time
            import asyncmirai as am
            am.daemons(2)
            while am.status().connections < 2:
                time.sleep(0.01)
            print(*[r.pid for r in am.status().daemons], flush=True)
            m = am.mirai(time.sleep, 60)
            time.sleep(60)
            """
        )
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    host = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, env=env)
    try:
        assert host.stdout is not None
        line = host.stdout.readline()
        pids = [int(p) for p in line.split()]
        assert len(pids) == 2 and all(pid_alive(p) for p in pids)
        host.kill()
        host.wait(10)
        assert wait_dead(pids, 10) == []
    finally:
        if host.poll() is None:
            host.kill()
            host.wait()


# -- bad input on the wire --------------------------------------------------------------
@pytest.mark.anyio
async def test_garbage_frames_are_dropped_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="asyncmirai")
    async with am.daemons(1):
        await _connected(1)
        ctx = zmq.Context()
        s = ctx.socket(zmq.DEALER)
        s.connect(am.status().url)
        s.send(b"\xc1garbage")
        s.send_multipart([b"\x95\x01\x04", b"truncated"])
        s.send_multipart([b"\x95" + b"\x01" * 4, b""])
        s.send(b"\xdb" + b"\xff" * 8)  # msgpack str32 claiming 4 GiB
        s.send(b"x" * (2 << 20))  # oversized header
        await anyio.sleep(0.3)
        assert await am.mirai(helpers_mod.inc, 1) == 2
        s.close(0)
        ctx.term()
    assert "malformed" in caplog.text


def test_daemon_of_another_protocol_version_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="asyncmirai")
    with am.daemons(url=am.local_url()):
        url = am.status().url
        code = (
            "import sys, asyncmirai._protocol as p; p.PROTOCOL_VERSION = 99;"
            "from asyncmirai._daemon import run_daemon; run_daemon(sys.argv[1:])"
        )
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        r = subprocess.run(
            [sys.executable, "-c", code, url], capture_output=True, timeout=30, env=env
        )
        assert r.returncode == 3
        assert b"protocol version mismatch" in r.stderr
        assert am.status().connections == 0
    assert "protocol version mismatch" in caplog.text
