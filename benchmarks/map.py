"""Throughput of a map over many tiny tasks: asyncmirai against its peers.

Run as a script (not a test), from the repository root::

    .venv/bin/python benchmarks/map.py            # full: 100,000 tasks, ~2-4 minutes
    .venv/bin/python benchmarks/map.py --quick    # smoke run: 5,000 tasks

Every peer maps ``_common.inc`` (``x + 1``) over ``range(N)`` with 2 worker processes,
in the same run on the same machine, pools started and warmed up beforehand (start-up is
not timed; ``latency.py`` measures it):

* ``am.mirai_map(inc, xs)`` awaited (one task per element), and with ``_chunksize``
  100 and 1000 (elements batched per task);
* ``ProcessPoolExecutor(2).map(inc, xs, chunksize=c)`` for c in 1, 100, 1000;
* loky's reusable executor ``.map`` with the same chunksizes;
* Dask distributed: ``LocalCluster(n_workers=2, processes=True, threads_per_worker=1)``,
  ``client.map(inc, xs)`` + ``client.gather``, and the same over chunks of 1000.

Every result list is checked.  Prints a table with tasks/second and ratios, and writes
``benchmarks/results/map.json``.  Unchunked runs whose peer is slow (Dask) may use fewer
elements (``--n-slow``, default 20,000: Dask spends ~1-3 ms per task here); the table
says so.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import platform
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

warnings.filterwarnings("ignore", category=DeprecationWarning)

from _common import BENCH_DIR, share_import_path  # noqa: E402

share_import_path()  # every peer must import _common.inc by name
from _common import inc  # noqa: E402

perf = time.perf_counter
WORKERS = 2
CHUNKS = (1, 100, 1000)


def inc_chunk(xs: list[int]) -> list[int]:
    """Dask's chunked variant: one task per chunk (what ``_chunksize`` does for mirai)."""
    return [inc(x) for x in xs]


def _check(res: Any, n: int) -> None:
    res = list(res)
    if len(res) != n or res[0] != 1 or res[-1] != n or sum(res) != n * (n + 1) // 2:
        raise AssertionError(f"wrong results (len {len(res)})")


def _time(fn: Callable[[], Any], n: int) -> float:
    gc.collect()
    t0 = perf()
    res = fn()
    dt = perf() - t0
    _check(res, n)
    return dt


# ---------------------------------------------------------------------------------------
# peers: each yields (key, label, n, seconds) rows
# ---------------------------------------------------------------------------------------


def bench_asyncmirai(n: int, n_unchunked: int, repeat: int) -> list[dict[str, Any]]:
    import asyncmirai as am

    rows: list[dict[str, Any]] = []

    async def main() -> None:
        async with am.daemons(WORKERS):
            while am.status().connections < WORKERS:
                await asyncio.sleep(0.01)
            _check(await am.mirai_map(inc, range(500)), 500)  # warm-up
            _check(await am.mirai_map(inc, range(5000), _chunksize=100), 5000)
            for chunk in CHUNKS:
                m = n_unchunked if chunk == 1 else n
                reps = 1 if chunk == 1 else repeat
                best = float("inf")
                for _ in range(reps):
                    xs = range(m)
                    gc.collect()
                    t0 = perf()
                    if chunk == 1:
                        res = await am.mirai_map(inc, xs)
                    else:
                        res = await am.mirai_map(inc, xs, _chunksize=chunk)
                    dt = perf() - t0
                    _check(res, m)
                    best = min(best, dt)
                    del res
                    gc.collect()
                label = "am.mirai_map" + ("" if chunk == 1 else f"(_chunksize={chunk})")
                rows.append(_row(f"asyncmirai_c{chunk}", label, m, best, chunk))
                print(f"  {label:<44} {m / best:>12,.0f} tasks/s", flush=True)

    asyncio.run(main())
    return rows


def _bench_executor(name: str, ex: Any, n: int, n_c1: int, repeat: int) -> list[dict[str, Any]]:
    rows = []
    _check(ex.map(inc, range(500)), 500)  # warm-up: start every worker
    for chunk in CHUNKS:
        m = n_c1 if chunk == 1 else n
        reps = 1 if chunk == 1 else repeat
        best = min(
            _time(lambda m=m, chunk=chunk: list(ex.map(inc, range(m), chunksize=chunk)), m)
            for _ in range(reps)
        )
        label = f"{name}.map(chunksize={chunk})"
        rows.append(_row(f"{name}_c{chunk}", label, m, best, chunk))
        print(f"  {label:<44} {m / best:>12,.0f} tasks/s", flush=True)
    return rows


def bench_ppe(n: int, n_c1: int, repeat: int) -> list[dict[str, Any]]:
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(WORKERS) as ex:
        return _bench_executor("ProcessPoolExecutor", ex, n, n_c1, repeat)


def bench_loky(n: int, n_c1: int, repeat: int) -> list[dict[str, Any]]:
    from loky import get_reusable_executor

    ex = get_reusable_executor(max_workers=WORKERS, timeout=60)
    try:
        return _bench_executor("loky", ex, n, n_c1, repeat)
    finally:
        ex.shutdown(wait=True)


def bench_dask(n: int, n_unchunked: int, repeat: int) -> list[dict[str, Any]]:
    from dask.distributed import Client, LocalCluster

    for name in ("distributed", "distributed.worker", "distributed.scheduler"):
        logging.getLogger(name).setLevel(logging.ERROR)
    rows = []
    with (
        LocalCluster(
            n_workers=WORKERS,
            processes=True,
            threads_per_worker=1,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        ) as cluster,
        Client(cluster) as client,
    ):
        client.wait_for_workers(WORKERS)
        _check(client.gather(client.map(inc, range(500), pure=False)), 500)  # warm-up

        def unchunked(m: int) -> list[int]:
            futs = client.map(inc, range(m), pure=False)
            res = client.gather(futs)
            del futs
            return res  # type: ignore[no-any-return]

        dt = _time(lambda: unchunked(n_unchunked), n_unchunked)
        rows.append(_row("dask_c1", "dask client.map + gather", n_unchunked, dt, 1))
        print(f"  {rows[-1]['label']:<44} {n_unchunked / dt:>12,.0f} tasks/s", flush=True)

        def chunked(m: int, size: int) -> list[int]:
            chunks = [list(range(i, min(i + size, m))) for i in range(0, m, size)]
            futs = client.map(inc_chunk, chunks, pure=False)
            out: list[int] = []
            for part in client.gather(futs):
                out.extend(part)
            return out

        best = min(_time(lambda: chunked(n, 1000), n) for _ in range(repeat))
        rows.append(_row("dask_c1000", "dask client.map over chunks of 1000", n, best, 1000))
        print(f"  {rows[-1]['label']:<44} {n / best:>12,.0f} tasks/s", flush=True)
    return rows


def _row(key: str, label: str, n: int, seconds: float, chunk: int) -> dict[str, Any]:
    return {
        "key": key,
        "label": label,
        "n": n,
        "chunksize": chunk,
        "seconds": seconds,
        "tasks_per_s": n / seconds,
        "us_per_task": seconds / n * 1e6,
    }


# ---------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="5,000 tasks, smoke run")
    ap.add_argument("-n", type=int, default=None, help="elements per map (default 100,000)")
    ap.add_argument(
        "--n-slow",
        type=int,
        default=None,
        help="elements for the unchunked Dask run (default 20,000: ~3 ms a task)",
    )
    ap.add_argument("--repeat", type=int, default=None, help="runs of each chunked map (best)")
    ap.add_argument("--only", default=None, help="comma list of asyncmirai,ppe,loky,dask")
    ap.add_argument("--out", default=str(BENCH_DIR / "results" / "map.json"))
    args = ap.parse_args()

    n = args.n or (5000 if args.quick else 100_000)
    n_slow = min(args.n_slow or (n if args.quick else 20_000), n)
    repeat = args.repeat or (1 if args.quick else 3)
    peers: list[tuple[str, Callable[[], list[dict[str, Any]]]]] = [
        ("asyncmirai", lambda: bench_asyncmirai(n, n, repeat)),
        ("ppe", lambda: bench_ppe(n, n, repeat)),
        ("loky", lambda: bench_loky(n, n, repeat)),
        ("dask", lambda: bench_dask(n, n_slow, repeat)),
    ]
    if args.only:
        wanted = set(args.only.split(","))
        peers = [p for p in peers if p[0] in wanted]

    print(
        f"map of inc over {n:,} elements, {WORKERS} workers, python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs",
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    errors: dict[str, str] = {}
    t_start = perf()
    for name, fn in peers:
        print(f"{name}:", flush=True)
        t0 = perf()
        try:
            rows.extend(fn())
        except Exception as exc:  # record and go on with the other peers
            errors[name] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        print(f"  ({perf() - t0:.1f} s)", flush=True)
    total = perf() - t_start

    by = {r["key"]: r for r in rows}
    base = by.get("asyncmirai_c1")
    best_am = max(
        (r for r in rows if r["key"].startswith("asyncmirai")),
        key=lambda r: r["tasks_per_s"],
        default=None,
    )

    def best_of(prefix: str) -> dict[str, Any] | None:
        cands = [r for r in rows if r["key"].startswith(prefix)]
        return max(cands, key=lambda r: r["tasks_per_s"]) if cands else None

    ratios: dict[str, float] = {}
    for r in rows:
        if base is not None:
            r["vs_am_unchunked"] = r["tasks_per_s"] / base["tasks_per_s"]
    summary = {}
    for peer, prefix in (
        ("ProcessPoolExecutor", "ProcessPoolExecutor"),
        ("loky", "loky"),
        ("dask", "dask"),
    ):
        b = best_of(prefix)
        if b is None:
            continue
        summary[f"{peer}_best"] = b["key"]
        if base is not None:
            ratios[f"am_unchunked / {peer}_same_granularity"] = (
                base["tasks_per_s"] / by[f"{prefix}_c1"]["tasks_per_s"]
                if f"{prefix}_c1" in by
                else float("nan")
            )
        if best_am is not None:
            ratios[f"am_best / {peer}_best"] = best_am["tasks_per_s"] / b["tasks_per_s"]
    if base is not None and best_am is not None:
        ratios["am_best_chunked / am_unchunked"] = best_am["tasks_per_s"] / base["tasks_per_s"]

    print()
    print(f"{'peer':<44} {'n':>8} {'seconds':>8} {'tasks/s':>11} {'us/task':>8} {'vs am':>7}")
    for r in rows:
        vs = r.get("vs_am_unchunked")
        print(
            f"{r['label']:<44} {r['n']:>8,} {r['seconds']:>8.2f} {r['tasks_per_s']:>11,.0f} "
            f"{r['us_per_task']:>8.1f} {vs if vs is not None else float('nan'):>7.2f}"
        )
    print()
    for k, v in ratios.items():
        print(f"{k:<52} {v:6.2f}x")
    if errors:
        print("errors:", errors)
    print(f"total {total:.0f} s")

    out = {
        "benchmark": "map",
        "task": "_common.inc (x + 1)",
        "n": n,
        "n_dask_unchunked": n_slow,
        "workers": WORKERS,
        "repeat_chunked": repeat,
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
        "rows": rows,
        "ratios": ratios,
        "summary": summary,
        "errors": errors,
        "total_seconds": total,
    }
    if not args.quick:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
