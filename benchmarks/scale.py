"""How asyncmirai scales: the pure scheduler with many daemons, host memory per queued
task, and real local daemons at 2, 64 and 200.

Run as a script (not a test), from the repository root::

    .venv/bin/python benchmarks/scale.py                 # full, several minutes on 2 vCPUs
    .venv/bin/python benchmarks/scale.py --quick         # smoke run, ~1 minute
    .venv/bin/python benchmarks/scale.py --tasks 200000 --daemons 2,64 --old none

1. **Pure scheduler** (``asyncmirai._scheduler.Scheduler`` driven directly, as the unit
   tests' ``Harness`` does: no process, no socket, no loop) with 10, 1,000 and 10,000
   simulated daemons (``--sim``) and ``--tasks`` tasks (default 10^6).  Three regimes:

   * ``backlog``: a queue longer than the daemons (prefetch on, reliable channels); each
     step answers the oldest task in flight and submits a new one, so every step is one
     submit + one SEND + one result + one RESOLVE;
   * ``idle``: no queue; half the daemons are idle, each submit goes straight to one;
   * ``burst``: bursts of ``3 N + 1000`` tasks submitted at once and all answered; every
     10th daemon answers last, so at the end of each burst idle daemons revoke the tasks
     prefetched behind those stragglers (the revoke path).

   Reported in ns per dispatch, with the ratio to the smallest N: flat means ~1.0.
2. **Host memory per queued task**: a real profile listening on a private ipc URL with
   no daemon (``am.daemons(url=am.local_url())``), ``--mem-tasks`` (default 10^6)
   ``am.mirai(inc, i)`` handles kept in a list, all queued.  RSS delta and tracemalloc
   delta, each in a fresh interpreter, divided by the task count; plus ``sys.getsizeof``
   of the parts of one task (handle, job record, frames list, frames).
3. **Real local daemons** at ``--daemons`` (default 2,64,200), each in a fresh
   interpreter: connect time (``am.daemons(n)`` until ``status().connections == n``),
   tasks/s of ``--tp-tasks`` tiny tasks with ``asyncio.gather`` and with ``mirai_map``,
   and the median awaited round trip of ``inc``.

Sections 2 and 3 also run on an older commit (``--old``, default ``4d64ac6``, the main
before the scheduler refactor) checked out in a temporary git worktree and imported via
``PYTHONPATH``; old and new runs are interleaved, ``--reps`` times each.

Prints markdown tables and writes ``benchmarks/results/scale.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import deque
from pathlib import Path
from typing import Any

warnings.filterwarnings("ignore", category=DeprecationWarning)

from _common import BENCH_DIR, REPO, share_import_path  # noqa: E402

share_import_path()  # every daemon must import _common.inc by name
if os.environ.get("AM_SCALE_TREE"):  # a child measuring another checkout: it goes first
    sys.path.insert(0, os.environ["AM_SCALE_TREE"])
    os.environ["PYTHONPATH"] = os.environ["AM_SCALE_TREE"] + os.pathsep + os.environ["PYTHONPATH"]
from _common import inc, summarize_us  # noqa: E402

perf = time.perf_counter
OLD_DEFAULT = "4d64ac6"


# ---------------------------------------------------------------------------------------
# 1. the pure scheduler
# ---------------------------------------------------------------------------------------


def _sim(n: int, tasks: int, regime: str) -> dict[str, Any]:
    """Drive a Scheduler with ``n`` simulated daemons; returns timings of ``tasks``
    dispatches (or of one burst for ``regime == "burst"``)."""
    from asyncmirai._scheduler import CANCEL, RESOLVE, SEND, VALUE, Job, Scheduler

    s = Scheduler(hostname="bench", cancel_grace=2.0)
    out = s.out
    for i in range(n):
        tok = b"%d" % i
        s.hello(b"c" + tok, "ctrl", tok, pid=i + 1, host="bench")
        s.hello(b"t" + tok, "task", tok, pid=i + 1, host="bench", reliable=True)
    out.clear()  # WELCOMEs
    assert len(s.idle) == n

    inflight: deque[tuple[Any, Any]] = deque()  # (daemon, job) in send order
    revoked: set[tuple[Any, int]] = set()
    counts = {"resolved": 0, "sends": 0, "revokes": 0}
    ids = [0]
    frames = [b"x" * 40]  # one small frame, shared (the scheduler never reads it)

    def new_job() -> Any:
        ids[0] += 1
        return Job(ids[0], None, frames)

    def drain() -> None:
        while out:
            act = out.popleft()
            op = act[0]
            if op == SEND:
                inflight.append((act[1], act[3]))
                counts["sends"] += 1
            elif op == RESOLVE:
                counts["resolved"] += 1
            elif op == CANCEL and act[3]:  # a revoke: the daemon has not started it
                d, tid = act[1], act[2]
                revoked.add((d, tid))
                counts["revokes"] += 1
                s.cancelled(d, tid, True, 0.0)

    def answer_oldest() -> None:
        while True:
            d, job = inflight.popleft()
            key = (d, job.id)
            if key in revoked:
                revoked.discard(key)
                continue
            s.result(d, job.id, VALUE, None, 0.0)
            return

    submit = s.submit
    gc.collect()
    gc.disable()  # the cyclic GC's passes over a growing heap would swamp the signal
    try:
        if regime == "backlog":
            for _ in range(3 * n + 1000):
                submit(new_job(), 0.0)
            drain()
            t0 = perf()
            for _ in range(tasks):
                answer_oldest()
                submit(new_job(), 0.0)
                drain()
            dt = perf() - t0
            count = tasks
            assert s.queued > n, (s.queued, n)  # still a backlog: prefetch stayed on
        elif regime == "idle":
            half = max(1, n // 2)
            t0 = perf()
            for _ in range(tasks):
                submit(new_job(), 0.0)
                drain()
                if len(inflight) >= half:
                    answer_oldest()
                    drain()
            dt = perf() - t0
            count = tasks
            assert not s.queued
        else:  # bursts of 3 N + 1000 tasks, each answered to the end, until ``tasks``
            per = 3 * n + 1000
            bursts = max(1, tasks // per)
            count = per * bursts
            t0 = perf()
            for _ in range(bursts):
                for _ in range(per):
                    submit(new_job(), 0.0)
                drain()
                # every 10th daemon is a straggler: after its first task, its answers come
                # after all the others', so idle daemons revoke the tasks prefetched behind it
                late: deque[tuple[Any, Any]] = deque()
                answered: set[Any] = set()  # a straggler answers its first task in time
                while inflight or late:
                    d, job = inflight.popleft() if inflight else late.popleft()
                    key = (d, job.id)
                    if key in revoked:
                        revoked.discard(key)
                        continue
                    if inflight and d.pid % 10 == 1 and d in answered:
                        late.append((d, job))
                        continue
                    answered.add(d)
                    s.result(d, job.id, VALUE, None, 0.0)
                    drain()
            dt = perf() - t0
            assert counts["resolved"] == count, (counts, count)
            assert not s.queued and len(s.idle) == n
    finally:
        gc.enable()
    return {
        "daemons": n,
        "regime": regime,
        "dispatches": count,
        "seconds": dt,
        "ns_per_dispatch": dt / count * 1e9,
        "sends": counts["sends"],
        "revokes": counts["revokes"],
        "resolved": counts["resolved"],
    }


def section_sim(sims: list[int], tasks: int, reps: int) -> dict[str, Any]:
    print(
        f"\n## 1. pure scheduler: ns per dispatch (submit + SEND + result + RESOLVE), "
        f"{tasks:,} tasks, median of {reps} interleaved runs"
    )
    res: dict[str, Any] = {}
    for regime in ("backlog", "idle", "burst"):
        runs: dict[int, list[dict[str, Any]]] = {n: [] for n in sims}
        for _ in range(reps):
            for n in sims:
                runs[n].append(_sim(n, tasks, regime))
        rows = {}
        for n in sims:
            nss = [r["ns_per_dispatch"] for r in runs[n]]
            rows[n] = {
                "ns_per_dispatch_median": statistics.median(nss),
                "ns_per_dispatch_runs": nss,
                "dispatches": runs[n][0]["dispatches"],
                "revokes": runs[n][0]["revokes"],
            }
        base = rows[sims[0]]["ns_per_dispatch_median"]
        for n in sims:
            rows[n]["ratio_vs_first"] = rows[n]["ns_per_dispatch_median"] / base
        res[regime] = rows

    print(
        f"\n| regime | N daemons | dispatches | ns/dispatch (median) | runs | ratio vs N={sims[0]} |"
    )
    print("|---|---:|---:|---:|---|---:|")
    for regime, rows in res.items():
        for n, r in rows.items():
            rr = " ".join(f"{x:.0f}" for x in r["ns_per_dispatch_runs"])
            print(
                f"| {regime} | {n:,} | {r['dispatches']:,} | {r['ns_per_dispatch_median']:.0f} "
                f"| {rr} | {r['ratio_vs_first']:.2f} |",
                flush=True,
            )
    return res


# ---------------------------------------------------------------------------------------
# 2. host memory per queued task (child process)
# ---------------------------------------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _sizeof_parts(h: Any) -> dict[str, Any]:
    """sys.getsizeof of what one queued task holds on the host."""
    parts: dict[str, Any] = {"Mirai": sys.getsizeof(h), "Mirai.id int": sys.getsizeof(h.id)}
    job = getattr(h, "_job", None)
    frames = None
    if job is not None and job is not h:
        parts[type(job).__name__] = sys.getsizeof(job)
        frames = getattr(job, "frames", None)
    if frames is None:
        for attr in ("_frames", "frames"):
            frames = getattr(h, attr, None)
            if frames is not None:
                break
    if isinstance(frames, bytes):  # a one-frame task is kept bare (no list)
        frames = [frames]
        parts["frames list"] = 0
    elif frames is not None:
        parts["frames list"] = sys.getsizeof(frames)
    if frames is not None:
        parts["frames"] = [
            {"type": type(f).__name__, "len": len(f), "sizeof": sys.getsizeof(f)} for f in frames
        ]
        parts["frames total"] = sum(sys.getsizeof(f) for f in frames)
    parts["list slot (user's list)"] = 8
    parts["queue slot (deque)"] = 8
    return parts


def mem_child(n: int, trace: bool) -> dict[str, Any]:
    import tracemalloc

    import asyncmirai as am

    am.daemons(url=am.local_url())  # no daemon dials it: every task stays queued
    m0 = am.mirai(inc, 0)  # warm every code path (codecs, dispatcher thread, ...)
    while am.status().awaiting < 1:
        time.sleep(0.01)
    gc.collect()
    if trace:
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
    rss0 = _rss()
    t0 = perf()
    hs = [am.mirai(inc, i) for i in range(n)]
    t_submit = perf() - t0
    deadline = time.monotonic() + 120
    while am.status().awaiting < n + 1 and time.monotonic() < deadline:
        time.sleep(0.05)  # the dispatcher thread absorbs the last hand-offs
    awaiting = am.status().awaiting
    gc.collect()
    rss1 = _rss()
    out: dict[str, Any] = {
        "tasks": n,
        "queued_seen": awaiting - 1,
        "submit_s": t_submit,
        "rss_delta_bytes": rss1 - rss0,
        "rss_bytes_per_task": (rss1 - rss0) / n,
        "parts": _sizeof_parts(hs[n // 2]),
    }
    if trace:
        cur = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        out["traced_delta_bytes"] = cur - base
        out["traced_bytes_per_task"] = (cur - base) / n
    del hs, m0
    am.daemons(0)
    return out


# ---------------------------------------------------------------------------------------
# 3. real local daemons (child process)
# ---------------------------------------------------------------------------------------


def real_child(n: int, tp_tasks: int, rt_calls: int) -> dict[str, Any]:
    import asyncmirai as am

    async def main() -> dict[str, Any]:
        t0 = perf()
        d = am.daemons(n)
        while am.status().connections < n:
            await asyncio.sleep(0.002)
            if perf() - t0 > 300:
                raise RuntimeError(f"only {am.status().connections}/{n} daemons connected")
        connect = perf() - t0
        res = await asyncio.gather(*[am.mirai(inc, i) for i in range(max(200, 2 * n))])
        assert res[0] == 1
        samples = []
        for i in range(rt_calls):
            t = perf()
            await am.mirai(inc, i)
            samples.append(perf() - t)
        t = perf()
        res = await asyncio.gather(*[am.mirai(inc, i) for i in range(tp_tasks)])
        gather_s = perf() - t
        assert len(res) == tp_tasks and res[-1] == tp_tasks
        t = perf()
        res = await am.mirai_map(inc, range(tp_tasks))
        map_s = perf() - t
        assert len(res) == tp_tasks and res[-1] == tp_tasks
        t = perf()
        async with d:
            pass
        reset_s = perf() - t
        return {
            "daemons": n,
            "connect_s": connect,
            "rt": summarize_us(samples),
            "gather_tasks_per_s": tp_tasks / gather_s,
            "map_tasks_per_s": tp_tasks / map_s,
            "reset_s": reset_s,
        }

    return asyncio.run(main())


# ---------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------


def _child(tree: Path, args: list[str], timeout: float) -> dict[str, Any]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(BENCH_DIR), str(tree)])
    env["AM_SCALE_TREE"] = str(tree)
    r = subprocess.run(
        [sys.executable, str(BENCH_DIR / "scale.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=tree,
    )
    if r.returncode != 0:
        raise RuntimeError(f"child {args} in {tree} failed: {r.stderr.strip()[-1500:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


class OldTree:
    """A temporary git worktree of an older commit (removed on exit)."""

    def __init__(self, commit: str | None) -> None:
        self.commit = commit
        self.path: Path | None = None

    def __enter__(self) -> Path | None:
        if not self.commit:
            return None
        self.path = Path(tempfile.mkdtemp(prefix="am-scale-old-")) / "tree"
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", str(self.path), self.commit],
            check=True,
            capture_output=True,
        )
        return self.path

    def __exit__(self, *exc: object) -> None:
        if self.path is not None:
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "remove", "--force", str(self.path)],
                capture_output=True,
            )
            shutil.rmtree(self.path.parent, ignore_errors=True)


def _trees(old: Path | None) -> list[tuple[str, Path]]:
    return [("new", REPO)] + ([("old", old)] if old is not None else [])


def section_mem(old: Path | None, n: int, reps: int) -> dict[str, Any]:
    print(f"\n## 2. host memory per queued task ({n:,} queued, no daemon; fresh interpreters)")
    res: dict[str, Any] = {}
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for _ in range(reps):
        for label, tree in _trees(old):
            for mode in ("rss", "trace"):
                r = _child(tree, ["--mem-child", str(n), mode], timeout=900)
                runs.setdefault(label, {}).setdefault(mode, []).append(r)
    print("\n| code | RSS B/task (median) | RSS runs | tracemalloc B/task (median) | runs |")
    print("|---|---:|---|---:|---|")
    for label, by in runs.items():
        rss = [r["rss_bytes_per_task"] for r in by["rss"]]
        tr = [r["traced_bytes_per_task"] for r in by["trace"]]
        res[label] = {
            "rss_bytes_per_task_median": statistics.median(rss),
            "rss_bytes_per_task_runs": rss,
            "traced_bytes_per_task_median": statistics.median(tr),
            "traced_bytes_per_task_runs": tr,
            "submit_s_runs": [r["submit_s"] for r in by["rss"]],
            "parts": by["rss"][0]["parts"],
        }
        print(
            f"| {label} | {statistics.median(rss):.0f} | {' '.join(f'{x:.0f}' for x in rss)} "
            f"| {statistics.median(tr):.0f} | {' '.join(f'{x:.0f}' for x in tr)} |"
        )
    for label, r in res.items():
        p = r["parts"]
        fr = ", ".join(f"{f['type']}[{f['len']}] {f['sizeof']}" for f in p.get("frames", []))
        objs = ", ".join(
            f"{k} {v}" for k, v in p.items() if isinstance(v, int) and k != "frames total"
        )
        total = sum(v for k, v in p.items() if isinstance(v, int))
        print(f"\n{label}: sys.getsizeof of one queued task: {objs}; frames: {fr}; sum {total} B")
    return res


def section_real(
    old: Path | None, ns: list[int], tp_tasks: int, rt_calls: int, reps: int
) -> dict[str, Any]:
    print(
        f"\n## 3. real local daemons: connect, {tp_tasks:,} tiny tasks, {rt_calls} awaited round "
        f"trips (median of {reps} interleaved runs, fresh interpreters)"
    )
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    errors: dict[str, str] = {}
    for _ in range(reps):
        for n in ns:
            for label, tree in _trees(old):
                try:
                    r = _child(
                        tree,
                        ["--real-child", str(n), str(tp_tasks), str(rt_calls)],
                        timeout=600,
                    )
                except Exception as e:  # keep the other numbers
                    errors[f"{label}.{n}"] = str(e)[-800:]
                    print(f"  !! {label} n={n}: {str(e)[-800:]}", file=sys.stderr)
                    continue
                runs.setdefault((label, n), []).append(r)
    res: dict[str, Any] = {"errors": errors}
    print(
        "\n| code | daemons | connect s | gather tasks/s | mirai_map tasks/s | rt median us "
        "| rt p99 us | per-run gather tasks/s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for (label, n), rs in runs.items():
        row = {
            "connect_s": statistics.median(r["connect_s"] for r in rs),
            "gather_tasks_per_s": statistics.median(r["gather_tasks_per_s"] for r in rs),
            "map_tasks_per_s": statistics.median(r["map_tasks_per_s"] for r in rs),
            "rt_median_us": statistics.median(r["rt"]["median_us"] for r in rs),
            "rt_p99_us": statistics.median(r["rt"]["p99_us"] for r in rs),
            "runs": rs,
        }
        res.setdefault(label, {})[str(n)] = row
    for n in ns:
        for label, _tree in _trees(old):
            row = res.get(label, {}).get(str(n))
            if row is None:
                continue
            per = " ".join(f"{r['gather_tasks_per_s']:.0f}" for r in row["runs"])
            print(
                f"| {label} | {n} | {row['connect_s']:.2f} | {row['gather_tasks_per_s']:.0f} "
                f"| {row['map_tasks_per_s']:.0f} | {row['rt_median_us']:.0f} "
                f"| {row['rt_p99_us']:.0f} | {per} |",
                flush=True,
            )
    for label in [lb for lb, _ in _trees(old)]:
        rows = res.get(label, {})
        if str(ns[0]) in rows:
            base = rows[str(ns[0])]
            for n in ns[1:]:
                if str(n) in rows:
                    r = rows[str(n)]
                    r["ratio_vs_first"] = {
                        "gather_tasks_per_s": r["gather_tasks_per_s"] / base["gather_tasks_per_s"],
                        "map_tasks_per_s": r["map_tasks_per_s"] / base["map_tasks_per_s"],
                        "rt_median_us": r["rt_median_us"] / base["rt_median_us"],
                    }
                    q = r["ratio_vs_first"]
                    print(
                        f"{label}: {n} vs {ns[0]} daemons: gather x{q['gather_tasks_per_s']:.2f}, "
                        f"mirai_map x{q['map_tasks_per_s']:.2f}, round trip x{q['rt_median_us']:.2f}"
                    )
    return res


def _am_file() -> str:
    import asyncmirai

    return str(asyncmirai.__file__)


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="10^5 tasks, 1 rep, smaller runs")
    ap.add_argument("--tasks", type=int, help="pure-scheduler dispatches per run (10^6)")
    ap.add_argument("--sim", default="10,1000,10000", help="simulated daemon counts")
    ap.add_argument("--mem-tasks", type=int, help="queued tasks for the memory figure (10^6)")
    ap.add_argument("--daemons", default="2,64,200", help="real local daemon counts")
    ap.add_argument("--tp-tasks", type=int, help="tiny tasks for tasks/s (20,000)")
    ap.add_argument("--rt-calls", type=int, help="awaited round trips per run (1,000)")
    ap.add_argument("--reps", type=int, help="runs of each measurement (3; 1 with --quick)")
    ap.add_argument("--mem-reps", type=int, default=1, help="memory runs per tree (1)")
    ap.add_argument("--old", default=OLD_DEFAULT, help="commit to compare with, or 'none'")
    ap.add_argument("--skip", default="", help="sections to skip: sim,mem,real")
    ap.add_argument("--out", default=str(BENCH_DIR / "results" / "scale.json"))
    ap.add_argument("--mem-child", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--real-child", nargs=3, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.mem_child:
        r = mem_child(int(args.mem_child[0]), args.mem_child[1] == "trace")
        print(json.dumps({**r, "module": _am_file()}))
        return
    if args.real_child:
        print(json.dumps({**real_child(*args.real_child), "module": _am_file()}))
        return

    q = args.quick
    tasks = args.tasks or (100_000 if q else 1_000_000)
    mem_tasks = args.mem_tasks or (100_000 if q else 1_000_000)
    tp_tasks = args.tp_tasks or (4_000 if q else 20_000)
    rt_calls = args.rt_calls or (300 if q else 1_000)
    reps = args.reps or (1 if q else 3)
    skip = set(args.skip.split(","))
    old_commit = None if args.old.lower() in ("", "none") else args.old

    t_start = perf()
    load_before = os.getloadavg()
    print(
        f"# asyncmirai scale ({'quick' if q else 'full'}): python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, load {load_before[0]:.2f} {load_before[1]:.2f} "
        f"{load_before[2]:.2f}; old = {old_commit}"
    )
    result: dict[str, Any] = {
        "mode": "quick" if q else "full",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg_before": load_before,
        "head": subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
        ).stdout.strip(),
        "dirty_tree": bool(
            subprocess.run(
                ["git", "-C", str(REPO), "status", "--porcelain", "asyncmirai"],
                capture_output=True,
                text=True,
            ).stdout.strip()
        ),
        "old": old_commit,
        "config": {
            "tasks": tasks,
            "sim": _ints(args.sim),
            "mem_tasks": mem_tasks,
            "daemons": _ints(args.daemons),
            "tp_tasks": tp_tasks,
            "rt_calls": rt_calls,
            "reps": reps,
            "mem_reps": args.mem_reps,
        },
    }
    if "sim" not in skip:
        result["scheduler"] = section_sim(_ints(args.sim), tasks, reps)
    with OldTree(old_commit if skip & {"mem", "real"} != {"mem", "real"} else None) as old:
        if "mem" not in skip:
            result["memory"] = section_mem(old, mem_tasks, args.mem_reps)
        if "real" not in skip:
            result["real"] = section_real(old, _ints(args.daemons), tp_tasks, rt_calls, reps)
    load_after = os.getloadavg()
    result["loadavg_after"] = load_after
    result["total_s"] = perf() - t_start
    print(
        f"\n# total {result['total_s']:.1f} s; load after {load_after[0]:.2f} "
        f"{load_after[1]:.2f} {load_after[2]:.2f}"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"# wrote {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")


if __name__ == "__main__":
    main()
