"""Tensor and array round trips: asyncmirai against the floor and its peers, in one run.

    .venv/bin/python benchmarks/tensors.py           # full, ~2-3 min on 2 vCPUs
    .venv/bin/python benchmarks/tensors.py --quick   # 1 and 64 MiB only, ~20 s

A round trip sends a float32 payload to another process, which returns it unchanged
(an identity function); GB/s = 2 x bytes / seconds (1 GB = 1e9 bytes), the median of
several round trips (fewer for 512 MiB).  Every payload is a fresh copy made outside the
timer, so no method gains from a payload it already moved (torch's shared-memory
pickling moves a tensor's storage into shared memory in place, which would make a
second send of the same tensor free).

Methods, all in this run:

* ``zmq echo``: raw pyzmq DEALER -> ROUTER ipc echo with ``copy=False`` both ways, the
  echo in a separate process (``python tensors.py echo ADDR``): the floor.
* ``asyncmirai``: ``await am.mirai(identity, x)`` on one daemon (in-loop dispatcher),
  over the default same-host transport (socketpair) and, for torch, ``transport="zmq"``.
* ``PPE``: ``ProcessPoolExecutor(1)`` via ``run_in_executor`` (fork; once torch is
  imported its ForkingPickler moves tensors through shared memory; numpy arrays are
  pickled through a pipe).
* ``anyio.to_process``: ``anyio.to_process.run_sync`` (plain pickle through pipes).
* ``torch.mp queue``: ``torch.multiprocessing`` spawn-context queues to a worker that
  puts back what it gets (shared memory, file descriptors passed over a socket).

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

    async def start(self) -> None: ...

    async def rt(self, x: Any) -> Any:
        raise NotImplementedError

    async def peer(self, fn: Any) -> Any:
        """Run ``fn`` (a module-level function of this module) on the peer process."""
        return None

    async def stop(self) -> None: ...


class ZmqEcho(Method):
    name = "zmq echo (floor)"

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
    def __init__(self, kind: str, peer_mod: Any, transport: str = "pipe") -> None:
        self.kind = kind
        self.transport = transport
        self.name = f"asyncmirai {kind}" + ("" if transport == "pipe" else f" ({transport})")
        self.compute = f"bench-{kind}-{transport}"
        self.mod = peer_mod

    async def start(self) -> None:
        import asyncmirai as am

        self.am = am
        kw = {} if self.transport == "pipe" else {"transport": self.transport}
        self.d = am.daemons(1, compute=self.compute, **kw)
        await am.mirai(self.mod.getpid, _compute=self.compute)

    async def rt(self, x: Any) -> Any:
        return await self.am.mirai(self.mod.identity, x, _compute=self.compute)

    async def peer(self, fn: Any) -> Any:
        return await self.am.mirai(fn, _compute=self.compute)

    async def stop(self) -> None:
        self.am.daemons(0, compute=self.compute)


class PPE(Method):
    pools: dict[str, Any] = {}

    def __init__(self, kind: str, peer_mod: Any) -> None:
        self.kind = kind
        self.name = f"PPE {kind}"
        self.mod = peer_mod

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


class ToProcess(Method):
    def __init__(self, kind: str, peer_mod: Any) -> None:
        self.kind = kind
        self.name = f"anyio.to_process {kind}"
        self.mod = peer_mod

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
def payload(kind: str, nbytes: int, base: dict[tuple[str, int], Any]) -> Any:
    """A fresh copy of a per-size random payload."""
    import numpy as np
    import torch

    key = (kind, nbytes)
    if key not in base:
        g = torch.Generator().manual_seed(nbytes)
        t = torch.rand(nbytes // 4, generator=g)
        base[key] = t if kind == "torch" else t.numpy()
    src = base[key]
    return src.clone() if kind == "torch" else np.array(src, copy=True)


def equal(a: Any, b: Any) -> bool:
    import numpy as np
    import torch

    if isinstance(a, torch.Tensor):
        return type(b) in (torch.Tensor,) and torch.equal(a, b)
    return type(b) is np.ndarray and a.dtype == b.dtype and np.array_equal(a, b)


async def time_method(
    m: Method, nbytes: int, reps: int, base: dict[tuple[str, int], Any]
) -> dict[str, Any]:
    times = []
    for i in range(reps):
        x = payload(m.kind, nbytes, base)
        gc.collect()
        t0 = perf()
        y = await m.rt(x)
        dt = perf() - t0
        if i == 0 and not equal(x, y):
            raise AssertionError(f"{m.name}: the round trip changed the payload")
        del x, y
        times.append(dt)
    med = statistics.median(times)
    return {
        "reps": reps,
        "median_s": med,
        "min_s": min(times),
        "gbps": 2 * nbytes / med / 1e9,
        "gbps_best": 2 * nbytes / min(times) / 1e9,
    }


async def peak_copies(m: Method, nbytes: int, base: dict[tuple[str, int], Any]) -> dict[str, Any]:
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


async def run(args: argparse.Namespace, mod: Any) -> dict[str, Any]:
    sizes = [(1 * MiB, 30), (64 * MiB, 7)] if args.quick else [
        (1 * MiB, 30), (64 * MiB, 7), (512 * MiB, 3)
    ]  # fmt: skip
    slow = {"PPE numpy", "anyio.to_process torch", "anyio.to_process numpy"}
    methods: list[Method] = [
        ZmqEcho(),
        AsyncMirai("torch", mod),
        AsyncMirai("numpy", mod),
        AsyncMirai("torch", mod, transport="zmq"),
        PPE("torch", mod),
        PPE("numpy", mod),
        ToProcess("torch", mod),
        ToProcess("numpy", mod),
        TorchQueue(mod),
    ]
    base: dict[tuple[str, int], Any] = {}
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
            for m in methods:
                n = max(2, reps - 1) if (m.name in slow and nbytes >= 64 * MiB) else reps
                t0 = perf()
                r = await time_method(m, nbytes, n, base)
                results.setdefault(label, {})[m.name] = r
                print(
                    f"  {label:>7}  {m.name:<24} {r['gbps']:6.2f} GB/s "
                    f"(best {r['gbps_best']:.2f}, n={n}, {perf() - t0:.1f} s)",
                    flush=True,
                )
            base = {k: v for k, v in base.items() if k[1] != nbytes}  # free that size
        big = sizes[-1][0]
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


def table(results: dict[str, Any]) -> str:
    sizes = [k for k in results if k.endswith("MiB")]
    names = list(results[sizes[0]])
    lines = ["| method | " + " | ".join(sizes) + " |", "|---|" + "---:|" * len(sizes)]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(f"{results[s][n]['gbps']:.2f}" for s in sizes) + " |")
    lines += ["", "| ratio (median GB/s) | target | " + " | ".join(sizes) + " |",
              "|---|---|" + "---:|" * len(sizes)]  # fmt: skip
    AT_LEAST_08 = ">= 0.8 (64, 512 MiB)"
    ratios = [
        ("asyncmirai torch / zmq echo", "asyncmirai torch", "zmq echo (floor)", AT_LEAST_08),
        ("asyncmirai numpy / zmq echo", "asyncmirai numpy", "zmq echo (floor)", AT_LEAST_08),
        ("asyncmirai torch (zmq) / zmq echo", "asyncmirai torch (zmq)", "zmq echo (floor)", ""),
        ("asyncmirai numpy / PPE numpy", "asyncmirai numpy", "PPE numpy", ">= 5"),
        ("asyncmirai torch / PPE torch", "asyncmirai torch", "PPE torch", ">= 1"),
        ("asyncmirai torch / anyio.to_process torch", "asyncmirai torch",
         "anyio.to_process torch", ""),
        ("asyncmirai torch / torch.mp queue", "asyncmirai torch", "torch.mp queue", ""),
    ]  # fmt: skip
    for label, a, b, target in ratios:
        cells = []
        for s in sizes:
            r = results[s][a]["gbps"] / results[s][b]["gbps"]
            results.setdefault("ratios", {}).setdefault(label, {})[s] = r
            cells.append(f"{r:.2f}x")
        lines.append(f"| {label} | {target} | " + " | ".join(cells) + " |")
    mem = results.get("peak_memory")
    if mem:
        lines += ["", f"| peak extra copies, {mem['payload_mib']} MiB round trip | host | peer |",
                  "|---|---:|---:|"]  # fmt: skip
        for n in names:
            r = mem[n]
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
        "gb": "1e9 bytes; GB/s = 2 x payload bytes / median round-trip seconds",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"\nwrote {args.out} ({wall:.0f} s)")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "echo":
        echo_server(sys.argv[2])
    else:
        main()
