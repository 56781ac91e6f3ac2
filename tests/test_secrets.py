"""Secrets never on a command line, on any machine, at any moment (issue 9, item 1).

While daemons are launched and while they are connected, a thread reads
``/proc/*/cmdline`` and ``/proc/*/environ`` of every process over and over, looking
for the daemons' CurveZMQ secret key and the host's (as Z85, raw bytes and hex):
local daemons of a tcp profile, a ``launch_remote`` command run through ``sh -s``,
the ssh launcher (a real sshd) and the Slurm launcher (a real single-node Slurm).
A second local user, created with ``useradd`` when the tests run as root, must find
no key in what it can read and must not be admitted as a daemon.

The daemon's own secret-delivery options (``--secret-fd``, ``--secret-file``) are
tested here too.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zmq
import zmq.auth
from zmq.utils import z85

import asyncmirai as am
from asyncmirai._profile import profiles
from asyncmirai.launchers import redact

try:
    from tests.servers import (
        SlurmCluster,
        SSHServer,
        shell_launch,
        slurm_cluster,
        sshd_server,
        wait_for,
    )
except ImportError:  # tests/ itself on sys.path (rootdir-less runs)
    from servers import (  # type: ignore[no-redef]
        SlurmCluster,
        SSHServer,
        shell_launch,
        slurm_cluster,
        sshd_server,
        wait_for,
    )

pytestmark = pytest.mark.timeout(120)

__all__ = ["slurm_cluster", "sshd_server"]  # fixtures used by name below

#: The directory holding the asyncmirai package: "remote" daemons import it from here.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(am.__file__)))
PY = sys.executable
PY_FRAGMENT = f"env PYTHONPATH={ROOT} {PY}"
HOST_URL = "tcp://127.0.0.1:0"


@pytest.fixture(autouse=True)
def _reset_default() -> Iterator[None]:
    """Reset the profile after each test, pass or fail."""
    yield
    am.daemons(0)


def daemon_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=ROOT)


def wait_connections(k: int, timeout: float = 30) -> None:
    wait_for(lambda: am.status().connections == k, timeout, f"{k} daemon connection(s)")


# ------------------------------------------------------------------------------ keys


@dataclass
class Keys:
    """User-supplied certificates (so the test knows the secrets before the launch)."""

    host: str  # the host's .key_secret file
    daemon: str  # the daemons' .key_secret file
    server_public: bytes
    daemon_secret: bytes
    needles: tuple[bytes, ...]  # every form of both secrets the scans look for

    @property
    def files(self) -> tuple[str, str]:
        return (self.host, self.daemon)


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    d = tmp_path / "certs"
    d.mkdir(mode=0o700)
    _, host = zmq.auth.create_certificates(str(d), "host")
    _, daemon = zmq.auth.create_certificates(str(d), "daemon")
    server_public, server_secret = zmq.auth.load_certificate(host)
    _, daemon_secret = zmq.auth.load_certificate(daemon)
    assert server_secret is not None and daemon_secret is not None
    needles: list[bytes] = []
    for secret in (daemon_secret, server_secret):
        raw = z85.decode(secret)
        needles += [secret, raw, raw.hex().encode(), raw.hex().upper().encode()]
    return Keys(host, daemon, server_public, daemon_secret, tuple(needles))


# --------------------------------------------------------------------------- scanner


class ProcScanner:
    """Reads /proc/*/cmdline and /proc/*/environ of every process, again and again, in a
    background thread, and records where any needle shows up."""

    def __init__(self, needles: Iterable[bytes]) -> None:
        self.needles = tuple(needles)
        self.hits: dict[str, str] = {}
        self.seen: set[int] = set()  # pids whose cmdline was read
        self.scans = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="proc-scanner", daemon=True)

    def scan(self) -> None:
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            for what in ("cmdline", "environ"):
                try:
                    with open(f"/proc/{name}/{what}", "rb") as f:
                        data = f.read()
                except OSError:
                    continue
                if what == "cmdline":
                    self.seen.add(int(name))
                if any(n in data for n in self.needles):
                    shown = data.replace(b"\0", b" ")
                    for n in self.needles:
                        shown = shown.replace(n, b"<SECRET>")
                    self.hits.setdefault(
                        f"/proc/{name}/{what}", shown[:300].decode(errors="replace")
                    )

    def _run(self) -> None:
        while not self._stop.is_set():
            self.scan()
            self.scans += 1
            time.sleep(0.002)

    def __enter__(self) -> ProcScanner:
        self._thread.start()
        wait_for(lambda: self.scans >= 1, 30, "a first scan of /proc")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def settle(self, pids: Iterable[int]) -> None:
        """Wait for two more full scans, and until each of ``pids`` has been read."""
        start = self.scans
        pids = set(pids)
        wait_for(lambda: self.scans >= start + 2 and pids <= self.seen, 30, "scans of /proc")

    def check(self) -> None:
        assert self.scans >= 3
        assert not self.hits, "a secret key is readable in /proc:\n" + "\n".join(
            f"{k}: {v}" for k, v in self.hits.items()
        )


def _pids() -> set[int]:
    return {r.pid for r in am.status().daemons}


# ---------------------------------------------------------------------- the launches


@pytest.mark.parametrize("transport", ["zmq", "pipe"])
def test_local_daemons_of_tcp_profile(keys: Keys, transport: str) -> None:
    am.daemons(url=HOST_URL, keys=keys.files, transport=transport)
    with ProcScanner(keys.needles) as scan:
        am.launch_local(2)
        wait_connections(2)
        scan.settle(_pids())
    scan.check()
    pids = _pids()
    assert {am.mirai(os.getpid).result(20) for _ in range(5)} <= pids


def test_launch_remote_command_through_sh_stdin(keys: Keys, tmp_path: Path) -> None:
    am.daemons(url=HOST_URL, keys=keys.files)
    with ProcScanner(keys.needles) as scan:
        (cmd,) = am.launch_remote(1)
        with open(tmp_path / "daemon.log", "wb") as log:
            p = shell_launch(cmd, PY, env=daemon_env(), stdout=log)
        try:
            wait_connections(1)
        except TimeoutError:
            raise AssertionError((tmp_path / "daemon.log").read_text()) from None
        scan.settle({p.pid})
    scan.check()
    # what the user copies carries the secret, but only in the here-document
    first, *rest = cmd.splitlines()
    assert not any(n in first.encode() for n in keys.needles)
    assert keys.daemon_secret.decode() in rest
    assert "--secret-fd" in first and "ASYNCMIRAI_KEY" in first
    assert keys.daemon_secret.decode() not in redact(cmd)
    assert am.mirai(os.getpid).result(20) == p.pid
    am.daemons(0)
    assert p.wait(10) == 0


@pytest.mark.parametrize("tunnel", [False, True])
def test_ssh_launcher(keys: Keys, sshd_server: SSHServer, tunnel: bool) -> None:
    addr = "127.0.0.1"
    if tunnel:  # the tunnel's remote end listens on 127.0.0.1: the host must not
        addr = "127.0.0.2"
        try:
            with socket.create_server((addr, 0)):
                pass
        except OSError:
            pytest.skip("127.0.0.2 is not a loopback address here")
    cfg = am.ssh_config(
        sshd_server.remote, tunnel=tunnel, python=PY_FRAGMENT, args=sshd_server.ssh_args
    )
    am.daemons(url=f"tcp://{addr}:0", keys=keys.files)
    with ProcScanner(keys.needles) as scan:
        am.launch_remote(2, remote=cfg)  # tunnel: both in one ssh session and script
        wait_connections(2)
        scan.settle(_pids())
    scan.check()
    pids = _pids()
    assert {am.mirai(os.getpid).result(20) for _ in range(6)} <= pids
    for h in profiles["default"].launchers:
        assert keys.daemon_secret.decode() not in h.describe()


def test_slurm_launcher(keys: Keys, slurm_cluster: SlurmCluster) -> None:
    jobs = slurm_cluster.jobs_dir
    cfg = am.cluster_config(
        "sbatch",
        options=f"#SBATCH --time=5\n#SBATCH --output={jobs}/%j.out",
        python=PY,
        env=dict(slurm_cluster.env, PYTHONPATH=ROOT),
        workdir=jobs,
        timeout=30,
    )
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "asyncmirai-job-*")))
    am.daemons(url=HOST_URL, keys=keys.files)
    with ProcScanner(keys.needles) as scan:
        am.launch_remote(1, remote=cfg)
        try:
            wait_connections(1, timeout=60)
        except TimeoutError:
            raise AssertionError(slurm_cluster.log()) from None
        scan.settle(_pids())
    scan.check()
    (pid,) = _pids()
    assert am.mirai(lambda: (os.getpid(), "SLURM_JOB_ID" in os.environ)).result(20) == (pid, True)
    # the job script (it held the key) is gone once submitted, nobody asked for the job id
    wait_for(
        lambda: (
            not set(glob.glob(os.path.join(tempfile.gettempdir(), "asyncmirai-job-*"))) - before
        ),
        30,
        "the job script to be removed",
    )


def test_job_script_is_private_and_removed(keys: Keys, tmp_path: Path) -> None:
    """A stand-in ``sbatch`` records what it is given: the key is in the script body (mode
    0600), never in its argv, and the script is removed once it has been submitted."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    rec = tmp_path / "rec"
    (bindir / "sbatch").write_text(
        "#!/bin/sh\n"
        f'for a in "$@"; do echo "$a"; done > {rec}.argv\n'
        f'stat -c %a "$2" > {rec}.mode\n'
        f'cat "$2" > {rec}.script\n'
        "echo 4242\n"
    )
    (bindir / "scancel").write_text("#!/bin/sh\nexit 0\n")
    for f in ("sbatch", "scancel"):
        (bindir / f).chmod(0o755)
    am.daemons(url=HOST_URL, keys=keys.files)
    (cmd,) = am.launch_remote(1)
    cfg = am.cluster_config(str(bindir / "sbatch"), python=PY, timeout=30)
    (h,) = cfg.launch([cmd])
    wait_for(
        lambda: os.path.exists(f"{rec}.script") and not os.path.exists(h._script_path),
        30,
        "submission, and the script's removal",
    )
    try:
        assert Path(f"{rec}.mode").read_text().strip() == "600"
        argv = Path(f"{rec}.argv").read_bytes()
        assert not any(n in argv for n in keys.needles)
        script = Path(f"{rec}.script").read_text()
        assert keys.daemon_secret.decode() in script.splitlines()  # its own line: heredoc
        assert h.job_id == "4242"
        assert keys.daemon_secret.decode() not in h.describe()
    finally:
        h.terminate()
        h.wait(10)


# ---------------------------------------------------------------- a second local user

INTRUDER = r"""
import glob, json, os, re, sys, time
cfg = json.loads(sys.stdin.readline())
needles = [bytes.fromhex(h) for h in cfg["needles"]]
found, stolen, readable = [], None, 0
key_re = re.compile(rb"--curve-secret-key[=\x00 ]([^\x00\s']{40})")
pub_re = re.compile(rb"--curve-public-key[=\x00 ]([^\x00\s']{40})")

def look(where, data):
    global stolen, readable
    readable += 1
    if any(n in data for n in needles):
        found.append(where)
    k, p = key_re.search(data), pub_re.search(data)
    if k and p and stolen is None:
        stolen = (p.group(1), k.group(1))

for d in glob.glob("/proc/[0-9]*"):
    for what in ("cmdline", "environ"):
        try:
            with open(f"{d}/{what}", "rb") as f:
                look(f"{d}/{what}", f.read())
        except OSError:
            pass
tmp_files = 0
for top in cfg["dirs"]:
    for path in [top] + glob.glob(os.path.join(top, "**"), recursive=True):
        try:
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    look(path, f.read(1 << 20))
                tmp_files += 1
        except OSError:
            pass

import zmq
from asyncmirai import _protocol

pub, sec = stolen or zmq.curve_keypair()
ctx = zmq.Context()
token = os.urandom(8)
ok = zmq.EVENT_HANDSHAKE_SUCCEEDED
failed = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
          | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
socks = {}
for role, name in ((b"t", "task"), (b"c", "ctrl")):
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    s.routing_id = role + token
    s.curve_serverkey = cfg["server_key"].encode()
    s.curve_publickey, s.curve_secretkey = pub, sec
    mon = s.get_monitor_socket(ok | failed)
    s.connect(cfg["url"])
    hello = _protocol.Hello(os.getpid(), "intruder", name, token, "", _protocol.PROTOCOL_VERSION)
    s.send_multipart(_protocol.encode(hello))
    socks[name] = (s, mon)
handshake = {}
deadline = time.monotonic() + 30
for name, (s, mon) in socks.items():
    while name not in handshake and time.monotonic() < deadline:
        if mon.poll(100):
            ev = int.from_bytes(mon.recv_multipart()[0][:2], "little")
            if ev == ok:
                handshake[name] = "admitted"
            elif ev & failed:
                handshake[name] = "refused"
print(json.dumps({"found": found, "stolen": stolen is not None, "readable": readable,
                  "tmp_files": tmp_files, "handshake": handshake}), flush=True)
received = []
poller = zmq.Poller()
poller.register(sys.stdin.fileno(), zmq.POLLIN)
for s, _ in socks.values():
    poller.register(s, zmq.POLLIN)
while True:
    events = dict(poller.poll(100))
    if sys.stdin.fileno() in events:
        break
    for s, _ in socks.values():
        if s in events:
            received.append(repr(s.recv_multipart()[0][:40]))
print(json.dumps({"received": received}), flush=True)
ctx.destroy(linger=0)
"""


@dataclass
class OtherUser:
    name: str
    python: str
    env: dict[str, str]

    def argv(self, *args: str) -> list[str]:
        runuser = shutil.which("runuser") or "/usr/sbin/runuser"
        return [runuser, "-u", self.name, "--", self.python, *args]


@pytest.fixture
def other_user() -> Iterator[OtherUser]:
    """A second local user (created here, deleted afterwards) and a Python it can run
    with pyzmq and asyncmirai importable."""
    if os.geteuid() != 0:
        pytest.skip("creating a second local user needs root (useradd)")
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    userdel = shutil.which("userdel") or "/usr/sbin/userdel"
    runuser = shutil.which("runuser") or "/usr/sbin/runuser"
    for tool in (useradd, userdel, runuser):
        if not os.access(tool, os.X_OK):
            pytest.skip(f"{os.path.basename(tool)} is not installed")
    name = f"amsec{os.getpid() % 100000}"
    made = subprocess.run(
        [useradd, "--create-home", "--shell", "/bin/sh", name],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if made.returncode != 0:
        pytest.skip(f"useradd failed: {made.stderr.strip()}")
    try:
        site = os.path.dirname(os.path.dirname(zmq.__file__))
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": f"/home/{name}",
            "PYTHONPATH": os.pathsep.join([ROOT, site]),
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        python = None
        for cand in dict.fromkeys([PY, "/usr/bin/python3", shutil.which("python3") or ""]):
            if not cand:
                continue
            user = OtherUser(name, cand, env)
            probe = subprocess.run(
                user.argv("-c", "import zmq, asyncmirai._protocol"),
                capture_output=True,
                env=env,
                cwd="/",
                timeout=60,
            )
            if probe.returncode == 0:
                python = cand
                break
        if python is None:
            pytest.skip("no Python that the second user can run with pyzmq")
        yield OtherUser(name, python, env)
    finally:
        subprocess.run([userdel, "-r", name], capture_output=True, timeout=30)


def test_second_local_user_gets_no_key_and_no_admission(
    other_user: OtherUser, tmp_path: Path
) -> None:
    # Keys generated by the profile (the default), local daemons that hold them (zmq
    # transport), and a daemon started by hand from a launch_remote command.
    am.daemons(1, url=HOST_URL, transport="zmq")
    prof = profiles["default"]
    assert prof.curve_client is not None and prof.curve_server is not None
    needles = [prof.curve_client[1], prof.curve_server[1]]
    needles += [z85.decode(n) for n in list(needles)]
    (cmd,) = am.launch_remote(1)
    with open(tmp_path / "daemon.log", "wb") as log:
        manual = shell_launch(cmd, PY, env=daemon_env(), stdout=log)
    wait_connections(2)
    legit = _pids()
    assert manual.pid in legit

    cfg = {
        "needles": [n.hex() for n in needles],
        "url": am.status().url,
        "server_key": prof.curve_server[0].decode(),
        "dirs": sorted(
            {prof.tmpdir, *glob.glob(os.path.join(tempfile.gettempdir(), "asyncmirai-*"))}
        ),
    }
    with open(tmp_path / "intruder.err", "wb") as err:
        intruder = subprocess.Popen(
            other_user.argv("-c", INTRUDER),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            env=other_user.env,
            cwd="/",
        )
    assert intruder.stdin is not None and intruder.stdout is not None
    try:
        intruder.stdin.write((json.dumps(cfg) + "\n").encode())
        intruder.stdin.flush()
        line = intruder.stdout.readline()
        assert line, (tmp_path / "intruder.err").read_text()
        report = json.loads(line)
        assert report["readable"] > 0  # it did read other processes' command lines
        assert report["found"] == [], f"the second user read a secret key: {report['found']}"
        assert not report["stolen"]
        assert report["handshake"] == {"task": "refused", "ctrl": "refused"}
        # the host still has exactly its own daemons, and they get every task
        assert am.status().connections == 2
        assert {am.mirai(os.getpid).result(20) for _ in range(10)} <= legit
        assert am.status().connections == 2 and _pids() == legit
        intruder.stdin.write(b"stop\n")
        intruder.stdin.flush()
        final = json.loads(intruder.stdout.readline())
        assert final["received"] == []
    finally:
        intruder.stdin.close()
        if intruder.wait(30) is None:
            intruder.kill()
    am.daemons(0)
    assert manual.wait(10) == 0


# ---------------------------------------------------------- the daemon's key options


def _daemon(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    pub = zmq.curve_keypair()[0].decode()
    argv = [
        PY,
        "-m",
        "asyncmirai",
        "daemon",
        "tcp://127.0.0.1:9",
        "--autoexit",
        "0.3",
        f"--curve-server-key={pub}",
        f"--curve-public-key={pub}",
        *args,
    ]
    return subprocess.run(argv, input=stdin, capture_output=True, env=daemon_env(), timeout=60)


def test_daemon_refuses_secret_on_command_line() -> None:
    res = _daemon(f"--curve-secret-key={zmq.curve_keypair()[1].decode()}")
    assert res.returncode == 2
    assert b"--secret-fd" in res.stderr and b"not accepted" in res.stderr


def test_daemon_secret_missing_or_garbled() -> None:
    res = _daemon()  # public keys but no secret
    assert res.returncode == 2 and b"secret key" in res.stderr
    res = _daemon("--secret-fd", "0", stdin=b"")
    assert res.returncode == 2 and b"no secret key on stdin" in res.stderr
    res = _daemon("--secret-fd", "0", stdin=b"tooshort\n")
    assert res.returncode == 2 and b"garbled secret key on stdin" in res.stderr
    res = _daemon("--secret-fd", "7")  # not open
    assert res.returncode == 2 and b"cannot read the secret key from fd 7" in res.stderr


def test_daemon_reads_secret_from_stdin() -> None:
    # a good key; nothing listens on the port, so it leaves after --autoexit (code 4)
    res = _daemon("--secret-fd", "0", stdin=zmq.curve_keypair()[1] + b"\n")
    assert res.returncode == 4, res.stderr


def test_daemon_secret_file(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_bytes(zmq.curve_keypair()[1] + b"\n")
    path.chmod(0o644)
    res = _daemon("--secret-file", str(path))
    assert res.returncode == 2 and b"readable by others" in res.stderr
    assert path.exists()  # refused files are left alone
    path.chmod(0o600)
    res = _daemon("--secret-file", str(path))
    assert res.returncode == 4, res.stderr
    assert not path.exists()  # removed on use
    link = tmp_path / "link"
    target = tmp_path / "target"
    target.write_bytes(zmq.curve_keypair()[1])
    target.chmod(0o600)
    link.symlink_to(target)
    res = _daemon("--secret-file", str(link))
    assert res.returncode == 2 and b"cannot open the secret key file" in res.stderr
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
