"""Adaptive chunk-size tuner (pure: no clock, no sockets, no model).

Two chunk sizes matter. ``frames_per_step`` (k): how many frames of each live session the engine
steps at once. Bigger steps amortize the fixed per-step cost (more streams per core) but a frame
may wait up to ``k - 1`` frame periods for its step. ``hint_ms``: how much audio a client should
send per message; sending more often than the engine steps buys nothing, so the hint follows k.

The tuner fits the measured step cost as ``t(B, k) = a + b * B * k`` (fixed cost ``a`` per step,
``b`` per frame) by least squares over recent steps, and predicts for each k:

- keeps up:   ``t(B, k) <= headroom * k * T``  (T = frame period, B = live sessions)
- latency:    ``p95 ~= (k - 1) * T + t(B, k) + margin_s``

It picks the smallest k that keeps up and meets ``target_s``; if none meets the target, the
smallest k that keeps up (latency degrades predictably); if none keeps up, the largest k
(overload: the monitor shows the backlog). Hysteresis: it moves up as soon as the current k
no longer keeps up, or after ``patience`` decisions over target; it moves down only after
``patience`` consecutive decisions in which the smaller k is predicted to fit with margin.

Example (T = 40 ms, a = 5 ms, b = 1 ms, target 60 ms)::

    B = 10: t(10, 1) = 15 ms  -> k = 1 keeps up, p95 ~ 15 ms  -> k = 1
    B = 60: t(60, 1) = 65 ms  -> k = 1 falls behind; t(60, 2) = 125 > 0.9 * 80 -> k = 2 no;
            k = 4: t = 245 > 144 no; no k keeps up (b * B >= T) -> k = max
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass
class TunerConfig:
    frame_period_s: float
    target_s: float | None = None  # default: one frame period + margin_s
    margin_s: float = 0.02  # network/event-loop allowance inside the target
    headroom: float = 0.9  # use at most this share of real time for compute
    max_frames_per_step: int = 16
    patience: int = 3
    window: int = 256  # step-cost samples kept for the fit
    min_samples: int = 8
    pinned_frames_per_step: int | None = None  # operator pin
    pinned_hint_ms: int | None = None

    @property
    def target(self) -> float:
        return self.target_s if self.target_s is not None else self.frame_period_s + self.margin_s


@dataclass
class Decision:
    frames_per_step: int
    hint_ms: int
    reason: str
    changed: bool
    predicted_p95_s: float
    keeps_up: bool


@dataclass
class CostModel:
    """Least-squares fit of step seconds against frames in the step: ``t = a + b * frames``."""

    samples: deque = field(default_factory=lambda: deque(maxlen=256))

    def add(self, frames: int, seconds: float) -> None:
        self.samples.append((float(frames), float(seconds)))

    def fit(self) -> tuple[float, float]:
        n = len(self.samples)
        if n == 0:
            return 0.0, 0.0
        xs = [f for f, _ in self.samples]
        ys = [t for _, t in self.samples]
        mx, my = sum(xs) / n, sum(ys) / n
        vx = sum((x - mx) ** 2 for x in xs)
        if vx <= 1e-12:  # one batch size only: split the cost evenly, no fixed part known
            return 0.0, my / max(mx, 1.0)
        b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / vx
        b = max(b, 0.0)
        a = max(my - b * mx, 0.0)
        return a, b


class ChunkTuner:
    """Decides frames per step and the client send hint from measured costs and load."""

    def __init__(self, config: TunerConfig) -> None:
        self.cfg = config
        self.cost = CostModel(deque(maxlen=config.window))
        self.frames_per_step = config.pinned_frames_per_step or 1
        self._up_votes = 0
        self._down_votes = 0
        self.history: list[Decision] = []

    def observe_step(self, frames: int, seconds: float) -> None:
        """One batched step took ``seconds`` for ``frames`` frames (all sessions together)."""
        self.cost.add(frames, seconds)

    def step_time(self, sessions: int, k: int) -> float:
        """Predicted seconds of one step of ``sessions`` sessions x ``k`` frames."""
        a, b = self.cost.fit()
        return a + b * max(sessions, 1) * k

    def predict(self, sessions: int, k: int) -> tuple[float, bool]:
        """(predicted p95 latency, keeps up) for ``sessions`` live sessions at ``k`` frames/step."""
        T = self.cfg.frame_period_s
        step = self.step_time(sessions, k)
        keeps_up = step <= self.cfg.headroom * k * T
        return (k - 1) * T + step + self.cfg.margin_s, keeps_up

    def hint_ms(self, k: int) -> int:
        if self.cfg.pinned_hint_ms is not None:
            return self.cfg.pinned_hint_ms
        return max(1, round(1000 * k * self.cfg.frame_period_s))

    def decide(self, sessions: int) -> Decision:
        k_now = self.frames_per_step
        if self.cfg.pinned_frames_per_step is not None:
            return self._record(self.cfg.pinned_frames_per_step, "pinned by operator", sessions)
        if len(self.cost.samples) < self.cfg.min_samples:
            return self._record(k_now, "measuring step cost", sessions)
        ks = [k for k in (1, 2, 4, 8, 16, 32) if k <= self.cfg.max_frames_per_step]
        preds = {k: self.predict(sessions, k) for k in ks}
        feasible = [k for k in ks if preds[k][1]]
        good = [k for k in feasible if preds[k][0] <= self.cfg.target]
        if good:
            best, why = good[0], "smallest step that keeps up within target"
        elif feasible:
            best, why = feasible[0], "no step meets the target: smallest that keeps up"
        else:
            # Nothing keeps up: bigger steps only help by the fixed cost they amortize, so take
            # the smallest k whose load (step time / real time) is within 5% of the best one,
            # not the largest k (which would add latency for nothing when the cost is per frame).
            load = {k: self.step_time(sessions, k) / (k * self.cfg.frame_period_s) for k in ks}
            floor = min(load.values())
            best = next(k for k in ks if load[k] <= floor * 1.05)
            why = "overloaded: no step keeps up"
        lat_now, up_now = preds.get(k_now, self.predict(sessions, k_now))
        if best > k_now:
            # Falling behind is urgent; being merely over target needs `patience` votes.
            self._up_votes += 1
            self._down_votes = 0
            if not up_now or self._up_votes >= self.cfg.patience:
                return self._commit(best, why, sessions)
            return self._record(k_now, f"holding ({self._up_votes}/{self.cfg.patience} to grow)", sessions)
        if best < k_now:
            self._down_votes += 1
            self._up_votes = 0
            # shrink only with margin: a smaller step meeting the target must fit at 80% of it
            # (no margin to ask for when none meets the target, e.g. under overload)
            lat_best, _ = preds[best]
            margin_ok = lat_best <= 0.8 * self.cfg.target or not good
            if self._down_votes >= self.cfg.patience and margin_ok:
                return self._commit(best, why, sessions)
            return self._record(k_now, f"holding ({self._down_votes}/{self.cfg.patience} to shrink)", sessions)
        self._up_votes = self._down_votes = 0
        return self._record(k_now, why, sessions)

    def _commit(self, k: int, why: str, sessions: int) -> Decision:
        self._up_votes = self._down_votes = 0
        return self._record(k, why, sessions)

    def _record(self, k: int, why: str, sessions: int) -> Decision:
        changed = k != self.frames_per_step
        self.frames_per_step = k
        lat, ok = self.predict(sessions, k) if self.cost.samples else (0.0, True)
        d = Decision(k, self.hint_ms(k), why, changed, lat, ok)
        self.history.append(d)
        if len(self.history) > 1024:
            del self.history[:512]
        return d
