"""The examples run as scripts, and print what their READMEs show."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(150)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_example(name: str) -> str:
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", name)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert out.returncode == 0, f"{name} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout


def test_quickstart() -> None:
    lines = run_example("quickstart.py").splitlines()
    assert "lambda: 15" in lines
    assert "code string: 5.0" in lines
    assert "map: [0, 1, 4, 9, 16, 25, 36, 49]" in lines
    assert any(line.startswith("error: ValueError - invalid literal for int()") for line in lines)
    assert "timed out; daemons still up: 2" in lines
    assert "daemons: 2 host pid: True" in lines
    assert lines[-1] == "reset: daemons set = False"


def test_torch_model() -> None:
    pytest.importorskip("torch")
    out = run_example("torch_model.py")
    lines = out.splitlines()
    assert lines[:2] == [">>> am.daemons(1, serial=cfg)", "1"]
    assert "  (conv1): Conv2d(1, 20, kernel_size=(5, 5), stride=(1, 1))" in lines
    assert "  (conv2): Conv2d(1, 20, kernel_size=(5, 5), stride=(1, 1))" in lines
    assert "An nn.Module containing 1,040 parameters." in lines
    assert "  conv1: Conv2d #520 parameters" in lines
    assert "  conv2: Conv2d #520 parameters" in lines
    # conv1.weight: seeded on the daemon, so the values are fixed
    assert "tensor([[[[ 0.1529,  0.1660, -0.0469,  0.1837, -0.0438]," in lines
    assert "[ torch.FloatTensor{20,1,5,5} ][ requires_grad = True ]" in lines
    assert "type: Parameter, is_leaf: True" in lines
    assert "RMSprop (" in lines and "    lr: 0.01" in lines and "    alpha: 0.99" in lines
    assert "param shapes: [(20, 1, 5, 5), (20,), (20, 1, 5, 5), (20,)]" in lines
    assert "backward through conv1 on the host: grad shape (20, 1, 5, 5)" in lines
    assert lines[-2:] == [">>> am.daemons(0)", "0"]


def test_sklearn_grid() -> None:
    pytest.importorskip("sklearn")
    lines = run_example("sklearn_grid.py").splitlines()
    assert lines[0].startswith("best params: {") and "'kernel'" in lines[0]
    assert lines[1].startswith("best score: 0.9")
    assert "same as sequential: True" in lines
    assert "fits run as daemon tasks: True" in lines
