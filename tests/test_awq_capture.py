"""The capture of a block's calibration inputs (awq_ref.awq.capture): every sequence and token
seen, the statistics (mean|x|, X^T X) and the loss subsets, non-finite values named where they
arise."""

import math

import pytest
import torch
from test_awq_search import calib, tiny_llama

from awq_ref.awq.capture import (
    NonFiniteError,
    SubsetPlan,
    capture_block,
    check_finite,
    embed,
    forward_block,
    gram_matrix,
)
from awq_ref.awq.scaling_groups import LLAMA_GROUPS


@pytest.mark.parametrize("m,k", [(1, 172), (100, 576), (300, 129)])
def test_gram_matrix_is_x_transpose_x_from_its_upper_triangle(m, k):
    """The capture's fast path against its reference: exactly symmetric, and x.T @ x up to the
    dot products' order (the same bits on this project's CPUs: MKL computes each entry the same
    way whatever the product's shape)."""
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k))
    got = gram_matrix(x, block=64)
    assert torch.equal(got, got.T)
    torch.testing.assert_close(got, x.T @ x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("at", [0, 777, -1])
def test_check_finite_finds_one_bad_element_anywhere(dtype, bad, at):
    t = torch.randn(3, 50, 16).to(dtype)
    check_finite(t, "x")
    check_finite(t[:0], "empty")
    t.view(-1)[at] = bad
    with pytest.raises(NonFiniteError, match="where: NaN or inf"):
        check_finite(t, "where")
    with pytest.raises(NonFiniteError):
        check_finite(t.transpose(0, 2), "a non-contiguous view")


@torch.no_grad()
def test_token_subset_is_strided_over_every_window():
    """The MLP loss's token subset: every stride-th of all B x T tokens, the stride rounded up
    so that it reaches the last window (5 x 32 tokens, 64 asked: stride 3, 54 tokens)."""
    model = tiny_llama()
    block = model.model.layers[0]
    x = model.model.embed_tokens(calib(n=5, t=32)).float()  # (5, 32, 64)
    cos, sin = model.rotary(0, 32, torch.float32)
    group = next(g for g in LLAMA_GROUPS if g.inspect == "mlp")
    seen = []
    handle = block.get_submodule(group.linears[0]).register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].reshape(-1, args[0].shape[-1]).clone()))
    try:
        plan = SubsetPlan(seqs=2, tokens=64)
        (stats,) = capture_block(block, x.clone(), cos, sin, (group,), plan, chunk_seqs=2,
                                 where="block 0")
    finally:
        handle.remove()
    every = torch.cat(seen[:3])  # (160, 64): the capture's own forward, 3 chunks
    assert torch.equal(stats.subset[0], every[::3]) and stats.subset[0].shape[0] == 54
    (stats,) = capture_block(block, x.clone(), cos, sin, (group,), SubsetPlan(2, 1000), 2,
                             "block 0")  # more tokens asked than there are: all of them
    assert torch.equal(stats.subset[0], every)


@torch.no_grad()
def test_attention_subset_is_the_first_whole_sequences():
    """The attention loss's inputs: the first `seqs` sequences of the calibration batch, whole,
    however the capture's forward is chunked (5 windows in chunks of 2, 3 kept)."""
    model = tiny_llama()
    block = model.model.layers[0]
    x = model.model.embed_tokens(calib(n=5, t=32)).float()  # (5, 32, 64)
    cos, sin = model.rotary(0, 32, torch.float32)
    group = next(g for g in LLAMA_GROUPS if g.positional)
    (stats,) = capture_block(block, x.clone(), cos, sin, (group,), SubsetPlan(seqs=3, tokens=64),
                             chunk_seqs=2, where="block 0")
    kept = torch.cat(stats.subset)  # (3, 32, 64)
    assert torch.equal(kept, block.input_layernorm(x[:3]))


@torch.no_grad()
def test_capture_sees_every_sequence_and_every_token():
    """The first block's inputs are every sequence's embeddings (embedded 64 at a time: 70 here);
    a group's statistics count all B x T tokens (mean|x| is their mean, X^T X their sum, with
    the block outputs written back in chunks); forward_block moves every chunk on."""
    model = tiny_llama()
    tokens = calib(n=70, t=4)
    x = embed(model, tokens, torch.device("cpu"))  # (70, 4, 64)
    assert torch.equal(x, model.model.embed_tokens(tokens).float())
    block = model.model.layers[0]
    cos, sin = model.rotary(0, 4, torch.float32)
    want = block(x, cos, sin)
    group = next(g for g in LLAMA_GROUPS if g.closed_form)  # o_proj: input = attention output
    seen = []
    handle = block.get_submodule(group.linears[0]).register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].reshape(-1, args[0].shape[-1]).clone()))
    try:
        written = x.clone()
        (stats,) = capture_block(block, written, cos, sin, (group,), SubsetPlan(1, 8),
                                 chunk_seqs=16, where="block 0", write_outputs=True)
    finally:
        handle.remove()
    assert not any(m._forward_pre_hooks for m in block.modules())  # the capture's hooks are gone
    inputs = torch.cat(seen)  # (280, 64)
    assert stats.count == 280 and inputs.shape[0] == 280
    torch.testing.assert_close(stats.mean_abs, inputs.abs().mean(0))
    torch.testing.assert_close(stats.gram, inputs.T @ inputs, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(written, want)
    moved = x.clone()
    forward_block(block, moved, cos, sin, 16, "block 0")
    torch.testing.assert_close(moved, want)


@torch.no_grad()
def test_a_block_output_past_fp32_names_the_block():
    """A block whose output overflows (here an inf weight in down_proj) is named there, by the
    capture and by the forward that moves the inputs on, not one block later (or never, after
    the last block)."""
    model = tiny_llama()
    block = model.model.layers[1]
    block.mlp.down_proj.weight[0, 0] = math.inf
    x = model.model.embed_tokens(calib(n=2, t=8)).float()
    cos, sin = model.rotary(0, 8, torch.float32)
    group = next(g for g in LLAMA_GROUPS if g.closed_form)
    with pytest.raises(NonFiniteError, match="block 1 output: NaN or inf"):
        capture_block(block, x.clone(), cos, sin, (group,), SubsetPlan(1, 8), 2, "block 1")
    with pytest.raises(NonFiniteError, match="block 1 output: NaN or inf"):
        forward_block(block, x.clone(), cos, sin, 2, "block 1")
