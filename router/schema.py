"""Checks OpenAI request bodies before anything is routed.

`parse_call` turns raw bytes into a `Call` or raises `InvalidRequest` (400)
naming the field at fault. It checks what the gateway relies on (model,
messages or prompt, stream, token limits, user) and the types of the common
sampling fields, so a pod never sees a body the gateway could have refused.
Fields it does not know are passed through for the engine to judge.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from router.errors import InvalidRequest
from router.prompt_options import prompt_options

Kind = Literal["chat", "completion"]

_MAX_N = 128


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


def _check_prompt(prompt: Any) -> None:
    if isinstance(prompt, str):
        return
    if isinstance(prompt, list) and prompt:
        if all(_is_int(t) and t >= 0 for t in prompt):
            return
        if all(isinstance(p, str) for p in prompt):
            return
        if all(isinstance(p, list) and p and all(_is_int(t) and t >= 0 for t in p) for p in prompt):
            return
    raise InvalidRequest(
        "'prompt' must be a string, an array of strings, an array of token ids or an array of such arrays, and not empty",
        param="prompt",
    )


def parse_call(kind: Kind, raw: bytes, *, max_tokens_limit: int) -> Call:
    """Parse and check one request body.

    Args:
        kind: "chat" for /v1/chat/completions, "completion" for /v1/completions.
        raw: the body as received.
        max_tokens_limit: largest `max_tokens` accepted.

    Returns:
        The checked call; `body` is the parsed JSON, unchanged.

    Raises:
        InvalidRequest: the body is not JSON, not an object, or a field is missing or of the wrong type.
    """
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from exc
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
        _check_prompt(body["prompt"])

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
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise InvalidRequest("'user' must be a string", param="user")

    # The fields that shape the prompt's tokens and keys (tools, salt, ...).
    prompt_options(kind, body)
    return Call(kind, body, model, stream, wants_usage, user, max_tokens)
