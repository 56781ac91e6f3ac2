"""Running one call: a function or a code string, with its seed; chunks of a map.

Shared by the daemon (``_daemon``), the host's ``sync=True`` mode (``_api``) and
``mirai_map`` chunks (``_map``): the same evaluation and the same error records
wherever a task runs.
"""

from __future__ import annotations

import ast
import sys
import traceback
from collections.abc import Sequence
from typing import Any

__all__ = [
    "CALL",
    "CODE",
    "apply_seed",
    "drop_put",
    "error_record",
    "eval_code",
    "fetch_put",
    "identity",
    "run_chunk",
    "store_put",
]

# Payload kinds inside a task body (see ``_payload``).
CALL, CODE = 0, 1


def eval_code(code: str, namespace: dict[str, Any]) -> Any:
    """Run ``code`` (statements allowed) in ``namespace``; return the last expression's value."""
    tree = ast.parse(code, "<mirai>", "exec")
    last: ast.Expression | None = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        tail = tree.body.pop()
        assert isinstance(tail, ast.Expr)
        last = ast.Expression(tail.value)
    if tree.body:
        exec(compile(tree, "<mirai>", "exec"), namespace)
    if last is not None:
        return eval(compile(last, "<mirai>", "eval"), namespace)
    return None


def error_record(exc: BaseException) -> tuple[str, str, str, bytes | None]:
    """Describe an exception for the host: (type name, message, traceback, pickled or None)."""
    t = type(exc)
    name = t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"
    tb = "".join(traceback.format_exception(t, exc, exc.__traceback__))
    try:
        import cloudpickle

        blob: bytes | None = cloudpickle.dumps(exc, protocol=5)
    except Exception:
        blob = None
    try:
        message = str(exc)
    except Exception:
        message = "<unprintable>"
    return (name, message, tb, blob)


def run_chunk(
    fn: Any, chunk: Sequence[tuple[Any, ...]], kwargs: dict[str, Any]
) -> tuple[list[Any], dict[int, Any]]:
    """Evaluate ``fn`` over a chunk of ``mirai_map`` rows.

    Returns the values (None where an element failed) and ``{index: error record}``: a
    flat list of values pickles much faster than a list of (ok, value) pairs.
    """
    values: list[Any] = []
    errors: dict[int, Any] = {}
    single = kwargs.pop("__single__", False)  # rows are the elements of one iterable
    for i, row in enumerate(chunk):
        try:
            values.append(fn(row, **kwargs) if single else fn(*row, **kwargs))
        except Exception as exc:  # one element's error does not sink the chunk
            values.append(None)
            errors[i] = error_record(exc)
    return values, errors


def apply_seed(seed: Any) -> None:
    """Seed ``random``, and numpy and torch if loaded, for one task (``daemons(seed=)``)."""
    if seed is None:
        return
    import random

    random.seed(seed)
    np = sys.modules.get("numpy")
    if np is not None:
        np.random.seed(seed % (1 << 32))
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.manual_seed(seed)


def identity(value: Any) -> Any:
    """What a resolved handle unpickles to on the daemon: its value."""
    return value


#: Objects sent once with ``am.put`` and cached on this daemon, by id.  The host decides
#: what is here: it sends an object before the first task that uses it on this daemon,
#: and drops the oldest past ``am.put``'s bound (``_scheduler.PUT_CACHE_ENTRIES``) and
#: whatever it garbage-collected.
_PUTS: dict[int, Any] = {}


def store_put(put_id: int, obj: Any) -> None:
    """Cache an ``am.put`` object (daemon side)."""
    _PUTS[put_id] = obj


def drop_put(put_id: int) -> None:
    """Forget an ``am.put`` object (daemon side)."""
    _PUTS.pop(put_id, None)


def fetch_put(put_id: int) -> Any:
    """What an ``am.put`` reference unpickles to on a daemon: the cached object."""
    try:
        return _PUTS[put_id]
    except KeyError:
        raise LookupError(
            f"am.put object {put_id} is not cached on this daemon (its reference was "
            "garbage-collected on the host, or the host dropped it)"
        ) from None
