"""Text generation with the KV cache: greedy, temperature and top-p (nucleus) sampling."""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Sequence

import torch

from awq_ref.cuda_graph import CudaGraphDecoder
from awq_ref.model import KVCache, Llama, check_token_ids


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None) -> int:
    """Pick the next token from logits (V,): argmax when temperature == 0, else sample from
    softmax(logits / temperature) restricted to the smallest set of tokens whose mass >= top_p."""
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits.float()
    # Shifted so the largest is 0: a tiny temperature then gives -inf, never inf - inf = nan.
    probs = torch.softmax((logits - logits.max()) / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        # Keep a token if the mass before it is < top_p: the first token is always kept.
        keep = (sorted_p.cumsum(0) - sorted_p) < top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def _eager_step(model: Llama, cache: KVCache) -> Callable[[int], torch.Tensor]:
    """token id -> logits (V,) of the next position: Llama.forward with the KV cache."""
    def step(token: int) -> torch.Tensor:
        return model(torch.tensor([[token]], device=model.device), cache, last_only=True)[0, -1]
    return step


def check_sampling(temperature: float, top_p: float) -> None:
    """ValueError unless temperature >= 0 and 0 < top_p <= 1 (written so that nan fails too)."""
    if not temperature >= 0 or not 0 < top_p <= 1:
        raise ValueError(f"generate: need temperature >= 0 and 0 < top_p <= 1, got "
                         f"{temperature}, {top_p}")


def _token_ids(ids: Iterable[int], what: str) -> list[int]:
    """ids as a list of ints (a 1-D tensor, a numpy array, a tuple...); TypeError for anything
    else (a text, floats, a (1, T) batch), which would otherwise fail deep in the model."""
    try:
        return [operator.index(t) for t in ids]
    except TypeError:
        raise TypeError(f"generate: {what} must be a sequence of integer token ids (a list, "
                        f"tuple or 1-D tensor), got {ids!r}"[:300]) from None


@torch.no_grad()
def generate(model: Llama, prompt_ids: Sequence[int], max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, eos_ids: Sequence[int] = (),
             seed: int = 0, on_token: Callable[[int], None] | None = None,
             cuda_graph: bool = False) -> list[int]:
    """Return up to max_new_tokens new token ids after prompt_ids; stops after an EOS id.

    The prompt is prefilled in one forward; then one token per step reuses the KV cache, eagerly
    (the reference) or, with cuda_graph (CUDA models only), by replaying one captured decode
    step (awq_ref.cuda_graph). `on_token` is called with each new id as it is produced.
    """
    prompt_ids, eos_ids = _token_ids(prompt_ids, "prompt_ids"), _token_ids(eos_ids, "eos_ids")
    if not prompt_ids:
        raise ValueError("generate: the prompt is empty (encode with a BOS token or give text)")
    check_sampling(temperature, top_p)
    check_token_ids(model.config, torch.tensor(list(prompt_ids)), "generate: the prompt")
    if cuda_graph and model.device.type != "cuda":
        raise ValueError(f"generate: cuda_graph=True needs a model on a CUDA device, got "
                         f"{model.device} (leave it off for eager decode)")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if max_new_tokens == 0:
        return []
    # The last new token is never fed back: T + max_new_tokens - 1 positions are all it needs
    # (a windowed model's limit counts these).
    cache = model.new_cache(1, len(prompt_ids) + max_new_tokens - 1)
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.tensor([list(prompt_ids)], device=model.device)  # (1, T)
    logits = model(prompt, cache, last_only=True)[0, -1]  # (V,)
    step = None  # built at the first step: with max_new_tokens == 1 the cache has no free slot
    out: list[int] = []
    for i in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_p, generator)
        out.append(nxt)
        if on_token is not None:
            on_token(nxt)
        if nxt in eos_ids or i == max_new_tokens - 1:
            break
        if step is None:
            step = CudaGraphDecoder(model, cache).step if cuda_graph else _eager_step(model, cache)
        logits = step(nxt)  # (V,)
    return out
