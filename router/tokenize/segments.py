"""Tokenising chat prompts piece by piece, with a cache of the pieces.

`tokenizers` cuts a text at its added (special) tokens before anything else
and tokenises each piece between them on its own. A chat template puts special
tokens around every message, so a prompt's pieces are its messages, and the
same system prompt or conversation history recurs request after request.
`SegmentEncoder` cuts the text the same way, looks each piece up in a bounded
LRU cache and tokenises only the pieces it has not seen, which gives the same
ids as tokenising the whole text at once.

That equivalence needs the tokenizer to treat pieces independently: no
normaliser (some prepend a marker to the whole text only), a byte-level
pre-tokenizer without a prefix space, and added tokens that strip nothing.
`SegmentEncoder.supports` checks this; other tokenizers are tokenised whole.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict

from tokenizers import Tokenizer

#: Pieces kept, and the longest piece worth keeping (characters).
_MAX_ENTRIES = 8192
_MAX_PIECE_CHARS = 65536


class SegmentEncoder:
    """Encodes text without the tokenizer's own special tokens, piece by cached piece.

    Args:
        tokenizer: the model's tokenizer; check `supports(tokenizer)` first.
        max_entries: pieces kept in the LRU cache.
    """

    def __init__(self, tokenizer: Tokenizer, *, max_entries: int = _MAX_ENTRIES) -> None:
        self._tokenizer = tokenizer
        added = json.loads(tokenizer.to_str()).get("added_tokens") or []
        self._ids = {t["content"]: t["id"] for t in added}
        alternatives = sorted(self._ids, key=len, reverse=True)  # longest match first, as tokenizers does
        self._split = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")") if alternatives else None
        self._cache: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self._max_entries = max_entries
        self._lock = threading.Lock()  # long prompts are tokenised in worker threads

    @staticmethod
    def supports(tokenizer: Tokenizer) -> bool:
        """Whether piecewise tokenising gives exactly the whole-text ids for `tokenizer`."""
        spec = json.loads(tokenizer.to_str())
        pre = spec.get("pre_tokenizer") or {}
        added = spec.get("added_tokens") or []
        return (
            spec.get("normalizer") is None
            and pre.get("type") == "ByteLevel"
            and not pre.get("add_prefix_space", False)
            and all(not (t.get("lstrip") or t.get("rstrip") or t.get("single_word") or t.get("normalized")) for t in added)
        )

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` with no special tokens added by the tokenizer."""
        if self._split is None:
            return self._piece(text)
        ids: list[int] = []
        for i, part in enumerate(self._split.split(text)):
            if i % 2:
                ids.append(self._ids[part])
            elif part:
                ids.extend(self._piece(part))
        return ids

    def _piece(self, piece: str) -> list[int] | tuple[int, ...]:
        with self._lock:
            cached = self._cache.get(piece)
            if cached is not None:
                self._cache.move_to_end(piece)
                return cached
        ids = tuple(self._tokenizer.encode(piece, add_special_tokens=False).ids)
        if len(piece) <= _MAX_PIECE_CHARS:
            with self._lock:
                self._cache[piece] = ids
                if len(self._cache) > self._max_entries:
                    self._cache.popitem(last=False)
        return ids
