"""Prometheus text-format metrics, without a client library (pure: no I/O)."""

from __future__ import annotations

import bisect
from collections import defaultdict


class Histogram:
    """Cumulative-bucket histogram, rendered in the Prometheus exposition format."""

    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]) -> None:
        self.name, self.help, self.buckets = name, help_text, tuple(sorted(buckets))
        self._counts: dict[tuple[tuple[str, str], ...], list[int]] = defaultdict(
            lambda: [0] * (len(self.buckets) + 1))
        self._sums: dict[tuple[tuple[str, str], ...], float] = defaultdict(float)

    def observe(self, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        self._counts[key][bisect.bisect_left(self.buckets, value)] += 1
        self._sums[key] += value

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for key, counts in sorted(self._counts.items()):
            base = ",".join(f'{k}="{v}"' for k, v in key)
            sep = "," if base else ""
            total = 0
            for bound, c in zip(self.buckets, counts, strict=False):
                total += c
                lines.append(f'{self.name}_bucket{{{base}{sep}le="{bound:g}"}} {total}')
            total += counts[-1]
            lines.append(f'{self.name}_bucket{{{base}{sep}le="+Inf"}} {total}')
            lab = f"{{{base}}}" if base else ""
            lines.append(f"{self.name}_sum{lab} {self._sums[key]:.6f}")
            lines.append(f"{self.name}_count{lab} {total}")
        return lines


class Counter:
    def __init__(self, name: str, help_text: str) -> None:
        self.name, self.help = name, help_text
        self._values: dict[tuple[tuple[str, str], ...], float] = defaultdict(float)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        self._values[tuple(sorted(labels.items()))] += amount

    def value(self, **labels: str) -> float:
        return self._values.get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        for key, v in sorted(self._values.items()):
            lab = ",".join(f'{k}="{val}"' for k, val in key)
            lines.append(f"{self.name}{{{lab}}} {v:g}" if lab else f"{self.name} {v:g}")
        return lines


def gauge_lines(name: str, help_text: str, values: dict[tuple[tuple[str, str], ...], float]) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
    for key, v in sorted(values.items()):
        lab = ",".join(f'{k}="{val}"' for k, val in key)
        lines.append(f"{name}{{{lab}}} {v:g}" if lab else f"{name} {v:g}")
    return lines


LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)
STEP_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


class ServerMetrics:
    """Every series the daemon exports, prefixed ``streamtok_``."""

    def __init__(self) -> None:
        self.latency = Histogram("streamtok_latency_seconds",
                                 "Audio complete to tokens sent, per frame", LATENCY_BUCKETS)
        self.step = Histogram("streamtok_step_seconds", "Model step compute time", STEP_BUCKETS)
        self.queueing = Histogram("streamtok_queue_seconds",
                                  "Audio complete to compute start, per frame", LATENCY_BUCKETS)
        self.frames = Counter("streamtok_frames_total", "Frames of tokens (or audio) sent")
        self.errors = Counter("streamtok_errors_total", "Errors sent to clients, by code")
        self.sessions_total = Counter("streamtok_sessions_total", "Sessions started")

    def render(self, sessions: dict[str, int], extra: list[str] | None = None) -> str:
        lines = gauge_lines("streamtok_sessions", "Live sessions per model",
                            {(("model", m),): float(n) for m, n in sessions.items()})
        for metric in (self.sessions_total, self.frames, self.errors, self.step, self.queueing,
                       self.latency):
            lines += metric.render()
        lines += extra or []
        return "\n".join(lines) + "\n"
