"""Functions defined in an importable module: daemons resolve them by reference."""

from __future__ import annotations

import os
import time
from typing import Any

STATE: dict[str, Any] = {}


def inc(x: int) -> int:
    return x + 1


def getpid() -> int:
    return os.getpid()


def boom(msg: str) -> None:
    raise ValueError(msg)


def set_state(key: str, value: Any) -> int:
    STATE[key] = value
    return os.getpid()


def get_state(key: str) -> Any:
    return STATE.get(key)


def append_state(key: str, value: Any) -> list[Any]:
    STATE.setdefault(key, []).append(value)
    return list(STATE[key])


def sleep_then(seconds: float, value: Any) -> Any:
    time.sleep(seconds)
    return value


def busy_loop(seconds: float) -> int:
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n += 1
    return n


def touch(path: str) -> str:
    with open(path, "w") as f:
        f.write("ran")
    return path


def pid_and_state(key: str, seconds: float = 0.0) -> tuple[int, Any]:
    time.sleep(seconds)
    return os.getpid(), STATE.get(key)
