"""From a checked call to the token ids the engine will see, and their block hashes.

With the model's tokenizer (`router.tokenize`), chat messages are rendered with
the model's chat template and tokenised exactly as vLLM does, so the gateway's
blocks are the engine's blocks. Without one, `ByteEncoder` treats UTF-8 bytes
as tokens (blocks of `bytes_per_token x block_size` bytes): prefix matching
still works for shared text, only less precisely.

Every step grows with the prompt, so each is bounded and, when long, off the
event loop: prompts that cannot fit the pods' context are refused first
(`router.context_limit`: from the body alone, then from the rendered text's
length, then from the token count), and long prompts are tokenised and hashed
in a worker thread, the tokenizer releasing the GIL while it works.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from kvcache.keys import BlockHash, chain_hashes
from router.context_limit import ContextLimit
from router.errors import InvalidRequest
from router.schema import Call
from router.tokenize.errors import BadPromptError, PromptTooLongError

#: Prompts longer than this (characters) are tokenised and hashed in a worker thread.
_OFFLOAD_CHARS = 16_384
#: Characters a chat message counts for besides its text (role, template markers).
_MESSAGE_CHARS = 16


class PromptEncoder(Protocol):
    """What the gateway needs of a tokenizer.

    An encoder that has a `max_token_chars` attribute (the characters of its
    longest token) also takes `max_chars=` in both methods, and raises
    `PromptTooLongError` for a text (rendered chat) longer than that.
    """

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


def _content_chars(content: Any) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(len(p["text"]) if isinstance(p, dict) and isinstance(p.get("text"), str) else 256 for p in content)
    return 0


def _size(call: Call) -> int:
    body = call.body
    if call.kind == "chat":
        return sum(_content_chars(m.get("content")) + _MESSAGE_CHARS for m in body["messages"])
    prompt = body["prompt"]
    if isinstance(prompt, str):
        return len(prompt)
    return sum(len(p) if isinstance(p, (str, list)) else 1 for p in prompt)


class _Bounded:
    """An encoder that refuses texts longer than `max_chars` before tokenising them."""

    def __init__(self, encoder: PromptEncoder, max_chars: int) -> None:
        self._encoder = encoder
        self._max_chars = max_chars

    def encode_chat(self, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
        return self._encoder.encode_chat(messages, max_chars=self._max_chars, **kwargs)  # type: ignore[call-arg]

    def encode_prompt(self, text: str, **kwargs: Any) -> list[int]:
        if len(text) > self._max_chars:
            raise PromptTooLongError(len(text), self._max_chars)
        return self._encoder.encode_prompt(text, **kwargs)


def _prompt_tokens(encoder: PromptEncoder, call: Call, block_size: int, limit: ContextLimit | None) -> PromptTokens:
    units = getattr(encoder, "units_per_token", 1)
    if limit is not None and limit.max_chars is not None:
        encoder = _Bounded(encoder, limit.max_chars)
    ids, total = _encode(encoder, call)
    if limit is not None and units == 1:  # byte stand-ins only estimate the engine's tokens
        limit.check_tokens(len(ids), "messages" if call.kind == "chat" else "prompt")
    return PromptTokens(ids, tuple(chain_hashes(ids, block_size * units)), total // units)


async def tokenize(
    encoder: PromptEncoder, call: Call, block_size: int, *, max_model_len: int | None = None
) -> PromptTokens:
    """Token ids and block hashes of `call`'s prompt.

    Args:
        encoder: the model's tokenizer, or the byte stand-in.
        call: the checked request.
        block_size: tokens per KV block on the pods.
        max_model_len: the pods' context length, if known: longer prompts are
            refused, before tokenising where the body shows it.

    Raises:
        InvalidRequest: the messages do not fit the chat template, a chat
            template argument is malformed, or the prompt cannot fit
            `max_model_len` (code `context_length_exceeded`).
    """
    param = "messages" if call.kind == "chat" else "prompt"
    limit = None
    if max_model_len:
        limit = ContextLimit(max_model_len, getattr(encoder, "max_token_chars", None))
        limit.check_call(call)
    work = functools.partial(_prompt_tokens, encoder, call, block_size, limit)
    try:
        return await asyncio.to_thread(work) if _size(call) > _OFFLOAD_CHARS else work()
    except PromptTooLongError as exc:
        assert limit is not None  # only a limit makes the encoder refuse a text
        raise limit.too_many_chars(exc.chars, param) from exc
    except BadPromptError as exc:
        raise InvalidRequest(str(exc), param=param) from exc
