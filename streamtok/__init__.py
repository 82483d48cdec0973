"""streamtok: a real-time streaming audio tokenizer.

Data path: audio in -> ring buffer (:mod:`streamtok.audio`) -> batched model step
(:mod:`streamtok.engine`, models in :mod:`streamtok.models` built on
:mod:`streamtok.streaming`) -> tokens out (:mod:`streamtok.server`).
"""

__version__ = "0.1.0"

from streamtok.errors import StreamtokError

__all__ = ["StreamtokError", "__version__"]
