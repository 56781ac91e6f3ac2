"""Shared fixtures: anyio backends, and a guard that no profile or daemon outlives a test."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # so tests can import helper modules, and daemons can too
    sys.path.insert(0, HERE)

from servers import pid_alive  # noqa: E402  (one definition, shared with the fixtures)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def wait_dead(pids: list[int], timeout: float = 5.0) -> list[int]:
    """Wait until none of ``pids`` runs; return those still alive at the deadline."""
    deadline = time.monotonic() + timeout
    alive = [p for p in pids if pid_alive(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.02)
        alive = [p for p in alive if pid_alive(p)]
    return alive


def child_pids() -> list[int]:
    """asyncmirai daemon processes whose parent is this test process."""
    me = os.getpid()
    out = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me and fields[0] not in ("Z", "X"):
            try:
                with open(f"/proc/{p}/cmdline", "rb") as f:
                    cmd = f.read().split(b"\0")
            except OSError:
                continue
            if b"asyncmirai" in cmd and b"daemon" in cmd:
                out.append(int(p))
    return out


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    """Reset every profile after each test; fail if a daemon process survives it."""
    yield
    from asyncmirai import _api

    leftover = list(_api.profiles)
    for name in leftover:
        _api._reset(name, wait=True)
    alive = wait_dead([p for p in child_pids()], timeout=5.0)
    assert not alive, f"daemon processes survived the test: {alive}"
    assert not leftover, f"test left compute profiles set: {leftover}"
