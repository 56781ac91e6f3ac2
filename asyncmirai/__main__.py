"""``python -m asyncmirai daemon URL``: start a daemon by hand (see ``--help``)."""

import sys

from ._daemon import main

if __name__ == "__main__":
    sys.exit(main())
