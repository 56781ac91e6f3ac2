"""End-to-end: tensors, arrays, models, optimizers and custom codecs through real daemons.

The codec unit tests (test_codecs.py) check encode/decode in one process; here every
object crosses a ZeroMQ socket to a daemon process and back.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from typing import Any

import pytest
import torch_helpers as th

import asyncmirai as am

pytestmark = pytest.mark.timeout(120)
torch = pytest.importorskip("torch")

MiB = 1 << 20


def _same(a: Any, b: Any) -> bool:
    """Exact equality of two tensors: dtype, shape and every byte of every element."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    ac, bc = a.detach().contiguous(), b.detach().contiguous()
    if a.dim() == 0:
        ac, bc = ac.reshape(1), bc.reshape(1)
    return bool(torch.equal(ac.view(torch.uint8), bc.view(torch.uint8)))


def _dtype_samples() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    out: dict[str, Any] = {}
    names = [
        "bool", "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64",
        "float16", "bfloat16", "float32", "float64", "complex64", "complex128",
        "float8_e4m3fn", "float8_e5m2",
    ]  # fmt: skip
    for name in names:
        dtype = getattr(torch, name, None)
        if dtype is None:
            continue
        if dtype.is_complex:
            t = torch.randn(3, 5, dtype=dtype, generator=g)
        elif dtype.is_floating_point:
            t = torch.randn(3, 5, generator=g).to(dtype)
        elif dtype == torch.bool:
            t = torch.rand(3, 5, generator=g) > 0.5
        else:
            t = torch.randint(0, 100, (3, 5), generator=g).to(dtype)
        big = torch.zeros(70_000 // dtype.itemsize + 7, dtype=dtype)  # > inline threshold
        out[name] = {
            "m": t,
            "0d": t[1, 2].clone(),
            "empty": t[:0],
            "empty3d": torch.empty(2, 0, 4, dtype=dtype),
            "strided": t[::2, 1::2],
            "t": t.t(),
            "big": big,
        }
    return out


def _check_dtypes(sent: dict[str, Any], got: dict[str, Any]) -> None:
    assert sent.keys() == got.keys()
    for name, cases in sent.items():
        for key, t in cases.items():
            r = got[name][key]
            assert type(r) is torch.Tensor, (name, key)
            assert _same(t, r), (name, key, t, r)
            assert r.device.type == "cpu"
    # a transpose travels with its strides; a strided slice arrives compact
    f = got["float32"]
    assert f["t"].stride() == sent["float32"]["t"].stride()
    assert f["strided"].is_contiguous()


# -- dtypes, shapes, layouts --------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.anyio
async def test_every_dtype_and_layout_roundtrips_exactly() -> None:
    sent = _dtype_samples()
    for name in ("bfloat16", "float16", "bool", "complex64", "int8", "int16", "int32", "int64",
                 "uint8"):  # fmt: skip
        assert name in sent
    async with am.daemons(1):
        got = await am.mirai(th.identity, sent)
        _check_dtypes(sent, got)
        # what the daemon saw: the same dtypes, shapes and (for a transpose) strides
        seen = await am.mirai(lambda d: {k: th.describe(v) for k, v in d.items()}, sent["int16"])
        assert seen["t"] == ("tensor", "torch.int16", (5, 3), (1, 5))
        assert seen["0d"] == ("tensor", "torch.int16", (), ())
        assert seen["empty3d"] == ("tensor", "torch.int16", (2, 0, 4), (0, 4, 1)) or seen[
            "empty3d"
        ][:3] == ("tensor", "torch.int16", (2, 0, 4))


def test_other_layouts_roundtrip() -> None:
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    cases = {
        "channels_last": x.contiguous(memory_format=torch.channels_last),
        "expanded": torch.arange(4.0).expand(3, 4),
        "sliced_view": x[1, :, 2:, 1:4],
        "permuted": x.permute(3, 1, 0, 2),
        "conj": torch.randn(4, dtype=torch.complex64).conj(),
        "neg": torch.randn(4, dtype=torch.complex64).conj().imag,
        "sparse": torch.eye(3).to_sparse(),
    }
    with am.daemons(1):
        got = am.mirai(th.identity, cases).result()
    for k, t in cases.items():
        r = got[k]
        if k == "sparse":
            assert r.is_sparse and torch.equal(r.to_dense(), t.to_dense())
            continue
        assert torch.equal(r, t.resolve_conj().resolve_neg()), k
    assert got["channels_last"].is_contiguous(memory_format=torch.channels_last)
    assert got["permuted"].stride() == cases["permuted"].stride()


# -- autograd flags, Parameters, identity -------------------------------------------------
def test_requires_grad_and_parameter_preserved() -> None:
    leaf = torch.randn(3, requires_grad=True)
    nonleaf = leaf * 2
    param = torch.nn.Parameter(torch.randn(2, 2))
    frozen = torch.nn.Parameter(torch.randn(2), requires_grad=False)
    plain = torch.randn(2)
    with am.daemons(1):
        # on the daemon
        seen = am.mirai(
            lambda xs: [th.grad_info(x) for x in xs], [leaf, nonleaf, param, frozen, plain]
        ).result()
        # and back on the host
        back = am.mirai(th.identity, [leaf, nonleaf, param, frozen, plain]).result()
    expect = [
        ("Tensor", True, False),
        ("Tensor", True, False),
        ("Parameter", True, True),
        ("Parameter", False, True),
        ("Tensor", False, False),
    ]
    for info, (cls, rg, is_param) in zip(seen, expect, strict=True):
        assert (info["cls"], info["requires_grad"], info["is_param"]) == (cls, rg, is_param)
        assert info["is_leaf"]  # a non-leaf arrives as a leaf: the graph cannot travel
    for r, s, (cls, rg, _) in zip(back, [leaf, nonleaf, param, frozen, plain], expect, strict=True):
        assert type(r).__name__ == cls and r.requires_grad == rg and r.is_leaf
        assert _same(r, s)
    # received leaves take part in autograd on the host
    back[0].sum().backward()
    assert torch.equal(back[0].grad, torch.ones(3))


def test_tied_weights_arrive_as_one_tensor() -> None:
    t = torch.randn(4, 4)
    with am.daemons(1):
        # host -> daemon: the same tensor twice is one tensor on the daemon
        assert am.mirai(th.is_same, t, t).result() is True
        assert am.mirai(lambda d: d["a"] is d["b"][0], {"a": t, "b": [t]}).result() is True
        assert am.mirai(th.is_same, t, t.clone()).result() is False
        # daemon -> host: a structure built there with one tensor in three places
        s = am.mirai(th.tied_structure).result()
        model = am.mirai(th.tied_model).result()
    assert s["a"] is s["b"][0] is s["b"][1]["c"]
    assert s["other"] is not s["a"] and torch.equal(s["other"], s["a"])
    assert model["enc"].weight is model["dec"].weight
    assert len(list(model.parameters())) == 1
    # still tied in place: a write through one owner shows through the other
    with torch.no_grad():
        model["enc"].weight[0, 0] = 123.0
    assert model["dec"].weight[0, 0].item() == 123.0


def test_nested_containers() -> None:
    np = pytest.importorskip("numpy")
    t = torch.arange(6.0).reshape(2, 3)
    obj = {
        "list": [t, (t * 2, {"deep": [torch.ones(2, dtype=torch.int8), "text"]})],
        "tuple": (1, 2.5, None, b"bytes"),
        "set": frozenset({1, 2}),
        "array": np.arange(5, dtype=np.int32),
        "mixed": [np.ones((2, 2)), torch.zeros(3, dtype=torch.bfloat16)],
        "big": torch.randn(100_000),
    }
    with am.daemons(1):
        r = am.mirai(th.identity, obj).result()
    assert torch.equal(r["list"][0], t) and r["list"][0] is not t
    assert torch.equal(r["list"][1][0], t * 2)
    assert torch.equal(r["list"][1][1]["deep"][0], torch.ones(2, dtype=torch.int8))
    assert r["list"][1][1]["deep"][1] == "text"
    assert r["tuple"] == (1, 2.5, None, b"bytes") and r["set"] == frozenset({1, 2})
    assert np.array_equal(r["array"], obj["array"]) and r["array"].dtype == np.int32
    assert np.array_equal(r["mixed"][0], np.ones((2, 2)))
    assert _same(r["mixed"][1], obj["mixed"][1])
    assert torch.equal(r["big"], obj["big"])


# -- models and optimizers -----------------------------------------------------------------
@pytest.mark.anyio
async def test_whole_model_built_on_daemon_and_returned() -> None:
    x = torch.randn(2, 1, 8, 8)
    async with am.daemons(1):
        model, out = await am.mirai(th.model_and_output, 7, x)
    ref = th.make_model(7).eval()
    assert type(model) is torch.nn.Sequential
    assert model.state_dict().keys() == ref.state_dict().keys()
    for k, v in ref.state_dict().items():
        assert _same(model.state_dict()[k], v), k  # incl. BatchNorm buffers
    assert all(type(p) is torch.nn.Parameter for p in model.parameters())
    assert not model.training
    assert torch.allclose(model(x), out)


def test_optimizer_built_on_daemon() -> None:
    model = th.make_model(0)
    with am.daemons(1):
        m2, opt = am.mirai(th.model_and_optimizer, model).result()
        # the vignette's way: an optimizer from a list of parameters
        opt2 = am.mirai(th.optimizer_from_params, list(model.parameters())).result()
    assert type(opt) is torch.optim.RMSprop
    # the optimizer's parameters are the returned model's parameters (identity kept)
    assert all(a is b for a, b in zip(opt.param_groups[0]["params"], m2.parameters(), strict=True))
    # the step ran on the daemon: weights moved, state holds tensors
    assert not torch.equal(m2[0].weight, model[0].weight)
    st = opt.state_dict()["state"]
    assert len(st) == len(list(model.parameters()))
    assert all(isinstance(s["square_avg"], torch.Tensor) for s in st.values())
    # and it keeps working on the host
    m2(torch.randn(2, 1, 8, 8)).sum().backward()
    opt.step()
    assert type(opt2) is torch.optim.RMSprop
    got = opt2.param_groups[0]["params"]
    assert [tuple(p.shape) for p in got] == [tuple(p.shape) for p in model.parameters()]
    assert all(type(p) is torch.nn.Parameter and p.requires_grad for p in got)


# -- numpy ---------------------------------------------------------------------------------
def test_numpy_all_dtypes_and_object_fallback() -> None:
    np = pytest.importorskip("numpy")
    dtypes = [
        "?", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", "g",
        "c8", "c16", "M8[ns]", "m8[s]", "S5", "U3", ">i4", "<f8",
    ]  # fmt: skip
    arrays = {}
    for dt in dtypes:
        a = np.arange(24).reshape(4, 6) % 7
        arrays[dt] = a.astype(dt)
    arrays["fortran"] = np.asfortranarray(np.arange(12.0).reshape(3, 4))
    arrays["sliced"] = np.arange(100)[::3]
    arrays["0d"] = np.array(3.5)
    arrays["empty"] = np.zeros((0, 3), dtype="i4")
    arrays["big"] = np.arange(50_000, dtype=np.float64)
    arrays["object"] = np.array([1, "two", None, {"x": 3}], dtype=object)
    arrays["structured"] = np.array([(1, 2.0)], dtype=[("a", "i4"), ("b", "f8")])
    with am.daemons(1):
        got = am.mirai(th.identity, arrays).result()
        kinds = am.mirai(lambda d: {k: (v.dtype.str, v.shape) for k, v in d.items()}, arrays)
        kinds = kinds.result()
    for k, a in arrays.items():
        r = got[k]
        assert type(r) is np.ndarray, k
        assert r.dtype == a.dtype and r.shape == a.shape, k
        assert np.array_equal(r, a) if a.dtype != object else list(r) == list(a), k
        assert kinds[k] == (a.dtype.str, a.shape), k
        if a.size:
            assert r.flags.writeable, k
    assert got["fortran"].flags.f_contiguous


# -- received memory is writable -----------------------------------------------------------
def test_received_tensors_and_arrays_are_writable_without_warnings() -> None:
    np = pytest.importorskip("numpy")
    big = torch.zeros(MiB // 4)  # its own zmq frame
    small = torch.zeros(8)  # inlined in the header
    arr = np.zeros(MiB // 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with am.daemons(1):
            # the daemon writes into what it received, returns it
            r = am.mirai(th.write_into, big).result()
            assert torch.equal(r, torch.ones(MiB // 4))
            assert torch.equal(am.mirai(th.write_into, small).result(), torch.ones(8))
            # the host writes into what it received
            t, s, a = am.mirai(th.identity, (big, small, arr)).result()
        t.add_(2)
        s.mul_(3)
        a += 1
        t2 = torch.from_numpy(a)  # warns if the array were read-only
    assert torch.equal(t, torch.full((MiB // 4,), 2.0)) and torch.equal(big, torch.zeros(MiB // 4))
    assert float(t2[0]) == 1.0 and arr[0] == 0.0


def test_64mib_tensor_roundtrip() -> None:
    np = pytest.importorskip("numpy")
    g = torch.Generator().manual_seed(5)
    t = torch.randn(64 * MiB // 4, generator=g)
    a = np.random.default_rng(5).integers(0, 255, 64 * MiB, dtype=np.uint8)
    with am.daemons(1):
        r = am.mirai(th.identity, t).result()
        ra = am.mirai(th.identity, a).result()
        made = am.mirai(th.make_tensor, 64 * MiB).result()
    assert r.data_ptr() != t.data_ptr() and torch.equal(r, t)
    assert np.array_equal(ra, a)
    assert made.shape == (16 * MiB,) and bool((made == 1).all())


# -- custom codecs -------------------------------------------------------------------------
def _box_cfg(vec: bool) -> am.SerialConfig:
    if vec:
        return am.serial_config(th.Box, th.box_sfunc_vec, th.box_ufunc_vec, vec=True)
    return am.serial_config(th.Box, th.box_sfunc, th.box_ufunc)


@pytest.mark.parametrize("vec", [False, True], ids=["per-object", "vec"])
@pytest.mark.parametrize("how", ["daemons", "everywhere"])
def test_custom_serial_config_is_called_on_both_sides(vec: bool, how: str) -> None:
    cfg = _box_cfg(vec)
    th.reset_counts()
    boxes = [th.Box(1), th.Box(2), th.Box(3)]
    if how == "daemons":
        ctx = am.daemons(1, serial=cfg)
    else:
        ctx = am.daemons(1)
    with ctx:
        if how == "everywhere":
            # without the config, a Box cannot even be sent
            with pytest.raises(TypeError, match="Box"):
                am.mirai(th.identity, th.Box(0))
            am.everywhere(th.reset_counts, _serial=cfg).result(timeout=60)
        else:
            am.mirai(th.reset_counts).result(timeout=60)
        host_before = dict(th.COUNTS)
        assert host_before == {}
        got = am.mirai(th.double_boxes, boxes).result(timeout=60)
        # the same Box twice in one message: encoded once, arrives as one object
        twice = am.mirai(lambda a, b: a is b, boxes[0], boxes[0]).result(timeout=60)
        daemon = am.mirai(th.counts).result(timeout=60)
    assert got == [th.Box(2), th.Box(4), th.Box(6)]
    assert twice is True
    host = th.COUNTS
    if vec:
        # one sfunc call per message on the host (2 messages with boxes), one ufunc
        # for the one result with boxes; the daemon mirrors it
        assert host == {"sfunc_vec": 2, "sfunc_vec_objects": 4, "ufunc_vec": 1}, host
        assert daemon["ufunc_vec"] == 2 and daemon["sfunc_vec"] == 1, daemon
        assert daemon["sfunc_vec_objects"] == 3, daemon
        assert "sfunc" not in daemon and "ufunc" not in daemon
    else:
        assert host == {"sfunc": 4, "ufunc": 3}, host
        assert daemon["ufunc"] == 4 and daemon["sfunc"] == 3, daemon
        assert "sfunc_vec" not in daemon
    assert daemon["pid"] != os.getpid()


def test_serial_configs_reach_a_daemon_that_connects_later() -> None:
    box_cfg = _box_cfg(vec=True)
    other_cfg = am.serial_config(th.Other, th.other_sfunc, th.other_ufunc)
    th.reset_counts()
    with am.daemons(url=am.local_url(), serial=box_cfg):
        # no daemon yet: a second config through everywhere, then the daemon arrives
        am.everywhere("import torch_helpers", _serial=other_cfg)
        am.launch_local(1)
        b, o, daemon = am.mirai(th.roundtrip_both, th.Box(41), th.Other("hi")).result(timeout=60)
        pid = am.mirai(th.getpid).result(timeout=30)
    assert b == th.Box(42) and type(o) is th.Other and o.tag == "hi!"
    assert daemon["pid"] == pid != os.getpid()
    assert daemon["ufunc_vec"] == 1 and daemon["other_ufunc"] == 1, daemon
    assert th.COUNTS["sfunc_vec"] == 1 and th.COUNTS["other_sfunc"] == 1, th.COUNTS
    assert th.COUNTS["ufunc_vec"] == 1 and th.COUNTS["other_ufunc"] == 1, th.COUNTS


def test_serial_config_overrides_the_torch_default_and_ships_configs_later() -> None:
    # the vignette's config: torch's own serialization, vectorized
    import io

    def sfunc(ts: list[Any]) -> bytes:
        buf = io.BytesIO()
        torch.save(ts, buf)
        return buf.getvalue()

    def ufunc(data: memoryview) -> list[Any]:
        return torch.load(io.BytesIO(bytes(data)), weights_only=True)

    cfg = am.serial_config(torch.Tensor, sfunc, ufunc, vec=True)
    t = torch.randn(5, 5)
    p = torch.nn.Parameter(torch.randn(3))
    with am.daemons(1):
        am.everywhere("import torch", _serial=cfg).result(timeout=60)
        r, rp = am.mirai(th.identity, (t, p)).result(timeout=60)
        # a closure over the local functions ships them by value to the daemon: the
        # daemon saw one custom-vec group, not torch descriptors
        out = am.mirai(lambda a: (a * 2).sum().item(), t).result(timeout=60)
    assert torch.equal(r, t) and type(rp) is torch.nn.Parameter and torch.equal(rp, p)
    assert out == pytest.approx((t * 2).sum().item())


# -- codec errors --------------------------------------------------------------------------
@pytest.mark.anyio
async def test_codec_errors_are_clear_and_the_daemon_survives() -> None:
    cfg = am.serial_config(th.Fragile, th.fragile_sfunc, th.fragile_ufunc)
    async with am.daemons(1, serial=cfg):
        pid = await am.mirai(th.getpid)
        # send side: fails at mirai(), before anything is sent
        with pytest.raises(TypeError, match="Fragile") as ei:
            am.mirai(th.identity, [1, th.Fragile(bad=True)])
        assert "refuses to serialize" in str(ei.value)
        # result side: the daemon cannot encode its result
        with pytest.raises(am.MiraiError, match="Fragile") as ei2:
            await am.mirai(th.make_fragile, True)
        assert "refuses to serialize" in str(ei2.value)
        # decode on the daemon: the argument's ufunc fails there
        with pytest.raises(am.MiraiError, match="fragile object refuses to deserialize"):
            await am.mirai(th.fragile_payload, th.Fragile(payload=b"bad"))
        # decode on the host: the result's ufunc fails here
        with pytest.raises(am.MiraiError, match="fragile object refuses to deserialize"):
            await am.mirai(th.make_fragile, False, b"bad")
        # the daemon is the same process, still serving
        assert await am.mirai(th.getpid) == pid
        assert (await am.mirai(th.make_fragile, False, b"fine")).payload == b"fine"
        assert am.status().connections == 1


def test_unsendable_tensor_subclass_result_is_mirai_error() -> None:
    # an object torch itself refuses to pickle, inside a structure of tensors
    with am.daemons(1):
        pid = am.mirai(th.getpid).result(timeout=60)
        with pytest.raises(am.MiraiError, match="Generator|generator|pickle") as ei:
            am.mirai(lambda: [torch.ones(2), (lambda: (yield))()]).result(timeout=60)
        assert ei.value.type_name
        assert am.mirai(th.getpid).result(timeout=30) == pid


# -- import hygiene ------------------------------------------------------------------------
def test_import_asyncmirai_imports_neither_torch_nor_numpy() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    code = (
        "import sys, asyncmirai as am\n"
        "assert 'torch' not in sys.modules and 'numpy' not in sys.modules, 'import'\n"
        "import torch_helpers as th\n"
        "with am.daemons(1):\n"
        "    r = am.mirai(lambda x: x + 1, 41).result(timeout=60)\n"
        "    remote = am.mirai(th.modules_loaded).result(timeout=60)\n"
        "print(r, 'torch' in sys.modules, 'numpy' in sys.modules, remote)\n"
    )
    env = {**os.environ, "PYTHONPATH": here + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=90, env=env
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "42 False False {'torch': False, 'numpy': False}", out.stdout
