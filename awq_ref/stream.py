"""Streaming quantization: an HF safetensors folder to an AWQ checkpoint, one block at a time.

The model is never built whole. For each decoder block i:
    read its tensors (plain file reads, loaders.lazy) -> fp32 working copy on `device`
    -> AWQ: search_block (capture, scales, clipping; x becomes block i+1's inputs)
    -> QuantLinear.from_linear packs each linear -> shard i of the output, written, released.
Then the embeddings, final norm and lm_head are copied (in `dtype`, by default the
checkpoint's), with config.json (quantization_config as save_quantized writes it), the shard
index and the tokenizer files. Peak memory: one block in fp32, its Gram matrices (K, K) per
scaling group, the calibration activations (B, T, D) and the clip search's chunked temporaries
(CLIP_CHUNK_BYTES).

Resumable like the in-memory search (awq.resume): after every block its shard sits in
`work_dir/shards/` and `work_dir/state.safetensors` holds the next block's inputs; the same
call restarted continues at the next block, and a state made from other inputs (fingerprint)
is refused. The checkpoint appears atomically (temporary folder, then rename) and is tensor for
tensor what `load_model -> quantize -> save_quantized(dtype=<checkpoint dtype>)` writes.

    work_dir/shards/model-0000i-of-0000n.safetensors   block i-1, quantized
    work_dir/state.safetensors                         Progress: next block, hidden (B, T, D)
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from awq_ref.api import METHODS, check_quantizable_config
from awq_ref.awq.calibration import check_calib_tokens
from awq_ref.awq.capture import embed
from awq_ref.awq.pipeline import AwqConfig, fp_linears, search_block
from awq_ref.awq.result import AwqResult
from awq_ref.awq.resume import Progress, fingerprint
from awq_ref.config import LlamaConfig
from awq_ref.files import atomic_write, fsync_path, new_mode
from awq_ref.loaders.hf import read_config_json
from awq_ref.loaders.lazy import LazyTensors, index_safetensors_file
from awq_ref.loaders.state_dict import build_on_meta, check_state_dict, drop_tied_copy
from awq_ref.model import Block, check_token_ids
from awq_ref.quant.checkpoint import (
    CONFIG_DTYPE,
    INDEX_NAME,
    PACKED_SUFFIXES,
    atomic_folder,
    check_out_dir,
    checked_cast,
    quant_config_dict,
    write_json,
    write_shard,
)
from awq_ref.quant.qlinear import QuantLinear, skip_names, skipped
from awq_ref.quant.quantizer import QuantSpec
from awq_ref.tokenizer import tokenizer_file_names

EMPTY_TOKENS = torch.zeros(0, 0, dtype=torch.int64)  # RTN: no calibration


@dataclass(frozen=True)
class Source:
    """An fp checkpoint folder: its config and its tensors, indexed and checked, not loaded."""

    folder: Path
    config: LlamaConfig
    tensors: LazyTensors

    @classmethod
    def open(cls, folder: str | Path) -> Source:
        folder = Path(folder).expanduser().resolve()
        if not folder.is_dir():  # "default", a .gguf or a llama2.c file: not streamable
            raise ValueError(f"{folder}: quantize_folder reads an HF safetensors folder (config."
                             "json and *.safetensors); load other checkpoints whole "
                             "(awq_ref.load_model) and use awq_ref.quantize")
        config_path = folder / "config.json"
        raw = read_config_json(folder)
        if isinstance(raw, dict) and "quantization_config" in raw:
            raise ValueError(f"{folder}: already quantized (config.json has quantization_config)")
        config = LlamaConfig.from_hf_dict(raw, source=str(config_path))
        tensors = LazyTensors(folder)
        # Names, shapes and float dtypes against the config, on meta tensors: no data read.
        check_state_dict(config, {k: v.meta() for k, v in tensors.index.items()}, str(folder))
        if config.tie_word_embeddings and "lm_head.weight" in tensors.index:  # a stored copy
            drop_tied_copy(config, {n: tensors.read(n) for n in ("lm_head.weight",
                                                                 "model.embed_tokens.weight")},
                           str(folder))
        return cls(folder, config, tensors)

    def block(self, i: int, device: torch.device) -> Block:
        """Block i as an fp32 working copy on `device`, read tensor by tensor."""
        with torch.device("meta"):
            block = Block(self.config, i)
        state = {k: self.tensors.read(f"model.layers.{i}.{k}").to(device, torch.float32)
                 for k in block.state_dict()}
        block.load_state_dict(state, assign=True)
        return block.eval()

    def identity(self) -> dict[str, Any]:
        """What names these inputs for the resume fingerprint: path, file sizes and times, and
        samples of every tensor's bytes."""
        files = sorted({info.path for info in self.tensors.index.values()}
                       | {self.folder / "config.json"})
        return {"source": str(self.folder),
                "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files],
                "samples": self.tensors.sample_digest()}


def quantize_folder(src: str | Path, out_dir: str | Path, method: str = "awq", w_bit: int = 4,
                    group_size: int = 128, zero_point: bool = True,
                    calib_tokens: torch.Tensor | None = None,
                    device: str | torch.device = "cpu", work_dir: str | Path | None = None,
                    modules_to_not_convert: Iterable[str] = (), dtype: torch.dtype | None = None,
                    overwrite: bool = False, progress: bool = True, **awq_options: Any) -> Path:
    """Quantize the HF folder `src` into the packed checkpoint folder `out_dir`, block by block.

    method "awq" needs calib_tokens (B, T) (the data-free sampling of `quantize` would need the
    whole model); awq_options are AwqConfig fields (n_grid=..., clip=...). dtype: of the
    unquantized tensors written (embeddings, norms, lm_head, biases, skipped linears); None =
    the checkpoint's embedding dtype. work_dir (default OUT.partial beside out_dir) holds the
    progress; it is removed once the checkpoint is in place. Returns out_dir.
    """
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}; expected one of {METHODS}")
    if method == "rtn" and awq_options:
        raise TypeError(f"method 'rtn' takes no AWQ options, got {sorted(awq_options)}")
    if method == "awq" and calib_tokens is None:
        raise ValueError("streaming AWQ needs calib_tokens (B, T); sampling them from the model "
                         "would need the whole model in memory")
    spec = QuantSpec(bits=w_bit, group_size=group_size, zero_point=zero_point)
    skip = skip_names(modules_to_not_convert, "quantize_folder")
    config = AwqConfig(**awq_options, progress=progress)
    if method == "awq":
        check_calib_tokens(calib_tokens)
    calib = calib_tokens if method == "awq" else EMPTY_TOKENS
    out_dir = Path(out_dir)
    check_out_dir(out_dir, overwrite)
    source = Source.open(src)
    check_token_ids(source.config, calib, "calib_tokens")
    check_quantizable_config(source.config, spec, skip, where="quantize_folder")
    device = torch.device(device)
    dtype = dtype or source.tensors.index["model.embed_tokens.weight"].dtype
    work_dir = Path(work_dir or f"{str(out_dir).rstrip('/')}.partial").resolve()
    if work_dir == source.folder:
        raise ValueError(f"quantize_folder: work_dir {work_dir} is the source folder: the state "
                         "files would sit among the model's; give another folder")
    work = Progress(work_dir,
                    identity={**source.identity(), "method": method, "dtype": str(dtype),
                              "stream": True})
    work.bind(fingerprint(source.config, calib, spec, config, skip, device, work.identity))
    with work.hold(), torch.no_grad():
        _quantize_blocks(source, work, method, spec, calib, config, device, skip, dtype)
        _finish(source, work.work_dir / "shards", out_dir, quant_config_dict(spec, skip), dtype)
        work.remove([work.work_dir / "shards"])  # only now: a crash while finishing can resume
    return out_dir


def shard_name(i: int, n: int) -> str:
    """Shard i (0-based) of n: blocks 0..L-1 are shards 0..L-1, the rest is shard L."""
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _quantize_blocks(source: Source, work: Progress, method: str, spec: QuantSpec,
                     calib: torch.Tensor, config: AwqConfig, device: torch.device,
                     skip: tuple[str, ...], dtype: torch.dtype) -> None:
    """Every block not yet in work_dir/shards: searched (AWQ), packed, written, released."""
    cfg, n_blocks = source.config, source.config.num_hidden_layers
    result = AwqResult(spec=spec)  # this block's scales and clips; `search` logs all blocks
    x = cos = sin = None
    if method == "awq":
        x, cos, sin = _calibration_inputs(source, calib, device)  # (B, T, D), (T, Dh) x 2
    state = work.restore(result)
    first = 0 if state is None else state[0]
    if state is not None and x is not None:
        x.copy_(state[1])
    work.announce(first, config.progress)
    shards = work.work_dir / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    # `with`: the bar is closed on an error too, so the error's line starts a line of its own
    with tqdm(total=n_blocks, initial=first, desc=f"{method} (streamed)", unit="block",
              disable=not config.progress) as bar:
        for i in range(first, n_blocks):
            prefix = f"model.layers.{i}"
            block = source.block(i, device)
            if method == "awq":
                search_block(block, prefix, cfg, x, cos, sin, spec, config, result,
                             fp_linears(block, prefix, skip))
            tensors = block_tensors(block, prefix, spec, skip, dtype)
            del block
            _write_atomic(tensors, shards / shard_name(i, n_blocks + 1))
            del tensors
            work.save(i + 1, result, x if x is not None else torch.zeros(0))
            result.scales.clear()  # folded into the shard just written
            result.clips.clear()
            bar.update(1)


def _calibration_inputs(source: Source, calib: torch.Tensor, device: torch.device
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block 0's inputs x (B, T, D) fp32 and cos, sin (T, Dh), as search_awq computes them,
    from a meta-built model that holds only its embedding table."""
    shell = build_on_meta(source.config)
    weight = source.tensors.read("model.embed_tokens.weight")  # (V, D)
    shell.model.embed_tokens.load_state_dict({"weight": weight}, assign=True)
    x = embed(shell, calib, device)
    cos, sin = (t.to(device) for t in shell.rotary(0, x.shape[1], torch.float32))
    return x, cos, sin


def block_tensors(block: nn.Module, prefix: str, spec: QuantSpec, skip: tuple[str, ...],
                  dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The block's checkpoint tensors: each quantized linear packed (QuantLinear.from_linear),
    everything else (norms, biases, skipped linears) cast to `dtype`; on the CPU."""
    for name, lin in list(block.named_modules()):
        if isinstance(lin, nn.Linear) and not skipped(f"{prefix}.{name}", skip):
            parent, _, child = name.rpartition(".")
            setattr(block.get_submodule(parent), child,
                    QuantLinear.from_linear(lin, spec, f"{prefix}.{name}"))
    return {f"{prefix}.{k}": (v if k.endswith(PACKED_SUFFIXES)
                              else checked_cast(f"{prefix}.{k}", v, dtype))
            .detach().contiguous().cpu() for k, v in block.state_dict().items()}


def _write_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """A shard appears whole or not at all: written beside, fsynced, then renamed."""
    atomic_write(path, lambda tmp: write_shard(tensors, tmp))


def _finish(source: Source, shards: Path, out_dir: Path, quant_config: dict[str, Any],
            dtype: torch.dtype) -> None:
    """The checkpoint folder, built in a temporary folder beside out_dir and renamed into place."""
    with atomic_folder(out_dir) as tmp:
        n = source.config.num_hidden_layers + 1
        for i in range(n - 1):
            _link_or_copy(shards / shard_name(i, n), tmp / shard_name(i, n))
        write_shard(_outer_tensors(source, dtype), tmp / shard_name(n - 1, n))
        _write_index(tmp, [shard_name(i, n) for i in range(n)])
        write_json({**source.config.to_hf_dict(), "torch_dtype": CONFIG_DTYPE,
                    "quantization_config": quant_config}, tmp / "config.json")
        names = tokenizer_file_names(source.folder)  # the tokenizer's files, copied verbatim
        if (source.folder / "tokenizer.bin").is_file():  # a llama2.c tokenizer
            names.append("tokenizer.bin")
        for name in names:
            (tmp / name).parent.mkdir(exist_ok=True)  # additional_chat_templates/
            shutil.copyfile(source.folder / name, tmp / name)
            fsync_path(tmp / name)
        for folder in {(tmp / name).parent for name in names} - {tmp}:
            fsync_path(folder)  # its entries (atomic_folder fsyncs tmp's own)


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link (no copy; the work folder keeps its file until the swap succeeded), or a
    copy where links are impossible (another file system)."""
    if not src.is_file():
        raise ValueError(f"{src}: a finished block's shard is missing from the work folder; "
                         f"delete {src.parent.parent} to start over")
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
        os.chmod(dst, new_mode())
        fsync_path(dst)


def _outer_tensors(source: Source, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Embeddings, final norm and lm_head (not stored when tied, HF's rule) in `dtype`."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not source.config.tie_word_embeddings:
        names.append("lm_head.weight")
    return {n: checked_cast(n, source.tensors.read(n), dtype).contiguous() for n in names}


def _write_index(folder: Path, files: list[str]) -> None:
    """model.safetensors.index.json from the written shards' headers."""
    weight_map, total = {}, 0
    for file in files:
        for name, info in index_safetensors_file(folder / file).items():
            weight_map[name] = file
            total += info.nbytes
    write_json({"metadata": {"total_size": total}, "weight_map": weight_map}, folder / INDEX_NAME)
