"""Every command line in README.md and docs/*.md runs as written.

The lines are read out of the Markdown: in fenced code blocks (and indented ones), the lines after
a `$ ` prompt, or, in a block without prompts, the lines that start with a program the project
ships (`npllama`, `make`, `python`, `pip`, `source`); in ```bash blocks every line must be one of
those. In the text, a code span that starts with `npllama` names a command and options it has.

- `npllama` lines are parsed by the command's own options (every option exists, every value has
  its type, nothing required is missing, files that must exist do) in a folder that holds the
  repository's configs/ and data/, and what earlier steps of the docs would have made (a tiny
  checkpoint for a model under runs/, an empty file for another input); those that name a tiny
  model under runs/ (generate, eval, convert) run for real. A synopsis (`[--dtype D]`) and a code
  span in the text are held to naming the command's own options.
- `make` lines: `make -n` with the same variables finds the target; ARGS are `generate`'s options.
- `python script.py` lines: the script exists; with options, its --help lists each of them.
- `pip install` lines: the extras they name are the package's.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from importlib.metadata import metadata
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from npllama.cli import main

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PROGRAMS = ("npllama", ".venv/bin/npllama", "make", "python", "python3", ".venv/bin/python", "pip", "source")
CHEAP = ("generate", "eval", "convert")      # run for real when their model is a tiny one under runs/
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


def test_the_docs_have_the_command_lines_this_test_reads():
    readme = [line.text for line in ALL if line.doc == "README.md" and not line.inline]
    assert readme[:2] == ["make generate                      # answers \"What is the capital of France?\" with the default model",
                          "make test                          # the whole test suite"], readme[:2]
    assert sum(1 for line in ALL if words(line.text)[0].endswith("npllama")) >= 15
    assert {line.doc for line in ALL} >= {"README.md", "docs/training.md", "docs/chat.md", "docs/parity.md"}


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
def sandbox(tmp_path, tokenizer) -> Path:
    """A folder with the repository's configs/ and data/ (each line runs in a fresh one)."""
    for name in ("configs", "data"):
        (tmp_path / name).symlink_to(REPO / name)
    (tmp_path / "tiny-tokenizer.model").write_bytes(tokenizer.read_bytes())
    return tmp_path


# ------------------------------------------------------------------------------------ the checks
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


def provide(root: Path, value: str, *, model: bool, folder: bool) -> None:
    """Make a path a line names exist in its folder: a tiny checkpoint for a model, else an empty
    file or folder, as an earlier step of the docs would have left. Paths inside the repository's
    own folders (configs/, data/) are left alone: those must really exist."""
    path = root / value
    if path.exists() or path.is_symlink() or (root / Path(value).parts[0]).is_symlink():
        return
    if model:
        tiny_checkpoint(path, root / "tiny-tokenizer.model")
    elif folder:
        path.mkdir(parents=True)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()


def check_npllama(line: Line, args: list[str], root: Path, monkeypatch) -> None:
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
    model = None
    for param in command.params:
        for flag in param.opts:
            if flag not in rest or rest.index(flag) + 1 >= len(rest):
                continue
            value = rest[rest.index(flag) + 1]
            is_model = flag in ("--model", "-m", "--init")
            if is_model and value.startswith("runs/"):
                model = root / value
            if (is_model and value.startswith("runs/")) or (isinstance(param.type, click.Path) and param.type.exists):
                provide(root, value, model=is_model, folder=isinstance(param.type, click.Path) and not param.type.file_okay)
    try:
        command.make_context(name, list(rest))
    except click.ClickException as e:
        pytest.fail(f"{line}: {e.format_message()}")
    if name in CHEAP and model is not None:
        result = CliRunner().invoke(main, [name, *rest, *(["--quiet"] if name == "generate" else [])])
        assert result.exit_code == 0, f"{line}:\n{result.output}"


def check_make(line: Line, w: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    done = subprocess.run(["make", "-n", *w[1:]], cwd=REPO, capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, f"{line}: {done.stderr}"
    settings = dict(a.split("=", 1) for a in w[1:] if "=" in a)
    if "ARGS" in settings:
        command_of("generate").make_context("generate", ["--prompt", "x", *shlex.split(settings["ARGS"])])


def check_python(line: Line, w: list[str], monkeypatch) -> None:
    if w[1] == "-m":
        if w[2].startswith("npllama"):
            return check_npllama(line, npllama_args(w), REPO, monkeypatch)
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


@pytest.mark.parametrize("line", ALL, ids=[f"{line.doc}:{line.number}" for line in ALL])
def test_command_line_runs_as_written(line, sandbox, monkeypatch):
    w = words(line.text)
    program = w[0]
    if program.endswith("npllama"):
        check_npllama(line, npllama_args(w), sandbox, monkeypatch)
    elif program == "make":
        check_make(line, w)
    elif program in ("python", "python3", ".venv/bin/python"):
        check_python(line, w, monkeypatch)
    elif program == "pip":
        check_pip(line, w)
    elif program == "source":
        check_source(line, w)
    else:
        pytest.fail(f"{line}: a command line this test cannot check; add a check or rephrase the docs")
