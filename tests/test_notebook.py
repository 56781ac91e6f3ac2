"""Execute examples/notebook.ipynb in a real Jupyter kernel (nbclient + ipykernel).

The kernel is started from a private kernelspec that points at this interpreter
(``sys.executable``), so it runs in the same environment as the tests whatever
kernelspecs are installed on the machine.
"""

from __future__ import annotations

import ast
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import pid_alive

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("torch")

pytestmark = pytest.mark.timeout(180)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NOTEBOOK = EXAMPLES / "notebook.ipynb"


def make_kernel_manager(tmp_path: Path) -> Any:
    """A KernelManager for a kernelspec named ``python3`` that runs ``sys.executable``."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    kernels = tmp_path / "kernels"
    spec_dir = kernels / "python3"
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (asyncmirai tests)",
        "language": "python",
        "env": {"PYTHONUNBUFFERED": "1"},
        "metadata": {"debugger": False},
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    ksm = KernelSpecManager(kernel_dirs=[str(kernels)], ensure_native_kernel=False)
    return KernelManager(kernel_name="python3", kernel_spec_manager=ksm)


def cell_with(nb: Any, snippet: str) -> Any:
    found = [c for c in nb.cells if c.cell_type == "code" and snippet in c.source]
    assert len(found) == 1, f"{len(found)} code cells contain {snippet!r}"
    return found[0]


def cell_exactly(nb: Any, source: str) -> Any:
    found = [c for c in nb.cells if c.cell_type == "code" and c.source.strip() == source]
    assert len(found) == 1, f"{len(found)} code cells are {source!r}"
    return found[0]


def text_of(cell: Any, stream: str | None = None) -> str:
    """The cell's printed text (``stream`` = "stdout"/"stderr") or its result's repr."""
    parts = []
    for out in cell.outputs:
        if out.output_type == "stream" and (stream is None or out.name == stream):
            parts.append(out.text)
        elif stream is None and out.output_type in ("execute_result", "display_data"):
            parts.append(out.data.get("text/plain", ""))
    return "".join(parts)


def result_of(cell: Any) -> str:
    results = [o for o in cell.outputs if o.output_type == "execute_result"]
    assert len(results) == 1, cell.outputs
    text: str = results[0].data["text/plain"]
    return text


def test_notebook_runs(tmp_path: Path) -> None:
    nb = nbformat.read(str(NOTEBOOK), as_version=4)
    km = make_kernel_manager(tmp_path)
    client = nbclient.NotebookClient(
        nb,
        km=km,
        timeout=120,  # per cell
        startup_timeout=60,
        allow_errors=False,
        resources={"metadata": {"path": str(EXAMPLES)}},
    )
    client.execute()  # raises CellExecutionError on the first error output

    errors = [
        (c.source, o)
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if o.output_type == "error"
    ]
    assert not errors
    for c in nb.cells:
        if c.cell_type == "code":
            assert c.execution_count is not None, c.source

    # daemons started from inside the kernel's running loop
    assert result_of(cell_with(nb, "am.daemons(2)")).startswith("Daemons(")
    assert result_of(cell_with(nb, "lambda x, y: x + y")) == "3"
    assert "value 40 ran on a daemon: True" in text_of(cell_with(nb, "def where"), "stdout")
    assert result_of(cell_with(nb, "math.hypot")) == "5.0"

    status_out = text_of(cell_with(nb, "daemon_pids = sorted"), "stdout")
    assert "connections 2" in status_out
    m = re.search(r"daemon pids \[([\d, ]+)\]", status_out)
    assert m, status_out
    daemon_pids = [int(p) for p in m.group(1).split(",")]
    assert len(daemon_pids) == 2

    # the readable status: print() gives a text table, the cell's result an HTML table,
    # each with one row per daemon, starting with its pid
    table = text_of(cell_exactly(nb, "print(am.status())"), "stdout").splitlines()
    assert any("connections 2" in line for line in table), table
    header = [i for i, line in enumerate(table) if line.split()[:1] == ["pid"]]
    assert len(header) == 1, table
    rows = [line.split()[0] for line in table[header[0] + 1 :] if line.strip()]
    assert sorted(map(int, rows)) == daemon_pids, table
    status_cell = cell_exactly(nb, "am.status()")
    [shown] = [o for o in status_cell.outputs if o.output_type == "execute_result"]
    html = shown.data["text/html"]
    assert "<table>" in html and "</table>" in html, html
    assert re.search(r"<th>\s*pid\s*</th>", html), html
    html_pids = re.findall(r"<tr>\s*<td>\s*(\d+)\s*</td>", html)
    assert sorted(map(int, html_pids)) == daemon_pids, html

    map_cell = cell_with(nb, "_progress=True")
    assert ast.literal_eval(result_of(map_cell)) == [x * x for x in range(20)]

    assert result_of(cell_with(nb, "_chunksize=2")) == "['a=1', 'b=2']"
    assert "caught ValueError - invalid literal" in text_of(cell_with(nb, "MiraiError"), "stdout")

    # the torch model built on a daemon and sent back
    model_repr = result_of(cell_with(nb, "class Model"))
    assert model_repr.startswith("Model(")
    assert "(conv1): Conv2d(1, 20, kernel_size=(5, 5)" in model_repr
    assert "(conv2): Conv2d(20, 20, kernel_size=(5, 5)" in model_repr
    params_out = text_of(cell_with(nb, "n_params ="), "stdout")
    assert "parameters 10540" in params_out  # 20*1*25+20 + 20*20*25+20
    assert "conv1.weight (20, 1, 5, 5) True" in params_out
    train_out = text_of(cell_with(nb, "def train_step"), "stdout")
    assert "output (4, 20, 20, 20) loss True weights changed True" in train_out

    # reset at the end: daemons(0) returns 0, the profile is gone, the daemons exited
    assert result_of(cell_with(nb, "am.daemons(0)")) == "0"
    assert result_of(cell_with(nb, "am.daemons_set()")) == "False"
    deadline = time.monotonic() + 10
    while any(pid_alive(p) for p in daemon_pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in daemon_pids if pid_alive(p)], "daemons outlived am.daemons(0)"

    # the progress bar (tqdm's text bar: ipywidgets not required) is shown in the cell that
    # ran the map, up to its end, although the dispatcher's callbacks drive it
    bar = text_of(map_cell, "stderr")
    assert "mirai_map" in bar, bar
    assert "Warning" not in bar, bar
    assert "20/20" in bar, f"the progress bar's updates did not reach the cell: {bar!r}"
