"""Hostile inputs, second round: every member of each class ends in one clear NpllamaError, bounded in time and memory.

The classes (docs/errors.md describes each with its message):

 1. state        a refused file leaves no trace: a good model loads to identical logits after it
 2. arithmetic   offsets, sizes and counts that wrap around 2**64 are refused, in exact integers
 3. amplification  small files cannot cost large work: aliasing tensors, views of one storage, huge
                 unused metadata, no-op pickles, long tokens
 4. templates    chat templates render within a budget, and every failure names where the template came from
 5. types        wrong types and zeros in configs and metadata, JSON nested thousands deep
 6. overflow     finite weights that overflow float32 are an error at run time, in both backends
 7. not files    FIFOs and devices are refused, never read
 8. command line --seed, text that is not UTF-8, eval's counts, outputs that cannot be written,
                 terminal controls quoted from a file (shown escaped)
 9. tokenizers   convert carries the tokenizer; a model without one, or with a short one, says so at load
10. leftovers    a later run removes what a killed one left; pruning never leaves a partial step
11. outputs      writers replace only a regular file (a folder, for folder writers) or nothing, follow
                 symbolic links, and name what they refuse before the model loads
12. bounded work prompts files split at newlines only; a prompt that cannot fit is refused before
                 tokenizing (the bound holds for every normalizer drawn); --prompts in batches
                 within a memory budget

Hypothesis draws the members (derandomized, a fixed number of examples, no shrinking, as in
tests/test_fuzz.py), small enough that the whole module runs in well under a minute. The tests
assert behaviour and bounded sizes (tracemalloc peaks), never speed: a hang fails through the
module's alarm, and the time and memory of the full-size cases of class 3 are measured in
bench/bench_hostile.py.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, Phase, assume, given, settings, strategies as st

import npllama
from npllama.cli import main
from tiny import ARRAY, BOOL, FLOAT32, INT32, STRING, UINT32, gguf_bytes, gguf_spec, pack, set_kv
from npllama.errors import CheckpointError, ConfigError, InputError, NpllamaError, TokenizerError

REPO = Path(__file__).resolve().parent.parent


def examples(n: int):
    """Derandomized Hypothesis settings: the same n examples in every run, no shrinking, no deadline."""
    return settings(max_examples=n, derandomize=True, database=None, deadline=None,
                    phases=[Phase.explicit, Phase.generate],
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large, HealthCheck.large_base_example])


pytestmark = pytest.mark.usefixtures("no_hang")   # conftest.py: a hang fails the test after 60 s


def load(path):
    return npllama.load(path, progress=False)


def refused(path, error: type = NpllamaError, words: str = "") -> NpllamaError:
    """Loading path raises ``error`` whose message names the path and matches ``words``."""
    with pytest.raises(error) as info:
        load(path)
    message = str(info.value)
    assert Path(path).name in message, message
    assert re.search(words, message), message
    assert "\n" not in message and "Traceback" not in message, message
    return info.value


# ------------------------------------------------------------------------------------ tiny checkpoints
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One tiny model (GQA, 1 layer, vocabulary of 300) in the three formats, and its logits."""
    from tiny import gguf_vocab_from_bpe, random_llama, save_gguf, save_hf, save_meta, tiny_config, train_bpe

    root = tmp_path_factory.mktemp("hostile")
    cfg = tiny_config(vocab_size=300, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=42, max_seq_len=32)
    model = random_llama(cfg, seed=5)
    tok = train_bpe(300)
    paths = {"root": root, "hf": save_hf(model, root / "hf", tokenizer=tok),
             "meta": save_meta(model, root / "meta", sp_model=None, multiple_of=2, write_vocab_size=True),
             "gguf": save_gguf(model, root / "tiny.gguf", vocab=gguf_vocab_from_bpe(tok))}
    paths["logits"] = load(paths["meta"])([[1, 2, 3, 4]])
    paths["spec"] = gguf_spec(paths["gguf"])
    return paths


def fresh(tiny, what: str, name: str) -> Path:
    """A scratch copy of one pristine checkpoint (files or folders), named ``name``."""
    dest = tiny["root"] / name
    if dest.is_dir() and not dest.is_symlink():
        shutil.rmtree(dest)
    elif os.path.lexists(dest):
        dest.unlink()
    (shutil.copytree if tiny[what].is_dir() else shutil.copyfile)(tiny[what], dest)
    return dest


def test_the_gguf_writer_of_these_tests_writes_what_npllama_reads(tiny):
    path = tiny["root"] / "rewritten.gguf"
    path.write_bytes(gguf_bytes(*tiny["spec"]))
    # Bit for bit on any host: the same weights through the same code and shapes in one process
    np.testing.assert_array_equal(load(path)([[1, 2, 3, 4]]), load(tiny["gguf"])([[1, 2, 3, 4]]))


# --- torch.save zips
def data_pkl(path: Path) -> tuple[str, bytes]:
    with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if n.endswith("/data.pkl"))
        return name, z.read(name)


def replace_member(path: Path, member: str, payload: bytes) -> None:
    with zipfile.ZipFile(path) as z:
        entries = [(i.filename, z.read(i)) for i in z.infolist()]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, content in entries:
            z.writestr(name, payload if name == member else content)
    path.write_bytes(buf.getvalue())


# ==================================================================================== 1. state
ALLOWED = ["torch\nFloatStorage", "torch\nBFloat16Storage", "torch\nHalfStorage", "torch\nLongStorage",
           "torch._utils\n_rebuild_tensor_v2", "torch._utils\n_rebuild_parameter", "collections\nOrderedDict"]
ATTRS = ["name", "dtype", "kind", "array", "source", "views", "copied", "__class__", "__call__", "__defaults__",
         "__kwdefaults__", "__dict__", "x"]
VALUES = st.sampled_from(["BFloat16Storage", "FloatStorage", "<u2", "<f4", 0, 1, -1, None, "", 2.5, (), (1,)])


@st.composite
def build_state(draw):
    """What a BUILD opcode sets: a dict of attributes, or (dict, slot dict) as pickle's protocol allows."""
    attrs = draw(st.dictionaries(st.sampled_from(ATTRS), VALUES, min_size=1, max_size=3))
    return draw(st.sampled_from([attrs, (None, attrs), (attrs, attrs)]))


def build_opcodes(target: str, state) -> bytes:
    """Pickle opcodes that push ``target`` (a global, or a storage record) and BUILD ``state`` on it."""
    if target == "storage record":
        push = b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x04tQ"
    else:
        push = b"c" + target.encode() + b"\n"
    return push + pickle.dumps(state, protocol=2)[2:-1] + b"b0"     # ... BUILD, POP


@examples(40)
@given(target=st.sampled_from(ALLOWED + ["storage record"]), state=build_state(), then=st.sampled_from(["load", "stop"]))
def test_a_refused_pickle_leaves_no_trace_in_the_process(tiny, target, state, then):
    """BUILD on a stand-in (or a storage record) is refused, and the next .pth loads to identical logits."""
    folder = fresh(tiny, "meta", "state")
    pth = folder / "consolidated.00.pth"
    member, pkl = data_pkl(pth)
    rest = pkl[2:] if then == "load" else b"N."                       # the real state dict after the attack
    replace_member(pth, member, b"\x80\x02" + build_opcodes(target, state) + rest)
    with pytest.raises(NpllamaError):
        load(folder)
    # Bit for bit on any host: the same file, the same code and shapes, in the same process as tiny["logits"]
    np.testing.assert_array_equal(load(tiny["meta"])([[1, 2, 3, 4]]), tiny["logits"])


def test_the_stand_ins_are_fresh_for_every_load_and_refuse_changes():
    from npllama.formats.torch_save import allowed_globals

    first, second = allowed_globals("a"), allowed_globals("b")
    assert all(first[k] is not second[k] for k in first)
    storage = first[("torch", "FloatStorage")]
    with pytest.raises(CheckpointError, match="refusing"):
        storage.name = "BFloat16Storage"
    with pytest.raises(CheckpointError, match="refusing"):
        storage.__setstate__({"dtype": "<u2"})
    assert storage.name == "FloatStorage" and storage.dtype == np.dtype("<f4")


# ==================================================================================== 2. arithmetic
def part_offset(path: Path, *, key: str | None = None, tensor: str | None = None, part: int) -> tuple[int, int]:
    import gguf

    r = gguf.GGUFReader(path, "r")
    base = r.data.__array_interface__["data"][0]
    field = r.fields[key] if key is not None else next(t.field for t in r.tensors if t.name == tensor)
    p = field.parts[part]
    return p.__array_interface__["data"][0] - base, p.nbytes


@st.composite
def wrapping_edit(draw, path: Path):
    """One field of the pristine GGUF set to a value that wraps around 2**64 when a reader adds or multiplies
    in uint64: a tensor offset that lands in the header, dimensions whose product is 0 mod 2**64, an array
    count whose byte size is 0 mod 2**64, a string length that wraps the offset."""
    import gguf

    r = gguf.GGUFReader(path, "r")
    tensor = draw(st.sampled_from([t.name for t in r.tensors]))
    kind = draw(st.sampled_from(["offset", "dims", "array", "string"]))
    if kind == "offset":
        where, width = part_offset(path, tensor=tensor, part=5)
        value = 2 ** 64 - r.data_offset + draw(st.integers(0, r.data_offset - 1))
        return [(where, width, value)], f"{tensor} offset wraps into byte {value - 2 ** 64 + r.data_offset}"
    if kind == "dims":
        where, width = part_offset(path, tensor=tensor, part=3)
        if width < 16:
            where, width = part_offset(path, tensor="token_embd.weight", part=3)
        a = draw(st.sampled_from([2 ** 32, 2 ** 33, 2 ** 63, 2 ** 62]))
        return [(where, 8, a), (where + 8, 8, 2 ** 64 // a)], f"dims {a} x {2 ** 64 // a}"
    if kind == "array":
        key, item_size = draw(st.sampled_from([("tokenizer.ggml.token_type", 4), ("tokenizer.ggml.merges", 8),
                                               ("tokenizer.ggml.tokens", 8)]))
        where, width = part_offset(path, key=key, part=4)
        return [(where, width, 2 ** 64 // item_size + draw(st.integers(0, 3)))], f"{key} count wraps"
    key = draw(st.sampled_from(["general.architecture", "tokenizer.ggml.model", "tokenizer.chat_template"]))
    where, width = part_offset(path, key=key, part=3)
    return [(where, width, 2 ** 64 - draw(st.integers(1, 4096)))], f"{key} length wraps"


@examples(40)
@given(data=st.data())
def test_gguf_offsets_sizes_and_counts_that_wrap_around_are_refused(tiny, data):
    edits, what = data.draw(wrapping_edit(tiny["gguf"]), label="edit")
    raw = bytearray(tiny["gguf"].read_bytes())
    for where, width, value in edits:
        raw[where:where + width] = value.to_bytes(width, "little")
    path = tiny["root"] / "wrap.gguf"
    path.write_bytes(bytes(raw))
    refused(path, CheckpointError)


# ==================================================================================== 3. amplification
@examples(25)
@given(shift=st.integers(0, 15), movers=st.lists(st.integers(0, 20), min_size=1, max_size=5, unique=True))
def test_gguf_tensors_that_share_bytes_are_refused(tiny, shift, movers):
    """Some tensors moved into the bytes of the largest one (shifted by a few floats): refused before any
    tensor is decoded."""
    kv, tensors = tiny["spec"]
    _, packed = pack(tensors)
    big = max(range(len(tensors)), key=lambda i: len(tensors[i][3]))
    others = [i for i in range(len(tensors)) if i != big]
    moved = {others[m % len(others)] for m in movers}                # at least one
    offsets = [packed[big] + 4 * shift if i in moved else o for i, o in enumerate(packed)]
    path = tiny["root"] / "alias.gguf"
    path.write_bytes(gguf_bytes(kv, tensors, offsets))
    refused(path, CheckpointError, "share data; GGUF tensors never overlap")


def test_thousands_of_gguf_entries_aliasing_one_block_cost_nothing(tiny):
    """The reported case in small: 2000 tensor entries on one block are refused before any is decoded."""
    kv, tensors = tiny["spec"]
    block = tensors[0]
    many = tensors + [(f"blk.{i}.ffn_down.weight", block[1], block[2], block[3]) for i in range(2000)]
    path = tiny["root"] / "alias2000.gguf"
    path.write_bytes(gguf_bytes(kv, many, [0] * len(many), data=pack(tensors)[0]))
    tracemalloc.start()
    try:
        refused(path, CheckpointError, "share data")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20, f"{peak >> 20} MiB to refuse it"


@examples(20)
@given(views=st.lists(st.tuples(st.integers(0, 40), st.integers(1, 8)), min_size=1, max_size=40))
def test_pth_views_of_one_storage_hold_at_most_twice_its_elements(tmp_path_factory, views):
    """Views of one tensor load as torch made them, until together they would hold more than twice its
    elements; then the file is refused (3000 views of one storage filled 8 GB)."""
    import torch

    from npllama.formats.torch_save import read_torch_zip

    base = torch.arange(48, dtype=torch.float32)
    sd = {f"v{i}": base[start:start + n] for i, (start, n) in enumerate(views)}
    sd["same"] = base[3:9]
    sd["same2"] = base[3:9]                                     # the same view twice: one array, no cost
    path = tmp_path_factory.mktemp("views") / "x.pth"
    torch.save(sd, path)
    held = sum(t.numel() for k, t in sd.items() if k != "same2")
    if held > 2 * base.numel():
        with pytest.raises(CheckpointError, match="more than 2 times over"):
            read_torch_zip(path)
    else:
        got = read_torch_zip(path)
        for name, t in sd.items():
            # the bytes of the file, read back: no arithmetic
            np.testing.assert_array_equal(got[name], t.numpy())
        assert got["same"] is got["same2"]


def empty_strings(count: int) -> bytes:
    """An encoded GGUF array of ``count`` empty strings (8 bytes each)."""
    return struct.pack("<IQ", STRING, count) + bytes(8 * count)


@examples(4)
@given(n=st.sampled_from([10_000, 100_000, 300_000]))
def test_metadata_npllama_does_not_read_is_skipped_not_built(tiny, n):
    """n empty strings under a key npllama does not read load in little memory (gguf's reader built two
    numpy views, 1.5 kB, per string: 7.7 GB for 5 million)."""
    kv, tensors = tiny["spec"]
    path = tiny["root"] / "unused.gguf"
    path.write_bytes(gguf_bytes(kv + [("hostile.unused.list", ARRAY, empty_strings(n))], tensors))
    tracemalloc.start()
    try:
        model = load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Bit for bit on any host: the same weights (unused metadata aside) through the same code and shapes
    np.testing.assert_array_equal(model([[1, 2, 3, 4]]), load(tiny["gguf"])([[1, 2, 3, 4]]))
    assert peak < 24 << 20, f"{peak >> 20} MiB for {n} unused strings"


@examples(3)
@given(extra=st.integers(1, 1 << 20))
def test_more_strings_than_any_vocabulary_has_are_refused_before_parsing(tiny, extra):
    from npllama.formats.gguf_reader import MAX_STRINGS

    kv, tensors = tiny["spec"]
    path = tiny["root"] / "manystrings.gguf"
    kv = [(k, t, empty_strings(MAX_STRINGS + extra) if k == "tokenizer.ggml.merges" else v) for k, t, v in kv]
    path.write_bytes(gguf_bytes(kv, tensors))
    refused(path, CheckpointError, f"'tokenizer.ggml.merges' says it holds {MAX_STRINGS + extra} strings")


@examples(5)
@given(n=st.sampled_from([1000, 100_000, 400_000]), op=st.sampled_from([b"N0", b"(0", b"\x88\x88\x88000"]))
def test_a_pickle_of_no_op_opcodes_is_scanned_in_constant_memory(tiny, n, op):
    folder = fresh(tiny, "meta", "noops")
    pth = folder / "consolidated.00.pth"
    member, pkl = data_pkl(pth)
    payload = b"\x80\x02" + op * n + pkl[2:]
    replace_member(pth, member, payload)
    tracemalloc.start()
    try:
        # Bit for bit on any host: the same file, the same code and shapes, in the same process
        np.testing.assert_array_equal(load(folder)([[1, 2, 3, 4]]), tiny["logits"])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * len(payload) + (16 << 20), f"{peak >> 20} MiB for a {len(payload) >> 20} MiB pickle"


def test_a_pickle_larger_than_any_state_dict_is_refused_unread(tiny):
    from npllama.formats.torch_save import MAX_PICKLE_BYTES

    folder = fresh(tiny, "meta", "bigpkl")
    member, pkl = data_pkl(folder / "consolidated.00.pth")
    replace_member(folder / "consolidated.00.pth", member, b"\x80\x02" + b"N0" * (MAX_PICKLE_BYTES // 2) + pkl[2:])
    refused(folder, CheckpointError, "more than the .* any state dict needs")


@examples(12)
@given(length=st.integers(4097, 1_500_000), model=st.sampled_from(["llama", "gpt2"]))
def test_a_token_longer_than_any_vocabulary_has_is_refused_at_once(length, model):
    from npllama.formats.gguf_vocab import gguf_tokenizer

    tokens = ["<unk>", "<s>", "</s>", "a", "b", "a" * length]
    meta = {"tokenizer.ggml.model": model, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": [0.0] * len(tokens), "tokenizer.ggml.merges": ["a b"]}
    with pytest.raises(TokenizerError, match=f"entry 5 of tokenizer.ggml.tokens is {length} characters long"):
        gguf_tokenizer(meta, Path("long.gguf"))


@examples(8)
@given(longest=st.one_of(st.integers(2, 300), st.integers(1500, 4096)))
def test_rebuilding_sentencepiece_merges_is_bounded(longest):
    """A 'llama' vocabulary of every run of 'a' up to ``longest``: each token splits longest ways, the
    rebuild costs sum(len**2); beyond MAX_SPLIT_WORK it is refused rather than run for minutes."""
    from npllama.formats.gguf_vocab import MAX_SPLIT_WORK, gguf_tokenizer

    tokens = ["<unk>", "<s>", "</s>"] + ["a" * k for k in range(1, longest + 1)]
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": [-float(len(t)) for t in tokens],
            "tokenizer.ggml.token_type": [3, 3, 3] + [1] * longest}
    work = sum(k * k for k in range(2, longest + 1))
    if work > MAX_SPLIT_WORK:
        with pytest.raises(TokenizerError, match="character splits"):
            gguf_tokenizer(meta, Path("runs.gguf"))
    else:
        tok = gguf_tokenizer(meta, Path("runs.gguf"))
        assert tok.decode(tok.encode("aaaa", add_bos=False)) == "aaaa"


# ==================================================================================== 4. templates
def tight_budget():
    """A small budget, so that a hostile template is cut short in well under a second."""
    from npllama.chat_sandbox import TemplateBudget
    return TemplateBudget(seconds=1.0, steps=50_000, value_chars=1 << 20, output_chars=1 << 22, int_bits=1024)


HUGE = st.sampled_from([10 ** 5, 10 ** 6, 10 ** 9, 10 ** 10, 2 ** 40, 10 ** 100])


@st.composite
def hostile_template(draw) -> str:
    """One construct that loops, multiplies, recurses or fails, in a little template around it."""
    n = draw(HUGE)
    kind = draw(st.sampled_from(["loops", "repeat", "range", "pow", "method", "filter", "format", "concat",
                                 "replace", "recursion", "fanout", "output", "error", "strftime", "join", "sum"]))
    body = {
        "loops": "{% for a in range(100000) %}{% for b in range(100000) %}{{ '' }}{% endfor %}{% endfor %}",
        "repeat": f"{{{{ 'x' * {n} }}}}",
        "range": f"{{{{ range({n})|list|length }}}}",
        "pow": f"{{{{ {draw(st.integers(2, 99))} ** {n} }}}}",
        "method": f"{{{{ 'x'.{draw(st.sampled_from(['ljust', 'rjust', 'center', 'zfill']))}({n}) }}}}",
        "filter": draw(st.sampled_from([f"{{{{ 'x'|center({n}) }}}}", f"{{{{ ('a\\n' * 1000)|indent({n}) }}}}",
                                        f"{{{{ [1]|batch({n}, 0)|list|length }}}}",
                                        f"{{{{ [1]|slice({n})|list|length }}}}",
                                        f"{{{{ messages|tojson(indent={n}) }}}}"])),
        "format": draw(st.sampled_from([f"{{{{ '%0{n}d' % 1 }}}}", f"{{{{ '{{:>{n}}}'.format(1) }}}}",
                                        f"{{{{ '%*d' % ({n}, 1) }}}}"])),
        "concat": "{% set ns = namespace(s='xy') %}{% for i in range(64) %}{% set ns.s = ns.s ~ (ns.s ~ ns.s) %}"
                  "{% endfor %}",
        "replace": "{% set ns = namespace(s='xx') %}{% for i in range(40) %}{% set ns.s = ns.s.replace('x', ns.s) %}"
                   "{% endfor %}",
        "recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
        "fanout": "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(60) }}",
        "output": "{% for a in range(100000) %}{% for b in range(100000) %}" + "x" * 64 + "{% endfor %}{% endfor %}",
        "error": draw(st.sampled_from(["{{ 1 + 'a' }}", "{{ 1 / 0 }}", "{{ 3 is divisibleby 0 }}", "{{ none.x.y }}",
                                       "{{ raise_exception('no') }}", "{{ ''.__class__.__mro__ }}", "{% for %}",
                                       "{{ lipsum(10) }}", "{{ messages[10 ** 9] }}", "{% if 1 %}" * 3000])),
        "strftime": f"{{{{ strftime_now('%Y' * {min(n, 10 ** 7)}) }}}}",
        "join": "{% set s = 'x' * 1000000 %}{{ s.join(s) }}{{ s|join(s) }}",
        "sum": "{{ [[1]] * 100000|sum(start=[]) }}",
    }[kind]
    prefix = draw(st.sampled_from(["", "{% for m in messages %}{{ m.content }}{% endfor %}", "{{ bos_token }}"]))
    return prefix + body


ORIGINS = ["model.gguf: tokenizer.chat_template", "--template hostile.jinja", "hf/tokenizer_config.json: chat_template",
           "hf/chat_template.jinja"]


@examples(40)
@given(source=hostile_template(), origin=st.sampled_from(ORIGINS))
def test_a_hostile_chat_template_ends_in_one_error_that_names_it_within_its_budget(source, origin):
    """Whatever the construct, the rendering ends (the module's alarm fails a hang), in bounded memory,
    with the text or with one error that starts with where the template came from."""
    from npllama.chat_sandbox import render_template
    from npllama.chat_templates import ChatTemplate

    template = ChatTemplate(source, origin)
    budget = tight_budget()
    tracemalloc.start()
    try:
        try:
            text = render_template(template, [{"role": "user", "content": "hi"}], budget=budget, bos_token="<s>")
            message = None
        except (InputError, TokenizerError) as e:
            message = str(e)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    if message is None:     # a construct small enough for the budget renders
        assert len(text) <= budget.output_chars
    else:
        assert message.startswith(origin + ": "), message
        assert "\n" not in message, message
    assert peak < 96 << 20, f"{peak >> 20} MiB: {message}"


def test_the_budget_leaves_real_templates_alone():
    """The built-in templates and a long conversation render as they did (transformers' own renderings
    are compared in tests/test_chat.py)."""
    from npllama.chat_sandbox import render_template
    from npllama.chat_templates import BUILTIN_TEMPLATES

    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i} " * 50} for i in range(400)]
    for name, template in BUILTIN_TEMPLATES.items():
        text = render_template(template, messages, bos_token="<s>", eos_token="</s>")
        assert "message 399" in text, name


def test_templates_say_where_they_come_from(tiny):
    """A failing template names its file and key: the GGUF key, tokenizer_config.json, chat_template.jinja."""
    from npllama.chat import render_prompt

    bad = "{{ 1 / 0 }}"
    kv, tensors = tiny["spec"]
    gguf = tiny["root"] / "template.gguf"
    gguf.write_bytes(gguf_bytes(set_kv(kv, "tokenizer.chat_template", STRING, bad), tensors))
    hf = fresh(tiny, "hf", "template-hf")
    (hf / "chat_template.jinja").unlink()              # it would win over tokenizer_config.json's
    cfg = json.loads((hf / "tokenizer_config.json").read_text())
    (hf / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": bad}))
    jinja = fresh(tiny, "hf", "template-jinja")
    (jinja / "chat_template.jinja").write_text(bad)
    for path, origin in ((gguf, f"{gguf}: tokenizer.chat_template"),
                         (hf, f"{hf / 'tokenizer_config.json'}: chat_template"),
                         (jinja, str(jinja / "chat_template.jinja"))):
        with pytest.raises(InputError, match=re.escape(origin) + r": the chat template failed \(ZeroDivisionError"):
            render_prompt(load(path), "hi")


def test_a_template_stored_as_a_number_is_refused_at_load(tiny):
    kv, tensors = tiny["spec"]
    path = tiny["root"] / "template-int.gguf"
    path.write_bytes(gguf_bytes(set_kv(kv, "tokenizer.chat_template", UINT32, 7), tensors))
    refused(path, TokenizerError, "tokenizer.chat_template must be a string, got 7")
    hf = fresh(tiny, "hf", "template-int-hf")
    (hf / "chat_template.jinja").unlink()
    cfg = json.loads((hf / "tokenizer_config.json").read_text())
    (hf / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": 7}))
    refused(hf, TokenizerError, r"tokenizer_config.json: chat_template must be Jinja text")


@pytest.mark.parametrize("kind", ["dev-zero", "not-utf8", "fifo", "missing"])
def test_a_template_file_that_cannot_be_read_is_one_line(tiny, kind):
    path = tiny["root"] / f"template-{kind}.jinja"
    if os.path.lexists(path):
        path.unlink()
    if kind == "dev-zero":
        path = Path("/dev/zero")
    elif kind == "not-utf8":
        path.write_bytes(b"{{ '\xff\xfe' }}")
    elif kind == "fifo":
        os.mkfifo(path)
    result = CliRunner().invoke(main, ["chat", "--model", str(tiny["hf"]), "--template", str(path)], input="hi\n")
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert line.startswith(f"npllama: error: --template {path}:") and "\n" not in line, line


def test_generate_with_a_looping_gguf_template_stops_within_its_budget(tiny):
    kv, tensors = tiny["spec"]
    path = tiny["root"] / "looping.gguf"
    loop = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"
    path.write_bytes(gguf_bytes(set_kv(kv, "tokenizer.chat_template", STRING, loop), tensors))
    result = CliRunner().invoke(main, ["generate", "--model", str(path), "--prompt", "hi", "--chat", "-q"])
    assert result.exit_code == 2, result.output
    assert f"{path}: tokenizer.chat_template: the chat template ran over its budget" in result.output


# ==================================================================================== 5. types
WRONG = st.one_of(st.sampled_from(["false", "true", "16", "", "x", [], [1], {}, {"a": 1}, 1.5, -1, 0, 10 ** 400,
                                   float("nan"), float("inf"), True, None]),
                  st.lists(st.integers(), max_size=3), st.text(max_size=4))
CONFIG_KEYS = ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
               "intermediate_size", "head_dim", "rms_norm_eps", "rope_theta", "max_position_embeddings",
               "tie_word_embeddings", "attention_bias", "mlp_bias", "bos_token_id", "eos_token_id",
               "rope_parameters", "rope_scaling", "partial_rotary_factor"]


@examples(60)
@given(key=st.sampled_from(CONFIG_KEYS), value=WRONG)
def test_a_config_value_of_the_wrong_type_or_range_is_named(tiny, key, value):
    """Every value of config.json is checked where it is read: a bad one is an error naming the file and
    the key (or loads, when it means the same thing); "false" for a flag is never read as true."""
    hf = tiny["root"] / "types"
    if not hf.exists():
        fresh(tiny, "hf", "types")
    original = (tiny["hf"] / "config.json").read_text()
    cfg = json.loads(original)
    cfg[key] = value
    (hf / "config.json").write_text(json.dumps(cfg))
    try:
        model = load(hf)
    except NpllamaError as e:
        assert "config.json" in str(e) and "\n" not in str(e), str(e)
        return
    if key in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
        assert value is None or isinstance(value, bool), f"{key}={value!r} loaded"
    assert np.isfinite(model([[1, 2]])).all()


@pytest.mark.parametrize("scaling, words", [
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 16}, r"rope_scaling\['low_freq_factor'\] must be positive"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": -4.0,
      "original_max_position_embeddings": 16}, r"rope_scaling\['high_freq_factor'\] must be positive"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 0},
     r"rope_scaling\['original_max_position_embeddings'\] must be positive"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": -8},
     r"rope_scaling\['original_max_position_embeddings'\] must be positive"),
    ({"rope_type": "yarn", "factor": 4.0, "mscale": 1.0, "mscale_all_dim": -1 / (0.1 * np.log(4.0))},
     r"cannot compute its frequencies .*ZeroDivisionError"),
])
def test_rope_parameters_that_would_divide_by_zero_are_named(tiny, scaling, words):
    hf = fresh(tiny, "hf", "rope")
    cfg = json.loads((hf / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    (hf / "config.json").write_text(json.dumps({**cfg, "rope_scaling": scaling}))
    refused(hf, ConfigError, words)


GGUF_KEYS = {   # key -> its right type
    "llama.attention.head_count": UINT32, "llama.attention.head_count_kv": UINT32, "llama.block_count": UINT32,
    "llama.embedding_length": UINT32, "llama.feed_forward_length": UINT32, "llama.context_length": UINT32,
    "llama.attention.key_length": UINT32, "llama.rope.dimension_count": UINT32, "llama.rope.freq_base": FLOAT32,
    "llama.attention.layer_norm_rms_epsilon": FLOAT32, "tokenizer.ggml.bos_token_id": UINT32,
    "tokenizer.ggml.eos_token_id": UINT32, "tokenizer.ggml.add_bos_token": BOOL, "tokenizer.ggml.model": STRING,
    "tokenizer.ggml.pre": STRING, "tokenizer.chat_template": STRING, "tokenizer.ggml.tokens": ARRAY,
    "tokenizer.ggml.merges": ARRAY, "tokenizer.ggml.token_type": ARRAY, "general.architecture": STRING}
GGUF_VALUES = st.sampled_from([(UINT32, 0), (UINT32, 7), (INT32, -1), (FLOAT32, 0.0), (FLOAT32, -1.0),
                               (FLOAT32, float("nan")), (BOOL, True), (STRING, "false"), (STRING, ""),
                               (ARRAY, (UINT32, [1, 2, 3])), (ARRAY, (STRING, ["a b"])), (ARRAY, (INT32, []))])


@examples(60)
@given(key=st.sampled_from(sorted(GGUF_KEYS)), value=GGUF_VALUES, drop_key_length=st.booleans())
def test_a_gguf_metadata_value_of_the_wrong_type_or_range_is_named(tiny, key, value, drop_key_length):
    """head_count 0 without key_length, merges or a chat template stored as integers, ...: an error naming
    the file (and the key where one is at fault), or a model that computes finite logits."""
    kv, tensors = tiny["spec"]
    kv = set_kv(kv, key, *value)
    if drop_key_length:
        kv = [(k, t, v) for k, t, v in kv if k not in ("llama.attention.key_length", "llama.attention.value_length")]
    path = tiny["root"] / "metatypes.gguf"
    path.write_bytes(gguf_bytes(kv, tensors))
    try:
        model = load(path)
    except NpllamaError as e:
        assert "metatypes.gguf" in str(e) and "\n" not in str(e), str(e)
        return
    assert np.isfinite(model([[1, 2]])).all()


@pytest.mark.parametrize("value", [["model-00001.safetensors"], 7, {"a": 1}, None, ["a", "b"]])
def test_a_weight_map_entry_that_is_not_a_file_name_is_named(tiny, value):
    hf = fresh(tiny, "hf", "index")
    (hf / "model.safetensors").rename(hf / "model-00001.safetensors")
    names = json.loads(subprocess.run([sys.executable, "-c", "import json,sys; from safetensors import safe_open; "
                                       "print(json.dumps(list(safe_open(sys.argv[1], 'np').keys())))",
                                       str(hf / "model-00001.safetensors")], capture_output=True, text=True).stdout)
    weight_map = {n: "model-00001.safetensors" for n in names}
    weight_map[names[0]] = value
    (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    refused(hf, CheckpointError, r"weight_map\[.*\] must be a shard's file name|has no weight_map|names shard")


DEEP_FILES = ["config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "params.json",
              "model.safetensors.index.json", "safetensors header", "train --config"]


@examples(24)
@given(file=st.sampled_from(DEEP_FILES), depth=st.integers(65, 200_000), bracket=st.sampled_from(["[", '{"a":']))
def test_json_nested_thousands_deep_is_refused_everywhere_json_is_read(tiny, file, depth, bracket):
    closing = "]" if bracket == "[" else "}"
    deep = bracket * depth + "1" + closing * depth
    if file == "train --config":
        pytest.importorskip("torch")
        from parity.train import model_args_from_json

        path = tiny["root"] / "deep-train.json"
        path.write_text(deep)
        with pytest.raises(ConfigError, match="nested deeper than"):
            model_args_from_json(path, 300, 1, 2)
        return
    folder = fresh(tiny, "meta" if file == "params.json" else "hf", "deep")
    if file == "safetensors header":
        header = deep.encode()
        body = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + body[8:])
    elif file == "model.safetensors.index.json":
        (folder / "model.safetensors").unlink()
        (folder / file).write_text(deep)
    else:
        (folder / file).write_text(deep)
    refused(folder, NpllamaError, "nested deeper than")



# ==================================================================================== 6. overflow
def small_model(seed: int = 0):
    from npllama.config import ModelArgs
    from npllama.params import init_params

    args = ModelArgs(dim=16, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=40, hidden_dim=24, max_seq_len=32)
    return args, init_params(args, seed=seed)


PARAM_NAMES = sorted(small_model()[1])


@examples(30)
@given(name=st.sampled_from(PARAM_NAMES), value=st.sampled_from([3e38, -3e38, 1e30, 1e20, 1e10]),
       whole=st.booleans(), backend=st.sampled_from(["numpy", "numpy", "torch", "fast"]))
def test_weights_that_overflow_are_an_error_never_a_token(name, value, whole, backend):
    """Finite weights whose products overflow float32: generation raises an error naming the checkpoint
    (and, in npllama and parity.generate, the first layer where it happens), or, when nothing
    overflowed, every token came from finite logits that are not all equal."""
    from npllama.generate import generate
    from npllama.model import Transformer

    args, params = small_model()
    w = params[name].copy()
    if whole:
        w[...] = value
    else:
        w.reshape(-1)[0] = value
    params[name] = w
    model = Transformer(args, params)
    model.source = "overflow.gguf"
    prompt = [1, 2, 3]
    if backend == "numpy":
        run = lambda: list(generate(model, prompt, 4))                         # noqa: E731
    else:
        pytest.importorskip("torch")
        import parity
        from parity.fast import fast_generate
        from parity.generate import generate as torch_generate

        twin = parity.from_numpy(model)
        run = (lambda: list(torch_generate(twin, prompt, 4))) if backend == "torch" else \
            (lambda: fast_generate(twin, [prompt], 4, sync_every=2)[0])
    with np.errstate(all="ignore"):
        try:
            tokens = run()
        except CheckpointError as e:
            message = str(e)
            assert message.startswith("overflow.gguf: the activations overflow"), message
            if backend != "fast":
                assert re.search(r"first in (tok_embeddings|layers\.\d+\.[a-z_.]+|norm|logits)|whole context", message)
            return
        logits = model([prompt + tokens[:-1]])[0]
    drawn = logits if backend != "fast" else logits[len(prompt) - 1:]   # the fast path checks the rows it samples
    assert np.isfinite(drawn).all() and (drawn.max(-1) > drawn.min(-1)).all(), (name, value, tokens)


def test_the_command_line_says_the_weights_overflow(tiny):
    from safetensors.numpy import load_file, save_file

    hf = fresh(tiny, "hf", "overflow-hf")
    tensors = load_file(hf / "model.safetensors")
    tensors["model.layers.0.mlp.down_proj.weight"][:] = 3e38
    save_file(tensors, hf / "model.safetensors")
    result = CliRunner().invoke(main, ["generate", "--model", str(hf), "--prompt", "hi", "--raw", "-q"])
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"npllama: error: {hf}: the activations overflow float32 (first in "
                                    f"layers.0.feed_forward)") and result.output.count("\n") == 1, result.output


def test_a_perplexity_that_is_not_finite_is_an_error(tiny):
    from safetensors.numpy import load_file, save_file

    from npllama.evaluate import perplexity

    hf = fresh(tiny, "hf", "overflow-eval")
    tensors = load_file(hf / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.weight"][:] = 3e38
    save_file(tensors, hf / "model.safetensors")
    with np.errstate(all="ignore"), pytest.raises(CheckpointError, match="the activations overflow float32"):
        perplexity(load(hf), "the capital of France is Paris " * 4, 16)


# ==================================================================================== 7. not files
MEMBERS = {"hf": ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                  "generation_config.json", "chat_template.jinja"],
           "meta": ["params.json", "consolidated.00.pth"], "gguf": ["model.gguf"]}


@examples(16)
@given(fmt=st.sampled_from(sorted(MEMBERS)), data=st.data(), kind=st.sampled_from(["fifo", "dev-zero", "folder"]))
def test_a_member_that_is_not_a_regular_file_is_refused_not_read(tiny, fmt, data, kind):
    member = data.draw(st.sampled_from(MEMBERS[fmt]), label="member")
    if fmt == "gguf":
        folder = tiny["root"] / "notfile-gguf"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
    else:
        folder = fresh(tiny, fmt, f"notfile-{fmt}")
    path = folder / member
    if path.exists():
        path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")
    else:
        path.mkdir()
    if kind == "folder" and member == "model.gguf":      # a folder named model.gguf is not a .gguf file to read
        return
    refused(path if fmt == "gguf" and kind != "folder" else folder, NpllamaError,
            "not a regular file|is a folder|no config.json|not GGUF|not a zip|holds no")


@pytest.mark.parametrize("command", ["eval", "train"])
@pytest.mark.parametrize("kind", ["dev-zero", "fifo"])
def test_data_that_never_ends_is_refused(tiny, command, kind):
    data = Path("/dev/zero") if kind == "dev-zero" else tiny["root"] / f"data-{command}.fifo"
    if kind == "fifo" and not data.exists():
        os.mkfifo(data)
    if command == "eval":
        args = ["eval", "--model", str(tiny["hf"]), "--data", str(data)]
    else:
        pytest.importorskip("torch")
        config = tiny["root"] / "train-config.json"
        config.write_text(json.dumps({"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                                      "intermediate_size": 32, "max_position_embeddings": 64}))
        args = ["train", "--config", str(config), "--data", str(data), "--out", str(tiny["root"] / f"run-{kind}"),
                "--steps", "1", "-q"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert "not a regular file" in result.output and result.output.count("\n") == 1, result.output


# ==================================================================================== 8. command line
@examples(8)
@given(seed=st.integers(max_value=-1), command=st.sampled_from(["generate", "chat"]))
def test_a_negative_seed_is_refused_before_the_model_loads(tiny, seed, command):
    args = [command, "--model", str(tiny["root"] / "not-loaded"), "--seed", str(seed)]
    args += ["--prompt", "hi"] if command == "generate" else []
    result = CliRunner().invoke(main, args, input="hi\n")
    assert result.exit_code == 2, result.output
    assert f"--seed: seed must be an integer >= 0 (or none for fresh randomness), got {seed}" in result.output


@examples(12)
@given(option=st.sampled_from(["--batch-size", "--max-tokens", "--seq-len"]), value=st.integers(-5, 1))
def test_eval_counts_below_one_are_refused_before_the_model_loads(tiny, option, value):
    text = tiny["root"] / "eval.txt"
    text.write_text("the capital of France is Paris\n")
    minimum = 2 if option == "--seq-len" else 1
    result = CliRunner().invoke(main, ["eval", "--model", str(tiny["root"] / "not-loaded"), "--data", str(text),
                                       option, str(value)])
    if value >= minimum:
        assert "not-loaded: no such file" in result.output
    else:
        assert result.exit_code == 2, result.output
        assert f"{option} must be at least {minimum}, got {value}" in result.output


def test_a_prompt_that_is_not_utf8_is_one_line(tiny):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-m", "npllama", "generate", "--model", str(tiny["hf"]).encode(),
                             "--prompt", b"caf\xe9 \xff", "-q"], capture_output=True, env=env, timeout=120)
    err = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 2 and "Traceback" not in err, err
    assert "--prompt holds bytes that are not UTF-8 text" in err and err.strip().count("\n") == 0, err


def test_text_that_is_not_unicode_is_refused_by_the_tokenizer(tiny):
    with pytest.raises(TokenizerError, match="not Unicode text"):
        load(tiny["hf"]).tokenizer.encode("caf\udce9")


def unwritable_paths(root: Path) -> list[Path]:
    (root / "a-file").write_text("x")
    paths = [root / "a-file" / "out", Path("/proc/self/npllama-out"), Path("/sys/npllama-out")]
    if os.geteuid() != 0:                     # root writes into read-only folders anyway
        ro = root / "read-only"
        ro.mkdir(exist_ok=True)
        ro.chmod(0o555)
        paths.append(ro / "out")
    return paths


def test_convert_to_an_unwritable_output_is_one_line(tiny):
    for out in unwritable_paths(tiny["root"]):
        result = CliRunner().invoke(main, ["convert", "--model", str(tiny["hf"]), "--kv-heads", "1", "--out", str(out)])
        assert result.exit_code == 2, (out, result.output)
        assert result.output.startswith("npllama: error: ") and "cannot write" in result.output, result.output
        assert result.output.count("\n") == 1, result.output


def test_train_to_an_unwritable_output_is_one_line(tiny):
    pytest.importorskip("torch")
    text = tiny["root"] / "train.txt"
    text.write_text("the capital of France is Paris\n" * 50)
    config = tiny["root"] / "train-config2.json"
    config.write_text(json.dumps({"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                                  "intermediate_size": 32, "max_position_embeddings": 64}))
    for out in unwritable_paths(tiny["root"]):
        result = CliRunner().invoke(main, ["train", "--config", str(config), "--data", str(text), "--out", str(out),
                                           "--steps", "1", "-q"])
        assert result.exit_code == 2, (out, result.output)
        assert "cannot" in result.output and result.output.count("\n") == 1, result.output


@examples(10)
@given(key=st.sampled_from(["steps", "lr", "seed", "dtype", "keep", "beta1", "unknown"]), value=WRONG)
def test_a_saved_training_setting_of_the_wrong_type_is_named(tmp_path_factory, key, value):
    pytest.importorskip("torch")
    from parity.train import TrainConfig

    import dataclasses
    values = {**dataclasses.asdict(TrainConfig()), key: value}
    try:
        cfg = TrainConfig.from_mapping(values, "run/step-000002/trainer/state.json")
    except NpllamaError as e:
        assert str(e).startswith("run/step-000002/trainer/state.json: ") or str(e).startswith("--"), str(e)
        return
    assert getattr(cfg, key) == value and type(getattr(cfg, key)) is type(getattr(TrainConfig(), key)) or \
        isinstance(value, int) and key in ("lr", "beta1")


# ==================================================================================== 9. tokenizers
@pytest.fixture(scope="module")
def converted(tiny):
    out = tiny["root"] / "converted-gguf"
    result = CliRunner().invoke(main, ["convert", "--model", str(tiny["gguf"]), "--kv-heads", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


@examples(20)
@given(text=st.text(max_size=40) | st.sampled_from(["<|im_start|>user\nhi<|im_end|>", "café 12 + 3", "  x\n\ty"]))
def test_convert_from_gguf_carries_the_tokenizer_along(tiny, converted, text):
    source, result = load(tiny["gguf"]).tokenizer, load(converted).tokenizer
    assert result is not None
    assert result.encode(text) == source.encode(text)
    assert result.decode(source.encode(text)) == source.decode(source.encode(text))
    assert (result.bos_id, result.eos_ids, result.add_bos) == (source.bos_id, source.eos_ids, source.add_bos)
    assert str(result.chat_template) == str(source.chat_template)


def test_a_model_without_a_tokenizer_says_so_at_load(tiny):
    bare = fresh(tiny, "hf", "no-tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (bare / name).unlink()
    result = CliRunner().invoke(main, ["generate", "--model", str(bare), "--prompt", "hi", "-q"])
    assert result.exit_code == 2, result.output
    assert f"{bare}: has no tokenizer" in result.output and result.output.count("\n") == 1, result.output
    from npllama.generate import generate_text
    with pytest.raises(InputError, match="has no tokenizer"):
        generate_text(load(bare), "hi")


@examples(10)
@given(delta=st.integers(-299, 50).filter(lambda d: d != 0))
def test_a_gguf_vocabulary_that_does_not_cover_the_embedding_is_refused_at_load(tiny, delta):
    kv, tensors = tiny["spec"]
    tokens = dict((k, v) for k, _, v in kv)["tokenizer.ggml.tokens"][1]
    types = dict((k, v) for k, _, v in kv)["tokenizer.ggml.token_type"][1]
    merges = dict((k, v) for k, _, v in kv)["tokenizer.ggml.merges"][1]
    tokens = tokens[:len(tokens) + delta] if delta < 0 else tokens + [f"extra{i}" for i in range(delta)]
    types = types[:len(tokens)] + [1] * (len(tokens) - len(types))
    kept = set(tokens)
    merges = [m for m in merges if set(m.split(" ")) <= kept and m.replace(" ", "") in kept]
    kv = set_kv(set_kv(kv, "tokenizer.ggml.tokens", ARRAY, (STRING, tokens)), "tokenizer.ggml.token_type",
                ARRAY, (INT32, types))
    kv = set_kv(kv, "tokenizer.ggml.merges", ARRAY, (STRING, merges))
    kv = [(k, t, v) for k, t, v in kv if k not in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id")]
    path = tiny["root"] / "shortvocab.gguf"
    path.write_bytes(gguf_bytes(kv, tensors))
    refused(path, CheckpointError, f"the vocabulary \\(tokenizer.ggml.tokens\\) has {len(tokens)} tokens but "
                                   f"token_embd.weight has 300 rows")


# ==================================================================================== 10. leftovers
KILLED = textwrap.dedent("""
    import os, shutil, signal, sys
    sys.path.insert(0, {repo!r})
    from npllama import io as nio

    stage, count = {stage!r}, {count!r}
    calls = {{"n": 0}}

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def hook(real):
        def wrapped(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == count:
                die()
            return real(*args, **kwargs)
        return wrapped

    if stage == "write":        # killed after `count` files of the new folder were written
        nio.atomic_write = hook(nio.atomic_write)
    elif stage == "rename":     # killed at the first or second rename (before or after the old folder moved aside)
        os.rename = hook(os.rename)
    elif stage == "remove":     # killed while the old folder, or a pruned one, is being deleted
        real_unlink = os.unlink
        os.unlink = hook(real_unlink)
    files = {{f"f{{i}}.bin": bytes([i]) * 4096 for i in range(6)}}
    folder = os.path.join({root!r}, "out")
    if {prune!r}:
        nio.remove_folder(folder)
    else:
        nio.write_folder(folder, files, overwrite=True)
""")


@examples(14)
@given(stage=st.sampled_from(["write", "rename", "remove"]), count=st.integers(1, 6), prune=st.booleans())
def test_a_later_run_removes_what_a_killed_writer_left(tmp_path_factory, stage, count, prune):
    from npllama.io import remove_leftovers, write_folder

    root = tmp_path_factory.mktemp("killed")
    old = {f"f{i}.bin": b"old" for i in range(6)}
    write_folder(root / "out", old)
    script = KILLED.format(repo=str(REPO), stage=stage, count=count, root=str(root), prune=prune)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert proc.returncode in (0, -signal.SIGKILL), proc.stderr.decode()
    # whatever happened, the name "out" holds a whole folder (old or new) or none (a finished prune)
    if (root / "out").exists():
        contents = {p.name: p.read_bytes() for p in (root / "out").iterdir()}
        assert contents == old or contents == {f"f{i}.bin": bytes([i]) * 4096 for i in range(6)}, sorted(contents)
    else:
        assert prune or any(".old-" in p.name for p in root.iterdir()), sorted(p.name for p in root.iterdir())
    remove_leftovers(root)                                                      # what a later run does first
    names = sorted(p.name for p in root.iterdir())
    assert names in (["out"], []), names
    if not prune:
        assert (root / "out").exists()


def test_training_prunes_whole_checkpoints_and_a_resumed_run_cleans_up(tmp_path):
    pytest.importorskip("torch")
    from parity.train import checkpoint_steps, remove_stale

    out = tmp_path / "run"
    for step in (2, 4):
        (out / f"step-{step:06d}").mkdir(parents=True)
        (out / f"step-{step:06d}" / "model.safetensors").write_bytes(b"x")
    dead = 2 ** 22 + 12345                      # no such process (pid_max is at most 2**22)
    half = out / f".step-000002.del-{dead}"     # a prune killed halfway: renamed aside first, so never step-000002
    (out / "step-000002").rename(half)
    (half / "model.safetensors").unlink()
    (out / f".step-000006.tmp-{dead}-x").mkdir()
    (out / f".latest.tmp-{dead}-y").write_text("x")
    assert checkpoint_steps(out) == [4]
    remove_stale(out)
    assert sorted(p.name for p in out.iterdir()) == ["step-000004"]


# ==================================================================================== 11. outputs
TARGETS = ["missing", "regular", "empty folder", "folder", "fifo", "char device", "socket", "link to regular",
           "dangling link", "link to fifo", "link to folder", "link to char device", "looping link", "under a file"]


def make_target(root: Path, kind: str) -> Path:
    """A path of the drawn kind in root (a char device is a /dev/null twin made with mknod: root only)."""
    import socket
    import stat as st_

    path = root / "out"
    if kind == "regular":
        path.write_bytes(b"old")
    elif kind == "empty folder":
        path.mkdir()
    elif kind == "folder":
        path.mkdir()
        (path / "kept.txt").write_bytes(b"old")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "char device":
        try:
            os.mknod(path, st_.S_IFCHR | 0o666, os.makedev(1, 3))   # the numbers of /dev/null
        except PermissionError:
            pytest.skip("making a device node needs root")
    elif kind == "socket":
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(path))
        server.close()
    elif kind.startswith("link to "):
        (root / "elsewhere").mkdir()
        make_target(root / "elsewhere", kind[len("link to "):])
        path.symlink_to(root / "elsewhere" / "out")
    elif kind == "dangling link":
        path.symlink_to(root / "nowhere.bin")
    elif kind == "looping link":
        path.symlink_to(root / "out")
    elif kind == "under a file":
        (root / "a-file").write_bytes(b"old")
        return root / "a-file" / "out"
    return path


def snapshot(root: Path) -> dict[str, tuple[int, int, bytes | None]]:
    """Every entry under root, links not followed: relative path -> (mode, inode, bytes of a regular file)."""
    import stat as st_

    out = {}
    for path in [root, *sorted(root.rglob("*"))]:
        s = path.lstat()
        out[str(path.relative_to(root))] = (s.st_mode, s.st_ino, path.read_bytes() if st_.S_ISREG(s.st_mode) else None)
    return out


def write_with(writer: str, path: Path) -> None:
    from npllama.io import atomic_write, point_link, write_folder

    if writer == "atomic_write":
        with atomic_write(path) as f:
            f.write(b"new")
    elif writer == "atomic_write text":
        with atomic_write(path, "w") as f:
            f.write("new")
    elif writer == "write_folder":
        write_folder(path, {"new.txt": b"new"}, overwrite=True)
    else:
        point_link(path, "step-000001")


WRITERS = {"atomic_write": "file", "atomic_write text": "file", "write_folder": "folder", "point_link": "link"}
# What each kind of writer may replace; everything else is refused and left as it was.
REPLACEABLE = {"file": {"missing", "regular", "link to regular", "dangling link"},
           "folder": {"missing", "empty folder", "folder", "link to folder", "dangling link"},
           "link": {"missing", "link to regular", "dangling link", "link to fifo", "link to folder",
                    "link to char device", "looping link"}}


@examples(60)
@given(writer=st.sampled_from(sorted(WRITERS)), kind=st.sampled_from(TARGETS))
def test_writers_replace_only_what_they_may_and_follow_links(tmp_path_factory, writer, kind):
    from npllama.errors import OutputError

    root = tmp_path_factory.mktemp("target")
    path = make_target(root, kind)
    before = snapshot(root)
    if kind in REPLACEABLE[WRITERS[writer]]:
        write_with(writer, path)
        if WRITERS[writer] == "link":
            assert path.is_symlink() and os.readlink(path) == "step-000001"
            return
        if kind.startswith("link") or kind == "dangling link":
            assert path.is_symlink()                       # the link stays a link; what it points to is new
        real = Path(os.path.realpath(path))
        if WRITERS[writer] == "file":
            assert real.read_bytes() == b"new" and real.is_file()
        else:
            assert sorted(p.name for p in real.iterdir()) == ["new.txt"]
        left = [p.name for p in real.parent.iterdir() if p.name.startswith(".")]
        assert left == [], left                            # no temporary file or folder stays behind
        return
    with pytest.raises(OutputError) as info:
        write_with(writer, path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message, message
    assert snapshot(root) == before                         # nothing replaced, nothing left behind


@pytest.mark.parametrize("kind", ["fifo", "char device", "empty folder", "link to fifo"])
def test_trace_out_refuses_what_it_must_not_replace_before_the_load(tmp_path, kind):
    path = make_target(tmp_path, kind)
    before = snapshot(tmp_path)
    result = CliRunner().invoke(main, ["trace", "--model", str(tmp_path / "not-loaded"), "--ids", "1,2",
                                       "--out", str(path)])
    assert result.exit_code == 2, result.output
    assert "npllama writes a file only over a regular file" in result.output, result.output
    assert result.output.count("\n") == 1 and "not-loaded" not in result.output, result.output
    assert snapshot(tmp_path) == before


def test_trace_out_makes_its_folders_and_names_one_it_cannot_make_before_the_load(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                                 # a fresh clone: no runs/ yet
    result = CliRunner().invoke(main, ["trace", "--model", str(tiny["hf"]), "--ids", "1,2,3",
                                       "--out", "runs/reference.safetensors"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "runs" / "reference.safetensors").is_file()
    (tmp_path / "a-file").write_bytes(b"x")
    result = CliRunner().invoke(main, ["trace", "--model", "not-loaded", "--ids", "1,2,3",
                                       "--out", "a-file/runs/reference.safetensors"])
    assert result.exit_code == 2 and "a-file is a file, not a folder" in result.output, result.output
    assert "not-loaded" not in result.output and result.output.count("\n") == 1, result.output


# ==================================================================================== 12. bounded work
LINE_TEXT = st.text(st.sampled_from(list("ab é") + ["\u2028", "\u2029", "\v", "\f", "\x1c", "\x1d", "\x1e", "\x85",
                                                     "\r", "\t", "\ufeff"]), max_size=8)


@examples(60)
@given(lines=st.lists(LINE_TEXT, min_size=1, max_size=6), ends=st.data(), bom=st.booleans(), last=st.booleans())
def test_a_prompts_file_is_split_at_newlines_only(tmp_path_factory, lines, ends, bom, last):
    """\\n and \\r\\n end a line; U+2028, \\v, \\x1c ... (which str.splitlines takes as line ends) and a
    lone \\r stay in the prompt; a UTF-8 BOM at the start of the file is not part of the first prompt."""
    from npllama.cli.generate import read_prompts

    assume(not any(line.endswith("\r") for line in lines))          # "x\r" + "\n" is the line "x" and a \r\n
    joints = [ends.draw(st.sampled_from(["\n", "\r\n"])) for _ in lines]
    text = "".join(line + joint for line, joint in zip(lines, joints))
    if not last:
        text = text[: -len(joints[-1])]
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    if not bom and lines[0].startswith("\ufeff"):    # then the file starts with a BOM of its own
        lines = [lines[0][1:], *lines[1:]]
    expected = [line for line in lines if line.strip()]
    if not expected:
        with pytest.raises(Exception, match="give a prompt"):
            read_prompts((), str(path))
        return
    assert read_prompts((), str(path)) == expected


def tokenizer_kinds():
    """npllama Tokenizers with normalizers that shrink text in different ways (none, NFKC, strip +
    lowercase, SentencePiece's ▁ for spaces), a pre-tokenizer that drops whitespace (no bound
    then), an <unk> for unknown characters, and a SentencePiece model with byte fallback."""
    from tokenizers import Tokenizer as HF, models, normalizers, pre_tokenizers, trainers

    from npllama.tokenizer import Tokenizer
    from tiny import sample_text, train_bpe, train_sentencepiece

    kinds = {"byte-level": Tokenizer.from_tokenizers(train_bpe(300))}
    for name, norm in [("nfkc", normalizers.NFKC()),
                       ("strip-lowercase", normalizers.Sequence([normalizers.Strip(), normalizers.Lowercase()])),
                       ("metaspace", normalizers.Sequence([normalizers.Prepend("\u2581"),
                                                           normalizers.Replace(" ", "\u2581")]))]:
        tok = HF(models.BPE(unk_token="<unk>", byte_fallback=name == "metaspace"))
        tok.normalizer = norm
        tok.pre_tokenizer = pre_tokenizers.Whitespace() if name != "metaspace" else None
        tok.train_from_iterator(sample_text(200), trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<|im_start|>"],
                                                                      show_progress=False))
        kinds[name] = Tokenizer.from_tokenizers(tok)
    import tempfile
    kinds["sentencepiece"] = Tokenizer.from_sentencepiece(train_sentencepiece(Path(tempfile.mkdtemp())))
    return kinds


TEXT_PARTS = st.sampled_from(["a", "the ", "  ", "\t", "Ａ", "𝐀", "e\u0301", "\u1100\u1161\u11a8", "ﬃ", "K", "İ",
                              "<|im_start|>", "\u3000", "x" * 40, " " * 30, "\u0301" * 5, "é", "日本", "\n"])


@pytest.fixture(scope="module")
def tokenizers_by_kind():
    return tokenizer_kinds()


@examples(80)
@given(kind=st.sampled_from(["byte-level", "nfkc", "strip-lowercase", "metaspace", "sentencepiece"]),
       parts=st.lists(TEXT_PARTS, min_size=1, max_size=60), limit=st.integers(0, 12))
def test_fewest_tokens_is_a_lower_bound_for_every_normalizer(tokenizers_by_kind, kind, parts, limit):
    """What refuses a prompt before tokenizing never refuses one that would fit: the bound it
    computes is at most the tokens the tokenizer really makes, whatever its normalizer shrinks."""
    tok = tokenizers_by_kind[kind]
    text = "".join(parts)
    assert tok.fewest_tokens(text, limit) <= len(tok.encode(text, add_bos=False))
    if kind in ("byte-level", "sentencepiece", "metaspace"):      # the families npllama loads: bounded
        assert tok.bytes_per_token is not None
        if len(text.encode()) > (limit + 2) * tok.bytes_per_token + 200:
            assert tok.fewest_tokens(text, limit) > limit               # long enough: refused untokenized


def test_a_prompt_that_cannot_fit_never_reaches_the_tokenizer(tiny, tmp_path, monkeypatch):
    """One line of 4 MB for a model with a 32-token window: one line, before the tokenizer or the
    chat template sees it (the tokenizers library keeps dozens of bytes per byte of text)."""
    from npllama.tokenizer import Tokenizer

    seen = []
    real = Tokenizer.encode
    monkeypatch.setattr(Tokenizer, "encode", lambda self, text, *a, **k: seen.append(len(text)) or real(self, text, *a, **k))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a short one\n" + "the capital of France " * 200_000 + "\nanother\n")
    for args in (["--prompts", str(prompts)], ["--prompt", "word " * 800_000, "--raw"]):
        result = CliRunner().invoke(main, ["generate", "--model", str(tiny["hf"]), *args, "-q"])
        assert result.exit_code == 2, result.output
        assert "more than the context window of 32 tokens can hold" in result.output, result.output
        assert result.output.count("\n") == 1 and result.output.startswith("npllama: error: "), result.output[:300]
    assert max(seen, default=0) < 100_000, max(seen)


@examples(60)
@given(lengths=st.lists(st.integers(1, 200), min_size=1, max_size=40), new=st.integers(0, 100),
       budget_kib=st.integers(1, 1 << 14))
def test_batches_are_consecutive_and_fit_the_memory_budget(lengths, new, budget_kib):
    from npllama.inputs import plan_batches
    from npllama.memory import batch_bytes
    from tiny import tiny_config

    from npllama.formats.hf import args_from_config
    args = args_from_config(tiny_config(vocab_size=300, dim=64, n_layers=2, max_seq_len=256).to_dict(), "tiny")
    batches = plan_batches(lengths, new, args, budget_kib << 10)
    assert [i for b in batches for i in b] == list(range(len(lengths)))       # every prompt once, in order
    for b in batches:
        need = batch_bytes(args, len(b), min(256, max(lengths[i] for i in b) + new))
        assert len(b) == 1 or need <= budget_kib << 10, (b, need)             # alone, or within the budget
        if b.stop < len(lengths):                                             # as full as the budget allows
            more = min(256, max(lengths[i] for i in range(b.start, b.stop + 1)) + new)
            assert batch_bytes(args, len(b) + 1, more) > budget_kib << 10


def test_many_prompts_run_in_batches_and_every_answer_is_printed_in_order(tiny, tmp_path):
    prompts = tmp_path / "prompts.txt"
    lines = [f"prompt number {i}" for i in range(200)]
    prompts.write_text("\n".join(lines) + "\n")
    from npllama.inputs import plan_batches
    model = load(tiny["hf"])
    lengths = [len(model.tokenizer.encode(line)) for line in lines]
    assert len(plan_batches(lengths, 3, model.config, 1 << 20)) > 1          # 1 MiB: several batches
    result = CliRunner().invoke(main, ["generate", "--model", str(tiny["hf"]), "--prompts", str(prompts), "--raw",
                                       "-n", "3", "--batch-memory", "1"])
    assert result.exit_code == 0, result.output
    shown = [line[4:] for line in result.stdout.splitlines() if line.startswith(">>> ")]
    assert shown == lines
    assert re.fullmatch(r"\[load \S+ s \| prompt \d+ tokens in \S+ s, \S+ tok/s \| generated \d+ tokens in \S+ s"
                        r"(, \S+ tok/s)?\]\n", result.stderr.split("\r")[-1]), result.stderr    # after the progress bar


# ==================================================================================== 8. (continued) the terminal
ACTING = st.sampled_from(["\x1b[2J", "\x1b]0;pwned\x07", "\x1b[31m", "\r", "\x08", "\x00", "\x9b", "\u202e",
                          "\u2066", "\u2028", "\x7f", "\t"])


@examples(20)
@given(parts=st.lists(st.one_of(ACTING, st.sampled_from(["os", "evil", ".", "é"])), min_size=1, max_size=6))
def test_what_a_file_says_reaches_the_terminal_escaped(tiny, parts):
    """A pickle naming a global whose module name holds terminal controls: the one-line error quotes
    it, and what would act on the terminal (escape sequences, bidi overrides) is shown escaped."""
    from npllama.errors import printable

    module = "x" + "".join(parts)
    folder = fresh(tiny, "meta", "controls")
    pth = folder / "consolidated.00.pth"
    member, _ = data_pkl(pth)
    replace_member(pth, member, b"c" + module.encode("utf-8") + b"\nsystem\n.")
    result = CliRunner().invoke(main, ["generate", "--model", str(folder), "-p", "hi", "-q"])
    assert result.exit_code == 2, result.output
    line = result.output
    assert line.endswith("\n") and line.count("\n") == 1, repr(line)
    assert printable(line[:-1]) == line[:-1], repr(line)            # nothing left that acts on a terminal
    assert printable(module) in line, repr(line)
