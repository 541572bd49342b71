"""From a checked call to the token ids the engine will see, and their block hashes.

With the model's tokenizer (`router.tokenize`), chat messages are rendered with
the model's chat template and tokenised exactly as vLLM does, so the gateway's
blocks are the engine's blocks. Without one, `ByteEncoder` treats UTF-8 bytes
as tokens (blocks of `bytes_per_token x block_size` bytes): prefix matching
still works for shared text, only less precisely.

Long prompts are tokenised off the event loop.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from kvcache.keys import BlockHash, chain_hashes
from router.errors import InvalidRequest
from router.schema import Call
from router.tokenize.errors import BadPromptError

#: Prompts longer than this (characters) are tokenised in a worker thread.
_OFFLOAD_CHARS = 16_384


class PromptEncoder(Protocol):
    """What the gateway needs of a tokenizer."""

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]: ...

    def encode_prompt(self, text: str) -> list[int]: ...


class ByteEncoder:
    """Fallback without a tokenizer: one "token" per UTF-8 byte, about 4 per engine token."""

    units_per_token = 4

    def encode_chat(self, messages: list[dict[str, Any]], **_: Any) -> list[int]:
        return list(json.dumps(messages, ensure_ascii=False, separators=(",", ":")).encode())

    def encode_prompt(self, text: str) -> list[int]:
        return list(text.encode())


@dataclass(frozen=True, slots=True)
class PromptTokens:
    """The prompt as the router sees it."""

    token_ids: Sequence[int]
    block_hashes: tuple[BlockHash, ...]
    total_tokens: int
    """Engine tokens over every prompt of a batch (completions may send several)."""


def _encode(encoder: PromptEncoder, call: Call) -> tuple[list[int], int]:
    body = call.body
    if call.kind == "chat":
        ids = encoder.encode_chat(
            body["messages"],
            add_generation_prompt=body.get("add_generation_prompt", True),
            continue_final_message=body.get("continue_final_message", False),
            chat_template_kwargs=body.get("chat_template_kwargs"),
        )
        return ids, len(ids)
    prompt = body["prompt"]
    if isinstance(prompt, str):
        ids = encoder.encode_prompt(prompt)
        return ids, len(ids)
    if isinstance(prompt[0], int):
        return list(prompt), len(prompt)
    # A batch: route by the first prompt, count the work of all of them.
    batch = [encoder.encode_prompt(p) if isinstance(p, str) else list(p) for p in prompt]
    return batch[0], sum(len(ids) for ids in batch)


def _size(call: Call) -> int:
    body = call.body
    if call.kind == "chat":
        return sum(len(m["content"]) if isinstance(m.get("content"), str) else 256 for m in body["messages"])
    prompt = body["prompt"]
    return len(prompt) if isinstance(prompt, str) else sum(len(p) if isinstance(p, str) else 0 for p in prompt)


async def tokenize(encoder: PromptEncoder, call: Call, block_size: int) -> PromptTokens:
    """Token ids and block hashes of `call`'s prompt.

    Raises:
        InvalidRequest: the messages do not fit the chat template, or a chat
            template argument is malformed.
    """
    try:
        if _size(call) > _OFFLOAD_CHARS:
            ids, total = await asyncio.to_thread(_encode, encoder, call)
        else:
            ids, total = _encode(encoder, call)
    except BadPromptError as exc:
        raise InvalidRequest(str(exc), param="messages" if call.kind == "chat" else "prompt") from exc
    units = getattr(encoder, "units_per_token", 1)
    return PromptTokens(ids, tuple(chain_hashes(ids, block_size * units)), total // units)
