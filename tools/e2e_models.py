"""The end-to-end benchmark's models (tools/bench_e2e.py): SmolLM2-135M-Instruct (real weights,
RTN W4; random weights of its shape when the file is unavailable) and a Llama-3-8B-shaped model
with random non-zero weights made on the GPU, each with q/k/v and gate/up fused; and the bytes
their weights take (`count_weights`: from the shapes alone, no GPU needed)."""

from __future__ import annotations

import sys

import torch
from torch import nn

from awq_ref.config import LlamaConfig
from awq_ref.fuse import fuse_projections
from awq_ref.model import Llama
from awq_ref.quant.embedding import quantize_embeddings
from awq_ref.quant.int8_head import quantize_head_int8
from awq_ref.quant.qlinear import QuantLinear, replace_linears
from awq_ref.quant.quantizer import QuantSpec

DEVICE, DTYPE = "cuda", torch.float16
SMOLLM2 = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                      num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                      rope_theta=100000.0, tie_word_embeddings=True)
# Llama-3-8B's shapes (its llama3 RoPE scaling is left out: it does not change the speed).
LLAMA3_8B = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                        rope_theta=500000.0, max_position_embeddings=8192)
GROUP_SIZE = {"smollm2-135m": 64, "llama3-8b": 128}


def _random_packed(layer: QuantLinear, gen: torch.Generator) -> None:
    """Random codes and zeros (any 4-bit value), scales making W's spread about 1/sqrt(K)."""
    k, n, g = layer.in_features, layer.out_features, layer.group_size

    def words(rows: int) -> torch.Tensor:  # (rows, N/8) int32 = 4 random bytes each
        return torch.randint(0, 256, (rows, n // 2), dtype=torch.uint8, generator=gen,
                             device=DEVICE).view(torch.int32)

    layer.qweight, layer.qzeros = words(k), words(k // g)
    spread = k**-0.5 / 6.5  # std of (q - z) for uniform q, z in 0..15 is about 6.5
    scales = torch.rand((k // g, n), generator=gen, device=DEVICE) + 0.5  # (K/G, N)
    layer.scales = (scales * spread).to(torch.float16)


def _random_parameter(kind: str, p: nn.Parameter, gen: torch.Generator) -> nn.Parameter:
    """Norm weights 1, embeddings ~ N(0, 1), linear weights (N, K) ~ N(0, 1/K)."""
    if p.dim() == 1:
        t = torch.ones(p.shape, dtype=DTYPE, device=DEVICE)
    else:
        std = 1.0 if kind == "embed" else p.shape[1] ** -0.5
        t = torch.randn(p.shape, generator=gen, dtype=DTYPE, device=DEVICE) * std
    return nn.Parameter(t, requires_grad=False)


def random_llama(config: LlamaConfig, group_size: int | None, seed: int = 0) -> Llama:
    """A Llama with random non-zero weights made on the GPU (fp16), its decoder linears packed
    4-bit with `group_size` unless None. Built on the meta device first: nothing on the CPU."""
    with torch.device("meta"):
        model = Llama(config).eval()
    if group_size is not None:
        replace_linears(model, QuantSpec(4, group_size), init_only=True)
    gen = torch.Generator(DEVICE).manual_seed(seed)
    for module in model.modules():
        if isinstance(module, QuantLinear):
            _random_packed(module, gen)
            continue
        kind = "embed" if isinstance(module, nn.Embedding) else "weight"
        for name, p in list(module.named_parameters(recurse=False)):
            setattr(module, name, _random_parameter(kind, p, gen))
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def weight_gib(model: nn.Module) -> float:
    """GiB of the model's parameters and buffers, each tensor counted once (tied ones too)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values()) / 2**30


def count_weights(models: list[str]) -> list[dict]:
    """Weight GiB per model and variant, from shapes alone (meta device)."""
    configs = {"smollm2-135m": SMOLLM2, "llama3-8b": LLAMA3_8B}
    rows = []
    for name in models:
        config = configs[name]
        with torch.device("meta"):
            fp16 = weight_gib(Llama(config).to(DTYPE))
            model = Llama(config).to(DTYPE)
        replace_linears(model, QuantSpec(4, GROUP_SIZE[name]), init_only=True)
        w4 = weight_gib(model)
        with torch.device("meta"):
            head8 = quantize_head_int8(Llama(config).to(DTYPE))
        replace_linears(head8, QuantSpec(4, GROUP_SIZE[name]), init_only=True)
        quantize_embeddings(head8, GROUP_SIZE[name], parts=("embed",), init_only=True)
        w4_emb = weight_gib(quantize_embeddings(model, GROUP_SIZE[name], init_only=True))
        rows += [{"model": name, "variant": v, "weights_gib": g, "of_fp16": g / fp16}
                 for v, g in (("fp16", fp16), ("w4", w4), ("w4 +emb", w4_emb),
                              ("w4 +emb4/head8", weight_gib(head8)))]
    return rows


def smollm2(quantized: bool) -> tuple[Llama, str]:
    """The default model (fp16; RTN W4 g64 packed if `quantized`) and where its weights are from."""
    from awq_ref.api import quantize
    from awq_ref.loaders import load_model

    try:
        model = load_model("default", device=DEVICE, dtype=DTYPE)
    except (ValueError, ImportError) as e:  # no cached file and no network; or gguf missing
        print(f"default model unavailable ({e}); random SmolLM2-shaped weights instead",
              file=sys.stderr)
        return random_llama(SMOLLM2, GROUP_SIZE["smollm2-135m"] if quantized else None), "random"
    if quantized:
        model = quantize(model, method="rtn", w_bit=4, group_size=GROUP_SIZE["smollm2-135m"],
                         inplace=True)
    return model, "real"


def build(name: str, quantized: bool) -> tuple[Llama, str]:
    """The model, its q/k/v and gate/up fused (awq_ref.fuse) in every variant, fp16 included."""
    if name == "smollm2-135m":
        model, source = smollm2(quantized)
    else:
        model, source = random_llama(LLAMA3_8B, GROUP_SIZE[name] if quantized else None), "random"
    fuse_projections(model)
    return model, source
