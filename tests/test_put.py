"""am.put: an object sent once to each daemon, cached there, referenced by tasks."""

from __future__ import annotations

import gc
import os
import time

import pytest

import asyncmirai as am

pytestmark = pytest.mark.timeout(90)


def identity_of(obj: object) -> tuple[int, int]:
    """(daemon pid, id() of the object the task received)."""
    return os.getpid(), id(obj)


def size_of(nested: dict[str, list[object]]) -> int:
    (arr,) = nested["inner"]
    return len(arr)  # type: ignore[arg-type]


def cache_size() -> int:
    from asyncmirai import _call

    return len(_call._PUTS)


def wait_until(cond: object, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_object_is_sent_once_and_identical_across_tasks() -> None:
    data = list(range(10_000))
    with am.daemons(1):
        ref = am.put(data)
        first = am.mirai(identity_of, ref).result(30)
        for _ in range(5):
            assert am.mirai(identity_of, ref).result(30) == first  # same object, not re-sent
        assert am.mirai(len, ref).result(30) == 10_000
        # nested at any depth
        assert am.mirai(size_of, {"inner": [ref]}).result(30) == 10_000
        assert am.mirai(cache_size).result(30) == 1


def test_a_late_daemon_gets_it_on_first_use() -> None:
    with am.daemons(1):
        ref = am.put({"k": "v" * 1000})
        pid1, _ = am.mirai(identity_of, ref).result(30)
        am.launch_local(1)
        wait_until(lambda: am.status().connections == 2, "the second daemon")
        pids = {am.mirai(identity_of, ref).result(30)[0] for _ in range(2)}
        ms = [am.mirai(identity_of, ref) for _ in range(8)]
        pids |= {m.result(30)[0] for m in ms}
        assert len(pids | {pid1}) == 2  # both daemons had it when they needed it
        assert am.mirai_map(len, [ref] * 4).result(30) == [1] * 4


def test_cache_entry_goes_when_the_reference_is_collected() -> None:
    with am.daemons(1):
        ref = am.put(b"x" * 100_000)
        assert am.mirai(len, ref).result(30) == 100_000
        assert am.mirai(cache_size).result(30) == 1
        del ref
        gc.collect()
        wait_until(lambda: am.mirai(cache_size).result(30) == 0, "the daemon to drop it")


def test_tensor_inside_travels_and_stays_the_same_object() -> None:
    torch = pytest.importorskip("torch")
    t = torch.arange(1_000_000, dtype=torch.float32)
    with am.daemons(1):
        ref = am.put({"weights": t, "name": "w"})
        s1 = am.mirai(lambda d: float(d["weights"].sum()), ref).result(30)
        assert s1 == float(t.sum())
        a = am.mirai(lambda d: id(d["weights"]), ref).result(30)
        b = am.mirai(lambda d: id(d["weights"]), ref).result(30)
        assert a == b


def test_errors() -> None:
    with pytest.raises(RuntimeError, match="no daemons"):
        am.put(1)
    with am.daemons(1), am.daemons(1, compute="other"):
        ref = am.put(1, compute="other")
        with pytest.raises(ValueError, match="belongs to compute profile 'other'"):
            am.mirai(identity_of, ref)
        with pytest.raises(am.SerializationError):
            import threading

            am.put(threading.Lock())
        import pickle

        with pytest.raises(TypeError, match="argument of a task"):
            pickle.dumps(ref)


def test_sync_mode() -> None:
    with am.daemons(sync=True):
        data = [1, 2, 3]
        ref = am.put(data)
        assert am.mirai(identity_of, ref).result(30) == (os.getpid(), id(data))
