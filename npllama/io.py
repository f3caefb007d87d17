"""Files in and out: read only what is a regular file, within bounds; write so that a crash never leaves half of one.

Reading. A path named as input may be a FIFO (opening it blocks until a writer comes), a device
(/dev/zero never ends) or a folder. :func:`open_regular` opens without blocking and refuses
anything but a regular file; :func:`read_regular` also bounds the size; :func:`read_json` is the
one JSON reader of npllama (config.json, params.json, the shard index, tokenizer files, training
state), which also refuses JSON nested deeper than any config needs (``MAX_JSON_DEPTH``), where
Python's parser would raise RecursionError.

Writing. Every writer in npllama goes through :func:`atomic_write`: the bytes go to a temporary
file in the destination's directory, are flushed and fsync'd, and only then ``os.replace`` puts
the file in place, which POSIX and Windows both make atomic within one file system. Readers see
either the old file or the new one, never a torn one; on any error the temporary file is removed.
:func:`write_folder` does the same for a whole folder of files (a checkpoint), and
:func:`point_link` for the symbolic link a training run keeps to its newest checkpoint.

What a writer may replace (:func:`output_target`). A rename replaces whatever has the name, so a
writer first looks at it: a file is written only over a regular file or a missing path, a folder
only over a folder or a missing path. A device (``/dev/null``: run as root, a rename would put a
regular file in its place), a FIFO, a socket, or a folder where a file belongs is refused with one
line (an OutputError), and nothing is written. A symbolic link is followed: the file or folder it
points to is replaced, atomically, by a new one written beside it, and the link stays a link (as
``cp`` and a shell's ``>`` write through a link). Missing parent folders are made (``mkdir -p``).

Leftovers. A process killed with SIGKILL runs no cleanup, so its temporary files stay behind.
Their names carry the writer's process id (``.NAME.tmp-PID-XXXX``, ``.NAME.old-PID``,
``.NAME.del-PID``), and :func:`remove_leftovers`, which every writer calls first, removes those
of processes that no longer run; a folder that was moved aside but never replaced
(``.NAME.old-PID`` with no ``NAME``) is moved back instead. A destination that cannot be written
(a read-only folder, a path under a regular file, /proc) is an :class:`~npllama.errors.OutputError`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Mapping

MAX_JSON_BYTES = 256 << 20   # a tokenizer.json of a 256k vocabulary is ~20 MB; configs are kilobytes
MAX_JSON_DEPTH = 64          # configs nest 3 deep, tokenizer.json 6; tokenizers' own parser stops at 128


# ---------------------------------------------------------------------------------------- reading
def open_regular(path: str | os.PathLike, error: type | None = None, what: str = "") -> IO[bytes]:
    """A binary file object for ``path``, which must be a regular file (never blocks on a FIFO).

    error: the NpllamaError subclass to raise (default CheckpointError); what: how to name the
    file in the message (default: its path).
    """
    from .errors import CheckpointError

    error = error or CheckpointError
    name = what or str(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except IsADirectoryError:
        raise error(f"{name}: is a folder, not a file") from None
    except OSError as e:
        raise error(f"{name}: cannot read ({e.strerror or e})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise error(f"{name}: is {kind_of(mode)}, not a regular file; npllama reads only regular files")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def kind_of(mode: int) -> str:
    """What a file's st_mode says it is, as a message names it: "a folder", "a device", ..."""
    return ("a regular file" if stat.S_ISREG(mode) else "a folder" if stat.S_ISDIR(mode)
            else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "a symbolic link" if stat.S_ISLNK(mode)
            else "not a regular file")


def check_regular(path: str | os.PathLike, error: type | None = None, what: str = "") -> int:
    """The size of ``path`` in bytes, after checking it is a regular file (see open_regular)."""
    with open_regular(path, error, what) as f:
        return os.fstat(f.fileno()).st_size


def read_regular(path: str | os.PathLike, limit: int | None = None, error: type | None = None,
                 what: str = "") -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (None: no bound)."""
    from .errors import CheckpointError

    error = error or CheckpointError
    name = what or str(path)
    with open_regular(path, error, what) as f:
        size = os.fstat(f.fileno()).st_size
        if limit is not None and size > limit:
            raise error(f"{name}: {size} bytes, more than the {limit} a file of this kind can need; "
                        f"is it the right file?")
        try:
            data = f.read((size if limit is None else min(size, limit)) + 1)   # read(n) reserves n bytes
        except OSError as e:
            raise error(f"{name}: cannot read ({e.strerror or e})") from None
    if len(data) > size and limit is not None and len(data) > limit:   # grew while we read it
        raise error(f"{name}: more than the {limit} bytes a file of this kind can need")
    return data


def read_json(path: str | os.PathLike, error: type | None = None, what: str = "",
              limit: int = MAX_JSON_BYTES) -> Any:
    """The value of a JSON file (a regular file of at most ``limit`` bytes, UTF-8, nested at most
    MAX_JSON_DEPTH deep), or ``error`` naming the file and what is wrong."""
    from .errors import CheckpointError

    error = error or CheckpointError
    name = what or str(path)
    raw = read_regular(path, limit, error, what)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{name}: not valid JSON (not UTF-8: {e})") from None
    return parse_json(text, name, error)


def parse_json(text: str | bytes, source: str, error: type | None = None) -> Any:
    """json.loads with every failure (syntax, numbers too long to convert, nesting too deep) as ``error``."""
    from .errors import CheckpointError

    error = error or CheckpointError
    try:
        value = json.loads(text)
    except RecursionError:
        raise error(f"{source}: not valid JSON (nested deeper than {MAX_JSON_DEPTH} levels)") from None
    except (ValueError, TypeError) as e:   # JSONDecodeError is a ValueError; so is a 5000-digit number
        raise error(f"{source}: not valid JSON ({e})") from None
    if json_depth(value) > MAX_JSON_DEPTH:
        raise error(f"{source}: not valid JSON for npllama (nested deeper than {MAX_JSON_DEPTH} levels)")
    return value


def json_depth(value: Any) -> int:
    """How deeply lists and objects nest in a parsed JSON value (a scalar: 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, dict):
            children = v.values()
        elif isinstance(v, list):
            children = v
        else:
            continue
        deepest = max(deepest, depth)
        if depth > MAX_JSON_DEPTH:
            return depth
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return deepest


# ---------------------------------------------------------------------------------------- leftovers
_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old|del)-(?P<pid>\d+)(?:-.*)?")


def _process_alive(pid: int) -> bool:
    """Whether a process with this id runs (on this machine); a writer's own id counts as alive."""
    if pid == os.getpid():
        return True
    if os.name != "posix":          # os.kill would terminate it on Windows: keep what we cannot check
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:                 # EPERM: it runs, as another user
        return True
    return True


def remove_leftovers(directory: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Remove what writers killed before they could clean up left in ``directory``; the removed paths.

    Only names of the form ``.NAME.tmp-PID-*``, ``.NAME.old-PID`` and ``.NAME.del-PID`` (for one
    NAME, or any) whose process PID no longer runs are touched. An ``.old`` folder whose NAME is
    missing is the previous version of NAME, moved aside just before the kill: it is moved back.
    """
    directory = Path(directory)
    removed: list[Path] = []
    try:
        children = list(directory.iterdir())
    except OSError:
        return removed
    for child in children:
        m = _LEFTOVER.fullmatch(child.name)
        if m is None or (name is not None and m["name"] != name) or _process_alive(int(m["pid"])):
            continue
        final = directory / m["name"]
        try:
            if m["kind"] == "old" and not os.path.lexists(final):
                os.rename(child, final)
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
            removed.append(child)
        except OSError:
            pass                    # another process cleaned it first, or it is not ours to remove
    return removed


def remove_folder(folder: str | os.PathLike) -> None:
    """Delete a folder so that it is never seen half-deleted: renamed aside first, then removed.

    A kill during the removal leaves a hidden ``.NAME.del-PID`` that remove_leftovers deletes later.
    """
    folder = Path(folder)
    doomed = folder.with_name(f".{folder.name}.del-{os.getpid()}")
    try:
        os.rename(folder, doomed)
    except FileNotFoundError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


# ---------------------------------------------------------------------------------------- writing
def _umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


_DISK_ERRORS = {errno.ENOSPC, errno.EIO, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _output_error(path: Path, e: OSError):
    """An OSError while writing ``path`` as the OutputError that says what to do."""
    from .errors import OutputError

    if isinstance(e, OutputError):
        return e
    reason = e.strerror or str(e)
    hint = {errno.EACCES: "choose a folder you can write to", errno.EPERM: "choose a folder you can write to",
            errno.EROFS: "the file system is read-only; choose another folder",
            errno.ENOTDIR: "a part of the path is a file, not a folder",
            errno.ELOOP: "a symbolic link on the path loops; choose another path",
            errno.ENOSPC: "the disk is full; free some space or choose another disk"}.get(e.errno,
                                                                                            "choose another path")
    return OutputError(f"{path}: cannot write ({reason}){'; ' + hint if hint else ''}")


def output_target(path: str | os.PathLike, folder: bool = False) -> Path:
    """The path a writer of ``path`` replaces: ``path`` itself (absolute), or, where it is a symbolic
    link or lies under one, the path the links lead to (the link stays; what it points to is
    replaced). An OutputError when that is something a writer must not replace: for a file,
    anything but a regular file or nothing (a folder, a device such as /dev/null, a FIFO, a
    socket); for a folder (``folder=True``), anything but a folder or nothing.
    """
    from .errors import OutputError

    path = Path(path)
    target = Path(os.path.realpath(path))
    try:
        mode = os.lstat(target).st_mode
    except (FileNotFoundError, NotADirectoryError):   # nothing there (or a part of the path is a file:
        return target                                  # making its folder says so)
    except OSError as e:                               # no permission to look
        raise _output_error(path, e) from None
    wanted = stat.S_ISDIR(mode) if folder else stat.S_ISREG(mode)
    if not wanted:
        where = "" if target == Path(os.path.abspath(path)) else f" (where the link {path} points: {target})"
        kind = "a symbolic link that loops" if stat.S_ISLNK(mode) else kind_of(mode)
        wants = ("a folder only over a folder (never over a file, device, FIFO or socket)" if folder else
                 "a file only over a regular file (never over a device, FIFO, socket or folder)")
        raise OutputError(f"{path}: is {kind}{where}; npllama writes {wants}; choose another path")
    return target


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary file next to ``path``; on success it replaces ``path`` atomically.

        with atomic_write("weights/model.gguf") as f:
            f.write(data)

    mode: "wb" (default) or "w" (text; encoding defaults to UTF-8). Raising inside the block
    deletes the temporary file and leaves any existing ``path`` untouched. ``path`` must be a
    regular file or missing (output_target: a device, FIFO, socket or folder is refused before
    anything is written); a symbolic link is followed, and missing parent folders are made. An
    OSError of the file system (no permission, no space, a path under a file) becomes an
    OutputError naming ``path``.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write: mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    target = output_target(path)
    directory = make_folder(target.parent, what=path)
    remove_leftovers(directory, target.name)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=directory)
    except OSError as e:
        raise _output_error(path, e) from None
    owned = False   # True once the file object owns (and will close) fd
    theirs = False  # True while the caller's block runs: its own OSErrors are not ours to rename
    try:
        os.chmod(tmp, 0o666 & ~_umask())   # mkstemp makes 0600; give the usual permissions
        if mode == "w":
            f = os.fdopen(fd, "w", encoding=encoding or "utf-8", newline="")
        else:
            f = os.fdopen(fd, "wb")
        owned = True
        with f:
            theirs = True
            yield f
            theirs = False
            f.flush()
            os.fsync(f.fileno())
        output_target(path)                # still a regular file or nothing, after however long the block took
        os.replace(tmp, target)
    except BaseException as e:
        if not owned:
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and (not theirs or e.errno in _DISK_ERRORS):
            raise _output_error(path, e) from None
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


def check_writable(path: str | os.PathLike, folder: bool = False) -> Path:
    """An OutputError, before any work is done, when ``path`` (a file, or a folder with
    ``folder=True``) cannot be written: it is something a writer must not replace
    (output_target), a part of it is a file, or no folder can be made in the nearest existing one
    (tried). Makes nothing; returns the path the writer will replace (links followed)."""
    from .errors import OutputError

    target = output_target(path, folder)
    ancestor = target if os.path.lexists(target) else target.parent
    while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if ancestor != target and not ancestor.is_dir():
        raise OutputError(f"{Path(path).absolute()}: cannot write there ({ancestor} is a file, not a folder); "
                          f"choose another path")
    probe_in = ancestor if ancestor.is_dir() else ancestor.parent
    try:                                       # the real test: make (and remove) a folder there
        os.rmdir(tempfile.mkdtemp(prefix=".npllama-probe-", dir=probe_in))
    except OSError as e:
        raise _output_error(Path(path).absolute(), e) from None
    return target


def make_folder(folder: str | os.PathLike, what: str | os.PathLike | None = None) -> Path:
    """mkdir -p, with an OutputError (not a PermissionError or FileExistsError) when it cannot be made.

    what: the path to name in the error (default: the folder)."""
    folder = Path(folder)
    name = folder if what is None else what
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:        # a file (or FIFO, device ...) of that name: mkdir says "exists"
        from .errors import OutputError
        this = "this folder" if what is None else f"the folder {folder}"
        try:
            kind = kind_of(os.lstat(folder).st_mode)
        except OSError:
            kind = "a file"
        kind = "a file" if kind == "a regular file" else kind
        raise OutputError(f"{name}: cannot make {this} ({kind} of that name exists; choose another path)") from None
    except OSError as e:
        raise _output_error(Path(name), e) from None
    return folder


def write_folder(folder: str | os.PathLike, files: Mapping[str, bytes | os.PathLike], overwrite: bool = False,
                 check: Callable[[Path], None] | None = None) -> Path:
    """Write a whole folder at once: every file lands under a temporary name, then one rename.

    files: name -> bytes, or name -> Path of a file to copy. check(tmp_folder), if given, can
    refuse the written folder (by raising) before it is put in place. A reader sees either no
    folder or the complete one; a crash leaves at most a hidden ``.name.tmp-PID-*`` sibling, which
    the next write_folder next to it removes (remove_leftovers). With overwrite, an existing
    folder is moved aside first and deleted after the rename. ``folder`` must be a folder or
    missing (output_target): a file, device, FIFO or socket there is refused, with or without
    overwrite; a symbolic link is followed (the folder it points to is replaced, the link stays).
    Returns ``folder`` as given.
    """
    from .errors import CheckpointError

    given = Path(folder)
    folder = output_target(given, folder=True)
    if folder.exists() and not overwrite and any(folder.iterdir()):
        raise CheckpointError(f"{given} already exists and is not empty; choose a new output folder "
                              f"(or pass --overwrite)")
    make_folder(folder.parent, what=given)
    remove_leftovers(folder.parent, folder.name)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-{os.getpid()}-", dir=folder.parent))
    except OSError as e:
        raise _output_error(given, e) from None
    try:
        for name, content in files.items():
            _place(tmp / name, content)
        if check is not None:
            check(tmp)
        try:
            os.chmod(tmp, 0o777 & ~_umask())
            output_target(folder, folder=True)     # still a folder or nothing
            old = None
            if os.path.lexists(folder):
                old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
                os.rename(folder, old)
            os.rename(tmp, folder)
        except OSError as e:
            raise _output_error(given, e) from None
        _fsync_directory(folder.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return given


def point_link(link: str | os.PathLike, target: str) -> None:
    """Make ``link`` a symbolic link to ``target`` (a name relative to the link's folder), replaced
    atomically: readers see the old link or the new one. An OutputError when ``link`` is anything
    but a symbolic link or missing (a folder or file someone put there is never replaced)."""
    from .errors import OutputError

    link = Path(link)
    try:
        mode = os.lstat(link).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as e:
        raise _output_error(link, e) from None
    if mode is not None and not stat.S_ISLNK(mode):
        raise OutputError(f"{link}: is {kind_of(mode)}, where npllama keeps a symbolic link; move it away "
                          f"and run again")
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}-link")
    try:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.symlink(target, tmp)
        os.replace(tmp, link)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise _output_error(link, e) from None


def _place(path: Path, content: bytes | os.PathLike) -> None:
    """One file of write_folder: bytes written, or a file copied (a missing source stays an OSError)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _output_error(path.parent, e) from None
    if isinstance(content, (bytes, bytearray, memoryview)):
        with atomic_write(path) as f:
            f.write(content)
    else:
        with open(content, "rb") as src, atomic_write(path) as f:
            shutil.copyfileobj(src, f)
