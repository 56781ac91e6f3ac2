"""Compute profiles: where a dispatcher runs, and the local daemon processes it owns.

A profile's dispatcher lives on ONE asyncio loop: the caller's running loop when
``daemons()`` is called inside one (lowest latency), else a private loop thread (plain
scripts, trio programs, worker threads).  All dispatcher state is touched only on that
loop's thread; :meth:`Profile.on_loop` hops there from anywhere else.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any, TypeVar

import zmq

from . import _codecs
from ._dispatcher import DaemonConn, Dispatcher, SetupItem
from ._errors import DaemonError
from ._handle import ERROR, Mirai
from ._protocol import Output
from ._security import private_tmpdir, release_tmpdir, secret_pipe
from ._transport import LoopChannel

__all__ = ["LocalProcess", "Profile", "profiles"]

log = logging.getLogger("asyncmirai")
R = TypeVar("R")

#: compute name -> active profile.  Guarded by ``_REGISTRY_LOCK``.
profiles: dict[str, Profile] = {}
_REGISTRY_LOCK = threading.RLock()
_launch_ids = itertools.count(1)


def describe_exit(code: int | None) -> str:
    """Human text for a process return code (negative: killed by a signal)."""
    if code is None:
        return "still running"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}"
    return f"exited with code {code}"


class LocalProcess:
    """A daemon process this host started."""

    __slots__ = ("proc", "launch", "started", "connected", "log_path", "index")

    def __init__(self, proc: subprocess.Popen[bytes], launch: str, log_path: str, index: int):
        self.proc = proc
        self.launch = launch
        self.started = time.monotonic()
        self.connected = False
        self.log_path = log_path
        self.index = index


class Profile:
    """One compute profile: settings, the dispatcher's loop, local daemons (see module doc)."""

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
        self.table = _codecs.CodecTable(self.serial) if self.serial else _codecs.DEFAULT_TABLE
        self.options = {"maxtasks": maxtasks, "idletime": idletime, "walltime": walltime}
        self.task_index = itertools.count()
        self.sync_completed = 0
        self.procs: dict[int, LocalProcess] = {}
        self.closing = False
        self.early_failures = 0
        self.broken: str | None = None
        self.launchers: list[Any] = []  # handles of remote launches, terminated on reset
        self.tmpdir = private_tmpdir()  # 0700; removed on SIGTERM, swept when stale
        self.curve_server: tuple[bytes, bytes] | None = None
        self.curve_client: tuple[bytes, bytes] | None = None
        self.authenticator: Any = None
        self.url_requested = url or f"ipc://{self.tmpdir}/dispatcher"
        is_tcp = self.url_requested.startswith("tcp://")
        if curve is None:
            curve = is_tcp
        self.curve = curve
        self.cancel_grace = cancel_grace
        self.liveness = liveness
        self.loop: asyncio.AbstractEventLoop
        self.thread: threading.Thread | None = None
        self.loop_thread_id = 0
        self.ctx: zmq.Context[Any] | None = None
        self.dispatcher: Dispatcher | None = None
        if sync:
            self.url = "sync"
            return
        try:
            self.loop = asyncio.get_running_loop()
            self.loop_thread_id = threading.get_ident()
        except RuntimeError:
            self.loop = asyncio.new_event_loop()
            ready = threading.Event()

            def run() -> None:
                self.loop_thread_id = threading.get_ident()
                asyncio.set_event_loop(self.loop)
                self.loop.call_soon(ready.set)
                self.loop.run_forever()

            self.thread = threading.Thread(target=run, name=f"asyncmirai-{compute}", daemon=True)
            self.thread.start()
            ready.wait()
        try:
            self.on_loop(self._start)
        except BaseException:
            self._cleanup_files()
            raise

    # -- threading helpers ---------------------------------------------------------
    def is_dispatcher_thread(self) -> bool:
        """True on the thread that runs this profile's loop (while it is running)."""
        return threading.get_ident() == self.loop_thread_id and self.loop.is_running()

    def on_loop(self, fn: Callable[[], R]) -> R:
        """Run ``fn`` on the dispatcher's loop thread and return its result (blocking)."""
        loop = self.loop
        if (
            threading.get_ident() == self.loop_thread_id
            or not loop.is_running()
            or loop.is_closed()
        ):
            return fn()
        fut: concurrent.futures.Future[R] = concurrent.futures.Future()

        def call() -> None:
            try:
                fut.set_result(fn())
            except BaseException as exc:
                fut.set_exception(exc)

        loop.call_soon_threadsafe(call)
        return fut.result()

    def _check_loop(self) -> None:
        if self.loop.is_closed():
            raise RuntimeError(
                f"the event loop that compute profile {self.compute!r} was started on has "
                "closed; reset it with am.daemons(0) (or use `async with am.daemons(n)`), "
                "then start daemons again"
            )

    # -- start ---------------------------------------------------------------------
    def _start(self) -> None:
        self.ctx = zmq.Context()
        curve_secret = None
        if self.curve:
            from ._security import start_curve

            server, client = self.curve_keys or (None, None)
            self.curve_server, self.curve_client, self.authenticator = start_curve(
                self.ctx, client_keys=client, server_keys=server
            )
            curve_secret = self.curve_server[1]
        welcome = self._welcome()
        d = Dispatcher(
            self.loop,
            self.ctx,
            self.url_requested,
            welcome=welcome,
            table=self.table,
            cancel_grace=self.cancel_grace,
            liveness=self.liveness,
            curve_secret=curve_secret,
            on_kill=self._kill_daemon,
            on_output=self._on_output,
            is_local=self._is_local,
            expected_local=self.n_local,
        )
        self.dispatcher = d
        self.url = d.url
        if self.n_local:
            self._spawn(self.n_local)

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

    def _spawn(self, k: int) -> None:
        """Start ``k`` local daemons (on the loop thread, so PDEATHSIG binds to it)."""
        env = os.environ.copy()
        env.update(self.env)
        # Local daemons see the host's import path and working directory, so functions
        # from the user's own modules resolve by reference.
        paths = [p or os.getcwd() for p in sys.path]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        for _ in range(k):
            index = next(_launch_ids)
            launch = f"local-{index}"
            pass_fds: tuple[int, ...] = ()
            pairs: list[tuple[socket.socket, socket.socket]] = []
            secret_r: int | None = None
            if self.transport == "pipe":
                pairs = [socket.socketpair(), socket.socketpair()]
                pass_fds = (pairs[0][1].fileno(), pairs[1][1].fileno())
                argv = self.daemon_command(launch=launch, url=f"fd://{pass_fds[0]}/{pass_fds[1]}")
            else:
                if self.curve_client is not None:  # the secret key goes through a pipe
                    secret_r = secret_pipe(self.curve_client[1])
                    pass_fds = (secret_r,)
                argv = self.daemon_command(launch=launch, secret_fd=secret_r or 0)
            argv += ["--parent", str(os.getpid())]
            log_path = os.path.join(self.tmpdir, f"{launch}.log")
            stdout: int | IO[bytes]
            stderr: int | IO[bytes]
            log_file: IO[bytes] | None = None
            if self.output:
                stdout = stderr = subprocess.PIPE
            else:
                stdout = subprocess.DEVNULL
                stderr = log_file = open(log_path, "wb")  # noqa: SIM115 - handed to the child
            try:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=stdout,
                    stderr=stderr,
                    env=env,
                    cwd=os.getcwd(),
                    pass_fds=pass_fds,
                    start_new_session=True,  # its own process group: see _reap_group
                )
            except BaseException:
                for a, b in pairs:
                    a.close()
                    b.close()
                raise
            finally:
                if log_file is not None:
                    log_file.close()
                if secret_r is not None:
                    os.close(secret_r)
            d = self.dispatcher
            assert d is not None
            for role, (host_end, child_end) in zip((b"t", b"c"), pairs, strict=False):
                child_end.close()
                d.add_channel(
                    LoopChannel(
                        self.loop,
                        host_end,
                        role + launch.encode(),
                        d.on_channel_message,
                        d.channel_closed,
                    )
                )
            rec = LocalProcess(proc, launch, log_path, index)
            self.procs[proc.pid] = rec

            def watch(rec: LocalProcess = rec) -> None:
                self._watch(rec)
                _reap_group(rec.proc.pid)  # what its tasks started goes with it

            threading.Thread(target=watch, name=f"asyncmirai-watch-{proc.pid}", daemon=True).start()
            if self.output:
                for stream, sink in ((proc.stdout, "stdout"), (proc.stderr, "stderr")):
                    threading.Thread(
                        target=_forward,
                        args=(stream, sink, f"[{self.compute}/{index} pid {proc.pid}] "),
                        daemon=True,
                    ).start()

    def _watch(self, rec: LocalProcess) -> None:
        rec.proc.wait()
        loop = self.loop
        if not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._on_exit, rec)
            except RuntimeError:  # loop closed in between
                pass

    def _is_local(self, d: DaemonConn) -> bool:
        rec = self.procs.get(d.pid)
        if rec is None:
            return False
        rec.connected = True
        self.early_failures = 0
        return True

    def _on_exit(self, rec: LocalProcess) -> None:
        pid = rec.proc.pid
        if self.procs.get(pid) is not rec:
            return
        del self.procs[pid]
        if self.closing or self.dispatcher is None:
            return
        reason = describe_exit(rec.proc.returncode)
        self.dispatcher.lost_pid(pid, reason)
        if not rec.connected:
            self.early_failures += 1
            if self.early_failures >= 3:
                tail = _tail(rec.log_path)
                self.broken = f"local daemons keep dying before they connect ({reason})" + (
                    f"; last stderr:\n{tail}" if tail else ""
                )
                log.error("asyncmirai: %s", self.broken)
                d = self.dispatcher
                while d.queue:
                    d.queue.popleft()._resolve(ERROR, DaemonError(self.broken))
                return
        if len(self.procs) < self.n_local:
            self._spawn(self.n_local - len(self.procs))

    def _kill_daemon(self, d: DaemonConn) -> None:
        rec = self.procs.get(d.pid)
        if rec is not None:  # only ever a process we started
            try:
                rec.proc.kill()
            except OSError:
                pass

    def _on_output(self, d: DaemonConn, msg: Output) -> None:
        sink = sys.stdout if msg.stream == "stdout" else sys.stderr
        prefix = f"[{self.compute} pid {d.pid}@{d.host}] "
        text = msg.data.decode(errors="replace")
        sink.write("".join(prefix + line for line in text.splitlines(True)))

    # -- tasks ---------------------------------------------------------------------
    def submit(self, m: Mirai[Any]) -> None:
        """Hand ``m`` to the dispatcher (thread-safe)."""
        if self.broken is not None:
            m._resolve(ERROR, DaemonError(self.broken))
            return
        d = self.dispatcher
        assert d is not None
        if self.loop.is_closed():
            self._check_loop()
        if threading.get_ident() == self.loop_thread_id:
            d.submit(m)
        else:
            self.loop.call_soon_threadsafe(d.submit, m)

    def cancel(self, m: Mirai[Any]) -> bool:
        """Cancel ``m`` (thread-safe); resolved at once, stopped on the daemon soon after."""
        d = self.dispatcher
        if d is None:
            return m._resolve(3, None)
        if threading.get_ident() == self.loop_thread_id or not self.loop.is_running():
            return d.cancel(m)
        # Resolve now so result() raises MiraiCancelled at once; the daemon-side stop is
        # done on the loop (the dispatcher sees the handle already cancelled).
        if not m._resolve(3, None):
            return False
        self.loop.call_soon_threadsafe(d.stop_cancelled, m)
        return True

    def everywhere(self, item: SetupItem) -> None:
        """Register an everywhere() call (thread-safe)."""
        d = self.dispatcher
        assert d is not None
        self._check_loop()
        if threading.get_ident() == self.loop_thread_id:
            d.everywhere(item)
        else:
            self._check_loop()
            self.loop.call_soon_threadsafe(d.everywhere, item)

    def status(self) -> dict[str, Any]:
        """A snapshot of the dispatcher's counters (thread-safe)."""
        if self.sync:
            return {
                "connections": 0,
                "url": "sync",
                "awaiting": 0,
                "executing": 0,
                "completed": self.sync_completed,
                "daemons": [],
            }
        assert self.dispatcher is not None
        if self.loop.is_closed():
            return self.dispatcher.status()
        return self.on_loop(self.dispatcher.status)

    def add_serial(self, configs: Sequence[_codecs.SerialConfig]) -> None:
        """Register more codecs, for the arguments encoded here and the results decoded
        by the dispatcher (which holds the same table)."""
        self.table = self.table.extend(configs)
        if self.dispatcher is not None:
            self.dispatcher.table = self.table

    def launch_local(self, k: int) -> None:
        """Add ``k`` local daemons (thread-safe)."""
        self._check_loop()

        def go() -> None:
            self.n_local += k
            if self.dispatcher is not None:
                self.dispatcher.expected_local += k
            self._spawn(k)

        self.on_loop(go)

    # -- shutdown ------------------------------------------------------------------
    def close(self) -> threading.Thread:
        """Reset: fail unresolved tasks, stop daemons, release everything.

        Returns the thread that reaps the daemon processes; callers that may block join
        it (sync reset), async callers await it in a worker thread.
        """
        if self.sync:
            t = threading.Thread(target=lambda: None)
            t.start()
            return t

        def on_loop() -> list[LocalProcess]:
            self.closing = True
            if self.dispatcher is not None:
                self.dispatcher.close()
            return list(self.procs.values())

        if self.loop.is_closed():
            procs = on_loop()
        else:
            procs = self.on_loop(on_loop)
        launchers = list(self.launchers)
        thread = self.thread
        loop = self.loop
        auth = self.authenticator

        def reap() -> None:
            deadline = time.monotonic() + 1.5
            for rec in procs:
                try:
                    rec.proc.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    rec.proc.kill()
                    rec.proc.wait()
                _reap_group(rec.proc.pid)
            for h in launchers:
                try:
                    h.terminate()
                except Exception:
                    log.debug("launcher terminate failed", exc_info=True)
            if thread is not None:
                if thread is not threading.current_thread():
                    loop.call_soon_threadsafe(loop.stop)
                    thread.join(5)
                    loop.close()
            if auth is not None:
                auth.stop()
            if self.ctx is not None:
                self.ctx.destroy(linger=0)
            self._cleanup_files()

        t = threading.Thread(target=reap, name=f"asyncmirai-reap-{self.compute}", daemon=True)
        t.start()
        return t

    def _cleanup_files(self) -> None:
        release_tmpdir(self.tmpdir)


def _reap_group(pid: int) -> None:
    """SIGKILL the process group of a local daemon that has exited and been reaped.

    Each local daemon leads its own group, so the children and grandchildren its tasks
    started (``subprocess``, ``multiprocessing``) do not outlive it.  The id cannot name
    another group while a member lives; once the group is empty, ``killpg`` fails.
    """
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass


def _forward(stream: IO[bytes] | None, sink: str, prefix: str) -> None:
    """Copy a daemon's output to the host's, one prefixed line at a time."""
    if stream is None:
        return
    for raw in iter(stream.readline, b""):
        out = sys.stdout if sink == "stdout" else sys.stderr
        try:
            out.write(prefix + raw.decode(errors="replace"))
            out.flush()
        except Exception:
            pass
    stream.close()


def _tail(path: str, nbytes: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - nbytes))
            return f.read().decode(errors="replace").strip()
    except OSError:
        return ""
