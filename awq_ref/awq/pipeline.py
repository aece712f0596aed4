"""search_awq: the AWQ search, block by block, in the paper's order (search_block: one block).

For each block (one on the compute device at a time, as an fp32 working copy):
  1. capture  - run the block over the calibration inputs; per scaling group gather mean|x|,
                the Gram matrix X^T X and a subset of inputs for module losses (with the
                default propagate="fp" this same forward also gives step 4's outputs);
  2. scales   - for each group of LLAMA_GROUPS, grid-search s (search_scale) and fold it into
                the working copy (apply_scale);
  3. clipping - for each linear not in clip_skip, search the per-group clip box on the scaled
                weights (search_clip) and clamp (apply_clip);
  4. next     - the next block's inputs: the block's output with the original fp weights
                ("fp", as llm-awq / AutoAWQ do), with the scaled and clipped fp weights
                ("awq"), or with the fake-quantized weights ("quantized").
`search_awq` leaves the model as it is and returns an AwqResult; `apply_awq(model, result)`
folds it in; `run_awq` (what api.quantize calls) does both.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from awq_ref.awq.apply import apply_awq, apply_clip, apply_scale, check_not_applied
from awq_ref.awq.calibration import (
    DEFAULT_SEQLEN,
    DEFAULT_WINDOWS,
    check_calib_tokens,
    sample_from_model,
)
from awq_ref.awq.capture import (
    InputStats,
    SubsetPlan,
    capture_block,
    check_finite,
    embed,
    forward_block,
)
from awq_ref.awq.result import AwqResult
from awq_ref.awq.resume import Progress, fingerprint, weights_digest
from awq_ref.awq.scaling_groups import (
    LLAMA_CLIP_SKIP,
    LLAMA_GROUPS,
    ScalingGroup,
    expand_kv,
    input_group,
    reduce_kv,
)
from awq_ref.awq.search_clip import CLIP_MODES, clipper, search_clip
from awq_ref.awq.search_scale import ScaleChoice, gram_loss, grid_search, module_loss, weight_mean
from awq_ref.config import LlamaConfig
from awq_ref.model import check_token_ids
from awq_ref.quant.packing import Fp16OverflowError
from awq_ref.quant.qlinear import check_not_quantized, decoder_linears, skip_names, skipped
from awq_ref.quant.quantizer import QuantSpec
from awq_ref.quant.rtn import fake_quantize_weight

log = logging.getLogger(__name__)
# The next block's inputs: the block's output with the original fp weights ("fp"), with the
# scaled and clipped fp weights, not rounded ("awq"), or with the fake-quantized ones.
PROPAGATE = ("fp", "awq", "quantized")
# AwqConfig's annotations are strings (`from __future__ import annotations` leaves them
# unevaluated), so the checked types are keyed by their text; str and tuple fields are checked
# by name in __post_init__.
_FIELD_TYPES = {"int": int, "float": (int, float), "bool": bool}


@dataclass(frozen=True)
class AwqConfig:
    n_grid: int = 40  # ratios a = i / n_grid of the scale search (measured: 40 beat 20)
    n_refine: int = 0  # then halve the step around the best ratio this many times (2 losses each)
    duo_scaling: bool = False  # s = mean|x|^a / mean|w~|^(1-a) instead of mean|x|^a
    scale_vo_gqa: bool = True  # search v_proj -> o_proj also when Hkv < H (llm-awq skips it)
    clip: bool = True
    clip_skip: tuple[str, ...] = LLAMA_CLIP_SKIP
    clip_grid: int = 40  # clip ratio step 1/clip_grid (measured: 40 beat 20 on ppl, KL, top-1)
    max_shrink: float = 0.5  # clip ratios 1, 1 - 1/clip_grid, ..., > 1 - max_shrink (20 of them)
    clip_mode: str = "lohi"  # see search_clip.CLIP_MODES
    clip_joint: int = 2  # > 0: sweeps re-picking boxes by whole-row output error (search_clip)
    # n_grid 40, lohi and clip_joint 2 were measured together: docs/walkthrough.md section 8
    clip_damp: float = 0.0  # clip on X^T X + clip_damp * mean(diag) * I (less fit to calibration)
    scale_clip_grid: int = 0  # > 0: judge each scale candidate after a clip search on this grid
    loss_seqs: int = 8  # whole sequences for the attention-output loss (subset, measured)
    loss_tokens: int = 4096  # strided tokens for the MLP-output loss (subset, measured)
    propagate: str = "fp"  # next block's inputs; see PROPAGATE and the module docstring
    chunk_tokens: int = 8192  # tokens per block forward, to bound activation memory
    progress: bool = True

    def settings(self) -> dict:
        """The fields that decide the result: all but `progress`, which only shows a bar (the
        result's record and the resume fingerprint, so CLI and API give the same bytes)."""
        return {k: v for k, v in asdict(self).items() if k != "progress"}

    def __post_init__(self) -> None:
        for f in fields(self):  # a wrong type fails deep in the search, or silently ("no" is true)
            value, want = getattr(self, f.name), _FIELD_TYPES.get(f.type)
            if want and (not isinstance(value, want) or isinstance(value, bool) != (want is bool)):
                raise TypeError(f"AwqConfig.{f.name} must be {f.type}, got {value!r}")
        if isinstance(self.clip_skip, str) or not all(isinstance(n, str) for n in self.clip_skip):
            raise TypeError(f"AwqConfig.clip_skip must be a tuple of linear names, got "
                            f"{self.clip_skip!r}")
        if self.propagate not in PROPAGATE:
            raise ValueError(f"propagate must be one of {PROPAGATE}, got {self.propagate!r}")
        if self.clip_mode not in CLIP_MODES:
            raise ValueError(f"clip_mode must be one of {CLIP_MODES}, got {self.clip_mode!r}")
        for name in ("n_grid", "clip_grid", "loss_seqs", "loss_tokens", "chunk_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"AwqConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_refine < 0:
            raise ValueError(f"AwqConfig.n_refine must be >= 0, got {self.n_refine}")
        if not self.clip_damp >= 0:  # written so that nan fails too
            raise ValueError(f"AwqConfig.clip_damp must be >= 0, got {self.clip_damp}")
        if not 0 <= self.max_shrink < 1:
            raise ValueError(f"AwqConfig.max_shrink must be in [0, 1) (clip ratios stay "
                             f"positive), got {self.max_shrink}")
        if self.clip_joint < 0:
            raise ValueError(f"AwqConfig.clip_joint must be >= 0, got {self.clip_joint}")
        if self.scale_clip_grid < 0:
            raise ValueError(f"AwqConfig.scale_clip_grid must be >= 0, got {self.scale_clip_grid}")


def search_awq(model: nn.Module, calib_tokens: torch.Tensor, spec: QuantSpec,
               config: AwqConfig = AwqConfig(), device: str | torch.device | None = None,
               modules_to_not_convert: Iterable[str] = (), work: Progress | None = None,
               *, progress: Progress | None = None) -> AwqResult:
    """Search AWQ scales and clip ranges for `model` on calib_tokens (B, T); model unchanged.

    Linears whose full name contains an entry of modules_to_not_convert stay fp in the losses
    and are never clipped; their input channels are still scaled (that is exact) when their
    scaling group also holds a quantized linear; a group of only such linears is not searched.
    work: a work folder (awq.resume.Progress): the state is saved there after every block, and
    a rerun resumes from it. progress: its former name, still accepted (deprecated).
    """
    if progress is not None:
        if work is not None:
            raise TypeError("search_awq: give the work folder once (work=; progress= is its "
                            "former name)")
        warnings.warn("search_awq(progress=...) is now search_awq(work=...)", DeprecationWarning,
                      stacklevel=2)
        work = progress
    check_calib_tokens(calib_tokens)
    check_token_ids(model.config, calib_tokens, "calib_tokens")
    check_not_quantized(model, "search_awq")
    device = torch.device(device) if device is not None else model.device
    skip = skip_names(modules_to_not_convert, "search_awq")
    for name, lin in decoder_linears(model, skip):  # a ValueError naming the layer, not later
        spec.group_for(lin.in_features, name)
    result = AwqResult(spec=spec, info={"config": json.dumps(config.settings())})
    start = time.perf_counter()
    with torch.no_grad(), work.hold() if work is not None else nullcontext():
        x = embed(model, calib_tokens, device)  # (B, T, D)
        cos, sin = (t.to(device) for t in model.rotary(0, x.shape[1], torch.float32))  # (T, Dh)
        blocks = model.model.layers
        first = _resume(work, model, calib_tokens, spec, config, skip, device, result, x)
        # `with`: the bar is closed on an error too, so the error's line starts a line of its own
        with tqdm(total=len(blocks), initial=first, desc="AWQ", unit="block",
                  disable=not config.progress) as bar:
            for i in range(first, len(blocks)):
                prefix = f"model.layers.{i}"
                block = copy.deepcopy(blocks[i]).to(device, torch.float32)  # the working copy
                search_block(block, prefix, model.config, x, cos, sin, spec, config, result,
                             fp_linears(block, prefix, skip))
                # x (B, T, D) now holds this block's outputs: the next block's inputs
                bar.update(1)
                del block
                if work is not None:
                    work.save(i + 1, result, x)
    result.info["seconds"] = f"{time.perf_counter() - start:.1f}"
    result.info["search"] = json.dumps(result.search)
    return result


def _resume(work: Progress | None, model: nn.Module, calib_tokens: torch.Tensor,
            spec: QuantSpec, config: AwqConfig, skip: tuple[str, ...], device: torch.device,
            result: AwqResult, x: torch.Tensor) -> int:
    """The first block to search: 0, or where a saved state ends (result and x then restored)."""
    if work is None:
        return 0
    identity = {**work.identity, "weights": weights_digest(model)}
    work.bind(fingerprint(model.config, calib_tokens, spec, config, skip, device, identity))
    state = work.restore(result)
    if state is None:
        return 0
    first, hidden = state
    x.copy_(hidden)
    work.announce(first, config.progress)
    return first


def run_awq(model: nn.Module, spec: QuantSpec, calib_tokens: torch.Tensor | None = None,
            modules_to_not_convert: Iterable[str] = (), device: str | torch.device | None = None,
            result: AwqResult | None = None, then: Callable[[int], None] | None = None,
            **config: Any) -> nn.Module:
    """Search (unless `result` is given) and fold the result into `model`, in place; returns it.

    This is `awq_ref.api.quantize(method="awq")`, which rounds each block right after its fold
    (`then`, see apply_awq). Without calib_tokens
    the windows are sampled from the model itself (data-free; see calibration.sample_from_model).
    Extra keyword arguments are AwqConfig fields (n_grid=..., duo_scaling=...).
    """
    skip = skip_names(modules_to_not_convert, "quantize")
    check_not_applied(model, "quantize")  # before a search whose result it would refuse
    if result is None:
        if calib_tokens is None:
            log.warning("no calibration tokens given: sampling %d x %d tokens from the model "
                        "(data-free calibration)", DEFAULT_WINDOWS, DEFAULT_SEQLEN)
            calib_tokens = sample_from_model(model)
        result = search_awq(model, calib_tokens, spec, AwqConfig(**config), device, skip)
    elif config or calib_tokens is not None:
        raise TypeError("run_awq: a given `result` takes no calibration tokens or search options")
    apply_awq(model, result, modules_to_not_convert=skip, then=then)
    return model


def fp_linears(block: nn.Module, prefix: str, skip: tuple[str, ...]) -> set[str]:
    """The block's linears (names inside the block) that stay unquantized: skipped(prefix.name)."""
    return {n for n, m in block.named_modules()
            if isinstance(m, nn.Linear) and skipped(f"{prefix}.{n}", skip)}


def search_block(block: nn.Module, prefix: str, model_cfg: LlamaConfig, x: torch.Tensor,
                 cos: torch.Tensor, sin: torch.Tensor, spec: QuantSpec, config: AwqConfig,
                 result: AwqResult, fp_names: set[str] = frozenset()) -> None:
    """Steps 1-4 for one block. Mutates `block` (the fp32 working copy: scales and clips folded
    in), x (B, T, D) in place (the block's outputs: the next block's inputs; with
    propagate="fp" written during step 1's forward already) and `result` (this block's scales,
    clips and search records).

    fp_names: the block's linears that stay unquantized (not clipped, fp in the losses)."""
    chunk_seqs = max(1, config.chunk_tokens // x.shape[1])
    plan = SubsetPlan(seqs=config.loss_seqs, tokens=config.loss_tokens)
    # Step 1; with propagate="fp" the same forward also writes step 4's outputs into x.
    stats = capture_block(block, x, cos, sin, LLAMA_GROUPS, plan, chunk_seqs, prefix,
                          write_outputs=config.propagate == "fp")
    # Step 2: each group's scale, folded in before the next group is searched.
    s_in_by_group = search_scales(block, prefix, model_cfg, stats, (cos, sin), spec, config,
                                  result, fp_names)
    # Step 3: the clip boxes, searched on the scaled weights.
    if config.clip:
        clip_block(block, prefix, stats, s_in_by_group, spec, config, result, fp_names)
    # Step 4 ("fp" was done in step 1).
    if config.propagate == "awq":
        forward_block(block, x, cos, sin, chunk_seqs, prefix)
    elif config.propagate == "quantized":
        forward_block(quantized_copy(block, spec, fp_names), x, cos, sin, chunk_seqs, prefix)


def search_scales(block: nn.Module, prefix: str, model_cfg: LlamaConfig,
                  stats: list[InputStats], rotary: tuple, spec: QuantSpec, config: AwqConfig,
                  result: AwqResult, fp_names: set[str]) -> dict[int, torch.Tensor]:
    """Step 2: search each group's scale (search_group) and fold it into `block` (apply_scale);
    record it in `result`. Returns group index -> the scale (K,) its linears' inputs are now
    divided by (for GQA's v -> o: the v scales expanded over the query heads)."""
    s_in_by_group = {}
    for gi, group in enumerate(LLAMA_GROUPS):
        n_rep = group.n_rep(model_cfg)
        if (n_rep > 1 and not config.scale_vo_gqa) or set(group.linears) <= fp_names:
            continue
        where = f"{prefix}.{group.prev}"
        clips = _candidate_clips(group, stats[gi].gram, spec, config, fp_names)
        choice = search_group(block, group, stats[gi], n_rep, model_cfg.head_dim, spec, config,
                              rotary, where, fp_names, clips)
        apply_scale(block.get_submodule(group.prev),
                    [block.get_submodule(n) for n in group.linears], choice.s, n_rep,
                    model_cfg.head_dim)
        s_in_by_group[gi] = expand_kv(choice.s, n_rep, model_cfg.head_dim)
        result.scales[where] = choice.s.cpu()
        result.search.append({"prev": where, "ratio": choice.ratio, "loss": choice.loss,
                              "loss0": choice.loss0})
    return s_in_by_group


def _candidate_clips(group: ScalingGroup, gram: torch.Tensor, spec: QuantSpec,
                     config: AwqConfig, fp_names: set[str]) -> dict:
    """linear name -> its clipper, to clip each scale candidate before its loss; {} unless the
    scale_clip_grid variant is on (off by default; walkthrough section 8)."""
    if not config.clip or config.scale_clip_grid == 0:
        return {}
    return {n: clipper(gram, spec, config.scale_clip_grid, config.max_shrink, config.clip_mode, n)
            for n in group.linears if n not in config.clip_skip and n not in fp_names}


def search_group(block: nn.Module, group: ScalingGroup, st: InputStats, n_rep: int,
                 head_dim: int, spec: QuantSpec, config: AwqConfig, rotary: tuple,
                 where: str, fp_names: set[str], clips: dict | None = None) -> ScaleChoice:
    """Grid-search the scale of one group (see search_scale for L(s)) and log the choice.

    clips: linear name -> its clip (search_clip.clipper) applied to each candidate, if any."""
    clips = clips or {}
    linears = [block.get_submodule(n) for n in group.linears]
    x_mean = st.mean_abs  # (K,): for v -> o, o_proj's H*Dh inputs
    w_mean = weight_mean([m.weight for m in linears], spec) if config.duo_scaling else None
    if n_rep > 1:  # one scale per v channel: average the statistics of the heads sharing it
        x_mean = reduce_kv(x_mean, n_rep, head_dim)  # (Hkv*Dh,)
        w_mean = reduce_kv(w_mean, n_rep, head_dim) if w_mean is not None else None
    if group.closed_form:
        w, clip = linears[0].weight, clips.get(group.linears[0])

        def loss(s_in: torch.Tensor) -> float:
            return gram_loss(w, st.gram, st.count, s_in, spec, clip)
    else:
        inspect = block.get_submodule(group.inspect)
        extra = rotary if group.positional else ()
        inputs = torch.cat(st.subset)  # (S, T, K) or (tokens, K)
        chunk = max(1, config.chunk_tokens // inputs.shape[1]) if group.positional \
            else config.chunk_tokens
        # f(x; W): the fp output the loss compares against, (S, T, D) or (tokens, D)
        reference = torch.cat([inspect(inputs[i:i + chunk], *extra)
                               for i in range(0, inputs.shape[0], chunk)])

        def param(name: str) -> str:  # "self_attn.q_proj" -> "q_proj.weight", inside inspect
            return name[len(group.inspect) + 1:] + ".weight"

        weights = {param(n): m.weight for n, m in zip(group.linears, linears)
                   if n not in fp_names}
        clip_by_param = {param(n): c for n, c in clips.items()}
        loss = module_loss(inspect, weights, spec, inputs, reference, extra, chunk, clip_by_param)
    prev = block.get_submodule(group.prev)
    prev_max = (prev.weight.abs().amax(1) if isinstance(prev, nn.Linear)
                and group.prev not in fp_names else None)  # (C,): a quantized prev's rows
    try:
        choice = grid_search(loss, x_mean, w_mean, config.n_grid,
                             lambda s: expand_kv(s, n_rep, head_dim), config.n_refine, prev_max)
    except Fp16OverflowError as e:
        raise Fp16OverflowError(f"{where} -> {','.join(group.linears)}: {e}") from None
    # inf marks candidates that overflow fp16 (see grid_search); NaN or an inf choice is a bug.
    check_finite(torch.tensor([choice.loss, *(v for v in choice.losses if v != math.inf)]),
                 f"{where} -> {','.join(group.linears)} scale loss")
    log.info("%s -> %s: ratio %.2f loss %.4g (ratio 0: %.4g)", where, ",".join(group.linears),
             choice.ratio, choice.loss, choice.loss0)
    return choice


def clip_block(block: nn.Module, prefix: str, stats: list[InputStats],
               s_in_by_group: dict[int, torch.Tensor], spec: QuantSpec, config: AwqConfig,
               result: AwqResult, fp_names: set[str]) -> None:
    """Search and apply the clip box of every quantized linear not in clip_skip (scaled weights;
    s_in_by_group: group index -> the scale (K,) its inputs are now divided by)."""
    for name, lin in block.named_modules():
        if not isinstance(lin, nn.Linear) or name in config.clip_skip or name in fp_names:
            continue
        gi = input_group(LLAMA_GROUPS, name)
        gram = stats[gi].gram  # (K, K)
        if gi in s_in_by_group:  # the input is now x / s: H -> diag(1/s) H diag(1/s)
            s = s_in_by_group[gi]  # (K,)
            gram = gram / (s[:, None] * s[None, :])
        if config.clip_damp > 0:  # part plain weight error: data-free, so no fit to calibration
            gram = gram + config.clip_damp * gram.diagonal().mean() * torch.eye(
                gram.shape[0], dtype=gram.dtype, device=gram.device)
        lo, hi, before, after = search_clip(lin.weight, gram, spec, config.clip_grid,
                                            config.max_shrink, config.clip_mode, name,
                                            joint=config.clip_joint)
        check_finite(torch.tensor([before, after]), f"{prefix}.{name} clip loss")
        apply_clip(lin, lo, hi)
        result.clips[f"{prefix}.{name}"] = (lo.cpu(), hi.cpu())
        log.info("%s.%s: clip error %.4g -> %.4g", prefix, name, before, after)


def quantized_copy(block: nn.Module, spec: QuantSpec, fp_names: set[str]) -> nn.Module:
    """A copy of the block whose linears (but fp_names) carry fake-quantized weights."""
    q = copy.deepcopy(block)
    for name, lin in q.named_modules():
        if isinstance(lin, nn.Linear) and name not in fp_names:
            lin.weight.data = fake_quantize_weight(lin.weight.data, spec, name)
    return q
