"""What one tenant may ask of the gateway: a request rate and a body size.

The rate is a GCRA token bucket kept in Redis (one key per tenant, written
by one script using Redis's own clock), so it holds across every gateway
process and host. A submit is counted by the script that accepts the job
(`AsyncJobStore.create`), any other request by its own; the queued-job quota
is checked by that same script. The body limit is an ASGI middleware: a declared
Content-Length over the limit is refused before a byte is read, and a
chunked body is counted as it streams.
"""

from __future__ import annotations

import json
from typing import Any

from shared import keys
from shared.errors import RateLimitError, RequestTooLargeError
from shared.store import GCRA_FUNCTION

_GCRA = GCRA_FUNCTION + "return gcra(KEYS[1], ARGV[1], ARGV[2])"


class RateLimiter:
    """`rate` requests per second per tenant, `burst` at once; rate 0 turns it off."""

    def __init__(self, redis: Any, rate: float, burst: int) -> None:
        self.rate = rate
        self._interval_ms = repr(1000.0 / rate) if rate > 0 else "0"
        self._burst = str(max(1, burst))
        self._script = redis.register_script(_GCRA)

    def bucket(self, tenant: str) -> tuple[str, str, str] | None:
        """The tenant's bucket key, ms per request and burst, for a script that counts the request itself."""
        return (keys.rate_limit(tenant), self._interval_ms, self._burst) if self.rate > 0 else None

    async def check(self, tenant: str) -> None:
        if self.rate <= 0:
            return
        wait_ms = await self._script(keys=[keys.rate_limit(tenant)], args=[self._interval_ms, self._burst])
        self.raise_if_waiting(int(wait_ms))

    def raise_if_waiting(self, wait_ms: int) -> None:
        if wait_ms > 0:
            raise RateLimitError(
                f"Rate limit reached: {self.rate:g} requests per second (VLMQ_RATE_LIMIT) for your tenant; "
                f"retry after {wait_ms / 1000:.2f}s.",
                retry_after=wait_ms / 1000,
                code="rate_limit_exceeded",
            )


class BodySizeLimit:
    """Refuses request bodies over `max_bytes` with 413 in the OpenAI error shape."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _error(self) -> RequestTooLargeError:
        return RequestTooLargeError(
            f"The request body is larger than {self.max_bytes} bytes (VLMQ_MAX_BODY_BYTES); "
            "send large media by URL (http(s)://, s3://) instead of inline."
        )

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.max_bytes:
                    await self._refuse(send)
                    return
        # No (or a small) Content-Length: read it here, counting, and hand the app the
        # body in one piece (the app buffers it whole anyway to parse JSON).
        chunks, seen, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.max_bytes:
                await self._refuse(send)
                return
            more = message.get("more_body", False)
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return dict(await receive())

        await self.app(scope, replay, send)

    async def _refuse(self, send: Any) -> None:
        error = self._error()
        body = json.dumps(error.to_response()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        # The client may still be sending; closing keeps it from streaming the rest into the void.
        headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
        await send({"type": "http.response.body", "body": body})
