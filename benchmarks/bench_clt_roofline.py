"""How close does a CLT training step come to the machine's matmul rate?

Measures torch.mm's rate (GFLOP/s) at representative sizes, then times a CLT training step
(forward, loss, backward, Adam) with the real Transcoder, losses and the trainer's Adam
(``training.adam.RunwiseAdam``), as the trainer runs it, and prints:

* step time;
* useful FLOPs: only decoder blocks that exist, Σ_s (L−s)·F·D for the decoder and L·D·F for
  the encoder, × 2 (multiply-add) × 3 (forward, data gradient, weight gradient) × batch;
* the achieved share of the measured matmul rate (target ≥ 70%);
* the share of decoder FLOPs spent on blocks that do not exist (0 with per-source storage;
  the dense L×L decoder this replaced spent 1 − Σ_s(L−s)/L² of them on absent blocks).

The encoder needs no data gradient (its input is data), so the ×3 overstates the encoder's
work by a third; the FLOPs the step actually requires are printed too. Shares are given per
wall-clock second and per CPU-second of this process: on a shared machine the wall-clock
rates of the matmul probe and of the step see different loads, while work per CPU-second
does not depend on how long the process waited for a core.

    .venv/bin/python benchmarks/bench_clt_roofline.py [--steps 3] [--activation relu|topk]
        [--k K] [--batch B] [--dense] [--inexact] [--device cpu|cuda]

On a GPU (``--device cuda``) both the probe and the step run there, timed with the device
synchronised, and only wall-clock shares are printed.

With TopK at k/F <= 1/16 the decode is sparse and does fewer FLOPs than the count above
(which prices a dense decode); compare its step time with ``--dense``.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from clt_eval.config import LossConfig, TranscoderConfig
from clt_eval.device import keep_freed_memory, resolve_device
from clt_eval.errors import CltEvalError
from clt_eval.losses import training_loss
from clt_eval.training.adam import RunwiseAdam
from clt_eval.transcoder import Transcoder

MM_SIZES = [(4096, 512, 4096), (4096, 4096, 512)]  # the step's encoder and decoder shapes


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads) of one call, the device's
    queued work included."""
    sync(device)
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - w0, time.process_time() - c0


def mm_rate(M: int, K: int, N: int, device: torch.device, reps: int = 3
            ) -> tuple[float, float]:
    """(GFLOP per wall second, GFLOP per CPU second) of torch.mm [M,K] @ [K,N], best of
    ``reps`` after one warm-up."""
    a, b = torch.randn(M, K, device=device), torch.randn(K, N, device=device)
    out = torch.empty(M, N, device=device)
    torch.mm(a, b, out=out)
    runs = [timed(lambda: torch.mm(a, b, out=out), device) for _ in range(reps)]
    flop = 2 * M * K * N / 1e9
    return flop / min(w for w, _ in runs), flop / min(c for _, c in runs)


def step_flops(tc: Transcoder, B: int) -> dict:
    L, F, D = tc.cfg.n_layers, tc.cfg.n_features, tc.cfg.d_model
    existing = int(tc.decoder_mask_RST[0].sum())  # blocks s→t that exist: Σ_s (L−s) for a CLT
    stored = sum(tc.n_targets)  # blocks the decode multiplies by
    enc, dec = L * D * F, existing * F * D
    return {"useful": 2 * 3 * B * (enc + dec),  # the brief's count
            "required": 2 * B * (2 * enc + 3 * dec),  # no data gradient for the encoder
            "absent_share": (stored - existing) / stored,
            "dense_absent_share": (L * L - existing) / (L * L)}


def make_step(tc: Transcoder, loss_cfg: LossConfig):
    opt = RunwiseAdam(tc.parameters(), lr=1e-4)  # the trainer's optimiser
    coef = torch.full((tc.n_runs,), 1e-3, device=tc.W_enc.device)

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        out = tc(x)
        loss = training_loss(tc, out, y, loss_cfg, coef).total_R
        loss.sum().backward()
        opt.step()
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--features", type=int, default=4096)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4096)
    # Best of 3, as the probe takes the best of 3 products: on a shared machine one step of
    # ~13 s is far more likely than a 60-ms product to meet a slow moment.
    ap.add_argument("--steps", type=int, default=3,
                    help="timed steps (after a warm-up); the fastest is reported")
    ap.add_argument("--activation", choices=["relu", "topk"], default="relu")
    ap.add_argument("--k", type=int, default=64, help="TopK's k per layer")
    ap.add_argument("--inexact", action="store_true", help="batched kernels (exact=False)")
    ap.add_argument("--dense", action="store_true", help="never decode sparsely")
    ap.add_argument("--glibc-defaults", action="store_true",
                    help="leave malloc as it is (the trainer keeps freed memory on the CPU)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (auto: CUDA if any)")
    args = ap.parse_args()
    try:
        device = resolve_device(args.device)
    except CltEvalError as e:
        sys.exit(f"bench_clt_roofline: {e}")
    gpu = device.type == "cuda"
    if not args.glibc_defaults and not gpu:
        keep_freed_memory()  # as the trainer does on the CPU
    L, F, D, B = args.layers, args.features, args.d_model, args.batch

    rates = {s: mm_rate(*s, device) for s in MM_SIZES}
    for (M, K, N), (w, c) in rates.items():
        print(f"torch.mm [{M}x{K}] @ [{K}x{N}]: {w:8.1f} GFLOP/s wall"
              + ("" if gpu else f", {c:8.1f} GFLOP per CPU-second"))
    roof_w = max(w for w, _ in rates.values())
    roof_c = max(c for _, c in rates.values())
    where = torch.cuda.get_device_name(device) if gpu else f"{torch.get_num_threads()} threads"
    print(f"matmul roofline (best of the above): {roof_w:.1f} GFLOP/s wall"
          + ("" if gpu else f", {roof_c:.1f} GFLOP per CPU-second") + f", {where}")

    topk = args.activation == "topk"
    cfg = TranscoderConfig(d_model=D, n_layers=L, n_features=F, arch="clt",
                           activation=args.activation, k=args.k if topk else None)
    loss_cfg = (LossConfig(penalty="topk", decoder_norm="none") if topk
                else LossConfig(penalty="l1", decoder_norm="concatenated"))
    tc = Transcoder([cfg]).to(device)
    tc.exact = not args.inexact
    tc.sparse_decode = not args.dense
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randn(B, L, D, generator=g).to(device) for _ in range(2))
    step = make_step(tc, loss_cfg)
    step(x[:256], y[:256])  # warm-up on a slice (Adam's state, first-call costs), 1/16 the work
    times = [timed(lambda: step(x, y), device) for _ in range(args.steps)]
    t, cpu = min(w for w, _ in times), min(c for _, c in times)
    fl = step_flops(tc, B)
    sparse = tc.sparse_runs(tc(x[:64]).acts_RBLF != 0) is not None
    print(f"CLT step: L={L} F={F} D={D} batch={B} {args.activation} "
          f"({'exact' if tc.exact else 'batched'} kernels, "
          f"{'sparse' if sparse else 'dense'} decode)")
    print(f"step time: {t:.3f} s wall" + ("" if gpu else f", {cpu:.2f} CPU-seconds")
          + f" (best of {len(times)})")
    for what, flop in (("useful", fl["useful"]), ("required", fl["required"])):
        print(f"{what} FLOPs: {flop / 1e12:.3f} TFLOP -> {flop / t / 1e9:.1f} GFLOP/s wall = "
              f"{flop / t / 1e9 / roof_w:.1%} of the roofline"
              + ("" if gpu else f"; per CPU-second {flop / cpu / 1e9:.1f} = "
                                f"{flop / cpu / 1e9 / roof_c:.1%}"))
    print(f"decoder FLOPs on absent blocks: {fl['absent_share']:.1%} "
          f"(dense L×L storage: {fl['dense_absent_share']:.1%})")


if __name__ == "__main__":
    main()
