"""awq_kernels.ops checked against the model's torch code on Llama-3-8B widths before the
end-to-end benchmark times them (tools/bench_e2e.py's "+ops" variants): the ops module, or None
with a message, so one failing check skips those variants and the others still run.

The check runs in a child process (`python tools/ops_check.py`, exit 0 when every op agrees):
a kernel that faults leaves its CUDA context unusable for the rest of the process, and the
benchmark's own context must survive it to measure the other variants."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

DEVICE, DTYPE = "cuda", torch.float16
REPO = Path(__file__).resolve().parents[1]
# The child compiles the ops (NVRTC, ~10 s) before it checks them; well under gpu_check.sh's
# e2e step (210 s) and decode profile (100 s), so a hung check costs the +ops rows, not the step.
CHECK_SECONDS = 60


def elementwise_ops():
    """awq_kernels.ops once a child process checked them against the model's torch code, or
    None with a message (the "+ops" variants are then skipped, the others run)."""
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    try:
        child = subprocess.run([sys.executable, str(Path(__file__).resolve())], check=False,
                               env=env, capture_output=True, text=True, timeout=CHECK_SECONDS)
        failure = None if child.returncode == 0 else (
            f"exit status {child.returncode}: {(child.stderr or child.stdout).strip()[-2000:]}")
    except subprocess.TimeoutExpired:
        failure = f"no answer in {CHECK_SECONDS} s"
    if failure is not None:
        print(f"awq_kernels.ops failed its check, skipping the +ops variants: {failure}",
              file=sys.stderr)
        return None
    from awq_kernels import ops

    return ops


def check() -> None:
    """Every op of awq_kernels.ops against the model's torch code (raises on a difference)."""
    import torch.nn.functional as F

    from awq_kernels import ops
    from awq_ref.model import rotary_tables, rotate_heads

    x = torch.randn(2, 3, 4096, device=DEVICE, dtype=DTYPE)
    w = torch.rand(4096, device=DEVICE, dtype=DTYPE) + 0.5
    # The norms may differ from torch by one rounding before the weight's product (their
    # fp32 sums run in another order): up to ~1.5e-3 relative in fp16 (H100, 2026-12-05).
    norm_tol = {"rtol": 2e-3, "atol": 1e-5}
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-5), w * F.rms_norm(x, (4096,), eps=1e-5),
                               **norm_tol)
    s, y = ops.add_rms_norm(x, x, w, 1e-5)
    torch.testing.assert_close(s, x + x, rtol=0, atol=0)
    torch.testing.assert_close(y, w * F.rms_norm(x + x, (4096,), eps=1e-5), **norm_tol)
    gate, up = torch.randn(3, 2 * 1024, device=DEVICE, dtype=DTYPE).split(1024, dim=-1)
    torch.testing.assert_close(ops.silu_mul(gate, up), F.silu(gate) * up)
    qkv = torch.randn(1, 3, 48 * 128, device=DEVICE, dtype=DTYPE)
    q, k, v = (p.view(1, 3, -1, 128) for p in qkv.split([32 * 128, 8 * 128, 8 * 128], -1))
    cos, sin = rotary_tables(torch.rand(3, 64, device=DEVICE) * 50, DTYPE)
    qk = qkv[..., :40 * 128].view(1, 3, 40, 128)
    torch.testing.assert_close(ops.rotary(qk, cos, sin), rotate_heads(qk, cos, sin),
                               rtol=0, atol=0)
    keys, values = (torch.zeros(1, 8, 9, 128, device=DEVICE, dtype=DTYPE) for _ in range(2))
    got_q = ops.rotary_into_cache(q, k, v, cos, sin, keys, values,
                                  torch.tensor([6], device=DEVICE))
    torch.testing.assert_close(got_q, rotate_heads(q, cos, sin), rtol=0, atol=0)
    torch.testing.assert_close(keys[:, :, 6:], rotate_heads(k, cos, sin).transpose(1, 2),
                               rtol=0, atol=0)
    torch.testing.assert_close(values[:, :, 6:], v.transpose(1, 2), rtol=0, atol=0)
    position = torch.tensor([7], device=DEVICE)
    visible = (torch.arange(9, device=DEVICE) <= 7)[None, :]
    want = F.scaled_dot_product_attention(got_q[:, :1].transpose(1, 2), keys, values,
                                          attn_mask=visible, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(ops.decode_attention(got_q[:, :1], keys, values, position), want,
                               atol=2e-3, rtol=2e-3)
    torch.cuda.synchronize()  # a fault shows here, in this process


if __name__ == "__main__":
    check()  # an exception (compile error, difference, CUDA fault) exits non-zero
    print("awq_kernels.ops agree with the model's torch code")
