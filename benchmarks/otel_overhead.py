"""What OpenTelemetry support costs on the awaited round trip, interleaved A/B.

Run from the repository root::

    .venv/bin/python benchmarks/otel_overhead.py [--base DIR] [--rounds 6] [--calls 2000]

Each round starts one fresh process per condition, in turn (so load drifts hit every
condition alike), that times ``await am.mirai(inc, i)`` on one local daemon:

* ``base``: the code in ``--base`` (e.g. a ``git worktree`` of the commit before the
  OpenTelemetry support), if given;
* ``off``: this tree, opentelemetry never imported (the usual case);
* ``loaded``: this tree, ``opentelemetry.trace`` and ``.metrics`` imported, no provider;
* ``on``: this tree, an SDK tracer provider and meter provider set (spans created, their
  processors drop them): what tracing costs when it is wanted.

Prints the median and p99 of each condition over all rounds, in microseconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"

CHILD = r"""
import asyncio, json, sys, time
mode, calls = sys.argv[1], int(sys.argv[2])
if mode == "loaded":
    import opentelemetry.trace, opentelemetry.metrics
if mode == "on":
    from opentelemetry import metrics, trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.trace import TracerProvider
    trace.set_tracer_provider(TracerProvider())
    metrics.set_meter_provider(MeterProvider())
import asyncmirai as am
from _common import inc

async def main():
    am.daemons(1)
    try:
        for i in range(300):
            await am.mirai(inc, i)
        out = []
        perf = time.perf_counter
        for i in range(calls):
            t = perf()
            await am.mirai(inc, i)
            out.append(perf() - t)
        return out
    finally:
        am.daemons(0)

print(json.dumps(asyncio.run(main())))
"""


def run(mode: str, calls: int, root: Path) -> list[float]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root), str(BENCH)])
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(calls)],
        env=env,
        cwd=str(BENCH),
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout
    return [float(x) for x in json.loads(out.splitlines()[-1])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, help="a tree without OpenTelemetry support")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--calls", type=int, default=2000)
    args = ap.parse_args()
    conds: list[tuple[str, str, Path]] = []
    if args.base is not None:
        conds.append(("base", "off", args.base.resolve()))
    conds += [("off", "off", REPO), ("loaded", "loaded", REPO), ("on", "on", REPO)]
    samples: dict[str, list[float]] = {name: [] for name, _, _ in conds}
    medians: dict[str, list[float]] = {name: [] for name, _, _ in conds}
    for r in range(args.rounds):
        order = conds if r % 2 == 0 else conds[::-1]
        for name, mode, root in order:
            xs = run(mode, args.calls, root)
            samples[name] += xs
            medians[name].append(statistics.median(xs) * 1e6)
    print(f"awaited round trip, 1 local daemon, {args.rounds} rounds x {args.calls} calls")
    print(f"{'condition':<8} {'median us':>10} {'p99 us':>8}   per-round medians")
    for name, _, _ in conds:
        xs = sorted(samples[name])
        med = statistics.median(xs) * 1e6
        p99 = xs[int(0.99 * (len(xs) - 1))] * 1e6
        rounds = " ".join(f"{m:.0f}" for m in medians[name])
        print(f"{name:<8} {med:>10.1f} {p99:>8.1f}   {rounds}")


if __name__ == "__main__":
    main()
