"""`auto` as data: which kernel, block tile and split cap a product of M rows gets.

A Dispatch is a list of rules (largest M, Choice) in increasing M: an M takes the first rule
whose bound holds it; the last rule has no bound. DEFAULT is the rule measured on an H100
(2026-12-05, docs/gpu/h100-2026-12-05; below). `from_sweep` derives a Dispatch from a tile
sweep (sweep.py) so that a GPU run's measurements become the next `auto` as reviewed data, and
`api.gemm(..., dispatch=d)` runs one without changing the default (no global state): the
benchmark times a derived dispatch beside `auto` in one run (bench_gemm.py --tuned-from).

Pure Python (no torch, no CUDA): unit-tested on CPU like plan.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .build import MMA_TILES, MmaTile
from .plan import GEMV_DIRECT_MAX_M, GEMV_MAX_M, KERNELS, MAX_SPLITS, MMA_DIRECT_AUTO_MAX_M

FIXED_KERNELS = tuple(k for k in KERNELS if not k.startswith("auto"))
MMA_KERNELS = ("mma", "mma_split")
ROW_LIMITS = {"gemv": GEMV_MAX_M, "gemv_direct": GEMV_DIRECT_MAX_M}  # kernels with a most M

# DEFAULT, from the fastest of our kernels per M on an H100 (tools/bench_gemm.py, 7 shapes,
# fp16, G = 128, geometric mean over shapes): gemv_direct at M = 1, 2 (gemv 1.25x slower),
# mma_direct at 4, 8 (gemv 1.28-1.49x), mma_split at 16, 32 (mma_direct 1.31-1.45x, dequantize +
# cuBLAS 1.79-2.23x) and 64 (dequantize + cuBLAS 1.09x slower: 0.89-1.12x on six shapes, 1.70x
# on 8192 x 28672), dequantize + cuBLAS from 128 on (mma 1.39x). An M between two measured
# sizes gets the larger one's kernel.
AUTO_GEMV_DIRECT_MAX_M = 2
AUTO_MMA_DIRECT_MAX_M = 8
AUTO_MMA_SPLIT_MAX_M = 64
MIN_GAIN = 0.03  # from_sweep keeps the base's choice unless another is this much faster


@dataclass(frozen=True)
class Choice:
    """One fixed kernel (not "auto*"), its block tile ("mma"/"mma_split" only; None: by M)
    and its most K splits."""

    kernel: str
    tile: MmaTile | None = None
    max_splits: int = MAX_SPLITS

    def __post_init__(self) -> None:
        if self.kernel not in FIXED_KERNELS:
            raise ValueError(f"a dispatch choice's kernel must be one of {FIXED_KERNELS}, "
                             f"got {self.kernel!r}")
        if self.tile is not None and (self.kernel not in MMA_KERNELS or self.tile not in MMA_TILES):
            raise ValueError(f"tile {self.tile} needs kernel 'mma' or 'mma_split' and a tile of "
                             f"build.MMA_TILES (kernel {self.kernel!r})")
        if type(self.max_splits) is not int or not 1 <= self.max_splits <= MAX_SPLITS:
            raise ValueError(f"max_splits must be an int in 1..{MAX_SPLITS}, "
                             f"got {self.max_splits!r}")

    def to_json(self) -> dict:
        tile = None if self.tile is None else [self.tile.bm, self.tile.warps_m, self.tile.warps_n,
                                               self.tile.bk]
        return {"kernel": self.kernel, "tile": tile, "max_splits": self.max_splits}

    @staticmethod
    def from_json(d: object) -> Choice:
        if not isinstance(d, dict) or set(d) - {"kernel", "tile", "max_splits"}:
            raise ValueError(f"a choice is an object with keys kernel, tile, max_splits; "
                             f"got {d!r:.80}")
        tile = d.get("tile")
        if tile is not None:
            if not (isinstance(tile, list) and len(tile) == 4
                    and all(type(v) is int for v in tile)):
                raise ValueError(f"a tile is [BM, WARPS_M, WARPS_N, BK], got {tile!r:.80}")
            tile = MmaTile(*tile)
        return Choice(d.get("kernel"), tile, d.get("max_splits", MAX_SPLITS))


@dataclass(frozen=True)
class Dispatch:
    """rules: ((largest M, Choice), ...) in increasing M, the last one's bound None (every
    larger M). `source` says where the rule was measured."""

    rules: tuple[tuple[int | None, Choice], ...]
    source: str = ""

    def __post_init__(self) -> None:
        if not self.rules or self.rules[-1][0] is not None:
            raise ValueError("a dispatch needs rules, the last with no bound (None)")
        bounds = [b for b, _ in self.rules[:-1]]
        if any(type(b) is not int or b < 1 for b in bounds) or bounds != sorted(set(bounds)):
            raise ValueError(f"rule bounds must be increasing positive ints, got {bounds}")
        for bound, choice in self.rules:
            limit = ROW_LIMITS.get(choice.kernel)
            if limit is not None and (bound is None or bound > limit):
                raise ValueError(f"kernel {choice.kernel!r} takes at most M = {limit}, "
                                 f"but a rule gives it M up to {bound or 'any'}")

    def choose(self, m: int) -> Choice:
        return next(c for bound, c in self.rules if bound is None or m <= bound)

    def to_json(self) -> dict:
        return {"source": self.source,
                "rules": [{"max_m": b, **c.to_json()} for b, c in self.rules]}

    @staticmethod
    def from_json(d: object) -> Dispatch:
        """Checked like any input: a ValueError says what is wrong."""
        if not isinstance(d, dict) or not isinstance(d.get("rules"), list):
            raise ValueError("a dispatch is an object with a list 'rules'")
        rules = []
        for r in d["rules"]:
            if not isinstance(r, dict) or "max_m" not in r:
                raise ValueError(f"a rule is an object with 'max_m', got {r!r:.80}")
            rest = {key: v for key, v in r.items() if key != "max_m"}
            rules.append((r["max_m"], Choice.from_json(rest)))
        return Dispatch(tuple(rules), str(d.get("source", "")))


DEFAULT = Dispatch(((AUTO_GEMV_DIRECT_MAX_M, Choice("gemv_direct")),
                    (AUTO_MMA_DIRECT_MAX_M, Choice("mma_direct")),
                    (AUTO_MMA_SPLIT_MAX_M, Choice("mma_split")),
                    (None, Choice("dequant"))),
                   source="H100 80GB HBM3, 2026-12-05 (docs/gpu/h100-2026-12-05)")


def choose(m: int, kernel: str = "auto", dispatch: Dispatch | None = None) -> Choice:
    """The choice for M rows: `dispatch` (DEFAULT if None) for "auto"; "auto_direct" =
    gemv_direct at M = 1 and mma_direct up to MMA_DIRECT_AUTO_MAX_M (the prediction before the
    H100 measurement), else as DEFAULT; any other kernel as named."""
    if kernel == "auto":
        return (dispatch or DEFAULT).choose(m)
    if kernel == "auto_direct":
        if m == 1:
            return Choice("gemv_direct")
        return Choice("mma_direct") if m <= MMA_DIRECT_AUTO_MAX_M else choose(m)
    return Choice(kernel)


def resolve(m: int, group_size: int, kernel: str = "auto", tile: MmaTile | None = None,
            max_splits: int = MAX_SPLITS, dispatch: Dispatch | None = None) -> Choice:
    """What api.gemm launches for M rows: `choose`'s kernel; the caller's tile, else the
    choice's where its BK divides group_size (else None: by M); the lower split cap."""
    choice = choose(m, kernel, dispatch)
    if tile is None and choice.tile is not None and group_size % choice.tile.bk == 0:
        tile = choice.tile
    return Choice(choice.kernel, tile if choice.kernel in MMA_KERNELS else None,
                  min(int(max_splits), choice.max_splits))


def from_sweep(ranking: dict[int, list[tuple[str, float]]], choices: dict[int, dict[str, Choice]],
               base: Dispatch = DEFAULT, source: str = "", min_gain: float = MIN_GAIN) -> Dispatch:
    """A dispatch from a sweep's ranking (sweep.ranking: per M, (variant, geometric mean of
    time / best over the shapes), best first) and its variants' choices (sweep.variant_choices
    per M; the variant "awq" is `base` itself). Per M timed, the best variant unless `base`'s
    own is within `min_gain` of it (noise should not move the rule); a timed M's choice covers
    the M above the timed size before it (below the first: above `base`'s last bound under
    it), and an M past the last timed size gets `base`'s. Scores that are not finite numbers
    (a corrupt file) are left out."""
    picked: list[tuple[int, Choice]] = []
    for m in sorted(ranking):
        scores = {name: v for name, v in ranking[m]
                  if isinstance(v, (int, float)) and math.isfinite(v)}
        named = {name: (base.choose(m) if name == "awq" else choices.get(m, {}).get(name))
                 for name in scores}
        named = {name: c for name, c in named.items() if c is not None}
        if not named:
            continue
        best = min(named, key=scores.__getitem__)
        base_score = scores.get("awq", math.inf)
        pick = base.choose(m) if base_score <= scores[best] * (1 + min_gain) else named[best]
        picked.append((m, pick))
    if not picked:
        return base
    first, last = picked[0][0], picked[-1][0]
    rules = ([(b, c) for b, c in base.rules if b is not None and b < first] + picked
             + [(b, c) for b, c in base.rules if b is None or b > last])
    merged: list[tuple[int | None, Choice]] = []
    for bound, choice in rules:  # a run of equal choices is one rule with the run's last bound
        if merged and merged[-1][1] == choice:
            merged[-1] = (bound, choice)
        else:
            merged.append((bound, choice))
    return Dispatch(tuple(merged), source or f"derived from a sweep (base: {base.source})")


def describe(dispatch: Dispatch) -> str:
    """One line per rule: 'M <= 8: mma_direct', 'M <= 64: mma_split 16x256x64 w1x4 splits<=8'."""
    lines, low = [], 1
    for bound, c in dispatch.rules:
        rows = (f"M >= {low}" if bound is None else f"M = {low}" if bound == low
                else f"M {low}..{bound}")
        tile = "" if c.tile is None else (f" {c.tile.bm}x{c.tile.bn}x{c.tile.bk} "
                                          f"w{c.tile.warps_m}x{c.tile.warps_n}")
        splits = "" if c.max_splits == MAX_SPLITS else f" splits<={c.max_splits}"
        lines.append(f"{rows}: {c.kernel}{tile}{splits}")
        low = (bound or 0) + 1
    return "\n".join(lines)
