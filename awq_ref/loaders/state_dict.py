"""From a dict of HF-named tensors to a Llama: every key and shape checked, then assigned.

Shared by all loaders (HF folders, GGUF, llama2.c), so every format ends in the same checks.
"""

from __future__ import annotations

from typing import Any

import torch

from awq_ref.config import LlamaConfig
from awq_ref.model import Llama

# Some exporters write these; the model recomputes them.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def build_on_meta(config: LlamaConfig) -> Llama:
    """A Llama whose parameters take no memory; fill it with load_state_dict(assign=True)."""
    with torch.device("meta"):
        model = Llama(config)
    assert model._inv_freq.device.type == "cpu"  # the RoPE table is real, not meta
    return model


def expected_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """HF name -> shape of every tensor a checkpoint of `config` holds (no lm_head when tied)."""
    shapes = {k: tuple(v.shape) for k, v in build_on_meta(config).state_dict().items()}
    if config.tie_word_embeddings:
        del shapes["lm_head.weight"]
    return shapes


def drop_tied_copy(config: LlamaConfig, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Tied configs: remove a stored lm_head.weight from `tensors` if it equals the embeddings
    (some writers store the copy); a different one is refused, because the readers disagree:
    vLLM and transformers 4 use the embeddings, transformers 5 unties and uses the stored head.
    Meta tensors (checks without data) are not compared."""
    head = tensors.get("lm_head.weight") if config.tie_word_embeddings else None
    if head is None:
        return
    embed = tensors.get("model.embed_tokens.weight")
    if embed is not None and not head.is_meta and not embed.is_meta \
            and not _same_values(head, embed):
        raise ValueError(f"{source}: config.json ties lm_head to the embeddings "
                         "(tie_word_embeddings) but the file stores a different lm_head.weight: "
                         "vLLM would use the embeddings, transformers 5 the stored head; set "
                         "tie_word_embeddings to what the model was trained with")
    del tensors["lm_head.weight"]


def _same_values(a: torch.Tensor, b: torch.Tensor, rows: int = 4096) -> bool:
    """Equal shapes and values (NaN equal to NaN, any dtypes), compared `rows` rows at a time: a
    vocabulary-sized table is not copied whole into float32."""
    if a.shape != b.shape:
        return False
    for x, y in zip(a.split(rows), b.split(rows)):
        x, y = x.float(), y.float()
        if not ((x == y) | (x.isnan() & y.isnan())).all():
            return False
    return True


def interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k rows from interleaved RoPE pairs (x[2i], x[2i+1]) to HF's rotate-half pairs
    (x[i], x[i + Dh/2]) within each head; the same permutation transformers' converters apply."""
    out, k = w.shape  # (H*Dh, K)
    dh = out // n_heads
    return w.reshape(n_heads, dh // 2, 2, k).transpose(1, 2).reshape(out, k)


def half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `interleaved_to_half` (llama.cpp's converter applies this one)."""
    out, k = w.shape  # (H*Dh, K)
    dh = out // n_heads
    return w.reshape(n_heads, 2, dh // 2, k).transpose(1, 2).reshape(out, k)


def check_float_dtype(dtype: Any, where: str) -> None:
    """TypeError unless `dtype` is a torch floating-point dtype (the unquantized tensors' type)."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{where}: dtype must be a torch floating-point dtype (e.g. "
                        f"torch.float16), got {dtype!r}")


def check_disjoint(spans: list[tuple[str, int, int]], where: str) -> None:
    """(name, first byte, byte count) of each tensor's data: no two may share a byte (shared
    bytes would let a small file claim a large model). Empty tensors hold no bytes."""
    end, previous = 0, None
    for name, start, nbytes in sorted(spans, key=lambda span: span[1]):
        if nbytes == 0:
            continue
        if start < end:
            raise ValueError(f"{where}: the data of tensors {previous} and {name} overlap")
        end, previous = start + nbytes, name


def check_size_claim(config: LlamaConfig, stored: int, source: str, per_element: int = 1) -> None:
    """A config must not claim far more weights than the file stores (`stored` elements holding
    `per_element` weights each): checked before a model of its size is built, even on the meta
    device (its RoPE table is real). Near misses (within 2x) are left to the per-tensor checks,
    whose messages name the tensor."""
    claimed = config.weight_count()
    if claimed > 2 * stored * per_element:
        raise ValueError(f"{source}: the config describes {claimed} weights, the file holds "
                         f"{stored * per_element}: tensors do not match the config")


def check_state_dict(config: LlamaConfig, tensors: dict[str, torch.Tensor],
                     source: str) -> dict[str, torch.Tensor]:
    """The tensors the model needs, after checking names and shapes; raises ValueError naming
    `source` and the first offending tensors. A tied copy of lm_head.weight is dropped
    (drop_tied_copy)."""
    tensors = {k: v for k, v in tensors.items() if not k.endswith(IGNORED_SUFFIXES)}
    check_size_claim(config, sum(t.numel() for t in tensors.values()), source)
    expected = expected_shapes(config)
    drop_tied_copy(config, tensors, source)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError(f"{source}: tensors do not match the config: missing {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}, unexpected {extra[:5]}"
                         f"{' ...' if len(extra) > 5 else ''}")
    for name, shape in expected.items():
        t = tensors[name]
        if tuple(t.shape) != shape:
            raise ValueError(f"{source}: tensor {name} has shape {tuple(t.shape)}, "
                             f"the config needs {shape}")
        if not t.is_floating_point():
            raise ValueError(f"{source}: tensor {name} has dtype {t.dtype}, expected a float type")
    return tensors


def model_from_state_dict(config: LlamaConfig, tensors: dict[str, torch.Tensor], source: str,
                          device: str | torch.device = "cpu",
                          dtype: torch.dtype = torch.float32) -> Llama:
    """Check every key and shape, convert to (device, dtype), and assign into a meta-built Llama.

    Tensors already on `device` in `dtype` are used as they are (no copy: an mmapped file stays
    mapped). Nothing is assigned before every check has passed.
    """
    tensors = check_state_dict(config, tensors, source)
    converted = {k: v.to(device=device, dtype=dtype) for k, v in tensors.items()}
    model = build_on_meta(config)
    if config.tie_word_embeddings:
        converted["lm_head.weight"] = converted["model.embed_tokens.weight"]
    model.load_state_dict(converted, strict=True, assign=True)
    if config.tie_word_embeddings:
        # assign=True gave each name its own Parameter; share one, as Llama.__init__ does.
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()
