"""Write a Llama-shaped HF checkpoint folder with random weights, shard by shard.

    PYTHONPATH=. python tools/make_random_checkpoint.py --preset llama-2-7b --out /tmp/rand7b
    PYTHONPATH=. python tools/make_random_checkpoint.py --preset mid-1b --out /tmp/rand1b \
        --max-shard-mb 500

Tensors are generated in state order, one shard at a time (each <= --max-shard-mb, a tensor
larger than that alone), written with safetensors and released, so the writer needs about one
shard of memory whatever the model size. Linear weights ~ N(0, std^2) (std 0.02 by default),
norm weights 1, in --dtype (fp16 by default). Each tensor has its own seed (seed + its index), so
the same arguments always write the same bytes. Output: config.json, model-0000i-of-0000n
shards, model.safetensors.index.json; no tokenizer (pass calibration tokens, or copy one in).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from tool_cli import count, exit_status  # tools/, beside this script

from awq_ref.cli_common import seed as seed_arg
from awq_ref.config import LlamaConfig
from awq_ref.files import new_mode
from awq_ref.loaders.state_dict import expected_shapes
from awq_ref.quant.checkpoint import atomic_folder


def _shape(vocab: int, dim: int, ffn: int, layers: int, heads: int, kv_heads: int,
           max_pos: int = 2048) -> dict[str, int]:
    return {"vocab_size": vocab, "hidden_size": dim, "intermediate_size": ffn,
            "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "max_position_embeddings": max_pos}


PRESETS = {  # name -> LlamaConfig fields (widths multiples of 128: packable with G = 128)
    "tiny": _shape(512, 128, 384, 4, 4, 2),
    "tiny-qwen2": {**_shape(512, 128, 384, 4, 4, 2), "model_type": "qwen2"},  # + q, k, v biases
    "tiny-qwen3": {**_shape(512, 128, 384, 4, 4, 2), "model_type": "qwen3",
                   "head_dim": 64},  # + q/k norms
    # a window of 1024 positions: longer sequences are refused (windowed attention not implemented)
    "tiny-mistral": {**_shape(512, 128, 384, 4, 4, 2), "model_type": "mistral",
                     "sliding_window": 1024},
    "mid-1b": _shape(32000, 2048, 5632, 8, 16, 16),
    "llama-2-7b": _shape(32000, 4096, 11008, 32, 32, 32, 4096),
    "llama-2-13b": _shape(32000, 5120, 13824, 40, 40, 40, 4096),
}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def random_tensor(name: str, shape: tuple[int, ...], index: int, seed: int, std: float,
                  dtype: torch.dtype) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    gen = torch.Generator().manual_seed((seed + index) % 2**64)  # torch's seeds: 0..2**64-1
    return (torch.randn(shape, generator=gen) * std).to(dtype)


def shard_plan(shapes: dict[str, tuple[int, ...]], elem: int, max_bytes: int) -> list[list[str]]:
    """Tensor names per shard, greedily in state order (save_quantized's rule)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = elem * int(torch.Size(shape).numel())
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def write_random_checkpoint(config: LlamaConfig, out: str | Path,
                            dtype: torch.dtype = torch.float16,
                            seed: int = 0, std: float = 0.02, max_shard_bytes: int = 2 * 10**9
                            ) -> Path:
    """Write the folder (see the module docstring); returns its path. `out` must not exist."""
    out = Path(out)
    if out.exists():
        raise ValueError(f"{out} already exists")
    with atomic_folder(out) as tmp:  # a crash leaves no half-written folder in the way
        (tmp / "config.json").write_text(json.dumps(
            {**config.to_hf_dict(), "torch_dtype": str(dtype).removeprefix("torch.")}, indent=2))
        shapes = expected_shapes(config)
        order = {name: i for i, name in enumerate(shapes)}
        elem = torch.tensor([], dtype=dtype).element_size()
        plan = shard_plan(shapes, elem, max_shard_bytes)
        weight_map = {}
        for i, names in enumerate(plan):
            fname = f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
            tensors = {n: random_tensor(n, shapes[n], order[n], seed, std, dtype) for n in names}
            save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
            os.chmod(tmp / fname, new_mode())  # safetensors writes it private (0600)
            del tensors  # one shard in memory at a time
            weight_map.update(dict.fromkeys(names, fname))
        total = sum(elem * int(torch.Size(s).numel()) for s in shapes.values())
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return out


def _count(n: int) -> str:
    """n with a unit that keeps three digits: 612 K, 1.68 M, 6.74 G."""
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} "


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=count, default=None, help="override num_hidden_layers")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float16")
    ap.add_argument("--seed", type=seed_arg, default=0)
    ap.add_argument("--std", type=float, default=0.02)
    ap.add_argument("--max-shard-mb", type=count, default=2000)
    args = ap.parse_args(argv)
    if not (math.isfinite(args.std) and args.std >= 0):  # nan or inf: a checkpoint of nan
        ap.error(f"--std must be a finite number >= 0, got {args.std}")
    fields = dict(PRESETS[args.preset])
    if args.layers is not None:
        fields["num_hidden_layers"] = args.layers
    config = LlamaConfig(**fields)
    out = write_random_checkpoint(config, args.out, DTYPES[args.dtype], args.seed, args.std,
                                  args.max_shard_mb * 10**6)
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"{args.preset}: {_count(config.weight_count())} weights, {_count(size)}B written to "
          f"{out}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(exit_status(main))
