"""What the command line's subcommands share: model arguments, dtypes, loading."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="HF folder, .gguf file, llama2.c .bin, or 'default' "
                        "(SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                   help="weights and activations (default: float32)")


def command_line_text(value: str) -> str:
    """argparse type of a text argument (--prompt): Python decodes arguments with the locale's
    encoding, so under a non-UTF-8 one (LC_ALL=C with PYTHONUTF8=0) "café" arrives as
    'caf\\udcc3\\udca9', surrogate escapes a tokenizer cannot take. Such an argument is read as
    the UTF-8 its bytes are (bytes that are not UTF-8 become U+FFFD); one without escapes (all
    of it decoded by the locale) is kept as it is."""
    if not any("\udc80" <= ch <= "\udcff" for ch in value):
        return value
    return os.fsencode(value).decode("utf-8", errors="replace")


# Counts past this are typos, and torch cannot take them (a TypeError, not a message).
COUNT_LIMIT = 2**31 - 1


def positive(name: str, value: int | None, least: int = 1) -> None:
    """ValueError unless value (a count from the command line) is None or in least..2**31-1."""
    if value is not None and not least <= value <= COUNT_LIMIT:
        raise ValueError(f"{name} must be at least {least} and at most {COUNT_LIMIT}, got {value}")


SEED_LIMIT = 2**64 - 1  # torch.Generator.manual_seed's largest


def seed(text: str) -> int:
    """argparse type of --seed: an integer 0..2**64-1 (past it torch says only "Overflow when
    unpacking long long")."""
    value = int(text)
    if not 0 <= value <= SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"a seed is 0 ... 2**64-1, got {text}")
    return value


def load(args: argparse.Namespace, path: str | None = None):
    from awq_ref.loaders import load_config, load_model

    path = path or args.model
    config = load_config(path)
    if config is not None:
        check_host_memory(f"--model {path} in {args.dtype}",
                          {"weights": weights_bytes(config, args)}, weight_hints(args))
    return load_model(path, device=args.device, dtype=DTYPES[args.dtype])


def weights_bytes(config, args: argparse.Namespace) -> int:
    """Host memory the model's weights take at least once loaded: every weight (config's
    weight_count) in --dtype on the CPU; 0 on a GPU, where they go (torch's out-of-memory error
    is a message there; the kernel's OOM killer ends a process without one)."""
    if torch.device(args.device).type != "cpu":
        return 0
    return config.weight_count() * DTYPES[args.dtype].itemsize


def weight_hints(args: argparse.Namespace) -> list[str]:
    return ["--dtype bfloat16 (half the weights)"] if DTYPES[args.dtype].itemsize == 4 else []


def check_host_memory(subject: str, needs: dict[str, int], hints: list[str]) -> None:
    """ValueError naming each need (GB) when together they pass the free host memory (checked
    before loading: past it, the kernel's OOM killer would end the run, and its neighbours,
    without a word)."""
    free = available_memory_bytes()
    if free is None or sum(needs.values()) <= free:
        return
    parts = " and ".join(f"{what} about {_size(n)}" for what, n in needs.items() if n)
    hint = "; try " + ", ".join(hints) if hints else ""
    raise ValueError(f"{subject}: {parts}, more than the {_size(free)} free here{hint}")


def _size(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def warn_past_context(config, positions: int, what: str) -> None:
    """A note on stderr when a run goes past the context the model (its LlamaConfig) was trained
    for: allowed (RoPE runs on), but its quality there is not the model's."""
    trained = config.max_position_embeddings
    if positions > trained:
        print(f"note: {what}: {positions} positions, past this model's trained context of "
              f"{trained} (max_position_embeddings)", file=sys.stderr)


def available_memory_bytes(root: Path = Path("/")) -> int | None:
    """What can be allocated without swapping or the OOM killer: /proc/meminfo's MemAvailable,
    lowered to the memory cgroup's headroom where a container or job sets a limit (docker
    --memory, Kubernetes, Slurm: the host's free memory is not this process's) and to the
    address space left under `ulimit -v` (RLIMIT_AS); None where none is known (not Linux).
    `root`: the file system's root (tests give a fake one)."""
    known = [v for v in (_mem_available(root), _cgroup_headroom(root),
                         _address_space_left(root)) if v is not None]
    return min(known) if known else None


def _address_space_left(root: Path) -> int | None:
    """RLIMIT_AS's soft limit (/proc/self/limits) - this process's VmSize; None if unlimited."""
    try:
        limit = next(line.split()[3] for line in
                     (root / "proc" / "self" / "limits").read_text().splitlines()
                     if line.startswith("Max address space"))
        if limit == "unlimited":
            return None
        size = next(int(line.split()[1]) * 1024 for line in
                    (root / "proc" / "self" / "status").read_text().splitlines()
                    if line.startswith("VmSize:"))
        return max(0, int(limit) - size)
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _mem_available(root: Path) -> int | None:
    try:
        for line in (root / "proc" / "meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# Per cgroup version: the mount, then the limit, usage and memory.stat's reclaimable page cache
CGROUP_MEMORY = {"v2": ("sys/fs/cgroup", "memory.max", "memory.current", "inactive_file"),
                 "v1": ("sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.usage_in_bytes",
                        "total_inactive_file")}


def _cgroup_headroom(root: Path) -> int | None:
    """The least limit - (usage - inactive page cache) of this process's memory cgroup and its
    parents up to the mount (a Slurm job or systemd slice sets the limit above the task's own
    cgroup), v2 or v1's memory controller; None without a limit. /proc/self/cgroup names the
    cgroup; where it is not under the mount (a container's namespaced mount), the mount's root
    is this cgroup."""
    try:
        lines = (root / "proc" / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None
    headrooms = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        version = "v2" if controllers == "" else "v1" if "memory" in controllers.split(",") \
            else None
        if version is None:
            continue
        mount, limit_name, usage_name, cache_name = CGROUP_MEMORY[version]
        leaf = root / mount / path.lstrip("/")
        if not (leaf / limit_name).is_file():
            leaf = root / mount
        for folder in [leaf, *(p for p in leaf.parents if root / mount in (p, *p.parents))]:
            headroom = _headroom(folder, limit_name, usage_name, cache_name)
            if headroom is not None:
                headrooms.append(headroom)
    return min(headrooms) if headrooms else None


def _headroom(folder: Path, limit_name: str, usage_name: str, cache_name: str) -> int | None:
    """One cgroup folder's limit - (usage - inactive page cache), None without a limit."""
    try:
        limit = (folder / limit_name).read_text().strip()
        usage = int((folder / usage_name).read_text())
        stat = dict(line.split()[:2] for line in
                    (folder / "memory.stat").read_text().splitlines() if " " in line)
    except (OSError, ValueError):
        return None
    if limit == "max" or not limit.isdigit() or int(limit) >= 2**60:  # v1: "unlimited"
        return None
    return max(0, int(limit) - usage + int(stat.get(cache_name, 0)))

