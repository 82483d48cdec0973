"""Scale-out: real nginx with deploy/nginx.conf in front of two streamtok instances on loopback;
concurrent sessions through it get correct codes and are spread over both instances."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from streamtok.client import StreamtokClient
from streamtok.models.quantization import compare_codes
from streamtok.models.registry import load_model
from streamtok.server.app import StreamtokServer
from streamtok.server.config import ServerConfig
from streamtok.tokenize_file import encode_array

REPO = Path(__file__).resolve().parent.parent
NGINX = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin:/sbin")
pytestmark = pytest.mark.skipif(
    NGINX is None, reason="nginx not installed (Debian: apt-get install nginx; .ci/run does)")

SESSIONS = 20
RATE = 16000

MAIN_CONF = """\
daemon off;
master_process on;
worker_processes 2;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log info;
{user}
events {{ worker_connections 256; }}
http {{
    access_log {tmp}/access.log;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    include {tmp}/streamtok.conf;
}}
"""


def site_conf(listen_port: int, upstream_ports: list[int]) -> str:
    """deploy/nginx.conf as shipped, but listening on a loopback test port in front of the
    test's instances (only the listen and upstream server lines change)."""
    text = (REPO / "deploy/nginx.conf").read_text()
    text, n_listen = re.subn(r"^(\s*)listen 80;$", rf"\1listen 127.0.0.1:{listen_port};", text,
                             flags=re.M)
    text, n_v6 = re.subn(r"^\s*listen \[::\]:80;\n", "", text, flags=re.M)
    servers = "".join(f"    server 127.0.0.1:{p} max_fails=3 fail_timeout=10s;\n"
                      for p in upstream_ports)
    text, n_up = re.subn(r"(?:^    server 127\.0\.0\.1:\d+ [^\n]*;\n)+", servers, text, count=1,
                         flags=re.M)
    assert (n_listen, n_v6, n_up) == (1, 1, 1), "deploy/nginx.conf changed shape: update the test"
    return text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_nginx(tmp: Path, upstream_ports: list[int]) -> Iterator[int]:
    """nginx in the foreground (daemon off) with every path in ``tmp``; stopped on exit."""
    port = free_port()
    (tmp / "streamtok.conf").write_text(site_conf(port, upstream_ports))
    # as root the master drops workers to "nobody", who could not use the test's temp folder
    user = "user root;" if os.geteuid() == 0 else ""
    (tmp / "nginx.conf").write_text(MAIN_CONF.format(tmp=tmp, user=user))
    argv = [NGINX, "-p", str(tmp), "-e", str(tmp / "error.log"), "-c", str(tmp / "nginx.conf")]
    check = subprocess.run([*argv, "-t"], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, f"nginx exited: {proc.stdout.read()}"
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            assert time.monotonic() < deadline, "nginx did not listen"
            time.sleep(0.05)
        yield port
    finally:
        proc.send_signal(signal.SIGQUIT)  # graceful: workers finish, master exits
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def session_audio(i: int, seconds: float = 1.6) -> np.ndarray:
    """A different seeded signal per session (a chirp from its own pitch, plus noise), so a
    session that got another's tokens would fail."""
    t = np.arange(int(RATE * seconds)) / RATE
    f0 = 120 + 35 * i
    rng = np.random.default_rng(i)
    audio = 0.3 * np.sin(2 * np.pi * f0 * t * (1 + 0.5 * t)) + 0.05 * rng.standard_normal(len(t))
    return audio.astype(np.float32)


def assert_same_codes(model, codes: np.ndarray, audio: np.ndarray) -> None:
    """Codes equal the offline encode but for near-ties (see tests/test_server.py)."""
    ref = encode_array(model, audio, RATE, latents=True)
    assert codes.shape == ref.codes.shape
    cmp = compare_codes(model.quantizer, torch.from_numpy(ref.latents), torch.from_numpy(ref.codes),
                        torch.from_numpy(codes))
    assert cmp.failing == 0, cmp
    assert cmp.excused <= max(1, codes.shape[1] // 50), cmp


async def one_session(url: str, i: int) -> np.ndarray:
    audio = session_audio(i)
    rng = np.random.default_rng(100 + i)
    client = await StreamtokClient.connect(url, model="tiny", sample_rate=RATE, format="f32le")
    pos = 0
    while pos < len(audio):
        n = int(rng.integers(100, 2000))
        await client.send_audio(audio[pos:pos + n])
        pos += n
        await asyncio.sleep(0.005)  # keep the sessions open together, as live streams are
    await client.end()
    return client.codes()


def test_sessions_through_nginx_are_correct_and_spread_over_instances(tmp_path):
    """20 concurrent sessions through nginx (least_conn) all get their offline codes, and both
    instances serve some; /healthz passes through."""
    model = load_model("tiny")

    async def main():
        servers = [StreamtokServer(ServerConfig(port=0, models=["tiny"], threads=1,
                                                idle_timeout_s=30.0), {"tiny": model})
                   for _ in range(2)]
        started = []
        try:
            for s in servers:
                await s.start()
                started.append(s)
            with running_nginx(tmp_path, [s.port for s in servers]) as port:
                health = await asyncio.to_thread(
                    lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)
                    .read().decode())
                codes = await asyncio.gather(*(one_session(f"ws://127.0.0.1:{port}", i)
                                               for i in range(SESSIONS)))
            served = [int(s.metrics.sessions_total.value(model="tiny")) for s in servers]
            return health, codes, served
        finally:
            for s in started:
                await s.shutdown()

    health, codes, served = asyncio.run(asyncio.wait_for(main(), 180))
    assert health.strip() == "ok"
    upgrades = re.findall(r'"GET / HTTP/1.1" 101 ', (tmp_path / "access.log").read_text())
    assert len(upgrades) == SESSIONS  # every session went through nginx
    assert sum(served) == SESSIONS and min(served) >= SESSIONS // 4, served
    for i, c in enumerate(codes):
        assert_same_codes(model, c, session_audio(i))
