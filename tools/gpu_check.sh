#!/usr/bin/env bash
# Test and benchmark awq_kernels on a GPU machine in one call (no network needed).
#
#   tools/gpu_check.sh            # results under $OUT if set, else out/gpu_check
#   GPU_CHECK_ONLY="kernel-tests kernel-benchmark" tools/gpu_check.sh   # some steps only
#
# Without the staged model, run it whole in ONE device call (timeout_s 600): a warm machine is
# given back 30 s after a call ends, so a plan of several calls may find a fresh, bare machine.
# The limits then add up to more than 600 s, but they are limits (expected ~5 min on an H100);
# every step saves its results as it goes, so a call cut short still returns what was measured.
# With the staged model, two calls (tools/gpu_stage_model.sh): each call's steps' limits add up
# to 570 s at most, under the 600 s a call may take.
# The default model: if .devcarry holds it (tools/gpu_stage_model.sh), this script joins its
# parts and uses .devcarry/py and .devcarry/cache by itself.
#
# Steps in the order they run (the sweep before the benchmark, which times the rule the sweep
# derives; otherwise most important first), each under its own time limit so one hang cannot
# eat the call: environment; GPU correctness of the kernels (tests/test_kernels_gpu.py);
# the sweep (tools/bench_gemm.py --sweep-mma: every compiled mma tile, plain and split-K,
# dequantize + cuBLAS, at M = 1..256 on 4 shapes, and the decode kernels' split caps at
# M <= 8), from which awq_kernels.sweep.tuned_dispatch derives `auto` as measured; the kernel
# benchmark on PROTOCOL.md's shapes (tools/bench_gemm.py), timing that derived `auto` too
# ("awq[tuned]", and tools/targets.py's "tuned" column: adopting it is a data change in
# awq_kernels/dispatch.py, DEFAULT, made with these numbers in hand); the model end to end
# (tests/test_e2e_gpu.py, tests/test_e2e_gpu_architectures.py, tests/test_backend_checks.py); end-to-end speed (tools/bench_e2e.py --quick); the 8B decode profile
# (tools/bench_e2e.py --profile); compute-sanitizer memcheck on small shapes
# (tools/gpu_memcheck.py). The wgmma layout probe (tests/test_wgmma_probe.py: knowledge for a
# future sm_90a kernel, no product path) and memcheck (an issue-5 criterion) run before the
# decode profile, the step a short call can best lose. The CPU-side checks (NVRTC compile, spills, emulation, validation)
# run in CI and are not repeated here; SASS instruction counts come from tools/sass_loops.py on
# any machine (cuobjdump refused NVRTC's cubin on the H200).
# Writes 8 files (the device tool's limit: write nothing else under $OUT): tests.log (with the
# environment and every step's exit line), bench_gemm.log, bench_gemm.json/.md,
# sweep_mma.json/.md, bench_e2e.log, bench_e2e.json. Prints short tables, then the steps' exit
# codes and times last. Exit: first failure.
# Took 4.5 minutes on an H200 (2026-12-04), of which the kernel benchmark 80 s.
# Without network the default model (98 MB GGUF) is only there if $AWQ_REF_CACHE holds it; the
# tests then skip it with a reason and bench_e2e uses random SmolLM2-shaped weights.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${OUT:-out/gpu_check}
mkdir -p "$RESULTS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export PIP_RETRIES=${PIP_RETRIES:-0} PIP_TIMEOUT=${PIP_TIMEOUT:-5}  # offline: fail fast
PY=${PYTHON:-python3}
SCALE=${GPU_CHECK_TIME_SCALE:-1}  # multiplies every step's time limit
STEPS="environment kernel-tests mma-sweep kernel-benchmark e2e-tests e2e-benchmark wgmma-probe memcheck decode-profile"
ONLY=$(echo ${GPU_CHECK_ONLY:-})  # e.g. "kernel-tests kernel-benchmark"; newlines, tabs: spaces
if ! [[ $SCALE =~ ^[1-9][0-9]*$ ]]; then
  echo "GPU_CHECK_TIME_SCALE must be a positive integer, got '$SCALE'" >&2; exit 2
fi
for name in $ONLY; do
  if [[ " $STEPS " != *" $name "* ]]; then
    echo "GPU_CHECK_ONLY: unknown step '$name'; the steps: $STEPS" >&2; exit 2
  fi
done
if [[ -f .devcarry/model.parts && -z ${AWQ_REF_CACHE:-} ]]; then  # the staged default model
  if bash tools/gpu_stage_model.sh join; then
    export AWQ_REF_CACHE=$PWD/.devcarry/cache
  else
    echo "(default model not staged: its tests will skip)"
  fi
fi
[[ -d .devcarry/py ]] && export PYTHONPATH="$PYTHONPATH:$PWD/.devcarry/py"  # gguf for the GGUF loader
status=0
summary=()
sweep_ran=""  # set once the sweep step ran in this call (its JSON, not an older file, is used)
hung=""  # the kernel tests ran out of time: the sweep and memcheck (the same kernels) are skipped
ran=0  # steps run (or skipped for a hang): none means GPU_CHECK_ONLY named none of this call's
PYTEST=($PY -m pytest -q -p no:cacheprovider -rfs --tb=short -o faulthandler_timeout=60)
step() {  # step NAME LOGFILE SECONDS CMD...: run under a time limit, tee the log, keep first failure
  local name=$1 log=$2 limit=$(( $3 * SCALE )); shift 3
  if [[ -n $ONLY && " $ONLY " != *" ${name// /-} "* ]]; then return; fi
  ran=$(( ran + 1 ))
  if [[ -n $hung && ( $name == "mma sweep" || $name == "memcheck" ) ]]; then
    summary+=("$(printf '%-22s skipped: %s ran out of time' "$name" "$hung")"); return
  fi
  local t0=$SECONDS
  echo "=== $name (limit ${limit}s)" | tee -a "$RESULTS/$log"
  timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$RESULTS/$log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc in $(( SECONDS - t0 ))s" | tee -a "$RESULTS/$log"
  [[ $log != tests.log ]] && echo "=== $name: exit $rc in $(( SECONDS - t0 ))s" >> "$RESULTS/tests.log"
  [[ $status -eq 0 && $rc -ne 0 ]] && status=$rc
  [[ $rc -eq 124 || $rc -eq 137 ]] && [[ $name == "kernel tests" ]] && hung=$name
  summary+=("$(printf '%-22s exit %-4s %4ss' "$name" "$rc" "$(( SECONDS - t0 ))")")
  if [[ $name == "mma sweep" ]]; then
    sweep_ran=1
    # kept on the device for a second call's end-to-end benchmark (ignored files stay there)
    [[ -f "$RESULTS/sweep_mma.json" ]] && mkdir -p .devcarry && cp "$RESULTS/sweep_mma.json" .devcarry/
  fi
}

# (its exit status is the last command's: the torch + CuPy check on the GPU)
step "environment" tests.log 20 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; nvcc --version | tail -1; $PY -c 'import gguf; print(\"gguf\", gguf.__file__)' || echo 'no gguf: the default-model steps will skip'; $PY -c 'import tests; print(\"tests package:\", list(tests.__path__))'; echo AWQ_REF_CACHE=\${AWQ_REF_CACHE:-unset}; $PY -c 'import torch, cupy; print(\"torch\", torch.__version__, \"cupy\", cupy.__version__, torch.cuda.get_device_name())'"
step "kernel tests" tests.log 150 "${PYTEST[@]}" --maxfail=30 tests/test_kernels_gpu.py
step "mma sweep" bench_gemm.log 150 $PY tools/bench_gemm.py --sweep-mma --out "$RESULTS/sweep_mma"
derives_rule() {  # derives_rule SWEEP_JSON: whether a rule derives from it (bounded, logged)
  [[ -f $1 ]] && timeout 20 $PY -c "import sys; from awq_kernels import sweep; sweep.load_tuned_dispatch(sys.argv[1])" "$1" >> "$RESULTS/bench_gemm.log" 2>&1
}
wants() { [[ -z $ONLY || " $ONLY " == *" $1 "* ]]; }  # wants STEP: whether STEP runs
tuned=()  # the benchmarks also time `auto` as the sweep chose it (awq[tuned]): this call's, else one kept on the device
if [[ $sweep_ran ]] && { wants kernel-benchmark || wants e2e-benchmark; } &&
   derives_rule "$RESULTS/sweep_mma.json"; then
  tuned=(--tuned-from "$RESULTS/sweep_mma.json")
elif wants kernel-benchmark && derives_rule .devcarry/sweep_mma.json; then
  tuned=(--tuned-from .devcarry/sweep_mma.json)  # an earlier call's sweep on this machine
fi
step "kernel benchmark" bench_gemm.log 210 $PY tools/bench_gemm.py --out "$RESULTS/bench_gemm" "${tuned[@]}"
step "e2e tests" tests.log 120 "${PYTEST[@]}" tests/test_e2e_gpu.py tests/test_e2e_gpu_architectures.py tests/test_backend_checks.py
e2e_tuned=("${tuned[@]}")  # end to end too: this call's sweep, or one carried from call 1
if [[ ${#tuned[@]} -eq 0 ]] && wants e2e-benchmark && derives_rule .devcarry/sweep_mma.json; then
  e2e_tuned=(--tuned-from .devcarry/sweep_mma.json)
fi
step "e2e benchmark" bench_e2e.log 210 $PY tools/bench_e2e.py --quick --json "$RESULTS/bench_e2e.json" "${e2e_tuned[@]}"
# its own process: a fault in this unproven sm_90a code cannot spoil the steps after it
step "wgmma probe" tests.log 30 "${PYTEST[@]}" -s tests/test_wgmma_probe.py
step "memcheck" tests.log 90 compute-sanitizer --tool memcheck --error-exitcode 1 $PY tools/gpu_memcheck.py
step "decode profile" bench_e2e.log 100 $PY tools/bench_e2e.py --profile --models llama3-8b
rm -f "$RESULTS"/.*.tmp-* 2>/dev/null  # atomic writes a step's time limit cut short
if (( ran == 0 )); then
  echo "GPU_CHECK_ONLY='$ONLY' named no step of this script: nothing ran" >&2; exit 2
fi

echo
echo "=== results (logs in $RESULTS)"
grep -E "passed|failed|error" "$RESULTS/tests.log" | grep -E "^=|in [0-9.]+s" || true
$PY -c "import json, sys; from awq_kernels import benchmark; print(benchmark.summary(json.load(open(sys.argv[1]))))" "$RESULTS/bench_gemm.json" 2>/dev/null
$PY -c "import json, sys; from awq_kernels import sweep; print(sweep.markdown(json.load(open(sys.argv[1]))).split('Geometric')[1])" "$RESULTS/sweep_mma.json" 2>/dev/null
grep '^|' "$RESULTS/bench_e2e.log" 2>/dev/null
echo
echo "=== issue 5 and 6 targets (tools/targets.py)"
targets_args=()  # the JSON files this run (or an earlier call into the same folder) wrote
[[ -f "$RESULTS/bench_gemm.json" ]] && targets_args+=(--gemm "$RESULTS/bench_gemm.json")
[[ -f "$RESULTS/bench_e2e.json" ]] && targets_args+=(--e2e "$RESULTS/bench_e2e.json")
if (( ${#targets_args[@]} )); then $PY tools/targets.py "${targets_args[@]}" || true; fi
echo
echo "=== steps: exit code and seconds (also in $RESULTS/tests.log)"
printf '%s\n' "${summary[@]}"
exit $status
