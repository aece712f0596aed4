"""awq_ref: a readable reference implementation of AWQ for Llama-family models.

    import awq_ref
    model = awq_ref.load_model("default")                 # SmolLM2-135M-Instruct
    tok = awq_ref.load_tokenizer("default")
    calib = awq_ref.calibration_tokens(tok, "stories.txt")  # (128, 512) windows
    qmodel = awq_ref.quantize(model, method="awq", w_bit=4, group_size=64, calib_tokens=calib)
    awq_ref.save_quantized(qmodel, "smollm2-awq", tokenizer=tok)
    # larger than memory: HF folder in, checkpoint out, one block at a time
    awq_ref.quantize_folder("llama-7b-hf", "llama-7b-awq", calib_tokens=calib, group_size=128)

Importing the package loads PyTorch and nothing else: no compilation, no device probing.
The CUDA kernels live in the separate package `awq_kernels` and are chosen by argument.
"""

from awq_ref.api import quantize
from awq_ref.awq.apply import apply_awq
from awq_ref.awq.calibration import calibration_tokens
from awq_ref.awq.pipeline import AwqConfig, search_awq
from awq_ref.awq.result import AwqResult
from awq_ref.config import LlamaConfig
from awq_ref.eval import evaluate, evaluate_many
from awq_ref.generate import generate
from awq_ref.loaders import load_model, load_tokenizer
from awq_ref.model import Llama
from awq_ref.quant.checkpoint import load_quantized_model, save_quantized
from awq_ref.quant.quantizer import QuantSpec
from awq_ref.stream import quantize_folder

__all__ = ["AwqConfig", "AwqResult", "Llama", "LlamaConfig", "QuantSpec", "apply_awq",
           "calibration_tokens", "evaluate", "evaluate_many", "generate", "load_model",
           "load_quantized_model", "load_tokenizer", "quantize", "quantize_folder",
           "save_quantized", "search_awq"]
