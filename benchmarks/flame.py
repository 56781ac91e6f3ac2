"""Flame graphs of the per-task path, host and daemon, with py-spy.

    .venv/bin/python benchmarks/flame.py                # writes benchmarks/results/flame-*.svg
    .venv/bin/python benchmarks/flame.py --seconds 20   # longer sampling

Three workloads, each sampled by ``py-spy record --subprocesses --native`` (the host and
its daemons in one graph, one tower per process and thread; ``--idle`` off, so time spent
blocked in ``epoll``/``poll`` does not show, only work):

* ``loop``: sequential ``await am.mirai(operator.neg, 1)`` on the dispatcher's loop;
* ``result``: sequential ``am.mirai(operator.neg, 1).result()`` from a plain script;
* ``main``: the ``loop`` workload with a function defined in the script (``__main__``).

Also writes a text summary (``flame-*.txt``): the top frames by own samples per process,
which is what the README quotes.  Needs py-spy (``pip install py-spy``; root or
``ptrace_scope`` 0).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent

CHILD = """
import asyncio, operator, sys, time
import asyncmirai as am
mode, seconds = sys.argv[1], float(sys.argv[2])
def script_neg(x):
    return -x
if mode == "result":
    with am.daemons(1):
        for _ in range(500):
            am.mirai(operator.neg, 1).result(30)
        print("ready", flush=True)
        end = time.monotonic() + seconds
        n = 0
        while time.monotonic() < end:
            am.mirai(operator.neg, 1).result()
            n += 1
else:
    fn = script_neg if mode == "main" else operator.neg
    async def run():
        async with am.daemons(1):
            for _ in range(500):
                await am.mirai(fn, 1)
            print("ready", flush=True)
            end = time.monotonic() + seconds
            n = 0
            while time.monotonic() < end:
                await am.mirai(fn, 1)
                n += 1
            return n
    n = asyncio.run(run())
print(n)
"""


def record(mode: str, seconds: float, out_dir: Path) -> dict[str, object]:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "child.py"
        script.write_text(CHILD)
        raw = Path(tmp) / "raw.txt"
        svg = out_dir / f"flame-{mode}.svg"
        env = dict(os.environ, PYTHONPATH=str(REPO))
        for fmt, path in (("flamegraph", svg), ("raw", raw)):
            # sample only the steady state: after the child's warm-up, for ``seconds``
            child = subprocess.Popen(
                [sys.executable, str(script), mode, str(seconds + 5)],
                env=env,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert child.stdout is not None and child.stdout.readline().strip() == "ready"
            subprocess.run(
                [
                    py_spy,
                    "record",
                    "--pid",
                    str(child.pid),
                    "--subprocesses",
                    "--rate",
                    "499",
                    "--duration",
                    str(int(seconds)),
                    "--format",
                    fmt,
                    "-o",
                    str(path),
                ],
                check=True,
                capture_output=True,
            )
            child.wait(60)
        return summarize(raw.read_text(), mode, out_dir)


def summarize(raw: str, mode: str, out_dir: Path) -> dict[str, object]:
    """Own samples per frame, by process (host or daemon), from py-spy's raw format."""
    own: dict[str, Counter[str]] = {}
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        proc = "daemon" if "asyncmirai daemon" in frames[0] or "_daemon.py" in stack else "host"
        leaf = frames[-1]
        own.setdefault(proc, Counter())[leaf] += int(count)
    lines = []
    summary: dict[str, object] = {}
    for proc, c in sorted(own.items()):
        total = sum(c.values())
        top = [(f, n / total) for f, n in c.most_common(12)]
        summary[proc] = {"samples": total, "top": top}
        lines.append(f"## {mode}: {proc} ({total} samples)")
        lines += [f"{share:6.1%}  {frame}" for frame, share in top]
        lines.append("")
    (out_dir / f"flame-{mode}.txt").write_text("\n".join(lines))
    print("\n".join(lines))
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--modes", default="loop,result,main")
    ap.add_argument("--out", default=str(BENCH_DIR / "results"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {m: record(m, args.seconds, out) for m in args.modes.split(",")}
    (out / "flame.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
