"""OpenTelemetry tracing and metrics with real daemons (the SDK's in-memory exporter and
reader on the host; a file exporter on the daemons, set up through ``everywhere()``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import asyncmirai as am
from asyncmirai import _otel

pytest.importorskip("opentelemetry.sdk")

from opentelemetry import metrics, trace  # noqa: E402
from opentelemetry.sdk.metrics import MeterProvider  # noqa: E402
from opentelemetry.sdk.metrics.export import InMemoryMetricReader  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)

pytestmark = pytest.mark.timeout(60)

HERE = os.path.dirname(os.path.abspath(__file__))


# -- on the daemons ---------------------------------------------------------------------
def setup_daemon_tracing(path: str) -> int:
    """everywhere(): a tracer provider whose spans are appended to ``path`` as JSON
    lines, synchronously at span end (so before the task's result is sent)."""
    from opentelemetry import trace as t
    from opentelemetry.sdk.trace import TracerProvider as TP
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor as SSP
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    class FileExporter(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            with open(path, "a") as f:
                for s in spans:
                    parent = s.parent.span_id if s.parent is not None else None
                    f.write(
                        json.dumps(
                            {
                                "name": s.name,
                                "trace_id": s.context.trace_id,
                                "span_id": s.context.span_id,
                                "parent": parent,
                                "attributes": dict(s.attributes or {}),
                                "pid": os.getpid(),
                                "start": s.start_time,
                                "end": s.end_time,
                            }
                        )
                        + "\n"
                    )
            return SpanExportResult.SUCCESS

    provider = TP()
    provider.add_span_processor(SSP(FileExporter()))
    t.set_tracer_provider(provider)
    return os.getpid()


def traced_work(x: int) -> int:
    """A task that opens a span of its own."""
    from opentelemetry import trace as t

    with t.get_tracer("user").start_as_current_span("inner") as span:
        span.set_attribute("x", x)
        return os.getpid()


async def traced_async_work(x: int, gate: str) -> int:
    """A coroutine task that opens a span of its own, then waits for ``gate`` (so the
    test sees several of them in flight on one daemon at once)."""
    import asyncio

    from opentelemetry import trace as t

    with t.get_tracer("user").start_as_current_span("inner async") as span:
        span.set_attribute("x", x)
        while not os.path.exists(gate):
            await asyncio.sleep(0.005)
        return x


def noop() -> int:
    return os.getpid()


def double(x: int) -> int:
    return 2 * x


def wait_for(path: str) -> str:
    """Block until ``path`` exists (the test creates it), then return."""
    import time

    while not os.path.exists(path):
        time.sleep(0.01)
    return "done"


def read_daemon_spans(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


# -- on the host --------------------------------------------------------------------------
class Telemetry:
    def __init__(self) -> None:
        self.spans = InMemorySpanExporter()
        self.reader = InMemoryMetricReader()

    def finished(self) -> list[Any]:
        return list(self.spans.get_finished_spans())

    def by_name(self, name: str) -> list[Any]:
        return [s for s in self.finished() if s.name == name]

    def metric_points(self, name: str) -> list[Any]:
        data = self.reader.get_metrics_data()
        out: list[Any] = []
        if data is None:
            return out
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    if m.name == name:
                        out.extend(m.data.data_points)
        return out


def _reset_globals() -> None:
    from opentelemetry.metrics import _internal as metrics_internal
    from opentelemetry.util._once import Once

    trace._TRACER_PROVIDER_SET_ONCE = Once()  # type: ignore[attr-defined]
    trace._TRACER_PROVIDER = None  # type: ignore[attr-defined]
    metrics_internal._METER_PROVIDER_SET_ONCE = Once()
    metrics_internal._METER_PROVIDER = None


@pytest.fixture(scope="module")
def telemetry_global() -> Iterator[Telemetry]:
    tel = Telemetry()
    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(tel.spans))
    mp = MeterProvider(metric_readers=[tel.reader])
    _reset_globals()
    trace.set_tracer_provider(tp)
    metrics.set_meter_provider(mp)
    yield tel
    _reset_globals()  # the rest of the test session runs without providers
    tp.shutdown()
    mp.shutdown()


@pytest.fixture
def tel(telemetry_global: Telemetry) -> Iterator[Telemetry]:
    telemetry_global.spans.clear()
    yield telemetry_global
    assert not _otel.RECORDS, "a traced task was never resolved"


def _done(tel: Telemetry, name: str, n: int = 1) -> list[Any]:
    """The finished host spans called ``name`` (a span ends in the handle's done
    callback, which runs before any waiter wakes)."""
    spans = tel.by_name(name)
    assert len(spans) == n, [s.name for s in tel.finished()]
    return spans


# -- tests ----------------------------------------------------------------------------------
def test_one_trace_from_the_caller_to_the_users_span_on_the_daemon(
    tel: Telemetry, tmp_path: Path
) -> None:
    path = tmp_path / "daemon-spans.jsonl"
    with am.daemons(1):
        [dpid] = am.everywhere(setup_daemon_tracing, str(path)).result(30)
        tracer = trace.get_tracer("test")
        with tracer.start_as_current_span("request") as request:
            assert am.mirai(traced_work, 7).result(30) == dpid
    [host] = _done(tel, "traced_work")
    assert host.parent is not None and host.parent.span_id == request.get_span_context().span_id
    trace_id = request.get_span_context().trace_id
    assert host.context.trace_id == trace_id
    assert host.kind == trace.SpanKind.CLIENT
    attrs = dict(host.attributes or {})
    assert attrs["asyncmirai.outcome"] == "value"
    assert attrs["asyncmirai.compute"] == "default"
    assert attrs["code.function"] == "traced_work"
    assert attrs["asyncmirai.daemon.pid"] == dpid
    assert attrs["asyncmirai.daemon.host"]
    assert attrs["asyncmirai.bytes_out"] > 0 and attrs["asyncmirai.bytes_in"] > 0
    assert attrs["asyncmirai.queued_s"] >= 0
    assert attrs["asyncmirai.retries"] == 0
    assert isinstance(attrs["asyncmirai.task.id"], int)

    spans = {s["name"]: s for s in read_daemon_spans(path)}
    run, inner = spans["run traced_work"], spans["inner"]
    assert run["trace_id"] == trace_id and inner["trace_id"] == trace_id
    assert run["parent"] == host.context.span_id  # the daemon's span: child of the host's
    assert inner["parent"] == run["span_id"]  # the user's span: child of the daemon's
    assert run["attributes"]["asyncmirai.task.id"] == attrs["asyncmirai.task.id"]
    assert run["attributes"]["asyncmirai.outcome"] == "value"
    assert run["pid"] == dpid


def test_outcomes_error_cancel_timeout_daemon_lost(tel: Telemetry, tmp_path: Path) -> None:
    import helpers_mod

    gate = str(tmp_path / "gate")
    with am.daemons(1):
        with pytest.raises(ValueError):
            am.mirai(helpers_mod.boom, "no").result(30)
        [err] = _done(tel, "boom")
        attrs = dict(err.attributes or {})
        assert attrs["asyncmirai.outcome"] == "error"
        assert attrs["error.type"] == "ValueError"
        assert err.status.status_code == trace.StatusCode.ERROR

        m = am.mirai(wait_for, gate)
        assert m.cancel()
        [c] = _done(tel, "wait_for")
        assert dict(c.attributes or {})["asyncmirai.outcome"] == "cancelled"
        assert c.status.status_code == trace.StatusCode.UNSET

        with pytest.raises(am.MiraiTimeout):
            am.mirai(wait_for, gate, _timeout=0.2).result(30)
        [_, t] = _done(tel, "wait_for", 2)
        attrs = dict(t.attributes or {})
        assert attrs["asyncmirai.outcome"] == "timeout"
        assert attrs["error.type"] == "asyncmirai.MiraiTimeout"

        with pytest.raises(am.DaemonError):
            am.mirai(os._exit, 3).result(30)
        [lost] = _done(tel, "_exit")
        assert dict(lost.attributes or {})["asyncmirai.outcome"] == "daemon_lost"
        Path(gate).touch()


def test_retries_are_counted(tel: Telemetry, tmp_path: Path) -> None:
    import helpers_mod

    with am.daemons(1):
        assert am.mirai(helpers_mod.die_once, str(tmp_path / "flag"), _retries=1).result(30)
    [s] = _done(tel, "die_once")
    attrs = dict(s.attributes or {})
    assert attrs["asyncmirai.outcome"] == "value"
    assert attrs["asyncmirai.retries"] == 1


def test_map_and_everywhere_have_one_parent_span(tel: Telemetry, tmp_path: Path) -> None:
    path = tmp_path / "daemon-spans.jsonl"
    with am.daemons(2):
        pids = am.everywhere(setup_daemon_tracing, str(path)).result(30)
        assert am.mirai_map(double, [1, 2, 3]).result(30) == [2, 4, 6]
        [parent] = _done(tel, "mirai_map double")
        kids = _done(tel, "double", 3)
        assert all(k.parent.span_id == parent.context.span_id for k in kids)
        assert dict(parent.attributes or {})["asyncmirai.map.size"] == 3

        assert am.mirai_map(double, range(5), _chunksize=2).result(30) == [0, 2, 4, 6, 8]
        [cparent] = _done(tel, "mirai_map double", 2)[1:]
        chunks = [s for s in _done(tel, "double", 6) if s.parent.span_id == cparent.context.span_id]
        assert sorted(dict(s.attributes or {})["asyncmirai.chunk.size"] for s in chunks) == [
            1,
            2,
            2,
        ]

        tel.spans.clear()
        assert sorted(am.everywhere(noop).result(30)) == sorted(pids)
    [ev] = _done(tel, "everywhere noop")
    runs = [s for s in read_daemon_spans(path) if s["name"] == "run everywhere noop"]
    assert sorted(s["pid"] for s in runs) == sorted(pids)  # one child per daemon
    assert all(s["parent"] == ev.context.span_id for s in runs)
    assert all(s["trace_id"] == ev.context.trace_id for s in runs)


def test_windowed_map_has_one_parent_span(tel: Telemetry) -> None:
    def source() -> Iterator[int]:
        yield from range(5)

    async def agen() -> Any:
        for i in range(4):
            yield i

    async def consume() -> list[Any]:
        return [iv async for iv in am.mirai_map(double, agen(), _window=2, _chunksize=3)]

    with am.daemons(2):
        assert am.mirai_map(double, source(), _window=2).result(30) == [0, 2, 4, 6, 8]
        [parent] = _done(tel, "mirai_map double")
        kids = _done(tel, "double", 5)
        assert all(k.parent.span_id == parent.context.span_id for k in kids)
        attrs = dict(parent.attributes or {})
        assert attrs["asyncmirai.map.size"] == 5 and attrs["asyncmirai.map.window"] == 2
        assert "error.type" not in attrs

        tel.spans.clear()
        import asyncio

        assert sorted(asyncio.run(consume())) == [(0, 0), (1, 2), (2, 4), (3, 6)]
        [aparent] = _done(tel, "mirai_map double")
        chunks = _done(tel, "double", 2)  # chunks of 3 and 1
        assert all(c.parent.span_id == aparent.context.span_id for c in chunks)
        assert dict(aparent.attributes or {})["asyncmirai.map.size"] == 4

        tel.spans.clear()
        import helpers_mod

        m = am.mirai_map(helpers_mod.boom, iter(["x", "y"]), _window=1, _stop=True)
        with pytest.raises(ValueError):
            m.result(30)
        [fparent] = _done(tel, "mirai_map boom")
        assert dict(fparent.attributes or {})["error.type"] == "ValueError"


def test_coroutine_slots_trace_each_task(tel: Telemetry, tmp_path: Path) -> None:
    """``daemons(concurrency=k)``: every task, plain or coroutine, gets its run span on
    the daemon, a child of its host span, and the user's spans inside a coroutine are
    children of that task's run span (not of another coroutine running beside it)."""
    path = tmp_path / "daemon-spans.jsonl"
    gate = tmp_path / "gate"
    with am.daemons(1, concurrency=5):
        am.everywhere(setup_daemon_tracing, str(path)).result(30)
        with trace.get_tracer("test").start_as_current_span("request"):
            ms = [am.mirai(traced_async_work, i, str(gate)) for i in range(3)]
            gone = am.mirai(traced_async_work, 99, str(tmp_path / "never"))
            plain = am.mirai(traced_work, 5).result(30)  # runs while the three wait
            assert gone.cancel()
            gate.touch()
            assert [m.result(30) for m in ms] == [0, 1, 2]
        assert isinstance(plain, int)
        # the cancelled coroutine's run span is written when it stops on the daemon
        pause = threading.Event()
        for _ in range(3000):
            runs = [s for s in read_daemon_spans(path) if s["name"] == "run traced_async_work"]
            if len(runs) == 4:
                break
            pause.wait(0.01)
    hosts = {
        s.attributes["asyncmirai.task.id"]: s
        for s in tel.finished()
        if s.attributes and "asyncmirai.task.id" in s.attributes
    }
    spans = read_daemon_spans(path)
    runs = {s["attributes"]["asyncmirai.task.id"]: s for s in spans if s["name"].startswith("run ")}
    inner = [s for s in spans if s["name"] in ("inner", "inner async")]
    assert len(inner) == 5  # 3 finished coroutines, the cancelled one, the plain task
    for s in inner:
        run = next(r for r in runs.values() if r["span_id"] == s["parent"])
        host = hosts[run["attributes"]["asyncmirai.task.id"]]
        assert run["parent"] == host.context.span_id
        assert run["trace_id"] == s["trace_id"] == host.context.trace_id
        x = s["attributes"]["x"]
        assert host.name == ("traced_work" if x == 5 else "traced_async_work")
    outcomes = sorted(
        r["attributes"]["asyncmirai.outcome"]
        for r in runs.values()
        if r["name"] in ("run traced_work", "run traced_async_work")
    )
    assert outcomes == ["cancelled", "value", "value", "value", "value"]


def test_sync_mode_is_traced_in_process(tel: Telemetry) -> None:
    """``daemons(sync=True)``: the same host span per task, in the caller's trace, and
    the function's own spans (run in this process) are its children."""
    import helpers_mod

    with am.daemons(sync=True, compute="debug"):
        with trace.get_tracer("test").start_as_current_span("request") as request:
            assert am.mirai(traced_work, 3, _compute="debug").result(5) == os.getpid()
            with pytest.raises(ValueError):
                am.mirai(helpers_mod.boom, "x", _compute="debug").result(5)
    [host] = _done(tel, "traced_work")
    [inner] = _done(tel, "inner")
    assert host.parent.span_id == request.get_span_context().span_id
    assert inner.parent.span_id == host.context.span_id
    attrs = dict(host.attributes or {})
    assert attrs["asyncmirai.outcome"] == "value" and attrs["asyncmirai.compute"] == "debug"
    [err] = _done(tel, "boom")
    assert dict(err.attributes or {})["error.type"] == "ValueError"
    assert trace.get_current_span() is trace.INVALID_SPAN  # nothing left attached


def test_metrics(tel: Telemetry) -> None:
    import helpers_mod

    def value(name: str, **attrs: Any) -> Any:
        for p in tel.metric_points(name):
            if all(p.attributes.get(k) == v for k, v in attrs.items()):
                return p
        return None

    with am.daemons(1, compute="metrics"):
        [am.mirai(double, i, _compute="metrics").result(30) for i in range(4)]
        with pytest.raises(ValueError):
            am.mirai(helpers_mod.boom, "x", _compute="metrics").result(30)
        connected = value("asyncmirai.daemons.connected", **{"asyncmirai.compute": "metrics"})
        assert connected is not None and connected.value == 1
        for gauge in ("asyncmirai.tasks.queued", "asyncmirai.tasks.executing"):
            p = value(gauge, **{"asyncmirai.compute": "metrics"})
            assert p is not None and p.value == 0
    here = {"asyncmirai.compute": "metrics"}
    ok = value("asyncmirai.tasks", **here, **{"asyncmirai.outcome": "value"})
    assert ok is not None and ok.value == 4
    err = value("asyncmirai.tasks", **here, **{"asyncmirai.outcome": "error"})
    assert err is not None and err.value == 1
    wait = value("asyncmirai.task.queue_wait", **{"asyncmirai.compute": "metrics"})
    run = value("asyncmirai.task.run_time", **{"asyncmirai.compute": "metrics"})
    assert wait.count == 5 and run.count == 5


def test_gauges_see_a_running_and_a_queued_task(tel: Telemetry, tmp_path: Path) -> None:
    gate = str(tmp_path / "gate")

    def point(name: str) -> int:
        [p] = [
            p for p in tel.metric_points(name) if p.attributes.get("asyncmirai.compute") == "gauges"
        ]
        return int(p.value)

    with am.daemons(1, compute="gauges"):
        a = am.mirai(wait_for, gate, _compute="gauges")
        b = am.mirai(wait_for, gate, _compute="gauges")
        ev = threading.Event()
        a.add_done_callback(lambda _: ev.set())
        # the first is running once its daemon took it: poll the status, not the clock
        while am.status("gauges").executing != 1:
            ev.wait(0.01)
        assert point("asyncmirai.tasks.executing") == 1
        assert point("asyncmirai.tasks.queued") == 1
        Path(gate).touch()
        assert [a.result(30), b.result(30)] == ["done", "done"]


def test_off_when_no_provider_is_set() -> None:
    """opentelemetry loaded, no provider: no record, no span, nothing in the header."""
    code = (
        "import opentelemetry.trace, opentelemetry.metrics\n"
        "import asyncmirai as am\n"
        "from asyncmirai import _otel\n"
        "assert _otel.begin('default', 1, print, ()) is None\n"
        "with am.daemons(1):\n"
        "    assert am.mirai(abs, -2).result(30) == 2\n"
        "assert not _otel.RECORDS\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, cwd=HERE)


def test_no_error_and_no_span_without_opentelemetry() -> None:
    """opentelemetry cannot be imported at all (a process where it is blocked)."""
    code = (
        "import sys\n"
        "sys.modules['opentelemetry'] = None\n"  # import opentelemetry -> ImportError
        "import asyncmirai as am\n"
        "from asyncmirai import _otel\n"
        "with am.daemons(1):\n"
        "    assert am.mirai(abs, -2).result(30) == 2\n"
        "    assert am.mirai_map(abs, [-1, -2]).result(30) == [1, 2]\n"
        "    assert am.everywhere(abs, -1).result(30) == [1]\n"
        "assert not _otel.RECORDS\n"
        "assert not any(m.startswith('opentelemetry.') for m in sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, cwd=HERE)
