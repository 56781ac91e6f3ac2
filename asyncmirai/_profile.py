"""A compute profile: the facade that ties its loop, dispatcher and local daemons together.

* :mod:`._loop` owns (or borrows) the event loop the dispatcher runs on;
* :mod:`._dispatcher` is the I/O shell around the pure :mod:`._scheduler`;
* :mod:`._supervisor` starts, watches and reaps the local daemon processes.

:class:`Profile` holds the settings, builds daemon command lines, and is the
:class:`~asyncmirai._handle.HandleOwner` of the profile's handles: submissions, cancels
and ``everywhere()`` calls from any thread reach the dispatcher's loop here.
"""

from __future__ import annotations

import itertools
import logging
import socket
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import zmq

from . import _codecs
from ._budget import Budget
from ._dispatcher import _CANCEL, _EVERYWHERE, _SUBMIT, Dispatcher
from ._handle import CANCELLED, Mirai
from ._loop import LoopOwner
from ._protocol import Output
from ._scheduler import Daemon, Job, Setup
from ._security import private_tmpdir, release_tmpdir
from ._supervisor import LocalProcess, Supervisor, describe_exit
from ._threads import start_thread

__all__ = ["Profile", "describe_exit", "profiles"]

log = logging.getLogger("asyncmirai")

#: compute name -> active profile.  Guarded by ``_REGISTRY_LOCK``.
profiles: dict[str, Profile] = {}
_REGISTRY_LOCK = threading.RLock()


class Profile:
    """One compute profile: settings, its loop, dispatcher and local daemons."""

    def __init__(
        self,
        compute: str,
        *,
        n: int,
        url: str | None,
        serial: Sequence[_codecs.SerialConfig],
        seed: int | None,
        env: Mapping[str, str] | None,
        output: bool,
        maxtasks: int | None,
        idletime: float | None,
        walltime: float | None,
        cancel_grace: float,
        autoexit: float,
        liveness: float,
        curve: bool | None,
        sync: bool = False,
        transport: str = "pipe",
        curve_keys: tuple[tuple[bytes, bytes], tuple[bytes, bytes]] | None = None,
        memory: int | None = None,
        concurrency: int = 1,
        log_level: int | None = None,
    ) -> None:
        self.curve_keys = curve_keys
        self.compute = compute
        self.transport = transport
        self.n_local = n
        self.sync = sync
        self.seed = seed
        self.env = dict(env or {})
        self.output = output
        self.autoexit = autoexit
        self.serial = tuple(serial)
        self.codecs = _codecs.TableRef(
            _codecs.CodecTable(self.serial) if self.serial else _codecs.DEFAULT_TABLE
        )
        self.options = {
            "maxtasks": maxtasks,
            "idletime": idletime,
            "walltime": walltime,
            "concurrency": concurrency,
            "log_level": log_level,  # daemons send logging records >= it (None: none)
        }
        self.concurrency = concurrency
        self.loop: Any = None  # the dispatcher's (set below unless sync)
        self.budget = Budget(memory) if memory is not None else None
        self.task_index = itertools.count()
        self.sync_completed = 0
        self.launchers: list[Any] = []  # handles of remote launches, terminated on reset
        self.tmpdir = private_tmpdir()  # 0700; removed on SIGTERM, swept when stale
        self.curve_server: tuple[bytes, bytes] | None = None
        self.curve_client: tuple[bytes, bytes] | None = None
        self.authenticator: Any = None
        self.url_requested = url or f"ipc://{self.tmpdir}/dispatcher"
        if curve is None:
            curve = self.url_requested.startswith("tcp://")
        self.curve = curve
        self.cancel_grace = cancel_grace
        self.liveness = liveness
        self.ctx: zmq.Context[Any] | None = None
        self.dispatcher: Dispatcher | None = None
        self.supervisor: Supervisor | None = None
        if sync:
            self.url = "sync"
            return
        self.owner = LoopOwner(compute)
        self.loop = self.owner.loop
        try:
            self.owner.on_loop(self._start)
        except BaseException:
            self._cleanup_files()
            raise

    # -- the loop ------------------------------------------------------------------
    def is_dispatcher_thread(self) -> bool:
        """True on the thread that runs this profile's loop (while it is running)."""
        return not self.sync and self.owner.is_dispatcher_thread()

    @property
    def procs(self) -> dict[int, LocalProcess]:
        """The local daemon processes, by pid."""
        return self.supervisor.procs if self.supervisor is not None else {}

    # -- start ---------------------------------------------------------------------
    def _start(self) -> None:
        self.ctx = zmq.Context()
        curve_secret = None
        if self.curve:
            from ._security import raise_fd_limit, start_curve

            server, client = self.curve_keys or (None, None)
            self.curve_server, self.curve_client, self.authenticator = start_curve(
                self.ctx, client_keys=client, server_keys=server
            )
            curve_secret = self.curve_server[1]
            raise_fd_limit()  # peers on the network: room for their connections
        sup = Supervisor(
            self.owner,
            self.compute,
            self.tmpdir,
            command=self.daemon_command,
            env=self.env,
            output=self.output,
            transport=self.transport,
            secret=self.curve_client[1] if self.curve_client is not None else None,
        )
        d = Dispatcher(
            self.loop,
            self.ctx,
            self.url_requested,
            welcome=self._welcome(),
            codecs=self.codecs,
            hostname=socket.gethostname(),
            local_target=self.n_local,
            cancel_grace=self.cancel_grace,
            liveness=self.liveness,
            curve_secret=curve_secret,
            concurrency=self.concurrency,
            budget=self.budget,
            spawn=sup.spawn,
            kill=sup.kill,
            on_output=self._on_output,
        )
        sup.dispatcher = d
        self.supervisor = sup
        self.dispatcher = d
        self.url = d.url
        d.sched.add_local(0)  # the first SPAWN of local daemons
        d.flush()

    @property
    def table(self) -> _codecs.CodecTable:
        """The codec table tasks are encoded with (shared with the dispatcher)."""
        return self.codecs.table

    def _welcome(self) -> bytes:
        import cloudpickle

        cfg = {"serial": self.serial, "env": self.env, **self.options}
        return bytes(cloudpickle.dumps(cfg, protocol=5))

    def daemon_command(
        self,
        *,
        python: str | None = None,
        launch: str = "",
        url: str | None = None,
        remote: bool = False,
        secret_fd: int = 0,
    ) -> list[str]:
        """argv that starts one daemon for this profile (public keys included for tcp).

        The client secret key is never on it: the daemon reads it from fd ``secret_fd``
        (``0``: stdin, where ``launch_remote`` commands feed it with a here-document)."""
        argv = [python or sys.executable, "-m", "asyncmirai", "daemon", url or self.url]
        if launch:
            argv += ["--launch", launch]
        argv += ["--autoexit", str(self.autoexit)]
        if remote and self.output:  # local daemons' output comes through pipes instead
            argv += ["--output"]
        if self.curve_server is not None and self.curve_client is not None and url is None:
            # "--flag=VALUE": a Z85 key may start with "-", which argparse would take
            # for an option in "--flag VALUE".
            argv += [
                f"--curve-server-key={self.curve_server[0].decode()}",
                f"--curve-public-key={self.curve_client[0].decode()}",
                f"--secret-fd={secret_fd}",
            ]
        return argv

    def _on_output(self, d: Daemon, msg: Output) -> None:
        """What a remote daemon printed (``output=True``), prefixed; or a logging record
        of any daemon (``log_level=``), re-emitted under ``asyncmirai.daemon``."""
        if msg.stream == "log":
            from ._logs import emit

            emit(self.compute, d, msg.data)
            return
        sink = sys.stdout if msg.stream == "stdout" else sys.stderr
        prefix = f"[{self.compute} pid {d.pid}@{d.host}] "
        text = msg.data.decode(errors="replace")
        sink.write("".join(prefix + line for line in text.splitlines(True)))

    # -- tasks (the HandleOwner side of Mirai) --------------------------------------
    def submit(self, job: Job) -> None:
        """Hand a task to the dispatcher (thread-safe)."""
        d = self.dispatcher
        assert d is not None
        owner = self.owner
        if owner.loop.is_closed():
            owner.check_open()  # raises the clear error
        if threading.get_ident() == owner.thread_id:
            d.submit(job)
        elif not d.submit_direct(job):  # sends from this thread: no hop (_dispatcher)
            d.post(_SUBMIT, job)

    def cancel(self, handle: Mirai[Any]) -> bool:
        """Cancel a task (thread-safe): resolved at once, stopped on its daemon soon after."""
        job = handle._job
        if not handle._resolve(CANCELLED, None):
            return False
        d = self.dispatcher
        if d is not None and job is not None and not d.closed:
            if self.owner.on_thread() or not self.loop.is_running():
                d.cancel(job)
            elif not self.loop.is_closed():
                d.post(_CANCEL, job)
        return True

    def check_may_block(self) -> None:
        """Refuse to block the thread that would have to resolve the handle."""
        if self.is_dispatcher_thread():
            raise RuntimeError(
                "Mirai.result() was called on the thread that runs the dispatcher's event "
                "loop, so it could never resolve: use `await m` there instead"
            )
        d = self.dispatcher
        if d is not None and d.lock._is_owned():  # type: ignore[attr-defined]
            # in a done-callback run while this thread resolved handles for the
            # dispatcher: blocking here could hold up the loop's thread for good
            raise RuntimeError(
                "Mirai.result() was called from a done-callback of another handle of the "
                "same profile: schedule the work elsewhere (a thread, or await it)"
            )

    def wait(self, handle: Mirai[Any], timeout: float | None) -> bool:
        """Block until ``handle`` resolves (not on the loop's thread); False on timeout."""
        d = self.dispatcher
        if d is None:
            return handle.done()
        return d.wait(handle, timeout)

    def watch(self, handle: Mirai[Any], loop: Any) -> Any:
        """Let ``loop`` (awaiting ``handle`` on its own thread) read the answer itself;
        returns what ends that, or None."""
        d = self.dispatcher
        return None if d is None else d.watch(handle, loop)

    def state(self, handle: Mirai[Any]) -> str:
        """``"queued"`` or ``"running"`` (read from any thread: a snapshot)."""
        job = handle._job
        d = self.dispatcher
        if job is None or d is None:
            return "done" if handle.done() else "queued"
        return d.sched.job_state(job)

    def everywhere(self, item: Setup) -> None:
        """Register an everywhere() call (thread-safe)."""
        d = self.dispatcher
        assert d is not None
        self.owner.check_open()
        if self.owner.on_thread():
            d.everywhere(item)
        else:
            d.post(_EVERYWHERE, item)

    def forget_put(self, put_id: int) -> None:
        """An ``am.put`` reference was collected (any thread, maybe at exit)."""
        d = self.dispatcher
        if d is None or d.closed or self.loop.is_closed():
            return
        try:
            self.loop.call_soon_threadsafe(d.forget_put, put_id)
        except RuntimeError:  # the loop closed meanwhile
            pass

    def status(self) -> dict[str, Any]:
        """A snapshot of the dispatcher's counters (thread-safe)."""
        if self.budget is not None:
            memory = self.budget.snapshot()
        else:
            memory = {"queued": 0, "peak": 0, "capacity": None}
        if self.sync:
            return {
                "connections": 0,
                "url": "sync",
                "awaiting": 0,
                "executing": 0,
                "completed": self.sync_completed,
                "daemons": [],
                "memory": memory,
            }
        assert self.dispatcher is not None
        return {**self.owner.on_loop(self.dispatcher.status), "memory": memory}

    def info(self) -> dict[str, int]:
        """Cumulative counters since the profile started (thread-safe)."""
        if self.sync:
            n = self.sync_completed
            return {
                "submitted": n,
                "completed": n,
                "failed": 0,
                "cancelled": 0,
                "retried": 0,
                "timed_out": 0,
                "respawned": 0,
            }
        assert self.dispatcher is not None
        return self.owner.on_loop(self.dispatcher.counters)

    def add_serial(self, configs: Sequence[_codecs.SerialConfig]) -> None:
        """Register more codecs, for the arguments encoded here and the results decoded
        by the dispatcher (both read the same :class:`~asyncmirai._codecs.TableRef`)."""
        self.codecs.extend(configs)

    def launch_local(self, k: int) -> None:
        """Add ``k`` local daemons (thread-safe)."""
        self.owner.check_open()

        def go() -> None:
            self.n_local += k
            if self.dispatcher is not None:
                self.dispatcher.add_local(k)

        self.owner.on_loop(go)

    # -- shutdown ------------------------------------------------------------------
    def close(self) -> threading.Thread:
        """Reset: fail unresolved tasks, stop daemons, release everything.

        Returns the thread that reaps the daemon processes; callers that may block join
        it (sync reset), async callers await it in a worker thread.
        """
        if self.sync:
            return start_thread(self._cleanup_files, name="asyncmirai-cleanup", daemon=False)

        def on_loop() -> list[LocalProcess]:
            if self.dispatcher is not None:
                self.dispatcher.close()
            return self.supervisor.close() if self.supervisor is not None else []

        procs = self.owner.on_loop(on_loop)
        launchers = list(self.launchers)
        auth = self.authenticator

        def reap() -> None:
            Supervisor.reap(procs)
            for h in launchers:
                try:
                    h.terminate()
                except Exception:
                    log.debug("launcher terminate failed", exc_info=True)
            self.owner.stop()
            if auth is not None:
                auth.stop()
            if self.ctx is not None:
                self.ctx.destroy(linger=0)
            self._cleanup_files()

        return start_thread(reap, name=f"asyncmirai-reap-{self.compute}")

    def _cleanup_files(self) -> None:
        release_tmpdir(self.tmpdir)
