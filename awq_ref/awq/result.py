"""AwqResult: what the search found (scales and clip ranges), saved as safetensors.

Tensor names in the file:
    scale.<prev>       (C,)        C = prev's output channels,
                                   e.g. scale.model.layers.3.input_layernorm
    clip_lo.<linear>   (N, K/G)    lower clip bound per output channel and group
    clip_hi.<linear>   (N, K/G)    upper clip bound
The metadata holds the QuantSpec the search used (bits, group_size, zero_point) and `info`
(the AwqConfig and the search record as JSON), so a result documents how it was made: one
entry, FORMAT -> that JSON with sorted keys, since safetensors writes several entries in a
random order; without the search's wall time. So the same search gives the same bytes. Files
of the first format (one entry per field) are still read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from awq_ref.files import atomic_write, library_path, parse_json
from awq_ref.quant.quantizer import QuantSpec

FORMAT = "awq_ref.AwqResult/2"
FORMAT_1 = "awq_ref.AwqResult/1"  # metadata entries format, bits, group_size, zero_point, info
UNSAVED_INFO = ("seconds",)  # differs from run to run


@dataclass
class AwqResult:
    spec: QuantSpec
    scales: dict[str, torch.Tensor] = field(default_factory=dict)  # prev op name -> s (C,)
    clips: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # (lo, hi)
    info: dict[str, str] = field(default_factory=dict)  # free-form provenance (config JSON, ...)
    # per group: prev, ratio, loss, loss0; saved as the JSON string info["search"]
    search: list[dict] = field(default_factory=list)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The scales and clip boxes under the file's tensor names (fp32, CPU, contiguous)."""
        def fp32(t: torch.Tensor) -> torch.Tensor:
            return t.detach().float().cpu().contiguous()

        tensors = {f"scale.{k}": fp32(v) for k, v in self.scales.items()}
        for k, (lo, hi) in self.clips.items():
            tensors[f"clip_lo.{k}"], tensors[f"clip_hi.{k}"] = fp32(lo), fp32(hi)
        return tensors

    def add_tensors(self, tensors: dict[str, torch.Tensor], where: str,
                    ignore: tuple[str, ...] = ()) -> None:
        """Read scales and clip boxes back from `to_tensors` names; any other name but those in
        `ignore` is an error (`where` names the file in it)."""
        for key, t in tensors.items():
            kind, _, name = key.partition(".")
            if kind == "scale":
                self.scales[name] = t
            elif kind == "clip_lo" and f"clip_hi.{name}" in tensors:
                self.clips[name] = (t, tensors[f"clip_hi.{name}"])
            elif not (kind == "clip_hi" and f"clip_lo.{name}" in tensors) and key not in ignore:
                raise ValueError(f"{where}: unexpected tensor {key!r}")

    def save(self, path: str | Path) -> None:
        tensors = self.to_tensors()
        record = {"bits": self.spec.bits, "group_size": self.spec.group_size,
                  "zero_point": self.spec.zero_point,
                  "info": {k: v for k, v in self.info.items() if k not in UNSAVED_INFO}}
        meta = {FORMAT: json.dumps(record, sort_keys=True)}
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    @staticmethod
    def is_file(path: str | Path) -> bool:
        """Whether `path` is a file AwqResult.save wrote (its metadata says so)."""
        try:
            with library_path(path) as name, safe_open(name, framework="pt") as f:
                meta = f.metadata() or {}
        except (SafetensorError, OSError):
            return False
        return FORMAT in meta or meta.get("format") == FORMAT_1

    @classmethod
    def load(cls, path: str | Path) -> AwqResult:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"{path}: AwqResult file not found")
        try:
            with library_path(path) as name, safe_open(name, framework="pt") as f:
                meta = f.metadata() or {}
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
        if FORMAT not in meta and meta.get("format") != FORMAT_1:
            raise ValueError(f"{path}: not an AwqResult file "
                             f"(metadata format={meta.get('format')!r})")
        try:
            if FORMAT in meta:
                record = parse_json(meta[FORMAT], f"{path}: metadata")
                bits, group_size, zero_point = (record["bits"], record["group_size"],
                                                record["zero_point"])
                info = record.get("info", {})
            else:
                bits, group_size = int(meta["bits"]), int(meta["group_size"])
                zero_point = parse_json(meta["zero_point"], f"{path}: zero_point")
                info = parse_json(meta.get("info", "{}"), f"{path}: info")
            spec = QuantSpec(bits, group_size, zero_point)
            if not isinstance(info, dict):
                raise TypeError(f"info is a {type(info).__name__}, not an object")
            search = parse_json(info.get("search", "[]"), f"{path}: info's search record")
            if not isinstance(search, list) or not all(isinstance(r, dict) for r in search):
                raise TypeError("info's search record is not a list of objects")
            with library_path(path) as name:
                tensors = load_file(name)
        except KeyError as e:
            raise ValueError(f"{path}: AwqResult metadata lacks {e}") from None
        except (SafetensorError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: corrupt AwqResult file ({e})") from None
        result = cls(spec=spec, info=info, search=search)
        result.add_tensors(tensors, str(path))
        return result
