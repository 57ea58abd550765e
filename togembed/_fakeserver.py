"""Kept so that ``python -m togembed._fakeserver`` (in older docs and scripts) still runs the
fake server; the code lives in ``togembed.server.fake``."""

import sys

from .server.fake import main

if __name__ == "__main__":
    sys.exit(main())
