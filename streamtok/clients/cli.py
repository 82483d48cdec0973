"""What the command-line clients share: the server they talk to by default, the flags that name
it and carry the bearer token, and how a failed session becomes one line on stderr."""

from __future__ import annotations

import argparse
import os
import sys

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from streamtok.client import ServerError
from streamtok.errors import StreamtokError

DEFAULT_URL = "ws://127.0.0.1:8765"
TOKEN_ENV = "STREAMTOK_TOKEN"  # an environment variable keeps the token out of `ps`

# What a refused, failed or lost session raises (ServerError is a StreamtokError): exit status 1.
SESSION_ERRORS = (StreamtokError, OSError, TimeoutError, ConnectionClosed, InvalidHandshake, InvalidURI)


def add_server_arguments(p: argparse.ArgumentParser) -> None:
    """``--url`` and ``--model``: which server, and which of its models."""
    p.add_argument("--url", default=DEFAULT_URL, help=f"server WebSocket URL (default {DEFAULT_URL})")
    p.add_argument("--model", default="default", help="served model name (default: default)")


def add_token_argument(p: argparse.ArgumentParser) -> None:
    """``--token``, by default the value of ``$STREAMTOK_TOKEN`` when the parser is built."""
    p.add_argument("--token", default=os.environ.get(TOKEN_ENV),
                   help=f"bearer token (default: ${TOKEN_ENV})")


def report_session_error(prog: str, url: str, error: BaseException) -> int:
    """Print one of :data:`SESSION_ERRORS` as one line on stderr; return the exit status, 1."""
    if isinstance(error, ServerError):
        print(f"{prog}: server error {error}", file=sys.stderr)
    else:
        print(f"{prog}: cannot stream to {url}: {error or type(error).__name__}", file=sys.stderr)
    return 1
