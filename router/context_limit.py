"""The pods' context length, enforced before a prompt costs the gateway real work.

vLLM answers 400 when a prompt does not fit `max_model_len`, but only after
the gateway has tokenised, hashed and routed it, work that grows with the
prompt. `ContextLimit` refuses such prompts at the gateway, the way vLLM 0.32
does and with the same bounds, and as early as each bound allows:

- before tokenising, from the body alone: `max_tokens` above `max_model_len`
  (vLLM refuses it; a prompt plus `max_tokens` beyond the length is not
  refused, vLLM lowers `max_tokens` to what is left), a list of token ids
  longer than the length, a text (or rendered chat) of more characters than
  `max_model_len x longest token` (vLLM's own character bound), and a chat of
  more messages than the length has tokens;
- after tokenising: a prompt of at least `max_model_len` tokens (vLLM refuses
  more tokens than the length, and a prompt of exactly the length leaves
  `max_tokens` at 0, which it refuses too).

Errors are OpenAI's: 400 `invalid_request_error`, code
`context_length_exceeded`, param `messages` or `prompt`, a message naming the
limit. Called by `router.prompts` for the gateway; the limit itself comes from
the pods' `/v1/models` (`router.monitor`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from router.errors import InvalidRequest
from router.schema import Call

_CODE = "context_length_exceeded"


@dataclass(frozen=True, slots=True)
class ContextLimit:
    """How long a prompt the pods accept.

    Attributes:
        max_model_len: tokens of prompt and output a pod holds (`/v1/models`).
        max_token_chars: characters of the tokenizer's longest token, or None
            without a tokenizer (then no character bound applies).
    """

    max_model_len: int
    max_token_chars: int | None = None

    @property
    def max_chars(self) -> int | None:
        """Characters beyond which a text cannot fit, whatever its tokens."""
        return None if self.max_token_chars is None else self.max_model_len * self.max_token_chars

    def check_call(self, call: Call) -> None:
        """Refuse what the body alone shows cannot fit (cheap: no tokenising).

        Raises:
            InvalidRequest: `max_tokens` above the length, a token id list or
                a text too long, or more messages than the length has tokens.
        """
        body = call.body
        # As vLLM: a chat's max_completion_tokens, when given, is its output budget.
        chat_budget = call.kind == "chat" and body.get("max_completion_tokens") is not None
        name = "max_completion_tokens" if chat_budget else "max_tokens"
        value = body.get(name)
        if isinstance(value, int) and value > self.max_model_len:
            raise InvalidRequest(
                f"{name}={value} cannot be greater than max_model_len={self.max_model_len}. "
                "Please request fewer output tokens.",
                param=name,
            )
        if call.kind == "chat":
            count = len(body["messages"])
            # NOTE: assumes every message adds at least one token, as every
            # chat template writes a marker or a role per message; a chat of
            # more messages than the length then cannot fit, and is refused
            # before its template is rendered.
            if count > self.max_model_len:
                raise InvalidRequest(
                    f"This model's maximum context length is {self.max_model_len} tokens. However, the request "
                    f"has {count} messages, which cannot fit. Please reduce the length of the messages.",
                    param="messages",
                    code=_CODE,
                )
            return
        prompt = body["prompt"]
        prompts: list[Any] = [prompt] if isinstance(prompt, str) or isinstance(prompt[0], int) else prompt
        for one in prompts:
            if isinstance(one, str):
                self.check_chars(len(one), "prompt")
            else:
                self.check_tokens(len(one), "prompt")

    def check_chars(self, chars: int, param: str) -> None:
        """Refuse a text of `chars` characters that cannot fit (vLLM's character bound).

        Raises:
            InvalidRequest: more characters than `max_chars`.
        """
        limit = self.max_chars
        if limit is not None and chars > limit:
            raise self.too_many_chars(chars, param)

    def too_many_chars(self, chars: int, param: str) -> InvalidRequest:
        """The error for a text of `chars` characters, more than `max_chars`."""
        return InvalidRequest(
            f"This model's maximum context length is {self.max_model_len} tokens. However, your prompt "
            f"contains {chars} characters (more than {self.max_chars} characters, which is the upper bound "
            f"for {self.max_model_len} input tokens). Please reduce the length of the input prompt.",
            param=param,
            code=_CODE,
        )

    def check_tokens(self, tokens: int, param: str) -> None:
        """Refuse a prompt of `tokens` tokens that leaves no room for one output token.

        Raises:
            InvalidRequest: `tokens` >= `max_model_len`.
        """
        if tokens < self.max_model_len:
            return
        why = (
            "which leaves no room for any output token"
            if tokens == self.max_model_len
            else "which exceeds this limit even without any output tokens"
        )
        raise InvalidRequest(
            f"This model's maximum context length is {self.max_model_len} tokens. However, your prompt "
            f"contains {tokens} input tokens, {why}. Please reduce the length of the input prompt.",
            param=param,
            code=_CODE,
        )
