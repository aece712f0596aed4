"""AwqResult: save / load / re-apply round trip, and the api.quantize(method="awq") path."""

import copy
from pathlib import Path

import pytest
import torch
from test_awq_search import FAST, SPEC, calib, tiny_llama

from awq_ref.awq.apply import apply_awq
from awq_ref.awq.pipeline import run_awq, search_awq
from awq_ref.awq.result import AwqResult
from awq_ref.quant.qlinear import QuantLinear
from awq_ref.quant.quantizer import QuantSpec
from awq_ref.quant.rtn import apply_rtn


@pytest.fixture(scope="module")
def searched() -> AwqResult:
    """search_awq(tiny_llama(), calib(), SPEC, FAST), once for the module (tests copy it before
    changing it; tiny_llama() builds the same model each time)."""
    return search_awq(tiny_llama(), calib(), SPEC, FAST)


def test_save_load_reapply_round_trip(tmp_path, searched):
    model = tiny_llama()
    result = searched
    result.save(tmp_path / "awq.safetensors")
    loaded = AwqResult.load(tmp_path / "awq.safetensors")
    assert loaded.spec == SPEC and loaded.scales.keys() == result.scales.keys()
    assert loaded.info["config"] == result.info["config"]
    assert loaded.search == result.search and len(result.search) == 4 * 2  # groups x blocks
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    apply_awq(a, result)
    apply_awq(b, loaded)
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), name


def test_a_result_is_folded_in_once(searched, monkeypatch):
    """A second apply_awq (a notebook cell run twice) scaled the scaled weights again and
    clipped them to the once-scaled boxes, silently; now refused with the model unchanged, also
    through quantize(result=...), in a copy of the folded model, and before a new search."""
    from awq_ref.api import quantize

    model = tiny_llama()
    apply_awq(model, searched)
    once = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr("awq_ref.awq.pipeline.search_awq",
                        lambda *a, **k: pytest.fail("searched, then refused"))
    for again in (lambda: apply_awq(model, searched),
                  lambda: apply_awq(copy.deepcopy(model), searched, clip=False),
                  lambda: quantize(model, "awq", SPEC.bits, SPEC.group_size, result=searched),
                  lambda: quantize(model, "awq", SPEC.bits, SPEC.group_size, calib_tokens=calib())):
        with pytest.raises(ValueError, match="already folded into this model"):
            again()
    assert all(torch.equal(v, once[k]) for k, v in model.state_dict().items())
    quantize(model, "rtn", SPEC.bits, SPEC.group_size)  # what follows the fold: rounding


def test_run_awq_reapplies_a_result_at_another_width(searched):
    model = tiny_llama()
    result = searched
    direct = copy.deepcopy(model)
    apply_awq(direct, result)
    via_run = run_awq(copy.deepcopy(model), QuantSpec(3, 16, True), result=result)
    for (name, p), (_, q) in zip(direct.named_parameters(), via_run.named_parameters()):
        assert torch.equal(p, q), name
    with pytest.raises(TypeError):
        run_awq(copy.deepcopy(model), SPEC, result=result, n_grid=4)


def test_reapplied_result_leaves_newly_skipped_linears_unclipped(searched):
    """A result searched with every linear quantized, re-applied with down_proj kept fp: its
    scales (exact) still fold in, its clip box does not, and the quantized layers match."""
    from awq_ref.api import quantize

    model = tiny_llama()
    result = searched
    assert any(name.endswith("mlp.down_proj") for name in result.clips)
    kept = quantize(model, "awq", w_bit=SPEC.bits, group_size=SPEC.group_size, pack=False,
                    result=result, modules_to_not_convert=["mlp.down_proj"])
    scaled, folded = copy.deepcopy(model), copy.deepcopy(model)
    apply_awq(scaled, result, clip=False)
    apply_awq(folded, result)
    full = quantize(folded, "rtn", w_bit=SPEC.bits, group_size=SPEC.group_size, pack=False)
    for name, p in kept.named_parameters():
        expected = (scaled if "down_proj" in name else full).get_parameter(name)
        assert torch.equal(p, expected), name


def test_result_of_another_model_is_refused_and_changes_nothing(searched):
    """A result searched on a GQA model (2 KV heads) re-applied to an MHA one: the q/k/v group's
    scales fit, v_proj's do not; nothing may be folded in before the refusal."""
    result = searched
    other = tiny_llama(n_kv=4)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="scale of model.layers.0.self_attn.v_proj has shape"):
        apply_awq(other, result)
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())


def test_api_quantize_awq_beats_rtn_on_block_outputs():
    from awq_ref.api import quantize

    model = tiny_llama()
    tokens = calib(seed=3)
    kw = {"w_bit": 3, "group_size": 16, "pack": False}
    rtn = quantize(model, "rtn", **kw)
    awq = quantize(model, "awq", calib_tokens=calib(n=8), **kw, **{
        k: getattr(FAST, k) for k in ("n_grid", "loss_seqs", "loss_tokens", "progress")})
    ref = model(tokens).detach()
    with torch.no_grad():
        err = {n: float((m(tokens) - ref).pow(2).mean()) for n, m in (("rtn", rtn), ("awq", awq))}
    assert err["awq"] < err["rtn"], err


def test_load_rejects_other_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not an AwqResult"):
        AwqResult.load(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not found"):
        AwqResult.load(tmp_path / "missing.safetensors")


def test_a_saved_result_is_the_same_bytes_in_every_process(tmp_path):
    """--save-result's file differed from run to run with the same search: safetensors writes
    several metadata entries in a random order per process, and the search's wall time was one.
    Now one entry, sorted, without the time; files of the first format still load."""
    import subprocess
    import sys

    from safetensors.torch import save_file

    script = ("import sys, torch; from awq_ref import AwqResult, QuantSpec; "
              "AwqResult(QuantSpec(4, 16), scales={'a': torch.ones(4)}, info={'config': '{}', "
              "'search': '[]', 'seconds': sys.argv[2]}).save(sys.argv[1])")
    for i in range(3):
        subprocess.run([sys.executable, "-c", script, str(tmp_path / f"r{i}.st"), f"{i}.5"],
                       check=True, env={"PYTHONPATH": str(Path(__file__).parents[1]),
                                        "PYTHONHASHSEED": "random", "PATH": ""})
    files = {(tmp_path / f"r{i}.st").read_bytes() for i in range(3)}
    assert len(files) == 1
    loaded = AwqResult.load(tmp_path / "r0.st")
    assert loaded.info == {"config": "{}", "search": "[]"} and loaded.spec == QuantSpec(4, 16)
    old = {"format": "awq_ref.AwqResult/1", "bits": "3", "group_size": "32",
           "zero_point": "false", "info": '{"seconds": "1.0"}'}
    save_file({"scale.a": torch.ones(4)}, str(tmp_path / "old.st"), metadata=old)
    assert AwqResult.is_file(tmp_path / "old.st")
    assert AwqResult.load(tmp_path / "old.st").spec == QuantSpec(3, 32, False)


def test_load_refuses_unknown_and_unpaired_tensors(tmp_path):
    """A result file is re-applied to a model: a tensor it cannot place is an error, not skipped."""
    from safetensors.torch import save_file

    result = AwqResult(SPEC, scales={"model.layers.0.input_layernorm": torch.ones(64)},
                       clips={"model.layers.0.mlp.up_proj": (-torch.ones(96, 4),
                                                             torch.ones(96, 4))},
                       info={"note": "kept"})
    result.save(tmp_path / "ok.safetensors")
    loaded = AwqResult.load(tmp_path / "ok.safetensors")
    assert loaded.info == {"note": "kept"} and set(loaded.clips) == set(result.clips)
    meta = {"format": "awq_ref.AwqResult/1", "bits": "4", "group_size": "16",
            "zero_point": "true", "info": "{}"}
    for extra in ({"bias.model.layers.0.x": torch.ones(2)},
                  {"clip_lo.model.layers.0.mlp.down_proj": torch.ones(2, 2)}):  # no clip_hi
        save_file({**result.to_tensors(), **extra}, str(tmp_path / "bad.safetensors"),
                  metadata=meta)
        with pytest.raises(ValueError, match=f"unexpected tensor '{next(iter(extra))}'"):
            AwqResult.load(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("spec", [QuantSpec(3, 32, False), QuantSpec(8, -1, True)])
def test_saved_spec_round_trips(tmp_path, spec):
    """bits, group size and zero point come back as saved (a symmetric search stays symmetric)."""
    AwqResult(spec, scales={"model.layers.0.input_layernorm": torch.ones(4)}).save(tmp_path / "r")
    assert AwqResult.load(tmp_path / "r").spec == spec


def test_clip_ranges_that_do_not_fit_the_weight_are_refused():
    """Clip boxes (N, K/G) from another model or group size: an error naming the linear, never
    a clamp of the wrong groups."""
    model = tiny_llama()
    name = "model.layers.0.mlp.down_proj"
    n, k = model.get_submodule(name).weight.shape  # (64, 96)
    for shape in [(n, 5), (n + 1, k // 16), (n, 2 * k)]:
        bad = AwqResult(SPEC, clips={name: (-torch.ones(shape), torch.ones(shape))})
        with pytest.raises(ValueError, match="down_proj has shape"):
            apply_awq(model, bad)


def test_every_part_of_a_result_is_checked_before_anything_changes(searched):
    """Scales naming no group of this model (a deeper model's), with or without clipping, and a
    clip box whose lo and hi disagree: refused with the model untouched (the scales come first,
    so a late failure would leave them folded in)."""
    from awq_ref.awq.apply import check_result_fits

    model = tiny_llama()
    result = searched
    before = {k: v.clone() for k, v in model.state_dict().items()}
    deeper = copy.deepcopy(result)
    deeper.scales["model.layers.9.input_layernorm"] = torch.ones(64)
    for clip in (True, False):
        with pytest.raises(ValueError, match=r"scales \['model\.layers\.9\.input_layernorm'\] name "
                                             "no scaling group"):
            apply_awq(model, deeper, clip=clip)
    torn = copy.deepcopy(result)
    name = "model.layers.1.mlp.down_proj"
    lo, hi = torn.clips[name]
    torn.clips[name] = (lo, hi[:, :-1])
    with pytest.raises(ValueError, match=f"clip range of {name} has shape"):
        apply_awq(model, torn)
    with pytest.raises(ValueError, match=f"clip range of {name} has shape"):
        check_result_fits(model, torn)  # what the CLI's --result runs before anything else
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())



def test_a_fold_cut_short_is_marked_and_leaves_every_block_in_its_dtype(searched):
    """A fold that stops partway (Ctrl-C, out of memory, a failing rounding of a block) leaves
    the model marked, so a retry is refused instead of folding the first blocks twice, and
    every block back in its dtype (the failing one was in fp32 for its fold)."""
    model = tiny_llama().to(torch.bfloat16)

    def fail_at_block_1(i: int) -> None:
        if i == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        apply_awq(model, searched, then=fail_at_block_1)
    assert {t.dtype for t in model.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="already folded into this model"):
        apply_awq(model, searched)


def test_each_tensor_of_a_block_goes_back_to_its_own_dtype(searched):
    """A block mixing dtypes (fp32 norms, bf16 linears) is folded in fp32, then each tensor is
    cast back to the dtype it had, not all to the first one's."""
    model = tiny_llama().to(torch.bfloat16)
    for layer in model.model.layers:
        layer.input_layernorm.float()
        layer.post_attention_layernorm.float()
    apply_awq(model, searched)
    for layer in model.model.layers:
        assert layer.input_layernorm.weight.dtype == torch.float32
        assert layer.self_attn.q_proj.weight.dtype == torch.bfloat16
        assert layer.mlp.down_proj.weight.dtype == torch.bfloat16


def test_a_bias_moved_into_a_packed_layer_goes_back_to_the_blocks_dtype(searched):
    """api.quantize packs each block right after its fold, still in fp32: the q, k, v biases
    (Qwen2's) then sit in the new QuantLinear, and go back to bf16 with the rest of the block;
    the packed scales stay fp16."""
    model = tiny_llama(model_type="qwen2").to(torch.bfloat16)
    apply_awq(model, searched, then=lambda i: apply_rtn(model, SPEC, block=i))
    for layer in model.model.layers:
        q = layer.self_attn.q_proj
        assert isinstance(q, QuantLinear) and q.bias.dtype == torch.bfloat16
        assert q.scales.dtype == torch.float16 and q.qweight.dtype == torch.int32


def test_a_clip_outside_the_blocks_is_applied(searched):
    """A result may name a linear outside the decoder blocks (lm_head, edited in by hand): it is
    clipped as any other, after the blocks."""
    model = tiny_llama()
    result = copy.deepcopy(searched)
    n, k = model.lm_head.weight.shape
    boxes = (n, k // SPEC.group_size)
    result.clips["lm_head"] = (torch.full(boxes, -0.01), torch.full(boxes, 0.01))
    apply_awq(model, result)
    assert model.lm_head.weight.abs().max() <= 0.01
