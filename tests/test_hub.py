"""Hugging Face Hub ids as model paths, resolved through huggingface_hub's own cache.

This machine has no Hub, so each test lays out a cache as huggingface_hub writes it
(models--org--name/blobs, snapshots/<commit>/ links to the blobs, refs/<branch>) holding tiny
models the test saves itself, points HF_HUB_CACHE at it and sets HF_HUB_OFFLINE=1."""

import hashlib
import http.server
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import npllama
from npllama.errors import CheckpointError
from npllama.hub import HUB_FILES, IGNORED, HubId, parse_hub_id

pytest.importorskip("torch")
from tiny import gguf_vocab_from_bpe, random_llama, save_gguf, tiny_config, train_bpe  # noqa: E402

COMMIT_A = "a" * 40
COMMIT_B = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(cache: Path, repo: str, commit: str, folder: Path, refs: tuple[str, ...] = ()) -> Path:
    """Put the files of ``folder`` into ``cache`` as huggingface_hub stores a snapshot: each file's
    bytes once under blobs/, linked from snapshots/<commit>/; each name in refs points at commit."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (root / "blobs").mkdir(exist_ok=True)
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            data = f.read_bytes()
            blob = root / "blobs" / hashlib.sha256(data).hexdigest()
            blob.write_bytes(data)
            link = snapshot / f.relative_to(folder)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (root / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (root / "refs" / ref).write_text(commit)
    return snapshot


def save_tiny(folder: Path, n_layers: int, bpe, seed: int) -> Path:
    """A tiny Hugging Face folder written by npllama itself (config.json, model.safetensors, the tokenizer)."""
    from npllama.config import ModelArgs
    from npllama.formats.hf import save_checkpoint
    from npllama.params import init_params
    from npllama.tokenizer import Tokenizer

    args = ModelArgs(dim=32, n_layers=n_layers, n_heads=4, n_kv_heads=2, vocab_size=300, hidden_dim=64,
                     max_seq_len=64, bos_token_id=1, eos_token_ids=(2,))
    tokenizer = Tokenizer.from_tokenizers(bpe, bos_id=1, eos_ids=(2,))
    return save_checkpoint(folder, args, init_params(args, seed=seed, std=0.1), tokenizer=tokenizer)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Two tiny Hugging Face folders (2 and 3 layers; the second with Meta's original/ beside it, as a
    Llama repository has) and a folder with a GGUF file."""
    root = tmp_path_factory.mktemp("models")
    bpe = train_bpe()
    two = save_tiny(root / "two", 2, bpe, seed=0)
    three = save_tiny(root / "three", 3, bpe, seed=1)
    (three / "original").mkdir()
    (three / "original" / "consolidated.00.pth").write_bytes(b"never read")
    return {"two": two, "three": three, "bpe": bpe}


@pytest.fixture(scope="module")
def gguf_folder(tmp_path_factory, saved):
    folder = tmp_path_factory.mktemp("gguf")
    save_gguf(random_llama(tiny_config(n_layers=1), seed=2), folder / "tiny-F32.gguf",
              vocab=gguf_vocab_from_bpe(saved["bpe"]))
    return folder


@pytest.fixture
def hub(tmp_path, monkeypatch, saved):
    """A Hub cache with org/tiny (main -> 2 layers; commit B and tag v1 -> 3 layers), offline, and a
    working folder where no local path org/... exists."""
    cache = tmp_path / "hf" / "hub"
    cache_repo(cache, "org/tiny", COMMIT_A, saved["two"], refs=("main",))
    cache_repo(cache, "org/tiny", COMMIT_B, saved["three"], refs=("v1",))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return cache


# ------------------------------------------------------------------------------------ resolution
def test_a_hub_id_loads_from_the_cache(hub, saved):
    model = npllama.load("org/tiny", progress=False)
    assert model.config.n_layers == 2
    assert Path(model.source) == hub / "models--org--tiny" / "snapshots" / COMMIT_A
    ids = [[1, 5, 9, 200]]
    # bit-equal: the snapshot's files are the folder's bytes, loaded by the same code
    np.testing.assert_array_equal(model(ids), npllama.load(saved["two"], progress=False)(ids))


def test_a_revision_picks_its_snapshot(hub):
    assert npllama.load(f"org/tiny@{COMMIT_B}", progress=False).config.n_layers == 3
    assert npllama.load("org/tiny@v1", progress=False).config.n_layers == 3
    assert npllama.load("org/tiny@main", progress=False).config.n_layers == 2


def test_a_gguf_file_of_a_repository_loads(hub, gguf_folder):
    cache_repo(hub, "org/tiny-gguf", COMMIT_A, gguf_folder, refs=("main",))
    model = npllama.load("org/tiny-gguf/tiny-F32.gguf", progress=False)
    assert model.config.n_layers == 1
    with pytest.raises(CheckpointError, match=r"org/tiny-gguf/FILE\.gguf"):   # the repository alone: name the file
        npllama.load("org/tiny-gguf", progress=False)


def test_an_existing_local_path_always_wins(hub, saved):
    shutil.copytree(saved["three"], Path("org") / "tiny")
    assert npllama.load("org/tiny", progress=False).config.n_layers == 3


def test_a_missing_hub_id_is_one_line_that_names_both_readings(hub):
    with pytest.raises(CheckpointError) as e:
        npllama.load("org/missing", progress=False)
    message = str(e.value)
    assert "\n" not in message
    assert "org/missing: no such local file or folder, and as a Hugging Face Hub id" in message
    assert "HF_HUB_OFFLINE" in message and "hf download org/missing" in message
    with pytest.raises(CheckpointError, match="at revision nope"):
        npllama.load("org/tiny@nope", progress=False)


@pytest.fixture
def online(hub, monkeypatch):
    """HF_HUB_OFFLINE unset: the Hub is asked. (huggingface_hub reads HF_HUB_OFFLINE once, when it is
    first imported, and conftest.py sets it for the whole run; its constant follows the variable here.)"""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def test_without_a_network_the_line_says_what_to_do(online, monkeypatch):
    """The Hub asked and not reached (a closed local port stands for a machine without a network)."""
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(CheckpointError) as e:
        npllama.load("org/missing", progress=False)
    message = str(e.value)
    assert "\n" not in message and "the Hub cannot be reached (" in message and "Offline" not in message
    assert "copy the folder here" in message and "HF_HUB_OFFLINE=1" in message


def test_a_path_that_is_no_hub_id_stays_a_missing_path(hub):
    for path in ("no-such-folder", "./org/tiny", "a/b/c", "org/na--me", "org/tiny@"):
        with pytest.raises(CheckpointError, match="no such file or folder; expected"):
            npllama.load(path, progress=False)


def test_parse_hub_id():
    assert parse_hub_id("org/name") == HubId("org/name")
    assert parse_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct@main") == HubId("HuggingFaceTB/SmolLM2-135M-Instruct",
                                                                             None, "main")
    assert parse_hub_id("org/name@refs/pr/1") == HubId("org/name", None, "refs/pr/1")
    assert parse_hub_id("org/name/sub/model-Q4_K_M.gguf@v2") == HubId("org/name", "sub/model-Q4_K_M.gguf", "v2")
    for text in ("name", "/abs/path", "./org/name", "org/name/", "org//name", "org/name/file.bin", "-org/name",
                 "org/..", "org/name@", "org/name@a b", "weights/model.gguf", "runs/x/model.safetensors"):
        assert parse_hub_id(text) is None, text


def test_the_cli_takes_a_hub_id(hub):
    from npllama.cli import main

    result = CliRunner().invoke(main, ["generate", "--model", "org/tiny", "--prompt", "hello", "-n", "2", "--raw",
                                       "--seed", "0", "-q"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["generate", "--model", "org/missing", "--prompt", "hello", "-n", "2", "-q"])
    assert result.exit_code == 2 and "no such local file or folder" in result.output, result.output


def test_trace_and_export_take_a_hub_id_too(hub):
    """The commands that load their model their own way (trace's and --against's reference, export)
    resolve a Hub id as npllama.load does."""
    from npllama.cli import main

    result = CliRunner().invoke(main, ["trace", "--model", "org/tiny", "--ids", "1,2,3", "--out", "t.safetensors"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["trace", "--model", "org/tiny", "--against", "t.safetensors"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["export", "--model", "org/tiny", "--layout", "hf", "--out", "e", "--quiet"])
    assert result.exit_code == 0 and Path("e/config.json").is_file(), result.output


def test_trace_records_the_snapshots_hash(hub):
    from npllama.oracle import model_sha256
    from npllama.weights import sha256_file

    assert model_sha256("org/tiny") == sha256_file(hub / "models--org--tiny" / "snapshots" / COMMIT_A / "model.safetensors")


# ------------------------------------------------------------------------------------ what is fetched
def test_only_the_files_npllama_reads_are_fetched():
    """huggingface_hub's own pattern matcher, on the file list of a Llama 3.1 repository."""
    from huggingface_hub.utils import filter_repo_objects

    listing = [".gitattributes", "LICENSE", "README.md", "USE_POLICY.md", "config.json", "generation_config.json",
               "model-00001-of-00004.safetensors", "model-00004-of-00004.safetensors",
               "model.safetensors.index.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
               "original/consolidated.00.pth", "original/params.json", "original/tokenizer.model",
               "onnx/model.safetensors", "chat_template.jinja"]
    fetched = set(filter_repo_objects(listing, allow_patterns=list(HUB_FILES), ignore_patterns=list(IGNORED)))
    assert fetched == {"config.json", "generation_config.json", "model-00001-of-00004.safetensors",
                       "model-00004-of-00004.safetensors", "model.safetensors.index.json", "special_tokens_map.json",
                       "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}


# ------------------------------------------------------------------------------------ what the Hub says
class StandInHub(http.server.BaseHTTPRequestHandler):
    """A local HTTP server that answers every request as the Hub answers for a repository this
    machine may not read: the status and X-Error-Code of ``answers[repo]`` (huggingface_hub reads both)."""
    answers = {"org/gated": (403, "GatedRepo"), "org/private": (401, "RepoNotFound"), "org/forbidden": (403, None)}

    def do_GET(self):
        repo = next((r for r in self.answers if f"/{r}/" in self.path + "/"), None)
        status, code = self.answers.get(repo, (404, "EntryNotFound"))
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", f"Access to model {repo} is restricted.")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture
def stand_in_hub(online, monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), StandInHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    yield
    server.shutdown()
    thread.join()


def test_a_gated_or_private_repository_is_one_line_about_the_licence_and_the_token(stand_in_hub):
    for path in ("org/gated", "org/gated/model.gguf", "org/forbidden"):
        with pytest.raises(CheckpointError) as e:
            npllama.load(path, progress=False)
        message = str(e.value)
        assert "\n" not in message and "no such local file or folder" in message, message
        assert "is a gated repository: accept its licence" in message and "HF_TOKEN" in message, message
    with pytest.raises(CheckpointError) as e:
        npllama.load("org/private", progress=False)
    assert "no repository org/private that this machine may read" in str(e.value) and "HF_TOKEN" in str(e.value)
