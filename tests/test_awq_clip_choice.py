"""Which clip box the search chooses, tried directly: the ratio grid, the plain search per
(row, group) and lohi's passes against a group-by-group reference, one joint sweep with the
other groups fixed, and clip_block's Gram after scaling.
(tests/test_awq_search.py checks that clipping never does worse than round-to-nearest.)"""

import dataclasses

import pytest
import torch
from test_awq_search import FAST, SPEC, tiny_llama

from awq_ref.awq.capture import InputStats
from awq_ref.awq.pipeline import clip_block
from awq_ref.awq.result import AwqResult
from awq_ref.awq.scaling_groups import LLAMA_GROUPS
from awq_ref.awq.search_clip import _ratios, clip_box, search_clip
from awq_ref.quant.quantizer import QuantSpec, grouped
from awq_ref.quant.rtn import fake_quantize_weight


def test_clip_ratio_grid_is_llm_awqs():
    assert _ratios(20, 0.5) == pytest.approx([1 - i / 20 for i in range(10)])  # 1 .. 0.55
    assert _ratios(40, 0.5)[-1] == pytest.approx(0.525) and len(_ratios(40, 0.5)) == 20
    assert _ratios(4, 0.1) == [1.0]  # always r = 1: never worse than round-to-nearest


def test_search_clips_defaults_are_llm_awqs_plain_search():
    """Called with no settings, search_clip is llm-awq's: a grid of 20, shrinking by at most
    half, the "range" box, no joint sweeps."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(200, 64, generator=gen)
    x[:, ::16] *= 0.01  # a weight outlier on a quiet input channel in every group: clip it hard
    w = torch.randn(12, 64, generator=gen) * 0.1
    w[:, ::16] = 5.0
    gram = x.T @ x
    lo, hi, before, after = search_clip(w, gram, SPEC)
    lo2, hi2, before2, after2 = search_clip(w, gram, SPEC, 20, 0.5, "range", joint=0)
    assert torch.equal(lo, lo2) and torch.equal(hi, hi2) and (before, after) == (before2, after2)
    assert not torch.equal(lo, search_clip(w, gram, SPEC, 20, 1.0, "range")[0])  # not vacuous


@pytest.mark.parametrize("mode", ["range", "absmax"])
def test_plain_clip_search_picks_the_brute_force_best_box(mode):
    """Each (row, group) keeps the ratio whose clamped, quantized group has the least error on
    that group's own inputs (X_g (q - w)): checked by trying every ratio directly."""
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(300, 32, generator=gen) * (torch.rand(32, generator=gen) * 3 + 0.2)).double()
    w = (torch.randn(6, 32, generator=gen) + 0.4).double()
    w[0, 3] = -6.0  # one large negative outlier
    lo, hi, _, _ = search_clip(w, x.T @ x, SPEC, mode=mode)
    for n in range(6):
        for gi in range(2):
            wg, xg = w[n, 16 * gi:16 * gi + 16], x[:, 16 * gi:16 * gi + 16]
            best = None
            for r in _ratios(20, 0.5):
                a, b = clip_box(wg[None, None], r, mode, True)
                q = fake_quantize_weight(wg.clamp(float(a), float(b))[None], SPEC)[0]
                err = float((xg @ (q - wg)).pow(2).sum())
                if best is None or err < best[0]:
                    best = (err, float(a), float(b))
            assert (float(lo[n, gi]), float(hi[n, gi])) == best[1:], (n, gi)
    ratio = hi / grouped(w, 16).abs().amax(-1) if mode == "absmax" else hi / grouped(w, 16).amax(-1)
    assert (ratio < 1).any()  # not vacuous: some groups are clipped
    if mode == "range":  # both ends shrink by the one ratio
        assert torch.allclose(lo / grouped(w, 16).amin(-1), ratio, rtol=1e-12)


@pytest.mark.parametrize("mode", ["range", "lohi"])
def test_one_joint_sweep_picks_each_groups_best_box_given_the_others(one_thread, mode):
    """joint = 1: every group's box re-picked by its row's whole output error with the other
    groups' errors fixed (cross-group terms included), tried directly; a row keeps the new
    boxes only if its whole error went down. The candidates are the ratio grid's "range"
    boxes; lohi's boxes (the pipeline's default) lie off that grid, so there a group keeps its
    box unless a candidate beats it."""
    gen = torch.Generator().manual_seed(6)
    rows, groups = 24, 8
    x = (torch.randn(300, 16 * groups, generator=gen)
         + 2 * torch.randn(300, 1, generator=gen)).double()  # a shared component couples groups
    w = torch.randn(rows, 16 * groups, generator=gen).double()
    lo0, hi0, _, _ = search_clip(w, x.T @ x, SPEC, mode=mode)
    lo, hi, _, _ = search_clip(w, x.T @ x, SPEC, mode=mode, joint=1)
    assert not torch.equal(lo, lo0)  # not vacuous: the sweep moved some boxes

    gram = x.T @ x

    def row_error(n, boxes):  # boxes: [(lo, hi)] per group -> ||X (q_n - w_n)||^2 = e^T H e
        clipped = torch.cat([w[n, 16 * g:16 * g + 16].clamp(a, b)
                             for g, (a, b) in enumerate(boxes)])
        e = fake_quantize_weight(clipped[None], SPEC)[0] - w[n]
        return float(e @ gram @ e)

    refused = 0
    for n in range(rows):
        start = [(float(lo0[n, g]), float(hi0[n, g])) for g in range(groups)]
        new = []
        for g in range(groups):
            best = (row_error(n, start), start[g])
            for r in _ratios(20, 0.5):
                a, b = clip_box(w[n, 16 * g:16 * g + 16][None, None], r, "range", True)
                boxes = [*start[:g], (float(a), float(b)), *start[g + 1:]]
                if (err := row_error(n, boxes)) < best[0]:
                    best = (err, boxes[g])
            new.append(best[1])
        kept = row_error(n, new) < row_error(n, start)
        refused += new != start and not kept
        want = new if kept else start
        assert [(float(lo[n, g]), float(hi[n, g])) for g in range(groups)] == want, n
    assert refused  # not vacuous: some row's new boxes together were worse, and were not kept


@torch.no_grad()
@pytest.mark.parametrize("damp", [0.0, 0.3])
def test_clip_block_judges_scaled_weights_by_the_scaled_inputs(damp):
    """After AWQ's scales a linear sees x / s: clip_block must search with the Gram of x / s
    (computed here from the tokens themselves), and with plain x where nothing was scaled;
    clip_damp adds damp * mean(diag H) * I to that Gram H."""
    block = tiny_llama().model.layers[0].double()
    gen = torch.Generator().manual_seed(7)
    xs, stats = [], []
    for group in LLAMA_GROUPS:
        k = block.get_submodule(group.linears[0]).in_features
        x = (torch.randn(200, k, generator=gen) * (torch.rand(k, generator=gen) * 4 + 0.1)).double()
        xs.append(x)
        stats.append(InputStats(abs_sum=x.abs().sum(0), gram=x.T @ x, count=200))
    s = (torch.rand(64, generator=gen) + 0.5).double()  # the q/k/v group's scale
    config = dataclasses.replace(FAST, clip_skip=(), clip_joint=0, clip_mode="range",
                                 clip_damp=damp)
    weights = {n: m.weight.detach().clone() for n, m in block.named_modules()
               if isinstance(m, torch.nn.Linear)}
    result = AwqResult(spec=SPEC)
    clip_block(block, "b", stats, {0: s}, SPEC, config, result, set())
    for gi, group in enumerate(LLAMA_GROUPS):
        x = xs[gi] / s if gi == 0 else xs[gi]
        for name in group.linears:
            gram = x.T @ x
            gram = gram + damp * gram.diagonal().mean() * torch.eye(x.shape[1], dtype=x.dtype)
            lo, hi, _, _ = search_clip(weights[name], gram, SPEC, config.clip_grid,
                                       config.max_shrink, "range")
            got_lo, got_hi = result.clips[f"b.{name}"]
            assert torch.allclose(got_lo, lo, rtol=1e-12) and torch.allclose(got_hi, hi,
                                                                             rtol=1e-12), name


@pytest.mark.parametrize("mode", ["range", "absmax", "lohi"])
def test_groups_the_calibration_never_activates_are_not_clipped(mode):
    """Every box of a group whose inputs are all zero has the same (zero) error: the tie keeps
    the first box, r = 1, instead of clipping weights the calibration never exercised."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(200, 32, generator=gen).double()
    x[:, :16] = 0  # group 0 dead, group 1 alive
    w = torch.randn(5, 32, generator=gen).double()
    w[:, 20] = 4.0  # an outlier in group 1, so that group is clipped
    lo, hi, _, _ = search_clip(w, x.T @ x, SPEC, mode=mode)
    full_lo, full_hi = clip_box(grouped(w, 16), 1.0, mode, True)  # (5, 2)
    assert torch.equal(lo[:, 0], full_lo[:, 0]) and torch.equal(hi[:, 0], full_hi[:, 0])
    assert (hi[:, 1] < full_hi[:, 1]).any()  # not vacuous: the live group is clipped


def test_symmetric_quantization_keeps_symmetric_boxes_in_every_mode():
    """zero_point=False quantizes on [-m, m]: every mode searches the absmax box, and "lohi"
    never refines its ends apart (a box [lo, hi] with lo != -hi would be rounded as its absmax)."""
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(200, 32, generator=gen).double()
    w = (torch.randn(6, 32, generator=gen) + 0.8).double()  # mostly positive: asymmetric groups
    spec = QuantSpec(4, 16, zero_point=False)
    absmax = grouped(w, 16).abs().amax(-1)
    for mode in ("range", "absmax", "lohi"):
        lo, hi, _, _ = search_clip(w, x.T @ x, spec, mode=mode)
        assert torch.equal(lo, -hi), mode
        assert (hi < absmax).any(), mode  # not vacuous: some groups are clipped


def test_lohi_matches_a_group_by_group_reference():
    """lohi's three passes (shared shrink; then hi with lo fixed; then lo with hi fixed), written
    out one group at a time: each group's error must equal the reference's (up to rounding)."""
    torch.manual_seed(1)
    x = torch.randn(400, 64)
    w = torch.randn(24, 64) + 0.3
    gram, n_grid = x.T @ x, 10
    lo, hi, _, _ = search_clip(w, gram, SPEC, n_grid=n_grid, max_shrink=0.5, mode="lohi")
    ratios = [1 - i / n_grid for i in range(5)]
    improved = 0
    for n in range(24):
        for j in range(4):
            v, h = w[n, 16 * j:16 * j + 16], gram[16 * j:16 * j + 16, 16 * j:16 * j + 16]

            def err(a, b, v=v, h=h):  # e^T H_gg e for this group clamped to [a, b]
                e = fake_quantize_weight(torch.clamp(v, a, b)[None], SPEC)[0] - v
                return float(e @ h @ e)

            best = min(((v.min() * r, v.max() * r) for r in ratios), key=lambda b: err(*b))
            best = min([best, *((best[0], torch.maximum(v.max() * r, best[0])) for r in ratios)],
                       key=lambda b: err(*b))
            best = min([best, *((torch.minimum(v.min() * r, best[1]), best[1]) for r in ratios)],
                       key=lambda b: err(*b))
            assert err(lo[n, j], hi[n, j]) == pytest.approx(err(*best), rel=1e-4, abs=1e-6)
            improved += err(*best) < 0.999 * err(v.min() * ratios[0], v.max() * ratios[0])
    assert improved > 24  # the reference's passes did move most groups off the full range
