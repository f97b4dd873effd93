"""Ensemble trainer vs training the same runs one at a time, side by side in one process.

The runs come from the ReLU grid of the headline experiment on the Boolean two-step toy:
l1 and tanh × 3 decoder norms × 3 λ × PLT/CLT × 10 seeds = 360 runs; ``--runs`` draws a
random sample of them to train as one ensemble, and ``--sample`` of those are trained alone
too. Both ways must give the same weights: an ensemble is a faster way to do the same
training, not a different one. Each is timed in two modes:

- exact (the default): every run's arithmetic is independent of the ensemble, so a run
  trains bit for bit as it does alone (max |Δ| must print 0);
- fast (``train(..., exact=False)``): BLAS's batched matmuls and the fused Adam kernel, the
  trainer as it was before the runs were made independent; rounding then depends on the
  ensemble and is amplified through training.

    .venv/bin/python benchmarks/bench_ensemble.py [--runs 30] [--sample 8] [--steps 1000]
                                                  [--threads 2] [--reproduce]
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import subprocess
import sys
import tempfile
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LAMBDAS = {"l1": (0.03, 0.3, 3.0), "tanh": (0.01, 0.1, 1.0)}


def _largest_difference(a, b) -> float:
    """max |a - b| over two one-run transcoders' tensors, which must have the same layout
    (``select`` stores a run as it is stored alone: a PLT keeps only its own-layer blocks)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys(), (sa.keys(), sb.keys())
    diffs = [0.0]
    for n, t in sa.items():
        assert t.shape == sb[n].shape, (n, t.shape, sb[n].shape)
        if t.is_floating_point():
            diffs.append(float((t - sb[n]).abs().max()))
    return max(diffs)


def grid():
    from clt_eval.training.config import RunSpec

    return [RunSpec(arch=arch, penalty=pen, decoder_norm=norm, sparsity_coef=lam, seed=seed)
            for arch, pen, norm, seed in itertools.product(
                ("plt", "clt"), LAMBDAS, ("concatenated", "summed", "per_block"), range(10))
            for lam in LAMBDAS[pen]]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=30, help="runs in the ensemble (<= 360)")
    p.add_argument("--sample", type=int, default=8, help="of those, runs also trained alone")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reproduce", action="store_true", help="also time `clt-eval reproduce`")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    import clt_eval.case_studies  # noqa: F401  (registers the built-in case studies)
    from clt_eval.case_study import load_case_study
    from clt_eval.training.config import TrainConfig
    from clt_eval.training.experiment import case_data
    from clt_eval.training.trainer import full_batches, init_b_dec, train
    from clt_eval.transcoder import Transcoder

    case = load_case_study("boolean_two_step")
    x, y = case_data(case, case.model())
    rng = random.Random(0)
    specs = rng.sample(grid(), args.runs)
    sample = sorted(rng.sample(range(len(specs)), min(args.sample, len(specs))))
    cfg = TrainConfig(steps=args.steps, lr=0.02, log_every=0)

    def fit(group, exact):
        tc = Transcoder([s.transcoder_config(case.d_model, case.n_layers) for s in group],
                        seeds=[s.seed for s in group])
        init_b_dec(tc, y)
        coefs = torch.tensor([s.sparsity_coef for s in group])
        t0 = time.perf_counter()
        train(tc, [s.loss_config() for s in group], coefs, full_batches(x, y), cfg,
              exact=exact)
        return tc, (time.perf_counter() - t0) / args.steps

    print(f"{len(specs)} runs of the ReLU grid (l1/tanh x 3 norms x 3 lambda x PLT/CLT x 10 "
          f"seeds), {len(sample)} also alone; {args.steps} steps, {args.threads} threads")
    print(f"{'mode':6} {'ensemble ms/step':>17} {'one run ms/step':>16} {'speed-up/run':>13} "
          f"{'max |delta| ensemble vs alone':>30}")
    for mode, exact in (("exact", True), ("fast", False)):
        fit(specs[:2], exact)  # warm-up: first-call overheads are not part of a measurement
        ens, t_ens = fit(specs, exact)
        singles = [fit([specs[i]], exact) for i in sample]
        t_one = sum(t for _, t in singles) / len(singles)
        diff = max(_largest_difference(ens.select([i]), one)
                   for i, (one, _) in zip(sample, singles, strict=True))
        print(f"{mode:6} {t_ens * 1e3:17.2f} {t_one * 1e3:16.2f} "
              f"{t_one * len(specs) / t_ens:12.1f}x {diff:30.3g}")
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
