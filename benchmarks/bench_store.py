"""Reading activations from the store vs recomputing them with the model's forward pass.

Recompute: ``ActivationSource`` without a store, one pass of shuffled training batches, each
forward pass stopped after the window's last layer. Store: the same batches read from an
activation store collected once beforehand (``ActivationStore.batches``: shards in a seeded
order through the shuffle buffer). Throughput counts samples (token positions) delivered to
the trainer; the best of ``--repeats`` alternating runs of each is reported. The one-off
collection time is printed too: the store pays for itself from the second pass on.

The model: a randomly initialised transformer of a realistic width (``--d-model 512``,
8 layers, MLPs of 4 x d_model; the test suite's 'tiny' model has d_model 32, where a forward
pass costs next to nothing and the comparison would mean little), window layers 2-3, and
SmolLM2-135M (window 10-13) when its GGUF package is installed (``--smollm2 auto|yes|no``).
The issue's target: store >= 10x. A few minutes on 2 CPU cores.

    .venv/bin/python benchmarks/bench_store.py [--n-tokens 4096] [--smollm2 no]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def parse():
    p = argparse.ArgumentParser()
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--n-layers", type=int, default=8)
    p.add_argument("--layers", type=int, nargs="+", default=[2, 3],
                   help="window of the random model")
    p.add_argument("--n-tokens", type=int, default=4096, help="tokens per pass")
    p.add_argument("--n-ctx", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--shuffle-buffer", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--smollm2", choices=("auto", "yes", "no"), default="auto")
    return p.parse_args()


def random_model(args):
    from clt_eval.lm.models import model_from_config

    d = args.d_model
    return model_from_config({"n_layers": args.n_layers, "d_model": d, "n_ctx": args.n_ctx,
                              "d_head": 64, "n_heads": d // 64, "d_mlp": 4 * d,
                              "d_vocab": 8192, "act_fn": "gelu",
                              "normalization_type": "LN"}, name=f"random-d{d}")


def measure(name: str, model, layers: list[int], args) -> float:
    from clt_eval.lm.activations import ActivationSource, ActivationStore
    from clt_eval.lm.window import LayerWindow

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.cfg.d_vocab, (args.n_tokens // args.n_ctx, args.n_ctx),
                           generator=g)
    kw = {"batch_size": args.batch_size, "shuffle_buffer": args.shuffle_buffer}
    live = ActivationSource(model, LayerWindow(tuple(layers)), tokens, **kw)
    n_batches = live.n_tokens // args.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        cached = ActivationSource(model, LayerWindow(tuple(layers)), tokens, **kw,
                                  cache_dir=f"{tmp}/acts", meta={"model": name})
        t0 = time.perf_counter()
        cached.ensure_cache()
        t_collect = time.perf_counter() - t0
        store = ActivationStore(f"{tmp}/acts", **kw)
        t_live = t_store = float("inf")
        for _ in range(args.repeats):  # alternate, so drifting machine load hits both alike
            t_live = min(t_live, one_pass(live, n_batches))
            t_store = min(t_store, one_pass(store, n_batches))
    n = n_batches * args.batch_size
    print(f"{name}: window {layers}, {len(tokens)} windows x {args.n_ctx} tokens, "
          f"{n_batches} batches of {args.batch_size}; best of {args.repeats}")
    print(f"  collect store once : {live.n_tokens / t_collect:10.0f} samples/s  "
          f"({t_collect:.2f} s)")
    print(f"  recompute (forward): {n / t_live:10.0f} samples/s  ({t_live:.2f} s)")
    print(f"  read from store    : {n / t_store:10.0f} samples/s  ({t_store:.2f} s)")
    print(f"  store / recompute  : {t_live / t_store:.1f}x  (target >= 10x)")
    return t_live / t_store


def one_pass(source, n_batches: int) -> float:
    t0 = time.perf_counter()
    it = source.batches(seed=0)
    for _ in range(n_batches):
        next(it)
    it.close()
    return time.perf_counter() - t0


def smollm2_wanted(choice: str) -> bool:
    if choice != "auto":
        return choice == "yes"
    try:
        import gguf  # noqa: F401

        from clt_eval.lm.models import smollm2_gguf

        smollm2_gguf()
    except Exception:  # not installed: the optional extra (make smollm2)
        return False
    return True


def main() -> None:
    args = parse()
    sys.stdout.reconfigure(line_buffering=True)  # each figure shows as soon as it is measured
    from clt_eval.lm.models import SMOLLM2, load_model

    measure(f"random d_model={args.d_model}", random_model(args), args.layers, args)
    if smollm2_wanted(args.smollm2):
        args.n_ctx = min(args.n_ctx, 128)
        measure(SMOLLM2, load_model(SMOLLM2), [10, 11, 12, 13], args)


if __name__ == "__main__":
    main()
