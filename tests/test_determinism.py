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


def test_the_scale_search_losses_do_not_depend_on_the_thread_count():
    """torch splits a long float32 sum between threads, so its last bits moved with the thread
    count (up to 2.4e-7 relative): a near-tie of two scale candidates was decided differently
    on 1 and 2 threads. Both losses now sum each row, then the rows' sums exactly."""
    from torch import nn

    from awq_ref.awq.search_scale import gram_loss, module_loss
    from awq_ref.quant.quantizer import QuantSpec

    spec = QuantSpec(4, 64)
    threads = torch.get_num_threads()
    mlp = nn.Sequential(nn.Linear(256, 512, bias=False), nn.SiLU(), nn.Linear(512, 256))
    try:
        for seed in range(6):
            gen = torch.Generator().manual_seed(seed)
            w = torch.randn(768, 256, generator=gen) * 0.02  # (N, K): 196,608 errors summed
            x = torch.randn(1024, 256, generator=gen)
            s = 1 + 0.1 * torch.rand(256, generator=gen)
            inputs = torch.randn(4, 64, 256, generator=gen)
            with torch.no_grad():
                reference = mlp(inputs)
            loss = module_loss(mlp, {"0.weight": mlp[0].weight.detach()}, spec, inputs,
                               reference)
            got = []
            for n in (1, 2):
                torch.set_num_threads(n)
                got.append((gram_loss(w, x.T @ x, 1024, s, spec), loss(s)))
            assert got[0] == got[1], (seed, got)
    finally:
        torch.set_num_threads(threads)


def test_the_saved_search_does_not_record_the_progress_bar():
    """The same search from the CLI (bar shown) and from the API with progress=False saved
    different bytes: the settings recorded in the result held the bar's switch."""
    import json

    from awq_ref.awq.pipeline import AwqConfig, search_awq
    from awq_ref.quant.quantizer import QuantSpec

    torch.manual_seed(0)
    model = Llama(LlamaConfig(**{**TINY, "num_hidden_layers": 1})).eval()
    calib = torch.randint(0, TINY["vocab_size"], (2, 32),
                          generator=torch.Generator().manual_seed(0))
    infos = [search_awq(model, calib, QuantSpec(4, 32), AwqConfig(n_grid=4, progress=shown)).info
             for shown in (True, False)]
    assert infos[0]["config"] == infos[1]["config"]
    assert "progress" not in json.loads(infos[0]["config"])
