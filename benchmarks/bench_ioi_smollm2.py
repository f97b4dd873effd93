"""The MLP-in-the-middle table on SmolLM2-135M's IOI prompts, with its wall time.

At one layer (default 20 of 30), patching the last token of held-out base prompts from their
source prompts: the whole MLP (hidden activations, ``mlp.hook_post``), a 1-d DAS direction
among them, that direction's W_out row-space part alone and kernel part alone, and a 1-d DAS
direction in the residual stream after the MLP (``hook_resid_post``). Prints the table
(FLDD, interchange accuracy), the model's clean IOI accuracy, the sizes and the wall time.
The paper's GPT-2 small figures (layer-8 MLP) are printed beside it for reference.
``--scan 14 16 18 20 22 24`` first prints whole-residual and whole-MLP patches at those
layers (on the test pairs), to see where the last token's residual stream carries the
feature. Target: under 20 minutes on 2 CPU cores. Needs ``make smollm2``.

Layer 20 by default: with the default "order" (BAB) sources, patching the whole residual
stream at the last token does nothing up to layer 18 (the feature has not reached the last
token yet) and reverses the answer at layers 20-22 (~120% FLDD); from layer 24 on the last
token already holds the answer name itself. Layer 20 is where SmolLM2 sits as GPT-2 small's
layer 8 does in the paper.

One torch thread by default: with the machine shared, one thread ran these small matrices
faster than two (34 vs 22 GFLOP/s on a 512x576x1536 product, measured).

    .venv/bin/python benchmarks/bench_ioi_smollm2.py [--layer 20] [--n-train 256]
        [--n-test 128] [--steps 200] [--batch-size 32] [--source order] [--threads 1]
        [--scan LAYER ...] [--json out.json]
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

# Makelov, Lange & Nanda (ICLR 2024), GPT-2 small, IOI, layer-8 MLP / residual stream.
PAPER = {"mlp_whole": ("−8%", "0.0%"), "mlp_das": ("46.7%", "4.2%"),
         "mlp_das_rowspace": ("13.5%", "–"), "mlp_das_kernel": ("0.0%", "–"),
         "resid_das": ("140.7%", "74.8%")}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layer", type=int, default=20)
    p.add_argument("--n-train", type=int, default=256)
    p.add_argument("--n-test", type=int, default=128)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--source", choices=("order", "roles"), default="order")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--scan", type=int, nargs="*", default=[])
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()

    started = time.perf_counter()
    import torch

    torch.set_num_threads(args.threads)
    from clt_eval.lm import ioi
    from clt_eval.lm.models import load_model

    model = load_model("smollm2-135m")
    loaded = time.perf_counter()
    data = ioi.build_ioi_for_model(model, args.n_train + args.n_test, source=args.source,
                                   seed=args.seed)
    train, test = data.split(args.n_train, seed=args.seed)
    print(f"SmolLM2-135M loaded in {loaded - started:.0f} s; {len(train)} train / {len(test)} "
          f"test pairs of {data.base_NT.shape[1]} tokens, source prompts '{args.source}', "
          f"e.g.\n  base:   {test.base_text[0]!r}\n  source: {test.source_text[0]!r}",
          flush=True)

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {msg}", flush=True)

    scan = []
    if args.scan:
        scan = ioi.whole_patch_scan(model, test, args.scan)
        print("\n| layer | whole resid_post FLDD | IA | whole MLP FLDD | IA |\n"
              "| ---: | ---: | ---: | ---: | ---: |")
        for r in scan:
            print(f"| {r['layer']} | {100 * r['resid_whole_fldd']:.1f}% | "
                  f"{100 * r['resid_whole_interchange_accuracy']:.1f}% | "
                  f"{100 * r['mlp_whole_fldd']:.1f}% | "
                  f"{100 * r['mlp_whole_interchange_accuracy']:.1f}% |")
        log("scan done")

    table = ioi.ioi_table(model, train, test, layer=args.layer, steps=args.steps,
                          batch_size=args.batch_size, lr=args.lr, seed=args.seed, log=log)
    wall = time.perf_counter() - started

    print(f"\n## IOI on SmolLM2-135M, layer {table.layer} (last token)\n")
    print("| component | hook | FLDD | interchange accuracy | n | paper (GPT-2 small, L8) |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    for r in table.rows:
        paper = " / ".join(PAPER[r["component"]])
        print(f"| {r['component']} | `{r['hook']}` | {100 * r['fldd']:.1f}% | "
              f"{100 * r['interchange_accuracy']:.1f}% | {r['n']} | {paper} |")
    f = table.figures
    print(f"\nclean accuracy (logit IO > logit S, test base prompts): {table.clean_accuracy:.3f}"
          f"; mean clean LD {table.clean_logit_diff:.3f}; source prompts answered right: "
          f"{table.source_accuracy:.3f}")
    print(f"layer {table.layer}; {table.n_train} train / {table.n_test} test pairs; DAS: "
          f"{args.steps} steps, batch {args.batch_size}, lr {args.lr} (linear decay to 0.1x); "
          f"threads {args.threads}")
    print(f"MLP DAS direction: |row part| {f['norm_row']:.3f}, |kernel part| "
          f"{f['norm_kernel']:.3f} (paper: 0.753 / 0.657); mean |⟨source − base, e⟩| along "
          f"v {f['mean_abs_diff_v']:.4f}, row {f['mean_abs_diff_row']:.4f}, kernel "
          f"{f['mean_abs_diff_kernel']:.4f}; std of the base projection along v "
          f"{f['std_base_v']:.4f}, row {f['std_base_row']:.4f}, kernel "
          f"{f['std_base_kernel']:.4f}")
    print(f"whole resid_post patch at this layer (the ceiling at this position): FLDD "
          f"{100 * f['resid_whole_fldd']:.1f}%, interchange accuracy "
          f"{100 * f['resid_whole_interchange_accuracy']:.1f}%")
    print(f"DAS loss first → last: MLP {f['das_mlp_loss_first']:.3f} → "
          f"{f['das_mlp_loss_last']:.3f}; residual {f['das_resid_loss_first']:.3f} → "
          f"{f['das_resid_loss_last']:.3f}")
    print(f"wall time {wall:.0f} s ({wall / 60:.1f} min; model load {loaded - started:.0f} s)")
    if args.json:
        out = table.as_dict() | {"wall_s": wall, "load_s": loaded - started,
                                 "steps": args.steps, "batch_size": args.batch_size,
                                 "lr": args.lr, "threads": args.threads, "seed": args.seed,
                                 "scan": scan}
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
