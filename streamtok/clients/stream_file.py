"""``streamtok-stream``: stream audio files to a streamtok server; a latency benchmark client.

Each file is read (any soundfile format, downmixed to mono), sent as ``f32le`` at its own rate
(a rate outside the wire's 8-48 kHz is resampled here first, to the nearest rate inside) in packets of the server's ``send_hint_ms``
(or ``--chunk-ms``), either at real-time pace (``--realtime``, the default: a packet leaves when
its last sample would have been captured live) or as fast as the server answers (``--fast``).
The tokens go to ``--out`` (``.npz`` or ``.jsonl``), and a latency summary is printed::

    streamtok-stream speech.flac --url ws://127.0.0.1:8765 --model default --out tokens.npz
    streamtok-stream a.wav b.flac --sessions 8 --fast        # 8 concurrent streams

``--sessions N`` opens N concurrent sessions; stream ``i`` sends ``FILE[i % len(FILE)]``. With
several streams, ``--out x.npz`` writes ``x.0.npz``, ``x.1.npz``, ... (``.jsonl``: one file, each
line naming its stream). The ``.npz`` holds ``codes`` ``[K, T]`` int64, ``index`` ``[T]`` int64,
``t`` ``[T]`` float64 (stream time, s), ``latency`` ``[T]`` float64 (s, nan if unknown), the
model card fields ``streamtok decode`` reads (so ``streamtok decode tokens.npz -o out.wav``
works), ``units`` ``[T]`` int64 for a model with units, ``latents`` ``[D, T]`` float32 with
``--latents``, and ``source`` (the file name).

Outputs: every level of codes (``--codebooks K``: the first K), or, for a model without codes
(``units``), its units (``--units`` asks for units too from a model that has both).

Flow control, in either pace: at most ``--max-ahead`` seconds of audio are sent beyond the last
frame received (:meth:`StreamtokClient.wait_ahead`), so the server never has to hold a
long file back, and the send times logged are the real ones.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from websockets.exceptions import ConnectionClosed

from streamtok.audio.resample import resample
from streamtok.client import ReceivedFrame, StreamtokClient
from streamtok.clients.cli import (
    DEFAULT_URL,
    SESSION_ERRORS,
    add_server_arguments,
    add_token_argument,
    report_session_error,
)
from streamtok.clients.timing import (
    LatencySummary,
    SendLog,
    frame_ready_sample,
    packet_end,
    packet_samples,
    supported_rate,
)
from streamtok.errors import AudioFormatError, StreamtokError
from streamtok.server import protocol as P
from streamtok.tokenize_file import read_audio


@dataclass(frozen=True)
class StreamOptions:
    """How to stream: the server, the session's outputs and the pace."""

    url: str = DEFAULT_URL
    model: str = "default"
    realtime: bool = True
    chunk_ms: float | None = None  # None: follow the server's send hint
    codebooks: int | None = None  # None: every level (or none, for a model without codes)
    units: bool | None = None  # None: units when the model has no codes
    latents: bool = False
    token: str | None = None
    max_ahead_s: float = 5.0  # audio sent beyond the frames received, at most


@dataclass
class StreamJob:
    """One stream's input: mono float32 ``audio`` ``[n]`` at ``rate`` Hz (8-48 kHz)."""

    name: str
    audio: np.ndarray
    rate: int


@dataclass
class StreamResult:
    """What one stream received: frames in index order, each with its latency (seconds)."""

    stream: int
    job: StreamJob
    ready: P.ReadyMessage
    frames: list[ReceivedFrame]
    latency: np.ndarray  # float64 [T], nan where unknown
    wall_seconds: float  # first packet sent -> connection closed after the last frame

    @property
    def audio_seconds(self) -> float:
        return len(self.job.audio) / self.job.rate

    @property
    def rtf(self) -> float:
        """Real-time factor: wall time / audio time (about 1 when paced in real time)."""
        return self.wall_seconds / self.audio_seconds if self.audio_seconds else float("nan")

    def codes(self) -> np.ndarray:
        """``[K, T]`` int64 (K = 0 when codes were not requested)."""
        if not self.frames or self.frames[0].codes is None:
            return np.zeros((0, len(self.frames)), np.int64)
        return np.array([f.codes for f in self.frames], np.int64).T

    def units(self) -> np.ndarray | None:
        """``[T]`` int64, or None when units were not returned."""
        if not self.frames or self.frames[0].unit is None:
            return None
        return np.array([f.unit for f in self.frames], np.int64)

    def index(self) -> np.ndarray:
        return np.array([f.index for f in self.frames], np.int64)


def load_job(path: str | Path) -> StreamJob:
    """Read a file to mono float32; resample here only if its rate is outside the 8-48 kHz a
    session may send (PROTOCOL.md §13): 96 kHz goes as 48 kHz, 4 kHz as 8 kHz."""
    audio, rate = read_audio(path)
    target = supported_rate(rate)
    if target != rate:
        audio = resample(audio, rate, target)
    return StreamJob(str(path), np.ascontiguousarray(audio, np.float32), target)


def frame_latencies(frames: Sequence[ReceivedFrame], log: SendLog, card: P.ModelCard,
                    input_rate: int) -> np.ndarray:
    """Per-frame latency (s, float64 ``[T]``): receive time - send time of the message that
    completed the frame (PROTOCOL.md §6); nan if that message is unknown."""
    out = np.full(len(frames), np.nan)
    for i, f in enumerate(frames):
        sent = log.completed_at(frame_ready_sample(f.index, card.frame_rate, card.delay_ms, input_rate))
        if sent is not None:
            out[i] = f.received - sent
    return out


async def open_session(job: StreamJob, opts: StreamOptions) -> StreamtokClient:
    return await StreamtokClient.connect(
        opts.url, model=opts.model, sample_rate=job.rate, format="f32le", channels=1,
        codes=opts.codebooks if opts.codebooks else None, units=opts.units, latents=opts.latents,
        token=opts.token, max_ahead_s=None)  # stream_session waits, before logging the send


async def stream_session(client: StreamtokClient, job: StreamJob, opts: StreamOptions,
                         stream: int = 0) -> StreamResult:
    """Send ``job`` on an open session, then ``end``; return every frame with its latency."""
    assert client.ready is not None
    card, rate, audio = client.ready.model, job.rate, job.audio
    log = SendLog()
    t0 = time.monotonic()
    pos = 0
    try:
        while pos < len(audio):
            end = min(len(audio), packet_end(pos, packet_samples(opts.chunk_ms or client.send_hint_ms or 40, rate)))
            if opts.realtime:
                # A live source has this packet only once its last sample is captured.
                ahead = t0 + end / rate - time.monotonic()
                if ahead > 0:
                    await asyncio.sleep(ahead)
            # Bounded send-ahead (a server slower than the pace): waited here, not inside
            # send_audio (the session is opened without a limit), so that the send time logged
            # is the real one. It raises the server's fatal error, if any, instead of sending on.
            await client.wait_ahead(opts.max_ahead_s)
            log.sent(end - pos, time.monotonic())
            await client.send_audio(audio[pos:end])
            pos = end
        log.close(time.monotonic())
        await client.end()
    except ConnectionClosed as e:
        client.raise_if_failed()
        raise StreamtokError(f"connection lost: {e}") from e
    wall = time.monotonic() - t0
    frames = sorted(client.frames, key=lambda f: f.index)
    return StreamResult(stream, job, client.ready, frames,
                        frame_latencies(frames, log, card, rate), wall)


async def run_streams(jobs: Sequence[StreamJob], opts: StreamOptions) -> list[StreamResult]:
    """Open one session per job (all before any audio flows), stream them concurrently."""
    opened = await asyncio.gather(*(open_session(j, opts) for j in jobs), return_exceptions=True)
    clients = [c for c in opened if isinstance(c, StreamtokClient)]
    try:
        for c in opened:
            if isinstance(c, BaseException):
                raise c
        results = await asyncio.gather(
            *(stream_session(c, j, opts, i) for i, (c, j) in enumerate(zip(clients, jobs, strict=True))),
            return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return list(results)
    finally:
        for c in clients:
            await c.close()


# -- output -------------------------------------------------------------------------------------
def output_path(path: Path, stream: int, streams: int) -> Path:
    """``tokens.npz`` for one stream; ``tokens.0.npz``, ``tokens.1.npz``, ... for several."""
    return path if streams == 1 else path.with_name(f"{path.stem}.{stream}{path.suffix}")


def write_npz(result: StreamResult, path: Path) -> None:
    card = result.ready.model
    extra = {}
    units = result.units()
    if units is not None:
        extra["units"] = units
    if result.frames and result.frames[0].latent is not None:
        extra["latents"] = np.stack([f.latent.astype(np.float32) for f in result.frames], 1)
    np.savez(path, codes=result.codes(), index=result.index(),
             t=np.array([f.t for f in result.frames], np.float64), latency=result.latency,
             model=card.name, sample_rate=card.sample_rate, frame_rate=card.frame_rate,
             input_sample_rate=result.job.rate, num_samples=len(result.job.audio),
             source=result.job.name, **extra)


def jsonl_lines(result: StreamResult) -> list[str]:
    """One JSON object per frame: stream, file, index, t, codes and/or unit, latency_ms (null if
    unknown)."""
    lines = []
    for f, lat in zip(result.frames, result.latency, strict=True):
        row: dict = {"stream": result.stream, "file": result.job.name, "index": f.index, "t": f.t}
        if f.codes is not None:
            row["codes"] = list(f.codes)
        if f.unit is not None:
            row["unit"] = f.unit
        if f.latent is not None:
            row["latent"] = [round(float(v), 5) for v in f.latent]
        row["latency_ms"] = round(float(lat) * 1000, 3) if np.isfinite(lat) else None
        lines.append(json.dumps(row))
    return lines


def write_outputs(results: Sequence[StreamResult], out: Path) -> list[Path]:
    if out.suffix == ".jsonl":
        with out.open("w") as fh:
            for r in results:
                fh.writelines(line + "\n" for line in jsonl_lines(r))
        return [out]
    paths = [output_path(out, r.stream, len(results)) for r in results]
    for r, p in zip(results, paths, strict=True):
        write_npz(r, p)
    return paths


def summary_lines(results: Sequence[StreamResult], opts: StreamOptions, wall: float) -> list[str]:
    """The printed summary: what ran, frames/audio/wall/real-time factor, latency percentiles."""
    card = results[0].ready.model
    frames = sum(len(r.frames) for r in results)
    audio = sum(r.audio_seconds for r in results)
    rtfs = [r.rtf for r in results]
    pace = "real-time pace" if opts.realtime else "as fast as possible"
    packets = f"{opts.chunk_ms:g} ms" if opts.chunk_ms else f"server hint {results[0].ready.send_hint_ms} ms"
    lat = LatencySummary.of(np.concatenate([r.latency for r in results]))
    return [
        f"{len(results)} stream(s) of model {card.name} ({card.frame_rate:g} Hz frames) at "
        f"{opts.url}, {pace}, packets {packets}",
        f"frames {frames}  audio {audio:.2f} s  wall {wall:.2f} s  real-time factor "
        f"{np.mean(rtfs):.3f} (worst stream {max(rtfs):.3f})  throughput {audio / wall:.2f}x real time",
        lat.format(),
    ]


# -- command line -------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="streamtok-stream",
        description="Stream audio files to a streamtok server; write the tokens; print latency.")
    p.add_argument("files", nargs="+", metavar="FILE", help="audio files (any soundfile format)")
    add_server_arguments(p)
    pace = p.add_mutually_exclusive_group()
    pace.add_argument("--realtime", dest="realtime", action="store_true", default=True,
                      help="send at real-time pace, as a live source would (default)")
    pace.add_argument("--fast", dest="realtime", action="store_false",
                      help="send as fast as the server answers")
    p.add_argument("--chunk-ms", type=float, default=None,
                   help="milliseconds of audio per packet (default: the server's hint)")
    p.add_argument("--sessions", type=int, default=None,
                   help="concurrent streams (default: one per FILE); stream i sends FILE[i %% n]")
    p.add_argument("--out", type=Path, default=None, help="write tokens to .npz or .jsonl")
    p.add_argument("--codebooks", type=int, default=None,
                   help="RVQ levels to ask for (default: all; a model without codes sends units)")
    p.add_argument("--units", action="store_true", default=None,
                   help="also ask for units (default: only from a model without codes)")
    p.add_argument("--latents", action="store_true", help="also ask for latents (stored in the output)")
    add_token_argument(p)
    p.add_argument("--max-ahead", type=float, default=5.0,
                   help="most seconds of audio sent beyond the last frame received (default 5; "
                        "what matters with --fast)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    sessions = args.sessions if args.sessions is not None else len(args.files)
    if sessions < len(args.files):
        parser.error(f"--sessions {sessions} is fewer than the {len(args.files)} files given")
    if args.chunk_ms is not None and args.chunk_ms <= 0:
        parser.error("--chunk-ms must be positive")
    if args.codebooks is not None and args.codebooks < 1:
        parser.error("--codebooks must be at least 1")
    if args.max_ahead <= 0:
        parser.error("--max-ahead must be positive")
    if args.out is not None and args.out.suffix not in (".npz", ".jsonl"):
        parser.error("--out must end in .npz or .jsonl")
    try:
        loaded = [load_job(f) for f in args.files]
    except AudioFormatError as e:
        print(f"streamtok-stream: {e}", file=sys.stderr)
        return 2
    jobs = [loaded[i % len(loaded)] for i in range(sessions)]
    opts = StreamOptions(url=args.url, model=args.model, realtime=args.realtime,
                         chunk_ms=args.chunk_ms, codebooks=args.codebooks, units=args.units,
                         latents=args.latents,
                         token=args.token, max_ahead_s=args.max_ahead)
    t0 = time.monotonic()
    try:
        results = asyncio.run(run_streams(jobs, opts))
    except SESSION_ERRORS as e:
        return report_session_error(parser.prog, args.url, e)
    except KeyboardInterrupt:
        print("streamtok-stream: interrupted", file=sys.stderr)
        return 130
    wall = time.monotonic() - t0
    written = write_outputs(results, args.out) if args.out is not None else []
    if not args.quiet:
        for line in summary_lines(results, opts, wall):
            print(line)
        for path in written:
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
