"""The decoder's small steps as one CUDA kernel each: RMSNorm with its weight, SwiGLU's
silu(gate) * up, the rotary embedding (elementwise.cu), one token's attention (attention.cu).

    y = ops.rms_norm(x, weight, eps)      # weight * F.rms_norm(x, (D,), eps=eps)
    s, y = ops.add_rms_norm(x, d, w, eps) # s = x + d; y = rms_norm of s as above
    y = ops.silu_mul(gate, up)            # F.silu(gate) * up
    y = ops.rotary(x, cos, sin_signed)    # x * cos + x.roll(Dh // 2, -1) * sin_signed
    q = ops.rotary_into_cache(q, k, v, cos, sin_signed, keys, values, position)
                                          # rotary of q and k; k, v written into the KV cache
    y = ops.decode_attention(q, keys, values, position)
                                          # one token's attention over cache slots 0..position

Each equals the torch expression in the comment (the same roundings; the norms' sums of squares
in another order), on fp16 or bf16 CUDA tensors, into new contiguous tensors. awq_ref installs
them with `awq_ref.fuse.use_elementwise_kernels(model, awq_kernels.ops)`. Checks run on
metadata first, so wrong inputs raise the same errors on any machine.
"""

from __future__ import annotations

import torch

from .build import ATTENTION_GROUPS, ATTENTION_HEAD_DIMS, attention_expr, elementwise_expr
from .plan import Launch, cdiv
from .runtime import (
    ACTIVATION_DTYPES,
    ALIGNMENT,
    i32,
    on_torch_stream,
    require_one_cuda_device,
    require_tensor,
    run,
    splitk_counters,
)

THREADS = 256           # EW_THREADS of elementwise.cu
VEC = 8                 # 16-bit values per 16-byte access
MAX_BLOCKS_PER_SM = 32  # grid-stride loops beyond that


def _check(name: str, t: object, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An fp16/bf16 tensor (of `dtype` if given) whose last dimension is contiguous, a multiple
    of 8, and whose start and other strides allow 16-byte accesses (the device comes last)."""
    t = require_tensor(name, t)
    if t.dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"{name} must be float16 or bfloat16, got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype} like the input, got {t.dtype}")
    if t.dim() == 0 or t.shape[-1] == 0 or t.shape[-1] % VEC:
        raise ValueError(f"{name}'s last dimension must be a positive multiple of {VEC}, got shape "
                         f"{list(t.shape)}")
    if t.stride(-1) != 1 or any(s % VEC for s, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1):
        raise ValueError(f"{name} must be contiguous in its last dimension with the other "
                         f"strides multiples of {VEC} elements, got strides {t.stride()}")
    if t.data_ptr() % ALIGNMENT:
        raise ValueError(f"{name} must start at a {ALIGNMENT}-byte aligned address")
    return t


def _require_cuda(**tensors: torch.Tensor) -> None:
    """After every metadata check: all on one CUDA device."""
    require_one_cuda_device(tensors)


def _check_head_dim(dh: int) -> None:
    """Rotary pairs element i with i + Dh / 2, both halves in 16-byte vectors."""
    if dh % (2 * VEC):
        raise ValueError(f"Dh = {dh} must be a multiple of {2 * VEC}")


def _check_tables(cos: torch.Tensor, sin_signed: torch.Tensor, t: int, dh: int) -> None:
    for name, table in (("cos", cos), ("sin_signed", sin_signed)):
        if tuple(table.shape) != (t, dh) or not table.is_contiguous():
            raise ValueError(f"{name} must be a contiguous ({t}, {dh}) table, got shape "
                             f"{list(table.shape)}, strides {table.stride()}")


def _check_position(position: object) -> torch.Tensor:
    """One int64 value, the cache slot of the (first) new token, read on the device."""
    position = require_tensor("position", position)
    if position.dtype != torch.int64:
        raise TypeError(f"position must be int64, got {position.dtype}")
    if position.numel() != 1:
        raise ValueError(f"position must hold one value, got shape {list(position.shape)}")
    return position


def _check_weight(weight: torch.Tensor, d: int) -> None:
    if tuple(weight.shape) != (d,):
        raise ValueError(f"weight must have shape [{d}], got {list(weight.shape)}")


def _row_stride(name: str, t: torch.Tensor) -> int:
    """Elements between consecutive rows of t viewed as [rows, last dim] (rows = the product of
    the leading dimensions); raises unless the leading dimensions collapse into one stride."""
    rows = t.numel() // t.shape[-1]
    if rows <= 1:
        return t.shape[-1]
    try:
        return t.view(rows, t.shape[-1]).stride(0)
    except RuntimeError as err:
        raise ValueError(f"{name}'s leading dimensions must collapse into one row stride "
                         f"(shape {list(t.shape)}, strides {t.stride()})") from err


def _grid_stride_launch(units: int, num_sms: int) -> Launch:
    blocks = max(1, min(cdiv(units, THREADS), MAX_BLOCKS_PER_SM * num_sms))
    return Launch("elementwise", 0, (blocks, 1, 1), (THREADS, 1, 1))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * F.rms_norm(x, (D,), eps=eps) for x [..., D], weight [D] of x's dtype."""
    x, weight = _check("x", x), _check("weight", weight, x.dtype)
    d = x.shape[-1]
    _check_weight(weight, d)
    stride = _row_stride("x", x)
    _require_cuda(x=x, weight=weight)
    rows = x.numel() // d
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if rows == 0:
        return y
    tag = ACTIVATION_DTYPES[x.dtype]
    with on_torch_stream(x.device) as (arch, _):
        launch = Launch("elementwise", 0, (rows, 1, 1), (THREADS, 1, 1))
        run(launch, arch, elementwise_expr("rms_norm", tag),
             (x, weight, y, i32(d), i32(stride), _f32(eps)))
    return y


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, weight * F.rms_norm(s, (D,), eps=eps)) with s = x + delta, for x and delta [..., D]
    of one shape and dtype, weight [D]: a residual add and the norm after it in one kernel."""
    x, delta = _check("x", x), _check("delta", delta, x.dtype)
    weight = _check("weight", weight, x.dtype)
    d = x.shape[-1]
    if delta.shape != x.shape:
        raise ValueError(f"delta must have x's shape {list(x.shape)}, got {list(delta.shape)}")
    _check_weight(weight, d)
    x_stride, d_stride = _row_stride("x", x), _row_stride("delta", delta)
    _require_cuda(x=x, delta=delta, weight=weight)
    rows = x.numel() // d
    s = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if rows == 0:
        return s, y
    tag = ACTIVATION_DTYPES[x.dtype]
    with on_torch_stream(x.device) as (arch, _):
        launch = Launch("elementwise", 0, (rows, 1, 1), (THREADS, 1, 1))
        run(launch, arch, elementwise_expr("add_rms_norm", tag),
             (x, delta, weight, s, y, i32(d), i32(x_stride), i32(d_stride), _f32(eps)))
    return s, y


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """F.silu(gate) * up for gate, up [..., F] of one shape and dtype (views allowed, e.g. the
    halves of a fused gate/up output)."""
    gate, up = _check("gate", gate), _check("up", up, gate.dtype)
    if gate.shape != up.shape:
        raise ValueError(f"gate and up must have one shape, got {list(gate.shape)} and "
                         f"{list(up.shape)}")
    f = gate.shape[-1]
    g_stride, u_stride = _row_stride("gate", gate), _row_stride("up", up)
    _require_cuda(gate=gate, up=up)
    rows = gate.numel() // f
    y = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if rows == 0:
        return y
    tag = ACTIVATION_DTYPES[gate.dtype]
    with on_torch_stream(gate.device) as (arch, num_sms):
        run(_grid_stride_launch(rows * f // VEC, num_sms), arch, elementwise_expr("silu_mul", tag),
             (gate, up, y, i32(rows), i32(f), i32(g_stride), i32(u_stride)))
    return y


def rotary(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """x * cos + x.roll(Dh // 2, -1) * sin_signed for x (B, T, H, Dh) (any strides, Dh
    contiguous) and cos, sin_signed (T, Dh) broadcast over B and H; Dh a multiple of 16."""
    x = _check("x", x)
    cos, sin_signed = _check("cos", cos, x.dtype), _check("sin_signed", sin_signed, x.dtype)
    if x.dim() != 4:
        raise ValueError(f"x must be (B, T, H, Dh), got shape {list(x.shape)}")
    b, t, h, dh = x.shape
    _check_head_dim(dh)
    _check_tables(cos, sin_signed, t, dh)
    _require_cuda(x=x, cos=cos, sin_signed=sin_signed)
    y = torch.empty((b, t, h, dh), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    tag = ACTIVATION_DTYPES[x.dtype]
    sb, st, sh, _ = x.stride()
    with on_torch_stream(x.device) as (arch, num_sms):
        run(_grid_stride_launch(b * t * h * dh // (2 * VEC), num_sms), arch,
            elementwise_expr("rotary", tag),
             (x, cos, sin_signed, y, i32(b), i32(t), i32(h), i32(dh), i32(sb), i32(st),
              i32(sh)))
    return y


def rotary_into_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                      sin_signed: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                      position: torch.Tensor) -> torch.Tensor:
    """`rotary` of q and k, with the rotated k and v written into the static KV cache at
    positions position .. position + T - 1 (keys[:, :, p] = rotary(k)[:, t] transposed, as
    `keys.index_copy_(2, position + arange(T), ...)`); returns the rotated q (B, T, H, Dh).

    q (B, T, H, Dh), k and v (B, T, Hkv, Dh): any strides with Dh contiguous; cos and
    sin_signed (T, Dh) contiguous; keys and values (B, Hkv, S, Dh) contiguous; position a
    1-element int64 tensor on the device (read there, so CUDA graphs replay it for any
    position). The caller keeps 0 <= position, position + T <= S (the kernel cannot raise: past
    that it leaves the cache as it was and returns q as NaN, so the error shows).
    """
    q = _check("q", q)
    k, v = _check("k", k, q.dtype), _check("v", v, q.dtype)
    cos, sin_signed = _check("cos", cos, q.dtype), _check("sin_signed", sin_signed, q.dtype)
    keys, values = _check("keys", keys, q.dtype), _check("values", values, q.dtype)
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be (B, T, heads, Dh), got {list(q.shape)} and "
                         f"{list(k.shape)}")
    b, t, h, dh = q.shape
    hkv = k.shape[2]
    if k.shape != (b, t, hkv, dh) or v.shape != k.shape:
        raise ValueError(f"k and v must be ({b}, {t}, Hkv, {dh}) like q, got {list(k.shape)} "
                         f"and {list(v.shape)}")
    _check_head_dim(dh)
    _check_tables(cos, sin_signed, t, dh)
    for name, cache in (("keys", keys), ("values", values)):
        if cache.dim() != 4 or cache.shape[:2] != (b, hkv) or cache.shape[3] != dh \
                or not cache.is_contiguous():
            raise ValueError(f"{name} must be a contiguous ({b}, {hkv}, S, {dh}) cache, got "
                             f"shape {list(cache.shape)}")
    if keys.shape != values.shape:
        raise ValueError(f"keys and values must have one shape, got {list(keys.shape)} and "
                         f"{list(values.shape)}")
    if t > keys.shape[2]:
        raise ValueError(f"{t} new tokens do not fit a cache of {keys.shape[2]} slots")
    position = _check_position(position)
    _require_cuda(q=q, k=k, v=v, cos=cos, sin_signed=sin_signed, keys=keys, values=values,
                  position=position)
    q_out = torch.empty((b, t, h, dh), dtype=q.dtype, device=q.device)
    units = b * t * (h + hkv) * dh // (2 * VEC) + b * t * hkv * dh // VEC
    if units == 0:
        return q_out
    tag = ACTIVATION_DTYPES[q.dtype]
    strides = [i32(st) for tensor in (q, k, v) for st in tensor.stride()[:3]]
    with on_torch_stream(q.device) as (arch, num_sms):
        run(_grid_stride_launch(units, num_sms), arch, elementwise_expr("rotary_into_cache", tag),
             (q, k, v, cos, sin_signed, keys, values, position, q_out, i32(b), i32(t),
              i32(h), i32(hkv), i32(dh), i32(keys.shape[2]), *strides))
    return q_out


HEAD_DIMS = ATTENTION_HEAD_DIMS  # what a model needs for all of these (ElementwiseOps)
ATTENTION_CHUNK = 64   # AT_CHUNK of attention.cu: cache slots per block
MAX_GRID_Y = 65535     # CUDA's limit on gridDim.y (the attention's splits)
ATTENTION_MAX_GROUP = max(ATTENTION_GROUPS)  # AT_GMAX: query heads per KV head
MAX_GROUP = ATTENTION_MAX_GROUP  # what a model may have for all of these (ElementwiseOps)


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     position: torch.Tensor) -> torch.Tensor:
    """One new token's attention over the static KV cache, slots 0 .. position (inclusive):
    F.scaled_dot_product_attention(q, keys, values, mask slot <= position, enable_gqa=True)
    in fp32 with the result rounded to q's dtype, for q (B, 1, H, Dh) (Dh contiguous; e.g.
    rotary_into_cache's output), keys and values (B, Hkv, S, Dh) contiguous, position a
    1-element int64 tensor on the device (read there: CUDA graphs replay it; the caller keeps
    0 <= position < S, else the result is NaN). Returns (B, 1, H, Dh) contiguous. Dh in
    ATTENTION_HEAD_DIMS, H / Hkv <= 8. Uses the stream's split-K counters
    (runtime.splitk_counters): under CUDA-graph capture the stream must have run one eager call
    first (CudaGraphDecoder's warm-up does).
    """
    q = _check("q", q)
    keys, values = _check("keys", keys, q.dtype), _check("values", values, q.dtype)
    if q.dim() != 4 or q.shape[1] != 1:
        raise ValueError(f"q must be (B, 1, H, Dh): one new token, got {list(q.shape)}")
    b, _, h, dh = q.shape
    if dh not in ATTENTION_HEAD_DIMS:
        raise ValueError(f"Dh = {dh} is not one of the compiled head dims {ATTENTION_HEAD_DIMS}")
    if keys.dim() != 4 or keys.shape[0] != b or keys.shape[3] != dh or not keys.is_contiguous():
        raise ValueError(f"keys must be a contiguous ({b}, Hkv, S, {dh}) cache, got shape "
                         f"{list(keys.shape)}")
    if values.shape != keys.shape or not values.is_contiguous():
        raise ValueError(f"values must be contiguous with keys' shape {list(keys.shape)}, got "
                         f"{list(values.shape)}")
    hkv, s = keys.shape[1], keys.shape[2]
    if s == 0:
        raise ValueError("keys has no cache slots (S = 0): no slot `position` to attend to")
    if cdiv(s, ATTENTION_CHUNK) > MAX_GRID_Y:
        raise ValueError(f"keys has {s} cache slots: at most {ATTENTION_CHUNK * MAX_GRID_Y} (one "
                         f"block row per {ATTENTION_CHUNK} slots, {MAX_GRID_Y} rows at most)")
    if hkv == 0 or h % hkv:
        raise ValueError(f"H = {h} query heads must be a multiple of Hkv = {hkv} KV heads")
    if h // hkv > ATTENTION_MAX_GROUP:
        raise ValueError(f"H / Hkv = {h // hkv} query heads per KV head: at most "
                         f"{ATTENTION_MAX_GROUP}")
    position = _check_position(position)
    _require_cuda(q=q, keys=keys, values=values, position=position)
    y = torch.empty((b, 1, h, dh), dtype=q.dtype, device=q.device)
    if y.numel() == 0:
        return y
    counters = splitk_counters(q.device, b * hkv)
    if counters is None:
        raise RuntimeError("decode_attention: no split counters for this stream (first call "
                           "under CUDA-graph capture, or B * Hkv > 4096); run one call on the "
                           "stream before capturing")
    splits = cdiv(s, ATTENTION_CHUNK)
    partials = torch.empty(b * hkv * splits * (h // hkv) * (2 + dh), dtype=torch.float32,
                           device=q.device)
    tag = ACTIVATION_DTYPES[q.dtype]
    with on_torch_stream(q.device) as (arch, _):
        launch = Launch("attention", 0, (b * hkv, splits, 1), (128, 1, 1))
        gm = next(g for g in ATTENTION_GROUPS if g >= h // hkv)
        run(launch, arch, attention_expr(tag, dh, gm),
             (q, keys, values, position, partials, y, counters, i32(h), i32(hkv), i32(s),
              i32(q.stride(0)), i32(q.stride(2)), _f32(dh ** -0.5)))
    return y


def _f32(v: float):
    import numpy as np

    return np.float32(v)
