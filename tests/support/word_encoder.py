"""A stand-in tokenizer for workload tests: one token per word, four per chat message for the template."""

from __future__ import annotations

from typing import Any


class WordEncoder:
    """Counts words as tokens, so a test can size prompts without a model's tokenizer."""

    def encode_prompt(self, text: str) -> list[int]:
        return [len(word) for word in text.split()]

    def encode_chat(self, messages: list[dict[str, Any]], **_: Any) -> list[int]:
        tokens = [0]
        for message in messages:
            tokens += [1, 2, 3, 4] + self.encode_prompt(message["content"])
        return tokens
