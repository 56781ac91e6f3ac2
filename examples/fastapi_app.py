"""asyncmirai in a FastAPI app: daemons in the lifespan, awaited tasks, background jobs.

Run it (uvicorn is optional; without it, serve ``app`` with any ASGI server)::

    python examples/fastapi_app.py            # http://127.0.0.1:8000/docs
    uvicorn --app-dir examples fastapi_app:app

Endpoints:

* ``GET /square/{x}``: awaits a mirai; the event loop stays free while a daemon works.
  If the client disconnects, the request's task is cancelled, and with it the mirai on
  the daemon.
* ``POST /jobs`` with ``{"seconds": 1.5, "value": 21, "payload": "..."}``: queues a
  background job (``await am.submit``: it waits for room in the profile's memory budget)
  and returns ``{"id": ...}``.  If the budget stays full for ``SUBMIT_WAIT`` seconds the
  answer is ``503`` with ``Retry-After``: backpressure reaches the client instead of
  growing the host's memory.
* ``GET /fetch/{n}``: I/O-bound async work on a second compute profile, ``"io"``: ``n``
  ``async def`` tasks that each await a (simulated) network call; with
  ``concurrency=CONCURRENCY`` each of its daemons runs that many at once on its event
  loop.
* ``GET /jobs/{id}``: ``{"id", "status", "result", "error"}`` where status is one of
  ``pending`` (queued for a daemon), ``running``, ``done``, ``error``, ``cancelled``.
* ``DELETE /jobs/{id}``: cancels the job: dequeued, or interrupted on its daemon (which
  survives and takes the next task).
* ``GET /status``: the compute profile's counters, memory budget and ``info()``.

The daemons live exactly as long as the app: ``async with am.daemons(2)`` wraps the
lifespan's ``yield``, so shutting the app down resets the profile and the daemon
processes exit (and unfinished jobs fail with ``am.DaemonError``).

Tracing (optional).  With ``opentelemetry-sdk`` installed and an ``OTEL_*`` variable set
(``OTEL_TRACES_EXPORTER``, ``OTEL_EXPORTER_OTLP_ENDPOINT``,
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_SERVICE_NAME``), each request gets a
server span (``GET /square/{x}``) and the mirai it awaits get asyncmirai's host spans
as its children, so the trace shows where the request's time went::

    OTEL_EXPORTER_OTLP_ENDPOINT=http://localhost:4318 python examples/fastapi_app.py
    OTEL_TRACES_EXPORTER=console python examples/fastapi_app.py   # spans on stdout

A tracer provider already set (``opentelemetry-instrument``, or your own code before
this module is imported) is used as it is; otherwise one is made here, exporting over
OTLP (``opentelemetry-exporter-otlp``, HTTP unless ``OTEL_EXPORTER_OTLP_PROTOCOL=grpc``)
or, without that package or with ``OTEL_TRACES_EXPORTER=console``, to stdout.  The
request spans come from FastAPI itself in the versions that have ``fastapi.telemetry``;
with older ones, from ``opentelemetry-instrumentation-fastapi`` when it is installed,
else from :class:`RequestSpans` below.  Without OpenTelemetry nothing changes.  The daemons'
own spans (``run square``) need a tracer provider on each daemon: see the README's
"Observability" section (``am.everywhere(setup_tracing)``).
"""

from __future__ import annotations

import logging
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

import asyncmirai as am

N_DAEMONS = 2
MEMORY = "64MB"  # payload bytes that may wait in the queue
CONCURRENCY = 8  # async def tasks per daemon at once
SUBMIT_WAIT = 1.0  # seconds a POST waits for room before answering 503

# The daemons unpickle the task functions below.  When this file is imported under a
# module name the daemons cannot import (``uvicorn fastapi_app:app`` from another
# directory, or tests loading it by path), ship the functions by value instead.
if __name__ != "__main__" and __name__ in sys.modules:
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])


# -- the work done on the daemons ------------------------------------------------------
def square(x: int) -> int:
    return x * x


def slow_job(seconds: float, value: int, payload: str = "") -> dict[str, Any]:
    """A stand-in for real work: sleeps, then answers.  Fails for negative values."""
    import os

    time.sleep(seconds)
    if value < 0:
        raise ValueError(f"value must be non-negative, got {value}")
    return {"value": value, "doubled": 2 * value, "pid": os.getpid()}


async def fetch(i: int, delay: float) -> int:
    """A stand-in for an HTTP call or a database query: waits on I/O, holds no CPU."""
    import asyncio

    await asyncio.sleep(delay)
    return i


# -- the app ---------------------------------------------------------------------------
@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # Inside the running loop, the dispatcher runs on this same loop: no extra thread.
    app.state.jobs = {}
    async with am.daemons(N_DAEMONS, memory=MEMORY), am.daemons(
        1, compute="io", concurrency=CONCURRENCY
    ):
        yield
    # here the profile is reset and the daemon processes have exited
    app.state.jobs.clear()
    if TRACER_PROVIDER is not None:  # ours: export what is buffered before we go
        TRACER_PROVIDER.force_flush()


app = FastAPI(title="asyncmirai + FastAPI", lifespan=lifespan)


class JobIn(BaseModel):
    seconds: float = 1.0
    value: int = 0
    payload: str = ""  # data the job carries (counted in the memory budget)


def _jobs() -> dict[str, am.Mirai[Any]]:
    jobs: dict[str, am.Mirai[Any]] = app.state.jobs
    return jobs


def _job_or_404(job_id: str) -> am.Mirai[Any]:
    m = _jobs().get(job_id)
    if m is None:
        raise HTTPException(status_code=404, detail=f"no job {job_id!r}")
    return m


def _describe(job_id: str, m: am.Mirai[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"id": job_id, "status": "pending", "result": None, "error": None}
    state = m.state  # "queued", "running" or "done"
    if state != "done":
        out["status"] = "running" if state == "running" else "pending"
        return out
    if m.cancelled():
        out["status"] = "cancelled"
        return out
    exc = m.exception()
    if exc is None:
        out["status"] = "done"
        out["result"] = m.result()
    else:
        out["status"] = "error"
        if isinstance(exc, am.MiraiError):
            out["error"] = f"{exc.type_name}: {exc.message}"
        else:
            out["error"] = f"{type(exc).__name__}: {exc}"
    return out


@app.get("/square/{x}")
async def get_square(x: int) -> dict[str, int]:
    return {"x": x, "square": await am.mirai(square, x)}


@app.post("/jobs", status_code=202)
async def submit_job(job: JobIn) -> dict[str, str]:
    import anyio

    job_id = uuid.uuid4().hex
    with anyio.move_on_after(SUBMIT_WAIT):  # cancelling the wait submits nothing
        _jobs()[job_id] = await am.submit(slow_job, job.seconds, job.value, job.payload)
        return {"id": job_id}
    raise HTTPException(
        status_code=503,
        detail="the job queue is full: retry later",
        headers={"Retry-After": str(max(1, round(SUBMIT_WAIT)))},
    )


@app.get("/fetch/{n}")
async def fetch_many(n: int, delay: float = 0.1) -> dict[str, Any]:
    values = await am.mirai_map(fetch, range(n), delay=delay, _compute="io")
    return {"n": n, "sum": sum(values)}


@app.get("/jobs/{job_id}")
async def poll_job(job_id: str) -> dict[str, Any]:
    return _describe(job_id, _job_or_404(job_id))


@app.delete("/jobs/{job_id}")
async def cancel_job(job_id: str) -> dict[str, Any]:
    m = _job_or_404(job_id)
    m.cancel()  # no-op if it already finished
    return _describe(job_id, m)


@app.get("/status")
async def profile_status() -> dict[str, Any]:
    s = am.status()
    return {
        "connections": s.connections,
        "awaiting": s.awaiting,
        "executing": s.executing,
        "completed": s.completed,
        "pids": sorted(d.pid for d in s.daemons),
        "memory": s.memory,
        "info": am.info(),
    }


# -- optional tracing ------------------------------------------------------------------
log = logging.getLogger(__name__)

OTEL_VARS = (
    "OTEL_TRACES_EXPORTER",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_SERVICE_NAME",
)


def tracing_requested(environ: Any = os.environ) -> bool:
    """An ``OTEL_*`` variable asks for traces (and none turns them off)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return False
    return any(environ.get(name) for name in OTEL_VARS)


class RequestSpans:
    """ASGI middleware: one server span per HTTP request, current while the app handles
    it (so the mirai awaited there are its children).  It continues an incoming
    ``traceparent``, and is named ``"{method} {route}"`` with the semantic-convention
    attributes.  (What ``opentelemetry-instrumentation-fastapi`` does, in brief.)"""

    def __init__(self, app: Any) -> None:
        from opentelemetry import trace

        self.app = app
        self.tracer = trace.get_tracer(__name__)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        from opentelemetry import propagate, trace
        from opentelemetry.trace import Status, StatusCode

        method = scope["method"]
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        attributes = {
            "http.request.method": method,
            "url.path": scope["path"],
            "url.scheme": scope.get("scheme", "http"),
        }
        with self.tracer.start_as_current_span(
            method,
            context=propagate.extract(headers),
            kind=trace.SpanKind.SERVER,
            attributes=attributes,
        ) as span:

            async def send_traced(message: Any) -> None:
                if message["type"] == "http.response.start":
                    span.set_attribute("http.response.status_code", message["status"])
                    if message["status"] >= 500:
                        span.set_status(Status(StatusCode.ERROR))
                await send(message)

            try:
                await self.app(scope, receive, send_traced)
            finally:
                route = getattr(scope.get("route"), "path", None)  # set by the router
                if route:
                    span.set_attribute("http.route", route)
                    span.update_name(f"{method} {route}")


def _span_exporter() -> Any:
    """OTLP when the exporter package is installed (and not asked for the console)."""
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter

    if os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "console":
        return ConsoleSpanExporter(out=sys.stdout)  # the one of now (not of SDK import)
    grpc = os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "").strip().lower() == "grpc"
    try:
        if grpc:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError:
        log.warning("opentelemetry-exporter-otlp is not installed: spans go to stdout")
        return ConsoleSpanExporter(out=sys.stdout)
    return OTLPSpanExporter()  # endpoint, headers, ...: the OTEL_EXPORTER_OTLP_* variables


def setup_tracing(app: FastAPI) -> tuple[str | None, Any]:
    """Trace ``app``'s requests: ``(how, provider)`` where ``how`` names what opens the
    request spans (``"fastapi"``, ``"opentelemetry-instrumentation-fastapi"`` or
    ``"middleware"``; None: the SDK is not installed) and ``provider`` is the tracer
    provider made here (None when one was already set)."""
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning("OTEL_* is set but opentelemetry-sdk is not installed: no tracing")
        return None, None
    provider = None
    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):  # none set yet
        attributes = {}
        if not os.environ.get("OTEL_SERVICE_NAME"):
            attributes["service.name"] = "asyncmirai-fastapi"
        provider = TracerProvider(resource=Resource.create(attributes))  # + OTEL_RESOURCE_*
        provider.add_span_processor(BatchSpanProcessor(_span_exporter()))
        trace.set_tracer_provider(provider)
    if _fastapi_traces_requests():
        return "fastapi", provider
    try:
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
    except ImportError:
        app.add_middleware(RequestSpans)
        return "middleware", provider
    FastAPIInstrumentor.instrument_app(app, exclude_spans=["receive", "send"])
    return "opentelemetry-instrumentation-fastapi", provider


def _fastapi_traces_requests() -> bool:
    """Recent FastAPI versions (``fastapi.telemetry``) open a server span per request
    themselves (and spans for dependencies, the endpoint and serialization) once a
    tracer provider is set: nothing to add then."""
    try:
        import fastapi.telemetry  # noqa: F401
    except ImportError:
        return False
    return True


TRACING, TRACER_PROVIDER = setup_tracing(app) if tracing_requested() else (None, None)


if __name__ == "__main__":
    try:
        import uvicorn
    except ImportError:
        sys.exit("uvicorn is not installed: serve `app` with any ASGI server")
    uvicorn.run(app, host="127.0.0.1", port=8000)
