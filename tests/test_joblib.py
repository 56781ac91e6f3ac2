"""The joblib backend (``am.register_joblib()``), with real daemons, and scikit-learn on it.

Functions the daemons run are defined here at module level: daemons import this module by
reference (the test directory is on their PYTHONPATH, see conftest.py).
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import threading
import time
import types
from collections.abc import Callable

import pytest

import asyncmirai as am

joblib = pytest.importorskip("joblib")
from joblib import Parallel, delayed, parallel_config  # noqa: E402

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def _registered() -> None:
    am.register_joblib()


# -- functions the daemons run ------------------------------------------------------------
def square_pid(i: int) -> tuple[int, int]:
    return i * i, os.getpid()


def inverse(x: int) -> float:
    return 1 / x


class CustomError(Exception):
    def __init__(self, msg: str, code: int) -> None:
        super().__init__(msg, code)
        self.code = code


def raise_custom(code: int) -> None:
    raise CustomError("custom failure", code)


def fail_or_sleep(i: int) -> int:
    if i == 0:
        raise ValueError("first task fails")
    time.sleep(300)  # only ends early if the abort interrupts it
    return i


def nested() -> tuple[int, list[int], str]:
    """A Parallel call inside a task: sequential, in this daemon."""
    from joblib.parallel import get_active_backend

    inner = Parallel(n_jobs=2)(delayed(os.getpid)() for _ in range(4))
    return os.getpid(), inner, type(get_active_backend()[0]).__name__


def daemon_pids(compute: str = "default") -> set[int]:
    return {d.pid for d in am.status(compute).daemons}


def wait_for(cond: Callable[[], bool]) -> None:
    """Poll a condition; the test's timeout bounds the wait."""
    while not cond():
        time.sleep(0.02)


# -- registration ---------------------------------------------------------------------------
def test_import_asyncmirai_does_not_import_joblib() -> None:
    code = (
        "import sys, asyncmirai as am\n"
        "assert 'joblib' not in sys.modules\n"
        "am.register_joblib  # the attribute alone does not import joblib either\n"
        "assert 'joblib' not in sys.modules, 'attribute access imported joblib'\n"
        "am.register_joblib()\n"
        "assert 'joblib' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_register_is_idempotent() -> None:
    from joblib.parallel import BACKENDS

    am.register_joblib()
    first = BACKENDS["asyncmirai"]
    am.register_joblib()
    assert BACKENDS["asyncmirai"] is first
    assert first.__name__ == "AsyncMiraiBackend"
    from asyncmirai import _joblib

    assert _joblib.AsyncMiraiBackend is first  # importable by name (picklable by reference)


# -- Parallel on daemons -----------------------------------------------------------------------
def test_parallel_runs_on_the_daemons() -> None:
    with am.daemons(2), parallel_config(backend="asyncmirai"):
        out = Parallel(n_jobs=2)(delayed(square_pid)(i) for i in range(50))
        assert [v for v, _ in out] == [i * i for i in range(50)]
        pids = {p for _, p in out}
        assert os.getpid() not in pids
        assert pids <= daemon_pids()
        assert am.info()["completed"] >= 1


def test_effective_n_jobs_follows_the_daemons() -> None:
    with am.daemons(3), parallel_config(backend="asyncmirai"):
        assert joblib.effective_n_jobs(-1) == 3
        assert joblib.effective_n_jobs(None) == 3  # default_n_jobs = -1
        assert joblib.effective_n_jobs(-2) == 2
        assert joblib.effective_n_jobs(2) == 2
        assert joblib.effective_n_jobs(10) == 3
        assert joblib.effective_n_jobs(1) == 1  # asked for sequential: joblib's rule
        with pytest.raises(ValueError):
            joblib.effective_n_jobs(0)


def test_one_daemon_still_gets_the_work() -> None:
    # joblib runs an effective n_jobs of 1 in this process: the backend reports 2 so a
    # one-daemon profile (a GPU profile, say) still runs the work.
    with am.daemons(1), parallel_config(backend="asyncmirai"):
        assert joblib.effective_n_jobs(-1) == 2
        out = Parallel()(delayed(square_pid)(i) for i in range(6))
        assert [v for v, _ in out] == [i * i for i in range(6)]
        assert {p for _, p in out} == daemon_pids()


def test_compute_profile_from_parallel_config_and_parallel() -> None:
    with am.daemons(1, compute="jl-other"):
        assert not am.daemons_set()  # no default profile: only "jl-other" can run it
        with parallel_config(backend="asyncmirai", compute="jl-other"):
            out = Parallel(n_jobs=2)(delayed(square_pid)(i) for i in range(8))
        assert {p for _, p in out} == daemon_pids("jl-other")
        from asyncmirai._joblib import AsyncMiraiBackend

        backend = AsyncMiraiBackend(compute="jl-other")  # an instance as Parallel's backend
        out = Parallel(backend=backend, n_jobs=2)(delayed(square_pid)(i) for i in range(8))
        assert [v for v, _ in out] == [i * i for i in range(8)]
        assert {p for _, p in out} == daemon_pids("jl-other")
        if any(p.kind is p.VAR_KEYWORD for p in inspect.signature(Parallel).parameters.values()):
            # joblib >= 1.5 passes Parallel(**backend_kwargs) to the backend's configure()
            out = Parallel(backend="asyncmirai", n_jobs=2, compute="jl-other")(
                delayed(square_pid)(i) for i in range(8)
            )
            assert {p for _, p in out} == daemon_pids("jl-other")


def test_sync_profile() -> None:
    with am.daemons(sync=True), parallel_config(backend="asyncmirai"):
        out = Parallel(n_jobs=2)(delayed(square_pid)(i) for i in range(10))
        assert [v for v, _ in out] == [i * i for i in range(10)]


def test_no_daemons_is_a_clear_error() -> None:
    assert not am.daemons_set()
    with parallel_config(backend="asyncmirai"):
        with pytest.raises(RuntimeError, match=r"no daemons.*call am\.daemons\(n\) first"):
            Parallel(n_jobs=2)(delayed(square_pid)(i) for i in range(4))
    with parallel_config(backend="asyncmirai", compute="jl-absent"):
        with pytest.raises(RuntimeError, match=r"am\.daemons\(n, compute='jl-absent'\)"):
            Parallel(n_jobs=2)(delayed(square_pid)(i) for i in range(4))


def test_return_as_generators() -> None:
    with am.daemons(2), parallel_config(backend="asyncmirai"):
        gen = Parallel(n_jobs=2, return_as="generator")(delayed(square_pid)(i) for i in range(20))
        assert not isinstance(gen, list)
        assert [v for v, _ in gen] == [i * i for i in range(20)]
        try:
            unordered = Parallel(n_jobs=2, return_as="generator_unordered")
        except ValueError:  # joblib < 1.4
            return
        gen = unordered(delayed(square_pid)(i) for i in range(20))
        assert sorted(v for v, _ in gen) == [i * i for i in range(20)]


def test_one_parallel_object_for_several_calls() -> None:
    with am.daemons(2), parallel_config(backend="asyncmirai"):
        with Parallel(n_jobs=2) as parallel:  # joblib keeps the backend configured
            first = parallel(delayed(square_pid)(i) for i in range(10))
            second = parallel(delayed(square_pid)(i) for i in range(10, 20))
        assert [v for v, _ in first + second] == [i * i for i in range(20)]
        assert {p for _, p in first + second} <= daemon_pids()


def test_batches_hold_several_calls() -> None:
    with am.daemons(2), parallel_config(backend="asyncmirai"):
        before = am.info()["submitted"]
        out = Parallel(n_jobs=2, batch_size=10)(delayed(square_pid)(i) for i in range(100))
        assert [v for v, _ in out] == [i * i for i in range(100)]
        assert am.info()["submitted"] - before < 100  # batched: fewer mirai than calls


def test_auto_batching_grows_fast_batches() -> None:
    from asyncmirai._joblib import AsyncMiraiBackend

    backend = AsyncMiraiBackend()
    backend.parallel = types.SimpleNamespace(verbose=0)
    assert backend.compute_batch_size() == 1
    backend.batch_completed(1, 0.001)  # a batch far faster than the ideal duration
    assert backend.compute_batch_size() > 1
    backend.terminate()
    assert backend.compute_batch_size() == 1


# -- errors and abort ---------------------------------------------------------------------
def test_exceptions_keep_their_type() -> None:
    with am.daemons(2), parallel_config(backend="asyncmirai"):
        with pytest.raises(ZeroDivisionError, match="^division by zero$") as info:
            Parallel(n_jobs=2)(delayed(inverse)(x) for x in [1, 2, 0, 4])
        assert "ZeroDivisionError" in str(info.value.__cause__)  # the daemon's traceback
        assert "inverse" in str(info.value.__cause__)
        with pytest.raises(CustomError) as info2:
            Parallel(n_jobs=2)(delayed(raise_custom)(c) for c in [7])
        assert info2.value.code == 7
        # the daemons survive and the backend works after errors
        assert Parallel(n_jobs=2)(delayed(inverse)(x) for x in [1, 2]) == [1.0, 0.5]


def test_unserializable_argument_raises_instead_of_hanging() -> None:
    with am.daemons(2), parallel_config(backend="asyncmirai"):
        with pytest.raises(TypeError, match="cannot serialize"):
            Parallel(n_jobs=2)(delayed(square_pid)(threading.Lock()) for _ in range(3))


def test_abort_cancels_outstanding_tasks() -> None:
    with am.daemons(2), parallel_config(backend="asyncmirai"):
        with pytest.raises(ValueError, match="first task fails"):
            Parallel(n_jobs=2, batch_size=1, pre_dispatch="all")(
                delayed(fail_or_sleep)(i) for i in range(6)
            )
        # the five sleeping tasks (two running, three queued) were cancelled ...
        wait_for(lambda: am.info()["cancelled"] == 5)
        assert am.status().awaiting == 0
        # ... and the daemons are free: this would wait 300 s for the sleepers otherwise
        out = Parallel(n_jobs=2)(delayed(square_pid)(i) for i in range(4))
        assert [v for v, _ in out] == [0, 1, 4, 9]


def test_nested_parallel_runs_sequentially_on_the_daemon() -> None:
    with am.daemons(2), parallel_config(backend="asyncmirai"):
        out = Parallel(n_jobs=2)(delayed(nested)() for _ in range(2))
        for outer, inner, backend in out:
            assert outer in daemon_pids()
            assert inner == [outer] * 4
            assert backend == "SequentialBackend"


# -- scikit-learn ---------------------------------------------------------------------------
def test_sklearn_cross_val_score_and_grid_search() -> None:
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_iris
    from sklearn.model_selection import GridSearchCV, cross_val_score
    from sklearn.tree import DecisionTreeClassifier

    X, y = load_iris(return_X_y=True)
    est = DecisionTreeClassifier(random_state=0)
    grid = {"max_depth": [1, 2, 3, None], "min_samples_leaf": [1, 5]}
    seq_scores = cross_val_score(est, X, y, cv=5)
    seq_search = GridSearchCV(est, grid, cv=3).fit(X, y)

    with am.daemons(2), parallel_config(backend="asyncmirai"):
        before = am.info()["completed"]
        scores = cross_val_score(est, X, y, cv=5, n_jobs=2)
        assert list(scores) == list(seq_scores)
        after_cv = am.info()["completed"]
        assert after_cv > before  # the folds ran on the daemons

        search = GridSearchCV(est, grid, cv=3, n_jobs=-1).fit(X, y)
        assert search.best_params_ == seq_search.best_params_
        assert list(search.cv_results_["mean_test_score"]) == list(
            seq_search.cv_results_["mean_test_score"]
        )
        assert am.info()["completed"] > after_cv
