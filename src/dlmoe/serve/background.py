"""Run the server on a background thread of this process (a notebook, a test, `bench/serve.py`).

    with ServerThread(create_app(engine)) as server:
        httpx.get(f"{server.url}/health")

Port 0 (the default) takes a free ephemeral port; leaving the block shuts the server down as
SIGTERM would (in-flight requests get `grace_s` to finish, then are cancelled).
"""

from __future__ import annotations

import threading
import time

import uvicorn
from fastapi import FastAPI

from dlmoe._checks import check_float, check_int


class ServerThread:
    def __init__(self, app: FastAPI, *, host: str = "127.0.0.1", port: int = 0, grace_s: float = 10.0) -> None:
        check_int("port", port, low=0, high=65535)
        check_float("grace_s", grace_s, low=0.0)
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on",
                                timeout_graceful_shutdown=max(1, round(grace_s)))  # fmt: skip
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="dlmoe-serve", daemon=True)
        self.host, self.port = host, port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.host}:{self.port}")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self, timeout_s: float = 60.0) -> None:
        """Graceful shutdown; returns once the server thread has ended."""
        self.server.should_exit = True
        self.thread.join(timeout_s)
        if self.thread.is_alive():
            raise RuntimeError(f"the server on {self.url} did not stop within {timeout_s} s")

    def __enter__(self) -> ServerThread:
        return self if self.thread.is_alive() else self.start()  # a started server is a context manager too

    def __exit__(self, *exc: object) -> None:
        self.stop()
