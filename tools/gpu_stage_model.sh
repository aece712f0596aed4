#!/usr/bin/env bash
# Carry the default model (a 98 MB GGUF) to a GPU machine that has no network, in parts.
#
# The device tool carries at most 64 MiB of ignored files per call, but a warm machine keeps
# ignored files between calls -- and is given back 30 s after a call ends, so the two calls
# must follow each other at once, and each must be worth running alone:
#   here:    bash tools/gpu_stage_model.sh split   # .devcarry/model.part0..1, .sha256, .parts
#   device:  call 1 (timeout_s 600) carries .devcarry/model.part0, .devcarry/model.sha256,
#            .devcarry/model.parts and .devcarry/py and runs
#            GPU_CHECK_ONLY="environment kernel-tests mma-sweep kernel-benchmark" bash tools/gpu_check.sh
#            call 2 (at once, timeout_s 600) carries .devcarry/model.part1,
#            .devcarry/model.sha256, .devcarry/model.parts and .devcarry/py and runs
#            GPU_CHECK_ONLY="e2e-tests e2e-benchmark wgmma-probe memcheck decode-profile" bash tools/gpu_check.sh
# gpu_check.sh joins the parts itself (a failed join -- the machine went back between the
# calls -- only makes the default-model tests skip) and uses .devcarry/py and .devcarry/cache;
# its sweep step leaves its JSON in .devcarry/sweep_mma.json on the device, where call 2's
# end-to-end benchmark finds it (nothing to copy between the calls; on a fresh machine the
# benchmark just skips the "[tuned]" row). Never name .devcarry/sweep_mma.json in a carry list
# unless it exists here: a carried path missing here is removed there.
# .devcarry/py holds gguf, the one package the GGUF loader needs that the device's image lacks
# (device/KINDS.md lists pyyaml and tqdm, which gguf imports), copied from this .venv by `split`.
# Two parts of 49 MB each (the tracked tree adds ~2 MB to a call); GPU_STAGE_PARTS=3 makes
# three of 33 MB if a call ever needs more room.
# `join` checks the SHA-256 of the whole file before it is used, so a part lost between calls
# (the machine went back) gives a clear error, not a corrupt model.
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE=.devcarry
NAME=SmolLM2-135M-Instruct.Q4_1.gguf
PARTS=${GPU_STAGE_PARTS:-2}
case "${1:-}" in
  split)
    py=${PYTHON:-python3}; [[ -x .venv/bin/python ]] && py=${PYTHON:-.venv/bin/python}
    src=$(PYTHONPATH=. $py -c 'from awq_ref.loaders import default_gguf_path; print(default_gguf_path())')
    mkdir -p "$STAGE"
    rm -f "$STAGE"/model.part*
    split -n "$PARTS" -d -a 1 "$src" "$STAGE/model.part"
    (cd "$(dirname "$src")" && sha256sum "$NAME") > "$STAGE/model.sha256"
    echo "$PARTS" > "$STAGE/model.parts"
    site=$($py -c 'import gguf, os; print(os.path.dirname(os.path.dirname(gguf.__file__)))')
    rm -rf "$STAGE/py" && mkdir -p "$STAGE/py"
    cp -r "$site/gguf" "$STAGE/py/"  # the device's own yaml and tqdm stay ahead of copies
    find "$STAGE/py" -name __pycache__ -prune -exec rm -rf {} +
    ls -l "$STAGE" && du -sh "$STAGE/py"
    ;;
  join)
    [[ -f $STAGE/model.parts ]] && PARTS=$(cat "$STAGE/model.parts")  # as split wrote them
    parts=()
    for (( i = 0; i < PARTS; i++ )); do
      [[ -f $STAGE/model.part$i ]] || { echo "missing $STAGE/model.part$i: carry it first" >&2; exit 2; }
      parts+=("$STAGE/model.part$i")
    done
    mkdir -p "$STAGE/cache"
    rm -f "$STAGE/cache/$NAME"
    cat "${parts[@]}" > "$STAGE/cache/$NAME.part"
    # checked before it takes the model's name: a corrupt join leaves no model behind
    want=$(cut -d' ' -f1 "$STAGE/model.sha256")
    got=$(sha256sum "$STAGE/cache/$NAME.part" | cut -d' ' -f1)
    if [[ $want != "$got" ]]; then
      rm -f "$STAGE/cache/$NAME.part"
      echo "joined parts do not match $STAGE/model.sha256 (a part from another split?)" >&2; exit 2
    fi
    mv "$STAGE/cache/$NAME.part" "$STAGE/cache/$NAME"
    echo "$STAGE/cache/$NAME: OK"
    ;;
  *)
    echo "usage: $0 split|join" >&2; exit 2 ;;
esac
