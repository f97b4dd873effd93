"""The default sweep, timed whole, against the same runs trained one at a time.

Side by side in one process: (1) `run_sweep` on the packaged default spec (grid, matched-L0
bisection and final runs, evaluation, report, plots; wandb disabled so its start-up per
wandb run is not counted for either side); (2) a random sample of the sweep's runs, each
trained and evaluated alone exactly as the sweep does it. Training all ~2,000 alone would
take hours, so the comparison is per run. One thread on both sides.

Both sides are timed warm: the case study's model is built and one short run trained before
either clock starts, so the sweep is not charged for the process's one-time start-up
(importing transformer_lens, loading compiled kernels), which the runs alone, timed after
it, never paid. The sampled runs are each timed twice, once before the sweep and once after,
and the two averaged, so a machine whose speed drifts during the several minutes of the
sweep biases neither side. Besides wall-clock time it prints the same ratios in CPU-seconds,
which leave out the time the process waited while other jobs held the cores.

    .venv/bin/python benchmarks/bench_sweep.py [--sample 12] [--spec PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
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

    from clt_eval.case_study import load_case_study
    from clt_eval.training.config import RunSpec
    from clt_eval.training.experiment import case_data, train_group
    from clt_eval.training.sweep import run_sweep
    from clt_eval.training.sweep_spec import load_spec

    spec = load_spec(args.spec)
    # One thread for both sides, as `--threads auto` gives the toys (a second thread only
    # waits on their tiny products).
    torch.set_num_threads(1)
    case = load_case_study(spec.case_study)
    model = case.model()
    data = case_data(case, model)
    warm = spec.runs()[0]
    train_group(case, model, [warm], dataclasses.replace(spec.train, steps=5), data)
    # Sampled from the grid, which has every kind of run the sweep trains (its matched-L0
    # runs are grid kinds at other λ, and exist only once the sweep has run).
    sample = random.Random(0).sample(spec.runs(), min(args.sample, len(spec.runs())))
    t_before, c_before = _alone(case, model, sample, spec.train, data)
    with tempfile.TemporaryDirectory() as tmp:
        t0, c0 = time.perf_counter(), _cpu()
        result = run_sweep(spec, Path(tmp), "disabled", progress=False)
        t_sweep, c_sweep = time.perf_counter() - t0, _cpu() - c0
        saved = json.loads(result["sweep"].read_text())
        runs = [RunSpec(**r["spec"]) for r in saved["runs"]]
        unused = len(trained_ahead_unused(saved, spec))
    t_after, c_after = _alone(case, model, sample, spec.train, data)
    t_alone, c_alone = (t_before + t_after) / 2, (c_before + c_after) / 2
    n = len(runs)
    print(f"default sweep: {n} runs ({len(spec.runs())} grid + {n - len(spec.runs())} "
          f"matched-L0), {spec.train.steps} steps each, 1 thread")
    print(f"sweep, end to end:  {t_sweep:7.1f} s  = {n / t_sweep:6.1f} runs/s "
          f"({t_sweep / n * 1000:.1f} ms per run)")
    print(f"one at a time:      {t_alone * 1000:7.1f} ms per run (train + evaluate, "
          f"{len(sample)} sampled runs, each timed twice)  = {1 / t_alone:6.2f} runs/s; "
          f"{t_before * 1000:.1f} ms before the sweep, {t_after * 1000:.1f} ms after")
    print(f"speed-up per run: {t_alone / (t_sweep / n):.1f}x "
          f"(all {n} runs alone would take ~{t_alone * n / 60:.0f} min)")
    # The search trains two bisection steps per ensemble, and with them midpoints it then
    # does not take: counting only the runs a plain search would train is the fairer ratio.
    print(f"speed-up over the {n - unused} runs a one-step-at-a-time search would train "
          f"({unused} trained ahead and not used): {t_alone * (n - unused) / t_sweep:.1f}x")
    # CPU-seconds leave out the time this process waited for a core that other jobs held,
    # which on a shared machine can slow one side and not the other.
    print(f"per CPU-second: sweep {c_sweep:.1f} s, a run alone {c_alone * 1000:.1f} ms "
          f"({c_before * 1000:.1f} before, {c_after * 1000:.1f} after): speed-up per run "
          f"{c_alone / (c_sweep / n):.1f}x, over the plain search's runs "
          f"{c_alone * (n - unused) / c_sweep:.1f}x")


def _alone(case, model, specs, train, data) -> tuple[float, float]:
    """Wall-clock and CPU seconds per run, each trained and evaluated alone exactly as the
    sweep does it."""
    from clt_eval.training.experiment import train_group

    t0, c0 = time.perf_counter(), _cpu()
    for s in specs:
        train_group(case, model, [s], train, data)
    n = max(1, len(specs))
    return (time.perf_counter() - t0) / n, (_cpu() - c0) / n


def _cpu() -> float:
    """CPU seconds of this process and of its finished children (any worker processes)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def trained_ahead_unused(saved: dict, spec) -> list[str]:
    """Run ids of search points the bisection trained ahead and then did not take: runs
    that are neither grid points nor final runs and whose λ no search point lists."""
    from clt_eval.training.config import RunSpec
    from clt_eval.training.experiment import canonical, run_id
    from clt_eval.training.matched_l0 import setting_key

    grid = {run_id(g) for s in spec.runs() for g in (s, canonical(s))}
    tried, finals = set(), set()
    for p in (saved.get("matched_l0") or {}).get("points", []):
        finals.update(p.get("run_ids", []))
        key = (json.dumps(p["setting"], sort_keys=True), p["arch"])
        tried.update((key, float(pt[0])) for pt in p.get("tried", []) + p.get("grid", []))
    out = []
    for r in saved["runs"]:
        s = RunSpec(**r["spec"])
        key = (json.dumps(dict(setting_key(s)), sort_keys=True), s.arch)
        if r["run_id"] in grid or r["run_id"] in finals or (key, s.sparsity_coef) in tried:
            continue
        out.append(r["run_id"])
    return out


if __name__ == "__main__":
    main()
