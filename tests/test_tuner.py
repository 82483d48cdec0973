"""The chunk-size tuner against synthetic step-cost models (pure: no sockets, no models).

Each test runs the discrete-event engine model of ``tuner_sim`` (sessions of random phase, the
engine's own step grouping, cost ``a + b * sessions * frames`` with 10% noise) and judges the
tuner by the latency the simulated frames actually saw, next to fixed settings run the same way.
"""

from __future__ import annotations

import math

from tuner_sim import T, linear, simulate

from streamtok.engine.engine import plan_steps
from streamtok.engine.tuner import ChunkTuner, CostModel, TunerConfig

TARGET = T + 0.02  # the default target: one frame period + 20 ms for the network


def fixed(k: int) -> TunerConfig:
    return TunerConfig(frame_period_s=T, pinned_frames_per_step=k)


def test_cost_fit_recovers_fixed_and_per_frame_cost():
    """Least squares on (frames, seconds) recovers a = 5 ms and b = 1 ms."""
    m = CostModel()
    for frames in range(1, 40):
        m.add(frames, 0.005 + 0.001 * frames)
    a, b = m.fit()
    assert abs(a - 0.005) < 1e-9 and abs(b - 0.001) < 1e-9


def test_warm_up_anchors_outlive_the_rolling_window():
    """Live steps that all have one size cannot separate fixed from per-frame cost; the warm-up
    anchors at several sizes keep the fit right after the window has rolled over."""
    m = CostModel(anchors=[])
    m.samples = type(m.samples)(maxlen=16)
    for frames in (1, 4, 16):
        m.anchor(frames, 0.005 + 0.001 * frames)
    for _ in range(100):
        m.add(8, 0.013)
    a, b = m.fit()
    assert abs(a - 0.005) < 1e-6 and abs(b - 0.001) < 1e-6


def test_plan_steps_keeps_live_sessions_in_one_step():
    """Sessions a frame or two apart step together (one fixed cost); only a real backlog gets a
    catch-up step of its own."""
    assert plan_steps([(1, 1), (2, 2), (3, 3), (4, 1)], 16) == [(1, [1, 2, 3, 4])]
    assert plan_steps([(1, 2), (2, 3), (3, 2)], 16) == [(2, [1, 2, 3])]
    assert plan_steps([(1, 1), (2, 9), (3, 100)], 16) == [(1, [1]), (8, [2]), (16, [3])]
    assert plan_steps([], 16) == []


def test_light_load_keeps_one_frame_and_fine_packets_within_target():
    """One session on a cheap model: k = 1, a quarter-frame send hint, latency within target."""
    res = simulate(linear(0.004, 0.0005), lambda t: 1, 10)
    last = res.last()
    assert last.frames_per_step == 1 and last.keeps_up
    assert last.hint_ms == 10
    assert res.p95(3, 10) + 0.02 <= TARGET
    assert last.p95_s <= TARGET


def test_busy_engine_asks_for_whole_step_packets():
    """A busy worker (utilisation over heavy_load, 0.8) makes the hint one whole step: fewer messages."""
    res = simulate(linear(0.006, 0.0023), lambda t: 12, 10)
    last = res.last()
    assert last.utilisation > 0.8 and last.hint_ms == round(1000 * T * last.frames_per_step)


def test_hint_comes_back_down_when_load_drops():
    """12 sessions then 1: the hint goes back to a quarter frame."""
    res = simulate(linear(0.006, 0.0023), lambda t: 12 if t < 8 else 1, 16)
    hints = [d.hint_ms for t, _, d in res.decisions]
    assert 40 in hints[:16] and hints[-1] == 10


def test_within_capacity_the_tuner_matches_the_best_fixed_step():
    """Across loads and cost shapes the tuner's measured p95 is within 10% (+2 ms) of the best
    fixed frames-per-step setting, and within target wherever a fixed setting is."""
    cases = [(linear(0.006, 0.0023), (1, 8, 12)), (linear(0.020, 0.0008), (4, 16, 24)),
             (linear(0.034, 0.0002), (8, 24)), (linear(0.012, 0.00005), (50, 400))]
    for cost, loads in cases:
        for sessions in loads:
            best = min(simulate(cost, lambda t, n=sessions: n, 14, cfg=fixed(k)).p95(6, 14) for k in (1, 2, 4))
            tuned = simulate(cost, lambda t, n=sessions: n, 14).p95(6, 14)
            assert tuned <= best * 1.1 + 0.002, (sessions, tuned, best)
            if best + 0.02 <= TARGET:
                assert tuned + 0.02 <= TARGET * 1.05, (sessions, tuned)


def test_load_ramp_stays_under_target_while_capacity_allows_then_degrades_predictably():
    """Ramp 1 -> 24 sessions on the realistic CPU cost (a = 6 ms, b = 2.3 ms: per-frame capacity
    ~17 streams): latency within target at low load, k stays 1 while the worker has idle time
    (a bigger step would only add waiting), and past capacity the decisions say so."""
    res = simulate(linear(0.006, 0.0023), lambda t: 1 + int(t // 2), 48)
    assert res.p95(2, 14) + 0.02 <= TARGET  # up to 7 sessions
    assert set(res.ks(0, 20)) == {1}
    late = [d for t, n, d in res.decisions if n >= 20 and d.reason != "measuring"]
    assert late and not any(d.keeps_up for d in late)
    assert all("over target" in d.reason or "falling behind" in d.reason for d in late)


def test_per_frame_overload_does_not_inflate_the_step():
    """All cost per frame (no fixed part), 30 sessions at 2 ms per frame: hopeless at any k.
    The tuner says so, tries bigger steps at most up to 4 frames (measured no better, so not
    retried at this load), and ends no worse than fixed k = 1."""
    res = simulate(linear(0.0, 0.002), lambda t: 30, 16)
    last = [d for _, _, d in res.decisions if d.reason != "measuring"][-1]
    assert not last.keeps_up
    ks = res.ks()
    assert max(ks) <= 4 and sum(1 for x, y in zip(ks, ks[1:], strict=False) if x != y) <= 4, ks
    one = simulate(linear(0.0, 0.002), lambda t: 30, 16, cfg=fixed(1))
    assert res.p95(8, 16) <= one.p95(8, 16) * 1.1


def test_saturated_worker_with_per_step_costs_moves_to_a_bigger_step():
    """A cost with a per-session part per step (gathering state, delivering results): at 25
    sessions k = 1 saturates the worker and queues; the tuner tries bigger steps, keeps the one
    measured best (k = 2 here) and beats fixed k = 1 clearly."""
    cost = lambda B, n, t: 0.002 + 0.0015 * B + 0.0005 * B * n  # noqa: E731
    res = simulate(cost, lambda t: 25, 24)
    one = simulate(cost, lambda t: 25, 24, cfg=fixed(1)).p95(12, 24)
    two = simulate(cost, lambda t: 25, 24, cfg=fixed(2)).p95(12, 24)
    assert res.last().frames_per_step == 2
    assert res.p95(12, 24) < 0.8 * one and res.p95(12, 24) <= two * 1.1 + 0.002
    ks = res.ks(12, 24)
    assert len(set(ks)) == 1, ks  # settled: no retrying of a setting measured worse


def test_sudden_slowdown_is_reported_and_followed_without_oscillation():
    """The step cost triples mid-run: decisions report the higher latency within a few
    decisions and k changes at most three times afterwards (trials included)."""
    cost = lambda B, n, t: (0.006 + 0.0004 * B * n) * (3.0 if t >= 10 else 1.0)  # noqa: E731
    res = simulate(cost, lambda t: 20, 24)
    before = [d.p95_s for t, _, d in res.decisions if 6 <= t < 10 and d.reason != "measuring"]
    after = [d.p95_s for t, _, d in res.decisions if 13 <= t < 24 and d.reason != "measuring"]
    assert max(before) < min(after)
    ks = res.ks(10, 24)
    assert sum(1 for x, y in zip(ks, ks[1:], strict=False) if x != y) <= 3, ks


def test_noisy_stationary_load_does_not_oscillate():
    """Steady load, 10% cost noise, three seeds: k changes at most once after the first 3 s."""
    for seed in range(3):
        res = simulate(linear(0.025, 0.0003), lambda t: 20, 30, seed=seed)
        ks = res.ks(3, 30)
        assert sum(1 for x, y in zip(ks, ks[1:], strict=False) if x != y) <= 1, (seed, ks)


def test_operator_pin_wins():
    """A pinned frames-per-step and hint are kept whatever the load."""
    cfg = TunerConfig(frame_period_s=T, pinned_frames_per_step=4, pinned_hint_ms=100)
    res = simulate(linear(0.030, 0.0001), lambda t: 2, 5, cfg=cfg)
    assert all(d.frames_per_step == 4 and d.hint_ms == 100 for _, _, d in res.decisions)


def test_no_decision_before_measurements():
    """Before any step was timed the tuner holds k = 1 and says it is measuring."""
    tuner = ChunkTuner(TunerConfig(frame_period_s=T))
    d = tuner.decide(5, 0.5, 0)
    assert d.frames_per_step == 1 and d.reason == "measuring" and math.isnan(d.p95_s)


def test_idle_engine_returns_to_one_frame_per_step():
    """After a load that needed k = 2, the last session leaving puts k back to 1."""
    cost = lambda B, n, t: 0.002 + 0.0015 * B + 0.0005 * B * n  # noqa: E731
    res = simulate(cost, lambda t: 25 if t < 12 else 0, 14)
    assert 2 in res.ks(0, 12)
    assert res.last().frames_per_step == 1
