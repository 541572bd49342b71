"""Long prompts: the same ids through the GIL-releasing path, and the character bound vLLM applies."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from kvgate.model import build_model
from router.tokenize import PromptTokenizer, PromptTooLongError
from router.tokenize.tokenizer import LONG_TEXT_CHARS


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> PromptTokenizer:
    model_dir: Path = build_model(tmp_path_factory.mktemp("long") / "tiny-llama")
    return PromptTokenizer.from_model_dir(model_dir)


def long_text(chars: int, seed: int = 2) -> str:
    rng = random.Random(seed)
    pieces = ["kv ", "cache ", "<s>", "naïve ", "日本 ", "\n", "  ", "😀", "<|im_end|>", "x"]
    text = ""
    while len(text) < chars:
        text += rng.choice(pieces)
    return text


def test_long_texts_get_the_ids_plain_encode_gives(tok):
    text = long_text(LONG_TEXT_CHARS * 4)
    inner = tok._tokenizer
    assert tok.encode_prompt(text) == inner.encode(text, add_special_tokens=True).ids
    assert tok.encode_prompt(text, add_special_tokens=False) == inner.encode(text, add_special_tokens=False).ids
    assert tok.encode_prompts([text, "short"]) == [inner.encode(t).ids for t in (text, "short")]
    messages = [{"role": "user", "content": text}, {"role": "assistant", "content": text[::-1]}]
    rendered = tok.render_chat(messages)
    assert tok.encode_chat(messages) == inner.encode(rendered, add_special_tokens=False).ids
    assert tok.encode_chat(messages, add_special_tokens=True) == inner.encode(rendered, add_special_tokens=True).ids


def test_the_longest_token_bounds_the_characters_of_a_text_that_fits(tok):
    vocab = tok._tokenizer.get_vocab(with_added_tokens=True)
    assert tok.max_token_chars == max(len(t) for t in vocab)  # as vLLM's max_chars_per_token
    text = long_text(5000)
    assert len(text) <= len(tok.encode_prompt(text)) * tok.max_token_chars

    with pytest.raises(PromptTooLongError) as caught:
        tok.encode_prompt(text, max_chars=len(text) - 1)
    assert (caught.value.chars, caught.value.max_chars) == (len(text), len(text) - 1)
    assert tok.encode_prompt(text, max_chars=len(text)) == tok.encode_prompt(text)

    messages = [{"role": "user", "content": text}]
    rendered = len(tok.render_chat(messages))
    with pytest.raises(PromptTooLongError):
        tok.encode_chat(messages, max_chars=rendered - 1)  # the rendered text counts, template included
    assert tok.encode_chat(messages, max_chars=rendered) == tok.encode_chat(messages)
