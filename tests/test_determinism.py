"""Same inputs and seed -> the same checkpoint bytes: two full AWQ runs (search, apply, RTN,
pack, save), in-process, compared file by file."""

from __future__ import annotations

from pathlib import Path

import torch

from awq_ref.api import quantize
from awq_ref.awq.calibration import random_windows
from awq_ref.config import LlamaConfig
from awq_ref.model import Llama
from awq_ref.quant.checkpoint import save_quantized

TINY = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2}



def quantized_folder(out: Path, seed: int = 0) -> dict[str, bytes]:
    torch.manual_seed(seed)
    model = Llama(LlamaConfig(**TINY)).eval()
    stream = torch.randint(0, TINY["vocab_size"], (4096,),
                           generator=torch.Generator().manual_seed(seed))
    calib = random_windows(stream, n=8, seqlen=64, seed=seed)  # (8, 64)
    q = quantize(model, method="awq", group_size=32, calib_tokens=calib, n_grid=8,
                 progress=False, inplace=True)
    save_quantized(q, out)
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_same_seed_same_bytes(tmp_path, one_thread):
    first = quantized_folder(tmp_path / "a")
    second = quantized_folder(tmp_path / "b")
    assert sorted(first) == ["config.json", "model.safetensors"]
    assert first == second


def test_other_seed_other_bytes(tmp_path, one_thread):
    """The comparison above can fail: another seed (model and calibration) changes the bytes."""
    assert quantized_folder(tmp_path / "a", seed=0) != quantized_folder(tmp_path / "b", seed=1)
