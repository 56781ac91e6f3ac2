"""Profile scope: am.using, am.require_daemons, am.on_daemon."""

from __future__ import annotations

import os

import anyio
import pytest

import asyncmirai as am

pytestmark = pytest.mark.timeout(60)


def where_x(x: int) -> tuple[int, bool]:
    return where()


def where() -> tuple[int, bool]:
    import asyncmirai

    return os.getpid(), asyncmirai.on_daemon()


def test_using_sets_the_default_profile_for_a_block() -> None:
    with am.daemons(1), am.daemons(1, compute="gpu"):
        (default_pid,) = [r.pid for r in am.status().daemons] or [None]
        with am.using("gpu"):
            pid, on = am.mirai(where).result(30)
            assert on and pid != os.getpid()
            assert am.daemons_set() and am.status().url == am.status("gpu").url
            assert am.everywhere(where).result(30) == [(pid, True)]
            assert am.mirai_map(where_x, range(3)).result(30) == [(pid, True)] * 3
            assert am.info()["submitted"] >= 2
            assert am.executor().submit(where).result(30) == (pid, True)
        assert am.status().url != am.status("gpu").url
        other, _ = am.mirai(where).result(30)
        assert other != pid
        with am.using("nothing-here"):
            with pytest.raises(RuntimeError, match="compute='nothing-here'"):
                am.mirai(where)
            assert not am.daemons_set()
    del default_pid


@pytest.mark.anyio
async def test_using_follows_the_task_not_the_thread() -> None:
    async with am.daemons(1, compute="a"), am.daemons(1, compute="b"):
        pids: dict[str, int] = {}

        async def run(name: str) -> None:
            with am.using(name):
                await anyio.sleep(0)  # interleave with the other task
                pids[name] = (await am.mirai(where))[0]

        async with anyio.create_task_group() as tg:
            tg.start_soon(run, "a")
            tg.start_soon(run, "b")
        rows = {n: am.status(n).daemons[0].pid for n in "ab"}
        assert pids == rows


def test_require_daemons_and_on_daemon() -> None:
    with pytest.raises(RuntimeError, match="no daemons are set"):
        am.require_daemons()
    assert not am.on_daemon()
    with am.daemons(1):
        am.require_daemons()
        assert am.mirai(where).result(30)[1] is True
        with pytest.raises(RuntimeError, match="gpu"):
            am.require_daemons("gpu")
    with am.daemons(sync=True):
        assert am.mirai(where).result(30) == (os.getpid(), True)
    assert not am.on_daemon()


def test_using_rejects_bad_names() -> None:
    with pytest.raises(ValueError):
        with am.using(""):
            pass
