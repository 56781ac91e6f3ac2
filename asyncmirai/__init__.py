"""asyncmirai: minimal-overhead async evaluation of Python code in persistent daemons.

A port of R's ``mirai``: ``am.daemons(4)`` starts background processes, ``await
am.mirai(fn, x)`` runs ``fn(x)`` on one of them.  Tensors and arrays, alone or deep inside
models and optimizer states, travel as out-of-band frames (zero-copy ZeroMQ frames to
remote daemons, socketpairs and memfds to local ones).

Public names are loaded on first use (PEP 562), so ``import asyncmirai`` stays light and
``python -m asyncmirai daemon`` starts without loading the host-side machinery.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> private module that defines it
_EXPORTS = {
    "DaemonInfo": "_api",
    "Daemons": "_api",
    "Status": "_api",
    "daemons": "_api",
    "daemons_set": "_api",
    "everywhere": "_api",
    "host_url": "_api",
    "launch_local": "_api",
    "launch_remote": "_api",
    "local_url": "_api",
    "info": "_api",
    "mirai": "_api",
    "on_daemon": "_api",
    "require_daemons": "_api",
    "status": "_api",
    "using": "_api",
    "submit": "_api",
    "try_mirai": "_api",
    "SerialConfig": "_codecs",
    "serial_config": "_codecs",
    "DaemonError": "_errors",
    "MiraiCancelled": "_errors",
    "MiraiError": "_errors",
    "MiraiTimeout": "_errors",
    "QueueFull": "_errors",
    "SerializationError": "_errors",
    "Mirai": "_handle",
    "MiraiMap": "_map",
    "PutRef": "_put",
    "put": "_put",
    "as_completed": "_map",
    "collect": "_map",
    "mirai_map": "_map",
    "race": "_map",
    "MiraiExecutor": "_executor",
    "executor": "_executor",
    "register_joblib": "_joblib",
    "cluster_config": "launchers",
    "ssh_config": "launchers",
}

__all__ = [
    "DaemonError",
    "DaemonInfo",
    "Daemons",
    "Mirai",
    "MiraiCancelled",
    "MiraiError",
    "MiraiExecutor",
    "MiraiMap",
    "MiraiTimeout",
    "PutRef",
    "QueueFull",
    "SerialConfig",
    "SerializationError",
    "Status",
    "as_completed",
    "cluster_config",
    "collect",
    "daemons",
    "daemons_set",
    "everywhere",
    "executor",
    "host_url",
    "info",
    "launch_local",
    "launch_remote",
    "local_url",
    "mirai",
    "mirai_map",
    "on_daemon",
    "put",
    "race",
    "register_joblib",
    "require_daemons",
    "serial_config",
    "ssh_config",
    "status",
    "submit",
    "try_mirai",
    "using",
]

if TYPE_CHECKING:
    from ._api import (
        DaemonInfo,
        Daemons,
        Status,
        daemons,
        daemons_set,
        everywhere,
        host_url,
        info,
        launch_local,
        launch_remote,
        local_url,
        mirai,
        on_daemon,
        require_daemons,
        status,
        submit,
        try_mirai,
        using,
    )
    from ._codecs import SerialConfig, serial_config
    from ._errors import (
        DaemonError,
        MiraiCancelled,
        MiraiError,
        MiraiTimeout,
        QueueFull,
        SerializationError,
    )
    from ._executor import MiraiExecutor, executor
    from ._handle import Mirai
    from ._joblib import register_joblib
    from ._map import MiraiMap, as_completed, collect, mirai_map, race
    from ._put import PutRef, put
    from .launchers import cluster_config, ssh_config


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'asyncmirai' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
