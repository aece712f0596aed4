"""docs/results.md and docs/figures/*.png: what AWQ does to the default model, in numbers and plots.

    PYTHONPATH=. .venv/bin/python tools/report.py --from-json awq_quality.json

The quality table (ppl, KL, top-1, recovery, quantization time) is read from the JSON written by
`tools/awq_quality.py --json FILE`; the checkpoint sizes are measured here by packing the model.
The figure data comes from the package's own functions on a small calibration set
(--windows x --seqlen TinyStories windows, seed 0; the default 4 x 512 took 3.0 min on the 2
cores, mostly the AWQ search, as docs/results.md records; --reuse-figure-data re-plots from
docs/figures/data.json and rewrites results.md in a minute; an existing results.md is only
rewritten with --from-json, which holds its table). Every block sees the fp model's
activations, as the search itself does (AwqConfig.propagate = "fp"):
  (a) mean|x| per input channel of each scaling group's input      (activation_means)
  (b) the scale-search loss L(s(a)) over the grid of a              (loss_curves)
  (c) the chosen a of every block and group                         (chosen_ratios, from AwqResult)
  (d) each block's output error after RTN and after AWQ             (block_errors)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tool_cli import count, exit_status  # tools/, beside this script
from torch import nn

from awq_ref.api import quantize
from awq_ref.awq.apply import apply_scale
from awq_ref.awq.calibration import calibration_tokens
from awq_ref.awq.capture import SubsetPlan, capture_block, embed
from awq_ref.awq.pipeline import AwqConfig, search_awq, search_group
from awq_ref.awq.result import AwqResult
from awq_ref.awq.scaling_groups import LLAMA_GROUPS
from awq_ref.files import atomic_write_text, parse_json
from awq_ref.loaders import load_model, load_tokenizer
from awq_ref.quant.checkpoint import save_quantized
from awq_ref.quant.quantizer import QuantSpec

REPO = Path(__file__).resolve().parents[1]
CALIB = REPO.parent / "shared" / "data" / "text" / "tinystories" / "tinystories_val_prefix.txt"
# What each group's input is, by the group's prev op (LLAMA_GROUPS order).
INPUT_LABELS = {"input_layernorm": "q/k/v input", "self_attn.v_proj": "o_proj input",
                "post_attention_layernorm": "gate/up input", "mlp.up_proj": "down_proj input"}


def block_inputs(model: nn.Module, tokens: torch.Tensor, last: int | None = None
                 ) -> Iterator[tuple[int, nn.Module, torch.Tensor, tuple]]:
    """(i, block, x (B, T, D) fp32, (cos, sin)) for blocks 0..last; x = the fp model's input to
    block i. The caller must not modify x; it is advanced in place after the caller is done."""
    x = embed(model, tokens, torch.device("cpu"))  # (B, T, D)
    rotary = model.rotary(0, x.shape[1], torch.float32)
    layers = model.model.layers
    for i, block in enumerate(layers[: len(layers) if last is None else last + 1]):
        yield i, block, x, rotary
        for a in range(0, x.shape[0], 8):
            x[a:a + 8] = block(x[a:a + 8], *rotary)


def _stats(block: nn.Module, x: torch.Tensor, rotary: tuple, config: AwqConfig, gram: bool):
    plan = SubsetPlan(seqs=config.loss_seqs, tokens=config.loss_tokens)
    chunk = max(1, config.chunk_tokens // x.shape[1])
    return capture_block(block, x, *rotary, LLAMA_GROUPS, plan, chunk, "report", gram=gram)


@torch.no_grad()
def activation_means(model: nn.Module, tokens: torch.Tensor, blocks: tuple[int, ...]
                     ) -> dict[tuple[int, str], np.ndarray]:
    """(block, input label) -> mean|x| over all calibration tokens, per input channel (K,)."""
    out = {}
    for i, block, x, rotary in block_inputs(model, tokens, max(blocks)):
        if i in blocks:
            stats = _stats(block, x, rotary, AwqConfig(progress=False), gram=False)
            for group, st in zip(LLAMA_GROUPS, stats):
                out[(i, INPUT_LABELS[group.prev])] = st.mean_abs.numpy()
    return out


@torch.no_grad()
def loss_curves(model: nn.Module, tokens: torch.Tensor, spec: QuantSpec, blocks: tuple[int, ...],
                config: AwqConfig | None = None) -> list[dict]:
    """The scale search of every group of `blocks`, as pipeline.search_block runs it (each group's
    scale folded in before the next group is searched): one dict per group with block, label,
    ratios (n_grid,), losses (n_grid,) and the chosen ratio."""
    cfg, out = model.config, []
    config = config or AwqConfig(progress=False)
    for i, block, x, rotary in block_inputs(model, tokens, max(blocks)):
        if i not in blocks:
            continue
        work = copy.deepcopy(block).float()
        stats = _stats(work, x, rotary, config, gram=True)
        for group, st in zip(LLAMA_GROUPS, stats):
            n_rep = group.n_rep(cfg)
            choice = search_group(work, group, st, n_rep, cfg.head_dim, spec, config, rotary,
                                  f"model.layers.{i}.{group.prev}", set())
            apply_scale(work.get_submodule(group.prev),
                        [work.get_submodule(n) for n in group.linears], choice.s, n_rep,
                        cfg.head_dim)
            out.append({"block": i, "label": INPUT_LABELS[group.prev],
                        "ratios": [k / config.n_grid for k in range(config.n_grid)],
                        "losses": list(choice.losses), "ratio": choice.ratio})
    return out


def chosen_ratios(result: AwqResult, n_layers: int) -> np.ndarray:
    """(n_layers, len(LLAMA_GROUPS)) chosen a per block and group; NaN where none was searched.

    Read from result.search (AwqResult.load restores it from the file)."""
    search = result.search
    if not search:
        raise ValueError("AwqResult carries no search record")
    column = {g.prev: j for j, g in enumerate(LLAMA_GROUPS)}
    out = np.full((n_layers, len(LLAMA_GROUPS)), np.nan)
    for row in search:  # prev = "model.layers.<i>.<group prev>"
        _, _, i, prev = row["prev"].split(".", 3)
        out[int(i), column[prev]] = row["ratio"]
    return out


@torch.no_grad()
def block_errors(model: nn.Module, tokens: torch.Tensor, quantized: dict[str, nn.Module]
                 ) -> dict[str, np.ndarray]:
    """name -> (n_layers,) relative error of each block's update on the fp block input x:

        e_i = ||B_q(x) - B(x)||^2 / ||B(x) - x||^2

    (B(x) - x is what the block adds to the residual stream; every model sees the same x)."""
    errs = {name: [] for name in quantized}
    for i, block, x, rotary in block_inputs(model, tokens):
        num = dict.fromkeys(quantized, 0.0)
        den = 0.0
        for a in range(0, x.shape[0], 8):
            xa = x[a:a + 8]
            y = block(xa, *rotary)
            den += float((y - xa).pow(2).sum())
            for name, q in quantized.items():
                num[name] += float((q.model.layers[i](xa, *rotary) - y).pow(2).sum())
        for name in quantized:
            errs[name].append(num[name] / den)
    return {name: np.array(v) for name, v in errs.items()}


def checkpoint_sizes(model: nn.Module, group_size: int) -> dict[str, int]:
    """Bytes of the fp16 weights (2 x stored parameters) and of the packed W4 checkpoint's
    safetensors (save_quantized with fp16 embeddings and norms, as AutoAWQ stores them)."""
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    sizes = {"fp16": 2 * sum(t.numel() for t in state.values())}
    with tempfile.TemporaryDirectory() as tmp:
        packed = quantize(model, "rtn", 4, group_size)
        folder = save_quantized(packed, Path(tmp) / "w4", dtype=torch.float16)
        sizes["w4"] = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    return sizes


def quality_table(report: dict, sizes: dict[str, int]) -> str:
    """Markdown table of the rows of an awq_quality.py JSON report, with checkpoint sizes."""
    group = report["args"]["group"]
    head = ("method", "bits", "ppl", "KL vs fp", "top-1 vs fp", "recovery", "quantization time",
            "checkpoint")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    unscored = [f"{r['method']} W{r['bits']}" for r in report["rows"] if "ppl" not in r]
    if unscored or not report["rows"] or report["rows"][0]["method"] != "fp":
        raise SystemExit(f"error: a partial awq_quality.py report (no fp row first, or rows "
                         f"without scores: {unscored}): run awq_quality.py to the end first")
    for r in report["rows"]:
        fp = r["method"] == "fp"
        size = sizes["fp16"] if fp else sizes["w4"] if r["bits"] == 4 else None
        cells = [r["method"].upper() if not fp else "fp32",
                 "-" if fp else f"W{r['bits']} g{group}", f"{r['ppl']:.3f}",
                 "-" if fp else f"{r['kl']:.4f}", "-" if fp else f"{r['top1']:.4f}",
                 f"{r['recovery']:.3f}" if "recovery" in r else "-",
                 "-" if r.get("quant_s") is None else f"{r['quant_s']:.1f} s",
                 "n/a (fake-quantized: the packed format is 4-bit)" if size is None and not fp
                 else f"{size / 1e6:.1f} MB" + (" (fp16)" if fp else "")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def measured_quality_table(report: dict, model: nn.Module) -> str:
    """quality_table with the sizes measured at the report's group size, which labels its rows
    (report.py's --group is the figures')."""
    return quality_table(report, checkpoint_sizes(model, report["args"]["group"]))


def quality_command(args: dict) -> str:
    """The awq_quality.py command line that produced a report, from its recorded args."""
    cmd = (f"tools/awq_quality.py --model {args['model']} --bits {' '.join(map(str, args['bits']))}"
           f" --group {args['group']} --calib-windows {args['calib_windows']} --seqlen "
           f"{args['seqlen']} --eval-windows {args['eval_windows'] or 'all'} --eval-seqlen "
           f"{args['eval_seqlen']}")
    # Options left at awq_quality.py's defaults are left out (older reports lack some keys).
    if args.get("seed", 0) != 0:
        cmd += f" --seed {args['seed']}"
    if args.get("methods", ["awq", "rtn"]) != ["awq", "rtn"]:
        cmd += " --methods " + " ".join(args["methods"])
    for flag, usual in (("calib", "tinystories/tinystories_val_prefix.txt"),
                        ("eval", "wikitext-2-raw/wiki.test.raw")):
        if not str(args.get(flag, usual)).endswith(usual):
            cmd += f" --{flag} {args[flag]}"
    if args.get("overrides"):
        cmd += " --set " + " ".join(args["overrides"])
    return cmd + (" --half-split" if args.get("half_split") else "")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    return f"{platform.system()} {cpu}, {os.cpu_count()} CPU cores, torch {torch.__version__}"


def figure_data(model: nn.Module, calib: torch.Tensor, group: int, bits: tuple[int, ...]) -> dict:
    """Everything the four figures show, as JSON-ready lists ((b), (c) at bits[0])."""
    n = model.config.num_hidden_layers
    mid = n // 2
    print("(a) activations", flush=True)
    act = activation_means(model, calib, (0, mid))
    print("(b) loss curves", flush=True)
    curves = loss_curves(model, calib, QuantSpec(bits[0], group), (0, mid, n - 1))
    print(f"(c) AWQ search at {', '.join(f'W{b}' for b in bits)}", flush=True)
    results = {b: search_awq(model, calib, QuantSpec(b, group), AwqConfig(progress=False))
               for b in bits}
    print("(d) block errors", flush=True)
    quantized = {}
    for b in bits:
        quantized[f"RTN W{b}"] = quantize(model, "rtn", b, group, pack=False)
        quantized[f"AWQ W{b}"] = quantize(model, "awq", b, group, pack=False, result=results[b])
    errors = block_errors(model, calib, quantized)
    return {"activations": [{"block": b, "label": lbl, "mean_abs": m.tolist()}
                            for (b, lbl), m in act.items()],
            "curves": curves, "labels": [INPUT_LABELS[g.prev] for g in LLAMA_GROUPS],
            "setting": f"W{bits[0]} g{group}",
            "ratios": chosen_ratios(results[bits[0]], n).tolist(),
            "search_seconds": {f"W{b}": float(r.info["seconds"]) for b, r in results.items()},
            "config": next(iter(results.values())).info["config"],
            "block_errors": {k: v.tolist() for k, v in errors.items()}}


def plot_all(data: dict, folder: Path) -> None:
    from figures import plot_activations, plot_block_errors, plot_loss_curves, plot_ratios

    act = {(a["block"], a["label"]): np.array(a["mean_abs"]) for a in data["activations"]}
    plot_activations(act, folder / "activations.png")
    plot_loss_curves(data["curves"], folder / "loss_vs_ratio.png")
    plot_ratios(np.array(data["ratios"], dtype=float), data["labels"],
                folder / "chosen_ratio.png", data["setting"])
    plot_block_errors({k: np.array(v) for k, v in data["block_errors"].items()},
                      folder / "block_error.png")


def read_json(path: str | Path, what: str) -> dict:
    """A JSON object from `path`, or a ValueError naming the file and what it should be."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{path}: cannot read {what} ({e.strerror or e})") from None
    data = parse_json(raw, str(path))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not {what} (a JSON {type(data).__name__})")
    return data


def read_quality_report(path: str, json_machine: str | None) -> tuple[dict, str]:
    """--from-json's report and the line saying where its numbers come from, checked before any
    work: a file that is no complete awq_quality.py report is refused here, not after it."""
    report = read_json(path, "an awq_quality.py --json report")
    try:
        quality_table(report, {"fp16": 0, "w4": 0})  # its checks, without measured sizes
        fp, model, group = report["rows"][0], report["args"]["model"], report["args"]["group"]
        source = (
            f"Numbers from `PYTHONPATH=. .venv/bin/python {quality_command(report['args'])}`"
            f" (N = {fp['windows']} windows, {fp['tokens']:,} scored tokens)"
            f" on {json_machine or machine()}; checkpoint sizes measured by "
            f"tools/report.py (save_quantized, fp16 embeddings and norms).")
    except (KeyError, TypeError, IndexError, ValueError) as e:
        raise ValueError(f"{path}: not an awq_quality.py --json report ({e!r:.200})") from None
    if model != "default":  # the figures, the sizes and results.md's title are the default's
        raise ValueError(f"{path}: a report on --model {model}, but results.md describes the "
                         "default model: pass a report made with --model default")
    if isinstance(group, bool) or not isinstance(group, int) or group <= 0:
        raise ValueError(f"{path}: group={group!r} is no group size")
    return report, source


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])
    ap.add_argument("--from-json", help="tools/awq_quality.py --json output (the quality table)")
    ap.add_argument("--json-machine", default=None,
                    help="where the JSON was produced (default: this machine)")
    ap.add_argument("--windows", type=count, default=4)
    ap.add_argument("--seqlen", type=count, default=512)
    ap.add_argument("--group", type=int, default=64,
                    help="the figures' group size (the table's is the --from-json report's)")
    ap.add_argument("--bits", type=int, nargs="+", default=[4], help="(b), (c) use the first")
    ap.add_argument("--reuse-figure-data", action="store_true",
                    help="re-plot from docs/figures/data.json instead of recomputing it")
    ap.add_argument("--out", default=str(REPO / "docs"))
    args = ap.parse_args()
    results = Path(args.out) / "results.md"
    if results.exists() and not args.from_json:  # it would be rewritten without its table
        ap.error(f"{results} holds the quality table, which only --from-json FILE (the quality "
                 "report) rewrites: pass it, or another --out folder")
    folder, start = Path(args.out) / "figures", time.perf_counter()
    table = ("Not filled in yet: run `tools/awq_quality.py --json FILE`, then "
             "`tools/report.py --reuse-figure-data --from-json FILE`.")
    report, source = (read_quality_report(args.from_json, args.json_machine) if args.from_json
                      else (None, ""))
    folder.mkdir(parents=True, exist_ok=True)
    model, tok = load_model("default"), load_tokenizer("default")
    if args.reuse_figure_data:
        data = read_json(folder / "data.json", "report.py's figure data")
    else:
        calib = calibration_tokens(tok, CALIB, args.windows, args.seqlen, seed=0)
        data = figure_data(model, calib, args.group, tuple(args.bits))
        data["made_by"] = (f"`PYTHONPATH=. .venv/bin/python tools/report.py --windows "
                           f"{args.windows} --seqlen {args.seqlen} --group {args.group} --bits "
                           f"{' '.join(map(str, args.bits))}` on "
                           f"{machine()} in {(time.perf_counter() - start) / 60:.1f} min")
        atomic_write_text(folder / "data.json", json.dumps(data))
    try:
        plot_all(data, folder)
        results_markdown(table, source, data)  # every key it reads, before the sizes' work
    except (KeyError, TypeError, IndexError, ValueError) as e:
        if not args.reuse_figure_data:  # data made here: a bug, with its traceback
            raise
        raise ValueError(f"{folder / 'data.json'}: not report.py's figure data ({e!r:.200})"
                         ) from None
    if report is not None:
        table = measured_quality_table(report, model)
    atomic_write_text(folder.parent / "results.md", results_markdown(table, source, data))
    print(f"wrote {folder.parent / 'results.md'} and {folder} in "
          f"{time.perf_counter() - start:.0f} s")


def results_markdown(table: str, source: str, data: dict) -> str:
    errors = {k: np.array(v) for k, v in data["block_errors"].items()}
    bits = [k.split()[1] for k in errors if k.startswith("AWQ")]
    gains = ", ".join(f"{np.mean(errors[f'AWQ {b}'] / errors[f'RTN {b}']):.2f} at {b}"
                      for b in bits)
    seconds = ", ".join(f"{s:.0f} s ({b})" for b, s in data["search_seconds"].items())
    ratios = np.array(data["ratios"], dtype=float)
    return RESULTS_TEMPLATE.format(
        table=table, source=source, made_by=data["made_by"], gains=gains, seconds=seconds,
        config=data.get("config", "not recorded (data made before 2026-12-05, when the defaults "
                        "were n_grid 20, clip_mode range, no clip_joint)"),
        setting=data["setting"], ratio_mean=np.nanmean(ratios), ratio_min=np.nanmin(ratios),
        ratio_max=np.nanmax(ratios))


RESULTS_TEMPLATE = """# Results: AWQ on SmolLM2-135M-Instruct

Written by `tools/report.py`; the algorithm behind the figures is explained step by step in
[walkthrough.md](walkthrough.md).

## Quality (../shared/design/PROTOCOL.md)

{table}

{source}

recovery = (ppl_RTN - ppl_AWQ) / (ppl_RTN - ppl_fp). W3 runs as fake quantization (weights
rounded in place), so it has no packed checkpoint.

## Figures

Figure data: {made_by}; stored in
[figures/data.json](figures/data.json). The AWQ search behind (c) and (d) took {seconds};
its AwqConfig: {config}.

**(a) Salient input channels.** mean|x| per input channel of the four scaling-group inputs of
block 0 and a middle block; a handful of channels carry activations 10-55x the median. Those are
the weights AWQ protects by scaling them up before rounding.

![activations](figures/activations.png)

**(b) The grid over a.** The search loss of each scaling group for s = mean|x|^a, divided by the
loss at a = 0 (s = 1, plain round-to-nearest); the circle is the chosen a. Curves dip below 1
at moderate a (protecting salient channels helps) and climb back at large a (it squeezes the
other channels); a few first rise at the smallest a.

![loss vs ratio](figures/loss_vs_ratio.png)

**(c) The chosen a per block and group** ({setting}, from the AwqResult's search record): mean
{ratio_mean:.2f}, range {ratio_min:.2f} to {ratio_max:.2f}.

![chosen ratio](figures/chosen_ratio.png)

**(d) Output error per block.** Each block run on the same fp input x (the calibration windows
themselves, so in-sample), with RTN and with AWQ weights: ||B_q(x) - B(x)||^2 / ||B(x) - x||^2.
Mean over blocks of AWQ / RTN: {gains}.

![block error](figures/block_error.png)
"""


if __name__ == "__main__":
    raise SystemExit(exit_status(main))
