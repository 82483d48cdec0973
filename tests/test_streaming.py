"""Streaming core: every stateful layer streams like its offline pass, causally, per slot."""

from __future__ import annotations

import doctest
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from streamtok.errors import StreamingError
from streamtok.streaming import (
    Streamer,
    StreamingConv1d,
    StreamingConvTranspose1d,
    StreamingLSTM,
    StreamingMultiheadAttention,
    StreamingTransformer,
    frames,
)

REL_TOL = 1e-5


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = REL_TOL) -> None:
    assert actual.shape == expected.shape
    scale = expected.abs().max().clamp_min(1e-12)
    err = (actual - expected).abs().max() / scale
    assert err <= rel, f"relative error {err:.3g} > {rel}"


def split_points(total: int, unit: int, rng: random.Random, max_units: int = 6) -> list[int]:
    """Random cut points at multiples of ``unit`` in ``[0, total]`` (1-unit packets included)."""
    cuts, pos = [0], 0
    while pos < total:
        pos = min(total, pos + unit * rng.randint(1, max_units))
        cuts.append(pos)
    return cuts


def stream(model: nn.Module, x: torch.Tensor, cuts: list[int], streamer: Streamer | None = None,
           slots: torch.Tensor | None = None) -> torch.Tensor:
    """Feed ``x[..., a:b]`` for consecutive cut points and concatenate the outputs."""
    streamer = streamer or Streamer(model, x.shape[0])
    outs = []
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        with streamer.stepping(slots):
            outs.append(model(x[..., a:b]))
    return torch.cat(outs, dim=-1)


class Transposed(nn.Module):
    """Run a ``[B, T, C]`` module on ``[B, C, T]`` tensors (so all layers share one layout)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.transpose(1, 2)).transpose(1, 2)


def matmul_steps(conv: StreamingConv1d) -> StreamingConv1d:
    conv.matmul_steps = True
    return conv


# (id, factory, input channels, step unit in samples)
LAYERS = [
    ("conv-k7", lambda: StreamingConv1d(3, 5, 7), 3, 1),
    ("conv-k1", lambda: StreamingConv1d(3, 5, 1), 3, 1),
    ("conv-k4-s2", lambda: StreamingConv1d(3, 5, 4, stride=2), 3, 2),
    ("conv-k3-d4", lambda: StreamingConv1d(3, 5, 3, dilation=4), 3, 1),
    ("conv-k16-s8-groups", lambda: StreamingConv1d(4, 8, 16, stride=8, groups=2), 4, 8),
    ("conv-replicate", lambda: StreamingConv1d(3, 5, 7, pad_mode="replicate"), 3, 1),
    # short steps as one matrix product (as Mimi runs them): rounded differently, still exact to 1e-5
    ("conv-k7-matmul", lambda: matmul_steps(StreamingConv1d(3, 5, 7)), 3, 1),
    ("conv-k3-d4-matmul", lambda: matmul_steps(StreamingConv1d(3, 5, 3, dilation=4)), 3, 1),
    ("conv-k8-s4-matmul", lambda: matmul_steps(StreamingConv1d(3, 5, 8, stride=4)), 3, 4),
    ("conv-1-channel-matmul", lambda: matmul_steps(StreamingConv1d(1, 5, 7)), 1, 1),
    # reflect padding mirrors the stream's first samples: its first step needs > context samples
    ("conv-reflect-s2", lambda: StreamingConv1d(3, 5, 6, stride=2, pad_mode="reflect"), 3, 6),
    ("convtr-k8-s4", lambda: StreamingConvTranspose1d(5, 3, 8, stride=4), 5, 1),
    ("convtr-k2-s2", lambda: StreamingConvTranspose1d(5, 3, 2, stride=2), 5, 1),
    ("convtr-k5-s1", lambda: StreamingConvTranspose1d(5, 3, 5), 5, 1),
    ("convtr-groups", lambda: StreamingConvTranspose1d(4, 6, 6, stride=3, groups=2), 4, 1),
    ("lstm", lambda: StreamingLSTM(6, num_layers=2), 6, 1),
    ("attention-ctx5", lambda: Transposed(StreamingMultiheadAttention(8, 2, context=5)), 8, 1),
    ("attention-norope", lambda: Transposed(StreamingMultiheadAttention(8, 2, 7, rope_max_period=None)), 8, 1),
    # steps longer than max_step attend to the cache concatenated with their keys, not in place
    ("attention-maxstep2", lambda: Transposed(StreamingMultiheadAttention(8, 2, 5, max_step=2)), 8, 1),
    ("transformer", lambda: StreamingTransformer(8, 2, 2, 16, context=6, layer_scale=1.0), 8, 1),
]


@pytest.mark.parametrize(("factory", "channels", "unit"), [case[1:] for case in LAYERS], ids=[case[0] for case in LAYERS])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_layer_streams_like_offline(factory, channels, unit, seed):
    """Random whole-stride splits (1-stride packets up to many) give the offline output."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    layer = factory()
    x = torch.randn(3, channels, unit * 24)
    with torch.no_grad():
        ref = layer(x)
        assert_rel_close(stream(layer, x, split_points(x.shape[-1], unit, rng)), ref)
        assert_rel_close(stream(layer, x, list(range(0, x.shape[-1] + 1, unit))), ref)


@pytest.mark.parametrize(("factory", "channels", "unit"), [case[1:] for case in LAYERS], ids=[case[0] for case in LAYERS])
def test_layer_is_causal(factory, channels, unit):
    """Changing input after sample t never changes the outputs computed from samples before t."""
    torch.manual_seed(0)
    layer = factory()
    x = torch.randn(2, channels, unit * 20)
    cut = unit * 9
    y = x.clone()
    y[..., cut:] = torch.randn_like(y[..., cut:]) * 10
    with torch.no_grad():
        a, b = layer(x), layer(y)
    out_cut = a.shape[-1] * cut // x.shape[-1]
    assert_rel_close(b[..., :out_cut], a[..., :out_cut], rel=1e-6)
    assert not torch.allclose(a[..., out_cut:], b[..., out_cut:]), "later output must see later input"


def _slot_states(streamer: Streamer, slot: int) -> dict[str, torch.Tensor]:
    return streamer.export(slot)


@pytest.mark.parametrize(("factory", "channels", "unit"), [case[1:] for case in LAYERS], ids=[case[0] for case in LAYERS])
def test_subset_step_leaves_other_slots_untouched(factory, channels, unit):
    """Stepping slots {1, 3} changes only their state, and equals streaming them on their own."""
    torch.manual_seed(0)
    layer = factory()
    x = torch.randn(4, channels, unit * 12)
    streamer = Streamer(layer, 4)
    with torch.no_grad():
        stream(layer, x[..., : unit * 4], [0, unit * 4], streamer)  # give every slot history
        before = {s: _slot_states(streamer, s) for s in range(4)}
        chosen = torch.tensor([3, 1])
        out = stream(layer, x[chosen][..., unit * 4:], [0, unit * 3, unit * 8], streamer, chosen)
        for s in (0, 2):
            after = _slot_states(streamer, s)
            assert all(torch.equal(after[k], before[s][k]) for k in after)
        for s in (1, 3):
            after = _slot_states(streamer, s)
            carries = any(t.numel() and t.is_floating_point() for t in after.values())
            assert not carries or any(not torch.equal(after[k], before[s][k]) for k in after)
        alone = Streamer(layer, 2)
        stream(layer, x[chosen][..., : unit * 4], [0, unit * 4], alone)
        expected = stream(layer, x[chosen][..., unit * 4:], [0, unit * 8], alone)
    assert_rel_close(out, expected)


@pytest.mark.parametrize(("factory", "channels", "unit"), [case[1:] for case in LAYERS], ids=[case[0] for case in LAYERS])
def test_reset_one_slot_equals_fresh_state(factory, channels, unit):
    """After ``reset([2])`` slot 2 streams a new input exactly as a fresh stream would."""
    torch.manual_seed(0)
    layer = factory()
    streamer = Streamer(layer, 3)
    with torch.no_grad():
        stream(layer, torch.randn(3, channels, unit * 6), [0, unit * 6], streamer)
        other = _slot_states(streamer, 1)
        streamer.reset(torch.tensor([2]))
        fresh = Streamer(layer, 1)
        for k, v in _slot_states(fresh, 0).items():
            assert torch.equal(_slot_states(streamer, 2)[k], v)
        assert all(torch.equal(_slot_states(streamer, 1)[k], v) for k, v in other.items())
        new = torch.randn(1, channels, unit * 10)
        out = stream(layer, new, [0, unit * 10], streamer, torch.tensor([2]))
        assert_rel_close(out, layer(new))


@pytest.mark.parametrize(("factory", "channels", "unit"), [case[1:] for case in LAYERS], ids=[case[0] for case in LAYERS])
def test_export_restore_round_trip(factory, channels, unit):
    """A slot's exported state, restored into another streamer's slot, continues the stream identically."""
    torch.manual_seed(0)
    layer = factory()
    x = torch.randn(2, channels, unit * 16)
    with torch.no_grad():
        a = Streamer(layer, 2)
        stream(layer, x[..., : unit * 7], [0, unit * 7], a)
        saved = a.export(1)
        b = Streamer(layer, 3)
        b.restore(2, saved)
        rest = x[1:2, :, unit * 7:]
        out_b = stream(layer, rest, [0, rest.shape[-1]], b, torch.tensor([2]))
        out_a = stream(layer, rest, [0, rest.shape[-1]], a, torch.tensor([1]))
    assert torch.equal(out_a, out_b)


@pytest.mark.parametrize(("factory", "channels", "unit"), [case[1:] for case in LAYERS], ids=[case[0] for case in LAYERS])
def test_consecutive_slots_step_like_gathered_slots(factory, channels, unit):
    """Slots {1, 2} stepped as a run (their state updated in place through views) give the
    outputs and states of the same slots stepped in the order {2, 1} (gathered and scattered)."""
    torch.manual_seed(0)
    layer = factory()
    x = torch.randn(4, channels, unit * 12)
    with torch.no_grad():
        runs, gathered = Streamer(layer, 4), Streamer(layer, 4)
        for streamer in (runs, gathered):
            stream(layer, x[..., : unit * 4], [0, unit * 4], streamer)
        cuts = [0, unit * 3, unit * 8]
        a = stream(layer, x[1:3, :, unit * 4:], cuts, runs, torch.tensor([1, 2]))
        b = stream(layer, x[[2, 1], :, unit * 4:], cuts, gathered, torch.tensor([2, 1]))
    assert_rel_close(a, b[[1, 0]], rel=1e-6)
    for slot in range(4):
        ra, rb = runs.export(slot), gathered.export(slot)
        for key, t in ra.items():
            if t.is_floating_point() and t.numel():
                assert_rel_close(t, rb[key], rel=1e-6)
            else:
                assert torch.equal(t, rb[key]), key


def test_slot_selection_becomes_a_run_when_consecutive():
    """All slots in order step as ``None``, a consecutive ascending run as a slice, others gathered."""
    streamer = Streamer(StreamingConv1d(1, 1, 3), 4)
    assert streamer._as_run(torch.arange(4)) is None
    assert streamer._as_run(torch.tensor([1, 2, 3])) == slice(1, 4)
    for rows in ([2, 1], [0, 2], [3, 4]):
        assert isinstance(streamer._as_run(torch.tensor(rows)), torch.Tensor)


def test_attention_differentiates_through_its_own_keys():
    """Under autograd a short step (below ``max_step``) still sends gradients to its keys and values."""
    torch.manual_seed(0)
    attn = StreamingMultiheadAttention(8, 2, context=4)
    attn(torch.randn(1, 3, 8))[:, -1].sum().backward()
    grad = attn.in_proj.weight.grad
    assert grad[8:16].abs().sum() > 0 and grad[16:].abs().sum() > 0  # key and value rows


def test_restore_refuses_foreign_state():
    """Restoring a state exported from a different network is a clear error."""
    a = Streamer(StreamingConv1d(2, 2, 3), 1)
    b = Streamer(nn.Sequential(StreamingConv1d(2, 2, 5)), 1)
    with pytest.raises(StreamingError, match="does not match"):
        b.restore(0, a.export(0))


def test_partial_stride_is_refused():
    """A step that is not a whole number of strides raises a clear StreamingError."""
    conv = StreamingConv1d(1, 1, 4, stride=2)
    with pytest.raises(StreamingError, match="whole strides"):
        conv(torch.randn(1, 1, 5))


def test_reflect_needs_enough_samples_in_first_step():
    """Reflect padding with a first step shorter than its context is a clear error."""
    conv = StreamingConv1d(1, 1, 7, pad_mode="reflect")
    with pytest.raises(StreamingError, match="reflect padding"):
        conv(torch.randn(1, 1, 4))


def test_attention_window_is_exact():
    """The query at step t sees keys t-context+1..t: a value changed at t-context is invisible."""
    torch.manual_seed(0)
    attn = StreamingMultiheadAttention(8, 2, context=4)
    x = torch.randn(1, 10, 8)
    y = x.clone()
    y[:, 5] += 5.0
    with torch.no_grad():
        a, b = attn(x), attn(y)
    assert torch.allclose(a[:, 9], b[:, 9])  # step 9 sees 6..9
    assert not torch.allclose(a[:, 8], b[:, 8])  # step 8 sees 5..8


def test_state_memory_is_bounded():
    """Streaming 100x the attention context leaves the state size unchanged."""
    attn = StreamingTransformer(8, 2, 1, 16, context=4)
    streamer = Streamer(attn, 1)
    size = streamer.state_bytes()
    with torch.no_grad(), streamer.stepping():
        for _ in range(100):
            attn(torch.randn(1, 8, 4))
    assert streamer.state_bytes() == size


def _build_stack(spec: list[tuple[str, int, int, int]], channels: int) -> tuple[nn.Module, int]:
    """Build a random conv stack from ``(kind, kernel, stride, dilation)``; return it and its hop."""
    layers: list[nn.Module] = []
    hop = 1
    for kind, kernel, stride, dilation in spec:
        if kind == "conv":
            layers.append(StreamingConv1d(channels, channels, max(kernel, stride), stride, dilation))
            hop *= stride
        else:
            layers.append(StreamingConvTranspose1d(channels, channels, max(kernel, stride), stride))
            # an upsampling layer divides the input unit needed for whole strides further on
    return nn.Sequential(*layers), hop


@settings(deadline=None, max_examples=25, derandomize=True)
@given(
    spec=st.lists(
        st.tuples(st.sampled_from(["conv", "convtr"]), st.integers(1, 8), st.integers(1, 4),
                  st.integers(1, 3)),
        min_size=1, max_size=5),
    seed=st.integers(0, 10_000),
)
def test_random_stacks_stream_like_offline(spec, seed):
    """Random stacks of convs and transposed convs stream like their offline pass."""
    torch.manual_seed(seed)
    # The step unit is the product of all conv strides (transposed convs only shrink it, and a
    # multiple of the full product is always a whole number of strides for every layer).
    model, _ = _build_stack(spec, 3)
    unit = 1
    for kind, _, stride, _ in spec:
        if kind == "conv":
            unit *= stride
    rng = random.Random(seed)
    x = torch.randn(2, 3, unit * 12)
    with torch.no_grad():
        ref = model(x)
        out = stream(model, x, split_points(x.shape[-1], unit, rng, max_units=4))
    assert_rel_close(out, ref)


def test_frames_doctests():
    """The worked examples in the frame arithmetic docstrings hold."""
    result = doctest.testmod(frames)
    assert result.attempted > 5 and result.failed == 0
