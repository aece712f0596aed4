"""Quantized checkpoints: an HF-style folder in the AWQ "gemm" format (../shared/design/FORMAT.md).

    out_dir/config.json                   model config + quantization_config
    out_dir/model.safetensors             or model-0000i-of-0000n.safetensors shards
                                          + model.safetensors.index.json
    out_dir/tokenizer files               when a tokenizer is given

Tensors: `<module>.qweight/.qzeros/.scales[/.bias]` for each QuantLinear, everything else
(embeddings, norms, lm_head) under its usual name; a tied lm_head is not stored (HF's rule).
quantization_config = {quant_method: "awq", bits: 4, group_size: G, zero_point, sym (= not
zero_point), version: "gemm", modules_to_not_convert (lm_head first)}; config.json's torch_dtype
is float16 (CONFIG_DTYPE). G = -1 (one group per output channel, G = K) is this project's
extension. With zero_point false the codes are symmetric and qzeros holds the fixed 8.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from awq_ref.config import LlamaConfig
from awq_ref.files import flock_exclusive, fsync_path, new_mode, parse_json, write_error
from awq_ref.fuse import is_fused
from awq_ref.loaders.hf import read_safetensors_folder
from awq_ref.loaders.state_dict import (
    IGNORED_SUFFIXES,
    build_on_meta,
    check_float_dtype,
    check_size_claim,
    drop_tied_copy,
)
from awq_ref.model import Llama
from awq_ref.quant.packing import PACK_BITS, PACK_NUM, check_packed_shapes
from awq_ref.quant.qlinear import QuantLinear, replace_linears, skipped
from awq_ref.quant.quantizer import QuantSpec

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # HF's default "5GB"
WEIGHTS_NAME = "model.safetensors"  # the names awq_ref.loaders.hf reads
INDEX_NAME = "model.safetensors.index.json"
PACKED_SUFFIXES = (".qweight", ".qzeros", ".scales")  # stored as they are (int32, fp16)


# Named first in every modules_to_not_convert we write. transformers 4.x (the versions that load
# AWQ through AutoAWQ, up to 4.51) takes a list as the whole skip list and converts every other
# nn.Linear, lm_head included: from `[]` it built lm_head as a 4-bit layer the checkpoint has no
# tensors for ("newly initialized: lm_head.qweight, ..."), and the model's logits were garbage.
# Only `null` gets its default skips; transformers 5.x adds them to any list (it keeps lm_head
# either way), vLLM never quantizes its lm_head, and awq_ref reads no module outside the decoder
# layers as quantized. docs/checks/transformers_load_check.py loads one with transformers 4.x.
ALWAYS_UNQUANTIZED = ("lm_head",)

# config.json's "torch_dtype" in every checkpoint we write, whatever dtype the embeddings and
# norms are stored in (the CLI keeps the model's, fp32 by default): the dtype the AWQ kernels
# of our readers compute in. vLLM turns a "float32" config into bf16 on Ampere and newer GPUs,
# which its AWQ kernel refuses ("torch.bfloat16 is not supported for quantization method awq"),
# and transformers 5.x would load the model in fp32. Readers cast the stored tensors on load;
# awq_ref loads in the dtype it is asked for (fp32 by default) and ignores this key.
CONFIG_DTYPE = "float16"


# The projections vLLM loads as one fused layer each (qkv_proj, gate_up_proj): it refuses a
# checkpoint where only some of a group are quantized ("Detected some but not all shards ... are
# quantized"), so modules_to_not_convert must name all of a group or none.
SERVED_FUSED = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                ("mlp.gate_proj", "mlp.up_proj"))


def check_fused_skip(num_layers: int, modules_to_not_convert: Iterable[str], where: str) -> None:
    """ValueError if modules_to_not_convert keeps part of a SERVED_FUSED group unquantized."""
    skip = tuple(modules_to_not_convert)
    if not skip:  # nothing kept fp (and no loop over a config's claimed layer count)
        return
    for i in range(num_layers):
        for group in SERVED_FUSED:
            names = [f"model.layers.{i}.{n}" for n in group]
            kept = [n for n in names if skipped(n, skip)]
            if 0 < len(kept) < len(names):
                short = "/".join(n.rsplit(".", 1)[1] for n in names)
                raise ValueError(
                    f"{where}: modules_to_not_convert={list(skip)} keeps {kept} unquantized but "
                    f"not the rest of {short}; vLLM loads {short} as one fused layer and refuses "
                    f"a checkpoint with only some of them quantized: skip all of them or none")


def quant_config_dict(spec: QuantSpec, modules_to_not_convert: Iterable[str] = ()
                      ) -> dict[str, Any]:
    """The `quantization_config` object of config.json for `spec`; modules_to_not_convert starts
    with ALWAYS_UNQUANTIZED (see there), then the caller's names in their order."""
    skip = list(ALWAYS_UNQUANTIZED)
    skip += [name for name in modules_to_not_convert if name not in skip]
    # "sym" says zero_point's negation for readers that never derive it: transformers 5.x hands
    # gptqmodel `sym` from its own default (True), and gptqmodel's Blackwell AWQ kernel then
    # refuses zero points other than 8. Every other reader ignores it, awq_ref included.
    return {"quant_method": "awq", "bits": spec.bits, "group_size": spec.group_size,
            "zero_point": spec.zero_point, "sym": not spec.zero_point, "version": "gemm",
            "modules_to_not_convert": skip}


def parse_quant_config(d: Any, source: str = "config.json") -> tuple[QuantSpec, tuple[str, ...]]:
    """(QuantSpec, modules_to_not_convert) from a quantization_config; ValueError on what we
    cannot read (not awq, not gemm, bits != 4, bad group size)."""
    if not isinstance(d, dict):  # a bad file, not a bad argument: ValueError like the rest
        raise ValueError(
            f"{source}: quantization_config must be an object, got {d!r}")
    method = d.get("quant_method")
    if method != "awq":
        raise ValueError(f"{source}: quant_method {method!r} is not supported (only 'awq')")
    version = str(d.get("version", "gemm")).lower()
    if version != "gemm":
        raise ValueError(f"{source}: AWQ version {d.get('version')!r} is not supported "
                         f"(only 'gemm')")
    bits = d.get("bits", d.get("w_bit"))
    if bits != PACK_BITS:
        raise ValueError(f"{source}: bits={bits!r} is not supported (packed checkpoints are 4-bit)")
    group = d.get("group_size", d.get("q_group_size"))
    if not isinstance(group, int) or isinstance(group, bool) or (group <= 0 and group != -1):
        raise ValueError(f"{source}: group_size={group!r} must be a positive integer or -1")
    skip = d.get("modules_to_not_convert") or []
    if not isinstance(skip, list) or not all(isinstance(s, str) for s in skip):
        raise ValueError(f"{source}: modules_to_not_convert must be a list of names, got {skip!r}")
    zero_point = d.get("zero_point", True)
    if not isinstance(zero_point, bool):
        raise ValueError(f"{source}: zero_point={zero_point!r} must be true or false")
    return QuantSpec(bits, group, zero_point), tuple(skip)


def checked_cast(name: str, t: torch.Tensor, dtype: torch.dtype | None,
                 advice: str = "store it in float32 or bfloat16") -> torch.Tensor:
    """An unquantized tensor cast to `dtype` (None: as it is), refused (ValueError naming it)
    when the result is not finite: a value past float16's range becomes inf, and a NaN
    already there, in every forward of every reader of the checkpoint."""
    out = t if dtype is None else t.to(dtype)
    if out.is_floating_point() and not torch.isfinite(out).all():
        if not torch.isfinite(t).all():
            raise ValueError(f"{name}: holds NaN or inf")
        raise ValueError(f"{name}: values past {dtype}'s range (max |x| = "
                         f"{t.abs().max().item():.4g}); {advice}")
    return out


def _tensors_to_save(model: nn.Module, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """CPU tensors by name; unquantized float tensors cast to `dtype` (None: kept as they are)
    and checked finite (checked_cast)."""
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")  # the same tensor as model.embed_tokens.weight
    return {k: (v if k.endswith(PACKED_SUFFIXES) else checked_cast(k, v, dtype))
            .detach().contiguous().cpu() for k, v in state.items()}


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Greedy split in state order; a tensor larger than max_bytes gets a shard of its own."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def write_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file(tensors, path, metadata={"format": "pt"})
    os.chmod(path, new_mode())  # safetensors creates the file private (0600)
    fsync_path(path)


def write_json(obj: Any, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    fsync_path(path)


def _write_folder(model: nn.Module, folder: Path, tokenizer: Any, quant_config: dict[str, Any],
                  max_shard_bytes: int, dtype: torch.dtype | None) -> None:
    """Everything the checkpoint holds, written into `folder` (which already exists)."""
    tensors = _tensors_to_save(model, dtype)
    write_json({**model.config.to_hf_dict(), "torch_dtype": CONFIG_DTYPE,
                "quantization_config": quant_config}, folder / "config.json")
    shards = _shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        write_shard(shards[0], folder / WEIGHTS_NAME)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_shard(shard, folder / fname)
            weight_map.update(dict.fromkeys(shard, fname))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        write_json({"metadata": {"total_size": total}, "weight_map": weight_map},
                    folder / INDEX_NAME)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
        for p in folder.iterdir():
            fsync_path(p)


def save_quantized(model: Llama, out_dir: str | Path, tokenizer: Any = None,
                   quant_config: dict[str, Any] | None = None,
                   max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False,
                   dtype: torch.dtype | None = None) -> Path:
    """Write `model` (with QuantLinear layers) as a checkpoint folder; returns its path.

    quant_config defaults to `model.quantization_config` (set by `awq_ref.api.quantize`).
    dtype (e.g. torch.float16, as AutoAWQ stores) casts the unquantized float tensors
    (embeddings, norms, lm_head, biases); None keeps the model's.
    Atomic: everything goes into a temporary folder beside `out_dir`, is fsynced, then renamed,
    so a crash never leaves a partial checkpoint under `out_dir`. An existing `out_dir` is an
    error unless overwrite=True (then it is replaced by rename as well).
    """
    out_dir = Path(out_dir)
    quant_config = (quant_config if quant_config is not None
                    else getattr(model, "quantization_config", None))
    if quant_config is None:
        raise ValueError("save_quantized: no quant_config given and the model has no "
                         "quantization_config (quantize it with awq_ref.api.quantize)")
    if is_fused(model):
        raise ValueError("save_quantized: the model's projections are fused (awq_ref.fuse), "
                         "which the AWQ format stores apart; save the model before fusing")
    _check_layers(model, *parse_quant_config(quant_config, "quant_config"))
    if dtype is not None:  # an integer dtype would write a checkpoint no reader loads
        check_float_dtype(dtype, "save_quantized")
    if not isinstance(model.model.embed_tokens, nn.Embedding) or not isinstance(
            model.lm_head, (nn.Linear, QuantLinear)):
        raise ValueError("save_quantized: the embeddings or lm_head are held in 4 or 8 bits "
                         "(quantize_embeddings, quantize_head_int8), which the AWQ format does not "
                         "store; save the model before quantizing its embeddings")
    check_out_dir(out_dir, overwrite)
    with atomic_folder(out_dir) as tmp:
        _write_folder(model, tmp, tokenizer, quant_config, max_shard_bytes, dtype)
    return out_dir


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """A checkpoint may be written to out_dir: absent, or a folder and overwrite=True. A file
    is never replaced by a checkpoint folder (overwrite=True with a model file's path named by
    mistake would delete it). A checkpoint a killed replacement set aside is first put back."""
    _put_back_set_aside(out_dir)
    if not (out_dir.exists() or out_dir.is_symlink()):
        return
    if not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a folder: a checkpoint replaces "
                              "only a folder (overwrite=True); choose another path")
    if not overwrite:
        raise FileExistsError(f"{out_dir} already exists (pass overwrite=True to replace it)")


@contextmanager
def atomic_folder(out_dir: Path) -> Iterator[Path]:
    """Yield a temporary folder beside out_dir; on success fsync it and rename it to out_dir
    (replacing an existing one), on any error remove it: out_dir is never left half written.
    The temporary folder is flock-ed while written: one a killed writer (SIGKILL, no `except`
    ran) left beside out_dir is unlocked, and the next write of out_dir removes it."""
    check_out_dir(out_dir, overwrite=True)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_killed_temporaries(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    fd = os.open(tmp, os.O_RDONLY)
    try:
        flock_exclusive(fd, blocking=True)  # released by the OS when this process ends, even killed
        os.chmod(tmp, new_mode(folder=True))  # mkdtemp makes it private
        try:
            yield tmp
            fsync_path(tmp)
            _swap_in(tmp, out_dir)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            error = write_error(e, out_dir, tmp)
            if error is None:
                raise
            raise error from e
        fsync_path(out_dir.parent)
    finally:
        os.close(fd)


def _put_back_set_aside(out_dir: Path) -> None:
    """What a swap killed between its two renames left (`_swap_in`): the old out_dir, set
    aside, is put back if out_dir is missing (the write it made way for never arrived), else
    (the new one arrived) deleted. A live swap holds its folder's lock and is left alone, and
    so is every one where there are no locks (killed or live cannot be told apart)."""
    for old in _abandoned(out_dir, "old"):
        if (old / "x").is_dir() and not (out_dir.exists() or out_dir.is_symlink()):
            os.rename(old / "x", out_dir)
        shutil.rmtree(old, ignore_errors=True)


def _remove_killed_temporaries(out_dir: Path) -> None:
    """atomic_folder's temporary folders for out_dir that no live writer holds (best effort)."""
    for tmp in _abandoned(out_dir, "tmp"):
        shutil.rmtree(tmp, ignore_errors=True)


def _abandoned(out_dir: Path, kind: str) -> Iterator[Path]:
    """The `.NAME.{kind}-*` folders beside out_dir (atomic_folder's "tmp", _swap_in's "old")
    whose writer is gone: each yielded while this process holds its lock."""
    for folder in out_dir.parent.glob(f".{glob.escape(out_dir.name)}.{kind}-*"):
        try:
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:  # gone meanwhile, a file, a link
            continue
        try:
            if flock_exclusive(fd, blocking=False):
                yield folder
        finally:
            os.close(fd)


def _check_layers(model: nn.Module, spec: QuantSpec, skip: tuple[str, ...]) -> None:
    """The layers must be what a reader of this quantization_config will build."""
    layers = {n: m for n, m in model.model.layers.named_modules()
              if isinstance(m, (nn.Linear, QuantLinear))}
    if not any(isinstance(m, QuantLinear) for m in layers.values()):
        raise ValueError("save_quantized: the model has no QuantLinear layers (was it packed?)")
    check_fused_skip(len(model.model.layers), skip, "save_quantized")
    for name, m in layers.items():
        full = f"model.layers.{name}"
        if isinstance(m, nn.Linear) != skipped(full, skip):
            raise ValueError(f"save_quantized: {full} is {type(m).__name__}, but "
                             f"modules_to_not_convert={list(skip)} says otherwise")
        if isinstance(m, QuantLinear) and m.group_size != spec.group_for(m.in_features, full):
            raise ValueError(f"save_quantized: {full} has group_size {m.group_size}, "
                             f"quant_config says {spec.group_size}")


def _swap_in(tmp: Path, out_dir: Path) -> None:
    """Rename `tmp` to `out_dir`; an old `out_dir` is first renamed aside, then deleted. Should
    the second rename fail, the old one is renamed back (killed between the two renames: the
    next write of out_dir puts it back, `_remove_killed_temporaries`)."""
    if not out_dir.exists():
        os.rename(tmp, out_dir)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    fd = os.open(old, os.O_RDONLY)
    try:
        flock_exclusive(fd, blocking=True)  # a live swap: `_put_back_set_aside` leaves it be
        os.rename(out_dir, old / "x")
        try:
            os.rename(tmp, out_dir)
        except BaseException:
            os.rename(old / "x", out_dir)
            old.rmdir()
            raise
    finally:
        os.close(fd)
    shutil.rmtree(old, ignore_errors=True)  # the new one is in place: the rest is best effort


def _read_config(folder: Path) -> tuple[LlamaConfig, dict[str, Any]]:
    path = folder / "config.json"
    config = LlamaConfig.from_json_file(path)
    raw = parse_json(path.read_bytes(), str(path))
    if "quantization_config" not in raw:
        raise ValueError(f"{path}: no quantization_config (not a quantized checkpoint)")
    return config, raw["quantization_config"]


def _check_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], folder: Path) -> None:
    """Keys and shapes of the files vs the model built from the config; ValueError naming them."""
    expected = model.state_dict()
    if model.config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    drop_tied_copy(model.config, tensors, str(folder))  # some writers store the tied copy
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{folder}: tensors do not match config.json (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            check_packed_shapes(tensors[f"{name}.qweight"], tensors[f"{name}.qzeros"],
                                tensors[f"{name}.scales"], m.in_features, m.out_features,
                                m.group_size, name)
    for key, t in expected.items():
        if tuple(tensors[key].shape) != tuple(t.shape):
            raise ValueError(f"{folder}: tensor {key} has shape {tuple(tensors[key].shape)}, "
                             f"config.json implies {tuple(t.shape)}")
        if not key.endswith(PACKED_SUFFIXES) and not tensors[key].is_floating_point():
            raise ValueError(f"{folder}: tensor {key} has dtype {tensors[key].dtype}, "
                             "expected a float type")


def load_quantized_model(folder: str | Path, device: torch.device | str = "cpu",
                         dtype: torch.dtype = torch.float32) -> Llama:
    """A Llama whose decoder linears are QuantLinear layers holding the packed tensors as stored.

    Built on the meta device and filled by assignment: no fp weight of a quantized layer is
    ever materialised. Unquantized tensors and biases are cast to `dtype`; qweight/qzeros stay
    int32 and scales fp16.
    """
    check_float_dtype(dtype, "load_quantized_model")
    folder = Path(folder)
    config, qc = _read_config(folder)
    spec, skip = parse_quant_config(qc, str(folder / "config.json"))
    tensors = {k: t for k, t in read_safetensors_folder(folder).items()
               if not k.endswith(IGNORED_SUFFIXES)}  # as the fp loaders: recomputed by the model
    # A packed int32 element holds PACK_NUM 4-bit weights.
    check_size_claim(config, sum(t.numel() for t in tensors.values()), str(folder), PACK_NUM)
    try:
        model = build_on_meta(config)
        replace_linears(model, spec, skip, init_only=True)
        _check_tensors(model, tensors, folder)
        # cast and checked on the device (on a GPU, the finiteness check costs milliseconds)
        state = {k: t.to(device) if k.endswith(PACKED_SUFFIXES)
                 else checked_cast(k, t.to(device), dtype, "load it in float32 or bfloat16")
                 for k, t in tensors.items()}
    except ValueError as e:  # the layer-level checks name the layer; add the checkpoint
        if str(folder) in str(e):
            raise
        raise ValueError(f"{folder}: {e}") from e
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.quantization_config = quant_config_dict(spec, skip)
    return model.eval()
