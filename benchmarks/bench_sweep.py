"""The default sweep, timed whole, against the same runs trained one at a time.

Side by side in one process: (1) `run_sweep` on the packaged default spec (grid, matched-L0
bisection and final runs, evaluation, report, plots; wandb disabled so its ~1 s per run
start-up is not counted for either side); (2) a random sample of the sweep's runs, each
trained and evaluated alone exactly as the sweep does it. Training all ~2,000 alone would
take most of an hour, so the comparison is per run.

    .venv/bin/python benchmarks/bench_sweep.py [--sample 12] [--spec PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sample", type=int, default=12, help="runs trained alone")
    p.add_argument("--spec", default=None, help="sweep spec (default: the packaged one)")
    args = p.parse_args()

    import torch

    from clt_eval.training.config import RunSpec
    from clt_eval.training.experiment import train_group
    from clt_eval.training.sweep import run_sweep
    from clt_eval.training.sweep_spec import load_spec

    spec = load_spec(args.spec)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = run_sweep(spec, Path(tmp), "disabled", progress=False)
        t_sweep = time.perf_counter() - t0
        runs = [RunSpec(**r["spec"]) for r in json.loads(result["sweep"].read_text())["runs"]]
    torch.set_num_threads(1)  # as run_sweep does
    from clt_eval.case_study import load_case_study
    from clt_eval.training.experiment import case_data

    case = load_case_study(spec.case_study)
    model = case.model()
    data = case_data(case, model)
    sample = random.Random(0).sample(runs, min(args.sample, len(runs)))
    t0 = time.perf_counter()
    for s in sample:
        train_group(case, model, [s], spec.train, data)
    t_alone = (time.perf_counter() - t0) / len(sample)
    n = len(runs)
    print(f"default sweep: {n} runs ({len(spec.runs())} grid + {n - len(spec.runs())} "
          f"matched-L0), {spec.train.steps} steps each, 1 thread")
    print(f"sweep, end to end:  {t_sweep:7.1f} s  = {n / t_sweep:6.1f} runs/s "
          f"({t_sweep / n * 1000:.1f} ms per run)")
    print(f"one at a time:      {t_alone * 1000:7.1f} ms per run (train + evaluate, "
          f"{len(sample)} sampled runs)  = {1 / t_alone:6.2f} runs/s")
    print(f"speed-up per run: {t_alone / (t_sweep / n):.1f}x "
          f"(all {n} runs alone would take ~{t_alone * n / 60:.0f} min)")


if __name__ == "__main__":
    main()
