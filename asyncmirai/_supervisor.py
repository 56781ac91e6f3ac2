"""Local daemon processes: spawn, watch, respawn on the scheduler's word, output, reap.

The scheduler decides *when* a local daemon is started (``SPAWN``) or killed (``KILL``);
this module does it: it starts each daemon as a fresh interpreter in its own process
group with its socketpairs (or the pipe that carries its secret key), watches it from
a thread that reports its exit to the dispatcher's loop, forwards its output when asked,
and reaps it (and what its tasks started) at reset.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from typing import IO, TYPE_CHECKING

from ._guard import forget_group, guard_group
from ._loop import LoopOwner
from ._scheduler import Daemon
from ._security import secret_pipe
from ._threads import popen, start_thread
from ._transport import LoopChannel

if TYPE_CHECKING:
    from ._dispatcher import Dispatcher

__all__ = ["LocalProcess", "Supervisor", "describe_exit"]

log = logging.getLogger("asyncmirai")
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


class Supervisor:
    """The local daemon processes of one compute profile (see module doc)."""

    def __init__(
        self,
        owner: LoopOwner,
        compute: str,
        tmpdir: str,
        *,
        command: Callable[..., list[str]],
        env: Mapping[str, str],
        output: bool,
        transport: str,
        secret: bytes | None,
    ) -> None:
        self.owner = owner
        self.compute = compute
        self.tmpdir = tmpdir
        self.command = command
        self.env = dict(env)
        self.output = output
        self.transport = transport
        self.secret = secret  # the daemons' CurveZMQ secret key (zmq transport on tcp)
        self.procs: dict[int, LocalProcess] = {}
        self.dispatcher: Dispatcher | None = None
        self.closing = False

    def spawn(self, k: int) -> None:
        """Start ``k`` local daemons (on the loop thread, so PDEATHSIG binds to it)."""
        env = os.environ.copy()
        env.update(self.env)
        # Local daemons see the host's import path and working directory, so functions
        # from the user's own modules resolve by reference.
        paths = [p or os.getcwd() for p in sys.path]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        for i in range(k):
            index = next(_launch_ids)
            launch = f"local-{index}"
            pass_fds: tuple[int, ...] = ()
            pairs: list[tuple[socket.socket, socket.socket]] = []
            secret_r: int | None = None
            log_path = os.path.join(self.tmpdir, f"{launch}.log")
            log_file: IO[bytes] | None = None
            try:  # every descriptor taken here may fail with EMFILE: all inside the try
                if self.transport == "pipe":
                    pairs.append(socket.socketpair())
                    pairs.append(socket.socketpair())
                    pass_fds = (pairs[0][1].fileno(), pairs[1][1].fileno())
                    argv = self.command(launch=launch, url=f"fd://{pass_fds[0]}/{pass_fds[1]}")
                else:
                    if self.secret is not None:  # the secret key goes through a pipe
                        secret_r = secret_pipe(self.secret)
                        pass_fds = (secret_r,)
                    argv = self.command(launch=launch, secret_fd=secret_r or 0)
                argv += ["--parent", str(os.getpid())]
                stdout: int | IO[bytes]
                stderr: int | IO[bytes]
                if self.output:
                    stdout = stderr = subprocess.PIPE
                else:
                    stdout = subprocess.DEVNULL
                    stderr = log_file = open(log_path, "wb")  # noqa: SIM115 - to the child
                proc = popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=stdout,
                    stderr=stderr,
                    env=env,
                    cwd=os.getcwd(),
                    pass_fds=pass_fds,
                    start_new_session=True,  # its own process group: see _reap_group
                )
            except BaseException as exc:
                for a, b in pairs:
                    a.close()
                    b.close()
                if isinstance(exc, OSError) and self.dispatcher is not None:
                    # EMFILE, ENOMEM, EAGAIN: the scheduler retries with backoff.
                    for _ in range(k - i):
                        self.dispatcher.spawn_failed(exc)
                    return
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
                        self.owner.loop,
                        host_end,
                        role + launch.encode(),
                        d.on_channel_message,
                        d.channel_closed,
                        d.lock,
                    )
                )
            guard_group(proc.pid)  # its group dies with this host, even a SIGKILLed one
            rec = LocalProcess(proc, launch, log_path, index)
            self.procs[proc.pid] = rec
            d.spawned(proc.pid)

            def watch(rec: LocalProcess = rec) -> None:
                self._watch(rec)
                _reap_group(rec.proc.pid)  # what its tasks started goes with it

            start_thread(watch, name=f"asyncmirai-watch-{proc.pid}")
            if self.output:
                for stream, sink in ((proc.stdout, "stdout"), (proc.stderr, "stderr")):
                    start_thread(
                        _forward,
                        name=f"asyncmirai-{sink}-{proc.pid}",
                        args=(stream, sink, f"[{self.compute}/{index} pid {proc.pid}] "),
                    )

    def _watch(self, rec: LocalProcess) -> None:
        rec.proc.wait()
        loop = self.owner.loop
        if not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._on_exit, rec)
            except RuntimeError:  # loop closed in between
                pass

    def _on_exit(self, rec: LocalProcess) -> None:
        pid = rec.proc.pid
        if self.procs.get(pid) is not rec:
            return
        del self.procs[pid]
        if self.closing or self.dispatcher is None:
            return
        reason = describe_exit(rec.proc.returncode)
        if rec.proc.returncode not in (0, None):
            tail = _tail(rec.log_path)
            if tail and "Traceback" in tail:
                reason += f"; last stderr:\n{tail}"
        self.dispatcher.process_exited(pid, rec.proc.returncode, reason)

    def kill(self, d: Daemon) -> None:
        rec = self.procs.get(d.pid)
        if rec is not None:  # only ever a process we started
            try:
                rec.proc.kill()
            except OSError:
                pass

    def close(self) -> list[LocalProcess]:
        """Stop reporting exits (loop thread); returns the processes to reap."""
        self.closing = True
        return list(self.procs.values())

    @staticmethod
    def reap(procs: list[LocalProcess], grace: float = 1.5) -> None:
        """Wait for ``procs`` to exit (SIGKILL after ``grace`` seconds), then kill what
        their tasks started (their process groups)."""
        deadline = time.monotonic() + grace
        for rec in procs:
            try:
                rec.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                rec.proc.kill()
                rec.proc.wait()
            _reap_group(rec.proc.pid)


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
    forget_group(pid)
