"""The pods' context length, checked from the body before any tokenising."""

from __future__ import annotations

import json

import pytest

from router.context_limit import ContextLimit
from router.errors import InvalidRequest
from router.schema import parse_call

LIMIT = ContextLimit(max_model_len=100, max_token_chars=10)


def call(kind, **body):
    return parse_call(kind, json.dumps({"model": "m", **body}).encode(), max_tokens_limit=10**6)


@pytest.mark.parametrize(
    ("kind", "body", "param"),
    [
        pytest.param("completion", {"prompt": "x" * 1001}, "prompt", id="text-over-chars"),
        pytest.param("completion", {"prompt": ["ok", "x" * 1001]}, "prompt", id="batch-text-over-chars"),
        pytest.param("completion", {"prompt": list(range(101))}, "prompt", id="token-ids-over"),
        pytest.param("completion", {"prompt": [[1], list(range(100))]}, "prompt", id="batch-token-ids-at-limit"),
        pytest.param("chat", {"messages": [{"role": "user", "content": "x"}] * 101}, "messages", id="more-messages-than-tokens"),
        pytest.param("completion", {"prompt": "hi", "max_tokens": 101}, "max_tokens", id="max-tokens-over"),
        pytest.param("chat", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 101}, "max_completion_tokens", id="max-completion-tokens-over"),
    ],
)
def test_what_cannot_fit_is_refused_from_the_body(kind, body, param):
    with pytest.raises(InvalidRequest) as caught:
        LIMIT.check_call(call(kind, **body))
    error = caught.value.body()["error"]
    assert error["param"] == param and "100" in error["message"] and caught.value.status == 400


@pytest.mark.parametrize(
    ("kind", "body"),
    [
        pytest.param("completion", {"prompt": "x" * 1000}, id="text-at-char-bound"),
        pytest.param("completion", {"prompt": list(range(99)), "max_tokens": 100}, id="prompt-plus-max-tokens-over-is-vllms-to-lower"),
        pytest.param("chat", {"messages": [{"role": "user", "content": "x"}] * 100}, id="messages-at-limit"),
        pytest.param("chat", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 500, "max_completion_tokens": 10}, id="max-completion-tokens-wins"),
    ],
)
def test_what_may_fit_passes(kind, body):
    LIMIT.check_call(call(kind, **body))


def test_token_counts_need_room_for_one_output_token():
    LIMIT.check_tokens(99, "prompt")
    for tokens in (100, 101):
        with pytest.raises(InvalidRequest) as caught:
            LIMIT.check_tokens(tokens, "messages")
        assert caught.value.code == "context_length_exceeded" and caught.value.param == "messages"


def test_without_a_tokenizer_no_character_bound_applies():
    ContextLimit(max_model_len=100).check_call(call("completion", prompt="x" * 10_000))


def test_the_gateway_refuses_only_what_fits_no_healthy_pod_of_the_model():
    from router.discovery import StaticDiscovery
    from router.gateway import Gateway
    from router.settings import Settings

    gateway = Gateway(Settings(), discovery=StaticDiscovery([]))
    for url, model, length, healthy in [
        ("http://a:1", "m", 4096, True),
        ("http://b:1", "m", 8192, True),
        ("http://c:1", "m", 65536, False),  # down: not counted
        ("http://d:1", "other", 131072, True),
        ("http://e:1", "m", True, True),  # a pod answering nonsense
    ]:
        pod = gateway.pods.add(url)
        pod.models, pod.max_model_len, pod.healthy = frozenset({model}), length, healthy

    assert gateway._max_model_len("m") == 8192
    assert gateway._max_model_len("unknown") is None
