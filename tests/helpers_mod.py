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


def die(how: str) -> None:
    import ctypes
    import signal

    if how == "exit":
        os._exit(7)
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if how == "segv":
        ctypes.string_at(0)
    raise ValueError(how)


def stubborn(seconds: float) -> str:
    """Swallows every interrupt: only a kill stops it."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            time.sleep(0.05)
        except BaseException:
            pass
    return "finished"


def die_once(flag_path: str) -> str:
    """Crash the first time (per flag file), succeed on retry."""
    if not os.path.exists(flag_path):
        with open(flag_path, "w") as f:
            f.write("x")
        os._exit(9)
    return "second try"
