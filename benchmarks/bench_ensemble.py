"""Ensemble trainer vs training the same runs one at a time, side by side in one process.

Prints seconds per run for both ways and the speed-up, and checks that both ways give the
same weights (an ensemble is a faster way to do the same training, not a different one).
Optionally (--reproduce) times the whole `clt-eval reproduce` job on its defaults.

    .venv/bin/python benchmarks/bench_ensemble.py [--runs-per-arch 20] [--steps 1000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs-per-arch", type=int, default=20)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--reproduce", action="store_true", help="also time `clt-eval reproduce`")
    args = p.parse_args()
    torch.set_num_threads(2)

    import case_studies  # noqa: F401
    from clt_eval.case_study import load_case_study
    from clt_eval.transcoder import Transcoder
    from training.config import RunSpec, TrainConfig
    from training.experiment import case_data
    from training.trainer import full_batches, init_b_dec, train

    case = load_case_study("boolean_two_step")
    x, y = case_data(case, case.model())
    lams = [0.1, 0.3]
    specs = [RunSpec(arch=a, penalty="tanh", decoder_norm="concatenated", sparsity_coef=lam,
                     seed=s) for a in ("plt", "clt") for lam in lams
             for s in range(args.runs_per_arch // len(lams))]
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
    singles = [fit([s]) for s in specs]
    t_one = time.perf_counter() - t0
    diff = max(float((ens.select([i]).W_dec - tc.W_dec).abs().max().detach())
               for i, tc in enumerate(singles))
    n = len(specs)
    print(f"runs: {n} (tanh, concatenated; PLT and CLT), steps: {args.steps}, threads: 2")
    print(f"ensemble:       {t_ens:7.2f} s total, {t_ens / n * 1000:7.1f} ms per run")
    print(f"one at a time:  {t_one:7.2f} s total, {t_one / n * 1000:7.1f} ms per run")
    print(f"speed-up per run: {t_one / t_ens:.1f}x")
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
