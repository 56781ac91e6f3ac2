"""Flow control (issue 11): host memory under a memory budget, and many coroutines per daemon.

Run as a script from the repository root::

    .venv/bin/python benchmarks/flow.py                   # full: 10^6 tasks, ~10 min
    .venv/bin/python benchmarks/flow.py --quick           # 10^5 tasks, 1 round of part b
    .venv/bin/python benchmarks/flow.py --tasks 200000 --skip io
    .venv/bin/python benchmarks/flow.py --skip rss --io-tasks 400

1. ``rss``: host RSS while ``--tasks`` (default 10^6) tasks with a 10 KB ``bytes`` payload
   each are produced faster than 2 daemons consume them (the function only takes
   ``len()``), with no budget and with ``memory="100MB"``; produced from a plain thread
   with ``am.mirai`` (blocks when the budget is full) and from asyncio with
   ``await am.submit``.  Each case runs in a fresh interpreter: the empty-queue baseline
   is the RSS after the daemons are up and 2,000 tasks of the same shape have run; a
   sampler thread reads ``/proc/self/statm`` every 5 ms during the run.  The producer
   keeps no handles (a done-callback counts completions), so what grows is the queue.
   Without a budget the producer stops at ``--rss-cap`` (default 4 GiB of RSS) so as not
   to exhaust the machine; the result says whether the cap was hit and at which task.
   The target: with the budget, peak RSS <= 1.2 x (baseline + budget).
2. ``io``: ``--io-tasks`` (default 1,000) coroutine tasks, each ``await
   asyncio.sleep(0.1)``, on 2 daemons with ``concurrency=1, 10, 100``, against
   ``aiomultiprocess.Pool(processes=2, childconcurrency=k)`` with the same k, interleaved
   over ``--rounds`` rounds (default 2).  Wall time of the batch (pool/daemon start-up
   and a warm-up excluded); targets: concurrency=100 >= 50x faster than concurrency=1,
   and >= 1x aiomultiprocess at the same k.

Writes ``benchmarks/results/flow.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import warnings
from typing import Any

warnings.filterwarnings("ignore", category=DeprecationWarning)

from _common import BENCH_DIR, REPO, share_import_path  # noqa: E402

share_import_path()  # daemons and pool workers import this module as ``flow``

perf = time.perf_counter
WORKERS = 2
PAYLOAD = 10_000  # bytes per task
BUDGET = "100MB"
BUDGET_BYTES = 100_000_000
PAGE = os.sysconf("SC_PAGE_SIZE")


# --- task functions (imported by name in the daemons and pool workers) -----------------


def consume(payload: bytes) -> int:
    return len(payload)


async def io_task(i: int) -> int:
    await asyncio.sleep(0.1)
    return i


async def noop(i: int) -> int:
    return i


# --- 1. RSS under a producer that outruns the consumers -------------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def vm_hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


class Sampler(threading.Thread):
    """Reads RSS every ``dt`` seconds; keeps the peak and a coarse time series."""

    def __init__(self, dt: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.dt = dt
        self.peak = 0
        self.series: list[tuple[float, int]] = []
        self.t0 = perf()
        self._halt = threading.Event()

    def run(self) -> None:
        last = -1.0
        while not self._halt.is_set():
            r = rss_bytes()
            if r > self.peak:
                self.peak = r
            t = perf() - self.t0
            if t - last >= 0.5:
                self.series.append((round(t, 2), r))
                last = t
            self._halt.wait(self.dt)

    def stop(self) -> None:
        self._halt.set()
        self.join()
        self.series.append((round(perf() - self.t0, 2), rss_bytes()))


class Counter:
    """Counts resolved handles (from the dispatcher's thread); sets ``done`` at ``n``."""

    def __init__(self) -> None:
        self.n = 0
        self.target = -1
        self.errors = 0
        self.lock = threading.Lock()
        self.done = threading.Event()

    def __call__(self, m: Any) -> None:
        try:
            m.result(timeout=0)
        except BaseException:
            self.errors += 1
        with self.lock:
            self.n += 1
            if self.n == self.target:
                self.done.set()

    def expect(self, target: int) -> None:
        with self.lock:
            self.target = target
            if self.n >= target:
                self.done.set()


def _baseline() -> int:
    gc.collect()
    xs = []
    for _ in range(20):
        xs.append(rss_bytes())
        time.sleep(0.01)
    return int(statistics.median(xs))


def rss_case(mode: str, memory: str | None, tasks: int, cap: int) -> dict[str, Any]:
    """One case, in this (fresh) interpreter."""
    from flow import consume  # by reference, not by value from __main__

    import asyncmirai as am

    payload = os.urandom(PAYLOAD)
    warm = 2000
    out: dict[str, Any] = {"mode": mode, "memory": memory, "tasks": tasks}

    def finish(
        sampler: Sampler, counter: Counter, base: int, produced: int, t0: float, t1: float
    ) -> None:
        counter.done.wait()
        t2 = perf()
        sampler.stop()
        st = am.status()
        out.update(
            baseline_rss=base,
            peak_rss=sampler.peak,
            vm_hwm=vm_hwm(),
            produced=produced,
            capped=produced < tasks,
            completed=counter.n,
            errors=counter.errors,
            produce_s=t1 - t0,
            total_s=t2 - t0,
            tasks_per_s=produced / (t2 - t0),
            budget=st.memory,
            info=am.info(),
            series=sampler.series,
        )
        if memory is not None:
            out["target_rss"] = 1.2 * (base + BUDGET_BYTES)
            out["ratio_to_base_plus_budget"] = sampler.peak / (base + BUDGET_BYTES)

    if mode == "thread":
        with am.daemons(WORKERS, memory=memory):
            ms = [am.mirai(consume, payload) for _ in range(warm)]
            for m in ms:
                m.result()
            del ms, m
            base = _baseline()
            counter = Counter()
            sampler = Sampler()
            sampler.start()
            t0 = perf()
            produced = 0
            for produced in range(1, tasks + 1):  # noqa: B007
                am.mirai(consume, payload).add_done_callback(counter)
                if produced % 1000 == 0 and sampler.peak > cap:
                    break
            t1 = perf()
            counter.expect(produced)
            finish(sampler, counter, base, produced, t0, t1)
    else:

        async def main() -> None:
            async with am.daemons(WORKERS, memory=memory):
                ms = [await am.submit(consume, payload) for _ in range(warm)]
                await asyncio.gather(*ms)
                del ms
                base = _baseline()
                counter = Counter()
                sampler = Sampler()
                sampler.start()
                t0 = perf()
                produced = 0
                for produced in range(1, tasks + 1):  # noqa: B007
                    (await am.submit(consume, payload)).add_done_callback(counter)
                    if produced % 1000 == 0 and sampler.peak > cap:
                        break
                t1 = perf()
                counter.expect(produced)
                while not counter.done.is_set():
                    await asyncio.sleep(0.01)
                finish(sampler, counter, base, produced, t0, t1)

        asyncio.run(main())
    return out


def run_rss_case(mode: str, memory: str | None, tasks: int, cap: int) -> dict[str, Any]:
    cmd = [sys.executable, str(BENCH_DIR / "flow.py"), "_rss", mode, str(memory), str(tasks)]
    cmd += [str(cap)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if p.returncode != 0:
        return {"mode": mode, "memory": memory, "error": p.stderr[-3000:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def bench_rss(args: argparse.Namespace) -> dict[str, Any]:
    mib = 1 << 20
    runs: list[dict[str, Any]] = []
    cases = [(mode, mem) for mode in ("thread", "asyncio") for mem in (None, BUDGET)]
    for r in range(args.rss_rounds):
        for mode, mem in cases:
            res = run_rss_case(mode, mem, args.tasks, args.rss_cap)
            res["round"] = r
            runs.append(res)
            if "error" in res:
                print(f"  {mode:8s} memory={mem}: ERROR\n{res['error']}", flush=True)
                continue
            line = (
                f"  {mode:8s} memory={str(mem):6s} base {res['baseline_rss'] / mib:7.1f} MiB"
                f"  peak {res['peak_rss'] / mib:8.1f} MiB  produced {res['produced']:>8,}"
                f"{' (capped)' if res['capped'] else ''}  {res['tasks_per_s']:8,.0f} tasks/s"
            )
            if mem is not None:
                line += f"  peak/(base+budget) {res['ratio_to_base_plus_budget']:.3f}"
            print(line, flush=True)
    summary: dict[str, Any] = {}
    for mode, mem in cases:
        rs = [x for x in runs if x["mode"] == mode and x["memory"] == mem and "error" not in x]
        if not rs:
            continue
        key = f"{mode}/{mem or 'unbounded'}"
        s: dict[str, Any] = {
            "n": len(rs),
            "baseline_mib": [round(x["baseline_rss"] / mib, 1) for x in rs],
            "peak_mib": [round(x["peak_rss"] / mib, 1) for x in rs],
            "peak_mib_median": round(statistics.median(x["peak_rss"] / mib for x in rs), 1),
            "capped": [x["capped"] for x in rs],
            "produced": [x["produced"] for x in rs],
            "tasks_per_s": [round(x["tasks_per_s"]) for x in rs],
        }
        if mem is not None:
            ratios = [x["ratio_to_base_plus_budget"] for x in rs]
            s["ratio_to_base_plus_budget"] = [round(v, 3) for v in ratios]
            s["ratio_median"] = round(statistics.median(ratios), 3)
            s["target_met"] = max(ratios) <= 1.2
        summary[key] = s
    for r in runs:  # MiB, every 0.5 s
        r["series_mib"] = [(t, round(v / mib, 1)) for t, v in r.pop("series", [])]
    return {"runs": runs, "summary": summary}


# --- 2. I/O-bound coroutines: concurrency vs aiomultiprocess ---------------------------


def io_am(k: int, n: int) -> float:
    from flow import io_task, noop

    import asyncmirai as am

    async def main() -> float:
        async with am.daemons(WORKERS, concurrency=k):
            # Warm every daemon, as pool.map(noop) warms every aiomultiprocess child: 8
            # tasks fit in one daemon's slots when k > 4, and would all go to it.
            await am.everywhere(noop, 0)
            await asyncio.gather(*[am.mirai(noop, i) for i in range(4 * WORKERS)])
            t0 = perf()
            res = await asyncio.gather(*[am.mirai(io_task, i) for i in range(n)])
            dt = perf() - t0
            assert res == list(range(n))
            return dt

    return asyncio.run(main())


def io_aiomp(k: int, n: int) -> float:
    from aiomultiprocess import Pool
    from flow import io_task, noop

    async def main() -> float:
        async with Pool(processes=WORKERS, childconcurrency=k) as pool:
            await pool.map(noop, range(4 * WORKERS))
            t0 = perf()
            res = await pool.map(io_task, range(n))
            dt = perf() - t0
            assert list(res) == list(range(n))
            return dt

    return asyncio.run(main())


def bench_io(args: argparse.Namespace) -> dict[str, Any]:
    ks = [1, 10, 100]
    try:
        import aiomultiprocess  # noqa: F401

        peers = {"asyncmirai": io_am, "aiomultiprocess": io_aiomp}
    except ImportError:
        print("  aiomultiprocess not installed: asyncmirai only", flush=True)
        peers = {"asyncmirai": io_am}
    times: dict[str, dict[int, list[float]]] = {p: {k: [] for k in ks} for p in peers}
    for r in range(args.rounds):
        for k in ks:
            for name, fn in peers.items():
                dt = fn(k, args.io_tasks)
                times[name][k].append(dt)
                print(f"  round {r} {name:16s} k={k:<3d} {dt:8.3f} s", flush=True)
    med = {p: {k: statistics.median(v) for k, v in d.items()} for p, d in times.items()}
    out: dict[str, Any] = {
        "io_tasks": args.io_tasks,
        "sleep_s": 0.1,
        "workers": WORKERS,
        "times_s": {p: {str(k): v for k, v in d.items()} for p, d in times.items()},
        "median_s": {p: {str(k): v for k, v in d.items()} for p, d in med.items()},
        "ideal_s": {str(k): args.io_tasks * 0.1 / (WORKERS * k) for k in ks},
    }
    am_med = med["asyncmirai"]
    out["speedup_100_vs_1"] = am_med[1] / am_med[100]
    out["target_100_vs_1_met"] = out["speedup_100_vs_1"] >= 50
    if "aiomultiprocess" in med:
        out["ratio_vs_aiomultiprocess"] = {
            str(k): med["aiomultiprocess"][k] / am_med[k] for k in ks
        }
        out["target_vs_aiomultiprocess_met"] = all(
            v >= 1 for v in out["ratio_vs_aiomultiprocess"].values()
        )
    return out


# --- driver ---------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="10^5 tasks, 1 round of each")
    ap.add_argument("--tasks", type=int, default=None, help="tasks per RSS case (10^6)")
    ap.add_argument("--rss-rounds", type=int, default=None, help="runs of each RSS case")
    ap.add_argument("--rss-cap", type=float, default=4.0, help="GiB of RSS to stop at")
    ap.add_argument("--io-tasks", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=None, help="rounds of part 2 (2)")
    ap.add_argument("--skip", default="", help="comma list of rss,io")
    ap.add_argument("--out", default=str(BENCH_DIR / "results" / "flow.json"))
    args = ap.parse_args()
    args.tasks = args.tasks or (100_000 if args.quick else 1_000_000)
    args.rss_rounds = args.rss_rounds or (1 if args.quick else 2)
    args.rounds = args.rounds or (1 if args.quick else 2)
    args.rss_cap = int(args.rss_cap * (1 << 30))
    skip = set(filter(None, args.skip.split(",")))

    rev = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    dirty = bool(
        subprocess.run(
            ["git", "status", "--porcelain", "asyncmirai"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
    )
    result: dict[str, Any] = {
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "loadavg_start": os.getloadavg(),
        },
        "git": rev + (" + uncommitted asyncmirai/" if dirty else ""),
        "args": {k: v for k, v in vars(args).items() if k != "out"},
    }
    if "rss" not in skip:
        print(
            f"1. host RSS, {args.tasks:,} tasks x {PAYLOAD:,} B, {WORKERS} daemons, "
            f"{args.rss_rounds} run(s) each",
            flush=True,
        )
        result["rss"] = bench_rss(args)
        for key, s in result["rss"]["summary"].items():
            extra = f"  ratio {s['ratio_to_base_plus_budget']}" if "ratio_median" in s else ""
            print(f"  {key:20s} peak MiB {s['peak_mib']}{extra}", flush=True)
    if "io" not in skip:
        print(f"2. {args.io_tasks:,} x asyncio.sleep(0.1) on {WORKERS} daemons", flush=True)
        io = result["io"] = bench_io(args)
        print(
            f"  asyncmirai k=100 vs k=1: {io['speedup_100_vs_1']:.1f}x "
            f"(target >= 50x: {'met' if io['target_100_vs_1_met'] else 'NOT met'})"
        )
        if "ratio_vs_aiomultiprocess" in io:
            print(
                "  aiomultiprocess / asyncmirai time by k: "
                + ", ".join(f"{k}: {v:.2f}" for k, v in io["ratio_vs_aiomultiprocess"].items())
            )
    result["machine"]["loadavg_end"] = os.getloadavg()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    if skip and os.path.exists(args.out):  # keep the skipped parts of an earlier run
        with open(args.out) as f:
            old = json.load(f)
        for part in skip & {"rss", "io"}:
            if part in old:
                result[part] = old[part]
                result.setdefault("earlier_runs", {})[part] = {
                    k: old.get(k) for k in ("machine", "git", "args")
                }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_rss":
        _, _, mode, mem, n, cap = sys.argv
        print(json.dumps(rss_case(mode, None if mem == "None" else mem, int(n), int(cap))))
    else:
        main()
