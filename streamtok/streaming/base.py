"""Streaming state, the streaming-module base class and the container that owns all state.

Vocabulary (used the same way everywhere in streamtok):

- **slot**: one row of every state tensor. A live session owns one slot per model.
- **step**: one call that pushes new input through a network and carries state forward.
- **state**: a dataclass per stateful layer whose tensor fields are all shaped ``[slots, ...]``,
  allocated once and updated in place.

One code path: a :class:`StreamingModule` called outside a :class:`Streamer` step builds a fresh
zero state for the batch and runs one step over the whole input. So the offline forward *is* the
first step of a stream, and streamed output can be checked against it exactly.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from collections.abc import Iterator
from typing import ClassVar

import torch
from torch import Tensor, nn

from streamtok.errors import StreamingError

Slots = Tensor | slice | None
"""Slot selection for a step: ``None`` = every slot, in order; else an int64 index tensor ``[B]``
whose i-th entry is the slot that batch row i belongs to. Inside a step a run of consecutive
slots arrives as a ``slice`` (see :meth:`Streamer.stepping`), so layers read and write views of
their state instead of gathering and scattering rows."""


@dataclasses.dataclass
class StreamState:
    """Base class of per-layer streaming state.

    Every field is a tensor shaped ``[slots, ...]``. ``RESET`` maps a field name to the value
    it is reset to (0 when absent), e.g. ``-1`` for "no position yet".
    """

    RESET: ClassVar[dict[str, float | bool]] = {}

    def fields(self) -> dict[str, Tensor]:
        """Return the state's tensors by field name."""
        return {name: getattr(self, name) for name in _field_names(type(self))}

    @property
    def slots(self) -> int:
        return getattr(self, _field_names(type(self))[0]).shape[0]

    def reset(self, slots: Slots = None) -> None:
        """Reset the chosen slots (all when ``None``) to the fresh-stream value, in place."""
        for name, t in self.fields().items():
            value = self.RESET.get(name, 0)
            if slots is None:
                t.fill_(value)
            else:
                t[slots] = value

    def get(self, name: str, slots: Slots) -> Tensor:
        """Field ``name`` for the stepped slots: a view when ``slots`` is None or a slice, else a
        gather (a copy)."""
        t = getattr(self, name)
        if slots is None:
            return t
        if isinstance(slots, slice):
            return t[slots]
        return t.index_select(0, slots)

    def put(self, name: str, slots: Slots, value: Tensor) -> None:
        """Write ``value`` (``[B, ...]``) into field ``name`` for the stepped slots, in place."""
        t = getattr(self, name)
        value = value.detach()
        if slots is None:
            t.copy_(value)
        elif isinstance(slots, slice):
            t[slots].copy_(value)
        else:
            t.index_copy_(0, slots, value.to(t.dtype))


@functools.cache
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


class StreamingModule(nn.Module):
    """A layer with explicit per-slot state.

    Subclasses implement :meth:`init_state` and :meth:`step`. ``forward`` dispatches: inside
    :meth:`Streamer.stepping` it uses the container's state for this layer; otherwise it runs
    one step from a fresh state (the offline forward).
    """

    def init_state(self, slots: int, device: torch.device, dtype: torch.dtype) -> StreamState:
        raise NotImplementedError

    def step(self, x: Tensor, state: StreamState, slots: Slots) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        state, slots = self.current_state(x)
        return self.step(x, state, slots)

    def current_state(self, x: Tensor) -> tuple[StreamState, Slots]:
        """This layer's state and slot selection in the running step; outside one, a fresh zero
        state for ``x``'s batch (the offline pass)."""
        active = _ACTIVE.get()
        if active is not None:
            state = active.states.get(id(self))
            if state is not None:
                return state, active.slots
        return self.init_state(x.shape[0], x.device, x.dtype), None


@dataclasses.dataclass
class _ActiveStep:
    states: dict[int, StreamState]
    slots: Slots


_ACTIVE: contextvars.ContextVar[_ActiveStep | None] = contextvars.ContextVar(
    "streamtok_active_step", default=None
)


class Streamer:
    """Owns the state of every :class:`StreamingModule` inside ``model``, for ``slots`` slots.

    Example::

        streamer = Streamer(encoder, slots=64)
        with streamer.stepping(torch.tensor([3, 7])):
            y = encoder(x)          # x: [2, C, T]; rows are slots 3 and 7
        streamer.reset(torch.tensor([3]))   # slot 3 starts a new stream

    Several streamers may exist for one model (each has its own state); steps must not
    interleave across threads for one streamer.
    """

    def __init__(
        self,
        model: nn.Module | list[nn.Module],
        slots: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if slots < 1:
            raise StreamingError(f"a Streamer needs at least one slot, got {slots}")
        if isinstance(model, (list, tuple)):
            model = nn.ModuleList(model)  # a view for naming; parameters stay where they are
        param = next(model.parameters(), None)
        device = torch.device(device) if device is not None else (
            param.device if param is not None else torch.device("cpu"))
        dtype = dtype or (param.dtype if param is not None else torch.float32)
        self.model = model
        self.num_slots = slots
        self.device = device
        self.layers: dict[str, StreamingModule] = {
            name: m for name, m in model.named_modules() if isinstance(m, StreamingModule)
        }
        self.named_states: dict[str, StreamState] = {
            name: m.init_state(slots, device, dtype) for name, m in self.layers.items()
        }
        self._by_id = {id(self.layers[n]): s for n, s in self.named_states.items()}

    @contextlib.contextmanager
    def stepping(self, slots: Tensor | None = None) -> Iterator[None]:
        """Run the model's streaming layers on this streamer's state for ``slots``.

        ``slots`` (int64 ``[B]``) that are consecutive and ascending reach the layers as a slice,
        and all slots in order as ``None``: their state is stepped in place, with no gather.
        """
        token = _ACTIVE.set(_ActiveStep(self._by_id, self._as_run(slots)))
        try:
            yield
        finally:
            _ACTIVE.reset(token)

    def _as_run(self, slots: Tensor | None) -> Slots:
        """``slots`` as ``None`` (all, in order), a slice (a consecutive ascending run, e.g.
        ``[1, 2]`` -> ``slice(1, 3)``) or an index tensor on the state's device."""
        if slots is None:
            return None
        if isinstance(slots, slice):
            raise StreamingError("pass slots as an index tensor; slices are internal to a step")
        rows = slots.tolist()
        if rows and rows == list(range(rows[0], rows[0] + len(rows))) and rows[0] >= 0:
            if rows[0] == 0 and len(rows) == self.num_slots:
                return None
            if rows[-1] < self.num_slots:
                return slice(rows[0], rows[-1] + 1)
        return slots.to(device=self.device, dtype=torch.long)

    def reset(self, slots: Slots = None) -> None:
        """Clear the chosen slots' state (all slots when ``None``); other slots are untouched."""
        if slots is not None:
            slots = slots.to(device=self.device, dtype=torch.long)
        for state in self.named_states.values():
            state.reset(slots)

    def export(self, slot: int) -> dict[str, Tensor]:
        """Copy one slot's whole state out, as ``{"layer.field": tensor}`` (for session resume)."""
        return {
            f"{name}.{field}": t[slot].clone()
            for name, state in self.named_states.items()
            for field, t in state.fields().items()
        }

    def restore(self, slot: int, data: dict[str, Tensor]) -> None:
        """Load a slot's state exported by :meth:`export` (from this or an identical model)."""
        expected = {
            f"{name}.{field}": t
            for name, state in self.named_states.items()
            for field, t in state.fields().items()
        }
        if set(data) != set(expected):
            missing = sorted(set(expected) - set(data))[:5]
            extra = sorted(set(data) - set(expected))[:5]
            raise StreamingError(f"state does not match this model: missing {missing}, extra {extra}")
        for key, t in expected.items():
            if tuple(data[key].shape) != tuple(t.shape[1:]):
                raise StreamingError(
                    f"state {key!r} has shape {tuple(data[key].shape)}, expected {tuple(t.shape[1:])}")
        for key, t in expected.items():
            t[slot].copy_(data[key])

    def snapshot(self, slots: Tensor) -> list[Tensor]:
        """Copy the state rows of ``slots`` (to undo a failed step with :meth:`restore_rows`)."""
        slots = slots.to(device=self.device, dtype=torch.long)
        return [t.index_select(0, slots) for state in self.named_states.values()
                for t in state.fields().values()]

    def restore_rows(self, slots: Tensor, snapshot: list[Tensor]) -> None:
        """Put back the rows saved by :meth:`snapshot` for the same ``slots``."""
        slots = slots.to(device=self.device, dtype=torch.long)
        tensors = [t for state in self.named_states.values() for t in state.fields().values()]
        for t, saved in zip(tensors, snapshot, strict=True):
            t.index_copy_(0, slots, saved)

    def state_bytes(self) -> int:
        """Total bytes of state held for all slots."""
        return sum(t.numel() * t.element_size()
                   for s in self.named_states.values() for t in s.fields().values())


def slot_count(x: Tensor, state: StreamState, slots: Slots) -> None:
    """Check that a step's batch matches the slot selection (cheap, clear error otherwise)."""
    if slots is None:
        expected = state.slots
    elif isinstance(slots, slice):
        expected = slots.stop - slots.start
    else:
        expected = slots.shape[0]
    if x.shape[0] != expected:
        raise StreamingError(
            f"step input has batch {x.shape[0]} but {expected} slots were selected")

