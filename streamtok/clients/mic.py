"""``streamtok-mic``: tokenize the microphone live and show the tokens in the terminal.

    streamtok-mic --list-devices
    streamtok-mic --url ws://127.0.0.1:8765 --model default --device 2
    streamtok-mic --play                      # round trip: tokens decoded back to the speakers

The capture path is split so it can be tested without a sound card::

    sounddevice callback (PortAudio thread) -> CaptureQueue -> stream_capture() -> server
                                                  ^ a test feeds this from any thread

:class:`CaptureQueue` carries float32 blocks ``[n, channels]`` from the callback thread to the
event loop; :class:`PacketAssembler` (pure) cuts them into packets of the server's
``send_hint_ms`` (updated by ``hint`` messages; ``--chunk-ms`` pins it); :func:`stream_capture`
sends them until the queue is closed. The device's native rate is sent as is (the server
resamples); a rate outside 8-48 kHz is clipped into it and PortAudio converts.

Ctrl-C stops the capture, sends what is left, ``end`` (which flushes the last partial frame),
prints the summary and exits 0; a second Ctrl-C quits at once. A missing PortAudio library or
no input device is a one-line message and exit status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, TextIO

import numpy as np

from streamtok.client import ReceivedFrame, StreamtokClient
from streamtok.clients.cli import (
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
from streamtok.errors import StreamtokError
from streamtok.server import protocol as P

EXIT_NO_AUDIO = 2


class NoAudioDevice(StreamtokError):
    """PortAudio is missing, or there is no usable input (or output) device."""


def _import_sounddevice() -> ModuleType:
    import sounddevice

    return sounddevice


def load_sounddevice() -> ModuleType:
    """Import sounddevice; its import raises OSError when the PortAudio library is absent."""
    try:
        return _import_sounddevice()
    except OSError as e:
        raise NoAudioDevice(f"{e or 'PortAudio library not found'}; install it "
                            "(Debian/Ubuntu: apt-get install libportaudio2)") from e
    except ImportError as e:
        raise NoAudioDevice(f"the sounddevice package is not installed ({e})") from e


def input_device(sd: ModuleType, device: int | str | None) -> tuple[Any, str, float, int]:
    """(device id for PortAudio, name, native rate, input channels) of the chosen input."""
    try:
        info = sd.query_devices(device, "input")
    except (ValueError, sd.PortAudioError) as e:
        what = f"input device {device!r}" if device is not None else "default input device"
        raise NoAudioDevice(f"no {what} ({e}); see --list-devices") from e
    if int(info.get("max_input_channels", 0)) < 1:
        raise NoAudioDevice(f"device {info.get('name')!r} has no input channels; see --list-devices")
    ident = info.get("index", device)
    return ident, str(info["name"]), float(info["default_samplerate"]), int(info["max_input_channels"])


@contextlib.contextmanager
def _device_errors(sd: ModuleType, kind: str):
    """PortAudio refusing to open or start a stream is a NoAudioDevice, not a traceback."""
    try:
        yield
    except sd.PortAudioError as e:
        raise NoAudioDevice(f"cannot open the {kind} device: {e}") from e


# -- capture -> send (no device needed) ---------------------------------------------------------
class CaptureQueue:
    """Float32 blocks ``[n, channels]`` from an audio callback thread to the event loop.

    ``put_threadsafe`` is the only method a foreign thread calls: it copies the block (PortAudio
    reuses its buffer) and hands it to the loop. Bounded at ``max_seconds`` of audio; the policy
    when the sender falls that far behind is to drop the new block and count it in
    ``dropped_samples`` (shown in the terminal): a capture callback must never block.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, rate: int, max_seconds: float = 10.0) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[np.ndarray | None] = asyncio.Queue()
        self.capacity = int(max_seconds * rate)
        self.backlog_samples = 0
        self.dropped_samples = 0
        self.captured_samples = 0
        self.closed = False

    def put_threadsafe(self, block: np.ndarray) -> None:
        copy = np.array(block, np.float32, copy=True, ndmin=2)
        # A glitching driver can hand over NaN/Inf, which the protocol refuses (bad_audio,
        # fatal): a dropout is better than a lost session.
        np.nan_to_num(copy, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
        self._loop.call_soon_threadsafe(self._put, copy)

    def close_threadsafe(self) -> None:
        self._loop.call_soon_threadsafe(self.close)

    def _put(self, block: np.ndarray) -> None:
        if self.closed:
            return
        n = block.shape[0]
        if self.backlog_samples + n > self.capacity:
            self.dropped_samples += n
            return
        self.backlog_samples += n
        self.captured_samples += n
        self._queue.put_nowait(block)

    def close(self) -> None:
        """No more blocks: :meth:`get` returns None once the queued ones are taken."""
        if not self.closed:
            self.closed = True
            self._queue.put_nowait(None)

    async def get(self) -> np.ndarray | None:
        block = await self._queue.get()
        if block is not None:
            self.backlog_samples -= block.shape[0]
        return block


class PacketAssembler:
    """Cuts blocks of any size into packets of ``packet`` samples (the size may change between
    pushes, as ``hint`` messages arrive). A preallocated buffer: no growing arrays.

    >>> a = PacketAssembler(channels=1, packet=4)
    >>> [p.shape for p in a.push(np.zeros((10, 1), np.float32))]
    [(4, 1), (4, 1)]
    >>> a.pending, a.take_rest().shape
    (2, (2, 1))
    >>> a.packet = 8                 # a new hint at sample 10: one short packet back onto its grid
    >>> [p.shape[0] for p in a.push(np.zeros((20, 1), np.float32))]
    [6, 8]
    """

    def __init__(self, channels: int, packet: int) -> None:
        self.channels = channels
        self.packet = packet
        self._buf = np.zeros((max(4 * packet, 1024), channels), np.float32)
        self.pending = 0
        self.cut = 0  # samples handed out as packets: packets end on multiples of `packet` from 0

    def push(self, block: np.ndarray) -> list[np.ndarray]:
        block = block.reshape(len(block), self.channels)
        need = self.pending + len(block)
        if need > len(self._buf):  # a block larger than anything seen: grow once
            grown = np.zeros((2 * need, self.channels), np.float32)
            grown[: self.pending] = self._buf[: self.pending]
            self._buf = grown
        self._buf[self.pending:need] = block
        self.pending = need
        packets = []
        start = 0
        while True:
            size = packet_end(self.cut, self.packet) - self.cut  # shorter once after a resize
            if self.pending - start < size:
                break
            packets.append(self._buf[start:start + size].copy())
            start += size
            self.cut += size
        if start:
            self._buf[: self.pending - start] = self._buf[start:self.pending]
            self.pending -= start
        return packets

    def take_rest(self) -> np.ndarray:
        rest = self._buf[: self.pending].copy()
        self.cut += self.pending
        self.pending = 0
        return rest


@dataclass
class CaptureStats:
    packets: int = 0
    samples: int = 0
    log: SendLog = field(default_factory=SendLog)


async def stream_capture(source: CaptureQueue, client: StreamtokClient, rate: int, channels: int,
                         chunk_ms: float | None = None,
                         stats: CaptureStats | None = None) -> CaptureStats:
    """Send captured audio until ``source`` is closed, in packets of ``chunk_ms`` or the
    server's current hint; then send the remainder (the caller sends ``end``)."""
    stats = stats if stats is not None else CaptureStats()
    assembler = PacketAssembler(channels, packet_samples(chunk_ms or client.send_hint_ms or 40, rate))

    async def send(packet: np.ndarray) -> None:
        stats.log.sent(len(packet), time.monotonic())
        await client.send_audio(packet)
        stats.packets += 1
        stats.samples += len(packet)

    while (block := await source.get()) is not None:
        assembler.packet = packet_samples(chunk_ms or client.send_hint_ms or 40, rate)
        for packet in assembler.push(block):
            await send(packet)
    if assembler.pending:
        await send(assembler.take_rest())
    return stats


class MicSource:
    """A sounddevice input stream feeding a :class:`CaptureQueue` from its callback."""

    def __init__(self, sd: ModuleType, queue: CaptureQueue, device: Any, rate: int, channels: int,
                 block_ms: float = 10.0) -> None:
        self.queue = queue
        self.overflows = 0
        self.stream = sd.InputStream(device=device, samplerate=rate, channels=channels,
                                     dtype="float32", blocksize=packet_samples(block_ms, rate),
                                     callback=self._callback)

    def _callback(self, indata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
        if status and getattr(status, "input_overflow", False):
            self.overflows += 1
        self.queue.put_threadsafe(indata)

    def start(self) -> None:
        self.stream.start()

    def stop(self) -> None:
        """Stop capturing (PortAudio drains its last callback first), then close the queue.
        Idempotent."""
        with contextlib.suppress(Exception):
            self.stream.stop()
        with contextlib.suppress(Exception):
            self.stream.close()
        self.queue.close_threadsafe()


# -- playback (round trip) ----------------------------------------------------------------------
class Player:
    """Mono float32 samples to an output device through a ring buffer (jitter buffer): playback
    starts once ``prebuffer_ms`` are queued; an underrun plays silence and re-buffers."""

    def __init__(self, sd: ModuleType, rate: int, device: Any = None, seconds: float = 5.0,
                 prebuffer_ms: float = 120.0) -> None:
        self._ring = np.zeros(int(seconds * rate), np.float32)
        self._read = self._write = 0
        self.rate = rate
        self._prebuffer = packet_samples(prebuffer_ms, rate)
        self._playing = False
        self.underruns = 0
        self.stream = sd.OutputStream(device=device, samplerate=rate, channels=1, dtype="float32",
                                      callback=self._callback)

    @property
    def buffered(self) -> int:
        return self._write - self._read

    def push(self, pcm: bytes) -> None:
        x = np.frombuffer(pcm, "<f4")
        room = len(self._ring) - self.buffered
        x = x[-room:] if len(x) > room else x  # overflow: keep the newest audio
        idx = (self._write + np.arange(len(x))) % len(self._ring)
        self._ring[idx] = x
        self._write += len(x)

    def _callback(self, outdata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
        if not self._playing and self.buffered >= self._prebuffer:
            self._playing = True
        n = min(frames, self.buffered) if self._playing else 0
        idx = (self._read + np.arange(n)) % len(self._ring)
        outdata[:n, 0] = self._ring[idx]
        outdata[n:] = 0
        self._read += n
        if self._playing and n < frames:
            self.underruns += 1
            self._playing = False

    def start(self) -> None:
        self.stream.start()

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.stream.stop()
            self.stream.close()


# -- terminal view ------------------------------------------------------------------------------
def format_frame_line(frame: ReceivedFrame, latency_s: float, summary: LatencySummary,
                      backlog_ms: float, server_backlog: float | None, width: int = 4) -> str:
    """One scrolling line per frame: index, stream time, codes, latency and backlog.

    >>> from streamtok.client import ReceivedFrame
    >>> f = ReceivedFrame(index=12, t=0.48, codes=(5, 61, 0, 33), unit=None, latent=None, received=0)
    >>> format_frame_line(f, 0.0123, LatencySummary(10, 11.0, 19.5, 20.0, 21.0), 8.0, 1.0)
    '    12    0.48s    5   61    0   33 |  12.3 ms  p50 11.0  p95 19.5 | backlog 8 ms, server 1 fr'
    """
    codes = "".join(f"{c:>{width + 1}}" for c in (frame.codes or ()))
    unit = f"  u{frame.unit}" if frame.unit is not None else ""
    lat = f"{latency_s * 1000:5.1f} ms" if np.isfinite(latency_s) else "   -- ms"
    server = f", server {server_backlog:.0f} fr" if server_backlog is not None else ""
    return (f"{frame.index:>6} {frame.t:>7.2f}s{codes}{unit} | {lat}  p50 {summary.p50:.1f}  "
            f"p95 {summary.p95:.1f} | backlog {backlog_ms:.0f} ms{server}")


class TokenView:
    """Prints a line per frame and keeps the latencies of the last ``window`` frames."""

    def __init__(self, out: TextIO, card: P.ModelCard, input_rate: int, log: SendLog,
                 queue: CaptureQueue, window: int = 250, quiet: bool = False) -> None:
        self.out, self.card, self.rate, self.log, self.queue = out, card, input_rate, log, queue
        self.window = window
        self.quiet = quiet
        self.latencies: list[float] = []
        self.width = len(str(max((lv.cardinality - 1 for lv in card.levels), default=0)))

    def frame_latency(self, frame: ReceivedFrame) -> float:
        need = frame_ready_sample(frame.index, self.card.frame_rate, self.card.delay_ms, self.rate)
        sent = self.log.completed_at(need)
        self.log.forget_before(need)
        return frame.received - sent if sent is not None else float("nan")

    def show(self, frame: ReceivedFrame, server_stats: dict[str, float]) -> None:
        lat = self.frame_latency(frame)
        self.latencies.append(lat)
        if self.quiet:
            return
        recent = LatencySummary.of(self.latencies[-self.window:])
        backlog_ms = 1000.0 * self.queue.backlog_samples / self.rate
        line = format_frame_line(frame, lat, recent, backlog_ms, server_stats.get("backlog_frames"),
                                 self.width)
        if self.queue.dropped_samples:
            line += f"  DROPPED {1000.0 * self.queue.dropped_samples / self.rate:.0f} ms"
        print(line, file=self.out, flush=True)


# -- the program --------------------------------------------------------------------------------
async def run_mic(args: argparse.Namespace, sd: ModuleType, out: TextIO | None = None) -> int:
    """Capture, stream and show until Ctrl-C (or the server ends the session); 0 when clean."""
    out = out if out is not None else sys.stdout
    device, name, native_rate, max_channels = input_device(sd, args.device)
    rate = supported_rate(native_rate)
    channels = min(args.channels, max_channels)
    loop = asyncio.get_running_loop()
    client = await StreamtokClient.connect(
        args.url, model=args.model, sample_rate=rate, format="f32le", channels=channels,
        codes=args.codebooks if args.codebooks else None, units=args.units, token=args.token)
    assert client.ready is not None
    card = client.ready.model
    if args.play and not client.ready.outputs.codes:
        await client.close()
        raise StreamtokError(f"--play decodes codes, and model {card.name!r} sends none "
                             "(a units model has no decoder)")
    tokens = (f"{client.ready.outputs.codes} of {len(card.levels)} levels" if client.ready.outputs.codes
              else f"units of {card.units}" if client.ready.outputs.units else "latents")
    decoder: StreamtokClient | None = None
    player: Player | None = None
    source: MicSource | None = None
    tasks: list[asyncio.Task] = []
    try:
        if args.play:
            out_rate = supported_rate(sd.query_devices(args.output_device, "output")["default_samplerate"])
            decoder = await StreamtokClient.connect(args.url, model=args.model, sample_rate=out_rate,
                                                  format="f32le", mode="decode", token=args.token)
            with _device_errors(sd, "output"):
                player = Player(sd, out_rate, args.output_device)
                player.start()
            decoder.on_audio = lambda pcm, _index: player.push(pcm)
        queue = CaptureQueue(loop, rate)
        stats = CaptureStats()
        view = TokenView(out, card, rate, stats.log, queue, quiet=args.quiet)
        with _device_errors(sd, "input"):
            source = MicSource(sd, queue, device, rate, channels)
        print(f"streamtok-mic: {name} at {rate} Hz x{channels} -> {args.url} model {card.name} "
              f"({card.frame_rate:g} frames/s, {tokens}); Ctrl-C to stop",
              file=sys.stderr)

        async def show_tokens() -> None:
            async for frame in client.tokens():
                view.show(frame, client.server_stats)
                if decoder is not None and frame.codes is not None:
                    await decoder.send_codes([frame.codes])

        shower = asyncio.create_task(show_tokens())
        sender = asyncio.create_task(stream_capture(queue, client, rate, channels, args.chunk_ms, stats))
        stop = asyncio.Event()
        stopper = asyncio.create_task(stop.wait())
        tasks += [shower, sender, stopper]
        main_task = asyncio.current_task()

        def second_interrupt() -> None:
            assert main_task is not None
            main_task.cancel()

        def first_interrupt() -> None:
            stop.set()
            loop.add_signal_handler(signal.SIGINT, second_interrupt)

        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signal.SIGINT, first_interrupt)
        with _device_errors(sd, "input"):
            source.start()
        done, _ = await asyncio.wait({stopper, sender, shower}, return_when=asyncio.FIRST_COMPLETED)
        source.stop()
        if sender in done or shower in done:  # the connection ended under us
            if client.errors:
                raise client.errors[-1]
            for task in (sender, shower):
                if task in done and task.exception() is not None:
                    raise task.exception()
            raise StreamtokError(f"the server closed the connection (code {client.ws.close_code})")
        await sender
        stats.log.close(time.monotonic())
        await client.end()
        await shower
        if decoder is not None:
            await decoder.end()
            if player is not None:  # let the speakers play what is buffered
                await asyncio.sleep(player.buffered / player.rate + 0.1)
        lat = LatencySummary.of(view.latencies)
        print(f"streamtok-mic: {len(view.latencies)} frames, {stats.samples / rate:.2f} s sent in "
              f"{stats.packets} packets; {lat.format()}"
              + (f"; dropped {1000 * queue.dropped_samples / rate:.0f} ms" if queue.dropped_samples else "")
              + (f"; {source.overflows} input overflows" if source.overflows else ""), file=sys.stderr)
        return 0
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGINT)
        if source is not None:
            source.stop()
        for task in tasks:
            task.cancel()
        if player is not None:
            player.stop()
        if decoder is not None:
            await decoder.close()
        await client.close()


def list_devices(sd: ModuleType) -> None:
    print(sd.query_devices())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="streamtok-mic",
                                description="Tokenize the microphone live on a streamtok server.")
    add_server_arguments(p)
    p.add_argument("--list-devices", action="store_true", help="list audio devices and exit")
    p.add_argument("--device", default=None,
                   help="input device: index or name substring (default: the system's)")
    p.add_argument("--channels", type=int, default=1, help="channels to capture (server downmixes)")
    p.add_argument("--chunk-ms", type=float, default=None,
                   help="milliseconds per packet (default: follow the server's hints)")
    p.add_argument("--codebooks", type=int, default=None,
                   help="RVQ levels to ask for (default: all; a model without codes sends units)")
    p.add_argument("--units", action="store_true", default=None,
                   help="also ask for units (default: only from a model without codes)")
    add_token_argument(p)
    p.add_argument("--play", action="store_true",
                   help="decode the tokens back to the speakers through a decode session")
    p.add_argument("--output-device", default=None, help="output device for --play")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-frame lines, summary only")
    return p


def _device_arg(value: str | None) -> int | str | None:
    return int(value) if value is not None and value.isdigit() else value


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.device, args.output_device = _device_arg(args.device), _device_arg(args.output_device)
    if args.chunk_ms is not None and args.chunk_ms <= 0:
        parser.error("--chunk-ms must be positive")
    if not 1 <= args.channels <= 8:
        parser.error("--channels must be 1..8")
    if args.codebooks is not None and args.codebooks < 1:
        parser.error("--codebooks must be at least 1")
    try:
        sd = load_sounddevice()
        if args.list_devices:
            list_devices(sd)
            return 0
        return asyncio.run(run_mic(args, sd))
    except NoAudioDevice as e:
        print(f"streamtok-mic: {e}", file=sys.stderr)
        return EXIT_NO_AUDIO
    except SESSION_ERRORS as e:
        return report_session_error(parser.prog, args.url, e)
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("streamtok-mic: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
