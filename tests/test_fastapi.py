"""examples/fastapi_app.py under FastAPI's TestClient and under httpx.AsyncClient.

TestClient runs the app (and its lifespan, hence the dispatcher) on an event loop in a
portal thread; httpx.AsyncClient + ASGITransport runs it on the test's own loop.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from types import ModuleType
from typing import Any

import pytest

fastapi = pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`"),
]

APP_PATH = os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples", "fastapi_app.py")
MODULE_NAME = "asyncmirai_example_fastapi_app"


def load_app_module() -> ModuleType:
    mod = sys.modules.get(MODULE_NAME)
    if mod is not None:
        return mod
    spec = importlib.util.spec_from_file_location(MODULE_NAME, APP_PATH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[MODULE_NAME] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[MODULE_NAME]
        raise
    return mod


@pytest.fixture(scope="module")
def example() -> ModuleType:
    return load_app_module()


# -- sync: TestClient ------------------------------------------------------------------
@pytest.fixture
def client(example: ModuleType) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    with TestClient(example.app) as c:
        yield c
    import asyncmirai as am

    assert not am.daemons_set(), "the app's shutdown left the profile set"


def poll_until(get: Any, job_id: str, states: set[str], timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        r = get(f"/jobs/{job_id}")
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        if body["status"] in states:
            return body
        assert time.monotonic() < deadline, f"job stuck in {body}"
        time.sleep(0.02)


def wait_connected(get: Any) -> list[int]:
    deadline = time.monotonic() + 30
    while (st := get("/status").json())["connections"] < 2:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return list(st["pids"])


def settled(status: Any, pids: list[int]) -> None:
    """After the cancels, the same daemons are idle well within cancel_grace (2 s): the
    running jobs were interrupted, not killed and replaced."""
    deadline = time.monotonic() + 1.5
    while (st := status())["executing"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert st["executing"] == 0 and st["awaiting"] == 0, st
    assert st["connections"] == 2 and st["pids"] == pids, (
        f"a cancelled job's daemon was killed instead of interrupted: {pids} -> {st}"
    )


def test_square(client: Any) -> None:
    r = client.get("/square/12")
    assert r.status_code == 200
    assert r.json() == {"x": 12, "square": 144}
    # many at once
    for x in range(20):
        assert client.get(f"/square/{x}").json()["square"] == x * x


def test_job_submit_poll_done(client: Any) -> None:
    r = client.post("/jobs", json={"seconds": 0.3, "value": 21})
    assert r.status_code == 202
    job_id = r.json()["id"]
    first = client.get(f"/jobs/{job_id}").json()
    assert first["status"] in {"pending", "running"}
    assert first["result"] is None
    body = poll_until(client.get, job_id, {"done", "error", "cancelled"})
    assert body["status"] == "done", body
    assert body["result"]["value"] == 21
    assert body["result"]["doubled"] == 42
    assert body["result"]["pid"] != os.getpid()  # it ran on a daemon
    assert body["error"] is None


def test_job_error(client: Any) -> None:
    job_id = client.post("/jobs", json={"seconds": 0.0, "value": -1}).json()["id"]
    body = poll_until(client.get, job_id, {"done", "error", "cancelled"})
    assert body["status"] == "error"
    assert body["error"].startswith("ValueError")
    assert "non-negative" in body["error"]


def test_job_unknown(client: Any) -> None:
    assert client.get("/jobs/nope").status_code == 404
    assert client.delete("/jobs/nope").status_code == 404


def test_job_cancel_frees_daemon(client: Any) -> None:
    # occupy both daemons with long jobs, and queue a third
    pids = wait_connected(client.get)
    ids = [client.post("/jobs", json={"seconds": 60, "value": i}).json()["id"] for i in range(3)]
    for job_id in ids[:2]:
        poll_until(client.get, job_id, {"running"})
    assert client.get(f"/jobs/{ids[2]}").json()["status"] == "pending"
    for job_id in ids:
        r = client.delete(f"/jobs/{job_id}")
        assert r.status_code == 200
        assert r.json()["status"] == "cancelled"
    for job_id in ids:
        assert client.get(f"/jobs/{job_id}").json()["status"] == "cancelled"
    # the daemons were interrupted, not killed: a new request is served at once
    t0 = time.monotonic()
    assert client.get("/square/7").json()["square"] == 49
    assert time.monotonic() - t0 < 10
    settled(lambda: client.get("/status").json(), pids)
    # cancelling a finished job changes nothing
    assert client.delete(f"/jobs/{ids[0]}").json()["status"] == "cancelled"


def test_shutdown_resets(example: ModuleType) -> None:
    from fastapi.testclient import TestClient

    import asyncmirai as am

    with TestClient(example.app) as c:
        job_id = c.post("/jobs", json={"seconds": 60, "value": 1}).json()["id"]
        poll_until(c.get, job_id, {"running"})
        m = example.app.state.jobs[job_id]
    # the lifespan exited: profile reset, the unfinished job failed with DaemonError
    assert not am.daemons_set()
    assert m.done()
    assert isinstance(m.exception(), am.DaemonError)


# -- async: httpx.AsyncClient + ASGITransport, lifespan driven by hand ----------------
@asynccontextmanager
async def async_client(app: Any) -> AsyncIterator[Any]:
    # ASGITransport does not send lifespan events: run the app's lifespan ourselves.
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            yield c


async def apoll_until(c: Any, job_id: str, states: set[str], timeout: float = 30.0) -> Any:
    import anyio

    with anyio.fail_after(timeout):
        while True:
            body = (await c.get(f"/jobs/{job_id}")).json()
            if body["status"] in states:
                return body
            await anyio.sleep(0.02)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_async_square(example: ModuleType, anyio_backend: str) -> None:
    import anyio

    async with async_client(example.app) as c:
        r = await c.get("/square/9")
        assert r.json() == {"x": 9, "square": 81}
        results: dict[int, int] = {}

        async def one(x: int) -> None:
            results[x] = (await c.get(f"/square/{x}")).json()["square"]

        async with anyio.create_task_group() as tg:  # concurrent requests
            for x in range(30):
                tg.start_soon(one, x)
        assert results == {x: x * x for x in range(30)}
    import asyncmirai as am

    assert not am.daemons_set()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_async_jobs(example: ModuleType, anyio_backend: str) -> None:
    import anyio

    async with async_client(example.app) as c:
        r = await c.post("/jobs", json={"seconds": 0.2, "value": 5})
        assert r.status_code == 202
        done_id = r.json()["id"]
        body = await apoll_until(c, done_id, {"done", "error", "cancelled"})
        assert body["status"] == "done" and body["result"]["doubled"] == 10

        while (st := (await c.get("/status")).json())["connections"] < 2:
            await anyio.sleep(0.02)
        pids = st["pids"]
        long_ids = [
            (await c.post("/jobs", json={"seconds": 60, "value": i})).json()["id"] for i in range(2)
        ]
        for job_id in long_ids:
            await apoll_until(c, job_id, {"running"})
        for job_id in long_ids:
            assert (await c.delete(f"/jobs/{job_id}")).json()["status"] == "cancelled"
            assert (await c.get(f"/jobs/{job_id}")).json()["status"] == "cancelled"
        with anyio.fail_after(10):  # both daemons are free again
            assert (await c.get("/square/8")).json()["square"] == 64
            assert (await c.get("/square/3")).json()["square"] == 9
        with anyio.fail_after(1.5):  # well within cancel_grace (2 s)
            while (st := (await c.get("/status")).json())["executing"]:
                await anyio.sleep(0.02)
        assert st["connections"] == 2 and st["pids"] == pids, (
            f"a cancelled job's daemon was killed instead of interrupted: {pids} -> {st}"
        )


def test_full_budget_answers_503_with_retry_after(example: ModuleType, monkeypatch: Any) -> None:
    from fastapi.testclient import TestClient

    monkeypatch.setattr(example, "MEMORY", 30_000)
    monkeypatch.setattr(example, "SUBMIT_WAIT", 0.2)
    payload = "p" * 20_000
    with TestClient(example.app) as c:
        wait_connected(c.get)
        busy = [c.post("/jobs", json={"seconds": 60, "value": i}).json()["id"] for i in range(2)]
        for job_id in busy:
            poll_until(c.get, job_id, {"running"})
        queued = c.post("/jobs", json={"seconds": 0, "value": 1, "payload": payload})
        assert queued.status_code == 202  # the queue was empty: admitted
        full = c.post("/jobs", json={"seconds": 0, "value": 2, "payload": payload})
        assert full.status_code == 503
        assert full.headers["Retry-After"] == "1"
        st = c.get("/status").json()
        assert st["memory"]["capacity"] == 30_000
        assert st["info"]["submitted"] == 3  # the refused job was never submitted
        for job_id in busy:
            c.delete(f"/jobs/{job_id}")
        body = poll_until(c.get, queued.json()["id"], {"done", "error"})
        assert body["status"] == "done" and body["result"]["value"] == 1
        ok = c.post("/jobs", json={"seconds": 0, "value": 3, "payload": payload})
        assert ok.status_code == 202


def test_fetch_runs_async_tasks_on_the_io_profile(client: Any) -> None:
    r = client.get("/fetch/20", params={"delay": 0.01})
    assert r.json() == {"n": 20, "sum": sum(range(20))}
