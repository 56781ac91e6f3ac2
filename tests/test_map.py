"""mirai_map, race, collect, as_completed, executor, seeds, output and sync mode."""

from __future__ import annotations

import asyncio
import random
import time

import anyio
import helpers_mod
import pytest

import asyncmirai as am

pytestmark = pytest.mark.timeout(90)


def draw(_: int) -> float:
    return random.random()


def add(x: int, y: int, *, scale: int = 1) -> int:
    return (x + y) * scale


def fail_on(x: int, bad: int) -> int:
    if x == bad:
        raise ValueError(f"bad {x}")
    time.sleep(0.01)
    return x


def fail_first(x: int) -> int:
    if x == 0:
        raise ValueError("bad 0")
    time.sleep(0.5)
    return x


@pytest.mark.anyio
async def test_map_like_builtin_map_with_dicts_and_kwargs() -> None:
    async with am.daemons(2):
        assert await am.mirai_map(helpers_mod.inc, range(20)) == list(range(1, 21))
        assert await am.mirai_map(add, [1, 2, 3], [10, 20, 30], scale=2) == [22, 44, 66]
        assert await am.mirai_map(helpers_mod.inc, {"a": 1, "b": 2}) == {"a": 2, "b": 3}
        assert await am.mirai_map(helpers_mod.inc, []) == []
        assert am.mirai_map(helpers_mod.inc, [5]).mirai[0].id > 0


@pytest.mark.anyio
@pytest.mark.parametrize("chunksize", [None, 7])
async def test_map_errors_in_place_or_stop(chunksize: int | None) -> None:
    async with am.daemons(2):
        out = await am.mirai_map(fail_on, range(30), [3] * 30, _chunksize=chunksize)
        assert out[:3] == [0, 1, 2] and out[4:] == list(range(4, 30))
        assert isinstance(out[3], am.MiraiError) and out[3].type_name == "ValueError"
        t0 = time.monotonic()
        # 40 elements of 0.5 s on 2 daemons would take 10 s; the first one fails at once
        h = am.mirai_map(fail_first, range(40), _stop=True, _chunksize=chunksize and 2)
        with pytest.raises(am.MiraiError, match="bad 0"):
            await h
        assert time.monotonic() - t0 < 4.0
        assert all(m.done() for m in h.mirai)
        assert sum(m.cancelled() for m in h.mirai) >= len(h.mirai) - 4


@pytest.mark.anyio
async def test_map_chunksize_keeps_order_and_dicts() -> None:
    async with am.daemons(2):
        xs = list(range(103))
        assert await am.mirai_map(helpers_mod.inc, xs, _chunksize=10) == [x + 1 for x in xs]
        h = am.mirai_map(helpers_mod.inc, {str(i): i for i in range(25)}, _chunksize=4)
        assert len(h.mirai) == 7
        assert await h == {str(i): i + 1 for i in range(25)}


@pytest.mark.anyio
async def test_map_async_for_yields_as_completed() -> None:
    async with am.daemons(2):
        h = am.mirai_map(helpers_mod.sleep_then, [0.6, 0.05, 0.3], ["slow", "fast", "mid"])
        order = [(i, v) async for i, v in h]
        assert order[0] == (1, "fast")
        assert sorted(order) == [(0, "slow"), (1, "fast"), (2, "mid")]
        d = am.mirai_map(helpers_mod.inc, {"x": 1, "y": 2}, _chunksize=2)
        assert sorted([kv async for kv in d]) == [("x", 2), ("y", 3)]


def test_map_result_from_sync_code_with_progress(capsys: pytest.CaptureFixture[str]) -> None:
    with am.daemons(2):
        h = am.mirai_map(helpers_mod.inc, range(50), _progress=True)
        assert h.result(60) == list(range(1, 51))
        assert h.done()
        err = capsys.readouterr().err
        assert "50/50" in err


@pytest.mark.anyio
async def test_race_collect_as_completed() -> None:
    async with am.daemons(2):
        ms = [
            am.mirai(helpers_mod.sleep_then, 0.5, "a"),
            am.mirai(helpers_mod.sleep_then, 0.05, "b"),
        ]
        assert await am.race(ms) == 1
        assert await am.collect(ms) == ["a", "b"]
        ms2 = [am.mirai(helpers_mod.inc, 1), am.mirai(helpers_mod.boom, "x")]
        with pytest.raises(am.MiraiError):
            await am.collect(ms2)
        out = await am.collect(ms2, return_exceptions=True)
        assert out[0] == 2 and isinstance(out[1], am.MiraiError)
        ms3 = [am.mirai(helpers_mod.sleep_then, t, t) for t in (0.4, 0.1, 0.25)]
        got = [i async for i, _ in am.as_completed(ms3)]
        assert got == [1, 2, 0]
        with pytest.raises(am.MiraiError):
            async for _ in am.as_completed(ms2):
                pass


def test_executor_map_submit_and_shutdown() -> None:
    with am.daemons(1):
        ex = am.executor()
        assert ex.submit(helpers_mod.inc, 1).result(30) == 2
        assert list(ex.map(helpers_mod.inc, range(5))) == [1, 2, 3, 4, 5]
        running = ex.submit(helpers_mod.sleep_then, 0.5, "done")
        time.sleep(0.2)
        queued = [ex.submit(helpers_mod.inc, i) for i in range(3)]
        ex.shutdown(wait=True, cancel_futures=True)
        assert running.result() == "done"
        assert all(f.cancelled() for f in queued)
        with pytest.raises(RuntimeError):
            ex.submit(helpers_mod.inc, 1)


@pytest.mark.anyio
async def test_executor_future_refuses_to_block_the_dispatcher_loop() -> None:
    async with am.daemons(1):
        fut = am.executor().submit(helpers_mod.sleep_then, 0.2, 1)
        if am._api.profiles["default"].is_dispatcher_thread():
            with pytest.raises(RuntimeError, match="dispatcher"):
                fut.result()
        assert await anyio.to_thread.run_sync(fut.result, 30) == 1


def test_executor_with_asyncio_run_in_executor() -> None:
    async def main() -> list[int]:
        loop = asyncio.get_running_loop()
        ex = am.executor()
        return list(
            await asyncio.gather(*(loop.run_in_executor(ex, helpers_mod.inc, i) for i in range(4)))
        )

    with am.daemons(2):
        assert asyncio.run(main()) == [1, 2, 3, 4]


def test_seeded_map_is_identical_with_one_and_two_daemons() -> None:
    results = []
    for n in (1, 2):
        with am.daemons(n, seed=42):
            results.append(am.mirai_map(draw, range(20)).result(60))
    assert results[0] == results[1]
    assert len(set(results[0])) == 20
    with am.daemons(2, seed=7):
        other = am.mirai_map(draw, range(20)).result(60)
    assert other != results[0]


def test_output_forwarding_is_attributed(capfd: pytest.CaptureFixture[str]) -> None:
    with am.daemons(1, output=True):
        am.mirai(print, "hello from the daemon").result(30)
        am.mirai("import sys; sys.stderr.write('oops\\n'); sys.stderr.flush()").result(30)
        am.mirai("import sys; sys.stdout.flush()").result(30)
        time.sleep(0.3)
    out, err = capfd.readouterr()
    line = [ln for ln in out.splitlines() if "hello from the daemon" in ln]
    assert line and line[0].startswith("[default/") and "pid" in line[0]
    assert any("oops" in ln and ln.startswith("[default/") for ln in err.splitlines())


def test_sync_mode_map() -> None:
    with am.daemons(sync=True, seed=1):
        assert am.mirai_map(helpers_mod.inc, range(5)).result() == [1, 2, 3, 4, 5]


def test_sync_mode_status_counts_and_seeds_like_daemons() -> None:
    with am.daemons(1, seed=3):
        on_daemon = am.mirai_map(draw, range(5)).result(60)
    with am.daemons(sync=True, seed=3):
        s0 = am.status()
        in_process = am.mirai_map(draw, range(5)).result()
        assert am.status().completed == 5 and s0.completed == 0
    assert in_process == on_daemon
