"""The calls of docs/quantize-your-model.md with small settings (n=4, seqlen=128, n_grid=5).

    PYTHONPATH=. .venv/bin/python docs/checks/api_check.py   (writes under out/, ignored by git)
"""

import shutil

import torch

import awq_ref
from awq_ref import AwqConfig, AwqResult, QuantSpec
from awq_ref.eval import load_wikitext_tokens

D = "out/docs_check/api"
TEXT = "../shared/data/text"
shutil.rmtree(D, ignore_errors=True)
model = awq_ref.load_model("default")
tok = awq_ref.load_tokenizer("default")
calib = awq_ref.calibration_tokens(tok, f"{TEXT}/tinystories/tinystories_val_prefix.txt", n=4,
                                   seqlen=128)
print("calib", tuple(calib.shape))
qmodel = awq_ref.quantize(model, method="awq", w_bit=4, group_size=64, calib_tokens=calib,
                          n_grid=5, progress=False)
awq_ref.save_quantized(qmodel, f"{D}/smollm2-awq-w4-g64", tokenizer=tok)
result = awq_ref.search_awq(model, calib, QuantSpec(4, 64), AwqConfig(n_grid=5, progress=False))
result.save(f"{D}/search.safetensors")
result = AwqResult.load(f"{D}/search.safetensors")
print("after load: .search", len(result.search), "records; [0]:", result.search[0])
again = awq_ref.quantize(model, "awq", 4, 64, result=result)
probe = calib[:1, :32]
with torch.no_grad():
    print("quantize(calib) == quantize(result):", torch.equal(again(probe), qmodel(probe)))
fp = awq_ref.load_model("default")
awq_ref.apply_awq(fp, result)
rtn_on_folded = awq_ref.quantize(fp, "rtn", 4, 64)
with torch.no_grad():
    print("RTN(apply_awq(fp)) == AWQ:", torch.equal(rtn_on_folded(probe), qmodel(probe)))
w3 = awq_ref.quantize(model, "awq", 3, 64, pack=False, result=result)
print("W3 fake-quantized layer:", type(w3.model.layers[0].mlp.down_proj).__name__)
qm = awq_ref.load_model(f"{D}/smollm2-awq-w4-g64")
print("reloaded:", type(qm.model.layers[0].mlp.down_proj).__name__, qm.quantization_config)
with torch.no_grad():
    print("reloaded == in memory:", torch.equal(qm(probe), qmodel(probe)))
tokens = load_wikitext_tokens(tok, f"{TEXT}/wikitext-2-raw/wiki.test.raw")
print(awq_ref.evaluate(qm, tokens, seqlen=512, windows=1, reference=model, progress=False))
ids = tok.encode("The capital of France is")
new = awq_ref.generate(qm, ids, 12, eos_ids=tok.eos_ids)
print(repr(tok.decode(ids + new, skip_special_tokens=True)))
