"""The request fields besides the prompt reach the gateway's tokens and keys as they reach the engine's.

Tools, documents, template kwargs, `add_special_tokens` and truncation change
the tokens; `cache_salt` and the LoRA adapter change the keys; a prompt whose
tokens the gateway cannot know gets no keys at all (routed without a prefix
match). `tests/e2e/test_tokenize_matches_vllm.py` holds the same fields
against a real engine.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from kvcache.keys import request_extra
from kvcache.transfer_plan import TransferPlanner
from kvgate.model import build_model
from router.errors import InvalidRequest
from router.index import PrefixIndex
from router.pods import PodId, lora_adapters
from router.prompts import ByteEncoder, tokenize
from router.schema import parse_call
from router.tokenize import PromptTokenizer

BLOCK = 16
POD = PodId("http://pod-a")

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant. " * 8},
    {"role": "user", "content": "What is the weather in Paris today?"},
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> PromptTokenizer:
    return PromptTokenizer.from_model_dir(build_model(tmp_path_factory.mktemp("model") / "tiny-llama"))


def call(kind: str = "chat", **fields: Any):
    body: dict[str, Any] = {"model": "tiny-llama", **fields}
    if kind == "chat":
        body.setdefault("messages", MESSAGES)
    else:
        body.setdefault("prompt", "Once upon a time " * 20)
    return parse_call(kind, json.dumps(body).encode(), max_tokens_limit=4096)  # type: ignore[arg-type]


async def keys(encoder, kind: str = "chat", *, lora_name: str | None = None, **fields: Any):
    return await tokenize(encoder, call(kind, **fields), BLOCK, lora_name=lora_name)


# --------------------------------------------------------------------------
# Tokens
# --------------------------------------------------------------------------


async def test_tools_change_the_tokens_and_every_block_hash_from_the_first(tok: PromptTokenizer) -> None:
    plain = await keys(tok)
    with_tools = await keys(tok, tools=TOOLS)
    assert list(with_tools.token_ids) == tok.encode_chat(MESSAGES, tools=TOOLS)
    assert list(with_tools.token_ids) != list(plain.token_ids)
    # The template puts tools up front: no block is shared.
    assert with_tools.block_hashes and not set(with_tools.block_hashes) & set(plain.block_hashes)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        pytest.param({"add_special_tokens": True}, {"add_special_tokens": True}, id="add-special-tokens"),
        pytest.param({"documents": [{"title": "a", "text": "b"}]}, {"documents": [{"title": "a", "text": "b"}]}, id="documents"),
        pytest.param({"reasoning_effort": "none"}, {"reasoning_effort": "none"}, id="reasoning-effort"),
        pytest.param({"chat_template_kwargs": {"enable_thinking": False}}, {"chat_template_kwargs": {"enable_thinking": False}}, id="template-kwargs"),
        pytest.param(
            {"messages": MESSAGES + [{"role": "assistant", "content": "It is"}], "add_generation_prompt": False, "continue_final_message": True},
            {"add_generation_prompt": False, "continue_final_message": True},
            id="continue-final-message",
        ),
    ],
)
async def test_chat_fields_reach_the_encoder(tok: PromptTokenizer, fields: dict[str, Any], expected: dict[str, Any]) -> None:
    prompt = await keys(tok, **fields)
    messages = fields.get("messages", MESSAGES)
    assert list(prompt.token_ids) == tok.encode_chat(messages, **expected)
    assert list(prompt.token_ids) != tok.encode_chat(MESSAGES)


def test_reasoning_effort_sets_enable_thinking_unless_the_kwargs_do(tok: PromptTokenizer) -> None:
    off = tok.render_chat(MESSAGES, reasoning_effort="none")
    assert off.endswith("<think></think>\n")
    assert not tok.render_chat(MESSAGES, reasoning_effort="high").endswith("<think></think>\n")
    kept = tok.render_chat(MESSAGES, reasoning_effort="none", chat_template_kwargs={"enable_thinking": True})
    assert not kept.endswith("<think></think>\n")
    # vLLM drops unset ("auto", null) kwargs before the template sees them.
    assert tok.render_chat(MESSAGES, chat_template_kwargs={"enable_thinking": None}) == tok.render_chat(MESSAGES)


async def test_completion_add_special_tokens_false_drops_the_bos(tok: PromptTokenizer) -> None:
    with_bos = await keys(tok, "completion")
    without = await keys(tok, "completion", add_special_tokens=False)
    assert list(with_bos.token_ids) == [0, *without.token_ids]


async def test_token_id_prompts_get_no_special_tokens(tok: PromptTokenizer) -> None:
    ids = list(range(5, 5 + 3 * BLOCK))
    prompt = await keys(tok, "completion", prompt=ids, add_special_tokens=True)
    assert list(prompt.token_ids) == ids


@pytest.mark.parametrize(
    ("side", "expect"),
    [
        pytest.param("left", lambda full, n: full[-n:], id="left-keeps-the-last"),
        pytest.param("right", lambda full, n: full[:n], id="right-keeps-the-first"),
        # The tokenizer's own truncation (vLLM sets "left"): the text is cut, the BOS stays.
        pytest.param(None, lambda full, n: full[:1] + full[-(n - 1) :], id="default-cuts-before-special-tokens"),
    ],
)
async def test_truncation_cuts_the_prompt_as_the_engine_does(tok: PromptTokenizer, side, expect) -> None:
    full = list((await keys(tok, "completion")).token_ids)
    keep = 2 * BLOCK + 3
    prompt = await keys(tok, "completion", truncate_prompt_tokens=keep, truncation_side=side)
    assert list(prompt.token_ids) == expect(full, keep)
    ids = list(range(5, 200))
    as_ids = await keys(tok, "completion", prompt=ids, truncate_prompt_tokens=keep, truncation_side=side)
    assert list(as_ids.token_ids) == (ids[:keep] if side == "right" else ids[-keep:])


async def test_forwarded_prompt_ids_are_the_prompt(tok: PromptTokenizer) -> None:
    ids = list(range(7, 7 + 2 * BLOCK))
    prompt = await keys(tok, kv_transfer_params={"prompt_token_ids": ids})
    assert list(prompt.token_ids) == ids
    # With echo vLLM renders the messages instead.
    echoed = await keys(tok, kv_transfer_params={"prompt_token_ids": ids}, echo=True)
    assert list(echoed.token_ids) == tok.encode_chat(MESSAGES)


async def test_byte_encoder_sees_tools_too() -> None:
    encoder = ByteEncoder()
    plain, with_tools = await keys(encoder), await keys(encoder, tools=TOOLS)
    assert plain.block_hashes and not set(plain.block_hashes) & set(with_tools.block_hashes)


async def test_byte_encoder_cannot_truncate_so_it_does_not_key() -> None:
    prompt = await keys(ByteEncoder(), "completion", truncate_prompt_tokens=8)
    assert prompt.block_hashes == () and prompt.unkeyed == "truncation"


# --------------------------------------------------------------------------
# Keys: salt and adapter
# --------------------------------------------------------------------------


async def test_two_salts_never_share_a_prefix_match(tok: PromptTokenizer) -> None:
    index = PrefixIndex(1000)
    salted = await keys(tok, cache_salt="tenant-a")
    index.insert(POD, salted.block_hashes)
    assert index.match(salted.block_hashes).get(POD) == len(salted.block_hashes) > 1
    for other in ({"cache_salt": "tenant-b"}, {}):
        prompt = await keys(tok, **other)
        assert prompt.token_ids == salted.token_ids  # same tokens: only the key differs
        assert index.match(prompt.block_hashes).get(POD, 0) == 0, other


async def test_a_lora_adapter_keys_its_blocks(tok: PromptTokenizer) -> None:
    base = await keys(tok)
    adapter = await keys(tok, lora_name="sql-lora")
    other = await keys(tok, lora_name="chat-lora")
    assert len({base.block_hashes[0], adapter.block_hashes[0], other.block_hashes[0]}) == 3


async def test_router_keys_equal_the_connector_keys(tok: PromptTokenizer) -> None:
    """The connector's planner hashes a salted adapter request as the router does."""
    prompt = await keys(tok, cache_salt="s1", lora_name="sql-lora")
    seen: list[Any] = []
    planner = TransferPlanner(block_size=BLOCK, lookup=lambda hashes: seen.extend(hashes) or [None] * len(hashes))
    planner.match("r1", list(prompt.token_ids), 0, salt=request_extra("s1", "sql-lora"))
    assert seen and list(prompt.block_hashes[: len(seen)]) == seen


def test_adapters_are_the_models_with_a_parent() -> None:
    served = [
        {"id": "tiny-llama", "root": "/models/tiny-llama", "parent": None},
        {"id": "sql-lora", "root": "/adapters/sql", "parent": "tiny-llama"},
        {"id": "odd", "parent": "odd"},
        "junk",
    ]
    assert lora_adapters(served) == frozenset({"sql-lora"})


# --------------------------------------------------------------------------
# What the gateway cannot reproduce, and malformed fields
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "fields", "reason"),
    [
        pytest.param("chat", {"chat_template": "{{ messages }}"}, "chat_template", id="request-template"),
        pytest.param("chat", {"chat_template_kwargs": {"chat_template": "x"}}, "chat_template", id="template-in-kwargs"),
        pytest.param(
            "chat",
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}]},
            "multimodal",
            id="image",
        ),
        pytest.param("completion", {"prompt_embeds": "AAAA"}, "prompt_embeds", id="prompt-embeds"),
        pytest.param("completion", {"suffix": "end"}, "suffix", id="fill-in-the-middle"),
        pytest.param("completion", {"truncate_prompt_tokens": -1}, "truncation", id="truncate-to-context"),
    ],
)
async def test_unreproducible_prompts_get_no_keys(tok: PromptTokenizer, kind: str, fields: dict[str, Any], reason: str) -> None:
    prompt = await keys(tok, kind, **fields)
    assert prompt.block_hashes == () and prompt.unkeyed == reason
    assert prompt.total_tokens > 0


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        pytest.param({"chat_template_kwargs": ["a"]}, "chat_template_kwargs", id="kwargs-a-list"),
        pytest.param({"chat_template_kwargs": "x"}, "chat_template_kwargs", id="kwargs-a-string"),
        pytest.param({"cache_salt": 5}, "cache_salt", id="salt-a-number"),
        pytest.param({"cache_salt": ""}, "cache_salt", id="salt-empty"),
        pytest.param({"cache_salt": "a/b"}, "cache_salt", id="salt-with-slash"),
        pytest.param({"cache_salt": "x" * 129}, "cache_salt", id="salt-too-long"),
        pytest.param({"tools": {"type": "function"}}, "tools", id="tools-an-object"),
        pytest.param({"documents": ["text"]}, "documents", id="documents-not-objects"),
        pytest.param({"add_special_tokens": "yes"}, "add_special_tokens", id="add-special-tokens-a-string"),
        pytest.param({"truncate_prompt_tokens": -2}, "truncate_prompt_tokens", id="truncate-below-minus-one"),
        pytest.param({"truncate_prompt_tokens": 1.5}, "truncate_prompt_tokens", id="truncate-a-float"),
        pytest.param({"truncation_side": "middle"}, "truncation_side", id="side-unknown"),
        pytest.param({"reasoning_effort": 3}, "reasoning_effort", id="effort-a-number"),
        pytest.param({"kv_transfer_params": {"prompt_token_ids": [1, -1]}}, "kv_transfer_params.prompt_token_ids", id="reused-ids-negative"),
    ],
)
def test_malformed_prompt_fields_are_bad_requests(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        call("chat", **fields)
    assert caught.value.status == 400 and caught.value.param == param
