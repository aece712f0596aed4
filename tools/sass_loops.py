"""Instruction counts of each kernel's loops in SASS, on a machine without a GPU.

    PYTHONPATH=. python tools/sass_loops.py [--arch sm_90] [--family gemv_direct] [--nvdisasm PATH]

NVRTC (through CuPy) makes the PTX, the CUDA toolkit's ptxas assembles it for --arch, and
nvdisasm prints the SASS; every backward branch closes a loop, whose instructions are counted by
opcode. The K loop of a kernel is the loop with the most 16-bit arithmetic (HFMA2, HMUL2, HADD2,
HMMA; the fused split-K's sum over splits is a longer loop in some instantiations): its length
per weight is what bounds an issue-bound GEMV (awq_kernels/NOTES.md).

Needs ptxas (nvcc's toolkit) and nvdisasm, which the toolkit on this project's CPU machines
lacks: `pip download nvidia-cuda-nvdisasm` and unzip the wheel, then pass --nvdisasm or put it
on PATH. NVRTC may emit a newer PTX ISA version than the local ptxas reads; the header is then
lowered to the local version (the kernels use no newer instructions; ptxas says so if they do).
Exits 2 with a message when a tool is missing.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from awq_kernels import build
from awq_kernels.plan import GEMV_DIRECT_VEC, GEMV_KC, MMA_DIRECT_DEPTH, gemv_direct_flush

_INSTRUCTION = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^\.(L_x_\d+):")
_BRANCH = re.compile(r"BRA\s+`\(\.(L_x_\d+)\)")


def ptxas_version() -> str:
    out = subprocess.run(["ptxas", "--version"], capture_output=True, text=True, check=True).stdout
    release = re.search(r"release (\d+)\.(\d+)", out)
    major, minor = int(release[1]), int(release[2])
    return f"{major - 4}.{minor}"  # CUDA 12.x reads PTX ISA 8.x, 13.x reads 9.x


def sass(expr: str, family: str, arch: str, nvdisasm: str, ptx_version: str) -> str:
    ptx = build.compile_nvrtc(family, arch, [expr]).ptx
    ptx = re.sub(r"^\.version \d+\.\d+", f".version {ptx_version}", ptx, count=1,
                 flags=re.MULTILINE)
    with tempfile.TemporaryDirectory() as tmp:
        src, cubin = Path(tmp) / "k.ptx", Path(tmp) / "k.cubin"
        src.write_text(ptx)
        subprocess.run(["ptxas", f"-arch={arch}", "-o", str(cubin), str(src)], check=True)
        return subprocess.run([nvdisasm, "-c", str(cubin)], capture_output=True, text=True,
                              check=True).stdout


def loops(text: str) -> list[collections.Counter]:
    """Opcode counts of every loop (label .. backward branch to it), longest first."""
    labels: dict[str, int] = {}
    body: list[str] = []
    for line in text.splitlines():
        if m := _LABEL.match(line.strip()):
            labels[m[1]] = len(body)
        elif m := _INSTRUCTION.match(line):
            body.append(m[2])
    found = []
    for i, ins in enumerate(body):
        m = _BRANCH.search(ins)
        if m and labels.get(m[1], i + 1) <= i:
            ops = [re.sub(r"^@!?U?P\w+\s+", "", b).split()[0].split(".")[0]
                   for b in body[labels[m[1]]:i + 1]]
            found.append(collections.Counter(ops))
    return sorted(found, key=lambda c: -sum(c.values()))


_PTX_LABEL = re.compile(r"^(\$L__\w+):")
_PTX_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__\w+);")


def ptx_loops(ptx: str, entry: str) -> list[list[str]]:
    """The instructions of every loop (label .. backward branch to it) of kernel `entry` (its
    mangled name) in NVRTC's PTX: a machine without ptxas or nvdisasm (CI) can count loops
    too. PTX counts track SASS counts within a few percent for the mma kernel's K loop (3.77
    vs 3.8 per weight), far closer than the 3x that address math cost it before (2026-12-05)."""
    body = ptx[ptx.index(f".entry {entry}("):]
    body = body[:body.index("\n}\n")]
    labels: dict[str, int] = {}
    ins: list[str] = []
    for line in (raw.strip() for raw in body.splitlines()):
        if m := _PTX_LABEL.match(line):
            labels[m[1]] = len(ins)
        elif line and not line.startswith(("//", ".", "{", "}")):
            ins.append(line)
    return [ins[labels[m[1]]:i + 1] for i, line in enumerate(ins)
            if (m := _PTX_BRANCH.search(line)) and labels.get(m[1], i + 1) <= i]


# The K loop is the loop with the most 16-bit arithmetic (the dequantization's); a kernel's other
# loops (the fused split-K's sum over splits) have little or none, and may be longer.
K_LOOP_OPS = ("HFMA2", "HMUL2", "HADD2", "HMMA")


def weights_per_iteration(expr: str) -> int | None:
    """Packed weights one lane handles per K-loop iteration (None for kernels without one)."""
    if m := re.match(r"awq_gemm_mma<\w+, \d+, \d+, \d+, (\d+)>", expr):
        return 2 * int(m[1])  # per k16 step 4 words of 8; BK / 16 steps per k tile
    m = re.match(r"awq_(gemv|gemv_direct|mma_direct)<(\w+), (\d+)(?:, \d+)?>", expr)
    if not m:
        return None
    if m[1] == "mma_direct":  # the loop is unrolled over DEPTH + 1 chunks of 2 k16 steps x 4 words
        return 8 * 4 * 2 * (MMA_DIRECT_DEPTH[int(m[3])] + 1)
    if m[1] == "gemv":  # one word per lane on each of the warp's KC / 8 rows of a stage
        return 8 * GEMV_KC // 8
    # U steps of VEC words
    return 8 * GEMV_DIRECT_VEC[int(m[3])] * gemv_direct_flush(m[2], int(m[3]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="sm_90")
    p.add_argument("--family", nargs="+", default=["gemv", "gemv_direct", "mma_direct", "mma"],
                   choices=sorted(build.SOURCES))
    p.add_argument("--nvdisasm", default=shutil.which("nvdisasm"))
    args = p.parse_args(argv)
    if not shutil.which("ptxas") or not args.nvdisasm:
        print("needs ptxas and nvdisasm (see the module docstring)", file=sys.stderr)
        return 2
    version = ptxas_version()
    for family in args.family:
        for expr in build.instantiations(family):
            found = loops(sass(expr, family, args.arch, args.nvdisasm, version))
            if not found:
                print(f"{expr}: no loop")
                continue
            top = max(found, key=lambda c: sum(c[op] for op in K_LOOP_OPS))
            total = sum(top.values())
            weights = weights_per_iteration(expr)
            per = f" = {total / weights:4.1f} per weight" if weights else ""
            ops = ", ".join(f"{op} {n}" for op, n in top.most_common(6))
            print(f"{args.arch} {expr:26s} K loop {total:4d} instructions{per}: {ops}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
