"""User-supplied CurveZMQ certificates, and a busy host loop never kills remote daemons."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import helpers_mod
import pytest
import zmq.auth

import asyncmirai as am

try:
    from tests.servers import shell_launch
except ImportError:  # tests/ itself on sys.path (rootdir-less runs)
    from servers import shell_launch  # type: ignore[no-redef]

pytestmark = pytest.mark.timeout(60)


def _spawn(cmd: str) -> subprocess.Popen[bytes]:
    """Run a launch command as users must: on a shell's stdin (it holds a here-document)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return shell_launch(cmd, sys.executable, env=env)


def _wait_connections(n: int) -> None:
    deadline = time.monotonic() + 20
    while am.status().connections < n:
        assert time.monotonic() < deadline, "daemon did not connect"
        time.sleep(0.02)


def test_user_supplied_certificates(tmp_path: Path) -> None:
    server_pub, server_secret = zmq.auth.create_certificates(str(tmp_path), "host")
    client_pub, client_secret = zmq.auth.create_certificates(str(tmp_path), "daemon")
    host_public, _ = zmq.auth.load_certificate(server_secret)
    daemon_public, _ = zmq.auth.load_certificate(client_secret)
    with am.daemons(url="tcp://127.0.0.1:0", keys=(server_secret, client_secret)):
        (cmd,) = am.launch_remote(1)
        assert f"--curve-server-key={host_public.decode()}" in cmd
        assert f"--curve-public-key={daemon_public.decode()}" in cmd
        p = _spawn(cmd)
        try:
            _wait_connections(1)
            assert am.mirai(helpers_mod.getpid).result(20) == p.pid
        finally:
            am.daemons(0)
            assert p.wait(10) == 0


def test_bad_certificate_paths_fail_at_daemons(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        am.daemons(url="tcp://127.0.0.1:0", keys=(tmp_path / "no", tmp_path / "such"))
    pub, _ = zmq.auth.create_certificates(str(tmp_path), "x")
    with pytest.raises(ValueError, match="no secret key"):
        am.daemons(url="tcp://127.0.0.1:0", keys=(pub, pub))
    assert not am.daemons_set()


@pytest.mark.anyio
async def test_busy_host_loop_does_not_declare_remote_daemons_dead() -> None:
    # liveness 1 s, then the loop that runs the dispatcher is blocked for 3 s
    async with am.daemons(url="tcp://127.0.0.1:0", liveness=1.0):
        (cmd,) = am.launch_remote(1)
        p = _spawn(cmd)
        try:
            while am.status().connections < 1:
                import anyio

                await anyio.sleep(0.02)
            pid = await am.mirai(helpers_mod.getpid)
            time.sleep(3.0)  # a busy (blocked) host loop
            assert await am.mirai(helpers_mod.getpid) == pid
            assert am.status().connections == 1
        finally:
            am.daemons(0)
            p.wait(10)


def test_remote_daemon_output_is_forwarded(capfd: pytest.CaptureFixture[str]) -> None:
    with am.daemons(url="tcp://127.0.0.1:0", output=True):
        (cmd,) = am.launch_remote(1)
        assert "--output" in cmd
        p = _spawn(cmd)
        try:
            _wait_connections(1)
            am.mirai(print, "printed on the remote daemon").result(20)
            am.mirai("import sys; print('to stderr', file=sys.stderr)").result(20)
            time.sleep(0.2)
        finally:
            am.daemons(0)
            p.wait(10)
    out, err = capfd.readouterr()
    line = [ln for ln in out.splitlines() if "printed on the remote daemon" in ln]
    assert line and line[0].startswith(f"[default pid {p.pid}@")
    assert any("to stderr" in ln and ln.startswith("[default pid") for ln in err.splitlines())
