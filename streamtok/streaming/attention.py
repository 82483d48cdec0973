"""Causal multi-head self-attention over a bounded context, with a ring KV cache and RoPE.

The cache of each slot is a ring of ``capacity = context + max_step - 1`` entries: time step ``p``
lives at index ``p % capacity``. Which time step each entry holds (the *clock*: ``key_pos`` and
``pos``) is the same for every layer of a transformer, so a :class:`StreamingTransformer` keeps one
clock and works out each step's positions, RoPE angles and visibility mask once (a
:class:`RingStep`) for all its layers; a standalone attention keeps its own clock.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from streamtok.errors import StreamingError
from streamtok.streaming.base import Slots, StreamingModule, StreamState, slot_count


@functools.cache
def rope_frequencies(head_dim: int, max_period: float, device: torch.device) -> Tensor:
    """``[head_dim / 2]`` float32 rotation rate of each interleaved pair: ``max_period ** (-2i / D)``.

    Made once per (size, device) and shared; made outside inference mode so training may use it.
    """
    with torch.inference_mode(False), torch.no_grad():
        return torch.exp(torch.arange(head_dim // 2, device=device, dtype=torch.float32)
                         * (-torch.log(torch.tensor(max_period)) * 2 / head_dim))


def rotate_pairs(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the interleaved pairs ``(x[2i], x[2i+1])`` of ``x`` (``[..., D]``) by the angles
    whose ``cos``/``sin`` broadcast to ``[..., D / 2]``; computed in float32."""
    xr = (x if x.dtype == torch.float32 else x.float()).reshape(*x.shape[:-1], -1, 2)
    a, b = xr[..., 0], xr[..., 1]
    out = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).view(x.shape)
    return out if x.dtype == torch.float32 else out.to(x.dtype)


def apply_rope(q: Tensor, k: Tensor, positions: Tensor, max_period: float = 10_000.0) -> tuple[Tensor, Tensor]:
    """Rotary embeddings on interleaved pairs ``(x[2i], x[2i+1])``, as moshi's Mimi uses.

    q, k: ``[B, H, T, D]`` float; positions: ``[B, T]`` int64 absolute time steps.
    Pair ``i`` is rotated by ``positions * max_period ** (-2i / D)``.
    """
    freqs = rope_frequencies(q.shape[-1], max_period, q.device)
    angles = positions.to(torch.float32)[:, None, :, None] * freqs  # [B, 1, T, D/2]
    cos, sin = torch.cos(angles), torch.sin(angles)
    return rotate_pairs(q, cos, sin), rotate_pairs(k, cos, sin)


@dataclasses.dataclass
class KVCacheState(StreamState):
    """Ring KV cache: ``keys``/``values`` ``[slots, H, capacity, D]``."""

    keys: Tensor
    values: Tensor


@dataclasses.dataclass
class ClockState(StreamState):
    """Ring clock: ``key_pos`` ``[slots, capacity]`` int64 time step held at each ring index
    (-1 = empty); ``pos`` ``[slots]`` int64 time steps seen so far."""

    key_pos: Tensor
    pos: Tensor
    RESET: ClassVar[dict[str, float | bool]] = {"key_pos": -1}


@dataclasses.dataclass
class AttentionState(KVCacheState):
    """A standalone attention's cache and its own clock (fields as in :class:`ClockState`)."""

    key_pos: Tensor
    pos: Tensor
    RESET: ClassVar[dict[str, float | bool]] = {"key_pos": -1}


@dataclasses.dataclass
class RingStep:
    """One step of ``T`` time steps, worked out once from the clock for every layer.

    ``positions`` ``[B, T]``; ``ring`` ``[B, n]`` ring indices of the last ``n = min(T, capacity)``
    time steps (the ones kept); ``rope`` ``(cos, sin)`` ``[B, T, 1, 1, D / 2]`` or None; ``mask``
    ``[B, 1, T, S]`` additive (0 where a query sees the key, -inf elsewhere; made once here rather
    than from a bool mask in every layer): over the ring after this step's keys are written
    (``in_place``, ``S = capacity``) or the ring before it followed by this step's keys
    (``S = capacity + T``).
    """

    positions: Tensor
    ring: Tensor
    rope: tuple[Tensor, Tensor] | None
    mask: Tensor
    in_place: bool


class StreamingMultiheadAttention(StreamingModule):
    """Causal self-attention in which the query at step ``t`` sees keys ``t - context + 1 .. t``.

    Input and output ``[B, T, dim]``. A step of ``T <= max_step`` time steps writes its keys and
    values into the ring first and attends to the ring in place: the entries it overwrites are
    older than any of its queries can see, so the cache is never copied. Longer steps (an offline
    pass) and steps that need gradients attend to the cache followed by their own keys. Any step
    size gives the result of one offline pass (moshi's offline semantics), up to float rounding.
    ``max_step`` 8 covers 1-4 Mimi frames per step for a ring only 3% longer than the context;
    longer steps pay one copy of the cache, over as many frames.

    ``own_clock=False`` leaves the clock to the enclosing :class:`StreamingTransformer`, which
    then calls :meth:`attend` with the step's :class:`RingStep`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        context: int,
        rope_max_period: float | None = 10_000.0,
        bias: bool = False,
        max_step: int = 8,
        own_clock: bool = True,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise StreamingError(f"dim {dim} not divisible by {num_heads} heads")
        if context < 1:
            raise StreamingError(f"attention context must be >= 1, got {context}")
        if max_step < 1:
            raise StreamingError(f"max_step must be >= 1, got {max_step}")
        self.dim, self.num_heads, self.context = dim, num_heads, context
        self.head_dim = dim // num_heads
        self.max_step = max_step
        self.capacity = context + max_step - 1
        self.rope_max_period = rope_max_period
        self.own_clock = own_clock
        self.in_proj = nn.Linear(dim, 3 * dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias)

    def init_state(self, slots: int, device: torch.device, dtype: torch.dtype) -> KVCacheState:
        shape = (slots, self.num_heads, self.capacity, self.head_dim)
        kv = {"keys": torch.zeros(shape, device=device, dtype=dtype),
              "values": torch.zeros(shape, device=device, dtype=dtype)}
        if not self.own_clock:
            return KVCacheState(**kv)
        return AttentionState(**kv, **dataclasses.asdict(self.init_clock(slots, device)))

    def init_clock(self, slots: int, device: torch.device) -> ClockState:
        return ClockState(key_pos=torch.full((slots, self.capacity), -1, dtype=torch.long, device=device),
                          pos=torch.zeros(slots, dtype=torch.long, device=device))

    def step(self, x: Tensor, state: KVCacheState, slots: Slots) -> Tensor:
        if not isinstance(state, AttentionState):
            raise StreamingError("this attention's clock is kept by its transformer: call attend()")
        slot_count(x, state, slots)
        if x.shape[1] == 0:
            return x
        plan = self.plan(state, slots, x.shape[1], x.dtype)
        out = self.attend(x, plan, state, slots)
        self.advance(state, slots, plan)
        return out

    # -- the clock: once per step for all layers that share it ----------------------------------
    def plan(self, clock: ClockState | AttentionState, slots: Slots, steps: int,
             dtype: torch.dtype = torch.float32) -> RingStep:
        """Work out a step of ``steps`` time steps from ``clock`` (not changed here) for
        activations of ``dtype``."""
        pos = clock.get("pos", slots)
        key_pos = clock.get("key_pos", slots)
        positions = pos[:, None] + torch.arange(steps, device=pos.device)  # [B, T]
        n = min(steps, self.capacity)
        ring = positions[:, steps - n:] % self.capacity
        in_place = steps <= self.max_step and not torch.is_grad_enabled()
        if in_place:
            visible = key_pos.scatter(1, ring, positions[:, steps - n:])
        else:
            visible = torch.cat([key_pos, positions], dim=1)
        delta = positions[:, :, None] - visible[:, None, :]  # [B, T, S]
        seen = (delta >= 0) & (delta < self.context) & (visible >= 0)[:, None, :]
        mask = torch.zeros(seen.shape, dtype=dtype, device=pos.device).masked_fill_(~seen, float("-inf"))
        rope = None
        if self.rope_max_period is not None:
            freqs = rope_frequencies(self.head_dim, self.rope_max_period, pos.device)
            angles = positions.to(torch.float32)[:, :, None, None, None] * freqs
            rope = (torch.cos(angles), torch.sin(angles))
        return RingStep(positions, ring, rope, mask[:, None], in_place)

    def advance(self, clock: ClockState | AttentionState, slots: Slots, plan: RingStep) -> None:
        """Move ``clock`` past the step of ``plan``, in place."""
        steps = plan.positions.shape[1]
        kept = plan.positions[:, steps - plan.ring.shape[1]:]
        if slots is None or isinstance(slots, slice):
            clock.get("key_pos", slots).scatter_(1, plan.ring, kept)
            clock.get("pos", slots).add_(steps)
        else:
            clock.key_pos.index_put_((slots[:, None], plan.ring), kept)
            clock.pos.index_copy_(0, slots, plan.positions[:, 0] + steps)

    # -- one layer ------------------------------------------------------------------------------
    def attend(self, x: Tensor, plan: RingStep, state: KVCacheState | None = None,
               slots: Slots = None) -> Tensor:
        """``[B, T, dim]`` -> ``[B, T, dim]`` for the step ``plan``, updating this layer's cache
        (``state``/``slots``: this layer's in the running step when omitted)."""
        if state is None:
            state, slots = self.current_state(x)
            slot_count(x, state, slots)
        B, T, _ = x.shape
        q, k, v = self._project(x, plan.rope)  # each [B, H, T, D]
        n = plan.ring.shape[1]
        keys, values = state.get("keys", slots), state.get("values", slots)
        new_k, new_v = _stored(k[:, :, T - n:], keys.dtype), _stored(v[:, :, T - n:], values.dtype)
        idx = plan.ring[:, None, :, None].expand(-1, self.num_heads, -1, self.head_dim)
        if plan.in_place:
            keys.scatter_(2, idx, new_k)
            values.scatter_(2, idx, new_v)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=plan.mask)
        else:
            out = F.scaled_dot_product_attention(q, torch.cat([keys, k], dim=2),
                                                 torch.cat([values, v], dim=2), attn_mask=plan.mask)
            keys.scatter_(2, idx, new_k)
            values.scatter_(2, idx, new_v)
        if slots is not None and not isinstance(slots, slice):
            # `keys`/`values` were gathered copies: put the new entries into the slots' rows.
            where = (slots[:, None, None], torch.arange(self.num_heads, device=x.device)[None, :, None],
                     plan.ring[:, None, :])
            state.keys.index_put_(where, new_k)
            state.values.index_put_(where, new_v)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, self.dim))

    def _project(self, x: Tensor, rope: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor, Tensor]:
        """``[B, T, dim]`` -> q, k, v ``[B, H, T, D]``, q and k rotated together."""
        B, T, _ = x.shape
        qkv = self.in_proj(x).view(B, T, 3, self.num_heads, self.head_dim)
        if rope is None:
            q, k, v = qkv.unbind(2)
        else:
            q, k = rotate_pairs(qkv[:, :, :2], *rope).unbind(2)
            v = qkv[:, :, 2]
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def _stored(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` as the cache stores it: cut from autograd, in the cache's dtype."""
    if x.requires_grad:
        x = x.detach()
    return x if x.dtype == dtype else x.to(dtype)
