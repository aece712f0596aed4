"""Files written whole or not at all (a crash mid-write never leaves half a file), and text
files read with errors that name them."""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Let `write(tmp)` fill a temporary file beside `path`, fsync it, rename it over `path`.

    The rename is atomic on POSIX: a reader sees the old file or the new one, never a torn one;
    the fsync before it means a power loss cannot leave the new name on unwritten data, and the
    folder's fsync after it that the rename itself survives one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        fsync_path(tmp)
        os.chmod(tmp, new_mode())  # mkstemp makes it private; these are ordinary files
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        error = write_error(e, path, tmp)
        if error is None:
            raise
        raise error from e
    fsync_path(path.parent)
    return path


def write_error(e: BaseException, path: Path, tmp: Path) -> OSError | None:
    """The OSError to report for a write of `path` (through its temporary `tmp`) that failed
    with `e`: one naming `path`, not the temporary, for an OSError or for a library's error
    that carries one in words (safetensors' and tokenizers' "... (os error 28)", a disk full);
    None for anything else (a bug or a bad value, raised as it is)."""
    if isinstance(e, OSError):
        code, where = e.errno, e.filename
    else:  # not our own ValueErrors / TypeErrors (a bad value), whatever their words
        library = isinstance(e, Exception) and not isinstance(e, (ValueError, TypeError))
        found = re.search(r"\(os error (\d+)\)", str(e)) if library else None
        code, where = (int(found.group(1)) if found else None), None
    if code is None:
        return None
    where = None if where is None else os.fsdecode(where)
    other = (f" (at {where})" if where is not None and Path(where) != path
             and not where.startswith(str(tmp)) else "")
    return OSError(code, f"cannot write {path}: {os.strerror(code)}{other}")


# atomic_write's and atomic_folder's temporary names: "." + name + ".tmp-" + 8 random characters
TEMPORARY_EXTRA = 14


def check_writable(path: str | Path, flag: str, extra: int = TEMPORARY_EXTRA) -> None:
    """ValueError, before any work, if `path` could not be written where it is named: its
    nearest existing folder is a file, not writable (permissions, a read-only file system), or
    a name on the way (with `extra` bytes: a safe write's temporary name has 14 more) is past
    the file system's limit. What only the writes find out (a disk full) they report, naming
    the path (write_error)."""
    path = Path(path).absolute()
    if path.is_symlink() and not path.exists():  # an atomic write would replace the link
        raise ValueError(f"{flag} {path} is a link to nothing; name the file itself")
    if path.is_dir():  # an existing folder (a work folder resumed): itself must be writable
        parent, names = path, ()
    else:
        parent = next(p for p in path.parents if p.exists() or p.is_symlink())
        names = path.relative_to(parent).parts
    if parent.is_symlink() and not parent.exists():
        raise ValueError(f"{flag} {path}: {parent} is a link to nothing")
    if not parent.is_dir():
        raise ValueError(f"{flag} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: {parent} is not writable (permissions, or a read-only "
                         "file system)")
    try:
        limit = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    for part in names:
        if len(os.fsencode(part)) + extra > limit:
            raise ValueError(f"{flag} {path}: the name {part[:40]!r}... is too long (at most "
                             f"{limit - extra} bytes here"
                             + (", with room for a safe write's temporary name)" if extra
                                else ")"))


def flock_exclusive(fd: int, blocking: bool) -> bool | None:
    """flock(fd) exclusively: True once held, False if another process holds it
    (blocking=False), None where there are no locks (not POSIX, or a file system without them,
    e.g. some NFS: ENOLCK, Lustre without its flock option: ENOSYS); the lock is released when
    fd is closed or the process ends."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS):
            raise
        return None
    return True


def new_mode(folder: bool = False) -> int:
    """The mode open() / mkdir() give a new file (0o666) or folder (0o777) under this
    process's umask (0o644 / 0o755 with the usual 022; private with 077): for what mkstemp,
    mkdtemp and safetensors create private (0600)."""
    mask = 0o022
    try:  # read, not set: os.umask can only be read by changing it for the whole process
        status = Path("/proc/self/status").read_text()
        mask = int(next(line.split()[1] for line in status.splitlines()
                        if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError, IndexError):
        pass
    return (0o777 if folder else 0o666) & ~mask


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a folder's entries (a rename in it), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def parse_json(text: str | bytes, where: str) -> Any:
    """json.loads, with every way hostile text fails as a ValueError naming `where`: invalid JSON
    or UTF-8 (JSONDecodeError, UnicodeDecodeError: ValueErrors), nesting deeper than the
    parser's recursion limit (RecursionError), an integer past Python's 4300-digit limit."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{where}: not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None


def atomic_write_text(path: str | Path, text: str) -> Path:
    """`text` (UTF-8) written to `path` with atomic_write."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def read_text(path: str | Path) -> str:
    """A UTF-8 text file with CRLF line endings turned into LF (WikiText-2 ships CRLF)."""
    path = Path(path)
    if path.is_char_device() or path.is_block_device():  # /dev/zero would never end
        raise ValueError(f"{path}: a device, not a text file")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{path}: text file not found") from None
    except OSError as e:  # a folder, no permission, ...
        raise ValueError(f"{path}: cannot read the text file ({e.strerror or e})") from None
    try:
        return raw.replace(b"\r\n", b"\n").decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from e


@contextmanager
def library_path(path: str | Path) -> Iterator[str]:
    """`path` as a str that safetensors' reader takes: its Rust binding accepts only valid UTF-8,
    and a file name may hold other bytes (a Latin-1 name; any non-ASCII one under a non-UTF-8
    locale), which reach Python as surrogate escapes. Such a file is opened here and named as
    /proc/self/fd/N (Linux) while the block runs; other paths are passed as they are."""
    text, proc = str(path), Path("/proc/self/fd")
    try:
        text.encode("utf-8")
        utf8 = True
    except UnicodeEncodeError:
        utf8 = False
    if utf8 or not proc.is_dir():  # outside the except: errors of the block get no context
        yield text
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        yield str(proc / str(fd))
    finally:
        os.close(fd)
