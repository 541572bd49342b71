"""Prompt tokenising for routing: the engine's exact token ids, without the engine.

`PromptTokenizer.from_model_dir(path)` loads a model's `tokenizer.json` and chat
template; `encode_chat(messages)` and `encode_prompt(text)` return the token
ids vLLM 0.32 would compute for `/v1/chat/completions` and `/v1/completions`.
Malformed requests raise `BadPromptError` subclasses (HTTP 400).

Depends on `tokenizers` and `jinja2` only: never on vLLM, transformers or torch,
so the gateway stays light.
"""

from router.tokenize.chat_template import ChatTemplate, ContentFormat
from router.tokenize.errors import (
    BadPromptError,
    MessageFormatError,
    PromptTooLongError,
    TemplateRenderError,
    TokenizeError,
    TokenizerLoadError,
    UnsupportedContentError,
)
from router.tokenize.tokenizer import PromptTokenizer

__all__ = [
    "BadPromptError",
    "ChatTemplate",
    "ContentFormat",
    "MessageFormatError",
    "PromptTokenizer",
    "PromptTooLongError",
    "TemplateRenderError",
    "TokenizeError",
    "TokenizerLoadError",
    "UnsupportedContentError",
]
