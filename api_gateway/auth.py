"""Bearer-key authentication; tenants come from VLMQ_API_KEYS.

Keys are kept only as SHA-256 digests: in memory, and (written
`tenant:sha256:<64 hex digits>`) in the environment too, so neither a memory
dump nor a leaked config file hands out a working key. A presented key is
hashed and compared with *every* stored digest by `hmac.compare_digest`,
without stopping at a match, so the time taken depends only on how many keys
there are, never on how close a guess came. (A dict lookup by digest would
leak only which hash bucket a guessed digest falls in, which an attacker
cannot steer without a SHA-256 preimage; the full scan removes even that
argument, for a few microseconds per request.)
"""

from __future__ import annotations

import hashlib
import hmac
import re

from shared.errors import AuthenticationError

_HASHED = re.compile(r"sha256:([0-9a-fA-F]{64})")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def hashed_entry(tenant: str, key: str) -> str:
    """The VLMQ_API_KEYS entry that admits `key` without storing it: `tenant:sha256:<hex>`."""
    return f"{tenant}:sha256:{_digest(key).hex()}"


class KeyRing:
    def __init__(self, entries: list[str]) -> None:
        self._keys: list[tuple[bytes, str]] = []
        for entry in entries:
            tenant, sep, key = entry.partition(":")
            if not sep or not tenant or not key:
                raise ValueError("VLMQ_API_KEYS entries are tenant:key or tenant:sha256:<hex digest>")
            hashed = _HASHED.fullmatch(key)
            self._keys.append((bytes.fromhex(hashed.group(1)) if hashed else _digest(key), tenant))
        if not self._keys:
            raise ValueError("VLMQ_API_KEYS is empty: give at least one tenant:key")

    def tenant_for(self, authorization: str | None) -> str:
        if not authorization:
            raise AuthenticationError(
                "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.", code="missing_api_key"
            )
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise AuthenticationError("The Authorization header must be 'Bearer <key>'.")
        presented = _digest(key.strip())
        found = None
        for digest, tenant in self._keys:
            if hmac.compare_digest(presented, digest) and found is None:
                found = tenant
        if found is None:
            raise AuthenticationError("Incorrect API key provided.")
        return found
