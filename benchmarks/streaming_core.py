"""Cost of a streaming step against the offline forward of the same stack, on CPU.

Stacks: the default codec's encoder side (``encode_step``: SEANet encoder + RVQ encode) and
decoder side (``decode_step``: RVQ decode + SEANet decoder), random weights; and a small
``StreamingTransformer`` (dim 256, 4 heads, 2 layers, context 64) on 25 Hz latents.

For each stack and slot count the same clip of ``--clip-frames`` frames per slot is pushed
through the stack in steps of 1, 4 and 16 frames (all slots stepped together, ``slots=None``)
and, in between, in one offline call from a fresh state. Repetitions of the four runs are
interleaved in a rotating order, so a background process slows all of them alike.

    python benchmarks/streaming_core.py             # full run, about 2 minutes on 1 thread
    python benchmarks/streaming_core.py --quick     # smoke run, about 20 s
    python benchmarks/streaming_core.py --json out.json

Columns, all times wall clock on ``--threads`` torch threads:

- ``stream ms/frame``: median step time / frames per step = time to move *all* slots on by
  one frame.
- ``offline ms/frame``: median time of the offline call / clip frames, same units.
- ``ratio``: stream / offline; > 1 is the price of streaming (per-step overhead).
- ``RTF``: frame duration x slots / stream ms/frame = how many real-time streams this many
  threads keep up with in that configuration (> 1 needed; 1 slot is capped by latency, not
  this number).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from streamtok.models.codec import CausalCodec, CodecConfig, TransformerConfig
from streamtok.streaming import Streamer, StreamingTransformer

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "streamtok/models/configs/default.json"
SLOTS = (1, 64)
FRAMES_PER_STEP = (1, 4, 16)


@dataclass(frozen=True)
class Stack:
    """A network measured two ways: stepped under a :class:`Streamer`, and offline."""

    name: str
    frame_ms: float
    make_input: Callable[[int, int], Tensor]  # (slots, frames) -> whole-clip input
    split: Callable[[Tensor, int], list[Tensor]]  # (clip, frames per step) -> step inputs
    make_streamer: Callable[[int], Streamer]
    step: Callable[[Tensor, Streamer], object]
    offline: Callable[[Tensor], object]


@dataclass
class Row:
    stack: str
    slots: int
    frames_per_step: int
    clip_frames: int
    stream_ms_per_frame: float
    offline_ms_per_frame: float
    ratio: float
    rtf: float
    step_ms_median: float
    step_ms_p25: float
    step_ms_p75: float
    steps_timed: int
    offline_calls_timed: int


def _chunks(x: Tensor, size: int) -> list[Tensor]:
    """Split the last axis into contiguous pieces of ``size`` (copied, so the step owns them)."""
    return [c.contiguous() for c in x.split(size, dim=-1)]


def build_stacks(config: Path) -> list[Stack]:
    torch.manual_seed(0)
    codec = CausalCodec(CodecConfig.from_json(config)).eval()
    fs = codec.card.frame_size
    levels = codec.num_levels
    card_ms = 1000.0 * fs / codec.card.sample_rate

    tcfg = TransformerConfig()  # dim 256 below; 4 heads, 2 layers, ff 512, context 64
    transformer = StreamingTransformer(256, tcfg.num_heads, tcfg.num_layers, tcfg.ff_dim,
                                       tcfg.context, tcfg.rope_max_period, tcfg.layer_scale).eval()

    def transformer_step(x: Tensor, streamer: Streamer) -> Tensor:
        with streamer.stepping():
            return transformer(x)

    codebook = codec.card.levels[0].cardinality
    return [
        Stack("codec-encoder", card_ms,
              make_input=lambda s, n: 0.1 * torch.randn(s, n * fs),
              split=lambda x, k: _chunks(x, k * fs),
              make_streamer=codec.encoder_streamer,
              step=lambda x, st: codec.encode_step(x, st),
              offline=lambda x: codec.encode(x)),
        Stack("codec-decoder", card_ms,
              make_input=lambda s, n: torch.randint(0, codebook, (s, levels, n)),
              split=_chunks,
              make_streamer=codec.decoder_streamer,
              step=lambda c, st: codec.decode_step(c, st),
              offline=lambda c: codec.decode(c)),
        Stack("transformer", 40.0,  # 25 Hz latents
              make_input=lambda s, n: torch.randn(s, 256, n),
              split=_chunks,
              make_streamer=lambda s: Streamer(transformer, s),
              step=transformer_step,
              offline=lambda x: transformer(x)),
    ]


def measure(stack: Stack, slots: int, clip_frames: int, budget_s: float,
            min_reps: int, max_reps: int) -> list[Row]:
    """Time the offline call and a streaming pass per step size, interleaved, for one group."""
    clip = stack.make_input(slots, clip_frames)
    steps = {k: stack.split(clip, k) for k in FRAMES_PER_STEP}
    streamers = {k: stack.make_streamer(slots) for k in FRAMES_PER_STEP}
    step_times: dict[int, list[float]] = {k: [] for k in FRAMES_PER_STEP}
    offline_times: list[float] = []

    # Warm-up: one offline call and one pass per step size (allocator, kernels' first-use paths).
    stack.offline(clip)
    for k in FRAMES_PER_STEP:
        for x in steps[k]:
            stack.step(x, streamers[k])

    runs: list[int] = [0, *FRAMES_PER_STEP]  # 0 = the offline call
    deadline = time.monotonic() + budget_s
    rep = 0
    while rep < min_reps or (rep < max_reps and time.monotonic() < deadline):
        order = runs[rep % len(runs):] + runs[:rep % len(runs)]  # rotate: no run always goes first
        for k in order:
            if k == 0:
                t0 = time.perf_counter()
                stack.offline(clip)
                offline_times.append(time.perf_counter() - t0)
                continue
            streamer = streamers[k]  # streams keep going across passes: state stays bounded
            for x in steps[k]:
                t0 = time.perf_counter()
                stack.step(x, streamer)
                step_times[k].append(time.perf_counter() - t0)
        rep += 1

    offline_ms = 1000.0 * statistics.median(offline_times) / clip_frames
    rows = []
    for k in FRAMES_PER_STEP:
        ts = sorted(1000.0 * t for t in step_times[k])
        q1, _, q3 = statistics.quantiles(ts, n=4) if len(ts) > 1 else (ts[0],) * 3
        med = statistics.median(ts)
        stream_ms = med / k
        rows.append(Row(stack.name, slots, k, clip_frames, stream_ms, offline_ms,
                        stream_ms / offline_ms, stack.frame_ms * slots / stream_ms,
                        med, q1, q3, len(ts), len(offline_times)))
    return rows


def step_overhead(rows: list[Row]) -> tuple[float, float]:
    """Least-squares fit ``step_ms = a + b * frames`` over one group: (fixed a, per-frame b)."""
    xs = [r.frames_per_step for r in rows]
    ys = [r.step_ms_median for r in rows]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def _busy_seconds() -> float | None:
    """CPU seconds all processes have spent busy since boot (Linux ``/proc/stat``), or None."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    ticks = [int(v) for v in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def format_table(rows: list[Row], threads: int = 1) -> str:
    rtf = "RTF (streams/core)" if threads == 1 else f"RTF (streams/{threads} threads)"
    head = ("stack", "slots", "frames/step", "stream ms/frame", "offline ms/frame",
            "ratio stream/offline", rtf)
    body = [(r.stack, str(r.slots), str(r.frames_per_step), f"{r.stream_ms_per_frame:.3f}",
             f"{r.offline_ms_per_frame:.3f}", f"{r.ratio:.2f}", f"{r.rtf:.1f}") for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 1) + ":" if i else "-" * (w + 2)
                         for i, w in enumerate(widths)) + "|"
    out = [line, sep]
    for b in body:
        out.append("| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                     for i, (c, w) in enumerate(zip(b, widths, strict=True))) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--quick", action="store_true", help="few repetitions: a smoke run")
    p.add_argument("--json", type=Path, metavar="OUT", help="also write rows and run info here")
    p.add_argument("--clip-frames", type=int, default=16,
                   help="frames per slot in the clip (a multiple of 16; default 16 = 0.64 s)")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="codec config JSON")
    args = p.parse_args(argv)
    if args.clip_frames < 16 or args.clip_frames % max(FRAMES_PER_STEP):
        p.error(f"--clip-frames must be a positive multiple of {max(FRAMES_PER_STEP)}")

    load_start = os.getloadavg()[0]
    busy0, own0, wall0 = _busy_seconds(), time.process_time(), time.monotonic()
    torch.set_num_threads(args.threads)
    # Seconds of repetitions per (stack, slots) group, by slot count: the 64-slot groups are
    # slow per repetition and noisy next to a busy core, so they get most of the time.
    budget_s, min_reps, max_reps = ({1: 1.0, 64: 1.0}, 1, 5) if args.quick else ({1: 8.0, 64: 28.0}, 3, 200)

    rows: list[Row] = []
    with torch.inference_mode():
        stacks = build_stacks(args.config)
        for stack in stacks:
            for slots in SLOTS:
                t0 = time.monotonic()
                group = measure(stack, slots, args.clip_frames, budget_s[slots], min_reps, max_reps)
                rows.extend(group)
                print(f"  measured {stack.name:<14} slots={slots:<3} in {time.monotonic() - t0:5.1f} s",
                      file=sys.stderr)

    wall = time.monotonic() - wall0
    busy1, own1 = _busy_seconds(), time.process_time()
    others = (busy1 - busy0 - (own1 - own0)) / wall if busy0 is not None and busy1 is not None else None
    cores = os.cpu_count() or 1
    now = datetime.datetime.now().astimezone()
    info = {
        "date": now.isoformat(timespec="seconds"),
        "cpu": _cpu_name(),
        "cores": cores,
        "gpu": torch.cuda.is_available(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": args.threads,
        "quick": args.quick,
        "clip_frames": args.clip_frames,
        "load_average_1min_at_start": load_start,
        "other_processes_cores_during_run": others,
        "wall_s": wall,
    }

    print(f"\nstreamtok streaming core, {now:%Y-%m-%d %H:%M %Z}: {info['cpu']}, {cores} cores, "
          f"{'GPU present (not used)' if info['gpu'] else 'no GPU'}, torch {torch.__version__}, "
          f"{args.threads} thread(s){', QUICK run' if args.quick else ''}")
    print(f"clip: {args.clip_frames} frames per slot; codec frame 40 ms (640 samples at 16 kHz), "
          f"transformer frame 40 ms (25 Hz)\n")
    print(format_table(rows, args.threads))
    print("\nfixed cost per step (fit step_ms = a + b * frames over 1/4/16 frames per step):")
    for i in range(0, len(rows), len(FRAMES_PER_STEP)):
        group = rows[i:i + len(FRAMES_PER_STEP)]
        a, b = step_overhead(group)
        why = "" if a >= 0 else "  (a < 0: per-frame cost grows with step size; working set outgrows cache)"
        print(f"  {group[0].stack:<14} slots={group[0].slots:<3} a = {a:7.2f} ms/step, "
              f"b = {b:7.2f} ms/frame{why}")
    busy = max(load_start, others or 0.0)
    if busy >= 0.5:
        what = f"{others:.1f} cores busy with other processes during the run" if others is not None else ""
        print(f"\nnote: another process was using CPU: load average {load_start:.2f} at start"
              f"{'; ' + what if what else ''} (of {cores} cores). Timings share cores and memory "
              f"bandwidth with it.")
    print(f"total {wall:.0f} s")

    if args.json:
        args.json.write_text(json.dumps({"info": info, "rows": [asdict(r) for r in rows]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
