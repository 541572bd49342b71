"""The tiny local model: a Llama config and a byte-level BPE tokenizer, built offline.

`kvgate up`, the end-to-end tests and the benchmarks run real vLLM CPU engines
with `--load-format dummy` (random weights), so all an engine needs is a model
directory: `config.json`, a tokenizer and its chat template. This module writes
one, deterministically and without downloading anything:

- the tokenizer is trained with the `tokenizers` library on a corpus generated
  here from a fixed seed (a home-made PRNG, so it does not depend on the
  interpreter's `random` module or on what the standard library's docstrings
  say in a given Python release);
- the JSON files are written directly; `transformers` is not imported, but the
  files are laid out the way `transformers.AutoTokenizer` and vLLM load them.

Called by the `kvgate build-model` sub-command, by `kvgate up` and by the test
fixtures. Not here: starting engines (`kvgate.engines`) or tokenising prompts
for routing (`router.tokenize`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

#: Name the engines serve the model under.
SERVED_MODEL_NAME = "tiny-llama"

#: Bumped whenever the files written here change; recorded in the directory so
#: a stale build is rebuilt instead of silently reused.
BUILD_VERSION = 2

_STAMP_FILE = "kvgate-model.json"

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

#: Special tokens, in id order: they take ids 0..4.
SPECIAL_TOKENS: tuple[str, ...] = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IM_START, IM_END)

#: ChatML-like template. It starts with the BOS token, so chat prompts are
#: tokenised without adding special tokens (as vLLM does for chat). Like the
#: templates of real tool-calling models, it renders the request's `tools`
#: and `documents` in a system turn up front, assistant `tool_calls` after
#: their message, and reads a template kwarg (`enable_thinking`, which
#: `reasoning_effort` also sets): each of them changes the prompt's tokens.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}"
    "{{ '<|im_start|>system\n# Tools\n' }}"
    "{% for tool in tools %}{{ tool | tojson }}{{ '\n' }}{% endfor %}"
    "{{ '<|im_end|>\n' }}"
    "{% endif %}"
    "{% if documents %}"
    "{{ '<|im_start|>system\n# Documents\n' }}"
    "{% for document in documents %}{{ document | tojson }}{{ '\n' }}{% endfor %}"
    "{{ '<|im_end|>\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] }}"
    "{% if message['tool_calls'] is defined %}"
    "{% for call in message['tool_calls'] %}"
    "{{ '<tool_call>' }}{{ call['function'] | tojson }}{{ '</tool_call>' }}"
    "{% endfor %}"
    "{% endif %}"
    "{{ '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and not enable_thinking %}{{ '<think></think>\n' }}{% endif %}"
    "{% endif %}"
)


@dataclass(frozen=True, slots=True)
class ModelShape:
    """Architecture of the tiny Llama; the weights are random (`--load-format dummy`).

    Attributes:
        vocab_size: rows of the embedding; the tokenizer has at most this many
            tokens (1024, so ids fit the model).
        hidden_size: model width (512).
        intermediate_size: MLP width (1024).
        num_hidden_layers: decoder layers (6).
        num_attention_heads: query heads (8, head size 64).
        num_key_value_heads: KV heads (2); with 6 layers and float32 this makes
            one token's KV 6 * 2 * 2 * 64 * 4 = 6 KiB.
        max_position_embeddings: longest context the config allows (8192).
    """

    vocab_size: int = 1024
    hidden_size: int = 512
    intermediate_size: int = 1024
    num_hidden_layers: int = 6
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    max_position_embeddings: int = 8192


# --------------------------------------------------------------------------
# Deterministic corpus
# --------------------------------------------------------------------------

_WORDS = """
the of and to a in is it you that he was for on are with as I his they be at one have
this from or had by hot word but what some we can out other were all there when up use
your how said an each she which do their time if will way about many then them write
would like so these her long make thing see him two has look more day could go come did
number sound no most people my over know water than call first who may down side been
now find any new work part take get place made live where after back little only round
man year came show every good me give our under name very through just form sentence
great think say help low line differ turn cause much mean before move right boy old too
same tell does set three want air well also play small end put home read hand port large
spell add even land here must big high such follow act why ask men change went light
kind off need house picture try us again animal point mother world near build self earth
father head stand own page should country found answer school grow study still learn
plant cover food sun four between state keep eye never last let thought city tree cross
farm hard start might story saw far sea draw left late run while press close night real
life few north open seem together next white children begin got walk example ease paper
group always music those both mark often letter until mile river car feet care second
book carry took science eat room friend began idea fish mountain stop once base hear
horse cut sure watch color face wood main enough plain girl usual young ready above ever
red list though feel talk bird soon body dog family direct pose leave song measure door
product black short numeral class wind question happen complete ship area half rock
order fire south problem piece told knew pass since top whole king space heard best hour
better true during hundred five remember step early hold west ground interest reach fast
verb sing listen six table travel less morning ten simple several vowel toward war lay
against pattern slow center love person money serve appear road map rain rule govern
pull cold notice voice unit power town fine certain fly fall lead cry dark machine note
wait plan figure star box noun field rest correct able pound done beauty drive stood
contain front teach week final gave green oh quick develop ocean warm free minute strong
special mind behind clear tail produce fact street inch multiply nothing course stay
wheel full force blue object decide surface deep moon island foot system busy test record
boat common gold possible plane stead dry wonder laugh thousand ago ran check game shape
equate miss brought heat snow tire bring yes distant fill east paint language among
""".split()

_TECH_WORDS = """
data model server request response cache token tokens block blocks prefix hash key value
memory engine query user assistant system prompt message content role function class
method object string integer list dictionary array file path error exception return
import module package install configure deploy cluster node pod service container image
network latency throughput bandwidth queue worker thread process async await stream chunk
database table index schema migration transaction commit branch merge review test case
python javascript rust golang java kubernetes docker linux windows browser html css json
yaml http https api endpoint client library framework version release update feature bug
performance optimize algorithm complexity sort search tree graph matrix vector tensor
neural training inference gradient layer attention transformer embedding vocabulary
marketing business customer product strategy growth revenue sales brand campaign audience
email website content article blog post write essay summary explain describe example
""".split()

_UNICODE_WORDS = """
café naïve résumé façade jalapeño über straße niño garçon crème déjà señor
привет мир данные модель сервер 你好 世界 数据 模型 服务器 こんにちは 東京 データ
안녕하세요 서버 γειά σου κόσμε مرحبا שלום नमस्ते ✓ → ← ≤ ≥ — … € £ ¥ 😀 🚀
""".split()

_CODE_LINES = (
    "def {w}_{v}(self, {x}):",
    "    return self.{w}[{x}]",
    "import {w}",
    "from {w} import {v}",
    "for {x} in range({n}):",
    "if {x} is None:",
    "    raise ValueError(f\"bad {w}: {{{x}!r}}\")",
    "{x} = {{\"{w}\": {n}, \"{v}\": [{n}, {n}]}}",
    "class {W}{V}:",
    "const {w} = await fetch(`/api/{v}/${{{x}}}`);",
    "fn {w}(&mut self, {x}: u64) -> Result<(), Error> {{",
    "SELECT {w}, {v} FROM {x} WHERE id = {n};",
    "$ pip install {w}-{v}=={n}.{n}",
    "<div class=\"{w}\">{v}</div>",
    "    {x}.append({w}({n}))",
    "# {W} {v} {w}",
)

_PUNCTUATION = (".", ".", ".", ",", "?", "!", ":", ";")


class _SplitMix64:
    """A tiny seeded PRNG (SplitMix64) whose output never changes with the interpreter."""

    __slots__ = ("_state",)

    _MASK = (1 << 64) - 1

    def __init__(self, seed: int) -> None:
        self._state = seed & self._MASK

    def next(self) -> int:
        self._state = (self._state + 0x9E3779B97F4A7C15) & self._MASK
        z = self._state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & self._MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & self._MASK
        return z ^ (z >> 31)

    def below(self, n: int) -> int:
        return self.next() % n

    def pick(self, items: Sequence[str]) -> str:
        # NOTE: squaring a uniform draw skews picks towards the head of each
        # list, a cheap stand-in for the Zipf-like frequencies of real text.
        u = self.next() / float(1 << 64)
        return items[int(u * u * len(items))]


def _sentence(rng: _SplitMix64) -> str:
    words = []
    for _ in range(3 + rng.below(14)):
        roll = rng.below(100)
        if roll < 70:
            words.append(rng.pick(_WORDS))
        elif roll < 93:
            words.append(rng.pick(_TECH_WORDS))
        elif roll < 97:
            words.append(str(rng.below(2048)))
        else:
            words.append(rng.pick(_UNICODE_WORDS))
    words[0] = words[0].capitalize()
    return " ".join(words) + rng.pick(_PUNCTUATION)


def _code_line(rng: _SplitMix64) -> str:
    w, v, x = rng.pick(_TECH_WORDS), rng.pick(_WORDS), rng.pick(("x", "i", "item", "key", "value", "data"))
    template = _CODE_LINES[rng.below(len(_CODE_LINES))]
    return template.format(w=w, v=v, x=x, W=w.capitalize(), V=v.capitalize(), n=rng.below(100))


def corpus_lines(*, seed: int = 20240607, paragraphs: int = 6000) -> Iterator[str]:
    """Generate the tokenizer's training text.

    Args:
        seed: PRNG seed; the same seed always gives the same text.
        paragraphs: how many paragraphs (prose, lists or code) to produce.

    Yields:
        Paragraphs of English-like prose, markdown lists and code, with a
        sprinkling of non-ASCII words so multi-byte sequences get merges too.
    """
    rng = _SplitMix64(seed)
    for _ in range(paragraphs):
        kind = rng.below(10)
        if kind < 6:
            yield " ".join(_sentence(rng) for _ in range(1 + rng.below(6)))
        elif kind < 8:
            bullet = rng.pick(("-", "*", "1.", "2.", "3."))
            yield "\n".join(f"{bullet} {_sentence(rng)}" for _ in range(2 + rng.below(4)))
        else:
            yield "\n".join(_code_line(rng) for _ in range(2 + rng.below(6)))


# --------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------


def _train_tokenizer_json(shape: ModelShape) -> str:
    # Imported here: `tokenizers` is a dependency of the gateway anyway, but the
    # CLI's other sub-commands should not pay for it.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=shape.vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus_lines(), trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    # Same post-processor transformers builds for add_bos_token=True, so the
    # gateway (reading tokenizer.json) and vLLM (transformers) agree.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN}:0 $A:0",
        pair=f"{BOS_TOKEN}:0 $A:0 {BOS_TOKEN}:1 $B:1",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    if tokenizer.get_vocab_size() > shape.vocab_size:
        raise RuntimeError(f"tokenizer has {tokenizer.get_vocab_size()} tokens, model only {shape.vocab_size}")
    return tokenizer.to_str(pretty=True)


def _config_json(shape: ModelShape, ids: dict[str, int]) -> dict[str, object]:
    head_dim = shape.hidden_size // shape.num_attention_heads
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": shape.vocab_size,
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_hidden_layers,
        "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_key_value_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": shape.max_position_embeddings,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": ids[BOS_TOKEN],
        "eos_token_id": ids[EOS_TOKEN],
        "pad_token_id": ids[PAD_TOKEN],
        "torch_dtype": "float32",
    }


def _added_token(content: str) -> dict[str, object]:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }


def _tokenizer_config_json(shape: ModelShape, ids: dict[str, int]) -> dict[str, object]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": shape.max_position_embeddings,
        "added_tokens_decoder": {str(ids[t]): _added_token(t) for t in SPECIAL_TOKENS},
        "chat_template": CHAT_TEMPLATE,
    }


def _files(shape: ModelShape) -> dict[str, str]:
    tokenizer_json = _train_tokenizer_json(shape)
    vocab = json.loads(tokenizer_json)["model"]["vocab"]
    ids = {token: vocab[token] for token in SPECIAL_TOKENS}
    special_map = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}
    generation = {
        "bos_token_id": ids[BOS_TOKEN],
        # The end of an assistant turn ends generation too.
        "eos_token_id": [ids[EOS_TOKEN], ids[IM_END]],
        "pad_token_id": ids[PAD_TOKEN],
    }

    def dump(obj: object) -> str:
        return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"

    return {
        "config.json": dump(_config_json(shape, ids)),
        "generation_config.json": dump(generation),
        "tokenizer.json": tokenizer_json,
        "tokenizer_config.json": dump(_tokenizer_config_json(shape, ids)),
        "special_tokens_map.json": dump(special_map),
    }


def _stamp(shape: ModelShape) -> dict[str, object]:
    return {"build_version": BUILD_VERSION, "served_model_name": SERVED_MODEL_NAME, "shape": asdict(shape)}


def _is_current(path: Path, shape: ModelShape) -> bool:
    stamp = path / _STAMP_FILE
    try:
        return json.loads(stamp.read_text(encoding="utf-8")) == _stamp(shape)
    except (OSError, ValueError):
        return False


def build_model(path: Path, *, force: bool = False, shape: ModelShape = ModelShape()) -> Path:
    """Write the tiny model directory if it is missing or stale.

    The directory is assembled in a temporary sibling and renamed into place, so
    concurrent builders (two test sessions, `kvgate up` twice) never see a
    half-written model; the loser of the race keeps the winner's copy.

    Args:
        path: model directory to create (its parents are created too).
        force: rebuild even if a current build is already there.
        shape: architecture to write into `config.json`.

    Returns:
        `path`, now holding `config.json`, `generation_config.json`,
        `tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json`
        and a stamp file recording the build.

    Raises:
        OSError: if the directory cannot be written, or `path` is a file or a
            directory with other contents (`FileExistsError`; never removed).
    """
    path = Path(path)
    if not force and _is_current(path, shape):
        return path
    if path.is_file() or (path.is_dir() and not (path / _STAMP_FILE).exists() and any(path.iterdir())):
        # NOTE: only a directory this function wrote (it holds the stamp) is
        # ever replaced: a path given by mistake must not cost its owner data.
        raise FileExistsError(errno.EEXIST, "it exists and is not a model directory built by kvgate", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    staging.chmod(0o755)
    try:
        for name, text in _files(shape).items():
            (staging / name).write_text(text, encoding="utf-8")
        (staging / _STAMP_FILE).write_text(json.dumps(_stamp(shape), indent=2) + "\n", encoding="utf-8")
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)
        try:
            os.rename(staging, path)
        except OSError:
            # Someone else renamed theirs into place first; theirs is as good.
            if not _is_current(path, shape):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def fingerprint(path: Path) -> str:
    """Digest of a model directory's tokenizer and config files.

    Args:
        path: a model directory written by `build_model`.

    Returns:
        A hex sha256 over the files' names and bytes, in name order; equal
        fingerprints mean equal tokenisation and architecture.
    """
    digest = hashlib.sha256()
    for name in sorted(("config.json", "tokenizer.json", "tokenizer_config.json")):
        digest.update(name.encode())
        digest.update((Path(path) / name).read_bytes())
    return digest.hexdigest()


def default_model_dir(home: Path | None = None) -> Path:
    """Where the CLI keeps the model: `<home>/models/tiny-llama`.

    Args:
        home: kvgate's state directory; `.kvgate` under the current directory
            when None.

    Returns:
        The model directory path (not created).
    """
    return (home if home is not None else Path.cwd() / ".kvgate") / "models" / SERVED_MODEL_NAME


def main(argv: Sequence[str] | None = None) -> int:
    """`kvgate build-model [--out DIR] [--force]`.

    Args:
        argv: arguments after the sub-command name.

    Returns:
        0 on success; 2 for bad flags, 1 when the directory cannot be
        written (one line on stderr).
    """
    from router.startup import CommandParser  # the command's one-line errors; building needs none of router

    parser = CommandParser(prog="kvgate build-model", description="Build the tiny local model directory.")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="model directory (default: $KVGATE_HOME/models/tiny-llama, KVGATE_HOME defaulting to ./.kvgate)",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if the directory is current")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    home = os.environ.get("KVGATE_HOME")
    out = args.out if args.out is not None else default_model_dir(Path(home) if home else None)
    try:
        build_model(out, force=args.force)
    except OSError as exc:
        print(f"kvgate build-model: cannot build in {out}: {exc.strerror or exc}; give --out a new or empty directory", file=sys.stderr)
        return 1
    print(out)
    return 0
