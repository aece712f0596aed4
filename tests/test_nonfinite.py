"""Values a checkpoint must not carry, and the messages that name them: a float cast that
overflows (a norm weight past float16's 65504 becomes inf) or a NaN already in an unquantized
tensor is refused naming the tensor, in memory, streamed and on load; weights that are not
finite are called that, not an fp16 overflow."""

from __future__ import annotations

import copy

import make_random_checkpoint as mrc  # tools/ is on sys.path (conftest)
import pytest
import torch
from safetensors.torch import load_file, save_file

import awq_ref
from awq_ref.config import LlamaConfig
from awq_ref.model import Llama
from awq_ref.quant.checkpoint import load_quantized_model, save_quantized
from awq_ref.quant.packing import Fp16OverflowError

TINY = {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2}
NORM = "model.layers.0.input_layernorm.weight"


def tiny(seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    return Llama(LlamaConfig(**TINY)).eval()


def test_a_cast_that_overflows_float16_is_refused_before_writing(tmp_path):
    model = tiny()
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[3] = 1e5
    qmodel = awq_ref.quantize(model, "rtn", 4, 32)
    with pytest.raises(ValueError, match=rf"{NORM}: values past torch.float16's range "
                                         r"\(max \|x\| = 1e\+05\)"):
        save_quantized(qmodel, tmp_path / "q", dtype=torch.float16)
    assert not (tmp_path / "q").exists()
    out = save_quantized(qmodel, tmp_path / "q32")  # fp32 holds it
    assert load_file(out / "model.safetensors")[NORM][3] == 1e5
    with pytest.raises(ValueError, match=rf"q32: {NORM}: values past torch.float16's range "
                                         r".*; load it in float32 or bfloat16"):
        load_quantized_model(out, dtype=torch.float16)  # inf in every forward otherwise
    assert load_quantized_model(out, dtype=torch.bfloat16) is not None


@pytest.mark.parametrize("method", ["rtn", "awq"])
def test_nan_in_an_unquantized_tensor_is_refused(tmp_path, method):
    """The final norm is outside every block, so neither the search nor RTN reads it."""
    model = tiny()
    with torch.no_grad():
        model.model.norm.weight[5] = float("nan")
    options = ({"n_grid": 2, "progress": False, "calib_tokens": torch.randint(0, 96, (2, 16))}
               if method == "awq" else {})
    qmodel = awq_ref.quantize(model, method, 4, 32, **options)
    with pytest.raises(ValueError, match=r"model\.norm\.weight: holds NaN or inf"):
        save_quantized(qmodel, tmp_path / "q")
    assert not (tmp_path / "q").exists()


def test_a_streamed_cast_that_overflows_is_refused(tmp_path):
    src = tmp_path / "src"
    assert mrc.main(["--preset", "tiny", "--out", str(src), "--layers", "2",
                     "--dtype", "float32"]) == 0
    tensors = load_file(src / "model-00001-of-00001.safetensors")
    tensors[NORM][0] = 7e4
    save_file(tensors, src / "model-00001-of-00001.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{NORM}: values past torch.float16's range"):
        awq_ref.quantize_folder(src, tmp_path / "q", "rtn", group_size=32, dtype=torch.float16,
                                progress=False)
    assert not (tmp_path / "q").exists()
    tensors[NORM][0] = 1.0
    tensors["model.norm.weight"][0] = float("inf")
    save_file(tensors, src / "model-00001-of-00001.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.norm\.weight: holds NaN or inf"):
        awq_ref.quantize_folder(src, tmp_path / "q2", "rtn", group_size=32, progress=False)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_rtn_calls_a_weight_that_is_not_finite_by_its_name(bad):
    model = tiny()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[1, 2] = bad
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj: the weight holds "
                                         r"NaN or inf"):
        awq_ref.quantize(model, "rtn", 4, 32)


def test_awq_says_fp16_overflow_when_every_scale_candidate_overflows():
    """A weight no scale candidate brings within fp16's range: the search says so, naming the
    group, as RTN names the layer, instead of reporting NaN or inf in its losses."""
    model = tiny()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[1, 2] = 1e12
    with pytest.raises(Fp16OverflowError, match=r"model\.layers\.0\.mlp\.down_proj: a group's "
                                                r"range overflows the fp16 scales"):
        awq_ref.quantize(model, "rtn", 4, 32)
    with pytest.raises(Fp16OverflowError, match=r"model\.layers\.0\.mlp\.up_proj -> "
                                                r"mlp\.down_proj: every scale candidate overflows "
                                                r"fp16 \(at a = 0: "):
        awq_ref.quantize(model, "awq", 4, 32, n_grid=4, progress=False,
                         calib_tokens=torch.randint(0, 96, (2, 16)))


def test_the_scale_search_keeps_a_quantized_prev_within_fp16():
    """up_proj's rows are divided by the up -> down scale: a row of large weights (2000, within
    fp16) reading a hidden channel the calibration never excites gets a small s, which pushed
    the row past fp16 (up_proj's clip search then failed, naming no layer). Such candidates
    are out of the search: the model quantizes."""
    torch.manual_seed(0)
    model = Llama(LlamaConfig(**{**TINY, "vocab_size": 128})).eval()
    with torch.no_grad():  # hidden channel 5 is zero everywhere: MLP channel 0 never fires
        model.model.embed_tokens.weight[:, 5] = 0
        for b in model.model.layers:
            b.self_attn.o_proj.weight[5] = 0
            b.mlp.down_proj.weight[5] = 0
            b.mlp.gate_proj.weight[0] = 0
            b.mlp.gate_proj.weight[0, 5] = 10
            b.mlp.up_proj.weight[0] = 0
            b.mlp.up_proj.weight[0, 5] = 2000
    calib = torch.randint(0, 100, (8, 64), generator=torch.Generator().manual_seed(1))
    for clip in (True, False):
        qmodel = awq_ref.quantize(model, "awq", 4, 32, n_grid=20, progress=False, clip=clip,
                                  calib_tokens=calib)
        assert torch.isfinite(qmodel(calib[:1])).all()


@pytest.mark.parametrize("tokens,message", [
    (torch.randint(0, 96, (1, 2)), "only 2 calibration tokens"),
    (torch.cat([torch.full((16, 224), 2), torch.randint(0, 96, (16, 32))], 1),
     "token 2 is 88% of the calibration tokens (padding?)"),
])
def test_calibration_too_thin_for_a_search_is_warned_of(caplog, tokens, message):
    """Measured on stories260K (helper review, 2026-12-07): 1 x 2 tokens gave KL 0.42 and
    left-padded windows 0.21 against RTN's 0.12 and real text's 0.08; nothing said so."""
    with caplog.at_level("WARNING", logger="awq_ref.awq.calibration"):
        awq_ref.search_awq(tiny(), tokens, awq_ref.QuantSpec(4, 32),
                           awq_ref.AwqConfig(n_grid=2, progress=False))
    assert message in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="awq_ref.awq.calibration"):
        awq_ref.search_awq(tiny(), torch.randint(0, 96, (8, 256)), awq_ref.QuantSpec(4, 32),
                           awq_ref.AwqConfig(n_grid=2, progress=False))
    assert caplog.text == ""


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_model_is_folded_and_rounded_in_fp32(dtype):
    """quantize(awq) on a bf16/fp16 model folded the scales into its 16-bit weights, which were
    rounded to that dtype before the quantizer rounded them (1.7% of the codes moved in bf16;
    on stories260K W4, KL 0.0925, now 0.0904). Each block is now folded and rounded in fp32:
    the codes are those of the same model in fp32, and the unquantized tensors are its folded
    values rounded once."""
    torch.manual_seed(0)
    half = Llama(LlamaConfig(**TINY)).eval().to(dtype)
    calib = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(1))
    result = awq_ref.search_awq(half, calib, awq_ref.QuantSpec(4, 32),
                                awq_ref.AwqConfig(n_grid=10, progress=False))
    full = copy.deepcopy(half).float()  # the same values in fp32
    q_half = awq_ref.quantize(half, "awq", 4, 32, result=result)
    q_32 = awq_ref.quantize(full, "awq", 4, 32, result=result)
    half_state, state_32 = q_half.state_dict(), q_32.state_dict()
    for name, t in state_32.items():
        if name.endswith(("qweight", "qzeros", "scales")):
            assert torch.equal(half_state[name], t), name
        else:
            assert half_state[name].dtype == dtype, name
            assert torch.equal(half_state[name], t.to(dtype)), name
    fake = awq_ref.quantize(half, "awq", 4, 32, result=result, pack=False)
    fake_32 = awq_ref.quantize(full, "awq", 4, 32, result=result, pack=False)
    for (name, t), (_, t32) in zip(fake.state_dict().items(), fake_32.state_dict().items()):
        assert t.dtype == dtype and torch.equal(t, t32.to(dtype)), name
