"""A GGUF file's llama.* metadata read into a LlamaConfig (config_from_gguf), at its edges: the
float32 range, RoPE scaling named either way, a vocabulary size from the token list only when
there is one; and a file whose tensors do not match its config refused from the header alone,
before any tensor is dequantized."""

import pytest

from awq_ref.loaders import gguf_file, load_model
from awq_ref.loaders.gguf_file import config_from_gguf
from tests.test_loaders import own_tensors, tiny_model, write_gguf

META = {"general.architecture": "llama", "llama.embedding_length": 64,
        "llama.feed_forward_length": 96, "llama.block_count": 2, "llama.attention.head_count": 4,
        "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.vocab_size": 101}


def read(**changes):
    meta = {k: v for k, v in {**META, **changes}.items() if v is not None}
    return config_from_gguf(meta, {"output.weight"}, "m.gguf")


def test_floats_up_to_float32s_range_are_read():
    assert read(**{"llama.rope.freq_base": 3.4e38}).rope_theta == 3.4e38
    for value in (3.5e38, float("inf"), float("nan")):
        with pytest.raises(ValueError) as e:
            read(**{"llama.rope.freq_base": value})
        assert f"llama.rope.freq_base={value!r} is not a finite float32" in str(e.value)


@pytest.mark.parametrize("changes, names", [
    ({"llama.rope.scaling.type": "linear"}, set()),
    ({}, {"rope_freqs.weight"}),
], ids=["scaling-type", "rope-freqs-tensor"])
def test_rope_scaling_is_refused_however_the_file_says_it(changes, names):
    with pytest.raises(ValueError, match="rope scaling .* is not supported for GGUF"):
        config_from_gguf({**META, **changes}, names, "m.gguf")


@pytest.mark.parametrize("tokens", [[], "abc", None])
def test_vocabulary_size_comes_from_a_token_list_only(tokens):
    """Without llama.vocab_size the size is the token list's length; an empty list or a string
    in its place is no size at all."""
    assert read(**{"llama.vocab_size": None,
                   "tokenizer.ggml.tokens": ["a", "b", "c"]}).vocab_size == 3
    with pytest.raises(ValueError, match="m.gguf: GGUF metadata lacks llama.vocab_size"):
        read(**{"llama.vocab_size": None, "tokenizer.ggml.tokens": tokens})


def test_tensors_that_do_not_match_the_config_are_refused_before_dequantizing(tmp_path,
                                                                               monkeypatch):
    """Names and shapes are checked from the header (a few bytes of Q2_K dequantize to 16x
    their size as float32): dequantize_tensor is never reached."""
    model = tiny_model()
    tensors = own_tensors(model)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    path = write_gguf(tmp_path / "m.gguf", model, tensors=tensors)
    monkeypatch.setattr(gguf_file, "dequantize_tensor",
                        lambda *a: pytest.fail("a tensor was dequantized"))
    with pytest.raises(ValueError, match=r"missing \['model.layers.1.mlp.up_proj.weight'\]"):
        load_model(path)
