"""CurveZMQ for tcp profiles: per-profile key pairs and a ZAP handler that admits only them.

A profile on a tcp URL generates a server key pair and a client key pair when it starts.
Daemons receive the server's public key and the client public key on their command line
and the client *secret* key never there (``/proc/PID/cmdline`` is world-readable): local
daemons read it from an inherited pipe (:func:`secret_pipe`), launch commands carry it in
a quoted here-document fed to the daemon's stdin (:func:`with_secret`), and a daemon reads
it with :func:`read_secret_fd` or :func:`read_secret_file`.  The ZAP handler (pyzmq's
authenticator thread) admits a connection only if it presents a client public key this
profile issued, so an unauthenticated peer never completes the handshake: it can neither
submit nor receive anything, and no pickle from it is read.

The profile's private directory (:func:`private_tmpdir`) is removed when the host gets
SIGTERM, and a stale one (its host process is gone) at the next profile start.

Users may bring their own keys as ZeroMQ certificate files (``zmq.auth.create_certificates``
writes them): :func:`load_keypair` reads one.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import tempfile
import threading
from typing import Any

import zmq

from ._threads import signals_blocked

__all__ = [
    "HEREDOC",
    "SecretError",
    "curve_keypair",
    "load_keypair",
    "private_tmpdir",
    "raise_fd_limit",
    "read_secret_fd",
    "read_secret_file",
    "release_tmpdir",
    "secret_pipe",
    "start_curve",
    "sweep_stale_tmpdirs",
    "with_secret",
]

#: Delimiter of the here-document that carries a daemon's secret key in launch commands.
HEREDOC = "ASYNCMIRAI_KEY"
_Z85 = re.compile(rb"[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}")

KeyPair = tuple[bytes, bytes]


def curve_keypair() -> KeyPair:
    """A new CurveZMQ key pair ``(public, secret)`` as Z85 bytes.

    Z85 keys may start with ``-``; command-line parsers then take them for an option
    (``--curve-secret-key -x...``), so such pairs are drawn again.  This costs far less
    than a bit of the key's 256 bits of entropy.
    """
    while True:
        public, secret = zmq.curve_keypair()
        if not public.startswith(b"-") and not secret.startswith(b"-"):
            return public, secret


def load_keypair(path: str | os.PathLike[str]) -> KeyPair:
    """Read a ZeroMQ certificate file (``zmq.auth.create_certificates`` format).

    Args:
        path: A ``.key_secret`` file (holds both keys) or a ``.key`` file (public only).

    Returns:
        ``(public, secret)`` as Z85 bytes.

    Raises:
        ValueError: the file holds no secret key, or no valid key at all.
        OSError: the file cannot be read.
    """
    import zmq.auth

    public, secret = zmq.auth.load_certificate(os.fspath(path))
    if secret is None:
        raise ValueError(f"{os.fspath(path)!r} holds no secret key (use the .key_secret file)")
    if len(public) != 40 or len(secret) != 40:
        raise ValueError(f"{os.fspath(path)!r} does not hold Z85 CurveZMQ keys")
    return public, secret


class _AllowKeys:
    """Credentials provider for pyzmq's authenticator: a fixed set of client keys."""

    def __init__(self, keys: set[bytes]) -> None:
        self.keys = keys

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self.keys


def start_curve(
    ctx: zmq.Context[Any],
    client_keys: KeyPair | None = None,
    server_keys: KeyPair | None = None,
) -> tuple[KeyPair, KeyPair, Any]:
    """Generate (or take) keys and start a ZAP handler on ``ctx``.

    Args:
        ctx: The context whose sockets are authenticated.
        client_keys: The daemons' pair; generated when ``None``.
        server_keys: The host's pair; generated when ``None``.

    Returns:
        ``((server_public, server_secret), (client_public, client_secret), auth)``;
        keys are Z85 bytes, ``auth.stop()`` ends the handler thread.
    """
    from zmq.auth.thread import ThreadAuthenticator

    server = server_keys or curve_keypair()
    client = client_keys or curve_keypair()
    auth = ThreadAuthenticator(ctx)
    with signals_blocked():  # its handler thread inherits the mask
        auth.start()
    auth.configure_curve_callback(domain="*", credentials_provider=_AllowKeys({client[0]}))
    return server, client, auth


# ------------------------------------------------------------------ secret delivery


class SecretError(ValueError):
    """A daemon's secret key is missing, garbled, or offered through an unsafe file."""


def _check_z85(raw: bytes, where: str) -> bytes:
    key = raw.strip()
    if not key:
        raise SecretError(f"no secret key on {where} (expected one line: a Z85 CurveZMQ key)")
    if not _Z85.fullmatch(key):
        raise SecretError(
            f"garbled secret key on {where}: expected 40 Z85 characters, got {len(key)} bytes"
        )
    return key


def secret_pipe(secret: bytes) -> int:
    """A pipe holding ``secret`` and a newline; returns its read end (the write end is closed).

    Pass the read end to a child with ``Popen(pass_fds=...)`` and ``--secret-fd N``, then
    close it in the parent.  A key (41 bytes) always fits in the pipe buffer.
    """
    r, w = os.pipe()
    try:
        os.write(w, secret + b"\n")
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(w)
    return r


def read_secret_fd(fd: int) -> bytes:
    """Read one line (the Z85 secret key) from ``fd`` and close it.

    Stdin (``fd == 0``) is reopened on ``/dev/null`` instead of being left closed, so the
    next file the process opens does not become its stdin.

    Raises:
        SecretError: nothing, or not a Z85 key, on that fd.
    """
    where = "stdin" if fd == 0 else f"fd {fd}"
    buf = b""
    try:
        while b"\n" not in buf and len(buf) < 4096:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            buf += chunk
    except OSError as exc:
        raise SecretError(f"cannot read the secret key from {where}: {exc}") from None
    finally:
        try:
            if fd == 0:
                null = os.open(os.devnull, os.O_RDONLY)
                os.dup2(null, 0)
                os.close(null)
            else:
                os.close(fd)
        except OSError:
            pass
    return _check_z85(buf.split(b"\n", 1)[0], where)


def read_secret_file(path: str) -> bytes:
    """Read the secret key from ``path`` and unlink it.

    The file must be a regular file owned by this user and readable by nobody else
    (mode ``0600`` or stricter); it is not followed if it is a symlink.

    Raises:
        SecretError: the file is missing, unsafe, or does not hold a Z85 key.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise SecretError(f"cannot open the secret key file {path!r}: {exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SecretError(f"secret key file {path!r} is not a regular file")
        if st.st_uid != os.geteuid():
            raise SecretError(f"secret key file {path!r} is not owned by this user")
        if st.st_mode & 0o077:
            raise SecretError(
                f"secret key file {path!r} is readable by others (mode "
                f"{stat.S_IMODE(st.st_mode):04o}); it must be 0600"
            )
        data = os.read(fd, 4096)
    finally:
        os.close(fd)
    try:
        os.unlink(path)
    except OSError:
        pass
    return _check_z85(data.split(b"\n", 1)[0], f"file {path!r}")


def with_secret(command: str, secret: bytes) -> str:
    """Append a quoted here-document holding ``secret`` to a launch command.

    The command must already end with ``--secret-fd 0``.  Fed to a shell's *stdin*
    (``sh -s``, ``ssh host sh -s``, a job script), the key reaches the daemon's stdin and
    never any argv; run with ``sh -c`` it would be on that shell's command line.
    """
    return f"{command} <<'{HEREDOC}'\n{secret.decode()}\n{HEREDOC}"


# --------------------------------------------------------------- private directories

_PREFIX = "asyncmirai-"
_OWNER = "owner"
_DIR_RE = re.compile(re.escape(_PREFIX) + r"(\d+)-")
_dirs: dict[str, int] = {}  # path -> pid of the process that made it
_dirs_lock = threading.RLock()  # re-entered by the SIGTERM handler
_handler_installed = False


def _identity(pid: int) -> str:
    """``"PID START PIDNS"``: a process, told apart from a later one with the same pid."""
    with open(f"/proc/{pid}/stat") as f:
        start = f.read().rsplit(")", 1)[1].split()[19]
    ns = os.readlink(f"/proc/{pid}/ns/pid") if os.path.exists(f"/proc/{pid}/ns/pid") else ""
    return f"{pid} {start} {ns}"


def _my_identity() -> str:
    try:
        return _identity(os.getpid())
    except (OSError, IndexError):
        return f"{os.getpid()} ? ?"


def _is_stale(path: str) -> bool:
    """True when the host process that owns ``path`` is gone (same pid namespace only)."""
    try:
        with open(os.path.join(path, _OWNER)) as f:
            pid_s, start, ns = f.read().split()
        pid = int(pid_s)
    except (OSError, ValueError):
        return False  # not ours to judge (another format, or unreadable)
    if start == "?":
        return False
    mine = _my_identity().split()
    if len(mine) != 3 or mine[2] != ns:
        return False  # another pid namespace: its pids mean nothing here
    try:
        return _identity(pid) != f"{pid} {start} {ns}"
    except (OSError, IndexError):
        return True  # no such process


def sweep_stale_tmpdirs(base: str | None = None) -> list[str]:
    """Remove ``asyncmirai-PID-*`` directories of this user whose host process is gone.

    Returns:
        The paths removed.
    """
    base = base or tempfile.gettempdir()
    removed: list[str] = []
    try:
        names = os.listdir(base)
    except OSError:
        return removed
    uid = os.geteuid()
    for name in names:
        if not _DIR_RE.match(name):
            continue
        path = os.path.join(base, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid:
            continue
        if _is_stale(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _on_sigterm(signum: int, frame: Any) -> None:
    me = os.getpid()
    with _dirs_lock:  # a forked child of the host must not remove the host's directories
        dirs = [d for d, pid in _dirs.items() if pid == me]
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
    # then die of SIGTERM as if no handler had been installed
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def _install_sigterm() -> None:
    global _handler_installed
    if _handler_installed or threading.current_thread() is not threading.main_thread():
        return
    try:
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return  # the program handles SIGTERM itself: leave it alone
        signal.signal(signal.SIGTERM, _on_sigterm)
    except (ValueError, OSError):  # not the main interpreter
        return
    _handler_installed = True


def private_tmpdir() -> str:
    """A new ``0700`` directory ``$TMPDIR/asyncmirai-PID-XXXX`` for a profile.

    Sweeps stale ones first, records this process in an ``owner`` file inside, and (from
    the main thread, when SIGTERM has its default action) installs a SIGTERM handler that
    removes the directories not yet released, then dies of SIGTERM as before.
    """
    sweep_stale_tmpdirs()
    path = tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-")
    with open(os.path.join(path, _OWNER), "w") as f:
        f.write(_my_identity())
    with _dirs_lock:
        _dirs[path] = os.getpid()
    _install_sigterm()
    return path


def release_tmpdir(path: str) -> None:
    """Remove a directory made by :func:`private_tmpdir` (idempotent)."""
    shutil.rmtree(path, ignore_errors=True)
    with _dirs_lock:
        _dirs.pop(path, None)


def raise_fd_limit(cap: int = 1 << 16) -> None:
    """Raise this process's soft limit on open files towards its hard limit.

    A tcp profile accepts connections from the network; unauthenticated peers that never
    finish the CurveZMQ handshake hold a descriptor each until libzmq's handshake deadline
    closes them.  With the common soft limit of 1,024, a few hundred of them used to
    starve the host of fds for its own daemons.  Raising the soft limit is what servers
    do (the hard limit is the administrator's word); capped so nothing sizes tables by it.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = cap if hard == resource.RLIM_INFINITY else min(hard, cap)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):
            pass
