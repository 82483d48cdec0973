"""Fuzzing of the pure wire protocol: ``SessionProtocol.receive`` against hostile clients.

Each *case* is one fresh :class:`~streamtok.server.protocol.SessionProtocol` (with a model
catalog like a server's, or none; a random size limit) fed a sequence of 1-12 messages drawn
from a structured generator: random bytes, text frames, valid messages, messages with a wrong
value of any type in any field (nested ones too), missing or unknown fields, unknown types,
truncated or bit-flipped or concatenated msgpack, forged container lengths (a ``bin`` claiming
4 GiB), 100,000-deep nesting, messages over the size limit, extreme numbers (rate 0, 10^9
channels, negative codes, 2^64-1, NaN/Inf), NaN/Inf samples in ``f32le`` audio (also split
across two messages), and sessions out of order (audio before ``start``, ``start`` twice,
anything after ``end``, ``codes`` in an encode session).

With `atheris <https://github.com/google/atheris>`_ installed (``pip install atheris``; the
``bench`` extra) the generator's every choice is read from libFuzzer's input, and the protocol
module is instrumented, so the fuzzer learns which choices reach new branches (coverage-guided).
Without it (or with ``--engine random``) the same generator draws from a seeded PRNG; every case
is reproducible from ``--seed`` and its number (``--replay N`` prints its messages and events).

Every message must end in an accepted event or a documented error, checked independently of
the implementation: nothing raises out of ``receive``; a violation has a code the protocol layer
documents (never ``internal``, which is how ``receive`` reports a bug it caught), a non-empty
message that encodes as an ``error``, the fatality and close code of PROTOCOL.md section 9;
accepted events fit the state (no audio before ``start`` or after ``end``, ``start`` once) and
their content the documented ranges (no NaN/Inf sample accepted in ``f32le``, codes within the
model's cardinalities, whole sample blocks at ``flush``); a failed session ignores all input.

    python benchmarks/fuzz.py                  # 100,000 cases (atheris when installed)
    python benchmarks/fuzz.py --quick          # 5,000 cases
    python benchmarks/fuzz.py --engine random --seed 3 --cases 1000000
    python benchmarks/fuzz.py --engine random --seed 3 --replay 4711

Prints the cases and messages run, each error code seen with its count, and the crashes
(every broken rule, with the case to replay); exits 1 if there was any.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import struct
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import msgpack
import numpy as np

from streamtok.server import protocol as P

T = TypeVar("T")

# What the pure protocol layer itself may answer to client input (PROTOCOL.md section 9); the
# rest (auth, origin, capacity, idle, slow consumer, ...) is decided by the server around it.
PROTOCOL_CODES = frozenset({
    P.ErrorCode.BAD_MESSAGE, P.ErrorCode.UNKNOWN_TYPE, P.ErrorCode.BAD_VERSION,
    P.ErrorCode.BAD_FIELD, P.ErrorCode.UNKNOWN_MODEL, P.ErrorCode.BAD_AUDIO,
    P.ErrorCode.OUT_OF_ORDER, P.ErrorCode.TOO_BIG,
})
ALWAYS_FATAL = PROTOCOL_CODES - {P.ErrorCode.UNKNOWN_TYPE, P.ErrorCode.BAD_FIELD}
MAX_ERROR_MESSAGE_CHARS = 1024  # an error message quotes at most a short prefix of the input

# Like a server's catalog: a codec with decode and latents, one with units and no decoder, one
# with neither codes nor decode (latents only).
CATALOG: dict[str, P.ModelLimits] = {
    "tiny": P.ModelLimits(cardinalities=(64,) * 4, latents=True, decode=True),
    "default": P.ModelLimits(cardinalities=(1024,) * 8, units=True, latents=True, decode=True),
    "units": P.ModelLimits(cardinalities=(), units=True),
}

SPECIAL_INTS = (0, 1, -1, 2, 3, 7, 8, 9, 63, 64, 255, 256, 1023, 1024, 7999, 8000, 16000, 44100,
                48000, 48001, 65535, 65536, 65537, 10**9, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
                2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, -(2**31), -(2**63))
SPECIAL_FLOATS = (0.0, -0.0, 1.0, -1.0, 0.5, 1e-45, 5e-324, 16000.0, 3.4e38, 1e308, -1e308,
                  math.nan, -math.nan, math.inf, -math.inf)
FIELD_NAMES = ("type", "version", "mode", "model", "sample_rate", "format", "channels", "outputs",
               "auth", "resume", "frames_per_message", "client", "data", "seq", "frames", "t",
               "frame", "codes", "units", "latents", "token", "last_frame")
TYPE_NAMES = tuple(t.value for t in P.ClientMessageType) + (
    "pause", "", "START", "tokens", "ready", "error", "x" * 300, "start\x00", "\u00e9nd")


# --------------------------------------------------------------------------------------------
# Sources of choices: a seeded PRNG, or libFuzzer's input through atheris


class Source(Protocol):
    """Where the generator's choices come from."""

    def int(self, lo: int, hi: int) -> int: ...  # lo..hi inclusive, within int64
    def float(self) -> float: ...  # any float64, NaN and +-Inf included
    def bytes(self, n: int) -> bytes: ...  # at most n bytes


class RandomSource:
    """Choices from ``random.Random`` (reproducible from its seed)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def int(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def float(self) -> float:
        return struct.unpack("<d", self.rng.randbytes(8))[0]

    def bytes(self, n: int) -> bytes:
        return self.rng.randbytes(n)


class FuzzedSource:
    """Choices read from libFuzzer's input (``atheris.FuzzedDataProvider``); once the input is
    used up every choice is the lowest, so short inputs give short, simple cases."""

    def __init__(self, fdp: Any) -> None:
        self.fdp = fdp

    def int(self, lo: int, hi: int) -> int:
        return self.fdp.ConsumeIntInRange(lo, hi) if hi > lo else lo

    def float(self) -> float:
        return self.fdp.ConsumeFloat()

    def bytes(self, n: int) -> bytes:
        return self.fdp.ConsumeBytes(n)


def pick(src: Source, options: Sequence[T]) -> T:
    return options[src.int(0, len(options) - 1)]


def chance(src: Source, percent: int) -> bool:
    return src.int(0, 99) < percent


# --------------------------------------------------------------------------------------------
# Values and messages


def any_int(src: Source) -> int:
    if chance(src, 60):
        return pick(src, SPECIAL_INTS)
    return src.int(-(2**63), 2**63 - 1) if chance(src, 50) else src.int(-1000, 70000)


def any_float(src: Source) -> float:
    return pick(src, SPECIAL_FLOATS) if chance(src, 60) else src.float()


def any_str(src: Source) -> str:
    kind = src.int(0, 5)
    if kind == 0:
        return ""
    if kind == 1:
        return pick(src, TYPE_NAMES + ("s16le", "f32le", "encode", "decode", "mp3", "tiny", "default"))
    if kind == 2:
        return "".join(chr(src.int(32, 126)) for _ in range(src.int(1, 40)))
    if kind == 3:  # any code point that UTF-8 can carry (no lone surrogates)
        return "".join(chr(c) for c in (src.int(0, 0x10FFFF) for _ in range(src.int(1, 12)))
                       if not 0xD800 <= c <= 0xDFFF)
    if kind == 4:
        return "a" * pick(src, (200, 201, 4096, 4097, 70000))
    return str(any_int(src))


def any_value(src: Source, depth: int = 0) -> Any:
    """One msgpack-encodable value of any type (nested up to a few levels)."""
    kind = src.int(0, 11 if depth < 3 else 7)
    if kind == 0:
        return None
    if kind == 1:
        return chance(src, 50)
    if kind == 2:
        return any_int(src)
    if kind == 3:
        return any_float(src)
    if kind == 4:
        return any_str(src)
    if kind == 5:
        return src.bytes(pick(src, (0, 1, 3, 4, 7, 64, 1000)))
    if kind == 6:
        return msgpack.ExtType(src.int(0, 127), src.bytes(src.int(0, 9)))
    if kind == 7:  # ext -1: msgpack's own timestamp, decoded to a Timestamp object
        return msgpack.Timestamp(src.int(0, 2**34 - 1), src.int(0, 999_999_999))
    if kind in (8, 9):
        return [any_value(src, depth + 1) for _ in range(src.int(0, 4))]
    if kind == 10:
        return {any_str(src): any_value(src, depth + 1) for _ in range(src.int(0, 4))}
    return {pick(src, FIELD_NAMES): any_value(src, depth + 1) for _ in range(src.int(1, 3))}


@dataclass
class Plan:
    """What the generator believes the session is, to make plausible next messages."""

    mode: str = "encode"
    format: str = "s16le"
    channels: int = 1
    model: str = "tiny"
    audio_messages: int = 0


def pcm(src: Source, plan: Plan) -> bytes:
    """Audio bytes in the planned format: mostly whole sample blocks, sometimes cut anywhere;
    f32 samples finite, or with NaN/Inf at random places."""
    width = 4 if plan.format == "f32le" else 2
    samples = pick(src, (0, 1, 2, 3, 17, 160, 640, 1000, 4096))
    if plan.format == "f32le":
        x = np.frombuffer(src.bytes(samples * 2).ljust(samples * 2, b"\0"), "<i2")
        x = (x.astype(np.float32) / 32768.0).astype("<f4")
        if chance(src, 25) and samples:
            for _ in range(src.int(1, 3)):
                x[src.int(0, samples - 1)] = pick(src, (np.nan, np.inf, -np.inf, 3.4e38, -0.0))
        data = x.tobytes()
    else:
        data = src.bytes(samples * width).ljust(samples * width, b"\0")
    data = data * plan.channels if plan.channels > 1 and chance(src, 50) else data
    if chance(src, 20):  # end inside a sample: the next message completes it (or it never does)
        data = data[: src.int(0, len(data))]
    return data


def valid_message(src: Source, kind: str, plan: Plan, catalog: P.ModelCatalog | None) -> dict:
    """A message of ``kind`` that a server would accept in the planned session."""
    if kind == "start":
        names = sorted(catalog) if catalog else ["tiny", "default"]
        plan.model = pick(src, names) if chance(src, 97) else pick(src, ("nope", "TINY", "tiny "))
        limits = (catalog or CATALOG).get(plan.model, CATALOG["tiny"])
        plan.mode = "decode" if limits.decode and chance(src, 25) else "encode"
        plan.format = pick(src, ("s16le", "f32le"))
        plan.channels = pick(src, (1, 1, 2, 8))
        msg: dict[str, Any] = {"type": "start", "version": 1, "model": plan.model,
                               "sample_rate": pick(src, (8000, 16000, 22050, 44100, 48000)),
                               "format": plan.format, "channels": plan.channels}
        if plan.mode == "decode":
            msg["mode"] = "decode"
        else:
            levels = limits.max_levels
            codes: bool | int = False
            if levels:
                codes = True if chance(src, 50) else src.int(1, levels)
            outputs = {"codes": codes, "latents": limits.latents and chance(src, 30),
                       "units": limits.units and chance(src, 30)}
            if not (codes or outputs["latents"] or outputs["units"]):
                outputs["latents" if limits.latents else "units"] = True
            msg["outputs"] = outputs
        if chance(src, 15):
            msg["auth"] = any_str(src) or "token"
        if chance(src, 10):
            msg["resume"] = {"token": "rt-" + str(src.int(0, 99)), "last_frame": src.int(-1, 100)}
        if chance(src, 10):
            msg["frames_per_message"] = src.int(1, 8)
        if chance(src, 10):
            msg["client"] = "fuzz/1"
        return msg
    if kind == "audio":
        msg = {"type": "audio", "data": pcm(src, plan)}
        if chance(src, 30):
            msg["seq"] = plan.audio_messages
        plan.audio_messages += 1
        return msg
    if kind == "codes":
        limits = (catalog or CATALOG).get(plan.model, CATALOG["tiny"])
        levels = src.int(1, max(1, limits.max_levels))
        cards = limits.cardinalities or (64,)
        frames = [[src.int(0, cards[k % len(cards)] - 1) for k in range(levels)]
                  for _ in range(src.int(0, 5))]
        return {"type": "codes", "frames": frames}
    if kind == "ping":
        return {"type": "ping", "t": pick(src, (0.0, 1712.5, 5301.2004)) if chance(src, 80)
                else src.int(0, 10**6)}
    if kind == "ack":
        return {"type": "ack", "frame": src.int(0, 1000)}
    return {"type": kind}  # flush, end


def mutate(src: Source, msg: dict) -> dict:
    """Break one thing: a field (nested ones too) gets a value of any type, goes missing, or
    is joined by an unknown field; or ``type`` changes."""
    msg = dict(msg)
    op = src.int(0, 5)
    if op <= 1 and msg:
        key = pick(src, sorted(msg))
        if isinstance(msg[key], dict) and chance(src, 50) and msg[key]:
            inner = dict(msg[key])
            inner[pick(src, sorted(inner))] = any_value(src)
            msg[key] = inner
        else:
            msg[key] = any_value(src)
    elif op == 2 and msg:
        del msg[pick(src, sorted(msg))]
    elif op == 3:
        msg[pick(src, FIELD_NAMES)] = any_value(src)
    elif op == 4:
        msg["type"] = pick(src, TYPE_NAMES) if chance(src, 70) else any_value(src)
    else:  # an extreme number where a number belongs
        numeric = [k for k in ("version", "sample_rate", "channels", "frames_per_message", "seq",
                               "t", "frame") if k in msg]
        key = pick(src, numeric) if numeric else pick(src, ("sample_rate", "channels", "seq"))
        msg[key] = any_int(src) if chance(src, 70) else any_float(src)
        frames = msg.get("frames")
        if isinstance(frames, list) and all(isinstance(f, list) for f in frames) and chance(src, 50):
            msg["frames"] = [[any_int(src) for _ in f] for f in frames]
    return msg


def encode(src: Source, obj: Any) -> bytes:
    try:
        return msgpack.packb(obj, use_bin_type=True, use_single_float=chance(src, 20),
                             strict_types=False)
    except (ValueError, TypeError, OverflowError):
        return msgpack.packb({"type": "start", "version": 1})  # unencodable draw: a plain message


def corrupt(src: Source, data: bytes, max_size: int) -> bytes:
    """Damage an encoded message the ways a broken client or a hostile one would."""
    op = src.int(0, 6)
    if op == 0 and data:  # truncated
        return data[: src.int(0, len(data) - 1)]
    if op == 1 and data:  # flipped bytes
        b = bytearray(data)
        for _ in range(src.int(1, 4)):
            b[src.int(0, len(b) - 1)] = src.int(0, 255)
        return bytes(b)
    if op == 2:  # trailing bytes, or two messages in one frame
        return data + (data if chance(src, 50) else src.bytes(src.int(1, 8)))
    if op == 3:  # a message right at the size limit (inclusive), or just over it
        n = max(0, max_size - 22)
        over = len(msgpack.packb({"type": "audio", "data": b"\0" * n})) - max_size
        return msgpack.packb({"type": "audio", "data": b"\0" * max(0, n - over + src.int(-2, 2))})
    if op == 4:  # a container whose header claims more than the message holds
        head = pick(src, (b"\xc6\xff\xff\xff\xff", b"\xdb\xff\xff\xff\xff", b"\xdd\xff\xff\xff\xff",
                          b"\xdf\xff\xff\xff\xff", b"\xc5\xff\xff", b"\xc9\x7f\xff\xff\xff\x05"))
        return b"\x82\xa4type\xa5audio\xa4data" + head + src.bytes(src.int(0, 16))
    if op == 5:  # deep nesting
        depth = pick(src, (100, 1000, 10_000, 100_000))
        opener = pick(src, (b"\x91", b"\x81\xa1a"))
        return (b"\x82\xa4type\xa5codes\xa6frames" + opener * depth + b"\xc0")[: max_size + 1]
    # keys that are not strings, invalid UTF-8, a map of the wrong shape
    return pick(src, (b"\x81\x01\xa5start", b"\x81\xc4\x04type\xa5start",
                      b"\x81\xa4type\xa3\xff\xfe\xfd", b"\x92\xa4type\xa5start", b"\xc1",
                      b"\x81\xa4type\xc0", b"\x80", b"")) + (data if chance(src, 20) else b"")


MESSAGE_KINDS = ("start", "audio", "codes", "flush", "end", "ping", "ack")


def message(src: Source, plan: Plan, catalog: P.ModelCatalog | None, max_size: int,
            kind: str | None = None, clean: int = 30) -> bytes | str:
    """One WebSocket message: a valid one ``clean`` percent of the time, else damaged."""
    msg = valid_message(src, kind or pick(src, MESSAGE_KINDS), plan, catalog)
    if src.int(0, 99) < clean:
        return encode(src, msg)
    form = src.int(0, 99)
    if form < 10:
        return src.bytes(src.int(0, 64))
    if form < 16:
        text = pick(src, ('{"type": "start", "version": 1}', "", "start", "\u00e9" * 10))
        return text if chance(src, 80) else "x" * (max_size + 1)
    if form < 24:
        return encode(src, any_value(src))
    if form < 76:
        for _ in range(src.int(1, 3)):
            msg = mutate(src, msg)
    data = encode(src, msg)
    return corrupt(src, data, max_size) if form >= 70 else data


@dataclass
class Case:
    """One session's worth of input for a fresh ``SessionProtocol``."""

    messages: list[bytes | str]
    max_size: int = P.DEFAULT_MAX_MESSAGE_SIZE
    with_catalog: bool = True
    check_finite: bool = True


def generate_case(src: Source, catalog: P.ModelCatalog | None = None,
                  max_size: int | None = None) -> Case:
    """A sequence of 1-12 messages: a mostly proper session with faults injected, messages in
    random order, or messages before ``start``."""
    catalog = CATALOG if catalog is None else catalog
    size = max_size or (pick(src, (64, 300, 4096, 65536)) if chance(src, 25)
                        else P.DEFAULT_MAX_MESSAGE_SIZE)
    plan = Plan()
    scenario = src.int(0, 9)
    n = src.int(1, 12)
    messages: list[bytes | str] = []
    for i in range(n):
        clean = 30
        if scenario <= 5:  # a session: start, audio or codes, flush, maybe end; faults here and there
            clean = 85
            if i == 0:
                kind = "start"
            elif chance(src, 90):
                kind = pick(src, ("audio", "audio", "audio", "flush", "ping", "ack", "end")
                            if plan.mode == "encode" else ("codes", "codes", "flush", "ack", "end"))
            else:
                kind = pick(src, MESSAGE_KINDS)
        elif scenario <= 7:  # anything in any order
            kind = pick(src, MESSAGE_KINDS)
        else:  # never a start: everything is before it
            kind = pick(src, MESSAGE_KINDS[1:])
        messages.append(message(src, plan, catalog, size, kind, clean))
    return Case(messages, size, with_catalog=chance(src, 85), check_finite=chance(src, 95))


# --------------------------------------------------------------------------------------------
# Running a case and checking every answer


@dataclass
class Stats:
    """What the fuzzer saw over all cases."""

    cases: int = 0
    messages: int = 0
    errors: Counter = field(default_factory=Counter)  # "code" -> count
    fatal: Counter = field(default_factory=Counter)  # "code" -> fatal count
    accepted: Counter = field(default_factory=Counter)  # event name -> count
    crashes: list[dict] = field(default_factory=list)
    crash_count: int = 0

    def add_crash(self, case_id: Any, index: int, data: bytes | str, what: str) -> None:
        self.crash_count += 1
        if len(self.crashes) < 20:
            self.crashes.append({"case": case_id, "message": index, "what": what,
                                 "data": _preview(data)})


def _preview(data: bytes | str, limit: int = 160) -> str:
    text = repr(data[:limit])
    return text + (f"... ({len(data)} long)" if len(data) > limit else "")


@dataclass
class Oracle:
    """The session state as PROTOCOL.md section 3 says it must be, kept apart from the code."""

    state: str = "await"  # await, streaming, ended, failed
    mode: str = ""
    block: int = 1
    f32: bool = False
    audio_bytes: int = 0
    levels: int | None = None
    model: str = ""
    tail: bytes = b""  # bytes of an f32 sample not complete yet


_EVENT_NAMES = {P.StartRequested: "start", P.AudioReceived: "audio", P.CodesReceived: "codes",
                P.FlushRequested: "flush", P.EndRequested: "end", P.PingReceived: "ping",
                P.AckReceived: "ack", P.ProtocolViolation: "error"}


def _wire_type(data: bytes | str) -> Any:
    """The ``type`` of a message as an independent decoder sees it (None if not a map)."""
    if isinstance(data, str):
        return None
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception:
        return None
    return obj.get("type") if isinstance(obj, dict) else None


def check_answer(proto: P.SessionProtocol, oracle: Oracle, case: Case, data: bytes | str,
                 events: Any, catalog: P.ModelCatalog | None) -> str | None:
    """Returns what is wrong with ``events`` as the answer to ``data``, or None."""
    if oracle.state == "failed":
        return None if events == [] else f"a failed session answered {events!r}"
    if type(events) is not list or len(events) != 1:
        return f"receive returned {events!r}; expected one event"
    ev = events[0]
    name = _EVENT_NAMES.get(type(ev))
    if name is None:
        return f"not an Event: {ev!r}"
    if len(data) > case.max_size and name != "error":
        return f"a message of {len(data)} bytes over the limit {case.max_size} was accepted"
    if name == "error":
        return _check_violation(proto, oracle, case, data, ev)
    wire = _wire_type(data)
    if wire != name:
        return f"event {name} for a message whose type is {wire!r}"
    if oracle.state == "ended":
        return f"{name} accepted after end"
    if name == "ping":
        return None if math.isfinite(ev.t) else f"ping.t {ev.t} accepted"
    if oracle.state == "await":
        if name != "start":
            return f"{name} accepted before start"
        m = ev.message
        if not (P.MIN_SAMPLE_RATE <= m.sample_rate <= P.MAX_SAMPLE_RATE
                and 1 <= m.channels <= P.MAX_CHANNELS and m.version == 1):
            return f"start out of range accepted: {m!r}"
        if catalog is not None and case.with_catalog and m.model not in catalog:
            return f"unknown model {m.model!r} accepted"
        oracle.state, oracle.mode, oracle.model = "streaming", m.mode.value, m.model
        oracle.block = m.format.sample_width * m.channels
        oracle.f32 = m.format is P.AudioFormat.F32LE
        return None
    if name == "start":
        return "start accepted twice"
    if name == "audio":
        if oracle.mode != "encode":
            return "audio accepted in a decode session"
        if oracle.f32 and case.check_finite:
            joined = oracle.tail + ev.data
            whole = len(joined) // 4 * 4
            if whole and not np.isfinite(np.frombuffer(joined[:whole], "<f4")).all():
                return "NaN/Inf f32 audio accepted"
            oracle.tail = joined[whole:]
        oracle.audio_bytes += len(ev.data)
    elif name == "codes":
        if oracle.mode != "decode":
            return "codes accepted in an encode session"
        return _check_codes(oracle, ev.frames, catalog if case.with_catalog else None)
    elif name in ("flush", "end"):
        if oracle.mode == "encode" and oracle.audio_bytes % oracle.block:
            return f"{name} accepted with {oracle.audio_bytes} bytes, not whole {oracle.block}-byte blocks"
        if name == "end":
            oracle.state = "ended"
    elif name == "ack" and not 0 <= ev.frame <= P.MAX_INDEX:
        return f"ack.frame {ev.frame} accepted"
    return None


def _check_codes(oracle: Oracle, frames: tuple, catalog: P.ModelCatalog | None) -> str | None:
    for f in frames:
        if not f or (oracle.levels is not None and len(f) != oracle.levels):
            return f"codes frame of {len(f)} levels accepted (session has {oracle.levels})"
        oracle.levels = len(f)
        cards = catalog[oracle.model].cardinalities if catalog is not None else None
        for k, c in enumerate(f):
            if type(c) is not int or c < 0 or c > P.MAX_CODE:
                return f"code {c!r} accepted"
            if cards is not None and (k >= len(cards) or c >= cards[k]):
                return f"code {c} at level {k} accepted for {oracle.model}"
    return None


def _check_violation(proto: P.SessionProtocol, oracle: Oracle, case: Case, data: bytes | str,
                     ev: P.ProtocolViolation) -> str | None:
    code = ev.code
    if code is P.ErrorCode.INTERNAL:
        cause = "".join(traceback.format_exception(ev.cause)) if ev.cause else ""
        return f"internal error (a bug caught by receive): {ev.message}\n{cause}"
    if code not in PROTOCOL_CODES:
        return f"error code {code!r} is not one the protocol layer documents"
    if type(ev.message) is not str or not ev.message or len(ev.message) > MAX_ERROR_MESSAGE_CHARS:
        return f"error message is empty or {len(ev.message)} characters long"
    if code in ALWAYS_FATAL and not ev.fatal:
        return f"{code.value} reported as not fatal"
    if code is P.ErrorCode.UNKNOWN_TYPE and ev.fatal:
        return "unknown_type reported as fatal"
    if code is P.ErrorCode.BAD_FIELD and not ev.fatal and _wire_type(data) not in ("ping", "ack"):
        return "a non-fatal bad_field outside ping/ack"
    if len(data) > case.max_size and code is not P.ErrorCode.TOO_BIG:
        return f"{code.value} instead of too_big for {len(data)} bytes"
    if isinstance(data, str) and len(data) <= case.max_size and code is not P.ErrorCode.BAD_MESSAGE:
        return f"{code.value} for a text frame"
    wire = P.encode_server_message(ev.to_message())
    back = P.parse_server_message(wire)
    if not isinstance(back, P.ErrorMessage) or back.code is not code or back.message != ev.message:
        return f"error does not survive the wire: {back!r}"
    if ev.fatal:
        if proto.state is not P.SessionState.FAILED or proto.close_code != code.close_code:
            return f"fatal {code.value} left state {proto.state} close code {proto.close_code}"
        oracle.state = "failed"
    return None


def run_case(case: Case, stats: Stats, case_id: Any = None,
             catalog: P.ModelCatalog | None = None, trace: Callable[[str], None] | None = None) -> None:
    """Feed a case to a fresh ``SessionProtocol`` and record what happened in ``stats``."""
    catalog = CATALOG if catalog is None else catalog
    proto = P.SessionProtocol(max_size=case.max_size, catalog=catalog if case.with_catalog else None,
                              check_finite=case.check_finite)
    oracle = Oracle()
    stats.cases += 1
    for i, data in enumerate(case.messages):
        stats.messages += 1
        try:
            events = proto.receive(data)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # the one thing receive must never do
            stats.add_crash(case_id, i, data, "raised " + "".join(traceback.format_exception(exc)))
            return
        if trace is not None:
            trace(f"  [{i}] {_preview(data, 100)}\n      -> {events!r}"[:600])
        try:
            wrong = check_answer(proto, oracle, case, data, events, catalog)
        except Exception as exc:  # the answer broke the checker: it is malformed
            wrong = "checking the answer raised " + "".join(traceback.format_exception(exc))
        if wrong is not None:
            stats.add_crash(case_id, i, data, wrong)
            return
        for ev in events:
            if isinstance(ev, P.ProtocolViolation):
                stats.errors[ev.code.value] += 1
                stats.fatal[ev.code.value] += ev.fatal
            else:
                stats.accepted[_EVENT_NAMES[type(ev)]] += 1


# --------------------------------------------------------------------------------------------
# Engines


def case_rng(seed: int, index: int) -> random.Random:
    """The PRNG of case ``index``: any case replays alone from (seed, index)."""
    return random.Random(seed * 1_000_003 + index)


def run_random(cases: int, seed: int = 0, catalog: P.ModelCatalog | None = None,
               progress: Callable[[Stats], None] | None = None) -> Stats:
    """Fuzz ``cases`` cases from the seeded generator."""
    stats = Stats()
    for i in range(cases):
        run_case(generate_case(RandomSource(case_rng(seed, i)), catalog), stats, i, catalog)
        if progress is not None and (i + 1) % 20000 == 0:
            progress(stats)
    return stats


def _instrument_protocol(atheris: Any) -> int:
    """Instrument every function and method of the protocol module for coverage (it is imported
    already, so ``instrument_imports`` cannot); returns how many."""
    count = 0

    def instrument(fn: Any) -> None:
        nonlocal count
        if getattr(fn, "__module__", None) == P.__name__ and hasattr(fn, "__code__"):
            atheris.instrument_func(fn)
            count += 1

    for obj in list(vars(P).values()):
        if isinstance(obj, type) and obj.__module__ == P.__name__:
            for attr in vars(obj).values():
                for fn in (attr, getattr(attr, "__func__", None), getattr(attr, "fget", None)):
                    if fn is not None:
                        instrument(fn)
        elif callable(obj):
            instrument(obj)
    return count


def run_atheris(cases: int, seed: int, report: Callable[[Stats, float], int],
                catalog: P.ModelCatalog | None = None) -> None:
    """Fuzz ``cases`` cases with libFuzzer steering the generator; never returns (libFuzzer
    owns the process, so ``report`` is called from the last case and its code ends it)."""
    import atheris

    functions = _instrument_protocol(atheris)
    from importlib.metadata import version

    print(f"atheris {version('atheris')}: {functions} protocol functions instrumented; "
          "libFuzzer reports coverage (cov:) on stderr", flush=True)
    stats = Stats()
    t0 = time.perf_counter()

    def one_input(data: bytes) -> None:
        src = FuzzedSource(atheris.FuzzedDataProvider(data))
        if data[:1] == b"\xff":  # plain byte fuzzing: the input itself is the one message
            case = Case([data[1:]], max_size=4096)
        else:
            case = generate_case(src, catalog)
        run_case(case, stats, f"libFuzzer input {stats.cases}", catalog)
        if stats.cases >= cases:
            sys.stdout.flush()
            os._exit(report(stats, time.perf_counter() - t0))

    argv = [sys.argv[0], f"-seed={seed + 1}", "-max_len=4096", "-len_control=0", f"-runs={cases * 4 + 100}",
            "-print_final_stats=0", "-reload=0"]
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


def format_report(stats: Stats, seconds: float, engine: str) -> str:
    lines = [f"engine: {engine}",
             f"cases run: {stats.cases:,} ({stats.messages:,} messages) in {seconds:.1f} s "
             f"({stats.cases / max(seconds, 1e-9):,.0f} cases/s)",
             "accepted events: " + ", ".join(f"{k} {v:,}" for k, v in sorted(stats.accepted.items())),
             f"distinct error codes seen: {len(stats.errors)} of the {len(PROTOCOL_CODES)} the "
             "protocol layer documents"]
    for code, n in stats.errors.most_common():
        lines.append(f"  {code:<14} {n:>9,}  ({stats.fatal[code]:,} fatal)")
    missing = sorted(c.value for c in PROTOCOL_CODES if c.value not in stats.errors)
    if missing:
        lines.append("  never seen: " + ", ".join(missing))
    lines.append(f"crashes: {stats.crash_count}")
    for c in stats.crashes[:10]:
        lines.append(f"  case {c['case']} message {c['message']}: {c['what'].strip()}\n"
                     f"    data: {c['data']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=100_000)
    ap.add_argument("--quick", action="store_true", help="5,000 cases")
    ap.add_argument("--engine", choices=("auto", "atheris", "random"), default="auto",
                    help="auto: atheris when installed, else the seeded generator")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--replay", type=int, metavar="N", help="print case N of --seed (random engine)")
    ap.add_argument("--json", type=str, help="also write the figures here")
    args = ap.parse_args(argv)
    cases = 5000 if args.quick else args.cases

    if args.replay is not None:
        case = generate_case(RandomSource(case_rng(args.seed, args.replay)))
        print(f"case {args.replay} (seed {args.seed}): max_size {case.max_size}, catalog "
              f"{case.with_catalog}, check_finite {case.check_finite}")
        stats = Stats()
        run_case(case, stats, args.replay, trace=print)
        print(format_report(stats, 0.0, "replay"))
        return 1 if stats.crash_count else 0

    engine = args.engine
    if engine == "auto":
        try:
            import atheris  # noqa: F401
            engine = "atheris"
        except ImportError:
            engine = "random"

    def report(stats: Stats, seconds: float) -> int:
        name = ("atheris (libFuzzer, coverage-guided)" if engine == "atheris"
                else "random (seeded structured generator)")
        print(format_report(stats, seconds, f"{name}, seed {args.seed}"), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"engine": engine, "seed": args.seed, "cases": stats.cases,
                           "messages": stats.messages, "seconds": seconds,
                           "errors": dict(stats.errors), "accepted": dict(stats.accepted),
                           "crashes": stats.crash_count, "crash_samples": stats.crashes}, f, indent=1)
        return 1 if stats.crash_count else 0

    print(f"fuzzing SessionProtocol.receive: {cases:,} cases, engine {engine}", flush=True)
    if engine == "atheris":
        run_atheris(cases, args.seed, report)
        return 2  # not reached: run_atheris exits the process
    t0 = time.perf_counter()
    stats = run_random(cases, args.seed, progress=lambda s: print(
        f"  {s.cases:,} cases, {s.crash_count} crashes, {time.perf_counter() - t0:.0f} s", flush=True))
    return report(stats, time.perf_counter() - t0)


if __name__ == "__main__":
    sys.exit(main())
