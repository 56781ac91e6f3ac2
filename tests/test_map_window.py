"""mirai_map(..., _window=k): lazy input, at most k tasks in flight, real daemons."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import helpers_mod
import pytest

import asyncmirai as am

pytestmark = pytest.mark.timeout(90)


def stamp(x: int, seconds: float = 0.05) -> tuple[int, float, float]:
    """Run for a while; return when it ran (CLOCK_MONOTONIC is shared by all processes)."""
    t0 = time.monotonic()
    time.sleep(seconds)
    return x, t0, time.monotonic()


def fail_first(x: int) -> int:
    if x == 0:
        raise ValueError("bad 0")
    time.sleep(0.5)
    return x


def max_overlap(spans: list[tuple[float, float]]) -> int:
    """Most spans running at one instant (an end sorts before a start at the same time)."""
    events = sorted([(t0, 1) for t0, _ in spans] + [(t1, -1) for _, t1 in spans])
    cur = best = 0
    for _, d in events:
        cur += d
        best = max(best, cur)
    return best


class Pulls:
    """Counts what the map read from its source, against what the consumer has taken."""

    def __init__(self) -> None:
        self.pulls = 0
        self.consumed = 0
        self.ahead: list[int] = []  # at each read: elements read and not yet taken

    def pulled(self) -> None:
        self.pulls += 1
        self.ahead.append(self.pulls - self.consumed)

    def gen(self, n: int) -> Iterator[int]:
        for i in range(n):
            self.pulled()
            yield i

    async def agen(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            self.pulled()
            yield i
            await anyio.sleep(0)


@pytest.mark.anyio
@pytest.mark.parametrize("source", ["generator", "async generator"])
async def test_window_reads_at_most_window_plus_one_ahead(source: str) -> None:
    n, window = 24, 3
    c = Pulls()
    async with am.daemons(5):  # more daemons than the window: only the window limits
        src = c.gen(n) if source == "generator" else c.agen(n)
        h = am.mirai_map(stamp, src, _window=window)
        # a plain iterable's first window is submitted at the call, an async one's at the
        # first await
        assert c.pulls == (window if source == "generator" else 0)
        seen: dict[int, tuple[int, float, float]] = {}
        async for i, v in h:
            assert i not in seen
            seen[i] = v
            c.consumed += 1
        assert h.done()
    assert sorted(seen) == list(range(n)) and all(seen[i][0] == i for i in seen)
    assert c.pulls == n
    assert max(c.ahead) <= window + 1, c.ahead
    assert max_overlap([(t0, t1) for _, t0, t1 in seen.values()]) <= window


@pytest.mark.anyio
async def test_window_await_gives_the_eager_list_and_dict() -> None:
    async with am.daemons(2):
        eager = await am.mirai_map(helpers_mod.inc, range(37))
        c = Pulls()
        assert await am.mirai_map(helpers_mod.inc, c.gen(37), _window=4) == eager
        assert await am.mirai_map(helpers_mod.inc, c.agen(37), _window=4) == eager
        # several plain iterables zip like map(), stopping at the shortest
        assert await am.mirai_map(pow, iter(range(9)), [2] * 20, _window=2) == [
            x**2 for x in range(9)
        ]
        d = {f"k{i}": i for i in range(11)}
        want = await am.mirai_map(helpers_mod.inc, d)
        assert await am.mirai_map(helpers_mod.inc, d, _window=3) == want
        assert await am.mirai_map(helpers_mod.inc, d, _window=2, _chunksize=4) == want
        got = [kv async for kv in am.mirai_map(helpers_mod.inc, d, _window=3)]
        assert sorted(got) == sorted(want.items())
        assert await am.mirai_map(helpers_mod.inc, iter([]), _window=3) == []
        # awaiting again gives the same list; a second consumer of another kind is refused
        h = am.mirai_map(helpers_mod.inc, c.gen(5), _window=2)
        assert await h == [1, 2, 3, 4, 5] and await h == [1, 2, 3, 4, 5]
        with pytest.raises(RuntimeError, match="consumed once"):
            async for _ in h:
                pass


def test_window_result_from_sync_code_with_a_generator() -> None:
    c = Pulls()
    with am.daemons(4):
        h = am.mirai_map(stamp, c.gen(16), _window=2)
        out = h.result(60)
        assert [v[0] for v in out] == list(range(16))
        assert max_overlap([(t0, t1) for _, t0, t1 in out]) <= 2
        assert h.result() is out
        ah = am.mirai_map(helpers_mod.inc, Pulls().agen(3), _window=2)
        with pytest.raises(TypeError, match="await"):
            ah.result(5)


@pytest.mark.anyio
async def test_window_without_a_consumer_reads_only_the_first_window() -> None:
    c = Pulls()
    async with am.daemons(2):
        h = am.mirai_map(helpers_mod.inc, c.gen(10), _window=3)
        first = h.mirai
        assert c.pulls == 3 and len(first) == 3
        assert await am.collect(first) == [1, 2, 3]
        assert c.pulls == 3 and not h.done()  # resolved, but nobody asked for more
        assert await h == list(range(1, 11))
        assert c.pulls == 10 and h.done()


@pytest.mark.anyio
@pytest.mark.parametrize("source", ["generator", "async generator"])
async def test_window_with_chunks_counts_chunks(source: str) -> None:
    n, window, chunk = 40, 2, 3
    c = Pulls()
    async with am.daemons(4):
        src = c.gen(n) if source == "generator" else c.agen(n)
        h = am.mirai_map(stamp, src, _window=window, _chunksize=chunk)
        if source == "generator":
            assert c.pulls == window * chunk
        seen: dict[int, tuple[int, float, float]] = {}
        async for i, v in h:
            assert i not in seen
            seen[i] = v
            c.consumed += 1
    assert sorted(seen) == list(range(n)) and all(seen[i][0] == i for i in seen)
    assert max(c.ahead) <= (window + 1) * chunk, c.ahead
    # the elements of a chunk run one after another: group them back into tasks
    tasks = [(seen[s][1], seen[min(s + chunk, n) - 1][2]) for s in range(0, n, chunk)]
    assert max_overlap(tasks) <= window


@pytest.mark.anyio
@pytest.mark.parametrize("chunksize", [None, 2])
async def test_window_stop_stops_reading_and_cancels_what_is_in_flight(
    chunksize: int | None,
) -> None:
    c = Pulls()
    window = 4
    async with am.daemons(2):
        src = c.gen(1000)
        h = am.mirai_map(fail_first, src, _window=window, _stop=True, _chunksize=chunksize)
        with pytest.raises(am.MiraiError, match="bad 0"):
            await h
        in_flight = h.mirai
        pulls = c.pulls
        # element 0 fails at once and the others take 0.5 s each: reading stopped within
        # a window or two of the start, and what was submitted is cancelled
        assert pulls <= 4 * window * (chunksize or 1)
        assert all(m.done() for m in in_flight)
        assert sum(m.cancelled() for m in in_flight) >= len(in_flight) - 2
        with pytest.raises(am.MiraiError, match="bad 0"):
            await h  # the outcome is kept
        assert c.pulls == pulls
        assert next(src) == pulls  # the rest of the source was left unread


@pytest.mark.anyio
async def test_window_errors_in_place_and_breaking_out_cancels() -> None:
    async with am.daemons(2):
        out = await am.mirai_map(fail_first, iter(range(3)), _window=2)
        assert isinstance(out[0], am.MiraiError) and out[1:] == [1, 2]
        c = Pulls()
        h = am.mirai_map(stamp, c.gen(100), _window=3, seconds=0.2)
        agen = h.__aiter__()
        async for _ in agen:
            break
        await agen.aclose()  # what `break` leads to once the generator is collected
        pulls = c.pulls
        assert pulls == 3 + 1  # the first window, and the one read before the yield
        assert all(m.done() for m in h.mirai)
        assert c.pulls == pulls


def test_window_progress_counts_without_a_total(capsys: pytest.CaptureFixture[str]) -> None:
    with am.daemons(2):
        c = Pulls()
        h = am.mirai_map(helpers_mod.inc, c.gen(20), _window=3, _progress=True)
        assert h.result(60) == list(range(1, 21))
        err = capsys.readouterr().err
        assert re.search(r"mirai_map: 20task", err), err
        assert "20/" not in err  # no total: a generator has no length
        h = am.mirai_map(helpers_mod.inc, list(range(20)), _window=3, _chunksize=4, _progress=True)
        assert h.result(60) == list(range(1, 21))
        assert "20/20" in capsys.readouterr().err
        assert len(h) == 20


@pytest.mark.parametrize("bad", [0, -1, 2.5, "4", True, [4]])
def test_window_must_be_a_positive_int(bad: Any) -> None:
    c = Pulls()
    with pytest.raises(ValueError, match="_window must be a positive int"):
        am.mirai_map(helpers_mod.inc, c.gen(5), _window=bad)
    assert c.pulls == 0


def test_async_iterables_need_a_window() -> None:
    with am.daemons(1):
        with pytest.raises(TypeError, match="_window"):
            am.mirai_map(helpers_mod.inc, Pulls().agen(3))
        with pytest.raises(TypeError, match="zip"):
            am.mirai_map(pow, Pulls().agen(3), [2, 2, 2], _window=2)


def nbytes(x: bytes) -> int:
    return len(x)


@pytest.mark.anyio
async def test_window_waits_for_room_in_a_memory_budget() -> None:
    # On a loop thread mirai() refuses to block on a full budget (QueueFull); a windowed
    # map keeps what it read and submits it with `await am.submit` when consumed.
    async with am.daemons(2, memory=30_000):
        c = Pulls()
        src = (b"x" * 20_000 for _ in c.gen(12))
        assert await am.mirai_map(nbytes, src, _window=4) == [20_000] * 12
        assert c.pulls == 12
