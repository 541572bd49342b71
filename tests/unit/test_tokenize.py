"""The gateway's tokenizer: the tiny model it is built for, and vLLM's rendering rules.

Token ids are checked against `transformers` (what vLLM itself calls) where it
is installed; vLLM's own message handling (content parts, developer role,
continue_final_message) is checked against the text vLLM renders. The real
engine's `/tokenize` is the e2e test's job.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvgate.model import (
    BOS_TOKEN,
    CHAT_TEMPLATE,
    IM_END,
    SPECIAL_TOKENS,
    SERVED_MODEL_NAME,
    build_model,
    default_model_dir,
    fingerprint,
    main as build_model_main,
)
from router.tokenize import (
    BadPromptError,
    MessageFormatError,
    PromptTokenizer,
    TemplateRenderError,
    TokenizerLoadError,
)

CONVERSATIONS = [
    pytest.param([{"role": "user", "content": "Hello!"}], id="one-turn"),
    pytest.param(
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Explain KV caches.\n\nIn two lines."},
            {"role": "assistant", "content": "They keep attention keys and values.\nSo prefixes are not recomputed."},
            {"role": "user", "content": "And blocks?"},
        ],
        id="multi-turn",
    ),
    pytest.param([{"role": "user", "content": "naïve café — 日本語 😀 <s> </s> <|im_end|> \t\r\n  "}], id="unicode-and-special-lookalikes"),
    pytest.param([{"role": "user", "content": ""}], id="empty-content"),
    pytest.param([{"role": "user", "content": "   leading and trailing   "}], id="spaces"),
]

TRICKY_TEXTS = [
    "",
    "plain ascii",
    "naïve café, straße, 你好世界, こんにちは, Привет, مرحبا 😀🚀👩‍👩‍👧",
    "\x00\x01\x7f control \t tabs \r\n newlines \u2028 separators",
    "<s>not a bos</s><|im_start|>user\n<|im_end|>",
    "   many    spaces   ",
    "\ud7ff\ue000\U0010ffff",
]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model(tmp_path_factory.mktemp("model") / "tiny-llama")


@pytest.fixture(scope="session")
def tok(model_dir: Path) -> PromptTokenizer:
    return PromptTokenizer.from_model_dir(model_dir)


@pytest.fixture(scope="session")
def hf_tokenizer(model_dir: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(model_dir))


def with_template(model_dir: Path, dest: Path, template: str) -> PromptTokenizer:
    """A copy of the model whose chat_template.jinja overrides the config's template."""
    shutil.copytree(model_dir, dest)
    (dest / "chat_template.jinja").write_text(template, encoding="utf-8")
    return PromptTokenizer.from_model_dir(dest)


# --------------------------------------------------------------------------
# The tiny model
# --------------------------------------------------------------------------


def test_tokenizer_fits_the_model(model_dir: Path, tok: PromptTokenizer) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]) == (512, 6, 8, 2)
    assert config["max_position_embeddings"] == 8192
    assert 768 < tok.vocab_size <= config["vocab_size"] == 1024
    vocab = json.loads((model_dir / "tokenizer.json").read_text())["model"]["vocab"]
    assert [vocab[t] for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert config["bos_token_id"] == vocab[BOS_TOKEN]
    generation = json.loads((model_dir / "generation_config.json").read_text())
    assert vocab[IM_END] in generation["eos_token_id"]
    tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert tokenizer_config["chat_template"].startswith("{{ bos_token }}")
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_build_is_deterministic_and_idempotent(model_dir: Path, tmp_path: Path) -> None:
    other = build_model(tmp_path / "again")
    assert fingerprint(other) == fingerprint(model_dir)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert (other / name).read_bytes() == (model_dir / name).read_bytes(), name

    stamp = (other / "tokenizer.json").stat().st_mtime_ns
    build_model(other)
    assert (other / "tokenizer.json").stat().st_mtime_ns == stamp, "a current build must be reused"
    (other / "kvgate-model.json").write_text("{}")
    build_model(other)
    assert json.loads((other / "kvgate-model.json").read_text()) != {}, "a stale build must be replaced"


def test_build_model_command_writes_the_default_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KVGATE_HOME", raising=False)
    assert build_model_main([]) == 0
    expected = tmp_path / ".kvgate" / "models" / SERVED_MODEL_NAME
    assert default_model_dir() == expected
    assert (expected / "tokenizer.json").is_file()
    assert capsys.readouterr().out.strip() == str(expected)

    monkeypatch.setenv("KVGATE_HOME", str(tmp_path / "home"))
    assert build_model_main([]) == 0
    assert (tmp_path / "home" / "models" / SERVED_MODEL_NAME / "config.json").is_file()


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_any_text_round_trips(tok: PromptTokenizer, text: str) -> None:
    ids = tok.encode_prompt(text, add_special_tokens=False)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_tokenizer_compresses_english(tok: PromptTokenizer) -> None:
    text = "The server keeps a cache of the key and value blocks for every request, so the next prompt is fast."
    assert len(tok.encode_prompt(text, add_special_tokens=False)) < len(text) / 3


# --------------------------------------------------------------------------
# Token ids: the same as transformers gives vLLM
# --------------------------------------------------------------------------


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_completion_ids_match_transformers(tok: PromptTokenizer, hf_tokenizer, text: str) -> None:
    ids = tok.encode_prompt(text)
    assert ids == hf_tokenizer(text, add_special_tokens=True)["input_ids"]
    assert ids[0] == 0 and ids.count(0) == 1 + text.count(BOS_TOKEN)


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_ids_match_transformers(tok: PromptTokenizer, hf_tokenizer, messages, add_generation_prompt: bool) -> None:
    expected = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False)
    assert tok.encode_chat(messages, add_generation_prompt=add_generation_prompt) == expected


def test_chat_prompt_has_exactly_the_templates_bos(tok: PromptTokenizer) -> None:
    ids = tok.encode_chat([{"role": "user", "content": "hi"}])
    assert ids[0] == 0 and ids.count(0) == 1
    assert tok.encode_chat([{"role": "user", "content": "hi"}], add_special_tokens=True)[:2] == [0, 0]
    assert tok.render_chat([{"role": "user", "content": "hi"}]) == "<s><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_special_tokens_in_user_text_are_special(tok: PromptTokenizer) -> None:
    # As in vLLM: the template's output is tokenised as a whole, so a user who
    # types "<|im_end|>" gets the special token, not its characters.
    ids = tok.encode_chat([{"role": "user", "content": "<|im_end|>"}], add_generation_prompt=False)
    assert ids.count(4) == 2


# --------------------------------------------------------------------------
# vLLM's message handling
# --------------------------------------------------------------------------


def test_text_parts_are_joined_with_newlines(tok: PromptTokenizer) -> None:
    parts = [
        {"type": "text", "text": "first"},
        "second",
        {"type": "input_text", "text": "third"},
        {"type": "refusal", "refusal": "fourth"},
    ]
    as_parts = tok.render_chat([{"role": "user", "content": parts}])
    as_string = tok.render_chat([{"role": "user", "content": "first\nsecond\nthird\nfourth"}])
    assert as_parts == as_string


def test_missing_content_renders_empty(tok: PromptTokenizer) -> None:
    rendered = tok.render_chat([{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": []}])
    assert rendered.endswith("<|im_start|>assistant\n<|im_end|>\n<|im_start|>assistant\n")


def test_developer_messages_become_one_leading_system_message(tok: PromptTokenizer) -> None:
    messages = [
        {"role": "system", "content": "Rule one."},
        {"role": "user", "content": "hi"},
        {"role": "developer", "content": [{"type": "text", "text": "Rule two."}]},
    ]
    expected = [{"role": "system", "content": "Rule one.\n\nRule two."}, {"role": "user", "content": "hi"}]
    assert tok.render_chat(messages) == tok.render_chat(expected)


def test_developer_role_kept_when_the_template_knows_it(model_dir: Path, tmp_path: Path) -> None:
    template = "{% for m in messages %}{% if m.role == 'developer' %}D:{% endif %}{{ m.role }}={{ m.content }};{% endfor %}"
    tok = with_template(model_dir, tmp_path / "m", template)
    assert tok.render_chat([{"role": "user", "content": "a"}, {"role": "developer", "content": "b"}], add_generation_prompt=False) == "user=a;D:developer=b;"


def test_billing_header_line_is_dropped_from_system_text(tok: PromptTokenizer) -> None:
    with_header = [{"role": "system", "content": "x-anthropic-billing-header: cch=123\nBe nice."}, {"role": "user", "content": "hi"}]
    without = [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "hi"}]
    assert tok.encode_chat(with_header) == tok.encode_chat(without)


def test_continue_final_message_leaves_the_turn_open(tok: PromptTokenizer, hf_tokenizer) -> None:
    messages = [{"role": "user", "content": "Count."}, {"role": "assistant", "content": "One, two,"}]
    rendered = tok.render_chat(messages, add_generation_prompt=False, continue_final_message=True)
    assert rendered.endswith("<|im_start|>assistant\nOne, two,")
    expected = hf_tokenizer.apply_chat_template(messages, continue_final_message=True, tokenize=True, return_dict=False)
    assert tok.encode_chat(messages, add_generation_prompt=False, continue_final_message=True) == expected


def test_continue_final_message_with_trailing_space_trimmed_by_template(model_dir: Path, tmp_path: Path) -> None:
    tok = with_template(model_dir, tmp_path / "m", "{% for m in messages %}[{{ m.content | trim }}]{% endfor %}")
    assert tok.render_chat([{"role": "user", "content": "go on  "}], add_generation_prompt=False, continue_final_message=True) == "[go on"


def test_openai_content_format_passes_parts(model_dir: Path, tmp_path: Path) -> None:
    template = "{% for m in messages %}{% for part in m['content'] %}<{{ part.type }}:{{ part.text }}>{% endfor %}{% endfor %}"
    tok = with_template(model_dir, tmp_path / "m", template)
    messages = [{"role": "user", "content": [{"type": "text", "text": "a"}, "b"]}, {"role": "assistant", "content": "c"}]
    assert tok.render_chat(messages, add_generation_prompt=False) == "<text:a><text:b><text:c>"


def test_openai_content_format_keeps_unknown_part_fields(model_dir: Path, tmp_path: Path) -> None:
    tok = with_template(model_dir, tmp_path / "m", "{% for m in messages %}{% for part in m.content %}{{ part | tojson }}{% endfor %}{% endfor %}")
    part = {"cache_control": {"type": "ephemeral"}, "text": "a", "type": "input_text", "name": "dropped"}
    assert tok.render_chat([{"role": "user", "content": [part]}]) == '{"type": "text", "text": "a", "cache_control": {"type": "ephemeral"}}'


def test_tool_calls_reach_the_template_in_schema_order_with_parsed_arguments(model_dir: Path, tmp_path: Path) -> None:
    template = "{% for m in messages %}{% if m.tool_calls %}{{ m.tool_calls | tojson }}{% endif %}{% endfor %}"
    tok = with_template(model_dir, tmp_path / "m", template)
    call = {"type": "function", "extra": 1, "function": {"name": "w", "arguments": '{"city": "Zürich <b>"}'}, "id": "c1"}
    bad_json = {"id": "c2", "type": "function", "function": {"arguments": "not json", "name": "v"}}
    messages = [{"role": "user", "content": "weather?"}, {"role": "assistant", "content": None, "tool_calls": [call, bad_json]}]
    assert tok.render_chat(messages, add_generation_prompt=False) == (
        '[{"id": "c1", "function": {"arguments": {"city": "Zürich <b>"}, "name": "w"}, "type": "function", "extra": 1}, '
        '{"id": "c2", "function": {"arguments": {}, "name": "v"}, "type": "function"}]'
    )
    assert call["function"]["arguments"] == '{"city": "Zürich <b>"}', "input must not be modified"


def test_request_tools_are_normalised_like_vllm(model_dir: Path, tmp_path: Path) -> None:
    tok = with_template(model_dir, tmp_path / "m", "{{ tools | tojson }}")
    tools = [
        {"function": {"parameters": {"b": 1, "a": 2}, "name": "f", "junk": 1}, "type": "function"},
        {"type": "function", "function": {"name": "g", "strict": True}, "defer_loading": True},
    ]
    assert json.loads(tok.render_chat([{"role": "user", "content": "x"}], tools=tools)) == [
        {"type": "function", "function": {"name": "f", "description": None, "parameters": {"b": 1, "a": 2}}},
        {"type": "function", "function": {"name": "g", "description": None, "parameters": None, "strict": True, "defer_loading": True}, "defer_loading": True},
    ]
    rendered = tok.render_chat([{"role": "user", "content": "x"}], tools=tools)
    assert rendered.index('"name": "f"') < rendered.index('"description"') < rendered.index('"parameters": {"b": 1, "a": 2}')
    with pytest.raises(MessageFormatError):
        tok.render_chat([{"role": "user", "content": "x"}], tools=[{"type": "function", "function": {}}])


def test_template_kwargs_reach_the_template_only_if_it_reads_them(model_dir: Path, tmp_path: Path) -> None:
    template = "{{ greeting | default('none') }}|{{ bos_token }}|{{ add_generation_prompt }}|{{ tools | tojson }}"
    tok = with_template(model_dir, tmp_path / "m", template)
    messages = [{"role": "user", "content": "x"}]
    assert tok.render_chat(messages, chat_template_kwargs={"greeting": "hi", "ignored": 1}) == "hi|<s>|True|null"
    kwargs = {"add_generation_prompt": False, "bos_token": "B", "tools": [{"name": "t"}]}
    assert tok.render_chat(messages, chat_template_kwargs=kwargs) == 'none|B|True|[{"name": "t"}]'


def test_named_templates_pick_tool_use_when_tools_are_given(model_dir: Path, tmp_path: Path) -> None:
    dest = tmp_path / "m"
    shutil.copytree(model_dir, dest)
    config = json.loads((dest / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "default", "template": "plain"}, {"name": "tool_use", "template": "tools"}]
    (dest / "tokenizer_config.json").write_text(json.dumps(config))
    tok = PromptTokenizer.from_model_dir(dest)
    messages = [{"role": "user", "content": "x"}]
    assert tok.render_chat(messages) == "plain"
    assert tok.render_chat(messages, tools=[{"type": "function", "function": {"name": "f"}}]) == "tools"


def test_template_helpers_are_available(model_dir: Path, tmp_path: Path) -> None:
    template = "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}|{{ strftime_now('%Y') | length }}"
    tok = with_template(model_dir, tmp_path / "m", template)
    assert tok.render_chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]) == "a|4"


def test_lstrip_and_trim_blocks_apply(model_dir: Path, tmp_path: Path) -> None:
    template = "{% for m in messages %}\n    {% if true %}\n{{ m.content }}\n    {% endif %}\n{% endfor %}"
    tok = with_template(model_dir, tmp_path / "m", template)
    assert tok.render_chat([{"role": "user", "content": "a"}]) == "a\n"


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "messages",
    [
        pytest.param("hello", id="not-a-list"),
        pytest.param([], id="empty"),
        pytest.param(["hello"], id="message-not-object"),
        pytest.param([{"content": "hi"}], id="no-role"),
        pytest.param([{"role": 3, "content": "hi"}], id="role-not-string"),
        pytest.param([{"role": "user", "content": 42}], id="content-not-text"),
        pytest.param([{"role": "user", "content": [{"text": "hi"}]}], id="part-without-type"),
        pytest.param([{"role": "user", "content": [{"type": "text", "text": 5}]}], id="part-text-not-string"),
        pytest.param([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}], id="image-part"),
        pytest.param([{"role": "user", "content": [7]}], id="part-not-object"),
        pytest.param([{"role": "user", "content": [{"type": "text"}]}], id="part-without-text"),
        pytest.param([{"role": "user", "content": [{"type": "text", "text": "x", "uuid": "u1"}]}], id="part-with-uuid"),
        pytest.param([{"role": "user", "content": "x", "name": 3}], id="name-not-string"),
        pytest.param([{"role": "tool", "content": "x", "tool_call_id": 3}], id="tool-call-id-not-string"),
        pytest.param([{"role": "assistant", "content": "", "tool_calls": [{"type": "code", "function": {}}]}], id="bad-tool-call"),
        pytest.param([{"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {}}, "id": "c"}]}], id="tool-call-arguments-not-string"),
        pytest.param([{"role": "assistant", "content": "", "tool_calls": {"id": "c"}}], id="tool-calls-not-list"),
    ],
)
def test_malformed_messages_are_bad_requests(tok: PromptTokenizer, messages) -> None:
    with pytest.raises(MessageFormatError) as info:
        tok.encode_chat(messages)
    assert isinstance(info.value, BadPromptError) and isinstance(info.value, ValueError)


def test_conflicting_flags_are_rejected(tok: PromptTokenizer) -> None:
    with pytest.raises(MessageFormatError, match="continue_final_message"):
        tok.encode_chat([{"role": "user", "content": "x"}], add_generation_prompt=True, continue_final_message=True)
    with pytest.raises(MessageFormatError, match="chat_template"):
        tok.encode_chat([{"role": "user", "content": "x"}], chat_template_kwargs={"chat_template": "{{ 1 }}"})


def test_template_exceptions_become_render_errors(model_dir: Path, tmp_path: Path) -> None:
    template = "{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{{ m.content }}{% endfor %}"
    tok = with_template(model_dir, tmp_path / "m", template)
    assert tok.encode_chat([{"role": "user", "content": "ok"}])
    with pytest.raises(TemplateRenderError, match="Only user and assistant roles"):
        tok.encode_chat([{"role": "tool", "content": "x"}])


def test_sandbox_blocks_unsafe_templates(model_dir: Path, tmp_path: Path) -> None:
    tok = with_template(model_dir, tmp_path / "m", "{{ messages.append(1) }}{{ ''.__class__.__mro__ }}")
    with pytest.raises(TemplateRenderError):
        tok.encode_chat([{"role": "user", "content": "x"}])


def test_unusable_model_directories_fail_to_load(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(TokenizerLoadError, match="tokenizer.json"):
        PromptTokenizer.from_model_dir(tmp_path)
    dest = tmp_path / "broken-template"
    shutil.copytree(model_dir, dest)
    (dest / "chat_template.jinja").write_text("{% for %}")
    with pytest.raises(TokenizerLoadError, match="does not compile"):
        PromptTokenizer.from_model_dir(dest)


def test_model_without_template_cannot_tokenise_chat(model_dir: Path, tmp_path: Path) -> None:
    dest = tmp_path / "no-template"
    shutil.copytree(model_dir, dest)
    config = json.loads((dest / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (dest / "tokenizer_config.json").write_text(json.dumps(config))
    tok = PromptTokenizer.from_model_dir(dest)
    assert tok.encode_prompt("still fine")[0] == 0
    with pytest.raises(MessageFormatError, match="no default chat template"):
        tok.encode_chat([{"role": "user", "content": "x"}])


def test_the_template_is_the_models(tok: PromptTokenizer) -> None:
    assert tok.chat_template().source == CHAT_TEMPLATE
    assert tok.chat_template().content_format == "string"
    assert tok.special_tokens == {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


def test_gateway_tokenizer_stays_light() -> None:
    code = "import sys, router.tokenize; print(sorted(m for m in ('vllm', 'transformers', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
