"""Functions and classes the torch end-to-end tests send to daemons by reference.

Everything here lives in an importable module (tests/ is on the daemons' sys.path), so
cloudpickle pickles it by name and a daemon imports this module; ``COUNTS`` is then a
per-process counter of codec calls: the host's and each daemon's are separate.
"""

from __future__ import annotations

import os
import pickle
import sys
from typing import Any

COUNTS: dict[str, int] = {}


def _bump(key: str) -> None:
    COUNTS[key] = COUNTS.get(key, 0) + 1


def reset_counts() -> dict[str, int]:
    COUNTS.clear()
    return {}


def counts() -> dict[str, Any]:
    """This process's codec call counts, and its pid."""
    return {**COUNTS, "pid": os.getpid()}


def identity(x: Any) -> Any:
    return x


def getpid() -> int:
    return os.getpid()


def is_same(a: Any, b: Any) -> bool:
    return a is b


def modules_loaded() -> dict[str, bool]:
    return {m: m in sys.modules for m in ("torch", "numpy")}


def peak_rss_kib() -> int:
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return -1


# -- objects of a user class, encoded by custom codecs ------------------------------------
class Box:
    """A user object with a custom codec: its value travels as the codec's bytes."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Box) and other.value == self.value

    def __hash__(self) -> int:
        return hash(self.value)

    def __repr__(self) -> str:
        return f"Box({self.value})"

    def __reduce__(self) -> Any:
        # Pickling a Box outside a codec would go unnoticed; make it fail loudly so a
        # test passes only when the codec carried it.
        raise pickle.PicklingError("Box must travel through its serial_config codec")


def box_sfunc(box: Box) -> bytes:
    _bump("sfunc")
    return box.value.to_bytes(8, "little", signed=True)


def box_ufunc(data: memoryview) -> Box:
    _bump("ufunc")
    return Box(int.from_bytes(data, "little", signed=True))


def box_sfunc_vec(boxes: list[Box]) -> bytes:
    _bump("sfunc_vec")
    COUNTS["sfunc_vec_objects"] = COUNTS.get("sfunc_vec_objects", 0) + len(boxes)
    return b"".join(b.value.to_bytes(8, "little", signed=True) for b in boxes)


def box_ufunc_vec(data: memoryview) -> list[Box]:
    _bump("ufunc_vec")
    raw = bytes(data)
    return [
        Box(int.from_bytes(raw[i : i + 8], "little", signed=True)) for i in range(0, len(raw), 8)
    ]


def double_boxes(boxes: list[Box]) -> list[Box]:
    """Daemon side: new Box objects (so the result is encoded again)."""
    assert all(type(b) is Box for b in boxes), boxes
    return [Box(b.value * 2) for b in boxes]


class Other:
    """A second class with its own codec, to check that two configs coexist."""

    def __init__(self, tag: str) -> None:
        self.tag = tag

    def __reduce__(self) -> Any:
        raise pickle.PicklingError("Other must travel through its serial_config codec")


def other_sfunc(obj: Other) -> bytes:
    _bump("other_sfunc")
    return obj.tag.encode()


def other_ufunc(data: memoryview) -> Other:
    _bump("other_ufunc")
    return Other(bytes(data).decode())


def roundtrip_both(box: Box, other: Other) -> tuple[Box, Other, dict[str, Any]]:
    return Box(box.value + 1), Other(other.tag + "!"), counts()


# -- codec failures --------------------------------------------------------------------
class Fragile:
    """Its codec fails to encode when ``bad`` is set, and fails to decode b"bad"."""

    def __init__(self, bad: bool = False, payload: bytes = b"ok") -> None:
        self.bad = bad
        self.payload = payload


def fragile_sfunc(obj: Fragile) -> bytes:
    if obj.bad:
        raise ValueError("fragile object refuses to serialize")
    return obj.payload


def fragile_ufunc(data: memoryview) -> Fragile:
    if bytes(data) == b"bad":
        raise ValueError("fragile object refuses to deserialize")
    return Fragile(payload=bytes(data))


def make_fragile(bad: bool, payload: bytes = b"ok") -> Fragile:
    return Fragile(bad=bad, payload=payload)


def fragile_payload(obj: Fragile) -> bytes:
    return obj.payload


# -- torch models and optimizers ---------------------------------------------------------
def _nn() -> Any:
    import torch

    return torch


def make_model(seed: int = 0) -> Any:
    torch = _nn()
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 6 * 6, 10),
    )


def model_and_output(seed: int, x: Any) -> tuple[Any, Any]:
    model = make_model(seed).eval()
    return model, model(x).detach()


def tied_model() -> Any:
    torch = _nn()
    torch.manual_seed(1)
    enc = torch.nn.Embedding(16, 8)
    dec = torch.nn.Linear(8, 16, bias=False)
    dec.weight = enc.weight  # tied weights: one Parameter, two owners
    return torch.nn.ModuleDict({"enc": enc, "dec": dec})


def tied_structure() -> dict[str, Any]:
    torch = _nn()
    t = torch.arange(12.0).reshape(3, 4)
    return {"a": t, "b": [t, {"c": t}], "other": t.clone()}


def model_and_optimizer(model: Any) -> tuple[Any, Any]:
    """Build an RMSprop optimizer over the model's parameters and take one step."""
    torch = _nn()
    opt = torch.optim.RMSprop(model.parameters(), lr=0.01)
    model.train()
    torch.manual_seed(3)
    loss = model(torch.randn(2, 1, 8, 8)).square().mean()
    loss.backward()
    opt.step()
    return model, opt


def optimizer_from_params(params: list[Any]) -> Any:
    torch = _nn()
    return torch.optim.RMSprop(params)


def grad_info(t: Any) -> dict[str, Any]:
    torch = _nn()
    return {
        "cls": type(t).__name__,
        "requires_grad": t.requires_grad,
        "is_leaf": t.is_leaf,
        "is_param": isinstance(t, torch.nn.Parameter),
    }


def describe(obj: Any) -> Any:
    """What a daemon received: type, dtype, shape, stride, for every tensor/array."""
    torch = _nn()
    if isinstance(obj, torch.Tensor):
        return ("tensor", str(obj.dtype), tuple(obj.shape), obj.stride())
    return type(obj).__name__


def write_into(t: Any) -> Any:
    """Modify a received tensor in place on the daemon (it must be writable)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t.add_(1)
    return t


def make_tensor(nbytes: int) -> Any:
    torch = _nn()
    return torch.ones(nbytes // 4, dtype=torch.float32)
