"""Errors the gateway answers with, each carrying its HTTP status and OpenAI shape.

    GatewayError                      (500, "internal_error")
    ├── RequestError                  4xx: the client's request is at fault; never retried
    │   ├── InvalidRequest            400 "invalid_request_error"
    │   ├── Unauthorized              401 "authentication_error"
    │   ├── ModelNotFound             404 "model_not_found"
    │   ├── RequestTimeout            408 "request_timeout": the body did not arrive in time
    │   ├── PayloadTooLarge           413 "request_too_large"
    │   ├── UnsupportedEncoding       415 "unsupported_media_type": a Content-Encoding not spoken
    │   ├── ExpectationFailed         417 "expectation_failed": an `Expect` other than 100-continue
    │   └── HeadersTooLarge           431 "request_header_fields_too_large"
    ├── OverLimit                     429 "rate_limit_exceeded": the admission queue is full
    └── UpstreamError                 5xx: the pods are at fault
        ├── UpstreamUnavailable       502: a pod could not be reached, broke off or answered 5xx (retryable)
        ├── UpstreamTooLarge          502: a pod's answer broke the size limits (not retryable)
        ├── UpstreamOverloaded        503: a pod answered 429 or 503, it is busy (retryable)
        ├── NoCapacity                503: no healthy pod serves the model, waiting timed out, or draining
        └── UpstreamTimeout           504: a pod did not answer in time (retryable)

`retryable` says whether the gateway may try the same request on another pod
(it does so only before any byte reached the client). `router.outliers` reads
the type of an upstream error as its verdict on the pod: overloaded (back off,
keep routing there soon) or broken (count towards ejection).
Every error renders as `{"error": {"message", "type", "code", "param"}}`.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar


class StartupError(Exception):
    """A mistake that stops a command before it serves (a bad flag, file, URL or port); not an HTTP answer.

    The command prints its message as one line and exits with `exit_status`:
    2 for what the user wrote (flags, config), 1 for what the machine refused
    (port in use, a server not answering).
    """

    def __init__(self, message: str, *, exit_status: int = 2) -> None:
        super().__init__(message)
        self.exit_status = exit_status


class GatewayError(Exception):
    """Base of every error the gateway turns into an HTTP answer."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "internal_error"
    retryable: ClassVar[bool] = False

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        """The OpenAI-shaped error object."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code or self.type,
            }
        }

    def to_json(self) -> bytes:
        return json.dumps(self.body()).encode()


class RequestError(GatewayError):
    status = 400
    type = "invalid_request_error"


class InvalidRequest(RequestError):
    status = 400
    type = "invalid_request_error"


class Unauthorized(RequestError):
    status = 401
    type = "authentication_error"


class ModelNotFound(RequestError):
    status = 404
    type = "model_not_found"


class PayloadTooLarge(RequestError):
    status = 413
    type = "request_too_large"


class RequestTimeout(RequestError):
    status = 408
    type = "request_timeout"


class UnsupportedEncoding(RequestError):
    status = 415
    type = "unsupported_media_type"


class ExpectationFailed(RequestError):
    status = 417
    type = "expectation_failed"


class HeadersTooLarge(RequestError):
    status = 431
    type = "request_header_fields_too_large"


class OverLimit(GatewayError):
    status = 429
    type = "rate_limit_exceeded"


class UpstreamError(GatewayError):
    status = 502
    type = "upstream_error"


class UpstreamUnavailable(UpstreamError):
    status = 502
    type = "upstream_unavailable"
    retryable = True


class UpstreamTooLarge(UpstreamError):
    status = 502
    type = "upstream_too_large"


class UpstreamOverloaded(UpstreamError):
    status = 503
    type = "service_unavailable"
    retryable = True


class NoCapacity(UpstreamError):
    status = 503
    type = "service_unavailable"


class UpstreamTimeout(UpstreamError):
    status = 504
    type = "upstream_timeout"
    retryable = True
