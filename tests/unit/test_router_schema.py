"""Request bodies: what the gateway refuses with 400 (naming the field) and what it lets through."""

from __future__ import annotations

import json

import pytest

from router.errors import InvalidRequest
from router.schema import parse_call

LIMIT = 4096
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": "tiny", "prompt": "Once upon a time"}


def body(base: dict, **changes) -> bytes:
    """`base` with fields replaced; a value of `...` removes the field."""
    merged = {**base, **changes}
    return json.dumps({k: v for k, v in merged.items() if v is not ...}).encode()


BAD = [
    pytest.param("chat", b"{not json", None, "not valid JSON", id="not-json"),
    pytest.param("chat", b"\xff\xfe\x00", None, "not valid JSON", id="not-utf8"),
    pytest.param("chat", b"", None, "not valid JSON", id="empty-body"),
    pytest.param("chat", b'["model", "tiny"]', None, "JSON object", id="array-not-object"),
    pytest.param("completion", b'"prompt"', None, "JSON object", id="string-not-object"),
    pytest.param("chat", body(CHAT, model=...), "model", "'model' is required", id="missing-model"),
    pytest.param("chat", body(CHAT, model=""), "model", "'model' is required", id="empty-model"),
    pytest.param("completion", body(COMPLETION, model=7), "model", "'model' is required", id="model-not-a-string"),
    pytest.param("chat", body(CHAT, messages=...), "messages", "'messages' is required", id="missing-messages"),
    pytest.param("chat", body(CHAT, messages="hi"), "messages", "non-empty array", id="messages-not-a-list"),
    pytest.param("chat", body(CHAT, messages=None), "messages", "non-empty array", id="messages-null"),
    pytest.param("chat", body(CHAT, messages=[]), "messages", "non-empty array", id="messages-empty"),
    pytest.param("chat", body(CHAT, messages=["hi"]), "messages[0]", "must be an object", id="message-not-an-object"),
    pytest.param("chat", body(CHAT, messages=[{"content": "hi"}]), "messages[0].role", "role", id="message-without-role"),
    pytest.param(
        "chat",
        body(CHAT, messages=[{"role": "system", "content": "x"}, {"role": "", "content": "hi"}]),
        "messages[1].role",
        "role",
        id="second-message-empty-role",
    ),
    pytest.param("chat", body(CHAT, messages=[{"role": 1, "content": "hi"}]), "messages[0].role", "role", id="role-not-a-string"),
    pytest.param(
        "chat", body(CHAT, messages=[{"role": "user", "content": 5}]), "messages[0].content", "string or an array", id="content-a-number"
    ),
    pytest.param(
        "chat", body(CHAT, messages=[{"role": "user", "content": ["hi"]}]), "messages[0].content", "'type'", id="part-not-an-object"
    ),
    pytest.param(
        "chat",
        body(CHAT, messages=[{"role": "user", "content": [{"text": "hi"}]}]),
        "messages[0].content",
        "'type'",
        id="part-without-type",
    ),
    pytest.param(
        "chat",
        body(CHAT, messages=[{"role": "user", "content": [{"type": "text", "text": 3}]}]),
        "messages[0].content",
        "text must be a string",
        id="text-part-without-text",
    ),
    pytest.param("completion", body(COMPLETION, prompt=...), "prompt", "'prompt' is required", id="missing-prompt"),
    pytest.param("completion", body(COMPLETION, prompt=None), "prompt", "must be a string", id="prompt-null"),
    pytest.param("completion", body(COMPLETION, prompt=42), "prompt", "must be a string", id="prompt-a-number"),
    pytest.param("completion", body(COMPLETION, prompt=[]), "prompt", "must be a string", id="prompt-empty-list"),
    pytest.param("completion", body(COMPLETION, prompt=[1, -2, 3]), "prompt", "must be a string", id="negative-token-id"),
    pytest.param("completion", body(COMPLETION, prompt=[1, 2.5]), "prompt", "must be a string", id="fractional-token-id"),
    pytest.param("completion", body(COMPLETION, prompt=[1, True]), "prompt", "must be a string", id="bool-token-id"),
    pytest.param("completion", body(COMPLETION, prompt=["a", 1]), "prompt", "must be a string", id="mixed-strings-and-ids"),
    pytest.param("completion", body(COMPLETION, prompt=[[1, 2], []]), "prompt", "must be a string", id="empty-token-list"),
    pytest.param("completion", body(COMPLETION, prompt=[[1, 2], ["a"]]), "prompt", "must be a string", id="list-of-mixed-lists"),
    pytest.param("completion", body(COMPLETION, prompt={"text": "hi"}), "prompt", "must be a string", id="prompt-an-object"),
    pytest.param("chat", body(CHAT, stream="true"), "stream", "boolean", id="stream-a-string"),
    pytest.param("chat", body(CHAT, stream=1), "stream", "boolean", id="stream-a-number"),
    pytest.param("chat", body(CHAT, stream=True, stream_options="usage"), "stream_options", "object", id="stream-options-a-string"),
    pytest.param("chat", body(CHAT, max_tokens=True), "max_tokens", "integer", id="max-tokens-bool"),
    pytest.param("chat", body(CHAT, max_tokens="10"), "max_tokens", "integer", id="max-tokens-string"),
    pytest.param("chat", body(CHAT, max_tokens=10.0), "max_tokens", "integer", id="max-tokens-float"),
    pytest.param("chat", body(CHAT, max_tokens=0), "max_tokens", "between 1 and", id="max-tokens-zero"),
    pytest.param("chat", body(CHAT, max_tokens=-5), "max_tokens", "between 1 and", id="max-tokens-negative"),
    pytest.param("completion", body(COMPLETION, max_tokens=LIMIT + 1), "max_tokens", "between 1 and", id="max-tokens-over-limit"),
    pytest.param("chat", body(CHAT, max_completion_tokens=0), "max_completion_tokens", "between 1", id="max-completion-tokens-zero"),
    pytest.param("chat", body(CHAT, n=0), "n", "between 1 and", id="n-zero"),
    pytest.param("chat", body(CHAT, n=129), "n", "between 1 and", id="n-too-large"),
    pytest.param("chat", body(CHAT, n="2"), "n", "between 1 and", id="n-a-string"),
    pytest.param("chat", body(CHAT, temperature="0.7"), "temperature", "number", id="temperature-a-string"),
    pytest.param("chat", body(CHAT, temperature=False), "temperature", "number", id="temperature-a-bool"),
    pytest.param("completion", body(COMPLETION, top_p=[0.9]), "top_p", "number", id="top-p-a-list"),
    pytest.param("chat", body(CHAT, user=42), "user", "string", id="user-a-number"),
    pytest.param("chat", body(CHAT, user={"id": "u"}), "user", "string", id="user-an-object"),
]


@pytest.mark.parametrize(("kind", "raw", "param", "message"), BAD)
def test_bad_bodies_are_refused_naming_the_field(kind, raw, param, message):
    with pytest.raises(InvalidRequest, match=message) as caught:
        parse_call(kind, raw, max_tokens_limit=LIMIT)

    assert caught.value.param == param
    assert caught.value.status == 400


GOOD = [
    pytest.param("chat", CHAT, id="chat-minimal"),
    pytest.param(
        "chat",
        {
            "model": "tiny",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "x"}}]},
                {"role": "assistant", "content": None, "tool_calls": []},
            ],
        },
        id="chat-parts-and-null-content",
    ),
    pytest.param("completion", COMPLETION, id="prompt-a-string"),
    pytest.param("completion", {"model": "tiny", "prompt": ""}, id="prompt-an-empty-string"),
    pytest.param("completion", {"model": "tiny", "prompt": [1, 2, 3, 0]}, id="prompt-token-ids"),
    pytest.param("completion", {"model": "tiny", "prompt": ["one", "two"]}, id="prompt-list-of-strings"),
    pytest.param("completion", {"model": "tiny", "prompt": [[1, 2], [3]]}, id="prompt-list-of-token-id-lists"),
]


@pytest.mark.parametrize(("kind", "payload"), GOOD)
def test_good_bodies_pass_unchanged(kind, payload):
    call = parse_call(kind, json.dumps(payload).encode(), max_tokens_limit=LIMIT)

    assert call.kind == kind
    assert call.model == "tiny"
    assert call.body == payload
    assert (call.stream, call.wants_usage, call.user, call.max_tokens) == (False, False, None, None)


def test_the_fields_the_gateway_relies_on_are_read():
    raw = body(
        CHAT,
        stream=True,
        stream_options={"include_usage": True},
        user="alice",
        max_tokens=LIMIT,
        n=128,
        temperature=0,
        top_p=0.5,
        seed=7,  # unknown to the gateway: passed through for the engine to judge
    )

    call = parse_call("chat", raw, max_tokens_limit=LIMIT)

    assert (call.stream, call.wants_usage, call.user, call.max_tokens) == (True, True, "alice", LIMIT)
    assert call.body["seed"] == 7


@pytest.mark.parametrize(
    ("changes", "stream", "wants_usage"),
    [
        pytest.param({"stream": None}, False, False, id="stream-null-is-false"),
        pytest.param({"stream": True}, True, False, id="stream-without-options"),
        pytest.param({"stream": True, "stream_options": {"include_usage": False}}, True, False, id="usage-declined"),
        pytest.param({"stream": True, "stream_options": {}}, True, False, id="empty-options"),
    ],
)
def test_stream_and_usage_flags(changes, stream, wants_usage):
    call = parse_call("chat", body(CHAT, **changes), max_tokens_limit=LIMIT)

    assert (call.stream, call.wants_usage) == (stream, wants_usage)


def test_max_completion_tokens_counts_as_max_tokens():
    call = parse_call("chat", body(CHAT, max_completion_tokens=12), max_tokens_limit=LIMIT)

    assert call.max_tokens == 12
