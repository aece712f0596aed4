"""transformers on an awq_ref checkpoint (CPU): config, tokenizer, then from_pretrained.

    .venv/bin/python docs/checks/hf_check.py CHECKPOINT_DIR
"""

import sys

import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

folder = sys.argv[1]
print("transformers", transformers.__version__)
cfg = AutoConfig.from_pretrained(folder)
print("config:", type(cfg).__name__, "quantization_config:", cfg.quantization_config)
tok = AutoTokenizer.from_pretrained(folder)
print("tokenizer:", type(tok).__name__, tok("The capital of France is")["input_ids"])
try:
    model = AutoModelForCausalLM.from_pretrained(folder)
    print("model loaded:", type(model).__name__)
except ImportError as e:  # the AWQ backend (gptqmodel / autoawq) is not installed
    print("from_pretrained failed:", type(e).__name__, str(e)[:600])
