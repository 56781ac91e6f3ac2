"""Daemon start-up stays lean: what a local daemon has imported when it runs its first
plain task, its GC state after start-up, and the argv fast path that skips argparse.

No timing here (see benchmarks/latency.py, section 3): only what makes start-up cheap.
"""

from __future__ import annotations

import gc
import shlex
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import asyncmirai as am
from asyncmirai import _daemon

pytestmark = pytest.mark.timeout(60)

# Not imported by a local daemon before (or while) it runs a plain, importable function:
# each is imported on first use only (a traced task, a by-value function, a coroutine,
# a ZeroMQ daemon, a log_level, a bad command line).
NOT_AT_STARTUP = [
    "argparse",
    "subprocess",
    "typing_extensions",
    "asyncio",
    "anyio",
    "cloudpickle",
    "zmq",
    "logging",
    "concurrent.futures",
    "numpy",
    "torch",
    "asyncmirai._otel",
    "asyncmirai._logs",
    "asyncmirai._security",
    "asyncmirai._mainfn",
    # host-side machinery
    "asyncmirai._api",
    "asyncmirai._dispatcher",
    "asyncmirai._scheduler",
    "asyncmirai._supervisor",
    "asyncmirai._profile",
    "asyncmirai._handle",
    "asyncmirai._map",
    "asyncmirai.launchers",
]

# A builtin by reference: running it imports nothing on the daemon.  ``eval`` sees the
# globals of the daemon frame that calls it, so the expression names what it needs.
MODULES = "sorted(__import__('sys').modules)"
GC_STATE = "(__import__('gc').isenabled(), __import__('gc').get_freeze_count())"


def test_first_plain_task_finds_no_lazy_module_imported() -> None:
    try:
        am.daemons(1)
        mods = set(am.mirai(eval, MODULES).result(timeout=30))
    finally:
        am.daemons(0)
    assert "asyncmirai._daemon" in mods  # it is the daemon's module set
    assert "msgpack" in mods  # the handshake's own dependencies are there
    early = sorted(m for m in NOT_AT_STARTUP if m in mods)
    assert not early, f"imported by the daemon before it was needed: {early}"


def test_gc_is_back_on_before_the_first_task() -> None:
    # ``python -m asyncmirai`` starts with the cyclic GC off; the daemon freezes what
    # start-up created and turns the GC on once its handshake is done.
    try:
        am.daemons(1)
        enabled, frozen = am.mirai(eval, GC_STATE).result(timeout=30)
    finally:
        am.daemons(0)
    assert enabled is True
    assert frozen > 0


def test_resume_gc_does_nothing_unless_main_paused_it() -> None:
    # run_daemon() called in-process (not through ``python -m asyncmirai``) leaves the
    # caller's GC as it is.
    assert _daemon._GC_PAUSED is False
    was, frozen = gc.isenabled(), gc.get_freeze_count()
    _daemon._resume_gc()
    assert (gc.isenabled(), gc.get_freeze_count()) == (was, frozen)


# -- the argv fast path ------------------------------------------------------------------


def _argparse(argv: list[str]) -> dict[str, str] | None:
    """What argparse makes of ``argv`` (see ``_same``), or None when it refuses it."""
    try:
        return _same(_daemon._parser().parse_args(argv))
    except SystemExit:
        return None


def _same(ns: Any) -> dict[str, str]:
    """A namespace's values by repr: types must match too (5 is not 5.0), nan == nan."""
    return {k: repr(v) for k, v in vars(ns).items()}


GENERATED = [
    # what local hosts write (Supervisor.spawn: pipe transport, then zmq with a secret fd)
    "fd://5/7 --launch local-1 --autoexit 5.0 --parent 1234",
    "ipc:///tmp/x/dispatcher --launch local-2 --autoexit 5.0 --parent 99",
    "tcp://10.0.0.1:5555 --launch local-3 --autoexit 2.5 "
    "--curve-server-key=-k1.abc --curve-public-key=xY-z --secret-fd=9 --parent 7",
    # what remote launch commands write
    "tcp://[::1]:5555 --launch remote-1-0 --autoexit 5.0 --output "
    "--curve-server-key=abc --curve-public-key=def --secret-fd=0",
    "tcp://h:1 --secret-file /tmp/k --curve-server-key k1 --curve-public-key k2",
    # option order, repeats (last wins), = forms
    "--autoexit 1 ipc:///x --ping=0.25 --autoexit=3",
    "ipc:///x --parent 0 --launch a=b --output --output",
]


@pytest.mark.parametrize("line", GENERATED)
def test_fast_path_reads_generated_argv_like_argparse(line: str) -> None:
    argv = shlex.split(line)
    fast = _daemon._fast_args(argv)
    assert fast is not None, "a command line hosts write must not need argparse"
    assert _same(fast) == _argparse(argv)


@pytest.mark.parametrize(
    "line",
    [
        "",  # no URL
        "--help",
        "-h",
        "a b",  # two URLs
        "ipc:///x --auto 5",  # an abbreviation: argparse accepts it
        "ipc:///x --parent -5",  # a value that starts with "-"
        "ipc:///x --parent x",  # does not convert
        "ipc:///x --launch",  # value missing
        "ipc:///x --launch=",
        "ipc:///x --output=1",
        "ipc:///x -- --launch",
        "ipc:///x --curve-secret-key=abc",  # refused, with argparse's message
        "ipc:///x --unknown 1",
    ],
)
def test_fast_path_leaves_anything_else_to_argparse(line: str) -> None:
    assert _daemon._fast_args(shlex.split(line)) is None


TOKENS = st.sampled_from(
    [
        "ipc:///x",
        "fd://3/4",
        "--launch",
        "--parent",
        "--autoexit",
        "--ping",
        "--output",
        "--curve-server-key",
        "--curve-public-key",
        "--secret-fd",
        "--secret-file",
        "--curve-secret-key",
        "--secret-fd=3",
        "--ping=0.5",
        "--launch=l=1",
        "--curve-public-key=-Z85",
        "--auto",
        "--",
        "-h",
        "-1",
        "0",
        "2.5",
        "nan",
        "abc",
        "",
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(TOKENS, max_size=8))
def test_fast_path_never_disagrees_with_argparse(argv: list[str]) -> None:
    fast = _daemon._fast_args(argv)
    if fast is not None:
        assert _same(fast) == _argparse(argv)


def test_parser_and_fast_path_know_the_same_options() -> None:
    # An option added to the parser must be added to _FAST_OPTIONS too (or be a flag
    # the fast path reads), or the fast path's namespace would miss it.
    parser = _daemon._parser()
    dests = {a.dest for a in parser._actions} - {"help"}
    fast = {k[2:].replace("-", "_") for k in _daemon._FAST_OPTIONS}
    assert dests == fast | {"url", "output", "curve_secret_key"}
