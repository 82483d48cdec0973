"""The chunk-size tuner against synthetic step-cost models (pure: no sockets, no models)."""

from __future__ import annotations

import random

from streamtok.engine.tuner import ChunkTuner, CostModel, TunerConfig

T = 0.04  # 25 Hz frames


def simulate(cost, load, epochs: int, seed: int = 0, cfg: TunerConfig | None = None,
             steps_per_epoch: int = 12):
    """Run the tuner for ``epochs`` decisions. ``cost(B, k, epoch)`` is the true step time of a
    step with B sessions x k frames; ``load(epoch)`` the live sessions. Steps see partial batches
    (sessions' frames arrive at different times), as in the engine. Returns decisions."""
    rng = random.Random(seed)
    tuner = ChunkTuner(cfg or TunerConfig(frame_period_s=T))
    decisions = []
    for e in range(epochs):
        sessions = load(e)
        for _ in range(steps_per_epoch):
            b = rng.randint(max(1, sessions // 2), max(1, sessions))
            k = tuner.frames_per_step
            tuner.observe_step(b * k, cost(b, k, e) * rng.uniform(0.9, 1.1))
        decisions.append((sessions, tuner.decide(sessions)))
    return tuner, decisions


def linear(a: float, b: float):
    return lambda B, k, e: a + b * B * k


def test_cost_fit_recovers_fixed_and_per_frame_cost():
    """Least squares on (frames, seconds) recovers a = 5 ms and b = 1 ms."""
    m = CostModel()
    for frames in range(1, 40):
        m.add(frames, 0.005 + 0.001 * frames)
    a, b = m.fit()
    assert abs(a - 0.005) < 1e-9 and abs(b - 0.001) < 1e-9


def test_light_load_converges_to_one_frame_within_target():
    """With cheap steps the tuner keeps one frame per step and predicts latency under target."""
    tuner, decisions = simulate(linear(0.004, 0.0005), lambda e: 8, 30)
    last = decisions[-1][1]
    assert last.frames_per_step == 1 and last.keeps_up and last.predicted_p95_s <= T + 0.02
    assert last.hint_ms == 40


def test_fixed_cost_heavy_load_grows_the_step_and_keeps_up():
    """A large per-step overhead with many sessions makes bigger steps the only way to keep up."""
    # a = 34 ms per step, b = 0.1 ms per frame: 40 sessions at k=1 take 38 ms > 0.9 * 40 ms.
    tuner, decisions = simulate(linear(0.034, 0.0001), lambda e: 40, 40)
    last = decisions[-1][1]
    assert last.frames_per_step >= 2 and last.keeps_up
    assert last.hint_ms == 40 * last.frames_per_step


def test_load_ramp_degrades_predictably_past_capacity():
    """Ramping sessions: k grows stepwise while capacity allows, then reports overload at max k."""
    cost = linear(0.020, 0.0008)  # capacity: b * B < 0.9 * T -> B < 45 streams at any k
    tuner, decisions = simulate(cost, lambda e: 1 + e, 80)
    ks = [d.frames_per_step for s, d in decisions if s < 45]
    assert ks == sorted(ks), "k only grows on a rising load within capacity"
    within = [(s, d) for s, d in decisions if s <= 30]
    assert all(d.keeps_up for s, d in within[-10:])
    over = [d for s, d in decisions if s >= 60]
    assert over and all(not d.keeps_up for d in over[-5:])
    assert any(d.reason.startswith("overloaded") for d in over[-5:])
    # past capacity, bigger steps only amortize the fixed cost: k stops where that gain ends
    assert over[-1].frames_per_step < 16


def test_per_frame_cost_overload_does_not_inflate_the_step():
    """When the cost is all per frame (no fixed part), overload keeps k = 1: a bigger step
    would add latency and serve no more streams."""
    tuner, decisions = simulate(linear(0.0, 0.002), lambda e: 30, 30)
    last = decisions[-1][1]
    assert not last.keeps_up and last.frames_per_step == 1


def test_sudden_slowdown_is_followed_quickly():
    """When the step cost triples mid-run the tuner moves to a bigger step within a few decisions."""
    cost = lambda B, k, e: (0.006 + 0.0004 * B * k) * (3.0 if e >= 30 else 1.0)  # noqa: E731
    cfg = TunerConfig(frame_period_s=T, window=48)
    tuner, decisions = simulate(cost, lambda e: 30, 60, cfg=cfg)
    before = decisions[29][1].frames_per_step
    after = [d for _, d in decisions[30:]]
    grew = next(i for i, d in enumerate(after) if d.frames_per_step > before)
    assert grew <= 8


def test_noisy_stationary_load_does_not_oscillate():
    """Under a steady load with 10% cost noise, k changes at most once after the first 10 decisions."""
    tuner, decisions = simulate(linear(0.025, 0.0003), lambda e: 20, 100, seed=3)
    ks = [d.frames_per_step for _, d in decisions[10:]]
    changes = sum(1 for x, y in zip(ks, ks[1:], strict=False) if x != y)
    assert changes <= 1, ks


def test_operator_pin_wins():
    """A pinned frames-per-step and hint are kept whatever the load."""
    cfg = TunerConfig(frame_period_s=T, pinned_frames_per_step=4, pinned_hint_ms=100)
    tuner, decisions = simulate(linear(0.030, 0.0001), lambda e: 2, 10, cfg=cfg)
    assert all(d.frames_per_step == 4 and d.hint_ms == 100 for _, d in decisions)
