"""Piecewise tokenising with a cache gives exactly the whole-text ids."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer

from kvgate.model import build_model
from router.tokenize.segments import SegmentEncoder


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    model = build_model(tmp_path_factory.mktemp("seg") / "tiny-llama")
    return Tokenizer.from_file(str(model / "tokenizer.json"))


def test_the_tiny_models_tokenizer_is_supported(tokenizer):
    assert SegmentEncoder.supports(tokenizer)


def test_random_texts_with_special_tokens_encode_as_a_whole(tokenizer):
    encoder = SegmentEncoder(tokenizer, max_entries=64)  # small: exercise eviction too
    rng = random.Random(3)
    specials = ["<s>", "</s>", "<|im_start|>", "<|im_end|>", "<pad>", "<|im_", "im_end|>"]
    alphabet = list("ab cdé\n\t  xyz.,!?<|>_") + ["日本", "😀", "12", " 3", "'s", "  "]
    for _ in range(2000):
        parts = []
        for _ in range(rng.randint(1, 8)):
            parts.append("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))))
            if rng.random() < 0.6:
                parts.append(rng.choice(specials))
        text = "".join(parts)
        assert encoder.encode(text) == tokenizer.encode(text, add_special_tokens=False).ids, repr(text)
        assert encoder.encode(text) == tokenizer.encode(text, add_special_tokens=False).ids, repr(text)  # cached


def test_tokenizers_that_prepend_to_the_whole_text_are_not_supported():
    from tokenizers import models, normalizers

    spm_like = Tokenizer(models.BPE())
    spm_like.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    assert not SegmentEncoder.supports(spm_like)


def test_the_cache_is_bounded_by_the_characters_it_holds(tokenizer):
    encoder = SegmentEncoder(tokenizer, max_entries=1000, max_chars=10_000)
    rng = random.Random(5)
    for _ in range(50):  # 50 distinct 1,000-character pieces: 50,000 characters offered
        text = "".join(rng.choice("abc de") for _ in range(1000))
        assert encoder.encode(text) == tokenizer.encode(text, add_special_tokens=False).ids

    assert len(encoder._cache) <= 10
    assert encoder._cached_chars == sum(len(p) for p in encoder._cache) <= 10_000


def test_a_long_text_with_many_pieces_encodes_as_a_whole(tokenizer):
    encoder = SegmentEncoder(tokenizer)
    text = "".join(f"<|im_start|>user\n{i % 7} said hello<|im_end|>\n" for i in range(5000)) + "x" * 70_000
    assert encoder.encode(text) == tokenizer.encode(text, add_special_tokens=False).ids
    assert encoder.encode(text) == tokenizer.encode(text, add_special_tokens=False).ids
