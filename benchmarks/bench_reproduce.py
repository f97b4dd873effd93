"""Wall time of the main job: `clt-eval reproduce` on its defaults, and optionally `--all`.

Runs the real command in a subprocess (imports and all, as a user sees it), with wandb
disabled and a fresh output folder each time, and prints the seconds and the CPU seconds.
Targets: reproduce on defaults under 2 minutes on 2 cores; --all under 15 minutes.

    python benchmarks/bench_reproduce.py            # defaults only
    python benchmarks/bench_reproduce.py --all      # also every case study
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
    env = os.environ | {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
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
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-reproduce-"))
    try:
        print(f"load average before: {os.getloadavg()[0]:.2f}")
        wall, cpu, tail = timed(["reproduce", "--out", str(root / "default"),
                                 "--wandb-mode", "disabled"])
        print(tail)
        print(f"\nreproduce (defaults): {wall:.1f} s wall, {cpu:.1f} s CPU "
              f"(target < 120 s wall)")
        if args.all:
            wall, cpu, tail = timed(["reproduce", "--all", "--out", str(root / "all"),
                                     "--wandb-mode", "disabled"])
            print((root / "all" / "summary.md").read_text())
            print(f"reproduce --all: {wall:.1f} s wall, {cpu:.1f} s CPU (target < 900 s)")
        print(f"load average after: {os.getloadavg()[0]:.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
