"""Audio in: PCM bytes -> mono float32 -> resampled -> ring buffer -> whole frames.

No torch here: clients and the server's I/O path import this package alone.
"""

from streamtok.audio.pcm import (
    MAX_CHANNELS,
    PcmDecoder,
    SampleFormat,
    bytes_per_frame,
    decode_pcm,
    encode_pcm,
)
from streamtok.audio.polyphase import PolyphaseResampler
from streamtok.audio.resample import (
    MAX_INPUT_RATE,
    MIN_INPUT_RATE,
    Quality,
    StreamingResampler,
    resample,
    resampled_length,
)
from streamtok.audio.ring import (
    OverflowPolicy,
    RingBuffer,
    drop_for_write,
    round_up_to_multiple,
)

__all__ = [
    "MAX_CHANNELS",
    "MAX_INPUT_RATE",
    "MIN_INPUT_RATE",
    "OverflowPolicy",
    "PcmDecoder",
    "PolyphaseResampler",
    "Quality",
    "RingBuffer",
    "SampleFormat",
    "StreamingResampler",
    "bytes_per_frame",
    "decode_pcm",
    "drop_for_write",
    "encode_pcm",
    "resample",
    "resampled_length",
    "round_up_to_multiple",
]
