"""Reading a client's request body: within its time, within its size, decoded.

The app (`router.app`) reads every POST body with `read_body` before its
handler runs, so a client that trickles its body is cut off after
`server.body_timeout_s` with a 408 and never counts as in flight (it cannot
hold a drain). aiohttp's own decompression is off (it fails mid-parse and
drops the connection on a body that is not what its `Content-Encoding`
says); `read_body` decodes gzip and deflate itself, bounded by
`max_body_bytes` after decoding, so a small compressed bomb is a 413.
`request_body` hands the result to the gateway (`router.gateway`).

Not here: parsing the JSON (`router.schema`), connection-level limits
(`router.connections`).
"""

from __future__ import annotations

import asyncio
import sys
import zlib

from aiohttp import web

from router.errors import InvalidRequest, PayloadTooLarge, RequestTimeout, UnsupportedEncoding

if sys.version_info >= (3, 11):
    from asyncio import timeout as _deadline
else:  # aiohttp depends on async-timeout before 3.11
    from async_timeout import timeout as _deadline

BODY = web.RequestKey("kvgate_body", bytes)

_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def _decode(raw: bytes, encoding: str, max_bytes: int) -> bytes:
    wbits = _WBITS.get(encoding)
    if wbits is None:
        raise UnsupportedEncoding(
            f"Content-Encoding {encoding!r} is not supported; send identity, gzip or deflate",
            param="content-encoding",
        )
    # Some clients send raw deflate without the zlib wrapper: try that too.
    for bits in (wbits, -zlib.MAX_WBITS) if encoding == "deflate" else (wbits,):
        decoder = zlib.decompressobj(wbits=bits)
        try:
            out = decoder.decompress(raw, max_bytes + 1)
        except zlib.error as exc:
            error = exc
            continue
        if len(out) > max_bytes or decoder.unconsumed_tail:
            raise PayloadTooLarge(f"request body is larger than {max_bytes} bytes once decoded")
        if not decoder.eof:
            raise InvalidRequest(f"request body is cut short: incomplete {encoding} data", param="content-encoding")
        return out
    raise InvalidRequest(f"request body is not valid {encoding} data: {error}", param="content-encoding")


async def read_body(request: web.Request, *, max_bytes: int, timeout_s: float) -> bytes:
    """Read, decode and keep the request's body.

    Args:
        request: the client's request; its body is stored on it for `request_body`.
        max_bytes: largest body accepted, before and after decoding.
        timeout_s: seconds the whole body may take to arrive.

    Returns:
        The decoded body.

    Raises:
        PayloadTooLarge: the body (announced, received or decoded) is larger than `max_bytes`.
        RequestTimeout: the body did not arrive within `timeout_s`.
        UnsupportedEncoding: a `Content-Encoding` other than identity, gzip or deflate.
        InvalidRequest: the body is not what its encoding says, or the transfer is malformed.
    """
    length = request.content_length
    if length is not None and length > max_bytes:
        raise PayloadTooLarge(f"request body of {length} bytes is larger than {max_bytes} bytes")
    try:
        if request.content.is_eof():  # all there already (most bodies come with their headers)
            raw = await request.read()
        else:
            async with _deadline(timeout_s):
                raw = await request.read()
    except asyncio.TimeoutError as exc:
        raise RequestTimeout(f"request body did not arrive within {timeout_s:g} s") from exc
    except web.HTTPRequestEntityTooLarge as exc:
        raise PayloadTooLarge(f"request body is larger than {max_bytes} bytes") from exc
    except web.RequestPayloadError as exc:
        raise InvalidRequest(f"request body could not be read: {exc}") from exc
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        raw = _decode(raw, encoding, max_bytes)
    request[BODY] = raw
    return raw


async def request_body(request: web.Request) -> bytes:
    """The body `read_body` kept, or the raw body when the request did not pass through it."""
    body = request.get(BODY)
    return body if body is not None else await request.read()
