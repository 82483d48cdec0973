"""One exception root for the package.

Every error streamtok raises on purpose derives from :class:`StreamtokError`, so callers (the
server, the CLI) can tell an expected, explainable failure from a bug.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from streamtok.server.protocol import ErrorCode


class StreamtokError(Exception):
    """Root of all streamtok errors."""


class AudioFormatError(StreamtokError, ValueError):
    """Audio bytes or samples that cannot be accepted (bad format, NaN/Inf, wrong size)."""


class BufferOverflowError(StreamtokError):
    """A ring buffer would have to drop samples and its policy says to refuse."""


class StreamingError(StreamtokError, ValueError):
    """A streaming layer was stepped with input it cannot take (e.g. not whole strides)."""


class ModelError(StreamtokError):
    """Unknown model, missing weights, or a weights file of an unknown layout."""


class ProtocolError(StreamtokError, ValueError):
    """A wire message or message sequence that breaks the streaming protocol.

    ``code`` is a :class:`streamtok.server.protocol.ErrorCode`; ``fatal`` says whether the
    server must close the connection after reporting it (see ``docs/PROTOCOL.md``).
    """

    def __init__(self, code: ErrorCode, message: str, *, fatal: bool = True) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message
        self.fatal = fatal
