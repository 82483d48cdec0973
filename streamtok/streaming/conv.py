"""Causal convolutions with carried state: Conv1d and ConvTranspose1d."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from streamtok.errors import StreamingError
from streamtok.streaming.base import Slots, StreamingModule, StreamState, slot_count
from streamtok.streaming.frames import causal_context, transpose_tail

PadMode = Literal["constant", "replicate", "reflect"]


@dataclasses.dataclass
class ConvState(StreamState):
    """``previous``: ``[slots, C_in, context]`` last input samples; ``first``: ``[slots]`` bool,
    True until the slot's first step (used by replicate/reflect padding)."""

    previous: Tensor
    first: Tensor
    RESET: ClassVar[dict[str, float | bool]] = {"first": True}


class StreamingConv1d(StreamingModule):
    """Causal ``nn.Conv1d`` (any kernel, stride, dilation, groups) that streams exactly.

    The stream start is padded on the left by ``context = (k - 1) * dilation + 1 - stride``
    samples: zeros (``pad_mode="constant"``), the first sample repeated (``"replicate"``) or the
    first samples mirrored (``"reflect"``, as EnCodec was trained). Each step takes ``[B, C_in, T]``
    with ``T`` a multiple of ``stride`` and returns ``[B, C_out, T // stride]``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = True,
        pad_mode: PadMode = "constant",
    ) -> None:
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride,
                              dilation=dilation, groups=groups, bias=bias)
        self.stride = stride
        self.context = causal_context(kernel_size, stride, dilation)
        if self.context < 0:
            raise StreamingError(
                f"kernel span {(kernel_size - 1) * dilation + 1} shorter than stride {stride}")
        if pad_mode not in ("constant", "replicate", "reflect"):
            raise StreamingError(f"unknown pad_mode {pad_mode!r}")
        self.pad_mode = pad_mode

    def init_state(self, slots: int, device: torch.device, dtype: torch.dtype) -> ConvState:
        return ConvState(
            previous=torch.zeros(slots, self.conv.in_channels, self.context, device=device, dtype=dtype),
            first=torch.ones(slots, dtype=torch.bool, device=device),
        )

    def step(self, x: Tensor, state: ConvState, slots: Slots) -> Tensor:
        slot_count(x, state, slots)
        T = x.shape[-1]
        if T % self.stride:
            raise StreamingError(
                f"StreamingConv1d with stride {self.stride} got {T} samples: steps must be whole strides")
        if self.context == 0:
            return self.conv(x)
        previous = state.get("previous", slots)
        if self.pad_mode != "constant":
            first = state.get("first", slots)
            if bool(first.any()):
                previous = torch.where(first[:, None, None], self._start_padding(x), previous)
                state.put("first", slots, torch.zeros_like(first))
        x = torch.cat([previous, x], dim=-1)
        state.put("previous", slots, x[..., -self.context:])
        return self.conv(x)

    def _start_padding(self, x: Tensor) -> Tensor:
        if self.pad_mode == "replicate":
            return x[..., :1].expand(-1, -1, self.context)
        if x.shape[-1] <= self.context:
            raise StreamingError(
                f"reflect padding needs more than {self.context} samples in a stream's first step")
        return x[..., 1:self.context + 1].flip(-1)


@dataclasses.dataclass
class ConvTransposeState(StreamState):
    """``tail``: ``[slots, C_out, k - stride]`` overlap-add partial sums, without bias."""

    tail: Tensor


class StreamingConvTranspose1d(StreamingModule):
    """Causal ``nn.ConvTranspose1d``: ``[B, C_in, T]`` -> ``[B, C_out, T * stride]``.

    Each input sample writes ``kernel_size`` outputs; the last ``kernel_size - stride`` of a
    step overlap the next step's first outputs, so they are carried as ``tail`` and added then.
    Offline, the final tail is dropped: the same as trimming ``k - stride`` samples on the right.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.convtr = nn.ConvTranspose1d(in_channels, out_channels, kernel_size, stride=stride,
                                         groups=groups, bias=bias)
        self.stride = stride
        self.tail_length = transpose_tail(kernel_size, stride)
        if self.tail_length < 0:
            raise StreamingError(f"kernel {kernel_size} shorter than stride {stride}")

    def init_state(self, slots: int, device: torch.device, dtype: torch.dtype) -> ConvTransposeState:
        return ConvTransposeState(
            tail=torch.zeros(slots, self.convtr.out_channels, self.tail_length, device=device, dtype=dtype))

    def step(self, x: Tensor, state: ConvTransposeState, slots: Slots) -> Tensor:
        slot_count(x, state, slots)
        T = x.shape[-1]
        if T == 0:
            return x.new_zeros(x.shape[0], self.convtr.out_channels, 0)
        y = self.convtr(x)
        n = self.tail_length
        if n == 0:
            return y
        y = torch.cat([y[..., :n] + state.get("tail", slots), y[..., n:]], dim=-1)
        tail = y[..., T * self.stride:]
        if self.convtr.bias is not None:
            tail = tail - self.convtr.bias[:, None]
        state.put("tail", slots, tail)
        return y[..., :T * self.stride]
