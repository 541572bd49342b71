"""OpenAI chat messages into the conversation a chat template sees, as vLLM builds it.

vLLM does not hand the request's `messages` to the template verbatim. It
flattens content parts (joined with a newline for templates that want one
string, wrapped as `{"type": "text", "text": ...}` dicts for templates that walk
parts), turns a missing content into an empty one, copies over `name`,
assistant `tool_calls` (with JSON `arguments` parsed into objects) and
`reasoning`, drops Claude Code's per-request billing header from system text,
and, when the template does not know the `developer` role, turns developer
messages into system messages merged at the front. Any of these changes the
rendered text, hence the tokens, hence the KV blocks; so the gateway does the
same, here.

vLLM also validates the request with the OpenAI schema first, which puts the
schema's keys of nested objects (tool calls, tool definitions) first, in the
schema's order, and keeps other keys after them. A template that prints them
with `tojson` therefore prints that order; `_ordered` reproduces it.

The gateway tokenises text only: image, audio and video parts raise
`UnsupportedContentError` (the tiny model is text-only, and multimodal
placeholders would need the model's processor).

Called by `router.tokenize.tokenizer.PromptTokenizer`.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from typing import Any

from router.tokenize.chat_template import ContentFormat
from router.tokenize.errors import MessageFormatError, UnsupportedContentError

#: Content part types that carry text, and the field holding it.
_TEXT_FIELDS: Mapping[str, str] = {
    "text": "text",
    "input_text": "text",
    "output_text": "text",
    "refusal": "refusal",
    "thinking": "thinking",
}

_BILLING_HEADER = "x-anthropic-billing-header"

#: Keys of OpenAI content parts (all part types); any other key of a text part
#: is kept next to its text in the "openai" content format.
_PART_FIELDS = frozenset(
    {
        "audio_embeds", "audio_url", "closed", "data", "file", "image_embeds", "image_pil",
        "image_url", "input_audio", "name", "prompt_cache_breakpoint", "refusal", "text",
        "thinking", "type", "uuid", "video_embeds", "video_url",
    }
)  # fmt: skip

#: Schema key order of the OpenAI objects that reach templates nested in messages.
_TOOL_CALL_KEYS = ("id", "function", "type")
_TOOL_CALL_FUNCTION_KEYS = ("arguments", "name")
_TOOL_KEYS = ("function", "type")
_FUNCTION_DEFINITION_KEYS = ("name", "description", "parameters", "strict")


def _ordered(obj: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """A copy of `obj` with the schema's `keys` first, in order, then the others as given."""
    out = {key: obj[key] for key in keys if key in obj}
    out.update((key, value) for key, value in obj.items() if key not in out)
    return out


def _part_text(part: Any, index: int) -> str:
    """The text of a content part."""
    if isinstance(part, str):
        return part
    if not isinstance(part, Mapping):
        raise MessageFormatError(f"content part {index} must be a string or an object, got {type(part).__name__}")
    kind = part.get("type")
    if kind is None:
        raise MessageFormatError(f"content part {index} has no 'type' field")
    if not isinstance(kind, str):
        raise MessageFormatError(f"content part {index} has an invalid 'type' field")
    field = _TEXT_FIELDS.get(kind)
    if field is None or part.get("uuid") is not None:
        raise UnsupportedContentError(
            f"content part {index} of type {kind!r} is not supported: the gateway routes text-only prompts"
        )
    text = part.get(field)
    if not isinstance(text, str):
        raise MessageFormatError(f"content part {index} of type {kind!r} needs a string {field!r}")
    return text


def _strip_billing_header(parts: list[Any]) -> list[Any]:
    """Drop the first line of system text parts that start with the billing header.

    The header carries a value that changes on every request, so a prompt that
    kept it would never share its first block with another.
    """
    kept: list[Any] = []
    for part in parts:
        if isinstance(part, str):
            text: Any = part
        elif isinstance(part, Mapping) and part.get("type") == "text":
            text = part.get("text")
        else:
            text = None
        if not (isinstance(text, str) and text.startswith(_BILLING_HEADER)):
            kept.append(part)
            continue
        rest = text.partition("\n")[2]
        if rest:
            kept.append(rest if isinstance(part, str) else {**part, "text": rest})
    return kept


def _text_part(text: str, part: Any) -> dict[str, Any]:
    extras = {k: v for k, v in part.items() if k not in _PART_FIELDS} if isinstance(part, Mapping) else {}
    return {"type": "text", "text": text, **copy.deepcopy(extras)}


def _content_parts(message: Mapping[str, Any], index: int) -> list[Any]:
    content = message.get("content")
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, (list, tuple)):
        return list(content)
    raise MessageFormatError(f"message {index}: 'content' must be a string, a list of parts or null")


def _tool_arguments(arguments: Any) -> dict[str, Any]:
    # Malformed arguments live on in the conversation history, so they are
    # coerced to {} rather than failing every later turn (vLLM does the same).
    if not arguments:
        return {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return {}
    return arguments if isinstance(arguments, dict) else {}


def _tool_calls(raw: Any, index: int) -> list[dict[str, Any]]:
    if not isinstance(raw, (list, tuple)):
        raise MessageFormatError(f"message {index}: 'tool_calls' must be a list")
    calls = []
    for call in raw:
        if not isinstance(call, Mapping):
            raise MessageFormatError("assistant tool_calls entries must be objects")
        function = call.get("function")
        if call.get("type") != "function" or not isinstance(function, Mapping):
            raise MessageFormatError("chat completions only support assistant tool_calls of type 'function'")
        # The OpenAI schema vLLM validates against: all three are required strings.
        if not all(isinstance(v, str) for v in (call.get("id"), function.get("name"), function.get("arguments"))):
            raise MessageFormatError(
                "each tool call needs a string 'id', and a 'function' with string 'name' and 'arguments'"
            )
        call = _ordered(copy.deepcopy(dict(call)), _TOOL_CALL_KEYS)
        call["function"] = _ordered(call["function"], _TOOL_CALL_FUNCTION_KEYS)
        call["function"]["arguments"] = _tool_arguments(call["function"].get("arguments"))
        calls.append(call)
    return calls


def _convert(message: Any, index: int, content_format: ContentFormat) -> dict[str, Any]:
    if not isinstance(message, Mapping):
        raise MessageFormatError(f"message {index} must be an object")
    role = message.get("role")
    if not isinstance(role, str):
        raise MessageFormatError(f"message {index} needs a string 'role'")
    parts = _content_parts(message, index)
    if role == "system":
        parts = _strip_billing_header(parts)
    texts = [(_part_text(part, i), part) for i, part in enumerate(parts)]

    out: dict[str, Any] = {"role": role}
    if content_format == "openai" and role != "tool":
        out["content"] = [_text_part(text, part) for text, part in texts]
    else:
        out["content"] = "\n".join(text for text, _ in texts)

    if role == "assistant":
        raw_calls = message.get("tool_calls")
        if raw_calls is not None:
            calls = _tool_calls(raw_calls, index)
            if calls:
                out["tool_calls"] = calls
        reasoning = message.get("reasoning")
        if reasoning is not None:
            out["reasoning"] = out["reasoning_content"] = reasoning
    elif role == "tool" and "tool_call_id" in message:
        out["tool_call_id"] = message["tool_call_id"]
    # As the OpenAI schema has it: a name must be a string, a tool call id may be null.
    if "name" in message and not isinstance(message["name"], str):
        raise MessageFormatError(f"message {index}: 'name' must be a string")
    if message.get("tool_call_id") is not None and not isinstance(message["tool_call_id"], str):
        raise MessageFormatError(f"message {index}: 'tool_call_id' must be a string")
    for key in ("name", "task"):
        if isinstance(message.get(key), str):
            out[key] = message[key]
    if role == "developer":
        out["tools"] = _developer_tools(message.get("tools"))
    return out


def _developer_tools(tools: Any) -> Any:
    if not isinstance(tools, (list, tuple)):
        return copy.deepcopy(tools)
    ordered = []
    for tool in tools:
        if isinstance(tool, Mapping):
            tool = _ordered(copy.deepcopy(dict(tool)), _TOOL_KEYS)
            if isinstance(tool.get("function"), Mapping):
                tool["function"] = _ordered(tool["function"], _FUNCTION_DEFINITION_KEYS)
        ordered.append(tool)
    return ordered


def to_tool_schemas(tools: Any) -> list[dict[str, Any]] | None:
    """The request's `tools` as vLLM hands them to the template.

    Each tool becomes `{"type": "function", "function": {"name", "description",
    "parameters"[, "strict"][, "defer_loading"]}[, "defer_loading"]}`: unknown
    keys are dropped, a missing description or parameters becomes null.

    Args:
        tools: the request's `tools` field.

    Returns:
        Normalised tool schemas, or None when there are none.

    Raises:
        MessageFormatError: if a tool is not a function tool with a string name.
    """
    if tools is None:
        return None
    if isinstance(tools, (str, bytes)) or not isinstance(tools, Sequence):
        raise MessageFormatError("'tools' must be a list of tool objects")
    schemas = []
    for index, tool in enumerate(tools):
        if not isinstance(tool, Mapping) or tool.get("type", "function") != "function":
            raise MessageFormatError(f"tool {index} must be an object of type 'function'")
        function = tool.get("function")
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise MessageFormatError(f"tool {index} needs a 'function' with a string 'name'")
        defer = tool.get("defer_loading")
        definition: dict[str, Any] = {
            "name": function["name"],
            "description": function.get("description"),
            "parameters": copy.deepcopy(function.get("parameters")),
        }
        if function.get("strict") is not None:
            definition["strict"] = function["strict"]
        function_defer = function.get("defer_loading", defer)
        if function_defer is not None:
            definition["defer_loading"] = function_defer
        schema: dict[str, Any] = {"type": "function", "function": definition}
        if defer is not None:
            schema["defer_loading"] = defer
        schemas.append(schema)
    return schemas


def _developer_as_system(conversation: list[dict[str, Any]]) -> list[dict[str, Any]]:
    converted = []
    for message in conversation:
        if message["role"] == "developer":
            message = {k: v for k, v in message.items() if k != "tools"}
            message["role"] = "system"
        converted.append(message)

    # Some templates insist on one system message, first: merge them.
    system_texts: list[str] = []
    others: list[dict[str, Any]] = []
    merge = False
    for position, message in enumerate(converted):
        if message["role"] != "system":
            others.append(message)
            continue
        merge = merge or position > 0 or bool(system_texts)
        content = message.get("content", "")
        if isinstance(content, list):
            texts = [p if isinstance(p, str) else p["text"] for p in content if isinstance(p, str) or "text" in p]
            content = "\n".join(texts)
        if content:
            system_texts.append(content)
    if not merge:
        return converted
    return [{"role": "system", "content": "\n\n".join(system_texts)}, *others]


def to_conversation(
    messages: Sequence[Mapping[str, Any]],
    *,
    content_format: ContentFormat,
    supports_developer_role: bool,
) -> list[dict[str, Any]]:
    """Convert request messages into the template's conversation.

    Args:
        messages: the request's `messages` (OpenAI chat format). Not modified.
        content_format: "string" joins text parts with newlines; "openai"
            passes them as a list of `{"type": "text", "text": ...}` dicts.
        supports_developer_role: when False, `developer` messages become
            `system` messages, merged into one at the front.

    Returns:
        New message dicts, ready for `ChatTemplate.render`.

    Raises:
        MessageFormatError: if `messages` is empty or not a list of objects
            with a string `role`, or if a content part is malformed or not text.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise MessageFormatError("'messages' must be a list of message objects")
    if not messages:
        raise MessageFormatError("'messages' must not be empty")
    conversation = [_convert(message, index, content_format) for index, message in enumerate(messages)]
    if not supports_developer_role and any(m["role"] == "developer" for m in conversation):
        conversation = _developer_as_system(conversation)
    return conversation
