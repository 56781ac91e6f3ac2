"""CurveZMQ for tcp profiles: per-profile key pairs and a ZAP handler that admits only them.

A profile on a tcp URL generates a server key pair and a client key pair when it starts.
Daemons receive the server's public key and the client pair on their command line; the
ZAP handler (pyzmq's authenticator thread) admits a connection only if it presents a
client public key this profile issued, so an unauthenticated peer never completes the
handshake: it can neither submit nor receive anything, and no pickle from it is read.
"""

from __future__ import annotations

from typing import Any

import zmq

__all__ = ["start_curve"]


class _AllowKeys:
    """Credentials provider for pyzmq's authenticator: a fixed set of client keys."""

    def __init__(self, keys: set[bytes]) -> None:
        self.keys = keys

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self.keys


def start_curve(
    ctx: zmq.Context[Any], client_keys: tuple[bytes, bytes] | None = None
) -> tuple[tuple[bytes, bytes], tuple[bytes, bytes], Any]:
    """Generate keys and start a ZAP handler on ``ctx``.

    Returns ``((server_public, server_secret), (client_public, client_secret), auth)``;
    keys are Z85 bytes, ``auth.stop()`` ends the handler thread.
    """
    from zmq.auth.thread import ThreadAuthenticator

    server = zmq.curve_keypair()
    client = client_keys or zmq.curve_keypair()
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve_callback(domain="*", credentials_provider=_AllowKeys({client[0]}))
    return server, client, auth
