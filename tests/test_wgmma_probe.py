"""A probe of the Hopper warpgroup MMA (wgmma) layouts (tests/cuda/wgmma_probe.cu), for a
future sm_90a kernel; no product path uses it yet.

On any machine: the probe compiles with NVRTC for sm_90a (wgmma in its PTX, no spills). On a
GPU of compute capability 9.0: D = A @ B with A from registers and B from shared memory (K-major,
no swizzle) equals NumPy's product for the layouts the .cu header assumes, for two memory
images of B described by their descriptors; a third run gives the descriptor's two offsets
swapped and is expected to differ (the PTX ISA's reading of "leading" and "stride"). On a
mismatch the test names where some values of D are found in A @ B. tools/gpu_check.sh runs it
in its own process ("wgmma probe"), so a fault here cannot spoil the other GPU checks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

PROBE = Path(__file__).resolve().parent / "cuda" / "wgmma_probe.cu"
KERNELS = ("wgmma_probe_n8", "wgmma_probe_n64", "wgmma_probe_a_smem_n8")


def _compile(arch: str = "sm_90a"):
    nvrtc = pytest.importorskip("cupy_backends.cuda.libs.nvrtc",
                                reason="NVRTC (CuPy) compiles the probe")
    prog = nvrtc.createProgram(PROBE.read_text(), PROBE.name, [], [])
    try:
        try:
            nvrtc.compileProgram(prog, ["-std=c++17", f"--gpu-architecture={arch}",
                                        "--ptxas-options=-v"])
        except nvrtc.NVRTCError as err:
            raise AssertionError(nvrtc.getProgramLog(prog)) from err
        return nvrtc.getPTX(prog).decode(), nvrtc.getCUBIN(prog), nvrtc.getProgramLog(prog)
    finally:
        nvrtc.destroyProgram(prog)


def test_probe_compiles_for_sm90a_with_wgmma_and_no_spills():
    ptx, cubin, log = _compile()
    assert "wgmma.mma_async.sync.aligned.m64n8k16.f32.f16.f16" in ptx
    assert "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16" in ptx
    assert "fence.proxy.async.shared::cta" in ptx and len(cubin) > 0
    assert log.count("0 bytes spill stores") == len(KERNELS), log


def a_positions(thread: int) -> list[tuple[int, int]]:
    """(row, first column) of A in each of a thread's 4 registers (fp16 pairs; the header)."""
    w, lane = divmod(thread, 32)
    g, t = divmod(lane, 4)
    return [(16 * w + row, col) for row, col in ((g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8),
                                                 (g + 8, 2 * t + 8))]


def d_position(thread: int, r: int) -> tuple[int, int]:
    """(row, column) of D in a thread's register r (the header)."""
    w, lane = divmod(thread, 32)
    g, t = divmod(lane, 4)
    j, q = divmod(r, 4)
    return 16 * w + g + 8 * (q // 2), 8 * j + 2 * t + q % 2


def b_byte(k: int, n: int, lbo: int, sbo: int) -> int:
    """Byte of B[k, n] in the K-major, no-swizzle image (the header)."""
    return (n // 8) * sbo + (k // 8) * lbo + (n % 8) * 16 + (k % 8) * 2


def a_image_mn_major(a: np.ndarray, step_m: int, step_k: int) -> np.ndarray:
    """A (64, 16) fp16 as shared memory words, M-major: core (m // 8, k // 8) at
    (m // 8) * step_m + (k // 8) * step_k bytes, its 8 k rows of 8 m values 16 bytes apart."""
    image = np.zeros(1024, np.uint16)  # the kernel's 2 KB for A
    bits = a.astype(np.float16).view(np.uint16)
    for m in range(64):
        for k in range(16):
            image[((m // 8) * step_m + (k // 8) * step_k + (k % 8) * 16 + (m % 8) * 2) // 2] = (
                bits[m, k])
    return image.view(np.uint32)


def a_fragments(a: np.ndarray) -> np.ndarray:
    """A (64, 16) fp16 -> the registers [128 threads][4] as u32 fp16 pairs (the .cu header)."""
    regs = np.zeros((128, 4), np.uint32)
    bits = a.astype(np.float16).view(np.uint16).astype(np.uint32)
    for thread in range(128):
        for r, (row, col) in enumerate(a_positions(thread)):
            regs[thread, r] = bits[row, col] | (bits[row, col + 1] << 16)
    return regs


def b_image(b: np.ndarray, lbo: int, sbo: int) -> np.ndarray:
    """B (16, N) fp16 as shared memory words: core (n // 8, k // 8) at (n // 8) * sbo +
    (k // 8) * lbo bytes, its 8 rows n of 8 k values 16 bytes apart."""
    image = np.zeros(2048 * 2, np.uint16)  # the kernel's 8 KB of shared memory, in halves
    bits = b.astype(np.float16).view(np.uint16)
    for k in range(16):
        for n in range(b.shape[1]):
            image[b_byte(k, n, lbo, sbo) // 2] = bits[k, n]
    return image.view(np.uint32)


def d_matrix(d_regs: np.ndarray, n: int) -> np.ndarray:
    """The registers [128 threads][N / 2] back to D (64, N) as the .cu header assumes."""
    d = np.full((64, n), np.nan, np.float32)
    for thread in range(128):
        for r in range(n // 2):
            d[d_position(thread, r)] = d_regs[thread, r]
    return d


def test_layout_helpers_round_trip():
    """The host side of the probe on its own: a D laid out by the assumed fragment layout reads
    back through d_matrix; A's fragments hold every element once."""
    rng = np.random.default_rng(0)
    a = rng.integers(-3, 4, (64, 16)).astype(np.float16)
    regs = a_fragments(a)
    halves = np.concatenate([regs & 0xFFFF, regs >> 16], axis=1).astype(np.uint16)
    assert sorted(halves.view(np.float16).ravel().tolist()) == sorted(a.ravel().tolist())
    d_regs = np.arange(128 * 32, dtype=np.float32).reshape(128, 32)
    assert not np.isnan(d_matrix(d_regs, 64)).any()
    halves = b_image(np.ones((16, 64), np.float16), lbo=128, sbo=256).view(np.uint16)
    assert (halves[:1024] == 0x3C00).all() and (halves[1024:] == 0).all()  # 2 KB of ones
    ids = np.arange(1, 1025, dtype=np.float16).reshape(64, 16)  # exact in fp16
    image = a_image_mn_major(ids, 128, 1024).view(np.uint16).view(np.float16)
    assert sorted(image.tolist()) == sorted(ids.ravel().tolist())  # each element once
    assert image[:8].tolist() == ids[:8, 0].tolist()  # 8 m values of k = 0 contiguous


def emulate_wgmma(regs: np.ndarray, image: np.ndarray, n: int, lbo: int, sbo: int
                  ) -> np.ndarray:
    """The registers [128][N / 2] the probe writes if the hardware reads its operands as the
    .cu header says: the host side's own check, so that a mismatch on a GPU is the hardware's."""
    halves = np.stack([regs & 0xFFFF, regs >> 16], axis=-1).astype(np.uint16).view(np.float16)
    a = np.zeros((64, 16), np.float32)
    for thread in range(128):
        for r, (row, col) in enumerate(a_positions(thread)):
            a[row, col:col + 2] = halves[thread, r]
    smem = image.view(np.uint16).view(np.float16)
    b = np.array([[smem[b_byte(k, c, lbo, sbo) // 2] for c in range(n)] for k in range(16)],
                 np.float32)
    d = a @ b
    return np.array([[d[d_position(thread, r)] for r in range(n // 2)] for thread in range(128)],
                    np.float32)


@pytest.mark.parametrize("n", [8, 64])
def test_probe_host_side_agrees_with_the_documented_semantics(n):
    rng = np.random.default_rng(n)
    a = rng.integers(-4, 5, (64, 16)).astype(np.float16)
    b = rng.integers(-4, 5, (16, n)).astype(np.float16)
    want = a.astype(np.float32) @ b.astype(np.float32)
    for lbo, sbo in ((128, 256), (128 * (n // 8), 128)):
        regs = emulate_wgmma(a_fragments(a), b_image(b, lbo, sbo), n, lbo, sbo)
        assert np.array_equal(d_matrix(regs, n), want)
    swapped = emulate_wgmma(a_fragments(a), b_image(b, 128, 256), n, 256, 128)
    assert not np.array_equal(d_matrix(swapped, n), want)


def _run(cubin: bytes, tmp_path: Path, name: str, a: np.ndarray, b: np.ndarray, lbo: int,
         sbo: int, desc_lbo: int, desc_sbo: int) -> np.ndarray:
    import cupy

    path = tmp_path / "wgmma_probe.cubin"
    path.write_bytes(cubin)
    kernel = cupy.RawModule(path=str(path)).get_function(name)
    n = b.shape[1]
    regs = cupy.asarray(a_fragments(a))
    image = cupy.asarray(b_image(b, lbo, sbo))
    out = cupy.full((128, n // 2), np.nan, np.float32)
    kernel((1,), (128,), (regs, image, np.int32(image.size), np.int32(desc_lbo),
                          np.int32(desc_sbo), out))
    cupy.cuda.runtime.deviceSynchronize()
    return d_matrix(cupy.asnumpy(out), n)


@pytest.mark.gpu
@pytest.mark.parametrize("name,n", [("wgmma_probe_n8", 8), ("wgmma_probe_n64", 64)])
def test_wgmma_layouts_on_hopper(name, n, tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs a GPU of compute capability 9.0 (H100/H200) for sm_90a's wgmma")
    pytest.importorskip("cupy")
    _, cubin, _ = _compile()
    rng = np.random.default_rng(n)
    a = rng.integers(-4, 5, (64, 16)).astype(np.float16)  # small integers: exact products
    b = rng.integers(-4, 5, (16, n)).astype(np.float16)
    want = a.astype(np.float32) @ b.astype(np.float32)
    results = {}
    for label, lbo, sbo, desc in (("cores along K adjacent", 128, 256, (128, 256)),
                                  ("cores along N adjacent", 128 * (n // 8), 128,
                                   (128 * (n // 8), 128)),
                                  ("offsets swapped in the descriptor", 128, 256, (256, 128))):
        got = _run(cubin, tmp_path, name, a, b, lbo, sbo, *desc)
        results[label] = got
        print(f"{name} {label}: max |D - A B| = {np.nanmax(np.abs(got - want)):.3g}")
    for label in ("cores along K adjacent", "cores along N adjacent"):
        got = results[label]
        if not np.array_equal(got, want):
            where = {(i, j): np.argwhere(want == got[i, j]).tolist()[:3]
                     for i, j in [(0, 0), (0, 1), (8, 0), (16, 0)]}
            pytest.fail(f"{label}: D differs from A @ B; D[i, j] found at A @ B positions "
                        f"{where}")
    # read the other way round, the swapped descriptor would match the first image
    assert not np.array_equal(results["offsets swapped in the descriptor"], want)


@pytest.mark.gpu
def test_wgmma_a_from_shared_memory_m_major(tmp_path):
    """A in shared memory M-major (the order of a dequantized AWQ word): which of the
    descriptor's offsets steps along K there is not settled by the B probe, so both readings
    run and exactly one must give A @ B; the test prints which."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs a GPU of compute capability 9.0 (H100/H200) for sm_90a's wgmma")
    cupy = pytest.importorskip("cupy")
    _, cubin, _ = _compile()
    path = tmp_path / "wgmma_probe.cubin"
    path.write_bytes(cubin)
    kernel = cupy.RawModule(path=str(path)).get_function("wgmma_probe_a_smem_n8")
    rng = np.random.default_rng(1)
    a = rng.integers(-4, 5, (64, 16)).astype(np.float16)
    b = rng.integers(-4, 5, (16, 8)).astype(np.float16)
    want = a.astype(np.float32) @ b.astype(np.float32)
    step_m, step_k = 128, 1024  # cores along M packed, the two k halves 1 KB apart
    image = cupy.asarray(a_image_mn_major(a, step_m, step_k))
    b_words = cupy.asarray(b_image(b, 128, 256)[:64])
    matched = []
    for label, (lbo, sbo) in (("lbo steps along K", (step_k, step_m)),
                              ("lbo steps along M", (step_m, step_k))):
        out = cupy.full((128, 4), np.nan, np.float32)
        kernel((1,), (128,), (image, b_words, np.int32(lbo), np.int32(sbo), out))
        cupy.cuda.runtime.deviceSynchronize()
        got = d_matrix(cupy.asnumpy(out), 8)
        print(f"A M-major, {label}: max |D - A B| = {np.nanmax(np.abs(got - want)):.3g}")
        if np.array_equal(got, want):
            matched.append(label)
    assert len(matched) == 1, f"readings that gave A @ B: {matched}"
