"""Launchers: run daemon launch commands somewhere else (ssh, HPC schedulers).

A launcher receives the shell commands that start daemons (as produced by the
core, e.g. ``python3 -m asyncmirai daemon tcp://HOST:PORT --curve-... --secret-fd=0``
followed by a here-document holding the daemon's secret key) and runs them on other
machines, returning a :class:`LaunchHandle` per launch that can be polled and
terminated.

Secrets never go on a command line (``/proc/PID/cmdline`` is world-readable). A
command's here-document is the daemon's stdin, so the key travels inside what the
launcher feeds to a shell, never in any argv or environment:

* ssh: the commands are part of the script written to ``ssh HOST sh -s`` on ssh's
  stdin (encrypted by ssh); each daemon's stdin is its own here-document.
* clusters: the commands are in the job script, a ``0600`` file created with
  ``mkstemp`` and removed as soon as the submit command has read it (``bsub`` reads
  it on stdin); the submit command's argv holds only its path.

This module only uses the standard library and does not import the rest of
:mod:`asyncmirai`.

Example:
    >>> cfg = ssh_config(["node1", "ssh://me@node2:2222"], tunnel=True)
    >>> url = cfg.rewrite_url("tcp://127.0.0.1:5555")   # what daemons dial
    >>> handles = cfg.launch([f"python3 -m asyncmirai daemon {url}"])  # doctest: +SKIP
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import urllib.parse
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Protocol, runtime_checkable

from ._threads import popen, start_thread

__all__ = [
    "ClusterConfig",
    "ClusterHandle",
    "LaunchError",
    "LaunchHandle",
    "Launcher",
    "SSHConfig",
    "SSHHandle",
    "cluster_config",
    "ssh_config",
]

_DEFAULT_PYTHON = "python3"  # the token a command may start with, replaced by ``python``


def _host_python() -> str:
    """The default interpreter on the other machines: this one's path, shell-quoted (the
    Dask ``SSHCluster`` / dask-jobqueue convention: a shared filesystem or identical
    images).  ``python3`` on a remote PATH is often another environment, without
    asyncmirai in it."""
    return shlex.quote(sys.executable)


_SECRET_RE = re.compile(r"(--curve-secret-key(?:=|\s+))(\S+)")
# A here-document: "<<'WORD'" (or <<WORD, <<-WORD) ... its body ... a line "WORD".
_HEREDOC_RE = re.compile(r"(<<-?[ \t]*(['\"]?)(\w+)\2)([^\n]*)\n.*?\n[ \t]*\3[ \t]*(?=\n|$)", re.S)
_TCP_RE = re.compile(r"tcp://(\[[^\]\s]*\]|[^\s:/'\"\[\]]+):(\d+)")
_OUTPUT_TAIL = 4096


class LaunchError(RuntimeError):
    """A launch failed: a scheduler refused a job, or ssh could not start."""


def redact(command: str) -> str:
    """Return ``command`` with its secrets masked, on one line.

    The body of a here-document (where launch commands carry the daemon's secret
    key) becomes ``***``, as does the value of a ``--curve-secret-key`` option.

    Args:
        command: A daemon launch command.

    Returns:
        The command, safe to log or show in ``describe()``.
    """
    command = _HEREDOC_RE.sub(lambda m: f"{m.group(1)}{m.group(4)} ***", command)
    return _SECRET_RE.sub(r"\1***", command)


def _split_heredoc(command: str) -> tuple[str, str] | None:
    """Split ``command`` where its first here-document's body starts, or ``None``.

    Redirections and ``&`` appended to a command that carries a here-document must go
    on the line of its ``<<WORD`` operator: the body starts on the next one.
    """
    m = _HEREDOC_RE.search(command)
    if m is None:
        return None
    return command[: m.end(4)], command[m.end(4) :]


def _with_python(command: str, python: str) -> str:
    """Replace a leading ``python3`` token of ``command`` by ``python``.

    Idempotent: a command that does not start with the bare ``python3`` token
    (because the core already substituted the interpreter) is returned as is,
    except that a leading *shell-quoted* ``python`` (as ``shlex.join`` writes a
    fragment such as ``env X=1 python``) is unquoted so the fragment works.
    """
    stripped = command.lstrip()
    quoted = shlex.quote(python)
    if quoted != python and stripped.startswith(quoted + " "):
        return f"{python} {stripped[len(quoted) + 1 :]}"
    if python == _DEFAULT_PYTHON:
        return command
    head, _, rest = stripped.partition(" ")
    if head != _DEFAULT_PYTHON:
        return command
    # ``python`` is a shell fragment, as in mirai: "/opt/venv/bin/python",
    # "conda run -n env python" ... are used as written.
    return f"{python} {rest}".rstrip()


def _split(cmd: str | Sequence[str]) -> list[str]:
    if isinstance(cmd, str):
        parts = shlex.split(cmd)
    else:
        parts = [str(c) for c in cmd]
    if not parts:
        raise ValueError("empty command")
    return parts


def _read_tail(f: IO[bytes] | None, limit: int = _OUTPUT_TAIL) -> str:
    if f is None or f.closed:
        return ""
    try:
        size = os.fstat(f.fileno()).st_size
        data = os.pread(f.fileno(), min(size, limit), max(0, size - limit))
    except OSError:
        return ""
    return data.decode("utf-8", "replace")


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Signal ``proc``'s process group (it leads its own session), else ``proc``."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass


class LaunchHandle(ABC):
    """Something a launcher started: a process or a batch job.

    The core keeps these and calls :meth:`terminate` at reset; :meth:`poll` says
    whether the launch is known to be over.
    """

    @abstractmethod
    def poll(self) -> int | None:
        """Return ``None`` while the launch may still be running, else an exit code.

        Returns:
            ``None``, or the exit status (negative: killed by that signal).
        """

    @abstractmethod
    def terminate(self) -> None:
        """Stop the launched daemon(s). Does not wait; idempotent."""

    @abstractmethod
    def wait(self, timeout: float | None = None) -> int | None:
        """Wait until :meth:`poll` is not ``None``, or ``timeout`` seconds pass.

        Args:
            timeout: Seconds to wait at most; ``None`` waits forever.

        Returns:
            What :meth:`poll` returns at the end.
        """

    @abstractmethod
    def describe(self) -> str:
        """Return a one-line human description (secrets redacted).

        Returns:
            E.g. ``"ssh root@node1 (pid 123, running): python3 -m asyncmirai ..."``.
        """

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"


@runtime_checkable
class Launcher(Protocol):
    """What the core needs from a remote launcher configuration."""

    @property
    def python(self) -> str:
        """The Python command on the target machines.

        A leading ``python3`` in launch commands is replaced by it.
        """
        ...

    def launch(self, commands: Sequence[str]) -> Sequence[LaunchHandle]:
        """Start each command somewhere; return at once with handles.

        Args:
            commands: Shell commands, one per daemon.

        Returns:
            Handles for what was started (not necessarily one per command).
        """
        ...

    def rewrite_url(self, url: str) -> str:
        """Return the URL daemons launched by this config should dial.

        Args:
            url: The host's bound URL (real port, not 0).

        Returns:
            The URL to put in launch commands.
        """
        ...


# --------------------------------------------------------------------------- ssh


@dataclass(frozen=True)
class _Remote:
    dest: str  # "host" or "user@host" as ssh takes it
    port: int | None

    def __str__(self) -> str:
        return self.dest if self.port is None else f"{self.dest}:{self.port}"


def _parse_remote(spec: str) -> _Remote:
    spec = spec.strip()
    if not spec:
        raise ValueError("empty ssh remote")
    port: int | None = None
    if "://" in spec:
        parsed = urllib.parse.urlsplit(spec)
        if parsed.scheme != "ssh":
            raise ValueError(f"ssh remote {spec!r}: scheme must be ssh://")
        if parsed.path not in ("", "/") or parsed.query or parsed.fragment:
            raise ValueError(f"ssh remote {spec!r}: unexpected path or query")
        host = parsed.hostname
        if not host:
            raise ValueError(f"ssh remote {spec!r}: no host")
        try:
            port = parsed.port
        except ValueError as exc:
            raise ValueError(f"ssh remote {spec!r}: bad port") from exc
        dest = f"{parsed.username}@{host}" if parsed.username else host
    else:
        dest = spec
    if dest.startswith("-") or any(c.isspace() for c in dest) or dest.endswith("@"):
        raise ValueError(f"invalid ssh remote {spec!r}")
    return _Remote(dest, port)


def _remote_script(commands: Sequence[str]) -> str:
    """POSIX sh script fed to ``sh -s`` on the remote through ssh's stdin.

    The daemons run in the background; each one's stdin is its command's
    here-document (which carries its secret key), or /dev/null for a command
    without one. A watcher reads the session's stdin (kept open by the host)
    and kills them when it reaches EOF, i.e. when the host closes the pipe,
    dies, or the ssh connection drops. When the daemons exit on their own, the
    watcher is stopped and the session (and the local ssh process) ends.

    Everything is one brace group so the shell has read the whole script
    (here-documents included) before the watcher starts reading the same stdin.
    """
    lines = ["{", "exec 3<&0", "p="]
    for cmd in commands:
        parts = _split_heredoc(cmd)
        if parts is None:
            lines.append(f"{cmd} </dev/null 3<&- &")
        else:  # its stdin is the here-document
            lines.append(f"{parts[0]} 3<&- &{parts[1]}")
        lines.append('p="$p $!"')
    lines += [
        "trap 'kill $p 2>/dev/null' HUP INT TERM",
        # on EOF: SIGTERM, then SIGKILL for daemons that ignore it
        "(read _ <&3; kill $p 2>/dev/null; sleep 5 >/dev/null 2>&1; kill -9 $p 2>/dev/null) &",
        "w=$!",
        "exec 3<&-",
        "s=0",
        "for q in $p; do wait $q || s=$?; done",
        "kill $w 2>/dev/null",
        "exit $s",
        "}",
        "",
    ]
    return "\n".join(lines)


class SSHHandle(LaunchHandle):
    """One ssh session running one or more daemon commands on a remote host.

    The local ``ssh`` process stays in the foreground for as long as the
    remote daemons run. Its stdin is a pipe that the host holds open: closing
    it (terminate, or the host process exiting for any reason) or killing
    ``ssh`` makes the remote side kill the daemons it started.
    """

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        remote: str,
        commands: Sequence[str],
        log: IO[bytes],
    ) -> None:
        """Wrap a started ssh process (used by :meth:`SSHConfig.launch`).

        Args:
            proc: The ``ssh`` process, stdin a pipe.
            remote: The remote as given to :func:`ssh_config`.
            commands: The commands it runs (for :meth:`describe`).
            log: The file receiving ssh's stdout and stderr.
        """
        self.proc = proc
        self.remote = remote
        self.commands = list(commands)
        self._log = log
        self._lock = threading.Lock()
        self._terminated = False

    @property
    def pid(self) -> int:
        """The pid of the local ``ssh`` process."""
        return self.proc.pid

    def poll(self) -> int | None:
        """Return ``None`` while ``ssh`` runs, else its exit status.

        Returns:
            ``None`` or the exit status (255: ssh failed to connect).
        """
        return self.proc.poll()

    def _close_stdin(self) -> None:
        stdin = self.proc.stdin
        if stdin is not None and not stdin.closed:
            try:
                stdin.close()
            except OSError:
                pass

    def terminate(self) -> None:
        """Close the session's stdin (the remote kills its daemons) and stop ``ssh``."""
        with self._lock:
            self._terminated = True
            self._close_stdin()
            _signal_group(self.proc, signal.SIGTERM)

    def kill(self) -> None:
        """Like :meth:`terminate`, with SIGKILL for the local ``ssh``."""
        with self._lock:
            self._terminated = True
            self._close_stdin()
            _signal_group(self.proc, signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for ``ssh`` to exit.

        Args:
            timeout: Seconds to wait at most; ``None`` waits forever.

        Returns:
            The exit status, or ``None`` if still running after ``timeout``.
        """
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        self._close_stdin()
        return code

    def output(self) -> str:
        """Return the last few KiB of what ssh and the remote commands printed.

        Returns:
            Decoded text (ssh errors such as authentication or forwarding failures).
        """
        return _read_tail(self._log)

    def describe(self) -> str:
        """Return a one-line description with the state and redacted commands.

        Returns:
            E.g. ``"ssh node1 (pid 12, running): python3 -m asyncmirai daemon ..."``.
        """
        code = self.poll()
        state = "running" if code is None else f"exited {code}"
        cmds = " ; ".join(redact(c) for c in self.commands)
        text = f"ssh {self.remote} (pid {self.pid}, {state}): {cmds}"
        if code not in (None, 0) and not self._terminated:
            tail = self.output().strip().splitlines()[-3:]
            if tail:
                text += " | " + " / ".join(tail)
        return text

    def __del__(self) -> None:
        # Close our copy of the log; the ssh process is left alone (its stdin
        # pipe closes when the Popen is collected, which stops the daemons).
        log = getattr(self, "_log", None)
        if log is not None:
            log.close()


@dataclass
class SSHConfig:
    """Launch daemons over ssh (see :func:`ssh_config`).

    Attributes:
        remotes: Parsed remotes; daemon ``i`` goes to ``remotes[i % len(remotes)]``.
        tunnel: Use a reverse tunnel; daemons dial ``tcp://127.0.0.1:PORT``.
        timeout: ssh ``ConnectTimeout`` in seconds.
        python: Python command on the remotes.
        ssh: The ssh client command (argv).
        args: Extra ssh arguments (before ours, so they take precedence).
    """

    remotes: tuple[str, ...]
    tunnel: bool = False
    timeout: float = 10
    python: str = field(default_factory=_host_python)
    ssh: tuple[str, ...] = ("ssh",)
    args: tuple[str, ...] = ()
    _parsed: tuple[_Remote, ...] = field(init=False, repr=False, compare=False)
    _targets: dict[int, str] = field(init=False, repr=False, compare=False, default_factory=dict)

    def __post_init__(self) -> None:
        if not self.remotes:
            raise ValueError("ssh_config needs at least one remote")
        if self.timeout <= 0:
            raise ValueError("timeout must be > 0")
        self._parsed = tuple(_parse_remote(r) for r in self.remotes)

    def rewrite_url(self, url: str) -> str:
        """Return the URL remote daemons dial.

        Without a tunnel this is ``url`` itself. With ``tunnel=True`` it is
        ``tcp://127.0.0.1:PORT`` (PORT: ``url``'s port); the remote end of the
        tunnel forwards to ``url``'s address on the host (``127.0.0.1`` when
        ``url`` binds a wildcard address such as ``0.0.0.0``).

        Args:
            url: The host's bound URL (``tcp://ADDR:PORT`` with the real port).

        Returns:
            The URL to put in launch commands.

        Raises:
            ValueError: ``tunnel=True`` and ``url`` is not a tcp URL with a port.
        """
        if not self.tunnel:
            return url
        m = re.fullmatch(r"tcp://(\[[^\]]*\]|[^:/\[\]]+):(\d+)/?", url.strip())
        if m is None:
            raise ValueError(f"tunnel=True needs a tcp://ADDR:PORT url, got {url!r}")
        addr, port = m.group(1), int(m.group(2))
        if not 0 < port < 65536:
            raise ValueError(f"tunnel=True needs the real port (not 0) in {url!r}")
        bare = addr.strip("[]")
        if bare in ("*", "0.0.0.0", "::", "", "localhost"):
            target = "127.0.0.1"
        else:
            target = f"[{bare}]" if ":" in bare else bare
        self._targets[port] = target
        return f"tcp://127.0.0.1:{port}"

    def _ssh_argv(self, remote: _Remote, forward_port: int | None) -> list[str]:
        argv = list(self.ssh) + list(self.args)
        argv += [
            "-o", "BatchMode=yes",
            "-o", f"ConnectTimeout={max(1, round(self.timeout))}",
            "-o", "ServerAliveInterval=10",
            "-o", "ServerAliveCountMax=3",
            "-T",
        ]  # fmt: skip
        if forward_port is not None:
            target = self._targets.get(forward_port, "127.0.0.1")
            argv += [
                "-o", "ExitOnForwardFailure=yes",
                "-R", f"{forward_port}:{target}:{forward_port}",
            ]  # fmt: skip
        if remote.port is not None:
            argv += ["-p", str(remote.port)]
        argv += ["--", remote.dest, "exec sh -s"]
        return argv

    def launch(self, commands: Sequence[str]) -> list[SSHHandle]:
        """Run each command on a remote host over ssh; returns at once.

        Daemon ``i`` goes to remote ``i % len(remotes)``. Without a tunnel each
        command gets its own ssh session (one handle per command). With
        ``tunnel=True`` the commands for one remote share one session with one
        reverse forward per port (two sessions could not both listen on the
        remote port), so there is one handle per remote used.

        Args:
            commands: Daemon launch commands (a leading ``python3`` is replaced
                by :attr:`python`).

        Returns:
            The handles, in order of first command.

        Raises:
            ValueError: ``tunnel=True`` and a command holds no ``tcp://ADDR:PORT``.
            LaunchError: The ssh client could not be started.
        """
        cmds = [_with_python(c, self.python) for c in commands]
        groups: list[tuple[_Remote, int | None, list[str]]] = []
        if self.tunnel:
            index: dict[tuple[_Remote, int], int] = {}
            for i, cmd in enumerate(cmds):
                m = _TCP_RE.search(cmd)
                if m is None:
                    raise ValueError(f"tunnel=True: no tcp://ADDR:PORT in command {redact(cmd)!r}")
                port = int(m.group(2))
                remote = self._parsed[i % len(self._parsed)]
                key = (remote, port)
                if key not in index:
                    index[key] = len(groups)
                    groups.append((remote, port, []))
                groups[index[key]][2].append(cmd)
        else:
            for i, cmd in enumerate(cmds):
                groups.append((self._parsed[i % len(self._parsed)], None, [cmd]))
        handles: list[SSHHandle] = []
        try:
            for remote, fwd, group in groups:
                handles.append(self._start(remote, fwd, group))
        except BaseException:
            for h in handles:
                h.terminate()
            raise
        return handles

    def _start(self, remote: _Remote, port: int | None, commands: list[str]) -> SSHHandle:
        argv = self._ssh_argv(remote, port)
        log = tempfile.TemporaryFile(prefix="asyncmirai-ssh-")
        try:
            proc = popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            log.close()
            raise LaunchError(f"cannot run {argv[0]!r}: {exc}") from exc
        script = _remote_script(commands).encode()
        assert proc.stdin is not None
        stdin = proc.stdin
        if len(script) < 32768:  # fits in a pipe buffer: never blocks
            try:
                stdin.write(script)
                stdin.flush()
            except BrokenPipeError:
                pass  # ssh already died; poll()/describe() report it
        else:

            def feed() -> None:
                try:
                    stdin.write(script)
                    stdin.flush()
                except (BrokenPipeError, ValueError, OSError):
                    pass

            start_thread(feed, name="asyncmirai-ssh-feed")
        return SSHHandle(proc, str(remote), commands, log)


def ssh_config(
    remotes: str | Sequence[str],
    *,
    tunnel: bool = False,
    timeout: float = 10,
    python: str | None = None,
    ssh: str | Sequence[str] = "ssh",
    args: Sequence[str] = (),
) -> SSHConfig:
    """Configure launching daemons over ssh.

    Each ssh session stays open while its daemons run. Terminating the handle,
    killing the local ``ssh``, a dropped connection or the host process exiting
    all make the remote side kill the daemons of that session.

    Key delivery: the commands (with the here-documents that hold the daemons'
    secret key) are written to ``ssh HOST sh -s`` on ssh's stdin; each daemon's
    stdin is its here-document. No argv or environment on either machine holds
    the key.

    Args:
        remotes: One or more of ``"host"``, ``"user@host"``, ``"ssh://[user@]host[:port]"``.
        tunnel: Reverse-tunnel the host's port (``ssh -R PORT:ADDR:PORT``) so
            daemons behind firewalls dial ``tcp://127.0.0.1:PORT`` on their
            machine. The remote port must be free there.
        timeout: ssh connect timeout in seconds.
        python: Python command on the remotes (replaces a leading ``python3``); None
            (the default): this host's ``sys.executable``, shell-quoted, as Dask's
            ``SSHCluster`` does (a shared filesystem or identical images). Pass
            ``"python3"`` or ``"conda run -n env python"`` for anything else.
        ssh: The ssh client, as a string (split like a shell) or argv.
        args: Extra ssh arguments, e.g. ``["-i", key, "-o", "StrictHostKeyChecking=no"]``.

    Returns:
        An :class:`SSHConfig` (a :class:`Launcher`).

    Raises:
        ValueError: A remote is malformed (empty, whitespace, starts with ``-``).
    """
    seq = (remotes,) if isinstance(remotes, str) else tuple(remotes)
    return SSHConfig(
        remotes=seq,
        tunnel=tunnel,
        timeout=timeout,
        python=python or _host_python(),
        ssh=tuple(_split(ssh)),
        args=tuple(str(a) for a in args),
    )


# ----------------------------------------------------------------------- clusters

_SCHEDULERS: dict[str, tuple[str, str]] = {
    # submit command -> (directive prefix, cancel command)
    "sbatch": ("#SBATCH", "scancel"),
    "qsub": ("", "qdel"),  # SGE "#$" and PBS "#PBS": the user writes the prefix
    "bsub": ("#BSUB", "bkill"),
}


def _parse_job_id(scheduler: str, out: str) -> str | None:
    out = out.strip()
    if not out:
        return None
    if scheduler == "sbatch":  # --parsable: "ID" or "ID;cluster"
        m = re.search(r"^(\d+)(?:;\S+)?\s*$", out, re.M)
        if m is None:
            m = re.search(r"Submitted batch job (\d+)", out)
        return m.group(1) if m else None
    if scheduler == "bsub":  # "Job <123> is submitted to queue <normal>."
        m = re.search(r"Job <(\d+)>", out)
        return m.group(1) if m else None
    # qsub: SGE 'Your job 123 ("name") has been submitted', PBS "123.server"
    m = re.search(r"Your job(?:-array)? (\d+)", out)
    if m:
        return m.group(1)
    m = re.search(r"^(\d+(?:\.\S+)?)\s*$", out, re.M)
    return m.group(1) if m else None


def _remove_when_done(proc: subprocess.Popen[bytes], path: str) -> None:
    """Remove a job script once its submit command has exited (it holds a secret)."""
    try:
        proc.wait()
    finally:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


class ClusterHandle(LaunchHandle):
    """A daemon submitted as a batch job.

    Submission runs in the background; :attr:`job_id` waits for it.
    """

    def __init__(
        self,
        config: ClusterConfig,
        submit: subprocess.Popen[bytes],
        command: str,
        script_path: str,
    ) -> None:
        """Wrap a running submission (used by :meth:`ClusterConfig.launch`).

        Args:
            config: The configuration that submitted it.
            submit: The submit process (``sbatch``/``qsub``/``bsub``), stdout a pipe.
            command: The daemon command in the job script.
            script_path: The job script (removed once submitted).
        """
        self.config = config
        self.command = command
        self._submit = submit
        self._script_path = script_path
        self._lock = threading.Lock()
        self._job_id: str | None = None
        self._error: str | None = None
        self._cancel: subprocess.Popen[bytes] | None = None
        self._terminated = False

    @property
    def scheduler(self) -> str:
        """``"sbatch"``, ``"qsub"`` or ``"bsub"``."""
        return self.config.scheduler

    def _finish_submit(self, timeout: float | None) -> bool:
        """Collect the submission if done (or within ``timeout``); True when collected."""
        with self._lock:
            if self._job_id is not None or self._error is not None:
                return True
            try:
                out, err = self._submit.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                return False
            finally:
                if self._submit.returncode is not None:
                    self._remove_script()
            text = out.decode("utf-8", "replace")
            etext = err.decode("utf-8", "replace").strip()
            code = self._submit.returncode
            job = _parse_job_id(self.scheduler, text) if code == 0 else None
            if job is None:
                self._error = (
                    f"{self.config.command} failed (exit {code}): "
                    f"{etext or text.strip() or 'no job id in output'}"
                )
            else:
                self._job_id = job
            return True

    def _remove_script(self) -> None:
        try:
            os.unlink(self._script_path)
        except FileNotFoundError:
            pass

    @property
    def job_id(self) -> str:
        """The scheduler's job id; waits for the submission (bounded by the config's timeout).

        Raises:
            LaunchError: The submission failed or timed out.
        """
        if not self._finish_submit(self.config.timeout):
            raise LaunchError(f"{self.config.command}: no answer within {self.config.timeout} s")
        if self._error is not None:
            raise LaunchError(self._error)
        assert self._job_id is not None
        return self._job_id

    def poll(self) -> int | None:
        """Return ``None`` while the job may be queued or running.

        Does not ask the scheduler (see :meth:`state`): returns the submit
        command's non-zero status if submission failed, ``-SIGTERM`` once this
        handle cancelled the job, else ``None``.

        Returns:
            ``None`` or an exit status.
        """
        if self._finish_submit(0) and self._error is not None:
            code = self._submit.returncode
            return code if code else 1
        if self._terminated:
            return -int(signal.SIGTERM)
        return None

    def state(self) -> str | None:
        """Ask the scheduler for the job's state (one command, bounded by the timeout).

        Returns:
            E.g. ``"PENDING"``, ``"RUNNING"``, ``"COMPLETED"``, ``"CANCELLED"`` for
            Slurm (``scontrol show job``), the raw state letter(s) for
            ``qstat``/``bjobs``, or ``None`` when unknown.
        """
        try:
            job = self.job_id
        except LaunchError:
            return None
        bindir = os.path.dirname(self.config.argv[0])
        if self.scheduler == "sbatch":
            argv, pat = ["scontrol", "show", "job", "-o", job], r"JobState=(\S+)"
        elif self.scheduler == "bsub":
            argv, pat = ["bjobs", "-noheader", "-o", "stat", job], r"^\s*(\S+)"
        else:
            argv, pat = ["qstat", "-f", job], r"job_state\s*=\s*(\S+)"
        argv[0] = os.path.join(bindir, argv[0]) if bindir else argv[0]
        try:
            res = subprocess.run(
                argv,
                capture_output=True,
                timeout=self.config.timeout,
                env=self.config.environ(),
                stdin=subprocess.DEVNULL,
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        m = re.search(pat, res.stdout.decode("utf-8", "replace"), re.M)
        return m.group(1) if m else None

    def terminate(self) -> None:
        """Cancel the job (``scancel``/``qdel``/``bkill``) without waiting for it to end.

        Waits for a still-running submission (bounded by the timeout) to learn
        the job id. Idempotent.
        """
        with self._lock:
            if self._terminated:
                return
            self._terminated = True
        try:
            job = self.job_id
        except LaunchError:
            _signal_group(self._submit, signal.SIGTERM)
            return
        argv = [self.config.cancel_command, job]
        try:
            self._cancel = popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                env=self.config.environ(),
                cwd=self.config.workdir,
            )
        except OSError:
            self._cancel = None

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the submission and, after :meth:`terminate`, for the cancel command.

        Does not wait for the job itself to end (see :meth:`state`).

        Args:
            timeout: Seconds to wait at most; ``None`` waits forever.

        Returns:
            What :meth:`poll` returns at the end.
        """
        self._finish_submit(timeout)
        if self._cancel is not None:
            try:
                self._cancel.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        return self.poll()

    def describe(self) -> str:
        """Return a one-line description with the job id and redacted command.

        Returns:
            E.g. ``"sbatch job 42 (submitted): python3 -m asyncmirai daemon ..."``.
        """
        self._finish_submit(0)
        if self._error is not None:
            what = f"{self.scheduler} job (failed: {self._error})"
        elif self._job_id is None:
            what = f"{self.scheduler} job (submitting, pid {self._submit.pid})"
        else:
            state = "cancelled" if self._terminated else "submitted"
            what = f"{self.scheduler} job {self._job_id} ({state})"
        return f"{what}: {redact(self.command)}"


@dataclass(frozen=True)
class ClusterConfig:
    """Launch daemons as HPC batch jobs (see :func:`cluster_config`).

    Attributes:
        command: The submit command as given (``"sbatch"``, ``"/opt/pbs/bin/qsub"``,
            ``"sbatch --partition=gpu"`` ...).
        options: Script header lines (scheduler directives and shell lines).
        python: Python command on the compute nodes; None (the default): this host's
            ``sys.executable``, shell-quoted (the dask-jobqueue convention).
        workdir: Directory the submit and cancel commands run in (job output
            files land here by default); ``None``: the current directory.
        env: Extra environment for the submit/cancel commands (on top of ``os.environ``).
        timeout: Seconds to wait for a submit command's answer.
    """

    command: str = "sbatch"
    options: str = ""
    python: str = field(default_factory=_host_python)
    workdir: str | None = None
    env: Mapping[str, str] | None = None
    timeout: float = 60

    def __post_init__(self) -> None:
        argv = _split(self.command)
        if os.path.basename(argv[0]) not in _SCHEDULERS:
            raise ValueError(
                f"cluster_config: command must be one of 'sbatch' (Slurm), 'qsub' "
                f"(SGE/PBS) or 'bsub' (LSF), got {self.command!r}"
            )
        self._header()  # validate options now, not at launch

    @property
    def argv(self) -> list[str]:
        """The submit command split into argv."""
        return _split(self.command)

    @property
    def scheduler(self) -> str:
        """``"sbatch"``, ``"qsub"`` or ``"bsub"``."""
        return os.path.basename(self.argv[0])

    @property
    def cancel_command(self) -> str:
        """``scancel``/``qdel``/``bkill``, next to the submit command when given as a path."""
        name = _SCHEDULERS[self.scheduler][1]
        bindir = os.path.dirname(self.argv[0])
        return os.path.join(bindir, name) if bindir else name

    def environ(self) -> dict[str, str]:
        """The environment the scheduler commands run with.

        Returns:
            ``os.environ`` updated with :attr:`env`.
        """
        env = dict(os.environ)
        if self.env:
            env.update({str(k): str(v) for k, v in self.env.items()})
        return env

    def _header(self) -> list[str]:
        prefix = _SCHEDULERS[self.scheduler][0]
        directives: list[str] = []
        shell: list[str] = []
        for raw in self.options.splitlines():
            line = raw.strip()
            if not line:
                continue
            if line.startswith("#!"):
                continue  # we write our own shebang
            if line.startswith("#"):
                directives.append(line)
            elif line.startswith("-"):
                if not prefix:
                    raise ValueError(
                        f"cluster_config: option {line!r} has no directive prefix; qsub "
                        "is used by SGE ('#$ ...') and PBS ('#PBS ...'): write it"
                    )
                directives.append(f"{prefix} {line}")
            else:
                shell.append(line)  # e.g. "module load python"
        # Schedulers stop reading directives at the first command line: hoist them.
        return directives + shell

    def script(self, command: str) -> str:
        """Return the job script that runs one daemon command.

        ``#!/bin/sh``, then the option lines (directives first: schedulers
        ignore directives after the first command; lines starting with ``-``
        get the scheduler's prefix for sbatch/bsub), then the command.

        Args:
            command: The daemon launch command (leading ``python3`` replaced by
                :attr:`python`).

        Returns:
            The script text.
        """
        lines = ["#!/bin/sh", *self._header(), _with_python(command, self.python), ""]
        return "\n".join(lines)

    def submit_argv(self, script_path: str) -> list[str]:
        """Return the submit argv for a script file (``bsub`` reads it on stdin instead).

        Args:
            script_path: Path of the job script.

        Returns:
            E.g. ``["sbatch", "--parsable", script_path]``.
        """
        argv = self.argv
        if self.scheduler == "sbatch":
            return [*argv, "--parsable", script_path]
        if self.scheduler == "qsub":
            return [*argv, script_path]
        return argv

    def rewrite_url(self, url: str) -> str:
        """Return ``url`` unchanged (jobs dial the host directly).

        Args:
            url: The host's bound URL.

        Returns:
            ``url``.
        """
        return url

    def launch(self, commands: Sequence[str]) -> list[ClusterHandle]:
        """Submit one job per command; returns at once (submissions run in parallel).

        Each script holds its daemon's secret key (in a here-document: the key is the
        daemon's stdin, never on a command line), so it is created private to the user
        (mode ``0600``) and removed as soon as the submit command has exited, i.e. has
        read it; the submit command's argv holds only its path.

        Args:
            commands: Daemon launch commands.

        Returns:
            One :class:`ClusterHandle` per command; ``handle.job_id`` waits for
            the submission and raises :class:`LaunchError` if it failed.

        Raises:
            LaunchError: The submit command could not be started.
        """
        handles: list[ClusterHandle] = []
        env = self.environ()
        try:
            for cmd in commands:
                fd, path = tempfile.mkstemp(prefix="asyncmirai-job-", suffix=".sh")
                try:
                    with os.fdopen(fd, "w") as f:  # mkstemp: mode 0600
                        f.write(self.script(cmd))
                    stdin: int | IO[bytes] = subprocess.DEVNULL
                    if self.scheduler == "bsub":
                        stdin = open(path, "rb")
                    try:
                        proc = popen(
                            self.submit_argv(path),
                            stdin=stdin,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE,
                            start_new_session=True,
                            env=env,
                            cwd=self.workdir,
                        )
                    finally:
                        if not isinstance(stdin, int):
                            stdin.close()
                except OSError as exc:
                    os.unlink(path)
                    raise LaunchError(f"cannot run {self.command!r}: {exc}") from exc
                handles.append(ClusterHandle(self, proc, cmd, path))
                start_thread(_remove_when_done, name="asyncmirai-job-script", args=(proc, path))
        except BaseException:
            for h in handles:
                h.terminate()
            raise
        return handles


def cluster_config(
    command: str = "sbatch",
    options: str = "",
    python: str | None = None,
    *,
    workdir: str | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 60,
) -> ClusterConfig:
    """Configure launching daemons as batch jobs on an HPC cluster.

    Key delivery: the daemon command's here-document (its secret key) is in the
    job script body, a ``0600`` file removed as soon as the submit command has
    read it (``bsub`` reads it on stdin); the submit command's argv holds only
    the script's path, and in the job the key is the daemon's stdin.

    Args:
        command: ``"sbatch"`` (Slurm), ``"qsub"`` (SGE or PBS/Torque) or
            ``"bsub"`` (LSF); may be a path or carry extra arguments
            (``"sbatch --partition=gpu"``).
        options: Lines for the job script header, e.g.
            ``"#SBATCH --mem=4G\\n#SBATCH --time=1:00:00\\nmodule load python"``.
            Lines starting with ``-`` get the directive prefix for sbatch/bsub.
        python: Python command on the compute nodes; None (the default): this host's
            ``sys.executable``, shell-quoted (the dask-jobqueue convention).
        workdir: Where the submit/cancel commands run (default: current directory).
        env: Extra environment for the scheduler commands (``os.environ`` is inherited).
        timeout: Seconds to wait for the scheduler's answer to a submission.

    Returns:
        A :class:`ClusterConfig` (a :class:`Launcher`).

    Raises:
        ValueError: ``command`` is not a known scheduler, or an option line is ambiguous.
    """
    return ClusterConfig(
        command=command,
        options=options,
        python=python or _host_python(),
        workdir=workdir,
        env=dict(env) if env is not None else None,
        timeout=timeout,
    )


if TYPE_CHECKING:  # both configs satisfy the Launcher protocol
    _ssh_is_launcher: Launcher = SSHConfig(("host",))
    _cluster_is_launcher: Launcher = ClusterConfig()
