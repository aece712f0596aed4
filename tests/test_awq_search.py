"""AWQ search: invariance of the folded scales, clipping, grid minimum, determinism, GQA, NaNs,
and every fast path (Gram closed forms) against its direct reference."""

import copy
import dataclasses
import math

import pytest
import torch

from awq_ref.awq.apply import apply_awq, apply_scale
from awq_ref.awq.capture import NonFiniteError
from awq_ref.awq.pipeline import PROPAGATE, AwqConfig, search_awq
from awq_ref.awq.scaling_groups import expand_kv, reduce_kv
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
