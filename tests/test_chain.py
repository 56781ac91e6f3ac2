"""Futures as arguments: an unresolved Mirai anywhere in a task's arguments makes the task
wait for it; the function gets the value, or the task fails with the upstream error."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import pytest

import asyncmirai as am

pytestmark = pytest.mark.timeout(60)


@dataclasses.dataclass
class Box:
    inner: object


def gated(gate: str, value: object) -> object:
    deadline = time.monotonic() + 30
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.005)
    return value


def total(xs: object) -> int:
    if isinstance(xs, dict):
        return sum(total(v) for v in xs.values())
    if isinstance(xs, (list, tuple)):
        return sum(total(v) for v in xs)
    if isinstance(xs, Box):
        return total(xs.inner)
    assert isinstance(xs, int), f"got {xs!r} instead of a value"
    return xs


def fail(msg: str) -> None:
    raise KeyError(msg)


@pytest.fixture(params=[False, True], ids=["daemons", "sync"])
def sync(request: pytest.FixtureRequest) -> object:
    with am.daemons(2, sync=request.param):
        yield request.param


def test_three_deep_across_containers(tmp_path: Path, sync: bool) -> None:
    gate = str(tmp_path / "gate")
    if sync:
        open(gate, "w").close()
    a = am.mirai(gated, gate, 1)
    b = am.mirai(total, {"a": a, "more": [a, (2, a)]})  # waits for a
    c = am.mirai(total, [b, Box({"x": b}), a])  # waits for b (and a)
    assert b.state in ("queued", "done") and c.state in ("queued", "done")
    open(gate, "w").close()
    assert b.result(30) == 1 + 1 + 2 + 1
    assert c.result(30) == 5 + 5 + 1


def test_upstream_error_propagates_with_its_type(sync: bool) -> None:
    a = am.mirai(fail, "nope")
    b = am.mirai(total, [a])
    c = am.mirai(total, {"k": b})
    for h in (b, c):
        with pytest.raises(KeyError) as info:
            h.result(30)
        assert isinstance(info.value, am.MiraiError)
        chain = []
        e: BaseException | None = info.value
        while e is not None:
            chain.append(e)
            e = e.__cause__
        assert any("nope" in str(x) for x in chain)
    assert "argument mirai" in str(c.exception())


def test_cancelling_upstream_fails_downstream(tmp_path: Path) -> None:
    with am.daemons(1):
        gate = str(tmp_path / "gate")
        a = am.mirai(gated, gate, 1)
        b = am.mirai(total, [a])
        a.cancel()
        with pytest.raises(am.MiraiCancelled):
            b.result(30)
        # b was not cancelled itself: it failed, and exception() returns that error
        assert not b.cancelled()
        err = b.exception(30)
        assert isinstance(err, am.MiraiCancelled) and isinstance(err, am.MiraiError)
        # a third link takes b's failure as its own, not an exception at mirai() time
        c = am.mirai(total, [b])
        assert isinstance(c.exception(30), am.MiraiError)
        with pytest.raises(am.MiraiCancelled):
            a.exception(30)  # the one that was cancelled
        open(gate, "w").close()


def test_cancelling_the_waiting_task_never_runs_it(tmp_path: Path) -> None:
    with am.daemons(1):
        gate = str(tmp_path / "gate")
        marker = tmp_path / "ran"
        a = am.mirai(gated, gate, 1)
        b = am.mirai(lambda x, p: open(p, "w").close(), a, str(marker))
        assert b.cancel()
        open(gate, "w").close()
        assert a.result(30) == 1
        assert am.mirai(total, [a]).result(30) == 1
        assert not marker.exists()


@pytest.mark.anyio
async def test_submit_and_map_elements_wait_for_handles(tmp_path: Path) -> None:
    async with am.daemons(2):
        gate = str(tmp_path / "gate")
        ups = [am.mirai(gated, gate, i) for i in range(4)]
        down = await am.submit(total, ups)
        mapped = am.mirai_map(total, [[u] for u in ups])
        open(gate, "w").close()
        assert await down == 6
        assert await mapped == [0, 1, 2, 3]


def test_a_pending_handle_cannot_be_pickled_elsewhere(tmp_path: Path) -> None:
    import pickle

    with am.daemons(1):
        gate = str(tmp_path / "gate")
        a = am.mirai(gated, gate, 1)
        with pytest.raises(TypeError, match="no value to send"):
            pickle.dumps(a)
        open(gate, "w").close()
        a.result(30)
        assert pickle.loads(pickle.dumps(a)) == 1  # a resolved handle is its value
