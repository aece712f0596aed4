"""Planted bugs the tests must catch: each mutant is applied to a copy of the repo, its tests run,
and it must make them fail ("killed"). A mutant that survives means a test went weak.

    PYTHONPATH=. .venv/bin/python tools/mutants.py            # all (~15 min on 2 cores)
    PYTHONPATH=. .venv/bin/python tools/mutants.py --only clip --list

Each mutant was once a bug no test caught (mutation testing, two rounds on 2026-12-06); the
tests it names were written for it. The repo itself is never edited: its tracked files are
copied to a temporary folder with ../shared linked beside it, as CI has it, and each mutant's
tests must pass there unmutated first.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    old: str  # must occur exactly once in the file
    new: str
    tests: tuple[str, ...]  # pytest arguments: the test written to catch it


def _m(name, file, old, new, *tests):
    return Mutant(name, file, old, new, tests)


MUTANTS = (
    # model, generation, configs
    _m("rope-low-band", "awq_ref/model.py",
       "scaled = torch.where(wavelen > old_len / rs.low_freq_factor",
       "scaled = torch.where(wavelen > old_len / rs.high_freq_factor",
       "tests/test_model.py", "-k", "llama3"),
    _m("rope-blend-swapped", "awq_ref/model.py",
       "smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled",
       "smoothed = smooth * scaled / rs.factor + (1 - smooth) * scaled",
       "tests/test_model.py", "-k", "llama3"),
    _m("mask-ignores-query-offset", "awq_ref/model.py",
       "<= (past + torch.arange(t, device=x.device))",
       "<= (past + 0 * torch.arange(t, device=x.device))",
       "tests/test_model.py", "-k", "chunks"),
    _m("no-causal-mask-at-2", "awq_ref/model.py", "mask, causal = None, t > 1",
       "mask, causal = None, t > 2", "tests/test_model.py", "-k", "short_prefixes"),
    _m("temperature-multiplies", "awq_ref/generate.py", "logits.float() / temperature",
       "logits.float() * temperature", "tests/test_model.py", "-k", "temperature"),
    _m("rms-eps-default", "awq_ref/config.py", 'rms_norm_eps=d.get("rms_norm_eps", 1e-6)',
       'rms_norm_eps=d.get("rms_norm_eps", 1e-5)', "tests/test_model.py", "-k", "defaults"),
    _m("tied-default", "awq_ref/config.py",
       'tie_word_embeddings=d.get("tie_word_embeddings", False)',
       'tie_word_embeddings=d.get("tie_word_embeddings", True)',
       "tests/test_model.py", "-k", "defaults"),
    _m("one-eos-in-config", "awq_ref/config.py",
       'd["eos_token_id"] = eos[0] if len(eos) == 1 else (list(eos) or None)',
       'd["eos_token_id"] = eos[0] if len(eos) >= 1 else None',
       "tests/test_model.py", "-k", "eos"),
    # tokenizers and loaders
    _m("generation-config-eos-dropped", "awq_ref/tokenizer.py",
       '    eos += _as_ids(gen_cfg.get("eos_token_id"), gen_path)', "    pass",
       "tests/test_tokenizer.py", "-k", "post_processor"),
    _m("post-processor-bos-ignored", "awq_ref/tokenizer.py",
       "add_bos = guarded_call(str(path), backend.adds_bos, bos)", "add_bos = False",
       "tests/test_tokenizer.py", "-k", "post_processor"),
    _m("gguf-config-eot-dropped", "awq_ref/loaders/gguf_file.py",
       '("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")',
       '("tokenizer.ggml.eos_token_id",)', "tests/test_tokenizer.py", "-k", "end_of_turn"),
    _m("gguf-tokenizer-eot-dropped", "awq_ref/loaders/gguf_tokenizer.py",
       '("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")',
       '("tokenizer.ggml.eos_token_id",)', "tests/test_tokenizer.py", "-k", "end_of_turn"),
    _m("tied-merges-order", "awq_ref/loaders/gguf_tokenizer.py",
       "key=lambda m: (m[2], len(m[0]), len(m[1]))", "key=lambda m: (m[2], len(m[1]), len(m[0]))",
       "tests/test_tokenizer.py", "-k", "tied_scores"),
    _m("crlf-kept", "awq_ref/eval.py", 'return raw.replace(b"\\r\\n", b"\\n").decode("utf-8")',
       'return raw.decode("utf-8")', "tests/test_eval.py", "-k", "crlf"),
    _m("llama2c-trailing-bytes", "awq_ref/loaders/llama2c.py", "if h.n_bytes() != size:",
       "if h.n_bytes() > size:", "tests/test_loaders.py", "-k", "llama2c_errors"),
    _m("gguf-v2-refused", "awq_ref/loaders/gguf_header.py", "if version not in (2, 3):",
       "if version not in (3,):", "tests/test_gguf_header.py", "-k", "version_2"),
    _m("shard-extra-tensor", "awq_ref/loaders/hf.py", "if set(shard) != set(names):",
       "if not set(names) <= set(shard):", "tests/test_loaders.py", "-k", "config_mismatch"),
    _m("header-length-check", "awq_ref/loaders/hf.py", "    if n > size - 8:", "    if n > size:",
       "tests/test_loaders.py", "-k", "hf_errors"),
    _m("tensor-span-too-long", "awq_ref/loaders/lazy.py",
       "    if offsets[1] - offsets[0] != nbytes:", "    if offsets[1] - offsets[0] < nbytes:",
       "tests/test_stream_quantize.py", "-k", "corrupt_header"),
    # checkpoints and the packed format
    _m("stream-dtype-ignored", "awq_ref/stream.py",
       "return {n: source.tensors.read(n).to(dtype).contiguous() for n in names}",
       "return {n: source.tensors.read(n).contiguous() for n in names}",
       "tests/test_stream_quantize.py", "-k", "dtype_applies"),
    _m("scales-cast-on-save", "awq_ref/quant/checkpoint.py",
       'PACKED_SUFFIXES = (".qweight", ".qzeros", ".scales")',
       'PACKED_SUFFIXES = (".qweight", ".qzeros")',
       "tests/test_stream_quantize.py", "-k", "dtype_applies"),
    _m("shard-size-not-reset", "awq_ref/quant/checkpoint.py",
       "            shards.append({})\n            size = 0", "            shards.append({})",
       "tests/test_checkpoint.py", "-k", "layout"),
    _m("zero-point-default", "awq_ref/quant/checkpoint.py", 'zero_point = d.get("zero_point", True)',
       'zero_point = d.get("zero_point", False)', "tests/test_checkpoint.py", "-k", "sym"),
    _m("scales-not-fp16-rounded", "awq_ref/quant/packing.py",
       "s, zeros = compute_qparams(w32, spec, name, scale_dtype=torch.float16)",
       "s, zeros = compute_qparams(w32, spec, name)", "tests/test_packing.py", "-k", "fp16_rounded"),
    _m("zero-point-from-unrounded-scale", "awq_ref/quant/quantizer.py",
       "        if scale_dtype is not None:\n            scales = scales.to(scale_dtype).to(w.dtype)\n"
       "        zeros = (-torch.round", "        zeros = (-torch.round",
       "tests/test_packing.py", "-k", "fp16_rounded"),
    _m("int8-zero-row", "awq_ref/quant/int8_head.py",
       "        s = torch.where(s > 0, s, torch.ones_like(s))  # an all-zero row stays zero", "",
       "tests/test_int8_head.py", "-k", "rounding_per_row"),
    # the AWQ search
    _m("duo-exponent", "awq_ref/awq/search_scale.py", "(w_mean.pow(1 - ratio) + 1e-4)",
       "(w_mean.pow(ratio) + 1e-4)", "tests/test_numerics.py", "-k", "docstrings_formula"),
    _m("weight-mean-axis", "awq_ref/awq/search_scale.py", "wg.amax(-1, keepdim=True)",
       "wg.amax(1, keepdim=True)", "tests/test_numerics.py", "-k", "weight_mean"),
    _m("clip-grid-end", "awq_ref/awq/search_clip.py",
       "for i in range(max(1, int(max_shrink * n_grid)))]",
       "for i in range(max(1, int(max_shrink * n_grid) + 1))]",
       "tests/test_awq_clip_choice.py", "-k", "grid"),
    _m("range-shrinks-hi-only", "awq_ref/awq/search_clip.py",
       "return wg.amin(-1) * ratio, wg.amax(-1) * ratio", "return wg.amin(-1), wg.amax(-1) * ratio",
       "tests/test_awq_clip_choice.py", "-k", "brute_force"),
    _m("joint-own-term", "awq_ref/awq/search_clip.py",
       "c = grouped(e.reshape(e.shape[0], -1) @ gram, g) - own",
       "c = grouped(e.reshape(e.shape[0], -1) @ gram, g)",
       "tests/test_awq_clip_choice.py", "-k", "joint_sweep"),
    _m("joint-keeps-worse-rows", "awq_ref/awq/search_clip.py", "keep = new_err < err  # (N,)",
       "keep = new_err < 1e300 + err  # (N,)", "tests/test_awq_clip_choice.py", "-k", "joint_sweep"),
    _m("clip-gram-times-s", "awq_ref/awq/pipeline.py", "gram = gram / (s[:, None] * s[None, :])",
       "gram = gram * (s[:, None] * s[None, :])",
       "tests/test_awq_clip_choice.py", "-k", "scaled_inputs"),
    _m("clip-gram-unscaled", "awq_ref/awq/pipeline.py", "gram = gram / (s[:, None] * s[None, :])",
       "pass", "tests/test_awq_clip_choice.py", "-k", "scaled_inputs"),
    _m("propagate-quantized-is-awq", "awq_ref/awq/pipeline.py",
       "forward_block(quantized_copy(block, spec, fp_names), x, cos, sin, chunk_seqs, prefix)",
       "forward_block(block, x, cos, sin, chunk_seqs, prefix)",
       "tests/test_awq_search.py", "-k", "propagation"),
    _m("propagate-awq-is-inputs", "awq_ref/awq/pipeline.py",
       '    if config.propagate == "awq":\n        forward_block(block, x, cos, sin, chunk_seqs, prefix)',
       '    if config.propagate == "awq":\n        pass', "tests/test_awq_search.py", "-k", "propagation"),
    _m("calib-last-start", "awq_ref/awq/calibration.py",
       "starts = torch.randint(0, stream.numel() - seqlen + 1, (n,), generator=gen)",
       "starts = torch.randint(0, stream.numel() - seqlen, (n,), generator=gen)",
       "tests/test_awq_calibration.py", "-k", "every_window_start"),
    _m("result-unknown-tensor", "awq_ref/awq/result.py",
       '                raise ValueError(f"{where}: unexpected tensor {key!r}")', "                pass",
       "tests/test_awq_result.py", "-k", "unknown"),
    _m("fingerprint-ignores-tokens", "awq_ref/awq/resume.py",
       '"calib": [list(tokens.shape), hashlib.sha256(tokens.numpy().tobytes()).hexdigest()]}',
       '"calib": [list(tokens.shape)]}', "tests/test_resume.py", "-k", "fingerprint"),
    # the AWQ search, second round (2026-12-06, session 16)
    _m("scale-tie-keeps-last", "awq_ref/awq/search_scale.py", "if best is None or v < best[2]:",
       "if best is None or v <= best[2]:", "tests/test_numerics.py", "-k", "first_of_equal"),
    _m("clip-tie-keeps-last", "awq_ref/awq/search_clip.py", "better = err < best_err",
       "better = err <= best_err", "tests/test_awq_clip_choice.py", "-k", "never_activates"),
    _m("lohi-refines-symmetric-boxes", "awq_ref/awq/search_clip.py",
       'if mode == "lohi" and spec.zero_point:', 'if mode == "lohi":',
       "tests/test_awq_clip_choice.py", "-k", "symmetric_boxes"),
    _m("fp-linear-quantized-in-loss", "awq_ref/awq/pipeline.py",
       "for n, m in zip(group.linears, linears) if n not in fp_names}",
       "for n, m in zip(group.linears, linears)}", "tests/test_awq_search.py", "-k",
       "stay_fp_in_the_scale"),
    _m("group-skipped-if-any-fp", "awq_ref/awq/pipeline.py", "set(group.linears) <= fp_names",
       "set(group.linears) & fp_names", "tests/test_awq_search.py", "-k", "stay_fp_in_the_scale"),
    _m("attention-subset-per-chunk", "awq_ref/awq/capture.py",
       "keep = max(0, min(h.shape[0], plan.seqs - pos[0]))",
       "keep = max(0, min(h.shape[0], plan.seqs))", "tests/test_awq_search.py", "-k",
       "first_whole_sequences"),
    _m("reduce-kv-max", "awq_ref/awq/scaling_groups.py", ".mean(1).reshape(-1)",
       ".amax(1).reshape(-1)", "tests/test_awq_search.py", "-k", "reduce_kv"),
    _m("clip-damp-max-diagonal", "awq_ref/awq/pipeline.py",
       "config.clip_damp * gram.diagonal().mean()", "config.clip_damp * gram.diagonal().max()",
       "tests/test_awq_clip_choice.py", "-k", "scaled_inputs"),
    _m("calib-texts-one-newline", "awq_ref/awq/calibration.py", '"\\n\\n".join(strings)',
       '"\\n".join(strings)', "tests/test_awq_calibration.py", "-k", "blank_lines"),
    _m("head-no-joint-sweeps", "awq_ref/awq/head.py", "joint=config.clip_joint)", "joint=0)",
       "tests/test_embedding_quant.py", "-k", "decoders_clip_settings"),
    _m("head-range-mode", "awq_ref/awq/head.py", "mode=config.clip_mode", 'mode="range"',
       "tests/test_embedding_quant.py", "-k", "decoders_clip_settings"),
    _m("result-zero-point-lost", "awq_ref/awq/result.py",
       '"zero_point": json.dumps(self.spec.zero_point)', '"zero_point": "true"',
       "tests/test_awq_result.py", "-k", "spec_round_trips"),
    _m("clip-shape-unchecked", "awq_ref/awq/apply.py",
       "or lo.shape[0] != n or k % lo.shape[1]:", "or lo.shape[0] != n:",
       "tests/test_awq_result.py", "-k", "do_not_fit"),
    # awq_kernels' Python side: validation, plans, dispatch, benchmark numbers (session 16)
    _m("kernels-k-zero-accepted", "awq_kernels/api.py",
       "if k == 0 or k % group_size:",
       "if k % group_size:",
       "tests/test_kernels_api.py", "-k", "test_shapes"),
    _m("kernels-x-0d-accepted", "awq_kernels/api.py",
       "if x.dim() == 0 or x.shape[-1] != k:",
       "if x.shape[-1] != k:",
       "tests/test_kernels_api.py", "-k", "test_shapes"),
    _m("kernels-gemv-8-rows-refused", "awq_kernels/api.py",
       "if kernel == \"gemv\" and m > GEMV_MAX_M:",
       "if kernel == \"gemv\" and m >= GEMV_MAX_M:",
       "tests/test_kernels_api.py", "-k", "large_m"),
    _m("kernels-gemv-direct-8-rows-refused", "awq_kernels/api.py",
       "if kernel == \"gemv_direct\" and m > GEMV_DIRECT_MAX_M:",
       "if kernel == \"gemv_direct\" and m >= GEMV_DIRECT_MAX_M:",
       "tests/test_kernels_api.py", "-k", "large_m"),
    _m("kernels-adjacent-out-overlaps", "awq_kernels/api.py",
       "a0 < b0 + b.nbytes and b0 < a0 + a.nbytes",
       "a0 <= b0 + b.nbytes and b0 < a0 + a.nbytes",
       "tests/test_kernels_api.py", "-k", "test_shapes"),
    _m("kernels-out-any-activation-dtype", "awq_kernels/api.py",
       "require_dtype(\"out\", out, (x.dtype,))",
       "require_dtype(\"out\", out, tuple(ACTIVATION_DTYPES))",
       "tests/test_kernels_api.py", "-k", "test_dtypes"),
    _m("kernels-splitk-counters-one-row", "awq_kernels/api.py",
       "tiles = launch.grid[0] * (launch.grid[1] if launch.family == \"mma\" else 1)",
       "tiles = launch.grid[0]",
       "tests/test_kernels_plan.py", "-k", "planned_launches"),
    _m("kernels-split-per-sm-to-mma", "awq_kernels/api.py",
       "per_sm = MMA_SPLIT_BLOCKS_PER_SM if name == \"mma_split\" else 0",
       "per_sm = MMA_SPLIT_BLOCKS_PER_SM if name == \"mma\" else 0",
       "tests/test_kernels_plan.py", "-k", "planned_launches"),
    _m("kernels-reduce-one-row", "awq_kernels/api.py",
       "reduce = plan_reduce(m * n, launch.splits)",
       "reduce = plan_reduce(n, launch.splits)",
       "tests/test_kernels_plan.py", "-k", "planned_launches"),
    _m("kernels-mma-direct-unfused", "awq_kernels/api.py",
       "if name != \"gemv\":  # the kernels",
       "if name not in (\"gemv\", \"mma_direct\"):  # the kernels",
       "tests/test_kernels_plan.py", "-k", "planned_launches"),
    _m("dispatch-row-limit-off-by-one", "awq_kernels/dispatch.py",
       "(bound is None or bound > limit)",
       "(bound is None or bound >= limit)",
       "tests/test_kernels_dispatch.py", "-k", "up_to_their_limit"),
    _m("from-sweep-keeps-base-at-first", "awq_kernels/dispatch.py",
       "b is not None and b < first]",
       "b is not None and b <= first]",
       "tests/test_kernels_dispatch.py", "-k", "keeps_the_base"),
    _m("describe-drops-split-cap", "awq_kernels/dispatch.py",
       "splits = \"\" if c.max_splits == MAX_SPLITS",
       "splits = \"\" if c.max_splits >= 1",
       "tests/test_kernels_dispatch.py", "-k", "round_trip"),
    _m("plan-mma-splits-under-a-wave", "awq_kernels/plan.py",
       "elif 2 * tiles <= num_sms:",
       "elif tiles <= num_sms:",
       "tests/test_kernels_plan.py", "-k", "ladder"),
    _m("plan-mma-ladder-to-16", "awq_kernels/plan.py",
       "while bm > 32 and cdiv(m, bm)",
       "while bm > 16 and cdiv(m, bm)",
       "tests/test_kernels_plan.py", "-k", "ladder"),
    _m("plan-gemv-one-block-per-sm", "awq_kernels/plan.py",
       "k // GEMV_KC, 4 * num_sms, max_splits)",
       "k // GEMV_KC, num_sms, max_splits)",
       "tests/test_kernels_plan.py", "-k", "ladder"),
    _m("plan-direct-past-one-wave", "awq_kernels/plan.py",
       "min(max(1, slots // tiles), max_splits)",
       "min(max(1, cdiv(slots, tiles)), max_splits)",
       "tests/test_kernels_plan.py", "-k", "direct_plans_fit"),
    _m("plan-gemv-direct-flush-mt", "awq_kernels/plan.py",
       "return 4 if tag == \"BF16\" or mt >= 8 else 8",
       "return 4 if tag == \"BF16\" or mt > 8 else 8",
       "tests/test_kernels_compile.py", "-k", "direct_kernel_tables"),
    _m("plan-mma-direct-depth", "awq_kernels/plan.py",
       "MMA_DIRECT_DEPTH = {1: 3, 2: 2, 4: 4}",
       "MMA_DIRECT_DEPTH = {1: 3, 2: 3, 4: 4}",
       "tests/test_kernels_compile.py", "-k", "direct_kernel_tables"),
    _m("build-stage-bytes-unpadded", "awq_kernels/build.py",
       "4 * self.bk * (self.bn // 8 + 4)",
       "4 * self.bk * (self.bn // 8)",
       "tests/test_kernels_compile.py", "-k", "mirror_matches"),
    _m("build-three-stages", "awq_kernels/build.py",
       "return min(4, 48 * 1024 // self.stage_bytes)",
       "return min(3, 48 * 1024 // self.stage_bytes)",
       "tests/test_kernels_compile.py", "-k", "mirror_matches"),
    _m("build-threads-one-warp-row", "awq_kernels/build.py",
       "return 32 * self.warps_m * self.warps_n",
       "return 32 * self.warps_n",
       "tests/test_kernels_compile.py", "-k", "mirror_matches"),
    _m("bench-floor-min", "awq_kernels/benchmark.py",
       "floor_s = max(awq_bytes(m, k, n, g) / ceil.hbm_bytes_per_s",
       "floor_s = min(awq_bytes(m, k, n, g) / ceil.hbm_bytes_per_s",
       "tests/test_bench_flow.py", "-k", "protocols"),
    _m("bench-gbps-unit", "awq_kernels/benchmark.py",
       "awq_bytes(m, k, n, g) / (us * 1e3), fp16_us / us",
       "awq_bytes(m, k, n, g) / (us * 1e6), fp16_us / us",
       "tests/test_bench_flow.py", "-k", "protocols"),
    _m("bench-speedup-inverted", "awq_kernels/benchmark.py",
       "awq_bytes(m, k, n, g) / (us * 1e3), fp16_us / us",
       "awq_bytes(m, k, n, g) / (us * 1e3), us / fp16_us",
       "tests/test_bench_flow.py", "-k", "protocols"),
    _m("bench-pct-not-percent", "awq_kernels/benchmark.py",
       "100 * floor_s / (us * 1e-6))",
       "floor_s / (us * 1e-6))",
       "tests/test_bench_flow.py", "-k", "protocols"),
    _m("bench-copy-counts-one-way", "awq_kernels/benchmark.py",
       "Ceilings(2 * (1 << 30) / (_copy_us(reps) * 1e-6)",
       "Ceilings((1 << 30) / (_copy_us(reps) * 1e-6)",
       "tests/test_kernels_api.py", "-k", "ceilings"),
    _m("bench-matmul-flops-halved", "awq_kernels/benchmark.py",
       "2 * 8192**3 / (_matmul_us(reps) * 1e-6)",
       "8192**3 / (_matmul_us(reps) * 1e-6)",
       "tests/test_kernels_api.py", "-k", "ceilings"),
    _m("bench-copies-fit-l2", "awq_kernels/benchmark.py",
       "max(2, -(-2 * l2 // bytes_per_copy) + 1)",
       "max(2, -(-l2 // bytes_per_copy) + 1)",
       "tests/test_kernels_api.py", "-k", "ceilings"),
    _m("bench-title-gb-as-tb", "awq_kernels/benchmark.py",
       "{c['hbm_bytes_per_s'] / 1e12:.2f} TB/s",
       "{c['hbm_bytes_per_s'] / 1e9:.2f} TB/s",
       "tests/test_kernels_api.py", "-k", "tables_and_bytes"),
    _m("bench-direct-not-at-8", "awq_kernels/benchmark.py",
       "return m <= GEMV_DIRECT_MAX_M",
       "return m < GEMV_DIRECT_MAX_M",
       "tests/test_kernels_dispatch.py", "-k", "only_where_it_differs"),
    _m("sweep-best-includes-fp16", "awq_kernels/sweep.py",
       "ours = [us for name, us in times.items() if name != \"fp16\"]",
       "ours = list(times.values())",
       "tests/test_bench_flow.py", "-k", "fastest_of_ours"),
    _m("sweep-ranks-fp16", "awq_kernels/sweep.py",
       "        if r[\"variant\"] == \"fp16\":\n            continue\n",
       "",
       "tests/test_kernels_api.py", "-k", "ranking_and_tiles"),
    _m("sweep-load-misses-typeerror", "awq_kernels/sweep.py",
       "except (OSError, ValueError, RecursionError, KeyError, TypeError, ArithmeticError)",
       "except (OSError, ValueError, RecursionError, KeyError, ArithmeticError)",
       "tests/test_kernels_dispatch.py", "-k", "refuses_what_is_no_sweep"),
    _m("int8-x-0d-accepted", "awq_kernels/int8.py",
       "if x.dim() == 0 or x.shape[-1] != k:",
       "if x.shape[-1] != k:",
       "tests/test_kernels_api.py", "-k", "int8"),
    _m("int8-scales-any-shape", "awq_kernels/int8.py",
       "if scales.shape != (n,):",
       "if scales.numel() != n:",
       "tests/test_kernels_api.py", "-k", "int8"),
    _m("emulate-mma-direct-odd-chunk", "awq_kernels/emulate_direct.py",
       "half = (chunks + 1) // 2 if wm_count == 1 else chunks",
       "half = chunks // 2 if wm_count == 1 else chunks",
       "tests/test_kernels_emulated.py", "-k", "mma_direct_kernel_mapping and 1-320-64"),
    # CLI, api, files, backend, CUDA-graph checks and the tools' numbers (session 16)
    _m("files-no-fsync", "awq_ref/files.py", "            os.fsync(f.fileno())", "            pass", "tests/test_files.py", "-k", "fsynced"),
        _m("files-tmp-elsewhere", "awq_ref/files.py", "dir=path.parent)", "dir=None)", "tests/test_files.py", "-k", "fsynced"),
        _m("backend-no-dtype-check", "awq_ref/backend.py", "    if dtype not in KERNEL_DTYPES:", "    if False:", "tests/test_e2e_gpu.py", "-k", "refuses_a_cpu_model_and"),
        _m("backend-no-device-check", "awq_ref/backend.py", "    if torch.device(device).type != \"cuda\":", "    if False:", "tests/test_e2e_gpu.py", "-k", "refuses_a_cpu_model_and"),
        _m("cg-overflow-off-by-one", "awq_ref/cuda_graph.py", "if self.cache.length >= self.cache.max_len:", "if self.cache.length > self.cache.max_len:", "tests/test_e2e_gpu.py", "-k", "full_cache"),
        _m("cli-device-index-off-by-one", "awq_ref/cli.py", "(dev.index or 0) >= torch.cuda.device_count()", "(dev.index or 0) > torch.cuda.device_count()", "tests/test_cli_errors.py", "-k", "index_must"),
        _m("cli-tokens-per-s-inverted", "awq_ref/cli.py", "{len(new) / dt:.1f} tokens/s", "{dt / len(new):.1f} tokens/s", "tests/test_cli_errors.py", "-k", "greedy_by_default"),
        _m("cli-temperature-default", "awq_ref/cli.py", "\"--temperature\", type=float, default=0.0", "\"--temperature\", type=float, default=1.0", "tests/test_cli_errors.py", "-k", "greedy_by_default"),
        _m("q-rtn-takes-calib", "awq_ref/cli_quantize.py", "if args.method == \"rtn\" and (args.result or args.save_result or args.calib is not None):", "if args.method == \"rtn\" and (args.result or args.save_result):", "tests/test_cli_errors.py", "-k", "would_ignore"),
        _m("q-stream-takes-save-result", "awq_ref/cli_quantize.py", "        if args.result or args.save_result:", "        if args.result:", "tests/test_cli_errors.py", "-k", "would_ignore"),
        _m("q-stream-awq-without-calib", "awq_ref/cli_quantize.py", "        if args.method == \"awq\" and not args.calib:", "        if False:", "tests/test_cli_errors.py", "-k", "would_ignore"),
        _m("q-duo-scaling-ignored", "awq_ref/cli_quantize.py", "options = {\"duo_scaling\": args.duo_scaling}", "options = {\"duo_scaling\": False}", "tests/test_cli_errors.py", "-k", "seed_and_search"),
        _m("q-calib-seed-ignored", "awq_ref/cli_quantize.py", "calib = calibration_tokens(tok, files, args.n_samples, args.calib_seqlen, args.seed)", "calib = calibration_tokens(tok, files, args.n_samples, args.calib_seqlen, 0)", "tests/test_cli_errors.py", "-k", "seed_and_search"),
        _m("q-zero-point-ignored", "awq_ref/cli_quantize.py", "zero_point=spec.zero_point, inplace=True", "zero_point=True, inplace=True", "tests/test_cli_errors.py", "-k", "zero_point_reaches"),
        _m("q-stream-zero-point-ignored", "awq_ref/cli_quantize.py", "group_size=args.group_size, zero_point=not args.no_zero_point,", "group_size=args.group_size, zero_point=True,", "tests/test_cli_errors.py", "-k", "zero_point_reaches"),
        _m("q-identity-no-dtype", "awq_ref/cli_quantize.py", "identity={\"model\": model, \"dtype\": args.dtype}", "identity={\"model\": model}", "tests/test_resume.py", "-k", "another_dtype"),
        _m("aq-rss-units", "tools/awq_quality.py", "ru_maxrss / 2**20", "ru_maxrss / 2**10", "tests/test_tools_cpu.py", "-k", "windows_and_peak"),
        _m("aq-windows-zero-ok", "tools/awq_quality.py", "int(value) < 1:", "int(value) < 0:", "tests/test_tools_cpu.py", "-k", "windows_and_peak"),
        _m("aq-half-split-evals-calib-half", "tools/awq_quality.py", "tok.encode(text[half:])", "tok.encode(text[:half])", "tests/test_tools_cpu.py", "-k", "awq_quality_json"),
        _m("ec-table-kl-is-top1", "tools/eval_checkpoints.py", "kl = f\"{r['kl']:.4f}\"", "kl = f\"{r['top1']:.4f}\"", "tests/test_tools_cpu.py", "-k", "eval_checkpoints"),
        _m("rep-command-eval-windows-all", "tools/report.py", "{args['eval_windows'] or 'all'}", "{args['eval_windows']}", "tests/test_report.py", "-k", "results_markdown"),
        _m("rep-command-drops-half-split", "tools/report.py", "return cmd + (\" --half-split\" if args.get(\"half_split\") else \"\")", "return cmd", "tests/test_report.py", "-k", "results_markdown"),
        _m("rep-gains-inverted", "tools/report.py", "np.mean(errors[f'AWQ {b}'] / errors[f'RTN {b}'])", "np.mean(errors[f'RTN {b}'] / errors[f'AWQ {b}'])", "tests/test_report.py", "-k", "results_markdown"),
        _m("rep-size-mib", "tools/report.py", "f\"{size / 1e6:.1f} MB\"", "f\"{size / 2**20:.1f} MB\"", "tests/test_report.py", "-k", "results_markdown"),
        _m("rep-block-error-denominator", "tools/report.py", "den += float((y - xa).pow(2).sum())", "den += float(y.pow(2).sum())", "tests/test_report.py", "-k", "relative_to"),
        _m("rep-fp16-size-4-bytes", "tools/report.py", "sizes = {\"fp16\": 2 * sum(", "sizes = {\"fp16\": 4 * sum(", "tests/test_report.py", "-k", "count_fp16"),
        _m("rep-tied-head-counted", "tools/report.py", "        state.pop(\"lm_head.weight\", None)", "        pass", "tests/test_report.py", "-k", "count_fp16"),
        _m("tg-large-m-strict", "tools/targets.py", "big = lambda k, n, m: m >= LARGE_M", "big = lambda k, n, m: m > LARGE_M", "tests/test_targets.py", "-k", "exactly"),
        _m("tg-threshold-strict", "tools/targets.py", "ok = p[0] >= threshold if higher_is_better", "ok = p[0] > threshold if higher_is_better", "tests/test_targets.py", "-k", "exactly"),
        _m("tg-bytes-zeros-8bit", "tools/targets.py", "+ k * n / (2 * g) + 2 * m * n", "+ k * n / g + 2 * m * n", "tests/test_targets.py", "-k", "bytes_of"),
        _m("tg-m1-floor-dim-or", "tools/targets.py", "m == 1 and k >= FLOOR_MIN_DIM and n >= FLOOR_MIN_DIM", "m == 1 and (k >= FLOOR_MIN_DIM or n >= FLOOR_MIN_DIM)", "tests/test_targets.py", "-k", "worst_shape"),
        _m("tg-tuned-in-fastest", "tools/targets.py", "not in (\"awq[direct,2 launches]\", \"awq[tuned]\")", "not in (\"awq[direct,2 launches]\",)", "tests/test_targets.py", "-k", "fastest_per_m"),
        _m("be-decode-counts-all-tokens", "tools/bench_e2e.py", "    return steps / _seconds(run)", "    return s.new_tokens / _seconds(run)", "tests/test_tools_cpu.py", "-k", "tokens_per_s_and_gib"),
        _m("be-prefill-mean-of-repeats", "tools/bench_e2e.py", "return n / statistics.median(_seconds(run) for _ in range(repeats))", "return n / max(_seconds(run) for _ in range(repeats))", "tests/test_tools_cpu.py", "-k", "tokens_per_s_and_gib"),
        _m("be-peak-gib-is-gb", "tools/bench_e2e.py", "\"peak_gib\": torch.cuda.max_memory_allocated() / 2**30", "\"peak_gib\": torch.cuda.max_memory_allocated() / 1e9", "tests/test_tools_cpu.py", "-k", "tokens_per_s_and_gib"),
        _m("bc-decode-tok-s-uses-seqlen", "tools/bench_cpu.py", "\"decode_tok_s\": args.decode_steps / dec", "\"decode_tok_s\": args.seqlen / dec", "tests/test_tools_cpu.py", "-k", "rates_and_ratio"),
        _m("bc-ratio-inverted", "tools/bench_cpu.py", "ratio = rows[\"ours\"][0] / rows[\"transformers\"][0]", "ratio = rows[\"transformers\"][0] / rows[\"ours\"][0]", "tests/test_tools_cpu.py", "-k", "rates_and_ratio"),
        _m("bc-hf-missing-ok", "tools/bench_cpu.py", "    if unexpected or missing:", "    if unexpected:", "tests/test_tools_cpu.py", "-k", "missing_weights"),
)


def copy_repo(dest: Path) -> Path:
    """The tracked files of the repo in dest/repo, with dest/shared -> ../shared beside it."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True,
                           text=True).stdout.split("\0")
    repo = dest / "repo"
    for f in filter(None, files):
        (repo / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, repo / f)
    if (ROOT.parent / "shared").exists():
        (dest / "shared").symlink_to(ROOT.parent / "shared")
    return repo


def run(mutant: Mutant, repo: Path) -> bool:
    """True when the mutant's tests fail (killed); the file is restored either way."""
    path = repo / mutant.file
    original = path.read_text()
    if original.count(mutant.old) != 1:
        raise SystemExit(f"{mutant.name}: the text to mutate occurs {original.count(mutant.old)} "
                         f"times in {mutant.file}, not once (the code moved: update the mutant)")
    path.write_text(original.replace(mutant.old, mutant.new))
    try:
        return _pytest(repo, mutant.tests) != 0
    finally:
        path.write_text(original)


def _pytest(repo: Path, tests: tuple[str, ...]) -> int:
    env = {**os.environ, "PYTHONPATH": str(repo)}
    return subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                           *tests], cwd=repo, env=env, capture_output=True, check=False).returncode


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="mutants whose name contains this")
    ap.add_argument("--list", action="store_true", help="print the mutants, run nothing")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTANTS if args.only in m.name]
    if args.list:
        for m in chosen:
            print(f"{m.name:32} {m.file}  ({' '.join(m.tests)})")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        repo = copy_repo(Path(tmp))
        for tests in dict.fromkeys(m.tests for m in chosen):  # each selection once, unmutated
            if _pytest(repo, tests) != 0:
                raise SystemExit(f"the tests fail without a mutant: pytest {' '.join(tests)}")
        survivors = []
        for m in chosen:
            killed = run(m, repo)
            print(f"{'killed  ' if killed else 'SURVIVED'} {m.name}", flush=True)
            survivors += [] if killed else [m.name]
    print(f"{len(chosen) - len(survivors)} of {len(chosen)} killed"
          + (f"; survived: {', '.join(survivors)}" if survivors else ""))
    return 1 if survivors else 0


if __name__ == "__main__":
    raise SystemExit(main())
