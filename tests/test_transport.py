"""The same-host transport: framing, big frames through sealed memfds mapped privately."""

from __future__ import annotations

import array
import os
import socket
import struct

import pytest

from asyncmirai._errors import RemoteProtocolError
from asyncmirai._transport import SHM_FRAME, BlockingChannel

pytestmark = [
    pytest.mark.timeout(30),
    pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="Linux memfds"),
]


def pair() -> tuple[BlockingChannel, BlockingChannel]:
    a, b = socket.socketpair()
    return BlockingChannel(a), BlockingChannel(b)


def test_small_and_big_frames_round_trip() -> None:
    tx, rx = pair()
    big = bytes(range(256)) * (SHM_FRAME // 256 + 3)
    tx.send([b"head", b"x" * 100, big])
    head, small, got = rx.recv()
    assert bytes(head) == b"head" and bytes(small) == b"x" * 100
    assert bytes(got) == big


def test_received_big_frame_is_private_and_writable() -> None:
    tx, rx = pair()
    src = bytearray(b"a" * (SHM_FRAME + 10))
    tx.send([b"h", src])
    _, got = rx.recv()
    mv = memoryview(got)
    assert not mv.readonly
    mv[0:5] = b"HELLO"  # copy-on-write: ours only
    assert bytes(mv[:6]) == b"HELLOa" and src[:5] == b"aaaaa"


def test_an_unsealed_memfd_is_refused() -> None:
    a, b = socket.socketpair()
    rx = BlockingChannel(b)
    n = SHM_FRAME + 1
    fd = os.memfd_create("unsealed", os.MFD_CLOEXEC)  # a peer that did not seal it
    os.write(fd, b"z" * n)
    prefix = struct.pack("<I", 2) + struct.pack("<QQ", 1, n | (1 << 63))
    a.sendmsg([prefix, b"h"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
    os.close(fd)
    with pytest.raises(RemoteProtocolError, match="not sealed"):
        rx.recv()
