"""Seeded filler text of a given token length, for the synthetic workloads.

The text comes from the same generator the tiny model's tokenizer was trained
on (`kvgate.model.corpus_lines`), so it tokenises at the tokenizer's usual rate
(about 2.7 characters per token) and never depends on Python's `random`
module. Called by `kvgate.bench.workloads`; not a tokenizer itself.
"""

from __future__ import annotations

import hashlib
from typing import Protocol

from kvgate.model import corpus_lines

#: Paragraphs one seed may yield; far more than any prompt needs.
_ENDLESS = 1 << 30


class TokenCounter(Protocol):
    """What text generation needs of a tokenizer (`router.tokenize.PromptTokenizer` fits)."""

    def encode_prompt(self, text: str) -> list[int]: ...


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed derived from `seed` and `parts`, the same in every process and Python release.

    Args:
        seed: the workload's seed.
        parts: what makes this stream distinct (a group number, a user name, ...).

    Returns:
        A non-negative integer.
    """
    text = repr((seed, *parts)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big") >> 1


def filler(counter: TokenCounter, seed: int, tokens: int, *, lead: str = "") -> str:
    """Text of at least `tokens` tokens: `lead`, then seeded paragraphs.

    Args:
        counter: tokenizer used to measure the text.
        seed: seed of the paragraph stream (see `derive_seed`).
        tokens: least number of tokens (whole paragraphs are added, so a
            little more is usual).
        lead: text put first, e.g. what makes a system prompt unique.

    Returns:
        The text; the same arguments always give the same text.
    """
    parts = [lead] if lead else []
    text = lead
    for paragraph in corpus_lines(seed=seed, paragraphs=_ENDLESS):
        if text and len(counter.encode_prompt(text)) >= tokens:
            break
        parts.append(paragraph)
        text = "\n\n".join(parts)
    return text
