"""Long prompts: refused when they cannot fit the pods' context, never stalling the gateway.

A real gateway with the tiny model's tokenizer, over stub engines that report
their `max_model_len` in `/v1/models` as vLLM does.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import random
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from kvgate.model import SERVED_MODEL_NAME, build_model
from kvgate.stub_engine import StubEngine, run_app, run_stub
from router.app import GATEWAY, RUNNER_OPTIONS, create_app
from router.discovery import StaticDiscovery
from router.prompts import PromptEncoder
from router.tokenize import PromptTokenizer
from tests.loopback.conftest import Cluster, fast_settings, wait_until

MODEL = SERVED_MODEL_NAME


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> PromptTokenizer:
    model_dir: Path = build_model(tmp_path_factory.mktemp("long-prompts") / MODEL)
    return PromptTokenizer.from_model_dir(model_dir)


@contextlib.asynccontextmanager
async def tokenized_cluster(encoder: PromptEncoder, max_model_len: int, n: int = 2) -> AsyncIterator[Cluster]:
    async with contextlib.AsyncExitStack() as stack:
        engines = [
            await stack.enter_async_context(run_stub(StubEngine(model=MODEL, max_model_len=max_model_len)))
            for _ in range(n)
        ]
        app = create_app(
            fast_settings(), discovery=StaticDiscovery([e.url for e in engines]), encoder=encoder, rng=random.Random(7)
        )
        url = await stack.enter_async_context(run_app(app, **RUNNER_OPTIONS))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        gateway = app[GATEWAY]
        await wait_until(lambda: len(gateway.pods.healthy()) == n and all(p.max_model_len for p in gateway.pods))
        yield Cluster(url, gateway, engines, http)


def text_of_tokens(tokenizer: PromptTokenizer, tokens: int, seed: int = 1) -> str:
    """A completion prompt of exactly `tokens` tokens (BOS included)."""
    rng = random.Random(seed)
    words = ["kv", "cache", "block", "prefix", "route", "gateway", "engine", "token", "alpha", "42", "é", "\n"]
    text = " ".join(rng.choice(words) for _ in range(tokens))
    ids = tokenizer.encode_prompt(text)
    while len(ids) != tokens:
        text = tokenizer.decode(ids[1 : tokens], skip_special_tokens=True) if len(ids) > tokens else text + " kv"
        ids = tokenizer.encode_prompt(text)
    return text


async def error_of(response: aiohttp.ClientResponse) -> dict[str, Any]:
    assert response.status == 400, await response.text()
    return (await response.json())["error"]


async def test_prompts_that_cannot_fit_are_refused_with_openais_400(tokenizer):
    limit = 512
    async with tokenized_cluster(tokenizer, limit) as c:
        longest = tokenizer.max_token_chars * limit
        cases = [
            ("/v1/completions", {"prompt": "x" * (longest + 1)}, "prompt"),  # refused before tokenising
            ("/v1/completions", {"prompt": text_of_tokens(tokenizer, limit + 1)}, "prompt"),
            ("/v1/completions", {"prompt": text_of_tokens(tokenizer, limit)}, "prompt"),  # no room for output
            ("/v1/completions", {"prompt": list(range(limit + 1))}, "prompt"),
            ("/v1/completions", {"prompt": ["short", "x" * (longest + 1)]}, "prompt"),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": text_of_tokens(tokenizer, limit)}]}, "messages"),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}] * (limit + 1)}, "messages"),
        ]
        for path, body, param in cases:
            error = await error_of(await c.post(path, {"model": MODEL, "max_tokens": 4, **body}))
            assert error["type"] == "invalid_request_error" and error["code"] == "context_length_exceeded"
            assert error["param"] == param and str(limit) in error["message"], error

        error = await error_of(await c.post("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": limit + 1}))
        assert error["param"] == "max_tokens" and str(limit) in error["message"]
        assert not any(e.calls for e in c.engines), "nothing that cannot fit reaches a pod"

        # As vLLM: a prompt that fits is served even if prompt + max_tokens does not (vLLM lowers max_tokens).
        fits = text_of_tokens(tokenizer, limit - 1)
        response = await c.post("/v1/completions", {"model": MODEL, "prompt": fits, "max_tokens": limit})
        assert response.status == 200, await response.text()


async def test_a_body_of_100k_one_character_messages_is_refused_and_the_gateway_still_serves(tokenizer):
    async with tokenized_cluster(tokenizer, 4096) as c:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "x"} for _ in range(100_000)]}
        raw = json.dumps(body).encode()
        assert len(raw) > 3_000_000

        # The bound is a guard against a hang, not a speed target.
        response = await asyncio.wait_for(
            c.post("/v1/chat/completions", data=io.BytesIO(raw), headers={"content-type": "application/json"}), 60
        )
        error = await error_of(response)
        assert error["param"] == "messages" and "4096" in error["message"]

        health = await c.http.get(c.url + "/health")
        assert health.status == 200
        ok = await c.post("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
        assert ok.status == 200, await ok.text()


class WatchedTokenizer:
    """The tiny model's tokenizer, telling the test when a long prompt's tokenising starts and ends."""

    def __init__(self, inner: PromptTokenizer, loop: asyncio.AbstractEventLoop) -> None:
        self._inner = inner
        self._loop = loop
        self.max_token_chars = inner.max_token_chars
        self.started = asyncio.Event()
        self.finished = threading.Event()

    def encode_chat(self, messages: Any, **kwargs: Any) -> list[int]:
        return self._watch(lambda: self._inner.encode_chat(messages, **kwargs), long=len(str(messages)) > 10_000)

    def encode_prompt(self, text: str, **kwargs: Any) -> list[int]:
        return self._watch(lambda: self._inner.encode_prompt(text, **kwargs), long=len(text) > 10_000)

    def _watch(self, encode: Any, *, long: bool) -> list[int]:
        if not long:
            return encode()
        self._loop.call_soon_threadsafe(self.started.set)
        try:
            return encode()
        finally:
            self.finished.set()


async def test_health_answers_while_the_largest_allowed_prompt_is_tokenised(tokenizer):
    limit = 131_072
    watched = WatchedTokenizer(tokenizer, asyncio.get_running_loop())
    prompt = text_of_tokens(tokenizer, limit - 8)
    async with tokenized_cluster(watched, limit) as c:
        big = asyncio.create_task(c.post("/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 4}))
        try:
            await asyncio.wait_for(watched.started.wait(), 60)
            # Ordering, not timing: /health is answered again and again while
            # the prompt is being tokenised (a tokenizer holding the GIL, or
            # work on the event loop, would let one answer through at most).
            answered_meanwhile = 0
            while not watched.finished.is_set():
                health = await c.http.get(c.url + "/health")
                assert health.status == 200
                if not watched.finished.is_set():
                    answered_meanwhile += 1
            assert answered_meanwhile >= 5, f"/health answered {answered_meanwhile} times while tokenising"
        finally:
            response = await asyncio.wait_for(big, 120)
        assert response.status == 200, await response.text()
        assert sum(len(e.calls) for e in c.engines) == 1
