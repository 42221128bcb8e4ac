"""The real gateway app on a free 127.0.0.1 port, served by uvicorn in a thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn

from api_gateway.app import create_app
from api_gateway.config import GatewaySettings
from tests.conftest import free_port


@contextmanager
def serve(settings: GatewaySettings) -> Iterator[str]:
    """Yields the base URL; the server stops when the block ends."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
