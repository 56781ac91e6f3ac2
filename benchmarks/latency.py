"""Round-trip latency, throughput and start-up of asyncmirai against its peers.

Run as a script (not a test), from the repository root::

    .venv/bin/python benchmarks/latency.py            # full, ~1-2 minutes
    .venv/bin/python benchmarks/latency.py --quick    # smoke run, < 40 s
    .venv/bin/python benchmarks/latency.py --only startup --startup-reps 15

Everything is measured in the same run on the same machine:

1. sequential awaited round trip of a tiny task (median, p99, microseconds):
   a bare blocking pyzmq DEALER/ROUTER ipc echo (the floor), the same echo driven from
   asyncio via ``loop.add_reader`` on the zmq FD, asyncmirai (dispatcher on the caller's
   loop; dispatcher on a private thread awaited from asyncio; ``.result()`` from sync code),
   ``anyio.to_process.run_sync``, ``ProcessPoolExecutor`` and loky via ``run_in_executor``;
2. throughput of N (20,000) tiny tasks with 2 workers;
3. start-up to the first result with 2 workers, each in a fresh interpreter whose modules
   are already imported (so only pool/daemon start-up is timed).

Prints tables and the ratios issue 2 sets targets for, and writes
``benchmarks/results/latency.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import faulthandler
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

warnings.filterwarnings("ignore", category=DeprecationWarning)

from _common import BENCH_DIR, REPO, share_import_path  # noqa: E402

share_import_path()  # every peer must import _common.inc by name
from _common import inc, summarize_us  # noqa: E402

perf = time.perf_counter
WORKERS = 2


class Cfg:
    def __init__(self, quick: bool) -> None:
        self.quick = quick
        self.warmup = 100 if quick else 200
        self.calls = 400 if quick else 800  # timed calls per round
        self.rounds = 1 if quick else 5  # round-trip peers interleaved, to spread load noise
        self.block = 50  # calls per block in section 1b
        self.blocks = 6 if quick else 30  # rounds of blocks in section 1b
        self.tp_rounds = 1 if quick else 2
        self.tasks = 4000 if quick else 20_000
        self.startup_reps = 1 if quick else 3


# ---------------------------------------------------------------------------------------
# 1. sequential round trip
# ---------------------------------------------------------------------------------------


@contextmanager
def echo_process() -> Iterator[str]:
    """A ROUTER echo server in a separate process; yields its ipc address."""
    tmp = tempfile.mkdtemp(prefix="am-bench-")
    addr = f"ipc://{tmp}/echo"
    proc = subprocess.Popen(
        [sys.executable, str(BENCH_DIR / "_common.py"), "echo", addr],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield addr
    finally:
        import zmq

        ctx = zmq.Context()
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 200)
        s.connect(addr)
        s.send(b"quit")
        s.close()
        ctx.term()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for f in Path(tmp).iterdir():
            f.unlink()
        os.rmdir(tmp)


def rt_zmq_blocking(cfg: Cfg) -> list[float]:
    import zmq

    with echo_process() as addr:
        ctx = zmq.Context()
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(addr)
        try:
            msg = b"x" * 16
            for _ in range(cfg.warmup):
                s.send(msg)
                s.recv()
            out = []
            for _ in range(cfg.calls):
                t0 = perf()
                s.send(msg)
                s.recv()
                out.append(perf() - t0)
        finally:
            s.close(0)
            ctx.term()
    return out


def rt_zmq_asyncio(cfg: Cfg) -> list[float]:
    import zmq

    async def main(addr: str) -> list[float]:
        loop = asyncio.get_running_loop()
        ctx = zmq.Context()
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(addr)
        waiter: list[asyncio.Future[None] | None] = [None]

        def on_readable() -> None:
            # the zmq FD is edge-triggered: reading EVENTS re-arms it
            if s.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                f = waiter[0]
                if f is not None and not f.done():
                    f.set_result(None)

        fd = s.getsockopt(zmq.FD)
        loop.add_reader(fd, on_readable)

        async def roundtrip(msg: bytes) -> bytes:
            s.send(msg, zmq.NOBLOCK)
            while True:
                try:
                    return s.recv(zmq.NOBLOCK)
                except zmq.Again:
                    pass
                f = waiter[0] = loop.create_future()
                await f
                waiter[0] = None

        try:
            msg = b"x" * 16
            for _ in range(cfg.warmup):
                await roundtrip(msg)
            out = []
            for _ in range(cfg.calls):
                t0 = perf()
                await roundtrip(msg)
                out.append(perf() - t0)
            return out
        finally:
            loop.remove_reader(fd)
            s.close(0)
            ctx.term()

    with echo_process() as addr:
        return asyncio.run(main(addr))


def rt_am_inloop(cfg: Cfg) -> list[float]:
    import asyncmirai as am

    async def main() -> list[float]:
        async with am.daemons(WORKERS):
            for i in range(cfg.warmup):
                assert await am.mirai(inc, i) == i + 1
            out = []
            for i in range(cfg.calls):
                t0 = perf()
                await am.mirai(inc, i)
                out.append(perf() - t0)
            return out

    return asyncio.run(main())


def rt_am_thread_asyncio(cfg: Cfg) -> list[float]:
    import asyncmirai as am

    async def main() -> list[float]:
        for i in range(cfg.warmup):
            assert await am.mirai(inc, i) == i + 1
        out = []
        for i in range(cfg.calls):
            t0 = perf()
            await am.mirai(inc, i)
            out.append(perf() - t0)
        return out

    with am.daemons(WORKERS):  # outside any loop: private dispatcher thread
        return asyncio.run(main())


def rt_am_sync(cfg: Cfg) -> list[float]:
    import asyncmirai as am

    with am.daemons(WORKERS):
        for i in range(cfg.warmup):
            assert am.mirai(inc, i).result(timeout=30) == i + 1
        out = []
        for i in range(cfg.calls):
            t0 = perf()
            am.mirai(inc, i).result()
            out.append(perf() - t0)
    return out


def rt_anyio(cfg: Cfg) -> list[float]:
    import anyio
    import anyio.to_process

    async def main() -> list[float]:
        for i in range(cfg.warmup):
            assert await anyio.to_process.run_sync(inc, i) == i + 1
        out = []
        for i in range(cfg.calls):
            t0 = perf()
            await anyio.to_process.run_sync(inc, i)
            out.append(perf() - t0)
        return out

    # anyio terminates its worker processes when this run's event loop ends
    return anyio.run(main, backend="asyncio")


def _rt_executor(cfg: Cfg, ex: concurrent.futures.Executor) -> list[float]:
    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        for i in range(cfg.warmup):
            assert await loop.run_in_executor(ex, inc, i) == i + 1
        out = []
        for i in range(cfg.calls):
            t0 = perf()
            await loop.run_in_executor(ex, inc, i)
            out.append(perf() - t0)
        return out

    return asyncio.run(main())


def rt_ppe(cfg: Cfg) -> list[float]:
    with concurrent.futures.ProcessPoolExecutor(WORKERS) as ex:
        return _rt_executor(cfg, ex)


def rt_loky(cfg: Cfg) -> list[float]:
    from loky import get_reusable_executor

    ex = get_reusable_executor(max_workers=WORKERS, timeout=60)
    try:
        return _rt_executor(cfg, ex)
    finally:
        ex.shutdown(wait=True, kill_workers=True)


# ---------------------------------------------------------------------------------------
# 1b. interleaved blocks in one process: every mode against anyio.to_process
# ---------------------------------------------------------------------------------------


def main_inc(x: int) -> int:
    """``inc`` defined in the script: run as ``python benchmarks/latency.py`` it lives in
    ``__main__`` and cloudpickle sends it by value (the case of scripts and notebooks)."""
    return x + 1


IL_METHODS = [
    ("anyio", "anyio.to_process.run_sync (importable inc)"),
    ("am_inloop", "asyncmirai await, in-loop, importable inc"),
    ("am_inloop_main", "asyncmirai await, in-loop, __main__ function"),
    ("am_thread_asyncio", "asyncmirai await, private dispatcher thread (hop)"),
    ("am_sync", "asyncmirai .result() from a plain thread"),
    ("am_sync_main", "asyncmirai .result(), __main__ function"),
]


def rt_interleaved(cfg: Cfg) -> dict[str, list[list[float]]]:
    """Blocks of ``cfg.block`` sequential calls per method, rotated ``cfg.blocks`` times in
    one process and one asyncio loop, so load drift hits every method alike; returns the
    seconds per call, by method and block (paired ratios use the same round's blocks).

    Profiles: ``il-loop`` started in the loop (in-loop dispatcher), ``il-thread`` started
    before it (private dispatcher thread), awaited from the loop ("hop") and waited on
    with ``.result()`` from a worker thread that has no loop (a plain script's path)."""
    import anyio
    import anyio.to_process

    import asyncmirai as am

    blocks: dict[str, list[list[float]]] = {k: [] for k, _ in IL_METHODS}
    n = cfg.block

    def sync_block(fn: Callable[[int], int]) -> list[float]:
        out = []
        for i in range(n):
            t0 = perf()
            am.mirai(fn, i, _compute="il-thread").result()
            out.append(perf() - t0)
        return out

    async def main() -> None:
        loop = asyncio.get_running_loop()

        async def await_block(fn: Callable[[int], int], compute: str) -> list[float]:
            out = []
            for i in range(n):
                t0 = perf()
                await am.mirai(fn, i, _compute=compute)
                out.append(perf() - t0)
            return out

        async def anyio_block() -> list[float]:
            out = []
            for i in range(n):
                t0 = perf()
                await anyio.to_process.run_sync(inc, i)
                out.append(perf() - t0)
            return out

        runs = {
            "anyio": anyio_block,
            "am_inloop": lambda: await_block(inc, "il-loop"),
            "am_inloop_main": lambda: await_block(main_inc, "il-loop"),
            "am_thread_asyncio": lambda: await_block(inc, "il-thread"),
            "am_sync": lambda: loop.run_in_executor(None, sync_block, inc),
            "am_sync_main": lambda: loop.run_in_executor(None, sync_block, main_inc),
        }
        async with am.daemons(WORKERS, compute="il-loop"):
            for _ in range(3):  # warm-up: pools started, caches filled
                for run in runs.values():
                    await run()
            for _ in range(cfg.blocks):
                for key, run in runs.items():
                    blocks[key].append(await run())

    with am.daemons(WORKERS, compute="il-thread"):  # outside any loop: private thread
        anyio.run(main, backend="asyncio")
    return blocks


def interleaved_summary(blocks: dict[str, list[list[float]]]) -> dict[str, Any]:
    """Median per method, and the median over rounds of (method's block median /
    anyio's block median in the same round), with its quartiles."""
    import statistics

    out: dict[str, Any] = {}
    base = [statistics.median(b) for b in blocks["anyio"]]
    for key, desc in IL_METHODS:
        if not blocks.get(key):
            continue
        meds = [statistics.median(b) for b in blocks[key]]
        ratios = sorted(m / a for m, a in zip(meds, base, strict=True))
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        out[key] = {
            "desc": desc,
            "median_us": statistics.median([x for b in blocks[key] for x in b]) * 1e6,
            "ratio_vs_anyio": statistics.median(ratios),
            "ratio_q1": q[0],
            "ratio_q3": q[2],
        }
    return out


# ---------------------------------------------------------------------------------------
# 2. throughput of cfg.tasks tiny tasks on 2 workers
# ---------------------------------------------------------------------------------------

WARM_TP = 200


def _check(res: list[int], n: int) -> None:
    assert len(res) == n and res[0] == 1 and res[-1] == n, (len(res), res[:3], res[-3:])


def tp_am_gather(cfg: Cfg) -> dict[str, Any]:
    import asyncmirai as am

    async def main() -> float:
        async with am.daemons(WORKERS):
            await asyncio.gather(*[am.mirai(inc, i) for i in range(WARM_TP)])
            t0 = perf()
            res = await asyncio.gather(*[am.mirai(inc, i) for i in range(cfg.tasks)])
            dt = perf() - t0
            _check(res, cfg.tasks)
            return dt

    dt = asyncio.run(main())
    return {"tasks": cfg.tasks, "seconds": dt, "tasks_per_s": cfg.tasks / dt}


def tp_am_collect(cfg: Cfg) -> dict[str, Any] | None:
    import asyncmirai as am

    if not hasattr(am, "collect"):
        return None

    async def main() -> float:
        async with am.daemons(WORKERS):
            await am.collect([am.mirai(inc, i) for i in range(WARM_TP)])
            t0 = perf()
            res = await am.collect([am.mirai(inc, i) for i in range(cfg.tasks)])
            dt = perf() - t0
            _check(list(res), cfg.tasks)
            return dt

    dt = asyncio.run(main())
    return {"tasks": cfg.tasks, "seconds": dt, "tasks_per_s": cfg.tasks / dt}


def tp_am_sync(cfg: Cfg) -> dict[str, Any]:
    import asyncmirai as am

    with am.daemons(WORKERS):
        for m in [am.mirai(inc, i) for i in range(WARM_TP)]:
            m.result(timeout=30)
        t0 = perf()
        ms = [am.mirai(inc, i) for i in range(cfg.tasks)]
        res = [m.result() for m in ms]
        dt = perf() - t0
    _check(res, cfg.tasks)
    return {"tasks": cfg.tasks, "seconds": dt, "tasks_per_s": cfg.tasks / dt}


def tp_anyio(cfg: Cfg) -> dict[str, Any]:
    import anyio
    import anyio.to_process

    async def run_all(n: int, limiter: anyio.CapacityLimiter) -> list[int]:
        res = [0] * n

        async def one(i: int) -> None:
            res[i] = await anyio.to_process.run_sync(inc, i, limiter=limiter)

        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(one, i)
        return res

    async def main() -> float:
        limiter = anyio.CapacityLimiter(WORKERS)
        await run_all(WARM_TP, limiter)
        t0 = perf()
        res = await run_all(cfg.tasks, limiter)
        dt = perf() - t0
        _check(res, cfg.tasks)
        return dt

    dt = anyio.run(main, backend="asyncio")
    return {"tasks": cfg.tasks, "seconds": dt, "tasks_per_s": cfg.tasks / dt}


def tp_ppe_map(cfg: Cfg) -> dict[str, Any]:
    with concurrent.futures.ProcessPoolExecutor(WORKERS) as ex:
        list(ex.map(inc, range(WARM_TP), chunksize=1))
        t0 = perf()
        res = list(ex.map(inc, range(cfg.tasks), chunksize=1))
        dt = perf() - t0
    _check(res, cfg.tasks)
    return {"tasks": cfg.tasks, "seconds": dt, "tasks_per_s": cfg.tasks / dt}


async def _gather_executor(ex: concurrent.futures.Executor, n: int) -> list[int]:
    loop = asyncio.get_running_loop()
    return await asyncio.gather(*[loop.run_in_executor(ex, inc, i) for i in range(n)])


def _tp_executor_gather(cfg: Cfg, ex: concurrent.futures.Executor) -> dict[str, Any]:
    async def main() -> float:
        await _gather_executor(ex, WARM_TP)
        t0 = perf()
        res = await _gather_executor(ex, cfg.tasks)
        dt = perf() - t0
        _check(res, cfg.tasks)
        return dt

    dt = asyncio.run(main())
    return {"tasks": cfg.tasks, "seconds": dt, "tasks_per_s": cfg.tasks / dt}


def tp_ppe_gather(cfg: Cfg) -> dict[str, Any]:
    with concurrent.futures.ProcessPoolExecutor(WORKERS) as ex:
        return _tp_executor_gather(cfg, ex)


def tp_loky_gather(cfg: Cfg) -> dict[str, Any]:
    from loky import get_reusable_executor

    ex = get_reusable_executor(max_workers=WORKERS, timeout=60)
    try:
        return _tp_executor_gather(cfg, ex)
    finally:
        ex.shutdown(wait=True, kill_workers=True)


def tp_aiomp_map(cfg: Cfg) -> dict[str, Any] | None:
    """aiomultiprocess ``Pool(2).map`` of a coroutine ``inc`` (its workers run coroutines only)."""
    try:
        from aiomultiprocess import Pool
    except ImportError:
        return None
    from _common import ainc

    async def main() -> float:
        async with Pool(processes=WORKERS, childconcurrency=1) as pool:
            await pool.map(ainc, range(WARM_TP))
            t0 = perf()
            res = await pool.map(ainc, range(cfg.tasks))
            dt = perf() - t0
            _check(list(res), cfg.tasks)
            return dt

    dt = asyncio.run(main())
    return {"tasks": cfg.tasks, "seconds": dt, "tasks_per_s": cfg.tasks / dt}


def tp_loky_map(cfg: Cfg) -> dict[str, Any]:
    from loky import get_reusable_executor

    ex = get_reusable_executor(max_workers=WORKERS, timeout=60)
    try:
        list(ex.map(inc, range(WARM_TP), chunksize=1))
        t0 = perf()
        res = list(ex.map(inc, range(cfg.tasks), chunksize=1))
        dt = perf() - t0
    finally:
        ex.shutdown(wait=True, kill_workers=True)
    _check(res, cfg.tasks)
    return {"tasks": cfg.tasks, "seconds": dt, "tasks_per_s": cfg.tasks / dt}


# ---------------------------------------------------------------------------------------
# 3. start-up to the first result (each in a fresh interpreter, modules pre-imported)
# ---------------------------------------------------------------------------------------


def _startup_child(name: str) -> float:
    """Runs in a fresh interpreter: time from pool/daemon creation to the first result."""
    import anyio
    import anyio.to_process
    import loky
    import zmq  # noqa: F401

    import asyncmirai as am
    import asyncmirai._api  # noqa: F401  (host-side machinery imported before timing)

    if name == "asyncmirai_asyncio":

        async def main() -> float:
            t0 = perf()
            d = am.daemons(WORKERS)
            assert await am.mirai(inc, 1) == 2
            dt = perf() - t0
            async with d:
                pass
            return dt

        return asyncio.run(main())
    if name == "asyncmirai_sync":
        t0 = perf()
        d = am.daemons(WORKERS)
        assert am.mirai(inc, 1).result(timeout=30) == 2
        dt = perf() - t0
        with d:
            pass
        return dt
    if name == "anyio_to_process":

        async def amain() -> float:
            t0 = perf()
            assert await anyio.to_process.run_sync(inc, 1) == 2
            return perf() - t0

        return anyio.run(amain, backend="asyncio")
    if name == "loky":
        t0 = perf()
        ex = loky.get_reusable_executor(max_workers=WORKERS)
        assert ex.submit(inc, 1).result() == 2
        dt = perf() - t0
        ex.shutdown(wait=True, kill_workers=True)
        return dt
    if name == "ProcessPoolExecutor":
        t0 = perf()
        ex = concurrent.futures.ProcessPoolExecutor(WORKERS)
        assert ex.submit(inc, 1).result() == 2
        dt = perf() - t0
        ex.shutdown(wait=True)
        return dt
    raise ValueError(name)


SECTIONS = ["roundtrip", "throughput", "startup"]

STARTUP_PEERS = [
    "asyncmirai_asyncio",
    "asyncmirai_sync",
    "anyio_to_process",
    "loky",
    "ProcessPoolExecutor",
]


def fresh_bytecode() -> None:
    """Bring asyncmirai's and this directory's ``.pyc`` files up to date before timing.

    Daemons import asyncmirai from the source tree: with PYTHONDONTWRITEBYTECODE=1 (set
    in some dev shells) and a module edited since its ``.pyc`` was written, every daemon
    compiled it again (first result ~150 ms instead of ~80 ms with no ``.pyc`` at all,
    measured), a cost no installed copy has; the peers' modules are compiled already.
    """
    import compileall

    for d in (REPO / "asyncmirai", BENCH_DIR):
        compileall.compile_dir(str(d), maxlevels=0, quiet=1)


def startup_once(name: str) -> float:
    """One fresh interpreter: seconds from pool/daemon creation to the first result."""
    r = subprocess.run(
        [sys.executable, __file__, "--startup-child", name],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if r.returncode != 0:
        raise RuntimeError(f"startup child {name} failed: {r.stderr.strip()[-800:]}")
    return float(json.loads(r.stdout.strip().splitlines()[-1])["seconds"])


def startup_summary(vals: list[float]) -> dict[str, Any]:
    vals = sorted(vals)
    return {"runs_s": vals, "median_s": vals[len(vals) // 2], "min_s": vals[0]}


# ---------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------

RT = [
    ("zmq_blocking_echo", "pyzmq DEALER/ROUTER ipc echo, blocking (floor)", rt_zmq_blocking),
    ("zmq_asyncio_echo", "same echo from asyncio via add_reader", rt_zmq_asyncio),
    ("am_inloop", "asyncmirai await, dispatcher on caller's loop", rt_am_inloop),
    ("am_thread_asyncio", "asyncmirai await, private dispatcher thread", rt_am_thread_asyncio),
    ("am_sync", "asyncmirai .result() from sync code", rt_am_sync),
    ("anyio_to_process", "anyio.to_process.run_sync", rt_anyio),
    ("ppe", "ProcessPoolExecutor via run_in_executor", rt_ppe),
    ("loky", "loky reusable executor via run_in_executor", rt_loky),
]

TP = [
    ("am_gather", "asyncmirai mirai x N + asyncio.gather (in-loop)", tp_am_gather),
    ("am_collect", "asyncmirai mirai x N + am.collect (in-loop)", tp_am_collect),
    ("am_sync", "asyncmirai mirai x N + .result() (dispatcher thread)", tp_am_sync),
    ("anyio_to_process", "anyio.to_process, CapacityLimiter(2) + task group", tp_anyio),
    ("aiomp_map", "aiomultiprocess Pool(2).map (coroutine inc)", tp_aiomp_map),
    ("ppe_map", "ProcessPoolExecutor.map(chunksize=1)", tp_ppe_map),
    ("ppe_gather", "ProcessPoolExecutor run_in_executor + gather", tp_ppe_gather),
    ("loky_map", "loky .map(chunksize=1)", tp_loky_map),
    ("loky_gather", "loky run_in_executor + gather", tp_loky_gather),
]


def _run(label: str, fn: Callable[[], Any], errors: dict[str, str]) -> Any:
    gc.collect()
    try:
        return fn()
    except Exception as e:  # one broken peer must not lose the others' numbers
        errors[label] = f"{type(e).__name__}: {e}"
        print(f"  !! {label} failed: {errors[label]}", file=sys.stderr)
        traceback.print_exc()
        return None


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="fewer calls/tasks (smoke run, < 40 s)")
    ap.add_argument(
        "--out",
        help="JSON results file (default: results/latency.json; not written with --only)",
    )
    ap.add_argument(
        "--cpus",
        help="pin this process and every peer it starts to these CPUs, e.g. '0' or '0,1' "
        "(cross-CPU wake-ups dominate the noise on small VMs)",
    )
    ap.add_argument(
        "--only",
        action="append",
        choices=SECTIONS,
        help="run only this section (repeatable; default: all)",
    )
    ap.add_argument(
        "--startup-reps",
        type=int,
        help="fresh interpreters per start-up peer (default 1 quick, 3 full)",
    )
    ap.add_argument("--startup-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.cpus:
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})

    if args.startup_child:
        print(json.dumps({"seconds": _startup_child(args.startup_child)}))
        return

    faulthandler.dump_traceback_later(600, exit=True)  # never hang forever
    cfg = Cfg(args.quick)
    if args.startup_reps:
        cfg.startup_reps = args.startup_reps
    only = set(args.only or SECTIONS)
    t_start = perf()
    load_before = os.getloadavg()
    errors: dict[str, str] = {}

    print(
        f"# asyncmirai benchmarks ({'quick' if cfg.quick else 'full'}): python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs (affinity {sorted(os.sched_getaffinity(0))}), load {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}"
    )

    rt: dict[str, Any] = {}
    samples: dict[str, list[float]] = {key: [] for key, _, _ in RT}
    round_medians: dict[str, list[float]] = {key: [] for key, _, _ in RT}
    print(
        f"\n## 1. sequential round trip ({cfg.rounds} interleaved rounds x {cfg.calls} timed calls, "
        f"{cfg.warmup} warm-up per round, {WORKERS} workers; samples pooled)"
    )
    for _rnd in range(cfg.rounds if "roundtrip" in only else 0):
        for key, _desc, fn in RT:
            r = _run(f"rt.{key}", lambda fn=fn: fn(cfg), errors)
            if r:
                samples[key].extend(r)
                round_medians[key].append(summarize_us(r)["median_us"])
    print(f"{'peer':<52} {'median us':>10} {'p99 us':>10} {'mean us':>10}  per-round medians")
    for key, desc, _fn in RT:
        if not samples[key]:
            continue
        r = summarize_us(samples[key])
        rt[key] = {"desc": desc, **r, "round_medians_us": round_medians[key]}
        rm = " ".join(f"{x:.0f}" for x in round_medians[key])
        print(
            f"{desc:<52} {r['median_us']:>10.1f} {r['p99_us']:>10.1f} {r['mean_us']:>10.1f}  {rm}",
            flush=True,
        )

    il: dict[str, Any] = {}
    print(
        f"\n## 1b. round trip, interleaved blocks in one process ({cfg.blocks} rounds x "
        f"{cfg.block} calls per method; ratio = median over rounds of block median / "
        "anyio's block median in the same round)"
    )
    if "roundtrip" in only:
        blocks = _run("rt.interleaved", lambda: rt_interleaved(cfg), errors)
        if blocks:
            il = interleaved_summary(blocks)
    print(f"{'method':<52} {'median us':>10} {'x anyio':>8} {'q1':>6} {'q3':>6}")
    for r in il.values():
        print(
            f"{r['desc']:<52} {r['median_us']:>10.1f} {r['ratio_vs_anyio']:>8.2f} "
            f"{r['ratio_q1']:>6.2f} {r['ratio_q3']:>6.2f}",
            flush=True,
        )

    tp: dict[str, Any] = {}
    tp_runs: dict[str, list[dict[str, Any]]] = {key: [] for key, _, _ in TP}
    print(
        f"\n## 2. throughput: {cfg.tasks} tiny tasks, {WORKERS} workers ({cfg.tp_rounds} interleaved rounds)"
    )
    for rnd in range(cfg.tp_rounds if "throughput" in only else 0):
        for key, _desc, fn in TP:
            if rnd and not tp_runs[key]:
                continue  # failed or not available in round 0
            r = _run(f"tp.{key}", lambda fn=fn: fn(cfg), errors)
            if r is not None:
                tp_runs[key].append(r)
    print(f"{'peer':<52} {'tasks/s':>10} {'seconds':>10}  per-round tasks/s")
    for key, desc, _fn in TP:
        runs = tp_runs[key]
        if not runs:
            continue
        secs = sum(r["seconds"] for r in runs)
        n = sum(r["tasks"] for r in runs)
        tp[key] = {
            "desc": desc,
            "tasks": cfg.tasks,
            "seconds": secs / len(runs),
            "tasks_per_s": n / secs,
            "round_tasks_per_s": [r["tasks_per_s"] for r in runs],
        }
        rr = " ".join(f"{r['tasks_per_s']:.0f}" for r in runs)
        print(f"{desc:<52} {n / secs:>10.0f} {secs / len(runs):>10.2f}  {rr}", flush=True)

    st: dict[str, Any] = {}
    print(
        f"\n## 3. start-up to first result, {WORKERS} workers (fresh interpreter, median of {cfg.startup_reps})"
    )
    if "startup" in only:
        fresh_bytecode()
    # Reps interleaved across peers (round robin), so load drift hits every peer alike.
    st_runs: dict[str, list[float]] = {name: [] for name in STARTUP_PEERS}
    for rep in range(cfg.startup_reps if "startup" in only else 0):
        for name in STARTUP_PEERS:
            if rep and not st_runs[name]:
                continue  # failed in the first rep
            v = _run(f"startup.{name}", lambda name=name: startup_once(name), errors)
            if v is not None:
                st_runs[name].append(v)
    print(f"{'peer':<52} {'median s':>10} {'min s':>10}")
    for name in STARTUP_PEERS:
        if st_runs[name]:
            r = st[name] = startup_summary(st_runs[name])
            print(f"{name:<52} {r['median_s']:>10.3f} {r['min_s']:>10.3f}", flush=True)

    def med(k: str) -> float | None:
        return rt.get(k, {}).get("median_us")

    def tps(k: str) -> float | None:
        return tp.get(k, {}).get("tasks_per_s")

    def ilr(k: str) -> float | None:
        return il.get(k, {}).get("ratio_vs_anyio")

    # (name, value, target, "le"/"ge")
    ratios: list[tuple[str, float | None, float, str]] = [
        ("rt interleaved: am in-loop / anyio", ilr("am_inloop"), 0.8, "le"),
        ("rt interleaved: am in-loop __main__ fn / anyio", ilr("am_inloop_main"), 0.8, "le"),
        ("rt interleaved: am thread-hop await / anyio", ilr("am_thread_asyncio"), 1.2, "le"),
        ("rt interleaved: am .result() / anyio", ilr("am_sync"), 1.2, "le"),
        ("rt interleaved: am .result() __main__ fn / anyio", ilr("am_sync_main"), 1.2, "le"),
        (
            "rt median: am in-loop / anyio.to_process",
            _ratio(med("am_inloop"), med("anyio_to_process")),
            0.9,
            "le",
        ),
        (
            "rt median: am in-loop / bare blocking zmq echo",
            _ratio(med("am_inloop"), med("zmq_blocking_echo")),
            2.5,
            "le",
        ),
        (
            "rt median: am thread (await) / anyio.to_process",
            _ratio(med("am_thread_asyncio"), med("anyio_to_process")),
            0.9,
            "le",
        ),
        (
            "rt median: am thread (await) / bare blocking zmq echo",
            _ratio(med("am_thread_asyncio"), med("zmq_blocking_echo")),
            2.5,
            "le",
        ),
        (
            "throughput: am gather / anyio.to_process",
            _ratio(tps("am_gather"), tps("anyio_to_process")),
            2.0,
            "ge",
        ),
        (
            "throughput: am gather / aiomultiprocess Pool.map",
            _ratio(tps("am_gather"), tps("aiomp_map")),
            1.0,
            "ge",
        ),
        (
            "throughput: am gather / PPE.map(chunksize=1)",
            _ratio(tps("am_gather"), tps("ppe_map")),
            1.5,
            "ge",
        ),
        (
            "start-up: am in-loop daemons(2) -> first result (s)",
            st.get("asyncmirai_asyncio", {}).get("median_s"),
            0.25,
            "le",
        ),
        (
            "start-up: am sync daemons(2) -> first result (s)",
            st.get("asyncmirai_sync", {}).get("median_s"),
            0.25,
            "le",
        ),
    ]
    print("\n## ratios vs issue 2 targets")
    print(f"{'ratio':<54} {'value':>8} {'target':>9}  verdict")
    ratio_json = {}
    for name, val, target, op in ratios:
        tgt = f"{'<=' if op == 'le' else '>='} {target:g}"
        if val is None:
            verdict, vs = "n/a", "-"
        else:
            ok = val <= target if op == "le" else val >= target
            verdict, vs = ("PASS" if ok else "MISS"), f"{val:.3f}"
        print(f"{name:<54} {vs:>8} {tgt:>9}  {verdict}")
        ratio_json[name] = {"value": val, "target": tgt, "verdict": verdict}

    load_after = os.getloadavg()
    total = perf() - t_start
    print(
        f"\n# total {total:.1f} s; load after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}"
    )
    if errors:
        print(f"# errors: {errors}")

    if args.only and not args.out:
        return  # a partial run never overwrites the full results
    out = Path(args.out or BENCH_DIR / "results" / "latency.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "mode": "quick" if cfg.quick else "full",
                "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "python": platform.python_version(),
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                "affinity": sorted(os.sched_getaffinity(0)),
                "loadavg_before": load_before,
                "loadavg_after": load_after,
                "config": {k: v for k, v in vars(cfg).items()},
                "round_trip_us": rt,
                "round_trip_interleaved": il,
                "throughput": tp,
                "startup": st,
                "ratios": ratio_json,
                "errors": errors,
                "total_s": total,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"# wrote {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")


if __name__ == "__main__":
    main()
