"""``python -m asyncmirai daemon URL``: start a daemon by hand (see ``--help``)."""

import sys

if __name__ == "__main__":
    import gc

    # No cyclic GC while the daemon starts: ~4-5 ms of its ~60 ms start were collections
    # over objects its imports create and keep (measured, 3.11).  The daemon turns the
    # GC back on, before its first task, in _daemon._resume_gc.
    gc.disable()
    from . import _daemon

    _daemon._GC_PAUSED = True
    sys.exit(_daemon.main())
