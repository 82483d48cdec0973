"""A discrete-event model of the engine loop, to test the tuner without sockets or models.

Sessions produce a frame every ``T`` seconds from their own random phase. The simulated engine,
like the real one, steps every session that has at least k frames ready, grouped by
:func:`streamtok.engine.engine.plan_steps`, one group after the other on one worker; a step of
B sessions x n frames takes ``cost(B, n, t)`` seconds (times uniform noise). It asks the tuner
for a decision every ``decide_every`` seconds with the measured elapsed time and backlog, and
records each frame's latency: step end minus the time the frame's last sample arrived.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from streamtok.engine.engine import plan_steps
from streamtok.engine.tuner import ChunkTuner, Decision, TunerConfig

T = 0.04  # 25 Hz frames


@dataclass
class _Session:
    start: float  # its frame j is complete at start + (j + 1) * T
    taken: int = 0

    def ready(self, t: float) -> int:
        return max(0, math.floor((t - self.start) / T + 1e-9) - self.taken)


@dataclass
class SimResult:
    tuner: ChunkTuner
    decisions: list[tuple[float, int, Decision]] = field(default_factory=list)  # (t, sessions, d)
    frames: list[tuple[float, float]] = field(default_factory=list)  # (completed at, latency)

    def p95(self, t0: float, t1: float) -> float:
        lat = sorted(x for c, x in self.frames if t0 <= c < t1)
        return lat[min(len(lat) - 1, int(0.95 * len(lat)))] if lat else math.nan

    def ks(self, t0: float = 0.0, t1: float = math.inf) -> list[int]:
        return [d.frames_per_step for t, _, d in self.decisions if t0 <= t < t1]

    def last(self) -> Decision:
        return self.decisions[-1][2]


def linear(a: float, b: float) -> Callable[[int, int, float], float]:
    """Step cost ``a + b * sessions * frames``."""
    return lambda B, n, t: a + b * B * n


def simulate(cost: Callable[[int, int, float], float], load: Callable[[float], int], duration_s: float,
             cfg: TunerConfig | None = None, seed: int = 0, noise: float = 0.1,
             decide_every: float = 0.5) -> SimResult:
    rng = random.Random(seed)
    cfg = cfg or TunerConfig(frame_period_s=T)
    tuner = ChunkTuner(cfg)
    for b in (1, 4, 16):  # the engine's warm-up anchors
        tuner.anchor_step(b, cost(b, 1, 0.0))
    res = SimResult(tuner)
    sessions: list[_Session] = []
    t = last = 0.0
    while t < duration_s:
        want = load(t)
        while len(sessions) < want:
            sessions.append(_Session(t + rng.uniform(0.0, T)))
        del sessions[want:]
        k = tuner.frames_per_step
        if t - last >= decide_every:
            backlog = sum(max(0, s.ready(t) - k) for s in sessions)
            res.decisions.append((t, len(sessions), tuner.decide(len(sessions), t - last, backlog)))
            last = t
            k = tuner.frames_per_step
        ready = [(i, n) for i, s in enumerate(sessions) if (n := s.ready(t)) >= k]
        if not ready:
            nxt = min((s.start + (s.taken + k) * T for s in sessions), default=math.inf)
            t = min(nxt, last + decide_every) + 1e-9
            continue
        for n, keys in plan_steps(ready, cfg.max_frames_per_step):
            dt = cost(len(keys), n, t) * rng.uniform(1 - noise, 1 + noise)
            t += dt
            tuner.observe_step(len(keys) * n, dt)
            for i in keys:
                s = sessions[i]
                lat = [(s.start + (j + 1) * T, t - s.start - (j + 1) * T) for j in range(s.taken, s.taken + n)]
                tuner.observe_latency([x for _, x in lat])
                res.frames += lat
                s.taken += n
    return res
