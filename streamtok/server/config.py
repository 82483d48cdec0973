"""Server configuration: one object, loaded once from a TOML file < environment < flags."""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from streamtok.errors import StreamtokError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_CONFIG_PATH = Path("/etc/streamtok/streamtok.toml")
ENV_PREFIX = "STREAMTOK_"


class ConfigError(StreamtokError):
    """A configuration value that cannot be used."""


@dataclass
class ServerConfig:
    """Every setting of the daemon. See ``docs/streamtok.example.toml`` for each one explained."""

    host: str = "127.0.0.1"
    port: int = 8765
    models: list[str] = field(default_factory=lambda: ["default"])
    weights: dict[str, str] = field(default_factory=dict)  # model -> weights path
    device: Literal["cpu", "cuda"] = "cpu"
    threads: int | None = None  # torch threads for the engine (None: torch's default)
    max_sessions: int = 64  # per model and kind (encode / decode)
    max_message_bytes: int = 1 << 20
    max_frames_per_step: int = 16
    idle_timeout_s: float = 60.0
    max_messages_per_s: float = 1000.0  # per connection; beyond it the server reads slower (0: off)
    max_bytes_per_s: float = 8e6  # per connection, with rate_burst_s of credit (0: off)
    rate_burst_s: float = 4.0
    buffer_seconds: float = 30.0  # per-session input not yet computed; beyond it the server reads slower
    send_queue_messages: int = 512  # per-connection output backlog before `slow_consumer`
    auth_token: str | None = None
    auth_tokens: list[str] = field(default_factory=list)  # more accepted tokens, one per client
    allowed_origins: list[str] = field(default_factory=list)  # empty: any Origin
    protect_metrics: bool = False  # /metrics needs the bearer token too (when tokens are set)
    certfile: str | None = None
    keyfile: str | None = None
    shutdown_timeout_s: float = 10.0
    stats_interval_s: float = 5.0
    latency_target_ms: float | None = None  # tuner target p95 (default: one frame + 20 ms)
    pin_frames_per_step: int | None = None  # operator pin of the tuner's frames per step
    pin_hint_ms: int | None = None  # operator pin of the client send-size hint
    resume_grace_s: float = 30.0  # keep a dropped session this long for resume (0: no resume)
    resume_buffer_s: float = 60.0  # frames kept for replay until acknowledged
    stall_timeout_s: float = 10.0  # engine loop silent this long: /readyz fails, watchdog stops
    log_level: str = "info"

    @classmethod
    def load(cls, path: str | Path | None = None, env: dict[str, str] | None = None,
             overrides: dict[str, Any] | None = None) -> ServerConfig:
        """File (``path``, else /etc/streamtok/streamtok.toml if present) < env < overrides."""
        values: dict[str, Any] = {}
        file = Path(path) if path else (DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None)
        if file is not None:
            try:
                values |= tomllib.loads(file.read_text())
            except (OSError, tomllib.TOMLDecodeError) as e:
                raise ConfigError(f"cannot read config {file}: {e}") from e
        env = os.environ if env is None else env
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for name, f in fields.items():
            raw = env.get(ENV_PREFIX + name.upper())
            if raw is not None:
                values[name] = _from_env(name, raw, str(f.type))
        values |= {k: v for k, v in (overrides or {}).items() if v is not None}
        unknown = set(values) - set(fields)
        if unknown:
            raise ConfigError(f"unknown config keys: {sorted(unknown)}")
        cfg = cls(**values)
        cfg.validate()
        return cfg

    @property
    def tokens(self) -> list[str]:
        """Every accepted bearer token (empty: no authentication)."""
        return ([self.auth_token] if self.auth_token else []) + list(self.auth_tokens)

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be 0..65535, got {self.port}")
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.max_sessions < 1 or self.max_frames_per_step < 1:
            raise ConfigError("max_sessions and max_frames_per_step must be >= 1")
        pin = self.pin_frames_per_step
        if pin is not None and not 1 <= pin <= self.max_frames_per_step:
            raise ConfigError(f"pin_frames_per_step must be 1..max_frames_per_step "
                              f"({self.max_frames_per_step}), got {pin}")
        if self.stall_timeout_s <= 0:
            raise ConfigError("stall_timeout_s must be > 0")
        if bool(self.certfile) != bool(self.keyfile):
            raise ConfigError("TLS needs both certfile and keyfile")
        if not self.models:
            raise ConfigError("serve at least one model")


def _from_env(name: str, raw: str, annotation: str) -> Any:
    """Parse ``STREAMTOK_<NAME>`` by the field's declared type (``int | None`` -> int, ...)."""
    kind = annotation.replace(" ", "")
    try:
        if kind.startswith("bool"):
            return raw.strip().lower() in ("1", "true", "yes", "on")
        if kind.startswith("int"):
            return int(raw)
        if kind.startswith("float"):
            return float(raw)
        if kind.startswith("list"):
            return [x.strip() for x in raw.split(",") if x.strip()]
        if kind.startswith("dict"):  # NAME=PATH,NAME=PATH
            return dict(item.split("=", 1) for item in raw.split(",") if "=" in item)
    except ValueError as e:
        raise ConfigError(f"{ENV_PREFIX}{name.upper()}={raw!r}: {e}") from e
    return raw
