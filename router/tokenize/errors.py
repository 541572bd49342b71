"""Errors raised while turning a request into token ids.

The hierarchy says who is at fault, so the gateway can answer correctly::

    TokenizeError
    ├── BadPromptError          the request is at fault: answer HTTP 400
    │   ├── MessageFormatError  malformed messages, content parts or kwargs
    │   │   └── UnsupportedContentError  well-formed, but not text (images, audio, ...)
    │   ├── TemplateRenderError the chat template refused the conversation
    │   └── PromptTooLongError  the text is longer than any prompt that fits
    └── TokenizerLoadError      the model directory is unusable (start-up)

Permanent by nature: retrying the same request gives the same error.
"""

from __future__ import annotations


class TokenizeError(Exception):
    """Base of every error of `router.tokenize`."""


class BadPromptError(TokenizeError, ValueError):
    """The request cannot be tokenised as given; the client must change it (HTTP 400)."""


class MessageFormatError(BadPromptError):
    """`messages` (or a chat template argument) does not have the OpenAI shape."""


class UnsupportedContentError(MessageFormatError):
    """A content part the gateway cannot tokenise: an image, audio or video.

    Its tokens depend on the model's multimodal processor, which the gateway
    does not have. For a text-only model the engine refuses the request too;
    for a multimodal one, the gateway routes it without a prefix match.
    """


class TemplateRenderError(BadPromptError):
    """The chat template raised while rendering the conversation.

    Templates reject conversations they do not support (for example with
    `raise_exception("Conversation roles must alternate")`); vLLM answers 400
    with the template's own message, and so do we.
    """


class TokenizerLoadError(TokenizeError):
    """The model directory lacks a usable `tokenizer.json` or chat template."""


class PromptTooLongError(BadPromptError):
    """The prompt text has more characters than `max_chars`, so more tokens than fit.

    Raised before tokenising: no token is longer than the vocabulary's longest,
    so a text of more than `limit_tokens x longest token` characters cannot fit
    `limit_tokens` tokens (vLLM checks the same bound).

    Attributes:
        chars: characters of the prompt text (rendered, for chats).
        max_chars: the bound it exceeds.
    """

    def __init__(self, chars: int, max_chars: int) -> None:
        super().__init__(f"the prompt has {chars} characters, more than the {max_chars} that can fit")
        self.chars = chars
        self.max_chars = max_chars
