"""Bodies at the edges of what `parse_call` accepts: nesting, numbers, token ids, text."""

from __future__ import annotations

import json

import pytest

from router.errors import InvalidRequest
from router.schema import MAX_DEPTH, parse_call


def _nested(levels: int) -> object:
    value: object = "leaf"
    for i in range(levels):
        value = [value] if i % 2 else {"k": value}
    return value


def _body(extra: object, **fields: object) -> dict:
    return {"model": "m", "prompt": "p", "extra": extra, **fields}


def test_nesting_up_to_the_limit_is_accepted_and_one_more_is_refused():
    # The body itself is one level: `extra` adds the rest.
    parse_call("completion", json.dumps(_body(_nested(MAX_DEPTH - 1))).encode(), max_tokens_limit=10)
    with pytest.raises(InvalidRequest, match="nests deeper"):
        parse_call("completion", json.dumps(_body(_nested(MAX_DEPTH))).encode(), max_tokens_limit=10)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("]" * 200, id="closing-brackets"),
        pytest.param("[" * 200, id="opening-brackets"),
        pytest.param('\\"]]]' * 50 + "\\", id="escaped-quotes-and-backslash"),
    ],
)
def test_brackets_inside_strings_do_not_count(text):
    raw = json.dumps(_body(_nested(MAX_DEPTH - 1), user=text)).encode()
    assert parse_call("completion", raw, max_tokens_limit=10).user == text
    raw = json.dumps(_body(_nested(MAX_DEPTH), user=text)).encode()
    with pytest.raises(InvalidRequest, match="nests deeper"):
        parse_call("completion", raw, max_tokens_limit=10)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-32", "utf-8-sig"])
def test_json_that_is_not_plain_utf8_is_refused(encoding):
    # json.loads takes UTF-16/32 bytes; the pods would then be sent them as they came.
    raw = json.dumps({"model": "m", "prompt": "p"}).encode(encoding)
    with pytest.raises(InvalidRequest):
        parse_call("completion", raw, max_tokens_limit=10)


def test_token_ids_must_fit_int64_and_the_vocabulary():
    ok = json.dumps({"model": "m", "prompt": [0, 2**63 - 1]}).encode()
    assert parse_call("completion", ok, max_tokens_limit=10).body["prompt"][1] == 2**63 - 1
    with pytest.raises(InvalidRequest):
        parse_call("completion", json.dumps({"model": "m", "prompt": [2**63]}).encode(), max_tokens_limit=10)
    with pytest.raises(InvalidRequest, match="between 0 and 99"):
        parse_call("completion", json.dumps({"model": "m", "prompt": [5, 100]}).encode(), max_tokens_limit=10, vocab_size=100)
    parse_call("completion", json.dumps({"model": "m", "prompt": [[5, 99]]}).encode(), max_tokens_limit=10, vocab_size=100)


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b'{"model": "m", "prompt": "a\\ud800"}', id="escaped-lone-high"),
        pytest.param(b'{"model": "m", "prompt": "\\udc00a"}', id="escaped-lone-low"),
        pytest.param(b'{"model": "m", "prompt": "a\xed\xa0\x80"}', id="raw-utf8-encoded"),
    ],
)
def test_a_lone_surrogate_is_refused(raw):
    with pytest.raises(InvalidRequest):
        parse_call("completion", raw, max_tokens_limit=10)


def test_a_surrogate_pair_is_text():
    call = parse_call("completion", b'{"model": "m", "prompt": "\\ud83d\\ude00"}', max_tokens_limit=10)
    assert call.body["prompt"] == "\U0001f600"
