"""AwqResult: what the search found (scales and clip ranges), saved as safetensors.

Tensor names in the file:
    scale.<prev>       (C,)        C = prev's output channels, e.g. scale.model.layers.3.input_layernorm
    clip_lo.<linear>   (N, K/G)    lower clip bound per output channel and group
    clip_hi.<linear>   (N, K/G)    upper clip bound
The metadata holds the QuantSpec the search used (bits, group_size, zero_point) and the
AwqConfig as JSON, so a result documents how it was made.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from awq_ref.quant.quantizer import QuantSpec


@dataclass
class AwqResult:
    spec: QuantSpec
    scales: dict[str, torch.Tensor] = field(default_factory=dict)  # prev op name -> s (C,)
    clips: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # (lo, hi)
    info: dict[str, str] = field(default_factory=dict)  # free-form provenance (config JSON, ...)
    search: list[dict] = field(default_factory=list)  # per group: prev, ratio, loss, loss0

    def save(self, path: str | Path) -> None:
        tensors = {f"scale.{k}": v.detach().float().cpu().contiguous() for k, v in self.scales.items()}
        for k, (lo, hi) in self.clips.items():
            tensors[f"clip_lo.{k}"] = lo.detach().float().cpu().contiguous()
            tensors[f"clip_hi.{k}"] = hi.detach().float().cpu().contiguous()
        meta = {"format": "awq_ref.AwqResult/1", "bits": str(self.spec.bits),
                "group_size": str(self.spec.group_size),
                "zero_point": json.dumps(self.spec.zero_point), "info": json.dumps(self.info)}
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> AwqResult:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"{path}: AwqResult file not found")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != "awq_ref.AwqResult/1":
            raise ValueError(f"{path}: not an AwqResult file (metadata format={meta.get('format')!r})")
        spec = QuantSpec(int(meta["bits"]), int(meta["group_size"]), json.loads(meta["zero_point"]))
        tensors = load_file(str(path))
        result = cls(spec=spec, info=json.loads(meta.get("info", "{}")))
        for key, t in tensors.items():
            kind, name = key.split(".", 1)
            if kind == "scale":
                result.scales[name] = t
            elif kind == "clip_lo":
                result.clips[name] = (t, tensors[f"clip_hi.{name}"])
            elif kind != "clip_hi":
                raise ValueError(f"{path}: unexpected tensor {key!r}")
        return result
