"""Writes meeting a failing file system (a review on a tmpfs filled part-way and remounted
read-only, 2026-12-07): a replaced checkpoint's old copy never lost, a file never replaced by a
folder, killed runs' temporaries swept (and nothing else), file systems without locks, a work
folder that cannot be emptied after success. Output checks before the work: test_files.py."""

import os

import pytest
import torch
from test_checkpoint import logits, tiny_quantized

from awq_ref.awq.resume import Progress
from awq_ref.quant.checkpoint import load_quantized_model, save_quantized


def test_a_failed_or_killed_replacement_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    """overwrite=True renames the old folder aside, then the new one in: a failure of the second
    rename (a file system gone read-only) left neither under the name, the old one hidden in
    .ckpt.old-*/x for good. Now it is renamed back; one a kill left there is put back by the
    next write of the name (or deleted, if the new one had arrived)."""
    import errno
    import os as os_module

    from awq_ref.quant import checkpoint

    first, second = tiny_quantized(seed=0), tiny_quantized(seed=1)
    out = save_quantized(first, tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    renames, real = [], os_module.rename

    def rename(src, dst):
        renames.append(dst)
        if len(renames) == 2:  # the new folder onto the name
            raise OSError(errno.EROFS, "Read-only file system")
        real(src, dst)

    monkeypatch.setattr(checkpoint.os, "rename", rename)
    with pytest.raises(OSError, match=f"cannot write {out}: Read-only file system"):
        save_quantized(second, out, overwrite=True)
    monkeypatch.setattr(checkpoint.os, "rename", real)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    # killed between the two renames: the old one set aside, the name missing
    aside = tmp_path / ".ckpt.old-k1ll3d00"
    aside.mkdir()
    out.rename(aside / "x")
    with pytest.raises(FileExistsError, match="already exists"):  # put back, then refused
        save_quantized(second, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and not aside.exists()
    aside.mkdir()  # a live swap between its renames (it holds the folder's lock): left alone
    out.rename(aside / "x")
    fd = os_module.open(aside, os_module.O_RDONLY)
    try:
        assert checkpoint.flock_exclusive(fd, blocking=False)
        checkpoint.check_out_dir(out, overwrite=True)
        assert (aside / "x").is_dir() and not out.exists()
    finally:
        os_module.close(fd)
    checkpoint.check_out_dir(out, overwrite=True)  # its writer gone (killed): put back
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and not aside.exists()
    aside.mkdir()  # killed after the second rename: the set-aside copy is garbage
    (aside / "x").mkdir()
    save_quantized(second, out, overwrite=True)
    assert torch.equal(logits(load_quantized_model(out)), logits(second))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_overwrite_never_replaces_a_file(tmp_path):
    """overwrite=True replaces a checkpoint folder; a file named by mistake (the source model's
    .gguf) or a dangling link is refused and left as it was."""
    model = tiny_quantized()
    (tmp_path / "model.gguf").write_bytes(b"the user's model")
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    for name in ("model.gguf", "link"):
        with pytest.raises(FileExistsError, match="is not a folder"):
            save_quantized(model, tmp_path / name, overwrite=True)
    assert (tmp_path / "model.gguf").read_bytes() == b"the user's model"
    assert (tmp_path / "link").is_symlink() and len(list(tmp_path.iterdir())) == 2


def test_killed_writes_temporaries_are_removed_once_the_folder_is_held(tmp_path):
    """Every run killed while writing its state (or a streamed shard) left a temporary as large
    as the state, and resuming never removed it (nor safetensors' own .tmpXXXXXX): repeated
    kills could fill the disk. Taken when the next run holds the folder; nothing else, in a
    --work-dir the user shares with other work (their temporaries, another run's in flight)."""
    work = tmp_path / "work"
    (work / "shards").mkdir(parents=True)
    (work / "other.partial").mkdir()
    killed = [work / ".state.safetensors.tmp-a1b2c3d4",
              work / "shards" / ".model-00001-of-00003.safetensors.tmp-x9y8z7w6",
              work / "shards" / ".tmpQ1w2E3"]
    kept = [work / "notes.txt", work / ".tmp-notes", work / ".tmp4pzJRz",
            work / ".results.safetensors.tmp-abcdefgh", work / "shards" / "model.safetensors",
            work / "other.partial" / ".state.safetensors.tmp-k2j3h4g5", work / "state.safetensors"]
    for path in killed + kept:
        path.write_bytes(b"x")
    with Progress(work).hold():
        assert [p for p in killed if p.exists()] == [] and all(p.exists() for p in kept)
        Progress(work).remove()
    assert sorted(p.name for p in work.rglob("*")) == [
        ".results.safetensors.tmp-abcdefgh", ".state.safetensors.tmp-k2j3h4g5", ".tmp-notes",
        ".tmp4pzJRz", "model.safetensors", "notes.txt", "other.partial", "shards"]


def test_a_file_system_without_locks_or_room_for_the_lock(tmp_path, monkeypatch):
    """flock failing with ENOLCK (some NFS) ended every run with "[Errno 37] No locks
    available": now the work folder and a save go on unlocked (and no other writer's temporary
    is ever taken). A lock file that cannot be created (no inodes left) left the empty work
    folder it had just made."""
    import errno
    import fcntl

    from awq_ref.quant.checkpoint import atomic_folder

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    def not_implemented(fd, op):  # Lustre mounted without its flock option
        raise OSError(errno.ENOSYS, "Function not implemented")

    def io_error(fd, op):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(fcntl, "flock", not_implemented)
    with Progress(tmp_path / "lustre").hold():
        pass
    monkeypatch.setattr(fcntl, "flock", io_error)  # any other failure: raised, no empty folder
    with pytest.raises(OSError, match="Input/output"), Progress(tmp_path / "eio").hold():
        pass
    assert not (tmp_path / "eio").exists()
    monkeypatch.setattr(fcntl, "flock", no_locks)
    with Progress(tmp_path / "work").hold():
        assert (tmp_path / "work").is_dir()
    other = tmp_path / ".ckpt.tmp-otherwriter"  # unknowable whether its writer lives: kept
    other.mkdir()
    with atomic_folder(tmp_path / "ckpt") as tmp:
        (tmp / "config.json").write_text("{}")
    assert (tmp_path / "ckpt" / "config.json").exists() and other.is_dir()
    monkeypatch.undo()

    real_open = os.open

    def no_inodes(path, *args):
        if str(path).endswith(".lock"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_open(path, *args)

    monkeypatch.setattr(os, "open", no_inodes)
    with pytest.raises(OSError, match="No space left"), Progress(tmp_path / "new").hold():
        pass
    assert not (tmp_path / "new").exists()


def test_a_work_folder_that_cannot_be_emptied_is_a_note_after_success(tmp_path, monkeypatch,
                                                                      capsys):
    """The checkpoint is complete when the work folder is emptied: a failure there (a file
    system gone read-only) made the whole run report an error, as if nothing had been written."""
    import errno
    import shutil

    work = Progress(tmp_path / "work")
    (work.work_dir / "shards").mkdir(parents=True)
    work.state_path.write_bytes(b"state")

    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(shutil, "rmtree", read_only)
    work.remove([work.work_dir / "shards"])
    assert "could not be emptied (Read-only file system)" in capsys.readouterr().err
    monkeypatch.undo()
    work.remove([work.work_dir / "shards"])
    assert not work.work_dir.exists() and capsys.readouterr().err == ""
