"""Host instructions per round trip, counted by valgrind (repeatable on a noisy VM).

Wall-clock A/B runs on the 2-vCPU dev VM vary by +/-20% from run to run; instruction
counts do not.  For each mode, the host process (all its threads; daemons are not
traced) runs N1 and N2 round trips of ``operator.neg`` under ``valgrind --tool=callgrind``
and the difference divided by N2 - N1 is the cost of one round trip:

* ``result``: a plain script, ``am.mirai(...).result()`` (dispatcher on a private thread);
* ``hop``: awaited from an asyncio loop, dispatcher on the private thread;
* ``loop``: awaited from the loop that runs the dispatcher.

    .venv/bin/python benchmarks/instructions.py                 # this tree
    .venv/bin/python benchmarks/instructions.py --old 4d64ac6   # and an older commit

Needs valgrind (Debian's package).  About a minute per mode and tree.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = """
import sys, operator, asyncio
import asyncmirai as am
n, mode = int(sys.argv[1]), sys.argv[2]
if mode == "loop":
    async def run():
        async with am.daemons(1):
            await am.mirai(operator.neg, 1)
            for _ in range(n):
                await am.mirai(operator.neg, 1)
    asyncio.run(run())
else:
    am.daemons(1)
    am.mirai(operator.neg, 1).result(300)
    if mode == "result":
        for _ in range(n):
            am.mirai(operator.neg, 1).result()
    else:
        async def run():
            for _ in range(n):
                await am.mirai(operator.neg, 1)
        asyncio.run(run())
    am.daemons(0)
"""


def count(tree: str, n: int, mode: str, tmp: str) -> int:
    script = os.path.join(tmp, "child.py")
    with open(script, "w") as f:
        f.write(CHILD)
    out = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={tmp}/cg.%p",
            sys.executable,
            script,
            str(n),
            mode,
        ],
        capture_output=True,
        text=True,
        cwd=tmp,  # not the repository: the daemons must import the tree under test
        env=dict(os.environ, PYTHONPATH=tree),
        timeout=1800,
    )
    m = re.search(r"Collected : (\d+)", out.stderr)
    if m is None:
        raise RuntimeError(out.stderr[-2000:])
    return int(m.group(1))


def per_round_trip(tree: str, mode: str, n1: int, n2: int) -> int:
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(2) as pool:
        a, b = pool.map(lambda n: count(tree, n, mode, tmp), (n1, n2))
    return (b - a) // (n2 - n1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old", help="also measure this commit (a temporary git worktree)")
    p.add_argument("--modes", default="result,hop,loop")
    p.add_argument("--n", default="200,1200", help="the two round-trip counts")
    args = p.parse_args()
    n1, n2 = map(int, args.n.split(","))
    trees = {"this tree": ROOT}
    wt = None
    if args.old:
        wt = tempfile.mkdtemp(prefix="am-old-")
        subprocess.run(
            ["git", "worktree", "add", "--detach", wt, args.old],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        trees[args.old] = wt
    try:
        print("| mode | " + " | ".join(trees) + " |")
        print("|---|" + "---:|" * len(trees))
        for mode in args.modes.split(","):
            cells = [f"{per_round_trip(t, mode, n1, n2):,}" for t in trees.values()]
            print(f"| {mode} | " + " | ".join(cells) + " |")
    finally:
        if wt is not None:
            subprocess.run(["git", "worktree", "remove", "--force", wt], cwd=ROOT)


if __name__ == "__main__":
    main()
