"""Planted bugs the tests must catch: each mutant is applied to a copy of the repo, its tests run,
and it must make them fail ("killed"). A mutant that survives means a test went weak.

    PYTHONPATH=. .venv/bin/python tools/mutants.py            # all (~15 min on 2 cores)
    PYTHONPATH=. .venv/bin/python tools/mutants.py --only clip --list

Each mutant (tools/mutant_list.py) was once a bug no test caught (mutation testing, two rounds
on 2026-12-06); the tests it names were written for it. The repo itself is never edited: its
tracked files are copied to a temporary folder with ../shared linked beside it, as CI has it,
and each mutant's tests must pass there unmutated first.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from mutant_list import MUTANTS, Mutant  # tools/, beside this script

ROOT = Path(__file__).resolve().parents[1]


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
    original = path.read_text(encoding="utf-8")
    if original.count(mutant.old) != 1:
        raise SystemExit(f"{mutant.name}: the text to mutate occurs {original.count(mutant.old)} "
                         f"times in {mutant.file}, not once (the code moved: update the mutant)")
    path.write_text(original.replace(mutant.old, mutant.new), encoding="utf-8")
    try:
        return _pytest(repo, mutant.tests) != 0
    finally:
        path.write_text(original, encoding="utf-8")


def _pytest(repo: Path, tests: tuple[str, ...]) -> int:
    env = {**os.environ, "PYTHONPATH": str(repo)}
    return subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                           *tests], cwd=repo, env=env, capture_output=True, check=False).returncode


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])
    ap.add_argument("--only", default="", help="mutants whose name contains this")
    ap.add_argument("--list", action="store_true", help="print the mutants, run nothing")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTANTS if args.only in m.name]
    if not chosen:  # "0 of 0 killed" and status 0 would pass for a clean run
        ap.error(f"--only {args.only!r}: no mutant's name contains it (--list shows them all)")
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
