"""tools/make_random_checkpoint.py: a sharded random Llama checkpoint any loader reads, written
shard by shard, the same bytes for the same arguments."""

from __future__ import annotations

import json

import make_random_checkpoint as mrc  # tools/ is on sys.path (conftest.py)
import torch

from awq_ref.api import quantize
from awq_ref.loaders import load_model


def test_tiny_preset_loads_sharded(tmp_path):
    out = tmp_path / "rand"
    assert mrc.main(["--preset", "tiny", "--out", str(out), "--max-shard-mb", "1"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    model = load_model(out, dtype=torch.float32)
    assert model.config.hidden_size == 128 and model.config.num_hidden_layers == 4
    w = model.model.layers[0].mlp.up_proj.weight
    assert 0.015 < w.std().item() < 0.025
    assert torch.equal(model.model.norm.weight, torch.ones(128))
    q = quantize(model, group_size=128)  # the preset's widths pack
    assert torch.isfinite(q(torch.arange(16)[None])).all()


def test_same_arguments_same_bytes(tmp_path):
    for name in ("a", "b"):
        mrc.main(["--preset", "tiny", "--layers", "2", "--out", str(tmp_path / name)])
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
               for f in files)


def test_shard_plan_bounds_memory():
    """Every shard but one holding a single oversized tensor stays within the limit."""
    config = mrc.LlamaConfig(**mrc.PRESETS["llama-2-7b"])
    shapes = mrc.expected_shapes(config)
    plan = mrc.shard_plan(shapes, 2, 10**9)
    sizes = [sum(2 * torch.Size(shapes[n]).numel() for n in names) for names in plan]
    assert max(sizes) <= 10**9 and sum(len(p) for p in plan) == len(shapes)
    assert sum(sizes) == sum(2 * torch.Size(s).numel() for s in shapes.values())  # 13.5 GB
