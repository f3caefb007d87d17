"""Everything npllama writes gets the usual permissions: what the umask leaves of 0666 for a file
and 0777 for a folder, as `open` and `mkdir` give (not the 0600 of a temporary file).

Files are written under a temporary name and renamed into place (npllama.io), and temporary files
are made 0600; these tests hold that the permissions are put right before the rename, for every
writer: single files, checkpoint folders, the trainer's run folder and its loss curve, and the
parity plot.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings, strategies as st

from npllama.cli import main
from npllama.io import atomic_write, write_folder

REPO = Path(__file__).resolve().parent.parent
UMASKS = st.sampled_from([0o022, 0o002, 0o027, 0o077, 0o007, 0o000])


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def modes(root: Path) -> dict[str, tuple[str, int]]:
    """Every file and folder under root (links not followed): relative path -> (kind, permission bits)."""
    out = {}
    for path in [root, *root.rglob("*")]:
        st_ = path.lstat()
        if stat.S_ISLNK(st_.st_mode):
            continue
        out[str(path.relative_to(root))] = ("dir" if stat.S_ISDIR(st_.st_mode) else "file", stat.S_IMODE(st_.st_mode))
    return out


def assert_usual(root: Path, mask: int) -> None:
    expected = {"file": 0o666 & ~mask, "dir": 0o777 & ~mask}
    wrong = {p: oct(m) for p, (kind, m) in modes(root).items() if m != expected[kind]}
    assert not wrong, f"umask {oct(mask)}: expected files {oct(expected['file'])}, folders {oct(expected['dir'])}: {wrong}"


@settings(max_examples=12, deadline=None)
@given(mask=UMASKS, text=st.booleans(), nested=st.booleans())
def test_atomic_write_and_write_folder_follow_the_umask(tmp_path_factory, mask, text, nested):
    root = tmp_path_factory.mktemp("modes")
    with umask(mask):
        (root / "out").mkdir()
        with atomic_write(root / "out" / "file.txt", "w" if text else "wb") as f:
            f.write("x" if text else b"x")
        write_folder(root / "out" / "folder", {"a.json": b"{}", ("sub/b.bin" if nested else "b.bin"): b"\0"})
    assert_usual(root / "out", mask)


@pytest.mark.parametrize("mask", [0o027, 0o002], ids=["umask-027", "umask-002"])
def test_train_run_folder_and_parity_plot_follow_the_umask(tmp_path, mask):
    import parity
    from parity.report import parity_report, plot_errors

    text = (REPO / "data" / "shakespeare_train.txt").read_text(encoding="utf-8")[:20000]
    (tmp_path / "train.txt").write_text(text)
    (tmp_path / "tiny.json").write_text('{"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, '
                                        '"num_attention_heads": 4, "num_key_value_heads": 2, '
                                        '"max_position_embeddings": 32}')
    out = tmp_path / "run"
    with umask(mask):
        result = CliRunner().invoke(main, [
            "train", "--config", str(tmp_path / "tiny.json"), "--data", str(tmp_path / "train.txt"),
            "--out", str(out), "--vocab-size", "400", "--steps", "2", "--batch-size", "2", "--seq-len", "16",
            "--warmup", "1", "--eval-batches", "1", "--save-every", "1", "--sample-tokens", "4", "-q"])
        assert result.exit_code == 0, result.output
        model = parity.load(out / "latest", progress=False)
        plot = tmp_path / "plots"
        plot.mkdir()
        plot_errors([parity_report(model, np.array([[1, 5, 9, 13]]))], str(plot / "errors.png"))
    assert {"tokenizer.model", "loss.png", "samples.txt", "step-000002/model.safetensors",
            "step-000002/trainer/state.json"} <= set(modes(out))
    assert_usual(out, mask)
    assert_usual(plot, mask)
