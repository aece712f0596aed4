"""The hostile-input worker: a subprocess that loads one (kind, path) at a time under an address
space cap (RLIMIT_AS, baseline + WORKER_SLACK) and an RSS watch, and the pytest side that
drives it (Worker, expect_clean / expect_value_error, the per-target counts).

The pytest side starts this very file as a script with --worker (PYTHONPATH = the repo root);
it imports nothing from tests/, so it needs no tests/ folder on sys.path.
"""

from __future__ import annotations

import os
import pickle
import resource
import select
import subprocess
import sys
import traceback
from collections import Counter
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
CALL_TIMEOUT_S = 20.0  # one load of a tiny file takes milliseconds; this means a hang
WORKER_SLACK = 1 << 30  # address space a load may add to the worker's baseline
RSS_LIMIT_MB = 300  # peak RSS growth of one load of a file of a few KB
CASE = "fuzzcase"  # the case folder's name: every ValueError must name the file or folder


# ---------------------------------------------------------------- worker (subprocess) side

def _check_model(model) -> None:
    from awq_ref.loaders.state_dict import expected_shapes
    from awq_ref.model import Llama

    assert isinstance(model, Llama), type(model)
    cfg = model.config
    state = model.state_dict()
    for name, shape in expected_shapes(cfg).items():
        if name.endswith(".weight") and name in state and state[name].dtype != torch.int32:
            assert tuple(state[name].shape) == shape, (name, state[name].shape, shape)
    assert all(t.device.type == "cpu" for t in state.values())
    with torch.no_grad():
        out = model(torch.tensor([[0, cfg.vocab_size - 1]]))  # (B, T)
    assert out.shape == (1, 2, cfg.vocab_size), out.shape


def _check_tokenizer(tok) -> None:
    ids = tok.encode("Hello world, 123 \u00e9\u4e16!")
    assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids), ids
    assert isinstance(tok.decode(ids), str)
    assert isinstance(tok.decode(ids, skip_special_tokens=True), str)


def _load(kind: str, path: Path) -> None:
    from awq_ref.loaders import load_model, load_tokenizer

    if kind == "model":
        _check_model(load_model(path))
    elif kind == "tokenizer":
        _check_tokenizer(load_tokenizer(path))
    elif kind == "lazy":  # the streaming quantizer's index of a safetensors folder
        from awq_ref.loaders.lazy import LazyTensors

        LazyTensors(path)
    elif kind == "awq_result":
        from awq_ref.awq.result import AwqResult

        AwqResult.load(path)
    elif kind == "text":
        from awq_ref.files import read_text

        read_text(path)
    elif kind == "quantize_check":  # `quantize`'s check from the config alone, before loading
        from awq_ref.api import check_quantizable_config
        from awq_ref.loaders import load_config
        from awq_ref.quant.quantizer import QuantSpec

        config = load_config(path)  # its ValueErrors name the file; None: a quantized folder
        try:
            if config is not None:
                check_quantizable_config(config, QuantSpec(group_size=-1))
        except ValueError:  # a layer that cannot be packed (it names the layer): a clean refusal
            pass
    else:
        raise AssertionError(f"unknown kind {kind!r}")


def _memory_failure(e: BaseException | None) -> bool:
    while e is not None:
        if isinstance(e, MemoryError) or "can't allocate memory" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _run_case(kind: str, path: str) -> tuple[str, str]:
    """(outcome, detail): outcome "ok" or "ValueError" pass; anything else is a failure."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        _load(kind, Path(path))
        outcome = ("ok", "")
    except ValueError as e:
        if _memory_failure(e):
            return "allocation", traceback.format_exc()
        if CASE not in str(e):
            return "unnamed ValueError", traceback.format_exc()
        outcome = ("ValueError", str(e)[:600])
    except BaseException as e:  # noqa: BLE001 (reporting any other exception is the point)
        what = "allocation" if _memory_failure(e) else f"crash ({type(e).__name__})"
        return what, traceback.format_exc()
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024
    if grown > RSS_LIMIT_MB:
        return "allocation", f"peak RSS grew by {grown} MB"
    return outcome


def _worker_main() -> None:
    """Serve (kind, path) requests from stdin, pickled answers on the original stdout."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything a library prints goes to stderr, not into the protocol
    torch.set_num_threads(1)
    import gguf  # noqa: F401  (the test module imported it before the baseline, too)
    import sentencepiece  # noqa: F401
    import tokenizers  # noqa: F401

    import awq_ref.loaders  # noqa: F401  (imports before the baseline is measured)

    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + WORKER_SLACK, resource.RLIM_INFINITY))
    while True:
        try:
            kind, path = pickle.load(sys.stdin.buffer)
        except EOFError:
            return
        answer = ("ok", "") if kind == "ping" else _run_case(kind, path)
        pickle.dump(answer, out)
        out.flush()


# ---------------------------------------------------------------- test (pytest) side

class Worker:
    """One long-lived worker; restarted after a hang or a death."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None

    def _start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker"], cwd=REPO, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.call("ping", "", timeout=120) == ("ok", ""), "worker did not start"

    def call(self, kind: str, path: str | Path, timeout: float = CALL_TIMEOUT_S) -> tuple[str, str]:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        pickle.dump((kind, str(path)), self.proc.stdin)
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.stop()
            return "hang", f"no answer in {timeout} s"
        try:
            return pickle.load(self.proc.stdout)
        except EOFError:
            rc = self.proc.wait()
            self.proc = None
            return "worker died", f"exit status {rc}"

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


COUNTS: Counter = Counter()  # "target outcome" -> cases, printed when the module is done


def print_counts() -> None:
    if COUNTS:
        lines = [f"  {target}: {n}" for target, n in sorted(COUNTS.items())]
        print("\nhostile-input cases per target/outcome:\n" + "\n".join(lines))


def expect_clean(worker: Worker, target: str, kind: str, path: Path) -> None:
    outcome, detail = worker.call(kind, path)
    COUNTS[f"{target} {outcome}"] += 1
    if outcome not in ("ok", "ValueError"):
        pytest.fail(f"{target}: {kind} load of {path}: {outcome}\n{detail}")


def expect_value_error(worker: Worker, kind: str, path: Path, *words: str) -> None:
    outcome, detail = worker.call(kind, path)
    assert outcome == "ValueError", f"{outcome}: {detail}"
    for w in words:
        assert w in detail, detail


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    _worker_main()
