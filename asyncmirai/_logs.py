"""Daemon logging records, re-emitted on the host (``daemons(log_level=...)``).

On a daemon, :func:`install` puts a handler on the root logger that turns each record at
or above the level into a small msgpack map and sends it on the task channel as an
``Output`` message of stream ``"log"`` (so it reaches the host before the result of the
task that logged it).  On the host, :func:`emit` rebuilds the record and has the logger
``asyncmirai.daemon`` handle it (its level, filters and handlers, then its parents'),
keeping the original logger name, level, message, exception text and time, with
attributes naming the daemon and the task.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from typing import Any

import msgpack

__all__ = ["DAEMON_LOGGER", "emit", "install"]

DAEMON_LOGGER = "asyncmirai.daemon"
#: Records logged by threads other than the ones that own the task channel wait here
#: until the next reply; beyond this many the oldest are dropped.
MAX_BUFFERED = 10_000

_FORMATTER = logging.Formatter()


class ToHost(logging.Handler):
    """Daemon side: send records to the host.  Only the threads that own the task
    channel (main, and the coroutine thread) send; records of other threads are
    buffered until the next :meth:`flush` from one of them (the daemon flushes before
    every reply).  In a process forked by a task it does nothing."""

    def __init__(self, daemon: Any, level: int) -> None:
        super().__init__(level)
        self.daemon = daemon
        self.pid = os.getpid()
        self.pending: deque[bytes] = deque(maxlen=MAX_BUFFERED)
        self.busy = threading.local()

    def emit(self, record: logging.LogRecord) -> None:
        if os.getpid() != self.pid or getattr(self.busy, "on", False):
            return  # a forked child, or a record logged while sending one
        try:
            self.pending.append(self._pack(record))
        except Exception:
            self.handleError(record)
            return
        self.flush()

    def _pack(self, record: logging.LogRecord) -> bytes:
        d = self.daemon
        task = d.current if threading.get_ident() == d.main_ident else None
        exc_text = record.exc_text
        if record.exc_info and not exc_text:
            exc_text = _FORMATTER.formatException(record.exc_info)
        item = {
            "name": record.name,
            "levelno": record.levelno,
            "levelname": record.levelname,
            "msg": record.getMessage(),
            "exc_text": exc_text,
            "stack_info": record.stack_info,
            "created": record.created,
            "pathname": record.pathname,
            "filename": record.filename,
            "module": record.module,
            "lineno": record.lineno,
            "funcName": record.funcName,
            "threadName": record.threadName,
            "processName": record.processName,
            "pid": os.getpid(),
            "task": task,
        }
        return bytes(msgpack.packb(item, use_bin_type=True, default=str))

    def flush(self) -> None:
        d = self.daemon
        me = threading.get_ident()
        if me != d.main_ident and me != d.coro_ident:
            return
        if os.getpid() != self.pid or not self.pending:
            return
        from . import _protocol

        self.busy.on = True
        try:
            while self.pending:
                try:
                    data = self.pending.popleft()
                except IndexError:  # another flushing thread took it
                    break
                d.task.send(_protocol.encode(_protocol.Output("log", data)))
        except Exception:  # the channel is gone: the daemon is exiting
            self.pending.clear()
        finally:
            self.busy.on = False


def install(daemon: Any, level: int) -> ToHost:
    """Daemon side: forward records of every logger at or above ``level``."""
    handler = ToHost(daemon, level)
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > level or root.level == logging.NOTSET:
        root.setLevel(level)
    # Flushed with the output forwarders before every reply (see Daemon._reply).
    daemon.forwarders.append(handler)
    return handler


_LOGGER = logging.getLogger(DAEMON_LOGGER)


def emit(compute: str, d: Any, data: bytes) -> None:
    """Host side: re-emit one record sent by daemon ``d`` of profile ``compute``."""
    try:
        item = msgpack.unpackb(data, raw=False)
        levelno = int(item["levelno"])
    except Exception:
        logging.getLogger("asyncmirai").warning(
            "asyncmirai: dropped a malformed log record from daemon pid %s", d.pid
        )
        return
    if not _LOGGER.isEnabledFor(levelno):
        return
    created = float(item.get("created") or 0.0)
    record = logging.makeLogRecord(
        {
            "name": str(item.get("name") or "root"),
            "levelno": levelno,
            "levelname": str(item.get("levelname") or logging.getLevelName(levelno)),
            "msg": str(item.get("msg", "")),
            "args": None,
            "exc_info": None,
            "exc_text": item.get("exc_text") or None,
            "stack_info": item.get("stack_info") or None,
            "created": created,
            "msecs": (created - int(created)) * 1000,
            "relativeCreated": (created - logging._startTime) * 1000,  # type: ignore[attr-defined]
            "pathname": str(item.get("pathname") or ""),
            "filename": str(item.get("filename") or ""),
            "module": str(item.get("module") or ""),
            "lineno": int(item.get("lineno") or 0),
            "funcName": str(item.get("funcName") or ""),
            "threadName": str(item.get("threadName") or ""),
            "processName": str(item.get("processName") or ""),
            "process": item.get("pid") or d.pid,
            "compute": compute,
            "daemon_pid": d.pid,
            "daemon_host": d.host,
            "daemon_launch": d.launch,
            "task_id": item.get("task"),
        }
    )
    _LOGGER.handle(record)
