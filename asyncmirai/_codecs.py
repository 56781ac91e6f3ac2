"""Serialization of task payloads: pickle protocol 5 plus a class-keyed codec table.

A payload becomes three parts (see ``dumps``):

* ``body``: pickle-5 bytes written by cloudpickle's pickler, so lambdas, closures
  and classes defined in ``__main__`` travel by value;
* ``descriptors``: a msgpack-safe list, one entry per object taken out of the pickle
  stream by a codec (a tensor, an array, an object of a user-registered class) or
  per out-of-band ``pickle.PickleBuffer``;
* ``buffers``: the raw bytes of those objects, to be sent as their own frames
  without copying.

Codecs plug into pickle through ``persistent_id`` / ``persistent_load``, Python's
analogue of R's refhook: an object of a registered class anywhere inside any
structure (a model, an optimizer, a dict of lists of tensors) is replaced in the
pickle stream by a small integer, the index of its descriptor.

Codecs are keyed by class and looked up along the MRO, so subclasses use their
parent's codec unless they have their own. The default codecs are keyed by the
*names* ``"torch.Tensor"`` and ``"numpy.ndarray"`` and matched against the
qualified names of the classes in an object's MRO: an object of such a class can
only exist once its module is imported, so this module never imports torch or
numpy itself to encode, and imports them on load only when a descriptor needs them.

What travels, and what does not:

* tensors: every dense dtype, any shape and layout (a non-contiguous view travels as
  a compact copy of its elements; a dense permutation such as a transpose or
  channels_last travels as is, strides kept), ``requires_grad``, ``nn.Parameter``;
  a non-leaf tensor arrives as a leaf with its data and ``requires_grad``; ``.grad``
  and autograd history do not travel. Two views of one storage arrive as two
  tensors; the same tensor object twice arrives as one. Sparse, quantized, meta,
  nested tensors, other Tensor subclasses, and tensors with attributes set on them
  use torch's own pickling (correct, not zero-copy).
* arrays: every numpy dtype whose bytes are its values; object, structured and
  StringDType arrays and ndarray subclasses use numpy's own pickling.

This module is pure: no sockets, no zmq.
"""

from __future__ import annotations

import ctypes
import io
import pickle
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import BuiltinFunctionType, FunctionType, ModuleType
from typing import TYPE_CHECKING, Any, Final

if sys.version_info >= (3, 12):
    from collections.abc import Buffer
elif TYPE_CHECKING:
    from typing_extensions import Buffer
else:  # pragma: no cover - a runtime alias: importing typing_extensions costs daemons'
    Buffer = bytes | bytearray | memoryview  # start-up ~1 ms for a name only mypy reads

__all__ = [
    "DEFAULT_TABLE",
    "INLINE_THRESHOLD",
    "Buffer",
    "CodecError",
    "CodecTable",
    "SerialConfig",
    "TableRef",
    "dumps",
    "loads",
    "serial_config",
]

INLINE_THRESHOLD: Final = 65536
"""Buffers smaller than this many bytes are inlined in their descriptor.

It equals pyzmq's ``zmq.COPY_THRESHOLD``: below it ``send(copy=False)`` copies the
data anyway, so a separate frame would only add per-frame overhead.
"""


class CodecError(ValueError):
    """An object could not be encoded, or a descriptor could not be decoded."""


@dataclass(frozen=True)
class SerialConfig:
    """A custom codec for one class and its subclasses; build it with ``serial_config``.

    Attributes:
        cls: The class, or its ``"module.QualName"`` for lazy registration.
        sfunc: ``obj -> bytes-like``; with ``vec=True``, ``list[obj] -> bytes-like``.
        ufunc: ``memoryview -> obj``; with ``vec=True``, ``memoryview -> list[obj]``.
        vec: Whether to encode all objects of the class in one message at once.
    """

    cls: type | str
    sfunc: Callable[[Any], Buffer]
    ufunc: Callable[[memoryview], Any]
    vec: bool = False

    def __post_init__(self) -> None:
        # Validated here rather than only in serial_config so a hand-built config
        # fails at construction, not deep inside a send.
        cls = self.cls
        if isinstance(cls, str):
            parts = cls.split(".")
            if len(parts) < 2 or not all(p.isidentifier() for p in parts):
                raise TypeError(
                    f"serial_config: cls must be a class or a dotted 'module.QualName' "
                    f"string, got {cls!r}"
                )
        elif not isinstance(cls, type):
            raise TypeError(
                f"serial_config: cls must be a class or a dotted 'module.QualName' "
                f"string, not {type(cls).__name__}"
            )
        for name in ("sfunc", "ufunc"):
            if not callable(getattr(self, name)):
                raise TypeError(
                    f"serial_config: {name} must be callable, "
                    f"not {type(getattr(self, name)).__name__}"
                )
        if not isinstance(self.vec, bool):
            raise TypeError(f"serial_config: vec must be a bool, not {type(self.vec).__name__}")


def serial_config(
    cls: type | str,
    sfunc: Callable[[Any], Buffer],
    ufunc: Callable[[memoryview], Any],
    vec: bool = False,
) -> SerialConfig:
    """Register a custom serializer for a class and its subclasses.

    Objects of ``cls`` found anywhere inside a task's arguments or result are
    taken out of the pickle stream, encoded with ``sfunc`` and sent as their own
    frame; the receiver rebuilds them with ``ufunc``. A config overrides the
    built-in codecs (``torch.Tensor``, ``numpy.ndarray``) for its class.

    Args:
        cls: The class, or its qualified name such as ``"mypkg.models.Model"``, which
            registers it without importing its module.
        sfunc: Called as ``sfunc(obj)``, returns a bytes-like object. With
            ``vec=True`` it is called once per message with the list of all
            distinct objects of the class in that message.
        ufunc: Called with a writable ``memoryview`` of the bytes ``sfunc``
            returned; returns the object (with ``vec=True``, the list of objects,
            in the same order and of the same length).
        vec: Encode all objects of the class in a message with one call.

    Returns:
        A ``SerialConfig`` to pass to ``daemons(serial=...)`` or
        ``everywhere(_serial=...)``.

    Raises:
        TypeError: ``cls`` is neither a class nor a dotted name, a function is not
            callable, or ``vec`` is not a bool.
    """
    return SerialConfig(cls, sfunc, ufunc, vec)


# --------------------------------------------------------------------------------
# codec table


def _type_name(cls: type) -> str:
    return f"{getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', cls.__name__)}"


_MISS: Final[Any] = object()
_CACHE_LIMIT: Final = 8192


class _Encoder:
    """Per-``dumps`` state shared by the codecs."""

    __slots__ = ("buffers", "descriptors", "groups", "keep", "memo", "table")

    def __init__(self, table: CodecTable, descriptors: list[Any], buffers: list[Buffer]) -> None:
        self.table = table
        self.descriptors = descriptors
        self.buffers = buffers
        self.memo: dict[int, int] = {}
        # Holding every encoded object keeps its id() from being reused by a
        # temporary while pickling is still running.
        self.keep: list[Any] = []
        self.groups: dict[_UserCodec, tuple[int, list[Any]]] = {}

    def encode(self, obj: Any, codec: _Codec) -> int | None:
        """Descriptor index for ``obj`` (``codec`` is its cached codec or ``_MISS``)."""
        if codec is _MISS:
            resolved = self.table._resolve(type(obj))
            if resolved is None:
                return None
            codec = resolved
        index = self.memo.get(id(obj))
        if index is None:
            index = codec.encode(obj, self)
            if index is not None:
                # The same object twice (tied weights) becomes one reference.
                self.memo[id(obj)] = index
                self.keep.append(obj)
        return index

    def finish(self) -> None:
        """Encode the vectorized groups, now that every object has been seen."""
        for codec, (index, objs) in self.groups.items():
            codec.finish(self, index, objs)

    def add(self, desc: dict[str, Any]) -> int:
        self.descriptors.append(desc)
        return len(self.descriptors) - 1

    def attach(self, desc: dict[str, Any], data: memoryview) -> None:
        """Point ``desc`` at ``data``: inline when small, else as its own buffer."""
        if data.nbytes < INLINE_THRESHOLD:
            desc["data"] = data.tobytes()
        else:
            desc["buf"] = len(self.buffers)
            self.buffers.append(data)


class _Decoder:
    """Per-``loads`` state: decoded objects by descriptor index (identity), vec groups."""

    __slots__ = ("buffers", "descriptors", "groups", "loaded", "table", "warned")

    def __init__(
        self, descriptors: list[Any], buffers: Sequence[memoryview], table: CodecTable
    ) -> None:
        self.descriptors = descriptors
        self.buffers = buffers
        self.table = table
        self.loaded: dict[int, Any] = {}
        self.groups: dict[int, Sequence[Any]] = {}
        self.warned = False

    def buffer(self, desc: dict[str, Any]) -> memoryview:
        """The bytes ``desc`` points at, as a writable 1-D byte memoryview."""
        if "buf" in desc:
            i = desc["buf"]
            if type(i) is not int or not 0 <= i < len(self.buffers):
                raise CodecError(
                    f"descriptor refers to buffer {i!r}, but the message has "
                    f"{len(self.buffers)} buffers"
                )
            mv = memoryview(self.buffers[i])
            if mv.readonly:
                # Received zmq frames are writable; anything else (bytes) is copied
                # once so decoded tensors and arrays are always writable.
                return memoryview(bytearray(mv))
            if mv.ndim != 1 or mv.format != "B":
                mv = mv.cast("B")
            return mv
        data = desc.get("data")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise CodecError("descriptor has neither a buffer index nor inline data")
        # Inline data lives in the (read-only) header: copy it, it is small.
        return memoryview(bytearray(data))

    def persistent_load(self, pid: Any) -> Any:
        obj = self.loaded.get(pid, _MISS) if type(pid) is int else _MISS
        if obj is not _MISS:
            return obj
        if type(pid) is not int or not 0 <= pid < len(self.descriptors):
            raise CodecError(
                f"pickle refers to descriptor {pid!r}, but the message has "
                f"{len(self.descriptors)} descriptors"
            )
        desc = self.descriptors[pid]
        kind = desc.get("codec") if isinstance(desc, dict) else None
        decode = _DECODERS.get(kind) if isinstance(kind, str) else None
        if decode is None:
            raise CodecError(f"descriptor {pid} has an unknown codec: {desc!r:.200}")
        try:
            obj = decode(desc, self)
        except CodecError:
            raise
        except Exception as exc:
            raise CodecError(f"malformed {kind!r} descriptor {pid}: {exc!r}") from exc
        self.loaded[pid] = obj
        return obj


class _Codec:
    """Encoder side of a codec: ``encode`` returns a descriptor index, or ``None``
    to let pickle handle the object itself."""

    __slots__ = ("key",)

    def __init__(self, key: str) -> None:
        self.key = key

    def encode(self, obj: Any, enc: _Encoder) -> int | None:
        raise NotImplementedError


class _UserCodec(_Codec):
    __slots__ = ("config",)

    def __init__(self, key: str, config: SerialConfig) -> None:
        super().__init__(key)
        self.config = config

    def encode(self, obj: Any, enc: _Encoder) -> int | None:
        if self.config.vec:
            # sfunc wants every object of the message at once, but pickling is still
            # under way: collect now, encode in _finish_groups.
            group = enc.groups.get(self)
            if group is None:
                group = (enc.add({"codec": "custom-vec-group", "cls": self.key}), [])
                enc.groups[self] = group
            index, objs = group
            objs.append(obj)
            return enc.add({"codec": "custom-vec", "group": index, "i": len(objs) - 1})
        try:
            data = _byte_view(self.config.sfunc(obj))
        except Exception as exc:
            raise CodecError(
                f"cannot serialize object of type {_type_name(type(obj))!r} with the "
                f"codec for {self.key!r}: {exc!r}"
            ) from exc
        desc = {"codec": "custom", "cls": self.key}
        enc.attach(desc, data)
        return enc.add(desc)

    def finish(self, enc: _Encoder, index: int, objs: list[Any]) -> None:
        try:
            data = _byte_view(self.config.sfunc(objs))
        except Exception as exc:
            names = ", ".join(sorted({repr(_type_name(type(o))) for o in objs}))
            raise CodecError(
                f"cannot serialize objects of type {names} with the vectorized codec "
                f"for {self.key!r}: {exc!r}"
            ) from exc
        desc = enc.descriptors[index]
        desc["n"] = len(objs)
        enc.attach(desc, data)


def _byte_view(data: Any) -> memoryview:
    """A flat byte view of what an sfunc returned, without copying when possible."""
    try:
        mv = memoryview(data)
    except TypeError:
        raise TypeError(
            f"sfunc must return a bytes-like object, not {type(data).__name__}"
        ) from None
    if mv.ndim == 1 and mv.format == "B":
        return mv
    if mv.nbytes == 0:
        return memoryview(b"")
    if not mv.c_contiguous:
        return memoryview(mv.tobytes())
    return mv.cast("B")


class CodecTable:
    """Class-keyed codecs: the defaults (torch, numpy) plus user ``SerialConfig``\\ s.

    A user config overrides a default for the same class; among user configs the
    later one wins. Lookup walks the object's MRO, so the most derived registered
    class wins, and is cached per type (negative results included).

    Args:
        configs: User codecs, as returned by ``serial_config``.

    Raises:
        TypeError: An item is not a ``SerialConfig``.
    """

    __slots__ = ("_by_name", "_by_type", "_cache", "_custom", "_is_active", "_modules", "configs")

    configs: tuple[SerialConfig, ...]
    """The user configs, in order (picklable with cloudpickle, to ship to daemons)."""

    def __init__(self, configs: Iterable[SerialConfig] = ()) -> None:
        self.configs = tuple(configs)
        self._by_name: dict[str, _Codec] = dict(_DEFAULT_CODECS)
        self._by_type: dict[type, _Codec] = {}
        self._custom: dict[str, _UserCodec] = {}
        for cfg in self.configs:
            if not isinstance(cfg, SerialConfig):
                raise TypeError(
                    f"expected SerialConfig (from serial_config()), got {type(cfg).__name__}"
                )
            key = cfg.cls if isinstance(cfg.cls, str) else _type_name(cfg.cls)
            codec = _UserCodec(key, cfg)
            # One entry per class name, so a later config overrides an earlier one
            # whether either named its class by object or by string.
            self._by_name.pop(key, None)
            for t in [t for t in self._by_type if _type_name(t) == key]:
                del self._by_type[t]
            if isinstance(cfg.cls, str):
                self._by_name[key] = codec
            else:
                self._by_type[cfg.cls] = codec
            self._custom[key] = codec
        self._cache: dict[type, _Codec | None] = {}
        # Objects of a class registered by name can exist only once the top-level
        # package of that name is imported; until then dumps skips the hook.
        self._modules = tuple({name.split(".", 1)[0] for name in self._by_name})
        self._is_active = bool(self._by_type)

    def extend(self, configs: Iterable[SerialConfig]) -> CodecTable:
        """A new table with ``configs`` added after this table's (they take precedence)."""
        return CodecTable((*self.configs, *configs))

    def __reduce__(self) -> tuple[Any, ...]:
        return (CodecTable, (self.configs,))

    def __repr__(self) -> str:
        return f"CodecTable({list(self.configs)!r})"

    def _active(self) -> bool:
        if self._is_active:
            return True
        modules = sys.modules
        for m in self._modules:
            if m in modules:
                # Modules are practically never unloaded: stay active for good.
                self._is_active = True
                return True
        return False

    def _resolve(self, cls: type) -> _Codec | None:
        """Codec for ``cls`` along its MRO; fills the per-type cache."""
        codec: _Codec | None = None
        for c in cls.__mro__:
            codec = self._by_type.get(c) or self._by_name.get(_type_name(c))
            if codec is not None:
                break
        if len(self._cache) >= _CACHE_LIMIT:
            # Bounded so dynamically created classes cannot grow it forever.
            self._cache.clear()
        self._cache[cls] = codec
        return codec


# --------------------------------------------------------------------------------
# dumps / loads


_PLAIN_TYPES: Final = frozenset({int, float, bool, str, bytes, type(None), complex})
_by_ref_cache: dict[Any, bool] = {}


def _pickled_by_value(module: str) -> bool:
    cloudpickle = sys.modules.get("cloudpickle")  # nothing is registered if not imported
    if cloudpickle is None:
        return False
    registered = cloudpickle.list_registry_pickle_by_value()
    return any(module == m or module.startswith(m + ".") for m in registered)


def _by_reference(obj: Any) -> bool:
    """True if plain pickle stores ``obj`` (function or class) as an importable name
    that resolves to ``obj`` itself, i.e. cloudpickle would not pickle it by value."""
    ok = _by_ref_cache.get(obj)
    if ok is None:
        ok = False
        module = getattr(obj, "__module__", None)
        qualname = getattr(obj, "__qualname__", "")
        if module and module != "__main__" and "<" not in qualname:
            target: Any = sys.modules.get(module)
            for part in qualname.split("."):
                target = getattr(target, part, None)
            # a module registered with cloudpickle.register_pickle_by_value (not
            # importable on the daemons) must go by value, as cloudpickle would send it
            ok = target is obj and not _pickled_by_value(module)
        if len(_by_ref_cache) > 4096:
            _by_ref_cache.clear()
        _by_ref_cache[obj] = ok
    return ok


def _plain(obj: Any, depth: int = 0) -> bool:
    """Whether C pickle alone serializes ``obj`` exactly as our pickler would: builtin
    scalars, containers of them (up to 4 levels deep), and functions/classes importable
    by name."""
    t = type(obj)
    if t in _PLAIN_TYPES:
        return True
    if depth < 4:
        # A scan is linear but far cheaper than the codec hook, which runs per object.
        if t is tuple or t is list:
            plain = _PLAIN_TYPES
            return all(type(x) in plain for x in obj) or all(_plain(x, depth + 1) for x in obj)
        if t is dict:
            return all(type(k) is str and _plain(v, depth + 1) for k, v in obj.items())
    if t is FunctionType or t is type:
        return _by_reference(obj)
    if t is BuiltinFunctionType:
        return isinstance(getattr(obj, "__self__", None), ModuleType) and _by_reference(obj)
    return False


def plain_call(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """``_plain((kind, fn, args, kwargs))`` for the shape of a task, in one call instead
    of a dozen: the per-task path of ``mirai()`` (measured: ~10 fewer Python calls)."""
    t = type(fn)
    if t is str:
        pass  # a code string
    elif t is FunctionType or t is type:
        ok = _by_ref_cache.get(fn)
        if not (ok if ok is not None else _by_reference(fn)):
            return False
    elif t is BuiltinFunctionType:
        if not (isinstance(getattr(fn, "__self__", None), ModuleType) and _by_reference(fn)):
            return False
    else:
        return False
    plain = _PLAIN_TYPES  # plain_args, inlined: the per-task path
    for a in args:
        if type(a) not in plain and not _plain(a, 1):
            return False
    return not kwargs or _plain(kwargs, 1)


def plain_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """``_plain`` for a call's arguments alone."""
    plain = _PLAIN_TYPES
    for a in args:
        if type(a) not in plain and not _plain(a, 1):
            return False
    return not kwargs or _plain(kwargs, 1)


def dumps(obj: Any, table: CodecTable) -> tuple[bytes, list[Any], list[Buffer]]:
    """Serialize ``obj`` with pickle protocol 5, taking codec objects out of band.

    Args:
        obj: Any object cloudpickle can pickle.
        table: The codec table (``DEFAULT_TABLE`` or one with user configs).

    Returns:
        ``(body, descriptors, buffers)``: the pickle bytes; a msgpack-safe list
        describing each out-of-band object; the bytes-like objects to send as
        separate frames with ``copy=False``. Each buffer holds a reference to the
        object whose memory it exposes, so that memory stays valid while the frame
        is in flight; mutating the object before the send completes changes what
        is sent (as with any zero-copy send).

    Raises:
        CodecError: A codec failed; the message names the object's type.
        Exception: Whatever pickling raises for an unpicklable object.
    """
    if not table._custom and _plain(obj):
        # The per-task fast path (a function by reference and a few scalars): the C
        # pickler alone is several times faster than building a cloudpickle Pickler.
        return pickle.dumps(obj, 5), [], []
    descriptors: list[Any] = []
    buffers: list[Buffer] = []

    def buffer_callback(pb: pickle.PickleBuffer) -> bool:
        # Protocol-5 out-of-band buffers from other libraries (explicit PickleBuffers,
        # numpy/pandas objects pickled outside the codecs): large ones go as their
        # own frame; returning True keeps one in-band.
        try:
            raw = pb.raw()
        except BufferError:
            return True
        if raw.nbytes < INLINE_THRESHOLD:
            return True
        descriptors.append({"codec": "pickle-buffer", "buf": len(buffers)})
        buffers.append(raw)
        return False

    f = io.BytesIO()
    import cloudpickle  # here, not at import: daemons start faster without it

    pickler = cloudpickle.Pickler(f, protocol=5, buffer_callback=buffer_callback)
    enc: _Encoder | None = None
    if table._active():
        # Runs for every object pickled, and most are ints, strs and tuples whose
        # type is answered by one dict lookup; the encoder state is built only
        # when a codec object turns up.
        cache_get = table._cache.get

        def persistent_id(obj: Any) -> int | None:
            nonlocal enc
            codec = cache_get(type(obj), _MISS)
            if codec is None:
                return None
            if enc is None:
                enc = _Encoder(table, descriptors, buffers)
            return enc.encode(obj, codec)

        pickler.persistent_id = persistent_id
    pickler.dump(obj)
    if enc is not None and enc.groups:
        enc.finish()
    return f.getvalue(), descriptors, buffers


def loads(
    body: Buffer, descriptors: list[Any], buffers: Sequence[memoryview], table: CodecTable
) -> Any:
    """Inverse of ``dumps``.

    Decoded tensors and arrays wrap the memory of ``buffers`` without a copy and
    keep it alive; they are writable when the buffers are (received zmq frames
    are), else the bytes are copied once. The same reference decodes to the same
    object, so identity (tied weights) survives.

    CUDA tensors come back on the same device index when
    ``torch.cuda.is_available()`` and that index exists here; otherwise they stay
    on the CPU and a ``RuntimeWarning`` says so (once per call).

    Args:
        body: The pickle bytes.
        descriptors: The descriptor list, as decoded from the message header.
        buffers: The out-of-band frames, ideally writable memoryviews.
        table: The codec table, which must hold the user configs the sender used.

    Returns:
        The object.

    Raises:
        CodecError: A descriptor is malformed, refers to a missing buffer or an
            unregistered codec, or a user ``ufunc`` failed.
        Exception: Whatever unpickling raises for a malformed body.
    """
    if not descriptors:
        return pickle.loads(body)
    if not isinstance(descriptors, list):
        raise CodecError(f"descriptors must be a list, not {type(descriptors).__name__}")
    dec = _Decoder(descriptors, buffers, table)
    oob = [
        dec.buffer(d)
        for d in descriptors
        if isinstance(d, dict) and d.get("codec") == "pickle-buffer"
    ]
    unpickler = pickle.Unpickler(io.BytesIO(body), buffers=oob)
    unpickler.persistent_load = dec.persistent_load  # type: ignore[method-assign]
    return unpickler.load()


# --------------------------------------------------------------------------------
# shape helpers


def _shape(desc: dict[str, Any]) -> list[int]:
    shape = desc.get("shape")
    if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
        raise CodecError(f"bad shape {shape!r}")
    return shape


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _dense_perm(shape: Sequence[int], strides: Sequence[int], unit: int) -> list[int] | None:
    """Axis order that makes a dense but permuted layout (Fortran order, a transpose)
    C-contiguous, or None when the elements are not one dense block (slices,
    broadcasts, negative strides) and must be copied."""
    order = sorted(range(len(shape)), key=lambda i: -strides[i])
    expected = unit
    for i in reversed(order):
        if shape[i] != 1:
            if strides[i] != expected:
                return None
            expected *= shape[i]
    return order


def _perm(desc: dict[str, Any], ndim: int) -> list[int] | None:
    perm = desc.get("perm")
    if perm is None:
        return None
    if not isinstance(perm, list) or sorted(perm) != list(range(ndim)):
        raise CodecError(f"bad axis permutation {perm!r} for {ndim} dimensions")
    return perm


def _inverse(perm: list[int]) -> list[int]:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return inv


def _import(name: str) -> Any:
    module = sys.modules.get(name)
    if module is None:
        try:
            module = __import__(name)
        except ImportError as exc:
            raise CodecError(
                f"the message holds {name} objects, but {name} cannot be imported here: {exc}"
            ) from exc
    return module


# --------------------------------------------------------------------------------
# torch


_TORCH_DTYPES: Final = (
    "bool", "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64",
    "float16", "bfloat16", "float32", "float64", "complex32", "complex64", "complex128",
    "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu",
)  # fmt: skip
_torch_dtype_names: dict[Any, str] = {}  # torch.dtype -> name, filled on first use
_torch_dtypes: dict[str, Any] = {}  # name -> torch.dtype
_ctypes_spans: dict[int, Any] = {}


def _torch_tables(torch: Any) -> None:
    for name in _TORCH_DTYPES:
        dtype = getattr(torch, name, None)  # newer dtypes may be missing
        if isinstance(dtype, torch.dtype):
            _torch_dtypes[name] = dtype
            _torch_dtype_names[dtype] = name


def _tensor_view(t: Any, nbytes: int) -> memoryview:
    """A writable byte memoryview of a contiguous CPU tensor's elements, no copy.

    torch has no buffer-protocol export and numpy is optional, so this wraps the
    data pointer in a ctypes array that references the tensor (keeping its memory
    alive for as long as the memoryview or any slice of it lives). Array types are
    sized to the next power of two and the view is sliced to ``nbytes``: ctypes
    caches every array type it creates, and exact sizes would grow that cache
    without bound; nothing ever reads past ``nbytes``.
    """
    size = 1 << (nbytes - 1).bit_length()
    span_type = _ctypes_spans.get(size)
    if span_type is None:
        span_type = _ctypes_spans[size] = ctypes.c_char * size
    span: Any = span_type.from_address(t.data_ptr())
    span._tensor = t
    return memoryview(span).cast("B")[:nbytes]


class _TorchCodec(_Codec):
    __slots__ = ()

    def encode(self, obj: Any, enc: _Encoder) -> int | None:
        try:
            return self._encode(obj, enc)
        except Exception as exc:
            raise CodecError(
                f"cannot serialize object of type {_type_name(type(obj))!r} with the "
                f"torch.Tensor codec: {exc!r}"
            ) from exc

    def _encode(self, obj: Any, enc: _Encoder) -> int | None:
        torch = sys.modules["torch"]
        cls = type(obj)
        if cls is torch.Tensor:
            sub = None
        elif cls is torch.nn.Parameter:
            sub = "Parameter"
        else:
            # Other subclasses may carry state or behaviour we cannot rebuild.
            return None
        if not _torch_dtype_names:
            _torch_tables(torch)
        dtype = _torch_dtype_names.get(obj.dtype)
        device = obj.device.type
        if (
            dtype is None
            or obj.layout is not torch.strided
            or device not in ("cpu", "cuda")
            or obj.is_quantized
            or obj.is_nested
            or obj.__dict__  # attributes set on the tensor: torch's pickling keeps them
        ):
            # Sparse, quantized, meta, nested and exotic tensors: torch's own pickling.
            return None
        # A non-leaf tensor travels as its data with the requires_grad flag: it
        # arrives as a leaf, since the graph behind it cannot travel.
        t = obj.detach()
        if t.is_conj():
            t = t.resolve_conj()
        if t.is_neg():
            t = t.resolve_neg()
        desc: dict[str, Any] = {
            "codec": "torch",
            "dtype": dtype,
            "shape": list(t.shape),
            "requires_grad": obj.requires_grad,
        }
        if sub is not None:
            desc["sub"] = sub
        if device == "cuda":
            desc["device"] = f"cuda:{t.device.index or 0}"
            t = t.cpu()
        numel = t.numel()
        if numel:
            if not t.is_contiguous():
                perm = _dense_perm(t.shape, t.stride(), 1)
                if perm is not None and t.permute(perm).is_contiguous():
                    # Dense but permuted (a transpose, channels_last): send as is.
                    t = t.permute(perm)
                    desc["perm"] = perm
                else:
                    # Send only the view's elements, compactly.
                    t = t.contiguous()
            enc.attach(desc, _tensor_view(t, numel * t.element_size()))
        return enc.add(desc)


def _decode_torch(desc: dict[str, Any], dec: _Decoder) -> Any:
    torch = _import("torch")
    if not _torch_dtypes:
        _torch_tables(torch)
    dtype = _torch_dtypes.get(desc.get("dtype"))  # type: ignore[arg-type]
    if dtype is None:
        raise CodecError(f"unsupported torch dtype {desc.get('dtype')!r}")
    shape = _shape(desc)
    perm = _perm(desc, len(shape))
    numel = _numel(shape)
    if numel == 0:
        t = torch.empty(shape, dtype=dtype)
    else:
        mv = dec.buffer(desc)
        if mv.nbytes != numel * dtype.itemsize:
            raise CodecError(
                f"buffer holds {mv.nbytes} bytes, but a {dtype} tensor of shape "
                f"{shape} needs {numel * dtype.itemsize}"
            )
        t = torch.frombuffer(mv, dtype=dtype)
        if t.data_ptr() % dtype.itemsize:
            t = t.clone()  # misaligned frame memory: kernels assume aligned elements
        if perm is None:
            t = t.view(shape)
        else:
            t = t.view([shape[p] for p in perm]).permute(_inverse(perm))
    device = desc.get("device")
    if device is not None:
        t = _to_device(torch, t, device, dec)
    requires_grad = desc.get("requires_grad", False)
    if type(requires_grad) is not bool:
        raise CodecError(f"bad requires_grad {requires_grad!r}")
    sub = desc.get("sub")
    if sub == "Parameter":
        return torch.nn.Parameter(t, requires_grad=requires_grad)
    if sub is not None:
        raise CodecError(f"unknown tensor subclass {sub!r}")
    if requires_grad:
        t.requires_grad_(True)
    return t


def _to_device(torch: Any, t: Any, device: Any, dec: _Decoder) -> Any:
    if not isinstance(device, str) or not device.startswith("cuda:") or not device[5:].isdigit():
        raise CodecError(f"bad device {device!r}")
    index = int(device[5:])
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if index < count:
        return t.to(device)
    if not dec.warned:
        dec.warned = True
        warnings.warn(
            f"asyncmirai: received a tensor from {device}, but this process has "
            f"{count} usable CUDA device(s); loading it on the CPU instead",
            RuntimeWarning,
            stacklevel=2,
        )
    return t


# --------------------------------------------------------------------------------
# numpy

# Kinds whose bytes are the values: no object pointers (O) or string arenas (T).
_NUMPY_KINDS: Final = frozenset("biufcmMSUV")


class _NumpyCodec(_Codec):
    __slots__ = ()

    def encode(self, obj: Any, enc: _Encoder) -> int | None:
        np = sys.modules["numpy"]
        if type(obj) is not np.ndarray:
            return None  # subclasses (matrix, masked arrays, memmap) pickle themselves
        dt = obj.dtype
        if dt.kind not in _NUMPY_KINDS or dt.fields is not None or dt.subdtype is not None:
            return None  # object and structured dtypes: numpy's own pickling
        desc = {"codec": "numpy", "dtype": dt.str, "shape": list(obj.shape)}
        if obj.nbytes:
            a = obj
            if not a.flags.c_contiguous:
                perm = _dense_perm(a.shape, a.strides, a.itemsize)
                if perm is not None and a.transpose(perm).flags.c_contiguous:
                    # Fortran order and other dense permutations: send as is.
                    a = a.transpose(perm)
                    desc["perm"] = perm
                else:
                    a = a.copy(order="C")
            enc.attach(desc, memoryview(a.reshape(-1).view(np.uint8)))
        return enc.add(desc)


def _decode_numpy(desc: dict[str, Any], dec: _Decoder) -> Any:
    np = _import("numpy")
    name = desc.get("dtype")
    if not isinstance(name, str):
        raise CodecError(f"bad numpy dtype {name!r}")
    dt = np.dtype(name)
    if dt.kind not in _NUMPY_KINDS or dt.fields is not None or dt.subdtype is not None:
        # Never build object arrays from raw bytes: they would be pointers.
        raise CodecError(f"unsupported numpy dtype {name!r}")
    shape = _shape(desc)
    perm = _perm(desc, len(shape))
    nbytes = _numel(shape) * dt.itemsize
    if nbytes == 0:
        return np.zeros(shape, dtype=dt)
    mv = dec.buffer(desc)
    if mv.nbytes != nbytes:
        raise CodecError(
            f"buffer holds {mv.nbytes} bytes, but a {dt} array of shape {shape} needs {nbytes}"
        )
    if perm is None:
        return np.ndarray(shape, dtype=dt, buffer=mv)
    return np.ndarray([shape[p] for p in perm], dtype=dt, buffer=mv).transpose(_inverse(perm))


# --------------------------------------------------------------------------------
# user codecs and pickle buffers


def _user_codec(desc: dict[str, Any], dec: _Decoder) -> _UserCodec:
    key = desc.get("cls")
    codec = dec.table._custom.get(key) if isinstance(key, str) else None
    if codec is None:
        raise CodecError(
            f"the message holds objects encoded with a custom codec for {key!r}, but "
            f"no serial_config for it is registered here"
        )
    return codec


def _decode_custom(desc: dict[str, Any], dec: _Decoder) -> Any:
    codec = _user_codec(desc, dec)
    mv = dec.buffer(desc)
    try:
        return codec.config.ufunc(mv)
    except Exception as exc:
        raise CodecError(f"the ufunc of the codec for {codec.key!r} failed: {exc!r}") from exc


def _decode_custom_vec(desc: dict[str, Any], dec: _Decoder) -> Any:
    index, i = desc.get("group"), desc.get("i")
    if type(index) is not int or type(i) is not int:
        raise CodecError(f"bad vectorized reference {desc!r:.200}")
    objs = dec.groups.get(index)
    if objs is None:
        if not 0 <= index < len(dec.descriptors):
            raise CodecError(f"vectorized reference to missing descriptor {index}")
        group = dec.descriptors[index]
        if not isinstance(group, dict) or group.get("codec") != "custom-vec-group":
            raise CodecError(f"descriptor {index} is not a vectorized group")
        codec = _user_codec(group, dec)
        mv = dec.buffer(group)
        try:
            objs = codec.config.ufunc(mv)
        except Exception as exc:
            raise CodecError(
                f"the ufunc of the vectorized codec for {codec.key!r} failed: {exc!r}"
            ) from exc
        n = group.get("n")
        if not isinstance(objs, Sequence) or len(objs) != n:
            raise CodecError(
                f"the ufunc of the vectorized codec for {codec.key!r} must return a "
                f"list of {n} objects, got {type(objs).__name__}"
                + (f" of length {len(objs)}" if isinstance(objs, Sequence) else "")
            )
        dec.groups[index] = objs
    if not 0 <= i < len(objs):
        raise CodecError(f"vectorized reference {i} out of range")
    return objs[i]


def _not_referenced(desc: dict[str, Any], dec: _Decoder) -> Any:
    raise CodecError(
        f"descriptor of kind {desc.get('codec')!r} cannot be referenced from the pickle"
    )


_DECODERS: Final[dict[str, Callable[[dict[str, Any], _Decoder], Any]]] = {
    "torch": _decode_torch,
    "numpy": _decode_numpy,
    "custom": _decode_custom,
    "custom-vec": _decode_custom_vec,
    "custom-vec-group": _not_referenced,
    "pickle-buffer": _not_referenced,
}

_DEFAULT_CODECS: Final[dict[str, _Codec]] = {
    "torch.Tensor": _TorchCodec("torch.Tensor"),
    "numpy.ndarray": _NumpyCodec("numpy.ndarray"),
}

DEFAULT_TABLE: Final = CodecTable()
"""The table with only the built-in codecs (torch.Tensor, numpy.ndarray)."""


class TableRef:
    """The one owner of a profile's codec table: the profile encodes arguments and the
    dispatcher decodes results through the same reference, so ``everywhere(_serial=)``
    extends both at once."""

    __slots__ = ("table",)

    def __init__(self, table: CodecTable) -> None:
        self.table = table

    def extend(self, configs: Iterable[SerialConfig]) -> None:
        """Register more codecs (a new table: tables are shared and never mutated)."""
        self.table = self.table.extend(configs)
