"""Loader edges the main loader tests leave out: GGUF k-quants and 5-bit types against gguf's own
dequantizer, metadata defaults and refusals, HF folders with extra or wrong tensors, a shard
index pointing outside its folder, GGUF headers cut short, and kernels kept through fusion."""

import dataclasses
import json
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from awq_ref.config import LlamaConfig
from awq_ref.fuse import fuse_projections
from awq_ref.loaders import load_model, load_tokenizer, read_safetensors_folder
from awq_ref.loaders.gguf_header import read_header
from awq_ref.loaders.state_dict import check_disjoint, interleaved_to_half
from awq_ref.quant.checkpoint import load_quantized_model, save_quantized
from awq_ref.stream import quantize_folder
from tests.test_checkpoint import tiny_quantized
from tests.test_gguf_header import write
from tests.test_loaders import (
    add_llama_metadata,
    logits,
    own_tensors,
    save_hf,
    tiny_model,
    write_gguf,
)

gguf = pytest.importorskip("gguf")

# Byte offsets of the fp16 fields (d, and dmin/m where the type has one) inside one block.
F16_FIELDS = {"Q5_0": (0,), "Q5_1": (0, 2), "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2),
              "Q5_K": (0, 2), "Q6_K": (208,)}


def _write_raw_gguf(path, config: LlamaConfig, blocks: dict[str, np.ndarray], qtype):
    """A one-layer GGUF whose block linears are `blocks` (raw bytes of `qtype`, rows as stored),
    everything else small random F32."""
    rng = np.random.default_rng(1)
    w = gguf.GGUFWriter(str(path), "llama")
    add_llama_metadata(w, dataclasses.replace(config, num_hidden_layers=1))
    h, v = config.hidden_size, config.vocab_size
    for name, shape in [("token_embd.weight", (v, h)), ("output.weight", (v, h)),
                        ("output_norm.weight", (h,)), ("blk.0.attn_norm.weight", (h,)),
                        ("blk.0.ffn_norm.weight", (h,))]:
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32) * 0.1)
    for name, raw in blocks.items():
        w.add_tensor(name, raw, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("qtype", sorted(F16_FIELDS))
def test_gguf_k_and_5_bit_types_equal_gguf_dequantize(tmp_path, qtype):
    """Random blocks of each supported type (small fp16 scales, so no inf) load as exactly what
    gguf.quants.dequantize makes of them; q/k rows come back in rotate-half order."""
    kind = gguf.GGMLQuantizationType[qtype]
    block, type_size = gguf.GGML_QUANT_SIZES[kind]
    config = LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=256,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                         rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=64)
    rng = np.random.default_rng(0)
    hf = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
          "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    blocks = {}
    for g in hf:
        raw = rng.integers(0, 256, (256, 256 // block, type_size), dtype=np.uint8)  # (N, K/B, S)
        for at in F16_FIELDS[qtype]:
            raw[..., at:at + 2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
        blocks[f"blk.0.{g}.weight"] = raw.reshape(256, -1)  # (N, K/B * S)
    model = load_model(_write_raw_gguf(tmp_path / "m.gguf", config, blocks, kind))
    for g, name in hf.items():
        want = torch.from_numpy(gguf.quants.dequantize(blocks[f"blk.0.{g}.weight"], kind))
        if g in ("attn_q", "attn_k"):
            want = interleaved_to_half(want, config.num_attention_heads)
        got = model.get_parameter(f"model.layers.0.{name}.weight")
        assert torch.isfinite(want).all() and want.abs().max() > 0
        assert torch.equal(got, want), name


def test_tied_folder_storing_lm_head_copy_loads_tied(tmp_path):
    """A tied checkpoint that still stores lm_head.weight (some exporters write the copy): HF
    ignores the copy, and so do we; the head stays the embedding."""
    model = tiny_model(tied=True)
    folder = save_hf(model, tmp_path / "ckpt")
    sd = own_tensors(model)
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    save_file(sd, str(folder / "model.safetensors"))
    loaded = load_model(folder)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(logits(loaded), logits(model))


def _tied_with_other_head(model, folder):
    """Rewrite folder's tensors as `model`'s (tied) plus a stored lm_head.weight that differs."""
    sd = own_tensors(model)
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].flip(0).contiguous()
    (shard,) = folder.glob("*.safetensors")
    save_file(sd, str(shard), metadata={"format": "pt"})


TIED_BUT_OTHER = "ties lm_head to the embeddings .* stores a different lm_head.weight"


def test_tied_folder_storing_another_lm_head_is_refused(tmp_path):
    """tie_word_embeddings with a stored head that is not the embeddings: vLLM and transformers
    4 would use the embeddings, transformers 5 the stored head (it unties); refused, by the
    in-memory loader and by the streamed quantizer before it reads a block."""
    model = tiny_model(tied=True)
    folder = save_hf(model, tmp_path / "ckpt")
    _tied_with_other_head(model, folder)
    with pytest.raises(ValueError, match=TIED_BUT_OTHER):
        load_model(folder)
    with pytest.raises(ValueError, match=TIED_BUT_OTHER):
        quantize_folder(folder, tmp_path / "out", method="rtn", group_size=32, progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("head_dtype", [torch.float32, torch.float16])
def test_tied_folder_storing_the_same_head_with_a_nan_loads(tmp_path, head_dtype):
    """The stored copy is compared by value: a NaN (an unused padding row, say) equals itself,
    and a copy in another dtype holding the same values is the same head."""
    model = tiny_model(tied=True)
    with torch.no_grad():
        model.model.embed_tokens.weight[5] = float("nan")
        model.model.embed_tokens.weight.copy_(model.model.embed_tokens.weight.half().float())
    folder = save_hf(model, tmp_path / "ckpt")
    sd = own_tensors(model)
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].to(head_dtype, copy=True)
    save_file(sd, str(folder / "model.safetensors"))
    loaded = load_model(folder)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_tied_quantized_checkpoint_storing_another_lm_head_is_refused(tmp_path):
    model = tiny_quantized(tie_word_embeddings=True)
    out = save_quantized(model, tmp_path / "q")
    (shard,) = out.glob("*.safetensors")
    tensors = load_file(shard)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].flip(0).contiguous()
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=TIED_BUT_OTHER):
        load_quantized_model(out)


def test_folder_with_rotary_inv_freq_tensors_loads(tmp_path):
    """Older transformers exports store each layer's rotary_emb.inv_freq: the model recomputes
    it, so those tensors are skipped, not refused as unexpected."""
    model = tiny_model()
    folder = save_hf(model, tmp_path / "ckpt")
    sd = own_tensors(model)
    for i in range(model.config.num_hidden_layers):
        sd[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = model._inv_freq.clone()
    save_file(sd, str(folder / "model.safetensors"))
    assert torch.equal(logits(load_model(folder)), logits(model))


def test_gguf_without_rope_freq_base_reads_theta_10000(tmp_path, monkeypatch):
    """llama.cpp's default for a missing llama.rope.freq_base is 10000 (Llama-1/2 files)."""
    model = tiny_model()  # rope_theta 10000
    monkeypatch.setattr(gguf.GGUFWriter, "add_rope_freq_base", lambda self, value: None)
    path = write_gguf(tmp_path / "m.gguf", model)
    assert "llama.rope.freq_base" not in read_header(path).metadata
    loaded = load_model(path)
    assert loaded.config.rope_theta == 10000.0
    assert torch.allclose(logits(loaded), logits(model), atol=1e-5)


def test_gguf_partial_rotary_is_refused(tmp_path):
    """llama.rope.dimension_count below head_dim (16 here) means RoPE over part of each head,
    which our model does not do: refused, not loaded rotating every dimension."""
    model = tiny_model()
    ok = write_gguf(tmp_path / "ok.gguf", model, extra={"llama.rope.dimension_count": 16})
    assert torch.allclose(logits(load_model(ok)), logits(model), atol=1e-5)
    path = write_gguf(tmp_path / "rot8.gguf", model, extra={"llama.rope.dimension_count": 8})
    with pytest.raises(ValueError, match="llama.rope.dimension_count=8 differs from head_dim 16"):
        load_model(path)


def test_int8_tensor_in_fp_folder_is_refused(tmp_path):
    """An integer tensor where a float weight belongs (a quantized export without its
    quantization_config) is refused by name, not cast to float as if it were weights."""
    model = tiny_model()
    folder = save_hf(model, tmp_path / "ckpt")
    sd = own_tensors(model)
    name = "model.layers.0.mlp.down_proj.weight"
    sd[name] = (sd[name] * 100).to(torch.int8)
    save_file(sd, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=f"{name} has dtype torch.int8, expected a float type"):
        load_model(folder)


def test_shard_index_pointing_outside_the_folder_is_refused(tmp_path):
    """An index naming "../outside/model.safetensors" would read any file the process can:
    shard names must be plain file names in the folder."""
    names = read_safetensors_folder(save_hf(tiny_model(), tmp_path / "outside"))
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: "../outside/model.safetensors" for n in names}}))
    with pytest.raises(ValueError, match="points at '../outside/model.safetensors', not a file"):
        read_safetensors_folder(tmp_path / "ckpt")


def test_gguf_cut_inside_a_metadata_string_is_refused(tmp_path):
    """A file ending in the middle of a string value: ValueError naming the file and the entry
    (each length is checked against what is left after the current offset)."""
    data = write(tmp_path / "m.gguf", tensors=[("t", np.ones((2, 32), np.float32), None)]
                 ).read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:data.index(b"x" * 300) + 100])  # 100 of the string's 300 bytes
    with pytest.raises(ValueError, match="metadata entry 'strings' of 300 bytes") as e:
        read_header(cut)
    assert str(cut) in str(e.value) and "runs past the end" in str(e.value)


def test_gguf_one_byte_short_of_the_last_tensor_is_refused(tmp_path):
    """The last tensor's data must end within the file: one byte short is truncated."""
    path = write(tmp_path / "m.gguf", tensors=[("t", np.ones((2, 32), np.float32), None)])
    data = path.read_bytes()
    assert read_header(path).tensors[0].n_bytes == 2 * 32 * 4
    short = tmp_path / "short.gguf"
    short.write_bytes(data[:-1])
    with pytest.raises(ValueError, match=f"ends at byte {len(data)}, past the end of the file "
                                         f"\\({len(data) - 1} bytes\\): truncated"):
        read_header(short)


def test_gguf_columns_not_a_multiple_of_the_block_are_refused(tmp_path):
    """A Q8_0 tensor (blocks of 32 weights) claiming 40 columns cannot be stored: the header
    check refuses it before its byte count (40 // 32 blocks a row) under-reads the rows."""
    data = bytearray(write(tmp_path / "m.gguf",
                           tensors=[("t", np.ones((2, 32), np.float32), None)]).read_bytes())
    info = data.rindex(b"\x01" + bytes(7) + b"t") + 9  # after the name: n_dims, ne0, ne1, type
    assert struct.unpack_from("<IQQI", data, info) == (2, 32, 2, 0)  # 2 dims, (32, 2), F32
    struct.pack_into("<IQQI", data, info, 2, 40, 2, gguf.GGMLQuantizationType.Q8_0)
    bad = tmp_path / "blk.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="tensor t has 40 columns, not a multiple of Q8_0's "
                                         "block of 32"):
        read_header(bad)


def test_kernel_set_before_fusing_runs_every_product():
    """apply_kernel then fuse_projections (the API allows either order): the fused q/k/v and
    gate/up layers keep the kernel, so it sees every product, with the same logits."""
    from awq_ref.api import quantize
    from awq_ref.quant.packing import dequantize_packed
    from awq_ref.quant.qlinear import apply_kernel
    from tests.test_qlinear import tiny_llama

    calls = []

    def kernel(x, qweight, qzeros, scales, group_size):
        calls.append(qweight.shape)
        return x @ dequantize_packed(qweight, qzeros, scales, group_size, x.dtype)

    model = quantize(tiny_llama(), method="rtn", w_bit=4, group_size=32)
    tokens = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        want = model(tokens)
        apply_kernel(model, kernel)
        assert fuse_projections(model) == 2 * len(model.model.layers)
        got = model(tokens)
    assert len(calls) == 4 * len(model.model.layers)  # qkv, o, gate_up, down per block
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_tensor_data_sharing_one_byte_is_refused():
    """Adjacent tensors are fine; sharing even one byte is not (a small file claiming a large
    model); empty tensors hold no bytes and may sit anywhere."""
    check_disjoint([("a", 0, 8), ("b", 8, 8), ("e", 4, 0)], "f")
    with pytest.raises(ValueError, match="f: the data of tensors a and b overlap"):
        check_disjoint([("b", 7, 8), ("a", 0, 8)], "f")


def test_gguf_without_context_length_reads_2048(tmp_path, monkeypatch):
    """llama.cpp's default for a missing llama.context_length (old conversions) is 2048."""
    monkeypatch.setattr(gguf.GGUFWriter, "add_context_length", lambda self, value: None)
    path = write_gguf(tmp_path / "m.gguf", tiny_model())
    assert "llama.context_length" not in read_header(path).metadata
    assert load_model(path).config.max_position_embeddings == 2048


def test_gguf_integer_key_holding_a_bool_is_refused(tmp_path, monkeypatch):
    """A bool where GGUF stores an integer (Python's True is an int) is corrupt metadata, not 1
    block."""
    monkeypatch.setattr(gguf.GGUFWriter, "add_block_count",
                        lambda self, value: self.add_bool("llama.block_count", True))
    path = write_gguf(tmp_path / "m.gguf", tiny_model())
    with pytest.raises(ValueError, match="GGUF metadata llama.block_count=True is not an integer"):
        load_model(path)


def test_gguf_parts_of_a_split_file_are_refused_by_name(tmp_path):
    """llama.cpp's gguf-split writes the metadata into part 1 only and some tensors into each:
    every part is refused as a part, with the merge command, not as a mismatch or an unknown
    architecture."""
    model = tiny_model()
    path = tmp_path / "m-00001-of-00002.gguf"
    write_gguf(path, model, extra={"split.count": 2})
    for load in (load_model, load_tokenizer):
        with pytest.raises(ValueError, match="one part of a GGUF split into 2 files"):
            load(path)


def test_gguf_llama_with_biases_is_refused_by_name(tmp_path):
    model = tiny_model()
    tensors = {**own_tensors(model), "blk.0.attn_q.bias": torch.zeros(64)}
    path = tmp_path / "bias.gguf"
    write_gguf(path, model, tensors=tensors)
    with pytest.raises(ValueError, match=r"tensors \['blk.0.attn_q.bias'\] are biases"):
        load_model(path)
