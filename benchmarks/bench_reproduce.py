"""Wall time of the main job: `clt-eval reproduce` on its defaults, and optionally `--all`.

Runs the real command in a subprocess (imports and all, as a user sees it), with a fresh
output folder each time, and prints the seconds and the CPU seconds. wandb runs as the
command's default has it (offline runs written to disk) unless ``--wandb-mode`` says
otherwise. Targets: reproduce on defaults under 2 minutes on 2 cores; --all under 15 minutes.

    python benchmarks/bench_reproduce.py                          # defaults only
    python benchmarks/bench_reproduce.py --wandb-mode disabled    # without wandb's cost
    python benchmarks/bench_reproduce.py --all                    # also every case study
    python benchmarks/bench_reproduce.py --versus-threads 1       # also one process, alternated
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLI = [sys.executable, "-m", "clt_eval.training.cli"]


def timed(args: list[str]) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds of the child, last lines of its output)."""
    # --wandb-mode decides, not a WANDB_MODE the caller's shell may set
    env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"} | {"HF_HUB_OFFLINE": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(CLI + args, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(args)}\n{proc.stderr[-2000:]}")
    return wall, cpu, "\n".join(proc.stdout.strip().splitlines()[-40:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--all", action="store_true", help="also time reproduce --all")
    p.add_argument("--wandb-mode", choices=("offline", "disabled"), default="offline",
                   help="offline: the command's default (default); disabled: no wandb runs")
    p.add_argument("--versus-threads", type=int, default=None, metavar="N",
                   help="also time the defaults with --threads N (1: a single process), "
                        "alternating the two, --repeat times each")
    p.add_argument("--repeat", type=int, default=1, help="rounds with --versus-threads")
    args = p.parse_args()
    wandb = ["--wandb-mode", args.wandb_mode]
    root = Path(tempfile.mkdtemp(prefix="bench-reproduce-"))
    try:
        print(f"load average before: {os.getloadavg()[0]:.2f}")
        wall, cpu, tail = timed(["reproduce", "--out", str(root / "default")] + wandb)
        print(tail)
        print(f"\nreproduce (defaults, wandb {args.wandb_mode}): {wall:.1f} s wall, {cpu:.1f} s "
              "CPU (target < 120 s wall)")
        if args.versus_threads is not None:
            versus(root, wandb, args.versus_threads, args.repeat, first=(wall, cpu))
        if args.all:
            wall, cpu, tail = timed(["reproduce", "--all", "--out", str(root / "all")] + wandb)
            print((root / "all" / "summary.md").read_text())
            print(f"reproduce --all: {wall:.1f} s wall, {cpu:.1f} s CPU (target < 900 s)")
        print(f"load average after: {os.getloadavg()[0]:.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def versus(root: Path, wandb: list[str], threads: int, repeat: int, first) -> None:
    """Defaults and --threads N alternately (the first default run is ``first``), so that a
    change in the machine's speed falls on both."""
    runs: dict[str, list] = {"auto": [first], str(threads): []}
    for i in range(repeat):
        for name in ([str(threads), "auto"] if i else [str(threads)]):
            out = root / f"{name}-{i}"
            runs[name].append(timed(["reproduce", "--out", str(out), "--threads", name]
                                    + wandb)[:2])
            shutil.rmtree(out, ignore_errors=True)
    for name, rs in runs.items():
        walls = ", ".join(f"{w:.1f}" for w, _ in rs)
        cpus = ", ".join(f"{c:.1f}" for _, c in rs)
        print(f"--threads {name}: wall {walls} s; CPU {cpus} s")
    mean = {k: sum(w for w, _ in v) / len(v) for k, v in runs.items()}
    print(f"mean wall: auto {mean['auto']:.1f} s, --threads {threads} "
          f"{mean[str(threads)]:.1f} s (ratio {mean[str(threads)] / mean['auto']:.2f})")


if __name__ == "__main__":
    main()
