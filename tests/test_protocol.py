"""Tests of the pure wire protocol: bytes in, messages and events out; no socket."""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamtok.errors import ProtocolError, StreamtokError
from streamtok.server import protocol as proto
from streamtok.server.protocol import (
    AckMessage,
    AckReceived,
    AudioFormat,
    AudioMessage,
    AudioReceived,
    ClientMessageType,
    CloseCode,
    CodesMessage,
    CodesReceived,
    DecodedAudioMessage,
    EndMessage,
    EndRequested,
    ErrorCode,
    ErrorMessage,
    FlushedMessage,
    FlushMessage,
    FlushRequested,
    HintMessage,
    LevelInfo,
    LevelKind,
    ModelCard,
    ModelLimits,
    Outputs,
    PingMessage,
    PingReceived,
    PongMessage,
    ProtocolViolation,
    ReadyMessage,
    ResolvedOutputs,
    Resume,
    ServerMessageType,
    SessionMode,
    SessionProtocol,
    SessionState,
    StartMessage,
    StartRequested,
    StatsMessage,
    Timing,
    TokenFrame,
    TokensMessage,
    encode_client_message,
    encode_server_message,
    encode_tokens,
    parse_client_message,
    parse_server_message,
    resolve_outputs,
    validate_start,
)

HYPOTHESIS = settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])

CATALOG = {
    "codec": ModelLimits(cardinalities=(2048,) + (1024,) * 7, units=True, latents=True),
    "codec-decode": ModelLimits(cardinalities=(16, 8), decode=True),
    "units-only": ModelLimits(units=True),
}

# Codes that are fatal in every context, and those that never are (PROTOCOL.md, "Errors").
ALWAYS_FATAL = set(ErrorCode) - {ErrorCode.UNKNOWN_TYPE, ErrorCode.BAD_FIELD, ErrorCode.OVERLOADED}
NEVER_FATAL = {ErrorCode.UNKNOWN_TYPE}

TIMING = Timing(audio_complete=10.0, compute_start=10.001, compute_end=10.0125, sent=10.013)


def pack(obj: Any) -> bytes:
    """msgpack as a client would send it."""
    return msgpack.packb(obj, use_bin_type=True)


def start(**overrides: Any) -> dict[str, Any]:
    """A valid encode `start` as a raw map, with some fields replaced (None removes one)."""
    d: dict[str, Any] = {
        "type": "start",
        "version": 1,
        "model": "codec",
        "sample_rate": 16000,
        "format": "s16le",
        "channels": 1,
        "outputs": {"codes": 4},
    }
    d.update(overrides)
    return {k: v for k, v in d.items() if v is not None}


def decode_start(**overrides: Any) -> dict[str, Any]:
    """A valid decode `start` as a raw map."""
    return start(**{"mode": "decode", "model": "codec-decode", "outputs": None, **overrides})


def feed(session: SessionProtocol, *messages: Any) -> list[Any]:
    """Feeds raw maps (packed here), bytes or str to a session and returns all events."""
    events: list[Any] = []
    for m in messages:
        events += session.receive(m if isinstance(m, (bytes, str)) else pack(m))
    return events


def violation(events: list[Any]) -> ProtocolViolation:
    """The one violation among ``events``."""
    found = [e for e in events if isinstance(e, ProtocolViolation)]
    assert len(found) == 1, events
    return found[0]


def assert_documented(events: list[Any], session: SessionProtocol) -> None:
    """Checks that events are of known kinds and violations follow the documented policy."""
    for e in events:
        assert isinstance(
            e,
            (
                StartRequested,
                AudioReceived,
                CodesReceived,
                FlushRequested,
                EndRequested,
                PingReceived,
                AckReceived,
                ProtocolViolation,
            ),
        )
        if isinstance(e, ProtocolViolation):
            assert isinstance(e.code, ErrorCode)
            assert e.code is not ErrorCode.INTERNAL, e.cause
            assert e.message
            if e.code in ALWAYS_FATAL:
                assert e.fatal
            if e.code in NEVER_FATAL:
                assert not e.fatal
            if e.fatal:
                assert session.state is SessionState.FAILED
                assert session.close_code == e.code.close_code


# --------------------------------------------------------------------------------------------
# Round trips

CARD = ModelCard(
    name="codec",
    sample_rate=24000,
    frame_size=1920,
    frame_rate=12.5,
    levels=(
        LevelInfo(0, 2048, LevelKind.SEMANTIC),
        LevelInfo(1, 1024, LevelKind.ACOUSTIC),
    ),
    semantic_level=0,
    latent_dim=4,
    units=500,
    delay_frames=1,
    delay_ms=80.0,
)

CLIENT_MESSAGES = {
    "start-minimal": StartMessage("codec", 16000, AudioFormat.S16LE, outputs=Outputs(codes=True)),
    "start-full": StartMessage(
        model="codec",
        sample_rate=48000,
        format=AudioFormat.F32LE,
        channels=2,
        outputs=Outputs(codes=3, units=True, latents=True),
        auth="secret",
        resume=Resume("tok", -1),
        frames_per_message=4,
        client="test-client/1.0",
    ),
    "start-decode": StartMessage("codec-decode", 22050, AudioFormat.F32LE, mode=SessionMode.DECODE),
    "audio": AudioMessage(b"\x00\x01" * 100),
    "audio-seq": AudioMessage(b"", seq=7),
    "codes": CodesMessage(((1, 2), (3, 4), (0, 7))),
    "codes-empty": CodesMessage(()),
    "flush": FlushMessage(),
    "end": EndMessage(),
    "ping": PingMessage(123.456),
    "ack": AckMessage(41),
}

SERVER_MESSAGES = {
    "ready": ReadyMessage(
        session="s-1",
        resume_token="r-1",
        model=CARD,
        input_sample_rate=16000,
        send_hint_ms=80,
        outputs=ResolvedOutputs(codes=2, units=True),
        ignored_fields=("colour",),
    ),
    "ready-bare-card": ReadyMessage(
        "s", "r", ModelCard("m", 16000, 320, 50.0), input_sample_rate=8000, send_hint_ms=20
    ),
    "tokens": TokensMessage(
        frames=(
            TokenFrame(5, 0.4, codes=(1, 2), unit=3, latent=b"\x00" * 8),
            TokenFrame(6, 0.48, codes=(4, 5), unit=6, latent=b"\x01" * 8),
        ),
        timing=TIMING,
    ),
    "tokens-units": TokensMessage(frames=(TokenFrame(0, 0.0, unit=9),), timing=TIMING),
    "audio": DecodedAudioMessage(b"\x00\x00" * 480, index=3, sample_rate=24000, timing=TIMING),
    "audio-no-timing": DecodedAudioMessage(b"", index=0, sample_rate=8000),
    "flushed": FlushedMessage(12),
    "flushed-none": FlushedMessage(None),
    "stats": StatsMessage({"latency_p50_ms": 41.5, "frames": 100.0}),
    "hint": HintMessage(40),
    "pong": PongMessage(t=1.5, server_t=99.25),
    "error": ErrorMessage(ErrorCode.BAD_FIELD, "start.channels must be ...", fatal=True),
}


@pytest.mark.parametrize("msg", CLIENT_MESSAGES.values(), ids=CLIENT_MESSAGES.keys())
def test_client_message_round_trip(msg: Any) -> None:
    """Every client message survives encode then parse unchanged."""
    data = encode_client_message(msg)
    assert parse_client_message(data, max_size=1 << 20) == msg
    assert msgpack.unpackb(data)["type"] == msg.type.value


@pytest.mark.parametrize("msg", SERVER_MESSAGES.values(), ids=SERVER_MESSAGES.keys())
def test_server_message_round_trip(msg: Any) -> None:
    """Every server message survives encode then parse unchanged."""
    data = encode_server_message(msg)
    assert parse_server_message(data) == msg
    assert msgpack.unpackb(data)["type"] == msg.type.value


def test_every_message_type_has_a_round_trip_case() -> None:
    """The round-trip tables cover every client and server message type."""
    assert {m.type for m in CLIENT_MESSAGES.values()} == set(ClientMessageType)
    assert {m.type for m in SERVER_MESSAGES.values()} == set(ServerMessageType)


@st.composite
def start_messages(draw: st.DrawFn) -> StartMessage:
    """Arbitrary valid `start` messages."""
    mode = draw(st.sampled_from(SessionMode))
    outputs = Outputs()
    if mode is SessionMode.ENCODE:
        outputs = draw(
            st.builds(
                Outputs,
                codes=st.one_of(st.booleans(), st.integers(1, 32)),
                units=st.booleans(),
                latents=st.booleans(),
            ).filter(lambda o: o.any)
        )
    return StartMessage(
        model=draw(st.text(min_size=1, max_size=20)),
        sample_rate=draw(st.integers(proto.MIN_SAMPLE_RATE, proto.MAX_SAMPLE_RATE)),
        format=draw(st.sampled_from(AudioFormat)),
        channels=draw(st.integers(1, proto.MAX_CHANNELS)),
        mode=mode,
        outputs=outputs,
        auth=draw(st.none() | st.text(min_size=1, max_size=50)),
        resume=draw(st.none() | st.builds(Resume, st.text(min_size=1), st.integers(-1, 2**40))),
        frames_per_message=draw(st.none() | st.integers(1, 100)),
        client=draw(st.none() | st.text(max_size=proto.MAX_CLIENT_NAME_CHARS)),
    )


@HYPOTHESIS
@given(start_messages())
def test_start_round_trip_property(msg: StartMessage) -> None:
    """Any valid `start` survives encode then parse unchanged."""
    assert parse_client_message(encode_client_message(msg), max_size=1 << 20) == msg


@HYPOTHESIS
@given(
    index=st.integers(0, 2**40),
    n=st.integers(1, 8),
    levels=st.integers(1, 8),
    with_codes=st.booleans(),
    with_units=st.booleans(),
    with_latents=st.booleans(),
    data=st.data(),
)
def test_encode_tokens_matches_dataclass_encoding(
    index: int,
    n: int,
    levels: int,
    with_codes: bool,
    with_units: bool,
    with_latents: bool,
    data: st.DataObject,
) -> None:
    """The fast path gives the same bytes as encoding a TokensMessage of the same frames."""
    if not (with_codes or with_units or with_latents):
        with_units = True
    code_rows = [
        data.draw(st.lists(st.integers(0, 4095), min_size=levels, max_size=levels))
        for _ in range(n)
    ]
    codes = code_rows if with_codes else None
    units = data.draw(st.lists(st.integers(0, 999), min_size=n, max_size=n)) if with_units else None
    latents = [np.full(4, i, "<f2").tobytes() for i in range(n)] if with_latents else None
    fast = encode_tokens(index, codes, units, latents, TIMING, frame_rate=12.5)
    frames = tuple(
        TokenFrame(
            index + i,
            (index + i) / 12.5,
            codes=None if codes is None else tuple(codes[i]),
            unit=None if units is None else units[i],
            latent=None if latents is None else latents[i],
        )
        for i in range(n)
    )
    slow = TokensMessage(frames=frames, timing=TIMING)
    assert fast == encode_server_message(slow)
    assert parse_server_message(fast) == slow


def test_encode_tokens_stream_time_does_not_drift() -> None:
    """Frame start times are index / frame_rate exactly, even far into a stream."""
    msg = parse_server_message(encode_tokens(10**9, None, [1], None, TIMING, frame_rate=75.0))
    assert isinstance(msg, TokensMessage)
    assert msg.frames[0].t == 10**9 / 75.0


def test_encode_tokens_refuses_mismatched_outputs() -> None:
    """Outputs for different frame counts, or none at all, are a server bug reported clearly."""
    with pytest.raises(ProtocolError) as info:
        encode_tokens(0, [[1], [2]], [1], None, TIMING, frame_rate=50.0)
    assert info.value.code is ErrorCode.INTERNAL
    with pytest.raises(ProtocolError):
        encode_tokens(0, None, None, None, TIMING, frame_rate=50.0)


# --------------------------------------------------------------------------------------------
# Error codes and close codes


def test_close_codes_table() -> None:
    """Each error code maps to the close code documented in PROTOCOL.md."""
    expected = {
        ErrorCode.BAD_MESSAGE: 1007,
        ErrorCode.UNKNOWN_TYPE: 1003,
        ErrorCode.BAD_VERSION: 4426,
        ErrorCode.BAD_FIELD: 1007,
        ErrorCode.UNKNOWN_MODEL: 4404,
        ErrorCode.BAD_AUDIO: 1007,
        ErrorCode.OUT_OF_ORDER: 1008,
        ErrorCode.TOO_BIG: 1009,
        ErrorCode.TOO_MANY_SESSIONS: 1013,
        ErrorCode.UNAUTHORIZED: 4401,
        ErrorCode.FORBIDDEN_ORIGIN: 4403,
        ErrorCode.OVERLOADED: 1013,
        ErrorCode.IDLE_TIMEOUT: 4408,
        ErrorCode.RESUME_FAILED: 4410,
        ErrorCode.SLOW_CONSUMER: 1008,
        ErrorCode.INTERNAL: 1011,
    }
    assert {code: int(code.close_code) for code in ErrorCode} == expected
    assert all(isinstance(code.close_code, CloseCode) for code in ErrorCode)


def test_protocol_error_is_a_streamtok_error() -> None:
    """ProtocolError derives from the package root and carries code, message and fatality."""
    err = ProtocolError(ErrorCode.BAD_FIELD, "x must be y", fatal=False)
    assert isinstance(err, StreamtokError)
    assert (err.code, err.message, err.fatal) == (ErrorCode.BAD_FIELD, "x must be y", False)
    assert ErrorMessage.from_error(err) == ErrorMessage(ErrorCode.BAD_FIELD, "x must be y", False)


AUDIO = {"type": "audio", "data": b"\x00\x00"}

# (messages fed to a fresh session with CATALOG, expected code, expected fatal)
REACHABLE = {
    "text-frame": (["hello"], ErrorCode.BAD_MESSAGE, True),
    "malformed-msgpack": ([b"\xc1"], ErrorCode.BAD_MESSAGE, True),
    "truncated-msgpack": ([pack(start())[:-3]], ErrorCode.BAD_MESSAGE, True),
    "trailing-bytes": ([pack(start()) + b"\x00"], ErrorCode.BAD_MESSAGE, True),
    "empty-frame": ([b""], ErrorCode.BAD_MESSAGE, True),
    "not-a-map": ([pack([1, 2])], ErrorCode.BAD_MESSAGE, True),
    "no-type": ([pack({"version": 1})], ErrorCode.BAD_MESSAGE, True),
    "int-type": ([pack({"type": 3})], ErrorCode.BAD_MESSAGE, True),
    "int-map-key": ([b"\x81\x01\x02"], ErrorCode.BAD_MESSAGE, True),
    "bad-utf8": ([b"\x81\xa4type\xa2\xff\xfe"], ErrorCode.BAD_MESSAGE, True),
    "unknown-type": ([{"type": "hello"}], ErrorCode.UNKNOWN_TYPE, False),
    "version-2": ([start(version=2)], ErrorCode.BAD_VERSION, True),
    "version-missing": ([start(version=None)], ErrorCode.BAD_VERSION, True),
    "version-true": ([start(version=True)], ErrorCode.BAD_VERSION, True),
    "bad-field-rate": ([start(sample_rate=0)], ErrorCode.BAD_FIELD, True),
    "bad-field-ping": ([{"type": "ping", "t": "now"}], ErrorCode.BAD_FIELD, False),
    "bad-field-ack": ([start(), {"type": "ack", "frame": -1}], ErrorCode.BAD_FIELD, False),
    "bad-field-audio": ([start(), {"type": "audio", "data": "text"}], ErrorCode.BAD_FIELD, True),
    "too-many-levels": ([start(outputs={"codes": 9})], ErrorCode.BAD_FIELD, True),
    "no-units": ([start(model="codec-decode", outputs={"units": True})], ErrorCode.BAD_FIELD, True),
    "no-decode": ([start(mode="decode", outputs=None)], ErrorCode.BAD_FIELD, True),
    "unknown-model": ([start(model="nope")], ErrorCode.UNKNOWN_MODEL, True),
    "partial-sample-at-flush": (
        [start(), {"type": "audio", "data": b"\x00"}, {"type": "flush"}],
        ErrorCode.BAD_AUDIO,
        True,
    ),
    "partial-block-at-end": (
        [start(channels=2), {"type": "audio", "data": b"\x00" * 6}, {"type": "end"}],
        ErrorCode.BAD_AUDIO,
        True,
    ),
    "nan-audio": (
        [start(format="f32le"), {"type": "audio", "data": np.array([0, np.nan], "<f4").tobytes()}],
        ErrorCode.BAD_AUDIO,
        True,
    ),
    "inf-audio": (
        [start(format="f32le"), {"type": "audio", "data": np.array([np.inf], "<f4").tobytes()}],
        ErrorCode.BAD_AUDIO,
        True,
    ),
    "huge-f32-audio": (
        [start(format="f32le"), {"type": "audio", "data": np.array([0.5, 3e38], "<f4").tobytes()}],
        ErrorCode.BAD_AUDIO,
        True,
    ),
    "audio-before-start": ([AUDIO], ErrorCode.OUT_OF_ORDER, True),
    "flush-before-start": ([{"type": "flush"}], ErrorCode.OUT_OF_ORDER, True),
    "start-twice": ([start(), start()], ErrorCode.OUT_OF_ORDER, True),
    "audio-after-end": ([start(), {"type": "end"}, AUDIO], ErrorCode.OUT_OF_ORDER, True),
    "ping-after-end": (
        [start(), {"type": "end"}, {"type": "ping", "t": 1}],
        ErrorCode.OUT_OF_ORDER,
        True,
    ),
    "seq-gap": ([start(), dict(AUDIO, seq=0), dict(AUDIO, seq=2)], ErrorCode.OUT_OF_ORDER, True),
    "codes-in-encode": (
        [start(), {"type": "codes", "frames": [[1]]}],
        ErrorCode.OUT_OF_ORDER,
        True,
    ),
    "audio-in-decode": ([decode_start(), AUDIO], ErrorCode.OUT_OF_ORDER, True),
    "too-big": ([pack({"type": "audio", "data": b"\x00" * 2000})], ErrorCode.TOO_BIG, True),
    "too-big-text": (["x" * 2000], ErrorCode.TOO_BIG, True),
}


@pytest.mark.parametrize(("messages", "code", "fatal"), REACHABLE.values(), ids=REACHABLE.keys())
def test_error_code_reachable_from_bytes(messages: list[Any], code: ErrorCode, fatal: bool) -> None:
    """Each client-caused error code is produced from wire bytes, with its documented fatality."""
    session = SessionProtocol(max_size=1000, catalog=CATALOG)
    events = feed(session, *messages)
    v = violation(events)
    assert (v.code, v.fatal) == (code, fatal), v.message
    assert events[-1] is v
    assert v.to_message() == ErrorMessage(code, v.message, fatal)
    assert_documented(events, session)
    if fatal:
        assert session.close_code == code.close_code
        assert session.receive(pack(start())) == []


@pytest.mark.parametrize(
    "code",
    [
        ErrorCode.TOO_MANY_SESSIONS,
        ErrorCode.UNAUTHORIZED,
        ErrorCode.FORBIDDEN_ORIGIN,
        ErrorCode.OVERLOADED,
        ErrorCode.IDLE_TIMEOUT,
        ErrorCode.RESUME_FAILED,
        ErrorCode.SLOW_CONSUMER,
        ErrorCode.INTERNAL,
    ],
)
def test_server_decided_errors_fail_the_session(code: ErrorCode) -> None:
    """Errors the server decides (auth, load, timeouts) end the session with their close code."""
    session = SessionProtocol()
    feed(session, start())
    v = session.fail(code, "because")
    assert v.fatal and session.state is SessionState.FAILED
    assert session.close_code == code.close_code
    assert parse_server_message(encode_server_message(v.to_message())) == v.to_message()
    assert session.receive(pack(AUDIO)) == []


def test_bug_in_parser_becomes_internal_violation(monkeypatch: pytest.MonkeyPatch) -> None:
    """An unexpected exception while parsing is reported as a fatal `internal`, never raised."""

    def broken(d: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setitem(proto._CLIENT_PARSERS, "flush", broken)
    session = SessionProtocol()
    v = violation(feed(session, start(), {"type": "flush"}))
    assert (v.code, v.fatal) == (ErrorCode.INTERNAL, True)
    assert isinstance(v.cause, RuntimeError)
    assert session.close_code is CloseCode.INTERNAL_ERROR


def test_bad_msgpack_error_is_chained() -> None:
    """The msgpack exception is kept as the cause of a bad_message error."""
    with pytest.raises(ProtocolError) as info:
        parse_client_message(b"\xc1", max_size=100)
    assert isinstance(info.value.__cause__, ValueError)


def test_bad_version_message_is_clear() -> None:
    """A refused version names the version received and the one the server speaks."""
    v = violation(feed(SessionProtocol(), start(version=2)))
    assert "version 2" in v.message and "speaks protocol version 1" in v.message


# --------------------------------------------------------------------------------------------
# Field validation

# Wrong values per `start` field; None (nil) is wrong only for required fields.
BAD_START_VALUES: dict[str, list[Any]] = {
    "model": ["", "m" * 201, 3, b"codec", ["codec"]],
    "sample_rate": [0, 7999, 48001, -16000, 10**9, 2**64 - 1, 16000.0, math.nan, True, "16000"],
    "format": ["s24le", "S16LE", 1, True, b"s16le"],
    "channels": [0, -1, 9, 10**9, 1.0, True, "1"],
    "mode": ["stream", 0, False],
    "outputs": [
        {},
        {"codes": False},
        {"codes": 0},
        {"codes": -1},
        {"codes": 2.5},
        {"codes": "all"},
        {"units": 1},
        {"latents": "yes"},
        [],
        "codes",
        5,
    ],  # fmt: skip
    "auth": ["", 5, "x" * 5000, False],
    "resume": [
        {},
        {"token": "t"},
        {"token": "t", "last_frame": -2},
        {"token": "", "last_frame": 0},
        {"token": 5, "last_frame": 0},
        {"token": "t", "last_frame": math.inf},
        "t",
    ],  # fmt: skip
    "frames_per_message": [0, -1, 10**9, 1.5, True],
    "client": ["c" * 201, 5, [], True],
}
REQUIRED_START_FIELDS = {"model", "sample_rate", "format"}  # `outputs` absent: the model's own tokens


@pytest.mark.parametrize(
    ("key", "value"),
    [(k, v) for k, values in BAD_START_VALUES.items() for v in values],
    ids=lambda x: repr(x)[:30],
)
def test_wrong_start_field_is_bad_field_naming_it(key: str, value: Any) -> None:
    """A wrong type or out-of-range value in any `start` field is a fatal bad_field naming it."""
    v = violation(feed(SessionProtocol(), start(**{key: value})))
    assert (v.code, v.fatal) == (ErrorCode.BAD_FIELD, True)
    assert f"start.{key}" in v.message


@pytest.mark.parametrize("key", sorted(BAD_START_VALUES))
def test_nil_start_field_is_absent(key: str) -> None:
    """Nil counts as absent: refused for required fields, the default for optional ones."""
    session = SessionProtocol()
    events = feed(session, dict(start(), **{key: None}))
    if key in REQUIRED_START_FIELDS:
        assert violation(events).code is ErrorCode.BAD_FIELD
        assert f"start.{key}" in events[0].message
    else:
        assert isinstance(events[0], StartRequested)


def test_bad_field_message_names_the_allowed_range() -> None:
    """The bad_field message says what was allowed and what was received."""
    v = violation(feed(SessionProtocol(), start(channels=10**9)))
    assert v.message == ("start.channels must be an integer in [1, 8]; got 1000000000 (int)")


def test_defaults_and_ignored_fields() -> None:
    """Omitted optional fields take their defaults and unknown keys are listed, not refused."""
    raw = start(channels=None, colour="blue", extra=1)
    [event] = feed(SessionProtocol(), raw)
    assert isinstance(event, StartRequested)
    msg = event.message
    assert (msg.channels, msg.mode, msg.frames_per_message) == (1, SessionMode.ENCODE, None)
    assert msg.ignored_fields == ("colour", "extra")


def test_decode_start_refuses_outputs() -> None:
    """A decode `start` may not carry `outputs`."""
    v = violation(feed(SessionProtocol(), decode_start(outputs={"codes": True})))
    assert v.code is ErrorCode.BAD_FIELD and "start.outputs" in v.message


def test_validate_start_and_resolve_outputs() -> None:
    """Model-dependent checks use the catalog; `codes: true` resolves to every level."""
    msg = StartMessage("codec", 16000, AudioFormat.S16LE, outputs=Outputs(codes=True, units=True))
    limits = validate_start(msg, CATALOG)
    assert resolve_outputs(msg.outputs, limits) == ResolvedOutputs(codes=8, units=True)
    assert resolve_outputs(Outputs(codes=3), limits).codes == 3
    assert resolve_outputs(Outputs(units=True), limits).codes == 0
    with pytest.raises(ProtocolError) as info:
        validate_start(
            StartMessage("units-only", 16000, AudioFormat.S16LE, outputs=Outputs(codes=1)), CATALOG
        )
    assert info.value.code is ErrorCode.BAD_FIELD
    with pytest.raises(ProtocolError) as info:
        validate_start(
            StartMessage("codec", 16000, AudioFormat.S16LE, outputs=Outputs(latents=True)),
            {"codec": ModelLimits((4,))},
        )
    assert info.value.code is ErrorCode.BAD_FIELD
    with pytest.raises(ProtocolError) as info:
        validate_start(msg, {})
    assert info.value.code is ErrorCode.UNKNOWN_MODEL


# --------------------------------------------------------------------------------------------
# Session sequences


def test_encode_session_happy_path() -> None:
    """start, audio, ping, ack, flush, audio, end give the matching events and end in ENDED."""
    session = SessionProtocol(catalog=CATALOG)
    events = feed(
        session,
        start(),
        dict(AUDIO, seq=0),
        {"type": "ping", "t": 5},
        {"type": "ack", "frame": 0},
        {"type": "flush"},
        dict(AUDIO, seq=1),
        {"type": "end"},
    )
    assert [type(e) for e in events] == [
        StartRequested,
        AudioReceived,
        PingReceived,
        AckReceived,
        FlushRequested,
        AudioReceived,
        EndRequested,
    ]
    assert events[1] == AudioReceived(b"\x00\x00", 0)
    assert events[2] == PingReceived(5)
    assert session.state is SessionState.ENDED
    assert session.close_code is CloseCode.NORMAL
    assert session.audio_bytes == 4 and session.audio_messages == 2


def test_decode_session_happy_path() -> None:
    """A decode session takes codes, checks them against the model, and flushes."""
    session = SessionProtocol(catalog=CATALOG)
    events = feed(
        session,
        decode_start(),
        {"type": "codes", "frames": [[15, 7], [0, 0]]},
        {"type": "codes", "frames": []},
        {"type": "flush"},
        {"type": "end"},
    )
    assert events[1] == CodesReceived(((15, 7), (0, 0)))
    assert [type(e) for e in events[2:]] == [CodesReceived, FlushRequested, EndRequested]


@pytest.mark.parametrize(
    ("frames", "needle"),
    [
        ([[16, 0]], "codes.frames[0][0] must be an integer in [0, 15]"),
        ([[0, 0, 0]], "1 to 2 levels"),
        ([[0, 0], [0]], "same number of levels"),
        ([[]], "same number of levels"),
        ([[-1, 0]], "codes.frames must be an array of integers"),
        ([[0, "a"]], "codes.frames must be an array of integers"),
        ([[0, 2**32]], "codes.frames must be an array of integers"),
        ("nope", "codes.frames must be an array"),
    ],
)
def test_decode_session_refuses_bad_codes(frames: Any, needle: str) -> None:
    """Codes out of the model's range or of uneven level counts are a fatal bad_field."""
    v = violation(
        feed(SessionProtocol(catalog=CATALOG), decode_start(), {"type": "codes", "frames": frames})
    )
    assert (v.code, v.fatal) == (ErrorCode.BAD_FIELD, True)
    assert needle in v.message


def test_decode_session_keeps_level_count() -> None:
    """Every codes message of a session has the level count of its first frame."""
    v = violation(
        feed(
            SessionProtocol(),
            decode_start(),
            {"type": "codes", "frames": [[1]]},
            {"type": "codes", "frames": [[1, 2]]},
        )
    )
    assert v.code is ErrorCode.BAD_FIELD and "keep 1 levels" in v.message


def test_non_fatal_errors_keep_the_session() -> None:
    """After unknown_type and bad ping/ack fields the session goes on streaming."""
    session = SessionProtocol()
    events = feed(
        session,
        {"type": "future-feature"},
        start(),
        {"type": "ping"},
        {"type": "ack", "frame": "x"},
        AUDIO,
    )
    assert [getattr(e, "code", None) for e in events] == [
        ErrorCode.UNKNOWN_TYPE,
        None,
        ErrorCode.BAD_FIELD,
        ErrorCode.BAD_FIELD,
        None,
    ]
    assert session.state is SessionState.STREAMING
    assert session.close_code is None


def test_ping_allowed_before_start() -> None:
    """A ping before start is answered, so a client can measure round trips first."""
    assert feed(SessionProtocol(), {"type": "ping", "t": 0.5}) == [PingReceived(0.5)]


def test_seq_counts_audio_messages() -> None:
    """`seq` must equal the number of earlier audio messages, with or without seq on them."""
    session = SessionProtocol()
    events = feed(session, start(), AUDIO, dict(AUDIO, seq=1), AUDIO, dict(AUDIO, seq=3))
    assert all(not isinstance(e, ProtocolViolation) for e in events)
    assert violation(feed(session, dict(AUDIO, seq=3))).code is ErrorCode.OUT_OF_ORDER


def test_max_size_is_inclusive() -> None:
    """A message of exactly max_size bytes is accepted and one byte more is too_big."""
    data = pack({"type": "ping", "t": 1.0})
    assert isinstance(parse_client_message(data, max_size=len(data)), PingMessage)
    with pytest.raises(ProtocolError) as info:
        parse_client_message(data, max_size=len(data) - 1)
    assert info.value.code is ErrorCode.TOO_BIG
    assert info.value.code.close_code is CloseCode.MESSAGE_TOO_BIG


def test_after_fatal_everything_is_ignored() -> None:
    """Once a fatal violation happened the session emits nothing more."""
    session = SessionProtocol()
    feed(session, AUDIO)
    assert session.state is SessionState.FAILED
    assert feed(session, start(), AUDIO, b"\xc1", "text") == []


# --------------------------------------------------------------------------------------------
# Audio alignment and finiteness across message boundaries


@HYPOTHESIS
@given(
    n_samples=st.integers(0, 64),
    channels=st.integers(1, 4),
    cuts=st.lists(st.integers(0, 1024), max_size=8),
    bad_at=st.none() | st.integers(0, 63),
    bad_value=st.sampled_from([math.nan, math.inf, -math.inf]),
)
def test_f32_audio_split_anywhere(
    n_samples: int, channels: int, cuts: list[int], bad_at: int | None, bad_value: float
) -> None:
    """f32 audio split at any byte is accepted whole, and a NaN/Inf is found at its index."""
    samples = np.linspace(-1, 1, n_samples * channels, dtype="<f4")
    if bad_at is not None and bad_at < samples.size:
        samples[bad_at] = bad_value
    else:
        bad_at = None
    data = samples.tobytes()
    bounds = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    session = SessionProtocol()
    events = feed(session, start(format="f32le", channels=channels))
    for a, b in zip(bounds, bounds[1:], strict=False):
        events += feed(session, {"type": "audio", "data": data[a:b]})
    events += feed(session, {"type": "end"})
    assert_documented(events, session)
    if bad_at is None:
        assert not any(isinstance(e, ProtocolViolation) for e in events)
        assert b"".join(e.data for e in events if isinstance(e, AudioReceived)) == data
    else:
        v = violation(events)
        assert v.code is ErrorCode.BAD_AUDIO
        assert f"audio sample {bad_at} " in v.message


@pytest.mark.parametrize(
    ("value", "accepted"),
    [(proto.MAX_F32_SAMPLE, True), (-proto.MAX_F32_SAMPLE, True), (1.5, True),
     (np.nextafter(np.float32(proto.MAX_F32_SAMPLE), np.float32(np.inf)), False),
     (32767.0, False), (-3.4e38, False)],
    ids=["limit", "-limit", "over-full-scale", "just-over", "int16-as-float", "-3.4e38"],
)
def test_f32_samples_beyond_the_documented_range_are_refused(value: float, accepted: bool) -> None:
    """f32le samples up to ±MAX_F32_SAMPLE pass; beyond it, `bad_audio` names the sample and the
    limit (a finite 3e38 would otherwise turn the model's latents into NaN)."""
    data = np.array([0.0, 0.25, value], "<f4").tobytes()
    events = feed(SessionProtocol(), start(format="f32le"), {"type": "audio", "data": data[:5]},
                  {"type": "audio", "data": data[5:]})
    if accepted:
        assert isinstance(events[-1], AudioReceived)
        return
    v = violation(events)
    assert (v.code, v.fatal) == (ErrorCode.BAD_AUDIO, True)
    assert "audio sample 2 " in v.message and f"±{proto.MAX_F32_SAMPLE:g}" in v.message


@pytest.mark.parametrize(
    ("data", "says"),
    [(b"\xc1\xc1garbage", "0xc1"), (b"\x81", "truncated"), (b"", "truncated"),
     (pack(start()) + b"\x00", "trailing bytes"), (b"\x81\xa4type\xa2\xff\xfe", "UTF-8")],
    ids=["never-used-byte", "map-cut-short", "empty", "trailing", "bad-utf8"],
)
def test_invalid_msgpack_is_explained(data: bytes, says: str) -> None:
    """A message that is not msgpack gets a `bad_message` that says what is wrong with it
    (msgpack's own exception text is empty for some of these)."""
    v = violation(feed(SessionProtocol(), data))
    assert v.code is ErrorCode.BAD_MESSAGE
    assert says in v.message and not v.message.endswith(": ")


def test_nil_required_field_is_reported_missing() -> None:
    """`model: nil` is a missing required field, and the error says so."""
    v = violation(feed(SessionProtocol(catalog=CATALOG), start(model=None) | {"model": None}))
    assert v.code is ErrorCode.BAD_FIELD
    assert v.message.startswith("start.model must be") and "counts as missing" in v.message
    absent = violation(feed(SessionProtocol(catalog=CATALOG), start(model=None)))
    assert absent.message.endswith("it is missing")


def test_check_finite_can_be_disabled() -> None:
    """With check_finite off NaN audio passes through (the engine may clean it itself)."""
    nan = np.array([math.nan], "<f4").tobytes()
    events = feed(
        SessionProtocol(check_finite=False), start(format="f32le"), {"type": "audio", "data": nan}
    )
    assert isinstance(events[-1], AudioReceived)


def test_s16_partial_sample_completed_later_is_fine() -> None:
    """A sample split across messages is fine as long as it is whole at flush."""
    events = feed(
        SessionProtocol(),
        start(channels=2),
        {"type": "audio", "data": b"\x00" * 3},
        {"type": "audio", "data": b"\x00" * 5},
        {"type": "flush"},
    )
    assert isinstance(events[-1], FlushRequested)


# --------------------------------------------------------------------------------------------
# Never raises: arbitrary input ends in a documented error or an acceptance

msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=20,
)

FIELD_NAMES = sorted(
    {"type", "version", "model", "sample_rate", "format", "channels", "outputs", "mode", "auth",
     "resume", "frames_per_message", "client", "data", "seq", "frames", "t", "frame", "codes",
     "units", "latents", "token", "last_frame"}
)  # fmt: skip

typed_maps = st.fixed_dictionaries(
    {"type": st.sampled_from([t.value for t in ClientMessageType] + ["nope"])},
    optional={name: msgpack_values for name in FIELD_NAMES if name != "type"},
)

# Fields mostly valid, one or more replaced by arbitrary values: reaches deep validation.
mutated_starts = st.builds(
    lambda base, changes: {**base, **changes},
    st.sampled_from([start(), decode_start(), start(format="f32le", channels=2)]),
    st.dictionaries(st.sampled_from(FIELD_NAMES), msgpack_values, max_size=3),
)

wire_messages = st.one_of(
    st.binary(max_size=64),
    st.text(max_size=8),
    msgpack_values.map(pack),
    typed_maps.map(pack),
    mutated_starts.map(pack),
    st.sampled_from([pack(start()), pack(decode_start()), pack(AUDIO), pack({"type": "flush"})]),
    mutated_starts.map(lambda m: pack(m)[: max(1, len(pack(m)) // 2)]),  # truncated
)


@HYPOTHESIS
@given(st.lists(wire_messages, min_size=1, max_size=6), st.booleans())
def test_receive_never_raises(messages: list[bytes | str], with_catalog: bool) -> None:
    """Arbitrary message sequences never raise and only yield documented events."""
    session = SessionProtocol(max_size=256, catalog=CATALOG if with_catalog else None)
    for m in messages:
        events = session.receive(m)
        assert len(events) <= 1
        assert_documented(events, session)
        if session.state is SessionState.FAILED:
            assert session.receive(m) == []


@HYPOTHESIS
@given(msgpack_values, st.sampled_from(FIELD_NAMES))
def test_any_value_in_any_start_field(value: Any, key: str) -> None:
    """Any value in any `start` field is either accepted or a documented fatal error."""
    session = SessionProtocol(catalog=CATALOG)
    [event] = session.receive(pack({**start(), key: value}))
    assert_documented([event], session)
    if isinstance(event, ProtocolViolation):
        assert event.code in {
            ErrorCode.BAD_FIELD,
            ErrorCode.BAD_VERSION,
            ErrorCode.BAD_MESSAGE,
            ErrorCode.UNKNOWN_TYPE,
            ErrorCode.UNKNOWN_MODEL,
        }


@HYPOTHESIS
@given(st.binary(max_size=128) | msgpack_values.map(pack) | typed_maps.map(pack))
def test_parse_server_message_raises_only_protocol_error(data: bytes) -> None:
    """A client parsing arbitrary bytes gets a message or a ProtocolError, nothing else."""
    try:
        parse_server_message(data)
    except ProtocolError as exc:
        assert isinstance(exc.code, ErrorCode)


@pytest.mark.parametrize(
    "value",
    [0, -1, 10**9, 2**64 - 1, -(2**63), math.nan, math.inf, -0.0, "", True, None, [], {}],
    ids=repr,
)
def test_extreme_values_in_numeric_fields(value: Any) -> None:
    """Extreme numbers in every numeric client field are refused cleanly or accepted."""
    for message in (
        start(sample_rate=value),
        start(channels=value),
        start(outputs={"codes": value}),
        start(frames_per_message=value),
        {"type": "ping", "t": value},
        {"type": "ack", "frame": value},
        {"type": "audio", "data": b"", "seq": value},
    ):
        session = SessionProtocol(catalog=CATALOG)
        if message["type"] != "start":
            feed(session, start())
        assert_documented(feed(session, message), session)


# --------------------------------------------------------------------------------------------
# Client-side parsing


def test_client_skips_unknown_server_types_and_codes() -> None:
    """A newer server's unknown message type is a non-fatal error; an unknown code stays a str."""
    with pytest.raises(ProtocolError) as info:
        parse_server_message(pack({"type": "novelty"}))
    assert (info.value.code, info.value.fatal) == (ErrorCode.UNKNOWN_TYPE, False)
    msg = parse_server_message(
        pack({"type": "error", "code": "new_code", "message": "m", "fatal": True})
    )
    assert isinstance(msg, ErrorMessage) and msg.code == "new_code" and msg.close_code is None
    with pytest.raises(ProtocolError):
        parse_server_message("text")  # type: ignore[arg-type]


def test_client_ignores_unknown_fields_and_formats() -> None:
    """Unknown fields and audio formats from a newer server are ignored by clients."""
    wire = SERVER_MESSAGES["ready"].to_wire()
    wire["future"] = 1
    wire["model"]["formats"].append("opus")
    assert parse_server_message(pack(wire)) == SERVER_MESSAGES["ready"]


def test_flushed_requires_last_frame_key() -> None:
    """`flushed` must carry last_frame, with nil meaning no frame yet."""
    with pytest.raises(ProtocolError):
        parse_server_message(pack({"type": "flushed"}))
    assert parse_server_message(pack({"type": "flushed", "last_frame": None})) == FlushedMessage(
        None
    )


def test_outputs_tokens_pick_the_models_own_kind_and_are_the_default() -> None:
    base = {"type": "start", "version": 1, "model": "codec", "sample_rate": 16000, "format": "s16le"}
    msg = parse_client_message(msgpack.packb(base), max_size=1 << 20)
    assert msg.outputs == Outputs(tokens=True)  # no `outputs`: the model's own tokens
    assert resolve_outputs(msg.outputs, CATALOG["codec"]) == ResolvedOutputs(codes=8)
    units = parse_client_message(msgpack.packb(base | {"model": "units-only", "outputs": {"tokens": True}}), max_size=1 << 20)
    validate_start(units, CATALOG)
    assert resolve_outputs(units.outputs, CATALOG["units-only"]) == ResolvedOutputs(units=True)
    both = Outputs(tokens=True, latents=True)
    assert resolve_outputs(both, CATALOG["codec"]) == ResolvedOutputs(codes=8, latents=True)
    sent = StartMessage(model="codec", sample_rate=16000, format=AudioFormat.S16LE, outputs=both)
    assert parse_client_message(encode_client_message(sent), max_size=1 << 20).outputs == both  # round trip
    # beside tokens, codes and units are what an older server acts on: ignored here
    old_too = {"outputs": {"tokens": True, "codes": 2, "units": True}}
    assert parse_client_message(msgpack.packb(base | old_too), max_size=1 << 20).outputs == Outputs(tokens=True)
    assert msgpack.unpackb(encode_client_message(sent))["outputs"]["codes"] is True
    with pytest.raises(ProtocolError, match="neither codes nor units"):
        validate_start(msg, {"codec": ModelLimits(latents=True)})
