"""Planted bugs the tests must catch: each mutant is applied to a copy of the repo, its tests run,
and it must make them fail ("killed"). A mutant that survives means a test went weak.

    PYTHONPATH=. .venv/bin/python tools/mutants.py            # all (~5 min on 2 cores)
    PYTHONPATH=. .venv/bin/python tools/mutants.py --only clip --list

Each mutant was once a bug no test caught (mutation testing, 2026-12-06); the tests it names
were written for it. The repo itself is never edited: its tracked files are copied to a
temporary folder with ../shared linked beside it, as CI has it, and each mutant's tests must
pass there unmutated first.
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
