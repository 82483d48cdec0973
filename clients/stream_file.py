#!/usr/bin/env python3
"""Run ``streamtok-stream`` from a checkout: ``python clients/stream_file.py FILE --url ...``.

The implementation is :mod:`streamtok.clients.stream_file`, installed as ``streamtok-stream``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's streamtok

from streamtok.clients.stream_file import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
