"""Chat: conversations rendered with the model's chat template, answered with a reused KV cache.

A chat model is still a next-token predictor; what makes it chat is the text it was trained on.
A *chat template* (a Jinja program shipped with the tokenizer) turns a list of messages into
that text, e.g. ChatML:

    <|im_start|>user\\nWhat is the capital of France?<|im_end|>\\n<|im_start|>assistant\\n

and the model answers until it writes the end-of-turn token (``<|im_end|>``).

Templates are rendered as transformers' ``apply_chat_template`` renders them (a sandboxed Jinja
environment with trim_blocks and lstrip_blocks, ``raise_exception``, a ``tojson`` that leaves
non-ASCII alone, and the tokenizer's ``bos_token``/``eos_token`` spellings as variables). The
template is the model's own (GGUF ``tokenizer.chat_template``, a Hugging Face folder's
``chat_template.jinja`` or ``tokenizer_config.json``); checkpoints without one (Meta folders) get
a built-in: the one a Meta Llama 3 folder names (LLAMA31 for Llama 3.1 and later, whose
params.json says use_scaled_rope, else LLAMA3), LLAMA3 when the vocabulary has Llama 3's header
tokens, CHATML when it has ``<|im_start|>``, else LLAMA2. Sources: Meta's llama ``generation.py``
(Llama 2 ``chat_completion``), llama3 ``tokenizer.py`` (``ChatFormat``), llama-models' Llama 3.1
prompt format (``SystemDefaultGenerator``), OpenAI's ChatML note; transformers' chat templating docs.

:class:`ChatSession` keeps a conversation and the KV cache of every token the model has already
read. A new turn renders the *whole* conversation again, tokenizes it, keeps the longest prefix
that matches the cached tokens (``cache.truncate``) and runs only the rest through the model:

    turn 1:  [system + user 1 + assistant header] -> answer 1             (all prefilled)
    turn 2:  [ ...cached... ][end of answer 1 + user 2 + header] -> answer 2   (only the new part)

When the conversation would no longer fit the context window, the oldest turns are dropped; the
cache then keeps only the prefix that still matches (usually the system prompt) and the rest is
read again, and ``on_drop`` is told.
"""

from __future__ import annotations

import functools
import json
import re
import time
import types
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from typing import Callable, Iterator, Sequence

from .errors import InputError, TokenizerError
from .generate import CONTEXT_FULL, generate, stream_text
from .rope_scaling import context_window
from .sampling import SamplingSettings

# ------------------------------------------------------------------------------------ built-ins
# Llama 2 chat (Meta's chat_completion): every exchange is "<s>[INST] user [/INST] answer </s>";
# the system prompt is folded into the first user message between <<SYS>> markers; contents are
# stripped. The prompt ends with "[/INST]": Llama 2 has no assistant header.
LLAMA2 = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system_message = messages[0]['content'] %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set system_message = none %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Llama 2 conversations alternate user and assistant messages, starting with "
    "the user (after an optional system message)') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{% if loop.first and system_message is not none %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{{ bos_token + '[INST] ' + content | trim + ' [/INST]' }}"
    "{% else %}"
    "{{ ' ' + message['content'] | trim + ' ' + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)

# Llama 3 (Meta's ChatFormat): <|begin_of_text|>, then per message a role header, the stripped
# content and <|eot_id|>; the generation prompt is an open assistant header.
LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# Llama 3.1 and later (Meta's Llama 3.1 prompt format; the chat template Meta publishes with the
# 3.1, 3.2 and 3.3 checkpoints renders the same): every conversation opens with a system header
# that names the knowledge cutoff and today's date, then the system message, if any:
#   <|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n
#   Today Date: 26 July 2024\n\n{system}<|eot_id|>
# Meta's SystemDefaultGenerator writes the date as strftime("%d %B %Y"); a caller may fix it by
# passing the variable date_string, as with Meta's template.
LLAMA31 = (
    "{{ bos_token }}"
    "{% if date_string is not defined %}{% set date_string = strftime_now('%d %B %Y') %}{% endif %}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system_message = messages[0]['content'] | trim %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set system_message = '' %}{% set loop_messages = messages %}{% endif %}"
    "{{ '<|start_header_id|>system<|end_header_id|>\n\n' + 'Cutting Knowledge Date: December 2023\n'"
    " + 'Today Date: ' + date_string + '\n\n' + system_message + '<|eot_id|>' }}"
    "{% for message in loop_messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# ChatML: <|im_start|>role\ncontent<|im_end|>\n per message, no BOS.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

BUILTIN_TEMPLATES = {"llama2": LLAMA2, "llama3": LLAMA3, "llama3.1": LLAMA31, "chatml": CHATML}


# ------------------------------------------------------------------------------------ rendering
class ChatTemplate(str):
    """The Jinja source of a chat template that remembers where it came from, for error messages
    ("model.gguf: tokenizer.chat_template", "--template chat.jinja", ".../tokenizer_config.json: chat_template")."""

    origin: str

    def __new__(cls, source: str, origin: str):
        template = super().__new__(cls, source)
        template.origin = origin
        return template


def template_origin(template: str) -> str:
    """Where a template came from (ChatTemplate.origin), or a generic name for a plain string."""
    return getattr(template, "origin", None) or "the given chat template"


@dataclass(frozen=True)
class TemplateBudget:
    """What one rendering of a chat template may cost.

    seconds       wall time
    steps         loop iterations, calls, filters, operators, attribute and item lookups
    value_chars   characters (or items) of any one string or list the template builds
    output_chars  characters the template writes in all, its macros and set blocks included
    int_bits      bits of any integer it computes

    A chat template renders a conversation in about a millisecond and a few thousand steps; the
    defaults leave room for conversations of millions of characters.
    """
    seconds: float = 5.0
    steps: int = 5_000_000
    value_chars: int = 1 << 24
    output_chars: int = 1 << 26
    int_bits: int = 4096


DEFAULT_BUDGET = TemplateBudget()
MAX_TEMPLATE_CHARS = 1 << 20     # real chat templates are a few thousand characters
_RESERVED = "__npllama_"         # names of the budget's hooks, which a template may not use


class OverBudget(Exception):
    """A rendering exceeded its TemplateBudget (raised inside the template, reported by render_template)."""


class _Meter:
    """The running cost of one rendering, checked against its budget at every hook."""

    def __init__(self, budget: TemplateBudget):
        self.budget = budget
        self.deadline = time.monotonic() + budget.seconds
        self.steps = 0
        self.output = 0

    def tick(self) -> None:
        self.steps += 1
        if self.steps > self.budget.steps:
            raise OverBudget(f"more than {self.budget.steps} steps")
        if time.monotonic() > self.deadline:
            raise OverBudget(f"more than {self.budget.seconds:g} s")

    def size(self, n: int, what: str = "a value") -> None:
        if n > self.budget.value_chars:
            raise OverBudget(f"{what} of {n} characters or items, more than {self.budget.value_chars}")

    def check(self, value):
        """value, after checking that it is not too large (strings, lists, integers)."""
        if isinstance(value, (str, list, tuple, dict, set, frozenset, bytes)):
            self.size(len(value))
        elif isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > self.budget.int_bits:
            raise OverBudget(f"an integer of {value.bit_length()} bits, more than {self.budget.int_bits}")
        return value


_METER: ContextVar[_Meter | None] = ContextVar("npllama_template_meter", default=None)


def _meter() -> _Meter:
    meter = _METER.get()
    if meter is None:                 # a filter folded at compile time: leave it to run time
        raise RuntimeError("a chat template hook runs only while rendering")
    return meter


def _bits(x) -> int:
    return abs(x).bit_length() if isinstance(x, int) and not isinstance(x, bool) else 0


def _sized(x) -> bool:
    return isinstance(x, (str, list, tuple))


def _check_format(meter: _Meter, fmt: str, args) -> None:
    """A %- or {}-format cannot ask for a width or precision larger than a value may be."""
    for number in re.findall(r"\d+", fmt):
        if len(number) > 9 or int(number) > meter.budget.value_chars:
            raise OverBudget(f"a format width or precision of {number[:12]}, more than {meter.budget.value_chars}")
    for a in args:
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > meter.budget.value_chars:
            raise OverBudget(f"a format argument of {a.bit_length()} bits (a width?), more than allowed")


def _check_binop(meter: _Meter, op: str, left, right) -> None:
    """Refuse, before computing it, an operation whose result would be larger than the budget allows."""
    limit = meter.budget.int_bits
    if op == "*":
        if _sized(left) and isinstance(right, int) or _sized(right) and isinstance(left, int):
            seq, n = (left, right) if _sized(left) else (right, left)
            meter.size(len(seq) * max(int(n), 0), "a repetition")
        elif _bits(left) + _bits(right) > limit:
            raise OverBudget(f"a product of {_bits(left) + _bits(right)} bits, more than {limit}")
    elif op == "**":
        if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0 \
                and _bits(left) * right > limit:
            raise OverBudget(f"a power of about {_bits(left)} x {right} bits, more than {limit}")
    elif op == "+":
        if _sized(left) and _sized(right):
            meter.size(len(left) + len(right), "a concatenation")
    elif op == "%" and isinstance(left, str):
        _check_format(meter, left, right if isinstance(right, tuple) else (right,))


def _checked_method(meter: _Meter, method, args, kwargs) -> tuple:
    """Predict the size of a str method's result for the methods that can make one much larger;
    returns the arguments to call it with (an iterable to join is read once, into a list)."""
    name, s = method.__name__, method.__self__
    limit = meter.budget.value_chars
    if name in ("center", "ljust", "rjust", "zfill"):
        width = args[0] if args else kwargs.get("width", 0)
        if isinstance(width, int) and width > limit:
            raise OverBudget(f"str.{name} to {width} characters, more than {limit}")
    elif name == "expandtabs":
        size = args[0] if args else kwargs.get("tabsize", 8)
        if isinstance(size, int):
            meter.size(len(s) + s.count("\t") * max(size, 0), "str.expandtabs")
    elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        old, new = args[0], args[1]
        count = s.count(old) if old else len(s) + 1
        if len(args) > 2 and isinstance(args[2], int) and args[2] >= 0:
            count = min(count, args[2])
        meter.size(len(s) + count * max(len(new) - len(old), 0), "str.replace")
    elif name == "join" and args:
        items = args[0] if isinstance(args[0], (list, tuple)) else list(args[0])
        meter.size(len(items), "str.join")
        meter.size(sum(len(x) if isinstance(x, str) else 0 for x in items) + len(s) * max(len(items) - 1, 0),
                   "str.join")
        return (items, *args[1:])
    elif name in ("translate", "maketrans"):
        raise OverBudget(f"str.{name}, which a chat template has no use for")
    return args


@functools.lru_cache(maxsize=None)
def _jinja_state() -> tuple:
    """The types of what Jinja passes to a filter before its value (pass_context, pass_eval_context,
    pass_environment)."""
    from jinja2 import Environment
    from jinja2.nodes import EvalContext
    from jinja2.runtime import Context
    return Environment, EvalContext, Context


def _checked_filter(name: str, fn):
    """A Jinja filter that counts a step, refuses results larger than the budget, and predicts the
    size of the filters that can multiply their input (center, indent, replace, join, format, ...)."""
    @functools.wraps(fn)
    def filtered(*args, **kwargs):
        meter = _meter()
        meter.tick()
        plain = [a for a in args if not isinstance(a, _jinja_state())]   # leave out a passed context/environment
        value, rest = (plain[0], plain[1:]) if plain else (None, [])
        limit = meter.budget.value_chars

        def arg(i, key, default):
            return rest[i] if len(rest) > i else kwargs.get(key, default)
        if name == "center":
            width = arg(0, "width", 80)
            if isinstance(width, int) and width > limit:
                raise OverBudget(f"center to {width} characters, more than {limit}")
        elif name == "indent":
            width = arg(0, "width", 4)
            pad = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
            meter.size(pad, "an indent")
            text = str(value)
            meter.size(len(text) + (text.count("\n") + 1) * pad, "an indented text")
        elif name == "replace":
            old, new = str(arg(0, "old", "")), str(arg(1, "new", ""))
            text = str(value)
            meter.size(len(text) + (text.count(old) if old else len(text) + 1) * max(len(new) - len(old), 0),
                       "a replacement")
        elif name == "join":
            items = list(value) if value is not None else []
            meter.size(len(items), "a join")
            sep = str(arg(0, "d", ""))
            meter.size(sum(len(str(x)) for x in items) + len(sep) * max(len(items) - 1, 0), "a join")
            args = tuple(items if a is value else a for a in args)
        elif name == "format":
            _check_format(meter, str(value), rest)
        elif name == "wordwrap":
            wrap = arg(2, "wrapstring", None)
            meter.size(len(str(value)) * (2 + (len(wrap) if isinstance(wrap, str) else 1)), "a wrapped text")
        elif name in ("batch", "slice"):
            count = arg(0, "linecount" if name == "batch" else "slices", 1)
            if isinstance(count, int):
                meter.size(count, f"{name} into that many parts")
        elif name == "sum":
            start = arg(1, "start", 0)
            if not isinstance(start, (int, float)):
                raise OverBudget("sum of strings or lists (quadratic); join them instead")
        elif name == "tojson":
            indent = arg(1, "indent", None)
            if isinstance(indent, (int, str)) and not isinstance(indent, bool) and \
                    (len(indent) if isinstance(indent, str) else indent) > 64:
                raise OverBudget(f"tojson with an indent of {indent!r:.20}, more than 64")
        return meter.check(fn(*args, **kwargs))
    return filtered


def _checked_test(fn):
    @functools.wraps(fn)
    def tested(*args, **kwargs):
        _meter().tick()
        return fn(*args, **kwargs)
    return tested


class _Iterate:
    """An iterable a for loop walks through, one step of the budget per item (len kept for loop.length)."""

    def __init__(self, iterable):
        self.iterable = iterable

    def __len__(self) -> int:
        return len(self.iterable)

    def __iter__(self):
        meter = _meter()
        for item in self.iterable:
            meter.tick()
            yield item


def _iterate(iterable):
    _meter().tick()
    return _Iterate(iterable)


def _emit(value) -> str:
    """The text of one piece of template output, counted against the output budget."""
    meter = _meter()
    meter.tick()
    text = str(value)
    meter.output += len(text)
    if meter.output > meter.budget.output_chars:
        raise OverBudget(f"more than {meter.budget.output_chars} characters of output")
    return text


def _concat(*values) -> str:
    """``a ~ b ~ c``: the join, its size checked before it is built."""
    meter = _meter()
    meter.tick()
    texts = [str(v) for v in values]
    meter.size(sum(len(t) for t in texts), "a concatenation")
    return "".join(texts)


def _instrument(tree):
    """Route every for loop, every piece of output and every ``~`` through the budget's hooks.

    Jinja compiles a template to Python; a hostile one can loop 10**5 x 10**5 times or build
    gigabytes with no single operation the sandbox sees as unsafe. The parsed template is
    rewritten before compiling: each loop's iterable goes through ``__npllama_iterate`` (a step
    per item), each output expression and block of text through ``__npllama_emit`` (a step, and
    the characters written), each ``~`` through ``__npllama_concat``. Calls, filters, tests,
    operators and lookups are counted by the environment itself (see _sandbox).
    """
    from jinja2 import nodes

    def hook(name: str, *args):
        return nodes.Call(nodes.Name(_RESERVED + name, "load"), list(args), [], None, None)

    for node in tree.find_all(nodes.Name):
        if node.name.startswith(_RESERVED):
            raise ValueError(f"the template uses the name {node.name!r}, which npllama reserves")
    for loop in list(tree.find_all(nodes.For)):
        loop.iter = hook("iterate", loop.iter)
    for output in list(tree.find_all(nodes.Output)):
        output.nodes = [hook("emit", nodes.Const(child.data) if isinstance(child, nodes.TemplateData) else child)
                        for child in output.nodes]
    for parent in reversed(list(tree.find_all(nodes.Node))):     # inner ~ before outer ones
        for name in parent.fields:
            value = getattr(parent, name, None)
            if isinstance(value, nodes.Concat):
                setattr(parent, name, hook("concat", *value.nodes))
            elif isinstance(value, list):
                setattr(parent, name, [hook("concat", *v.nodes) if isinstance(v, nodes.Concat) else v for v in value])
    return tree


def _sandbox():
    """A sandboxed Jinja environment set up as transformers sets it up for chat templates, with a budget.

    As transformers: trim_blocks and lstrip_blocks, the loop controls extension, the
    ``{% generation %}`` block, raise_exception, strftime_now and a tojson that leaves non-ASCII
    alone. The sandbox refuses attribute escapes (``__class__`` and friends); on top of it every
    call, filter, test, operator, lookup, loop step and piece of output counts against the
    TemplateBudget of the rendering (time, steps), and the operations that can multiply sizes
    (``*``, ``**``, ``%``, ``+``, str.center/ljust/replace/..., the center/indent/replace/join/
    format/wordwrap/batch/slice/sum/tojson filters) are refused before they would build a value
    larger than the budget allows. ``lipsum`` is removed; ``range`` keeps the sandbox's limit of
    100,000 items.
    """
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        """``{% generation %}...{% endgeneration %}`` marks assistant text for training masks;
        rendering keeps its body as is."""
        tags = {"generation"}

        def parse(self, parser) -> list[nodes.Node]:
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    class ChatSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "%", "+"})

        def call_binop(self, context, operator, left, right):
            meter = _meter()
            meter.tick()
            _check_binop(meter, operator, left, right)
            return meter.check(super().call_binop(context, operator, left, right))

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's own signature)
            meter = _meter()
            meter.tick()
            if isinstance(__obj, types.BuiltinMethodType) and isinstance(getattr(__obj, "__self__", None), str):
                args = _checked_method(meter, __obj, args, kwargs)
            return meter.check(super().call(__context, __obj, *args, **kwargs))

        def getattr(self, obj, attribute):
            _meter().tick()
            return super().getattr(obj, attribute)

        def getitem(self, obj, argument):
            _meter().tick()
            return super().getitem(obj, argument)

        def wrap_str_format(self, value):
            wrapper = super().wrap_str_format(value)
            if wrapper is None:
                return None
            fmt = value.__self__

            @functools.wraps(wrapper)
            def checked(*args, **kwargs):
                meter = _meter()
                _check_format(meter, fmt, [*args, *kwargs.values()])
                return meter.check(wrapper(*args, **kwargs))
            return checked

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        if not isinstance(fmt, str) or len(fmt) > 256:
            raise OverBudget(f"strftime_now wants a format string of at most 256 characters, got {fmt!r:.40}")
        return datetime.now().strftime(fmt)

    env = ChatSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, loopcontrols])
    env.filters["tojson"] = tojson
    env.filters = {name: _checked_filter(name, fn) for name, fn in env.filters.items()}
    env.tests = {name: _checked_test(fn) for name, fn in env.tests.items()}
    env.globals.pop("lipsum", None)
    env.globals.update({"raise_exception": raise_exception, "strftime_now": strftime_now,
                        _RESERVED + "iterate": _iterate, _RESERVED + "emit": _emit, _RESERVED + "concat": _concat})
    return env


@functools.lru_cache(maxsize=16)
def compile_template(source: str):
    """A chat template compiled in the budgeted sandbox (see _sandbox and _instrument).

    Raises TokenizerError (naming where the template came from, see ChatTemplate) when it is too
    long or cannot be parsed.
    """
    import jinja2

    where = template_origin(source)
    if not isinstance(source, str):
        raise TokenizerError(f"{where}: a chat template must be text, got {type(source).__name__}")
    if len(source) > MAX_TEMPLATE_CHARS:
        raise TokenizerError(f"{where}: the chat template is {len(source)} characters long; npllama reads at most "
                             f"{MAX_TEMPLATE_CHARS} (real ones are a few thousand)")
    env = _sandbox()
    try:
        return env.from_string(_instrument(env.parse(str(source))))
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(f"{where}: the chat template cannot be parsed (line {e.lineno}: {e.message}); "
                             f"fix the template or pass another one") from None
    except (RecursionError, MemoryError, ValueError, jinja2.TemplateError) as e:
        raise TokenizerError(f"{where}: the chat template cannot be compiled ({type(e).__name__}: {e}); "
                             f"fix the template or pass another one") from None


def render_template(template: str, messages: Sequence[dict], *, add_generation_prompt: bool = True,
                    budget: TemplateBudget = DEFAULT_BUDGET, **variables) -> str:
    """The text of ``messages`` ([{"role": ..., "content": ...}, ...]) under a Jinja chat template.

    variables: what the template may read besides messages and add_generation_prompt
    (bos_token, eos_token, ...; see :func:`special_token_variables`). The rendering runs within
    ``budget`` (TemplateBudget). Every failure is one error that starts with where the template
    came from (template_origin): InputError when the template refuses the conversation
    (raise_exception, the sandbox) or runs over its budget or fails, TokenizerError when it
    cannot be parsed.
    """
    import jinja2
    from jinja2.sandbox import SecurityError

    where = template_origin(template)
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise InputError(f"a chat message must be a dict with 'role' and 'content', got {m!r:.200}")
    compiled = compile_template(template)
    token = _METER.set(_Meter(budget))
    try:
        return "".join(compiled.generate(messages=[dict(m) for m in messages],
                                         add_generation_prompt=add_generation_prompt, **variables))
    except OverBudget as e:
        raise InputError(f"{where}: the chat template ran over its budget ({e}); it loops without end or builds "
                         f"far more text than a conversation. Fix the template or pass another one") from None
    except (SecurityError, jinja2.TemplateError) as e:
        raise InputError(f"{where}: the chat template refused the conversation: {e}") from None
    except RecursionError:
        raise InputError(f"{where}: the chat template recursed too deeply; fix the template or pass another "
                         f"one") from None
    except MemoryError:
        raise InputError(f"{where}: the chat template ran out of memory; fix the template or pass another "
                         f"one") from None
    except Exception as e:   # TypeError, ZeroDivisionError, OverflowError (range > 100,000), ... inside the template
        raise InputError(f"{where}: the chat template failed ({type(e).__name__}: {e}); fix the template or "
                         f"pass another one") from None
    finally:
        _METER.reset(token)


def special_token_variables(tokenizer) -> dict[str, str]:
    """bos_token / eos_token as the template sees them: the tokenizer's spellings of those ids."""
    out = {}
    if getattr(tokenizer, "bos_id", None) is not None:
        out["bos_token"] = tokenizer.id_to_token(tokenizer.bos_id)
    eos = tuple(getattr(tokenizer, "eos_ids", ()))
    if eos:
        out["eos_token"] = tokenizer.id_to_token(eos[0])
    return out


def builtin_template_for(tokenizer) -> str:
    """The built-in template that suits a tokenizer: the format its checkpoint names
    (``tokenizer.chat_format``: a Meta Llama 3 folder says llama3 or llama3.1), else the family its
    special tokens tell."""
    named = getattr(tokenizer, "chat_format", None)
    if named in BUILTIN_TEMPLATES:
        return named
    has = lambda t: tokenizer.token_to_id(t) is not None    # noqa: E731
    if has("<|start_header_id|>") and has("<|eot_id|>"):
        return "llama3"
    if has("<|im_start|>") and has("<|im_end|>"):
        return "chatml"
    return "llama2"


def chat_template_for(tokenizer, template: str | None = None) -> tuple[str, str]:
    """(template source, where it came from): ``template`` (a built-in name or Jinja source), else
    the tokenizer's own, else a built-in chosen by :func:`builtin_template_for`."""
    if template is not None:
        if template in BUILTIN_TEMPLATES:
            return ChatTemplate(BUILTIN_TEMPLATES[template], f"built-in template {template}"), f"built-in {template}"
        return template, getattr(template, "origin", None) or "given"
    own = getattr(tokenizer, "chat_template", None)
    if own:
        return own, "the model's own"
    name = builtin_template_for(tokenizer)
    return ChatTemplate(BUILTIN_TEMPLATES[name], f"built-in template {name}"), f"built-in {name}"


def end_of_turn_ids(tokenizer, template: str, config=None) -> tuple[int, ...]:
    """Ids that end an answer: the template's end-of-turn token, the tokenizer's and config's EOS.

    The template's token is found by rendering a finished assistant message and taking the first
    special token that follows its text (ChatML: <|im_end|>, Llama 3: <|eot_id|>, Llama 2: </s>).
    """
    ids = list(getattr(tokenizer, "eos_ids", ())) + list(getattr(config, "eos_token_ids", ()) or ())
    marker = "npllama-end-of-turn-probe"
    try:
        text = render_template(template, [{"role": "user", "content": "hi"},
                                          {"role": "assistant", "content": marker}],
                               add_generation_prompt=False, **special_token_variables(tokenizer))
    except InputError:
        text = ""
    if marker in text:
        after = tokenizer.encode(text[text.index(marker) + len(marker):], add_bos=False)
        special = getattr(tokenizer, "special_ids", frozenset())
        ids += [i for i in after if i in special][:1]
    return tuple(dict.fromkeys(int(i) for i in ids))


def render_prompt(model, user_message: str, system: str | None = None,
                  template: str | None = None) -> tuple[str, tuple[int, ...]]:
    """One user message (and an optional system message) as a prompt, with its stop ids.

    Returns (prompt text, stop ids). The text is such that ``model.tokenizer.encode(text)`` gives
    the ids transformers' apply_chat_template gives: when the tokenizer adds BOS itself, a BOS
    that the template wrote is left out of the text.
    """
    tok = model.tokenizer
    if tok is None:
        raise InputError("this checkpoint has no tokenizer, so it cannot chat; load one that ships a tokenizer")
    source, _ = chat_template_for(tok, template)
    variables = special_token_variables(tok)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user_message}]
    text = render_template(source, messages, add_generation_prompt=True, **variables)
    bos = variables.get("bos_token")
    if tok.add_bos and bos and text.startswith(bos):
        text = text[len(bos):]
    return text, end_of_turn_ids(tok, source, model.config)


# ------------------------------------------------------------------------------------ session
@dataclass
class TurnStats:
    """What the last ``send`` did.

    reused      prompt tokens whose keys/values were already in the cache (not run again)
    prefilled   prompt tokens run through the model for this turn
    generated   answer tokens produced (the stop token included)
    dropped     oldest turns dropped to fit the context window
    stopped     "end of turn", "length" (max_new_tokens), "context window full" (no room was
                left for more) or "interrupted"
    seconds     wall time of the turn
    answer_ids  the generated token ids, the stop token included
    """
    reused: int = 0
    prefilled: int = 0
    generated: int = 0
    dropped: int = 0
    stopped: str = ""
    seconds: float = 0.0
    answer_ids: list[int] = field(default_factory=list)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class ChatSession:
    """A conversation with a model; ``send(message)`` streams the answer as text pieces.

        session = ChatSession(npllama.load(), system="Answer briefly.")
        for piece in session.send("What is the capital of France?"):
            print(piece, end="", flush=True)
        session.last_turn      # TurnStats: tokens reused from the cache, prefilled, generated, ...

    The backend is pluggable: ``model`` is anything with ``.config``, ``.tokenizer`` and
    ``new_cache(batch, max_seq_len)``, and ``generate_fn`` anything with npllama.generate's
    signature (the Torch backend plugs in its twins).

    max_seq_len: the window the conversation must fit (default: the model's context).
    on_drop(n): called when the n oldest turns were dropped to make room.
    seed: turn t samples with seed + t (None: fresh randomness).
    """

    def __init__(self, model, system: str | None = None, settings: SamplingSettings = SamplingSettings(),
                 seed: int | None = None, max_new_tokens: int = 256, *,
                 generate_fn: Callable | None = None, template: str | None = None,
                 max_seq_len: int | None = None, on_drop: Callable[[int], None] | None = None):
        if model.tokenizer is None:
            raise InputError("this checkpoint has no tokenizer, so it cannot chat; load one that ships a tokenizer")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        window = context_window(model.config)
        if max_seq_len is not None and not 0 < max_seq_len <= window:
            raise InputError(f"max_seq_len must lie in 1..{window} (the model's context window), got {max_seq_len!r}")
        self.model = model
        self.tokenizer = model.tokenizer
        self.generate_fn = generate_fn or generate
        self.settings = settings
        self.seed = seed
        self.max_new_tokens = max_new_tokens
        self.on_drop = on_drop
        self.template, self.template_source = chat_template_for(self.tokenizer, template)
        self._variables = special_token_variables(self.tokenizer)
        self.stop_ids = end_of_turn_ids(self.tokenizer, self.template, model.config)
        self.cache = model.new_cache(1, max_seq_len)
        self.system = system or None
        self.messages: list[dict] = []        # user / assistant turns, oldest first
        self.cached_ids: list[int] = []       # the tokens whose keys/values the cache holds
        self.last_turn = TurnStats()
        self._turns = 0

    # ------------------------------------------------------------------ the conversation
    @property
    def window(self) -> int:
        return self.cache.max_seq_len

    @property
    def history(self) -> list[dict]:
        """The conversation as the template sees it: [system], user, assistant, user, ..."""
        return self._with_system(self.messages)

    def _with_system(self, messages: Sequence[dict]) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + [dict(m) for m in messages]

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays; its cached tokens are reused)."""
        self.messages.clear()

    def set_system(self, system: str | None) -> None:
        """Change (or with None, remove) the system prompt; the turns so far are kept and re-read."""
        self.system = system or None

    def render(self, add_generation_prompt: bool = True) -> str:
        """The text of the whole conversation under the chat template."""
        return render_template(self.template, self.history, add_generation_prompt=add_generation_prompt,
                               **self._variables)

    def prompt_ids(self) -> list[int]:
        """The token ids of the whole conversation plus the assistant header (BOS only if the template writes it)."""
        return self.tokenizer.encode(self.render(), add_bos=False)

    # ------------------------------------------------------------------ one turn
    def send(self, message: str) -> Iterator[str]:
        """Add a user message and stream the answer as text pieces (stop tokens not shown).

        Each piece is the text of the token just generated (a token that ends inside a UTF-8
        character is held back and comes out with the next); the ids are in last_turn.answer_ids.

        The turn happens as the iterator is consumed; closing it early (or Ctrl-C) keeps the part
        of the answer produced so far in the history and in the cache.
        """
        if not isinstance(message, str) or not message.strip():
            raise InputError("the message is empty: type something to send")
        return self._turn(message)

    def _fit(self) -> tuple[list[int], int]:
        """The prompt ids, after dropping the oldest turns until the answer has room.

        Nothing is dropped when even the newest message alone would not fit (an InputError).
        """
        kept = list(self.messages)
        dropped = 0
        while True:
            ids = self.tokenizer.encode(render_template(self.template, self._with_system(kept),
                                                        **self._variables), add_bos=False)
            room = self.window - len(ids)          # positions left for the answer (+1: the last is not fed)
            if room >= self.max_new_tokens - 1 or (len(kept) <= 1 and room >= 0):
                self.messages[:] = kept
                return ids, dropped
            if len(kept) <= 1:                     # only the new message is left
                raise InputError(f"the message is too long: with the template it takes {len(ids)} tokens, "
                                 f"more than the context window of {self.window}; shorten it")
            del kept[0]                            # the oldest user message and its answer
            while kept and kept[0]["role"] != "user":
                del kept[0]
            dropped += 1

    def _turn(self, message: str) -> Iterator[str]:
        start = time.perf_counter()
        self.messages.append({"role": "user", "content": message})
        try:
            ids, dropped = self._fit()
        except BaseException:
            self.messages.pop()
            raise
        if dropped and self.on_drop is not None:
            self.on_drop(dropped)
        # Reuse the cache up to the first token that differs; at least one token must be fed.
        keep = min(_common_prefix(self.cached_ids, ids), len(ids) - 1)
        self.cache.truncate(keep)
        del self.cached_ids[keep:]
        answer: list[int] = []
        stats = TurnStats(reused=keep, prefilled=len(ids) - keep, dropped=dropped, stopped="interrupted",
                          answer_ids=answer)
        self.last_turn = stats
        seed = None if self.seed is None else self.seed + self._turns
        self._turns += 1
        stops = set(self.stop_ids)
        tokens = self.generate_fn(self.model, ids[keep:], self.max_new_tokens, self.settings, seed,
                                  self.stop_ids, cache=self.cache)

        def recorded():
            for t in tokens:
                answer.append(int(t))
                yield int(t)

        pieces = stream_text(self.tokenizer, recorded(), skip_ids=stops)
        try:
            yield from pieces
            full = getattr(tokens, "stopped", [None])[0] == CONTEXT_FULL
            stats.stopped = ("end of turn" if answer and answer[-1] in stops
                             else "context window full" if full else "length")
        finally:
            pieces.close()
            tokens.close()
            # The cache holds the prompt and the answer except its last token (never fed back),
            # or less when a forward pass was interrupted: trust its length.
            self.cached_ids = (ids + answer)[: self.cache.length]
            text = self.tokenizer.decode([t for t in answer if t not in stops])
            if text or stats.stopped != "interrupted":
                self.messages.append({"role": "assistant", "content": text})
            else:                                  # stopped before a word: the turn never happened
                self.messages.pop()
            stats.generated = len(answer)
            stats.seconds = time.perf_counter() - start

    def ask(self, message: str) -> str:
        """send() and return the whole answer."""
        return "".join(self.send(message))
