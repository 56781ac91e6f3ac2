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
"""

from __future__ import annotations

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


if __name__ == "__main__":
    try:
        import uvicorn
    except ImportError:
        sys.exit("uvicorn is not installed: serve `app` with any ASGI server")
    uvicorn.run(app, host="127.0.0.1", port=8000)
