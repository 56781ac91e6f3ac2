"""A status people can read: str() is a compact table, _repr_html_() an HTML table."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

import asyncmirai as am

pytestmark = pytest.mark.timeout(60)


def started_then_wait(started: str, gate: str) -> int:
    open(started, "w").close()
    deadline = time.monotonic() + 30
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.005)
    return os.getpid()


def test_str_and_html(tmp_path: Path) -> None:
    with am.daemons(2, memory="1MB", compute="show"):
        started, gate = str(tmp_path / "s"), str(tmp_path / "g")
        m = am.mirai(started_then_wait, started, gate, _compute="show")
        deadline = time.monotonic() + 30
        while not os.path.exists(started) or am.status("show").connections < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        st = am.status("show")
        text = str(st)
        lines = text.splitlines()
        assert lines[0].startswith("compute profile 'show'") and st.url in lines[0]
        assert "connections 2" in lines[1] and "executing 1" in lines[1]
        assert "memory budget: 0 B of 1.0 MB queued" in lines[2]
        table = lines[4:]
        assert table[0].split() == ["pid", "host", "state", "done", "running", "uptime"]
        rows = {r.split()[0]: r.split() for r in table[1:]}
        assert set(rows) == {str(d.pid) for d in st.daemons}
        busy = [r for r in rows.values() if r[2] == "busy"]
        assert len(busy) == 1 and busy[0][4] == str(m.id)
        html = st._repr_html_()
        assert html.count("<tr>") == 3 and f"<td>{m.id}</td>" in html
        assert "&#x27;show&#x27;" in html  # escaped
        open(gate, "w").close()
        m.result(30)
        assert "(no daemon connected)" not in str(am.status("show"))
    with am.daemons(url="tcp://127.0.0.1:0", compute="empty"):
        assert "(no daemon connected)" in str(am.status("empty"))
        assert "unbounded" in str(am.status("empty"))
