"""LlamaConfig's own checks and derived values, without the transformers oracle: the bounds of
every checked field (each edge on both sides), the weight count the loaders trust before building
anything, what to_hf_dict writes per architecture, and the sliding-layer rule's own refusals."""

import dataclasses
import math

import pytest
import torch

from awq_ref.config import ARCHITECTURES, LlamaConfig, RopeScaling
from awq_ref.model import Llama
from tests.test_model import TINY_SIZES, qwen2_hf_dict, tiny_hf_dict

ROPE = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 100}


def config(**changes) -> LlamaConfig:
    return LlamaConfig(**{**TINY_SIZES, **changes})


def test_configs_are_frozen_and_their_head_ratio_is_an_int():
    """A config is shared by a model, its quantized copy and its checkpoint: no one may change
    it under the others."""
    cfg = config()
    for obj, name in ((cfg, "hidden_size"), (RopeScaling(**ROPE), "factor"),
                      (ARCHITECTURES["llama"], "qkv_bias")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, name, 1)
    assert type(cfg.n_rep) is int and cfg.n_rep == 2


@pytest.mark.parametrize("name", ["vocab_size", "hidden_size", "intermediate_size",
                                  "num_hidden_layers", "max_position_embeddings"])
def test_sizes_end_just_below_two_to_the_31(name):
    assert getattr(config(**{name: 2**31 - 1, "head_dim": 16}), name) == 2**31 - 1
    with pytest.raises(ValueError, match=f"LlamaConfig.{name} must be a positive integer below "
                                         r"2\*\*31, got 2147483648"):
        config(**{name: 2**31, "head_dim": 16})


@pytest.mark.parametrize("name", list(ROPE))
def test_rope_scaling_values_end_just_below_two_to_the_31(name):
    assert getattr(RopeScaling(**{**ROPE, name: 2**31 - 1}), name) == 2**31 - 1
    with pytest.raises(ValueError, match=f"rope_scaling.{name} must be a positive finite"):
        RopeScaling(**{**ROPE, name: 2**31})


@pytest.mark.parametrize("window, ok", [(1, True), (2**31 - 1, True), (0, False),
                                        (2**31, False), (-1, False), (True, False)])
def test_sliding_window_bounds(window, ok):
    if ok:
        assert config(model_type="mistral", sliding_window=window).sliding_window == window
    else:
        with pytest.raises(ValueError, match="sliding_window must be null or .mistral only. a "
                                             "positive integer below 2..31"):
            config(model_type="mistral", sliding_window=window)


def test_a_model_type_that_is_not_a_string_is_refused_by_name():
    with pytest.raises(ValueError, match=r"model_type must be one of .*got \['llama'\]"):
        config(model_type=["llama"])  # unhashable: no TypeError from the dict lookup


def test_hidden_size_below_the_head_count_is_refused():
    with pytest.raises(ValueError, match="hidden_size=2 is smaller than num_attention_heads=4"):
        config(hidden_size=2)
    assert config(hidden_size=8).head_dim == 2  # hidden == 2 * heads: the smallest even Dh


@pytest.mark.parametrize("bos, eos", [(0, (0,)), (100, (100, 0))])
def test_special_ids_from_zero_to_the_last_token_are_accepted(bos, eos):
    cfg = config(bos_token_id=bos, eos_token_ids=eos)
    assert (cfg.bos_token_id, cfg.eos_token_ids) == (bos, eos)


def test_a_bos_id_equal_to_the_vocabulary_size_is_refused():
    with pytest.raises(ValueError, match="bos_token_id 101 is past the vocabulary"):
        config(bos_token_id=101)
    with pytest.raises(ValueError, match="bos/eos token ids must be non-negative"):
        config(eos_token_ids=(-1,))


@pytest.mark.parametrize("value", [0, 0.0, -1e-5, math.inf, math.nan, True, "1e-5", None])
@pytest.mark.parametrize("name", ["rms_norm_eps", "rope_theta"])
def test_eps_and_theta_must_be_positive_finite_numbers(name, value):
    with pytest.raises(ValueError, match=f"LlamaConfig.{name} must be a positive finite number"):
        config(**{name: value})
    with pytest.raises(ValueError, match="rope_scaling.factor must be a positive finite"):
        RopeScaling(**{**ROPE, "factor": value})


@pytest.mark.parametrize("changes", [
    {}, {"tie_word_embeddings": True}, {"num_key_value_heads": 1}, {"head_dim": 32},
    {"model_type": "qwen2"}, {"model_type": "qwen3", "head_dim": 8},
    {"attention_bias": True, "mlp_bias": True},
], ids=["base", "tied", "mqa", "head-dim", "qwen2", "qwen3", "biases"])
def test_weight_count_is_the_models_weights_without_biases_or_qk_norms(changes):
    """What a file must hold at least (check_size_claim) and what the CLI's memory check charges:
    every weight matrix and norm, counted from the model itself here."""
    cfg = config(**changes)
    with torch.device("meta"):
        model = Llama(cfg)
    weights = sum(p.numel() for name, p in model.named_parameters()
                  if not name.endswith(("bias", "q_norm.weight", "k_norm.weight")))
    assert cfg.weight_count() == weights


def test_to_hf_dict_writes_each_architectures_own_keys():
    """Only the keys the architecture's own config.json has: transformers warns on (or, for
    Qwen's window switch, acts on) the others."""
    llama = config(attention_bias=True).to_hf_dict()
    assert llama["attention_bias"] is True and llama["mlp_bias"] is False
    assert "sliding_window" not in llama and "use_sliding_window" not in llama
    mistral = config(model_type="mistral", sliding_window=48).to_hf_dict()
    assert mistral["sliding_window"] == 48
    assert "attention_bias" not in mistral and "mlp_bias" not in mistral
    qwen3 = config(model_type="qwen3", attention_bias=True).to_hf_dict()
    assert qwen3["attention_bias"] is True and "mlp_bias" not in qwen3
    assert qwen3["use_sliding_window"] is False and qwen3["sliding_window"] is None


def qwen2_sliding(**changes) -> dict:
    """test_model's Qwen2 config with its window switched on (max_window_layers left out)."""
    d = {k: v for k, v in qwen2_hf_dict(False).items() if k != "max_window_layers"}
    return {**d, "use_sliding_window": True, **changes}


@pytest.mark.parametrize("changes, message", [
    ({"max_window_layers": -3}, r"layers \[0, 1\] use sliding-window attention"),
    ({"max_window_layers": "1"}, "max_window_layers='1' and num_hidden_layers=2 must be"),
    ({"num_hidden_layers": -1}, "max_window_layers=28 and num_hidden_layers=-1 must be"),
    ({"num_hidden_layers": 0}, "LlamaConfig.num_hidden_layers must be a positive integer"),
    ({"num_hidden_layers": 2**31, "max_window_layers": 2**31 - 1},
     "num_hidden_layers=2147483648 must be integers"),  # never a list of 2**31 layers
])
def test_sliding_layer_rule_refuses_what_it_cannot_count(changes, message):
    with pytest.raises(ValueError, match=message):
        LlamaConfig.from_hf_dict(qwen2_sliding(**changes))


def test_llama3_original_context_defaults_to_transformers_2048():
    """Neither original_max_position_embeddings nor max_position_embeddings given: both are
    transformers' LlamaConfig default, 2048."""
    d = {k: v for k, v in tiny_hf_dict(2).items() if k != "max_position_embeddings"}
    d["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0}
    cfg = LlamaConfig.from_hf_dict(d)
    assert cfg.max_position_embeddings == 2048
    assert cfg.rope_scaling.original_max_position_embeddings == 2048


@pytest.mark.parametrize("length", [40, 41])
def test_long_values_in_messages_are_cut_after_40_characters(length):
    model_type = "x" * (length - 2)  # its repr adds two quotes
    with pytest.raises(ValueError) as e:
        config(model_type=model_type)
    shown = str(e.value).rsplit("got ", 1)[1]
    assert shown == (repr(model_type) if length <= 40 else repr(model_type)[:37] + "...")


@pytest.mark.parametrize("model_type, keys", [("llama", {"attention_bias", "mlp_bias"}),
                                              ("qwen3", {"attention_bias"})])
def test_bias_switches_are_read_where_the_architecture_has_them(model_type, keys):
    """Left out of config.json, a switch is off (transformers' default); set, it is read."""
    d = {**tiny_hf_dict(2), "rope_scaling": None, "model_type": model_type,
         "architectures": [ARCHITECTURES[model_type].hf_class]}
    cfg = LlamaConfig.from_hf_dict(d)
    assert (cfg.attention_bias, cfg.mlp_bias) == (False, False)
    cfg = LlamaConfig.from_hf_dict({**d, **dict.fromkeys(keys, True)})
    assert (cfg.attention_bias, cfg.mlp_bias) == ("attention_bias" in keys, "mlp_bias" in keys)
