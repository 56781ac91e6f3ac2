"""What local daemons' tasks started does not outlive a host that is SIGKILLed.

Each local daemon leads its own process group, and the processes its tasks start
(``subprocess``, ``multiprocessing``) join it.  At reset, or when a daemon dies, the
host kills the group (``_supervisor._reap_group``); when the *host* dies, Linux kills
each daemon (``PR_SET_PDEATHSIG``) but nothing kills the rest of its group: a daemon
SIGKILLed that way cannot clean up, and the parent-death signal is not inherited by
the processes its tasks start.

So the host keeps one small guard process: a POSIX shell reading a socket whose only
other end is this host's.  The host writes ``+PGID`` when it starts a daemon and ``-PGID``
once it has reaped that daemon and killed its group; when the host is gone, however it
went, the kernel closes that end, the shell reads end of file, SIGKILLs every group
still listed and exits.  It ignores SIGINT/SIGHUP/SIGTERM (end of file is its only way
out), runs in its own session (a Ctrl-C at the host's terminal does not reach it), and
is not the host's child (started through a shell that exits at once), so it shows up in
no count of the host's children.  A process forked from the host closes its copy of our
end (the fork hook below), so a forked child that outlives the host does not keep the
guard waiting.  Before each write the descriptor is checked to still be ours (a program
that closes descriptors it does not own has ended that guard: a new one is started,
and nothing is ever written to whatever reused the number).

Cost: one ``sh`` started with the first local daemon (~1 ms, ~1 MB), one ``write`` per
daemon start and reap.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading

__all__ = ["forget_group", "guard_group"]

# fd 3 is the socket; the guard runs in the background (an asynchronous list gets
# /dev/null as stdin, hence the explicit redirection from fd 3) and the outer shell
# exits at once.  Ids are checked to be digits before they reach ``kill``.
_SCRIPT = r"""
exec 3<&0
{
  trap '' INT HUP TERM QUIT
  groups=" "
  while IFS= read -r line; do
    id=${line#?}
    case $id in ''|*[!0-9]*) continue ;; esac
    case $line in
      +*) groups="$groups$id " ;;
      -*) kept=" "
          for g in $groups; do [ "$g" = "$id" ] || kept="$kept$g "; done
          groups=$kept ;;
    esac
  done
  for id in $groups; do kill -s KILL -- "-$id" 2>/dev/null; done
} <&3 >/dev/null 2>&1 3<&- &
exit 0
"""

_lock = threading.Lock()
_sock: socket.socket | None = None  # our end (this process's own guard)
_ident: tuple[int, int] | None = None  # (st_dev, st_ino) of our end, to recognize it
_owner = 0  # the pid that started the guard: a forked child starts its own


def _start() -> socket.socket | None:
    """Start the guard; our end of its stdin, or None (no shell here)."""
    global _sock, _ident, _owner
    # A socket pair, not a pipe: a send that finds no reader fails with EPIPE
    # (MSG_NOSIGNAL) instead of raising SIGPIPE, which a program may have set to kill it.
    ours, theirs = socket.socketpair()  # both non-inheritable: theirs becomes its stdin
    try:
        proc = subprocess.Popen(
            ["/bin/sh", "-c", _SCRIPT],
            stdin=theirs.fileno(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )
    except OSError:
        ours.close()
        theirs.close()
        return None
    theirs.close()
    proc.wait()  # the outer shell exits at once; the guard is its orphaned child
    ours.setblocking(False)  # never wait on it (a stopped guard): a lost line is harmless
    st = os.fstat(ours.fileno())
    _sock, _ident, _owner = ours, (st.st_dev, st.st_ino), os.getpid()
    return ours


def _ours(sock: socket.socket) -> bool:
    """Is ``sock``'s descriptor still our end (not closed, or reused, by someone else)?"""
    try:
        st = os.fstat(sock.fileno())
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == _ident


def _write(line: str) -> None:
    with _lock:
        sock = _sock if _owner == os.getpid() else None
        if sock is not None and not _ours(sock):
            # The program closed our descriptor: never write to (nor close) its reuse.
            sock.detach()
            sock = None
        if sock is None:
            if line.startswith("-"):
                return  # not listed by a guard of ours
            sock = _start()
            if sock is None:
                return  # no shell here: the reset path still kills the groups
        try:
            sock.send(line.encode(), socket.MSG_NOSIGNAL)
        except OSError:
            pass


def guard_group(pgid: int) -> None:
    """A local daemon leads process group ``pgid``: kill it if this host dies."""
    _write(f"+{pgid}\n")


def forget_group(pgid: int) -> None:
    """The daemon of ``pgid`` was reaped and its group killed: no longer guarded."""
    _write(f"-{pgid}\n")


def _after_fork_in_child() -> None:
    global _sock, _owner, _lock
    _lock = threading.Lock()  # another thread may have held it at the fork
    if _sock is not None:
        if _ours(_sock):
            _sock.close()
        else:
            _sock.detach()
    _sock, _owner = None, 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
