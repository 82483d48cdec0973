"""Wire protocol, version 1: typed messages, their msgpack encoding, and the session state machine.

This module is pure: bytes in, typed messages and events out; messages in, bytes out. It has no
socket, no asyncio, no clock and no model; the server wraps it (see ``docs/PROTOCOL.md`` for the
specification a client is written from).

Framing: every message in either direction is one msgpack map with a string ``type`` key, sent
in one *binary* WebSocket frame. Audio travels inside ``audio`` messages (``data`` is msgpack
``bin``), so a frame never has to be guessed to be audio or control. Text frames are refused
with :attr:`ErrorCode.BAD_MESSAGE`.

Words: a *frame* is one step of the model (``frame_size`` samples at the model rate) and yields
one set of tokens; a *message* is one WebSocket message; a *sample block* is one sample of every
channel (``sample_width * channels`` bytes of interleaved PCM).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum, IntEnum
from typing import Any, Literal, NoReturn

import msgpack
import numpy as np

from streamtok.errors import ProtocolError

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "MAX_CHANNELS",
    "MAX_CLIENT_NAME_CHARS",
    "MAX_F32_SAMPLE",
    "MAX_SAMPLE_RATE",
    "MIN_SAMPLE_RATE",
    "PROTOCOL_VERSION",
    "SUPPORTED_VERSIONS",
    "AckMessage",
    "AckReceived",
    "AudioFormat",
    "AudioMessage",
    "AudioReceived",
    "ClientMessage",
    "ClientMessageType",
    "CloseCode",
    "CodesMessage",
    "CodesReceived",
    "DecodedAudioMessage",
    "EndMessage",
    "EndRequested",
    "ErrorCode",
    "ErrorMessage",
    "Event",
    "FlushMessage",
    "FlushRequested",
    "FlushedMessage",
    "HintMessage",
    "LevelInfo",
    "LevelKind",
    "ModelCard",
    "ModelCatalog",
    "ModelLimits",
    "Outputs",
    "PingMessage",
    "PingReceived",
    "PongMessage",
    "ProtocolError",
    "ProtocolViolation",
    "ReadyMessage",
    "ResolvedOutputs",
    "Resume",
    "ServerMessage",
    "ServerMessageType",
    "SessionMode",
    "SessionProtocol",
    "SessionState",
    "StartMessage",
    "StartRequested",
    "StatsMessage",
    "Timing",
    "TokenFrame",
    "TokensMessage",
    "encode_client_message",
    "encode_server_message",
    "encode_tokens",
    "parse_client_message",
    "parse_server_message",
    "resolve_outputs",
    "validate_start",
]

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS: tuple[int, ...] = (1,)
DEFAULT_MAX_MESSAGE_SIZE = 1 << 20  # 1 MiB: ~2.7 s of 48 kHz stereo f32le per audio message
MIN_SAMPLE_RATE = 8_000
MAX_SAMPLE_RATE = 48_000
MAX_CHANNELS = 8
MAX_CLIENT_NAME_CHARS = 200
MAX_TOKEN_CHARS = 4096  # auth and resume tokens
MAX_MODEL_NAME_CHARS = 200
MAX_CODE = 2**32 - 1  # codes are unsigned 32-bit on the wire (msgpack uint32 at most)
MAX_INDEX = 2**63 - 1  # frame indices, seq numbers, acks
MAX_FRAMES_PER_MESSAGE = 1 << 16
# f32le samples: nominal range -1..1; beyond +-100 (40 dB over full scale) the audio is not
# audio (integer samples sent as floats, garbage): the models' latents leave float16's range
# (the `default` codec's from about x1000) and at ~3e38 turn NaN.
MAX_F32_SAMPLE = 100.0


# --------------------------------------------------------------------------------------------
# Enums


class ClientMessageType(str, Enum):
    """The ``type`` of a message sent by a client."""

    START = "start"
    AUDIO = "audio"
    CODES = "codes"
    FLUSH = "flush"
    END = "end"
    PING = "ping"
    ACK = "ack"


class ServerMessageType(str, Enum):
    """The ``type`` of a message sent by the server."""

    READY = "ready"
    TOKENS = "tokens"
    AUDIO = "audio"
    FLUSHED = "flushed"
    STATS = "stats"
    HINT = "hint"
    PONG = "pong"
    ERROR = "error"


class SessionMode(str, Enum):
    """What a session does: audio -> tokens (``encode``) or codes -> audio (``decode``)."""

    ENCODE = "encode"
    DECODE = "decode"


class AudioFormat(str, Enum):
    """PCM sample encodings accepted on the wire; always interleaved and little-endian."""

    S16LE = "s16le"
    F32LE = "f32le"

    @property
    def sample_width(self) -> int:
        """Bytes per sample of one channel: 2 for ``s16le``, 4 for ``f32le``."""
        return 2 if self is AudioFormat.S16LE else 4


class LevelKind(str, Enum):
    """What an RVQ level carries: mostly content (``semantic``) or mostly sound (``acoustic``)."""

    SEMANTIC = "semantic"
    ACOUSTIC = "acoustic"


class CloseCode(IntEnum):
    """WebSocket close codes used by the server (RFC 6455 section 7.4, plus 4000-4999 app codes).

    Application codes are ``4000 + the HTTP status of the same meaning`` (4401, 4403, ...).
    """

    NORMAL = 1000
    GOING_AWAY = 1001
    UNSUPPORTED_DATA = 1003
    INVALID_PAYLOAD = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    TRY_AGAIN_LATER = 1013
    UNAUTHORIZED = 4401
    FORBIDDEN = 4403
    UNKNOWN_MODEL = 4404
    IDLE_TIMEOUT = 4408
    RESUME_FAILED = 4410
    BAD_VERSION = 4426


class ErrorCode(str, Enum):
    """The ``code`` of an ``error`` message; :attr:`close_code` is used when it is fatal."""

    BAD_MESSAGE = "bad_message"
    UNKNOWN_TYPE = "unknown_type"
    BAD_VERSION = "bad_version"
    BAD_FIELD = "bad_field"
    UNKNOWN_MODEL = "unknown_model"
    BAD_AUDIO = "bad_audio"
    OUT_OF_ORDER = "out_of_order"
    TOO_BIG = "too_big"
    TOO_MANY_SESSIONS = "too_many_sessions"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN_ORIGIN = "forbidden_origin"
    OVERLOADED = "overloaded"
    IDLE_TIMEOUT = "idle_timeout"
    RESUME_FAILED = "resume_failed"
    SLOW_CONSUMER = "slow_consumer"
    INTERNAL = "internal"

    @property
    def close_code(self) -> CloseCode:
        """The WebSocket close code the server uses after a fatal error of this code."""
        return _CLOSE_CODES[self]


_CLOSE_CODES: Mapping[ErrorCode, CloseCode] = {
    ErrorCode.BAD_MESSAGE: CloseCode.INVALID_PAYLOAD,
    # Never fatal in version 1 (the message is dropped); reserved should a server escalate.
    ErrorCode.UNKNOWN_TYPE: CloseCode.UNSUPPORTED_DATA,
    ErrorCode.BAD_VERSION: CloseCode.BAD_VERSION,
    ErrorCode.BAD_FIELD: CloseCode.INVALID_PAYLOAD,
    ErrorCode.UNKNOWN_MODEL: CloseCode.UNKNOWN_MODEL,
    ErrorCode.BAD_AUDIO: CloseCode.INVALID_PAYLOAD,
    ErrorCode.OUT_OF_ORDER: CloseCode.POLICY_VIOLATION,
    ErrorCode.TOO_BIG: CloseCode.MESSAGE_TOO_BIG,
    ErrorCode.TOO_MANY_SESSIONS: CloseCode.TRY_AGAIN_LATER,
    ErrorCode.UNAUTHORIZED: CloseCode.UNAUTHORIZED,
    ErrorCode.FORBIDDEN_ORIGIN: CloseCode.FORBIDDEN,
    ErrorCode.OVERLOADED: CloseCode.TRY_AGAIN_LATER,
    ErrorCode.IDLE_TIMEOUT: CloseCode.IDLE_TIMEOUT,
    ErrorCode.RESUME_FAILED: CloseCode.RESUME_FAILED,
    ErrorCode.SLOW_CONSUMER: CloseCode.POLICY_VIOLATION,
    ErrorCode.INTERNAL: CloseCode.INTERNAL_ERROR,
}


# --------------------------------------------------------------------------------------------
# Field validation: every failure is a ProtocolError(BAD_FIELD) naming the field and the range.

_REQUIRED: Any = object()  # default of a required field
_ABSENT: Any = object()  # an optional field that is absent or nil
_NUMBER = (int, float)


def _describe(value: Any) -> str:
    """A short, safe rendering of a received value for an error message."""
    if isinstance(value, (list, dict, bytes)):
        # No repr: a container may be nested ~1000 deep, past the recursion limit.
        return f"{type(value).__name__} of length {len(value)}"
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{text} ({type(value).__name__})"


class _Reader:
    """Reads typed fields from one received map; ``where`` prefixes field names in errors.

    For an optional field (one given a ``default``) nil is the same as absent.
    """

    __slots__ = ("_d", "_where", "_fatal")

    def __init__(self, d: Mapping[Any, Any], where: str, *, fatal: bool = True) -> None:
        self._d = d
        self._where = where
        self._fatal = fatal

    def fail(self, key: str, allowed: str, value: Any = _ABSENT) -> NoReturn:
        if value is _ABSENT:
            got = "it is nil, which counts as missing" if key in self._d else "it is missing"
        else:
            got = f"got {_describe(value)}"
        raise ProtocolError(
            ErrorCode.BAD_FIELD, f"{self._where}.{key} must be {allowed}; {got}", fatal=self._fatal
        )

    def _value(self, key: str, default: Any, allowed: str) -> Any:
        """The value of ``key``, or _ABSENT when it is absent/nil and optional."""
        v = self._d.get(key)
        if v is not None:
            return v
        if default is _REQUIRED:
            self.fail(key, allowed)  # nil counts as missing
        return _ABSENT

    def integer(self, key: str, lo: int, hi: int, default: Any = _REQUIRED) -> Any:
        allowed = f"an integer in [{lo}, {hi}]"
        v = self._value(key, default, allowed)
        if v is _ABSENT:
            return default
        # msgpack keeps bool and int apart, but Python's bool is an int: refuse True for 1.
        if type(v) is not int or not lo <= v <= hi:
            self.fail(key, allowed, v)
        return v

    def integer_or_none(self, key: str, lo: int, hi: int) -> int | None:
        """An integer in [lo, hi], or None when absent or nil."""
        return self.integer(key, lo, hi, None)

    def number(self, key: str, default: Any = _REQUIRED) -> Any:
        allowed = "a finite number"
        v = self._value(key, default, allowed)
        if v is _ABSENT:
            return default
        if type(v) not in _NUMBER or not math.isfinite(v):
            self.fail(key, allowed, v)
        return v

    def boolean(self, key: str, default: Any = _REQUIRED) -> Any:
        v = self._value(key, default, "true or false")
        if v is _ABSENT:
            return default
        if type(v) is not bool:
            self.fail(key, "true or false", v)
        return v

    def string(self, key: str, max_chars: int, default: Any = _REQUIRED, min_chars: int = 0) -> Any:
        allowed = f"a string of {min_chars} to {max_chars} characters"
        v = self._value(key, default, allowed)
        if v is _ABSENT:
            return default
        if type(v) is not str or not min_chars <= len(v) <= max_chars:
            self.fail(key, allowed, v)
        return v

    def binary(self, key: str, default: Any = _REQUIRED) -> Any:
        v = self._value(key, default, "binary (msgpack bin)")
        if v is _ABSENT:
            return default
        if type(v) is not bytes:
            self.fail(key, "binary (msgpack bin)", v)
        return v

    def enum(self, key: str, enum: type[Any], default: Any = _REQUIRED) -> Any:
        allowed = "one of " + ", ".join(repr(m.value) for m in enum)
        v = self._value(key, default, allowed)
        if v is _ABSENT:
            return default
        try:
            return enum(v)
        except (ValueError, TypeError):
            self.fail(key, allowed, v)

    def mapping(self, key: str, default: Any = _REQUIRED) -> Any:
        v = self._value(key, default, "a map")
        if v is _ABSENT:
            return default
        if type(v) is not dict:
            self.fail(key, "a map", v)
        return v

    def array(self, key: str, default: Any = _REQUIRED) -> Any:
        v = self._value(key, default, "an array")
        if v is _ABSENT:
            return default
        if type(v) is not list:
            self.fail(key, "an array", v)
        return v

    def sub(self, key: str, default: Any = _REQUIRED) -> _Reader | None:
        """A reader for the map under ``key`` (None when optional and absent)."""
        m = self.mapping(key, default)
        return None if m is None else _Reader(m, f"{self._where}.{key}", fatal=self._fatal)


def _int_list(r: _Reader, key: str, values: Any, lo: int, hi: int) -> tuple[int, ...]:
    """Checks that ``values`` is an array of integers in [lo, hi] and returns it as a tuple."""
    if type(values) is not list:
        r.fail(key, f"an array of integers in [{lo}, {hi}]", values)
    for v in values:
        if type(v) is not int or not lo <= v <= hi:
            r.fail(key, f"an array of integers in [{lo}, {hi}]", v)
    return tuple(values)


# --------------------------------------------------------------------------------------------
# Client messages


@dataclass(frozen=True, slots=True)
class Outputs:
    """What an encode session returns per frame.

    ``codes``: False = no codes, True = all levels, n = the first n levels (1 <= n <= model max).
    ``tokens``: the model's own tokens, whatever they are: every level of codes for a codec, the
    unit for a units model (what a client asks for when it does not know the model's kind). With
    ``tokens``, ``codes`` and ``units`` are ignored: a client sends ``codes: true`` beside it for
    servers older than ``tokens``, which ignore the key. An encode ``start`` without ``outputs``
    asks for exactly this.
    """

    codes: bool | int = False
    units: bool = False
    latents: bool = False
    tokens: bool = False

    @property
    def any(self) -> bool:
        """Whether at least one output is requested."""
        return self.codes is not False or self.units or self.latents or self.tokens

    def to_wire(self) -> dict[str, Any]:
        if self.tokens:  # codes: true is what a server older than `tokens` acts on
            return {"tokens": True, "codes": True, "units": False, "latents": self.latents}
        return {"codes": self.codes, "units": self.units, "latents": self.latents}

    @classmethod
    def from_wire(cls, r: _Reader) -> Outputs:
        codes = r._d.get("codes")
        if codes is None:
            codes = False
        elif type(codes) is not bool and (type(codes) is not int or codes < 1):
            r.fail("codes", "true, false or an integer >= 1 (a number of levels)", codes)
        units, latents = r.boolean("units", False), r.boolean("latents", False)
        if r.boolean("tokens", False):  # the model's own tokens: codes and units are ignored
            return cls(tokens=True, latents=latents)
        return cls(codes=codes, units=units, latents=latents)


@dataclass(frozen=True, slots=True)
class Resume:
    """A request to resume an earlier session; ``last_frame`` = -1 when no frame was received."""

    token: str
    last_frame: int

    def to_wire(self) -> dict[str, Any]:
        return {"token": self.token, "last_frame": self.last_frame}


@dataclass(frozen=True, slots=True)
class StartMessage:
    """``start``: opens a session; the first message of every connection.

    In an encode session ``sample_rate``/``format``/``channels`` describe the audio the client
    sends; in a decode session they describe the audio it wants back. ``ignored_fields`` lists
    keys the server did not know (filled by the parser, never sent).
    """

    model: str
    sample_rate: int
    format: AudioFormat
    channels: int = 1
    mode: SessionMode = SessionMode.ENCODE
    outputs: Outputs = Outputs()
    version: int = PROTOCOL_VERSION
    auth: str | None = None
    resume: Resume | None = None
    frames_per_message: int | None = None
    client: str | None = None
    ignored_fields: tuple[str, ...] = ()
    type: Literal[ClientMessageType.START] = field(
        default=ClientMessageType.START, init=False, repr=False
    )

    def to_wire(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "type": "start",
            "version": self.version,
            "mode": self.mode.value,
            "model": self.model,
            "sample_rate": self.sample_rate,
            "format": self.format.value,
            "channels": self.channels,
        }
        if self.mode is SessionMode.ENCODE:
            d["outputs"] = self.outputs.to_wire()
        for key in ("auth", "frames_per_message", "client"):
            value = getattr(self, key)
            if value is not None:
                d[key] = value
        if self.resume is not None:
            d["resume"] = self.resume.to_wire()
        return d

    @classmethod
    def from_wire(cls, d: Mapping[Any, Any]) -> StartMessage:
        # The version is checked first so that a client of another version is told exactly
        # that, not about a field it spells differently.
        version = d.get("version")
        if type(version) is not int or version not in SUPPORTED_VERSIONS:
            supported = ", ".join(map(str, SUPPORTED_VERSIONS))
            if version is None:
                got = "start.version is missing"
            else:
                got = f"protocol version {_describe(version)} is not supported"
            raise ProtocolError(
                ErrorCode.BAD_VERSION,
                f"{got}; this server speaks protocol version {supported}; "
                "use a client for that version",
            )
        r = _Reader(d, "start")
        mode = r.enum("mode", SessionMode, SessionMode.ENCODE)
        model = r.string("model", MAX_MODEL_NAME_CHARS, min_chars=1)
        sample_rate = r.integer("sample_rate", MIN_SAMPLE_RATE, MAX_SAMPLE_RATE)
        fmt = r.enum("format", AudioFormat)
        channels = r.integer("channels", 1, MAX_CHANNELS, 1)
        if mode is SessionMode.ENCODE:
            sub = r.sub("outputs", None)
            outputs = Outputs(tokens=True) if sub is None else Outputs.from_wire(sub)
            if not outputs.any:
                r.fail(
                    "outputs",
                    "a map requesting at least one of tokens, codes, units, latents",
                    d["outputs"],
                )
        else:
            if d.get("outputs") is not None:
                r.fail("outputs", "absent in a decode session", d["outputs"])
            outputs = Outputs()
        auth = r.string("auth", MAX_TOKEN_CHARS, None, min_chars=1)
        resume = None
        rr = r.sub("resume", None)
        if rr is not None:
            resume = Resume(
                rr.string("token", MAX_TOKEN_CHARS, min_chars=1),
                rr.integer("last_frame", -1, MAX_INDEX),
            )
        frames_per_message = r.integer_or_none("frames_per_message", 1, MAX_FRAMES_PER_MESSAGE)
        client = r.string("client", MAX_CLIENT_NAME_CHARS, None)
        ignored = tuple(sorted(str(k) for k in d if k not in _START_KEYS))
        return cls(
            model=model,
            sample_rate=sample_rate,
            format=fmt,
            channels=channels,
            mode=mode,
            outputs=outputs,
            version=version,
            auth=auth,
            resume=resume,
            frames_per_message=frames_per_message,
            client=client,
            ignored_fields=ignored,
        )


_START_KEYS = frozenset(
    ["type", "version", "mode", "model", "sample_rate", "format", "channels", "outputs", "auth",
     "resume", "frames_per_message", "client"]
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class AudioMessage:
    """``audio`` (client): any number of bytes of interleaved PCM in the session's format.

    ``seq``, when present, must equal the 0-based count of earlier ``audio`` messages.
    """

    data: bytes
    seq: int | None = None
    type: Literal[ClientMessageType.AUDIO] = field(
        default=ClientMessageType.AUDIO, init=False, repr=False
    )

    def to_wire(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": "audio", "data": self.data}
        if self.seq is not None:
            d["seq"] = self.seq
        return d

    @classmethod
    def from_wire(cls, d: Mapping[Any, Any]) -> AudioMessage:
        r = _Reader(d, "audio")
        return cls(data=r.binary("data"), seq=r.integer_or_none("seq", 0, MAX_INDEX))


@dataclass(frozen=True, slots=True)
class CodesMessage:
    """``codes`` (client, decode sessions): ``frames[i]`` holds one code per level, level 0 first."""

    frames: tuple[tuple[int, ...], ...]
    type: Literal[ClientMessageType.CODES] = field(
        default=ClientMessageType.CODES, init=False, repr=False
    )

    def to_wire(self) -> dict[str, Any]:
        return {"type": "codes", "frames": [list(f) for f in self.frames]}

    @classmethod
    def from_wire(cls, d: Mapping[Any, Any]) -> CodesMessage:
        r = _Reader(d, "codes")
        raw = r.array("frames")
        frames = tuple(_int_list(r, "frames", f, 0, MAX_CODE) for f in raw)
        if frames:
            n = len(frames[0])
            for f in frames:
                if len(f) != n or n == 0:
                    r.fail(
                        "frames",
                        "an array of non-empty frames that all have the same number of levels",
                        len(f),
                    )
        return cls(frames=frames)


@dataclass(frozen=True, slots=True)
class FlushMessage:
    """``flush``: finish all audio (or codes) received so far; answered by ``flushed``."""

    type: Literal[ClientMessageType.FLUSH] = field(
        default=ClientMessageType.FLUSH, init=False, repr=False
    )

    def to_wire(self) -> dict[str, Any]:
        return {"type": "flush"}

    @classmethod
    def from_wire(cls, d: Mapping[Any, Any]) -> FlushMessage:
        return cls()


@dataclass(frozen=True, slots=True)
class EndMessage:
    """``end``: flush, then the server closes the connection normally (1000)."""

    type: Literal[ClientMessageType.END] = field(
        default=ClientMessageType.END, init=False, repr=False
    )

    def to_wire(self) -> dict[str, Any]:
        return {"type": "end"}

    @classmethod
    def from_wire(cls, d: Mapping[Any, Any]) -> EndMessage:
        return cls()


@dataclass(frozen=True, slots=True)
class PingMessage:
    """``ping``: ``t`` is the client's clock in seconds, echoed back in ``pong``."""

    t: float
    type: Literal[ClientMessageType.PING] = field(
        default=ClientMessageType.PING, init=False, repr=False
    )

    def to_wire(self) -> dict[str, Any]:
        return {"type": "ping", "t": self.t}

    @classmethod
    def from_wire(cls, d: Mapping[Any, Any]) -> PingMessage:
        return cls(t=_Reader(d, "ping", fatal=False).number("t"))


@dataclass(frozen=True, slots=True)
class AckMessage:
    """``ack``: the client has processed every frame up to and including ``frame``."""

    frame: int
    type: Literal[ClientMessageType.ACK] = field(
        default=ClientMessageType.ACK, init=False, repr=False
    )

    def to_wire(self) -> dict[str, Any]:
        return {"type": "ack", "frame": self.frame}

    @classmethod
    def from_wire(cls, d: Mapping[Any, Any]) -> AckMessage:
        return cls(frame=_Reader(d, "ack", fatal=False).integer("frame", 0, MAX_INDEX))


ClientMessage = (
    StartMessage
    | AudioMessage
    | CodesMessage
    | FlushMessage
    | EndMessage
    | PingMessage
    | AckMessage
)

_CLIENT_PARSERS: Mapping[str, Callable[[Mapping[Any, Any]], ClientMessage]] = {
    ClientMessageType.START.value: StartMessage.from_wire,
    ClientMessageType.AUDIO.value: AudioMessage.from_wire,
    ClientMessageType.CODES.value: CodesMessage.from_wire,
    ClientMessageType.FLUSH.value: FlushMessage.from_wire,
    ClientMessageType.END.value: EndMessage.from_wire,
    ClientMessageType.PING.value: PingMessage.from_wire,
    ClientMessageType.ACK.value: AckMessage.from_wire,
}


# --------------------------------------------------------------------------------------------
# Server messages


@dataclass(frozen=True, slots=True)
class LevelInfo:
    """One RVQ level of a model: codes are integers in ``[0, cardinality)``."""

    index: int
    cardinality: int
    kind: LevelKind

    def to_wire(self) -> dict[str, Any]:
        return {"index": self.index, "cardinality": self.cardinality, "kind": self.kind.value}


@dataclass(frozen=True, slots=True)
class ModelCard:
    """What a client needs to know about the model serving its session.

    ``frame_size`` is in samples at the model's ``sample_rate``; ``frame_rate`` =
    ``sample_rate / frame_size`` in Hz; ``delay_frames``/``delay_ms`` is the algorithmic delay
    (lookahead) between the end of a frame's audio and the moment it can be computed.
    """

    name: str
    sample_rate: int
    frame_size: int
    frame_rate: float
    levels: tuple[LevelInfo, ...] = ()
    semantic_level: int | None = None
    latent_dim: int | None = None
    units: int | None = None
    delay_frames: int = 0
    delay_ms: float = 0.0
    formats: tuple[AudioFormat, ...] = (AudioFormat.S16LE, AudioFormat.F32LE)

    def to_wire(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "sample_rate": self.sample_rate,
            "frame_size": self.frame_size,
            "frame_rate": float(self.frame_rate),
            "levels": [lv.to_wire() for lv in self.levels],
            "semantic_level": self.semantic_level,
            "latent_dim": self.latent_dim,
            "units": self.units,
            "delay_frames": self.delay_frames,
            "delay_ms": float(self.delay_ms),
            "formats": [f.value for f in self.formats],
        }

    @classmethod
    def from_wire(cls, r: _Reader) -> ModelCard:
        levels = []
        for i, raw in enumerate(r.array("levels")):
            if type(raw) is not dict:
                r.fail(f"levels[{i}]", "a map", raw)
            lr = _Reader(raw, f"{r._where}.levels[{i}]")
            levels.append(
                LevelInfo(
                    lr.integer("index", 0, MAX_INDEX),
                    lr.integer("cardinality", 1, MAX_CODE + 1),
                    lr.enum("kind", LevelKind),
                )
            )
        formats = []
        for f in r.array("formats"):
            try:
                formats.append(AudioFormat(f))
            except ValueError:
                continue  # a newer server may accept formats this client does not know
        return cls(
            name=r.string("name", MAX_MODEL_NAME_CHARS),
            sample_rate=r.integer("sample_rate", 1, MAX_INDEX),
            frame_size=r.integer("frame_size", 1, MAX_INDEX),
            frame_rate=float(r.number("frame_rate")),
            levels=tuple(levels),
            semantic_level=r.integer_or_none("semantic_level", 0, MAX_INDEX),
            latent_dim=r.integer_or_none("latent_dim", 1, MAX_INDEX),
            units=r.integer_or_none("units", 1, MAX_CODE + 1),
            delay_frames=r.integer("delay_frames", 0, MAX_INDEX),
            delay_ms=float(r.number("delay_ms")),
            formats=tuple(formats),
        )


@dataclass(frozen=True, slots=True)
class ResolvedOutputs:
    """The outputs a session actually returns; ``codes`` is a level count (0 = no codes)."""

    codes: int = 0
    units: bool = False
    latents: bool = False

    def to_wire(self) -> dict[str, Any]:
        return {"codes": self.codes, "units": self.units, "latents": self.latents}


@dataclass(frozen=True, slots=True)
class ReadyMessage:
    """``ready``: the session is open; the answer to a valid ``start``."""

    session: str
    resume_token: str
    model: ModelCard
    input_sample_rate: int
    send_hint_ms: int
    mode: SessionMode = SessionMode.ENCODE
    outputs: ResolvedOutputs = ResolvedOutputs()
    version: int = PROTOCOL_VERSION
    ignored_fields: tuple[str, ...] = ()
    resumed: bool = False
    resume_sample: int = 0  # on resume: input samples (per channel) the server already has
    type: Literal[ServerMessageType.READY] = field(
        default=ServerMessageType.READY, init=False, repr=False
    )

    def to_wire(self) -> dict[str, Any]:
        return {
            "type": "ready",
            "version": self.version,
            "session": self.session,
            "resume_token": self.resume_token,
            "mode": self.mode.value,
            "model": self.model.to_wire(),
            "outputs": self.outputs.to_wire(),
            "input_sample_rate": self.input_sample_rate,
            "send_hint_ms": self.send_hint_ms,
            "ignored_fields": list(self.ignored_fields),
            "resumed": self.resumed,
            "resume_sample": self.resume_sample,
        }

    @classmethod
    def from_wire(cls, d: Mapping[Any, Any]) -> ReadyMessage:
        r = _Reader(d, "ready")
        model = r.sub("model")
        outputs = r.sub("outputs")
        assert model is not None and outputs is not None
        ignored = r.array("ignored_fields", [])
        return cls(
            version=r.integer("version", 0, MAX_INDEX),
            session=r.string("session", MAX_TOKEN_CHARS),
            resume_token=r.string("resume_token", MAX_TOKEN_CHARS),
            mode=r.enum("mode", SessionMode, SessionMode.ENCODE),
            model=ModelCard.from_wire(model),
            outputs=ResolvedOutputs(
                codes=outputs.integer("codes", 0, MAX_CODE, 0),
                units=outputs.boolean("units", False),
                latents=outputs.boolean("latents", False),
            ),
            input_sample_rate=r.integer("input_sample_rate", 1, MAX_INDEX),
            send_hint_ms=r.integer("send_hint_ms", 1, MAX_INDEX),
            ignored_fields=tuple(str(k) for k in ignored),
            resumed=r.boolean("resumed", False),
            resume_sample=r.integer("resume_sample", 0, MAX_INDEX, 0),
        )


@dataclass(frozen=True, slots=True)
class Timing:
    """Server monotonic-clock timestamps (seconds) of one ``tokens``/``audio`` message.

    ``audio_complete``: the input that completed the newest frame of the message was received
    (parsed); ``compute_start``/``compute_end``: the model step that produced it began / its
    results were on the host; ``sent``: the message was encoded for sending.
    """

    audio_complete: float
    compute_start: float
    compute_end: float
    sent: float

    def to_wire(self) -> dict[str, Any]:
        return {
            "audio_complete": float(self.audio_complete),
            "compute_start": float(self.compute_start),
            "compute_end": float(self.compute_end),
            "sent": float(self.sent),
        }

    @classmethod
    def from_wire(cls, r: _Reader) -> Timing:
        return cls(
            *(
                float(r.number(k))
                for k in ("audio_complete", "compute_start", "compute_end", "sent")
            )
        )


@dataclass(frozen=True, slots=True)
class TokenFrame:
    """The tokens of one frame; outputs that were not requested are None.

    ``latent`` is ``latent_dim`` float16 values, little-endian (``2 * latent_dim`` bytes).
    """

    index: int
    t: float
    codes: tuple[int, ...] | None = None
    unit: int | None = None
    latent: bytes | None = None

    def to_wire(self) -> dict[str, Any]:
        d: dict[str, Any] = {"index": self.index, "t": float(self.t)}
        if self.codes is not None:
            d["codes"] = list(self.codes)
        if self.unit is not None:
            d["unit"] = self.unit
        if self.latent is not None:
            d["latent"] = self.latent
        return d


@dataclass(frozen=True, slots=True)
class TokensMessage:
    """``tokens``: one or more consecutive frames, oldest first.

    The server builds these with :func:`encode_tokens`; clients read them with
    :func:`parse_server_message`.
    """

    frames: tuple[TokenFrame, ...]
    timing: Timing
    type: Literal[ServerMessageType.TOKENS] = field(
        default=ServerMessageType.TOKENS, init=False, repr=False
    )

    def to_wire(self) -> dict[str, Any]:
        return {
            "type": "tokens",
            "frames": [f.to_wire() for f in self.frames],
            "timing": self.timing.to_wire(),
        }

    @classmethod
    def from_wire(cls, d: Mapping[Any, Any]) -> TokensMessage:
        r = _Reader(d, "tokens")
        frames = []
        for i, raw in enumerate(r.array("frames")):
            if type(raw) is not dict:
                r.fail(f"frames[{i}]", "a map", raw)
            fr = _Reader(raw, f"tokens.frames[{i}]")
            codes = raw.get("codes")
            frames.append(
                TokenFrame(
                    index=fr.integer("index", 0, MAX_INDEX),
                    t=float(fr.number("t")),
                    codes=None if codes is None else _int_list(fr, "codes", codes, 0, MAX_CODE),
                    unit=fr.integer_or_none("unit", 0, MAX_CODE),
                    latent=fr.binary("latent", None),
                )
            )
        timing = r.sub("timing")
        assert timing is not None
        return cls(frames=tuple(frames), timing=Timing.from_wire(timing))


@dataclass(frozen=True, slots=True)
class DecodedAudioMessage:
    """``audio`` (server, decode sessions): PCM for the stream from frame ``index`` onward."""

    data: bytes
    index: int
    sample_rate: int
    timing: Timing | None = None
    type: Literal[ServerMessageType.AUDIO] = field(
        default=ServerMessageType.AUDIO, init=False, repr=False
    )

    def to_wire(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "type": "audio",
            "data": self.data,
            "index": self.index,
            "sample_rate": self.sample_rate,
        }
        if self.timing is not None:
            d["timing"] = self.timing.to_wire()
        return d

    @classmethod
    def from_wire(cls, d: Mapping[Any, Any]) -> DecodedAudioMessage:
        r = _Reader(d, "audio")
        timing = r.sub("timing", None)
        return cls(
            data=r.binary("data"),
            index=r.integer("index", 0, MAX_INDEX),
            sample_rate=r.integer("sample_rate", 1, MAX_INDEX),
            timing=None if timing is None else Timing.from_wire(timing),
        )


@dataclass(frozen=True, slots=True)
class FlushedMessage:
    """``flushed``: every frame up to ``last_frame`` has been sent (None: no frame yet)."""

    last_frame: int | None
    type: Literal[ServerMessageType.FLUSHED] = field(
        default=ServerMessageType.FLUSHED, init=False, repr=False
    )

    def to_wire(self) -> dict[str, Any]:
        return {"type": "flushed", "last_frame": self.last_frame}

    @classmethod
    def from_wire(cls, d: Mapping[Any, Any]) -> FlushedMessage:
        r = _Reader(d, "flushed")
        if "last_frame" not in d:
            r.fail("last_frame", "an integer >= 0 or nil")
        return cls(last_frame=r.integer_or_none("last_frame", 0, MAX_INDEX))


@dataclass(frozen=True, slots=True)
class StatsMessage:
    """``stats``: periodic per-session statistics, name -> number (see PROTOCOL.md for names)."""

    values: Mapping[str, float]
    type: Literal[ServerMessageType.STATS] = field(
        default=ServerMessageType.STATS, init=False, repr=False
    )

    def to_wire(self) -> dict[str, Any]:
        return {"type": "stats", "values": {k: float(v) for k, v in self.values.items()}}

    @classmethod
    def from_wire(cls, d: Mapping[Any, Any]) -> StatsMessage:
        r = _Reader(d, "stats")
        raw = r.mapping("values")
        values = {}
        for k, v in raw.items():
            if type(k) is not str or type(v) not in _NUMBER:
                r.fail("values", "a map of string -> number", {k: v})
            values[k] = float(v)
        return cls(values=values)


@dataclass(frozen=True, slots=True)
class HintMessage:
    """``hint``: the server now recommends sending ``send_ms`` milliseconds per message."""

    send_ms: int
    type: Literal[ServerMessageType.HINT] = field(
        default=ServerMessageType.HINT, init=False, repr=False
    )

    def to_wire(self) -> dict[str, Any]:
        return {"type": "hint", "send_ms": self.send_ms}

    @classmethod
    def from_wire(cls, d: Mapping[Any, Any]) -> HintMessage:
        return cls(send_ms=_Reader(d, "hint").integer("send_ms", 1, MAX_INDEX))


@dataclass(frozen=True, slots=True)
class PongMessage:
    """``pong``: ``t`` echoes the ping; ``server_t`` is the server's monotonic clock (s)."""

    t: float
    server_t: float
    type: Literal[ServerMessageType.PONG] = field(
        default=ServerMessageType.PONG, init=False, repr=False
    )

    def to_wire(self) -> dict[str, Any]:
        return {"type": "pong", "t": self.t, "server_t": float(self.server_t)}

    @classmethod
    def from_wire(cls, d: Mapping[Any, Any]) -> PongMessage:
        r = _Reader(d, "pong")
        return cls(t=r.number("t"), server_t=float(r.number("server_t")))


@dataclass(frozen=True, slots=True)
class ErrorMessage:
    """``error``: ``fatal`` means the server closes the connection right after it.

    ``code`` is a plain str when a newer server sends a code this client does not know.
    """

    code: ErrorCode | str
    message: str
    fatal: bool
    type: Literal[ServerMessageType.ERROR] = field(
        default=ServerMessageType.ERROR, init=False, repr=False
    )

    @property
    def close_code(self) -> CloseCode | None:
        """The close code that follows this error, or None when it is not fatal."""
        if not self.fatal:
            return None
        if isinstance(self.code, ErrorCode):
            return self.code.close_code
        return None

    def to_wire(self) -> dict[str, Any]:
        code = self.code.value if isinstance(self.code, ErrorCode) else self.code
        return {"type": "error", "code": code, "message": self.message, "fatal": self.fatal}

    @classmethod
    def from_wire(cls, d: Mapping[Any, Any]) -> ErrorMessage:
        r = _Reader(d, "error")
        raw = r.string("code", 200)
        try:
            code: ErrorCode | str = ErrorCode(raw)
        except ValueError:
            code = raw
        return cls(code=code, message=r.string("message", 1 << 20), fatal=r.boolean("fatal"))

    @classmethod
    def from_error(cls, error: ProtocolError) -> ErrorMessage:
        """The message that reports ``error`` to the client."""
        return cls(code=error.code, message=error.message, fatal=error.fatal)


ServerMessage = (
    ReadyMessage
    | TokensMessage
    | DecodedAudioMessage
    | FlushedMessage
    | StatsMessage
    | HintMessage
    | PongMessage
    | ErrorMessage
)

_SERVER_PARSERS: Mapping[str, Callable[[Mapping[Any, Any]], ServerMessage]] = {
    ServerMessageType.READY.value: ReadyMessage.from_wire,
    ServerMessageType.TOKENS.value: TokensMessage.from_wire,
    ServerMessageType.AUDIO.value: DecodedAudioMessage.from_wire,
    ServerMessageType.FLUSHED.value: FlushedMessage.from_wire,
    ServerMessageType.STATS.value: StatsMessage.from_wire,
    ServerMessageType.HINT.value: HintMessage.from_wire,
    ServerMessageType.PONG.value: PongMessage.from_wire,
    ServerMessageType.ERROR.value: ErrorMessage.from_wire,
}


# --------------------------------------------------------------------------------------------
# Encoding and parsing


def _msgpack_problem(exc: ValueError) -> str:
    """What msgpack's error means, in words (some of its errors have no message at all)."""
    if isinstance(exc, msgpack.ExtraData):
        return "trailing bytes after the first msgpack value (one message is one map)"
    if isinstance(exc, msgpack.FormatError):
        return "a byte that starts no msgpack value (such as 0xc1, which msgpack never uses)"
    if isinstance(exc, UnicodeDecodeError):
        return f"a string that is not valid UTF-8 ({exc.reason} at byte {exc.start})"
    text = str(exc)
    if "incomplete input" in text or "exceeds max_" in text:
        # msgpack bounds every container by the message length: one that claims more
        # elements than the message holds is truncated too.
        return "the message ends before the msgpack value does (truncated)"
    return text or type(exc).__name__


def _unpack_map(data: bytes | bytearray | memoryview) -> tuple[dict[Any, Any], str]:
    """Decodes one msgpack map with a string ``type``; returns it and its type."""
    try:
        # msgpack bounds every container by len(data), so a forged length cannot allocate more
        # than the message holds; all its decode errors (and bad UTF-8) are ValueErrors.
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except ValueError as exc:
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE, f"not a valid msgpack message: {_msgpack_problem(exc)}"
        ) from exc
    if type(obj) is not dict:
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE, f"a message must be a msgpack map; got {type(obj).__name__}"
        )
    kind = obj.get("type")
    if type(kind) is not str:
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE,
            f"a message must have a string 'type' key; got {_describe(kind)}",
        )
    return obj, kind


def parse_client_message(
    data: bytes | bytearray | memoryview | str, *, max_size: int
) -> ClientMessage:
    """Parses one WebSocket message from a client (server side).

    ``str`` stands for a text frame, which is refused. Raises :class:`ProtocolError`.
    """
    if len(data) > max_size:
        raise ProtocolError(
            ErrorCode.TOO_BIG, f"message of {len(data)} bytes exceeds the limit of {max_size} bytes"
        )
    if isinstance(data, str):
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE,
            "text frames are not accepted; send every message as a msgpack map in a binary frame",
        )
    obj, kind = _unpack_map(data)
    parser = _CLIENT_PARSERS.get(kind)
    if parser is None:
        raise ProtocolError(
            ErrorCode.UNKNOWN_TYPE,
            f"unknown message type {kind[:40]!r}; known: {', '.join(_CLIENT_PARSERS)}",
            fatal=False,
        )
    return parser(obj)


def parse_server_message(data: bytes | bytearray | memoryview) -> ServerMessage:
    """Parses one WebSocket message from the server (client side). Raises :class:`ProtocolError`.

    Clients should skip messages that raise with :attr:`ErrorCode.UNKNOWN_TYPE` (newer servers
    may add message types) and ignore unknown fields, which this parser does.
    """
    if isinstance(data, str):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "the server never sends text frames")
    obj, kind = _unpack_map(data)
    parser = _SERVER_PARSERS.get(kind)
    if parser is None:
        raise ProtocolError(
            ErrorCode.UNKNOWN_TYPE, f"unknown message type {kind[:40]!r}", fatal=False
        )
    return parser(obj)


# msgpack >= 1.0 packs bytes as bin by default; passing packer options to packb would double its
# cost per call (it builds a configured Packer), which matters on the per-step path.


def encode_client_message(msg: ClientMessage) -> bytes:
    """Encodes a client message as the payload of one binary WebSocket frame."""
    return msgpack.packb(msg.to_wire())


def encode_server_message(msg: ServerMessage) -> bytes:
    """Encodes a server message as the payload of one binary WebSocket frame."""
    return msgpack.packb(msg.to_wire())


def encode_tokens(
    index_start: int,
    codes: Sequence[Sequence[int]] | None,
    units: Sequence[int] | None,
    latents: Sequence[bytes] | None,
    timing: Timing,
    *,
    frame_rate: float,
) -> bytes:
    """Encodes a ``tokens`` message for T consecutive frames, without per-frame dataclasses.

    ``codes``: T rows of Python ints (``array.tolist()`` of ``[T, K] int``; K = requested
    levels); ``units``: T ints; ``latents``: T ``bytes`` of ``latent_dim`` float16 LE each
    (``array.astype('<f2')`` rows). Outputs not requested are None. ``t = index / frame_rate``
    is computed per frame, so it never accumulates rounding error. Equal to
    ``encode_server_message(TokensMessage(...))`` for the same frames.
    """
    given = [len(x) for x in (codes, units, latents) if x is not None]
    if not given or min(given) != max(given):
        raise ProtocolError(
            ErrorCode.INTERNAL,
            f"encode_tokens needs codes, units or latents for one frame count; got {given}",
        )
    frames: list[dict[str, Any]] = [
        {"index": i, "t": i / frame_rate} for i in range(index_start, index_start + given[0])
    ]
    if codes is not None:
        for f, c in zip(frames, codes, strict=True):
            f["codes"] = c
    if units is not None:
        for f, u in zip(frames, units, strict=True):
            f["unit"] = u
    if latents is not None:
        for f, z in zip(frames, latents, strict=True):
            f["latent"] = z
    timing_map = {
        "audio_complete": timing.audio_complete,
        "compute_start": timing.compute_start,
        "compute_end": timing.compute_end,
        "sent": timing.sent,
    }
    return msgpack.packb({"type": "tokens", "frames": frames, "timing": timing_map})


# --------------------------------------------------------------------------------------------
# Model-dependent validation (the caller supplies what it serves)


@dataclass(frozen=True, slots=True)
class ModelLimits:
    """What one served model offers, as far as validating a ``start`` needs.

    ``cardinalities[k]`` is the number of codes of RVQ level k (empty: no codes).
    """

    cardinalities: tuple[int, ...] = ()
    units: bool = False
    latents: bool = False
    decode: bool = False

    @property
    def max_levels(self) -> int:
        """How many RVQ levels the model has."""
        return len(self.cardinalities)


ModelCatalog = Mapping[str, ModelLimits]
"""Served model name -> its limits."""


def validate_start(msg: StartMessage, catalog: ModelCatalog) -> ModelLimits:
    """Checks a parsed ``start`` against the served models and returns the chosen model's limits.

    Raises :class:`ProtocolError` with ``unknown_model`` or ``bad_field``.
    """
    limits = catalog.get(msg.model)
    if limits is None:
        names = sorted(catalog)
        shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
        raise ProtocolError(
            ErrorCode.UNKNOWN_MODEL, f"unknown model {msg.model!r}; this server serves: {shown}"
        )
    if msg.mode is SessionMode.DECODE:
        if not limits.decode:
            raise ProtocolError(
                ErrorCode.BAD_FIELD, f"start.mode 'decode' is not supported by model {msg.model!r}"
            )
        return limits
    if msg.outputs.tokens and not (limits.max_levels or limits.units):
        raise ProtocolError(
            ErrorCode.BAD_FIELD,
            f"start.outputs.tokens: model {msg.model!r} has neither codes nor units; ask for "
            "latents",
        )
    codes = msg.outputs.codes
    if codes is not False:
        if limits.max_levels == 0:
            raise ProtocolError(
                ErrorCode.BAD_FIELD,
                f"start.outputs.codes must be false for model {msg.model!r}, which has no codes",
            )
        if codes is not True and not 1 <= codes <= limits.max_levels:
            raise ProtocolError(
                ErrorCode.BAD_FIELD,
                f"start.outputs.codes must be true or an integer in [1, {limits.max_levels}] "
                f"for model {msg.model!r}; got {codes}",
            )
    if msg.outputs.units and not limits.units:
        raise ProtocolError(
            ErrorCode.BAD_FIELD,
            f"start.outputs.units must be false: model {msg.model!r} has no units",
        )
    if msg.outputs.latents and not limits.latents:
        raise ProtocolError(
            ErrorCode.BAD_FIELD,
            f"start.outputs.latents must be false: model {msg.model!r} has no latents",
        )
    return limits


def resolve_outputs(outputs: Outputs, limits: ModelLimits) -> ResolvedOutputs:
    """Turns requested outputs into what ``ready`` reports (``codes: true`` -> all levels;
    ``tokens`` -> all levels of codes, or the unit of a model without codes)."""
    if outputs.tokens:
        return ResolvedOutputs(codes=limits.max_levels, units=not limits.max_levels and limits.units,
                               latents=outputs.latents)
    codes = outputs.codes
    n = limits.max_levels if codes is True else (0 if codes is False else int(codes))
    return ResolvedOutputs(codes=n, units=outputs.units, latents=outputs.latents)


# --------------------------------------------------------------------------------------------
# Session state machine


def _refuse_nonfinite(samples: np.ndarray, first_index: int) -> None:
    """Raises ``bad_audio`` if ``samples`` ([N] float32) holds NaN/Inf or a value beyond
    ±:data:`MAX_F32_SAMPLE`; ``first_index`` is the stream index of ``samples[0]``
    (interleaved, counting every channel)."""
    ok = np.abs(samples) <= MAX_F32_SAMPLE  # False for NaN too
    if ok.all():
        return
    bad = int(np.argmin(ok))
    value = samples[bad]
    where = f"audio sample {first_index + bad} (interleaved, counting every channel)"
    if not np.isfinite(value):
        raise ProtocolError(ErrorCode.BAD_AUDIO, f"{where} is {value}; f32le audio must be finite")
    raise ProtocolError(
        ErrorCode.BAD_AUDIO,
        f"{where} is {float(value):g}; f32le samples must be within ±{MAX_F32_SAMPLE:g} "
        "(nominal range -1..1; send integer samples as s16le)",
    )


class SessionState(Enum):
    """Where a session is in its life (see the diagram in PROTOCOL.md)."""

    AWAIT_START = "await_start"
    STREAMING = "streaming"
    ENDED = "ended"  # `end` received: the server drains, sends `flushed`, closes with 1000
    FAILED = "failed"  # a fatal violation: the server sends `error` and closes


@dataclass(frozen=True, slots=True)
class StartRequested:
    """A valid ``start`` arrived; the server answers ``ready`` (or a fatal error)."""

    message: StartMessage


@dataclass(frozen=True, slots=True)
class AudioReceived:
    """PCM bytes for an encode session, in the session's format; may end mid-sample."""

    data: bytes
    seq: int | None = None


@dataclass(frozen=True, slots=True)
class CodesReceived:
    """Frames of codes for a decode session, ``[T][K]`` ints, already range-checked."""

    frames: tuple[tuple[int, ...], ...]


@dataclass(frozen=True, slots=True)
class FlushRequested:
    """The client asked for everything so far; the server answers ``flushed``."""


@dataclass(frozen=True, slots=True)
class EndRequested:
    """The client is done; the server flushes, sends ``flushed`` and closes with 1000."""


@dataclass(frozen=True, slots=True)
class PingReceived:
    """The server answers ``pong`` with this ``t`` and its own monotonic time."""

    t: float


@dataclass(frozen=True, slots=True)
class AckReceived:
    """The client has processed frames up to and including ``frame``."""

    frame: int


@dataclass(frozen=True, slots=True)
class ProtocolViolation:
    """Bad input: the server sends :meth:`to_message`, then closes with ``close_code`` if fatal."""

    code: ErrorCode
    message: str
    fatal: bool
    cause: BaseException | None = field(default=None, compare=False, repr=False)

    @property
    def close_code(self) -> CloseCode | None:
        """The WebSocket close code to use, or None when the connection stays open."""
        return self.code.close_code if self.fatal else None

    def to_message(self) -> ErrorMessage:
        """The ``error`` message that reports this violation."""
        return ErrorMessage(code=self.code, message=self.message, fatal=self.fatal)


Event = (
    StartRequested
    | AudioReceived
    | CodesReceived
    | FlushRequested
    | EndRequested
    | PingReceived
    | AckReceived
    | ProtocolViolation
)


class SessionProtocol:
    """The pure state machine of one connection, server side.

    Feed every received WebSocket message to :meth:`receive` (``bytes`` for binary frames,
    ``str`` for text frames) and act on the events. It never raises: bad input becomes a
    :class:`ProtocolViolation`. After a fatal one it is in ``FAILED`` and ignores all input.

    ``catalog`` (optional) lets it check ``start`` against the served models and ``codes``
    against their cardinalities; ``check_finite`` refuses NaN/Inf and samples beyond
    ±:data:`MAX_F32_SAMPLE` in ``f32le`` audio.
    """

    def __init__(
        self,
        *,
        max_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        catalog: ModelCatalog | None = None,
        check_finite: bool = True,
    ) -> None:
        self.max_size = max_size
        self.catalog = catalog
        self.check_finite = check_finite
        self.state = SessionState.AWAIT_START
        self.start: StartMessage | None = None
        self.limits: ModelLimits | None = None
        self.audio_bytes = 0  # total PCM bytes received
        self.audio_messages = 0
        self.decode_levels: int | None = None  # fixed by the first `codes` frame
        self.failure: ProtocolViolation | None = None  # the fatal violation, once FAILED
        self._carry = b""  # bytes of an f32 sample split across two audio messages

    @property
    def close_code(self) -> CloseCode | None:
        """The close code the server should use now, if the connection is to close."""
        if self.failure is not None:
            return self.failure.close_code
        if self.state is SessionState.ENDED:
            return CloseCode.NORMAL
        return None

    def fail(self, code: ErrorCode, message: str) -> ProtocolViolation:
        """Ends the session with a fatal error found outside this module (auth, overload, ...)."""
        return self._violation(code, message, True, None)

    def receive(self, data: bytes | bytearray | memoryview | str) -> list[Event]:
        """Handles one received WebSocket message and returns what happened (usually 1 event)."""
        if self.state is SessionState.FAILED:
            return []
        try:
            return [self._receive(data)]
        except ProtocolError as exc:
            return [self._violation(exc.code, exc.message, exc.fatal, exc)]
        except Exception as exc:  # a bug here must cost one session, never the server
            return [
                self._violation(
                    ErrorCode.INTERNAL, f"internal error reading a message: {exc!r}", True, exc
                )
            ]

    def _violation(
        self, code: ErrorCode, message: str, fatal: bool, cause: BaseException | None
    ) -> ProtocolViolation:
        violation = ProtocolViolation(code, message, fatal, cause)
        if fatal:
            self.state = SessionState.FAILED
            self.failure = violation
        return violation

    def _receive(self, data: bytes | bytearray | memoryview | str) -> Event:
        msg = parse_client_message(data, max_size=self.max_size)
        state = self.state
        if state is SessionState.ENDED:
            raise ProtocolError(
                ErrorCode.OUT_OF_ORDER, f"{msg.type.value!r} after 'end'; nothing may follow 'end'"
            )
        if isinstance(msg, PingMessage):
            return PingReceived(msg.t)
        if state is SessionState.AWAIT_START:
            if not isinstance(msg, StartMessage):
                raise ProtocolError(
                    ErrorCode.OUT_OF_ORDER,
                    f"{msg.type.value!r} before 'start'; the first message must be 'start'",
                )
            if self.catalog is not None:
                self.limits = validate_start(msg, self.catalog)
            self.start = msg
            self.state = SessionState.STREAMING
            return StartRequested(msg)
        start = self.start
        assert start is not None
        if isinstance(msg, AudioMessage):
            if start.mode is not SessionMode.ENCODE:
                raise ProtocolError(
                    ErrorCode.OUT_OF_ORDER, "'audio' in a decode session; send 'codes' instead"
                )
            if msg.seq is not None and msg.seq != self.audio_messages:
                raise ProtocolError(
                    ErrorCode.OUT_OF_ORDER,
                    f"audio.seq is {msg.seq} but {self.audio_messages} audio messages came "
                    "before it: audio was lost or reordered",
                )
            if self.check_finite and start.format is AudioFormat.F32LE:
                self._check_finite(msg.data)
            self.audio_messages += 1
            self.audio_bytes += len(msg.data)
            return AudioReceived(msg.data, msg.seq)
        if isinstance(msg, CodesMessage):
            if start.mode is not SessionMode.DECODE:
                raise ProtocolError(
                    ErrorCode.OUT_OF_ORDER, "'codes' in an encode session; send 'audio' instead"
                )
            self._check_codes(msg.frames)
            return CodesReceived(msg.frames)
        if isinstance(msg, (FlushMessage, EndMessage)):
            block = start.format.sample_width * start.channels
            if start.mode is SessionMode.ENCODE and self.audio_bytes % block:
                raise ProtocolError(
                    ErrorCode.BAD_AUDIO,
                    f"{self.audio_bytes} audio bytes received, not a whole number of "
                    f"{block}-byte sample blocks ({start.format.value} x {start.channels} "
                    f"channels) at {msg.type.value!r}",
                )
            if isinstance(msg, FlushMessage):
                return FlushRequested()
            self.state = SessionState.ENDED
            return EndRequested()
        if isinstance(msg, AckMessage):
            return AckReceived(msg.frame)
        assert isinstance(msg, StartMessage)
        raise ProtocolError(
            ErrorCode.OUT_OF_ORDER, "'start' sent twice; one session per connection"
        )

    def _check_finite(self, data: bytes) -> None:
        """Refuses NaN/Inf or out-of-range f32 samples, including one split across two messages."""
        offset = 0
        carry = self._carry
        if carry:
            need = 4 - len(carry)
            if len(data) < need:
                self._carry = carry + data
                return
            first = (self.audio_bytes - len(carry)) // 4
            _refuse_nonfinite(np.frombuffer(carry + data[:need], dtype="<f4"), first)
            offset = need
        count = (len(data) - offset) // 4
        if count:
            samples = np.frombuffer(data, dtype="<f4", count=count, offset=offset)
            _refuse_nonfinite(samples, (self.audio_bytes + offset) // 4)
        self._carry = data[offset + 4 * count :]

    def _check_codes(self, frames: tuple[tuple[int, ...], ...]) -> None:
        if not frames:
            return
        levels = len(frames[0])
        if self.decode_levels is None:
            if self.limits is not None and levels > self.limits.max_levels:
                raise ProtocolError(
                    ErrorCode.BAD_FIELD,
                    f"codes.frames must have 1 to {self.limits.max_levels} levels per frame; "
                    f"got {levels}",
                )
            self.decode_levels = levels
        elif levels != self.decode_levels:
            raise ProtocolError(
                ErrorCode.BAD_FIELD,
                f"codes.frames must keep {self.decode_levels} levels per frame, as the first "
                f"frame of the session had; got {levels}",
            )
        if self.limits is not None:
            cards = self.limits.cardinalities
            for t, frame in enumerate(frames):
                for k, c in enumerate(frame):
                    if c >= cards[k]:
                        raise ProtocolError(
                            ErrorCode.BAD_FIELD,
                            f"codes.frames[{t}][{k}] must be an integer in [0, {cards[k] - 1}]; "
                            f"got {c}",
                        )
