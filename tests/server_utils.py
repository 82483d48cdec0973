"""A real streamtok server on loopback whose event loop runs in a thread, for tests whose body
is blocking code (a browser driver, a client's synchronous main)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator

from streamtok.models.registry import load_model
from streamtok.server.app import StreamtokServer
from streamtok.server.config import ServerConfig


@contextlib.contextmanager
def server_thread(**overrides) -> Iterator[StreamtokServer]:
    """Serve ``tiny`` on 127.0.0.1 (free port) in a thread; always shut down."""
    cfg = ServerConfig(**({"port": 0, "models": ["tiny"], "threads": 1} | overrides))
    server = StreamtokServer(cfg, {"tiny": load_model("tiny")})
    loop = asyncio.new_event_loop()
    started = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(server.start())
        except BaseException as e:  # reported to the test thread below
            failure.append(e)
            return
        finally:
            started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, name="streamtok-test-server", daemon=True)
    thread.start()
    started.wait(60)
    if failure:
        raise failure[0]
    try:
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(server.shutdown(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
