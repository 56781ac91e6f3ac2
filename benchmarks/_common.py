"""Shared helpers for the benchmarks.

Importable by every peer process (daemons, pool workers): ``share_import_path()`` puts this
directory on ``sys.path`` and ``PYTHONPATH`` before starting anything, so ``_common.inc``
pickles by reference everywhere.  Also a tiny ZeroMQ echo server:
``python _common.py echo ipc:///path``.
"""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent


def share_import_path() -> None:
    """Put the repository and this directory on ``sys.path`` and ``PYTHONPATH``, so every
    peer process (daemons, pool workers, dask workers) imports benchmark modules by name."""
    for p in (str(REPO), str(BENCH_DIR)):
        if p not in sys.path:
            sys.path.insert(0, p)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(BENCH_DIR), str(REPO)]
        + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    )


def inc(x: int) -> int:
    return x + 1


async def ainc(x: int) -> int:
    """``inc`` as a coroutine function (aiomultiprocess runs only those)."""
    return x + 1


def summarize_us(samples_s: list[float]) -> dict[str, float]:
    """Median / p99 / mean / min of durations given in seconds, reported in microseconds."""
    xs = sorted(samples_s)
    n = len(xs)
    p99 = xs[min(n - 1, max(0, int(round(0.99 * n)) - 1))]
    return {
        "n": n,
        "median_us": statistics.median(xs) * 1e6,
        "p99_us": p99 * 1e6,
        "mean_us": statistics.fmean(xs) * 1e6,
        "min_us": xs[0] * 1e6,
    }


def echo_server(addr: str) -> None:
    """ROUTER echo: every [identity, payload] comes straight back.  Exits on b"quit"."""
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(addr)
    print("ready", flush=True)
    try:
        while True:
            ident, payload = sock.recv_multipart(copy=True)
            if payload == b"quit":
                break
            sock.send_multipart([ident, payload], copy=True)
    finally:
        sock.close(0)
        ctx.term()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "echo":
        echo_server(sys.argv[2])
    else:
        sys.exit("usage: _common.py echo ADDR")
