"""LSTM with carried hidden state (EnCodec's SLSTM: residual LSTM over ``[B, C, T]``)."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from streamtok.streaming.base import Slots, StreamingModule, StreamState, slot_count


@dataclasses.dataclass
class LSTMState(StreamState):
    """``h``, ``c``: ``[slots, num_layers, hidden]``."""

    h: Tensor
    c: Tensor


class StreamingLSTM(StreamingModule):
    """``y = lstm(x) + x`` (skip optional) on ``[B, C, T]``, carrying ``(h, c)`` per slot.

    Parameters are named as EnCodec's ``SLSTM`` (``lstm.weight_ih_l0`` ...), so its checkpoints load.
    """

    def __init__(self, dim: int, num_layers: int = 2, skip: bool = True) -> None:
        super().__init__()
        self.lstm = nn.LSTM(dim, dim, num_layers)
        self.skip = skip

    def init_state(self, slots: int, device: torch.device, dtype: torch.dtype) -> LSTMState:
        shape = (slots, self.lstm.num_layers, self.lstm.hidden_size)
        return LSTMState(h=torch.zeros(shape, device=device, dtype=dtype),
                         c=torch.zeros(shape, device=device, dtype=dtype))

    def step(self, x: Tensor, state: LSTMState, slots: Slots) -> Tensor:
        slot_count(x, state, slots)
        if x.shape[-1] == 0:
            return x
        h0 = state.get("h", slots).transpose(0, 1).contiguous()
        c0 = state.get("c", slots).transpose(0, 1).contiguous()
        seq = x.permute(2, 0, 1)  # [T, B, C]
        y, (h, c) = self.lstm(seq, (h0, c0))
        state.put("h", slots, h.transpose(0, 1))
        state.put("c", slots, c.transpose(0, 1))
        if self.skip:
            y = y + seq
        return y.permute(1, 2, 0)
