"""End-to-end tests of the core runtime with real daemon processes (asyncio and trio)."""

from __future__ import annotations

import asyncio
import os
import pickle
import subprocess
import sys
import threading
import time

import anyio
import helpers_mod
import pytest
from conftest import child_pids, pid_alive, wait_dead

import asyncmirai as am

pytestmark = pytest.mark.timeout(60)


# -- tasks ------------------------------------------------------------------------------
@pytest.mark.anyio
async def test_mirai_values_of_every_kind_of_callable() -> None:
    offset = 10

    def closure(x: int) -> int:
        return x + offset

    class Local:
        def __init__(self, v: int) -> None:
            self.v = v

        def double(self) -> int:
            return self.v * 2

    async def coro(x: int) -> int:
        await asyncio.sleep(0.01)
        return x * 3

    async with am.daemons(2):
        assert await am.mirai(lambda x: x + 1, 1) == 2
        assert await am.mirai(closure, 5) == 15
        obj = await am.mirai(Local, 21)
        assert isinstance(obj, Local) and obj.double() == 42
        assert await am.mirai(lambda o: o.double(), Local(4)) == 8
        assert await am.mirai(coro, 7) == 21
        assert await am.mirai(helpers_mod.inc, 41) == 42  # by reference from a user module
        assert await am.mirai(pow, 2, 10) == 1024
        assert await am.mirai(dict, a=1, b=2) == {"a": 1, "b": 2}
        assert await am.mirai(sorted, [3, 1, 2], reverse=True) == [3, 2, 1]


@pytest.mark.anyio
async def test_code_strings_evaluate_statements_and_return_last_expression() -> None:
    async with am.daemons(1):
        assert await am.mirai("x + y", x=1, y=2) == 3
        assert await am.mirai("import math\nz = math.sqrt(n)\nz * 2", n=16) == 8.0
        assert await am.mirai("a = 1") is None
        with pytest.raises(am.MiraiError) as ei:
            await am.mirai("undefined_name + 1")
        assert ei.value.type_name == "NameError"
        # A code string that does not parse fails in the caller, at mirai(), with
        # Python's SyntaxError (line and offset included); nothing is submitted.
        before = am.info()["submitted"]
        with pytest.raises(SyntaxError) as si:
            am.mirai("y = 1\nx +", x=1)
        assert not isinstance(si.value, am.MiraiError)
        assert si.value.lineno == 2 and si.value.filename == "<mirai>"
        with pytest.raises(SyntaxError):
            am.everywhere("def (")
        assert am.info()["submitted"] == before
    with pytest.raises(TypeError):
        am.daemons(1)
        try:
            am.mirai("x", 1)
        finally:
            am.daemons(0)


@pytest.mark.anyio
async def test_underscore_options_do_not_steal_function_kwargs() -> None:
    def f(*, timeout: int, compute: str, retries: int) -> tuple[int, str, int]:
        return (timeout, compute, retries)

    async with am.daemons(1):
        m = am.mirai(f, timeout=1, compute="x", retries=3, _timeout=30.0, _retries=1)
        assert await m == (1, "x", 3)


@pytest.mark.anyio
@pytest.mark.parametrize("transport", ["pipe", "zmq"])
async def test_tasks_queue_before_daemons_connect(transport: str) -> None:
    async with am.daemons(2, transport=transport):
        ms = [am.mirai(helpers_mod.inc, i) for i in range(50)]
        assert [await m for m in ms] == list(range(1, 51))
        s = am.status()
        assert s.completed == 50 and s.awaiting == 0 and s.executing == 0


@pytest.mark.anyio
async def test_tasks_spread_over_daemons_and_status_rows() -> None:
    async with am.daemons(2):
        pids = set()
        ms = [am.mirai(helpers_mod.sleep_then, 0.2, None) for _ in range(2)]
        for m in ms:
            await m
        for _ in range(20):
            pids.add(await am.mirai(helpers_mod.getpid))
        s = am.status()
        assert s.connections == 2
        assert {r.pid for r in s.daemons} >= pids
        assert sum(r.tasks_done for r in s.daemons) == 22 == s.completed
        assert s.url.startswith("ipc://")
        mode = os.stat(s.url[len("ipc://") :].rsplit("/", 1)[0]).st_mode & 0o777
        assert mode == 0o700


# -- errors -----------------------------------------------------------------------------
@pytest.mark.anyio
async def test_remote_error_is_mirai_error_and_daemon_survives() -> None:
    async with am.daemons(1):
        pid = await am.mirai(helpers_mod.getpid)
        with pytest.raises(am.MiraiError) as ei:
            await am.mirai(helpers_mod.boom, "bad thing")
        err = ei.value
        assert err.type_name == "ValueError"
        assert err.message == "bad thing"
        assert "boom" in err.remote_traceback and "Traceback" in err.remote_traceback
        assert isinstance(err.__cause__, ValueError) and str(err.__cause__) == "bad thing"
        assert await am.mirai(helpers_mod.getpid) == pid


@pytest.mark.anyio
async def test_unpicklable_argument_fails_at_mirai_and_sends_nothing() -> None:
    async with am.daemons(1):
        lock = threading.Lock()
        with pytest.raises(TypeError, match="positional argument 1.*lock"):
            am.mirai(helpers_mod.inc, 1, lock)
        with pytest.raises(TypeError, match="keyword argument 'k'"):
            am.mirai(dict, k=lock)
        with pytest.raises(pickle.PicklingError):
            am.mirai(helpers_mod.inc, lock)
        with pytest.raises(am.SerializationError):
            am.mirai(helpers_mod.inc, lock)
        assert am.status().completed == 0
        assert await am.mirai(helpers_mod.inc, 1) == 2


@pytest.mark.anyio
async def test_unpicklable_result_is_mirai_error() -> None:
    async with am.daemons(1):
        with pytest.raises(am.MiraiError, match="cannot be serialized"):
            await am.mirai(threading.Lock)
        assert await am.mirai(helpers_mod.inc, 1) == 2


def test_bad_arguments_are_clear_errors() -> None:
    with pytest.raises(RuntimeError, match="no daemons are set"):
        am.mirai(helpers_mod.inc, 1)
    with pytest.raises(ValueError):
        am.daemons(-1)
    with pytest.raises(ValueError):
        am.daemons(1, maxtasks=0)
    with pytest.raises(ValueError):
        am.daemons(1, url="http://x")
    with am.daemons(1):
        with pytest.raises(TypeError):
            am.mirai(42)  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            am.mirai(helpers_mod.inc, 1, _timeout=-1)


# -- handles from every context -----------------------------------------------------------
def test_result_from_sync_code_and_threads() -> None:
    with am.daemons(2) as d:
        assert d == 2 and isinstance(d, am.Daemons)
        m = am.mirai(helpers_mod.inc, 1)
        assert m.result(timeout=30) == 2 and m.done() and m.exception() is None
        out: list[int] = []

        def worker(i: int) -> None:
            out.append(am.mirai(helpers_mod.inc, i).result(30))

        ts = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert sorted(out) == list(range(1, 9))
        # awaited from loops on other threads, asyncio and trio
        assert asyncio.run(_await(am.mirai(helpers_mod.inc, 5))) == 6
        import trio

        assert trio.run(_await, am.mirai(helpers_mod.inc, 6)) == 7
        err = am.mirai(helpers_mod.boom, "x")
        assert isinstance(err.exception(30), am.MiraiError)


async def _await(m: am.Mirai[int]) -> int:
    return await m


def test_result_on_dispatcher_loop_thread_raises_instead_of_deadlocking() -> None:
    async def main() -> None:
        async with am.daemons(1):
            m = am.mirai(helpers_mod.sleep_then, 0.1, 1)
            with pytest.raises(RuntimeError, match="dispatcher"):
                m.result()
            assert await m == 1

    asyncio.run(main())


@pytest.mark.anyio
async def test_handle_created_in_one_backend_awaited_in_another_thread() -> None:
    async with am.daemons(1):
        m = am.mirai(helpers_mod.sleep_then, 0.2, "v")
        box: list[str] = []
        t = threading.Thread(target=lambda: box.append(asyncio.run(_await(m))))  # type: ignore[arg-type]
        t.start()
        assert await m == "v"
        await anyio.to_thread.run_sync(t.join)
        assert box == ["v"]


# -- profiles, everywhere -----------------------------------------------------------------
@pytest.mark.anyio
async def test_compute_profiles_are_independent() -> None:
    async with am.daemons(1), am.daemons(1, compute="gpu"):
        assert am.daemons_set() and am.daemons_set("gpu") and not am.daemons_set("nope")
        a = await am.mirai(helpers_mod.getpid)
        b = await am.mirai(helpers_mod.getpid, _compute="gpu")
        assert a != b
        assert am.status().daemons[0].pid == a
        assert am.status("gpu").daemons[0].pid == b
    assert not am.daemons_set() and not am.daemons_set("gpu")


@pytest.mark.anyio
async def test_everywhere_runs_on_all_daemons_and_replays_on_new_ones() -> None:
    async with am.daemons(2):
        await am.everywhere(helpers_mod.set_state, "k", "v1")
        results = await am.everywhere(helpers_mod.append_state, "log", "a")
        assert results == [["a"], ["a"]]
        await am.everywhere(helpers_mod.append_state, "log", "b")
        ms = [am.mirai(helpers_mod.pid_and_state, "log", 0.3) for _ in range(2)]
        assert len({(await m)[0] for m in ms}) == 2
        am.launch_local(1)
        deadline = time.monotonic() + 20
        while am.status().connections < 3 and time.monotonic() < deadline:
            await anyio.sleep(0.02)
        assert am.status().connections == 3
        # the new daemon got the replay, in order, before any task
        ms = [am.mirai(helpers_mod.pid_and_state, "log", 0.5) for _ in range(3)]
        seen = dict([await m for m in ms])
        assert len(seen) == 3
        assert all(v == ["a", "b"] for v in seen.values())
        assert await am.mirai(helpers_mod.get_state, "k") == "v1"


@pytest.mark.anyio
async def test_everywhere_error_is_raised() -> None:
    async with am.daemons(1):
        with pytest.raises(am.MiraiError):
            await am.everywhere(helpers_mod.boom, "setup failed")
        assert await am.mirai(helpers_mod.inc, 1) == 2


# -- reset and processes ---------------------------------------------------------------
def _daemon_pids() -> list[int]:
    return [r.pid for r in am.status().daemons]


def _wait_connections(n: int, compute: str = "default") -> None:
    deadline = time.monotonic() + 20
    while am.status(compute).connections < n:
        assert time.monotonic() < deadline, "daemons did not connect"
        time.sleep(0.02)


def test_reset_kills_daemons_and_fails_unresolved_tasks() -> None:
    am.daemons(2)
    _wait_connections(2)
    pids = _daemon_pids()
    assert all(pid_alive(p) for p in pids)
    running = [am.mirai(helpers_mod.sleep_then, 30, None) for _ in range(4)]
    time.sleep(0.2)
    assert am.daemons(0) == 0
    assert not am.daemons_set()
    for m in running:
        with pytest.raises(am.DaemonError):
            m.result(5)
    assert wait_dead(pids, 5) == []
    assert child_pids() == []


def test_with_block_leaves_no_daemon() -> None:
    with am.daemons(2):
        _wait_connections(2)
        pids = _daemon_pids()
    assert wait_dead(pids, 5) == []
    assert not am.daemons_set()


@pytest.mark.anyio
async def test_async_with_leaves_no_daemon() -> None:
    async with am.daemons(2):
        while am.status().connections < 2:
            await anyio.sleep(0.02)
        pids = _daemon_pids()
        m = am.mirai(helpers_mod.sleep_then, 30, None)
    with pytest.raises(am.DaemonError):
        await m
    assert [p for p in pids if pid_alive(p)] == []


def test_daemons_again_resets_the_old_profile() -> None:
    am.daemons(1)
    _wait_connections(1)
    old = _daemon_pids()
    am.daemons(2)
    assert wait_dead(old, 5) == []
    _wait_connections(2)
    assert set(_daemon_pids()).isdisjoint(old)
    am.daemons(0)


def test_local_daemons_inherit_path_and_cwd(tmp_path: os.PathLike[str]) -> None:
    mod = os.path.join(str(tmp_path), "user_mod_xyz.py")
    with open(mod, "w") as f:
        f.write("def triple(x):\n    return 3 * x\n")
    sys.path.insert(0, str(tmp_path))
    old = os.getcwd()
    os.chdir(str(tmp_path))
    try:
        import user_mod_xyz  # type: ignore[import-not-found]

        with am.daemons(1):
            assert am.mirai(user_mod_xyz.triple, 5).result(30) == 15
            assert am.mirai(os.getcwd).result(30) == os.path.realpath(str(tmp_path))
    finally:
        os.chdir(old)
        sys.path.remove(str(tmp_path))


def test_sync_mode_runs_in_process() -> None:
    with am.daemons(sync=True):
        assert am.mirai(os.getpid).result() == os.getpid()
        assert am.mirai("x * 2", x=21).result() == 42
        with pytest.raises(am.MiraiError):
            am.mirai(helpers_mod.boom, "e").result()
        assert am.everywhere(helpers_mod.inc, 1).result() == [2]


def test_import_is_light() -> None:
    code = (
        "import sys, asyncmirai as am; am.mirai; am.daemons; am.serial_config;"
        "assert 'torch' not in sys.modules and 'numpy' not in sys.modules, "
        "[m for m in sys.modules if m.startswith(('torch', 'numpy'))];"
        "assert not [m for m in sys.modules if m.startswith('opentelemetry')]"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_public_names_are_exported_and_documented() -> None:
    for name in am.__all__:
        obj = getattr(am, name)
        assert obj.__doc__, f"{name} has no docstring"
    assert os.path.exists(os.path.join(os.path.dirname(am.__file__), "py.typed"))


def test_profile_outliving_its_loop_gives_clear_error_and_resets_cleanly() -> None:
    async def main() -> list[int]:
        am.daemons(2)  # dispatcher on this loop, never reset inside it
        assert await am.mirai(helpers_mod.inc, 1) == 2
        while am.status().connections < 2:
            await asyncio.sleep(0.01)
        return [r.pid for r in am.status().daemons]

    pids = asyncio.run(main())
    with pytest.raises(RuntimeError, match="event loop .* has closed"):
        am.mirai(helpers_mod.inc, 1)
    assert am.daemons(0) == 0
    assert wait_dead(pids, 5) == []


# -- prefetch under a backlog -------------------------------------------------------------
@pytest.mark.anyio
async def test_prefetched_task_behind_a_long_one_is_taken_back_by_an_idle_daemon() -> None:
    async with am.daemons(2):
        while am.status().connections < 2:
            await anyio.sleep(0.01)
        q0 = am.mirai(helpers_mod.pid_and_state, "x", 0.1)
        q1 = am.mirai(helpers_mod.pid_and_state, "x", 0.1)
        long = am.mirai(helpers_mod.pid_and_state, "x", 3.0)
        x = am.mirai(helpers_mod.pid_and_state, "x", 0.0)  # prefetched behind `long`
        rest = [am.mirai(helpers_mod.pid_and_state, "x", 0.05) for _ in range(3)]
        t0 = time.monotonic()
        x_pid, _ = await x
        assert time.monotonic() - t0 < 2.0  # it did not wait for `long`
        long_pid, _ = await long
        assert x_pid != long_pid
        for m in (q0, q1, *rest):
            await m
        assert am.status().completed == 7


@pytest.mark.anyio
async def test_backlog_of_tiny_tasks_all_resolve_once_in_order() -> None:
    async with am.daemons(2):
        ms = [am.mirai(helpers_mod.inc, i) for i in range(3000)]
        assert await am.collect(ms) == list(range(1, 3001))
        s = am.status()
        assert s.completed == 3000 and s.awaiting == 0 and s.executing == 0


@pytest.mark.anyio
async def test_cancelled_prefetched_task_never_runs(tmp_path: os.PathLike[str]) -> None:
    async with am.daemons(1):
        while am.status().connections < 1:
            await anyio.sleep(0.01)
        first = am.mirai(helpers_mod.sleep_then, 0.1, 0)
        busy = am.mirai(helpers_mod.sleep_then, 0.5, 1)
        flag = os.path.join(str(tmp_path), "ran")
        target = am.mirai(helpers_mod.touch, flag)  # prefetched behind `busy` (backlog)
        tail = [am.mirai(helpers_mod.inc, i) for i in range(3)]
        await first
        target.cancel()
        assert await busy == 1
        assert [await m for m in tail] == [1, 2, 3]
        assert not os.path.exists(flag)
