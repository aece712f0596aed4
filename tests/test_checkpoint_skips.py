"""modules_to_not_convert in written checkpoints: vLLM loads q/k/v and gate/up as one fused
layer each, so a checkpoint keeps all of a group in 16 bits or none (awq_ref.quant.checkpoint's
check_fused_skip, and the config-level check of quantize_folder and the CLI)."""

import json

import pytest
import torch
from test_checkpoint import TINY, logits
from torch import nn

from awq_ref.api import quantize
from awq_ref.config import LlamaConfig
from awq_ref.model import Llama
from awq_ref.quant.checkpoint import load_quantized_model, quant_config_dict, save_quantized
from awq_ref.quant.qlinear import skipped
from awq_ref.quant.quantizer import QuantSpec


@pytest.mark.parametrize("skip", [["q_proj"], ["layers.1.self_attn.v_proj"], ["up_proj"],
                                  ["q_proj", "k_proj"]])
def test_part_of_a_fused_group_kept_fp_is_refused(tmp_path, skip):
    """vLLM loads q/k/v and gate/up as one layer each and refuses a checkpoint that quantizes
    only some of them: quantize (packed) refuses before any work, and so does the writer."""
    fp = Llama(LlamaConfig(**TINY)).eval()
    with pytest.raises(ValueError, match="vLLM loads .* as one fused layer"):
        quantize(fp, group_size=32, modules_to_not_convert=skip)
    quantize(fp, group_size=32, modules_to_not_convert=skip, pack=False)  # fake: no checkpoint
    model = quantize(fp, group_size=32)
    model.quantization_config = quant_config_dict(QuantSpec(group_size=32), skip)
    for name, lin in fp.model.layers.named_modules():  # those layers fp, as the config says
        if isinstance(lin, nn.Linear) and skipped(f"model.layers.{name}", skip):
            parent, _, child = name.rpartition(".")
            setattr(model.model.layers.get_submodule(parent), child, lin)
    group = "gate_proj/up_proj" if "up_proj" in skip else "q_proj/k_proj/v_proj"
    with pytest.raises(ValueError, match=f"save_quantized: .*not the rest of {group}; .*skip "
                                         "all of them or none"):
        save_quantized(model, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_a_whole_fused_group_kept_fp_is_written(tmp_path):
    """Skipping all of q/k/v (or gate/up) is what vLLM takes: neither refused nor changed."""
    fp = Llama(LlamaConfig(**TINY)).eval()
    for skip in (["q_proj", "k_proj", "v_proj"], ["gate_proj", "up_proj"]):
        model = quantize(fp, group_size=32, modules_to_not_convert=skip)
        out = save_quantized(model, tmp_path / skip[0])
        assert torch.equal(logits(load_quantized_model(out)), logits(model))
        assert json.loads((out / "config.json").read_text())["quantization_config"][
            "modules_to_not_convert"] == ["lm_head", *skip]


def test_the_config_check_skips_a_layer_only_where_every_block_keeps_it():
    """check_quantizable_config (quantize_folder, the CLI) sees one block for all: a linear kept
    fp in every layer ("down_proj") is not checked, one kept in layer 0 only still is, as the
    in-memory check of every layer does."""
    from awq_ref.api import check_quantizable_config

    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)  # down_proj: K = 96
    spec = QuantSpec(group_size=64)
    check_quantizable_config(cfg, spec, ("down_proj",))
    quantize(Llama(cfg), group_size=64, modules_to_not_convert=["down_proj"])
    for skip, layer in (((), 0), (("layers.0.mlp.down_proj",), 1)):
        with pytest.raises(ValueError, match=rf"layers\.{layer}\.mlp\.down_proj: group_size 64"):
            check_quantizable_config(cfg, spec, skip)
        with pytest.raises(ValueError, match=rf"layers\.{layer}\.mlp\.down_proj: group_size 64"):
            quantize(Llama(cfg), group_size=64, modules_to_not_convert=list(skip))
