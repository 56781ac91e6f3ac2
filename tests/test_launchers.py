"""Launchers against a real local OpenSSH server and a real single-node Slurm.

The servers come from tests/servers.py (started once per session; skipped when
the Debian packages are missing: ``bash .ci/servers.sh``).
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from asyncmirai.launchers import (
    ClusterConfig,
    Launcher,
    LaunchError,
    SSHConfig,
    SSHHandle,
    cluster_config,
    redact,
    ssh_config,
)

try:
    from tests.servers import (
        SlurmCluster,
        SSHServer,
        free_port,
        pid_alive,
        slurm_cluster,
        sshd_server,
        wait_for,
    )
except ImportError:  # tests/ itself on sys.path (rootdir-less runs)
    from servers import (  # type: ignore[no-redef]
        SlurmCluster,
        SSHServer,
        free_port,
        pid_alive,
        slurm_cluster,
        sshd_server,
        wait_for,
    )

pytestmark = pytest.mark.timeout(90)

__all__ = ["slurm_cluster", "sshd_server"]  # fixtures used by name below

PY = sys.executable  # "remote" == this machine: use the venv's python


def _py(code: str, *args: str) -> str:
    """A shell command running ``code`` with python3 (replaced by the config's python)."""
    return " ".join(["python3", "-c", shlex.quote(code), *map(shlex.quote, args)])


def _ssh(server: SSHServer, tunnel: bool = False) -> SSHConfig:
    return ssh_config(server.remote, tunnel=tunnel, python=PY, args=server.ssh_args)


def _read_pid(path: Path, timeout: float = 15) -> int:
    wait_for(lambda: path.exists() and path.read_text().strip(), timeout, f"{path}")
    return int(path.read_text().strip())


# ------------------------------------------------------------------- pure (no servers)


def test_configs_are_launchers() -> None:
    assert isinstance(ssh_config("h"), Launcher)
    assert isinstance(cluster_config(), Launcher)


def test_ssh_remote_parsing() -> None:
    cfg = ssh_config(["node1", "me@node2", "ssh://you@node3:2222", "ssh://[::1]:22"])
    argvs = [cfg._ssh_argv(r, None) for r in cfg._parsed]
    assert argvs[0][-2:] == ["node1", "exec sh -s"]
    assert argvs[1][-2] == "me@node2"
    assert argvs[2][-2] == "you@node3" and argvs[2][argvs[2].index("-p") + 1] == "2222"
    assert argvs[3][-2] == "::1"
    for bad in ["", "-oProxyCommand=evil", "a b", "http://x", "ssh://"]:
        with pytest.raises(ValueError):
            ssh_config(bad)
    with pytest.raises(ValueError):
        ssh_config([])


def test_ssh_rewrite_url() -> None:
    assert ssh_config("h").rewrite_url("tcp://10.0.0.1:5555") == "tcp://10.0.0.1:5555"
    cfg = ssh_config("h", tunnel=True)
    assert cfg.rewrite_url("tcp://0.0.0.0:5555") == "tcp://127.0.0.1:5555"
    assert cfg.rewrite_url("tcp://[::]:5556") == "tcp://127.0.0.1:5556"
    assert cfg.rewrite_url("tcp://10.0.0.7:5557") == "tcp://127.0.0.1:5557"
    remote = cfg._parsed[0]
    assert "5555:127.0.0.1:5555" in cfg._ssh_argv(remote, 5555)
    assert "5557:10.0.0.7:5557" in cfg._ssh_argv(remote, 5557)
    with pytest.raises(ValueError):
        cfg.rewrite_url("tcp://0.0.0.0:0")
    with pytest.raises(ValueError):
        cfg.rewrite_url("ipc:///tmp/x")
    with pytest.raises(ValueError, match="no tcp://"):
        cfg.launch(["python3 -m asyncmirai daemon ipc:///tmp/x"])


def test_python_substitution_and_redaction() -> None:
    cfg = cluster_config("sbatch", python="/opt/venv/bin/python")
    cmd = "python3 -m asyncmirai daemon tcp://h:1 --curve-secret-key S3CRET"
    assert "/opt/venv/bin/python -m asyncmirai daemon" in cfg.script(cmd)
    # idempotent: already substituted commands are left alone
    assert cfg.script("/x/python -m m").splitlines()[-1] == "/x/python -m m"
    assert "S3CRET" not in redact(cmd) and "--curve-secret-key ***" in redact(cmd)
    assert "S3CRET" not in redact("a --curve-secret-key=S3CRET b")
    # what launch_remote writes: the key in a here-document, masked on one line
    head = "python3 -m asyncmirai daemon tcp://h:1 --secret-fd=0 <<'ASYNCMIRAI_KEY'"
    doc = f"{head}\nS3CRET\nASYNCMIRAI_KEY"
    assert redact(doc) == f"{head} ***"
    assert redact(doc + "\n" + doc).count("***") == 2
    assert "S3CRET" not in cfg.script(doc).splitlines()[0]
    assert cfg.script(doc).splitlines()[-3:] == [
        "/opt/venv/bin/python -m asyncmirai daemon tcp://h:1 --secret-fd=0 <<'ASYNCMIRAI_KEY'",
        "S3CRET",
        "ASYNCMIRAI_KEY",
    ]


def test_remote_script_gives_each_daemon_its_heredoc(tmp_path: Path) -> None:
    """The script ssh feeds to ``sh -s``: each command's stdin is its own here-document
    (the secret never on a command line), the others' stdin is /dev/null."""
    from asyncmirai.launchers import _remote_script

    code = "import sys; open(sys.argv[1], 'w').write(repr(sys.stdin.read()))"
    cmds = [
        _py(code, str(tmp_path / "a")) + " <<'ASYNCMIRAI_KEY'\nkey-a\nASYNCMIRAI_KEY",
        _py(code, str(tmp_path / "b")),
        _py(code, str(tmp_path / "c")) + " <<'ASYNCMIRAI_KEY'\nkey-c\nASYNCMIRAI_KEY",
    ]
    script = _remote_script([c.replace("python3", PY, 1) for c in cmds])
    for line in script.splitlines():
        assert not line.startswith("key-") or line in ("key-a", "key-c")
    sh = subprocess.Popen(["sh", "-s"], stdin=subprocess.PIPE)
    assert sh.stdin is not None
    sh.stdin.write(script.encode())
    sh.stdin.flush()  # stdin stays open: the watcher would stop the commands at EOF
    try:
        for f in "abc":
            wait_for(lambda f=f: (tmp_path / f).exists(), 20, f"command {f}")  # type: ignore[misc]
        assert sh.wait(20) == 0
    finally:
        sh.stdin.close()
        if sh.poll() is None:
            sh.kill()
        sh.wait()
    got = {f: (tmp_path / f).read_text() for f in "abc"}
    assert got == {"a": repr("key-a\n"), "b": repr(""), "c": repr("key-c\n")}


def test_cluster_invalid_command() -> None:
    for bad in ["srun", "qsubx", "", "condor_submit", "/usr/bin/sbatchx"]:
        with pytest.raises(ValueError):
            cluster_config(bad)
    # qsub: SGE and PBS differ, so a bare option needs its prefix
    with pytest.raises(ValueError, match="prefix"):
        cluster_config("qsub", "-l mem=4G")


CMD = "python3 -m asyncmirai daemon tcp://10.1.2.3:5555 --curve-secret-key K"
# python=None (the default): the host's own interpreter replaces the leading python3
HOST_CMD = CMD.replace("python3", shlex.quote(sys.executable), 1)


def test_script_sbatch() -> None:
    cfg = cluster_config(
        "sbatch",
        """
        module load python
        #SBATCH --mem=4G
        --time=01:00:00
        """,
        python="python3.11",
    )
    lines = cfg.script(CMD).splitlines()
    assert lines == [
        "#!/bin/sh",
        "#SBATCH --mem=4G",
        "#SBATCH --time=01:00:00",
        "module load python",
        "python3.11 -m asyncmirai daemon tcp://10.1.2.3:5555 --curve-secret-key K",
    ]
    assert cfg.submit_argv("/tmp/j.sh") == ["sbatch", "--parsable", "/tmp/j.sh"]
    assert cfg.cancel_command == "scancel"


def test_script_qsub_sge_and_pbs() -> None:
    sge = cluster_config("qsub", "#$ -cwd\n#$ -l mem_free=4G\n#$ -S /bin/sh")
    text = sge.script(CMD)
    assert text.startswith("#!/bin/sh\n#$ -cwd\n#$ -l mem_free=4G\n#$ -S /bin/sh\n")
    assert text.rstrip().endswith(HOST_CMD)
    pbs = cluster_config("/opt/pbs/bin/qsub", "#PBS -l select=1:ncpus=1\n#PBS -N am")
    assert pbs.script(CMD).splitlines()[1:3] == ["#PBS -l select=1:ncpus=1", "#PBS -N am"]
    assert pbs.submit_argv("j.sh") == ["/opt/pbs/bin/qsub", "j.sh"]
    assert pbs.cancel_command == "/opt/pbs/bin/qdel"


def test_script_bsub() -> None:
    cfg = cluster_config("bsub", "-n 1\n#BSUB -M 4000")
    assert cfg.script(CMD).splitlines() == ["#!/bin/sh", "#BSUB -n 1", "#BSUB -M 4000", HOST_CMD]
    assert cfg.submit_argv("j.sh") == ["bsub"]  # script goes on stdin
    assert cfg.cancel_command == "bkill"


def test_job_id_parsing() -> None:
    from asyncmirai.launchers import _parse_job_id

    assert _parse_job_id("sbatch", "42\n") == "42"
    assert _parse_job_id("sbatch", "42;cluster\n") == "42"
    assert _parse_job_id("qsub", 'Your job 77 ("am") has been submitted\n') == "77"
    assert _parse_job_id("qsub", "1234.pbsserver\n") == "1234.pbsserver"
    assert _parse_job_id("bsub", "Job <991> is submitted to queue <normal>.\n") == "991"
    assert _parse_job_id("sbatch", "") is None


# --------------------------------------------------------------------------------- ssh


def test_ssh_runs_command(sshd_server: SSHServer, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cfg = _ssh(sshd_server)
    code = "import sys, os; open(sys.argv[1], 'w').write(sys.executable + ' ' + str(os.getpid()))"
    (h,) = cfg.launch([_py(code, str(out))])
    assert isinstance(h, SSHHandle)
    assert h.wait(20) == 0, h.output()
    exe, pid = out.read_text().split()
    assert exe == PY  # python3 replaced by the config's python
    assert int(pid) != os.getpid()
    assert "exited 0" in h.describe()


def test_ssh_terminate_stops_remote(sshd_server: SSHServer, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    code = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(60)"
    (h,) = _ssh(sshd_server).launch([_py(code, str(pidfile))])
    pid = _read_pid(pidfile)
    assert pid_alive(pid) and h.poll() is None
    t0 = time.monotonic()
    h.terminate()
    wait_for(lambda: not pid_alive(pid), 10, "remote process to exit")
    assert h.wait(10) is not None
    assert time.monotonic() - t0 < 5


def test_ssh_killed_client_stops_remote(sshd_server: SSHServer, tmp_path: Path) -> None:
    """SIGKILL of the local ssh (e.g. host crash): the remote side still cleans up."""
    pidfile = tmp_path / "pid"
    code = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(60)"
    (h,) = _ssh(sshd_server).launch([_py(code, str(pidfile))])
    pid = _read_pid(pidfile)
    os.kill(h.pid, 9)
    wait_for(lambda: not pid_alive(pid), 10, "remote process to exit after ssh SIGKILL")
    h.wait(5)


def test_ssh_multiple_hosts_round_robin(sshd_server: SSHServer, tmp_path: Path) -> None:
    remotes = [sshd_server.remote, f"ssh://{sshd_server.user}@localhost:{sshd_server.port}"]
    cfg = ssh_config(remotes, python=PY, args=sshd_server.ssh_args)
    code = "import sys; open(sys.argv[1], 'w').write('ok')"
    hs = cfg.launch([_py(code, str(tmp_path / f"f{i}")) for i in range(3)])
    assert len(hs) == 3
    assert [("localhost" in h.remote) for h in hs] == [False, True, False]
    for h in hs:
        assert h.wait(20) == 0, h.output()
    assert all((tmp_path / f"f{i}").read_text() == "ok" for i in range(3))


def test_ssh_failure_is_reported(sshd_server: SSHServer) -> None:
    port = free_port()  # nothing listens there
    cfg = ssh_config(f"ssh://root@127.0.0.1:{port}", args=sshd_server.ssh_args, timeout=3)
    (h,) = cfg.launch(["python3 -c pass --secret-fd=0 <<'ASYNCMIRAI_KEY'\nSECRET\nASYNCMIRAI_KEY"])
    assert h.wait(10) == 255
    d = h.describe()
    assert "exited 255" in d and "SECRET" not in d and "refused" in d.lower()


class _Echo:
    """A TCP echo server that records what it received."""

    def __init__(self, host: str) -> None:
        self.sock = socket.create_server((host, 0))
        self.port = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = conn.recv(1024)
                self.received.append(data)
                conn.sendall(b"echo:" + data)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def echo() -> Iterator[_Echo]:
    # The "remote" is this machine, so the tunnel's remote listener (127.0.0.1:PORT)
    # must not collide with the host side: the host listens on 127.0.0.2:PORT.
    server = _Echo("127.0.0.2")
    yield server
    server.close()


TUNNEL_CLIENT = """
import socket, sys, re
url, out, tag = sys.argv[1:4]
host, port = re.match(r"tcp://(.*):(\\d+)", url).groups()
with socket.create_connection((host, int(port)), 10) as s:
    s.sendall(tag.encode())
    data = s.recv(1024)
open(out, "wb").write(data)
"""


def test_ssh_tunnel_carries_data(sshd_server: SSHServer, echo: _Echo, tmp_path: Path) -> None:
    cfg = _ssh(sshd_server, tunnel=True)
    url = cfg.rewrite_url(f"tcp://127.0.0.2:{echo.port}")
    assert url == f"tcp://127.0.0.1:{echo.port}"
    # nothing listens on 127.0.0.1:PORT here except the tunnel's remote end
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", echo.port), 1).close()
    cmds = [_py(TUNNEL_CLIENT, url, str(tmp_path / f"o{i}"), f"hello-{i}") for i in range(2)]
    hs = cfg.launch(cmds)
    assert len(hs) == 1  # same host and port: one session, one forward
    assert f"{echo.port}:127.0.0.2:{echo.port}" in hs[0].proc.args  # type: ignore[operator]
    assert hs[0].wait(20) == 0, hs[0].output()
    assert sorted(echo.received) == [b"hello-0", b"hello-1"]
    assert {(tmp_path / f"o{i}").read_bytes() for i in range(2)} == {
        b"echo:hello-0",
        b"echo:hello-1",
    }


def test_ssh_tunnel_forward_failure(sshd_server: SSHServer, tmp_path: Path) -> None:
    """The remote port is taken: ExitOnForwardFailure makes ssh fail fast.

    sshd (GatewayPorts=no) binds remote forwards on both loopbacks and reports
    success if either works, so occupy 127.0.0.1 and ::1.
    """
    busy = socket.create_server(("127.0.0.1", 0))
    try:
        port = busy.getsockname()[1]
        try:
            busy6: socket.socket | None = socket.create_server(
                ("::1", port), family=socket.AF_INET6
            )
        except OSError:
            busy6 = None
        cfg = _ssh(sshd_server, tunnel=True)
        url = cfg.rewrite_url(f"tcp://127.0.0.2:{port}")
        (h,) = cfg.launch([_py("import time; time.sleep(30)", url)])
        assert h.wait(15) == 255
        assert "forward" in h.output().lower()
        if busy6 is not None:
            busy6.close()
    finally:
        busy.close()


# ------------------------------------------------------------------------------- slurm


def _sbatch(cluster: SlurmCluster, options: str = "") -> ClusterConfig:
    return cluster_config(
        "sbatch",
        f"#SBATCH --output={cluster.jobs_dir}/%j.out\n{options}",
        python=PY,
        workdir=cluster.jobs_dir,
        env={"SLURM_CONF": cluster.conf},
    )


def test_sbatch_runs_job(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cfg = _sbatch(slurm_cluster, "#SBATCH --job-name=am-test")
    code = "import sys, os; open(sys.argv[1], 'w').write(os.environ['SLURM_JOB_ID'])"
    (h,) = cfg.launch([_py(code, str(out)) + " <<'ASYNCMIRAI_KEY'\nSECRET\nASYNCMIRAI_KEY"])
    job = h.job_id
    assert job.isdigit()
    assert h.state() in {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "COMPLETED"}
    assert slurm_cluster.wait_state(job, ["COMPLETED", "FAILED"], 30) == "COMPLETED", Path(
        slurm_cluster.jobs_dir, f"{job}.out"
    ).read_text()
    assert out.read_text() == job
    info = slurm_cluster.run("scontrol", "show", "job", "-o", job).stdout
    assert "JobName=am-test" in info
    assert h.poll() is None  # not cancelled, submission fine
    d = h.describe()
    assert f"sbatch job {job}" in d and "SECRET" not in d
    # the job script (it holds the key) is gone once submitted
    assert not [f for f in os.listdir(tempfile.gettempdir()) if f.startswith("asyncmirai-job-")]
    assert "SECRET" not in slurm_cluster.run("scontrol", "show", "job", "-o", job).stdout


def test_sbatch_terminate_cancels(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    code = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(120)"
    cfg = _sbatch(slurm_cluster)
    hs = cfg.launch([_py(code, str(pidfile)), "sleep 120"])
    jobs = [h.job_id for h in hs]
    assert len(set(jobs)) == 2
    slurm_cluster.wait_state(jobs[0], ["RUNNING"], 30)
    pid = _read_pid(pidfile, 30)
    for h in hs:
        h.terminate()
        h.wait(10)
        assert h.poll() is not None
    for job in jobs:
        assert slurm_cluster.wait_state(job, ["CANCELLED"], 20) == "CANCELLED"
    wait_for(lambda: not pid_alive(pid), 15, "job process to exit")
    assert slurm_cluster.run("squeue", "-h", "-j", ",".join(jobs)).stdout.strip() == ""


def test_sbatch_submit_failure(slurm_cluster: SlurmCluster) -> None:
    cfg = _sbatch(slurm_cluster, "#SBATCH --partition=nonexistent")
    (h,) = cfg.launch(["sleep 1"])
    with pytest.raises(LaunchError, match="(?i)partition"):
        _ = h.job_id
    assert h.poll() not in (None, 0)
    assert "failed" in h.describe()
    h.terminate()  # harmless


def test_ssh_tunnel_many_commands_one_session(sshd_server: SSHServer, echo: _Echo) -> None:
    """> 32 KiB of script (fed from a thread) and many daemons behind one forward."""
    cfg = _ssh(sshd_server, tunnel=True)
    url = cfg.rewrite_url(f"tcp://127.0.0.2:{echo.port}")
    pad = "x" * 300
    hs = cfg.launch([f": {url} {pad} {i}" for i in range(150)])
    assert len(hs) == 1 and len(hs[0].commands) == 150
    assert hs[0].wait(20) == 0, hs[0].output()
