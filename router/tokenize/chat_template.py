"""A model's chat template, compiled once and rendered the way vLLM renders it.

vLLM (through `transformers`) renders chat templates in a sandboxed Jinja
environment with `trim_blocks` and `lstrip_blocks`, the `loopcontrols`
extension and a no-op `{% generation %}` block tag, a `tojson` filter that does
not escape HTML, and the globals `raise_exception` and `strftime_now`. The
template sees `messages`, `tools`, `documents`, `add_generation_prompt`, the
tokenizer's named special tokens (`bos_token`, `eos_token`, ...) and those
request kwargs the template actually references. `ChatTemplate` reproduces all
of that, plus vLLM's "continue the final message" trimming, so the text it
renders is byte for byte the text the engine tokenises.

It also answers two questions vLLM asks of a template: does it loop over
message content parts (then content is passed as a list of parts, "openai"
format, else as one string) and does it know the `developer` role.

Used by `router.tokenize.tokenizer.PromptTokenizer`; knows nothing of token ids.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any, Literal

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from router.tokenize.errors import MessageFormatError, TemplateRenderError

ContentFormat = Literal["string", "openai"]

#: Marker appended to the final message when it is to be continued; the
#: rendered text is cut where it appears (as transformers does).
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: renders its body unchanged.

    Training templates mark assistant text with it; for serving it is a no-op,
    but a template using it must still compile.
    """

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_render_body")
        return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # Unlike Jinja's own filter: no HTML escaping, and non-ASCII kept as is.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationBlock, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


# --------------------------------------------------------------------------
# Content-format detection over the template's syntax tree
# --------------------------------------------------------------------------


def _reads(node: jinja2.nodes.Node, names: set[str], key: str | None = None) -> bool:
    """Whether `node` reads one of `names` (or its `key` item), maybe sliced or filtered."""
    while True:
        if isinstance(node, (jinja2.nodes.Filter, jinja2.nodes.Test)) and node.node is not None:
            node = node.node
        elif isinstance(node, jinja2.nodes.Getitem) and isinstance(node.arg, jinja2.nodes.Slice):
            node = node.node
        else:
            break
    if key is None:
        return isinstance(node, jinja2.nodes.Name) and node.ctx == "load" and node.name in names
    if isinstance(node, jinja2.nodes.Getattr):
        return node.attr == key and _reads(node.node, names)
    if isinstance(node, jinja2.nodes.Getitem):
        return isinstance(node.arg, jinja2.nodes.Const) and node.arg.value == key and _reads(node.node, names)
    return False


def _aliases(ast: jinja2.nodes.Template, root: str) -> set[str]:
    """`root` and every variable assigned from it (`{% set msgs = messages[1:] %}`), transitively."""
    names = {root}
    changed = True
    while changed:
        changed = False
        for assign in ast.find_all(jinja2.nodes.Assign):
            target = assign.target
            if isinstance(target, jinja2.nodes.Name) and target.name not in names and _reads(assign.node, names):
                names.add(target.name)
                changed = True
    return names


def _loop_targets(loops: Iterator[jinja2.nodes.For], iterating: Callable[[jinja2.nodes.Node], bool]) -> set[str]:
    return {loop.target.name for loop in loops if isinstance(loop.target, jinja2.nodes.Name) and iterating(loop.iter)}


def detect_content_format(ast: jinja2.nodes.Template) -> ContentFormat:
    """Decide how the template wants message content, as vLLM does.

    "openai" when some loop iterates over a message's `content` (the template
    walks content parts), either directly, through a macro parameter that is
    given a message's content, or as a bare `content` variable outside macros;
    "string" otherwise.

    Args:
        ast: the parsed template.

    Returns:
        "openai" or "string".
    """
    messages = _aliases(ast, "messages")
    message_vars = _loop_targets(ast.find_all(jinja2.nodes.For), lambda it: _reads(it, messages))

    in_macro: set[int] = set()
    macro_params: dict[int, set[str]] = {}
    for macro in ast.find_all(jinja2.nodes.Macro):
        params = [arg.name for arg in macro.args]
        fed: set[str] = set()
        for call in ast.find_all(jinja2.nodes.Call):
            if not (isinstance(call.node, jinja2.nodes.Name) and call.node.name == macro.name):
                continue
            for index, arg in enumerate(call.args[: len(params)]):
                if _reads(arg, message_vars, "content"):
                    fed.add(params[index])
            for kwarg in call.kwargs:
                if kwarg.key in params and _reads(kwarg.value, message_vars, "content"):
                    fed.add(kwarg.key)
        for loop in macro.find_all(jinja2.nodes.For):
            in_macro.add(id(loop))
            macro_params[id(loop)] = fed

    for loop in ast.find_all(jinja2.nodes.For):
        if _reads(loop.iter, message_vars, "content"):
            return "openai"
        if isinstance(loop.iter, jinja2.nodes.Name):
            if loop.iter.name in macro_params.get(id(loop), ()):
                return "openai"
            if id(loop) not in in_macro and loop.iter.name == "content":
                return "openai"
    return "string"


class ChatTemplate:
    """One compiled chat template.

    Args:
        source: the Jinja source.

    Raises:
        jinja2.TemplateSyntaxError: if the template does not compile (the
            loader turns it into `TokenizerLoadError`).
    """

    __slots__ = ("source", "_template", "variables", "content_format", "supports_developer_role")

    def __init__(self, source: str) -> None:
        self.source = source
        env = _environment()
        ast = env.parse(source)
        self._template = env.from_string(ast)
        #: Names the template reads but does not define: the request kwargs it may use.
        self.variables: frozenset[str] = frozenset(jinja2.meta.find_undeclared_variables(ast))
        #: How message content is handed to the template.
        self.content_format: ContentFormat = detect_content_format(ast)
        #: Whether `developer` messages reach the template as such (else they
        #: become `system` messages, as vLLM does).
        self.supports_developer_role: bool = '"developer"' in source or "'developer'" in source

    def render(
        self,
        conversation: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool,
        continue_final_message: bool,
        context: Mapping[str, Any],
        tools: Any = None,
        documents: Any = None,
    ) -> str:
        """Render a normalised conversation to the prompt text.

        Args:
            conversation: messages as the template expects them (see
                `router.tokenize.messages`).
            add_generation_prompt: append the header that opens an assistant turn.
            continue_final_message: leave the last message open so the model
                continues it; the text is cut right after that message's content.
            context: further template variables (special tokens, accepted
                request kwargs); they cannot override the four fixed ones.
            tools: the `tools` variable (a list of JSON schemas or None).
            documents: the `documents` variable (a list of dicts or None).

        Returns:
            The rendered prompt.

        Raises:
            MessageFormatError: `continue_final_message` with nothing to continue.
            TemplateRenderError: the template raised, or cut the final message.
        """
        messages: Any = conversation
        final_text = ""
        if continue_final_message:
            messages = copy.deepcopy(list(conversation))
            final_text = self._mark_final(messages)
        try:
            text = self._template.render(
                **context,
                messages=messages,
                tools=tools,
                documents=documents,
                add_generation_prompt=add_generation_prompt,
            )
        except (jinja2.TemplateError, TypeError, ValueError, LookupError, AttributeError, ArithmeticError) as exc:
            raise TemplateRenderError(f"chat template rejected the conversation: {exc}") from exc
        if continue_final_message:
            text = self._cut_at_tag(text, final_text)
        return text

    def _mark_final(self, messages: list[Any]) -> str:
        final = messages[-1].get("content")
        if final is None:
            raise MessageFormatError('continue_final_message is set but the final message has no "content" to continue')
        if "content" not in self.source:
            raise MessageFormatError("continue_final_message is set but the chat template never reads message content")
        if isinstance(final, (list, tuple)):
            for part in reversed(final):
                if "text" in part:
                    text = part["text"]
                    part["text"] = text + _CONTINUE_TAG
                    return text
            raise MessageFormatError("continue_final_message is set but the final message has no text part")
        messages[-1]["content"] = final + _CONTINUE_TAG
        return final

    @staticmethod
    def _cut_at_tag(text: str, final_text: str) -> str:
        marker = _CONTINUE_TAG.strip()
        if final_text.strip() not in text or marker not in text:
            raise TemplateRenderError(
                "continue_final_message is set but the chat template dropped part of the final message"
            )
        at = text.rindex(marker)
        if text[at : at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
            return text[:at]
        # The template trimmed the message's trailing spaces; trim ours too.
        return text[:at].rstrip()
