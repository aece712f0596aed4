"""AwqConfig: its measured defaults, its bounds, and every option arriving where it acts."""

import dataclasses

import pytest
import torch
from test_awq_search import FAST, SPEC, calib, tiny_llama

from awq_ref.awq import pipeline
from awq_ref.awq.pipeline import AwqConfig, _candidate_clips, search_awq
from awq_ref.awq.scaling_groups import LLAMA_GROUPS
from awq_ref.quant.quantizer import QuantSpec


@pytest.mark.parametrize("bad", [{"n_grid": 0}, {"clip_grid": 0}, {"n_refine": -1},
                                 {"clip_joint": -1}, {"scale_clip_grid": -1}, {"clip_damp": -1},
                                 {"clip_mode": "box"}, {"propagate": "int4"}])
def test_bad_config_rejected(bad):
    key = next(iter(bad))
    with pytest.raises(ValueError, match=key):
        AwqConfig(**bad)


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


def test_config_and_group_size_errors_name_what_is_wrong():
    with pytest.raises(ValueError, match=r"max_shrink must be in \[0, 1\)"):
        AwqConfig(max_shrink=1.5)
    with pytest.raises(ValueError, match="model.layers.0.self_attn.q_proj: group_size 48 does not"):
        search_awq(tiny_llama(), calib(), QuantSpec(4, 48, True), FAST)


def test_every_search_option_reaches_the_search(monkeypatch):
    """AwqConfig's fields arrive where they act (each once passed a default instead): duo
    scaling's weight means and the refinement steps at the ratio grid, the clip grid, shrink,
    mode and joint sweeps at the clip search, scale_vo_gqa at the choice of groups."""
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


def test_scale_candidates_are_clipped_only_where_the_clip_search_would_clip():
    """scale_clip_grid > 0: each scale candidate is judged after clipping the group's linears
    that the clip search itself clips: not those in clip_skip, not those left fp."""
    qkv = next(g for g in LLAMA_GROUPS if "self_attn.v_proj" in g.linears)
    gram = torch.eye(64)
    on = dataclasses.replace(FAST, scale_clip_grid=4)
    assert set(_candidate_clips(qkv, gram, SPEC, on, set())) == {"self_attn.v_proj"}
    assert _candidate_clips(qkv, gram, SPEC, on, {"self_attn.v_proj"}) == {}
    assert set(_candidate_clips(qkv, gram, SPEC, dataclasses.replace(on, clip_skip=()),
                                {"self_attn.k_proj"})) == {"self_attn.q_proj", "self_attn.v_proj"}
    assert _candidate_clips(qkv, gram, SPEC, dataclasses.replace(on, clip=False), set()) == {}
    assert _candidate_clips(qkv, gram, SPEC, FAST, set()) == {}
