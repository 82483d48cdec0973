#!/usr/bin/env python3
"""Run ``streamtok-mic`` from a checkout: ``python clients/mic.py --help``.

The implementation is :mod:`streamtok.clients.mic`, installed as the ``streamtok-mic`` command.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's streamtok

from streamtok.clients.mic import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
