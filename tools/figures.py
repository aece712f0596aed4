"""Plots for tools/report.py: plain arrays in, PNG files out (matplotlib's object API, no pyplot
state; of awq_ref only its atomic file writer). Each function's docstring says what its
figure shows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from awq_ref.files import atomic_write

COLORS = {"q/k/v input": "tab:blue", "o_proj input": "tab:orange", "gate/up input": "tab:green",
          "down_proj input": "tab:red"}


def _save(fig: Figure, path: str | Path) -> None:
    """Drawn into a temporary file beside `path`, then renamed over it (atomic_write): a crash
    mid-write never leaves half a PNG under the final name. The format comes from the final
    name: the temporary one has no such suffix."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110,
                                               format=Path(path).suffix.lstrip(".") or None))


def plot_activations(means: dict[tuple[int, str], np.ndarray], path: str | Path,
                     top: float = 0.01) -> None:
    """(a) mean|x| per input channel, one panel per (block, group input), channels in their own
    order, log scale; the top 1% channels (the salient ones AWQ protects) are marked."""
    blocks = sorted({b for b, _ in means})
    labels = list(dict.fromkeys(lbl for _, lbl in means))
    fig = Figure(figsize=(4 * len(labels), 2.8 * len(blocks)), layout="constrained")
    axes = fig.subplots(len(blocks), len(labels), squeeze=False)
    for r, b in enumerate(blocks):
        for c, lbl in enumerate(labels):
            ax, m = axes[r][c], means[(b, lbl)]
            k = max(1, round(top * m.size))
            idx = np.argsort(m)[-k:]
            ax.plot(np.arange(m.size), m, lw=0.6, color="0.45")
            ax.scatter(idx, m[idx], s=14, color="crimson", zorder=3)
            ax.set_yscale("log")
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_title(f"block {b}: {lbl} (K={m.size})\nmax / median = "
                         f"{m.max() / np.median(m):.0f}x", fontsize=9)
            ax.set_xlabel("input channel", fontsize=8)
            ax.tick_params(labelsize=7)
            if c == 0:
                ax.set_ylabel("mean |x| over calibration tokens", fontsize=8)
    fig.suptitle(f"mean |x| per input channel of each scaling group's input (red: the top "
                 f"{top:.0%} channels, the salient ones that AWQ's scales protect)", fontsize=10)
    _save(fig, path)


def plot_loss_curves(curves: list[dict], path: str | Path) -> None:
    """(b) L(s(a)) / L(s = 1) over the grid of a, one panel per block, one line per group; the
    chosen a (the minimum) is circled. a = 0 is plain round-to-nearest, so values < 1 are AWQ's
    gain on that group's output."""
    blocks = sorted({c["block"] for c in curves})
    fig = Figure(figsize=(4.2 * len(blocks), 3.6), layout="constrained")
    axes = fig.subplots(1, len(blocks), squeeze=False, sharey=True)[0]
    for ax, b in zip(axes, blocks):
        for c in (c for c in curves if c["block"] == b):
            y = np.asarray(c["losses"]) / c["losses"][0]
            color = COLORS.get(c["label"])
            ax.plot(c["ratios"], y, marker=".", ms=4, lw=1.2, color=color, label=c["label"])
            j = c["ratios"].index(c["ratio"])
            ax.scatter([c["ratio"]], [y[j]], s=70, facecolors="none", edgecolors=color, lw=1.5)
        ax.axhline(1.0, color="0.6", lw=0.8, ls="--")
        ax.set_title(f"block {b}", fontsize=10)
        ax.set_xlabel("ratio a  (s = mean|x|^a)", fontsize=9)
        ax.set_ylim(0, 2)
    axes[0].set_ylabel("loss / loss at a = 0 (RTN)", fontsize=9)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncol=len(names), fontsize=8,
               title="scaling group, by the input of its linears (circle: the chosen a)",
               title_fontsize=8)
    _save(fig, path)


def plot_ratios(ratios: np.ndarray, labels: list[str], path: str | Path, setting: str = "W4"
                ) -> None:
    """(c) the chosen a for every block (columns) and scaling group (rows), as numbers on a
    colour map; blank where no scale was searched."""
    fig = Figure(figsize=(13, 2.9), layout="constrained")
    ax = fig.subplots()
    data = ratios.T  # (groups, blocks)
    im = ax.imshow(np.ma.masked_invalid(data), cmap="viridis", vmin=0, vmax=1, aspect="auto")
    for (g, b), v in np.ndenumerate(data):
        if np.isfinite(v):
            ax.text(b, g, f"{v:.2f}".lstrip("0") if v else "0", ha="center", va="center",
                    fontsize=7, color="white" if v < 0.5 else "black")
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xticks(range(data.shape[1]), [str(i) for i in range(data.shape[1])], fontsize=7)
    ax.set_xlabel("block")
    ax.set_title(f"chosen ratio a per block and scaling group ({setting}; a = 0 means s = 1, "
                 "i.e. plain RTN)", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.02, pad=0.01)
    _save(fig, path)


def plot_block_errors(errors: dict[str, np.ndarray], path: str | Path) -> None:
    """(d) per block, ||B_q(x) - B(x)||^2 / ||B(x) - x||^2 on the fp block input x, for RTN and
    AWQ at each bit width (log scale), and the ratio AWQ / RTN (below 1: AWQ is better)."""
    fig = Figure(figsize=(10, 6), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(2, 1))
    styles = {"RTN": {"ls": "--", "marker": "x"}, "AWQ": {"ls": "-", "marker": "o"}}
    colors = {}
    for name, e in errors.items():
        method, bits = name.split()
        color = colors.setdefault(bits, f"C{len(colors)}")
        top.plot(np.arange(e.size), e, color=color, ms=4, lw=1.2, label=name, **styles[method])
    for bits, color in colors.items():
        ratio = errors[f"AWQ {bits}"] / errors[f"RTN {bits}"]
        bottom.plot(np.arange(ratio.size), ratio, color=color, marker="o", ms=4, lw=1.2,
                    label=f"{bits}: mean {ratio.mean():.2f}")
    top.set_yscale("log")
    top.set_ylabel("relative error of the\nblock's update", fontsize=9)
    top.set_title("each block's output error on the same fp input: "
                  "||B_q(x) - B(x)||^2 / ||B(x) - x||^2", fontsize=10)
    top.legend(fontsize=8, ncol=2)
    bottom.axhline(1.0, color="0.6", lw=0.8, ls="--")
    bottom.set_ylabel("AWQ / RTN", fontsize=9)
    bottom.set_xlabel("block")
    bottom.set_xticks(range(next(iter(errors.values())).size))
    bottom.tick_params(labelsize=7)
    bottom.legend(fontsize=8)
    _save(fig, path)
