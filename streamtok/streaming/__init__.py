"""Causal layers with explicit per-slot state, and the container that steps them.

Every layer here is a :class:`StreamingModule`: called plainly it is the offline layer (one
step from a fresh state); inside ``Streamer.stepping(slots)`` it carries state per slot.
"""

from streamtok.streaming.attention import StreamingMultiheadAttention, apply_rope
from streamtok.streaming.base import Slots, Streamer, StreamingModule, StreamState
from streamtok.streaming.conv import StreamingConv1d, StreamingConvTranspose1d
from streamtok.streaming.lstm import StreamingLSTM
from streamtok.streaming.transformer import StreamingTransformer, TransformerLayer

__all__ = [
    "Slots",
    "StreamState",
    "Streamer",
    "StreamingConv1d",
    "StreamingConvTranspose1d",
    "StreamingLSTM",
    "StreamingModule",
    "StreamingMultiheadAttention",
    "StreamingTransformer",
    "TransformerLayer",
    "apply_rope",
]
