"""Script functions (``__main__``) pickled once, yet every call sees the values of now.

The functions here are made by ``exec`` in a namespace named ``__main__``, so cloudpickle
treats them as a script's: by value.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from typing import Any

import pytest

import asyncmirai as am
from asyncmirai import _mainfn

pytestmark = pytest.mark.timeout(60)

SCRIPT = """
import math
K = 1
L = [1]
N = 0

def plain(x):
    return x * K + math.floor(0.5)

def uses_list():
    return sum(L)

def bump():
    global N
    N += 1
    return N

def helper():
    return 10 * K

def outer():
    return helper() + 1

def me():
    me.calls = getattr(me, "calls", 0) + 1  # on the daemon's copy
    return me.calls

def with_default(x, scale=2):
    return x * scale

def make_closure():
    x = 1
    def get():
        return x
    def put(v):
        nonlocal x
        x = v
    return get, put

def recursive(n):
    return 0 if n == 0 else n + recursive(n - 1)
"""


@pytest.fixture
def ns() -> dict[str, Any]:
    space: dict[str, Any] = {"__name__": "__main__"}
    exec(SCRIPT, space)
    return space


@pytest.fixture
def daemon() -> Iterator[None]:
    am.daemons(1)
    yield
    am.daemons(0)


def run(fn: Any, *args: Any) -> Any:
    return am.mirai(fn, *args).result(30)


# --------------------------------------------------------------------------- host cache


def test_unchanged_function_is_pickled_once(ns: dict[str, Any]) -> None:
    first = _mainfn.by_value(ns["plain"])
    second = _mainfn.by_value(ns["plain"])
    assert first is not None and second is not None
    assert second.blob is first.blob  # the same bytes object: not pickled again
    assert pickle.loads(pickle.dumps(second))(3) == 3


@pytest.mark.parametrize(
    "change",
    [
        lambda ns: ns.__setitem__("K", 5),  # a global it names is rebound
        lambda ns: ns.__setitem__("math", __import__("cmath")),  # a module rebound
        lambda ns: setattr(ns["plain"], "__defaults__", (7,)),
        lambda ns: setattr(ns["plain"], "extra", 1),  # its __dict__
    ],
)
def test_any_change_pickles_again(ns: dict[str, Any], change: Any) -> None:
    first = _mainfn.by_value(ns["plain"])
    assert first is not None
    change(ns)
    second = _mainfn.by_value(ns["plain"])
    assert second is not None and second.blob != first.blob


def test_change_in_a_function_it_calls_pickles_again(ns: dict[str, Any]) -> None:
    first = _mainfn.by_value(ns["outer"])
    assert first is not None
    ns["K"] = 3  # a global of ``helper``, not of ``outer``
    second = _mainfn.by_value(ns["outer"])
    assert second is not None and second.blob != first.blob
    assert pickle.loads(pickle.dumps(second))() == 31


def test_mutable_state_is_not_cached(ns: dict[str, Any]) -> None:
    assert _mainfn.by_value(ns["uses_list"]) is None
    ns["K"] = [1]  # now ``plain`` names a list
    assert _mainfn.by_value(ns["plain"]) is None


def test_rebinding_code_is_rebuilt_on_the_daemon(ns: dict[str, Any]) -> None:
    bump = _mainfn.by_value(ns["bump"])
    assert bump is not None and bump.load is _mainfn.fresh_function
    get, put = ns["make_closure"]()
    assert _mainfn.by_value(put).load is _mainfn.fresh_function  # type: ignore[union-attr]
    assert _mainfn.by_value(get).load is _mainfn.cached_function  # type: ignore[union-attr]


# --------------------------------------------------------------------------- end to end


def test_daemon_builds_a_script_function_once(daemon: None, ns: dict[str, Any]) -> None:
    # the daemon's copy of ``me`` is the same object at the second call
    # (built afresh, it would count 1 again: what a task that writes attributes to its
    # own function sees differently with the cache, as the module doc says)
    assert [run(ns["me"]) for _ in range(3)] == [1, 2, 3]
    assert not hasattr(ns["me"], "calls")  # the host's function is untouched


def test_calls_see_the_values_of_now(daemon: None, ns: dict[str, Any]) -> None:
    assert run(ns["plain"], 2) == 2
    ns["K"] = 4
    assert run(ns["plain"], 2) == 8
    assert run(ns["uses_list"]) == 1
    ns["L"].append(5)  # mutated in place
    assert run(ns["uses_list"]) == 6
    assert run(ns["outer"]) == 41
    ns["helper"] = lambda: 100  # a function it calls, redefined
    assert run(ns["outer"]) == 101
    assert run(ns["with_default"], 3) == 6
    ns["with_default"].__defaults__ = (10,)
    assert run(ns["with_default"], 3) == 30
    get, put = ns["make_closure"]()
    assert run(get) == 1
    put(9)
    assert run(get) == 9
    assert run(ns["recursive"], 4) == 10


def test_global_writes_on_the_daemon_do_not_stick(daemon: None, ns: dict[str, Any]) -> None:
    # without the cache every call unpickles a fresh copy of the host's N = 0
    assert [run(ns["bump"]) for _ in range(3)] == [1, 1, 1]


def test_the_cache_does_not_keep_functions_alive(ns: dict[str, Any]) -> None:
    import gc
    import weakref

    fn = ns["plain"]
    assert _mainfn.by_value(fn) is not None
    ref = weakref.ref(fn)
    del fn, ns["plain"]
    gc.collect()
    assert ref() is None
