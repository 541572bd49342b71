"""From a checked call to the token ids the engine will see, and their block hashes.

With the model's tokenizer (`router.tokenize`), chat messages are rendered with
the model's chat template and tokenised exactly as vLLM does, so the gateway's
blocks are the engine's blocks. Without one, `ByteEncoder` treats UTF-8 bytes
as tokens (blocks of `bytes_per_token x block_size` bytes): prefix matching
still works for shared text, only less precisely.

Every request field that changes the engine's tokens is applied
(`router.prompt_options`), and the cache salt and LoRA adapter go into the
first block's key (`kvcache.keys.request_extra`), as the KV connector keys
them. A request whose tokens the gateway cannot know gets no block hashes, so
it is routed without a prefix match rather than with a wrong one.

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
from typing import Any, Literal, Protocol

from kvcache.keys import BlockHash, chain_hashes, request_extra
from router.context_limit import ContextLimit
from router.errors import InvalidRequest
from router.prompt_options import PromptOptions, Unkeyed, prompt_options
from router.schema import Call
from router.tokenize.errors import BadPromptError, PromptTooLongError, UnsupportedContentError
from router.tokenize.tokenizer import truncate_ids

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
        tools: list[dict[str, Any]] | None = None,
        documents: list[dict[str, Any]] | None = None,
        reasoning_effort: str | None = None,
        add_special_tokens: bool = False,
        truncate_prompt_tokens: int | None = None,
        truncation_side: Literal["left", "right"] | None = None,
    ) -> list[int]: ...

    def encode_prompt(
        self,
        text: str,
        *,
        add_special_tokens: bool = True,
        truncate_prompt_tokens: int | None = None,
        truncation_side: Literal["left", "right"] | None = None,
    ) -> list[int]: ...


class ByteEncoder:
    """Fallback without a tokenizer: one "token" per UTF-8 byte, about 4 per engine token.

    What a template would render before the messages (tools, documents,
    kwargs) leads the bytes, so requests that differ there share no prefix.
    Truncation counts tokens, which bytes cannot: such requests go unkeyed.
    """

    units_per_token = 4

    def encode_chat(self, messages: list[dict[str, Any]], **options: Any) -> list[int]:
        extras = {k: options[k] for k in ("tools", "documents", "chat_template_kwargs") if options.get(k)}
        shown: Any = [extras, messages] if extras else messages
        return list(json.dumps(shown, ensure_ascii=False, separators=(",", ":")).encode())

    def encode_prompt(self, text: str, **_: Any) -> list[int]:
        return list(text.encode())


@dataclass(frozen=True, slots=True)
class PromptTokens:
    """The prompt as the router sees it."""

    token_ids: Sequence[int]
    block_hashes: tuple[BlockHash, ...]
    total_tokens: int
    """Engine tokens over every prompt of a batch (completions may send several)."""
    unkeyed: Unkeyed | None = None
    """Why the prompt has no block hashes although it has tokens: the gateway
    cannot know the engine's tokens, so it routes without a prefix match."""


def _encode(encoder: PromptEncoder, call: Call, options: PromptOptions) -> tuple[list[int], int]:
    body = call.body
    if options.reused_ids is not None and getattr(encoder, "units_per_token", 1) == 1:
        return list(options.reused_ids), len(options.reused_ids)
    truncation: dict[str, Any] = {}
    if options.truncate_prompt_tokens is not None:
        truncation = {
            "truncate_prompt_tokens": options.truncate_prompt_tokens,
            "truncation_side": options.truncation_side,
        }
    if call.kind == "chat":
        ids = encoder.encode_chat(
            body["messages"],
            add_generation_prompt=options.add_generation_prompt,
            continue_final_message=options.continue_final_message,
            chat_template_kwargs=options.chat_template_kwargs,
            tools=options.tools,
            documents=options.documents,
            reasoning_effort=options.reasoning_effort,
            add_special_tokens=options.add_special_tokens,
            **truncation,
        )
        return ids, len(ids)

    def one(prompt: Any) -> list[int]:
        if isinstance(prompt, str):
            return encoder.encode_prompt(prompt, add_special_tokens=options.add_special_tokens, **truncation)
        # Token ids reach the engine as they are: no special tokens added, only the cut.
        ids = list(prompt)
        keep = options.truncate_prompt_tokens
        return ids if keep is None else truncate_ids(ids, keep, options.truncation_side)

    prompt = body["prompt"]
    if isinstance(prompt, str) or isinstance(prompt[0], int):
        ids = one(prompt)
        return ids, len(ids)
    # A batch: route by the first prompt, count the work of all of them.
    batch = [one(p) for p in prompt]
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


def _prompt_tokens(
    encoder: PromptEncoder,
    call: Call,
    block_size: int,
    options: PromptOptions,
    limit: ContextLimit | None,
    lora_name: str | None,
) -> PromptTokens:
    units = getattr(encoder, "units_per_token", 1)
    if limit is not None and limit.max_chars is not None:
        encoder = _Bounded(encoder, limit.max_chars)
    ids, total = _encode(encoder, call, options)
    if limit is not None and units == 1:  # byte stand-ins only estimate the engine's tokens
        limit.check_tokens(len(ids), "messages" if call.kind == "chat" else "prompt")
    extra = request_extra(options.cache_salt, lora_name)
    return PromptTokens(ids, tuple(chain_hashes(ids, block_size * units, first_extra=extra)), total // units)


async def tokenize(
    encoder: PromptEncoder,
    call: Call,
    block_size: int,
    *,
    lora_name: str | None = None,
    max_model_len: int | None = None,
) -> PromptTokens:
    """Token ids and block hashes of `call`'s prompt.

    Args:
        encoder: the model's tokenizer, or `ByteEncoder`.
        call: the checked request.
        block_size: engine tokens per block.
        lora_name: the LoRA adapter `call.model` names, or None for a base model.
        max_model_len: the pods' context length, if known: longer prompts are
            refused, before tokenising where the body shows it (not when the
            request asks the engine to truncate it).

    Returns:
        The prompt's ids and its block hashes, keyed by the request's cache
        salt and adapter. No hashes (and `unkeyed` set) when the engine's
        tokens cannot be known here.

    Raises:
        InvalidRequest: the messages do not fit the chat template, a chat
            template argument is malformed, or the prompt cannot fit
            `max_model_len` (code `context_length_exceeded`).
    """
    param = "messages" if call.kind == "chat" else "prompt"
    options = prompt_options(call.kind, call.body)
    units = getattr(encoder, "units_per_token", 1)
    limit = None
    if max_model_len and options.truncate_prompt_tokens is None:
        limit = ContextLimit(max_model_len, getattr(encoder, "max_token_chars", None))
        limit.check_call(call)
    if options.unkeyed is not None:
        return _unkeyed(call, options.unkeyed)
    if units != 1 and options.truncate_prompt_tokens is not None:
        # Bytes cannot be cut where the engine cuts tokens (from the left, by default).
        return _unkeyed(call, "truncation")
    work = functools.partial(_prompt_tokens, encoder, call, block_size, options, limit, lora_name)
    try:
        return await asyncio.to_thread(work) if _size(call) > _OFFLOAD_CHARS else work()
    except UnsupportedContentError:
        return _unkeyed(call, "multimodal")
    except PromptTooLongError as exc:
        assert limit is not None  # only a limit makes the encoder refuse a text
        raise limit.too_many_chars(exc.chars, param) from exc
    except BadPromptError as exc:
        raise InvalidRequest(str(exc), param=param) from exc


def _unkeyed(call: Call, reason: Unkeyed) -> PromptTokens:
    """No ids, no hashes; the prompt's size guessed from its characters (about 4 per token)."""
    return PromptTokens((), (), max(1, _size(call) // 4), unkeyed=reason)
