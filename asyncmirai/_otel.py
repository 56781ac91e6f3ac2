"""OpenTelemetry tracing and metrics (the optional ``opentelemetry-api`` package).

Nothing here imports OpenTelemetry at module level: ``import asyncmirai`` never loads
it, and while the user's program has not loaded it (or set no tracer and no meter
provider) the per-task cost is one dictionary lookup in ``sys.modules`` (:func:`begin`
returns None and the rest of asyncmirai skips every other hook).

Host side (per task, when a provider is set):

* :func:`begin` starts the task's span in the caller's current context (named after the
  function, ``"code"`` for a code string) and returns a :class:`Record`; the trace
  context (W3C ``traceparent`` through the global propagator) rides in the Task
  header's ``extra`` dict under ``"otel"``;
* :meth:`Record.attach` registers it in :data:`RECORDS` (task id -> record) and on the
  handle's done callbacks;
* the dispatcher calls :func:`sent` when it writes the task to a daemon (queue wait,
  daemon pid and host) and :func:`received` when a result arrives (bytes in);
* the handle's resolution ends the span (outcome, error type, retries) and records the
  metrics.

Daemon side: :func:`daemon_span` gives a context manager that runs the call inside a
``run`` span, child of the caller's span, when the daemon has a tracer provider (set up
by the user, e.g. through ``everywhere()``); spans the user's code opens there join the
caller's trace.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

__all__ = ["RECORDS", "Record", "begin", "daemon_span", "profile_started", "sent"]

_modules = sys.modules
_TRACE = "opentelemetry.trace"
_METRICS = "opentelemetry.metrics"
_monotonic = time.monotonic

#: Pending tasks that are traced or measured: task id -> record (host).
RECORDS: dict[int, Record] = {}

_VERSION = "0.1.0"

# The providers seen last and what was derived from them (recomputed when they change).
_tp: Any = None
_tracer: Any = None
_mp: Any = None
_instruments: Instruments | None = None


# ``get_tracer_provider()`` costs ~1 us (it looks up an environment variable each time):
# while no provider was set (the API's global is None) and none is named in the
# environment (read once, at import), that is known without calling it.
_ENV_TRACER = "OTEL_PYTHON_TRACER_PROVIDER" in os.environ
_ENV_METER = "OTEL_PYTHON_METER_PROVIDER" in os.environ
_METRICS_GLOBALS = "opentelemetry.metrics._internal"


def _tracer_now() -> Any:
    """The asyncmirai tracer of the global tracer provider; None when there is none."""
    global _tp, _tracer
    mod = _modules.get(_TRACE)
    if mod is None:
        return None
    if getattr(mod, "_TRACER_PROVIDER", 0) is None and not _ENV_TRACER:
        return None  # not set yet (the API's default proxy): off
    p = mod.get_tracer_provider()
    if p is not _tp:
        default = isinstance(p, mod.ProxyTracerProvider | mod.NoOpTracerProvider)
        _tracer = None if default else p.get_tracer("asyncmirai", _VERSION)
        _tp = p
    return _tracer


def _instruments_now() -> Instruments | None:
    """The instruments of the global meter provider; None when there is none."""
    global _mp, _instruments
    mod = _modules.get(_METRICS)
    if mod is None:
        return None
    glob = _modules.get(_METRICS_GLOBALS)
    if getattr(glob, "_METER_PROVIDER", 0) is None and not _ENV_METER:
        return None  # not set yet (the API's default proxy): off
    p = mod.get_meter_provider()
    if p is not _mp:
        default = type(p).__name__ in ("_ProxyMeterProvider", "NoOpMeterProvider")
        _instruments = None if default else Instruments(p.get_meter("asyncmirai", _VERSION))
        _mp = p
    return _instruments


class Instruments:
    """The metrics instruments of one meter."""

    def __init__(self, meter: Any) -> None:
        self.tasks = meter.create_counter(
            "asyncmirai.tasks", unit="{task}", description="Tasks resolved, by outcome"
        )
        self.queue_wait = meter.create_histogram(
            "asyncmirai.task.queue_wait",
            unit="s",
            description="Time from submission to the task's first dispatch to a daemon",
        )
        self.run_time = meter.create_histogram(
            "asyncmirai.task.run_time",
            unit="s",
            description="Time from the task's (last) dispatch to a daemon to its result",
        )
        meter.create_observable_gauge(
            "asyncmirai.tasks.queued",
            callbacks=[_gauge("awaiting")],
            unit="{task}",
            description="Tasks waiting for a daemon",
        )
        meter.create_observable_gauge(
            "asyncmirai.tasks.executing",
            callbacks=[_gauge("executing")],
            unit="{task}",
            description="Tasks running on daemons",
        )
        meter.create_observable_gauge(
            "asyncmirai.daemons.connected",
            callbacks=[_gauge("connections")],
            unit="{daemon}",
            description="Daemons connected",
        )


def counts(sched: Any) -> dict[str, int]:
    """The gauges' values, read from a scheduler without its loop (any thread: plain
    reads of ints and dict sizes; a snapshot that may be one event old)."""
    live = [d for d in list(sched.daemons.values()) if d.ident is not None and d.alive]
    return {
        "connections": len(live),
        "awaiting": sched.queued + sum(len(d.ahead) for d in live),
        "executing": sum(len(d.running) for d in live),
    }


def _gauge(key: str) -> Any:
    def callback(options: Any) -> Any:
        from opentelemetry.metrics import Observation

        from ._profile import profiles

        out = []
        for name, prof in list(profiles.items()):
            d = getattr(prof, "dispatcher", None)
            if d is None:
                continue
            for _ in range(3):  # a dict resized under us by the loop thread: read again
                try:
                    value = counts(d.sched)[key]
                    break
                except RuntimeError:
                    continue
            else:
                continue
            out.append(Observation(value, {"asyncmirai.compute": name}))
        return out

    return callback


def profile_started() -> None:
    """A profile started: create the instruments now (so the gauges report before the
    first task) if a meter provider is set."""
    if _METRICS in _modules:
        _instruments_now()


def span_name(fn: Any, args: tuple[Any, ...] = ()) -> str:
    """A task's span name: the function's qualified name, ``"code"`` for code strings,
    the mapped function's for a ``mirai_map`` chunk."""
    if isinstance(fn, str):
        return "code"
    if getattr(fn, "__name__", "") == "run_chunk" and args and callable(args[0]):
        fn = args[0]
    return str(getattr(fn, "__qualname__", None) or type(fn).__qualname__)


class Record:
    """What is known of one traced or measured task until it resolves."""

    __slots__ = (
        "id",
        "compute",
        "span",
        "carrier",
        "instruments",
        "t0",
        "sent_at",
        "queued",
        "pid",
        "host",
        "bytes_out",
        "bytes_in",
        "job",
        "retries",
    )

    def __init__(self, tid: int, compute: str, span: Any, instruments: Any) -> None:
        self.id = tid
        self.compute = compute
        self.span = span
        self.carrier: dict[str, Any] | None = None
        self.instruments = instruments
        self.t0 = _monotonic()
        self.sent_at: float | None = None
        self.queued: float | None = None
        self.pid = 0
        self.host = ""
        self.bytes_out = 0
        self.bytes_in = 0
        self.job: Any = None
        self.retries = 0

    def extra(self, extra: dict[str, Any] | None) -> dict[str, Any] | None:
        """The Task header's ``extra`` with the trace context added (if traced)."""
        if self.carrier is None:
            return extra
        out = dict(extra) if extra else {}
        out["otel"] = self.carrier
        return out

    def attach(self, job: Any, handle: Any, frames: Any) -> None:
        """The task exists: follow it until its handle resolves."""
        self.job = job
        self.retries = job.retries
        if frames is not None:
            self.bytes_out = _size(frames)
        RECORDS[self.id] = self
        handle.add_done_callback(self._resolved)

    def attach_sync(self, handle: Any) -> None:
        """``sync=True``: the task runs in this process now; follow its handle."""
        self.sent_at = self.t0
        self.queued = 0.0
        RECORDS[self.id] = self
        handle.add_done_callback(self._resolved)

    def enter(self) -> Any:
        """Make the task's span current (``sync=True``: spans the function opens in this
        process become its children); returns the token for :meth:`leave`."""
        if self.span is None:
            return None
        from opentelemetry import context, trace

        return context.attach(trace.set_span_in_context(self.span))

    def leave(self, token: Any) -> None:
        if token is not None:
            _detach(token)

    def _resolved(self, handle: Any) -> None:
        RECORDS.pop(self.id, None)
        now = _monotonic()
        outcome, error_type = _outcome(handle)
        job = self.job
        retries = self.retries - job.retries if job is not None else 0
        self.job = None
        inst = self.instruments
        if inst is not None:
            attrs = {"asyncmirai.compute": self.compute, "asyncmirai.outcome": outcome}
            inst.tasks.add(1, attrs)
            base = {"asyncmirai.compute": self.compute}
            if self.queued is not None:
                inst.queue_wait.record(self.queued, base)
            if self.sent_at is not None and outcome != "cancelled":
                inst.run_time.record(now - self.sent_at, base)
        span = self.span
        if span is None:
            return
        attrs2: dict[str, Any] = {
            "asyncmirai.outcome": outcome,
            "asyncmirai.retries": retries,
            "asyncmirai.bytes_out": self.bytes_out,
            "asyncmirai.bytes_in": self.bytes_in,
        }
        if self.queued is not None:
            attrs2["asyncmirai.queued_s"] = self.queued
        if self.pid:
            attrs2["asyncmirai.daemon.pid"] = self.pid
            attrs2["asyncmirai.daemon.host"] = self.host
        if error_type is not None:
            attrs2["error.type"] = error_type
        span.set_attributes(attrs2)
        if outcome not in ("value", "cancelled"):
            from opentelemetry.trace import Status, StatusCode

            exc = handle._value
            span.set_status(Status(StatusCode.ERROR, f"{error_type}: {exc}"[:1024]))
        span.end()


def _outcome(handle: Any) -> tuple[str, str | None]:
    """(outcome, error.type) of a resolved handle."""
    from ._errors import DaemonError, MiraiError, MiraiTimeout
    from ._handle import CANCELLED, VALUE

    state = handle._state
    if state == VALUE:
        return "value", None
    if state == CANCELLED:
        return "cancelled", None
    exc = handle._value
    if isinstance(exc, MiraiTimeout):
        return "timeout", "asyncmirai.MiraiTimeout"
    if isinstance(exc, DaemonError):
        return "daemon_lost", "asyncmirai.DaemonError"
    if isinstance(exc, MiraiError):
        return "error", exc.type_name
    return "error", type(exc).__qualname__


def _size(frames: Any) -> int:
    if isinstance(frames, bytes):
        return len(frames)
    return sum(f.nbytes if isinstance(f, memoryview) else len(f) for f in frames)


def begin(compute: str, tid: int, fn: Any, args: tuple[Any, ...]) -> Record | None:
    """A task is being submitted: its record (span started, trace context ready to
    inject), or None when neither tracing nor metrics are on (the common case: a
    lookup in ``sys.modules`` or two)."""
    if _TRACE not in _modules and _METRICS not in _modules:
        return None
    tracer = _tracer_now()
    inst = _instruments_now()
    if tracer is None and inst is None:
        return None
    span = None
    rec = Record(tid, compute, None, inst)
    if tracer is not None:
        from opentelemetry import propagate, trace

        name = span_name(fn, args)
        span = tracer.start_span(
            name, kind=trace.SpanKind.CLIENT, attributes=_code_attrs(fn, args, tid, compute)
        )
        rec.span = span
        carrier: dict[str, Any] = {"name": name}  # the daemon names its run span after it
        propagate.inject(carrier, context=trace.set_span_in_context(span))
        rec.carrier = carrier
    return rec


def _code_attrs(fn: Any, args: tuple[Any, ...], tid: int, compute: str) -> dict[str, Any]:
    attrs: dict[str, Any] = {"asyncmirai.task.id": tid, "asyncmirai.compute": compute}
    if not isinstance(fn, str):
        if getattr(fn, "__name__", "") == "run_chunk" and args and callable(args[0]):
            fn = args[0]
            if len(args) > 1 and hasattr(args[1], "__len__"):
                attrs["asyncmirai.chunk.size"] = len(args[1])
        attrs["code.function"] = span_name(fn)
        module = getattr(fn, "__module__", None)
        if module:
            attrs["code.namespace"] = module
    return attrs


def sent(rec: Record, d: Any) -> None:
    """The dispatcher wrote the task to daemon ``d`` (loop thread)."""
    now = _monotonic()
    if rec.queued is None:
        rec.queued = now - rec.t0
    rec.sent_at = now
    rec.pid = d.pid
    rec.host = d.host


def received(rec: Record, frames: Any) -> None:
    """The task's result arrived (loop thread)."""
    rec.bytes_in = _size(frames)


# -- grouped work ------------------------------------------------------------------------
class Group:
    """A parent span for several tasks (``mirai_map``, ``everywhere``): entered while
    the tasks are submitted (their spans become its children), ended when all resolve."""

    __slots__ = ("span", "pending", "lock", "closed", "failed", "more")

    def __init__(self, span: Any) -> None:
        import threading

        self.span = span
        self.pending = 0
        self.lock = threading.Lock()
        self.closed = False
        self.failed: str | None = None
        # More tasks may come (a windowed map): the span outlives a moment with none
        # pending, until :meth:`finish`.
        self.more = False

    def carrier(self) -> dict[str, Any]:
        """A header ``extra`` with this span's trace context (``everywhere()`` setups)."""
        from opentelemetry import propagate, trace

        carrier: dict[str, Any] = {"name": self.span.name}
        propagate.inject(carrier, context=trace.set_span_in_context(self.span))
        return {"otel": carrier}

    def enter(self) -> Any:
        """Make the span current (tasks submitted now are its children); returns the
        token for :meth:`leave`."""
        from opentelemetry import context, trace

        return context.attach(trace.set_span_in_context(self.span))

    def leave(self, token: Any) -> None:
        from opentelemetry import context

        context.detach(token)

    def follow(self, handles: Any) -> None:
        """End the span once every handle resolved."""
        handles = list(handles)
        with self.lock:
            self.pending += len(handles)
        if not handles:
            self.close()
        for h in handles:
            h.add_done_callback(self._one_done)

    def _one_done(self, handle: Any) -> None:
        outcome, error_type = _outcome(handle)
        with self.lock:
            if outcome != "value" and self.failed is None:
                self.failed = error_type or outcome
            self.pending -= 1
            last = self.pending == 0 and not self.more
        if last:
            self.close()

    def finish(self, attributes: dict[str, Any]) -> None:
        """No more tasks will join (a windowed map read its input, or stopped): set
        ``attributes`` and end the span once those in flight resolve."""
        with self.lock:
            if self.closed or not self.more:
                return
            self.more = False
            last = self.pending == 0
        for k, v in attributes.items():
            self.span.set_attribute(k, v)
        if last:
            self.close()

    def close(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
        if self.failed is not None:
            self.span.set_attribute("error.type", self.failed)
        self.span.end()


def group(name: str, attributes: dict[str, Any]) -> Group | None:
    """A :class:`Group` span in the current context, or None when tracing is off."""
    if _TRACE not in _modules:
        return None
    tracer = _tracer_now()
    if tracer is None:
        return None
    return Group(tracer.start_span(name, attributes=attributes))


# -- daemon side --------------------------------------------------------------------------
class _RunSpan:
    """The daemon's span around one call, current while it runs (so the user's spans
    are its children)."""

    __slots__ = ("tracer", "ctx", "name", "attrs", "span", "token", "run_ctx", "ended")

    def __init__(self, tracer: Any, ctx: Any, name: str, attrs: dict[str, Any]) -> None:
        self.tracer = tracer
        self.ctx = ctx
        self.name = name
        self.attrs = attrs
        self.span: Any = None
        self.token: Any = None
        self.run_ctx: Any = None
        self.ended = False

    def start(self) -> Any:
        """Open the span (once); returns the context the task runs in."""
        if self.run_ctx is None:
            from opentelemetry import trace

            if self.tracer is not None:
                self.span = self.tracer.start_span(
                    self.name, context=self.ctx, kind=trace.SpanKind.SERVER, attributes=self.attrs
                )
                self.run_ctx = trace.set_span_in_context(self.span, self.ctx)
            else:  # no provider here: the caller's context, for a provider of the user's
                self.run_ctx = self.ctx
        return self.run_ctx

    def __enter__(self) -> _RunSpan:
        from opentelemetry import context

        self.token = context.attach(self.start())
        return self

    def __exit__(self, tp: Any, exc: Any, tb: Any) -> None:
        _detach(self.token)
        self.finish(tp, exc)

    def call(self, fn: Callable[..., Any], args: Any, kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` inside the span.  The span stays open when the call
        returns an awaitable: :func:`traced` then runs that awaitable and ends it."""
        from opentelemetry import context

        token = context.attach(self.start())
        try:
            value = fn(*args, **kwargs)
        except BaseException as exc:
            _detach(token)
            self.finish(type(exc), exc)
            raise
        _detach(token)
        if not hasattr(value, "__await__"):
            self.finish(None, None)
        return value

    def finish(self, tp: Any, exc: Any) -> None:
        """End the span with the outcome (once)."""
        span = self.span
        if span is None or self.ended:
            return
        self.ended = True
        if tp is not None:
            if tp.__name__ in ("_HostCancel", "CancelledError"):
                span.set_attribute("asyncmirai.outcome", "cancelled")
            else:
                from opentelemetry.trace import Status, StatusCode

                span.set_attribute("asyncmirai.outcome", "error")
                span.set_attribute("error.type", tp.__qualname__)
                if isinstance(exc, Exception):
                    span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, f"{tp.__qualname__}: {exc}"[:1024]))
        else:
            span.set_attribute("asyncmirai.outcome", "value")
        span.end()


def _detach(token: Any) -> None:
    from opentelemetry import context

    try:
        context.detach(token)
    except Exception:  # a cancel landed between attach and here: nothing to undo
        pass


async def traced(span: _RunSpan, awaitable: Any) -> Any:
    """Await a coroutine task (on a daemon's coroutine loop) with its run span current
    in this asyncio task only, so the user's spans inside it are that span's children,
    not those of another coroutine running beside it; the span ends with the task."""
    from opentelemetry import context

    token = context.attach(span.start())
    try:
        value = await awaitable
    except BaseException as exc:
        _detach(token)
        span.finish(type(exc), exc)
        raise
    _detach(token)
    span.finish(None, None)
    return value


def daemon_span(extra: Any, tid: int, pid: int = 0) -> _RunSpan | None:
    """On a daemon: the context manager to run task ``tid`` in, or None (no trace
    context came with it, or OpenTelemetry is not loaded in this process)."""
    carrier = extra.get("otel") if type(extra) is dict else None
    if carrier is None or _TRACE not in _modules:
        return None
    try:
        from opentelemetry import propagate

        ctx = propagate.extract(carrier)
    except Exception:
        return None
    name = carrier.get("name") if type(carrier) is dict else None
    attrs: dict[str, Any] = {"asyncmirai.task.id": tid}
    if pid:
        attrs["process.pid"] = pid
    return _RunSpan(_tracer_now(), ctx, f"run {name}" if name else "run", attrs)


def setup_span(extra: Any, tid: int) -> Any:
    """On a daemon: the context manager for an ``everywhere()`` call (a no-op one when
    it is not traced; setups are rare, so no fast path is needed)."""
    span = daemon_span(extra, tid) if extra else None
    if span is None:
        import contextlib

        return contextlib.nullcontext()
    return span
