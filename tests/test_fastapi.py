"""examples/fastapi_app.py under FastAPI's TestClient and under httpx.AsyncClient.

TestClient runs the app (and its lifespan, hence the dispatcher) on an event loop in a
portal thread; httpx.AsyncClient + ASGITransport runs it on the test's own loop.

The tracing tests load fresh copies of the example with ``OTEL_*`` variables set, as a
deployment would start it.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, asynccontextmanager, contextmanager
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


def load_app_module(name: str = MODULE_NAME, env: dict[str, str] | None = None) -> ModuleType:
    """The example imported as module ``name`` (once), with exactly the ``OTEL_*``
    variables of ``env`` set while it is imported (none by default: a developer's
    environment must not turn tracing on for the plain tests)."""
    mod = sys.modules.get(name)
    if mod is not None:
        return mod
    spec = importlib.util.spec_from_file_location(name, APP_PATH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        with pytest.MonkeyPatch.context() as mp:
            for var in [v for v in os.environ if v.startswith("OTEL_")]:
                mp.delenv(var)
            for var, value in (env or {}).items():
                mp.setenv(var, value)
            spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[name]
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
    """After the cancels, the same daemons are idle: the running jobs were interrupted,
    not killed after cancel_grace and replaced (no respawn, the same pids)."""
    deadline = time.monotonic() + 30
    while (st := status())["executing"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert st["executing"] == 0 and st["awaiting"] == 0, st
    assert st["info"]["respawned"] == 0, f"a cancelled job's daemon was killed: {st}"
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
    # the daemons were interrupted, not killed: a new request is served
    assert client.get("/square/7").json()["square"] == 49
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
        with anyio.fail_after(30):
            while (st := (await c.get("/status")).json())["executing"]:
                await anyio.sleep(0.02)
        assert st["info"]["respawned"] == 0, f"a cancelled job's daemon was killed: {st}"
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


# -- optional tracing --------------------------------------------------------------------
def _reset_tracer_provider() -> None:
    """Forget the global tracer provider (as tests/test_otel.py does), so the next test
    can set one and the rest of the session runs without one."""
    from opentelemetry import trace
    from opentelemetry.util._once import Once

    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace._TRACER_PROVIDER = None


@pytest.fixture
def spans() -> Iterator[Any]:
    """The SDK's in-memory exporter behind the global tracer provider."""
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from asyncmirai import _otel

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    _reset_tracer_provider()
    trace.set_tracer_provider(provider)
    try:
        yield exporter
    finally:
        _reset_tracer_provider()
        provider.shutdown()
    assert not _otel.RECORDS, "a traced task was never resolved"


@contextmanager
def fresh_example(name: str, env: dict[str, str]) -> Iterator[ModuleType]:
    """A copy of the example imported under ``name`` with ``env`` set; dropped after."""
    full = f"{MODULE_NAME}_{name}"
    try:
        yield load_app_module(full, env)
    finally:
        sys.modules.pop(full, None)


#: what opens the request spans -> the instrumentation scope of those spans
REQUEST_SCOPES = {
    "fastapi": "fastapi",
    "opentelemetry-instrumentation-fastapi": "opentelemetry.instrumentation.fastapi",
    "middleware": f"{MODULE_NAME}_traced_middleware",
}


@pytest.fixture(params=list(REQUEST_SCOPES))
def traced_example(request: pytest.FixtureRequest, spans: Any) -> Iterator[ModuleType]:
    """The example started with ``OTEL_TRACES_EXPORTER`` set while a tracer provider is
    already set (it keeps that one).  Its requests are traced by FastAPI's own telemetry
    where it has one, else by ``opentelemetry-instrumentation-fastapi``, else by the
    example's middleware; the later choices are forced by hiding the earlier ones."""
    how = request.param
    with ExitStack() as stack:
        with pytest.MonkeyPatch.context() as mp:  # undone once the example is imported
            if how == "fastapi":
                pytest.importorskip("fastapi.telemetry")
            else:
                mp.setitem(sys.modules, "fastapi.telemetry", None)  # as in older FastAPI
            if how == "opentelemetry-instrumentation-fastapi":
                pytest.importorskip("opentelemetry.instrumentation.fastapi")
            if how == "middleware":
                mp.setitem(sys.modules, "opentelemetry.instrumentation.fastapi", None)
            name = f"traced_{how.replace('-', '_')}"
            mod = stack.enter_context(fresh_example(name, {"OTEL_TRACES_EXPORTER": "console"}))
        assert mod.TRACING == how
        assert mod.TRACER_PROVIDER is None  # the provider already set is used, not replaced
        yield mod


def _chain(span: Any, by_id: dict[int, Any]) -> list[Any]:
    """``span``'s ancestors among the finished spans, nearest first."""
    out = []
    while span.parent is not None and span.parent.span_id in by_id:
        span = by_id[span.parent.span_id]
        out.append(span)
    return out


def test_request_span_contains_the_task_spans(traced_example: ModuleType, spans: Any) -> None:
    from fastapi.testclient import TestClient
    from opentelemetry.trace import SpanKind

    caller_trace, caller_span = 0x5CE17A5CE17A5CE17A5CE17A5CE17A5C, 0x0123456789ABCDEF
    traceparent = f"00-{caller_trace:032x}-{caller_span:016x}-01"
    with TestClient(traced_example.app) as c:
        assert c.get("/square/7", headers={"traceparent": traceparent}).json()["square"] == 49
        assert c.get("/fetch/3", params={"delay": 0.01}).json() == {"n": 3, "sum": 3}
    finished = list(spans.get_finished_spans())
    by_id = {s.context.span_id: s for s in finished}
    names = [(s.name, s.instrumentation_scope.name) for s in finished]
    scope = REQUEST_SCOPES[traced_example.TRACING]

    def server(route: str) -> Any:
        """The request's span, from the instrumentation the example chose."""
        found = [
            s
            for s in finished
            if s.kind == SpanKind.SERVER
            and s.instrumentation_scope.name == scope
            and s.name == f"GET {route}"
        ]
        assert len(found) == 1, names
        attrs = dict(found[0].attributes or {})
        assert attrs["http.route"] == route
        # (the instrumentation package uses the older name unless told otherwise)
        assert attrs.get("http.response.status_code", attrs.get("http.status_code")) == 200
        return found[0]

    def host_spans(name: str) -> list[Any]:
        return [
            s for s in finished if s.name == name and s.instrumentation_scope.name == "asyncmirai"
        ]

    def inside(inner: Any, outer: Any) -> None:
        assert inner.context.trace_id == outer.context.trace_id
        assert outer in _chain(inner, by_id), (inner.name, [a.name for a in _chain(inner, by_id)])
        assert outer.start_time <= inner.start_time and inner.end_time <= outer.end_time

    # /square/7: the request continues the caller's trace; the mirai's span is inside it
    request = server("/square/{x}")
    assert request.context.trace_id == caller_trace
    assert request.parent is not None and request.parent.span_id == caller_span
    [square] = host_spans("square")
    assert square.kind == SpanKind.CLIENT
    inside(square, request)
    attrs = dict(square.attributes or {})
    assert attrs["asyncmirai.outcome"] == "value" and attrs["asyncmirai.daemon.pid"] > 0

    # /fetch/3: a new trace; request > "mirai_map fetch" > one "fetch" per task (chunk)
    request = server("/fetch/{n}")
    assert request.context.trace_id != caller_trace
    [group] = host_spans("mirai_map fetch")
    inside(group, request)
    fetches = host_spans("fetch")
    assert fetches, names
    for s in fetches:
        inside(s, request)
        assert s.parent is not None and s.parent.span_id == group.context.span_id
        assert dict(s.attributes or {})["asyncmirai.compute"] == "io"
    assert len(host_spans("square") + host_spans("mirai_map fetch") + fetches) == len(
        [s for s in finished if s.instrumentation_scope.name == "asyncmirai"]
    ), names


@pytest.mark.parametrize("asked", ["console", "otlp"])
def test_console_exporter_when_no_provider_is_set(
    asked: str, capsys: Any, caplog: Any, monkeypatch: Any
) -> None:
    """No provider set: the example makes one from the ``OTEL_*`` variables and flushes
    it when the app shuts down.  Spans go to stdout when the console exporter is asked
    for, or OTLP is but ``opentelemetry-exporter-otlp`` is not installed (hidden here)."""
    pytest.importorskip("opentelemetry.sdk")
    from fastapi.testclient import TestClient
    from opentelemetry import trace

    if asked == "console":
        env = {"OTEL_TRACES_EXPORTER": "console"}
    else:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}  # never dialled
        for proto in ("http", "grpc"):
            exporter = f"opentelemetry.exporter.otlp.proto.{proto}.trace_exporter"
            monkeypatch.setitem(sys.modules, exporter, None)
    _reset_tracer_provider()
    try:
        with fresh_example(f"console_{asked}", env) as mod:
            provider: Any = mod.TRACER_PROVIDER
            assert provider is not None
            assert trace.get_tracer_provider() is mod.TRACER_PROVIDER
            with TestClient(mod.app) as c:
                assert c.get("/square/7").json()["square"] == 49
            out = capsys.readouterr().out  # the lifespan's exit flushed the batch
            provider.shutdown()
    finally:
        _reset_tracer_provider()
    assert '"name": "GET /square/{x}"' in out, out
    assert '"name": "square"' in out, out
    assert '"service.name": "asyncmirai-fastapi"' in out, out
    warned = "opentelemetry-exporter-otlp is not installed" in caplog.text
    assert warned == (asked == "otlp"), caplog.text


def test_works_without_the_opentelemetry_sdk() -> None:
    """OTEL_* set, but the SDK cannot be imported (a process where it is blocked; recent
    FastAPI versions need ``opentelemetry-api`` themselves): the app serves, untraced."""
    code = (
        "import importlib.util, sys\n"
        "sys.modules['opentelemetry.sdk'] = None\n"  # import opentelemetry.sdk -> ImportError
        f"spec = importlib.util.spec_from_file_location('fastapi_app', {APP_PATH!r})\n"
        "mod = importlib.util.module_from_spec(spec)\n"
        "sys.modules['fastapi_app'] = mod\n"
        "spec.loader.exec_module(mod)\n"
        "assert mod.TRACING is None and mod.TRACER_PROVIDER is None\n"
        "from fastapi.testclient import TestClient\n"
        "with TestClient(mod.app) as c:\n"
        "    assert c.get('/square/5').json()['square'] == 25\n"
        "import asyncmirai as am\n"
        "assert not am.daemons_set()\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["OTEL_EXPORTER_OTLP_ENDPOINT"] = "http://127.0.0.1:9"  # never dialled
    r = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=90
    )
    assert r.returncode == 0, r.stderr
    assert "opentelemetry-sdk is not installed" in r.stderr
