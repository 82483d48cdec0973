"""Serving under load: N concurrent real-time streams over loopback against a real daemon.

The daemon runs as a subprocess (``streamtok --threads T serve --port P --model M``), so its
CPU time can be read from ``/proc/PID/stat``. For each load level N the clients open N
sessions (start times spread over ``--stagger`` seconds, so their packets do not all arrive in
phase), stream ``--seconds`` of speech from ``../shared/data/speech/dev`` each at real-time
pace in packets of the server's send hint, then ``end``. The sessions run in a few client
processes (asyncio on uvloop, up to ``--sessions-per-proc`` sessions each), so the client side
is not the bottleneck; whether it was is reported (packets sent late).

    python benchmarks/serve_load.py                       # N = 1, 8, 32, 64, 128; about 3 min
    python benchmarks/serve_load.py --quick               # N = 1, 8; 5 s each; about 20 s
    python benchmarks/serve_load.py --sessions 1,8,32 --seconds 30 --threads 1

Per frame, two latencies (client monotonic clock):

- ``send->recv``: receive time of its tokens - send time of the packet that completed it
  (the frame's last needed sample, lookahead included; PROTOCOL.md §6). This is the server's
  share plus loopback: queueing, the model step, encoding, both sockets.
- ``capture->recv``: receive time - the time the frame's last needed sample was captured by
  the (simulated) live source. It adds the wait for the packet to fill: with a send hint of
  k frames, a frame waits up to (k - 1) frame periods on the client before it is even sent.

Per level: latency percentiles over every frame of every session, the daemon's CPU use in
cores over the steady part (every session streaming), the client processes' CPU, the CPU
other processes used (e.g. a training job), sessions that fell behind real time, and the
engine's frames per step from ``/metrics``. A markdown table goes to stdout (and ``--out``),
with a PNG plot and a JSON of every number.

The client and bench helpers here (:func:`run_phase`, :class:`ServerProcess`) are shared with
``benchmarks/tuner.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import datetime
import importlib.metadata
import json
import math
import multiprocessing as mp
import os
import platform
import queue
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO.parent / "shared" / "data" / "speech" / "dev"
RESULTS_DIR = REPO / "benchmarks" / "results"
RATE = 16000  # every file of the dev set is 16 kHz; sessions send at that rate unless --rate
LEVELS = (1, 8, 32, 64, 128)
QUICK_LEVELS = (1, 8)


# -- the audio ----------------------------------------------------------------------------------
def load_pool(data_dir: Path, seconds: float, rate: int = RATE) -> np.ndarray:
    """At least ``seconds`` of speech from the dev set's manifest, in manifest order, joined:
    float32 ``[n]`` at ``rate`` (resampled from 16 kHz when it differs). Sessions read it at
    different offsets, wrapping round."""
    import soundfile as sf

    manifest = data_dir / "manifest.tsv"
    if not manifest.exists():
        raise SystemExit(f"no speech data at {data_dir} (expected manifest.tsv): see --data")
    parts, total = [], 0
    with manifest.open() as fh:
        for row in csv.DictReader(fh, delimiter="\t"):
            if int(row["sample_rate"]) != RATE:
                continue
            audio, rate = sf.read(data_dir / row["file"], dtype="float32", always_2d=True)
            if rate != RATE:
                continue
            parts.append(audio.mean(axis=1))
            total += len(parts[-1])
            if total >= seconds * RATE:
                break
    pool = np.ascontiguousarray(np.concatenate(parts), np.float32)
    if rate != RATE:
        from streamtok.audio.resample import resample

        pool = resample(pool, RATE, rate)
    return pool


# -- one client session ---------------------------------------------------------------------------
@dataclass(frozen=True)
class SessionPlan:
    """One session of a load schedule: when it starts (seconds after the common start), how
    much audio it streams, and where in the audio pool it reads."""

    index: int
    start_s: float
    seconds: float
    offset: int


@dataclass
class SessionRecord:
    """What one session measured. Times are seconds after the common start ``t0``; the arrays
    are float64 ``[frames received]`` in frame order."""

    index: int
    start_s: float
    seconds: float
    expected_frames: int
    recv: np.ndarray
    sent: np.ndarray  # send time of the packet that completed the frame
    captured: np.ndarray  # when the frame's last needed sample was captured (live pace)
    max_slip_s: float  # worst lateness of a packet against its capture time (client side)
    last_hint_ms: int
    error: str | None = None

    @property
    def send_latency(self) -> np.ndarray:
        return self.recv - self.sent

    @property
    def capture_latency(self) -> np.ndarray:
        return self.recv - self.captured


def _client_class():
    from streamtok.client import StreamtokClient

    class BenchClient(StreamtokClient):
        """StreamtokClient without its own per-frame latency record: that scans every packet
        sent for each frame (O(frames x packets): minutes of CPU at 128 long sessions). The
        benchmark times frames with :class:`~streamtok.clients.timing.SendLog` (bisect)."""

        def _record_latency(self, frame) -> None:
            pass

    return BenchClient


async def run_session(plan: SessionPlan, pool: np.ndarray, url: str, model: str, t0: float,
                      drain_s: float, rate: int = RATE) -> SessionRecord:
    """Connect at ``t0 + plan.start_s``, stream ``plan.seconds`` of audio (``pool`` at ``rate``)
    at real-time pace in packets of the server's send hint (following ``hint`` messages), then
    ``end``."""
    from streamtok.clients.timing import SendLog, frame_ready_sample, packet_end, packet_samples

    total = int(round(plan.seconds * rate))
    idx = (plan.offset + np.arange(total)) % len(pool)
    audio = pool[idx]
    await asyncio.sleep(max(0.0, t0 + plan.start_s - time.monotonic()))
    log, slip, hint, error = SendLog(), 0.0, 0, None
    client = None
    start = time.monotonic()
    frame_ms = 40.0
    try:
        client = await _client_class().connect(url, model=model, sample_rate=rate, format="s16le",
                                                 auto_resume=False)
        card = client.ready.model
        frame_ms = 1000.0 / card.frame_rate
        start = time.monotonic()  # the live source starts capturing now
        pos = 0
        while pos < total:
            hint = client.send_hint_ms or round(frame_ms)
            end = min(total, packet_end(pos, packet_samples(hint, rate)))
            due = start + end / rate  # a live source has this packet once its last sample is in
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            now = time.monotonic()
            slip = max(slip, now - due)
            if client.errors and client.errors[-1].fatal:
                raise client.errors[-1]
            log.sent(end - pos, now)
            await client.send_audio(audio[pos:end])
            pos = end
        log.close(time.monotonic())
        await client.end(timeout=drain_s)
    except Exception as e:  # noqa: BLE001 - a failed session is a result, not a crash
        error = f"{type(e).__name__}: {e}"
    finally:
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()
    frames = sorted(client.frames, key=lambda f: f.index) if client is not None else []
    recv, sent, captured = (np.full(len(frames), np.nan) for _ in range(3))
    if client is not None and client.ready is not None:
        card = client.ready.model
        for i, f in enumerate(frames):
            need = frame_ready_sample(f.index, card.frame_rate, card.delay_ms, rate)
            s = log.completed_at(need)
            recv[i] = f.received - t0
            sent[i] = (s if s is not None else np.nan) - t0
            captured[i] = start + min(need, total) / rate - t0
    expected = math.ceil(total / rate * 1000.0 / frame_ms)
    return SessionRecord(plan.index, plan.start_s, plan.seconds, expected, recv, sent, captured,
                         slip, hint, error)


async def _run_plans(plans: Sequence[SessionPlan], pool: np.ndarray, url: str, model: str,
                     t0: float, drain_s: float, rate: int) -> list[SessionRecord]:
    return list(await asyncio.gather(*(run_session(p, pool, url, model, t0, drain_s, rate) for p in plans)))


def worker_main(plans: list[SessionPlan], pool: np.ndarray, url: str, model: str, drain_s: float,
                rate: int, t0_value, go, ready_q, result_q) -> None:
    """A client process: say it is ready, wait for the common start time, run its sessions,
    send back their records."""
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    _client_class()  # import the client before the clock starts
    ready_q.put(os.getpid())
    go.wait()
    records = asyncio.run(_run_plans(plans, pool, url, model, t0_value.value, drain_s, rate))
    result_q.put((os.getpid(), time.process_time(), records))


# -- the daemon under test --------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""
    except (OSError, urllib.error.URLError):
        return 0, ""


class ServerProcess:
    """``streamtok --threads T serve`` as a subprocess on a free loopback port; its log goes to
    ``log_path``. ``env`` adds ``STREAMTOK_<FIELD>`` settings (e.g. the tuner pin)."""

    def __init__(self, model: str, threads: int, max_sessions: int, log_path: Path,
                 env: dict[str, str] | None = None, device: str = "cpu") -> None:
        self.model, self.port, self.log_path = model, free_port(), log_path
        exe = Path(sys.executable).with_name("streamtok")
        cmd = [str(exe) if exe.exists() else sys.executable, *([] if exe.exists() else ["-m", "streamtok.cli"]),
               "--threads", str(threads), "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--model", model, "--max-sessions", str(max_sessions), "--device", device]
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMTOK_")}
        full_env |= env or {}
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=full_env)
        self.cmd = " ".join(cmd[cmd.index("--threads"):])

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 180.0) -> float:
        """Wait for ``/readyz`` (models loaded and warm); return the seconds it took."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited with {self.proc.returncode}; see {self.log_path}")
            if http_get(f"http://127.0.0.1:{self.port}/readyz", 1.0)[0] == 200:
                return time.monotonic() - t0
            time.sleep(0.2)
        raise SystemExit(f"server not ready after {timeout:.0f} s; see {self.log_path}")

    def metrics(self) -> dict[str, float]:
        """This model's series from ``/metrics`` (name -> value; labels other than model
        dropped, so only single-series metrics are meaningful)."""
        status, text = http_get(f"http://127.0.0.1:{self.port}/metrics", 2.0)
        out: dict[str, float] = {}
        if status != 200:
            return out
        pat = re.compile(r'^(\w+)(?:\{([^}]*)\})? (\S+)$')
        for line in text.splitlines():
            m = pat.match(line)
            if m and (m.group(2) is None or f'model="{self.model}"' in m.group(2)):
                with contextlib.suppress(ValueError):
                    out[m.group(1)] = float(m.group(3))
        return out

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # graceful shutdown
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


# -- CPU accounting ---------------------------------------------------------------------------------
_TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads), from /proc/PID/stat."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return math.nan
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime (fields 14, 15)


def busy_seconds() -> float:
    """CPU seconds every process together has been busy since boot (/proc/stat)."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / _TICK  # minus idle, iowait


@dataclass
class Sample:
    """One reading taken during a phase (seconds after t0; CPU seconds are cumulative)."""

    t: float
    server_cpu: float
    clients_cpu: float
    busy: float
    bench_cpu: float
    metrics: dict[str, float] = field(default_factory=dict)


def cpu_in_window(samples: Sequence[Sample], lo: float, hi: float) -> dict[str, float]:
    """Cores used over [lo, hi] (the samples nearest inside it): server, clients, others."""
    inside = [s for s in samples if lo <= s.t <= hi]
    if len(inside) < 2:
        inside = list(samples[:1]) + list(samples[-1:])
    a, b = inside[0], inside[-1]
    dt = max(b.t - a.t, 1e-9)
    server = (b.server_cpu - a.server_cpu) / dt
    clients = (b.clients_cpu - a.clients_cpu) / dt
    own = (b.bench_cpu - a.bench_cpu) / dt
    others = (b.busy - a.busy) / dt - server - clients - own
    return {"server": server, "clients": clients, "others": max(others, 0.0), "seconds": dt,
            "from": a.t, "to": b.t}


# -- a phase: one schedule of sessions against one server -------------------------------------------
@dataclass
class PhaseResult:
    records: list[SessionRecord]
    samples: list[Sample]
    wall_s: float


def run_phase(server: ServerProcess, plans: Sequence[SessionPlan], pool: np.ndarray,
              sessions_per_proc: int, drain_s: float, metrics_every_s: float = 1.0,
              lead_s: float = 0.5, rate: int = RATE) -> PhaseResult:
    """Run ``plans`` in ``ceil(len / sessions_per_proc)`` client processes against ``server``,
    sampling CPU every 0.25 s and ``/metrics`` every ``metrics_every_s``."""
    ctx = mp.get_context("spawn")
    nproc = max(1, math.ceil(len(plans) / sessions_per_proc))
    groups = [list(plans[i::nproc]) for i in range(nproc)]
    t0_value, go = ctx.Value("d", 0.0), ctx.Event()
    ready_q, result_q = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=worker_main, daemon=True,
                         args=(g, pool, server.url, server.model, drain_s, rate, t0_value, go, ready_q,
                               result_q))
             for g in groups]
    for p in procs:
        p.start()
    pids = [ready_q.get(timeout=120) for _ in procs]
    t0 = time.monotonic() + lead_s
    t0_value.value = t0
    go.set()
    samples: list[Sample] = []
    results: dict[int, tuple[float, list[SessionRecord]]] = {}
    client_cpu_at_exit: dict[int, float] = {}
    last_metrics = -math.inf

    def sample() -> None:
        nonlocal last_metrics
        now = time.monotonic()
        clients = 0.0
        for pid in pids:
            c = proc_cpu_seconds(pid)
            clients += client_cpu_at_exit.get(pid, 0.0) if math.isnan(c) else c
        s = Sample(now - t0, proc_cpu_seconds(server.proc.pid), clients, busy_seconds(),
                   time.process_time())
        if now - last_metrics >= metrics_every_s:
            last_metrics = now
            s.metrics = server.metrics()
        samples.append(s)

    while len(results) < len(procs):
        sample()
        try:
            pid, cpu, records = result_q.get(timeout=0.25)
            results[pid] = (cpu, records)
            client_cpu_at_exit[pid] = proc_cpu_seconds(pid)
        except queue.Empty:
            if all(not p.is_alive() for p in procs) and result_q.empty():
                raise SystemExit("client processes exited without results") from None
    sample()
    for p in procs:
        p.join(10)
    records = sorted((r for _, recs in results.values() for r in recs), key=lambda r: r.index)
    return PhaseResult(records, samples, time.monotonic() - t0)


# -- summaries --------------------------------------------------------------------------------------
def pct(x: np.ndarray, q: float) -> float:
    x = x[np.isfinite(x)]
    return float(np.percentile(x, q)) * 1000.0 if x.size else math.nan


@dataclass
class LevelRow:
    sessions: int
    frames: int
    expected_frames: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    capture_p95_ms: float
    server_cores: float
    client_cores: float
    other_cores: float
    behind: int  # sessions whose frames fell behind real time (server side)
    client_late: int  # sessions whose client sent a packet late (client side)
    errors: int
    frames_per_step: float
    hint_ms: int
    frames_per_model_step: float  # mean frames (all sessions) per model step, from /metrics
    cpu_window_s: float


def behind_sessions(records: Sequence[SessionRecord], behind_s: float) -> int:
    """Sessions that fell behind real time: a frame waited over ``behind_s`` after its
    capture, frames never arrived, or the session failed."""
    n = 0
    for r in records:
        lat = r.capture_latency
        late = lat.size and np.nanmax(lat) > behind_s
        if late or r.error or len(r.recv) < r.expected_frames:
            n += 1
    return n


def summarize_level(n: int, phase: PhaseResult, behind_s: float, frame_s: float) -> LevelRow:
    recs = phase.records
    send = np.concatenate([r.send_latency for r in recs]) if recs else np.zeros(0)
    cap = np.concatenate([r.capture_latency for r in recs]) if recs else np.zeros(0)
    # steady state: from one second after the last session started to the first one's end
    lo = max(r.start_s for r in recs) + 1.0
    hi = min(r.start_s + r.seconds for r in recs)
    cpu = cpu_in_window(phase.samples, lo, hi)
    with_metrics = [s for s in phase.samples if s.metrics and lo <= s.t <= hi] or \
        [s for s in phase.samples if s.metrics]
    k = with_metrics[-1].metrics.get("streamtok_engine_frames_per_step", math.nan) if with_metrics else math.nan
    batch = math.nan
    if len(with_metrics) >= 2:
        a, b = with_metrics[0].metrics, with_metrics[-1].metrics
        steps = b.get("streamtok_engine_steps_total", 0) - a.get("streamtok_engine_steps_total", 0)
        frames = b.get("streamtok_frames_total", 0) - a.get("streamtok_frames_total", 0)
        batch = frames / steps if steps else math.nan
    return LevelRow(
        sessions=n, frames=int(send.size), expected_frames=sum(r.expected_frames for r in recs),
        p50_ms=pct(send, 50), p95_ms=pct(send, 95), p99_ms=pct(send, 99), max_ms=pct(send, 100),
        capture_p95_ms=pct(cap, 95), server_cores=cpu["server"], client_cores=cpu["clients"],
        other_cores=cpu["others"], behind=behind_sessions(recs, behind_s),
        client_late=sum(r.max_slip_s > frame_s for r in recs), errors=sum(bool(r.error) for r in recs),
        frames_per_step=k, hint_ms=max((r.last_hint_ms for r in recs), default=0), frames_per_model_step=batch,
        cpu_window_s=cpu["seconds"])


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table, first column left-aligned, the others right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    out = ["| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |",
           "|" + "|".join("-" * (w + 1) + ":" if i else "-" * (w + 2) for i, w in enumerate(widths)) + "|"]
    for r in rows:
        out.append("| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                     for i, (c, w) in enumerate(zip(r, widths, strict=True))) + " |")
    return "\n".join(out)


def fmt(x: float, digits: int = 1) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def level_table(rows: Sequence[LevelRow]) -> str:
    head = ("sessions", "frames recv/expected", "p50 ms", "p95 ms", "p99 ms", "capture p95 ms",
            "server cores", "client cores", "other cores", "behind", "client late", "k", "hint ms",
            "frames/model step")
    body = [(str(r.sessions), f"{r.frames}/{r.expected_frames}", fmt(r.p50_ms), fmt(r.p95_ms),
             fmt(r.p99_ms), fmt(r.capture_p95_ms), fmt(r.server_cores, 2), fmt(r.client_cores, 2),
             fmt(r.other_cores, 2), str(r.behind), str(r.client_late), fmt(r.frames_per_step, 0),
             str(r.hint_ms), fmt(r.frames_per_model_step)) for r in rows]
    return markdown_table(head, body)


def machine_info(threads: int) -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    torch = "?"
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        torch = importlib.metadata.version("torch")  # the server's; not imported here
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch,
            "server_threads": threads, "load_average_1min_at_start": os.getloadavg()[0]}


def shown(path: Path) -> str:
    """``path`` relative to the repository when it is inside it (for committed outputs)."""
    with contextlib.suppress(ValueError):
        return str(path.resolve().relative_to(REPO))
    return str(path)


def describe_machine(info: dict, other_cores: float, sep: str = "; ") -> str:
    return (f"{info['date'][:16].replace('T', ' ')}: {info['cpu']}, {info['cores']} cores, "
            f"torch {info.get('torch', '?')}, server torch threads {info['server_threads']}{sep}load average "
            f"{info['load_average_1min_at_start']:.2f} at start, other processes used "
            f"{other_cores:.2f} cores on average while streaming")


def plot_levels(rows: Sequence[LevelRow], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    n = [r.sessions for r in rows]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, label, style in (("p50_ms", "p50", "o-"), ("p95_ms", "p95", "s-"), ("p99_ms", "p99", "^-"),
                              ("capture_p95_ms", "p95 capture->recv", "x--")):
        ax.plot(n, [getattr(r, key) for r in rows], style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(n, [str(v) for v in n])
    ax.set_xlabel("concurrent real-time sessions")
    ax.set_ylabel("latency per frame, ms (send->recv unless noted)")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.axhline(40.0, color="grey", lw=0.8, ls=":")
    ax.text(n[-1], 40.0 * 0.92, "one frame (40 ms)", color="grey", fontsize=8, ha="right", va="top")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("end-to-end latency")
    bx.plot(n, [r.server_cores for r in rows], "o-", label="server")
    bx.plot(n, [r.client_cores for r in rows], "s--", label="clients")
    bx.plot(n, [r.other_cores for r in rows], "^:", label="other processes")
    bx.set_xscale("log", base=2)
    bx.set_xticks(n, [str(v) for v in n])
    bx.set_xlabel("concurrent real-time sessions")
    bx.set_ylabel("CPU, cores (steady state)")
    bx.set_ylim(bottom=0)
    bx.grid(True, alpha=0.3)
    bx.legend(fontsize=8)
    bx.set_title("CPU use")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- command line -----------------------------------------------------------------------------------
def parse_levels(text: str) -> list[int]:
    try:
        levels = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from e
    if not levels or levels[0] < 1:
        raise argparse.ArgumentTypeError("session counts must be >= 1")
    return levels


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="served model (default: default)")
    p.add_argument("--threads", type=int, default=1,
                   help="server torch threads (`streamtok --threads T serve`; default 1)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="the server's torch device (default cpu)")
    p.add_argument("--quick", action="store_true", help="smoke run (under a minute)")
    p.add_argument("--data", type=Path, default=DATA_DIR, help=f"speech folder (default {DATA_DIR})")
    p.add_argument("--out", type=Path, default=RESULTS_DIR,
                   help="folder for the PNG, JSON, markdown and server logs (default benchmarks/results)")
    p.add_argument("--sessions-per-proc", type=int, default=64,
                   help="client sessions per client process (default 64)")
    p.add_argument("--behind-ms", type=float, default=500.0,
                   help="a session fell behind real time once a frame waited this long (default 500)")
    p.add_argument("--drain", type=float, default=15.0,
                   help="seconds to wait for the last tokens after a stream ends (default 15; tuner.py: 5)")
    p.add_argument("--rate", type=int, default=RATE,
                   help="sample rate the sessions send at (the dev set's 16 kHz speech is resampled "
                        "to it first; default 16000; tuner.py: 48000, a microphone's rate)")
    p.add_argument("--seed", type=int, default=0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", type=parse_levels, default=None,
                   help=f"concurrent session counts (default {','.join(map(str, LEVELS))}; --quick "
                        f"{','.join(map(str, QUICK_LEVELS))})")
    p.add_argument("--seconds", type=float, default=None,
                   help="audio per session per level (default 20; --quick 5)")
    p.add_argument("--stagger", type=float, default=0.5,
                   help="sessions start spread over this many seconds (default 0.5)")
    add_common_args(p)
    args = p.parse_args(argv)
    levels = args.sessions or list(QUICK_LEVELS if args.quick else LEVELS)
    seconds = args.seconds or (5.0 if args.quick else 20.0)
    rng = np.random.default_rng(args.seed)
    info = machine_info(args.threads) | {"model": args.model, "device": args.device, "seconds": seconds, "levels": levels,
                                         "quick": args.quick, "stagger_s": args.stagger}
    wall0 = time.monotonic()
    pool = load_pool(args.data, max(120.0, seconds * 4), args.rate)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = ("serve_load_quick" if args.quick else "serve_load") + ("_cuda" if args.device == "cuda" else "")
    server = ServerProcess(args.model, args.threads, max(levels), args.out / f"{stem}.server.log",
                           device=args.device)
    rows: list[LevelRow] = []
    try:
        ready_s = server.wait_ready()
        print(f"server ready in {ready_s:.1f} s: streamtok {server.cmd}", file=sys.stderr)
        frame_s = 0.04
        for n in levels:
            plans = [SessionPlan(i, float(rng.uniform(0, args.stagger)), seconds,
                                 int(rng.integers(0, len(pool)))) for i in range(n)]
            phase = run_phase(server, plans, pool, args.sessions_per_proc, args.drain, rate=args.rate)
            row = summarize_level(n, phase, args.behind_ms / 1000, frame_s)
            rows.append(row)
            errs = sorted({r.error for r in phase.records if r.error})
            print(f"  N={n:<4} p95 {fmt(row.p95_ms)} ms  server {row.server_cores:.2f} cores  "
                  f"behind {row.behind}  in {phase.wall_s:.0f} s" + (f"  errors: {errs[:2]}" if errs else ""),
                  file=sys.stderr)
            time.sleep(1.0)  # let the server close the sessions before the next level
    finally:
        server.stop()
    wall = time.monotonic() - wall0
    other = float(np.mean([r.other_cores for r in rows])) if rows else math.nan
    info |= {"wall_s": wall, "server_cmd": server.cmd, "other_cores_mean": other}
    title = (f"streamtok serve_load: model {args.model}, {seconds:g} s real-time streams per level, "
             f"server --threads {args.threads}\n" + describe_machine(info, other, sep="\n"))
    table = level_table(rows)
    png = args.out / f"{stem}.png"
    plot_levels(rows, png, title)
    text = "\n".join([
        f"streamtok serve_load, {describe_machine(info, other)}{', QUICK run' if args.quick else ''}",
        f"model {args.model}; {seconds:g} s of speech per session at real-time pace, packets of "
        f"the server's hint; latency = recv - send of the completing packet; "
        f"'behind' = a frame waited > {args.behind_ms:g} ms or never came; 'client late' = a "
        f"packet left > one frame after its capture time", "", table, "",
        f"plot: {shown(png)}", f"total {wall:.0f} s"])
    print(text)
    (args.out / f"{stem}.md").write_text(text + "\n")
    (args.out / f"{stem}.json").write_text(json.dumps({"info": info, "rows": [asdict(r) for r in rows]},
                                                      indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
