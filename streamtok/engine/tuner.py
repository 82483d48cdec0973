"""Adaptive chunk-size tuner (pure: no clock, no sockets, no model).

Two chunk sizes matter. ``frames_per_step`` (k): how many frames of each live session the engine
steps at once. ``hint_ms``: how much audio a client should send per message.

**Frames per step.** The engine steps every session with k frames ready as soon as its worker is
free, all of them in one batch (:func:`streamtok.engine.engine.plan_steps`); sessions that become
ready during a step join the next one, so at k = 1 the batch grows with the load by itself and
a frame waits about one step. A bigger k adds ``k - 1`` frame periods of waiting; it pays off
only when the worker is saturated and each step costs something per step or per session that
fewer, bigger steps save. Whether that holds depends on the model, the device and the load, so
the tuner measures rather than predicts:

- at the current k it measures each frame's engine latency (its last sample's arrival to the end
  of its step), the worker's utilisation and the backlog (frames waiting beyond k), over the
  last ``load_window_s`` (the first decision interval after a change is left out: transition);
- within target (p95 + ``margin_s`` for the network <= ``target_s``) at k = 1 it stays; at k > 1
  it tries k/2 after ``patience`` decisions, unless k/2 was measured worse at this load or the
  cost fit says the doubled step count would not fit in the worker's time;
- over target with idle worker time, a bigger step cannot help (the latency is the step itself):
  it holds, or tries k/2 when k > 1;
- over target with the worker saturated, or with a backlog growing ``patience`` decisions in a
  row ("falling behind"), it tries 2k (at once when falling behind), unless 2k was measured no
  better at this load, or cannot beat the current p95 even in theory (its wait plus its
  predicted step, from the cost fit ``t = a + b * frames``, whose warm-up anchors at several
  batch sizes are kept for good);
- a bigger k must earn its extra waiting: at k > 1, when k is not measured clearly better
  (``better_margin``) than k/2 was, it goes back to k/2. Measurements are remembered per k for
  ``memory_s`` while the number of sessions stays within ``load_tolerance``, so a setting
  measured worse is not retried at the same load (no oscillation).

**The send hint.** Smaller packets cut the wait for a frame's last sample to reach the server (a
48 kHz microphone's packets do not line up with 16 kHz frames, and the resampler shifts them
further); bigger ones cost the server fewer messages. So the hint is a quarter of a step (at
least ``min_hint_ms``) while the worker is lightly loaded (utilisation under ``light_load``) and
one whole step when it is busy (over ``heavy_load``); in between it stays as it was.

An operator may pin either value (``pinned_frames_per_step``, ``pinned_hint_ms``).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field


@dataclass
class TunerConfig:
    frame_period_s: float
    target_s: float | None = None  # default: one frame period + margin_s
    margin_s: float = 0.02  # network/event-loop allowance inside the target
    headroom: float = 0.9  # use at most this share of the worker's time for compute
    max_frames_per_step: int = 16
    patience: int = 3  # decisions in a row before a move that is not urgent
    window: int = 256  # step-cost samples kept for the fit (anchors are kept apart)
    min_samples: int = 8  # step-cost samples before any decision
    load_window_s: float = 2.0  # latency and utilisation are measured over this much recent time
    better_margin: float = 0.1  # a setting is better when its p95 is lower by this share
    load_tolerance: float = 0.15  # a remembered measurement holds while sessions stay within this
    memory_s: float = 60.0  # ... and for at most this long
    light_load: float = 0.5  # below this utilisation the hint is a quarter of a step ...
    heavy_load: float = 0.8  # ... above this, one whole step
    min_hint_ms: int = 10
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
    changed: bool  # frames per step or hint changed
    p95_s: float  # measured engine p95 at the k being left or kept, plus margin_s (nan: unmeasured)
    keeps_up: bool  # no growing backlog, utilisation within headroom
    utilisation: float  # measured share of the worker's time spent in steps


@dataclass
class CostModel:
    """Least-squares fit of step seconds against frames in the step: ``t = a + b * frames``.

    ``anchors`` (e.g. warm-up steps at several batch sizes) stay for good and count
    ``anchor_weight`` times each; ``samples`` are the recent live steps (a rolling window)."""

    samples: deque = field(default_factory=lambda: deque(maxlen=256))
    anchors: list = field(default_factory=list)
    anchor_weight: float = 4.0

    def add(self, frames: int, seconds: float) -> None:
        self.samples.append((float(frames), float(seconds)))

    def anchor(self, frames: int, seconds: float) -> None:
        self.anchors.append((float(frames), float(seconds)))

    def __len__(self) -> int:
        return len(self.samples) + len(self.anchors)

    def fit(self) -> tuple[float, float]:
        pts = [(x, y, 1.0) for x, y in self.samples] + [(x, y, self.anchor_weight) for x, y in self.anchors]
        w = sum(p[2] for p in pts)
        if not w:
            return 0.0, 0.0
        mx = sum(x * wt for x, _, wt in pts) / w
        my = sum(y * wt for _, y, wt in pts) / w
        vx = sum(wt * (x - mx) ** 2 for x, _, wt in pts)
        if vx <= 1e-12:  # one batch size only: split the cost evenly, no fixed part known
            return 0.0, my / max(mx, 1.0)
        b = sum(wt * (x - mx) * (y - my) for x, y, wt in pts) / vx
        b = max(b, 0.0)
        a = max(my - b * mx, 0.0)
        return a, b


@dataclass
class _Interval:
    """Measurements between two decisions."""

    elapsed: float
    busy: float
    steps: int
    sessions: int
    latencies: list[float]
    backlog: int = 0  # frames waiting beyond k at the decision that closed it


@dataclass
class _Memory:
    """What a frames-per-step setting measured, and at which load."""

    sessions: int
    p95_s: float
    behind: bool  # its backlog kept growing
    growth: float  # backlog growth, frames per second
    at_s: float  # tuner time of the measurement

    def better_than(self, p95_s: float, behind: bool, growth: float, margin: float = 0.1) -> bool:
        """Keeping up beats falling behind; then clearly (``margin``) less backlog growth, or a
        clearly lower p95: differences within noise do not move the tuner."""
        if self.behind != behind:
            return behind
        if behind:  # growth rates are noisy: ask for a bigger difference
            return self.growth < growth * (1 - 2.5 * margin)
        return self.p95_s < p95_s * (1 - margin)  # nan (nothing came out) is never better


def _p95(xs: list[float]) -> float:
    if not xs:
        return math.nan
    s = sorted(xs)
    return s[min(len(s) - 1, int(0.95 * len(s)))]


class ChunkTuner:
    """Decides frames per step and the client send hint from measured latency, load and costs."""

    def __init__(self, config: TunerConfig) -> None:
        self.cfg = config
        self.cost = CostModel(deque(maxlen=config.window))
        self.frames_per_step = config.pinned_frames_per_step or 1
        self._fine_hint = True  # light load: sub-step packets
        self._votes = 0
        self._vote_for = 0
        self._settling = False
        self._behind_votes = 0
        self._last_backlog = 0
        self._pending = _Interval(0.0, 0.0, 0, 0, [])
        self._intervals: deque[_Interval] = deque()
        self._memory: dict[int, _Memory] = {}
        self._clock = 0.0  # sum of elapsed_s: the tuner's own time

    # -- inputs -----------------------------------------------------------------------------------
    def observe_step(self, frames: int, seconds: float) -> None:
        """One batched step took ``seconds`` for ``frames`` frames (all sessions together)."""
        self.cost.add(frames, seconds)
        self._pending.busy += seconds
        self._pending.steps += 1

    def observe_latency(self, seconds: list[float]) -> None:
        """Engine latencies of frames just delivered: end of their step minus the arrival of
        their last sample."""
        self._pending.latencies.extend(seconds)

    def anchor_step(self, frames: int, seconds: float) -> None:
        """A step timed outside live traffic (warm-up): kept in the cost fit for good."""
        self.cost.anchor(frames, seconds)

    # -- what was measured ------------------------------------------------------------------------
    def utilisation(self) -> tuple[float, float]:
        """(busy share of the worker, steps per second) over the recent window at this k."""
        elapsed = sum(i.elapsed for i in self._intervals)
        if elapsed <= 0:
            return 0.0, 0.0
        return (sum(i.busy for i in self._intervals) / elapsed,
                sum(i.steps for i in self._intervals) / elapsed)

    def p95(self) -> float:
        """Measured p95 latency at this k plus the network margin (nan before any frame)."""
        return _p95([x for i in self._intervals for x in i.latencies]) + self.cfg.margin_s

    def step_time(self, frames: float) -> float:
        """Predicted seconds of one step of ``frames`` frames in all (the cost fit)."""
        a, b = self.cost.fit()
        return a + b * frames

    def hint_ms(self) -> int:
        """Recommended client packet size at the current frames per step and load."""
        if self.cfg.pinned_hint_ms is not None:
            return self.cfg.pinned_hint_ms
        step_ms = 1000 * self.frames_per_step * self.cfg.frame_period_s
        if self._fine_hint:
            return max(self.cfg.min_hint_ms, min(round(step_ms / 4), round(step_ms)))
        return max(1, round(step_ms))

    def _remembered(self, k: int, sessions: int) -> _Memory | None:
        """What ``k`` measured, if recently and at about this many sessions."""
        m = self._memory.get(k)
        if m is None or self._clock - m.at_s > self.cfg.memory_s:
            return None
        if abs(m.sessions - sessions) > self.cfg.load_tolerance * max(sessions, 1):
            return None
        return m

    # -- the decision -----------------------------------------------------------------------------
    def decide(self, sessions: int, elapsed_s: float = 0.0, backlog_frames: int = 0) -> Decision:
        """Decide after ``elapsed_s`` seconds since the previous decision, with ``sessions`` live
        sessions and ``backlog_frames`` frames waiting beyond k (over all sessions)."""
        self._pending.elapsed, self._pending.sessions = elapsed_s, sessions
        self._pending.backlog = backlog_frames
        if self._settling:  # the first interval after a change carries the transition: drop it
            self._settling = False
        else:
            self._intervals.append(self._pending)
        self._pending = _Interval(0.0, 0.0, 0, 0, [])
        self._clock += elapsed_s
        while len(self._intervals) > 1 and \
                sum(i.elapsed for i in self._intervals) - self._intervals[0].elapsed >= self.cfg.load_window_s:
            self._intervals.popleft()
        growing = backlog_frames > max(sessions, 1) and backlog_frames >= self._last_backlog
        self._behind_votes = self._behind_votes + 1 if growing else 0
        self._last_backlog = backlog_frames
        k = self.frames_per_step
        u, rate = self.utilisation()
        p95 = self.p95()
        behind = self._behind_votes >= self.cfg.patience
        if self.cfg.pinned_frames_per_step is not None:
            return self._record(k, "pinned by operator", p95, u, behind)
        if sessions == 0 and k > 1:  # idle: the next session starts at the lowest latency
            return self._record(1, "idle: back to one frame per step", p95, u, behind)
        measured = sum(i.elapsed for i in self._intervals)
        if len(self.cost) < self.cfg.min_samples or measured < min(1.0, self.cfg.load_window_s) or sessions == 0:
            self._votes = 0
            return self._record(k, "measuring", p95, u, behind)
        iv = list(self._intervals)
        growth = (iv[-1].backlog - iv[0].backlog) / max(measured - iv[0].elapsed, 1e-9) if len(iv) > 1 else 0.0
        self._memory[k] = _Memory(sessions, p95, behind, growth, self._clock)
        over = behind or p95 > self.cfg.target
        down, up = k // 2, 2 * k
        below, above = self._remembered(down, sessions), self._remembered(up, sessions)
        if over:
            if k > 1 and below is not None and not self._memory[k].better_than(
                    below.p95_s, below.behind, below.growth, self.cfg.better_margin):
                # a bigger step must earn its extra waiting: back to the smaller one
                return self._vote(down, f"over target; {k} frames per step measured no better than {down}",
                                  p95, u, behind)
            saturated = u > self.cfg.headroom
            if not (behind or saturated):
                # the worker has idle time: the latency is the step itself plus waiting for k
                # frames; a smaller step cuts the waiting, a bigger one would add to it
                below_ok = below is None or below.better_than(p95, behind, growth, self.cfg.better_margin)
                if k > 1 and below_ok:
                    return self._vote(down, "over target with the worker not saturated: trying a "
                                            "smaller step", p95, u, behind)
                return self._hold(k, "over target with the worker not saturated: a bigger step "
                                     "would add waiting", p95, u, behind)
            floor = (up - 1) * self.cfg.frame_period_s + self.step_time(sessions * up) + self.cfg.margin_s
            if not behind and floor >= p95:
                return self._hold(k, f"over target, worker saturated; {up} frames per step could not "
                                     f"do better (at least {1000 * floor:.0f} ms)", p95, u, behind)
            why = "falling behind" if behind else "over target, worker saturated"
            if up > self.cfg.max_frames_per_step:
                return self._hold(k, f"{why} at the largest step", p95, u, behind)
            if above is not None and not above.better_than(p95, behind, growth, self.cfg.better_margin):
                return self._hold(k, f"{why}; {up} frames per step measured no better", p95, u, behind)
            # fewer, bigger steps save whatever each step costs per session: try it, measure it
            return self._vote(up, why, p95, u, behind, urgent=behind)
        if k > 1:
            if below is not None and not (not below.behind and below.p95_s <= self.cfg.target
                                          and below.p95_s < p95):
                return self._hold(k, f"within target; {down} frames per step measured worse", p95, u, behind)
            a, _ = self.cost.fit()
            if u + a * rate > self.cfg.headroom:  # halving k doubles the steps
                return self._hold(k, "within target; a smaller step would not keep up", p95, u, behind)
            return self._vote(down, "within target: trying a smaller step", p95, u, behind)
        return self._hold(k, "within target", p95, u, behind)

    def _hold(self, k: int, why: str, p95: float, u: float, behind: bool) -> Decision:
        self._votes = 0
        return self._record(k, why, p95, u, behind)

    def _vote(self, k_new: int, why: str, p95: float, u: float, behind: bool, urgent: bool = False) -> Decision:
        self._votes = self._votes + 1 if self._vote_for == k_new else 1
        self._vote_for = k_new
        if urgent or self._votes >= self.cfg.patience:
            self._votes = self._behind_votes = 0
            return self._record(k_new, why, p95, u, behind)
        return self._record(self.frames_per_step, f"{why} ({self._votes}/{self.cfg.patience})", p95, u, behind)

    def _record(self, k: int, why: str, p95: float, u: float, behind: bool) -> Decision:
        before = (self.frames_per_step, self.hint_ms())
        if k != self.frames_per_step:
            self._intervals.clear()  # measured afresh at the new k, once settled
            self._settling = True
            self._last_backlog = 0
        self.frames_per_step = k
        if not self._intervals:
            pass  # nothing measured at this k yet: the hint stays
        elif u < self.cfg.light_load:
            self._fine_hint = True
        elif u > self.cfg.heavy_load:
            self._fine_hint = False
        hint = self.hint_ms()
        return Decision(k, hint, why, (k, hint) != before, p95, not behind and u <= self.cfg.headroom, u)
