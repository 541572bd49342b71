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

The pieces it has not seen are tokenised in one `encode_batch_fast` call,
which releases the GIL (a long prompt tokenised in a worker thread then leaves
the event loop free) and gives each piece the ids `encode` would. The cache is
bounded by entries and by the characters it keeps, so a stream of long,
never-repeated prompts cannot grow it past a few tens of megabytes.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict

from tokenizers import Tokenizer

#: Pieces kept, the characters they may hold in all, and the longest piece
#: worth keeping (characters).
_MAX_ENTRIES = 8192
_MAX_CACHED_CHARS = 4 * 1024 * 1024
_MAX_PIECE_CHARS = 65536


class SegmentEncoder:
    """Encodes text without the tokenizer's own special tokens, piece by cached piece.

    Args:
        tokenizer: the model's tokenizer; check `supports(tokenizer)` first.
        max_entries: pieces kept in the LRU cache.
        max_chars: characters the cached pieces may hold in all.
    """

    def __init__(
        self, tokenizer: Tokenizer, *, max_entries: int = _MAX_ENTRIES, max_chars: int = _MAX_CACHED_CHARS
    ) -> None:
        self._tokenizer = tokenizer
        added = json.loads(tokenizer.to_str()).get("added_tokens") or []
        self._ids = {t["content"]: t["id"] for t in added}
        alternatives = sorted(self._ids, key=len, reverse=True)  # longest match first, as tokenizers does
        self._split = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")") if alternatives else None
        self._cache: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self._max_entries = max_entries
        self._max_chars = max_chars
        self._cached_chars = 0
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
        parts = self._split.split(text) if self._split is not None else [text]
        found: list[tuple[int, ...] | None] = []
        missing: dict[str, None] = {}
        with self._lock:
            for i, part in enumerate(parts):
                cached = None if i % 2 or not part else self._cache.get(part)
                if cached is not None:
                    self._cache.move_to_end(part)
                elif not i % 2 and part:
                    missing[part] = None
                found.append(cached)
        fresh = dict(zip(missing, self._tokenize(list(missing))))
        ids: list[int] = []
        for i, part in enumerate(parts):
            if i % 2:
                ids.append(self._ids[part])
            elif part:
                piece = found[i]
                ids.extend(piece if piece is not None else fresh[part])
        self._keep(fresh)
        return ids

    def _tokenize(self, pieces: list[str]) -> list[tuple[int, ...]]:
        if not pieces:
            return []
        encodings = self._tokenizer.encode_batch_fast(pieces, add_special_tokens=False)
        return [tuple(e.ids) for e in encodings]

    def _keep(self, fresh: dict[str, tuple[int, ...]]) -> None:
        with self._lock:
            for piece, ids in fresh.items():
                if len(piece) > _MAX_PIECE_CHARS or piece in self._cache:
                    continue
                self._cache[piece] = ids
                self._cached_chars += len(piece)
            cache = self._cache
            while cache and (len(cache) > self._max_entries or self._cached_chars > self._max_chars):
                piece, _ = cache.popitem(last=False)
                self._cached_chars -= len(piece)
