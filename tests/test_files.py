"""atomic_write(_text): the whole new file or the old one, never a torn one."""

import errno
import os
from pathlib import Path

import pytest

from awq_ref.files import atomic_write_text


def test_written_files_and_checkpoints_follow_the_umask(tmp_path):
    """Written 0644 / 0755 whatever the umask: a user's private umask (077) was overridden,
    their checkpoints and results readable by everyone on a shared machine."""
    from awq_ref.quant.checkpoint import atomic_folder

    old = os.umask(0o077)
    try:
        path = atomic_write_text(tmp_path / "private.json", "{}")
        with atomic_folder(tmp_path / "ckpt") as tmp:
            (tmp / "x").write_text("")
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert os.stat(tmp_path / "ckpt").st_mode & 0o777 == 0o700


def test_writes_and_replaces(tmp_path):
    path = tmp_path / "sub" / "deeper" / "result.json"  # folders made as needed
    atomic_write_text(path, "first")
    atomic_write_text(path, "second, longer ünïcode")
    assert path.read_text(encoding="utf-8") == "second, longer ünïcode"
    assert os.stat(path).st_mode & 0o777 == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]


def test_failed_write_keeps_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "result.md"
    path.write_text("old")
    with pytest.raises(TypeError):
        atomic_write_text(path, b"not text")  # fails inside the write
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["result.md"]


def test_writers_of_other_files_go_through_it(tmp_path):
    """An AwqResult and a tokenizer are written with atomic_write: a failing writer keeps the
    old file and leaves no temporary."""
    import torch

    from awq_ref.awq.result import AwqResult
    from awq_ref.files import atomic_write
    from awq_ref.quant.quantizer import QuantSpec

    path = tmp_path / "r.safetensors"
    AwqResult(QuantSpec(4, 32), scales={"a": torch.ones(4)}).save(path)
    assert AwqResult.load(path).scales["a"].tolist() == [1.0] * 4

    def broken(tmp):
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, broken)
    assert AwqResult.load(path).scales["a"].tolist() == [1.0] * 4
    assert [p.name for p in tmp_path.iterdir()] == ["r.safetensors"]


def test_the_temporary_is_fsynced_beside_the_target_then_renamed(tmp_path, monkeypatch):
    """os.replace is atomic only within one file system, and a rename is durable only over data
    already on disk: the new bytes go to a temporary in the target's own folder, which is
    fsynced and then renamed (the same inode) over the target."""
    from awq_ref.files import atomic_write

    path = tmp_path / "result.json"
    path.write_text("old")
    events = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.fstat(fd).st_ino)),
                                                 real_fsync(fd))[1])

    def write(tmp):
        tmp.write_text("new")
        events.append(("write", tmp.parent, os.stat(tmp).st_ino))

    atomic_write(path, write)
    assert path.read_text() == "new"
    (w, folder, inode), *later = events
    assert w == "write" and folder == path.parent
    assert ("fsync", inode) in later and os.stat(path).st_ino == inode


def test_the_folder_is_fsynced_after_the_rename(tmp_path, monkeypatch):
    """A rename lives in the folder's entries: until the folder is flushed, a power cut can bring
    back the old name (or none). The folder's fsync comes after the rename, the file's before."""
    from awq_ref.files import atomic_write_text

    path = tmp_path / "result.json"
    events = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (
        events.append((os.fstat(fd).st_ino, path.exists())), real_fsync(fd))[1])
    atomic_write_text(path, "new")
    (file_inode, before), (folder_inode, after) = events
    assert file_inode == os.stat(path).st_ino and not before
    assert folder_inode == os.stat(tmp_path).st_ino and after


@pytest.mark.parametrize("failure", [
    Exception("Error while serializing: I/O error: No space left on device (os error 28)"),
    OSError(errno.ENOSPC, "No space left on device", "TMP"),
    OSError(errno.EROFS, "Read-only file system", "TMP", None, "OUT")])
def test_a_failed_write_names_the_users_path_not_the_temporary(tmp_path, failure):
    """A disk full under safetensors or tokenizers (their own exceptions, the errno only in
    words) ended in a traceback; an OSError named the hidden temporary. Now an OSError with the
    errno, naming the path the user gave, for atomic_write and atomic_folder alike."""
    from awq_ref.files import atomic_write
    from awq_ref.quant.checkpoint import atomic_folder

    def fail(tmp):
        if isinstance(failure, OSError):
            failure.filename = str(tmp)
        raise failure

    target = tmp_path / "out.safetensors"
    with pytest.raises(OSError) as raised:
        atomic_write(target, fail)
    assert raised.value.errno in (errno.ENOSPC, errno.EROFS)
    assert str(raised.value).startswith(f"[Errno {raised.value.errno}] cannot write {target}: ")
    assert ".tmp-" not in str(raised.value) and os.listdir(tmp_path) == []
    with (pytest.raises(OSError, match=f"cannot write {tmp_path / 'ckpt'}: ") as raised,
          atomic_folder(tmp_path / "ckpt") as tmp):
        fail(tmp)
    assert ".tmp-" not in str(raised.value) and os.listdir(tmp_path) == []


def test_other_failures_of_a_write_are_raised_as_they_are(tmp_path):
    """Only errors that are OS errors become one: a bug or a bad value keeps its type."""
    from awq_ref.files import atomic_write

    def fail(tmp):
        raise ValueError("a bad tensor (os error 28)")  # an OS error's words, not its type

    with pytest.raises(ValueError, match="a bad tensor"):
        atomic_write(tmp_path / "x", fail)
    assert os.listdir(tmp_path) == []


def test_outputs_that_cannot_be_written_are_refused_before_the_work(tmp_path, monkeypatch, capsys):
    """A read-only folder, a file as parent or a name past the file system's limit once the
    safe write's temporary suffix is added: each failed only when the output was written, after
    the whole search or evaluation (a filesystem-failure review)."""
    from awq_ref import cli
    from awq_ref.files import check_writable

    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        check_writable(tmp_path / "file" / "out", "--out")
    longest = 255 - 14
    check_writable(tmp_path / ("a" * longest), "--out")
    with pytest.raises(ValueError, match=f"too long \\(at most {longest} bytes here, with room"):
        check_writable(tmp_path / ("a" * (longest + 1)), "--out")
    check_writable(tmp_path / ("a" * 255), "--work-dir", extra=0)  # made by mkdir alone
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="dangling is a link to nothing"):  # was: after the work
        check_writable(tmp_path / "dangling" / "out", "--out")
    (tmp_path / "linked").symlink_to(tmp_path)  # a link to a folder is that folder
    check_writable(tmp_path / "linked" / "out", "--out")
    (tmp_path / "ro" / "mine").mkdir(parents=True)  # a writable work folder in a read-only one
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: (Path(path).name != "ro"
                                                          and real_access(path, mode)))
    check_writable(tmp_path / "ro" / "mine", "--work-dir", extra=0)  # was refused
    with pytest.raises(ValueError, match="ro is not writable"):
        check_writable(tmp_path / "ro" / "new", "--work-dir", extra=0)
    # as on a read-only mount: looking in is allowed, writing is not
    monkeypatch.setattr(os, "access", lambda path, mode: not mode & os.W_OK)
    with pytest.raises(ValueError, match="is not writable"):
        check_writable(tmp_path / "new" / "out", "--out")
    base = ["quantize", "--model", str(tmp_path / "absent"), "--out"]
    for argv in ([*base, str(tmp_path / "q")],
                 [*base, str(tmp_path / "q"), "--save-result", str(tmp_path / "r.st")]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert "is not writable" in err and "Traceback" not in err


def test_an_error_elsewhere_is_named_beside_the_users_path(tmp_path):
    """An OSError about another file than the target or its temporary (a folder on the way, a
    lock) says where, after the path the user gave."""
    from awq_ref.files import atomic_write

    def fail(tmp):
        raise OSError(errno.EACCES, "Permission denied", "/elsewhere/lock")

    with pytest.raises(OSError,
                       match=r"cannot write .*x: Permission denied \(at /elsewhere/lock\)$"):
        atomic_write(tmp_path / "x", fail)


def test_new_files_get_the_usual_mode_where_the_umask_cannot_be_read(monkeypatch):
    """Without /proc (not Linux) the mode of a new file under the usual umask 022."""
    from awq_ref import files

    def unreadable(self, *args, **kwargs):
        raise OSError(errno.ENOENT, "No such file or directory", str(self))

    monkeypatch.setattr(files.Path, "read_text", unreadable)
    assert (files.new_mode(), files.new_mode(folder=True)) == (0o644, 0o755)
