"""Time DAS on the MLP-in-the-middle toy and print what the illusion check sees.

For each width (1 = the distilled model, 64 = spread over many units): wall time of
``train_das`` (k = 1, the default 300 steps, full batch over the 72 pairs), then the fraction
of the counterfactual change achieved by patching the learned direction, the whole MLP, the
direction's row-space and kernel parts alone, its interchange accuracy, and the verdict.
Target: under 10 s per DAS run on 2 cores.

    .venv/bin/python benchmarks/bench_das.py [--widths 1 64] [--steps 300] [--seed 0]
        [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--widths", type=int, nargs="+", default=[1, 64])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    # Tiny tensors: a second thread only adds OpenMP synchronisation (57 vs ~7 ms per step
    # measured here with the machine shared; the same effect the test suite avoids).
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from clt_eval.case_studies.mlp_in_the_middle import MlpInTheMiddle
    from clt_eval.illusion import illusion_check
    from clt_eval.patching import interchange_accuracy, mse_loss, run_patched, train_das

    rows = []
    for width in args.widths:
        case = MlpInTheMiddle(width=width)
        model = case.model()
        base, source = case.pairs()
        cf = case.counterfactual(base, source)
        started = time.perf_counter()
        result = train_das(model, case.mlp_hook, base, source, mse_loss(case.output_value, cf),
                           steps=args.steps, seed=args.seed)
        seconds = time.perf_counter() - started
        v = result.V_DK[:, 0]
        verdict = illusion_check(model, case.mlp_hook, v, base, source, cf, case.output_value,
                                 W_out=case.mlp_W_out())
        patched = case.output_value(run_patched(model, base, source, case.mlp_hook, v))
        f = verdict.figures
        rows.append({
            "width": width, "das_seconds": round(seconds, 2), "steps": args.steps,
            "ms_per_step": round(1000 * seconds / args.steps, 2),
            "final_loss": result.final_loss,
            "cos_to_known_illusory": round(abs(float(v @ case.illusory_direction())), 4),
            "fraction_das": round(f["fraction_v"], 4),
            "fraction_whole_mlp": round(f["fraction_whole"], 4),
            "fraction_row_part": round(f["fraction_row"], 4),
            "fraction_kernel_part": round(f["fraction_kernel"], 4),
            "norm_row": round(f["norm_row"], 3), "norm_kernel": round(f["norm_kernel"], 3),
            "interchange_accuracy@0.1": interchange_accuracy(patched, cf, atol=0.1),
            "illusion": verdict.illusion, "reason": verdict.reason,
        })
        print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
