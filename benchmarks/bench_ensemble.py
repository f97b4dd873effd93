"""Ensemble trainer vs training the same runs one at a time, side by side in one process.

The ensemble is the largest one `clt-eval reproduce` trains: every ReLU run of its default
grid (l1 and tanh × 3 decoder norms × 3 λ × PLT/CLT × 10 seeds = 360 runs). Training all 360
alone would take minutes, so a random sample of them is trained alone and the comparison is
per run. Both ways must give the same weights: an ensemble is a faster way to do the same
training, not a different one. --reproduce also times `clt-eval reproduce` on its defaults.

    .venv/bin/python benchmarks/bench_ensemble.py [--sample 24] [--steps 1000] [--reproduce]
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sample", type=int, default=24, help="runs trained alone")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--reproduce", action="store_true", help="also time `clt-eval reproduce`")
    args = p.parse_args()
    torch.set_num_threads(2)

    from clt_eval.case_study import load_case_study
    from clt_eval.transcoder import Transcoder
    from training.config import ReproduceConfig, TrainConfig
    from training.experiment import case_data
    from training.reproduce import build_specs
    from training.trainer import full_batches, init_b_dec, train

    case = load_case_study("boolean_two_step")
    x, y = case_data(case, case.model())
    specs = [s for _, s in build_specs(ReproduceConfig()) if s.resolved_activation == "relu"]
    sample = random.Random(0).sample(range(len(specs)), args.sample)
    cfg = TrainConfig(steps=args.steps, log_every=0)

    def fit(group):
        tc = Transcoder([s.transcoder_config(case.d_model, case.n_layers) for s in group],
                        seeds=[s.seed for s in group])
        init_b_dec(tc, y)
        coefs = torch.tensor([s.sparsity_coef for s in group])
        train(tc, [s.loss_config() for s in group], coefs, full_batches(x, y), cfg)
        return tc

    fit(specs[:2])  # warm-up: first-call overheads are not part of either measurement
    t0 = time.perf_counter()
    ens = fit(specs)
    t_ens = time.perf_counter() - t0
    t0 = time.perf_counter()
    singles = [fit([specs[i]]) for i in sample]
    t_one = time.perf_counter() - t0
    diff = max(float((ens.select([i]).W_dec - tc.W_dec).abs().max().detach())
               for i, tc in zip(sample, singles, strict=True))
    n, m = len(specs), len(sample)
    per_ens, per_one = t_ens / n, t_one / m
    print(f"ensemble: {n} runs (l1/tanh x 3 norms x 3 lambda x PLT/CLT x 10 seeds), "
          f"{args.steps} steps, 2 threads")
    print(f"ensemble:       {t_ens:7.2f} s for {n} runs, {per_ens * 1000:7.1f} ms per run")
    print(f"one at a time:  {t_one:7.2f} s for {m} runs, {per_one * 1000:7.1f} ms per run")
    print(f"speed-up per run: {per_one / per_ens:.1f}x")
    print(f"max |W_dec(ensemble) - W_dec(alone)| over runs: {diff:.2e}")
    if args.reproduce:
        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            subprocess.run([os.path.join(os.path.dirname(sys.executable), "clt-eval"),
                            "reproduce", "--out", out, "--wandb-mode", "offline"],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            print(f"clt-eval reproduce (defaults, incl. start-up): "
                  f"{time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
