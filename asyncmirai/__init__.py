"""asyncmirai: minimal-overhead async evaluation of Python code in persistent daemons.

A port of R's ``mirai``: ``am.daemons(4)`` starts background processes, ``await
am.mirai(fn, x)`` runs ``fn(x)`` on one of them.  Tensors and arrays, alone or deep inside
models and optimizer states, travel as zero-copy ZeroMQ frames.
"""

from ._api import (
    DaemonInfo,
    Daemons,
    Status,
    daemons,
    daemons_set,
    everywhere,
    host_url,
    launch_local,
    launch_remote,
    local_url,
    mirai,
    status,
)
from ._codecs import SerialConfig, serial_config
from ._errors import DaemonError, MiraiCancelled, MiraiError, MiraiTimeout
from ._handle import Mirai

__version__ = "0.1.0"

__all__ = [
    "DaemonError",
    "DaemonInfo",
    "Daemons",
    "Mirai",
    "MiraiCancelled",
    "MiraiError",
    "MiraiTimeout",
    "SerialConfig",
    "Status",
    "daemons",
    "daemons_set",
    "everywhere",
    "host_url",
    "launch_local",
    "launch_remote",
    "local_url",
    "mirai",
    "serial_config",
    "status",
]
