"""A scikit-learn grid search whose fits run on asyncmirai daemons (through joblib).

scikit-learn parallelises with joblib; `am.register_joblib()` gives joblib an
"asyncmirai" backend, so `n_jobs=-1` means "one worker per daemon" and the code of the
search does not change.  The result is the same as a sequential run.

    python examples/sklearn_grid.py
"""

from __future__ import annotations

import joblib
from sklearn.datasets import load_iris
from sklearn.model_selection import GridSearchCV
from sklearn.svm import SVC

import asyncmirai as am


def search(n_jobs: int) -> GridSearchCV:
    X, y = load_iris(return_X_y=True)
    grid = {"C": [0.1, 1.0, 10.0], "gamma": ["scale", 0.1, 1.0], "kernel": ["rbf", "linear"]}
    return GridSearchCV(SVC(), grid, cv=5, n_jobs=n_jobs).fit(X, y)


def main() -> None:
    sequential = search(n_jobs=1)
    am.register_joblib()
    with am.daemons(2):
        with joblib.parallel_config(backend="asyncmirai"):
            parallel = search(n_jobs=-1)
        info = am.info()
    print(f"best params: {parallel.best_params_}")
    print(f"best score: {parallel.best_score_:.4f}")
    print(f"same as sequential: {parallel.best_params_ == sequential.best_params_}")
    print(f"fits run as daemon tasks: {info['completed'] > 0}")


if __name__ == "__main__":
    main()
