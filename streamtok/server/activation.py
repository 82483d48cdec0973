"""systemd socket activation: take over the listening socket systemd opened for us.

With ``streamtok.socket`` enabled, systemd binds the port itself and starts the service on the
first connection (or at boot), passing the listening socket as file descriptor 3 and saying so
in ``LISTEN_PID`` / ``LISTEN_FDS`` (``sd_listen_fds(3)``; no libsystemd needed). The socket
stays open across restarts of the service, so clients that connect while it restarts wait in
the listen backlog instead of being refused.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import MutableMapping

from streamtok.server.config import ConfigError

log = logging.getLogger("streamtok.server")

SD_LISTEN_FDS_START = 3  # the first passed descriptor, by sd_listen_fds(3)'s convention


def inherited_socket(env: MutableMapping[str, str] | None = None,
                     unset_environment: bool = True) -> socket.socket | None:
    """The listening socket systemd passed to this process, or ``None`` when started without
    one (then the server binds ``host:port`` itself).

    Only the first descriptor is used (one ``ListenStream=`` per socket unit); more are logged
    and left alone. ``LISTEN_PID`` must be this process: the variables leak into children, and
    a child must not take its parent's socket. By default the ``LISTEN_*`` variables are removed
    afterwards, as ``sd_listen_fds(1)`` does, so subprocesses never see them.
    """
    env = os.environ if env is None else env
    pid, fds = env.get("LISTEN_PID"), env.get("LISTEN_FDS")
    if unset_environment:
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(name, None)
    if not pid or not fds:
        return None
    try:
        if int(pid) != os.getpid():
            return None
        count = int(fds)
    except ValueError:
        log.warning("ignoring malformed LISTEN_PID=%r LISTEN_FDS=%r", pid, fds)
        return None
    if count < 1:
        return None
    if count > 1:
        log.warning("systemd passed %d sockets; serving on the first only", count)
    try:
        sock = socket.socket(fileno=SD_LISTEN_FDS_START)  # family and type are read from the fd
    except OSError as e:
        raise ConfigError(f"LISTEN_FDS={count} but descriptor {SD_LISTEN_FDS_START} is not a "
                          f"socket: {e}") from e
    if sock.type != socket.SOCK_STREAM:
        sock.detach()  # not ours to close: leave the descriptor as systemd passed it
        raise ConfigError(f"the socket systemd passed is not a stream socket ({sock.type!r}); "
                          "use ListenStream= in the socket unit")
    sock.setblocking(False)
    log.info("using the listening socket passed by systemd: %s", _address(sock))
    return sock


def _address(sock: socket.socket) -> str:
    name = sock.getsockname()
    if isinstance(name, tuple):
        host, port = name[0], name[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(name)
