"""The same-host transport: framing, big frames through sealed memfds mapped privately."""

from __future__ import annotations

import array
import ctypes
import fcntl
import gc
import mmap
import os
import signal
import socket
import struct
import sys
import time
from typing import Any

import pytest

import asyncmirai as am
from asyncmirai import _transport as T
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


# -- passing a received segment on, and what may never happen to one -------------------------
def _recv_big(n: int = 4 * SHM_FRAME) -> tuple[BlockingChannel, BlockingChannel, bytes, Any]:
    tx, rx = pair()
    src = os.urandom(n)
    tx.send([b"h", bytearray(src)])
    _, got = rx.recv()
    return tx, rx, src, got


def _inode(fd: int) -> int:
    return os.fstat(fd).st_ino


def _kept_fd(frame: Any) -> int:
    addr = ctypes.addressof(ctypes.c_char.from_buffer(frame))
    return T._segments[addr][0]


def test_unwritten_segment_is_passed_on_and_a_written_one_copied() -> None:
    tx, rx, src, got = _recv_big()
    if not T._pagemap_ok:
        pytest.skip("/proc/self/pagemap cannot tell written pages here")
    ino = _inode(_kept_fd(got))
    rx.send([b"h", got])  # unwritten: the same sealed memfd goes back
    _, back = tx.recv()
    assert _inode(_kept_fd(back)) == ino and bytes(back) == src
    rx.send([b"h", memoryview(got)[: SHM_FRAME + 1]])  # a prefix too
    _, head = tx.recv()
    assert _inode(_kept_fd(head)) == ino and bytes(head) == src[: SHM_FRAME + 1]
    n = len(src)
    for pos in (0, n // 2 + 123, n - 1):  # one byte written anywhere: a copy, with it
        _, _, src2, got2 = _recv_big(n)
        got2[pos] = (got2[pos] + 1) % 256
        rx.send([b"h", got2])
        _, back2 = tx.recv()
        assert _inode(_kept_fd(back2)) != _inode(_kept_fd(got2))
        assert bytes(back2) == bytes(got2) != src2
    # both ends map the one memfd privately: a write on either side stays there
    back[0] = (src[0] + 1) % 256
    assert got[0] == src[0] and back[0] != src[0]
    got[1] = (src[1] + 1) % 256
    assert back[1] == src[1]
    del got, back, head, back2, got2
    gc.collect()
    assert not T._segments, "a kept memfd outlived its mapping"


def test_a_sealed_segment_cannot_be_written_through_any_fd() -> None:
    tx, rx, src, got = _recv_big()
    fd = T._to_memfd(bytearray(src))  # what the sender makes, and the receiver gets
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        assert seals & T._SEALS == T._SEALS and seals & fcntl.F_SEAL_SEAL
        for attempt in (
            lambda: os.write(fd, b"x"),
            lambda: os.pwrite(fd, b"x", 0),
            lambda: os.ftruncate(fd, 0),
            lambda: os.ftruncate(fd, 2 * len(src)),
            lambda: mmap.mmap(fd, len(src), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE),
            lambda: fcntl.fcntl(fd, fcntl.F_ADD_SEALS, 0),  # F_SEAL_SEAL: no change either
        ):
            with pytest.raises(PermissionError):
                attempt()
        # nor through a new open file description of the same memfd
        wfd = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
        try:
            with pytest.raises(PermissionError):
                os.write(wfd, b"x")
        finally:
            os.close(wfd)
        assert os.pread(fd, len(src), 0) == src
    finally:
        os.close(fd)
    if T._pagemap_ok:  # the fd a received segment keeps is sealed just the same
        with pytest.raises(PermissionError):
            os.write(_kept_fd(got), b"x")


# -- through a real daemon ---------------------------------------------------------------------
def _fds() -> tuple[int, int]:
    """(open fds, of which memfds) of this process, once the segment closer is idle."""
    assert T.drain_closes(30)
    n = memfds = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # the listing's own fd
        n += 1
        memfds += target.startswith("/memfd:")
    return n, memfds


def test_tensor_through_a_daemon_is_writable_and_private() -> None:
    torch = pytest.importorskip("torch")
    import torch_helpers as th

    n = 1 << 20  # 4 MiB of int32: a memfd each way
    am.daemons(1)
    try:
        x = torch.arange(n, dtype=torch.int32)
        y = am.mirai(th.identity, x).result(60)
        x.add_(1)  # the sender's later writes never reach what it sent
        assert torch.equal(y, torch.arange(n, dtype=torch.int32))
        y[0] = -1  # the received tensor is writable
        assert y[0].item() == -1 and x[0].item() == 1
        # the daemon keeps what it received and returns it (passed back unchanged)
        z = am.mirai(lambda t: (setattr(__import__("sys"), "_am_kept", t), t)[1], x).result(60)
        z.fill_(7)  # ours only ...
        total = am.mirai(lambda: int(__import__("sys")._am_kept.sum())).result(60)
        assert total == int(x.sum())
        am.mirai(lambda: __import__("sys")._am_kept.fill_(3) is None).result(60)
        assert bool((z == 7).all()) and x[0].item() == 1  # ... and theirs only
        back = am.mirai(lambda: __import__("sys")._am_kept).result(60)
        assert bool((back == 3).all())
        # a task that writes in place returns what it wrote
        w = am.mirai(th.write_into, x).result(60)
        assert torch.equal(w, x + 1)
        am.mirai(lambda: delattr(__import__("sys"), "_am_kept")).result(60)
    finally:
        am.daemons(0)


def test_array_from_a_daemon_is_writable_and_private() -> None:
    np = pytest.importorskip("numpy")
    n = 1 << 20

    am.daemons(1)
    try:
        # the daemon makes an array, keeps it and sends it; then writes into it
        a = am.mirai(
            lambda n: [setattr(sys, "_am_kept", np.arange(n, dtype="int32")), sys._am_kept][1],
            n,
        ).result(60)
        assert a.flags.writeable and int(a[5]) == 5
        am.mirai(lambda: __import__("sys")._am_kept.fill(9) is None).result(60)
        assert np.array_equal(a, np.arange(n, dtype="int32"))  # the sender's write: not here
        a[:] = -2
        kept = am.mirai(lambda: int(__import__("sys")._am_kept.sum())).result(60)
        assert kept == 9 * n  # ours: not there
        b = am.mirai(lambda x: x, a).result(60)  # written here: copied there and back
        b[0] = 11
        assert int(a[0]) == -2 and np.array_equal(b[1:], a[1:])
        # unwritten, an array goes back as the memfd it came in; writes stay where made
        c = am.mirai(lambda n: np.full(n, 5, dtype="int32"), n).result(60)
        d = am.mirai(lambda x: [x.__setitem__(0, 6), x][1], c).result(60)
        assert int(d[0]) == 6 and int(c[0]) == 5 and int(d[1:].sum()) == 5 * (n - 1)
        e = am.mirai(lambda x: x, c).result(60)
        c[:] = 0
        assert int(e.sum()) == 5 * n and int(d[0]) == 6
        am.mirai(lambda: delattr(__import__("sys"), "_am_kept")).result(60)
    finally:
        am.daemons(0)


@pytest.mark.timeout(120)
def test_fds_return_to_baseline_after_many_round_trips() -> None:
    """1,000 round trips of 64 MiB: every 10th sends a fresh tensor (copied into a new
    memfd each way), the others send back the last result, which travels as the memfd
    it came in (kept fds, dups).  All 1,000 copying would take ~70 s on a busy 2-vCPU VM:
    set AM_TRANSPORT_FRESH_EVERY=1 for that."""
    torch = pytest.importorskip("torch")
    import torch_helpers as th

    rounds = int(os.environ.get("AM_TRANSPORT_ROUNDS", "1000"))
    fresh_every = int(os.environ.get("AM_TRANSPORT_FRESH_EVERY", "10"))
    x = torch.ones(16 << 20)  # 64 MiB
    am.daemons(1)
    try:
        assert torch.equal(am.mirai(th.identity, x).result(60), x)
        gc.collect()
        base = _fds()
        daemon_base = am.mirai(_fds).result(60)
        y = x
        for i in range(rounds):
            y = am.mirai(th.identity, x if i % fresh_every == 0 else y).result(60)
            if i % 100 == 0:
                assert torch.equal(y, x)
        del y
        gc.collect()
        assert _fds() == base
        assert am.mirai(_fds).result(60) == daemon_base
    finally:
        am.daemons(0)


def test_no_leak_when_the_daemon_dies_mid_transfer(tmp_path: Any) -> None:
    torch = pytest.importorskip("torch")
    import torch_helpers as th

    x = torch.ones(64 << 20)  # 256 MiB
    am.daemons(1)
    am.mirai(th.identity, torch.ones(SHM_FRAME)).result(60)
    am.daemons(0)
    gc.collect()
    base = _fds()
    am.daemons(1)
    try:
        pid = am.mirai(os.getpid).result(60)
        flag = tmp_path / "started"
        m = am.mirai(lambda t, f: [open(f, "w").close(), time.sleep(120), t][2], x, str(flag))
        queued = [am.mirai(th.identity, x) for _ in range(2)]  # sent or waiting behind it
        deadline = time.monotonic() + 60
        while not flag.exists():  # the daemon has the big argument and runs the task
            assert time.monotonic() < deadline and not m.done(), m.exception(0)
            time.sleep(0.01)
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(am.DaemonError):
            m.result(60)
        for q in queued:  # rerun on the replacement daemon
            assert torch.equal(q.result(60), x)
        del queued, q
    finally:
        am.daemons(0)
    gc.collect()
    assert _fds() == base


# -- polling before blocking (BlockingChannel.spin) -----------------------------------------
class _Clock:
    """A fake ``time.perf_counter`` that moves ``step`` seconds per reading."""

    def __init__(self, step: float) -> None:
        self.t = 0.0
        self.step = step

    def __call__(self) -> float:
        self.t += self.step
        return self.t


def test_spin_polls_while_messages_come_soon_and_stops_after_a_long_gap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, b = socket.socketpair()
    rx = BlockingChannel(b)
    tx = BlockingChannel(a)
    rx.spin = 0.001
    polls: list[bool] = []
    real_poll_briefly = T.poll_briefly

    def poll_briefly(poller: Any, seconds: float) -> Any:
        """The polling: what the test decides; nothing found uses up the window."""
        polls.append(True)
        if readable[0]:
            return real_poll_briefly(poller, 0.0)
        clock.t += seconds
        return []

    readable = [False]
    monkeypatch.setattr(T, "poll_briefly", poll_briefly)
    clock = _Clock(step=0.0004)
    monkeypatch.setattr(T.time, "perf_counter", clock)

    # 1. nothing comes while polling: it gives up, blocks, and stops polling after
    tx.send([b"late"])
    assert rx.recv() == [b"late"]
    assert polls and not rx.spinning
    # 2. not polling now; this one comes within the spin (3 clock readings): polling is on
    polls.clear()
    clock.step = 0.0001
    tx.send([b"soon"])
    assert rx.recv() == [b"soon"] and not polls
    assert rx.spinning
    # 3. polling, and the message is there: no blocking read needed to find it
    readable[0] = True
    tx.send([b"next"])
    assert rx.recv() == [b"next"] and polls and rx.spinning
    a.close()
    b.close()


def spin_of_this_daemon() -> float:
    from asyncmirai import _daemon

    daemon = _daemon._CURRENT
    assert daemon is not None
    return float(getattr(daemon.task, "spin", 0.0))


def test_local_daemons_poll_one_task_at_a_time_only() -> None:
    with am.daemons(1):
        assert am.mirai(spin_of_this_daemon).result(30) == T.SPIN > 0
    with am.daemons(1, concurrency=2):  # its main thread must not hold the CPU/GIL
        assert am.mirai(spin_of_this_daemon).result(30) == 0.0
