"""What a crash or a second writer could see of a checkpoint write (awq_ref.quant.checkpoint):
every file reaches the disk before the folder's name does, no file descriptor is left open, and
a live writer's folders are never taken for a killed one's. Failing file systems:
test_write_failures.py; single files: test_files.py."""

import os
from pathlib import Path

import pytest
from test_checkpoint import tiny_quantized

from awq_ref.files import atomic_write_text, library_path
from awq_ref.quant import checkpoint
from awq_ref.quant.checkpoint import load_quantized_model, save_quantized

PROC_FD = Path("/proc/self/fd")


class _Tokenizer:
    """The one method save_quantized calls on a tokenizer."""

    def save_pretrained(self, folder):
        (Path(folder) / "tokenizer.json").write_text("{}")
        (Path(folder) / "tokenizer_config.json").write_text("{}")


@pytest.mark.parametrize("tokenizer", [None, _Tokenizer()], ids=["model", "with-tokenizer"])
def test_every_file_is_fsynced_before_the_rename_and_the_folders_after(tmp_path, monkeypatch,
                                                                       tokenizer):
    """A power loss after the rename must not leave the name on unwritten data: each shard, the
    index, config.json and the tokenizer's files are fsynced while still in the temporary
    folder, the folder itself before its rename, and the parent (the rename) after it."""
    out = tmp_path / "ckpt"
    events, real_fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (
        events.append((os.fstat(fd).st_ino, out.exists())), real_fsync(fd))[1])
    save_quantized(tiny_quantized(), out, tokenizer=tokenizer, max_shard_bytes=20_000)
    files = sorted(out.iterdir())
    assert len([p for p in files if p.suffix == ".safetensors"]) > 1  # sharded, with an index
    assert {"config.json", checkpoint.INDEX_NAME} <= {p.name for p in files}
    assert ("tokenizer.json" in {p.name for p in files}) is (tokenizer is not None)
    before = {ino for ino, renamed in events if not renamed}
    after = {ino for ino, renamed in events if renamed}
    assert [p.name for p in files if p.stat().st_ino not in before] == []
    assert out.stat().st_ino in before  # the folder's entries, as the temporary
    assert tmp_path.stat().st_ino in after


@pytest.mark.skipif(not PROC_FD.is_dir(), reason="counts open files in /proc/self/fd (Linux)")
def test_writes_and_reads_leave_no_file_open(tmp_path):
    """Each folder lock and fsync opens a descriptor: one left open per write would exhaust
    a long-lived process's limit (a server saving checkpoints, a sweep)."""
    model = tiny_quantized()
    save_quantized(model, tmp_path / "warm")  # imports and caches opened once
    (tmp_path / ".ckpt.tmp-k1ll3d00").mkdir()  # a killed writer's: locked, then removed
    name = tmp_path / os.fsdecode(b"caf\xe9.txt")  # not UTF-8: read through /proc/self/fd
    name.write_text("x")
    before = len(list(PROC_FD.iterdir()))
    out = save_quantized(model, tmp_path / "ckpt")
    save_quantized(model, out, overwrite=True)  # the old one set aside under a lock
    load_quantized_model(out)
    atomic_write_text(tmp_path / "notes.txt", "text")
    with library_path(name) as opened:
        assert Path(opened).read_text() == "x"
    assert len(list(PROC_FD.iterdir())) == before
    assert not (tmp_path / ".ckpt.tmp-k1ll3d00").exists()


def test_a_live_writers_folders_are_not_taken_for_a_killed_ones(tmp_path, monkeypatch):
    """The temporary folder of a write in progress, and the old checkpoint it has set aside,
    are locked while it runs: the sweep of killed writers' leftovers (any later write of the
    name) must pass them by."""
    out = tmp_path / "ckpt"
    with checkpoint.atomic_folder(out) as tmp:
        assert list(checkpoint._abandoned(out, "tmp")) == []
        (tmp / "x").write_text("x")
    seen, real_rename = [], os.rename

    def rename(src, dst):
        if Path(src) != out:  # the new folder onto the name: the old one is set aside by now
            seen.append(list(checkpoint._abandoned(out, "old")))
        real_rename(src, dst)

    monkeypatch.setattr(checkpoint.os, "rename", rename)
    with checkpoint.atomic_folder(out):
        pass
    assert seen == [[]]


def test_the_folder_writer_itself_never_replaces_a_file_and_makes_the_parents(tmp_path):
    """atomic_folder checks its target as save_quantized does (the streamed writer and
    tools/make_random_checkpoint.py call it after long work, or without that check)."""
    (tmp_path / "model.gguf").write_bytes(b"the user's model")
    with (pytest.raises(FileExistsError, match="is not a folder"),
          checkpoint.atomic_folder(tmp_path / "model.gguf")):
        pass
    assert (tmp_path / "model.gguf").read_bytes() == b"the user's model"
    out = save_quantized(tiny_quantized(), tmp_path / "new" / "runs" / "ckpt")
    assert (out / "config.json").is_file()
