"""Remote daemons end to end: tcp URLs, CurveZMQ, ssh, Slurm and network namespaces.

Daemons are launched the way users launch them on other machines: by the shell
commands ``am.launch_remote()`` returns (fed to ``sh -s`` here), through a real
OpenSSH server on 127.0.0.1, as Slurm batch jobs, or inside another network namespace
reached over a veth pair.  The servers come from tests/servers.py (skipped when the
Debian packages are missing: ``bash .ci/servers.sh``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

import asyncmirai as am
from asyncmirai._profile import profiles
from asyncmirai.launchers import SSHConfig

try:
    from tests.servers import (
        SlurmCluster,
        SSHServer,
        pid_alive,
        serve,
        shell_launch,
        slurm_cluster,
        start_sshd,
        wait_for,
    )
except ImportError:  # tests/ itself on sys.path (rootdir-less runs)
    from servers import (  # type: ignore[no-redef]
        SlurmCluster,
        SSHServer,
        pid_alive,
        serve,
        shell_launch,
        slurm_cluster,
        start_sshd,
        wait_for,
    )

pytestmark = pytest.mark.timeout(90)

__all__ = ["slurm_cluster"]  # fixture used by name below

#: The directory holding the asyncmirai package: "remote" daemons import it from here.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(am.__file__)))
PY = sys.executable
#: What a remote daemon runs as python (a shell fragment, as ssh_config documents).
PY_FRAGMENT = f"env PYTHONPATH={shlex.quote(ROOT)} {shlex.quote(PY)}"


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _reset_default() -> Iterator[None]:
    """Reset the profile after each test, pass or fail (reset is part of what is tested)."""
    yield
    am.daemons(0)


def connections(compute: str = "default") -> int:
    return am.status(compute).connections


def wait_connections(k: int, timeout: float = 20, compute: str = "default") -> None:
    wait_for(lambda: connections(compute) == k, timeout, f"{k} daemon connection(s)")


def daemon_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=ROOT)


class Spawner:
    """Starts launch commands by hand (as a user would on another machine); kills leftovers."""

    def __init__(self, logdir: Path) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logdir = logdir

    def __call__(self, cmd: str, prefix: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
        # On a shell's stdin, as documented: the secret key is in a here-document.
        log = open(self.logdir / f"daemon-{len(self.procs)}.log", "wb")  # noqa: SIM115
        with log:
            p = shell_launch(cmd, PY, prefix=prefix, env=daemon_env(), stdout=log)
        self.procs.append(p)
        return p

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.logdir.glob("*.log")))

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawner]:
    s = Spawner(tmp_path)
    try:
        yield s
    finally:
        s.close()


def tcp_port(url: str) -> int:
    m = re.fullmatch(r"tcp://(?:\[[^\]]+\]|[^:]+):(\d+)", url)
    assert m is not None, url
    return int(m.group(1))


def ancestors(pid: int) -> list[int]:
    out = []
    while pid > 1:
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
        out.append(pid)
    return out


def substitute(cmd: str, flag: str, value: str) -> str:
    """Replace the value of ``flag`` in a launch command (``--flag=V``, maybe quoted)."""
    head, body = cmd.split("\n", 1) if "\n" in cmd else (cmd, None)
    pat = re.compile(rf"'{re.escape(flag)}=[^']*'|{re.escape(flag)}=\S+")
    new, n = pat.subn(lambda _: shlex.quote(f"{flag}={value}"), head)
    assert n == 1, f"{flag} not in {head}"
    return new if body is None else f"{new}\n{body}"


def substitute_secret(cmd: str, secret: str) -> str:
    """Replace the secret key in a launch command's here-document."""
    head, key, end = cmd.split("\n")
    assert end == "ASYNCMIRAI_KEY" and len(key) == 40, cmd
    return f"{head}\n{secret}\n{end}"


def flag_value(cmd: str, flag: str) -> str:
    """The value of ``flag`` in a launch command (``--flag V`` or ``--flag=V``)."""
    argv = shlex.split(cmd.split("\n", 1)[0])
    for i, a in enumerate(argv):
        if a == flag:
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    raise AssertionError(f"{flag} not in {cmd}")


def curve_pair() -> tuple[str, str]:
    """A fresh key pair neither of whose keys starts with '-' (argparse-safe)."""
    while True:
        pub, sec = zmq.curve_keypair()
        if not pub.startswith(b"-") and not sec.startswith(b"-"):
            return pub.decode(), sec.decode()


class Relay:
    """A TCP relay that records every byte it forwards (a wire-level eavesdropper).

    ``cut()`` closes the current connections (a transient network drop); the relay keeps
    listening so the daemon can reconnect.
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.port = self.lsock.getsockname()[1]
        self.seen = bytearray()
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.stopped = False
        self.blackhole = False  # swallow host -> daemon bytes (a message lost on the wire)
        self.swallowed = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped:
            try:
                a, _ = self.lsock.accept()
            except OSError:
                return
            b = socket.create_connection(self.target)
            with self.lock:
                self.conns += [a, b]
            threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        socks = [a, b]
        try:
            while True:
                r, _, _ = select.select(socks, [], [], 0.5)
                for s in r:
                    data = s.recv(65536)
                    if not data:
                        return
                    with self.lock:
                        self.seen += data
                        if s is b and self.blackhole:
                            self.swallowed += len(data)
                            continue
                    (b if s is a else a).sendall(data)
        except OSError:
            return
        finally:
            for s in socks:
                s.close()

    def cut(self) -> None:
        with self.lock:
            conns, self.conns = self.conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.stopped = True
        self.lsock.close()
        self.cut()


# ------------------------------------------------------------------------------ public


def test_public_launcher_exports() -> None:
    from asyncmirai import launchers

    assert am.ssh_config is launchers.ssh_config
    assert am.cluster_config is launchers.cluster_config
    assert {"ssh_config", "cluster_config"} <= set(am.__all__)


def test_host_and_local_url() -> None:
    url = am.host_url()
    assert re.fullmatch(r"tcp://[0-9.]+:0", url), url
    # another machine's daemons dial it: not a loopback address when this one has another
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("198.51.100.1", 9))  # no packet: the route's source address
        outward = probe.getsockname()[0]
    except OSError:
        outward = None  # no route outwards: the loopback address is all there is
    finally:
        probe.close()
    if outward is not None:
        assert not url.startswith("tcp://127."), url
    assert am.host_url(5555).endswith(":5555")
    assert am.host_url(ipv6=True).startswith("tcp://[")
    ipc = am.local_url()
    assert ipc.startswith("ipc://")
    d = os.path.dirname(ipc[len("ipc://") :])
    assert os.stat(d).st_mode & 0o777 == 0o700
    os.rmdir(d)


# ------------------------------------------------------------------------ tcp loopback


@pytest.mark.timeout(60)
def test_tcp_launch_by_returned_command(spawn: Spawner) -> None:
    d = am.daemons(url="tcp://127.0.0.1:0")
    url = am.status().url
    port = tcp_port(url)
    assert url == f"tcp://127.0.0.1:{port}" and port > 0
    assert d.url == url
    cmds = am.launch_remote(2)
    assert len(cmds) == 2 and len(set(cmds)) == 2
    for c in cmds:
        argv = shlex.split(c)
        assert argv[:5] == [sys.executable, "-m", "asyncmirai", "daemon", url]
        assert any(a.startswith("--curve-server-key") for a in argv), c  # keys included
    procs = [spawn(c) for c in cmds]
    pids = {p.pid for p in procs}
    wait_connections(2)
    st = am.status()
    assert {r.pid for r in st.daemons} == pids
    assert not any(r.local for r in st.daemons)
    results = [am.mirai(os.getpid) for _ in range(20)]
    assert {m.result(20) for m in results} <= pids
    assert am.mirai("x + y", x=1, y=2).result(20) == 3
    t0 = time.monotonic()
    am.daemons(0)
    for p in procs:  # told to exit at reset: no waiting for autoexit
        assert p.wait(10) == 0, spawn.logs()
    assert time.monotonic() - t0 < 5


@pytest.mark.timeout(60)
def test_tcp_tensor_round_trip_encrypted(spawn: Spawner) -> None:
    """Tensors round-trip over tcp, and the bytes on the wire are not the plaintext."""
    torch = pytest.importorskip("torch")
    marker = b"PLAINTEXT-MARKER-0123456789!"
    for curve in (True, False):  # False proves the eavesdropper would see plaintext
        am.daemons(url="tcp://127.0.0.1:0", curve=curve)
        relay = Relay(("127.0.0.1", tcp_port(am.status().url)))
        try:
            (cmd,) = am.launch_remote(1)
            assert ("--curve-server-key" in cmd) is curve
            real = am.status().url
            spawn(cmd.replace(real, f"tcp://127.0.0.1:{relay.port}"))
            wait_connections(1)
            t = torch.frombuffer(bytearray(marker * 4000), dtype=torch.uint8)
            nested = {"w": torch.randn(64, 33).t(), "b": torch.arange(7, dtype=torch.bfloat16)}
            back = am.mirai(lambda x: x, t).result(30)
            assert torch.equal(back, t)
            out = am.mirai(lambda x: x * 2, nested["w"]).result(30)
            assert torch.equal(out, nested["w"] * 2)
            back_n = am.mirai(lambda x: x, nested).result(30)
            assert torch.equal(back_n["b"], nested["b"]) and back_n["b"].dtype == torch.bfloat16
            assert am.mirai(lambda s: s, marker.decode()).result(30) == marker.decode()
            with relay.lock:
                wire = bytes(relay.seen)
            assert len(wire) > len(marker) * 4000
            assert (marker in wire) is not curve, f"curve={curve}"
        finally:
            am.daemons(0)
            relay.close()


@pytest.mark.timeout(60)
def test_tcp_ipv6(spawn: Spawner) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        with socket.create_server(("::1", 0), family=socket.AF_INET6):
            pass
    except OSError:
        pytest.skip("no IPv6 loopback")
    am.daemons(url="tcp://[::1]:0")
    url = am.status().url
    assert re.fullmatch(r"tcp://\[::1\]:\d+", url) and tcp_port(url) > 0, url
    (cmd,) = am.launch_remote(1)
    spawn(cmd)
    wait_connections(1)
    assert am.mirai(lambda: "v6").result(20) == "v6"


@pytest.mark.timeout(60)
def test_launch_local_on_url_profile() -> None:
    am.daemons(url="tcp://127.0.0.1:0")
    assert connections() == 0
    assert am.launch_local(2) == 2
    wait_connections(2)
    st = am.status()
    assert all(r.local for r in st.daemons)
    pids = {r.pid for r in st.daemons}
    assert {am.mirai(os.getpid).result(20) for _ in range(10)} <= pids
    assert os.getpid() not in pids


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_tcp_async_context(spawn: Spawner) -> None:
    import anyio

    async with am.daemons(url="tcp://127.0.0.1:0"):
        am.launch_local(1)
        (cmd,) = am.launch_remote(1)
        p = spawn(cmd)
        with anyio.fail_after(20):
            while connections() < 2:
                await anyio.sleep(0.05)
        vals = [await am.mirai(lambda i: i * i, i) for i in range(10)]
        assert vals == [i * i for i in range(10)]
        local = [r.pid for r in am.status().daemons if r.local]
        assert len(local) == 1
    assert not am.daemons_set()
    with anyio.fail_after(10):
        while p.poll() is None:
            await anyio.sleep(0.05)


# ---------------------------------------------------------------------- authentication


@pytest.mark.timeout(60)
def test_unauthenticated_peer_gets_nothing(spawn: Spawner) -> None:
    am.daemons(url="tcp://127.0.0.1:0")
    url = am.status().url
    (cmd,) = am.launch_remote(1)
    spawn(cmd)
    wait_connections(1)
    m = am.mirai(lambda: 42)
    assert m.result(20) == 42
    from asyncmirai import _protocol

    hello = _protocol.encode(_protocol.Hello(1, "evil", "task", b"12345678", "x"))
    ctx = zmq.Context()
    try:
        peers = []
        # No keys at all (NULL mechanism), and curve with the right server key but a
        # client key this profile never issued.
        plain = ctx.socket(zmq.DEALER)
        peers.append(plain)
        stranger = ctx.socket(zmq.DEALER)
        stranger.curve_serverkey = flag_value(cmd, "--curve-server-key").encode()
        pub, sec = curve_pair()
        stranger.curve_publickey, stranger.curve_secretkey = pub.encode(), sec.encode()
        peers.append(stranger)
        for s in peers:
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.ROUTING_ID, b"t" + os.urandom(8))
            s.connect(url)
        for s in peers:
            s.send_multipart(hello)
            s.send_multipart([b"garbage", b"\x00" * 100])
            s.send(os.urandom(5000))
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            for s in peers:
                assert not s.poll(50), "an unauthenticated peer received a message"
        assert connections() == 1
        # the profile keeps working, and the stranger's hello never registered a daemon
        assert [am.mirai(lambda i: i + 1, i).result(20) for i in range(5)] == [1, 2, 3, 4, 5]
        assert {r.host for r in am.status().daemons} != {"evil"}
        assert all(r.host != "evil" for r in am.status().daemons)
    finally:
        ctx.destroy(linger=0)


@pytest.mark.timeout(60)
def test_wrong_keys_are_refused(spawn: Spawner) -> None:
    am.daemons(url="tcp://127.0.0.1:0", autoexit=3)
    (good,) = am.launch_remote(1)
    spawn(good)
    wait_connections(1)
    pub, sec = curve_pair()
    wrong_client = substitute_secret(substitute(good, "--curve-public-key", pub), sec)
    spub, _ = curve_pair()
    wrong_server = substitute(good, "--curve-server-key", spub)  # a host impostor's key
    bad = [spawn(wrong_client), spawn(wrong_server)]
    t0 = time.monotonic()
    while time.monotonic() - t0 < 3:
        assert connections() == 1
        time.sleep(0.1)
    assert len(am.status().daemons) == 1
    assert am.mirai(lambda: "still fine").result(20) == "still fine"
    # A refused daemon does not retry forever: it leaves after autoexit, saying why.
    for p in bad:
        assert p.wait(10) == 4, spawn.logs()  # EXIT_HOST_GONE
    assert "handshake with the host failed" in spawn.logs()
    assert connections() == 1


@pytest.fixture
def relayed(spawn: Spawner) -> Iterator[tuple[Relay, subprocess.Popen[bytes]]]:
    """A tcp profile with one daemon that reaches the host through a :class:`Relay`."""
    am.daemons(url="tcp://127.0.0.1:0", liveness=5, autoexit=5)
    url = am.status().url
    relay = Relay(("127.0.0.1", tcp_port(url)))
    try:
        (cmd,) = am.launch_remote(1)
        p = spawn(cmd.replace(url, f"tcp://127.0.0.1:{relay.port}"))
        wait_connections(1)
        yield relay, p
    finally:
        am.daemons(0)
        relay.close()


@pytest.mark.timeout(60)
def test_transient_drop_mid_task(relayed: tuple[Relay, subprocess.Popen[bytes]]) -> None:
    """The connection drops while a task runs and comes back: the task still resolves."""
    relay, p = relayed
    for retries in (0, 1):
        m = am.mirai(time.sleep, 1.5, _retries=retries)
        wait_for(lambda: am.status().executing == 1, 10, "task sent")
        time.sleep(0.5)  # running on the daemon by now
        relay.cut()
        try:
            assert m.result(20) is None  # the result crossed the new connection
        except am.DaemonError:
            assert retries == 0  # or it failed loudly; never hangs, never lost
    assert [r.pid for r in am.status().daemons] == [p.pid]
    assert am.mirai(os.getpid).result(20) == p.pid


@pytest.mark.timeout(60)
def test_transient_drop_loses_task_message(
    relayed: tuple[Relay, subprocess.Popen[bytes]],
) -> None:
    """The task message itself is lost on the wire: DaemonError (or a retry), never a hang."""
    relay, p = relayed
    relay.blackhole = True
    m = am.mirai(os.getpid, _retries=1)
    wait_for(lambda: relay.swallowed > 0, 10, "task message swallowed")
    time.sleep(0.2)
    relay.cut()
    relay.blackhole = False
    assert m.result(10) == p.pid  # retried on the reconnected daemon


# ------------------------------------------------------------------------ host liveness

_HOST = """
import json, os, sys, time
import asyncmirai as am
am.daemons(url="tcp://127.0.0.1:0", autoexit=2)
print(json.dumps(am.launch_remote(1)[0]), flush=True)  # one line: it holds a heredoc
while am.status().connections < 1:
    time.sleep(0.05)
print("connected", am.mirai(os.getpid).result(20), flush=True)
time.sleep(600)
"""


@pytest.mark.timeout(60)
def test_remote_daemon_exits_when_host_dies(spawn: Spawner) -> None:
    host = subprocess.Popen(
        [PY, "-c", _HOST], stdout=subprocess.PIPE, env=daemon_env(), stdin=subprocess.DEVNULL
    )
    try:
        assert host.stdout is not None
        cmd = json.loads(host.stdout.readline())
        daemon = spawn(cmd)  # started by hand, not by the host: no PDEATHSIG
        line = host.stdout.readline().decode().split()
        assert line == ["connected", str(daemon.pid)], spawn.logs()
        host.send_signal(signal.SIGKILL)  # no reset, no goodbye
        host.wait(10)
        t0 = time.monotonic()
        code = daemon.wait(15)
        took = time.monotonic() - t0
        assert code == 4, spawn.logs()  # EXIT_HOST_GONE
        assert 1.5 < took < 8, took
    finally:
        if host.poll() is None:
            host.kill()
            host.wait()


@pytest.mark.timeout(60)
def test_remote_daemon_exits_after_reset_without_goodbye(spawn: Spawner) -> None:
    """A daemon that is not connected at reset (so gets no Exit) leaves after autoexit."""
    am.daemons(url="tcp://127.0.0.1:0", autoexit=2)
    (cmd,) = am.launch_remote(1)
    am.daemons(0)
    t0 = time.monotonic()
    p = spawn(cmd)
    assert p.wait(15) == 4, spawn.logs()
    assert time.monotonic() - t0 < 8


# --------------------------------------------------------------------------------- ssh


@pytest.fixture(scope="module")
def sshd() -> Iterator[SSHServer]:
    yield from serve(start_sshd)


def _ssh_config(server: SSHServer, tunnel: bool = False) -> SSHConfig:
    return am.ssh_config(server.remote, tunnel=tunnel, python=PY_FRAGMENT, args=server.ssh_args)


def _check_remote_pids(server: SSHServer, pids: set[int]) -> None:
    for pid in pids:
        anc = ancestors(pid)
        assert server.proc.pid in anc, f"daemon {pid} is not under sshd: {anc}"
        below_sshd = anc[: anc.index(server.proc.pid)]  # sshd session, sh ...
        assert os.getpid() not in below_sshd, f"daemon {pid} descends from the test: {anc}"


@pytest.mark.timeout(60)
def test_ssh_end_to_end(sshd: SSHServer) -> None:
    t0 = time.monotonic()
    d = am.daemons(2, url="tcp://127.0.0.1:0", remote=_ssh_config(sshd))
    assert d == 2
    wait_connections(2)
    connect_s = time.monotonic() - t0
    st = am.status()
    pids = {r.pid for r in st.daemons}
    assert len(pids) == 2 and not any(r.local for r in st.daemons)
    _check_remote_pids(sshd, pids)
    got = {am.mirai(os.getpid).result(20) for _ in range(20)}
    assert got <= pids and os.getpid() not in got
    assert am.mirai(lambda: os.environ.get("SSH_CONNECTION", "")).result(20)
    am.daemons(0)
    assert not [p for p in pids if not _wait_dead(p, 10)], "ssh daemons survived reset"
    print(f"ssh: 2 daemons connected in {connect_s:.2f} s")


@pytest.mark.timeout(60)
def test_ssh_reset_kills_busy_daemons(sshd: SSHServer) -> None:
    """Reset tears remote daemons down even while they run a task."""
    am.daemons(1, url="tcp://127.0.0.1:0", remote=_ssh_config(sshd))
    wait_connections(1)
    (pid,) = {r.pid for r in am.status().daemons}
    m = am.mirai(time.sleep, 60)
    wait_for(lambda: am.status().executing == 1, 10, "task running")
    am.daemons(0)
    with pytest.raises(am.DaemonError):
        m.result(5)
    assert _wait_dead(pid, 15), "busy ssh daemon survived reset"


@pytest.mark.timeout(60)
def test_wildcard_url_gives_remote_daemons_a_dialable_address(spawn: Spawner) -> None:
    """``url="tcp://0.0.0.0:0"`` is where the host listens; a remote daemon dialing
    0.0.0.0 would dial its own machine.  The commands name this machine's address."""
    am.daemons(url="tcp://0.0.0.0:0")
    port = tcp_port(am.status().url)
    [cmd] = am.launch_remote(1)
    addr = am.host_url().removeprefix("tcp://").rsplit(":", 1)[0]
    assert f"tcp://{addr}:{port}" in cmd and "0.0.0.0" not in cmd, cmd
    spawn(cmd)
    wait_connections(1)
    assert am.mirai(lambda x: x + 1, 1).result(20) == 2
    am.daemons(0)


@pytest.mark.timeout(60)
def test_ssh_tunnel(sshd: SSHServer) -> None:
    """Daemons dial 127.0.0.1:PORT on their machine; the host listens on 127.0.0.2 only."""
    try:
        with socket.create_server(("127.0.0.2", 0)):
            pass
    except OSError:
        pytest.skip("127.0.0.2 is not a loopback address here")
    cfg = _ssh_config(sshd, tunnel=True)
    am.daemons(url="tcp://127.0.0.2:0")
    host_url = am.status().url
    port = tcp_port(host_url)
    cmds = am.launch_remote(2, remote=cfg)
    for c in cmds:  # what the daemons dial: the tunnel's remote end, not the host
        assert f"tcp://127.0.0.1:{port}" in c and "127.0.0.2" not in c
    wait_connections(2)
    pids = {r.pid for r in am.status().daemons}
    _check_remote_pids(sshd, pids)
    assert {am.mirai(os.getpid).result(20) for _ in range(10)} <= pids
    am.daemons(0)
    assert all(_wait_dead(p, 10) for p in pids)


@pytest.mark.timeout(60)
def test_ssh_python_fragment(sshd: SSHServer) -> None:
    """``python=`` may be a shell fragment (``env ...``, ``conda run ...``), used as written."""
    am.daemons(1, url="tcp://127.0.0.1:0", remote=_ssh_config(sshd))
    wait_connections(1)
    assert am.mirai(lambda: os.environ["PYTHONPATH"]).result(20) == ROOT


def _wait_dead(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# ------------------------------------------------------------------------------- slurm


@pytest.mark.timeout(120)
def test_slurm_end_to_end(slurm_cluster: SlurmCluster) -> None:
    env = dict(slurm_cluster.env, PYTHONPATH=ROOT)
    cfg = am.cluster_config(
        "sbatch",
        options=f"#SBATCH --time=5\n#SBATCH --output={slurm_cluster.jobs_dir}/%j.out",
        python=PY,
        env=env,
        workdir=slurm_cluster.jobs_dir,
        timeout=30,
    )
    t0 = time.monotonic()
    am.daemons(1, url="tcp://127.0.0.1:0", remote=cfg)
    prof = profiles["default"]
    (handle,) = prof.launchers
    job = handle.job_id
    try:
        wait_connections(1, timeout=60)
    except TimeoutError:
        raise AssertionError(f"job {job} never connected\n{slurm_cluster.log()}") from None
    connect_s = time.monotonic() - t0
    (row,) = am.status().daemons
    assert not row.local
    assert os.getpid() not in ancestors(row.pid)
    where = am.mirai(lambda: (os.getpid(), os.environ.get("SLURM_JOB_ID"))).result(20)
    assert where == (row.pid, job)
    assert slurm_cluster.job_state(job) == "RUNNING"
    am.daemons(0)
    state = slurm_cluster.wait_state(job, ["CANCELLED", "COMPLETED"], timeout=30)
    assert _wait_dead(row.pid, 15)
    print(f"slurm: job {job} connected in {connect_s:.2f} s, ended {state}")


@pytest.mark.timeout(120)
def test_slurm_reset_cancels_pending_job(slurm_cluster: SlurmCluster) -> None:
    """A job still queued (held) at reset is scancelled, not left in the queue."""
    cfg = am.cluster_config(
        "sbatch --hold",
        options="#SBATCH --time=5",
        python=PY,
        env=slurm_cluster.env,
        workdir=slurm_cluster.jobs_dir,
        timeout=30,
    )
    am.daemons(1, url="tcp://127.0.0.1:0", remote=cfg)
    (handle,) = profiles["default"].launchers
    job = handle.job_id
    assert slurm_cluster.job_state(job) == "PENDING"
    am.daemons(0)
    assert slurm_cluster.wait_state(job, ["CANCELLED"], timeout=30) == "CANCELLED"


# ------------------------------------------------------------------- network namespaces


class NetNS:
    """A network namespace joined to this one by a veth pair (10.x addresses we create)."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}"
        self.name = f"am-test-{tag}"
        self.host_if = f"amh{tag}"
        self.ns_if = f"amn{tag}"
        sub = os.getpid() % 250 + 1
        self.host_ip = f"10.213.{sub}.1"
        self.ns_ip = f"10.213.{sub}.2"

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", *args], capture_output=True, text=True, check=check, timeout=10
        )

    def up(self) -> None:
        self.ip("netns", "add", self.name)
        self.ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        self.ip("link", "set", self.ns_if, "netns", self.name)
        self.ip("addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
        self.ip("link", "set", self.host_if, "up")
        ns = ("netns", "exec", self.name, "ip")
        self.ip(*ns, "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if)
        self.ip(*ns, "link", "set", self.ns_if, "up")
        self.ip(*ns, "link", "set", "lo", "up")

    def link(self, state: str) -> None:
        self.ip("link", "set", self.host_if, state)

    def down(self) -> None:
        pids = self.ip("netns", "pids", self.name, check=False).stdout.split()
        for p in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(p), signal.SIGKILL)
        self.ip("link", "del", self.host_if, check=False)
        self.ip("netns", "del", self.name, check=False)

    @property
    def prefix(self) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.name)


@pytest.fixture
def netns() -> Iterator[NetNS]:
    if sys.platform != "linux" or not _have("ip"):
        pytest.skip("needs Linux iproute2")
    ns = NetNS()
    try:
        ns.up()
    except (subprocess.CalledProcessError, OSError) as exc:
        ns.down()
        detail = getattr(exc, "stderr", "") or str(exc)
        pytest.skip(f"cannot create a network namespace here: {detail.strip()}")
    try:
        yield ns
    finally:
        ns.down()
        assert ns.name not in ns.ip("netns", "list", check=False).stdout


def _have(cmd: str) -> bool:
    import shutil

    return shutil.which(cmd) is not None or os.path.exists(f"/usr/sbin/{cmd}")


def _netns_inode(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


@pytest.mark.timeout(90)
def test_netns_daemon_over_veth(netns: NetNS, spawn: Spawner) -> None:
    """A daemon in another network namespace reaches the host over a non-loopback address;
    when the link goes dark (no FIN, no RST) the host fails its task and the daemon leaves."""
    am.daemons(url=f"tcp://{netns.host_ip}:0", autoexit=2, liveness=3)
    url = am.status().url
    assert url.startswith(f"tcp://{netns.host_ip}:")
    cmds = am.launch_remote(2)
    procs = [spawn(c, prefix=netns.prefix) for c in cmds]
    try:
        wait_connections(2)
    except TimeoutError:
        raise AssertionError(spawn.logs()) from None
    rows = am.status().daemons
    pids = {r.pid for r in rows}
    assert pids == {p.pid for p in procs}
    for pid in pids:
        assert _netns_inode(pid) != _netns_inode(os.getpid())

    assert {am.mirai(os.getpid).result(20) for _ in range(10)} <= pids

    # A dark link: the running task must not hang; the daemons exit on their own.
    running = am.mirai(time.sleep, 60)
    wait_for(lambda: am.status().executing == 1, 10, "task running")
    t0 = time.monotonic()
    netns.link("down")
    with pytest.raises(am.DaemonError):
        running.result(30)
    lost_s = time.monotonic() - t0
    for p in procs:
        assert p.wait(20) == 4, spawn.logs()  # EXIT_HOST_GONE
    gone_s = time.monotonic() - t0
    print(f"netns: task failed {lost_s:.1f} s and daemons exited {gone_s:.1f} s after link down")


@pytest.mark.timeout(60)
def test_ssh_one_daemon_per_host_by_default(sshd: SSHServer) -> None:
    # mirai's form: no n (one daemon per remote host) and no url (the host's address)
    base = _ssh_config(sshd)
    two_hosts = am.ssh_config([sshd.remote, sshd.remote], python=base.python, args=base.args)
    d = am.daemons(remote=two_hosts)
    assert d == 2 and am.status().url.startswith("tcp://")
    wait_connections(2)
    pids = {r.pid for r in am.status().daemons}
    assert am.mirai(os.getpid).result(20) in pids
    am.daemons(0)
    assert not [p for p in pids if not _wait_dead(p, 10)]
