"""Bearer-key authentication; tenants come from VLMQ_API_KEYS.

Keys are kept only as SHA-256 digests and looked up by digest, so neither
memory dumps nor timing of the comparison reveal a key.
"""

from __future__ import annotations

import hashlib

from shared.errors import AuthenticationError


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class KeyRing:
    def __init__(self, entries: list[str]) -> None:
        self._tenants: dict[bytes, str] = {}
        for entry in entries:
            tenant, sep, key = entry.partition(":")
            if not sep or not tenant or not key:
                raise ValueError("VLMQ_API_KEYS entries are tenant:key")
            self._tenants[_digest(key)] = tenant
        if not self._tenants:
            raise ValueError("VLMQ_API_KEYS is empty: give at least one tenant:key")

    def tenant_for(self, authorization: str | None) -> str:
        if not authorization:
            raise AuthenticationError(
                "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.", code="missing_api_key"
            )
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise AuthenticationError("The Authorization header must be 'Bearer <key>'.")
        tenant = self._tenants.get(_digest(key.strip()))
        if tenant is None:
            raise AuthenticationError("Incorrect API key provided.")
        return tenant
