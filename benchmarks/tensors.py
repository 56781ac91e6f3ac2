"""Tensor and array round trips: asyncmirai against a memcpy floor and its peers, in one run.

    .venv/bin/python benchmarks/tensors.py           # full (to 1 GiB), ~4-5 min on 2 vCPUs
    .venv/bin/python benchmarks/tensors.py --quick   # 1 and 64 MiB, no Ray, ~1 min
    .venv/bin/python benchmarks/tensors.py --no-ray  # without Ray (also when not installed)

A round trip sends a float32 payload to another process, which returns it unchanged
(an identity function); GB/s = 2 x bytes / seconds (1 GB = 1e9 bytes), the median of
several round trips (fewer for 512 MiB and 1 GiB, fewest for the slow methods).  The
repeats are interleaved (round i of every method, then round i + 1), so a burst of
other work on the machine lands on all methods alike.  Every payload is a fresh copy
made outside the timer, so no method gains from a payload it already moved (torch's
shared-memory pickling moves a tensor's storage into shared memory in place, which
would make a second send of the same tensor free).

Methods, all in this run:

* ``memcpy``: one copy into a fresh allocation in this process, page faults included
  (``torch.empty_like(x).copy_(x)``; ``np.empty_like`` + ``np.copyto``): the floor.
  A copy moves the payload once, a round trip twice, so its GB/s is bytes / seconds.
* ``zmq echo``: raw pyzmq DEALER -> ROUTER ipc echo with ``copy=False`` both ways, the
  echo in a separate process (``python tensors.py echo ADDR``).
* ``asyncmirai``: ``await am.mirai(identity, x)`` on one daemon (in-loop dispatcher),
  over the default same-host transport (socketpair + sealed memfds) and, for torch,
  ``transport="zmq"``.  The identity returns the received segment unchanged, which the
  transport passes back without a copy; ``(task writes)`` runs ``touch`` instead, which
  writes one element in place (a page becomes the task's own), so the result is copied
  back: the cost of a task that returns new or modified data.
* ``PPE``: ``ProcessPoolExecutor(1)`` via ``run_in_executor`` (fork; once torch is
  imported its ForkingPickler moves tensors through shared memory; numpy arrays are
  pickled through a pipe).
* ``aiomultiprocess``: ``Pool(1).apply`` of a coroutine (spawn; multiprocessing queues,
  so torch's shared-memory pickling too).
* ``anyio.to_process``: ``anyio.to_process.run_sync`` (plain pickle through pipes).
* ``torch.mp queue``: ``torch.multiprocessing`` spawn-context queues to a worker that
  puts back what it gets (shared memory, file descriptors passed over a socket).
* ``Ray`` (when installed): a ``@ray.remote`` identity on a local one-CPU cluster
  (object store in /dev/shm; numpy results are read-only zero-copy views of it).

Peak memory: for one 512 MiB round trip per method, each process's peak RSS is reset
(``/proc/PID/clear_refs``) just before it and read (``VmHWM``) just after; "extra copies"
= (peak - RSS before) / payload.  On the host the payload itself is in the baseline and
the received result (1 copy, inherent) is counted.

Writes ``results/tensors.json``.
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
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
MiB = 1 << 20
perf = time.perf_counter


# -- peer side: imported by reference as ``tensors.X`` in daemons and workers -----------------
def identity(x: Any) -> Any:
    return x


def touch(x: Any) -> Any:
    """Write one element in place (same value) and return ``x``: a task that modifies."""
    flat = x.reshape(-1)
    flat[:1] += 0
    return x


async def aidentity(x: Any) -> Any:
    return x


async def acall(name: str) -> Any:
    return globals()[name]()


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def hwm_reset() -> int:
    """Reset this process's peak RSS to its current RSS; return that RSS in bytes."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def hwm() -> int:
    """This process's peak RSS in bytes since the last reset."""
    return _status("VmHWM")


def getpid() -> int:
    return os.getpid()


def echo_server(addr: str) -> None:
    """ROUTER echo with copy=False: every [identity, payload] goes straight back.
    A payload of b"cmd:NAME" runs NAME() from this module and returns the int."""
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(addr)
    print("ready", flush=True)
    try:
        while True:
            ident, payload = sock.recv_multipart(copy=False)
            if len(payload) < 64:
                b = payload.bytes
                if b == b"quit":
                    break
                if b.startswith(b"cmd:"):
                    out = globals()[b[4:].decode()]()
                    sock.send_multipart([ident, str(out).encode()])
                    continue
            sock.send_multipart([ident, payload], copy=False)
            del payload
    finally:
        sock.close(0)
        ctx.term()


def call_name(name: str) -> Any:
    return globals()[name]()


def tmq_worker(q_in: Any, q_out: Any) -> None:
    """torch.multiprocessing worker: put back what comes in; str items are commands."""
    while True:
        x = q_in.get()
        if x is None:
            return
        if isinstance(x, str):
            q_out.put(globals()[x]())
            continue
        q_out.put(x)
        del x


# -- host side -----------------------------------------------------------------------------
class Method:
    """One way to make a round trip; ``rt(x)`` returns what came back."""

    name = ""
    kind = "torch"  # or "numpy"
    moves = 2  # times the payload crosses: GB/s = moves x bytes / median seconds
    max_bytes = 1 << 62  # larger sizes are skipped (slow methods: minutes per round trip)
    slow = False  # fewer repeats at 64 MiB and up

    async def start(self) -> None: ...

    async def rt(self, x: Any) -> Any:
        raise NotImplementedError

    async def peer(self, fn: Any) -> Any:
        """Run ``fn`` (a module-level function of this module) on the peer process."""
        return None

    async def stop(self) -> None: ...


class PeerMethod(Method):
    """A peer library's round trip, run in ``peer_mod`` (this module, imported by name)."""

    label = ""
    slow_kind: str | None = None  # the payload kind that makes it slow, if any

    def __init__(self, kind: str, peer_mod: Any) -> None:
        self.kind = kind
        self.name = f"{self.label} {kind}"
        self.mod = peer_mod
        if self.slow_kind is not None:
            self.slow = kind == self.slow_kind


class Memcpy(Method):
    """One copy into a fresh allocation in this process, page faults included."""

    moves = 1

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.name = f"memcpy {kind}"

    async def rt(self, x: Any) -> Any:
        if self.kind == "torch":
            y = x.new_empty(x.shape)
            y.copy_(x)
            return y
        import numpy as np

        y = np.empty_like(x)
        np.copyto(y, x)
        return y


class ZmqEcho(Method):
    name = "zmq echo"
    max_bytes = 512 * MiB
    slow = True

    async def start(self) -> None:
        import zmq

        self.tmp = tempfile.TemporaryDirectory(prefix="tensors-bench-")
        addr = f"ipc://{self.tmp.name}/echo"
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "echo", addr],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready"
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(addr)

    async def rt(self, x: Any) -> Any:
        import torch

        self.sock.send(memoryview(x.numpy()).cast("B"), copy=False)
        frame = self.sock.recv(copy=False)
        return torch.frombuffer(frame.buffer, dtype=x.dtype)

    async def peer(self, fn: Any) -> Any:
        self.sock.send(b"cmd:" + fn.__name__.encode())
        return int(self.sock.recv())

    async def stop(self) -> None:
        self.sock.send(b"quit")
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.sock.close(0)
        self.ctx.term()
        self.tmp.cleanup()


class AsyncMirai(Method):
    def __init__(
        self, kind: str, peer_mod: Any, transport: str = "pipe", writes: bool = False
    ) -> None:
        self.kind = kind
        self.transport = transport
        self.writes = writes
        self.name = (
            f"asyncmirai {kind}"
            + ("" if transport == "pipe" else f" ({transport})")
            + (" (task writes)" if writes else "")
        )
        self.compute = f"bench-{kind}-{transport}" + ("-w" if writes else "")
        self.mod = peer_mod
        if transport != "pipe":
            self.max_bytes, self.slow = 512 * MiB, True

    async def start(self) -> None:
        import asyncmirai as am

        self.am = am
        kw = {} if self.transport == "pipe" else {"transport": self.transport}
        self.d = am.daemons(1, compute=self.compute, **kw)
        await am.mirai(self.mod.getpid, _compute=self.compute)

    async def rt(self, x: Any) -> Any:
        fn = self.mod.touch if self.writes else self.mod.identity
        return await self.am.mirai(fn, x, _compute=self.compute)

    async def peer(self, fn: Any) -> Any:
        return await self.am.mirai(fn, _compute=self.compute)

    async def stop(self) -> None:
        self.am.daemons(0, compute=self.compute)


class PPE(PeerMethod):
    pools: dict[str, Any] = {}
    label, slow_kind = "PPE", "numpy"

    @classmethod
    def prestart(cls, mod: Any) -> None:
        """Fork the pool workers before any zmq context or helper thread exists."""
        import concurrent.futures as cf
        import multiprocessing as mp

        for kind in ("torch", "numpy"):
            pool = cf.ProcessPoolExecutor(1, mp_context=mp.get_context("fork"))
            pool.submit(mod.getpid).result()
            cls.pools[kind] = pool

    async def start(self) -> None:
        self.pool = self.pools[self.kind]
        self.loop = asyncio.get_running_loop()

    async def rt(self, x: Any) -> Any:
        return await self.loop.run_in_executor(self.pool, self.mod.identity, x)

    async def peer(self, fn: Any) -> Any:
        return await self.loop.run_in_executor(self.pool, fn)

    async def stop(self) -> None:
        self.pool.shutdown(wait=True)


class AioMP(PeerMethod):
    users = 0
    label, slow_kind = "aiomultiprocess", "numpy"

    async def start(self) -> None:
        from aiomultiprocess import Pool

        self.pool = Pool(processes=1)
        AioMP.users += 1
        await self.peer(self.mod.getpid)

    async def rt(self, x: Any) -> Any:
        return await self.pool.apply(self.mod.aidentity, (x,))

    async def peer(self, fn: Any) -> Any:
        return await self.pool.apply(self.mod.acall, (fn.__name__,))

    async def stop(self) -> None:
        procs = list(self.pool.processes)
        self.pool.close()
        await self.pool.join()
        for p in procs:  # the pool forgets its workers once they are dead, unreaped
            await p.join(10)
        AioMP.users -= 1
        if AioMP.users == 0:  # its shared Manager process would outlive us otherwise
            import aiomultiprocess.core as core

            if core._manager is not None:
                core._manager.shutdown()
                core._manager = None


class Ray(PeerMethod):
    users = 0
    label, slow_kind = "Ray", "torch"  # torch: pickled through the object store, 3 copies

    async def start(self) -> None:
        import ray

        if not ray.is_initialized():
            ray.init(
                num_cpus=1,
                include_dashboard=False,
                log_to_driver=False,
                object_store_memory=3 << 30,
                logging_level="ERROR",
            )
        Ray.users += 1
        self.ray = ray
        self.f = ray.remote(self.mod.identity)
        self.call = ray.remote(self.mod.call_name)
        await self.peer(self.mod.getpid)

    async def rt(self, x: Any) -> Any:
        return await self.f.remote(x)

    async def peer(self, fn: Any) -> Any:
        return await self.call.remote(fn.__name__)

    async def stop(self) -> None:
        Ray.users -= 1
        if Ray.users == 0:
            self.ray.shutdown()


class ToProcess(PeerMethod):
    max_bytes = 512 * MiB
    slow = True
    label = "anyio.to_process"

    async def start(self) -> None:
        from anyio import to_process

        self.run_sync = to_process.run_sync
        await self.run_sync(self.mod.getpid)

    async def rt(self, x: Any) -> Any:
        return await self.run_sync(self.mod.identity, x)

    async def peer(self, fn: Any) -> Any:
        return await self.run_sync(fn)


class TorchQueue(Method):
    name = "torch.mp queue"

    def __init__(self, peer_mod: Any) -> None:
        self.mod = peer_mod

    async def start(self) -> None:
        import torch.multiprocessing as tmp

        ctx = tmp.get_context("spawn")
        self.q_in, self.q_out = ctx.Queue(), ctx.Queue()
        self.proc = ctx.Process(target=self.mod.tmq_worker, args=(self.q_in, self.q_out))
        self.proc.start()
        await self.peer(self.mod.getpid)

    async def rt(self, x: Any) -> Any:
        self.q_in.put(x)
        return self.q_out.get()

    async def peer(self, fn: Any) -> Any:
        self.q_in.put(fn.__name__)
        return self.q_out.get()

    async def stop(self) -> None:
        self.q_in.put(None)
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        for q in (self.q_in, self.q_out):
            q.close()
            q.join_thread()


# -- measurement ---------------------------------------------------------------------------
def payload(kind: str, nbytes: int, base: dict[int, Any]) -> Any:
    """A fresh copy of a per-size random payload (one source tensor per size: at 1 GiB
    the host holds the source, the payload and what came back)."""
    import numpy as np
    import torch

    if nbytes not in base:
        g = torch.Generator().manual_seed(nbytes)
        base[nbytes] = torch.rand(nbytes // 4, generator=g)
    src = base[nbytes]
    return src.clone() if kind == "torch" else np.array(src.numpy(), copy=True)


def equal(a: Any, b: Any) -> bool:
    import numpy as np
    import torch

    if isinstance(a, torch.Tensor):
        return type(b) in (torch.Tensor,) and torch.equal(a, b)
    return type(b) is np.ndarray and a.dtype == b.dtype and np.array_equal(a, b)


def summary(m: Method, nbytes: int, times: list[float]) -> dict[str, Any]:
    med = statistics.median(times)
    return {
        "reps": len(times),
        "median_s": med,
        "min_s": min(times),
        "gbps": m.moves * nbytes / med / 1e9,
        "gbps_best": m.moves * nbytes / min(times) / 1e9,
    }


async def time_once(m: Method, nbytes: int, check: bool, base: dict[int, Any]) -> float:
    x = payload(m.kind, nbytes, base)
    gc.collect()
    t0 = perf()
    y = await m.rt(x)
    dt = perf() - t0
    if check and not equal(x, y):
        raise AssertionError(f"{m.name}: the round trip changed the payload")
    del x, y
    return dt


async def peak_copies(m: Method, nbytes: int, base: dict[int, Any]) -> dict[str, Any]:
    x = payload(m.kind, nbytes, base)
    peer0 = await m.peer(hwm_reset)
    host0 = hwm_reset()
    y = await m.rt(x)
    host1 = hwm()
    peer1 = await m.peer(hwm)
    del x, y
    out = {"host_extra_copies": (host1 - host0) / nbytes}
    if peer0 is not None:
        out["peer_extra_copies"] = (peer1 - peer0) / nbytes
    return out


def reps_for(m: Method, nbytes: int, reps: int) -> int:
    """Slow methods (5-30x slower than the others at these sizes): 2 round trips at
    64 MiB, 1 at 512 MiB, none at 1 GiB (minutes, and gigabytes of pickles).  The memcpy
    floor: twice the repeats."""
    if m.slow and nbytes >= 64 * MiB:
        return 0 if nbytes > 512 * MiB else 2 if nbytes <= 64 * MiB else 1
    if isinstance(m, Memcpy):  # cheap, and fresh page faults vary a lot on a VM
        return 2 * reps
    return reps


async def run(args: argparse.Namespace, mod: Any) -> dict[str, Any]:
    sizes = [(1 * MiB, 15), (64 * MiB, 5)] if args.quick else [
        (1 * MiB, 15), (64 * MiB, 7), (512 * MiB, 5), (1024 * MiB, 3)
    ]  # fmt: skip
    methods: list[Method] = [
        Memcpy("torch"),
        Memcpy("numpy"),
        AsyncMirai("torch", mod),
        AsyncMirai("numpy", mod),
        AsyncMirai("torch", mod, writes=True),
        AsyncMirai("numpy", mod, writes=True),
        AsyncMirai("torch", mod, transport="zmq"),
        ZmqEcho(),
        PPE("torch", mod),
        PPE("numpy", mod),
        AioMP("torch", mod),
        AioMP("numpy", mod),
        TorchQueue(mod),
        ToProcess("torch", mod),
        ToProcess("numpy", mod),
    ]
    if args.ray:
        methods += [Ray("torch", mod), Ray("numpy", mod)]
    base: dict[int, Any] = {}
    results: dict[str, Any] = {}
    started: list[Method] = []
    try:
        for m in methods:
            await m.start()
            started.append(m)
            for _ in range(3):  # warm up: imports, first allocations
                await m.rt(payload(m.kind, MiB, base))
        for nbytes, reps in sizes:
            label = f"{nbytes // MiB} MiB"
            todo = {m: reps_for(m, nbytes, reps) for m in methods if nbytes <= m.max_bytes}
            todo = {m: n for m, n in todo.items() if n}
            times: dict[Method, list[float]] = {m: [] for m in todo}
            t0 = perf()
            for i in range(max(todo.values())):  # interleaved: round i of every method
                for m, n in todo.items():
                    if i < n:
                        times[m].append(await time_once(m, nbytes, i == 0, base))
            for m in todo:
                r = results.setdefault(label, {})[m.name] = summary(m, nbytes, times[m])
                print(
                    f"  {label:>8}  {m.name:<34} {r['gbps']:6.2f} GB/s "
                    f"(best {r['gbps_best']:.2f}, n={r['reps']})",
                    flush=True,
                )
            print(f"  {label}: {perf() - t0:.0f} s", flush=True)
            base.pop(nbytes, None)  # free that size
        big = 512 * MiB if not args.quick else sizes[-1][0]
        mem: dict[str, Any] = {}
        for m in methods:
            mem[m.name] = await peak_copies(m, big, base)
        results["peak_memory"] = {"payload_mib": big // MiB, **mem}
    finally:
        for m in reversed(started):
            try:
                await m.stop()
            except Exception as exc:  # noqa: BLE001 - keep stopping the others
                print(f"  stopping {m.name} failed: {exc!r}", file=sys.stderr)
    return results


#: (label, numerator, denominator, target, sizes the target applies to)
RATIOS = [
    ("asyncmirai torch / memcpy torch", "asyncmirai torch", "memcpy torch", 0.6),
    ("asyncmirai numpy / memcpy numpy", "asyncmirai numpy", "memcpy numpy", 0.6),
    ("asyncmirai torch / PPE torch", "asyncmirai torch", "PPE torch", 1.5),
    ("asyncmirai numpy / PPE numpy", "asyncmirai numpy", "PPE numpy", 1.5),
    ("asyncmirai torch / aiomultiprocess torch", "asyncmirai torch", "aiomultiprocess torch", 1.5),
    ("asyncmirai numpy / aiomultiprocess numpy", "asyncmirai numpy", "aiomultiprocess numpy", 1.5),
    ("asyncmirai torch / torch.mp queue", "asyncmirai torch", "torch.mp queue", 1.5),
    ("asyncmirai torch / Ray torch", "asyncmirai torch", "Ray torch", 1.5),
    ("asyncmirai numpy / Ray numpy", "asyncmirai numpy", "Ray numpy", 0.8),
    ("asyncmirai torch / zmq echo", "asyncmirai torch", "zmq echo", None),
    ("asyncmirai torch / anyio.to_process torch", "asyncmirai torch", "anyio.to_process torch", None),
    ("asyncmirai torch (task writes) / memcpy torch", "asyncmirai torch (task writes)", "memcpy torch", None),
    ("asyncmirai numpy (task writes) / memcpy numpy", "asyncmirai numpy (task writes)", "memcpy numpy", None),
    ("asyncmirai torch (task writes) / torch.mp queue", "asyncmirai torch (task writes)", "torch.mp queue", None),
    ("asyncmirai torch (task writes) / PPE torch", "asyncmirai torch (task writes)", "PPE torch", None),
    ("asyncmirai numpy (task writes) / Ray numpy", "asyncmirai numpy (task writes)", "Ray numpy", None),
]  # fmt: skip
TARGET_SIZES = ("512 MiB", "1024 MiB")


def table(results: dict[str, Any]) -> str:
    sizes = [k for k in results if k.endswith("MiB")]
    names = list(dict.fromkeys(n for s in sizes for n in results[s]))

    def cell(s: str, n: str) -> str:
        r = results[s].get(n)
        return "-" if r is None else f"{r['gbps']:.2f}"

    lines = ["| method (GB/s; memcpy: bytes/s, round trips: 2 x bytes/s) | " + " | ".join(sizes)
             + " |", "|---|" + "---:|" * len(sizes)]  # fmt: skip
    for n in names:
        lines.append(f"| {n} | " + " | ".join(cell(s, n) for s in sizes) + " |")
    lines += ["", "| ratio (median GB/s) | target (512 MiB, 1 GiB) | " + " | ".join(sizes) + " |",
              "|---|---|" + "---:|" * len(sizes)]  # fmt: skip
    missed = []
    for label, a, b, target in RATIOS:
        cells = []
        present = False
        for s in sizes:
            ra, rb = results[s].get(a), results[s].get(b)
            if ra is None or rb is None:
                cells.append("-")
                continue
            present = True
            r = ra["gbps"] / rb["gbps"]
            results.setdefault("ratios", {}).setdefault(label, {})[s] = r
            flag = ""
            if target is not None and s in TARGET_SIZES and r < target:
                flag = " MISSED"
                missed.append(f"{label} at {s}: {r:.2f}x < {target}x")
            cells.append(f"{r:.2f}x{flag}")
        if present:
            t = "" if target is None else f">= {target}x"
            lines.append(f"| {label} | {t} | " + " | ".join(cells) + " |")
    results["targets_missed"] = missed
    lines += ["", "targets missed: " + ("; ".join(missed) if missed else "none")]
    mem = results.get("peak_memory")
    if mem:
        lines += ["", f"| peak extra copies, {mem['payload_mib']} MiB round trip | host | peer |",
                  "|---|---:|---:|"]  # fmt: skip
        for n in names:
            r = mem.get(n)
            if r is None:
                continue
            peer = r.get("peer_extra_copies")
            lines.append(
                f"| {n} | {r['host_extra_copies']:.2f} | "
                + ("-" if peer is None else f"{peer:.2f}")
                + " |"
            )
    return "\n".join(lines)


def live_children() -> list[str]:
    me = str(os.getpid())
    out = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if fields[1] == me and fields[0] not in ("Z", "X"):
                with open(f"/proc/{p}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
                if "resource_tracker" not in cmd:  # multiprocessing's; exits with us
                    out.append(f"{p}: {cmd[:100]}")
        except OSError:
            continue
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 and 64 MiB only")
    ap.add_argument("--ray", action=argparse.BooleanOptionalAction, default=None,
                    help="include Ray (default: yes, no with --quick)")  # fmt: skip
    ap.add_argument("--out", default=str(BENCH_DIR / "results" / "tensors.json"))
    args = ap.parse_args()

    # every peer must import this module as ``tensors`` (pickled by reference)
    from _common import share_import_path

    share_import_path()
    import numpy
    import tensors as mod
    import torch
    import zmq

    torch.set_num_threads(1)
    if args.ray is None:
        args.ray = not args.quick
    if args.ray:
        try:
            import ray  # noqa: F401
        except ImportError:
            print("  Ray not installed: left out", flush=True)
            args.ray = False
    PPE.prestart(mod)
    t0 = perf()
    results = asyncio.run(run(args, mod))
    wall = perf() - t0
    tbl = table(results)
    print()
    print(tbl)
    leftover = live_children()
    if leftover:
        print("processes left behind:", *leftover, sep="\n  ", file=sys.stderr)
    results["meta"] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "quick": args.quick,
        "wall_s": wall,
        "leftover_processes": leftover,
        "ray": sys.modules["ray"].__version__ if args.ray else None,
        "gb": "1e9 bytes; GB/s = 2 x payload bytes / median round-trip seconds "
        "(memcpy: payload bytes / median seconds of one copy)",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"\nwrote {args.out} ({wall:.0f} s)")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "echo":
        echo_server(sys.argv[2])
    else:
        main()
