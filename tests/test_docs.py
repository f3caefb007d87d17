"""Every command line in README.md and docs/*.md runs as written, offline, in a fresh folder.

The lines are read out of the Markdown: in fenced code blocks (and indented ones), the lines after
a `$ ` prompt, or, in a block without prompts, the lines that start with a program the project
ships (`npllama`, `make`, `python`, `pip`, `source`); in ```bash blocks every line must be one of
those. In the text, a code span that starts with `npllama` names a command and options it has.

Run (plan(): each line runs or is parsed, and says why):

- Every `npllama` and `python script.py` line that can run offline runs as a subprocess, in a
  fresh folder that holds links to the repository's configs/, data/ and docs/ and nothing else
  (no runs/: `--out runs/...` must make it). It must exit as the docs say (0; 1 for a port with a
  planted bug; 2 with the message docs/errors.md shows, word for word), without a
  traceback, within RUN_TIMEOUT. The lines of one document that use runs/ run in its order in one
  folder, each on what the earlier ones made, as a reader following the document would. Long
  ones run with their budgets scaled down (SCALED: -n 4, --max-tokens 64, --minutes 0.05,
  --steps 1; chat reads one question, then /quit). Lines that need torch skip without it.
- Parsed only, each for the reason plan() gives: `make generate` and `make test` (how this suite
  runs; `make -n` with the same variables finds the target, ARGS are `generate`'s options),
  `pip install` (needs a package index; the extras it names are the package's), `source`,
  `python -m pytest`, a line that needs a GPU, a synopsis (`[--dtype D]`, placeholders such as
  PATH), a code span in the text, and the default model's op-by-op comparisons listed in
  PARSED_ONLY. Parsing holds a line to its command's options (every option exists, every value
  has its type, nothing required is missing), in a folder with what earlier steps would have made.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from importlib.metadata import metadata
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from npllama.cli import main

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PROGRAMS = ("npllama", ".venv/bin/npllama", "make", "python", "python3", ".venv/bin/python", "pip", "source")
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4, "max_position_embeddings": 64}


@dataclass(frozen=True)
class Line:
    doc: str
    number: int
    text: str
    inline: bool = False

    def __str__(self):
        return f"{self.doc}:{self.number}: {self.text}"


# ------------------------------------------------------------------------------------ reading the Markdown
def words(text: str) -> list[str]:
    """A shell line as its words: continuations joined, a trailing # comment and VAR=value prefixes dropped."""
    out = shlex.split(text.replace("\\\n", " "), comments=True)
    while out and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", out[0]):
        out.pop(0)
    return out


def is_command(text: str) -> bool:
    try:
        w = words(text)
    except ValueError:
        return False
    return bool(w) and w[0] in PROGRAMS


def joined(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Join backslash continuations: [(first line number, whole command)]."""
    out: list[tuple[int, str]] = []
    pending = None
    for n, text in lines:
        if pending is not None:
            pending = (pending[0], pending[1] + "\n" + text)
        else:
            pending = (n, text)
        if not text.rstrip().endswith("\\"):
            out.append(pending)
            pending = None
    if pending is not None:
        out.append(pending)
    return out


def block_commands(lang: str, lines: list[tuple[int, str]], doc: str) -> list[Line]:
    """The command lines of one code block (see the module docstring)."""
    if lang not in ("", "bash", "sh", "shell", "console", "text"):
        return []
    prompted = [(n, t.strip()[2:]) for n, t in lines if t.strip().startswith("$ ")]
    if prompted:
        return [Line(doc, n, t) for n, t in joined(prompted)]
    found = []
    for n, text in joined([(n, t.strip()) for n, t in lines]):
        if not text or text.startswith("#"):
            continue
        if lang in ("bash", "sh", "shell") or is_command(text):
            found.append(Line(doc, n, text))
    return found


def command_lines(path: Path) -> list[Line]:
    """Every command line of a Markdown file, in order, and the npllama code spans of its text."""
    doc = path.relative_to(REPO).as_posix()
    found: list[Line] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^\s*```(\w*)", lines[i])
        if fence:
            j = i + 1
            while j < len(lines) and not re.match(r"^\s*```", lines[j]):
                j += 1
            found += block_commands(fence.group(1), [(n + 1, lines[n]) for n in range(i + 1, j)], doc)
            i = j + 1
            continue
        text = lines[i]
        if text.startswith("    ") and (text.strip().startswith("$ ") or is_command(text.strip())):
            found += block_commands("", [(i + 1, text)], doc)
        else:
            for span in re.findall(r"`([^`\n]+)`", text):
                if is_command(span):
                    found.append(Line(doc, i + 1, span, inline=True))
        i += 1
    return found


ALL = [line for doc in DOCS for line in command_lines(doc)]
# A command the docs give in several places runs where it first stands, and is parsed elsewhere.
FIRST_RUN: dict[str, "Line"] = {}
for _line in ALL:
    if not _line.inline:
        FIRST_RUN.setdefault(_line.text.split("#")[0].strip(), _line)


# ------------------------------------------------------------------------------------ what each line does here
RUN_TIMEOUT = 300                       # seconds: a line that takes longer hangs
SCALED = {"-n": "4", "--max-new-tokens": "4", "--max-tokens": "64", "--minutes": "0.05", "--steps": "1"}
# Lines that could run offline but are parsed only: their time is the default model's, which no
# option scales down (measured on the 2-core VM, quiet), and another test runs the same on a tiny model.
PARSED_ONLY = {
    "npllama parity": "no budget to scale: every op of the 30-layer default model in both backends (10-15 s); "
                      "tests/test_report.py::test_cli_on_the_default_model_passes_in_float32 runs this very command",
    "npllama parity --dtype bfloat16": "no budget to scale: every op of the 30-layer default model in both backends "
                                       "(15 s); tests/test_parity_model.py holds bfloat16 to its bar on tiny models",
    "npllama parity --weights int4": "no budget to scale: the kernels' report recomputes the default model in float64 "
                                     "(30 s); tests/test_quant_models.py runs `parity --weights gguf` on a tiny GGUF",
    'npllama generate --prompt "Tell me about llamas" --backend torch --weights int4':
        "its time is the int4 quantization of the default model at load (10 s), which -n does not scale; "
        "tests/test_quant_models.py runs `generate --backend torch --weights int4` on a tiny GGUF",
    'npllama generate --prompt "The capital of France is" --raw --backend torch --tp 3':
        "README.md's `generate ... --backend torch --tp 3` runs (3 processes loading the default model, 15 s); "
        "--raw changes only the prompt's template",
    'npllama parity --tp 3 --prompt "The capital of France is"':
        "README.md's `parity --tp 3` runs (15 s), on the default prompt; tests/test_tp.py runs the default model "
        "on 3 ranks",
    "npllama parity --against 'dump.rank*.safetensors'":
        "the dumps are a tensor-parallel port's own, one per rank; tests/test_tp.py writes such dumps from a "
        "split model, with bugs planted in one rank, and checks them this way",
}
PLACEHOLDER = re.compile(r"[A-Z][A-Z0-9_]*|YOURS\..*|.*\.\.\.")
CHAT_INPUT = "What is the capital of France?\n/quit\n"


@dataclass(frozen=True)
class Plan:
    run: bool
    why: str = ""                       # parsed only: the reason; run: what was scaled
    argv: list[str] = field(default_factory=list)
    status: int = 0                     # the exit status the docs show
    stdin: str | None = None
    torch: bool = False                 # needs torch


def parsed(why: str) -> Plan:
    return Plan(False, why)


def plan(line: Line) -> Plan:
    """Whether a line runs here (and how: its argv with budgets scaled, its exit status) or is parsed only, and why."""
    w = words(line.text)
    program = w[0]
    if line.inline:
        return parsed("a command named in the text")
    if program == "make":
        return parsed("`make generate` and `make test` are how this suite itself is run")
    if program == "pip":
        return parsed("installs from a package index")
    if program == "source":
        return parsed("changes the calling shell")
    if program.endswith("python") or program == "python3":
        if w[1] == "-m" and w[2] == "pytest":
            return parsed("runs this test suite")
        if w[1] != "-m":
            return Plan(True, argv=[sys.executable, w[1], *w[2:]], torch=True)
    args = npllama_args(w)
    if not args or args[0].startswith("-") or "--help" in args:
        return Plan(True, argv=[sys.executable, "-m", "npllama", *args])
    text = line.text.split("#")[0].strip()
    if text in PARSED_ONLY:
        return parsed(PARSED_ONLY[text])
    first = FIRST_RUN.get(text)
    if first is not None and first != line and not uses_runs(line):
        return parsed(f"the same command as {first.doc}:{first.number}, which runs")
    if any(a.startswith("[") or a == "|" or a == "..." for a in args) or \
            any(PLACEHOLDER.fullmatch(v) for f, v in zip(args, args[1:]) if f.startswith("-")):
        return parsed("a synopsis: its values are placeholders")
    if any(v.startswith("cuda") for f, v in zip(args, args[1:]) if f == "--device"):
        return parsed("needs a CUDA GPU")
    name, rest = args[0], list(args[1:])
    scaled = []
    for flag, value in SCALED.items():
        if flag in rest and rest.index(flag) + 1 < len(rest):
            i = rest.index(flag) + 1
            if float(rest[i]) > float(value):
                scaled.append(f"{flag} {rest[i]} -> {value}")
                rest[i] = value
    given = set(rest)
    if name == "generate" and not given & {"-n", "--max-new-tokens"}:
        rest += ["-n", SCALED["-n"]]
        scaled.append(f"-n {SCALED['-n']} added")
    if name == "eval" and "--max-tokens" not in given:
        rest += ["--max-tokens", SCALED["--max-tokens"]]
        scaled.append(f"--max-tokens {SCALED['--max-tokens']} added")
    if name == "chat" and not given & {"-n", "--max-new-tokens"}:
        rest += ["-n", "8"]
        scaled.append("-n 8 added, one question")
    status = 2 if any(a.endswith("broken.gguf") for a in rest) else \
        1 if "--against" in rest and any(bug in a for a in rest for bug in PLANTED_BUGS) else 0
    needs_torch = name in ("parity", "train") or "torch" in rest
    return Plan(True, "; ".join(scaled), [sys.executable, "-m", "npllama", name, *rest], status,
                CHAT_INPUT if name == "chat" else None, needs_torch)


# The dumps the docs write from a port with a planted bug: checking them exits 1 (a break).
PLANTED_BUGS = ("buggy", "position.safetensors", "mask.safetensors", "eps64.safetensors")


def uses_runs(line: Line) -> bool:
    return not line.inline and "runs/" in line.text


STANDALONE = [line for line in ALL if not uses_runs(line)]
CHAINS = {doc: [line for line in ALL if line.doc == doc and uses_runs(line)] for doc in dict.fromkeys(l.doc for l in ALL)}
CHAINS = {doc: lines for doc, lines in CHAINS.items() if lines}


def test_the_docs_have_the_command_lines_this_test_reads():
    readme = [line.text for line in ALL if line.doc == "README.md" and not line.inline]
    assert readme[:2] == ["make generate                      # answers \"What is the capital of France?\" with the default model",
                          "make test                          # the whole test suite"], readme[:2]
    assert sum(1 for line in ALL if words(line.text)[0].endswith("npllama")) >= 15
    assert {line.doc for line in ALL} >= {"README.md", "docs/training.md", "docs/chat.md", "docs/parity.md"}
    ran = [line for line in ALL if plan(line).run]
    assert sum(1 for line in ran if "npllama" in line.text) >= 20, [str(line) for line in ran]
    assert {"README.md", "docs/training.md", "docs/porting.md"} <= set(CHAINS)


# ------------------------------------------------------------------------------------ a folder to run them in
def tiny_checkpoint(folder: Path, tokenizer: Path) -> None:
    """A real Hugging Face folder (config.json, model.safetensors, tokenizer.model) of a tiny model,
    as `npllama train` writes them."""
    import sentencepiece as spm

    from npllama.formats.hf import args_from_config, save_checkpoint
    from npllama.params import init_params

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    args = args_from_config({**TINY, "vocab_size": sp.get_piece_size(), "bos_token_id": sp.bos_id(),
                             "eos_token_id": sp.eos_id()}, "tiny")
    save_checkpoint(folder, args, init_params(args, seed=0), extra={"tokenizer.model": tokenizer})


def broken_gguf(path: Path) -> None:
    """docs/errors.md's weights/broken.gguf: a GGUF file cut at 3000 bytes (the default model's first
    3000; the page shows the message for tests/test_errors.py's tiny GGUF, cut at the same length)."""
    from npllama.errors import CheckpointError
    from npllama.weights import default_model_path

    try:
        model = default_model_path(fetch=False)
    except CheckpointError:
        pytest.skip("the default model is not in weights/ (make setup fetches it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(model, "rb") as f:
        path.write_bytes(f.read(3000))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    """A small sentencepiece model (trained on the repository's text) for tiny checkpoints."""
    import io

    import sentencepiece as spm

    text = (REPO / "data" / "shakespeare_train.txt").read_text(encoding="utf-8")[:40000]
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text.split("\n")), model_writer=proto, vocab_size=400,
                                   model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   minloglevel=2, num_threads=1)
    path = tmp_path_factory.mktemp("docs-tokenizer") / "tokenizer.model"
    path.write_bytes(proto.getvalue())
    return path


@pytest.fixture
def sandbox(tmp_path) -> Path:
    """A fresh folder, as a clone is to a reader: the repository's configs/, data/ and docs/, no runs/."""
    for name in ("configs", "data", "docs"):
        (tmp_path / name).symlink_to(REPO / name)
    return tmp_path


# ------------------------------------------------------------------------------------ running
def needs_default_model(argv: list[str]) -> bool:
    return argv[1:3] == ["-m", "npllama"] and len(argv) > 3 and argv[3] in ("generate", "chat", "eval", "parity",
                                                                            "trace", "fetch") \
        and "--model" not in argv and "-m" not in argv[3:] and "--against" not in argv and "--help" not in argv


def shown_output(line: Line) -> list[str]:
    """The output a page shows under a `$ ` line: the lines that follow it in its block, up to a blank line."""
    lines = (REPO / line.doc).read_text(encoding="utf-8").splitlines()[line.number:]
    shown = []
    for text in lines:
        if not text.strip() or text.strip().startswith("$ "):
            break
        shown.append(text.strip())
    return shown


def run_line(line: Line, root: Path) -> None:
    """Run one line in root as planned; fail naming the line when it does not end as the docs say."""
    p = plan(line)
    if p.torch:
        pytest.importorskip("torch")
    if needs_default_model(p.argv):
        from npllama.errors import CheckpointError
        from npllama.weights import default_model_path
        try:
            default_model_path(fetch=False)
        except CheckpointError:
            pytest.skip("the default model is not in weights/ (make setup fetches it)")
    if any(a.endswith("broken.gguf") for a in p.argv):
        broken_gguf(root / "weights" / "broken.gguf")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    try:
        done = subprocess.run(p.argv, cwd=root, input=p.stdin if p.stdin is not None else "", capture_output=True,
                              text=True, timeout=RUN_TIMEOUT, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{line}: still running after {RUN_TIMEOUT} s")
    said = f"{line}\n(ran {' '.join(p.argv[1:])}; {p.why or 'as written'})\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert done.returncode == p.status, said
    assert "Traceback" not in done.stderr, said
    if p.status == 2:                      # the message the page shows under the line, word for word
        assert done.stderr.startswith("npllama: error: ") and done.stderr.count("\n") == 1, said
        assert done.stderr.split() == " ".join(shown_output(line)).split(), said
    if p.status == 1:
        assert "first break" in done.stdout, said


@pytest.mark.parametrize("line", STANDALONE, ids=[f"{line.doc}:{line.number}" for line in STANDALONE])
def test_command_line_runs_as_written(line, sandbox, tokenizer, monkeypatch):
    p = plan(line)
    if p.run:
        return run_line(line, sandbox)
    w = words(line.text)                  # parsed only, for p.why
    program = w[0]
    if program.endswith("npllama"):
        check_npllama(line, npllama_args(w), sandbox, tokenizer, monkeypatch)
    elif program == "make":
        check_make(line, w)
    elif program in ("python", "python3", ".venv/bin/python"):
        check_python(line, w, sandbox, tokenizer, monkeypatch)
    elif program == "pip":
        check_pip(line, w)
    elif program == "source":
        check_source(line, w)
    else:
        pytest.fail(f"{line}: a command line this test cannot check; add a check or rephrase the docs")


@pytest.mark.parametrize("doc", sorted(CHAINS))
def test_the_lines_of_a_document_that_build_on_each_other_run_in_order(doc, sandbox, tokenizer, monkeypatch):
    """runs/ lines in document order, in one fresh folder: each on what the earlier ones made."""
    for line in CHAINS[doc]:
        if plan(line).run:
            run_line(line, sandbox)
        else:
            check_npllama(line, npllama_args(words(line.text)), sandbox, tokenizer, monkeypatch)


# ------------------------------------------------------------------------------------ parsing
def npllama_args(w: list[str]) -> list[str]:
    """The arguments after the program: npllama ..., .venv/bin/npllama ..., python -m npllama[.cli] ..."""
    if w[0].endswith("npllama"):
        return w[1:]
    assert w[1:3] in (["-m", "npllama"], ["-m", "npllama.cli"]), w
    return w[3:]


def command_of(name: str) -> click.Command:
    with main.make_context("npllama", [name]) as ctx:
        command = main.get_command(ctx, name)
    assert command is not None, f"no command {name!r}"
    assert "not available" not in (command.help or ""), f"{name}: {command.help}"
    return command


def option_names(args: list[str]) -> set[str]:
    """The options a line names, synopsis brackets ([--dtype D]) and alternatives (a|b) taken apart."""
    names = set()
    for a in args:
        for part in a.strip("[]").split("|"):
            if part.startswith("-") and part != "-":
                names.add(part.split("=", 1)[0])
    return names


def provide(root: Path, value: str, tokenizer: Path, *, model: bool, folder: bool) -> None:
    """Make a path a parsed line names exist in its folder: a tiny checkpoint for a model, else an
    empty file or folder, as an earlier step of the docs would have left. Paths inside the
    repository's own folders (configs/, data/, docs/) are left alone: those must really exist."""
    path = root / value
    if path.exists() or path.is_symlink() or (root / Path(value).parts[0]).is_symlink():
        return
    if model:
        tiny_checkpoint(path, tokenizer)
    elif folder:
        path.mkdir(parents=True)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()


def check_npllama(line: Line, args: list[str], root: Path, tokenizer: Path, monkeypatch) -> None:
    if not args or args[0].startswith("-"):
        result = CliRunner().invoke(main, args or ["--help"])
        assert result.exit_code == 0, result.output
        return
    name, rest = args[0], args[1:]
    command = command_of(name)
    options = {o for p in command.params for o in (*p.opts, *p.secondary_opts)} | {"--help", "-h"}
    given = option_names(rest)
    assert given <= options, f"{line}: {sorted(given - options)} are not options of `npllama {name}`"
    synopsis = any(a.startswith("[") or a == "|" for a in rest)
    if line.inline or synopsis or "--help" in rest or "..." in rest:
        return             # a span in the text or a synopsis names options; its values may be placeholders
    monkeypatch.chdir(root)
    for param in command.params:
        for flag in param.opts:
            if flag not in rest or rest.index(flag) + 1 >= len(rest):
                continue
            value = rest[rest.index(flag) + 1]
            is_model = flag in ("--model", "-m", "--init")
            if (is_model and value.startswith("runs/")) or (isinstance(param.type, click.Path) and param.type.exists):
                provide(root, value, tokenizer, model=is_model,
                        folder=isinstance(param.type, click.Path) and not param.type.file_okay)
    try:
        command.make_context(name, list(rest))
    except click.ClickException as e:
        pytest.fail(f"{line}: {e.format_message()}")


def check_make(line: Line, w: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    done = subprocess.run(["make", "-n", *w[1:]], cwd=REPO, capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, f"{line}: {done.stderr}"
    settings = dict(a.split("=", 1) for a in w[1:] if "=" in a)
    if "ARGS" in settings:
        command_of("generate").make_context("generate", ["--prompt", "x", *shlex.split(settings["ARGS"])])


def check_python(line: Line, w: list[str], root: Path, tokenizer: Path, monkeypatch) -> None:
    if w[1] == "-m":
        if w[2].startswith("npllama"):
            return check_npllama(line, npllama_args(w), root, tokenizer, monkeypatch)
        assert w[2] == "pytest", f"{line}: unknown module {w[2]}"
        test_file = REPO / next(a for a in w[3:] if a.endswith(".py"))
        names = re.findall(r"^def (test_\w+)", test_file.read_text(encoding="utf-8"), re.M)
        if "-k" in w:
            keyword = w[w.index("-k") + 1]
            assert any(keyword in n for n in names), f"{line}: no test in {test_file.name} matches -k {keyword}"
        return
    script = REPO / w[1]
    assert script.is_file(), f"{line}: no script {w[1]}"
    source = script.read_text(encoding="utf-8")
    ast.parse(source)
    given = [a.split("=", 1)[0] for a in w[2:] if a.startswith("--")]
    if given:
        assert "argparse" in source, f"{line}: the script takes no options"
        done = subprocess.run([sys.executable, str(script), "--help"], cwd=REPO, capture_output=True, text=True,
                              timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert done.returncode == 0, f"{line}: {done.stderr}"
        for option in given:
            assert option in done.stdout, f"{line}: {option} is not an option of {w[1]}"


def check_pip(line: Line, w: list[str]) -> None:
    extras = set(metadata("npllama").get_all("Provides-Extra") or ())
    for requirement in w[2:]:
        named = re.fullmatch(r"(?:npllama|\.)\[([\w,]+)\]", requirement)
        if named:
            assert set(named.group(1).split(",")) <= extras, f"{line}: extras {named.group(1)}; the package has {extras}"


def check_source(line: Line, w: list[str]) -> None:
    makefile = (REPO / "Makefile").read_text()
    venv = re.search(r"^VENV\s*\?=\s*(\S+)", makefile, re.M).group(1)
    assert w[1] == f"{venv}/bin/activate" and "-m venv $(VENV)" in makefile, str(line)
