"""Usage is read from a whole answer without parsing the whole answer."""

from __future__ import annotations

import json

import pytest

from router.proxy import Outcome, _read_usage


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        pytest.param({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 7}}, (3, 7), id="plain"),
        pytest.param(
            {"choices": [{"text": 'say "usage": {"prompt_tokens": 99}'}], "usage": {"prompt_tokens": 3, "completion_tokens": 7}},
            (3, 7),
            id="the-word-in-the-text",
        ),
        pytest.param(
            {"usage": {"prompt_tokens": 3, "completion_tokens": 7}, "prompt_logprobs": [None, {"5": {"logprob": -1.0}}]},
            (3, 7),
            id="fields-after-usage",
        ),
        pytest.param({"choices": [], "usage": None}, (None, None), id="null"),
        pytest.param({"choices": []}, (None, None), id="absent"),
    ],
)
def test_usage_of_a_whole_answer(answer, expected):
    outcome = Outcome(200)
    _read_usage(json.dumps(answer).encode(), outcome)
    assert (outcome.prompt_tokens, outcome.completion_tokens) == expected


def test_a_cut_answer_gives_no_usage_and_no_error():
    outcome = Outcome(200)
    _read_usage(b'{"usage": {"prompt_tokens": 3', outcome)
    assert outcome.prompt_tokens is None
