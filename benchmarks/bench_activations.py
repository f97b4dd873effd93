"""Activation streaming vs the bare model's forward pass, side by side on the same batches.

Bare: ``model(tokens_BP)`` on each batch of windows (the full forward, logits included), no
hooks. Streaming: ``ActivationSource`` on the same windows and batch size, no cache: forward
hooks on the window's MLP input/output points, the forward pass stopped after the window's
last layer, position 0 dropped, batch × position flattened, a shuffle buffer, and batches of
``--batch-size`` samples as the trainer receives them. Both are timed on the same tokens, in
alternating order, ``--repeats`` times; the best time of each is reported (least disturbed by
other processes on a shared machine). Throughput counts input tokens (windows × n_ctx).

The issue asks for streaming at >= 70% of bare throughput. The default tiny window covers all
of the tiny model's layers, so stopping early buys nothing there; SmolLM2's default window
(layers 10-13 of 30) skips the later blocks and the 49k-token unembedding.

    .venv/bin/python benchmarks/bench_activations.py [--smollm2] [--layers 10 11 12 13]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def parse():
    p = argparse.ArgumentParser()
    p.add_argument("--smollm2", action="store_true", help="SmolLM2-135M instead of the tiny model")
    p.add_argument("--layers", type=int, nargs="+", default=None,
                   help="window (default: all 4 layers of tiny; 10-13 of SmolLM2)")
    p.add_argument("--n-tokens", type=int, default=None,
                   help="tokens per measurement (default 65536 tiny, 4096 SmolLM2)")
    p.add_argument("--n-ctx", type=int, default=None, help="default 64 tiny, 128 SmolLM2")
    p.add_argument("--model-batch", type=int, default=8, help="windows per forward pass")
    p.add_argument("--batch-size", type=int, default=1024, help="samples per yielded batch")
    p.add_argument("--repeats", type=int, default=3)
    return p.parse_args()


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    args = parse()
    torch.set_num_threads(2)
    from clt_eval.lm.activations import ActivationSource
    from clt_eval.lm.corpus import corpus_windows
    from clt_eval.lm.models import load_model
    from clt_eval.lm.window import LayerWindow

    name = "smollm2-135m" if args.smollm2 else "tiny"
    t0 = time.perf_counter()
    model = load_model(name)
    print(f"model {name}: loaded in {time.perf_counter() - t0:.1f} s")
    layers = args.layers or ([10, 11, 12, 13] if args.smollm2 else [0, 1, 2, 3])
    n_ctx = args.n_ctx or (128 if args.smollm2 else 64)
    n_tokens = args.n_tokens or (4096 if args.smollm2 else 65536)
    tokens = corpus_windows("bible", model.tokenizer, model.cfg.d_vocab, n_ctx, n_tokens)
    batches = tokens.split(args.model_batch)
    source = ActivationSource(model, LayerWindow(tuple(layers)), tokens,
                              batch_size=args.batch_size, model_batch=args.model_batch)
    n_out = source.n_tokens // args.batch_size  # full batches in one pass

    @torch.no_grad()
    def bare():
        for b in batches:
            model(b)

    def stream():
        it = source.batches(seed=0)
        for _ in range(n_out):
            next(it)
        it.close()

    bare()  # warm-up: first-call allocations are part of neither measurement
    stream()
    t_bare = t_stream = float("inf")
    for _ in range(args.repeats):  # alternate, so drifting machine load hits both alike
        t_bare = min(t_bare, best_time(bare, 1))
        t_stream = min(t_stream, best_time(stream, 1))
    n = tokens.numel()
    print(f"{len(tokens)} windows x {n_ctx} tokens = {n} tokens; model batch {args.model_batch} "
          f"windows; window layers {layers}; {n_out} batches of {args.batch_size} samples "
          f"(position 0 dropped); best of {args.repeats}")
    print(f"bare forward      : {n / t_bare:10.0f} tokens/s  ({t_bare:.2f} s)")
    print(f"streaming batches : {n / t_stream:10.0f} tokens/s  ({t_stream:.2f} s)")
    print(f"streaming / bare  : {t_bare / t_stream:.2f}  (target >= 0.70)")


if __name__ == "__main__":
    main()
