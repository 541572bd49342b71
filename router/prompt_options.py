"""The request fields, besides the prompt, that decide the engine's prompt tokens and block keys.

vLLM's `/v1/chat/completions` renders `messages` with the chat template and
also hands it `tools`, `documents`, `chat_template_kwargs` (merged with
`reasoning_effort`), `add_generation_prompt` and `continue_final_message`;
both endpoints then tokenise with `add_special_tokens` and cut the ids to
`truncate_prompt_tokens` from `truncation_side`. A chat may carry the ids to
use outright (`kv_transfer_params.prompt_token_ids`, as disaggregated
serving forwards them). `cache_salt` (and the LoRA adapter the model names)
leave the tokens alone but change every block's key. A gateway that missed
any of these would hash other blocks than the engine caches.

`prompt_options` reads them from a body, answers a malformed one with
`InvalidRequest` (400, called from `router.schema.parse_call`), and names
what the gateway cannot reproduce: a chat template sent with the request,
prompt embeddings, a fill-in-the-middle `suffix`, truncation to the engine's
own context length (`-1`). For those the router routes without a prefix
match rather than with a wrong one (`router.prompts`), counted by reason.

`echo`, `tool_choice`, `n` and the sampling fields leave the prompt alone.

NOTE: engine flags the gateway cannot see change the prompt too
(`--chat-template`, `--default-chat-template-kwargs`,
`--exclude-tools-when-tool-choice-none`); the gateway assumes vLLM's defaults
and the model directory's own template.

Not here: rendering and tokenising (`router.tokenize`), block hashing
(`kvcache.keys`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from router.errors import InvalidRequest

#: Why a request is routed without a prefix match. Bounded: a metric label.
Unkeyed = Literal["chat_template", "multimodal", "prompt_embeds", "suffix", "truncation"]

#: vLLM's limits on a cache salt (longer or with these characters: 400).
_MAX_SALT_CHARS = 128
_SALT_FORBIDDEN = frozenset("@/\\\x00")


@dataclass(frozen=True, slots=True)
class PromptOptions:
    """What shapes one request's prompt tokens and keys, read from its body."""

    add_special_tokens: bool
    """Let the tokenizer add its special tokens (False for chats, True for completions, as in vLLM)."""
    add_generation_prompt: bool
    continue_final_message: bool
    chat_template_kwargs: Mapping[str, Any] | None
    tools: list[Any] | None
    documents: list[Any] | None
    reasoning_effort: str | None
    truncate_prompt_tokens: int | None
    """Tokens to keep (never -1 here: that makes the request unkeyed)."""
    truncation_side: Literal["left", "right"] | None
    cache_salt: str | None
    reused_ids: list[int] | None
    """Token ids the engine will use as they are (a chat's `kv_transfer_params.prompt_token_ids`)."""
    unkeyed: Unkeyed | None
    """Set when the gateway cannot know the engine's tokens: route without a prefix match."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _flag(body: Mapping[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidRequest(f"'{name}' must be a boolean", param=name)
    return value


def _list_of_objects(body: Mapping[str, Any], name: str) -> list[Any] | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise InvalidRequest(f"'{name}' must be an array of objects", param=name)
    return value


def _cache_salt(body: Mapping[str, Any]) -> str | None:
    salt = body.get("cache_salt")
    if salt is None:
        return None
    if not isinstance(salt, str) or not salt:
        raise InvalidRequest("'cache_salt' must be a non-empty string", param="cache_salt")
    if len(salt) > _MAX_SALT_CHARS or not _SALT_FORBIDDEN.isdisjoint(salt):
        raise InvalidRequest(
            f"'cache_salt' must be at most {_MAX_SALT_CHARS} characters without '@', '/', '\\' or NUL",
            param="cache_salt",
        )
    return salt


def _truncation(body: Mapping[str, Any]) -> tuple[int | None, Literal["left", "right"] | None]:
    keep = body.get("truncate_prompt_tokens")
    if keep is not None and (not _is_int(keep) or keep < -1):
        raise InvalidRequest("'truncate_prompt_tokens' must be an integer of at least -1", param="truncate_prompt_tokens")
    side = body.get("truncation_side")
    if side is not None and side not in ("left", "right"):
        raise InvalidRequest("'truncation_side' must be 'left' or 'right'", param="truncation_side")
    return keep, side


def _reused_ids(body: Mapping[str, Any]) -> list[int] | None:
    """A chat's forwarded prompt ids, when the engine will use them (vLLM ignores them with `echo`)."""
    params = body.get("kv_transfer_params")
    if not isinstance(params, dict) or body.get("echo"):
        return None
    ids = params.get("prompt_token_ids")
    if ids is None:
        return None
    if not isinstance(ids, list) or not ids or not all(_is_int(t) and t >= 0 for t in ids):
        raise InvalidRequest(
            "'kv_transfer_params.prompt_token_ids' must be a non-empty array of non-negative integers",
            param="kv_transfer_params.prompt_token_ids",
        )
    return ids


def prompt_options(kind: Literal["chat", "completion"], body: Mapping[str, Any]) -> PromptOptions:
    """Read and check the fields of `body` that shape its prompt tokens and keys.

    Args:
        kind: "chat" or "completion".
        body: the parsed request body.

    Returns:
        The options; `unkeyed` says when the engine's tokens cannot be known.

    Raises:
        InvalidRequest: a field has the wrong type (`chat_template_kwargs`
            not an object, `cache_salt` not a non-empty string, ...).
    """
    unkeyed: Unkeyed | None = None
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise InvalidRequest("'chat_template_kwargs' must be an object", param="chat_template_kwargs")
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise InvalidRequest("'tools' must be an array", param="tools")
    effort = body.get("reasoning_effort")
    if effort is not None and not isinstance(effort, str):
        raise InvalidRequest("'reasoning_effort' must be a string", param="reasoning_effort")
    template = body.get("chat_template")
    if template is not None and not isinstance(template, str):
        raise InvalidRequest("'chat_template' must be a string", param="chat_template")
    keep, side = _truncation(body)
    salt = _cache_salt(body)
    documents = _list_of_objects(body, "documents")
    add_special = _flag(body, "add_special_tokens", kind == "completion")
    add_generation = _flag(body, "add_generation_prompt", True)
    continue_final = _flag(body, "continue_final_message", False)
    _flag(body, "echo", False)
    reused = _reused_ids(body) if kind == "chat" else None

    # A template sent with the request is the engine's to accept or refuse
    # (only with --trust-request-chat-template); the gateway renders only
    # the model's own.
    if template is not None or (kwargs is not None and kwargs.get("chat_template") is not None):
        unkeyed = "chat_template"
    elif kind == "completion" and body.get("prompt_embeds") is not None:
        unkeyed = "prompt_embeds"
    elif kind == "completion" and body.get("suffix") is not None:
        unkeyed = "suffix"
    elif keep == -1 and reused is None:
        # NOTE: -1 means the engine's context length (less one when
        # `max_tokens` is set); pods may differ, so no one cut is right.
        unkeyed = "truncation"
    return PromptOptions(
        add_special_tokens=add_special,
        add_generation_prompt=add_generation,
        continue_final_message=continue_final,
        chat_template_kwargs=kwargs,
        tools=tools,
        documents=documents,
        reasoning_effort=effort,
        truncate_prompt_tokens=None if keep == -1 else keep,
        truncation_side=side,
        cache_salt=salt,
        reused_ids=reused,
        unkeyed=unkeyed,
    )
