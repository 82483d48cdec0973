"""Security with a real server and real sockets: bearer tokens on every route, constant-time
token checks, the Origin allowlist, static files that stay inside their folder, per-connection
rate limits, logs without secrets or audio, and TLS."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import logging
import secrets
import shutil
import ssl
import subprocess
import types
from pathlib import Path

import msgpack
import numpy as np
import pytest
from test_server import START, TINY, assert_same_codes, run, running_server, speech
from websockets.asyncio.client import connect
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidMessage
from websockets.http11 import Request

import streamtok.server.app as app_module
from streamtok.client import StreamtokClient
from streamtok.server.app import StreamtokServer
from streamtok.server.config import ServerConfig

TOKEN = "tok-" + secrets.token_hex(16)


async def _ws_refusal(url: str, headers=None, origin=None, **kwargs) -> tuple[str | None, int | None]:
    """Open a WebSocket and send a proper ``start``; return (the last error code, close code)
    for a refusal, ("ready", close code) for a session served (then ended by us)."""
    async with connect(url, additional_headers=headers, origin=origin, **kwargs) as ws:
        with contextlib.suppress(ConnectionClosed):
            await ws.send(msgpack.packb(START))
        code = None
        with contextlib.suppress(ConnectionClosed):
            while True:
                msg = msgpack.unpackb(await ws.recv())
                if msg.get("type") == "ready":
                    code = "ready"
                    await ws.send(msgpack.packb({"type": "end"}))
                elif msg.get("type") == "error":
                    code = msg["code"]
        return code, ws.close_code


async def _http(port: int, target: str, headers: dict[str, str] | None = None,
                tls: ssl.SSLContext | None = None) -> tuple[int, bytes]:
    """A raw HTTP/1.1 GET with the request target sent exactly as given (no client-side
    normalisation of ``..`` or percent escapes); returns (status, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls)
    lines = [f"GET {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


# --------------------------------------------------------------------------------------------
# Tokens


@pytest.mark.parametrize("path", ["/", "/ws", "/metrics", "/static/app.js"])
def test_websocket_on_any_path_refuses_a_missing_or_wrong_token(path):
    """With a token configured, an upgrade on any path without the token, with a wrong one, a
    prefix of it, it plus a suffix, or the wrong scheme gets `unauthorized` (4401); the right
    token in the header or in ``?token=`` is served."""
    async def main():
        async with running_server(auth_token=TOKEN) as (_, url):
            base = url + path
            wrong = [
                await _ws_refusal(base),
                await _ws_refusal(base, {"Authorization": "Bearer nope"}),
                await _ws_refusal(base, {"Authorization": f"Bearer {TOKEN[:-1]}"}),
                await _ws_refusal(base, {"Authorization": f"Bearer {TOKEN}x"}),
                await _ws_refusal(base, {"Authorization": f"Basic {TOKEN}"}),
                await _ws_refusal(base, {"Authorization": "Bearer "}),
                await _ws_refusal(base + "?token=nope"),
                await _ws_refusal(base + "?token="),
            ]
            right = [await _ws_refusal(base, {"Authorization": f"Bearer {TOKEN}"}),
                     await _ws_refusal(base + f"?token={TOKEN}")]
            return wrong, right

    wrong, right = run(main())
    assert wrong == [("unauthorized", 4401)] * len(wrong)
    assert right == [("ready", 1000)] * 2


def test_every_configured_token_is_accepted_and_only_those():
    """``auth_token`` and each of ``auth_tokens`` open a session; anything else is refused."""
    others = ["client-b-" + secrets.token_hex(8), "client-c-" + secrets.token_hex(8)]

    async def main():
        async with running_server(auth_token=TOKEN, auth_tokens=others) as (_, url):
            ok = []
            for token in [TOKEN, *others]:
                c = await StreamtokClient.connect(url, model="tiny", token=token, auto_resume=False)
                ok.append(c.ready is not None)
                await c.end()
            refused = await _ws_refusal(url, {"Authorization": f"Bearer {others[0]}{others[1]}"})
            return ok, refused

    ok, refused = run(main())
    assert ok == [True, True, True] and refused == ("unauthorized", 4401)


def test_page_is_public_holds_no_secret_and_its_socket_needs_the_token():
    """The browser page and its files carry no secret, so they are served without a token
    (a browser cannot send the bearer header for them); the socket the page opens with a wrong
    ``?token=`` is refused, with the right one served."""
    async def main():
        async with running_server(auth_token=TOKEN) as (server, url):
            pages = [await _http(server.port, p) for p in
                     ("/", "/static/app.js", "/static/worklet.js", "/static/msgpack.js",
                      "/static/style.css", f"/?token={TOKEN}")]
            socket_wrong = await _ws_refusal(url + "/?token=wrong")
            socket_right = await _ws_refusal(url + f"/?token={TOKEN}")
            return pages, socket_wrong, socket_right

    pages, wrong, right = run(main())
    assert [status for status, _ in pages] == [200] * len(pages)
    assert all(TOKEN.encode() not in body for _, body in pages)
    assert wrong == ("unauthorized", 4401) and right == ("ready", 1000)


_PROTECT_METRICS = "protect_metrics" in {f.name for f in dataclasses.fields(ServerConfig)}


@pytest.mark.skipif(not _PROTECT_METRICS,
                    reason="ServerConfig has no protect_metrics flag yet: /metrics is open")
def test_metrics_refuse_a_missing_or_wrong_token_when_protected():
    """With ``protect_metrics`` and a token, /metrics answers 401 without the token or with a
    wrong one (header or query) and 200 with it; the probes /healthz and /readyz stay open."""
    async def main():
        async with running_server(auth_token=TOKEN, protect_metrics=True) as (server, _):
            get = lambda target, h=None: _http(server.port, target, h)  # noqa: E731
            refused = [await get("/metrics"), await get("/metrics", {"Authorization": "Bearer x"}),
                       await get("/metrics?token=x"),
                       await get("/metrics", {"Authorization": f"Bearer {TOKEN}x"})]
            allowed = [await get("/metrics", {"Authorization": f"Bearer {TOKEN}"}),
                       await get(f"/metrics?token={TOKEN}")]
            probes = [await get("/healthz"), await get("/readyz")]
            return refused, allowed, probes

    refused, allowed, probes = run(main())
    assert [s for s, _ in refused] == [401] * len(refused)
    assert all(b"streamtok_" not in body for _, body in refused)
    assert [s for s, _ in allowed] == [200, 200] and b"streamtok_up 1" in allowed[0][1]
    assert [s for s, _ in probes] == [200, 200]


def _request(authorization: str | None = None, path: str = "/") -> Request:
    headers = Headers()
    if authorization is not None:
        headers["Authorization"] = authorization
    return Request(path, headers)


def test_token_check_compares_every_configured_token_in_constant_time(monkeypatch):
    """`_authorized` runs ``hmac.compare_digest`` on bytes against every configured token,
    whichever matches and also when none does (no early exit, no ``==``), and refuses
    non-ASCII or empty tokens without raising."""
    tokens = ["alpha-" + "a" * 20, "bravo-" + "b" * 30, "charlie-" + "c" * 10]
    server = StreamtokServer(ServerConfig(port=0, models=["tiny"], auth_token=tokens[0],
                                          auth_tokens=tokens[1:]), {"tiny": TINY})
    calls: list[tuple[object, object]] = []

    def spy(a, b):
        calls.append((a, b))
        return __import__("hmac").compare_digest(a, b)

    monkeypatch.setattr(app_module, "hmac", types.SimpleNamespace(compare_digest=spy))
    presented = {
        "Bearer " + tokens[0]: True, "Bearer " + tokens[1]: True, "Bearer " + tokens[2]: True,
        "Bearer " + tokens[2][:-1]: False, "Bearer nope": False, "Bearer ": False, None: False,
        "Bearer t\u00f6k\u00e9n": False, "bearer " + tokens[1]: True,
    }
    for header, expected in presented.items():
        calls.clear()
        assert server._authorized(_request(header)) is expected, header
        assert len(calls) == len(tokens), (header, calls)
        assert [b for _, b in calls] == [t.encode() for t in tokens]
        assert all(type(a) is bytes and type(b) is bytes for a, b in calls)
        assert len({a for a, _ in calls}) == 1  # the same presented token each time
    calls.clear()
    assert server._authorized(_request(path=f"/?token={tokens[2]}")) is True
    assert len(calls) == len(tokens)


# --------------------------------------------------------------------------------------------
# Origin


def test_origin_allowlist_is_exact():
    """Only listed origins (exact scheme, host and port) may open a session: look-alike
    hosts, another scheme or port, a trailing slash and the opaque ``null`` origin get
    `forbidden_origin` (4403); a client sending no Origin (not a browser) is served."""
    allowed = "https://ok.example"

    async def main():
        async with running_server(allowed_origins=[allowed, "http://localhost:8080"]) as (_, url):
            refused = [await _ws_refusal(url, origin=o) for o in (
                "https://evil.example", "https://ok.example.evil.example", "http://ok.example",
                "https://ok.example:444", "https://ok.example/", "null", "https://sub.ok.example",
                "http://localhost:8081", "http://localhost")]
            served = [await _ws_refusal(url, origin=o) for o in (allowed, "http://localhost:8080")]
            served.append(await _ws_refusal(url))
            return refused, served

    refused, served = run(main())
    assert refused == [("forbidden_origin", 4403)] * len(refused)
    assert served == [("ready", 1000)] * 3


# --------------------------------------------------------------------------------------------
# Static files

TRAVERSALS = [
    "/static/../app.py", "/static/%2e%2e/app.py", "/static/%2E%2E/app.py", "/static/%2e%2e%2fapp.py",
    "/static/..%2fapp.py", "/static/..%2Fconfig.py", "/static/%252e%252e/app.py",
    "/static/../../server/app.py", "/static/../static/../app.py", "/static/./../app.py",
    "/static/..", "/static/", "/static/%2e%2e", "/static/..\\app.py", "/static/..%5capp.py",
    "/static//etc/passwd", "/static/%2fetc%2fpasswd", "/static/%2Fetc/passwd",
    "/static/../../../../../../../../etc/passwd", "/static/app.js%00.html", "/static/%00",
    "http://127.0.0.1/static/../app.py", "/%2e%2e/app.py", "/../app.py",
    "/static/" + "../" * 40 + "etc/passwd",
]


def test_static_files_refuse_path_traversal():
    """Every way out of the static folder (``..`` plain or percent-encoded, double encoding,
    backslashes, absolute paths, NUL bytes, absolute-form targets) is 404 and shows nothing
    of the file aimed at; the page's own files are served."""
    async def main():
        async with running_server() as (server, _):
            out = [(t, *(await _http(server.port, t))) for t in TRAVERSALS]
            ok = await _http(server.port, "/static/app.js")
            return out, ok

    out, ok = run(main())
    for target, status, body in out:
        assert status == 404, target
        assert b"import" not in body and b"root:" not in body, target
    assert ok[0] == 200 and b"WebSocket" in ok[1]


def test_static_files_refuse_symlinks_out_of_the_folder(tmp_path, monkeypatch):
    """A symlink inside the static folder that points outside it (a file or a folder) is 404;
    one that stays inside is served."""
    root = tmp_path / "static"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.txt").write_text("top secret\n")
    (root / "index.html").write_text("<p>page</p>\n")
    (root / "app.js").write_text("// app\n")
    (root / "file_out").symlink_to(outside / "secret.txt")
    (root / "dir_out").symlink_to(outside, target_is_directory=True)
    (root / "abs_out").symlink_to("/etc/passwd")
    (root / "inside").symlink_to(root / "app.js")
    monkeypatch.setattr(app_module, "STATIC_DIR", root)

    async def main():
        async with running_server() as (server, _):
            get = lambda t: _http(server.port, t)  # noqa: E731
            return ([await get(t) for t in ("/static/file_out", "/static/dir_out/secret.txt",
                                            "/static/abs_out", "/static/dir_out/../outside/secret.txt")],
                    [await get(t) for t in ("/", "/static/app.js", "/static/inside")])

    refused, served = run(main())
    assert [s for s, _ in refused] == [404] * 4
    assert all(b"secret" not in b and b"root:" not in b for _, b in refused)
    assert [s for s, _ in served] == [200, 200, 200] and served[2][1] == b"// app\n"


# --------------------------------------------------------------------------------------------
# Rate limits


def test_message_rate_limit_slows_a_flood_without_losing_audio():
    """Over ``max_messages_per_s`` the server reads slower: 240 small packets at 200 messages/s
    (20 of burst) take at least the ~1.1 s that implies, and every frame still arrives once,
    in order, with the offline codes."""
    audio = speech(3.0)  # 240 packets of 200 samples
    rate, burst_s, packets = 200.0, 0.1, 240

    async def main():
        async with running_server(max_messages_per_s=rate, rate_burst_s=burst_s,
                                  max_bytes_per_s=0) as (_, url):
            c = await StreamtokClient.connect(url, model="tiny", format="f32le")
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            for i in range(packets):
                await c.send_audio(audio[i * 200:(i + 1) * 200])
            await c.end()
            return loop.time() - t0, c

    elapsed, c = run(main())
    assert elapsed >= (packets - rate * burst_s) / rate * 0.9, elapsed
    assert [f.index for f in c.frames] == list(range(len(c.frames))) and not c.errors
    assert_same_codes(TINY, c.codes(), audio, 16000, "f32le")


# --------------------------------------------------------------------------------------------
# Logs

MARKER = b"ZQXJKVWY"  # 8 bytes of s16le audio, easy to find in any encoding


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info:
            text += logging.Formatter().formatException(record.exc_info)
        self.lines.append(f"{record.name}: {text}")


@contextlib.contextmanager
def _capture(*names: str):
    handler = _Capture()
    saved = []
    for name in names:
        logger = logging.getLogger(name)
        saved.append((logger, logger.level))
        logger.setLevel(logging.DEBUG)
        logger.addHandler(handler)
    try:
        yield handler
    finally:
        for logger, level in saved:
            logger.removeHandler(handler)
            logger.setLevel(level)


def _secrets_in(lines: list[str]) -> list[str]:
    """Lines showing the token, or the audio as bytes, hex (spaced or not) or base64."""
    needles = [TOKEN, MARKER.decode(), MARKER.hex(), MARKER.hex(" "), repr(MARKER)[2:-1]]
    run_ = MARKER * 6
    needles += [base64.b64encode(run_[i:])[8:24].decode() for i in range(3)]
    return [line for line in lines if any(n in line for n in needles)]


async def _session_with_token_and_audio(url: str) -> None:
    pcm = MARKER * 4000  # 2 s of s16le
    for kwargs in ({"token": TOKEN}, {}):
        target = url if kwargs else f"{url}/?token={TOKEN}"
        c = await StreamtokClient.connect(target, model="tiny", format="s16le", **kwargs)
        for i in range(0, len(pcm), 6400):
            await c.send_audio(pcm[i:i + 6400])
        await c.end()
    with contextlib.suppress(Exception):  # and a refused one, with a near miss of the token
        await _ws_refusal(url, {"Authorization": f"Bearer {TOKEN[:-2]}"})


def test_streamtok_logs_never_show_the_token_or_audio():
    """At DEBUG, no ``streamtok.*`` log line of a session with a token (header and query),
    its audio, and a refused near-miss token shows the token or any of the audio bytes."""
    with _capture("streamtok") as logs:
        async def main():
            async with running_server(auth_token=TOKEN) as (_, url):
                await _session_with_token_and_audio(url)
        run(main())
    assert any("session" in line for line in logs.lines)  # the capture did see the server
    assert _secrets_in(logs.lines) == []


def test_websockets_debug_logs_never_show_the_token_or_audio():
    """At DEBUG, the ``websockets`` library's log lines for the same sessions show neither the
    token nor the audio bytes."""
    with _capture("websockets") as logs:
        async def main():
            async with running_server(auth_token=TOKEN) as (_, url):
                await _session_with_token_and_audio(url)
        run(main())
    assert len(logs.lines) > 20
    assert _secrets_in(logs.lines) == []


# --------------------------------------------------------------------------------------------
# TLS


def _self_signed(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1/localhost (openssl CLI, else ``cryptography``)."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    if shutil.which("openssl"):
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
             "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
            check=True, capture_output=True)
        return cert, key
    crypto = pytest.importorskip("cryptography", reason="needs the openssl CLI or cryptography")
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    del crypto
    pk = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    c = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(pk.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
         .not_valid_after(now + datetime.timedelta(days=2))
         .add_extension(x509.SubjectAlternativeName(
             [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), False)
         .sign(pk, hashes.SHA256()))
    cert.write_bytes(c.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(pk.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    return cert, key


def test_tls_serves_wss_and_https_and_refuses_plain_and_untrusted(tmp_path):
    """With ``certfile``/``keyfile`` a client trusting the certificate streams over ``wss://``
    to the offline codes and reads /healthz over HTTPS; plain ``ws://`` to the same port fails,
    and so does a client that does not trust the certificate."""
    cert, key = _self_signed(tmp_path)
    trusting = ssl.create_default_context(cafile=str(cert))
    audio = speech(1.5)

    async def main():
        async with running_server(certfile=str(cert), keyfile=str(key)) as (server, url):
            wss = url.replace("ws://", "wss://")
            c = await StreamtokClient.connect(wss, model="tiny", format="f32le", ssl=trusting)
            await c.send_audio(audio)
            await c.end()
            health = await _http(server.port, "/healthz", tls=trusting)
            plain_error = untrusted_error = None
            try:
                async with connect(url, open_timeout=5) as ws:
                    await ws.send(msgpack.packb(START))
                    await ws.recv()
            except (InvalidMessage, InvalidHandshake, ConnectionClosed, OSError, EOFError) as e:
                plain_error = e
            try:
                async with connect(wss, open_timeout=5, ssl=ssl.create_default_context()):
                    pass
            except ssl.SSLCertVerificationError as e:
                untrusted_error = e
            return c, health, plain_error, untrusted_error

    c, health, plain_error, untrusted_error = run(main())
    assert_same_codes(TINY, c.codes(), audio, 16000, "f32le")
    assert health == (200, b"ok\n")
    assert plain_error is not None
    assert untrusted_error is not None


def test_tls_with_a_token_still_needs_the_token(tmp_path):
    """TLS does not stand in for authentication: over ``wss://`` a missing token is refused."""
    cert, key = _self_signed(tmp_path)
    trusting = ssl.create_default_context(cafile=str(cert))

    async def main():
        async with running_server(certfile=str(cert), keyfile=str(key), auth_token=TOKEN) as (_, url):
            wss = url.replace("ws://", "wss://")
            return (await _ws_refusal(wss, ssl=trusting),
                    await _ws_refusal(wss, {"Authorization": f"Bearer {TOKEN}"}, ssl=trusting))

    assert run(main()) == (("unauthorized", 4401), ("ready", 1000))


def test_resume_tokens_are_random_and_long():
    """Resume tokens come from ``secrets`` (24 random bytes, url-safe): distinct and long."""
    audio = np.zeros(640, np.float32)

    async def main():
        async with running_server() as (_, url):
            tokens = []
            for _ in range(5):
                c = await StreamtokClient.connect(url, model="tiny", format="f32le")
                await c.send_audio(audio)
                tokens.append(c.ready.resume_token)
                await c.end()
            return tokens

    tokens = run(main())
    assert len(set(tokens)) == 5 and all(len(t) >= 32 for t in tokens)
