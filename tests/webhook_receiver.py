"""A webhook receiver on 127.0.0.1 that verifies every message with the
`standardwebhooks` library (not vlmq's own code) and answers as scripted."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

SECRET_A = "whsec_" + base64.b64encode(b"vlmq-test-secret-number-one!").decode()
SECRET_B = "whsec_" + base64.b64encode(b"vlmq-test-secret-number-two!").decode()


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    answered: int | str  # the status code sent, or "timeout" when the receiver stalled
    verified_with: list[str]  # which of the receiver's secrets verify the signature
    at: float

    @property
    def payload(self) -> dict[str, Any]:
        return json.loads(self.body)

    @property
    def webhook_id(self) -> str:
        return self.headers["webhook-id"]


@dataclass
class Receiver:
    """Answers each path's requests from its script, in order; 200 once the script runs out.

    A script step is an int status, `"stall"` (sleep past the sender's timeout)
    or `(status, {headers})`.
    """

    secrets: dict[str, str]
    stall_seconds: float = 2.0
    port: int = 0
    scripts: dict[str, list[Any]] = field(default_factory=lambda: defaultdict(list))
    received: list[Received] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def script(self, path: str, *steps: Any) -> str:
        self.scripts[path] = list(steps)
        return self.url(path)

    def at(self, path: str) -> list[Received]:
        with self._lock:
            return [r for r in self.received if r.path == path]

    def wait_for(self, path: str, predicate, timeout: float = 30.0) -> list[Received]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            got = self.at(path)
            if predicate(got):
                return got
            time.sleep(0.05)
        raise AssertionError(f"receiver {path}: condition not met; got {[(r.webhook_id, r.answered) for r in got]}")

    def verify(self, headers: dict[str, str], body: bytes) -> list[str]:
        ok = []
        for name, secret in self.secrets.items():
            try:
                Webhook(secret).verify(body, headers)
                ok.append(name)
            except WebhookVerificationError:
                pass
        return ok


def serve(receiver: Receiver) -> Iterator[Receiver]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            headers = {k.lower(): v for k, v in self.headers.items()}
            with receiver._lock:
                steps = receiver.scripts.get(self.path)
                step = steps.pop(0) if steps else 200
            status, extra = (step, {}) if not isinstance(step, tuple) else step
            record = Received(
                self.path, headers, body, "timeout" if status == "stall" else status, receiver.verify(headers, body), 0
            )
            record.at = time.time()
            with receiver._lock:
                receiver.received.append(record)
            if status == "stall":
                time.sleep(receiver.stall_seconds)
                status = 200  # too late: the sender has given up
            try:
                self.send_response(status)
                for name, value in extra.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()
            except OSError:
                pass

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", receiver.port), Handler)
    httpd.daemon_threads = True
    receiver.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        httpd.shutdown()
        httpd.server_close()
