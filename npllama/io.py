"""Writing files so that a crash never leaves half of one behind.

Every writer in npllama goes through :func:`atomic_write`: the bytes go to a temporary file in the
destination's directory, are flushed and fsync'd, and only then ``os.replace`` puts the file in
place, which POSIX and Windows both make atomic within one file system. Readers see either the old
file or the new one, never a torn one; on any error the temporary file is removed.
:func:`write_folder` does the same for a whole folder of files (a checkpoint).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Callable, Iterator, Mapping


def _umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary file next to ``path``; on success it replaces ``path`` atomically.

        with atomic_write("weights/model.gguf") as f:
            f.write(data)

    mode: "wb" (default) or "w" (text; encoding defaults to UTF-8). Raising inside the block
    deletes the temporary file and leaves any existing ``path`` untouched.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write: mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    owned = False   # True once the file object owns (and will close) fd
    try:
        os.chmod(tmp, 0o666 & ~_umask())   # mkstemp makes 0600; give the usual permissions
        if mode == "w":
            f = os.fdopen(fd, "w", encoding=encoding or "utf-8", newline="")
        else:
            f = os.fdopen(fd, "wb")
        owned = True
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if not owned:
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_folder(folder: str | os.PathLike, files: Mapping[str, bytes | os.PathLike], overwrite: bool = False,
                 check: Callable[[Path], None] | None = None) -> Path:
    """Write a whole folder at once: every file lands under a temporary name, then one rename.

    files: name -> bytes, or name -> Path of a file to copy. check(tmp_folder), if given, can
    refuse the written folder (by raising) before it is put in place. A reader sees either no
    folder or the complete one; a crash leaves at most a hidden ``.name.tmp-*`` sibling. With
    overwrite, an existing folder is moved aside first and deleted after the rename.
    """
    from .errors import CheckpointError

    folder = Path(folder)
    if folder.exists() and not overwrite and (not folder.is_dir() or any(folder.iterdir())):
        raise CheckpointError(f"{folder} already exists and is not empty; choose a new output folder "
                              f"(or pass --overwrite)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        for name, content in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, (bytes, bytearray, memoryview)):
                with atomic_write(tmp / name) as f:
                    f.write(content)
            else:
                with open(content, "rb") as src, atomic_write(tmp / name) as f:
                    shutil.copyfileobj(src, f)
        if check is not None:
            check(tmp)
        os.chmod(tmp, 0o777 & ~_umask())
        old = None
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            os.rename(folder, old)
        os.rename(tmp, folder)
        _fsync_directory(folder.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
