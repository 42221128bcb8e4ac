"""The one error tree of vlmq.

Every failure a user can see is one of these, rendered in the OpenAI error
shape `{"error": {"message", "type", "param", "code"}}`, on an HTTP reply or
in a failed job's `error` field.

    VlmqError                      500 server_error
    ├── ClientError                400 invalid_request_error   never retried
    │   ├── InvalidRequestError    400 invalid_request_error
    │   ├── AuthenticationError    401 authentication_error
    │   ├── PermissionDeniedError  403 permission_error
    │   ├── NotFoundError          404 not_found_error
    │   ├── ConflictError          409 conflict_error
    │   ├── JobExpiredError        408 expired_error           not started within its ttl_seconds
    │   ├── RequestTooLargeError   413 invalid_request_error
    │   ├── RateLimitError         429 rate_limit_error        carries retry_after
    │   ├── UnsupportedModelError  404 model_not_found
    │   └── MediaError             400 invalid_media           the media part is named by `param`
    │       ├── MediaNotAllowedError   400 media_not_allowed   refused source (allow-list, SSRF guard)
    │       └── MediaCacheMissError    400 media_cache_miss    a uuid this tenant has no media for
    ├── TransientError             503 service_unavailable     retried with backoff
    │   └── MediaFetchTransientError   503 media_unavailable   timeouts, resets, 5xx from the origin
    └── InternalError              500 server_error            a bug: logged with its traceback

Client errors are the caller's to fix; the job fails at once. Transient errors
are retried by the worker (with backoff, up to the attempt limit) and only
then fail the job. Anything else raised inside a job becomes InternalError,
so a worker survives every bad job.
"""

from __future__ import annotations

from typing import Any


class VlmqError(Exception):
    status_code: int = 500
    type: str = "server_error"
    default_code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code

    def to_body(self) -> dict[str, Any]:
        return {"message": self.message, "type": self.type, "param": self.param, "code": self.code}

    def to_response(self) -> dict[str, Any]:
        return {"error": self.to_body()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, param={self.param!r}, code={self.code!r})"


class ClientError(VlmqError):
    status_code = 400
    type = "invalid_request_error"


class InvalidRequestError(ClientError):
    pass


class AuthenticationError(ClientError):
    status_code = 401
    type = "authentication_error"
    default_code = "invalid_api_key"


class PermissionDeniedError(ClientError):
    status_code = 403
    type = "permission_error"


class NotFoundError(ClientError):
    status_code = 404
    type = "not_found_error"


class ConflictError(ClientError):
    status_code = 409
    type = "conflict_error"


class JobExpiredError(ClientError):
    status_code = 408
    type = "expired_error"
    default_code = "job_expired"

    @classmethod
    def for_ttl(cls, ttl_seconds: float) -> JobExpiredError:
        return cls(f"The job did not start within its time to live ({ttl_seconds:g}s), so it was never run.")


class RequestTooLargeError(ClientError):
    status_code = 413
    default_code = "request_too_large"


class RateLimitError(ClientError):
    status_code = 429
    type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after: float, param: str | None = None, code: str | None = None):
        super().__init__(message, param=param, code=code)
        self.retry_after = retry_after


class UnsupportedModelError(ClientError):
    status_code = 404
    type = "invalid_request_error"
    default_code = "model_not_found"


class MediaError(ClientError):
    type = "invalid_media"


class MediaNotAllowedError(MediaError):
    type = "media_not_allowed"


class MediaCacheMissError(MediaError):
    """A part gave only a uuid, and the tenant's cache has nothing under it: never
    stored, expired, evicted, or another tenant's (indistinguishable on purpose)."""

    type = "media_cache_miss"
    default_code = "media_cache_miss"


class TransientError(VlmqError):
    status_code = 503
    type = "service_unavailable"


class MediaFetchTransientError(TransientError):
    type = "media_unavailable"


class InternalError(VlmqError):
    status_code = 500
    type = "server_error"


def _subclasses(cls: type[VlmqError]) -> list[type[VlmqError]]:
    return [cls] + [sub for child in cls.__subclasses__() for sub in _subclasses(child)]


def from_body(body: dict[str, Any] | None, fallback: str) -> VlmqError:
    """Rebuild an error stored on a job, with the HTTP status its type stands for."""
    body = body or {}
    err = VlmqError(body.get("message") or fallback, param=body.get("param"), code=body.get("code"))
    err.type = body.get("type") or InternalError.type
    statuses = {cls.type: cls.status_code for cls in reversed(_subclasses(VlmqError))}
    err.status_code = statuses.get(err.type, 400 if err.type != InternalError.type else 500)
    return err


def error_body(exc: BaseException) -> dict[str, Any]:
    """The OpenAI error object for any exception; never leaks internals of unknown ones."""
    if isinstance(exc, VlmqError):
        return exc.to_body()
    return InternalError("The server had an error while processing the job.").to_body()
