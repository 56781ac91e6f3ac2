"""A joblib parallel backend over a compute profile: ``am.register_joblib()``.

After ``am.register_joblib()``, ``joblib.parallel_config(backend="asyncmirai")`` runs
``joblib.Parallel`` work, and with it scikit-learn's ``n_jobs=`` paths
(``cross_val_score``, ``GridSearchCV``, ...), on the daemons of a compute profile::

    import asyncmirai as am
    import joblib

    am.daemons(4)
    am.register_joblib()
    with joblib.parallel_config(backend="asyncmirai"):            # profile "default"
        out = joblib.Parallel(n_jobs=-1)(joblib.delayed(f)(x) for x in xs)
    with joblib.parallel_config(backend="asyncmirai", compute="gpu"):
        search.fit(X, y)

joblib stays an optional dependency: nothing here imports it before ``register_joblib()``
is called (the backend class is built then).

How it maps onto joblib's ``ParallelBackendBase``:

- each joblib batch (a ``BatchedCalls``: several ``delayed`` calls) is one
  :func:`~asyncmirai.mirai` on the profile; joblib's auto-batching (``batch_size="auto"``)
  tunes how many calls go in one;
- ``effective_n_jobs``: ``-1`` (joblib's default for this backend) means one worker per
  daemon of the profile, ``-2`` one fewer, and a positive ``n_jobs`` is capped at the
  number of daemons.  joblib runs a call whose effective ``n_jobs`` is 1 in the calling
  process, so with a single daemon the backend reports 2 unless ``n_jobs=1`` was asked:
  the work still goes to that daemon (a profile's one GPU daemon, say);
- results are collected on a callback thread of the backend, never on the dispatcher's
  thread, which then also submits joblib's next batch;
- a task that raised re-raises, from ``Parallel``, the exception the function raised (its
  own type and message), with the daemon's traceback chained as its ``__cause__``, as
  joblib's loky backend does;
- on the first error (or when a ``return_as="generator"`` is dropped) joblib aborts:
  every task this backend has outstanding is cancelled, queued ones dequeued and running
  ones interrupted on their daemons;
- ``Parallel`` calls nested inside a task run sequentially on that daemon (a daemon cannot
  submit work to the host's profile).
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from ._errors import MiraiError
from ._threads import start_thread

__all__ = ["register_joblib"]

BACKEND_NAME = "asyncmirai"


class _RemoteTraceback(Exception):
    """The daemon's formatted traceback, chained under the re-raised exception."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return "\n" + self.tb.rstrip()


def _unwrap(exc: BaseException) -> BaseException:
    """The exception to hand joblib for a failed task: the function's own exception
    when the host could unpickle it (so ``except ZeroDivisionError`` and messages match,
    whether or not the :class:`MiraiError` is also an instance of its class), else the
    error as is (a :class:`MiraiError` whose class is absent here, a ``DaemonError``...).
    """
    if isinstance(exc, MiraiError):
        orig = exc.__cause__
        if isinstance(orig, BaseException) and orig is not exc:
            if orig.__cause__ is None and exc.remote_traceback:
                orig.__cause__ = _RemoteTraceback(exc.remote_traceback)
            return orig
    return exc


def _no_daemons(compute: str | None) -> RuntimeError:
    name = "default" if compute is None else compute
    how = "am.daemons(n)" if compute in (None, "default") else f"am.daemons(n, compute={name!r})"
    return RuntimeError(
        f"the asyncmirai joblib backend has no daemons: none are set for compute profile "
        f"{name!r}; call {how} first"
    )


def _resolve_profile(compute: str | None) -> Any:
    """The :class:`~asyncmirai._profile.Profile` joblib work goes to, or a clear error."""
    from . import _api

    try:
        return _api._profile(compute)
    except RuntimeError:
        raise _no_daemons(compute) from None


def _daemon_count(prof: Any) -> int:
    """Daemons of the profile now: connected ones, or its local target while they
    connect (``am.daemons(n)`` returns before they do)."""
    from . import _api

    connected = _api.status(prof.compute).connections
    return max(int(connected), int(getattr(prof, "n_local", 0) or 0))


@functools.cache
def _backend_class() -> type[Any]:
    """Build the backend class (imports joblib: called by :func:`register_joblib`)."""
    from joblib._parallel_backends import (
        AutoBatchingMixin,
        ParallelBackendBase,
        SequentialBackend,
    )

    class AsyncMiraiBackend(AutoBatchingMixin, ParallelBackendBase):  # type: ignore[misc]
        """joblib backend whose batches are mirai on a compute profile's daemons.

        Args:
            compute: the compute profile (default: the current default profile, read when
                a ``Parallel`` call starts).  Also accepted by ``Parallel(...,
                compute=...)`` for one call.
        """

        default_n_jobs = -1
        supports_retrieve_callback = True  # results are collected on our callback thread
        supports_timeout = True
        supports_sharedmem = False
        uses_threads = False

        def __init__(
            self,
            nesting_level: int | None = None,
            inner_max_num_threads: int | None = None,
            compute: str | None = None,
            **backend_kwargs: Any,
        ) -> None:
            super().__init__(
                nesting_level=nesting_level,
                inner_max_num_threads=inner_max_num_threads,
                **backend_kwargs,
            )
            self.compute = compute
            self._call_compute: str | None = None  # resolved by configure()
            self._lock = threading.Lock()
            self._live: set[Any] = set()  # outstanding handles, for abort_everything
            self._pending: deque[tuple[Callable[[Any], Any], Any]] = deque()
            self._draining = False

        def __repr__(self) -> str:
            return f"AsyncMiraiBackend(compute={self.compute!r})"

        # -- sizing -------------------------------------------------------------------
        def _target(self) -> str | None:
            return self._call_compute if self._call_compute is not None else self.compute

        def effective_n_jobs(self, n_jobs: int | None) -> int:
            """Workers that can run at once: from the daemons of the profile."""
            if n_jobs == 0:
                raise ValueError("n_jobs == 0 in Parallel has no meaning")
            prof = _resolve_profile(self._target())
            count = max(_daemon_count(prof), 1)
            if n_jobs is None or n_jobs < 0:
                n = max(count + 1 + (-1 if n_jobs is None else n_jobs), 1)
            else:
                n = min(n_jobs, count)
            # joblib runs a one-worker call in this process: keep the work on the daemon
            # unless sequential work (n_jobs=1) was asked for.
            return 2 if n == 1 and n_jobs != 1 else n

        def configure(
            self,
            n_jobs: int = 1,
            parallel: Any = None,
            prefer: str | None = None,
            require: str | None = None,
            compute: str | None = None,
            **backend_kwargs: Any,
        ) -> int:
            """Bind to the profile for this ``Parallel`` call; return its n_jobs."""
            self.parallel = parallel
            # Resolve the profile now, on the caller's thread (the callback thread that
            # submits later batches does not see the caller's context).
            self._call_compute = _resolve_profile(
                compute if compute is not None else self.compute
            ).compute
            return self.effective_n_jobs(n_jobs)

        # -- tasks --------------------------------------------------------------------
        def submit(self, func: Callable[[], Any], callback: Any = None) -> Any:
            """Run one joblib batch as a mirai; ``callback`` runs on our callback thread.

            Returns the handle (a :class:`~asyncmirai.Mirai`; a failed concurrent Future
            when the batch could not even be submitted, so that joblib raises that error
            in the caller's thread instead of waiting for a task that never ran).
            """
            from ._api import mirai

            try:
                handle: Any = mirai(func, _compute=self._target())
            except Exception as exc:  # unpicklable argument, profile reset, queue full
                failed: cf.Future[Any] = cf.Future()
                failed.set_exception(exc)
                if callback is not None:
                    self._post(callback, failed)
                return failed
            with self._lock:
                self._live.add(handle)

            def done(h: Any) -> None:
                with self._lock:
                    self._live.discard(h)
                if callback is not None:
                    self._post(callback, h)

            handle.add_done_callback(done)
            return handle

        # joblib 1.3 calls apply_async (the same contract); newer ones call submit.
        apply_async = submit

        def _post(self, callback: Callable[[Any], Any], handle: Any) -> None:
            """Run ``callback(handle)`` on the backend's callback thread, which exists
            only while callbacks are pending."""
            with self._lock:
                self._pending.append((callback, handle))
                if self._draining:
                    return
                self._draining = True
            try:
                start_thread(self._drain, name="asyncmirai-joblib")
            except RuntimeError:  # no new threads (interpreter shutdown): run them here
                self._drain()

        def _drain(self) -> None:
            while True:
                with self._lock:
                    if not self._pending:
                        self._draining = False
                        return
                    callback, handle = self._pending.popleft()
                try:
                    callback(handle)
                except Exception:  # joblib records a task's error itself; nothing to add
                    pass

        def retrieve_result_callback(self, out: Any) -> Any:
            """The batch's list of results, or raise what the function raised."""
            try:
                return out.result()
            except Exception as exc:
                error = _unwrap(exc)
            raise error

        def abort_everything(self, ensure_ready: bool = True) -> None:
            """Cancel every outstanding task of this backend: dequeue queued ones and
            interrupt running ones (their daemons survive)."""
            with self._lock:
                live = list(self._live)
                self._live.clear()
            for h in live:
                h.cancel()

        def terminate(self) -> None:
            """End of a ``Parallel`` call: forget its profile and batching statistics."""
            self._call_compute = None
            self.reset_batch_stats()

        def get_nested_backend(self) -> tuple[Any, int | None]:
            """``Parallel`` inside a task runs sequentially on its daemon."""
            nesting_level = (self.nesting_level or 0) + 1
            return SequentialBackend(nesting_level=nesting_level), None

    AsyncMiraiBackend.__module__ = __name__  # picklable by reference (module __getattr__)
    AsyncMiraiBackend.__qualname__ = "AsyncMiraiBackend"
    return AsyncMiraiBackend


def register_joblib() -> None:
    """Register the ``"asyncmirai"`` joblib parallel backend (idempotent).

    Then ``joblib.parallel_config(backend="asyncmirai")`` runs ``joblib.Parallel`` work,
    and scikit-learn's ``n_jobs=`` paths, on the daemons of the current default compute
    profile, and ``joblib.parallel_config(backend="asyncmirai", compute="gpu")`` on those
    of another profile.  Each joblib batch is one mirai; ``n_jobs=-1`` (the default under
    this backend) means one worker per daemon; errors re-raise as the exception the
    function raised; on the first error the outstanding tasks are cancelled; ``Parallel``
    calls nested in a task run sequentially on its daemon.  Start daemons first
    (``am.daemons(n)``): a ``Parallel`` call without them raises ``RuntimeError``.

    joblib is an optional dependency (``pip install asyncmirai[joblib]``); it is imported
    here, not by ``import asyncmirai``.  Daemons need joblib installed too.

    Raises:
        ImportError: joblib is not installed.
    """
    try:
        import joblib
    except ImportError as exc:
        raise ImportError(
            "am.register_joblib() needs joblib: pip install 'asyncmirai[joblib]'"
        ) from exc
    joblib.register_parallel_backend(BACKEND_NAME, _backend_class())


def __getattr__(name: str) -> Any:
    if name == "AsyncMiraiBackend":
        return _backend_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
