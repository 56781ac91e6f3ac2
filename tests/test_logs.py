"""daemons(log_level=...): logging records of the daemons re-emitted on the host."""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

import pytest

import asyncmirai as am

pytestmark = pytest.mark.timeout(60)


def log_things(tag: str) -> int:
    """Logs from a named logger and the root logger, with and without a traceback."""
    logging.getLogger("app.worker").warning("careful %s", tag)
    logging.debug("too low to be sent %s", tag)
    logging.info("info from the root logger %s", tag)
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        logging.getLogger("app.worker").exception("it failed %s", tag)
    return os.getpid()


def _records(caplog: pytest.LogCaptureFixture, tag: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if tag in r.getMessage()]


def _check(records: list[logging.LogRecord], tag: str, pid: int, compute: str) -> None:
    by_msg = {r.getMessage(): r for r in records}
    assert set(by_msg) == {
        f"careful {tag}",
        f"info from the root logger {tag}",
        f"it failed {tag}",
    }, by_msg
    warn = by_msg[f"careful {tag}"]
    assert warn.name == "app.worker" and warn.levelno == logging.WARNING
    assert warn.levelname == "WARNING"
    info = by_msg[f"info from the root logger {tag}"]
    assert info.name == "root" and info.levelno == logging.INFO
    exc = by_msg[f"it failed {tag}"]
    assert exc.levelno == logging.ERROR
    assert exc.exc_text and "ZeroDivisionError" in exc.exc_text and "Traceback" in exc.exc_text
    assert "ZeroDivisionError" in logging.Formatter().format(exc)  # formatted like a local one
    for r in records:
        rec: Any = r
        assert rec.daemon_pid == pid and rec.process == pid
        assert rec.daemon_host == socket.gethostname()
        assert rec.compute == compute
        assert isinstance(rec.task_id, int)
        assert rec.funcName == "log_things"
    assert warn.created <= info.created <= exc.created


def test_local_daemon_logs_arrive_on_the_host(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with am.daemons(1, log_level="INFO"):
        pid = am.mirai(log_things, "local").result(30)
    records = _records(caplog, "local")
    _check(records, "local", pid, "default")
    # they went through the logger asyncmirai.daemon: its level filters them
    caplog.clear()
    logging.getLogger("asyncmirai.daemon").setLevel(logging.ERROR)
    try:
        with am.daemons(1, log_level="INFO"):
            am.mirai(log_things, "filtered").result(30)
    finally:
        logging.getLogger("asyncmirai.daemon").setLevel(logging.NOTSET)
    assert [r.levelno for r in _records(caplog, "filtered")] == [logging.ERROR]


def test_remote_daemon_logs_arrive_on_the_host(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with am.daemons(url="tcp://127.0.0.1:0", log_level=logging.INFO, compute="tcp"):
        am.launch_local(1, compute="tcp")
        pid = am.mirai(log_things, "remote", _compute="tcp").result(30)
        assert pid != os.getpid()
    _check(_records(caplog, "remote"), "remote", pid, "tcp")


def test_no_log_level_sends_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with am.daemons(1):
        am.mirai(log_things, "silent").result(30)
    assert not _records(caplog, "silent")


def test_bad_log_level() -> None:
    with pytest.raises(ValueError, match="log_level"):
        am.daemons(1, log_level="LOUD")
