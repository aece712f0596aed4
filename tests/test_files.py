"""atomic_write_text: the whole new text or the old file, never a torn one."""

import os

import pytest

from awq_ref.files import atomic_write_text


def test_writes_and_replaces(tmp_path):
    path = tmp_path / "sub" / "result.json"
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
