"""Chat: conversations rendered with the model's chat template, answered with a reused KV cache.

The template (npllama.chat_templates) turns the messages into text, rendered in a budgeted
sandbox (npllama.chat_sandbox); the model answers until it writes the end-of-turn token.

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

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

from .chat_sandbox import render_template
from .chat_templates import chat_template_for, special_token_variables
from .checks import is_int
from .errors import InputError
from .generate import CONTEXT_FULL, INTERRUPTED, MAX_NEW_TOKENS, STOP_TOKEN, generate, stream_text
from .rope_scaling import context_window
from .sampling import SamplingSettings


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
    stopped     why the answer ended, in generate's words: STOP_TOKEN (the end of the turn),
                MAX_NEW_TOKENS, CONTEXT_FULL (no room was left for more) or INTERRUPTED
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
    check_turn(prompt, reused): called before a turn's prefill with its prompt's length and the
    positions the cache reuses; may refuse the turn (an InputError: nothing changes).
    seed: turn t samples with seed + t (None: fresh randomness).
    """

    def __init__(self, model, system: str | None = None, settings: SamplingSettings = SamplingSettings(),
                 seed: int | None = None, max_new_tokens: int = 256, *,
                 generate_fn: Callable | None = None, template: str | None = None,
                 max_seq_len: int | None = None, on_drop: Callable[[int], None] | None = None,
                 check_turn: Callable[[int, int], None] | None = None):
        if model.tokenizer is None:
            raise InputError("this checkpoint has no tokenizer, so it cannot chat; load one that ships a tokenizer")
        if not is_int(max_new_tokens) or max_new_tokens < 1:
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
        self.check_turn = check_turn
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
        before = list(self.messages)
        self.messages.append({"role": "user", "content": message})
        try:
            ids, dropped = self._fit()
            # Reuse the cache up to the first token that differs; at least one token must be fed.
            keep = min(_common_prefix(self.cached_ids, ids), len(ids) - 1)
            if self.check_turn is not None:
                self.check_turn(len(ids), keep)
        except BaseException:
            self.messages[:] = before
            raise
        if dropped and self.on_drop is not None:
            self.on_drop(dropped)
        self.cache.truncate(keep)
        del self.cached_ids[keep:]
        answer: list[int] = []
        stats = TurnStats(reused=keep, prefilled=len(ids) - keep, dropped=dropped, stopped=INTERRUPTED,
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
            stats.stopped = (STOP_TOKEN if answer and answer[-1] in stops
                             else CONTEXT_FULL if full else MAX_NEW_TOKENS)
        finally:
            pieces.close()
            tokens.close()
            # The cache holds the prompt and the answer except its last token (never fed back),
            # or less when a forward pass was interrupted: trust its length.
            self.cached_ids = (ids + answer)[: self.cache.length]
            text = self.tokenizer.decode([t for t in answer if t not in stops])
            if text or stats.stopped != INTERRUPTED:
                self.messages.append({"role": "assistant", "content": text})
            else:                                  # stopped before a word: the turn never happened
                self.messages.pop()
            stats.generated = len(answer)
            stats.seconds = time.perf_counter() - start

    def ask(self, message: str) -> str:
        """send() and return the whole answer."""
        return "".join(self.send(message))
