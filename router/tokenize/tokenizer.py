"""Prompt token ids exactly as vLLM computes them, without importing vLLM.

The gateway hashes a prompt's token blocks to find which pod already holds
them, so its token ids must be the engine's token ids, to the last one. vLLM
0.32 computes them like this:

- `/v1/chat/completions` (and `/tokenize` with `messages`): messages are
  normalised (`router.tokenize.messages`), the chat template is rendered to
  text (`router.tokenize.chat_template`), and the text is tokenised with
  `add_special_tokens=False` (the template writes its own BOS), unless the
  request sets `add_special_tokens`;
- `/v1/completions` (and `/tokenize` with `prompt`): the text is tokenised with
  `add_special_tokens=True`.

Tokenising uses the `tokenizers` library on the model's `tokenizer.json`, the
same Rust code `transformers` runs underneath. The template, named special
tokens and their overrides come from `chat_template.jinja`,
`additional_chat_templates/*.jinja`, `tokenizer_config.json` and
`special_tokens_map.json`, in the precedence `transformers` gives them.

Not here: the prefix index and block hashing (they take these ids), and HTTP
(the server maps `BadPromptError` to 400). Tokenising a long conversation takes
milliseconds; callers on the event loop may push big ones to a thread. Long
texts are tokenised through `encode_batch_fast`, which releases the GIL (plain
`encode` holds it for the whole text, which would stall the event loop even from
a worker thread).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import jinja2
from tokenizers import Tokenizer

from router.tokenize.chat_template import ChatTemplate, ContentFormat
from router.tokenize.errors import MessageFormatError, PromptTooLongError, TokenizerLoadError
from router.tokenize.messages import to_conversation, to_tool_schemas
from router.tokenize.segments import SegmentEncoder

#: Named special tokens the template sees as variables (transformers' list).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

#: `apply_chat_template` parameters: request kwargs with these names are
#: consumed by the call, never passed to the template.
_CALL_PARAMETERS = frozenset(
    {
        "conversation", "tools", "documents", "chat_template", "add_generation_prompt",
        "continue_final_message", "tokenize", "padding", "truncation", "max_length",
        "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs",
    }
)  # fmt: skip

_DEFAULT_TEMPLATE = "default"

#: Texts longer than this (characters) are tokenised with the GIL released.
LONG_TEXT_CHARS = 8192
_TOOL_TEMPLATE = "tool_use"


#: The side vLLM's tokenizer truncates from for generation models.
DEFAULT_TRUNCATION_SIDE: Literal["left"] = "left"


def truncate_ids(ids: Sequence[int], keep: int, side: Literal["left", "right"] | None) -> list[int]:
    """`ids` cut to `keep` tokens as vLLM cuts prompts: "left" (the default) keeps the last ones.

    Args:
        ids: the prompt's token ids (text prompts tokenised, or given as ids).
        keep: tokens to keep, non-negative.
        side: "left", "right", or None for vLLM's default ("left").

    Returns:
        The kept ids (all of them when there are at most `keep`).
    """
    if keep >= len(ids):
        return list(ids)
    if keep == 0:
        return []
    if (side or DEFAULT_TRUNCATION_SIDE) == "left":
        return list(ids[-keep:])
    return list(ids[:keep])


def _template_kwargs(
    requested: Mapping[str, Any],
    *,
    documents: Sequence[Mapping[str, Any]] | None,
    reasoning_effort: str | None,
) -> dict[str, Any]:
    """The request's template kwargs merged with its own fields, as vLLM merges them.

    Unset values (None, "auto") of the request's kwargs are dropped; the
    request's `documents` and `reasoning_effort` override the kwargs of the
    same name; a reasoning effort also sets `enable_thinking` unless the
    kwargs do.
    """
    kwargs = {k: v for k, v in requested.items() if not _is_unset(v)}
    if documents is not None:
        kwargs["documents"] = documents
    if not _is_unset(reasoning_effort):
        kwargs["reasoning_effort"] = reasoning_effort
    if reasoning_effort is not None and "enable_thinking" not in requested:
        kwargs["enable_thinking"] = reasoning_effort != "none"
    return kwargs


def _is_unset(value: Any) -> bool:
    """Whether vLLM treats a template kwarg as not set when merging (None or "auto")."""
    return value is None or (isinstance(value, str) and value == "auto")


def _token_text(value: Any) -> str | None:
    """A special token as written in a config: a string or a serialised AddedToken."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TokenizerLoadError(f"cannot read {path.name}: {exc}") from exc
    if not isinstance(data, dict):
        raise TokenizerLoadError(f"{path.name} is not a JSON object")
    return data


def _template_sources(model_dir: Path, config: Mapping[str, Any]) -> dict[str, str]:
    """Template name -> Jinja source. Separate `.jinja` files win over the config's entry."""
    sources: dict[str, str] = {}
    single = model_dir / "chat_template.jinja"
    if single.is_file():
        sources[_DEFAULT_TEMPLATE] = single.read_text(encoding="utf-8")
    extra_dir = model_dir / "additional_chat_templates"
    if extra_dir.is_dir():
        for path in sorted(extra_dir.glob("*.jinja")):
            sources[path.stem] = path.read_text(encoding="utf-8")
    if sources:
        return sources
    entry = config.get("chat_template")
    if isinstance(entry, str):
        return {_DEFAULT_TEMPLATE: entry}
    if isinstance(entry, list):
        return {
            item["name"]: item["template"]
            for item in entry
            if isinstance(item, Mapping) and "name" in item and "template" in item
        }
    return {}


class PromptTokenizer:
    """A model's tokenizer and chat template(s), rendering and tokenising like vLLM.

    Build it with `from_model_dir`. Immutable after construction and safe to
    share between threads.

    Args:
        tokenizer: the model's `tokenizers.Tokenizer`.
        templates: chat templates by name ("default", maybe "tool_use").
        special_tokens: named special tokens (`bos_token`, ...) for the template.
        content_format: how message content reaches the template; "auto"
            follows each template's own loops (as vLLM's default does).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        templates: Mapping[str, ChatTemplate],
        special_tokens: Mapping[str, str],
        *,
        content_format: Literal["auto", "string", "openai"] = "auto",
    ) -> None:
        self._tokenizer = tokenizer
        # Chat prompts repeat their system prompt and history: tokenise them
        # piece by cached piece where that is exact for this tokenizer.
        self._segments = SegmentEncoder(tokenizer) if SegmentEncoder.supports(tokenizer) else None
        # As vLLM computes it: no token decodes to more characters than its
        # vocabulary string has, so text length bounds the token count.
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        self._max_token_chars = max((len(token) for token in vocab), default=1) or 1
        self._templates = dict(templates)
        self._special_tokens = dict(special_tokens)
        self._content_format = content_format

    @classmethod
    def from_model_dir(
        cls,
        path: Path | str,
        *,
        content_format: Literal["auto", "string", "openai"] = "auto",
    ) -> PromptTokenizer:
        """Load `tokenizer.json`, the chat template(s) and special tokens of a model.

        Args:
            path: a Hugging Face style model (or tokenizer) directory.
            content_format: override of the template's content format, like
                vLLM's `--chat-template-content-format`.

        Returns:
            The tokenizer; the templates are compiled once, here.

        Raises:
            TokenizerLoadError: if `tokenizer.json` is missing or unreadable,
                or a chat template does not compile. A directory without any
                template loads, but `encode_chat` then raises.
        """
        model_dir = Path(path)
        tokenizer_file = model_dir / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise TokenizerLoadError(f"no tokenizer.json in {model_dir}")
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # the Rust side raises bare Exception
            raise TokenizerLoadError(f"cannot load {tokenizer_file}: {exc}") from exc
        # Split special tokens never: transformers' default.
        tokenizer.encode_special_tokens = False

        config = _read_json(model_dir / "tokenizer_config.json")
        special_map = _read_json(model_dir / "special_tokens_map.json")
        special_tokens = {}
        for name in SPECIAL_TOKEN_NAMES:
            text = _token_text(config.get(name)) or _token_text(special_map.get(name))
            if text is not None:
                special_tokens[name] = text

        templates = {}
        for name, source in _template_sources(model_dir, config).items():
            try:
                templates[name] = ChatTemplate(source)
            except jinja2.TemplateSyntaxError as exc:
                raise TokenizerLoadError(f"chat template {name!r} of {model_dir} does not compile: {exc}") from exc
        return cls(tokenizer, templates, special_tokens, content_format=content_format)

    @property
    def vocab_size(self) -> int:
        """Number of tokens, added tokens included."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def max_token_chars(self) -> int:
        """Characters of the longest token: a text of n characters has at least n / this many tokens."""
        return self._max_token_chars

    @property
    def special_tokens(self) -> Mapping[str, str]:
        """Named special tokens (`bos_token`, `eos_token`, ...) as the template sees them."""
        return dict(self._special_tokens)

    def chat_template(self, *, tools: object = None) -> ChatTemplate:
        """The template vLLM would pick: "tool_use" when tools are given and it exists, else "default".

        Raises:
            MessageFormatError: if the model has no chat template (vLLM answers 400 too).
        """
        if tools is not None and _TOOL_TEMPLATE in self._templates:
            return self._templates[_TOOL_TEMPLATE]
        if _DEFAULT_TEMPLATE in self._templates:
            return self._templates[_DEFAULT_TEMPLATE]
        if len(self._templates) == 1:
            return next(iter(self._templates.values()))
        raise MessageFormatError("the model has no default chat template, so chat requests cannot be tokenised")

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        reasoning_effort: str | None = None,
    ) -> str:
        """Render `messages` to the prompt text vLLM would tokenise.

        Args and Raises: as `encode_chat`.

        Returns:
            The rendered prompt text.
        """
        if add_generation_prompt and continue_final_message:
            raise MessageFormatError("cannot set both `continue_final_message` and `add_generation_prompt` to true")
        if chat_template_kwargs is not None and not isinstance(chat_template_kwargs, Mapping):
            raise MessageFormatError("'chat_template_kwargs' must be an object")
        kwargs = _template_kwargs(chat_template_kwargs or {}, documents=documents, reasoning_effort=reasoning_effort)
        if kwargs.get("chat_template") is not None:
            raise MessageFormatError("chat_template_kwargs may not carry 'chat_template'")
        # As in vLLM: the request's tools are schema-checked; tools given in
        # chat_template_kwargs are passed as they are, and win.
        tools = to_tool_schemas(tools)
        if kwargs.get("tools") is not None:
            tools = kwargs["tools"]
        documents = kwargs.get("documents")
        if documents is not None and not (
            isinstance(documents, (list, tuple)) and all(isinstance(d, Mapping) for d in documents)
        ):
            raise MessageFormatError("'documents' must be a list of objects")
        template = self.chat_template(tools=tools)
        content_format: ContentFormat = (
            template.content_format if self._content_format == "auto" else self._content_format
        )
        conversation = to_conversation(
            messages,
            content_format=content_format,
            supports_developer_role=template.supports_developer_role,
        )
        # Request kwargs reach the template only if it reads them (vLLM drops
        # the rest); they may override the special tokens, as in transformers.
        context = dict(self._special_tokens)
        context.update(
            (k, v) for k, v in kwargs.items() if k in template.variables and k not in _CALL_PARAMETERS | {"messages"}
        )
        return template.render(
            conversation,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            context=context,
            tools=tools,
            documents=documents,
        )

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        reasoning_effort: str | None = None,
        add_special_tokens: bool = False,
        truncate_prompt_tokens: int | None = None,
        truncation_side: Literal["left", "right"] | None = None,
        max_chars: int | None = None,
    ) -> list[int]:
        """Token ids of a chat request, as vLLM's `/v1/chat/completions` computes them.

        Args:
            messages: the request's `messages` (OpenAI format; text parts only).
            add_generation_prompt: open an assistant turn at the end (the
                request field of the same name; default True as in vLLM).
            continue_final_message: continue the last message instead.
            chat_template_kwargs: the request's `chat_template_kwargs`; only
                those the template reads take effect.
            tools: the request's tool schemas, visible to the template.
            documents: the request's `documents` (RAG), visible to the template.
            reasoning_effort: the request's `reasoning_effort`; the template
                sees it, and `enable_thinking` (unless the kwargs set that).
            add_special_tokens: also let the tokenizer add its special tokens
                (BOS) on top of the template's (vLLM's request field; default False).
            truncate_prompt_tokens: keep only this many tokens (non-negative;
                the request's -1 needs the engine's context length, which
                the caller resolves).
            truncation_side: which end to keep tokens from: "left" keeps the
                last ones; None is the tokenizer's default as vLLM sets it
                for generation ("left", truncating before special tokens
                are added).
            max_chars: refuse a rendered text longer than this before
                tokenising it (see `max_token_chars`).

        Returns:
            The prompt's token ids.

        Raises:
            MessageFormatError: malformed messages or kwargs, both
                `add_generation_prompt` and `continue_final_message`, non-text
                content, or no chat template.
            TemplateRenderError: the template rejected the conversation.
            PromptTooLongError: the rendered text is longer than `max_chars`.
        """
        text = self.render_chat(
            messages,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            chat_template_kwargs=chat_template_kwargs,
            tools=tools,
            documents=documents,
            reasoning_effort=reasoning_effort,
        )
        _check_length(text, max_chars)
        return self._encode_text(
            text, add_special_tokens, truncate_prompt_tokens, truncation_side, use_segments=True
        )

    def encode_prompt(
        self,
        text: str,
        *,
        add_special_tokens: bool = True,
        truncate_prompt_tokens: int | None = None,
        truncation_side: Literal["left", "right"] | None = None,
        max_chars: int | None = None,
    ) -> list[int]:
        """Token ids of a completion prompt, as vLLM's `/v1/completions` computes them.

        Args:
            text: the prompt.
            add_special_tokens: add the tokenizer's special tokens (BOS); the
                request field of the same name, True by default as in vLLM.
            truncate_prompt_tokens: as in `encode_chat`.
            truncation_side: as in `encode_chat`.
            max_chars: refuse a text longer than this before tokenising it.

        Returns:
            The prompt's token ids.

        Raises:
            MessageFormatError: if `text` is not a string.
            PromptTooLongError: the text is longer than `max_chars`.
        """
        if not isinstance(text, str):
            raise MessageFormatError("'prompt' must be a string")
        _check_length(text, max_chars)
        return self._encode_text(text, add_special_tokens, truncate_prompt_tokens, truncation_side)

    def _encode_text(
        self,
        text: str,
        add_special_tokens: bool,
        keep: int | None,
        side: Literal["left", "right"] | None,
        *,
        use_segments: bool = False,
    ) -> list[int]:
        if keep is None or side is not None or not add_special_tokens:
            # An explicit side (or no special tokens to add): vLLM encodes the
            # whole text, then slices.
            if use_segments and self._segments is not None and not add_special_tokens:
                ids = self._segments.encode(text)
            else:
                ids = self._encode_whole(text, add_special_tokens)
            return ids if keep is None else truncate_ids(ids, keep, side)
        # The tokenizer truncates: the text's own tokens are cut so that they
        # and the special tokens added around them fit, as transformers does.
        encoding = self._tokenizer.encode(text, add_special_tokens=False)
        processor = self._tokenizer.post_processor
        added = processor.num_special_tokens_to_add(False) if processor is not None else 0
        if len(encoding.ids) + added > keep:
            encoding.truncate(max(keep - added, 0), direction=DEFAULT_TRUNCATION_SIDE)
        return truncate_ids(self._tokenizer.post_process(encoding, add_special_tokens=True).ids, keep, None)

    def _encode_whole(self, text: str, add_special_tokens: bool) -> list[int]:
        if len(text) > LONG_TEXT_CHARS:
            # Same ids as `encode`, but the Rust side releases the GIL.
            return self._tokenizer.encode_batch_fast([text], add_special_tokens=add_special_tokens)[0].ids
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_prompts(self, texts: Sequence[str], *, add_special_tokens: bool = True) -> list[list[int]]:
        """`encode_prompt` for many prompts at once, tokenised in parallel (Rust threads)."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise MessageFormatError("'prompt' must be a list of strings")
        return [e.ids for e in self._tokenizer.encode_batch_fast(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """Text of `ids` (for logs and tests; the request path never decodes)."""
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)


def _check_length(text: str, max_chars: int | None) -> None:
    if max_chars is not None and len(text) > max_chars:
        raise PromptTooLongError(len(text), max_chars)
