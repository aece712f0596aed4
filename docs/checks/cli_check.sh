#!/usr/bin/env bash
# The CLI commands of docs/quantize-your-model.md with tiny settings, on the default model.
# From the repo root: bash docs/checks/cli_check.sh   (writes under out/docs_check, ignored by git)
set -x
export PYTHONPATH=.
PY=.venv/bin/python
WIKI=../shared/data/text/wikitext-2-raw/wiki.test.raw
D=out/docs_check
mkdir -p $D
rm -rf $D/smollm2-awq $D/smollm2-awq-again $D/smollm2-rtn $D/bad $D/search.safetensors
time $PY -m awq_ref quantize --model default --method awq --w-bit 4 --group-size 64 \
    --n-samples 4 --calib-seqlen 64 --n-grid 5 --save-result $D/search.safetensors \
    --out $D/smollm2-awq; echo rc=$?
time $PY -m awq_ref quantize --model default --method awq --w-bit 4 --group-size 64 \
    --result $D/search.safetensors --out $D/smollm2-awq-again; echo rc=$?
cmp $D/smollm2-awq/model.safetensors $D/smollm2-awq-again/model.safetensors && echo IDENTICAL
time $PY -m awq_ref quantize --model default --method rtn --w-bit 4 --group-size 64 \
    --out $D/smollm2-rtn; echo rc=$?
$PY -m awq_ref quantize --model default --method rtn --w-bit 4 --out $D/bad; echo rc=$?
ls -la $D/smollm2-awq; cat $D/smollm2-awq/config.json; echo
time $PY -m awq_ref generate --model $D/smollm2-awq --prompt "The capital of France is" \
    --max-new-tokens 16; echo rc=$?
time $PY -m awq_ref ppl --model $D/smollm2-awq --text $WIKI --windows 1 --reference default
echo rc=$?
time $PY -m awq_ref ppl --model $D/smollm2-rtn --text $WIKI --windows 1 --reference default --json
echo rc=$?
$PY docs/checks/hf_check.py $D/smollm2-awq
