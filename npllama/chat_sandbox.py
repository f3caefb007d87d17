"""The Jinja sandbox chat templates are rendered in, with a time and size budget.

Templates are rendered as transformers' ``apply_chat_template`` renders them (a sandboxed Jinja
environment with trim_blocks and lstrip_blocks, ``raise_exception``, a ``tojson`` that leaves
non-ASCII alone, and the tokenizer's ``bos_token``/``eos_token`` spellings as variables). A chat
template comes with the checkpoint, so it is untrusted input: every rendering runs within a
TemplateBudget (see _sandbox and _instrument).
"""

from __future__ import annotations

import functools
import json
import re
import time
import types
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from typing import Sequence

from .chat_templates import MAX_TEMPLATE_CHARS, template_origin
from .checks import is_int
from .errors import InputError, TokenizerError


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
        elif is_int(value) and _bits(value) > self.budget.int_bits:
            raise OverBudget(f"an integer of {_bits(value)} bits, more than {self.budget.int_bits}")
        return value


_METER: ContextVar[_Meter | None] = ContextVar("npllama_template_meter", default=None)


def _meter() -> _Meter:
    meter = _METER.get()
    if meter is None:                 # a filter folded at compile time: leave it to run time
        raise RuntimeError("a chat template hook runs only while rendering")
    return meter


def _bits(x) -> int:
    return abs(int(x)).bit_length() if is_int(x) else 0


def _sized(x) -> bool:
    return isinstance(x, (str, list, tuple))


def _check_format(meter: _Meter, fmt: str, args) -> None:
    """A %- or {}-format cannot ask for a width or precision larger than a value may be."""
    for number in re.findall(r"\d+", fmt):
        if len(number) > 9 or int(number) > meter.budget.value_chars:
            raise OverBudget(f"a format width or precision of {number[:12]}, more than {meter.budget.value_chars}")
    for a in args:
        if is_int(a) and abs(a) > meter.budget.value_chars:
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
            if (is_int(indent) or isinstance(indent, str)) and \
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
