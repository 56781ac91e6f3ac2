"""The public functions: daemons, mirai, everywhere, status and friends."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import contextvars
import functools
import hashlib
import itertools
import os
import pickle
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import FunctionType
from typing import Any, Literal, TypeVar, overload

from . import _codecs, _mainfn, _otel, _protocol
from ._budget import parse_size
from ._call import CALL, CODE, apply_seed, error_record, eval_code
from ._errors import MiraiCancelled, MiraiError, QueueFull, SerializationError, make_error
from ._handle import ARGUMENT_HANDLES, CANCELLED, ERROR, VALUE, Mirai
from ._profile import _REGISTRY_LOCK, Profile, profiles
from ._put import PUT_REFS, PutRef
from ._scheduler import Job, Setup

__all__ = [
    "DaemonInfo",
    "Daemons",
    "Status",
    "daemons",
    "daemons_set",
    "everywhere",
    "host_url",
    "launch_local",
    "launch_remote",
    "local_url",
    "mirai",
    "status",
]

T = TypeVar("T")
_task_ids = itertools.count(1)


# -- daemons ---------------------------------------------------------------------------
class Daemons:
    """What :func:`daemons` returns: the profile's settings, and a context manager.

    ``with am.daemons(2): ...`` and ``async with am.daemons(2): ...`` reset the profile
    on exit (the async form waits for the daemon processes without blocking the loop).
    Compares equal to its number of local daemons.
    """

    def __init__(self, compute: str, n: int, url: str) -> None:
        self.compute = compute
        self.n = n
        self.url = url

    def __repr__(self) -> str:
        return f"Daemons(compute={self.compute!r}, n={self.n}, url={self.url!r})"

    def __int__(self) -> int:
        return self.n

    def __index__(self) -> int:
        return self.n

    def __eq__(self, other: object) -> bool:
        if isinstance(other, int):
            return self.n == other
        if isinstance(other, Daemons):
            return (self.compute, self.n, self.url) == (other.compute, other.n, other.url)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.n)  # equal to its number: the same hash as that int

    def __enter__(self) -> Daemons:
        return self

    def __exit__(self, *exc: object) -> None:
        _reset(self.compute, wait=True)

    async def __aenter__(self) -> Daemons:
        return self

    async def __aexit__(self, *exc: object) -> None:
        reaper = _reset(self.compute, wait=False)
        if reaper is not None:
            import anyio

            await anyio.to_thread.run_sync(reaper.join)


def _reset(compute: str, *, wait: bool) -> threading.Thread | None:
    with _REGISTRY_LOCK:
        prof = profiles.pop(compute, None)
    if prof is None:
        return None
    reaper = prof.close()
    if wait and not prof.is_dispatcher_thread():
        reaper.join(10)
    return reaper


@overload
def daemons(  # type: ignore[overload-overlap]
    n: Literal[0],
    *,
    url: None = None,
    remote: None = None,
    compute: str = "default",
    serial: _codecs.SerialConfig | Sequence[_codecs.SerialConfig] | None = None,
    seed: int | None = None,
    env: Mapping[str, str] | None = None,
    output: bool = False,
    maxtasks: int | None = None,
    idletime: float | None = None,
    walltime: float | None = None,
    sync: bool = False,
    cancel_grace: float = 2.0,
    autoexit: float = 5.0,
    liveness: float = 30.0,
    curve: bool | None = None,
    keys: tuple[str | os.PathLike[str], str | os.PathLike[str]] | None = None,
    transport: str = "pipe",
    memory: int | str | None = None,
    concurrency: int = 1,
    log_level: int | str | None = None,
) -> int: ...


@overload
def daemons(
    n: int | None = None,
    *,
    url: str | None = None,
    remote: Any = None,
    compute: str = "default",
    serial: _codecs.SerialConfig | Sequence[_codecs.SerialConfig] | None = None,
    seed: int | None = None,
    env: Mapping[str, str] | None = None,
    output: bool = False,
    maxtasks: int | None = None,
    idletime: float | None = None,
    walltime: float | None = None,
    sync: bool = False,
    cancel_grace: float = 2.0,
    autoexit: float = 5.0,
    liveness: float = 30.0,
    curve: bool | None = None,
    keys: tuple[str | os.PathLike[str], str | os.PathLike[str]] | None = None,
    transport: str = "pipe",
    memory: int | str | None = None,
    concurrency: int = 1,
    log_level: int | str | None = None,
) -> Daemons: ...


def daemons(
    n: int | None = None,
    *,
    url: str | None = None,
    remote: Any = None,
    compute: str = "default",
    serial: _codecs.SerialConfig | Sequence[_codecs.SerialConfig] | None = None,
    seed: int | None = None,
    env: Mapping[str, str] | None = None,
    output: bool = False,
    maxtasks: int | None = None,
    idletime: float | None = None,
    walltime: float | None = None,
    sync: bool = False,
    cancel_grace: float = 2.0,
    autoexit: float = 5.0,
    liveness: float = 30.0,
    curve: bool | None = None,
    keys: tuple[str | os.PathLike[str], str | os.PathLike[str]] | None = None,
    transport: str = "pipe",
    memory: int | str | None = None,
    concurrency: int = 1,
    log_level: int | str | None = None,
) -> Daemons | int:
    """Start daemons for a compute profile, or reset it with ``daemons(0)``.

    Returns at once: local daemons connect in the background and tasks queue until they
    do.  Calling it again for a profile that is set resets that profile first.

    Args:
        n: number of local daemons to start; ``0`` resets the profile (daemons exit,
            unresolved tasks fail with :class:`DaemonError`) and returns ``0``.
        url: listen here instead of a private ipc socket, e.g. ``"tcp://0.0.0.0:0"`` for
            remote daemons (CurveZMQ encryption and authentication are on by default).
        remote: a launcher (:func:`ssh_config`, :func:`cluster_config`) that starts ``n``
            remote daemons (default: one per ssh host; no local ones are started).
            Without ``url=`` the profile listens on :func:`host_url`.
        compute: the profile's name; profiles are independent.
        serial: :func:`serial_config` codec(s) for this profile, on host and daemons.
        seed: make randomness reproducible: each task gets its own stream derived from
            ``seed`` and the task's submission order, whatever the number of daemons.
        env: environment variables set in the daemons.
        output: forward the daemons' stdout/stderr to the host's, prefixed per daemon.
        maxtasks / idletime / walltime: a daemon retires after that many tasks / seconds
            idle / seconds alive (after finishing its current task); local daemons are
            replaced so the profile keeps ``n``.
        sync: evaluate tasks in this process at ``mirai()`` time (for debugging).
        cancel_grace: seconds a cancelled task may take to stop before its daemon is killed.
        autoexit: seconds a daemon survives without a connection to the host.
        liveness: seconds without a ping before a remote daemon is declared lost.
        curve: force CurveZMQ on or off (default: on for tcp URLs).
        keys: your own CurveZMQ certificates instead of generated ones: the paths of the
            host's and the daemons' ``.key_secret`` files (``zmq.auth.create_certificates``
            format).
        transport: how local daemons talk to the dispatcher: ``"pipe"`` (a socketpair
            each, the fastest on one machine) or ``"zmq"`` (they dial the profile's URL
            like remote daemons).  Remote daemons always use ZeroMQ.
        memory: a budget for the payload bytes of tasks waiting in the queue: an int of
            bytes or a string such as ``"512MB"`` or ``"2GiB"``; ``None`` (the default)
            is unbounded.  When it is full, :func:`mirai` blocks on a plain thread and
            raises :class:`QueueFull` on an event loop; see :func:`submit` and
            :func:`try_mirai`.  A task larger than the budget is admitted when the queue
            is empty.
        concurrency: ``async def`` tasks each daemon runs at once on its event loop
            (plain functions run one at a time in its main thread and take a slot).
        log_level: forward the daemons' logging records at or above this level
            (``"INFO"``, ``logging.WARNING``, ...) from any logger: they are handled on
            the host by the logger ``asyncmirai.daemon``, keeping their logger name,
            level, message, exception text and time, with the attributes ``compute``,
            ``daemon_pid``, ``daemon_host``, ``daemon_launch`` and ``task_id``.

    Raises:
        ValueError: bad arguments.
    """
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 0):
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if not isinstance(compute, str) or not compute:
        raise ValueError(f"compute must be a non-empty string, got {compute!r}")
    _reset(compute, wait=True)
    if n == 0 and url is None and not sync:
        return 0
    if remote is not None and url is None:
        url = host_url()
    if n is None and url is None and not sync:
        raise ValueError("daemons() needs a number of daemons, url=, remote= or sync=True")
    for name, v in (("maxtasks", maxtasks), ("idletime", idletime), ("walltime", walltime)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | float) or v <= 0):
            raise ValueError(f"{name} must be a positive number, got {v!r}")
    capacity = parse_size(memory)
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise ValueError(f"concurrency must be a positive int, got {concurrency!r}")
    level = _log_level(log_level)
    if transport not in ("pipe", "zmq"):
        raise ValueError(f"transport must be 'pipe' or 'zmq', got {transport!r}")
    if url is not None and not url.startswith(("tcp://", "ipc://")):
        raise ValueError(f"url must start with tcp:// or ipc://, got {url!r}")
    configs = _as_configs(serial)
    curve_keys = None
    if keys is not None:
        from ._security import load_keypair

        if not (isinstance(keys, tuple | list) and len(keys) == 2):
            raise ValueError("keys= takes (host .key_secret path, daemon .key_secret path)")
        curve_keys = (load_keypair(keys[0]), load_keypair(keys[1]))
        if curve is False:
            raise ValueError("keys= needs CurveZMQ: do not pass curve=False with it")
        curve = True
    count = n or 0
    if remote is not None and n is None:  # as in mirai: one daemon per remote host
        count = len(getattr(remote, "remotes", ())) or 1
    local = 0 if remote is not None else count
    prof = Profile(
        compute,
        n=local,
        url=url,
        serial=configs,
        seed=seed,
        env=env,
        output=output,
        maxtasks=maxtasks,
        idletime=idletime,
        walltime=walltime,
        cancel_grace=cancel_grace,
        autoexit=autoexit,
        liveness=liveness,
        curve=curve,
        sync=sync,
        transport=transport,
        curve_keys=curve_keys,
        memory=capacity,
        concurrency=concurrency,
        log_level=level,
    )
    with _REGISTRY_LOCK:
        profiles[compute] = prof
    _otel.profile_started()
    if remote is not None and count:
        launch_remote(count, remote=remote, compute=compute)
    return Daemons(compute, count, prof.url)


def _log_level(level: int | str | None) -> int | None:
    if level is None:
        return None
    if isinstance(level, str):
        import logging

        value = logging.getLevelName(level.upper())
        if isinstance(value, int):
            return value
    elif isinstance(level, int) and not isinstance(level, bool) and level >= 0:
        return level
    raise ValueError(f"log_level must be a logging level name or int, got {level!r}")


def _as_configs(
    serial: _codecs.SerialConfig | Sequence[_codecs.SerialConfig] | None,
) -> tuple[_codecs.SerialConfig, ...]:
    if serial is None:
        return ()
    if isinstance(serial, _codecs.SerialConfig):
        return (serial,)
    out = tuple(serial)
    for c in out:
        if not isinstance(c, _codecs.SerialConfig):
            raise TypeError(f"serial= takes am.serial_config(...) objects, got {type(c).__name__}")
    return out


_current: contextvars.ContextVar[str] = contextvars.ContextVar(
    "asyncmirai_compute", default="default"
)


def _name(compute: str | None) -> str:
    return _current.get() if compute is None else compute


def _profile(compute: str | None) -> Profile:
    name = _current.get() if compute is None else compute
    prof = profiles.get(name)
    if prof is None:
        raise RuntimeError(
            f"no daemons are set for compute profile {name!r}: call "
            f"am.daemons(n{'' if name == 'default' else f', compute={name!r}'}) first"
        )
    return prof


@contextlib.contextmanager
def using(compute: str) -> Iterator[str]:
    """Make ``compute`` the default profile inside the block (R mirai's ``with_daemons``).

    ``mirai``, ``submit``, ``try_mirai``, ``mirai_map``, ``everywhere``, ``status``,
    ``info`` and ``executor`` called without an explicit profile use it.  A context
    variable: it follows the current task or thread, so concurrent tasks can use
    different profiles.
    """
    if not isinstance(compute, str) or not compute:
        raise ValueError(f"compute must be a non-empty string, got {compute!r}")
    token = _current.set(compute)
    try:
        yield compute
    finally:
        _current.reset(token)


def require_daemons(compute: str | None = None) -> None:
    """Raise a clear RuntimeError unless daemons are set for the profile (default: the
    current one, see :func:`using`)."""
    _profile(compute)


def on_daemon() -> bool:
    """True when called inside a task running on a daemon (or in ``sync=True`` mode)."""
    mod = sys.modules.get("asyncmirai._daemon")
    return bool(_in_sync_task.get()) or (
        mod is not None and getattr(mod, "_CURRENT", None) is not None
    )


_in_sync_task: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "asyncmirai_in_sync_task", default=False
)


def daemons_set(compute: str | None = None) -> bool:
    """True if daemons are set for the compute profile (default: the current one)."""
    return _name(compute) in profiles


@dataclass(frozen=True)
class DaemonInfo:
    """One connected daemon, as seen by the dispatcher."""

    pid: int
    host: str
    launch: str
    busy: bool
    tasks_done: int
    connected_at: float
    local: bool
    tasks: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Status:
    """A snapshot of a compute profile (what :func:`status` returns).

    Attributes:
        connections: daemons connected now.
        url: the URL daemons dial (the real port when ``:0`` was asked for).
        awaiting: tasks queued, waiting for a daemon.
        executing: tasks running on daemons.
        completed: tasks that returned a value or an error since the profile started.
        daemons: one :class:`DaemonInfo` per connected daemon.
        memory: the memory budget: ``{"queued", "peak", "capacity"}`` in bytes
            (``capacity`` is None when unbounded).
    """

    connections: int
    url: str
    awaiting: int
    executing: int
    completed: int
    daemons: list[DaemonInfo] = field(default_factory=list)
    memory: dict[str, Any] = field(default_factory=dict)
    compute: str = "default"

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def _table(self) -> tuple[list[str], list[list[str]], list[str]]:
        """Header lines, the per-daemon rows, the column names (shared by str and HTML)."""
        mem = self.memory or {}
        cap = mem.get("capacity")
        budget = (
            "unbounded"
            if cap is None
            else f"{_bytes(mem.get('queued', 0))} of {_bytes(cap)} queued "
            f"(peak {_bytes(mem.get('peak', 0))})"
        )
        head = [
            f"compute profile {self.compute!r}  {self.url}",
            f"connections {self.connections}  awaiting {self.awaiting}  "
            f"executing {self.executing}  completed {self.completed}",
            f"memory budget: {budget}",
        ]
        now = time.time()
        cols = ["pid", "host", "state", "done", "running", "uptime"]
        rows = [
            [
                str(d.pid),
                d.host + ("" if d.local else " (remote)"),
                "busy" if d.busy else "idle",
                str(d.tasks_done),
                ",".join(map(str, d.tasks)) or "-",
                _duration(now - d.connected_at) if d.connected_at else "-",
            ]
            for d in self.daemons
        ]
        return head, rows, cols

    def __str__(self) -> str:
        head, rows, cols = self._table()
        widths = [max([len(c), *(len(r[i]) for r in rows)]) for i, c in enumerate(cols)]
        line = "  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip()
        body = [
            "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows
        ]
        return "\n".join([*head, "", line, *body] if rows else [*head, "(no daemon connected)"])

    def _repr_html_(self) -> str:
        """An HTML table (Jupyter)."""
        import html

        head, rows, cols = self._table()
        th = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
        trs = "".join(
            "<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in r) + "</tr>" for r in rows
        )
        caption = "<br>".join(html.escape(h) for h in head)
        return (
            f"<div><p>{caption}</p><table><thead><tr>{th}</tr></thead>"
            f"<tbody>{trs}</tbody></table></div>"
        )

    @property
    def rows(self) -> list[DaemonInfo]:
        """The per-daemon rows (same as ``daemons``)."""
        return self.daemons


def status(compute: str | None = None) -> Status:
    """Return a :class:`Status` snapshot of the compute profile.

    Raises:
        RuntimeError: no daemons are set for that profile.
    """
    prof = _profile(compute)
    raw = prof.status()
    rows = [DaemonInfo(**r) for r in raw.pop("daemons")]
    return Status(daemons=rows, compute=prof.compute, **raw)


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _duration(seconds: float) -> str:
    s = int(max(0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def launch_local(n: int = 1, *, compute: str | None = None) -> int:
    """Start ``n`` more local daemons for a profile (e.g. one set up with ``url=``)."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    prof = _profile(compute)
    if prof.sync:
        raise RuntimeError("launch_local() does not apply to a sync=True profile")
    prof.launch_local(n)
    return n


def launch_remote(n: int = 1, *, remote: Any = None, compute: str | None = None) -> list[str]:
    """Shell commands that start ``n`` daemons for a profile elsewhere (keys included).

    On a CurveZMQ profile the public keys are on the command line and the daemon's secret
    key is in a quoted here-document that becomes its stdin (``--secret-fd 0``): feed a
    command to a shell's *stdin* (``sh -s``, ``ssh node sh -s``, a job script), never to
    ``sh -c``, which would put the secret on that shell's argv.  With ``remote`` (an
    :func:`ssh_config` or :func:`cluster_config`) the commands are also run through that
    launcher.
    """
    import shlex

    from ._security import with_secret

    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    prof = _profile(compute)
    if prof.sync:
        raise RuntimeError("launch_remote() does not apply to a sync=True profile")
    # The host's own interpreter unless the launcher says otherwise: a remote "python3"
    # is often another environment, without asyncmirai ("No module named asyncmirai").
    python = getattr(remote, "python", None) or shlex.quote(sys.executable)
    cmds = []
    for i in range(n):
        argv = prof.daemon_command(python=python, launch=f"remote-{os.getpid()}-{i}", remote=True)
        if remote is not None and hasattr(remote, "rewrite_url"):
            argv[4] = remote.rewrite_url(argv[4])  # ssh tunnel: the tunnel's remote end
        # A wildcard (url="tcp://0.0.0.0:0") is where the host listens, not an address
        # another machine can dial: daemons get this machine's network address.
        argv[4] = dial_url(argv[4])
        # ``python`` is a shell fragment ("env X=1 python", "conda run -n env python"):
        # written as is, not quoted as one word.
        cmd = f"{python} {shlex.join(argv[1:])}"
        if prof.curve_client is not None:  # the secret goes to stdin, never on argv
            cmd = with_secret(cmd, prof.curve_client[1])
        cmds.append(cmd)
    if remote is not None:
        handles = remote.launch(cmds, url=prof.url) if _takes_url(remote) else remote.launch(cmds)
        prof.launchers.extend(handles)
    return cmds


def _takes_url(remote: Any) -> bool:
    import inspect

    try:
        return "url" in inspect.signature(remote.launch).parameters
    except (TypeError, ValueError):
        return False


def _network_address(ipv6: bool = False) -> str:
    """This machine's address that other machines reach it at (as mirai's
    ``host_url()`` does): the host name's address unless that is a loopback one (many
    Debian-style systems map the host name to 127.0.x.1), else the source address the
    kernel picks for a route outwards (a UDP ``connect`` sends no packet), else the
    loopback address."""
    import ipaddress

    family = socket.AF_INET6 if ipv6 else socket.AF_INET
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None, family, socket.SOCK_STREAM)
        for info in infos:
            addr = str(info[4][0])
            ip = ipaddress.ip_address(addr.split("%")[0])
            if not (ip.is_loopback or ip.is_link_local or ip.is_unspecified):
                return addr
    except (OSError, ValueError):
        pass
    # Documentation prefixes (RFC 5737 / RFC 3849): only the route is looked up.
    probe = ("2001:db8::1", 9) if ipv6 else ("198.51.100.1", 9)
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect(probe)
            addr = str(s.getsockname()[0])
        ip = ipaddress.ip_address(addr.split("%")[0])
        if not (ip.is_loopback or ip.is_unspecified):
            return addr
    except (OSError, ValueError):
        pass
    return "::1" if ipv6 else "127.0.0.1"


def host_url(port: int = 0, *, ipv6: bool = False) -> str:
    """A tcp URL on this machine's network address, for remote daemons to dial (and
    for the host to listen on): e.g. ``tcp://10.1.2.3:0``; the loopback address when
    this machine has no other."""
    addr = _network_address(ipv6)
    return f"tcp://[{addr}]:{port}" if ipv6 else f"tcp://{addr}:{port}"


_WILDCARDS = ("*", "0.0.0.0", "::", "")


def dial_url(url: str) -> str:
    """The URL other machines dial for a host listening on ``url``: a wildcard address
    (``tcp://0.0.0.0:PORT``, ``tcp://*:PORT``, ``tcp://[::]:PORT``) is replaced by this
    machine's network address; anything else is returned as is."""
    import re

    m = re.fullmatch(r"tcp://(\[[^\]]*\]|[^:/\[\]]*):(\d+)/?", url.strip())
    if m is None:
        return url
    bare = m.group(1).strip("[]")
    if bare not in _WILDCARDS:
        return url
    ipv6 = m.group(1).startswith("[")
    addr = _network_address(ipv6)
    host = f"[{addr}]" if ipv6 else addr
    return f"tcp://{host}:{m.group(2)}"


def local_url() -> str:
    """A fresh ipc URL in a private (0700) directory, for daemons on this machine."""
    d = tempfile.mkdtemp(prefix="asyncmirai-url-")
    return f"ipc://{d}/sock"


# -- tasks -----------------------------------------------------------------------------
@functools.lru_cache(maxsize=256)
def _check_code(code: str) -> None:
    """A code string that does not parse fails at ``mirai()``, in the caller, with
    Python's own SyntaxError (as an R expression fails to parse before mirai() runs),
    not later on a daemon.  Cached: the same string is usually sent many times."""
    import ast

    ast.parse(code, "<mirai>", "exec")


def _derive_seed(seed: int, index: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _encode_call(
    kind: int,
    fn: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    table: _codecs.CodecTable,
    handles: list[Mirai[Any]] | None = None,
    refs: list[PutRef] | None = None,
) -> tuple[Any, list[Any], list[Any]]:
    """Encode a call; handles and ``am.put`` references met in its arguments (at any
    depth) go to ``handles`` and ``refs``."""
    payload = (kind, fn, args, kwargs)
    if not table._custom and _codecs.plain_call(fn, args, kwargs):  # the per-task fast
        return pickle.dumps(payload, 5), [], []  # path: no handle or reference in there
    if type(fn) is FunctionType and not _codecs._by_reference(fn):
        # a script's function: its bytes pickled once, while unchanged (``_mainfn``)
        stand_in = _mainfn.by_value(fn)
        if stand_in is not None:
            payload = (kind, stand_in, args, kwargs)
            if not table._custom and _codecs.plain_args(args, kwargs):
                return pickle.dumps(payload, 5), [], []
    token = ARGUMENT_HANDLES.set(handles)
    token_refs = PUT_REFS.set(refs)
    try:
        return _codecs.dumps(payload, table)
    except SerializationError:
        raise
    except Exception as exc:
        what = _culprit(fn, args, kwargs, table)
        raise SerializationError(f"mirai(): cannot serialize {what}: {exc}") from exc
    finally:
        ARGUMENT_HANDLES.reset(token)
        PUT_REFS.reset(token_refs)


def _culprit(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any], table: Any) -> str:
    """Name the argument that fails to serialize (only on the error path)."""
    parts: list[tuple[str, Any]] = [("the function", fn)]
    parts += [(f"positional argument {i}", a) for i, a in enumerate(args)]
    parts += [(f"keyword argument {k!r}", v) for k, v in kwargs.items()]
    for label, obj in parts:
        try:
            _codecs.dumps(obj, table)
        except Exception:
            return f"{label} (an object of type {type(obj).__qualname__})"
    return "the call"


def _prepare(
    prof: Profile,
    fn: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    timeout: float | None,
    retries: int,
    what: str = "mirai",
) -> tuple[Job | None, Mirai[Any]]:
    """Validate and encode one call: its job (None in sync mode, already run) and handle."""
    if isinstance(fn, str):
        if args:
            raise TypeError(f"{what}(code_string, ...) takes named objects only (x=1, ...)")
        _check_code(fn)
        kind: int = CODE
    elif callable(fn):
        kind = CALL
    else:
        raise TypeError(f"{what}() takes a callable or a code string, not {type(fn).__name__}")
    if timeout is not None and (isinstance(timeout, bool) or not timeout > 0):
        raise ValueError(f"_timeout must be a positive number of seconds, got {timeout!r}")
    if not isinstance(retries, int) or retries < 0:
        raise ValueError(f"_retries must be a non-negative int, got {retries!r}")
    tid = next(_task_ids)
    if prof.sync:
        return None, _run_sync(prof, tid, kind, fn, args, kwargs)
    index = next(prof.task_index)
    handles: list[Mirai[Any]] = []
    refs: list[PutRef] = []
    body, desc, bufs = _encode_call(kind, fn, args, kwargs, prof.table, handles, refs)
    obs = _otel_begin(prof.compute, tid, fn, args)  # None unless tracing or metrics are on
    if handles and any(h._state != VALUE for h in handles):
        return None, _after(
            prof, tid, index, kind, fn, args, kwargs, timeout, retries, handles, obs
        )
    extra = None if prof.seed is None else {"seed": _derive_seed(prof.seed, index)}
    if obs is not None:
        extra = obs.extra(extra)
    frames: Any = _protocol.encode_task(tid, body, desc, bufs, extra)
    nbytes = sum(map(_nbytes, frames)) if prof.budget is not None else 0
    if len(frames) == 1:  # most tasks: the bare header frame (64 B less per queued task)
        frames = frames[0]
    job = Job(tid, None, frames, retries, timeout, nbytes)
    if refs:
        job.refs = _check_refs(prof, refs)
    m: Mirai[Any] = Mirai(tid, prof, job)
    job.handle = m
    if obs is not None:
        obs.attach(job, m, frames)
    return job, m


_otel_begin = _otel.begin


def _after(
    prof: Profile,
    tid: int,
    index: int,
    kind: int,
    fn: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    timeout: float | None,
    retries: int,
    upstream: list[Mirai[Any]],
    obs: _otel.Record | None = None,
) -> Mirai[Any]:
    """A task whose arguments hold handles without a value yet: it is submitted once they
    all resolve (encoded again, with their values), or fails with the first upstream
    error.  Its handle exists at once; cancelling it drops the wait.  A handle can only
    take handles that exist before it as arguments, so no cycle can be built."""
    job = Job(tid, None, None, retries, timeout)
    m: Mirai[Any] = Mirai(tid, prof, job)
    job.handle = m
    if obs is not None:
        obs.attach(job, m, None)
    once = threading.Lock()

    def ready(_: Mirai[Any]) -> None:
        if not all(h.done() for h in upstream) or not once.acquire(blocking=False):
            return
        if m.done():  # cancelled while it waited
            return
        for h in upstream:
            if h.cancelled() or h.exception() is not None:
                m._resolve(ERROR, _upstream_error(h))
                return
        try:
            refs: list[PutRef] = []
            body, desc, bufs = _encode_call(kind, fn, args, kwargs, prof.table, [], refs)
            extra = None if prof.seed is None else {"seed": _derive_seed(prof.seed, index)}
            if obs is not None:
                extra = obs.extra(extra)
            job.frames = _protocol.encode_task(tid, body, desc, bufs, extra)
            if obs is not None:
                obs.bytes_out = _otel._size(job.frames)
            if refs:
                job.refs = _check_refs(prof, refs)
            if prof.budget is not None:  # admitted already: it never waits here
                job.nbytes = sum(map(_nbytes, job.frames))
                prof.budget.force(job.nbytes)
            prof.submit(job)
        except Exception as exc:  # unpicklable upstream value, profile gone
            m._resolve(ERROR, exc)

    for h in upstream:
        h.add_done_callback(ready)
    return m


def _check_refs(prof: Profile, refs: list[PutRef]) -> tuple[PutRef, ...]:
    for ref in refs:
        if ref.compute != prof.compute:
            raise ValueError(
                f"{ref!r} belongs to compute profile {ref.compute!r}, not {prof.compute!r}"
            )
    return tuple(dict.fromkeys(refs))


def _upstream_error(h: Mirai[Any]) -> BaseException:
    """The error of a task whose argument ``h`` failed: the same kind (catchable as the
    upstream's own type), its ``__cause__`` the upstream error."""
    if h.cancelled():
        cause: BaseException = MiraiCancelled(f"mirai {h.id} was cancelled")
    else:
        cause = h.exception() or RuntimeError("no error")
    original = cause.__cause__ if isinstance(cause, MiraiError) else cause
    name = cause.type_name if isinstance(cause, MiraiError) else type(cause).__qualname__
    tb = cause.remote_traceback if isinstance(cause, MiraiError) else ""
    err = make_error(name, f"argument mirai {h.id} failed: {cause}", tb, original)
    err.__cause__ = cause
    return err


def _nbytes(frame: Any) -> int:
    return frame.nbytes if isinstance(frame, memoryview) else len(frame)


def _on_event_loop() -> bool:
    """Does this thread run an event loop (asyncio or trio), so it must never block?"""
    if asyncio.events._get_running_loop() is not None:
        return True
    import sniffio

    try:
        sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        return False
    return True


def mirai(
    fn: Callable[..., T] | str,
    /,
    *args: Any,
    _timeout: float | None = None,
    _compute: str | None = None,
    _retries: int = 0,
    **kwargs: Any,
) -> Mirai[T]:
    """Run ``fn(*args, **kwargs)`` on a daemon; return a :class:`Mirai` handle at once.

    ``fn`` may be a lambda, a closure, a class or function from ``__main__`` or a notebook,
    or an ``async def`` function (the daemon awaits it).  ``fn`` may also be a string of
    Python code (statements allowed), evaluated in a fresh namespace holding ``kwargs``;
    the value is that of its last expression: ``mirai("x + y", x=1, y=2)``.

    Under a memory budget (``daemons(memory=...)``) that is full, it blocks until there
    is room on a plain thread, and raises :class:`QueueFull` on a thread that runs an
    event loop (use ``await am.submit(...)`` or ``am.try_mirai(...)`` there).

    Args:
        _timeout: seconds; then the handle raises :class:`MiraiTimeout` and the work is
            cancelled on the daemon.
        _compute: the compute profile (default ``"default"``).
        _retries: re-queue the task up to this many times if its daemon dies.

    Raises:
        SerializationError: (a TypeError and pickle.PicklingError) the function or an
            argument cannot be serialized; nothing was sent.
        QueueFull: the memory budget is full and this thread runs an event loop.
        RuntimeError: no daemons are set for the profile.
    """
    prof = _profile(_compute)
    job, m = _prepare(prof, fn, args, kwargs, _timeout, _retries)
    if job is not None:
        budget = prof.budget
        if budget is not None and not budget.try_take(job.nbytes):
            if _on_event_loop():
                raise QueueFull(
                    f"the memory budget of compute profile {prof.compute!r} is full "
                    f"({budget.queued:,} of {budget.capacity:,} bytes queued): on an event "
                    "loop use `await am.submit(...)` to wait for room, or "
                    "`am.try_mirai(...)` to get None instead of an error"
                )
            budget.take(job.nbytes)
        prof.submit(job)
    return m


async def submit(
    fn: Callable[..., T] | str,
    /,
    *args: Any,
    _timeout: float | None = None,
    _compute: str | None = None,
    _retries: int = 0,
    **kwargs: Any,
) -> Mirai[T]:
    """Like :func:`mirai`, but wait asynchronously for room in the memory budget.

    Returns the handle once the task is queued.  Cancelling this wait submits nothing.
    Works under asyncio and trio.
    """
    prof = _profile(_compute)
    job, m = _prepare(prof, fn, args, kwargs, _timeout, _retries, "submit")
    if job is not None:
        if prof.budget is not None:
            await prof.budget.take_async(job.nbytes)
        prof.submit(job)
    return m


def try_mirai(
    fn: Callable[..., T] | str,
    /,
    *args: Any,
    _timeout: float | None = None,
    _compute: str | None = None,
    _retries: int = 0,
    **kwargs: Any,
) -> Mirai[T] | None:
    """Like :func:`mirai`, but return None at once (submitting nothing) when the memory
    budget is full."""
    prof = _profile(_compute)
    job, m = _prepare(prof, fn, args, kwargs, _timeout, _retries, "try_mirai")
    if job is not None:
        if prof.budget is not None and not prof.budget.try_take(job.nbytes):
            return None
        prof.submit(job)
    return m


def info(compute: str | None = None) -> dict[str, int]:
    """Cumulative counters of the profile since :func:`daemons` started it: ``submitted``,
    ``completed``, ``failed``, ``cancelled``, ``retried``, ``timed_out``, ``respawned``
    (as R mirai's ``info()``).

    Raises:
        RuntimeError: no daemons are set for that profile.
    """
    return _profile(compute).info()


def _run_sync(
    prof: Profile, tid: int, kind: int, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Mirai[Any]:
    """sync=True: evaluate in this process now, same handle semantics."""

    index = next(prof.task_index)
    m: Mirai[Any] = Mirai(tid, None)
    handles: list[Mirai[Any]] = []
    refs: list[PutRef] = []
    encoded = _encode_call(kind, fn, args, kwargs, prof.table, handles, refs)  # fails here
    for h in handles:  # handles as arguments: resolved already in sync mode
        if not h.done():
            raise RuntimeError("sync=True: a handle of another profile is still pending")
        if h.cancelled() or h.exception() is not None:
            m._resolve(ERROR, _upstream_error(h))
            return m
    if handles or refs:  # their values, at any depth, as on a daemon
        _, fn, args, kwargs = _codecs.loads(*encoded, prof.table)
    prof.sync_completed += 1
    rec = _otel_begin(prof.compute, tid, fn, args)  # None unless tracing or metrics are on
    token = None
    if rec is not None:
        rec.bytes_out = _otel._size(encoded[0])
        rec.attach_sync(m)
        token = rec.enter()
    flag = _in_sync_task.set(True)
    try:
        if prof.seed is not None:
            apply_seed(_derive_seed(prof.seed, index))
        if kind == CODE:
            value = eval_code(fn, dict(kwargs))
        else:
            value = fn(*args, **kwargs)
            if asyncio.iscoroutine(value):
                value = _run_coroutine(value)
    except Exception as exc:
        name, message, tb, _ = error_record(exc)
        m._resolve(ERROR, make_error(name, message, tb, exc))
    else:
        m._resolve(VALUE, value)
    finally:
        _in_sync_task.reset(flag)
        if rec is not None:
            rec.leave(token)
    return m


def _run_coroutine(coro: Any) -> Any:
    box: list[Any] = []

    def run() -> None:
        try:
            box.append((True, asyncio.run(coro)))
        except BaseException as exc:
            box.append((False, exc))

    t = threading.Thread(target=run)
    t.start()
    t.join()
    ok, value = box[0]
    if not ok:
        raise value
    return value


class Everywhere(Mirai[list[Any]]):
    """Handle of an :func:`everywhere` call: resolves to one result per daemon."""

    __slots__ = ()


def everywhere(
    fn: Callable[..., Any] | str,
    /,
    *args: Any,
    _serial: _codecs.SerialConfig | Sequence[_codecs.SerialConfig] | None = None,
    _compute: str | None = None,
    **kwargs: Any,
) -> Mirai[list[Any]]:
    """Run ``fn(*args, **kwargs)`` on every connected daemon, and on every daemon that
    connects later or is respawned (replayed in call order before any task).

    Returns a handle that resolves to the list of per-daemon results once every daemon
    connected now (or, before any connects, each of the profile's local daemons) ran it;
    it raises :class:`MiraiError` if the call failed on one.

    Args:
        _serial: :func:`serial_config` codec(s) to register on the host and all daemons
            first.
        _compute: the compute profile.
    """
    prof = _profile(_compute)
    configs = _as_configs(_serial)
    if isinstance(fn, str):
        if args:
            raise TypeError("everywhere(code_string, ...) takes named objects only")
        _check_code(fn)
        kind: int = CODE
    elif callable(fn):
        kind = CALL
    else:
        raise TypeError(f"everywhere() takes a callable or a code string, not {type(fn).__name__}")
    if configs:
        prof.add_serial(configs)
    if prof.sync:
        m = _run_sync(prof, next(_task_ids), kind, fn, args, kwargs)
        h: Mirai[list[Any]] = Everywhere(m.id, None)
        if m._state == VALUE:
            h._resolve(VALUE, [m._value])
        else:
            h._resolve(m._state, m._value)
        return h
    if not configs:
        return _everywhere(prof, kind, fn, args, kwargs)
    from ._daemon import register_serial

    # The codecs are registered on every daemon first (setups run in order); the handle
    # the caller gets fails if that registration failed, not only if ``fn`` did.
    reg = _everywhere(prof, CALL, register_serial, (configs,), {})
    main = _everywhere(prof, kind, fn, args, kwargs)
    out: Mirai[list[Any]] = Everywhere(main.id, prof)

    def both(_: Mirai[Any]) -> None:
        if not (reg.done() and main.done()):
            return
        failed = None if reg.cancelled() else reg.exception()
        if failed is not None:
            out._resolve(ERROR, failed)
        elif main.cancelled():
            out._resolve(CANCELLED, None)
        elif (exc := main.exception()) is not None:
            out._resolve(ERROR, exc)
        else:
            out._resolve(VALUE, main.result())

    reg.add_done_callback(both)
    main.add_done_callback(both)
    return out


def _everywhere(
    prof: Profile, kind: int, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Mirai[list[Any]]:
    tid = next(_task_ids)
    body, desc, bufs = _encode_call(kind, fn, args, kwargs, prof.table)
    group = _otel.group(
        f"everywhere {_otel.span_name(fn)}",
        {"asyncmirai.task.id": tid, "asyncmirai.compute": prof.compute},
    )
    extra = None if group is None else group.carrier()
    frames = _protocol.encode(_protocol.Setup(tid, body, desc, bufs, extra))
    h: Mirai[list[Any]] = Everywhere(tid, prof)
    label = f"everywhere({fn if kind == CODE else getattr(fn, '__qualname__', repr(fn))!r:.80})"
    prof.everywhere(Setup(tid, frames, h, prof.n_local, label))
    if group is not None:
        group.follow([h])
    return h


@atexit.register
def _reset_all() -> None:
    for name in list(profiles):
        try:
            _reset(name, wait=True)
        except Exception:  # interpreter teardown: do what we can
            print(f"asyncmirai: could not reset profile {name!r} at exit", file=sys.stderr)
