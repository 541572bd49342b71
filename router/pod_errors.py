"""What a pod's error answer (status 400 or more) becomes for the client and for the gateway.

The gateway reads such an answer before anything has gone to the client
(`read_error`), so it can still choose:

- 429, 503: the pod is overloaded: `UpstreamOverloaded` (retryable on
  another pod; `router.outliers` backs off from this one).
- 504: `UpstreamTimeout`; any other 5xx: `UpstreamUnavailable` (retryable;
  counted towards ejecting the pod).
- Any other status (4xx: the request is at fault, another pod would answer
  the same) goes to the client with the pod's status. Its body is passed on
  when it is already an OpenAI error object, and wrapped into one otherwise
  (an HTML page, plain text, invalid UTF-8, a JSON list), so clients always
  get `{"error": {"message", "type", "code", "param"}}`.

At most `MAX_ERROR_BODY` bytes of an error body are read. Not here: answers
with status 200 (`router.proxy`).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
from aiohttp import web

from router.errors import UpstreamError, UpstreamOverloaded, UpstreamTimeout, UpstreamUnavailable

#: Bytes of a pod's error body read at most; the rest is dropped with the connection.
MAX_ERROR_BODY = 64 * 1024
#: Characters of a non-JSON error body quoted in the wrapped message.
_QUOTED = 200
_OVERLOADED = frozenset({429, 503})
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error"}


def is_error(status: int) -> bool:
    """Whether `status` is an answer for `read_error` rather than for relaying as a completion."""
    return status >= 400


async def _read_bounded(upstream: aiohttp.ClientResponse) -> bytes:
    body = bytearray()
    while len(body) <= MAX_ERROR_BODY:
        chunk = await upstream.content.read(MAX_ERROR_BODY + 1 - len(body))
        if not chunk:
            break
        body += chunk
    return bytes(body[:MAX_ERROR_BODY])


def _pod_message(body: bytes) -> tuple[dict[str, Any] | None, str]:
    """The pod's OpenAI error object if the body is one, and a short readable message either way."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        payload = None
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        error = payload["error"]
        message = error.get("message")
        return error, message if isinstance(message, str) else json.dumps(error)[:_QUOTED]
    if isinstance(payload, dict) and isinstance(payload.get("message"), str):
        return None, payload["message"][:_QUOTED]  # e.g. FastAPI's {"detail"}/{"message"} shapes
    text = body.decode("utf-8", errors="replace").strip()
    return None, " ".join(text.split())[:_QUOTED]


async def read_error(pod_id: str, upstream: aiohttp.ClientResponse) -> UpstreamError | web.Response:
    """Read a pod's error answer and release the connection.

    Args:
        pod_id: the pod, named in messages.
        upstream: its response, status 400 or more, body not yet read.

    Returns:
        A retryable `UpstreamError` for the caller to raise (5xx, 429), or the
        client's response (other statuses), always OpenAI-shaped JSON.

    Raises:
        UpstreamUnavailable / UpstreamTimeout: the pod broke off while sending the error.
    """
    status = upstream.status
    try:
        body = await _read_bounded(upstream)
    except asyncio.TimeoutError as exc:
        raise UpstreamTimeout(f"pod {pod_id} stopped answering") from exc
    except aiohttp.ClientError as exc:
        raise UpstreamUnavailable(f"pod {pod_id} broke off: {exc}") from exc
    finally:
        upstream.close()  # an unread rest of the body must not go back to the pool
    error, message = _pod_message(body)
    said = f": {message}" if message else ""
    if status in _OVERLOADED:
        return UpstreamOverloaded(f"pod {pod_id} is overloaded (answered {status}){said}")
    if status == 504:
        return UpstreamTimeout(f"pod {pod_id} answered 504{said}")
    if status >= 500:
        return UpstreamUnavailable(f"pod {pod_id} answered {status}{said}")
    if error is None:
        error = {
            "message": message or f"the pod answered {status} {upstream.reason or ''}".strip(),
            "type": _TYPES.get(status, "invalid_request_error"),
            "param": None,
            "code": status,
        }
    return web.Response(
        status=status,
        body=json.dumps({"error": error}).encode(),
        content_type="application/json",
        headers={"x-kvgate-pod": pod_id},
    )
