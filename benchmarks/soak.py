"""Soak: many concurrent real-time sessions for minutes, every frame checked, the server watched.

Starts ``streamtok --threads 1 serve --port 0 --model M`` in a subprocess (so its memory, CPU and
file descriptors can be read from ``/proc/PID``), then runs ``--sessions`` sessions on loopback,
started over ``--ramp`` seconds. Each streams speech clips (the shared dev set, else a seeded
synthetic signal) as s16le at the model rate, paced in real time in packets of the server's
send hint, with a ``flush`` after each clip and ``end`` after the last one, until at least
``--minutes`` of audio went through. Each session checks every frame as it arrives:

- frame indices go 0, 1, 2, ... with none lost, duplicated or out of order;
- each clip's codes equal the offline encode of that clip (a flush starts a fresh stream), up to
  genuine near-ties (``compare_codes``: batch shapes round floats differently);
- one ``flushed`` per clip with the right ``last_frame``, no ``error``, close 1000 after ``end``.

Sampled every second: the server's RSS, CPU (share of one core) and open file descriptors; per
window, latency p50/p99 as the client sees it (receive time of a frame - send time of the packet
that completed it, on loopback) and the server's share (``timing.sent - audio_complete``).
Reported: a table over time, RSS growth after warm-up, fds before / at peak / after all sessions
ended, and a PNG plot (needs matplotlib: ``pip install -e '.[bench]'``).

    python benchmarks/soak.py                                   # 100 sessions x 10 min, default
    python benchmarks/soak.py --sessions 20 --minutes 2
    python benchmarks/soak.py --quick                           # 8 sessions x 0.5 min, tiny

Exits 1 if any frame was lost, duplicated, reordered or had the wrong codes, a session failed, or
the server's fds did not come back to their baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from streamtok.audio.pcm import decode_pcm, encode_pcm
from streamtok.audio.resample import resample
from streamtok.models.quantization import compare_codes
from streamtok.models.registry import load_model
from streamtok.server import protocol as P
from streamtok.tokenize_file import encode_array, read_audio

REPO = Path(__file__).resolve().parents[1]
DEV = REPO.parent / "shared" / "data" / "speech" / "dev"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------------------------
# Clips and their offline reference


@dataclass
class Clip:
    """One clip as the server will receive it, and its offline encode (the reference).

    ``pcm``: s16le bytes at the model rate; ``codes`` ``[K, T]`` int64; ``latents`` ``[D, T]``.
    """

    name: str
    rate: int
    pcm: bytes
    samples: int
    codes: torch.Tensor
    latents: torch.Tensor

    @property
    def frames(self) -> int:
        return self.codes.shape[1]


def load_clips(count: int, seconds: float, rate: int) -> list[tuple[str, np.ndarray]]:
    """``count`` speech clips of up to ``seconds`` at ``rate`` (float32 mono): the longest
    shared dev files, else a seeded chirp-plus-noise signal at different pitches."""
    clips = []
    manifest = DEV / "manifest.tsv"
    if manifest.exists():
        rows = [line.split("\t") for line in manifest.read_text().splitlines()[1:]]
        rows.sort(key=lambda r: -float(r[1]))
        for row in rows[:count]:
            audio, sr = read_audio(DEV / row[0])
            audio = audio[: int(sr * seconds)]
            clips.append((row[0], resample(audio, sr, rate) if sr != rate else audio))
    rng = np.random.default_rng(0)
    while len(clips) < count:
        t = np.arange(int(rate * seconds)) / rate
        f0 = 120 + 40 * len(clips)
        audio = 0.3 * np.sin(2 * np.pi * f0 * t * (1 + t / seconds)) + 0.05 * rng.standard_normal(len(t))
        clips.append((f"synthetic-{f0}Hz", audio.astype(np.float32)))
    return clips


def reference(model, name: str, audio: np.ndarray) -> Clip:
    """The clip (at the model rate) as s16le bytes and the offline encode of exactly those
    samples."""
    rate = model.card.sample_rate
    pcm = encode_pcm(audio.astype(np.float32), "s16le")
    received = decode_pcm(pcm, "s16le", 1)
    ref = encode_array(model, received, rate, latents=True)
    return Clip(name, rate, pcm, len(received), torch.from_numpy(ref.codes),
                torch.from_numpy(ref.latents))


# --------------------------------------------------------------------------------------------
# One session, checked frame by frame


@dataclass
class SessionReport:
    """What one session saw; ``ok`` when nothing was wrong."""

    frames: int = 0
    expected_frames: int = 0
    lost: int = 0
    duplicated: int = 0
    reordered: int = 0
    segments_checked: int = 0
    codes_failing: int = 0  # frames whose codes differ beyond a near-tie
    codes_excused: int = 0  # near-ties
    flushed_wrong: int = 0
    errors: list[str] = field(default_factory=list)
    close_code: int | None = None

    @property
    def ok(self) -> bool:
        return (self.frames == self.expected_frames and not (self.lost or self.duplicated
                or self.reordered or self.codes_failing or self.flushed_wrong or self.errors)
                and self.close_code == 1000)


class FrameCheck:
    """Checks a session's frames as they arrive: order, completeness, codes per clip.

    Clip ``s`` of the session covers frames ``[s * F, (s + 1) * F)`` (F = the clip's frames),
    and, since a flush follows each clip, equals the offline encode of the clip.
    """

    def __init__(self, clip: Clip, quantizer, reps: int, report: SessionReport) -> None:
        self.clip, self.quantizer, self.reps, self.r = clip, quantizer, reps, report
        self.expected = 0
        self.missing: set[int] = set()
        self.segment: list[tuple[int, ...]] = []
        self.segment_broken = False
        self.flushes = 0
        report.expected_frames = reps * clip.frames

    def frame(self, index: int, codes: tuple[int, ...] | None) -> None:
        r = self.r
        r.frames += 1
        if index < self.expected:
            if index in self.missing:
                self.missing.discard(index)
                r.reordered += 1
            else:
                r.duplicated += 1
            self.segment_broken = True
            return
        if index > self.expected:
            r.lost += index - self.expected
            self.missing.update(range(self.expected, index))
            self.segment_broken = True
        self.expected = index + 1
        self.segment.append(codes or ())
        if (index + 1) % self.clip.frames == 0:
            self._check_segment()

    def _check_segment(self) -> None:
        if not self.segment_broken and len(self.segment) == self.clip.frames:
            got = torch.tensor(self.segment, dtype=torch.int64).T
            cmp = compare_codes(self.quantizer, self.clip.latents, self.clip.codes, got)
            self.r.codes_failing += cmp.failing
            self.r.codes_excused += cmp.excused
            self.r.segments_checked += 1
        self.segment, self.segment_broken = [], False

    def flushed(self, last_frame: int | None) -> None:
        self.flushes += 1
        if last_frame != self.flushes * self.clip.frames - 1:
            self.r.flushed_wrong += 1


@dataclass
class LatencyLog:
    """Per-frame latencies, bucketed by the time they were received (``window_s`` windows)."""

    t0: float
    window_s: float
    client: dict[int, list[float]] = field(default_factory=dict)
    server: dict[int, list[float]] = field(default_factory=dict)

    def add(self, now: float, client_s: float | None, server_s: float) -> None:
        w = int((now - self.t0) // self.window_s)
        if client_s is not None:
            self.client.setdefault(w, []).append(client_s)
        self.server.setdefault(w, []).append(server_s)


async def run_session(url: str, model_name: str, clip: Clip, reps: int, quantizer,
                      latency: LatencyLog, delay_s: float = 0.0, realtime: bool = True,
                      token: str | None = None, ack_every: int = 25) -> SessionReport:
    """Stream ``clip`` ``reps`` times (flush between, ``end`` last) in real time; check it all.

    Every ``ack_every`` frames (0: never) the session sends ``ack``, as a well-behaved client
    does, so the server can drop frames it keeps for resume (else it keeps
    ``resume_buffer_s`` of them per session)."""
    await asyncio.sleep(delay_s)
    report = SessionReport()
    check = FrameCheck(clip, quantizer, reps, report)
    loop = asyncio.get_running_loop()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    async with connect(url, max_size=None, compression=None, open_timeout=60,
                       additional_headers=headers) as ws:
        start = P.StartMessage(model=model_name, sample_rate=clip.rate,
                               format=P.AudioFormat.S16LE, outputs=P.Outputs(codes=True))
        await ws.send(P.encode_client_message(start))
        ready = P.parse_server_message(await asyncio.wait_for(ws.recv(), 60))
        if not isinstance(ready, P.ReadyMessage):
            report.errors.append(f"no ready: {ready!r}")
            return report
        card = ready.model
        hint = [ready.send_hint_ms]
        next_ack = [ack_every - 1]
        ended = [False]
        sends: deque[tuple[int, float]] = deque()  # (samples sent so far, when)

        async def receive() -> None:
            async for data in ws:
                now = loop.time()
                msg = P.parse_server_message(data)
                if isinstance(msg, P.TokensMessage):
                    for f in msg.frames:
                        check.frame(f.index, f.codes)
                        latency.add(now, _client_latency(f.index, clip, card, sends, now),
                                    msg.timing.sent - msg.timing.audio_complete)
                    last = msg.frames[-1].index
                    if ack_every and last >= next_ack[0] and not ended[0]:  # nothing after `end`
                        next_ack[0] = last + ack_every
                        await ws.send(P.encode_client_message(P.AckMessage(frame=last)))
                elif isinstance(msg, P.FlushedMessage):
                    check.flushed(msg.last_frame)
                elif isinstance(msg, P.HintMessage):
                    hint[0] = msg.send_ms
                elif isinstance(msg, P.ErrorMessage):
                    report.errors.append(f"{msg.code}: {msg.message}")

        reader = asyncio.create_task(receive())
        try:
            t0 = loop.time()
            sent = 0
            for rep in range(reps):
                pos = 0
                while pos < clip.samples:
                    n = min(max(1, hint[0] * card.sample_rate // 1000), clip.samples - pos)
                    if realtime:
                        await asyncio.sleep(max(0.0, t0 + (sent + n) / card.sample_rate - loop.time()))
                    await ws.send(P.encode_client_message(
                        P.AudioMessage(data=clip.pcm[2 * pos:2 * (pos + n)])))
                    pos += n
                    sent += n
                    sends.append((sent, loop.time()))
                ended[0] = rep == reps - 1
                await ws.send(P.encode_client_message(P.EndMessage() if ended[0] else P.FlushMessage()))
            await asyncio.wait_for(reader, 120)
        except (ConnectionClosed, asyncio.TimeoutError) as e:
            report.errors.append(f"connection: {e!r}")
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                await reader
    report.close_code = ws.close_code
    return report


def _client_latency(index: int, clip: Clip, card: P.ModelCard, sends: deque[tuple[int, float]],
                    now: float) -> float | None:
    """Receive time - send time of the packet holding the last sample frame ``index`` needs.

    Frame ``index`` is frame ``index % F`` of clip ``index // F``; its last input sample is that
    clip's own (a flush pads the last frame: that one completes with the clip's last packet).
    Packets are consumed in order, so the deque stays short.
    """
    rep, k = divmod(index, clip.frames)
    need = rep * clip.samples + min((k + 1) * card.frame_size, clip.samples)
    while sends and sends[0][0] < need:
        sends.popleft()
    return now - sends[0][1] if sends else None


# --------------------------------------------------------------------------------------------
# The server under test and what /proc says about it


def proc_sample(pid: int) -> tuple[float, float, int]:
    """(RSS in MiB, CPU seconds so far, open file descriptors) of process ``pid``."""
    rss = 0.0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
                break
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime
    return rss, cpu, len(os.listdir(f"/proc/{pid}/fd"))


@dataclass
class Sample:
    t: float
    rss_mb: float
    cpu_pct: float
    fds: int
    sessions: int


class ProcSampler:
    """Samples a process every ``interval_s`` from /proc (an asyncio task)."""

    def __init__(self, pid: int, t0: float, interval_s: float = 1.0) -> None:
        self.pid, self.t0, self.interval_s = pid, t0, interval_s
        self.samples: list[Sample] = []
        self.live_sessions = 0
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        last_t, last_cpu = time.monotonic(), proc_sample(self.pid)[1]
        while True:
            await asyncio.sleep(self.interval_s)
            rss, cpu, fds = proc_sample(self.pid)
            now = time.monotonic()
            pct = 100 * (cpu - last_cpu) / max(now - last_t, 1e-9)
            last_t, last_cpu = now, cpu
            self.samples.append(Sample(now - self.t0, rss, pct, fds, self.live_sessions))


@contextlib.contextmanager
def server_process(model: str, sessions: int, log_path: Path):
    """``streamtok --threads 1 serve --port 0 --model M`` in a subprocess; yields (pid, url)."""
    exe = shutil.which("streamtok") or str(Path(sys.executable).parent / "streamtok")
    cmd = [exe, "--threads", "1", "serve", "--host", "127.0.0.1", "--port", "0", "--model", model,
           "--max-sessions", str(max(64, sessions))]
    env = dict(os.environ, STREAMTOK_IDLE_TIMEOUT_S="120", STREAMTOK_BUFFER_SECONDS="60")
    log = open(log_path, "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 300
        port = None
        while port is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: see {log_path}\n{log_path.read_text()[-2000:]}")
            m = re.search(r"listening on ws://[\d.]+:(\d+)", log_path.read_text())
            port = int(m.group(1)) if m else None
            time.sleep(0.1)
        yield proc.pid, f"ws://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


# --------------------------------------------------------------------------------------------
# The run


def percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else math.nan


async def soak(url: str, pid: int, model, clips: list[Clip], sessions: int, seconds: float,
               ramp_s: float, window_s: float, realtime: bool = True,
               settle_s: float = 15.0, ack_every: int = 25) -> dict:
    """Run the sessions against ``url`` while sampling process ``pid``; return the figures."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    sampler = ProcSampler(pid, time.monotonic())
    await asyncio.sleep(1.0)
    baseline = proc_sample(pid)
    sampler.start()
    latency = LatencyLog(t0, window_s)

    async def one(i: int) -> SessionReport:
        clip = clips[i % len(clips)]
        reps = max(1, math.ceil(seconds * clip.rate / clip.samples))
        sampler.live_sessions += 1
        try:
            return await run_session(url, model.card.name, clip, reps, model.quantizer, latency,
                                     delay_s=ramp_s * i / max(1, sessions), realtime=realtime,
                                     ack_every=ack_every)
        except Exception as e:  # a session that broke is a finding, not a crash of the run
            return SessionReport(errors=[f"session raised {e!r}"])
        finally:
            sampler.live_sessions -= 1

    reports = await asyncio.gather(*(one(i) for i in range(sessions)))
    ended = loop.time() - t0
    fds_after = proc_sample(pid)[2]
    settle_deadline = loop.time() + settle_s
    while fds_after > baseline[2] and loop.time() < settle_deadline:
        await asyncio.sleep(0.5)
        fds_after = proc_sample(pid)[2]
    await asyncio.sleep(1.0)
    await sampler.stop()
    rss_after = proc_sample(pid)[0]
    return summarize(reports, sampler.samples, latency, baseline, fds_after, rss_after, ended,
                     ramp_s, seconds, window_s)


def summarize(reports: list[SessionReport], samples: list[Sample], latency: LatencyLog,
              baseline: tuple[float, float, int], fds_after: int, rss_after: float, ended: float,
              ramp_s: float, seconds: float, window_s: float) -> dict:
    windows = sorted(set(latency.client) | set(latency.server))
    rows = []
    for w in windows:
        t_mid = (w + 0.5) * window_s
        near = [s for s in samples if w * window_s <= s.t < (w + 1) * window_s]
        rows.append({
            "t_s": t_mid,
            "frames": len(latency.server.get(w, [])),
            "client_p50_ms": 1000 * percentile(latency.client.get(w, []), 50),
            "client_p99_ms": 1000 * percentile(latency.client.get(w, []), 99),
            "server_p50_ms": 1000 * percentile(latency.server.get(w, []), 50),
            "server_p99_ms": 1000 * percentile(latency.server.get(w, []), 99),
            "rss_mb": max((s.rss_mb for s in near), default=math.nan),
            "cpu_pct": float(np.mean([s.cpu_pct for s in near])) if near else math.nan,
            "fds": max((s.fds for s in near), default=0),
            "sessions": max((s.sessions for s in near), default=0),
        })
    # Warm-up: the ramp, plus a fifth of the streaming time (at most a minute).
    warm = ramp_s + min(60.0, 0.2 * seconds)
    steady = [s for s in samples if warm <= s.t <= ended]
    rss_warm = steady[0].rss_mb if steady else math.nan
    rss_end = steady[-1].rss_mb if steady else math.nan
    all_client = [x for v in latency.client.values() for x in v]
    all_server = [x for v in latency.server.values() for x in v]
    total = SessionReport()
    for r in reports:
        for name in ("frames", "expected_frames", "lost", "duplicated", "reordered",
                     "segments_checked", "codes_failing", "codes_excused", "flushed_wrong"):
            setattr(total, name, getattr(total, name) + getattr(r, name))
    return {
        "sessions": len(reports),
        "sessions_ok": sum(r.ok for r in reports),
        "errors": [e for r in reports for e in r.errors][:20],
        "close_codes": sorted({r.close_code for r in reports if r.close_code is not None}),
        "frames": {k: v for k, v in asdict(total).items() if k not in ("errors", "close_code")},
        "client_latency_ms": {"p50": 1000 * percentile(all_client, 50),
                              "p99": 1000 * percentile(all_client, 99),
                              "max": 1000 * max(all_client, default=math.nan)},
        "server_latency_ms": {"p50": 1000 * percentile(all_server, 50),
                              "p99": 1000 * percentile(all_server, 99)},
        "rss_mb": {"baseline": baseline[0], "after_warmup": rss_warm, "end_of_streaming": rss_end,
                   "growth_after_warmup": rss_end - rss_warm,
                   "peak": max((s.rss_mb for s in samples), default=math.nan),
                   "after_sessions_ended": rss_after},
        "cpu_pct_mean_streaming": float(np.mean([s.cpu_pct for s in steady])) if steady else math.nan,
        "fds": {"baseline": baseline[2], "peak": max((s.fds for s in samples), default=0),
                "after_sessions_ended": fds_after},
        "wall_s": ended,
        "windows": rows,
        "samples": [asdict(s) for s in samples],
    }


def format_report(res: dict) -> str:
    lines = [f"{'t s':>6} {'sess':>4} {'frames':>7} {'p50 ms':>7} {'p99 ms':>7} {'srv p99':>7} "
             f"{'RSS MB':>7} {'CPU %':>6} {'fds':>5}"]
    for w in res["windows"]:
        lines.append(f"{w['t_s']:6.0f} {w['sessions']:4d} {w['frames']:7d} {w['client_p50_ms']:7.1f} "
                     f"{w['client_p99_ms']:7.1f} {w['server_p99_ms']:7.1f} {w['rss_mb']:7.1f} "
                     f"{w['cpu_pct']:6.1f} {w['fds']:5d}")
    f, rss, fds = res["frames"], res["rss_mb"], res["fds"]
    lat, srv = res["client_latency_ms"], res["server_latency_ms"]
    lines += [
        "",
        f"sessions ok: {res['sessions_ok']}/{res['sessions']} (close codes {res['close_codes']})",
        f"frames: {f['frames']:,} received of {f['expected_frames']:,} expected; lost {f['lost']}, "
        f"duplicated {f['duplicated']}, reordered {f['reordered']}",
        f"codes: {f['segments_checked']} clips compared with the offline encode; "
        f"{f['codes_failing']} frames differ, {f['codes_excused']} near-ties; "
        f"wrong flushed: {f['flushed_wrong']}",
        f"latency (client, loopback): p50 {lat['p50']:.1f} ms, p99 {lat['p99']:.1f} ms, "
        f"max {lat['max']:.1f} ms; server share p50 {srv['p50']:.1f} ms, p99 {srv['p99']:.1f} ms",
        f"server RSS: {rss['baseline']:.1f} MB idle, {rss['after_warmup']:.1f} after warm-up, "
        f"{rss['end_of_streaming']:.1f} at the end (growth after warm-up "
        f"{rss['growth_after_warmup']:+.1f} MB), peak {rss['peak']:.1f}, "
        f"{rss['after_sessions_ended']:.1f} after the sessions ended",
        f"server CPU while streaming: {res['cpu_pct_mean_streaming']:.0f} % of one core (mean)",
        f"server fds: {fds['baseline']} before, peak {fds['peak']}, "
        f"{fds['after_sessions_ended']} after the sessions ended",
    ]
    if res["errors"]:
        lines.append("errors: " + "; ".join(res["errors"][:5]))
    return "\n".join(lines)


def plot(res: dict, path: Path, title: str) -> bool:
    """Latency, RSS, CPU and fds over time as a PNG; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    w, s = res["windows"], res["samples"]
    fig, ax = plt.subplots(4, 1, figsize=(9, 10), sharex=True)
    t = [r["t_s"] for r in w]
    ax[0].plot(t, [r["client_p50_ms"] for r in w], label="client p50")
    ax[0].plot(t, [r["client_p99_ms"] for r in w], label="client p99")
    ax[0].plot(t, [r["server_p99_ms"] for r in w], label="server share p99", linestyle="--")
    ax[0].set_ylabel("latency ms")
    ax[0].legend(loc="upper right")
    ts = [x["t"] for x in s]
    ax[1].plot(ts, [x["rss_mb"] for x in s])
    ax[1].set_ylabel("server RSS MB")
    ax[2].plot(ts, [x["cpu_pct"] for x in s])
    ax[2].set_ylabel("server CPU %")
    ax[3].plot(ts, [x["fds"] for x in s], label="open fds")
    ax[3].plot(ts, [x["sessions"] for x in s], label="live sessions")
    ax[3].axhline(res["fds"]["baseline"], color="grey", linestyle=":", label="fds before")
    ax[3].set_ylabel("count")
    ax[3].set_xlabel("seconds")
    ax[3].legend(loc="upper right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def failed(res: dict) -> bool:
    f = res["frames"]
    return bool(res["sessions_ok"] < res["sessions"] or f["lost"] or f["duplicated"]
                or f["reordered"] or f["codes_failing"] or f["frames"] != f["expected_frames"]
                or res["fds"]["after_sessions_ended"] > res["fds"]["baseline"])


def machine_line() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, load average {load:.2f} at start"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=100)
    ap.add_argument("--minutes", type=float, default=10.0, help="audio per session")
    ap.add_argument("--model", default="default")
    ap.add_argument("--quick", action="store_true", help="8 sessions x 0.5 min on tiny")
    ap.add_argument("--ramp", type=float, default=None, help="seconds to start all sessions "
                    "(default: one frame period per session, at most 10 s)")
    ap.add_argument("--clip-seconds", type=float, default=15.0)
    ap.add_argument("--window", type=float, default=None, help="latency window, s")
    ap.add_argument("--no-ack", action="store_true", help="never send `ack` (the server then "
                    "keeps resume_buffer_s of frames per session for replay)")
    ap.add_argument("--out", type=Path, default=REPO / "artifacts" / "soak")
    args = ap.parse_args(argv)
    if args.quick:
        args.sessions, args.minutes, args.model = 8, 0.5, "tiny"
    torch.set_num_threads(1)  # the client side: the server has its own process and thread
    seconds = args.minutes * 60
    window = args.window or max(5.0, seconds / 30)
    args.out.mkdir(parents=True, exist_ok=True)

    model = load_model(args.model).eval()
    rate = model.card.sample_rate
    ramp = args.ramp if args.ramp is not None else min(10.0, args.sessions * model.card.frame_size / rate)
    with torch.inference_mode():
        clips = [reference(model, n, a) for n, a in load_clips(min(8, args.sessions),
                                                                 args.clip_seconds, rate)]
    print(f"soak: {args.sessions} sessions x {args.minutes:g} min on {args.model} "
          f"({len(clips)} clips of {clips[0].samples / rate:.1f} s, flush between repeats), "
          f"ramp {ramp:.1f} s", flush=True)
    machine = machine_line()
    print(f"machine: {machine}", flush=True)
    log_path = args.out / "server.log"
    with server_process(args.model, args.sessions, log_path) as (pid, url):
        res = asyncio.run(soak(url, pid, model, clips, args.sessions, seconds, ramp, window,
                               ack_every=0 if args.no_ack else int(model.card.frame_rate)))
    res |= {"model": args.model, "sessions_requested": args.sessions, "minutes": args.minutes,
            "ack": not args.no_ack, "machine": machine}
    print(format_report(res))
    stem = f"soak-{args.model}-{args.sessions}x{args.minutes:g}min"
    (args.out / f"{stem}.json").write_text(json.dumps(res, indent=1))
    title = f"streamtok soak: {args.sessions} sessions x {args.minutes:g} min, {args.model}"
    if plot(res, args.out / f"{stem}.png", title):
        print(f"plot: {args.out / f'{stem}.png'}")
    else:
        print("plot skipped: matplotlib not installed (pip install -e '.[bench]')")
    print(f"figures: {args.out / f'{stem}.json'}; server log: {log_path}")
    return 1 if failed(res) else 0


if __name__ == "__main__":
    sys.exit(main())
