"""systemd integration: the units verify cleanly, `install-systemd` puts them in place, and the
daemon speaks sd_notify (READY, WATCHDOG, STOPPING) to a real NOTIFY_SOCKET and takes a
socket passed by systemd (LISTEN_FDS)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
from websockets.asyncio.client import connect

from streamtok import deploy
from streamtok.client import StreamtokClient
from streamtok.engine.engine import ModelEngine
from streamtok.models.registry import load_model
from streamtok.server import app as app_module
from streamtok.server.activation import inherited_socket
from streamtok.server.app import StreamtokServer
from streamtok.server.config import ServerConfig, tomllib
from streamtok.server.sdnotify import SdNotifier

REPO = Path(__file__).resolve().parent.parent
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None,
    reason="systemd-analyze not installed (Debian: apt-get install systemd; .ci/run does)")


def streamtok_executable() -> str:
    """The streamtok script of the environment running the tests (what install-systemd uses)."""
    path = deploy.default_executable()
    if " " in path:
        pytest.skip("no streamtok script installed in this environment (pip install -e .)")
    return path


@pytest.fixture
def installed(tmp_path: Path) -> Path:
    """The units and config as `streamtok install-systemd --root tmp_path` installs them."""
    deploy.install_systemd(tmp_path, executable=streamtok_executable(), out=lambda _: None)
    return tmp_path


def analyze(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([SYSTEMD_ANALYZE, *args], capture_output=True, text=True, timeout=60)


def assert_verifies(*units: Path) -> None:
    """`systemd-analyze verify` passes and says nothing about these units (unknown keys and
    bad values are only warnings, so its exit status alone is not enough)."""
    res = analyze("verify", *map(str, units))
    out = res.stdout + res.stderr
    names = {u.name for u in units} | {u.name.split("@")[0] for u in units}
    ours = [line for line in out.splitlines() if any(n in line for n in names)]
    assert res.returncode == 0 and not ours, out


# -- unit files -------------------------------------------------------------------------------------
@needs_analyze
@pytest.mark.parametrize("unit", ["streamtok.service", "streamtok@8766.service", "streamtok.socket"])
def test_installed_unit_verifies(installed, unit):
    """Each installed unit (the template as instance 8766) passes `systemd-analyze verify`."""
    assert_verifies(installed / deploy.UNIT_DIR / unit)


@needs_analyze
def test_gpu_block_verifies(installed):
    """The commented GPU device block, uncommented, is valid systemd syntax."""
    unit = installed / deploy.UNIT_DIR / "streamtok.service"
    text = unit.read_text()
    gpu = re.sub(r"^#((?:PrivateDevices|DevicePolicy|DeviceAllow)=)", r"\1", text, flags=re.M)
    assert gpu.count("\nDeviceAllow=") >= 3 and "\nPrivateDevices=no" in gpu
    unit.write_text(gpu)
    assert_verifies(unit)


@needs_analyze
@pytest.mark.parametrize("unit", ["streamtok.service", "streamtok@8766.service"])
def test_hardening_exposure_is_low(installed, unit):
    """`systemd-analyze security` rates the hardened service's exposure at most 2.0 of 10."""
    res = analyze("security", "--offline=true", "--no-pager", str(installed / deploy.UNIT_DIR / unit))
    if "--offline" in res.stderr and res.returncode != 0:
        pytest.skip(f"this systemd-analyze has no offline security check: {res.stderr.strip()}")
    found = re.search(r"Overall exposure level for \S+: ([\d.]+)", res.stdout + res.stderr)
    assert found, res.stdout + res.stderr
    assert float(found.group(1)) <= 2.0, res.stdout


def test_units_agree_with_the_daemon():
    """Type=notify with the watchdog above stall_timeout_s, and stop timeout above the graceful
    shutdown timeout, in both services; the template passes its instance as the port; the
    socket listens where the daemon would by default."""
    cfg = ServerConfig()
    for name in ("streamtok.service", "streamtok@.service"):
        text = (REPO / "systemd" / name).read_text()
        keys = dict(re.findall(r"^(\w+)=(.*)$", text, re.M))
        assert keys["Type"] == "notify" and keys["NotifyAccess"] == "main"
        assert int(keys["WatchdogSec"]) > cfg.stall_timeout_s
        assert int(keys["TimeoutStopSec"]) > cfg.shutdown_timeout_s
        assert keys["ExecStart"].startswith(deploy.UNIT_EXECUTABLE + " serve --config /etc/streamtok/")
    assert "--port %i" in (REPO / "systemd" / "streamtok@.service").read_text()
    socket_unit = (REPO / "systemd" / "streamtok.socket").read_text()
    assert re.findall(r"^ListenStream=(.*)$", socket_unit, re.M) == [f"{cfg.host}:{cfg.port}"]


# -- install-systemd ----------------------------------------------------------------------------
def test_install_puts_every_file_in_place(installed):
    """Units point ExecStart at this environment's streamtok; the env file is root-only."""
    exe = streamtok_executable()
    for f in deploy.FILES:
        path = installed / f.target
        assert path.is_file() and path.stat().st_mode & 0o777 == f.mode, path
    service = (installed / deploy.UNIT_DIR / "streamtok.service").read_text()
    assert f"ExecStart={exe} serve --config /etc/streamtok/streamtok.toml" in service
    assert deploy.UNIT_EXECUTABLE not in service.replace("#", "")


def test_install_dry_run_writes_nothing(tmp_path):
    """--dry-run reports every file it would create and the systemctl steps, and writes nothing."""
    lines: list[str] = []
    steps = deploy.install_systemd(tmp_path, dry_run=True, executable="/opt/st/bin/streamtok",
                                   out=lines.append)
    assert [s.action for s in steps] == ["create"] * len(deploy.FILES)
    assert list(tmp_path.iterdir()) == []
    text = "\n".join(lines)
    assert "would create" in text and "systemctl daemon-reload" in text
    assert "systemctl enable --now streamtok.service" in text


def test_install_keeps_edited_config_and_replaces_units(installed):
    """A second install replaces changed units but keeps an edited config unless --force."""
    config = installed / deploy.CONFIG_DIR / "streamtok.toml"
    unit = installed / deploy.UNIT_DIR / "streamtok.socket"
    config.write_text('port = 9000\n')
    unit.write_text("[Socket]\n")
    steps = {s.file.source: s.action for s in
             deploy.install_systemd(installed, executable=streamtok_executable(), out=lambda _: None)}
    assert config.read_text() == "port = 9000\n" and steps["docs/streamtok.example.toml"] == "keep"
    assert steps["systemd/streamtok.socket"] == "replace" and "ListenStream=" in unit.read_text()
    assert steps["systemd/streamtok.service"] == "unchanged"
    deploy.install_systemd(installed, executable=streamtok_executable(), force=True,
                           out=lambda _: None)
    assert config.read_text() == (REPO / "docs/streamtok.example.toml").read_text()


def test_install_warns_about_hidden_executable(tmp_path):
    """An ExecStart under /home (hidden by ProtectHome=yes) is reported."""
    lines: list[str] = []
    deploy.install_systemd(tmp_path, dry_run=True, executable="/home/me/.venv/bin/streamtok",
                           out=lines.append)
    assert any(line.startswith("warning:") and "ProtectHome" in line for line in lines)


def test_example_config_lists_every_field_at_its_default():
    """docs/streamtok.example.toml names every ServerConfig key; uncommented it loads, and the
    keys that have a value by default show that value."""
    text = (REPO / "docs/streamtok.example.toml").read_text()
    uncommented = re.sub(r"^# ((?:\[?\w+\]?)(?: = .*)?)$", r"\1", text, flags=re.M)
    values = tomllib.loads(uncommented)
    defaults = ServerConfig()
    assert set(values) == {f.name for f in fields(ServerConfig)}
    for name, value in values.items():
        if getattr(defaults, name) not in (None, {}, []):  # these show an example instead
            assert value == getattr(defaults, name), name
    with tempfile.NamedTemporaryFile("w", suffix=".toml") as f:
        f.write(uncommented)
        f.flush()
        ServerConfig.load(f.name, env={})
        f.seek(0)
        f.truncate()
        f.write(text)
        f.flush()
        assert ServerConfig.load(f.name, env={}) == defaults  # as installed: all defaults


# -- sd_notify ---------------------------------------------------------------------------------------
class NotifySocket:
    """The receiving end of $NOTIFY_SOCKET, as systemd binds it: an AF_UNIX datagram socket."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="st-notify-")  # short: AF_UNIX paths are <= 107 bytes
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setblocking(False)
        self.messages: list[tuple[float, str]] = []  # (arrival, datagram), monotonic clock

    def poll(self) -> list[tuple[float, str]]:
        """Collect every datagram waiting now; return all received so far."""
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return self.messages
            self.messages.append((time.monotonic(), data.decode()))

    async def collect(self, seconds: float, step: float = 0.01) -> list[tuple[float, str]]:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.poll()
            await asyncio.sleep(step)
        return self.poll()

    async def wait_for(self, line: str, timeout: float = 30.0) -> float:
        """Arrival time of the first datagram holding ``line``."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for t, msg in self.poll():
                if line in msg.splitlines():
                    return t
            await asyncio.sleep(0.01)
        raise AssertionError(f"no {line} within {timeout} s; got {self.messages}")

    def times(self, line: str) -> list[float]:
        return [t for t, msg in self.poll() if line in msg.splitlines()]

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    sock = NotifySocket()
    yield sock
    sock.close()


def config(**overrides) -> ServerConfig:
    return ServerConfig(**({"port": 0, "models": ["tiny"], "threads": 1, "idle_timeout_s": 30.0}
                           | overrides))


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


def get_status(port: int, path: str) -> int:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5).status
    except urllib.error.HTTPError as e:
        return e.code


def test_ready_only_after_models_are_loaded_and_warm(notify, monkeypatch):
    """No READY=1 while the model warms up; it comes once, with STATUS, when /readyz is 200."""
    warm_up = ModelEngine._warm_up

    def slow_warm_up(engine):  # warm-up runs on the engine thread: the loop stays free to watch
        time.sleep(0.4)
        warm_up(engine)

    monkeypatch.setattr(ModelEngine, "_warm_up", slow_warm_up)

    async def main():
        server = StreamtokServer(config(), notifier=SdNotifier(notify.path))
        start = asyncio.create_task(server.start())
        before_ready = 0  # observations while the models were not yet warm and serving
        while not start.done():
            warm = bool(server.engines) and all(e.warm for e in server.engines.values())
            if not (warm and server.ready):
                assert notify.poll() == [], "READY=1 before the models were warm"
                before_ready += 1
            await asyncio.sleep(0.005)
        await start
        try:
            await notify.wait_for("READY=1")
            readyz = await asyncio.to_thread(get_status, server.port, "/readyz")
            return before_ready, readyz, [m for _, m in notify.poll()], server.engines["tiny"].warm
        finally:
            await server.shutdown()
            server.notifier.close()

    before_ready, readyz, messages, warm = run(main())
    assert before_ready >= 10 and warm and readyz == 200
    assert messages[0].splitlines()[0] == "READY=1"
    assert re.search(r"^STATUS=serving tiny on port \d+$", messages[0], re.M)
    assert sum("READY=1" in m.splitlines() for m in messages) == 1


def test_watchdog_pings_periodically_and_stop_while_an_engine_stalls(notify, monkeypatch):
    """WATCHDOG=1 comes every WATCHDOG_USEC/2; while a model step hangs past stall_timeout_s
    the pings stop and /readyz is 503; when the step returns they resume.

    stall_timeout_s is 1.5 s: an idle engine loop only comes round once a second."""
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # ping every 0.1 s
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    model = load_model("tiny")  # our own instance: its encode_step is patched below
    entered, release = threading.Event(), threading.Event()
    step = model.encode_step

    def hanging_step(*args, **kwargs):  # a model step stuck on the engine thread
        entered.set()
        release.wait(30)
        return step(*args, **kwargs)

    async def main():
        server = StreamtokServer(config(stall_timeout_s=1.5), {"tiny": model},
                                 notifier=SdNotifier(notify.path))
        await server.start()
        try:
            t0 = time.monotonic()
            await notify.collect(1.0)
            healthy = [t for t in notify.times("WATCHDOG=1") if t >= t0]
            monkeypatch.setattr(model, "encode_step", hanging_step)
            client = await StreamtokClient.connect(f"ws://127.0.0.1:{server.port}", model="tiny",
                                                   format="f32le")
            await client.send_audio(np.zeros(3200, np.float32))
            assert await asyncio.to_thread(entered.wait, 10), "the engine never stepped"
            t_hang = time.monotonic()
            await notify.collect(2.6)
            readyz = await asyncio.to_thread(get_status, server.port, "/readyz")
            t_release = time.monotonic()
            release.set()
            await notify.collect(1.0)
            await client.end()
            await client.close()
            return healthy, t0, t_hang, t_release, notify.times("WATCHDOG=1"), readyz
        finally:
            release.set()
            await server.shutdown()
            server.notifier.close()

    healthy, t0, t_hang, t_release, pings, readyz = run(main())
    assert len(healthy) >= 5, healthy  # ~10 expected in 1 s; slack for a loaded machine
    assert max(np.diff([t0, *healthy])) < 0.5
    # stalled from t_hang + stall_timeout_s at the latest; then one ping interval to notice,
    # and slack for when the datagram is read
    assert [t for t in pings if t_hang + 2.0 < t < t_release] == []
    assert readyz == 503
    assert len([t for t in pings if t > t_release]) >= 3


def test_stopping_at_shutdown_and_no_watchdog_after(notify, monkeypatch):
    """shutdown() sends STOPPING=1 first; no WATCHDOG=1 follows, and the session is flushed."""
    monkeypatch.setenv("WATCHDOG_USEC", "100000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)

    async def main():
        server = StreamtokServer(config(), notifier=SdNotifier(notify.path))
        await server.start()
        try:
            client = await StreamtokClient.connect(f"ws://127.0.0.1:{server.port}", model="tiny",
                                                   format="f32le")
            await client.send_audio(np.zeros(6400, np.float32))
            await client.ping()
            await notify.collect(0.3)
            t_stop = time.monotonic()
            await server.shutdown()
            await asyncio.wait_for(client.ws.wait_closed(), 10)
            await notify.collect(0.3)
            return t_stop, notify.poll(), client.ws.close_code, client.codes().shape
        finally:
            await server.shutdown()
            server.notifier.close()

    t_stop, messages, close, shape = run(main())
    stopping = [i for i, (_, m) in enumerate(messages) if m == "STOPPING=1"]
    assert len(stopping) == 1 and messages[stopping[0]][0] >= t_stop
    assert messages[stopping[0] + 1:] == []  # nothing after it, watchdog pings included
    assert any(m == "WATCHDOG=1" for t, m in messages if t < t_stop)
    assert close == 1001 and shape[1] == 10  # 6400 samples: 10 frames of 640, all flushed


# -- the real daemon as systemd runs it ----------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def daemon(argv: list[str], env: dict[str, str]) -> Iterator[subprocess.Popen]:
    """A subprocess, stopped with SIGTERM (then killed) however the test ends."""
    proc = subprocess.Popen(argv, env=os.environ | env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_streamtok_serve_notifies_like_a_type_notify_service(notify, tmp_path):
    """`streamtok serve` with NOTIFY_SOCKET and WATCHDOG_USEC set, as systemd starts it: READY=1
    once it answers, WATCHDOG=1 pings, and on SIGTERM STOPPING=1 and exit status 0."""
    port = free_port()
    (tmp_path / "empty.toml").write_text("")
    argv = [streamtok_executable(), "--threads", "1", "serve", "--config", str(tmp_path / "empty.toml"),
            "--model", "tiny", "--port", str(port)]
    env = {"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "400000"}

    async def main(proc):
        await notify.wait_for("READY=1", timeout=60)
        readyz = await asyncio.to_thread(get_status, port, "/readyz")
        await notify.collect(1.0)
        proc.send_signal(signal.SIGTERM)
        await notify.wait_for("STOPPING=1", timeout=20)
        return readyz

    with daemon(argv, env) as proc:
        readyz = run(main(proc))
        out, _ = proc.communicate(timeout=30)
    assert readyz == 200 and proc.returncode == 0, out
    assert len(notify.times("WATCHDOG=1")) >= 3, notify.messages
    assert [m for _, m in notify.messages][-1] == "STOPPING=1"


# -- socket activation ---------------------------------------------------------------------------
SOCKET_ACTIVATE = shutil.which("systemd-socket-activate")

ECHO_SERVER = textwrap.dedent("""
    import asyncio, os, sys
    from websockets.asyncio.server import serve
    from streamtok.server.activation import inherited_socket

    async def main():
        sock = inherited_socket()
        assert sock is not None, "no socket passed"
        assert "LISTEN_FDS" not in os.environ and "LISTEN_PID" not in os.environ
        async def echo(ws):
            async for msg in ws:
                await ws.send(f"{os.getpid()}:{msg}")
        async with serve(echo, sock=sock) as server:
            await asyncio.sleep(30)

    asyncio.run(main())
""")


def test_inherited_socket_ignores_other_processes_and_absence():
    """No LISTEN_* variables, or LISTEN_PID of another process: no socket, variables cleared."""
    assert inherited_socket({}) is None
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "streamtok"}
    assert inherited_socket(env) is None and env == {}
    assert inherited_socket({"LISTEN_PID": "x", "LISTEN_FDS": "1"}) is None


@pytest.mark.skipif(SOCKET_ACTIVATE is None, reason="systemd-socket-activate not installed "
                    "(Debian's systemd package has it)")
def test_socket_passed_by_systemd_serves_websockets():
    """Under systemd-socket-activate (fd 3, LISTEN_FDS=1, LISTEN_PID), the socket that
    inherited_socket() returns serves WebSocket clients; a client connecting before the
    process exists waits in the backlog and is served once it starts."""
    port = free_port()
    argv = [SOCKET_ACTIVATE, "-l", f"127.0.0.1:{port}", sys.executable, "-c", ECHO_SERVER]

    async def main():
        for _ in range(100):  # until systemd-socket-activate listens
            with contextlib.suppress(OSError):
                async with connect(f"ws://127.0.0.1:{port}", open_timeout=30) as ws:
                    await ws.send("hello")
                    return await ws.recv()
            await asyncio.sleep(0.1)
        raise AssertionError("never connected")

    with daemon(argv, {}) as proc:
        reply = run(main())
        pid = int(reply.split(":")[0])
        assert reply.endswith(":hello") and pid == proc.pid  # the program replaced the activator


@pytest.mark.skipif(SOCKET_ACTIVATE is None, reason="systemd-socket-activate not installed")
@pytest.mark.skipif(not hasattr(app_module, "inherited_socket"),
                    reason="streamtok.server.app does not take a socket from systemd yet")
def test_streamtok_serve_under_socket_activation(notify, tmp_path):
    """`streamtok serve` started by systemd-socket-activate serves sessions on the socket it was
    given (not the config's port) and notifies READY=1."""
    port = free_port()
    (tmp_path / "empty.toml").write_text("")
    # systemd-socket-activate gives its child a bare environment: pass on what it needs
    passed = [f"NOTIFY_SOCKET={notify.path}"] + [f"{k}={os.environ[k]}" for k in ("PYTHONPATH",)
                                                  if k in os.environ]
    argv = [SOCKET_ACTIVATE, "-l", f"127.0.0.1:{port}", *(a for e in passed for a in ("-E", e)),
            streamtok_executable(), "--threads", "1", "serve", "--config", str(tmp_path / "empty.toml"),
            "--model", "tiny", "--port", str(free_port())]

    async def main():
        for _ in range(100):
            with contextlib.suppress(OSError):
                client = await StreamtokClient.connect(f"ws://127.0.0.1:{port}", model="tiny",
                                                       format="f32le", timeout=30)
                break
            await asyncio.sleep(0.1)
        await client.send_audio(np.zeros(6400, np.float32))
        await client.end()
        await notify.wait_for("READY=1")
        return client.codes().shape[1]

    with daemon(argv, {}) as proc:
        frames = run(main())
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert frames == 10 and proc.returncode == 0, out
