"""Running the study app with uvicorn: in the foreground (``qsched study serve``; Ctrl-C shuts down cleanly)
or in a background thread (tests, ``qsched study simulate``)."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import uvicorn


def free_port(host: str = "127.0.0.1") -> int:
    """A currently free TCP port on ``host``."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def serve_forever(app: Any, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning") -> None:
    """Serve ``app`` until SIGINT/SIGTERM: uvicorn stops accepting, finishes in-flight requests, then returns.

    (uvicorn re-raises the captured signal after its graceful shutdown; the KeyboardInterrupt that a SIGINT
    turns into is swallowed here, so Ctrl-C is a normal exit.)
    """
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                           timeout_graceful_shutdown=5))
    try:
        server.run()
    except KeyboardInterrupt:
        pass


class ServerThread:
    """``with ServerThread(app) as url:`` serves ``app`` on a free 127.0.0.1 port in a daemon thread."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int | None = None, startup_timeout: float = 30.0):
        self.host, self.port = host, port or free_port(host)
        self.server = uvicorn.Server(uvicorn.Config(app, host=self.host, port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="qsched-study-server")
        self.startup_timeout = startup_timeout

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> str:
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > self.startup_timeout:
                raise RuntimeError(f"study server did not start on {self.url}")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
