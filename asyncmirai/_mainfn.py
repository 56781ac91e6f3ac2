"""Functions from scripts and notebooks (``__main__``), pickled by value once, not per call.

cloudpickle serialises a function that cannot be imported by name (defined in
``__main__``, a notebook cell, a lambda, a closure) *by value*: its code, defaults,
closure cells and the globals its code names.  Measured on the dev VM: ~50 µs to pickle
a small script function on the host and ~18 µs to unpickle it on the daemon, against a
~75 µs round trip for an importable function.

Both sides cache, without changing what a call sees:

* **Host.**  The pickled bytes are kept per function object with a *fingerprint*: the
  identity of its code, defaults, name, closure cells' contents and every global its
  code names (cloudpickle's own rule: names of ``LOAD_GLOBAL``/``STORE_GLOBAL`` in the
  code and its nested code objects).  A function is cached only when every such value
  is immutable all the way down (numbers, strings, bytes, tuples and frozensets of them,
  modules, classes and functions importable by name, or other cacheable ``__main__``
  functions, checked the same way at each call).  Then unchanged identities mean
  unchanged bytes, and a rebound global, default or cell is seen at the next call.  A
  function naming a mutable global (a list, a dict, an object, a ``__main__`` class) is
  pickled on every call, as before.
* **Daemon.**  A blob it has seen is looked up by its bytes and the function built the
  first time is reused, unless the code rebinds globals or its closure's cells
  (``global x; x = ...``): such a function is unpickled afresh for every call, so each
  call starts from the host's values, as without the cache.

Left alone: a task that assigns attributes to its own function object (``f.calls += 1``)
would see them again on the same daemon for a cached function.
"""

from __future__ import annotations

import dis
import pickle
import sys
import weakref
from types import BuiltinFunctionType, CodeType, FunctionType, ModuleType
from typing import Any

__all__ = ["by_value", "cached_function", "fresh_function"]

_MAX_BLOB = 1 << 20  # larger functions (big constants) are not kept by either side
_MAX_ENTRIES = 256
_MISSING = object()
_IMMUTABLE = frozenset({int, float, bool, str, bytes, complex, type(None), type(Ellipsis)})
_GLOBAL_OPS = frozenset(dis.opmap[n] for n in ("LOAD_GLOBAL", "STORE_GLOBAL", "DELETE_GLOBAL"))
_REBIND_GLOBAL = frozenset(dis.opmap[n] for n in ("STORE_GLOBAL", "DELETE_GLOBAL"))
_REBIND_CELL = frozenset(dis.opmap[n] for n in ("STORE_DEREF", "DELETE_DEREF"))


# -------------------------------------------------------------------------- daemon side

_functions: dict[bytes, Any] = {}


def cached_function(blob: bytes) -> Any:
    """The function pickled in ``blob``, built once per daemon (see the module doc)."""
    fn = _functions.get(blob)
    if fn is None:
        fn = pickle.loads(blob)
        if len(_functions) >= _MAX_ENTRIES:
            _functions.clear()
        _functions[blob] = fn
    return fn


def fresh_function(blob: bytes) -> Any:
    """The function pickled in ``blob``, built anew (its code rebinds globals or cells)."""
    return pickle.loads(blob)


# ---------------------------------------------------------------------------- host side


class _Code:
    """What a code object tells once: the global names it uses, whether it rebinds any."""

    __slots__ = ("names", "pure")

    def __init__(self, code: CodeType) -> None:
        names: dict[str, None] = {}
        pure = True
        todo = [code]
        while todo:
            co = todo.pop()
            for ins in dis.get_instructions(co):
                if ins.opcode in _GLOBAL_OPS:
                    names[ins.argval] = None
                    pure = pure and ins.opcode not in _REBIND_GLOBAL
                elif ins.opcode in _REBIND_CELL and co is code and ins.argval in co.co_freevars:
                    pure = False  # ``nonlocal x; x = ...`` on the closure we ship
            todo += [c for c in co.co_consts if isinstance(c, CodeType)]
        self.names = tuple(names)
        self.pure = pure


_codes: dict[CodeType, _Code] = {}


def _analyse(code: CodeType) -> _Code:
    got = _codes.get(code)
    if got is None:
        if len(_codes) >= _MAX_ENTRIES:
            _codes.clear()
        got = _codes[code] = _Code(code)
    return got


class _Entry:
    """A function's pickled bytes and the fingerprint they were made from."""

    __slots__ = (
        "attrs",
        "blob",
        "cells",
        "code",
        "defaults",
        "deps",
        "globals",
        "kwdefaults",
        "meta",
        "pure",
        "stand_in",
    )

    def __init__(self, fn: FunctionType, code: _Code) -> None:
        self.code = fn.__code__
        self.pure = code.pure
        self.defaults = fn.__defaults__
        self.kwdefaults = _items(fn.__kwdefaults__)
        self.attrs = _items(fn.__dict__)
        self.meta = _meta(fn)
        self.cells = tuple(c.cell_contents for c in fn.__closure__ or ())
        g = fn.__globals__
        self.globals = tuple((n, g.get(n, _MISSING)) for n in code.names)
        self.deps: list[tuple[FunctionType, _Entry]] = []  # other script functions it names
        self.blob = b""
        self.stand_in: _ByValue | None = None


def _items(d: dict[str, Any] | None) -> tuple[Any, ...] | None:
    return tuple(x for kv in d.items() for x in kv) if d else None


def _meta(fn: FunctionType) -> tuple[Any, ...]:
    return (fn.__name__, fn.__qualname__, fn.__module__, fn.__doc__, fn.__annotations__)


#: Weak keys: a cached function (a lambda made per call, a closure over a large object)
#: is not kept alive by the cache.
_entries: weakref.WeakKeyDictionary[FunctionType, _Entry | None] = weakref.WeakKeyDictionary()


class _ByValue:
    """Stands for a ``__main__`` function in a task's pickle: its cached bytes."""

    __slots__ = ("blob", "load")

    def __init__(self, blob: bytes, pure: bool) -> None:
        self.blob = blob
        self.load = cached_function if pure else fresh_function

    def __reduce__(self) -> tuple[Any, tuple[bytes]]:
        return self.load, (self.blob,)


def by_value(fn: FunctionType) -> _ByValue | None:
    """A stand-in that pickles as ``fn`` by value without pickling it again, or ``None``
    when ``fn`` names mutable state (then the caller pickles ``fn`` as usual)."""
    entry = _entries.get(fn, _MISSING)
    if entry is not _MISSING:
        if entry is None:
            return None  # not cacheable: its globals or defaults hold mutable values
        assert isinstance(entry, _Entry)
        if _valid(fn, entry):
            return entry.stand_in
    made = _make(fn)
    if len(_entries) >= _MAX_ENTRIES:
        _entries.clear()
    _entries[fn] = made
    if made is None:
        return None
    made.stand_in = _ByValue(made.blob, made.pure)
    return made.stand_in


def _valid(fn: FunctionType, e: _Entry) -> bool:
    """Whether ``fn`` would still pickle to ``e.blob`` (identities unchanged)."""
    if fn.__code__ is not e.code or fn.__defaults__ is not e.defaults:
        return False
    kw = fn.__kwdefaults__
    if (kw or e.kwdefaults) and not _same(_items(kw), e.kwdefaults):
        return False
    attrs = fn.__dict__
    if (attrs or e.attrs) and not _same(_items(attrs), e.attrs):
        return False
    if not _same(_meta(fn), e.meta):
        return False
    closure = fn.__closure__
    if closure:
        for cell, v in zip(closure, e.cells, strict=True):
            try:
                if cell.cell_contents is not v:
                    return False
            except ValueError:  # the cell was emptied (``del``)
                return False
    g = fn.__globals__
    for name, v in e.globals:
        if g.get(name, _MISSING) is not v:
            return False
    # ``deps`` lists every script function reachable from ``fn`` (flat, each once)
    for dep, de in e.deps:
        if not _valid(dep, de):
            return False
    return True


def _same(a: tuple[Any, ...] | None, b: tuple[Any, ...] | None) -> bool:
    if a is None or b is None:
        return a is b
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):  # noqa: B905 - lengths checked
        if x is not y:
            return False
    return True


def _make(fn: FunctionType) -> _Entry | None:
    """Fingerprint and pickle ``fn``, or ``None`` if it is not cacheable."""
    deps: list[FunctionType] = []
    if not _frozen_function(fn, deps, {id(fn)}):
        return None
    # Fingerprints first, then the bytes: a change in between only makes the next call
    # pickle again (the other order could pair new bytes with an old fingerprint).
    entry = _Entry(fn, _analyse(fn.__code__))
    entry.deps = [(d, _Entry(d, _analyse(d.__code__))) for d in deps]
    import cloudpickle

    blob = cloudpickle.dumps(fn, protocol=5)
    if len(blob) > _MAX_BLOB:
        return None
    entry.blob = blob
    return entry


def _frozen_function(fn: FunctionType, deps: list[FunctionType], seen: set[int]) -> bool:
    code = _analyse(fn.__code__)
    g = fn.__globals__
    values: list[Any] = [g[n] for n in code.names if n in g]
    values += fn.__defaults__ or ()
    values += (fn.__kwdefaults__ or {}).values()
    values += fn.__dict__.values()
    try:
        values += [c.cell_contents for c in fn.__closure__ or ()]
    except ValueError:
        return False
    return all(_frozen(v, deps, seen, 0) for v in values)


def _frozen(v: Any, deps: list[FunctionType], seen: set[int], depth: int) -> bool:
    """Whether ``v`` pickles to the same bytes for as long as its identity holds."""
    t = type(v)
    if t in _IMMUTABLE:
        return True
    if depth > 8:
        return False
    if t is tuple or t is frozenset:
        return all(_frozen(x, deps, seen, depth + 1) for x in v)
    if t is ModuleType:
        return not _pickled_by_value(v.__name__)
    if t is type or t is BuiltinFunctionType or t is FunctionType:
        from ._codecs import _by_reference

        if _by_reference(v):
            return True
        if t is not FunctionType:
            return False  # a class of the script: its attributes can change
        if id(v) in seen:
            return True
        seen.add(id(v))
        if not _frozen_function(v, deps, seen):
            return False
        deps.append(v)  # checked again at every call, as ``fn`` is
        return True
    return False


def _pickled_by_value(module: str) -> bool:
    cloudpickle = sys.modules.get("cloudpickle")
    if cloudpickle is None:
        return False
    registered = cloudpickle.list_registry_pickle_by_value()
    return any(module == m or module.startswith(m + ".") for m in registered)
