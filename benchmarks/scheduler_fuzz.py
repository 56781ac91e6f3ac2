"""A long run of the scheduler's Hypothesis state machine (``tests/test_scheduler.py``).

CI runs ``SchedulerMachine`` with a bounded example count; this runs it with a large
budget and counts the rule steps actually executed (Hypothesis picks how many steps each
example takes, up to ``stateful_step_count``)::

    .venv/bin/python benchmarks/scheduler_fuzz.py                    # >= 10^5 steps
    .venv/bin/python benchmarks/scheduler_fuzz.py --examples 200     # smoke run

The examples are split into ``--chunks`` independent Hypothesis runs (fresh random
seeds, no example database), so a failure in one chunk is counted and reported and the
others still run.  Prints steps, examples, failures and wall time, and writes
``benchmarks/results/scheduler_fuzz.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
for p in (str(REPO), str(REPO / "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)

from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis.stateful import invariant, precondition, rule  # noqa: E402
from test_scheduler import SchedulerMachine  # noqa: E402

COUNTS: Counter[str] = Counter()


def _counting(name: str, fn: Any) -> Any:
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        COUNTS["steps"] += 1
        self._n_steps = getattr(self, "_n_steps", 0) + 1
        COUNTS[f"rule.{name}"] += 1
        if getattr(self, "closed", False):  # the scheduler was reset by an earlier step
            COUNTS["steps_after_reset"] += 1
        return fn(self, *args, **kwargs)

    return wrapper


class CountingMachine(SchedulerMachine):
    """``SchedulerMachine`` with every rule counted (the rules themselves unchanged)."""

    def __init__(self) -> None:
        super().__init__()
        COUNTS["examples"] += 1

    @invariant()
    def _count_checks(self) -> None:
        COUNTS["invariant_passes"] += 1  # after initialize and after every step


class LateResetMachine(CountingMachine):
    """The same machine, but ``reset`` (which closes the scheduler for good) only once,
    after 50 steps: Hypothesis picks among enabled rules uniformly, so with ``reset``
    always enabled most steps of the stock machine run on a closed scheduler."""

    @precondition(lambda self: not self.closed and getattr(self, "_n_steps", 0) >= 50)
    @rule()
    def reset(self) -> None:
        super().reset()


MACHINES = {"stock": CountingMachine, "late-reset": LateResetMachine}


def _instrument() -> bool:
    """Count each rule by wrapping its function on copies of the subclass's ``Rule``
    records (Hypothesis internals: ``setup_state``).  False if this Hypothesis version
    differs; then steps are counted as invariant passes minus examples."""
    try:
        for machine in MACHINES.values():
            state = machine.setup_state()
            for i, r in enumerate(state.rules):
                r2 = copy.copy(r)
                f = _counting(r.function.__name__, r.function)
                object.__setattr__(r2, "function", f)
                state.rules[i] = r2
        return True
    except Exception:  # an internal API we do not control
        return False


INSTRUMENTED = _instrument()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--examples", type=int, default=2000, help="examples in total (2000)")
    ap.add_argument("--steps", type=int, default=100, help="stateful_step_count (100)")
    ap.add_argument("--chunks", type=int, default=10, help="independent runs (10)")
    ap.add_argument(
        "--machine",
        choices=sorted(MACHINES),
        default="stock",
        help="stock: SchedulerMachine as in tests/; late-reset: reset only once, after 50 steps",
    )
    ap.add_argument("--out", default=str(BENCH_DIR / "results" / "scheduler_fuzz.json"))
    args = ap.parse_args()

    per = max(1, args.examples // args.chunks)
    failures: list[str] = []
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    machine = MACHINES[args.machine]
    for i in range(args.chunks):
        machine.TestCase.settings = settings(
            max_examples=per,
            stateful_step_count=args.steps,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        try:
            machine.TestCase().runTest()
        except Exception as e:  # a falsified invariant: count it, keep the other chunks
            failures.append(f"chunk {i}: {type(e).__name__}: {e}"[:4000])
            traceback.print_exc()
        print(
            f"chunk {i + 1}/{args.chunks}: rule calls {COUNTS['steps']:,}, examples "
            f"{COUNTS['examples']:,}, failures {len(failures)}, "
            f"{time.perf_counter() - t0:.1f} s",
            flush=True,
        )
    wall = time.perf_counter() - t0
    steps = COUNTS["steps"] if INSTRUMENTED else COUNTS["invariant_passes"] - COUNTS["examples"]
    rules = {k[5:]: v for k, v in sorted(COUNTS.items()) if k.startswith("rule.")}
    print(
        f"\nscheduler state machine ({args.machine}): {steps:,} steps in {COUNTS['examples']:,} examples "
        f"({args.chunks} runs of max_examples={per}, stateful_step_count={args.steps}), "
        f"{COUNTS['invariant_passes']:,} invariant passes, {len(failures)} failures, "
        f"{wall:.1f} s wall ({steps / wall:,.0f} steps/s)"
    )
    if INSTRUMENTED:
        print(
            f"steps taken after a reset (scheduler closed): {COUNTS['steps_after_reset']:,} "
            f"({COUNTS['steps_after_reset'] / max(1, steps):.0%})"
        )
    print("steps per rule: " + ", ".join(f"{k} {v:,}" for k, v in rules.items()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "python": platform.python_version(),
                "cpus": os.cpu_count(),
                "loadavg_before": load_before,
                "machine": args.machine,
                "max_examples_per_run": per,
                "runs": args.chunks,
                "stateful_step_count": args.steps,
                "steps": steps,
                "steps_counted_by": "rule wrappers" if INSTRUMENTED else "invariant passes",
                "examples": COUNTS["examples"],
                "invariant_passes": COUNTS["invariant_passes"],
                "steps_after_reset": COUNTS["steps_after_reset"] if INSTRUMENTED else None,
                "steps_per_rule": rules,
                "failures": failures,
                "wall_s": wall,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"# wrote {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
