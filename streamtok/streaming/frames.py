"""Frame and padding arithmetic as small pure functions.

A causal convolution with kernel ``k``, dilation ``d`` and stride ``s`` sees an *effective*
kernel of ``(k - 1) * d + 1`` samples. Padded on the left by ``effective - s`` samples, it maps
``T`` input samples (``T`` a multiple of ``s``) to exactly ``T / s`` outputs, and output ``i``
depends only on inputs up to ``(i + 1) * s - 1``: no look-ahead.
"""

from __future__ import annotations

import math


def effective_kernel(kernel_size: int, dilation: int = 1) -> int:
    """Samples spanned by a dilated kernel.

    >>> effective_kernel(3, dilation=4)   # taps at 0, 4, 8
    9
    """
    return (kernel_size - 1) * dilation + 1


def causal_context(kernel_size: int, stride: int = 1, dilation: int = 1) -> int:
    """Past samples a causal conv carries between steps (its left padding).

    >>> causal_context(7)                  # 7-tap conv, stride 1: keeps the last 6 samples
    6
    >>> causal_context(8, stride=4)        # downsampling conv: 8 - 4
    4
    """
    return effective_kernel(kernel_size, dilation) - stride


def transpose_tail(kernel_size: int, stride: int) -> int:
    """Samples a causal transposed conv carries to the next step (its overlap tail).

    >>> transpose_tail(8, 4)   # each input writes 8 outputs, 4 of them overlap the next input
    4
    """
    return kernel_size - stride


def frames_in(num_samples: int, frame_size: int) -> int:
    """Whole frames in ``num_samples`` samples.

    >>> frames_in(1000, 320)
    3
    """
    return num_samples // frame_size


def frames_after_flush(num_samples: int, frame_size: int) -> int:
    """Frames emitted once a stream of ``num_samples`` is flushed (the partial frame is padded).

    >>> frames_after_flush(1000, 320)   # 3 whole frames + 1 padded
    4
    >>> frames_after_flush(960, 320)
    3
    """
    return math.ceil(num_samples / frame_size)


def pad_to_multiple(num_samples: int, multiple: int) -> int:
    """Zeros to append so ``num_samples`` becomes a multiple of ``multiple``.

    >>> pad_to_multiple(1000, 320)
    280
    >>> pad_to_multiple(640, 320)
    0
    """
    return -num_samples % multiple


def hop_length(strides: list[int] | tuple[int, ...]) -> int:
    """Samples per output frame of a stack of strided layers.

    >>> hop_length([8, 5, 4, 4])
    640
    """
    return math.prod(strides)
