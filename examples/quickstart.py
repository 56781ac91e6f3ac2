"""asyncmirai in one page: daemons, awaitable tasks, maps, errors, cancellation."""

from __future__ import annotations

import asyncio
import os
import time

import asyncmirai as am


def slow_square(x: int) -> int:
    time.sleep(0.1)
    return x * x


async def main() -> None:
    async with am.daemons(2):  # two persistent background processes
        # one task: any callable, closures and lambdas included
        base = 10
        print("lambda:", await am.mirai(lambda x: x + base, 5))
        # R-style code string with named objects
        print("code string:", await am.mirai("import math\nmath.hypot(a, b)", a=3, b=4))
        # set up every daemon (and any that connects later)
        await am.everywhere("import json")
        # many tasks, in order, with a progress bar
        print("map:", await am.mirai_map(slow_square, range(8)))
        # remote errors keep their type, message and traceback
        try:
            await am.mirai(int, "not a number")
        except am.MiraiError as e:
            print("error:", e.type_name, "-", e.message)
        # a timeout cancels the work on the daemon, which is then reused
        try:
            await am.mirai(time.sleep, 60, _timeout=0.2)
        except am.MiraiTimeout:
            print("timed out; daemons still up:", am.status().connections)
        pids = {r.pid for r in am.status().daemons}
        print("daemons:", len(pids), "host pid:", os.getpid() not in pids)
    print("reset: daemons set =", am.daemons_set())


if __name__ == "__main__":
    asyncio.run(main())
