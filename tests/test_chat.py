"""Chat: templates against transformers' apply_chat_template and Meta's formats, the session's
KV-cache reuse, context overflow, interruption, the Torch backend, and `npllama chat` in a real
pseudo-terminal with the default model."""

import os
import re
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import npllama
from npllama.chat import ChatSession, end_of_turn_ids, render_prompt
from npllama.chat_sandbox import render_template
from npllama.chat_templates import CHATML, LLAMA2, LLAMA3, builtin_template_for, special_token_variables
from npllama.errors import InputError
from npllama.generate import CONTEXT_FULL, INTERRUPTED, MAX_NEW_TOKENS, generate
from npllama.tokenizer import Tokenizer
from npllama.weights import default_model_path

REPO = Path(__file__).resolve().parent.parent
QUESTION = "What is the capital of France?"
FOLLOW_UP = "Which city did you name?"      # alone, SmolLM2 does not say Paris; after QUESTION it does

CONVERSATIONS = [
    [{"role": "user", "content": QUESTION}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": QUESTION}],
    [{"role": "system", "content": "  Be brief. "}, {"role": "user", "content": "Hi!\n"},
     {"role": "assistant", "content": " Hello. How can I help? "}, {"role": "user", "content": "Capital of Japan?"}],
    [{"role": "user", "content": "Zürich ou 東京? 😀"}, {"role": "assistant", "content": "東京."},
     {"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Because."},
     {"role": "user", "content": "Thanks"}],
]


# ---------------------------------------------------------------------------------- references
# The formats written out from their sources, independently of any Jinja.
def meta_llama2(dialog):
    """Meta's llama generation.py chat_completion, as text (bos/eos spelled <s> </s>)."""
    if dialog[0]["role"] == "system":
        dialog = [{"role": dialog[1]["role"], "content": "<<SYS>>\n" + dialog[0]["content"] + "\n<</SYS>>\n\n"
                   + dialog[1]["content"]}] + dialog[2:]
    text = "".join(f"<s>[INST] {q['content'].strip()} [/INST] {a['content'].strip()} </s>"
                   for q, a in zip(dialog[::2], dialog[1::2]))
    if len(dialog) % 2:
        text += f"<s>[INST] {dialog[-1]['content'].strip()} [/INST]"
    return text


def meta_llama3(dialog, add_generation_prompt=True):
    """Meta's llama3 ChatFormat.encode_dialog_prompt, as text."""
    text = "<|begin_of_text|>" + "".join(
        f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>" for m in dialog)
    return text + ("<|start_header_id|>assistant<|end_header_id|>\n\n" if add_generation_prompt else "")


def chatml(dialog, add_generation_prompt=True):
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in dialog)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


FAMILIES = {  # name: (template, bos, eos, reference, end-of-turn token)
    "llama2": (LLAMA2, "<s>", "</s>", lambda d, g: meta_llama2(d), "</s>"),
    "llama3": (LLAMA3, "<|begin_of_text|>", "<|end_of_text|>", meta_llama3, "<|eot_id|>"),
    "chatml": (CHATML, None, "<|im_end|>", chatml, "<|im_end|>"),
}
SPECIALS = ["<unk>", "<s>", "</s>", "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>", "<|im_start|>", "<|im_end|>"]


def family_tokenizers(tmp_path, family):
    """The same small vocabulary as a transformers tokenizer and as an npllama Tokenizer."""
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    _, bos, eos, _, eot = FAMILIES[family]
    specials = [t for t in SPECIALS if family == "llama2" and t in ("<unk>", "<s>", "</s>")
                or family == "llama3" and ("header" in t or t in ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"))
                or family == "chatml" and t in ("<|im_start|>", "<|im_end|>")]
    tok = HFTokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(specials)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos)
    path = tmp_path / f"{family}.json"
    tok.save(str(path))
    ours = Tokenizer.from_tokenizer_json(path, bos_id=tok.token_to_id(bos) if bos else None,
                                         eos_ids=[tok.token_to_id(eos)], add_bos=False)
    return hf, ours, tok.token_to_id(eot)


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("families")
    return {f: family_tokenizers(tmp, f) for f in FAMILIES}


def hf_render(hf, template, messages, add_generation_prompt=True):
    return hf.apply_chat_template(messages, chat_template=template, tokenize=False,
                                  add_generation_prompt=add_generation_prompt)


# ---------------------------------------------------------------------------------- built-ins
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_builtin_templates_match_transformers_and_the_reference_format(families, family, conversation,
                                                                       add_generation_prompt):
    template, *_, reference, _ = FAMILIES[family]
    hf, ours, _ = families[family]
    messages = CONVERSATIONS[conversation]
    text = render_template(template, messages, add_generation_prompt=add_generation_prompt,
                           **special_token_variables(ours))
    assert text == hf_render(hf, template, messages, add_generation_prompt)
    assert text == reference(messages, add_generation_prompt)


content = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)


@settings(deadline=None, max_examples=40)
@given(family=st.sampled_from(list(FAMILIES)), system=st.none() | content,
       turns=st.lists(st.tuples(content, content), min_size=0, max_size=3), last=content)
def test_builtin_templates_match_transformers_on_drawn_conversations(families, family, system, turns, last):
    template, *_, reference, _ = FAMILIES[family]
    hf, ours, _ = families[family]
    messages = [{"role": "system", "content": system}] if system is not None else []
    for q, a in turns:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    messages.append({"role": "user", "content": last})
    text = render_template(template, messages, **special_token_variables(ours))
    assert text == hf_render(hf, template, messages)
    assert text == reference(messages, True)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_end_of_turn_token_comes_from_the_template_and_the_family_is_recognised(families, family):
    template, *_ = FAMILIES[family]
    hf, ours, eot = families[family]
    assert eot in end_of_turn_ids(ours, template)
    assert set(ours.eos_ids) <= set(end_of_turn_ids(ours, template))
    assert builtin_template_for(ours) == family


def test_render_prompt_leaves_bos_to_a_tokenizer_that_adds_it(tmp_path):
    from types import SimpleNamespace

    hf, ours, _ = family_tokenizers(tmp_path, "llama2")
    ours.add_bos = True                                    # SentencePiece convention: encode() adds <s>
    model = SimpleNamespace(tokenizer=ours, config=None)
    text, stops = render_prompt(model, "hi there", system="sys")
    ids = hf.apply_chat_template([{"role": "system", "content": "sys"}, {"role": "user", "content": "hi there"}],
                                 chat_template=LLAMA2, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ours.encode(text) == list(ids)                  # one BOS, not two
    assert stops == (ours.token_to_id("</s>"),)


def test_llama2_refuses_a_conversation_that_does_not_alternate(families):
    _, ours, _ = families["llama2"]
    with pytest.raises(InputError, match="alternate"):
        render_template(LLAMA2, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
                        **special_token_variables(ours))


def test_sandbox_and_template_helpers():
    # tojson leaves non-ASCII alone (transformers' override), loop controls and generation blocks parse.
    t = ("{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m | tojson }}{% endfor %}"
         "{% generation %}x{% endgeneration %}")
    assert render_template(t, [{"role": "user", "content": "é"}, {"role": "user", "content": "b"}]) == \
        '{"role": "user", "content": "é"}x'
    with pytest.raises(InputError, match="refused"):
        render_template("{{ messages.__class__.__mro__ }}", [{"role": "user", "content": "a"}])
    with pytest.raises(npllama.TokenizerError, match="cannot be parsed"):
        render_template("{% for %}", [{"role": "user", "content": "a"}])


# ---------------------------------------------------------------------------------- the default model
@pytest.fixture(scope="module")
def model():
    return npllama.load(progress=False)


@pytest.fixture(scope="module")
def hf_tokenizer():
    transformers = pytest.importorskip("transformers")
    path = default_model_path()
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_default_model_template_matches_transformers(model, hf_tokenizer, conversation):
    tok = model.tokenizer
    assert tok.chat_template == hf_tokenizer.chat_template
    messages = CONVERSATIONS[conversation]
    for add in (True, False):
        text = render_template(tok.chat_template, messages, add_generation_prompt=add,
                               **special_token_variables(tok))
        assert text == hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add)
        ids = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=add, return_dict=True)["input_ids"]
        assert tok.encode(text, add_bos=False) == list(ids)
    # the built-in ChatML with this tokenizer, too
    text = render_template(CHATML, messages, **special_token_variables(tok))
    ids = hf_tokenizer.apply_chat_template(messages, chat_template=CHATML, add_generation_prompt=True,
                                           return_dict=True)["input_ids"]
    assert tok.encode(text, add_bos=False) == list(ids)


def test_render_prompt_gives_transformers_ids_and_the_end_of_turn_token(model, hf_tokenizer):
    text, stops = render_prompt(model, QUESTION, system="Be brief.")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}]
    ids = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert model.tokenizer.encode(text) == list(ids)
    assert hf_tokenizer.convert_tokens_to_ids("<|im_end|>") in stops


class CountingModel:
    """The model, with a record of every ids array it is called on (everything else passes through)."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, ids, cache=None, **kwargs):
        self.calls.append(np.asarray(ids).reshape(-1).tolist())
        return self.model(ids, cache=cache, **kwargs)


def test_second_turn_reads_only_the_new_tokens(model):
    counting = CountingModel(model)
    session = ChatSession(counting, max_new_tokens=24)
    first_answer = session.ask(QUESTION)
    assert "Paris" in first_answer
    first_turn_tokens = list(session.cached_ids)          # prompt 1 + answer 1 (minus its stop token)
    assert len(first_turn_tokens) == session.last_turn.prefilled + session.last_turn.generated - 1
    counting.calls.clear()
    second_answer = session.ask(FOLLOW_UP)
    ids = session.prompt_ids()[: session.last_turn.reused + session.last_turn.prefilled]
    read = [t for call in counting.calls for t in call]
    # turn 2 ran exactly: the tokens after turn 1's, then one call per generated token
    assert session.last_turn.reused == len(first_turn_tokens)
    assert ids[: len(first_turn_tokens)] == first_turn_tokens
    assert counting.calls[0] == ids[len(first_turn_tokens):]
    assert all(len(c) == 1 for c in counting.calls[1:])
    assert len(read) == len(ids) - len(first_turn_tokens) + session.last_turn.generated - 1
    # ... and reusing the cache does not change the answer: a fresh session given the history agrees
    fresh = ChatSession(model, max_new_tokens=24)
    fresh.messages = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": first_answer}]
    assert fresh.ask(FOLLOW_UP) == second_answer
    assert fresh.last_turn.reused == 0
    assert "Paris" in second_answer


# ---------------------------------------------------------------------------------- a tiny model
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny Llama with a BPE tokenizer and a ChatML template, saved as a Hugging Face folder."""
    pytest.importorskip("torch")
    from tiny import random_llama, save_hf, tiny_config, train_bpe

    folder = tmp_path_factory.mktemp("tiny_chat")
    save_hf(random_llama(tiny_config(max_seq_len=128)), folder, tokenizer=train_bpe())
    return folder, npllama.load(folder, progress=False)


def cache_holds(session, model):
    """The session's cache holds exactly the keys/values of session.cached_ids."""
    n = len(session.cached_ids)
    assert session.cache.length == n
    if n == 0:
        return
    fresh = model.new_cache(1)
    model(np.array([session.cached_ids]), cache=fresh)
    for layer in range(model.config.n_layers):
        np.testing.assert_allclose(session.cache.k[layer][:, :, :n], fresh.k[layer][:, :, :n], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(session.cache.v[layer][:, :, :n], fresh.v[layer][:, :, :n], rtol=1e-4, atol=1e-5)


def test_overflow_drops_the_oldest_turns_and_says_so(tiny):
    _, model = tiny
    drops = []
    session = ChatSession(model, system="sys", max_new_tokens=12, max_seq_len=96, on_drop=drops.append)
    for i in range(8):
        session.ask(f"the model {i} is the value of the cache")
        assert len(session.prompt_ids()) <= session.window
        cache_holds(session, model)
        if session.last_turn.dropped:
            break
    assert drops and drops[-1] == session.last_turn.dropped
    assert session.history[0] == {"role": "system", "content": "sys"}
    assert session.history[1]["content"] != "the model 0 is the value of the cache"   # the oldest went first
    assert session.history[-2]["content"] == f"the model {i} is the value of the cache"
    assert session.last_turn.reused > 0                  # the system prompt's tokens stayed cached
    with pytest.raises(InputError, match="too long"):
        session.ask("word " * 200)
    assert session.history[-2]["content"] == f"the model {i} is the value of the cache"   # refused, not kept


def test_interrupted_answer_is_kept_and_the_cache_stays_consistent(tiny):
    _, model = tiny
    session = ChatSession(model, max_new_tokens=20)
    pieces = session.send("the capital of France")
    got = next(pieces) + next(pieces)
    pieces.close()                                         # what Ctrl-C does in the terminal
    assert session.last_turn.stopped == INTERRUPTED
    assert session.history[-1] == {"role": "assistant", "content": got}
    cache_holds(session, model)
    session.ask("and then?")
    assert session.last_turn.reused > 0
    cache_holds(session, model)
    session.reset()
    assert session.history == []
    session.set_system("be brief")
    session.ask("hello")
    assert session.history[0]["content"] == "be brief"
    cache_holds(session, model)


def test_a_turn_stops_for_the_reason_generate_gives(tiny):
    """TurnStats.stopped and Generation.stopped speak the same words: the session's reason is the
    generation's own, whichever way the answer ended."""
    _, model = tiny
    generations = []

    def recording(*args, **kwargs):
        generations.append(generate(*args, **kwargs))
        return generations[-1]
    for n, window, reason in ((3, None, MAX_NEW_TOKENS), (40, 60, CONTEXT_FULL)):
        session = ChatSession(model, max_new_tokens=n, max_seq_len=window, generate_fn=recording, seed=0)
        session.ask("the capital of France")
        if session.last_turn.answer_ids[-1] not in session.stop_ids:     # a random model may end its turn
            assert generations[-1].stopped[0] == reason
        assert session.last_turn.stopped == generations[-1].stopped[0]


def test_torch_backend_chats_like_numpy(tiny):
    parity = pytest.importorskip("parity")
    from parity.generate import generate as torch_generate

    _, model = tiny
    ours = ChatSession(model, max_new_tokens=10, max_seq_len=128)
    twin = ChatSession(parity.from_numpy(model), max_new_tokens=10, max_seq_len=128, generate_fn=torch_generate)
    for message in ("the capital of France", "and the river?"):
        assert twin.ask(message) == ours.ask(message)
        assert (twin.last_turn.reused, twin.last_turn.prefilled) == (ours.last_turn.reused, ours.last_turn.prefilled)
    assert twin.last_turn.reused > 0


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_chat_command_reads_lines_and_commands(tiny, backend):
    if backend == "torch":
        pytest.importorskip("parity")
    from click.testing import CliRunner

    from npllama.cli import main

    folder, _ = tiny
    result = CliRunner().invoke(main, ["chat", "-m", str(folder), "--backend", backend, "-n", "5", "--stats",
                                       "--system", "hi"],
                                input="the capital\n/system be brief\n/reset\n/nope\nthe river\n/quit\n")
    assert result.exit_code == 0, result.output
    assert result.output.count(" generated in ") == 2       # the --stats lines (not the timing line)
    assert "[new conversation]" in result.output and "unknown command '/nope'" in result.output


def test_check_turn_sees_each_turns_prompt_and_reuse_and_a_refusal_changes_nothing(tiny):
    _, model = tiny
    seen, refuse = [], []

    def check(prompt, reused):
        seen.append((prompt, reused))
        if refuse:
            raise InputError("no room")
    session = ChatSession(model, max_new_tokens=4, max_seq_len=128, seed=0, check_turn=check)
    session.ask("the capital of France")
    history, cached = session.history, list(session.cached_ids)
    refuse.append(True)
    with pytest.raises(InputError, match="no room"):
        session.ask("and the river?")
    assert session.history == history and session.cached_ids == cached
    assert seen[0][1] == 0 and seen[1][1] > 0 and seen[1][0] == len(session.tokenizer.encode(
        render_template(session.template, [*history, {"role": "user", "content": "and the river?"}],
                        add_generation_prompt=True, **session._variables), add_bos=False))


def test_a_ctrl_c_python_dropped_stops_that_answer_and_not_the_next(tiny, monkeypatch, capsys):
    """A press whose KeyboardInterrupt was dropped (npllama.cli.interrupts) stops the answer being
    written at its next piece; the press is then spent, and the next answer runs."""
    from npllama.cli.chat import converse
    from npllama.cli.interrupts import Presses

    _, model = tiny
    session = ChatSession(model, max_new_tokens=6, max_seq_len=128)
    lines = iter(["the capital of France", "and the river?", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt: next(lines))
    pressed = Presses()
    pressed.count = 1
    converse(session, True, pressed)
    out = capsys.readouterr()
    assert out.out.count("[stopped]") == 1 and not pressed()
    assert out.err.count(" generated in ") == 2 and session.last_turn.stopped in ("stop token", "max_new_tokens")


def test_chat_command_says_when_the_context_window_cut_an_answer(tiny):
    from click.testing import CliRunner

    from npllama.cli import main

    folder, _ = tiny
    result = CliRunner().invoke(main, ["chat", "-m", str(folder), "--context", "30", "-n", "200", "-q"],
                                input="the\n/quit\n")
    assert result.exit_code == 0, result.output
    assert "the context window of 30 tokens is full" in result.stderr
    assert "of 200 tokens" in result.stderr


# ---------------------------------------------------------------------------------- the terminal
def test_npllama_chat_in_a_pseudo_terminal():
    pexpect = pytest.importorskip("pexpect")
    default_model_path()                                   # fetched before the clock starts
    env = dict(os.environ, TERM="dumb", PYTHONUNBUFFERED="1")
    # -n 256: the story below must still be streaming when Ctrl-C arrives (64 tokens take ~1 s).
    # Started with SIGINT ignored, as a test runner's worker may pass it on: Ctrl-C must work anyway.
    child = pexpect.spawn(sys.executable, ["-m", "npllama.cli", "chat", "-n", "256", "--quiet"], cwd=str(REPO),
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
                          env=env, encoding="utf-8", timeout=120, dimensions=(40, 200))
    try:
        prompt = re.escape(">>> ")
        child.expect(prompt)
        child.sendline(QUESTION)
        child.expect(prompt)
        first = child.before.split(QUESTION, 1)[-1]
        assert "Paris" in first, first
        child.sendline(FOLLOW_UP)                          # answerable only from the first turn
        child.expect(prompt)
        second = child.before.split(FOLLOW_UP, 1)[-1]
        assert "Paris" in second, second
        # Ctrl-C stops an answer, not the program
        child.sendline("Write a long story about a dragon who learns to cook.")
        child.expect(r"cook\.\r?\n")
        child.expect(r"\w+ \w+")                           # the answer has started
        child.sendintr()
        child.expect(re.escape("[stopped]"))
        child.expect(prompt)
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before
