"""AWQ search: invariance of the folded scales, clipping, grid minimum, determinism, GQA, NaNs,
and every fast path (Gram closed forms) against its direct reference."""

import copy
import dataclasses
import math

import pytest
import torch

from awq_ref.awq.apply import apply_awq, apply_scale
from awq_ref.awq.capture import NonFiniteError, check_finite, gram_matrix
from awq_ref.awq.pipeline import PROPAGATE, AwqConfig, search_awq
from awq_ref.awq.scaling_groups import LLAMA_GROUPS, expand_kv, reduce_kv
from awq_ref.awq.search_clip import clip_box, clipper, search_clip
from awq_ref.awq.search_scale import effective_weight, gram_loss, grid_search, module_loss
from awq_ref.config import LlamaConfig
from awq_ref.model import Llama
from awq_ref.quant.quantizer import QuantSpec, clamp_groups, grouped
from awq_ref.quant.rtn import fake_quantize_weight

SPEC = QuantSpec(4, 16, True)
FAST = AwqConfig(n_grid=10, loss_seqs=3, loss_tokens=96, chunk_tokens=64, progress=False)


def tiny_llama(seed: int = 0, n_kv: int = 2, model_type: str = "llama") -> Llama:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=n_kv, bos_token_id=1,
                      model_type=model_type)
    model = Llama(cfg).eval()
    with torch.no_grad():  # non-trivial norms and a few outlier channels, as in trained models
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.copy_(torch.rand(64) + 0.5)
                norm.weight[:3] *= 8
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                if proj.bias is not None:  # Qwen2's q, k, v biases
                    proj.bias.normal_()
            if layer.self_attn.q_norm is not None:  # Qwen3's per-head q and k norms
                layer.self_attn.q_norm.weight.uniform_(0.5, 2)
                layer.self_attn.k_norm.weight.uniform_(0.5, 2)
    return model


def calib(n: int = 6, t: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 97, (n, t), generator=torch.Generator().manual_seed(seed))


def block_io(model: Llama, tokens: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input, output) of every block in fp32."""
    x = model.model.embed_tokens(tokens)
    cos, sin = model.rotary(0, tokens.shape[1], x.dtype)
    out = []
    for block in model.model.layers:
        y = block(x, cos, sin)
        out.append((x, y))
        x = y
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@torch.no_grad()
# qwen2: v's bias divided with v
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
def test_scales_alone_leave_every_block_unchanged(model_type):
    model = tiny_llama(model_type=model_type)
    result = search_awq(model, calib(), SPEC, FAST)
    assert len(result.scales) == 8  # 4 groups x 2 blocks, GQA v -> o included
    scaled = copy.deepcopy(model)
    apply_awq(scaled, result, clip=False)
    cos, sin = model.rotary(0, 32, torch.float32)
    for i, (x, y) in enumerate(block_io(model, calib(seed=1))):
        assert rel_err(scaled.model.layers[i](x, cos, sin), y) <= 1e-5, f"block {i}"


@torch.no_grad()
def test_clipping_never_increases_magnitude():
    model = tiny_llama()
    result = search_awq(model, calib(), SPEC, FAST)
    scaled, clipped = copy.deepcopy(model), copy.deepcopy(model)
    apply_awq(scaled, result, clip=False)
    apply_awq(clipped, result)
    assert result.clips and all("q_proj" not in k and "k_proj" not in k for k in result.clips)
    shrunk = 0
    for (name, a), (_, b) in zip(scaled.named_parameters(), clipped.named_parameters()):
        assert (b.abs() <= a.abs()).all(), name
        shrunk += int((b != a).sum())
    assert shrunk > 0


def test_search_improves_on_round_to_nearest_somewhere():
    """(loss <= loss0 holds by construction: ratio 0 is on the grid.) Some group must find a
    scale strictly better than round-to-nearest, or the search would be doing nothing."""
    result = search_awq(tiny_llama(), calib(), SPEC, FAST)
    assert len(result.search) == 8
    assert all(math.isfinite(rec["loss"]) for rec in result.search)
    assert any(rec["loss"] < rec["loss0"] for rec in result.search)


@torch.no_grad()
def test_propagation_variants_feed_the_next_block_what_they_say():
    """Block 1 is searched on block 0's fp output ("fp"), its scaled and clipped output ("awq")
    or its quantized output ("quantized"). Checked by giving an "fp" search a model whose block
    0 already is that (AWQ folded in, then fake-quantized): block 1's losses must be the same."""
    config = AwqConfig(n_grid=5, loss_seqs=2, loss_tokens=64, progress=False,
                       duo_scaling=True, clip_mode="absmax")
    runs = {p: search_awq(tiny_llama(), calib(), SPEC, dataclasses.replace(config, propagate=p))
            for p in PROPAGATE}
    assert all(len(r.scales) == 8 for r in runs.values())

    def block1_losses(result):  # [prev, loss0, loss, prev, loss0, loss, ...]
        return [v for r in result.search if ".layers.1." in r["prev"]
                for v in (r["prev"], r["loss0"], r["loss"])]

    folded = tiny_llama()
    apply_awq(folded, runs["awq"])  # block 0's scales and clips (block 1's are not used below)
    folded.model.layers[1] = tiny_llama().model.layers[1]  # block 1 as searched: unscaled
    quantized = copy.deepcopy(folded)
    for lin in quantized.model.layers[0].modules():
        if isinstance(lin, torch.nn.Linear):
            lin.weight.data = fake_quantize_weight(lin.weight.data, SPEC)
    for mode, model in (("awq", folded), ("quantized", quantized)):
        want = block1_losses(search_awq(model, calib(), SPEC, config))  # propagate "fp"
        got = block1_losses(runs[mode])
        assert got[0::3] == want[0::3]
        assert got[1::3] == pytest.approx(want[1::3], rel=1e-5), mode
        assert got[2::3] == pytest.approx(want[2::3], rel=1e-5), mode
    assert block1_losses(runs["fp"])[1::3] != pytest.approx(block1_losses(runs["awq"])[1::3],
                                                             rel=1e-3)


def test_clip_aware_scale_search():
    plain = search_awq(tiny_llama(), calib(), SPEC, FAST)
    aware = search_awq(tiny_llama(), calib(), SPEC,
                       AwqConfig(**{**FAST.__dict__, "scale_clip_grid": 4}))
    assert aware.scales.keys() == plain.scales.keys()
    # clipping inside the loss changes what each candidate costs
    assert any(a["loss0"] != p["loss0"] for a, p in zip(aware.search, plain.search))


def test_joint_clip_in_the_pipeline():
    plain = search_awq(tiny_llama(), calib(), SPEC, AwqConfig(**{**FAST.__dict__, "clip_joint": 0}))
    joint = search_awq(tiny_llama(), calib(), SPEC, AwqConfig(**{**FAST.__dict__, "clip_joint": 2}))
    assert joint.clips.keys() == plain.clips.keys()
    assert any(not torch.equal(joint.clips[k][0], plain.clips[k][0]) for k in plain.clips)


def test_clip_damping_moves_toward_plain_weight_error():
    plain = search_awq(tiny_llama(), calib(), SPEC, FAST)
    damped = search_awq(tiny_llama(), calib(), SPEC,
                        AwqConfig(**{**FAST.__dict__, "clip_damp": 1e6}))
    assert damped.scales.keys() == plain.scales.keys()
    # with a huge damping each box minimises sum (q - w)^2 of its group: the plain weight error
    scaled = tiny_llama()
    apply_awq(scaled, dataclasses.replace(damped, clips={}))
    changed = 0
    for name, (lo_d, hi_d) in damped.clips.items():
        w = scaled.get_submodule(name).weight.detach()
        lo, hi, _, _ = search_clip(w, torch.eye(w.shape[1]), SPEC, FAST.clip_grid,
                                   FAST.max_shrink, FAST.clip_mode, joint=FAST.clip_joint)
        assert torch.equal(lo_d, lo) and torch.equal(hi_d, hi), name
        changed += not torch.equal(lo_d, plain.clips[name][0])
    assert changed  # and that differs from clipping on the calibration Gram


def test_clipper_clamps_to_the_scaled_box():
    torch.manual_seed(2)
    x, w, s = torch.randn(300, 64), torch.randn(24, 64), torch.rand(64) + 0.5
    gram = x.T @ x
    clipped = clipper(gram, SPEC, 8, 0.5, "range")(w * s, s)
    lo, hi, _, _ = search_clip(w * s, (x / s).T @ (x / s), SPEC, 8, 0.5, "range")
    assert torch.allclose(clipped, clamp_groups(w * s, lo, hi))
    assert (clipped.abs() <= (w * s).abs()).all() and not torch.equal(clipped, w * s)


@torch.no_grad()
def test_gqa_vo_folding_is_exact():
    model = tiny_llama(n_kv=2)  # n_rep = 2
    attn = model.model.layers[0].self_attn
    x = torch.randn(3, 16, 64)
    cos, sin = model.rotary(0, 16, torch.float32)
    ref = attn(x, cos, sin)
    s = torch.rand(attn.v_proj.out_features) * 4 + 0.1  # one scale per v channel
    apply_scale(attn.v_proj, [attn.o_proj], s, n_rep=2, head_dim=16)
    assert rel_err(attn(x, cos, sin), ref) <= 1e-5


def test_expand_kv_matches_repeat_kv():
    s = torch.arange(2 * 3, dtype=torch.float32)  # Hkv = 2 heads of Dh = 3
    # query head h reads KV head h // n_rep, as torch.repeat_interleave over heads does
    want = s.view(2, 3).repeat_interleave(2, dim=0).reshape(-1)
    assert torch.equal(expand_kv(s, 2, 3), want)
    assert expand_kv(s, 1, 0) is s  # no GQA: nothing to expand, head_dim unused
    for head_dim in (0, 4):  # 6 scales: no whole number of heads of 4 (nor of 0)
        with pytest.raises(ValueError, match=f"6 scales are no whole number of heads of "
                                             f"head_dim {head_dim}"):
            expand_kv(s, 2, head_dim)


def test_reduce_kv_averages_the_query_heads_sharing_a_v_channel():
    """o_proj input h*Dh + d carries v channel (h // n_rep)*Dh + d: its mean|x| is the mean over
    those n_rep heads (Hkv = 2, n_rep = 3, Dh = 2), and reduce_kv inverts expand_kv."""
    x = torch.arange(12, dtype=torch.float32) ** 2  # (H*Dh,) distinct per head
    want = x.view(2, 3, 2).mean(1).reshape(-1)  # (Hkv*Dh,)
    assert torch.equal(reduce_kv(x, 3, 2), want)
    assert torch.equal(reduce_kv(want[[0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3]], 3, 2), want)
    s = torch.rand(4)
    assert torch.equal(reduce_kv(expand_kv(s, 3, 2), 3, 2), s)


@pytest.mark.parametrize("m,k", [(1, 172), (100, 576), (300, 129)])
def test_gram_matrix_is_x_transpose_x_from_its_upper_triangle(m, k):
    """The capture's fast path against its reference: exactly symmetric, and x.T @ x up to the
    dot products' order (the same bits on this project's CPUs: MKL computes each entry the same
    way whatever the product's shape)."""
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k))
    got = gram_matrix(x, block=64)
    assert torch.equal(got, got.T)
    torch.testing.assert_close(got, x.T @ x, rtol=1e-5, atol=1e-5)


def test_gram_loss_matches_direct_mse():
    torch.manual_seed(0)
    x = torch.randn(500, 64) * (torch.rand(64) * 3)  # (T, K)
    w = torch.randn(32, 64)  # (N, K)
    s = torch.rand(64) + 0.5
    direct = (x @ effective_weight(w, s, SPEC).T - x @ w.T).pow(2).mean()
    assert gram_loss(w, x.T @ x, 500, s, SPEC) == pytest.approx(float(direct), rel=1e-4)


def test_module_loss_is_the_mean_squared_output_error():
    """L(s) = mean over every output element of (f(x; W_eff(s)) - f(x; W))^2, whatever the
    chunking (17 rows in chunks of 5: a last short chunk)."""
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 32, bias=False), torch.nn.SiLU(),
                              torch.nn.Linear(32, 16))
    inputs = torch.randn(17, 64)
    s = torch.rand(64) + 0.5
    with torch.no_grad():
        reference = mlp(inputs)
        w = mlp[0].weight.detach()
        direct = (torch.func.functional_call(mlp, {"0.weight": effective_weight(w, s, SPEC)},
                                             (inputs,)) - reference).pow(2).mean()
        loss = module_loss(mlp, {"0.weight": w}, SPEC, inputs, reference, chunk=5)
        assert loss(s) == pytest.approx(float(direct), rel=1e-5)


def test_refinement_keeps_the_first_of_equal_losses():
    """A flat loss: no refined ratio is better than the coarse grid's first, a = 0."""
    choice = grid_search(lambda s: 1.0, torch.linspace(0.5, 4.0, 16), None, 10, n_refine=3)
    assert choice.ratio == 0.0 and choice.loss == 1.0


@pytest.mark.parametrize("mode", ["range", "absmax", "lohi"])
def test_clip_error_matches_direct_group_error(mode):
    torch.manual_seed(0)
    x = torch.randn(400, 64)
    w = torch.randn(24, 64)
    lo, hi, before, after = search_clip(w, x.T @ x, SPEC, mode=mode)
    clipped = torch.maximum(torch.minimum(grouped(w, 16), hi[..., None]), lo[..., None])
    e = grouped(fake_quantize_weight(clipped.reshape(w.shape), SPEC), 16) - grouped(w, 16)
    xg = x.view(400, 4, 16)  # (T, K/G, G)
    direct = torch.einsum("tgi,ngi->tng", xg, e).pow(2).sum()  # sum over groups of ||X_g e_ng||^2
    assert after == pytest.approx(float(direct), rel=1e-4)
    assert after < before


def test_lohi_refines_the_range_box():
    torch.manual_seed(1)
    x = torch.randn(400, 64)
    w = torch.randn(24, 64) + 0.3  # skewed groups: the two ends want different shrinks
    _, _, before, after_range = search_clip(w, x.T @ x, SPEC, mode="range")
    lo, hi, _, after = search_clip(w, x.T @ x, SPEC, mode="lohi")
    assert after < after_range < before
    wg = grouped(w, 16)
    assert (lo >= wg.amin(-1)).all() and (hi <= wg.amax(-1)).all() and (lo <= hi).all()
    assert not torch.equal(lo / wg.amin(-1), hi / wg.amax(-1))  # the ends moved apart


@pytest.mark.parametrize("mode", ["range", "lohi"])
def test_joint_clip_lowers_the_whole_row_error(mode):
    torch.manual_seed(2)
    x = torch.randn(400, 64) + 2 * torch.randn(400, 1)  # a shared component couples the groups
    w = torch.randn(24, 64)

    def row_error(lo, hi):  # sum_n ||X (q_n - w_n)||^2, computed directly over the tokens
        clipped = torch.maximum(torch.minimum(grouped(w, 16), hi[..., None]), lo[..., None])
        e = fake_quantize_weight(clipped.reshape(w.shape), SPEC) - w
        return float((x @ e.T).pow(2).sum())

    lo0, hi0, _, _ = search_clip(w, x.T @ x, SPEC, mode=mode)
    lo, hi, before, after = search_clip(w, x.T @ x, SPEC, mode=mode, joint=3)
    assert after == pytest.approx(row_error(lo, hi), rel=1e-4)
    assert before == pytest.approx(row_error(*clip_box(grouped(w, 16), 1.0, mode, True)),
                                   rel=1e-4)
    assert after < row_error(lo0, hi0)  # the cross-group terms were worth re-picking for
    wg = grouped(w, 16)
    assert (lo >= wg.amin(-1)).all() and (hi <= wg.amax(-1)).all()


def test_clip_rows_in_chunks_pick_the_same_boxes(monkeypatch):
    """Output channels searched in chunks (a byte budget bounds the temporaries on wide layers)
    get the boxes they get all at once: each row's search is its own."""
    import awq_ref.awq.search_clip as sc

    torch.manual_seed(3)
    x = torch.randn(300, 64) + 2 * torch.randn(300, 1)
    w = torch.randn(90, 64)  # more rows than inputs: chunks are counted along N, not K
    whole = search_clip(w, x.T @ x, SPEC, mode="lohi", joint=2)
    monkeypatch.setattr(sc, "CLIP_CHUNK_BYTES", 4 * 64 * 7)  # 7 rows at a time
    chunked = search_clip(w, x.T @ x, SPEC, mode="lohi", joint=2)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])
    assert chunked[3] == pytest.approx(whole[3], rel=1e-5)


def test_nan_activation_names_block_and_layer():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"model\.layers\.1.*down_proj"):
        search_awq(model, calib(), SPEC, FAST)


def test_calibration_ids_past_the_vocabulary_are_refused_before_the_search():
    tokens = calib()
    tokens[2, 5] = 97  # vocab_size 97
    with pytest.raises(ValueError, match=r"calib_tokens: token ids 0\.\.97 do not fit the "
                                         r"model's vocabulary \(vocab_size 97\)"):
        search_awq(tiny_llama(), tokens, SPEC, FAST)


def test_no_calibration_tokens_says_the_windows_come_from_the_model(monkeypatch, caplog):
    """run_awq without calib_tokens samples the windows from the model (data-free) and says so:
    the result then reflects the model's own text, not a domain's."""
    from awq_ref.awq import pipeline

    drawn = []
    monkeypatch.setattr(pipeline, "sample_from_model", lambda model: drawn.append(1) or calib())
    with caplog.at_level("WARNING", logger="awq_ref.awq.pipeline"):
        pipeline.run_awq(tiny_llama(), SPEC, **dataclasses.asdict(FAST))
    assert drawn == [1]
    assert "no calibration tokens given: sampling 128 x 512 tokens from the model (data-free " \
           "calibration)" in caplog.text


def test_a_nan_search_loss_names_its_group(monkeypatch):
    """A NaN loss (a bug, or inputs no check caught) is an error naming where it arose: one
    scale candidate's among finite ones (the choice itself can look fine, NaN never wins a
    comparison), or a clip search's error sums; inf stays the mark of an fp16 overflow."""
    from awq_ref.awq import pipeline

    real_grid, real_clip = pipeline.grid_search, pipeline.search_clip

    def with_losses(*bad: float):  # candidates 2, 3, ... get these losses
        def grid(*a):
            choice = real_grid(*a)
            losses = (*choice.losses[:2], *bad, *choice.losses[2 + len(bad):])
            return dataclasses.replace(choice, losses=losses)
        return grid

    monkeypatch.setattr(pipeline, "grid_search", with_losses(math.inf))
    search_awq(tiny_llama(), calib(), SPEC, FAST)  # an overflowing candidate alone: no error
    monkeypatch.setattr(pipeline, "grid_search", with_losses(math.nan, math.inf))
    with pytest.raises(NonFiniteError, match=r"model\.layers\.0\.input_layernorm -> "
                                             r"self_attn\.q_proj.* scale loss: NaN or inf"):
        search_awq(tiny_llama(), calib(), SPEC, FAST)
    monkeypatch.setattr(pipeline, "grid_search", real_grid)
    monkeypatch.setattr(pipeline, "search_clip",
                        lambda *a, **k: (*real_clip(*a, **k)[:3], math.nan))
    with pytest.raises(NonFiniteError, match=r"model\.layers\.0\.self_attn\.v_proj clip loss"):
        search_awq(tiny_llama(), calib(), SPEC, FAST)


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


def test_modules_to_not_convert_are_not_clipped():
    result = search_awq(tiny_llama(), calib(), SPEC, FAST, modules_to_not_convert=["down_proj"])
    assert result.clips and not any("down_proj" in k for k in result.clips)
    assert not any(k.endswith("mlp.up_proj") for k in result.scales)  # its only linear is fp


def test_bad_tokens_rejected():
    with pytest.raises(ValueError, match="integer"):
        search_awq(tiny_llama(), torch.rand(2, 8), SPEC, FAST)


def test_refinement_finds_the_finer_grid_minimum():
    """L(a) = (a - 0.33)^2 through s(a): the coarse grid (step 0.1) picks 0.3; two halvings
    reach 0.325, the best ratio of the step-0.025 grid, with 4 more losses instead of 30."""
    x_mean = torch.linspace(0.5, 4.0, 16)
    calls = []

    def loss(s: torch.Tensor) -> float:
        a = float(torch.log(s[-1] / s[0]) / torch.log(x_mean[-1] / x_mean[0]))  # recover a
        calls.append(a)
        return (a - 0.33) ** 2

    coarse = grid_search(loss, x_mean, None, 10)
    assert coarse.ratio == pytest.approx(0.3) and len(calls) == 10
    calls.clear()
    fine = grid_search(loss, x_mean, None, 10, n_refine=2)
    assert fine.ratio == pytest.approx(0.325) and len(calls) == 14
    assert fine.loss < coarse.loss and fine.losses == coarse.losses


@pytest.mark.parametrize("bad", [{"n_grid": 0}, {"clip_grid": 0}, {"n_refine": -1},
                                 {"clip_joint": -1}, {"scale_clip_grid": -1}, {"clip_damp": -1},
                                 {"clip_mode": "box"}, {"propagate": "int4"}])
def test_bad_config_rejected(bad):
    key = next(iter(bad))
    with pytest.raises(ValueError, match=key):
        AwqConfig(**bad)


def test_scale_candidates_are_clipped_only_where_the_clip_search_would_clip():
    """scale_clip_grid > 0: each scale candidate is judged after clipping the group's linears
    that the clip search itself clips: not those in clip_skip, not those left fp."""
    from awq_ref.awq.pipeline import _candidate_clips

    qkv = next(g for g in LLAMA_GROUPS if "self_attn.v_proj" in g.linears)
    gram = torch.eye(64)
    on = dataclasses.replace(FAST, scale_clip_grid=4)
    assert set(_candidate_clips(qkv, gram, SPEC, on, set())) == {"self_attn.v_proj"}
    assert _candidate_clips(qkv, gram, SPEC, on, {"self_attn.v_proj"}) == {}
    assert set(_candidate_clips(qkv, gram, SPEC, dataclasses.replace(on, clip_skip=()),
                                {"self_attn.k_proj"})) == {"self_attn.q_proj", "self_attn.v_proj"}
    assert _candidate_clips(qkv, gram, SPEC, dataclasses.replace(on, clip=False), set()) == {}
    assert _candidate_clips(qkv, gram, SPEC, FAST, set()) == {}


def test_config_defaults_are_the_measured_ones():
    """The defaults every published number was measured with (README, docs/results.md,
    walkthrough section 8 for n_grid 40, lohi and clip_joint 2): changing one changes them all,
    so it is an edit of this test too. `progress` only shows a bar: not part of the settings a
    result records."""
    assert AwqConfig().settings() == {
        "n_grid": 40, "n_refine": 0, "duo_scaling": False, "scale_vo_gqa": True, "clip": True,
        "clip_skip": ("self_attn.q_proj", "self_attn.k_proj"), "clip_grid": 40,
        "max_shrink": 0.5, "clip_mode": "lohi", "clip_joint": 2, "clip_damp": 0.0,
        "scale_clip_grid": 0, "loss_seqs": 8, "loss_tokens": 4096, "propagate": "fp",
        "chunk_tokens": 8192}
    assert AwqConfig().progress is True


def test_config_bounds_are_inclusive_where_they_say():
    """Counts of 1 and max_shrink 0 (no clipping but r = 1) are valid; max_shrink 1 is not."""
    AwqConfig(n_grid=1, clip_grid=1, loss_seqs=1, loss_tokens=1, chunk_tokens=1, max_shrink=0.0)
    with pytest.raises(ValueError, match=r"max_shrink must be in \[0, 1\)"):
        AwqConfig(max_shrink=1.0)


@torch.no_grad()
def test_token_subset_is_strided_over_every_window():
    """The MLP loss's token subset: every stride-th of all B x T tokens, the stride rounded up
    so that it reaches the last window (5 x 32 tokens, 64 asked: stride 3, 54 tokens)."""
    from awq_ref.awq.capture import SubsetPlan, capture_block
    from awq_ref.awq.scaling_groups import LLAMA_GROUPS

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
    from awq_ref.awq.capture import SubsetPlan, capture_block
    from awq_ref.awq.scaling_groups import LLAMA_GROUPS

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
    from awq_ref.awq.capture import SubsetPlan, capture_block, embed, forward_block
    from awq_ref.awq.scaling_groups import LLAMA_GROUPS

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
    from awq_ref.awq.capture import SubsetPlan, capture_block, forward_block
    from awq_ref.awq.scaling_groups import LLAMA_GROUPS

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


def test_unquantized_linears_stay_fp_in_the_scale_losses(monkeypatch):
    """modules_to_not_convert: a linear that stays fp is not fake-quantized when the scale of its
    group is judged (module_loss gets only the quantized linears' weights)."""
    from awq_ref.awq import pipeline

    seen = []
    real = pipeline.module_loss
    monkeypatch.setattr(pipeline, "module_loss",
                        lambda inspect, weights, *a, **k: seen.append(sorted(weights))
                        or real(inspect, weights, *a, **k))
    fp = ["layers.0.self_attn.q_proj", "layers.1.mlp.up_proj"]
    search_awq(tiny_llama(), calib(), SPEC, FAST, modules_to_not_convert=fp)
    assert seen == [["k_proj.weight", "v_proj.weight"], ["gate_proj.weight", "up_proj.weight"],
                    ["k_proj.weight", "q_proj.weight", "v_proj.weight"], ["gate_proj.weight"]]


def test_config_and_group_size_errors_name_what_is_wrong():
    with pytest.raises(ValueError, match=r"max_shrink must be in \[0, 1\)"):
        AwqConfig(max_shrink=1.5)
    with pytest.raises(ValueError, match="model.layers.0.self_attn.q_proj: group_size 48 does not"):
        search_awq(tiny_llama(), calib(), QuantSpec(4, 48, True), FAST)


def test_every_search_option_reaches_the_search(monkeypatch):
    """AwqConfig's fields arrive where they act (each once passed a default instead): duo
    scaling's weight means and the refinement steps at the ratio grid, the clip grid, shrink,
    mode and joint sweeps at the clip search, scale_vo_gqa at the choice of groups."""
    from awq_ref.awq import pipeline

    grids, clips = [], []
    real_grid, real_clip = pipeline.grid_search, pipeline.search_clip
    monkeypatch.setattr(pipeline, "grid_search",
                        lambda *a: grids.append(a) or real_grid(*a))
    monkeypatch.setattr(pipeline, "search_clip",
                        lambda *a, **k: clips.append((a, k)) or real_clip(*a, **k))
    config = dataclasses.replace(FAST, duo_scaling=True, n_refine=2, clip_grid=7, max_shrink=0.3,
                                 clip_mode="range", clip_joint=1, scale_vo_gqa=False)
    result = search_awq(tiny_llama(n_kv=2), calib(), SPEC, config)
    assert all(a[2] is not None and a[3] == 10 and a[5] == 2 for a in grids)  # w_mean, n_grid
    assert {(a[3], a[4], a[5], k["joint"]) for a, k in clips} == {(7, 0.3, "range", 1)}
    assert not any(name.endswith("v_proj") for name in result.scales)  # Hkv 2 < H 4: skipped
    assert len(result.scales) == 3 * 2 and len(grids) == 3 * 2
