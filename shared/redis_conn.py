"""redis-py clients for VLMQ_REDIS_URL, which Celery (kombu) reads too.

`redis://` and `rediss://` URLs go to redis-py as they are. A Sentinel
deployment is written the way kombu takes it, one `sentinel://` URL per
sentinel joined by `;`:

    sentinel://:password@10.0.0.1:26379/0;sentinel://10.0.0.2:26379;sentinel://10.0.0.3:26379

with the monitored group named by VLMQ_REDIS_SENTINEL_MASTER. Our own clients
then ask the sentinels for the current master on every (re)connect, as the
Celery broker does, so a failover moves the job store and the queue together.
As in kombu, the password and database of the first URL are the master's;
the sentinels themselves are reached without a password.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from shared.settings import SharedSettings


@dataclass(frozen=True)
class SentinelURL:
    sentinels: list[tuple[str, int]]
    db: int
    username: str | None
    password: str | None


def is_sentinel(url: str) -> bool:
    return url.strip().lower().startswith("sentinel://")


def parse_sentinel_url(url: str) -> SentinelURL:
    sentinels: list[tuple[str, int]] = []
    db, username, password = 0, None, None
    for index, part in enumerate(p.strip() for p in url.split(";") if p.strip()):
        parsed = urlsplit(part)
        if parsed.scheme.lower() != "sentinel" or not parsed.hostname:
            raise ValueError(f"expected sentinel://host:port, got {part!r}")
        sentinels.append((parsed.hostname, parsed.port or 26379))
        if index == 0:
            path = parsed.path.strip("/")
            db = int(path) if path else 0
            username = unquote(parsed.username) if parsed.username else None
            password = unquote(parsed.password) if parsed.password else None
    if not sentinels:
        raise ValueError("VLMQ_REDIS_URL names no sentinel")
    return SentinelURL(sentinels, db, username, password)


def _master_kwargs(parsed: SentinelURL, decode_responses: bool = True) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"db": parsed.db, "decode_responses": decode_responses}
    if parsed.username:
        kwargs["username"] = parsed.username
    if parsed.password:
        kwargs["password"] = parsed.password
    return kwargs


# Workers ride out a Redis restart or failover (about half a minute) instead of
# failing the job they were finishing: a result written late is still written.
WORKER_RETRY_SECONDS = 30.0


def _retry(seconds: float) -> dict[str, Any]:
    from redis.backoff import ExponentialBackoff
    from redis.exceptions import ConnectionError, TimeoutError
    from redis.retry import Retry

    cap = 1.0
    return {
        "retry": Retry(ExponentialBackoff(cap=cap, base=0.05), retries=max(1, int(seconds / cap) + 4)),
        "retry_on_error": [ConnectionError, TimeoutError],
    }


def sync_redis(
    settings: SharedSettings, retry_seconds: float = WORKER_RETRY_SECONDS, *, decode_responses: bool = True
) -> Any:
    """A blocking client (worker processes); each command retries for about `retry_seconds` while Redis is away.

    `decode_responses=False` for binary values (the media cache's bytes).
    """
    import redis

    retry = _retry(retry_seconds)
    if not is_sentinel(settings.redis_url):
        return redis.Redis.from_url(settings.redis_url, decode_responses=decode_responses, **retry)
    from redis.sentinel import Sentinel

    parsed = parse_sentinel_url(settings.redis_url)
    return Sentinel(parsed.sentinels, socket_timeout=5).master_for(
        settings.redis_sentinel_master, **_master_kwargs(parsed, decode_responses), **retry
    )


def async_redis(settings: SharedSettings) -> Any:
    """The gateway's client: no long retries, so a client hears 503 at once while Redis is away."""
    import redis.asyncio as aioredis

    if not is_sentinel(settings.redis_url):
        return aioredis.Redis.from_url(settings.redis_url, decode_responses=True)
    from redis.asyncio.sentinel import Sentinel

    parsed = parse_sentinel_url(settings.redis_url)
    return Sentinel(parsed.sentinels, socket_timeout=5).master_for(
        settings.redis_sentinel_master, **_master_kwargs(parsed)
    )
