#!/usr/bin/env bash
# Carry the default model (a 98 MB GGUF) to a GPU machine that has no network, in parts.
#
# The device tool carries at most 64 MiB of ignored files per call, but a warm machine keeps
# ignored files between calls. So:
#   here:    bash tools/gpu_stage_model.sh split          # .devcarry/model.part0..2 + .sha256
#   device:  call 1 carries .devcarry/model.part0 and .devcarry/model.sha256 (command: true),
#            call 2 carries .devcarry/model.part1, call 3 .devcarry/model.part2 and runs
#            bash tools/gpu_stage_model.sh join && AWQ_REF_CACHE=$PWD/.devcarry/cache \
#                bash tools/gpu_check.sh
# `join` checks the SHA-256 of the whole file before it is used, so a part lost between calls
# (the machine went back) gives a clear error, not a corrupt model.
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE=.devcarry
NAME=SmolLM2-135M-Instruct.Q4_1.gguf
case "${1:-}" in
  split)
    py=${PYTHON:-python3}; [[ -x .venv/bin/python ]] && py=${PYTHON:-.venv/bin/python}
    src=$(PYTHONPATH=. $py -c 'from awq_ref.loaders import default_gguf_path; print(default_gguf_path())')
    mkdir -p "$STAGE"
    rm -f "$STAGE"/model.part*
    split -n 3 -d -a 1 "$src" "$STAGE/model.part"
    (cd "$(dirname "$src")" && sha256sum "$NAME") > "$STAGE/model.sha256"
    ls -l "$STAGE"
    ;;
  join)
    for i in 0 1 2; do
      [[ -f $STAGE/model.part$i ]] || { echo "missing $STAGE/model.part$i: carry it first" >&2; exit 2; }
    done
    mkdir -p "$STAGE/cache"
    cat "$STAGE"/model.part0 "$STAGE"/model.part1 "$STAGE"/model.part2 > "$STAGE/cache/$NAME.part"
    mv "$STAGE/cache/$NAME.part" "$STAGE/cache/$NAME"
    (cd "$STAGE/cache" && sha256sum -c ../model.sha256)
    ;;
  *)
    echo "usage: $0 split|join" >&2; exit 2 ;;
esac
