"""Checks OpenAI request bodies before anything is routed.

`parse_call` turns raw bytes into a `Call` or raises `InvalidRequest` (400)
naming the field at fault. It checks what the gateway relies on (model,
messages or prompt, stream, token limits, user) and the types of the common
sampling fields, so a pod never sees a body the gateway could have refused.
Fields it does not know are passed through for the engine to judge.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from router.errors import InvalidRequest
from router.prompt_options import prompt_options

Kind = Literal["chat", "completion"]

_MAX_N = 128
#: Deepest nesting of arrays and objects accepted; deeper is refused before anything recurses on it.
MAX_DEPTH = 64
#: Token ids must fit the int64 the engines and the block hashes store them in.
_MAX_TOKEN_ID = 2**63 - 1
#: An escaped UTF-16 surrogate (raw ones are not UTF-8, so refused before).
_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")


@dataclass(frozen=True, slots=True)
class Call:
    """A checked completion or chat completion request."""

    kind: Kind
    body: dict[str, Any]
    model: str
    stream: bool
    wants_usage: bool
    """The client asked for the usage chunk in its stream (`stream_options.include_usage`)."""
    user: str | None
    max_tokens: int | None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty array", param="messages")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise InvalidRequest(f"{where} must be an object", param=where)
        if not isinstance(message.get("role"), str) or not message["role"]:
            raise InvalidRequest(f"{where}.role must be a non-empty string", param=f"{where}.role")
        content = message.get("content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise InvalidRequest(f"{where}.content must be a string or an array of parts", param=f"{where}.content")
        for j, part in enumerate(content):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise InvalidRequest(f"{where}.content[{j}] must be an object with a 'type'", param=f"{where}.content")
            if part["type"] == "text" and not isinstance(part.get("text"), str):
                raise InvalidRequest(f"{where}.content[{j}].text must be a string", param=f"{where}.content")


def _is_token(value: Any, vocab_size: int | None) -> bool:
    return _is_int(value) and 0 <= value <= _MAX_TOKEN_ID and (vocab_size is None or value < vocab_size)


def _check_prompt(prompt: Any, vocab_size: int | None) -> None:
    if isinstance(prompt, str):
        return
    if isinstance(prompt, list) and prompt:
        if all(_is_token(t, vocab_size) for t in prompt):
            return
        if all(isinstance(p, str) for p in prompt):
            return
        if all(isinstance(p, list) and p and all(_is_token(t, vocab_size) for t in p) for p in prompt):
            return
        if vocab_size is not None and all(_is_int(t) for t in prompt):
            raise InvalidRequest(f"'prompt' token ids must be between 0 and {vocab_size - 1}", param="prompt")
    raise InvalidRequest(
        "'prompt' must be a string, an array of strings, an array of token ids or an array of such arrays, and not empty",
        param="prompt",
    )


#: `bytes.translate` arguments keeping only brackets, objects' as arrays'.
_SQUARE = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS = bytes(range(256)).translate(None, b"[]{}")


def _nests_deeper(raw: bytes, limit: int) -> bool:
    """Whether the JSON text `raw` (valid, UTF-8) nests arrays and objects deeper than `limit`.

    NOTE: measured on the text, at C speed: strings are cut out (after their
    escaped backslashes and quotes), brackets kept, and each pass of
    `replace(b"[]", b"")` removes exactly one level. A walk of the parsed
    objects in Python costs about twice `json.loads` on a body of many small
    messages.
    """
    text = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    skeleton = b"".join(text.split(b'"')[::2]).translate(_SQUARE, _NOT_BRACKETS)
    for _ in range(limit):
        if not skeleton:
            return False
        skeleton = skeleton.replace(b"[]", b"")
    return bool(skeleton)


def _load(raw: bytes) -> Any:
    # JSON between systems is UTF-8 (RFC 8259); json.loads would also take
    # UTF-16/32 bytes, which the pods would then be sent as they came.
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"request body is not valid JSON: it is not UTF-8 text ({exc})") from exc
    try:
        body = json.loads(text)
    except RecursionError as exc:
        raise InvalidRequest(f"request body nests deeper than {MAX_DEPTH} levels") from exc
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from exc
    except ValueError as exc:  # an integer beyond Python's digit limit
        raise InvalidRequest(f"request body has a number that cannot be read: {exc}") from exc
    # Cheap tests first: a body with few brackets cannot nest deep, and only a
    # body with a surrogate escape can hold a lone one.
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and isinstance(body, (dict, list)):
        if _nests_deeper(raw, MAX_DEPTH):
            raise InvalidRequest(f"request body nests deeper than {MAX_DEPTH} levels")
    if _SURROGATE.search(raw):
        try:
            json.dumps(body, ensure_ascii=False).encode()
        except UnicodeEncodeError as exc:
            raise InvalidRequest("request body has a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text") from exc
    return body


def parse_call(kind: Kind, raw: bytes, *, max_tokens_limit: int, vocab_size: int | None = None) -> Call:
    """Parse and check one request body.

    Args:
        kind: "chat" for /v1/chat/completions, "completion" for /v1/completions.
        raw: the body as received.
        max_tokens_limit: largest `max_tokens` accepted.
        vocab_size: the model's vocabulary size when a tokenizer is loaded; prompt token ids must be below it.

    Returns:
        The checked call; `body` is the parsed JSON, unchanged.

    Raises:
        InvalidRequest: the body is not UTF-8 JSON, not an object, nests too deep, holds text that is not
            Unicode or a number Python cannot read, or a field is missing or of the wrong type.
    """
    body = _load(raw)
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")

    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is required and must be a non-empty string", param="model")
    if kind == "chat":
        if "messages" not in body:
            raise InvalidRequest("'messages' is required", param="messages")
        _check_messages(body["messages"])
    else:
        if "prompt" not in body:
            raise InvalidRequest("'prompt' is required", param="prompt")
        _check_prompt(body["prompt"], vocab_size)

    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be a boolean", param="stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise InvalidRequest("'stream_options' must be an object", param="stream_options")
    wants_usage = bool(options and options.get("include_usage"))

    max_tokens = None
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if not _is_int(value):
            raise InvalidRequest(f"'{name}' must be an integer", param=name)
        if value < 1 or value > max_tokens_limit:
            raise InvalidRequest(f"'{name}' must be between 1 and {max_tokens_limit}, got {value}", param=name)
        max_tokens = value

    n = body.get("n")
    if n is not None and (not _is_int(n) or not 1 <= n <= _MAX_N):
        raise InvalidRequest(f"'n' must be an integer between 1 and {_MAX_N}", param="n")
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        value = body.get(name)
        if value is not None and not _is_number(value):
            raise InvalidRequest(f"'{name}' must be a number", param=name)
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise InvalidRequest("'chat_template_kwargs' must be an object", param="chat_template_kwargs")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise InvalidRequest("'user' must be a string", param="user")

    # The fields that shape the prompt's tokens and keys (tools, salt, ...).
    prompt_options(kind, body)
    return Call(kind, body, model, stream, wants_usage, user, max_tokens)
