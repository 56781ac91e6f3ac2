"""Test servers: a private OpenSSH server and a single-node Slurm, started by hand.

Follows ``shared/recipes/local-sshd-and-slurm.md``: nothing goes in /etc, each
server lives in its own temp dir with free ports, and teardown kills exactly
the processes started here (by pid, with their descendants, walking /proc).

Use the context managers directly (:func:`start_sshd`, :func:`start_slurm`) or
the session-scoped pytest fixtures :func:`sshd_server` and :func:`slurm_cluster`
(import them into a conftest.py, or into the test module). When the binaries
are missing the fixtures skip (install them with ``bash .ci/servers.sh``).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

__all__ = [
    "SSHServer",
    "ServerUnavailable",
    "SlurmCluster",
    "free_port",
    "kill_tree",
    "pid_alive",
    "shell_launch",
    "slurm_cluster",
    "sshd_server",
    "start_slurm",
    "start_sshd",
    "wait_for",
]


class ServerUnavailable(RuntimeError):
    """The server's binaries are missing (fixtures turn this into a skip)."""


# ----------------------------------------------------------------------------- utils


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free on ``host`` a moment ago."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for(
    predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.05
) -> None:
    """Poll ``predicate`` until truthy; raise TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except Exception:  # noqa: BLE001 - not ready yet
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    """True when ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def shell_launch(
    cmd: str,
    python: str,
    *,
    prefix: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    stdout: Any = None,
) -> subprocess.Popen[bytes]:
    """Run a launch command the way its users must: fed to ``sh -s`` on its stdin.

    A command from ``am.launch_remote()`` carries the daemon's secret key in a
    here-document; on ``sh -c`` (or split into argv) it would be on a command line.
    The leading ``python3`` is replaced by ``python`` and the command is ``exec``'d, so
    the returned process *is* the daemon (same pid).
    """
    if cmd.startswith("python3 "):
        script = f"exec {shlex.quote(python)} {cmd[len('python3 ') :]}\n"
    else:  # the default: the host's own interpreter, as the command says
        script = f"exec {cmd}\n"
    p = subprocess.Popen(
        [*prefix, "sh", "-s"],
        stdin=subprocess.PIPE,
        stdout=stdout,
        stderr=subprocess.STDOUT if stdout is not None else None,
        env=dict(env) if env is not None else None,
    )
    assert p.stdin is not None
    p.stdin.write(script.encode())
    p.stdin.close()
    return p


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{p}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(p))
    return kids


def descendants(pid: int) -> list[int]:
    """All descendants of ``pid`` (children first), read from /proc."""
    kids = _children_map()
    todo, found = list(kids.get(pid, [])), []
    while todo:
        q = todo.pop()
        found.append(q)
        todo += kids.get(q, [])
    return found


def kill_tree(proc: subprocess.Popen[bytes], timeout: float = 5) -> None:
    """Stop ``proc`` and everything below it.

    The descendants are collected *before* the parent is signalled (they get
    reparented to init once it exits), then the parent gets SIGTERM (SIGKILL
    after ``timeout``), then the descendants SIGKILL.
    """
    desc = descendants(proc.pid) if proc.poll() is None else []
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    for q in desc:
        with contextlib.suppress(ProcessLookupError):
            os.kill(q, signal.SIGKILL)


def _pids_using(path: str) -> list[int]:
    """Pids (not ours, not our ancestors) whose cwd or open files lie under ``path``.

    Used as a last sweep for processes that escaped the tree (e.g. slurmstepd,
    which detaches to init): anything holding files in our private temp dir is
    ours.
    """
    prefix = os.path.realpath(path) + os.sep
    exclude = {os.getpid()}
    p = os.getppid()
    while p > 1:
        exclude.add(p)
        try:
            with open(f"/proc/{p}/stat") as f:
                p = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    found = []
    for d in filter(str.isdigit, os.listdir("/proc")):
        pid = int(d)
        if pid in exclude or pid == 1:
            continue
        try:
            links = [os.readlink(f"/proc/{d}/cwd")]
            links += [os.readlink(f"/proc/{d}/fd/{fd}") for fd in os.listdir(f"/proc/{d}/fd")]
        except OSError:
            continue
        if any((lk + os.sep).startswith(prefix) for lk in links):
            found.append(pid)
    return found


def _sweep(path: str) -> None:
    for pid in _pids_using(path):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _start(
    argv: Sequence[str], log: str, env: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=dict(env) if env is not None else None,
        )


def _which(name: str, *extra: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in extra or ("/usr/sbin", "/usr/local/sbin", "/sbin"):
        cand = os.path.join(d, name)
        if os.access(cand, os.X_OK):
            return cand
    return None


def _tail(path: str, n: int = 20) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


# ------------------------------------------------------------------------------- sshd


@dataclass
class SSHServer:
    """A running private sshd on 127.0.0.1 accepting key login as the current user.

    Attributes:
        dir: Temp dir with keys, config and log.
        port: The port sshd listens on.
        user: Login user (the current user; root here).
        key: Client private key.
        proc: The ``sshd -D`` process.
        startup_s: Seconds from start to banner.
    """

    dir: str
    port: int
    user: str
    key: str
    proc: subprocess.Popen[bytes]
    startup_s: float = 0.0
    host: str = "127.0.0.1"

    @property
    def remote(self) -> str:
        """``ssh://user@127.0.0.1:port``, as :func:`asyncmirai.ssh_config` takes it."""
        return f"ssh://{self.user}@{self.host}:{self.port}"

    @property
    def ssh_args(self) -> list[str]:
        """ssh options for key login without touching ~/.ssh."""
        return [
            "-i", self.key,
            "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR",
            "-o", "IdentitiesOnly=yes",
        ]  # fmt: skip

    def ssh_argv(self, command: str) -> list[str]:
        """Full argv running ``command`` on this server."""
        return [
            "ssh", *self.ssh_args, "-o", "BatchMode=yes", "-p", str(self.port),
            f"{self.user}@{self.host}", command,
        ]  # fmt: skip

    def run(self, command: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
        """Run ``command`` over ssh and return the completed process (text)."""
        return subprocess.run(
            self.ssh_argv(command),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def log(self) -> str:
        """The tail of sshd's log."""
        return _tail(os.path.join(self.dir, "sshd.log"))


def _ssh_banner(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), 0.2) as s:
        s.settimeout(0.5)
        return s.recv(4) == b"SSH-"


@contextlib.contextmanager
def start_sshd(setenv: Mapping[str, str] | None = None, timeout: float = 15) -> Iterator[SSHServer]:
    """Start a private sshd on 127.0.0.1 (free port, temp-dir keys, key login).

    Args:
        setenv: Environment for every ssh session (sshd ``SetEnv``).
        timeout: Seconds to wait for the banner.

    Raises:
        ServerUnavailable: sshd or ssh-keygen is not installed.
    """
    sshd = _which("sshd")
    keygen = _which("ssh-keygen")
    if sshd is None or keygen is None or shutil.which("ssh") is None:
        raise ServerUnavailable("OpenSSH server/client not installed (bash .ci/servers.sh)")
    t0 = time.monotonic()
    d = tempfile.mkdtemp(prefix="asyncmirai-sshd-")
    proc: subprocess.Popen[bytes] | None = None
    try:
        with contextlib.suppress(OSError):
            os.makedirs("/run/sshd", exist_ok=True)  # privilege separation dir
        for name in ("host_key", "client_key"):
            subprocess.run(
                [keygen, "-q", "-t", "ed25519", "-N", "", "-f", os.path.join(d, name)],
                check=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
            )
        shutil.copy(os.path.join(d, "client_key.pub"), os.path.join(d, "authorized_keys"))
        port = free_port()
        lines = [
            f"Port {port}",
            "ListenAddress 127.0.0.1",
            f"HostKey {d}/host_key",
            f"PidFile {d}/sshd.pid",
            f"AuthorizedKeysFile {d}/authorized_keys",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PermitRootLogin prohibit-password",
            "UsePAM no",
            "StrictModes no",
            "AllowTcpForwarding yes",
            "MaxStartups 100",
            "MaxSessions 100",
        ]
        for k, v in (setenv or {}).items():
            lines.append(f"SetEnv {k}={v}")
        with open(os.path.join(d, "sshd_config"), "w") as f:
            f.write("\n".join(lines) + "\n")
        proc = _start([sshd, "-D", "-e", "-f", f"{d}/sshd_config"], os.path.join(d, "sshd.log"))

        def ready() -> bool:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"sshd exited: {_tail(os.path.join(d, 'sshd.log'))}")
            return _ssh_banner(port)

        deadline = time.monotonic() + timeout
        while True:
            try:
                if ready():
                    break
            except RuntimeError:
                raise
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"sshd not ready in {timeout} s: {_tail(f'{d}/sshd.log')}")
            time.sleep(0.03)
        import pwd

        user = pwd.getpwuid(os.getuid()).pw_name
        yield SSHServer(
            dir=d,
            port=port,
            user=user,
            key=os.path.join(d, "client_key"),
            proc=proc,
            startup_s=time.monotonic() - t0,
        )
    finally:
        if proc is not None:
            kill_tree(proc)
        _sweep(d)
        shutil.rmtree(d, ignore_errors=True)


# ------------------------------------------------------------------------------ slurm

_SLURM_CONF = """\
ClusterName=test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser={user}
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/munge/munge.sock
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=3600
KillWait=2
NodeName=node1 NodeHostname=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=node1 Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class SlurmCluster:
    """A running single-node Slurm (munged + slurmctld + slurmd) in a temp dir.

    Attributes:
        dir: Temp dir (config, state, spool, logs; ``jobs/`` for job output).
        conf: Path of slurm.conf.
        env: ``os.environ`` plus ``SLURM_CONF``: pass it to every Slurm client.
        procs: The daemons we started (munged, slurmctld, slurmd).
        startup_s: Seconds from start to node idle.
    """

    dir: str
    conf: str
    env: dict[str, str]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    startup_s: float = 0.0

    @property
    def jobs_dir(self) -> str:
        """A world-writable directory for job output."""
        return os.path.join(self.dir, "jobs")

    def run(self, *argv: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client command against this cluster (text output)."""
        return subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
            stdin=subprocess.DEVNULL,
        )

    def job_state(self, job_id: str) -> str | None:
        """``JobState`` of a job from ``scontrol show job`` (None when unknown)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        m = re.search(r"JobState=(\S+)", out)
        return m.group(1) if m else None

    def wait_state(self, job_id: str, states: Sequence[str], timeout: float = 30) -> str:
        """Wait until the job is in one of ``states``; return that state."""
        seen: list[str | None] = [None]

        def check() -> bool:
            seen[0] = self.job_state(job_id)
            return seen[0] in states

        try:
            wait_for(check, timeout, f"job {job_id} in {list(states)}", interval=0.1)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc} (last state {seen[0]})\n{self.log()}") from None
        assert seen[0] is not None
        return seen[0]

    def log(self) -> str:
        """Tails of the controller and node logs."""
        return "\n".join(
            f"--- {n}\n" + _tail(os.path.join(self.dir, "log", n))
            for n in ("slurmctld.log", "slurmd.log", "slurmctld.out", "slurmd.out")
        )

    def cancel_all(self, timeout: float = 15) -> None:
        """scancel every job of this cluster and wait until squeue is empty."""
        self.run("scancel", "--full", f"--user={os.getuid()}", timeout=timeout)
        with contextlib.suppress(TimeoutError):
            wait_for(
                lambda: self.run("squeue", "-h").stdout.strip() == "",
                timeout,
                "squeue empty",
                interval=0.1,
            )


@contextlib.contextmanager
def start_slurm(timeout: float = 30) -> Iterator[SlurmCluster]:
    """Start munged, slurmctld and slurmd (node1, idle) in a temp dir with free ports.

    Args:
        timeout: Seconds to wait for each daemon to become ready.

    Raises:
        ServerUnavailable: A binary is missing, or we are not root (slurmd needs it).
    """
    bins = {n: _which(n) for n in ("munged", "slurmctld", "slurmd", "sbatch", "scontrol")}
    missing = [n for n, p in bins.items() if p is None]
    if missing:
        raise ServerUnavailable(f"Slurm/munge not installed: {missing} (bash .ci/servers.sh)")
    if os.getuid() != 0:
        raise ServerUnavailable("a private slurmd must run as root")
    t0 = time.monotonic()
    d = tempfile.mkdtemp(prefix="asyncmirai-slurm-")
    procs: dict[str, subprocess.Popen[bytes]] = {}
    cluster: SlurmCluster | None = None
    try:
        os.chmod(d, 0o755)  # munged: the socket dir and its parents must be a+x
        for sub in ("munge", "state", "spool", "log", "jobs"):
            os.makedirs(os.path.join(d, sub))
        os.chmod(os.path.join(d, "munge"), 0o755)
        os.chmod(os.path.join(d, "jobs"), 0o1777)
        key = os.path.join(d, "munge", "munge.key")
        with open(key, "wb") as kf:
            kf.write(os.urandom(1024))
        os.chmod(key, 0o400)
        sock = os.path.join(d, "munge", "munge.sock")
        procs["munged"] = _start(
            [
                str(bins["munged"]), "-F", f"--key-file={key}", f"--socket={sock}",
                f"--pid-file={d}/munge/munged.pid", f"--seed-file={d}/munge/munged.seed",
            ],
            os.path.join(d, "log", "munged.out"),
        )  # fmt: skip

        def alive(name: str) -> None:
            if procs[name].poll() is not None:
                raise RuntimeError(
                    f"{name} exited ({procs[name].returncode}):\n"
                    + _tail(os.path.join(d, "log", f"{name}.out"))
                    + _tail(os.path.join(d, "log", f"{name}.log"))
                )

        def check(name: str, pred: Callable[[], bool], what: str) -> None:
            deadline = time.monotonic() + timeout
            while True:
                alive(name)
                try:
                    if pred():
                        return
                except (OSError, subprocess.SubprocessError):
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{what} not ready in {timeout} s:\n"
                        + _tail(os.path.join(d, "log", f"{name}.log"))
                    )
                time.sleep(0.05)

        check("munged", lambda: os.path.exists(sock), "munged socket")
        conf = os.path.join(d, "slurm.conf")
        with open(conf, "w") as f:
            f.write(
                _SLURM_CONF.format(
                    d=d,
                    ctld_port=free_port(),
                    slurmd_port=free_port(),
                    user="root",
                    cpus=os.cpu_count() or 1,
                )
            )
        env = dict(os.environ, SLURM_CONF=conf)
        cluster = SlurmCluster(dir=d, conf=conf, env=env, procs=procs)
        procs["slurmctld"] = _start(
            [str(bins["slurmctld"]), "-D", "-f", conf], os.path.join(d, "log", "slurmctld.out"), env
        )
        check(
            "slurmctld",
            lambda: "is UP" in cluster.run("scontrol", "ping", timeout=5).stdout,
            "slurmctld",
        )
        procs["slurmd"] = _start(
            [str(bins["slurmd"]), "-D", "-N", "node1", "-f", conf],
            os.path.join(d, "log", "slurmd.out"),
            env,
        )
        check(
            "slurmd",
            lambda: (
                cluster.run("sinfo", "-h", "-n", "node1", "-o", "%T", timeout=5).stdout.strip()
                == "idle"
            ),
            "slurmd (node idle)",
        )
        cluster.startup_s = time.monotonic() - t0
        yield cluster
    finally:
        # Jobs first: slurmstepd detaches from slurmd and survives it.
        if cluster is not None and "slurmctld" in procs and procs["slurmctld"].poll() is None:
            cluster.cancel_all()
        for name in ("slurmd", "slurmctld", "munged"):
            if name in procs:
                kill_tree(procs[name])
        _sweep(d)  # stray slurmstepd / job processes holding files in our dir
        shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------- fixtures


def serve(start: Callable[[], Any]) -> Iterator[Any]:
    """Body of a server fixture: start it (skip the test when it is unavailable), yield
    it, tear it down."""
    try:
        cm = start()
        server = cm.__enter__()
    except ServerUnavailable as exc:
        pytest.skip(str(exc))
    try:
        yield server
    finally:
        cm.__exit__(None, None, None)


@pytest.fixture(scope="session")
def sshd_server() -> Iterator[SSHServer]:
    """Session-scoped private sshd (skips when OpenSSH is not installed)."""
    yield from serve(start_sshd)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """Session-scoped private single-node Slurm (skips when Slurm is not installed)."""
    yield from serve(start_slurm)
