"""Tests for asyncmirai._codecs: dumps/loads round trips, no sockets (except one
inproc zmq pair proving that received tensors wrap the frame memory)."""

from __future__ import annotations

import ctypes
import gc
import pathlib
import pickle
import subprocess
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import cloudpickle
import pytest

from asyncmirai._codecs import (
    DEFAULT_TABLE,
    INLINE_THRESHOLD,
    CodecError,
    CodecTable,
    SerialConfig,
    dumps,
    loads,
    serial_config,
)

# Any warning is a failure, unless a test says otherwise.
pytestmark = [pytest.mark.timeout(60), pytest.mark.filterwarnings("error")]

BIG = INLINE_THRESHOLD  # elements: big enough for any dtype to go out of band


@pytest.fixture
def torch() -> Any:
    return pytest.importorskip("torch")


@pytest.fixture
def np() -> Any:
    return pytest.importorskip("numpy")


def received(buffers: Sequence[Any]) -> list[memoryview]:
    """Buffers as a receiver holds them: writable memoryviews over fresh memory."""
    return [memoryview(bytearray(b)) for b in buffers]


def roundtrip(obj: Any, table: CodecTable = DEFAULT_TABLE) -> tuple[Any, list[Any], list[Any]]:
    body, descriptors, buffers = dumps(obj, table)
    return loads(body, descriptors, received(buffers), table), descriptors, buffers


def address(buf: Any) -> int:
    """Address of the first byte a (writable, non-empty) buffer exposes."""
    return ctypes.addressof(ctypes.c_char.from_buffer(memoryview(buf)))


def same_tensor(torch: Any, a: Any, b: Any) -> bool:
    """Same type, dtype, shape and bytes (works for dtypes torch.equal lacks)."""
    if type(a) is not type(b) or a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype == torch.complex32:
        return bool(torch.equal(a.to(torch.complex64), b.to(torch.complex64)))
    raw = [t.detach().contiguous().reshape(-1).view(torch.uint8) for t in (a, b)]
    return bool(torch.equal(raw[0], raw[1]))


# --------------------------------------------------------------------------------
# import hygiene, config validation


def test_import_does_not_import_torch_or_numpy() -> None:
    code = (
        "import sys; import asyncmirai._codecs as c; "
        "assert 'torch' not in sys.modules and 'numpy' not in sys.modules, "
        "[m for m in ('torch', 'numpy') if m in sys.modules]; "
        "b, d, bufs = c.dumps((len, (1,), {}), c.DEFAULT_TABLE); "
        "assert c.loads(b, d, bufs, c.DEFAULT_TABLE)[0] is len and d == []; "
        "assert 'torch' not in sys.modules and 'numpy' not in sys.modules"
    )
    root = pathlib.Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, timeout=50, cwd=root)


def test_serial_config_validates() -> None:
    cfg = serial_config(int, bytes, int)
    assert cfg == SerialConfig(int, bytes, int, False)
    assert serial_config("pkg.mod.Cls", bytes, int, vec=True).vec
    with pytest.raises(TypeError, match="cls must be a class"):
        serial_config(3, bytes, int)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="cls must be a class"):
        serial_config("NoDot", bytes, int)
    with pytest.raises(TypeError, match="sfunc must be callable"):
        serial_config(int, 1, int)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="ufunc must be callable"):
        serial_config(int, bytes, None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="vec must be a bool"):
        serial_config(int, bytes, int, vec=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="SerialConfig"):
        CodecTable([(int, bytes, int)])  # type: ignore[list-item]


def test_table_is_picklable_and_extend_orders_configs() -> None:
    first = serial_config(Point, lambda p: b"1", lambda b: Point(1, 1))
    second = serial_config(Point, lambda p: b"2", lambda b: Point(2, 2))
    table = CodecTable([first])
    assert table.configs == (first,)
    later = table.extend([second])
    assert later.configs == (first, second)
    assert roundtrip(Point(0, 0), later)[0] == Point(2, 2)
    assert roundtrip(Point(0, 0), table)[0] == Point(1, 1)
    shipped = cloudpickle.loads(cloudpickle.dumps(later))
    assert isinstance(shipped, CodecTable)
    assert roundtrip(Point(0, 0), shipped)[0] == Point(2, 2)


# --------------------------------------------------------------------------------
# plain objects and pickle-5 buffers


def test_plain_objects_need_no_descriptors() -> None:
    def closure(x: int) -> int:
        return x + offset

    offset = 5
    obj, descriptors, buffers = roundtrip((closure, (1,), {"k": [1.5, "s", None]}))
    assert descriptors == [] and buffers == []
    assert obj[0](1) == 6 and obj[2] == {"k": [1.5, "s", None]}
    lam, _, _ = roundtrip(lambda: 42)
    assert lam() == 42


def test_pickle_buffers_go_out_of_band_when_large() -> None:
    big = bytearray(b"x" * INLINE_THRESHOLD)
    small = bytearray(b"y" * 100)
    obj, descriptors, buffers = roundtrip([pickle.PickleBuffer(big), pickle.PickleBuffer(small)])
    assert bytes(obj[0]) == big and bytes(obj[1]) == small
    assert [d["codec"] for d in descriptors] == ["pickle-buffer"]  # the small one is in-band
    assert len(buffers) == 1 and memoryview(buffers[0]).nbytes == len(big)
    assert address(buffers[0]) == address(big)  # zero copy on the send side


# --------------------------------------------------------------------------------
# torch tensors

TORCH_DTYPES = [
    "bool", "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64",
    "float16", "bfloat16", "float32", "float64", "complex32", "complex64", "complex128",
    "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu",
]  # fmt: skip


def make_tensor(torch: Any, dtype_name: str, shape: tuple[int, ...]) -> Any:
    dtype = getattr(torch, dtype_name, None)
    if dtype is None:
        pytest.skip(f"torch {torch.__version__} has no {dtype_name}")
    g = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point or dtype.is_complex:
        with warnings.catch_warnings():  # "ComplexHalf support is experimental"
            warnings.simplefilter("ignore")
            return torch.randn(
                shape, generator=g, dtype=torch.complex64 if dtype.is_complex else None
            ).to(dtype)
    return torch.randint(0, 100, shape, generator=g).to(dtype)


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize("dtype_name", TORCH_DTYPES)
@pytest.mark.parametrize("shape", [(), (3,), (0,), (2, 0, 4), (BIG,), (4, 5, 6)])
def test_torch_dtypes_and_shapes_roundtrip(
    torch: Any, dtype_name: str, shape: tuple[int, ...]
) -> None:
    t = make_tensor(torch, dtype_name, shape)
    out, descriptors, buffers = roundtrip(t)
    assert same_tensor(torch, out, t)
    if dtype_name in ("bool", "bfloat16", "complex64", "complex128", "float32", "int64"):
        assert torch.equal(out, t)
    (desc,) = descriptors
    assert desc["codec"] == "torch" and desc["dtype"] == dtype_name
    nbytes = t.numel() * t.element_size()
    assert len(buffers) == (1 if nbytes >= INLINE_THRESHOLD else 0)
    if out.numel():
        out.view(-1)[0] = out.view(-1)[-1]  # writable


def test_torch_send_side_is_zero_copy(torch: Any) -> None:
    t = torch.randn(BIG)
    _, descriptors, buffers = dumps([t, t.view(256, -1).T], DEFAULT_TABLE)
    assert len(buffers) == 2
    # Contiguous and dense-but-transposed tensors are both sent from their own memory.
    assert address(buffers[0]) == t.data_ptr() and address(buffers[1]) == t.data_ptr()
    assert memoryview(buffers[0]).nbytes == t.numel() * 4
    assert descriptors[1]["perm"] == [1, 0]
    # The buffer keeps the tensor's memory alive after the tensor is gone.
    expected = t.clone()
    del t
    gc.collect()
    garbage = torch.full((BIG,), 7.0)  # would likely reuse the memory if it were freed
    assert torch.equal(torch.frombuffer(received(buffers[:1])[0], dtype=torch.float32), expected)
    del garbage


def test_torch_views_are_sent_compactly(torch: Any) -> None:
    base = torch.arange(4 * BIG, dtype=torch.float32).reshape(4, BIG)
    cases = {
        "row": base[1],
        "stepped": base[:, ::4],
        "transposed": base.T,
        "expanded": torch.arange(BIG, dtype=torch.float32).expand(3, BIG),
        "channels_last": torch.randn(2, 8, 64, 64).to(memory_format=torch.channels_last),
        "permuted_slice": base.T[::2],
        "conj": torch.randn(BIG, dtype=torch.complex64).conj(),
        "neg_view": torch._neg_view(torch.randn(BIG, dtype=torch.complex64)),
    }
    for name, view in cases.items():
        out, descriptors, buffers = roundtrip(view)
        assert torch.equal(out, view), name
        assert memoryview(buffers[0]).nbytes == view.numel() * view.element_size(), name
        assert not out.is_conj() and not out.is_neg()
    out, _, _ = roundtrip(cases["transposed"])
    assert out.stride() == cases["transposed"].stride()
    out, _, _ = roundtrip(cases["channels_last"])
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_torch_requires_grad_and_parameters(torch: Any) -> None:
    leaf = torch.randn(3, requires_grad=True)
    nonleaf = leaf * 2
    frozen = torch.nn.Parameter(torch.randn(2, 2), requires_grad=False)
    param = torch.nn.Parameter(torch.randn(BIG))
    out, _, _ = roundtrip([leaf, nonleaf, frozen, param, torch.ones(2)])
    assert out[0].requires_grad and out[0].is_leaf and torch.equal(out[0], leaf)
    # A non-leaf arrives as a leaf holding its data, still requiring grad.
    assert out[1].requires_grad and out[1].is_leaf and out[1].grad_fn is None
    assert torch.equal(out[1], nonleaf)
    assert type(out[2]) is torch.nn.Parameter and not out[2].requires_grad
    assert type(out[3]) is torch.nn.Parameter and out[3].requires_grad
    assert torch.equal(out[3], param)
    assert not out[4].requires_grad
    (out[3] * 2).sum().backward()
    assert torch.equal(out[3].grad, torch.full((BIG,), 2.0))


def test_torch_identity_is_preserved(torch: Any) -> None:
    t = torch.randn(BIG)
    small = torch.randn(2)
    out, descriptors, buffers = roundtrip({"a": [t, small], "b": (t, small), "c": t})
    assert out["a"][0] is out["b"][0] is out["c"]
    assert out["a"][1] is out["b"][1]
    assert len(descriptors) == 2 and len(buffers) == 1


class TiedModel:  # built lazily: torch is optional
    @staticmethod
    def make(torch: Any) -> Any:
        enc = torch.nn.Embedding(10, 8)
        dec = torch.nn.Linear(8, 10, bias=False)
        dec.weight = enc.weight
        return torch.nn.ModuleDict({"enc": enc, "dec": dec})


def test_tied_weights_arrive_tied(torch: Any) -> None:
    model = TiedModel.make(torch)
    out, descriptors, _ = roundtrip(model)
    assert out["dec"].weight is out["enc"].weight
    assert sum(d["codec"] == "torch" for d in descriptors) == 1
    with torch.no_grad():
        out["enc"].weight[0, 0] = 123.0
    assert out["dec"].weight[0, 0] == 123.0


def test_nested_containers(torch: Any) -> None:
    data: Any = {"x": [torch.randn(2, 3), {"y": (torch.arange(5), [torch.zeros(BIG)])}], "n": 3}
    out, _, _ = roundtrip(data)
    assert torch.equal(out["x"][0], data["x"][0])
    assert torch.equal(out["x"][1]["y"][0], data["x"][1]["y"][0])
    assert torch.equal(out["x"][1]["y"][1][0], data["x"][1]["y"][1][0])
    assert out["n"] == 3


def make_vignette_model(torch: Any) -> Any:
    """The seed vignette's model: two 5x5 convolutions, in_size=1, out_size=20."""

    class Model(torch.nn.Module):  # type: ignore[misc]  # defined locally: travels by value
        def __init__(self, in_size: int, out_size: int) -> None:
            super().__init__()
            self.conv1 = torch.nn.Conv2d(in_size, out_size, 5)
            self.conv2 = torch.nn.Conv2d(out_size, out_size, 5)

        def forward(self, x: Any) -> Any:
            x = torch.nn.functional.relu(self.conv1(x))
            return torch.nn.functional.relu(self.conv2(x))

    return Model(in_size=1, out_size=20)


def test_module_and_optimizer(torch: Any) -> None:
    model = make_vignette_model(torch)
    opt = torch.optim.RMSprop(model.parameters(), lr=0.01)
    x = torch.randn(2, 1, 16, 16)
    model(x).sum().backward()
    opt.step()

    (model2, opt2, state2), descriptors, _ = roundtrip((model, opt, opt.state_dict()))
    assert sum(p.numel() for p in model2.parameters()) == 10540
    for (k, v), (k2, v2) in zip(
        model.state_dict().items(), model2.state_dict().items(), strict=True
    ):
        assert k == k2 and torch.equal(v, v2)
    assert torch.equal(model2(x), model(x))
    assert all(type(p) is torch.nn.Parameter and p.requires_grad for p in model2.parameters())
    # The optimizer refers to the very parameters of the model sent alongside it.
    params2 = list(model2.parameters())
    assert all(a is b for a, b in zip(opt2.param_groups[0]["params"], params2, strict=True))
    for p, p2 in zip(model.parameters(), params2, strict=True):
        assert torch.equal(opt.state[p]["square_avg"], opt2.state[p2]["square_avg"])
    assert state2["param_groups"] == opt.state_dict()["param_groups"]
    for i, s in opt.state_dict()["state"].items():
        assert torch.equal(s["square_avg"], state2["state"][i]["square_avg"])
    # It still trains.
    model2(x).sum().backward()
    opt2.step()
    assert all(d["codec"] == "torch" for d in descriptors)


def test_torch_fallbacks_use_torch_pickling(torch: Any) -> None:
    sparse = torch.eye(3).to_sparse()
    meta = torch.empty(3, 4, device="meta")
    tagged = torch.randn(3)
    tagged.tag = "hello"

    class MyTensor(torch.Tensor):  # type: ignore[misc]
        pass

    sub = torch.randn(3).as_subclass(MyTensor)
    with warnings.catch_warnings():  # quantized creation is deprecated in torch
        warnings.simplefilter("ignore")
        quant = torch.quantize_per_tensor(torch.randn(3), 0.1, 0, torch.qint8)
        out, descriptors, buffers = roundtrip([sparse, meta, tagged, sub, quant])
    # Only the dense indices and values inside the sparse tensor's own pickle.
    assert [d["shape"] for d in descriptors] == [[2, 3], [3]]
    assert out[0].is_sparse and torch.equal(out[0].to_dense(), torch.eye(3))
    assert out[1].is_meta and out[1].shape == (3, 4)
    assert out[2].tag == "hello" and torch.equal(out[2], tagged)
    assert type(out[3]) is MyTensor
    assert out[4].is_quantized and torch.equal(out[4].int_repr(), quant.int_repr())


def test_cuda_descriptor_without_cuda_warns_and_loads_on_cpu(torch: Any) -> None:
    if torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    body, descriptors, buffers = dumps([torch.randn(3), torch.randn(2)], DEFAULT_TABLE)
    for d in descriptors:
        d["device"] = "cuda:1"
    with pytest.warns(RuntimeWarning, match="cuda:1.*on the CPU") as record:
        out = loads(body, descriptors, received(buffers), DEFAULT_TABLE)
    assert len(record) == 1  # once per message, not per tensor
    assert out[0].device.type == "cpu"


@pytest.mark.skipif("not __import__('torch').cuda.is_available()")
def test_cuda_roundtrip(torch: Any) -> None:
    t = torch.randn(BIG, device="cuda", requires_grad=True)
    out, descriptors, _ = roundtrip(t)
    assert descriptors[0]["device"] == "cuda:0"
    assert out.device == t.device and out.requires_grad and torch.equal(out, t)


# --------------------------------------------------------------------------------
# numpy arrays

NUMPY_DTYPES = [
    "?", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", "g",
    "c8", "c16", "G", ">i4", ">f8", "M8[ns]", "m8[s]", "S5", "U3", "V4",
]  # fmt: skip


@pytest.mark.parametrize("dtype", NUMPY_DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0), (7,), (BIG,), (3, 4, 5)])
def test_numpy_dtypes_and_shapes_roundtrip(np: Any, dtype: str, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=int(np.prod(shape)) * np.dtype(dtype).itemsize, dtype=np.uint8)
    a = raw.view(dtype).reshape(shape) if raw.size else np.zeros(shape, dtype)
    out, descriptors, _ = roundtrip(a)
    assert type(out) is np.ndarray and out.dtype == a.dtype and out.shape == a.shape
    assert out.tobytes() == a.tobytes()
    assert descriptors[0]["codec"] == "numpy"
    assert out.flags.writeable


def test_numpy_layouts(np: Any) -> None:
    a = np.arange(4 * BIG, dtype=np.float64).reshape(4, BIG)
    cases = [np.asfortranarray(a), a.T, a[:, ::3], a[::-1], np.broadcast_to(a[0], (3, BIG)), a[2]]
    for view in cases:
        out, descriptors, buffers = roundtrip(view)
        assert np.array_equal(out, view) and out.flags.writeable
        assert memoryview(buffers[0]).nbytes == view.size * view.itemsize
    fortran, _, buffers = roundtrip(cases[0])
    assert fortran.flags.f_contiguous
    assert address(dumps(cases[0], DEFAULT_TABLE)[2][0]) == cases[0].ctypes.data  # no copy


def test_numpy_fallbacks(np: Any) -> None:
    objects = np.array([1, "a", None], dtype=object)
    structured = np.zeros(3, dtype=[("a", "i4"), ("b", "f8")])
    masked = np.ma.masked_array([1, 2, 3], mask=[0, 1, 0])
    scalar = np.float32(1.5)
    out, descriptors, _ = roundtrip([objects, structured, scalar, masked])
    assert descriptors == []  # object/structured arrays, scalars, subclasses: plain pickle
    assert list(out[0]) == [1, "a", None]
    assert out[1].dtype == structured.dtype
    assert out[2] == scalar and type(out[2]) is np.float32
    assert type(out[3]) is np.ma.MaskedArray and out[3].mask.tolist() == [False, True, False]


def test_numpy_identity(np: Any) -> None:
    a = np.zeros(BIG)
    out, descriptors, _ = roundtrip([a, a, {"x": a}])
    assert out[0] is out[1] is out[2]["x"] and len(descriptors) == 1


# --------------------------------------------------------------------------------
# user codecs


class Point:
    def __init__(self, x: int, y: int) -> None:
        self.x, self.y = x, y

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Point) and (self.x, self.y) == (other.x, other.y)

    def __hash__(self) -> int:
        return hash((self.x, self.y))


class Point3(Point):
    pass


def unused_ufunc(b: memoryview) -> Any:
    raise AssertionError("not called")


class Counted:
    """sfunc/ufunc pairs for Point that count their calls."""

    def __init__(self, tag: int = 0) -> None:
        self.tag = tag
        self.sfunc_calls = 0
        self.ufunc_calls = 0
        self.seen: list[Any] = []

    def sfunc(self, p: Point) -> bytes:
        self.sfunc_calls += 1
        return bytes([p.x, p.y, self.tag])

    def ufunc(self, b: memoryview) -> Point:
        self.ufunc_calls += 1
        assert not b.readonly
        return Point(b[0] + b[2], b[1])

    def sfunc_vec(self, ps: list[Point]) -> bytes:
        self.sfunc_calls += 1
        self.seen = list(ps)
        return bytes(v for p in ps for v in (p.x, p.y))

    def ufunc_vec(self, b: memoryview) -> list[Point]:
        self.ufunc_calls += 1
        return [Point(b[i], b[i + 1]) for i in range(0, len(b), 2)]


def test_custom_codec_per_object() -> None:
    c = Counted()
    table = CodecTable([serial_config(Point, c.sfunc, c.ufunc)])
    p = Point(1, 2)
    out, descriptors, _ = roundtrip([p, Point(3, 4), p], table)
    assert out == [Point(1, 2), Point(3, 4), Point(1, 2)] and out[0] is out[2]
    assert (c.sfunc_calls, c.ufunc_calls) == (2, 2)
    assert [d["codec"] for d in descriptors] == ["custom", "custom"]


def test_custom_codec_vectorized_calls_once() -> None:
    c = Counted()
    table = CodecTable([serial_config(Point, c.sfunc_vec, c.ufunc_vec, vec=True)])
    a, b, d = Point(1, 2), Point(3, 4), Point(5, 6)
    out, _, _ = roundtrip({"a": a, "list": [b, a, (d,)]}, table)
    assert (c.sfunc_calls, c.ufunc_calls) == (1, 1)
    assert c.seen == [a, b, d]  # each distinct object once
    assert out["a"] == a and out["list"][0] == b and out["list"][2][0] == d
    assert out["list"][1] is out["a"]


def test_custom_codec_large_buffer_goes_out_of_band() -> None:
    table = CodecTable([serial_config(Point, lambda p: b"z" * BIG, lambda b: Point(len(b), b[0]))])
    out, descriptors, buffers = roundtrip(Point(0, 0), table)
    assert out == Point(BIG, ord("z")) and len(buffers) == 1 and "buf" in descriptors[0]


def test_lookup_follows_the_mro() -> None:
    base = Counted(tag=10)
    table = CodecTable([serial_config(Point, base.sfunc, base.ufunc)])
    out, _, _ = roundtrip(Point3(1, 2), table)
    assert out == Point(11, 2) and base.ufunc_calls == 1  # the subclass used Point's codec
    own = Counted(tag=20)
    table = table.extend([serial_config(Point3, own.sfunc, own.ufunc)])
    out, _, _ = roundtrip([Point3(1, 2), Point(1, 2)], table)
    assert out == [Point(21, 2), Point(11, 2)]


def test_registration_by_name() -> None:
    c = Counted(tag=1)
    name = f"{Point.__module__}.{Point.__qualname__}"
    table = CodecTable([serial_config(name, c.sfunc, c.ufunc)])
    out, _, _ = roundtrip(Point3(4, 5), table)
    assert out == Point(5, 5) and c.sfunc_calls == 1
    # A later config for the same class, given by object, overrides the named one.
    c2 = Counted(tag=2)
    out, _, _ = roundtrip(Point(4, 5), table.extend([serial_config(Point, c2.sfunc, c2.ufunc)]))
    assert out == Point(6, 5)


def test_user_codec_overrides_torch_default(torch: Any) -> None:
    calls = []

    def sfunc(ts: list[Any]) -> bytes:
        calls.append("s")
        return pickle.dumps([t.tolist() for t in ts])

    def ufunc(b: memoryview) -> list[Any]:
        calls.append("u")
        return [torch.tensor(v) for v in pickle.loads(b)]

    table = CodecTable([serial_config(torch.Tensor, sfunc, ufunc, vec=True)])
    ts = [torch.arange(3), torch.ones(2), torch.nn.Parameter(torch.zeros(1))]
    out, descriptors, _ = roundtrip(ts, table)
    assert calls == ["s", "u"]
    assert all(torch.equal(a, b) for a, b in zip(out, ts, strict=True))
    assert all(d["codec"].startswith("custom") for d in descriptors)


def test_codec_errors_name_the_type() -> None:
    def boom(p: Point) -> bytes:
        raise RuntimeError("nope")

    def not_bytes(p: Point) -> Any:
        return 42

    def fails(ps: list[Point]) -> Any:
        return 1 / 0

    table = CodecTable([serial_config(Point, boom, unused_ufunc)])
    with pytest.raises(CodecError, match=r"type '.*Point3'.*nope") as info:
        dumps([Point3(1, 2)], table)
    assert isinstance(info.value.__cause__, RuntimeError)

    table = CodecTable([serial_config(Point, not_bytes, unused_ufunc)])
    with pytest.raises(CodecError, match=r"'.*Point'.*bytes-like"):
        dumps(Point(1, 2), table)

    table = CodecTable([serial_config(Point, fails, unused_ufunc, vec=True)])
    with pytest.raises(CodecError, match=r"'.*Point'.*vectorized") as info:
        dumps(Point(1, 2), table)
    assert isinstance(info.value.__cause__, ZeroDivisionError)


# --------------------------------------------------------------------------------
# malformed input


def _tensor_message(torch: Any) -> tuple[bytes, list[Any], list[Any]]:
    return dumps([torch.randn(BIG), torch.randn(3)], DEFAULT_TABLE)


MUTATIONS: dict[str, Callable[[list[Any]], None]] = {
    "buffer index": lambda d: d[0].update(buf=5),
    "negative buffer": lambda d: d[0].update(buf=-1),
    "dtype": lambda d: d[0].update(dtype="qint8"),
    "dtype type": lambda d: d[0].update(dtype=[1]),
    "shape": lambda d: d[0].update(shape=[BIG, 2]),
    "shape type": lambda d: d[0].update(shape="big"),
    "negative shape": lambda d: d[1].update(shape=[-3]),
    "perm": lambda d: d[0].update(perm=[0, 0]),
    "device": lambda d: d[0].update(device="tpu:0"),
    "requires_grad": lambda d: d[1].update(requires_grad="yes"),
    "subclass": lambda d: d[1].update(sub="Evil"),
    "no data": lambda d: d[1].pop("data"),
    "data type": lambda d: d[1].update(data=12),
    "codec": lambda d: d[0].update(codec="nope"),
    "not a dict": lambda d: d.__setitem__(0, [1, 2]),
    "missing descriptor": lambda d: d.pop(),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_malformed_torch_descriptors_raise_codec_error(torch: Any, mutation: str) -> None:
    body, descriptors, buffers = _tensor_message(torch)
    MUTATIONS[mutation](descriptors)
    with pytest.raises(CodecError):
        loads(body, descriptors, received(buffers), DEFAULT_TABLE)


def test_malformed_numpy_and_custom_descriptors(np: Any) -> None:
    body, descriptors, buffers = dumps(np.arange(10), DEFAULT_TABLE)
    bad_dtypes: list[Any] = ["O", "|O", "T", [("a", "i4")], "not a dtype"]
    for bad_dtype in bad_dtypes:
        d = [dict(descriptors[0], dtype=bad_dtype)]
        with pytest.raises(CodecError):
            loads(body, d, received(buffers), DEFAULT_TABLE)

    c = Counted()
    table = CodecTable([serial_config(Point, c.sfunc_vec, c.ufunc_vec, vec=True)])
    body, descriptors, buffers = dumps([Point(1, 2), Point(3, 4)], table)
    with pytest.raises(CodecError, match="no serial_config"):
        loads(body, descriptors, received(buffers), DEFAULT_TABLE)
    short = CodecTable([serial_config(Point, c.sfunc_vec, lambda b: [Point(0, 0)], vec=True)])
    with pytest.raises(CodecError, match="list of 2"):
        loads(body, descriptors, received(buffers), short)
    failing = CodecTable([serial_config(Point, c.sfunc_vec, lambda b: 1 / 0, vec=True)])
    with pytest.raises(CodecError, match="ufunc") as info:
        loads(body, descriptors, received(buffers), failing)
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    wrong_group = [dict(descriptors[0]), dict(descriptors[1], group=1), descriptors[2]]
    with pytest.raises(CodecError):
        loads(body, wrong_group, received(buffers), table)
    with pytest.raises(CodecError, match="must be a list"):
        loads(body, {"a": 1}, [], table)  # type: ignore[arg-type]


def test_readonly_buffers_are_copied_not_warned(torch: Any) -> None:
    body, descriptors, buffers = dumps(torch.randn(BIG), DEFAULT_TABLE)
    out = loads(body, descriptors, [memoryview(bytes(b)) for b in buffers], DEFAULT_TABLE)
    out += 1  # writable, and no "non-writable buffer" warning (warnings are errors here)


# --------------------------------------------------------------------------------
# real zmq frames: received tensors and arrays wrap the frame memory


def test_zmq_frames_zero_copy_and_writable(torch: Any, np: Any) -> None:
    zmq = pytest.importorskip("zmq")
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        a.bind("inproc://codecs")
        b.connect("inproc://codecs")
        t = torch.arange(BIG, dtype=torch.float32)
        arr = np.arange(BIG, dtype=np.int64).reshape(2, -1).T
        body, descriptors, buffers = dumps(
            {"t": t, "arr": arr, "p": torch.nn.Parameter(t.clone())}, DEFAULT_TABLE
        )
        assert len(buffers) == 3
        a.send_multipart([body, *buffers], copy=False)
        frames = b.recv_multipart(copy=False)
        views = [f.buffer for f in frames[1:]]
        assert all(not v.readonly for v in views)
        out = loads(frames[0].buffer, descriptors, views, DEFAULT_TABLE)
        del frames  # the tensors keep the frame memory alive on their own
        gc.collect()
        got_t, got_arr, got_p = out["t"], out["arr"], out["p"]
        assert torch.equal(got_t, t) and np.array_equal(got_arr, arr)
        assert got_t.data_ptr() == address(views[0])
        assert got_arr.ctypes.data == address(views[1]) and got_arr.strides == arr.strides
        # Writing to the frame memory shows through the tensor, and vice versa.
        views[0][:4] = bytes(memoryview(np.float32(42.0)))
        assert got_t[0] == 42.0
        got_t[1] = -1.0
        assert np.frombuffer(views[0], dtype=np.float32)[1] == -1.0
        got_arr[0, 0] = 7
        got_p.data.add_(1)
        assert type(got_p) is torch.nn.Parameter and got_p.data_ptr() == address(views[2])
    finally:
        a.close(linger=0)
        b.close(linger=0)
        ctx.term()
