"""config.json read as transformers reads it (test-only oracle): RoPE's keys and their
precedence, sliding-window layers, activations, bias switches, defaults per architecture,
refusals."""

import copy
from dataclasses import asdict

import pytest
import torch

from awq_ref.config import LlamaConfig
from tests.test_model import (
    LLAMA3_ROPE,
    TINY_SIZES,
    mistral_hf_dict,
    qwen2_hf_dict,
    tiny_hf_dict,
)

transformers = pytest.importorskip("transformers", reason="transformers is the test oracle")


def test_rope_parameters_style_config_reads_the_same():
    d = tiny_hf_dict(2, False, LLAMA3_ROPE)
    v5 = {k: v for k, v in d.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = {"rope_theta": 500000.0, **LLAMA3_ROPE}
    assert LlamaConfig.from_hf_dict(v5) == LlamaConfig.from_hf_dict(d)


LLAMA3_FIELDS = {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_type"}
ROPE_VARIANTS = {  # config.json's RoPE keys (beside tiny_hf_dict's rope_theta 5e5), as written
    "5.x, old 'type' key": {"rope_parameters": {"type": "llama3", **LLAMA3_FIELDS}},
    "5.x, theta only inside": {"rope_theta": None, "rope_parameters": {"rope_theta": 2e4}},
    "inner theta wins": {"rope_parameters": {"rope_type": "default", "rope_theta": 5e4}},
    "rope_scaling wins": {"rope_scaling": LLAMA3_ROPE, "rope_parameters": {"rope_type": "default"}},
    "rope_scaling wins, default": {"rope_scaling": {"type": "default"},
                                   "rope_parameters": LLAMA3_ROPE},
    "empty rope_scaling": {"rope_scaling": {}, "rope_parameters": LLAMA3_ROPE},
    "llama3 without original max": {"rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                                     "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0}},
}


@pytest.mark.parametrize("rope", ROPE_VARIANTS.values(), ids=ROPE_VARIANTS.keys())
def test_rope_settings_are_read_as_transformers_reads_them(rope):
    """Which object, which key names the type, whose theta, which defaults: transformers 5's
    standardised rope_parameters is the oracle (the logits tests cover the computation)."""
    d = {**tiny_hf_dict(), **rope}
    d = {k: v for k, v in d.items() if v is not None}
    ours = LlamaConfig.from_hf_dict(copy.deepcopy(d))
    theirs = transformers.LlamaConfig.from_dict(copy.deepcopy(d)).rope_parameters  # it edits d
    assert ours.rope_theta == theirs["rope_theta"]
    if theirs["rope_type"] == "default":
        assert ours.rope_scaling is None
    else:
        assert theirs["rope_type"] == "llama3"
        assert asdict(ours.rope_scaling) == {k: theirs[k] for k in LLAMA3_FIELDS}


@pytest.mark.parametrize("rope", [
    {"rope_parameters": {"type": "linear", "factor": 4.0}},  # was read as plain RoPE
    {"rope_parameters": {"rope_type": "default"}, "rope_scaling": {"type": "yarn", "factor": 4.0}},
], ids=["5.x-type-key", "4.x-beside-5.x"])
def test_unsupported_rope_scaling_is_refused_however_it_is_written(rope):
    with pytest.raises(ValueError, match="rope scaling type '(linear|yarn)' is not supported"):
        LlamaConfig.from_hf_dict({**tiny_hf_dict(), **rope})


def test_rope_parameters_per_layer_type_are_refused():
    """transformers 5 nests rope_parameters by layer type for some models; read flat, its
    entries would be ignored (plain RoPE)."""
    rope = {"rope_parameters": {"full_attention": LLAMA3_ROPE}}
    with pytest.raises(ValueError, match="rope_parameters per layer type"):
        LlamaConfig.from_hf_dict({**tiny_hf_dict(), **rope})


@pytest.mark.parametrize("switches, slides", [
    ({"use_sliding_window": True, "max_window_layers": 1}, True),  # layer 1 of 2 slides
    ({"use_sliding_window": True, "max_window_layers": 0}, True),
    ({"use_sliding_window": True, "max_window_layers": 2}, False),  # no layer from 2 on
    ({"use_sliding_window": True, "sliding_window": None}, False),
    ({"use_sliding_window": True, "layer_types": ["full_attention", "sliding_attention"]}, True),
    ({"use_sliding_window": True, "max_window_layers": 0,
      "layer_types": ["full_attention", "full_attention"]}, False),
    ({"layer_types": ["full_attention", "sliding_attention"]}, False),  # the switch is off
    ({"use_sliding_window": True, "layer_types": ["attention", "full_attention"]}, False),
])
def test_qwen2_sliding_window_layers_are_refused(switches, slides):
    """Refused exactly where transformers slides a layer's attention (Qwen2Attention's window:
    config.sliding_window, None unless use_sliding_window, on layer_types' sliding layers),
    accepted where every layer stays full."""
    d = {**qwen2_hf_dict(False), **switches}
    theirs = transformers.Qwen2Config(**d)
    assert (theirs.sliding_window is not None
            and "sliding_attention" in theirs.layer_types) == slides
    if slides:
        with pytest.raises(ValueError, match="sliding-window layers are not supported"):
            LlamaConfig.from_hf_dict(d)
    else:
        assert LlamaConfig.from_hf_dict(d).sliding_window is None


def test_layer_types_do_not_make_llama_or_mistral_layers_slide():
    """LlamaConfig has no layer_types and MistralConfig ignores them (warning): a config that
    lists sliding layers loads, as in transformers (Mistral's window is sliding_window)."""
    kinds = {"use_sliding_window": True, "layer_types": ["sliding_attention", "full_attention"]}
    assert LlamaConfig.from_hf_dict({**tiny_hf_dict(), **kinds}).sliding_window is None
    mistral = LlamaConfig.from_hf_dict({**mistral_hf_dict(32), **kinds})
    assert mistral.sliding_window == 32


def test_swish_is_silu():
    """transformers' ACT2FN computes "swish" as SiLU."""
    x = torch.linspace(-8, 8, 101)
    act = transformers.activations.ACT2FN
    assert torch.equal(act["swish"](x), torch.nn.functional.silu(x))
    assert torch.equal(act["silu"](x), torch.nn.functional.silu(x))
    d = tiny_hf_dict()
    assert LlamaConfig.from_hf_dict({**d, "hidden_act": "swish"}) == LlamaConfig.from_hf_dict(d)
    with pytest.raises(ValueError, match="hidden_act='gelu' is not supported"):
        LlamaConfig.from_hf_dict({**d, "hidden_act": "gelu"})


def test_llama_bias_switches_belong_to_llama():
    with pytest.raises(ValueError, match="qwen2 has no attention_bias switch"):
        LlamaConfig(**{**TINY_SIZES, "model_type": "qwen2", "attention_bias": True})
    with pytest.raises(ValueError, match="qwen3 has no mlp_bias switch"):
        LlamaConfig(**{**TINY_SIZES, "model_type": "qwen3", "mlp_bias": True})
    assert LlamaConfig(**{**TINY_SIZES, "attention_bias": True}).qkv_bias  # Llama's: all four


@pytest.mark.parametrize("patch, message", [
    ({"model_type": "mixtral", "architectures": ["MixtralForCausalLM"]},
     "unsupported architecture"),
    ({"num_key_value_heads": 3}, "not a multiple"),
    ({"hidden_size": -64}, "hidden_size"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"architectures": ["MistralForCausalLM"]}, "unsupported architecture"),  # model_type llama
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": 0},
     "sliding_window"),
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": True},
     "sliding_window"),
    ({"model_type": ["llama"]}, "unsupported architecture"),  # unhashable: no TypeError
    ({"model_type": "qwen2", "architectures": ["LlamaForCausalLM"]}, "unsupported architecture"),
])
def test_bad_configs_raise_value_error(patch, message):
    d = {**tiny_hf_dict(), **patch}
    with pytest.raises(ValueError, match=message):
        LlamaConfig.from_hf_dict(d, source="cfg.json")


@pytest.mark.parametrize("model_type, hf_class", [("llama", "LlamaConfig"),
                                                  ("mistral", "MistralConfig"),
                                                  ("qwen2", "Qwen2Config"),
                                                  ("qwen3", "Qwen3Config")])
def test_config_defaults_are_transformers_defaults(model_type, hf_class):
    """A config.json that leaves a setting out means transformers' default for it, which is
    not always Llama's: Mistral's 8 KV heads and 4096-token window, Qwen3's head_dim 128, ..."""
    sizes = {"vocab_size": 101, "hidden_size": 256, "intermediate_size": 96,
             "num_hidden_layers": 2, "num_attention_heads": 32}  # 8 or 32 KV heads both divide
    ours = LlamaConfig.from_hf_dict({"model_type": model_type, **sizes})
    theirs = getattr(transformers, hf_class).from_dict({"model_type": model_type, **sizes})
    hf_window = theirs.sliding_window if theirs.model_type == "mistral" else None
    assert (ours.num_key_value_heads, ours.head_dim, ours.max_position_embeddings,
            ours.sliding_window, ours.rope_theta, ours.rms_norm_eps, ours.tie_word_embeddings
            ) == (theirs.num_key_value_heads, getattr(theirs, "head_dim", None) or 8,
                  theirs.max_position_embeddings, hf_window,
                  theirs.rope_parameters["rope_theta"], theirs.rms_norm_eps,
                  theirs.tie_word_embeddings)
    assert LlamaConfig.from_hf_dict(ours.to_hf_dict()) == ours  # written out as read
    if model_type.startswith("qwen"):  # the window left out is 4096 too: layers 28+ slide
        d = {"model_type": model_type, **sizes, "num_hidden_layers": 30, "use_sliding_window": True}
        theirs = getattr(transformers, hf_class).from_dict(d)
        assert theirs.layer_types[28:] == ["sliding_attention"] * 2
        with pytest.raises(ValueError, match=r"layers \[28, 29\] use sliding-window attention"):
            LlamaConfig.from_hf_dict(d)


@pytest.mark.parametrize("eos", [(2,), (2, 7), ()])
def test_config_round_trips_every_eos_id(eos):
    config = LlamaConfig.from_hf_dict({"model_type": "llama", **TINY_SIZES,
                                       "eos_token_id": list(eos)})
    assert config.eos_token_ids == eos
    assert LlamaConfig.from_hf_dict(config.to_hf_dict()) == config
