"""pytest fixtures of the hostile-input tests (test_hostile_input.py: the fuzz targets,
test_hostile_regressions.py: one test per bug found), which bind them by name: the worker
subprocess, the valid base files, a fresh folder per case."""

from __future__ import annotations

import shutil

import pytest

from .files import Files, base_files, fresh_case
from .worker import Worker


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.stop()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Files:
    """The valid files every target mutates (bytes / parsed objects)."""
    return base_files(tmp_path_factory.mktemp("hostile-base"))


@pytest.fixture
def case(tmp_path_factory):
    """A fresh, empty folder named CASE for each example (function scope is not per example)."""
    root = tmp_path_factory.mktemp("hostile")
    yield lambda: fresh_case(root)
    shutil.rmtree(root, ignore_errors=True)
