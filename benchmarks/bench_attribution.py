"""Time an attribution graph for one prompt: the tiny test model by default, SmolLM2-135M with
``--model smollm2-135m``.

The transcoder is ``--transcoder DIR`` (any folder ``clt_eval.formats.load_any`` reads), else
the newest one under ``runs/smollm2/`` for SmolLM2, else a randomly initialised
CLT of the given shape whose encoder biases are set so that about ``--l0`` features per layer
fire on each token of the prompt (a random ReLU CLT with zero biases fires half its features,
which would be a graph no trained CLT makes). The report says which one was used.

    .venv/bin/python benchmarks/bench_attribution.py [--model smollm2-135m] [--tokens 32]
        [--layers 10 11 12 13] [--features 512] [--l0 16] [--batch-size 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TEXT = ("In the beginning God created the heavens and the earth. The earth was formless and "
        "empty. Darkness was on the surface of the deep and God's Spirit was hovering over the "
        "surface of the waters. God said, \"Let there be light,\" and there was light.")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="tiny")
    p.add_argument("--transcoder", default=None, help="a clt-eval transcoder folder")
    p.add_argument("--tokens", type=int, default=32, help="prompt length, BOS included")
    p.add_argument("--layers", type=int, nargs="+", default=None,
                   help="window of the random CLT (default: 4 layers from n_layers // 3)")
    p.add_argument("--features", type=int, default=512, help="features per layer (random CLT)")
    p.add_argument("--l0", type=float, default=16, help="active features per layer and token")
    p.add_argument("--batch-size", type=int, default=16, help="targets per backward pass")
    p.add_argument("--threads", type=int, default=1,
                   help="1 by default: on 2 shared cores, 2 threads ran 10x slower here")
    p.add_argument("--out", default=None, help="also write graph.json and graph.png here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from clt_eval.lm.attribution import attribute, tokenize_prompt
    from clt_eval.lm.graph import prune
    from clt_eval.lm.models import load_model
    from clt_eval.lm.splice import splice_metrics

    t0 = time.perf_counter()
    model = load_model(args.model)
    t_load = time.perf_counter() - t0
    tokens = tokenize_prompt(model, TEXT)[: args.tokens]
    tc, window, source = pick_transcoder(model, args, tokens)

    attribute(model, tc, window, tokens[:4], batch_size=args.batch_size)  # warm-up
    t0 = time.perf_counter()
    g = attribute(model, tc, window, tokens, batch_size=args.batch_size, skip_first=True)
    t_attr = time.perf_counter() - t0
    t0 = time.perf_counter()
    node_mask, edge_mask, _ = prune(g.A_NN, g.logit_weights(), g.kind)
    t_prune = time.perf_counter() - t0
    n_feat, n_logit = int(g.mask("feature").sum()), int(g.mask("logit").sum())
    splice = splice_metrics(model, tc, window, tokens[None], skip_first=True)
    report = {
        "model": args.model, "n_model_layers": model.cfg.n_layers, "d_model": model.cfg.d_model,
        "transcoder": source, "window": list(window.layers), "arch": tc.cfg.arch,
        "n_features_per_layer": tc.cfg.n_features, "prompt_tokens": len(tokens),
        "threads": args.threads, "batch_size": args.batch_size,
        "load_model_s": round(t_load, 2), "attribution_s": round(t_attr, 2),
        "prune_s": round(t_prune, 3), "feature_nodes": n_feat, "logit_nodes": n_logit,
        "nodes": g.n_nodes, "nonzero_edges": int((g.A_NN != 0).sum()),
        "ms_per_target": round(1000 * t_attr / (n_feat + n_logit), 2),
        "pruned_nodes": int(node_mask.sum()), "pruned_edges": int(edge_mask.sum()),
        "scores": g.scores, "splice_kl_mean": splice["kl_mean"][0],
        "splice_ce_recovered": splice["ce_recovered"][0],
        "load_average_1min": os.getloadavg()[0],
    }
    if args.out:
        from clt_eval.training.graph_plot import write_graph

        write_graph(g, args.out)
    print(json.dumps(report, indent=2))


def pick_transcoder(model, args, tokens):
    """(transcoder, window, description)."""
    from clt_eval.training.graph_plot import load_windowed_transcoder

    folder = Path(args.transcoder) if args.transcoder else None
    if folder is None and "smollm2" in args.model:
        found = sorted((ROOT / "runs" / "smollm2").glob("**/weights.safetensors"),
                       key=lambda q: q.stat().st_mtime)  # clt-eval transcoder folders
        found = [q.parent for q in found if (q.parent / "config.json").is_file()]
        folder = found[-1] if found else None
    if folder is not None:
        return (*load_windowed_transcoder(folder), f"trained: {folder}")
    n = model.cfg.n_layers
    layers = args.layers or list(range(n // 3, min(n, n // 3 + 4)))  # SmolLM2: 10..13
    return (*random_clt(model, layers, args.features, args.l0, tokens),
            f"random CLT, encoder biases set for L0 ~ {args.l0} per layer")


@torch.no_grad()
def random_clt(model, layers, n_features: int, l0: float, tokens):
    from clt_eval.config import TranscoderConfig
    from clt_eval.lm.window import LayerWindow
    from clt_eval.transcoder import Transcoder

    window = LayerWindow(tuple(layers))
    tc = Transcoder([TranscoderConfig(d_model=model.cfg.d_model, n_layers=len(layers),
                                      n_features=n_features, arch="clt")]).eval()
    _, cache = model.run_with_cache(tokens[None], names_filter=lambda h: h in
                                    window.input_hooks())
    x = torch.stack([cache[h][0, 1:] for h in window.input_hooks()], 1)  # [P-1, L, D]
    pre = tc.encode(x)[0]  # [P-1, L, F]
    q = 1 - min(l0 / n_features, 1.0)
    tc.b_enc[0] = -pre.transpose(0, 1).flatten(1).quantile(q, dim=1)[:, None]
    return tc, window


if __name__ == "__main__":
    main()
