"""CurveZMQ for tcp profiles: per-profile key pairs and a ZAP handler that admits only them.

A profile on a tcp URL generates a server key pair and a client key pair when it starts.
Daemons receive the server's public key and the client pair on their command line; the
ZAP handler (pyzmq's authenticator thread) admits a connection only if it presents a
client public key this profile issued, so an unauthenticated peer never completes the
handshake: it can neither submit nor receive anything, and no pickle from it is read.

Users may bring their own keys as ZeroMQ certificate files (``zmq.auth.create_certificates``
writes them): :func:`load_keypair` reads one.
"""

from __future__ import annotations

import os
from typing import Any

import zmq

__all__ = ["curve_keypair", "load_keypair", "start_curve"]

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
    auth.start()
    auth.configure_curve_callback(domain="*", credentials_provider=_AllowKeys({client[0]}))
    return server, client, auth
