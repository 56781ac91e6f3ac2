"""Data sent once (issue 14): ``am.put`` against sending the array with every task, Ray's
``ray.put`` and Dask's ``client.scatter``.

Run as a script from the repository root::

    .venv/bin/python benchmarks/put.py               # 3 interleaved rounds, ~3 minutes
    .venv/bin/python benchmarks/put.py --rounds 1 --only am_put,am_every

100 tasks (``--tasks``) over one 256 MiB float64 numpy array (``--mib``); each task
returns ``float(arr[::4096].sum())``, so the work is tiny and the time is the data path.
2 workers each:

- ``am_put``: ``ref = am.put(arr)``, then ``am.mirai(head_sum, ref)`` x 100 (the array
  goes once to each daemon and is cached there);
- ``am_every``: ``am.mirai(head_sum, arr)`` x 100 (the array travels with every task);
- ``ray_put``: ``ref = ray.put(arr)``, ``head_sum.remote(ref)`` x 100,
  ``ray.init(num_cpus=2)``;
- ``dask_scatter``: ``client.scatter(arr, broadcast=True, hash=False)``, then
  ``client.submit(head_sum, fut, pure=False)`` x 100 on a ``LocalCluster`` of 2 worker
  processes with 1 thread each.

Each variant runs in a fresh interpreter; the cluster start-up and one warm-up task are
not timed; the timed span includes the put/scatter itself and all 100 results.  Rounds
are interleaved; the medians and ranges are reported as tasks/s, with the ratios of
``am_put`` to the others.  Writes ``benchmarks/results/put.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from typing import Any

warnings.filterwarnings("ignore", category=DeprecationWarning)

from _common import BENCH_DIR, REPO, share_import_path  # noqa: E402

share_import_path()  # daemons and workers import this module as ``put``

perf = time.perf_counter
WORKERS = 2
VARIANTS = ["am_put", "am_every", "ray_put", "dask_scatter"]


def head_sum(arr: Any) -> float:
    return float(arr[::4096].sum())


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def make_array(mib: int) -> Any:
    import numpy as np

    return np.random.default_rng(0).random(mib * (1 << 20) // 8)


def run_am(arr: Any, tasks: int, use_put: bool) -> float:
    import asyncio

    from put import head_sum

    import asyncmirai as am

    expect = head_sum(arr)

    async def main() -> float:
        async with am.daemons(WORKERS):
            await asyncio.gather(*[am.mirai(head_sum, arr[:8]) for _ in range(2 * WORKERS)])
            t0 = perf()
            x = am.put(arr) if use_put else arr
            res = await asyncio.gather(*[am.mirai(head_sum, x) for _ in range(tasks)])
            dt = perf() - t0
            assert res == [expect] * tasks, res[:3]
            return dt

    return asyncio.run(main())


def run_ray(arr: Any, tasks: int) -> float:
    import ray
    from put import head_sum

    expect = head_sum(arr)
    ray.init(
        num_cpus=WORKERS,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="ERROR",
        configure_logging=False,
    )
    try:
        f = ray.remote(num_cpus=1)(head_sum)
        ray.get([f.remote(arr[:8]) for _ in range(2 * WORKERS)])
        t0 = perf()
        ref = ray.put(arr)
        res = ray.get([f.remote(ref) for _ in range(tasks)])
        dt = perf() - t0
        assert res == [expect] * tasks, res[:3]
        return dt
    finally:
        ray.shutdown()


def run_dask(arr: Any, tasks: int) -> float:
    from dask.distributed import Client, LocalCluster
    from put import head_sum

    expect = head_sum(arr)
    with (
        LocalCluster(
            n_workers=WORKERS,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            memory_limit=0,
        ) as cluster,
        Client(cluster) as client,
    ):
        client.wait_for_workers(WORKERS)
        client.gather([client.submit(head_sum, arr[:8], pure=False) for _ in range(2 * WORKERS)])
        t0 = perf()
        fut = client.scatter(arr, broadcast=True, hash=False)
        res = client.gather([client.submit(head_sum, fut, pure=False) for _ in range(tasks)])
        dt = perf() - t0
        assert res == [expect] * tasks, res[:3]
        return dt


def one(variant: str, mib: int, tasks: int) -> dict[str, Any]:
    arr = make_array(mib)
    if variant == "am_put":
        dt = run_am(arr, tasks, True)
    elif variant == "am_every":
        dt = run_am(arr, tasks, False)
    elif variant == "ray_put":
        dt = run_ray(arr, tasks)
    elif variant == "dask_scatter":
        dt = run_dask(arr, tasks)
    else:
        raise ValueError(variant)
    return {"variant": variant, "seconds": dt, "tasks_per_s": tasks / dt, "host_hwm": _peak_rss()}


def run_one(variant: str, mib: int, tasks: int, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, str(BENCH_DIR / "put.py"), "_one", variant, str(mib), str(tasks)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"variant": variant, "error": f"timed out after {timeout:.0f} s"}
    lines = p.stdout.strip().splitlines()
    if p.returncode != 0 or not lines or not lines[-1].startswith("{"):
        return {"variant": variant, "error": (p.stderr or p.stdout)[-3000:]}
    return json.loads(lines[-1])


def available(variant: str) -> str | None:
    """None if the variant's library imports, else why not."""
    mod = {"ray_put": "ray", "dask_scatter": "distributed"}.get(variant)
    if mod is None:
        return None
    p = subprocess.run([sys.executable, "-c", f"import {mod}"], capture_output=True, text=True)
    return None if p.returncode == 0 else f"{mod} does not import: {p.stderr.strip()[-300:]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tasks", type=int, default=100)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--only", default=",".join(VARIANTS))
    ap.add_argument("--timeout", type=float, default=300, help="seconds per variant run")
    ap.add_argument("--out", default=str(BENCH_DIR / "results" / "put.json"))
    args = ap.parse_args()
    variants = [v for v in args.only.split(",") if v]
    skipped = {v: why for v in variants if (why := available(v)) is not None}
    variants = [v for v in variants if v not in skipped]
    for v, why in skipped.items():
        print(f"  skipping {v}: {why}", flush=True)

    print(
        f"{args.tasks} tasks over a {args.mib} MiB array, {WORKERS} workers, "
        f"{args.rounds} round(s)",
        flush=True,
    )
    runs: list[dict[str, Any]] = []
    for r in range(args.rounds):
        for v in variants:
            res = run_one(v, args.mib, args.tasks, args.timeout)
            res["round"] = r
            runs.append(res)
            if "error" in res:
                print(f"  round {r} {v:13s} ERROR: {res['error'][-500:]}", flush=True)
            else:
                print(
                    f"  round {r} {v:13s} {res['seconds']:7.3f} s  {res['tasks_per_s']:8.1f} tasks/s"
                    f"  host VmHWM {res['host_hwm'] / (1 << 20):7.0f} MiB",
                    flush=True,
                )
    summary: dict[str, Any] = {}
    for v in variants:
        ok = [x for x in runs if x["variant"] == v and "error" not in x]
        errs = [x["error"] for x in runs if x["variant"] == v and "error" in x]
        if not ok:
            summary[v] = {"error": errs[-1] if errs else "no run"}
            continue
        tps = [x["tasks_per_s"] for x in ok]
        summary[v] = {
            "n": len(ok),
            "tasks_per_s_median": statistics.median(tps),
            "tasks_per_s_range": [min(tps), max(tps)],
            "seconds": [x["seconds"] for x in ok],
            "host_hwm_mib": [round(x["host_hwm"] / (1 << 20)) for x in ok],
            "errors": len(errs),
        }
    base = summary.get("am_put", {}).get("tasks_per_s_median")
    ratios = {}
    if base:
        for v, s in summary.items():
            if v != "am_put" and "tasks_per_s_median" in s:
                ratios[f"am_put/{v}"] = base / s["tasks_per_s_median"]
    print("tasks/s, median [range]:")
    for v, s in summary.items():
        if "error" in s:
            print(f"  {v:13s} unavailable: {s['error'][-300:]}")
        else:
            lo, hi = s["tasks_per_s_range"]
            print(f"  {v:13s} {s['tasks_per_s_median']:8.1f}  [{lo:.1f} .. {hi:.1f}]")
    for k, x in ratios.items():
        print(f"  {k}: {x:.2f}x")

    rev = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    versions = {}
    for mod in ("numpy", "ray", "distributed"):
        p = subprocess.run(
            [sys.executable, "-c", f"import {mod}; print({mod}.__version__)"],
            capture_output=True,
            text=True,
        )
        versions[mod] = p.stdout.strip() or None
    result = {
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
        "git": rev,
        "versions": versions,
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "skipped": skipped,
        "runs": runs,
        "summary": summary,
        "ratios": ratios,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_one":
        _, _, variant, mib, n = sys.argv
        print(json.dumps(one(variant, int(mib), int(n))))
    else:
        main()
