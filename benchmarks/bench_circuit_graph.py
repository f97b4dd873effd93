"""Attribution-graph scoring (``circuit_scores``) vs the rest of ``evaluate``, side by side.

A 30-run ensemble (PLT and CLT alternating, random initialisation) on the Boolean two-step
toy. ``evaluate`` is timed without the graph scores (``graph=False``) and with them; the
graph scores are also timed alone, on the activations and matches ``evaluate`` already
computes. The target: graph scoring adds under 20% to evaluation time. Median of --repeats
after one warm-up call each.

    .venv/bin/python benchmarks/bench_circuit_graph.py [--runs 30] [--features 16]
        [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up: first-call overheads belong to neither measurement
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--features", type=int, default=16, help="features per layer")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1,
                   help="1 by default: on 2 shared cores, 2 threads ran 10x slower here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    import clt_eval.case_studies  # noqa: F401  (registers the built-in case studies)
    from clt_eval.case_study import load_case_study
    from clt_eval.circuit_graph import circuit_scores
    from clt_eval.config import TranscoderConfig
    from clt_eval.evaluate import _recovery, evaluate
    from clt_eval.replacement import collect_mlp_io
    from clt_eval.transcoder import Transcoder

    case = load_case_study("boolean_two_step")
    model = case.model()
    cfgs = [TranscoderConfig(d_model=case.d_model, n_layers=case.n_layers,
                             n_features=args.features, arch=("plt", "clt")[r % 2])
            for r in range(args.runs)]
    tc = Transcoder(cfgs, seeds=list(range(args.runs))).eval()
    gt = case.ground_truth()
    with torch.no_grad():
        x, _, cache = collect_mlp_io(model, case.inputs(), case.input_hooks,
                                     case.output_hooks, [g.hook for g in gt])
        out = tc(x)
        matches = _recovery(tc, out, gt, cache)["matches"]

    t_eval = median_time(lambda: evaluate(case, tc, model, graph=False), args.repeats)
    t_both = median_time(lambda: evaluate(case, tc, model, graph=True), args.repeats)
    t_graph = median_time(lambda: circuit_scores(case, tc, x, out.acts_RBLF, matches),
                          args.repeats)
    print(f"{args.runs} runs x {case.n_layers} layers x {args.features} features, "
          f"{len(case.inputs())} samples, {args.threads} thread(s), median of {args.repeats}")
    print(f"evaluate(graph=False):  {t_eval * 1000:8.1f} ms")
    print(f"circuit_scores alone:   {t_graph * 1000:8.1f} ms")
    print(f"evaluate(graph=True):   {t_both * 1000:8.1f} ms")
    print(f"ratio circuit_scores / evaluate(graph=False): {t_graph / t_eval:.3f} (target < 0.20)")


if __name__ == "__main__":
    main()
