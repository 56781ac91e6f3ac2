"""The sans-IO protocol, fed plain bytes: no sockets."""

from __future__ import annotations

import random

import msgpack
import pytest

from asyncmirai import _protocol as p
from asyncmirai._errors import LocalProtocolError, RemoteProtocolError

pytestmark = pytest.mark.timeout(60)

V = p.PROTOCOL_VERSION

MESSAGES: list[p.Message] = [
    p.Hello(123, "host", "task", b"12345678", "local-1"),
    p.Hello(5, "h", "ctrl", b"t", ""),
    p.Welcome(b"config"),
    p.Refuse("no"),
    p.Task(7, b"body", [{"codec": "x"}], [b"buf1", b"buf2"], {"seed": 3}),
    p.Task(8, b"body"),
    p.Setup(9, b"b", [], []),
    p.Setup(9, b"b", [], [], {"otel": {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}}),
    p.Result(10, True, b"v", [], [b"z" * 100]),
    p.Result(11, False, b"err"),
    p.Cancel(12),
    p.Cancelled(13),
    p.Exit("bye"),
    p.Ping(),
    p.Output("stderr", b"line\n"),
    p.Output("log", msgpack.packb({"name": "x", "levelno": 30, "msg": "m"})),
    p.Retire("maxtasks"),
    p.Put(14, b"obj", [{"codec": "x"}], [b"buf"]),
    p.Drop(15),
]


def _as_received(frames: list[object]) -> list[memoryview]:
    return [memoryview(bytearray(bytes(f))) for f in frames]  # type: ignore[call-overload]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_roundtrip(msg: p.Message) -> None:
    frames = p.encode(msg)
    assert all(isinstance(bytes(f), bytes) for f in frames)  # type: ignore[call-overload]
    back = p.decode(_as_received(frames))
    assert type(back) is type(msg)
    for name in msg.__slots__:  # type: ignore[union-attr]
        a, b = getattr(msg, name), getattr(back, name)
        if name in ("buffers",):
            assert [bytes(x) for x in a] == [bytes(x) for x in b]
        elif name == "body":
            assert bytes(a) == bytes(b)
        else:
            assert a == b, name


def test_payload_buffers_are_passed_through_without_copy() -> None:
    buf = bytearray(b"x" * 1000)
    frames = p.encode(p.Task(1, b"b", [], [memoryview(buf)]))
    assert len(frames) == 2  # small body inline in the header, then the buffer
    assert frames[1].obj is buf  # type: ignore[union-attr]
    received = [memoryview(bytearray(bytes(f))) for f in frames]
    msg = p.decode(received)
    assert isinstance(msg, p.Task) and msg.buffers[0] is received[1]
    big = b"y" * (p.INLINE_BODY_BYTES + 1)
    frames = p.encode(p.Result(2, True, big, [], [memoryview(buf)]))
    assert len(frames) == 3 and frames[1] is big
    back = p.decode(frames)
    assert isinstance(back, p.Result) and back.body is big and back.buffers[0].obj is buf


def test_messages_are_frozen() -> None:
    with pytest.raises(AttributeError):
        p.Cancel(1).id = 2  # type: ignore[misc]


def test_hello_of_another_version_still_decodes_so_it_can_be_refused() -> None:
    frames = p.encode(p.Hello(1, "h", "task", b"t", "", version=99))
    msg = p.decode(frames)
    assert isinstance(msg, p.Hello) and msg.version == 99


def test_other_version_payload_is_refused() -> None:
    head = msgpack.packb([99, 4, 1, None, None, None])
    with pytest.raises(RemoteProtocolError, match="version"):
        p.decode([head, b"body"])


def test_refuse_is_readable_across_versions() -> None:
    head = msgpack.packb([99, 3, 0, None, "go away"])
    assert p.decode([head]) == p.Refuse("go away")


@pytest.mark.parametrize(
    "frames,why",
    [
        ([], "empty"),
        ([b"\xc1"], "msgpack"),
        ([b""], "msgpack"),
        ([msgpack.packb({"a": 1})], "6-item"),
        ([msgpack.packb([V, 2, 3])], "6-item"),
        ([msgpack.packb([V, 4, 1, None, None])], "6-item"),
        ([msgpack.packb([V, 4, 1, None, None, "str"])], "inline body"),
        ([msgpack.packb([V, "4", 1, None, None, None])], "types"),
        ([msgpack.packb([V, 4, 1, None, None, None])], "body"),
        ([msgpack.packb([V, 4, 1, "notalist", None, None]), b""], "descriptors"),
        ([msgpack.packb([V, 5, 1, None, "yes", None]), b""], "ok flag"),
        ([msgpack.packb([V, 99, 1, None, None, None])], "unknown"),
        ([msgpack.packb([V, 1, 0, None, [1, 2]])], "hello"),
        ([msgpack.packb([V, 1, 0, None, ["x", "h", "task", b"t", ""]])], "hello"),
        ([msgpack.packb([V, 11, 0, None, "stdin", None]), b""], "output"),
        ([b"x" * (p.MAX_HEADER_BYTES + 1)], "too large"),
        ([msgpack.packb([V, 10, 0, None, None, None])] * (p.MAX_BUFFERS + 3), "too many"),
        ([12345], "bytes-like"),
    ],
)
def test_malformed_frames_raise_remote_protocol_error(frames: list[object], why: str) -> None:
    with pytest.raises(RemoteProtocolError, match=why):
        p.decode(frames)  # type: ignore[arg-type]


def test_fuzz_random_bytes_never_crash() -> None:
    rng = random.Random(0)
    valid = [f for m in MESSAGES for f in p.encode(m)[:1]]
    for _ in range(5000):
        if rng.random() < 0.5:
            head = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 40)))
        else:  # mutate a valid header
            b = bytearray(rng.choice(valid))
            for _ in range(rng.randrange(1, 4)):
                if b:
                    b[rng.randrange(len(b))] = rng.getrandbits(8)
            head = bytes(b)
        frames = [head] + [b"x"] * rng.randrange(0, 3)
        try:
            p.decode(frames)
        except RemoteProtocolError:
            pass


def test_encoding_garbage_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        p.encode("not a message")  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        p.encode(p.Task(1, b"", [object()]))
