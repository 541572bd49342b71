"""Long prompts are tokenised and hashed in a worker thread, whatever shape their text comes in."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest

from router.prompts import tokenize
from router.schema import parse_call


class ThreadRecorder:
    """Byte-level stand-in that records which thread encoded."""

    units_per_token = 1

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []

    def encode_chat(self, messages: list[dict[str, Any]], **_: Any) -> list[int]:
        self.threads.append(threading.current_thread())
        return list(json.dumps(messages).encode())

    def encode_prompt(self, text: str, **_: Any) -> list[int]:
        self.threads.append(threading.current_thread())
        return list(text.encode())


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"messages": [{"role": "user", "content": "x" * 40_000}]}, id="one-long-message"),
        pytest.param(
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "x" * 1000}] * 40}]},
            id="long-text-in-content-parts",
        ),
        pytest.param({"messages": [{"role": "user", "content": "x"}] * 3000}, id="many-short-messages"),
        pytest.param({"prompt": "x" * 40_000}, id="long-completion-prompt"),
    ],
)
async def test_long_prompts_are_encoded_off_the_event_loop(body):
    kind = "chat" if "messages" in body else "completion"
    call = parse_call(kind, json.dumps({"model": "m", **body}).encode(), max_tokens_limit=100)
    recorder = ThreadRecorder()

    prompt = await tokenize(recorder, call, 16)

    assert prompt.block_hashes and recorder.threads
    assert all(t is not threading.main_thread() for t in recorder.threads)


async def test_short_prompts_stay_on_the_loop():
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    call = parse_call("chat", json.dumps(body).encode(), max_tokens_limit=100)
    recorder = ThreadRecorder()
    await tokenize(recorder, call, 16)
    assert recorder.threads == [threading.main_thread()]
