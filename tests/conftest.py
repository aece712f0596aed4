"""Shared fixtures: the real test material beside the repo (../shared/data), the default model."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
# The tools import their sibling modules by name (tool_cli, figures), as a script run from
# tools/ finds them; tests import the tools (and load them by path) the same way.
sys.path.insert(0, str(REPO / "tools"))


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"test material {path} is absent (it lives beside the repo in ../shared/data)")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data relative to the repo root; the test is skipped when it is absent."""
    return _need(SHARED_DATA)


@pytest.fixture(scope="session")
def stories_dir(shared_data: Path) -> Path:
    return _need(shared_data / "stories260K")


@pytest.fixture(scope="session")
def wikitext_test(shared_data: Path) -> Path:
    return _need(shared_data / "text" / "wikitext-2-raw" / "wiki.test.raw")


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    """The default model's GGUF (SmolLM2-135M-Instruct Q4_1), downloaded on first use."""
    from awq_ref.loaders import default_gguf_path

    try:
        return default_gguf_path()
    except ValueError as e:  # no network and no cached copy
        pytest.skip(f"default model unavailable: {e}")


@pytest.fixture(autouse=True, scope="session")
def usual_umask():
    """Written files take their mode from the umask (files.new_mode): the tests that check
    modes expect the usual 022, whatever the machine's; one test sets its own."""
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture
def one_thread():
    """One torch thread: CPU reductions are split by thread (results depend on the count), and
    tiny matmuls on a shared machine run faster and steadier on one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory, wikitext_test):
    """A 1000-piece BPE SentencePiece model (<unk> 0, <s> 1, </s> 2) trained on WikiText with
    the library's own trainer: (its folder, the library's processor)."""
    spm = pytest.importorskip("sentencepiece")
    folder = tmp_path_factory.mktemp("spm")
    text = wikitext_test.read_bytes().replace(b"\r\n", b"\n").decode()[:400_000]
    (folder / "train.txt").write_text(text, encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(folder / "train.txt"), model_prefix=str(folder / "tokenizer"), vocab_size=1000,
        model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    (folder / "train.txt").unlink()
    return folder, sp
