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
        # Off by default: a matrix product rounds differently from the convolution kernel, so a
        # stream would equal the offline pass only to float rounding instead of bit for bit.
        self.matmul_steps = False

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
        if self.matmul_steps and self._matmul_pays(T // self.stride):
            return self._matmul(x)
        return self.conv(x)

    def _matmul_pays(self, outputs: int) -> bool:
        """Whether a matrix product beats the convolution kernel for ``outputs`` per slot.

        Measured on one CPU thread (torch 2.13, oneDNN/MKL) over Mimi's encoder at batch 1-64:
        few outputs per slot make the kernel a matrix-vector product that oneDNN and the native
        path run far below memory speed (Mimi's 512 -> 1024, k 16, s 8 conv at one frame:
        3.2 ms vs 1.3 ms at batch 1, 67 vs 17 ms at batch 64), and a single input channel leaves
        the kernel nothing to vectorise over (its first conv at batch 64: 30 vs 7 ms); stride-1
        convs over more than a few outputs, and long steps, are faster as convolutions.
        """
        if self.conv.groups != 1 or self.conv.kernel_size[0] == 1:
            return False
        return outputs <= 4 or self.conv.in_channels == 1 or (self.stride > 1 and outputs <= 128)

    def _matmul(self, x: Tensor) -> Tensor:
        """The convolution of ``x`` ``[B, C_in, context + T]`` as a matrix product of the
        ``[C_out, C_in * k]`` kernel and the unfolded input windows; ``[B, C_out, T_out]`` out,
        in conv layout for one input channel, else a transposed view of ``[B, T_out, C_out]``."""
        conv = self.conv
        B, C, _ = x.shape
        k, dilation = conv.kernel_size[0], conv.dilation[0]
        windows = x.unfold(2, (k - 1) * dilation + 1, self.stride)  # [B, C, T_out, span]
        if dilation > 1:
            windows = windows[..., ::dilation]
        outputs = windows.shape[2]
        weight = conv.weight.reshape(conv.out_channels, C * k)
        if C == 1:
            # Per slot [C_out, k] x [k, T_out]: the kernel is tiny, the output lands in conv layout.
            cols = windows.transpose(2, 3).reshape(B, k, outputs)
            y = torch.matmul(weight, cols)
            return y if conv.bias is None else y.add_(conv.bias[:, None])
        # All slots' windows as rows of one product, so the kernel is read once per step.
        rows = windows.transpose(1, 2).reshape(B * outputs, C * k)
        y = rows @ weight.t() if conv.bias is None else torch.addmm(conv.bias, rows, weight.t())
        return y.view(B, outputs, -1).transpose(1, 2)  # a view: copying it back costs more

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
