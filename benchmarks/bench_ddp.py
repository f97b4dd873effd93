"""Data-parallel training vs one process: the same weights, and the time per step.

Launches ``torchrun --standalone --nproc-per-node N`` on itself (gloo on the CPU, nccl with
``--device cuda``), each rank training a CLT on its slice of the same global batches, then
trains the same CLT in this process on the whole global batches, and prints the largest
|Δ weight| between them (float rounding only; the test suite asserts <= 1e-5 at 50 steps)
and both times per step. On one shared CPU the ranks compete for the same cores, so the
per-step time says little about speed-up there; the Δ is the point.

    .venv/bin/python benchmarks/bench_ddp.py [--ranks 2] [--steps 50] [--d-model 64]

``--cli`` does the same end to end through the installed command instead, as docs/scale.md
tells users to run it: ``torchrun --standalone --nproc-per-node N --no-python clt-eval train``
on the default case study against plain ``clt-eval train``, and prints both wall times
(interpreter start-up, case study and evaluation included) and the largest |Δ weight|
between the saved transcoders.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch


def parse(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=256, help="global batch")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-features", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--cli", action="store_true", help="time `clt-eval train` end to end")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # output folder of a rank
    return p.parse_args(argv)


def train(args) -> tuple[dict, float]:
    """Train through the real trainer on this rank's slices; (weights, seconds per step)."""
    from clt_eval.training import distributed as dist_
    from clt_eval.training.config import RunSpec, TrainConfig
    from clt_eval.training.trainer import full_batches
    from clt_eval.training.trainer import train as run_trainer
    from clt_eval.transcoder import Transcoder

    g = torch.Generator().manual_seed(0)
    L, D = args.n_layers, args.d_model
    x = torch.randn(8 * args.batch_size, L, D, generator=g)
    y = torch.tanh(x @ torch.randn(D, D, generator=g) / D**0.5)
    spec = RunSpec(arch="clt", penalty="l1", sparsity_coef=1e-3, n_features=args.n_features)
    tc = Transcoder([spec.transcoder_config(D, L)], seeds=[0])
    batches = dist_.local_batches(full_batches(x, y, args.batch_size, seed=1))
    cfg = TrainConfig(steps=args.steps, lr=3e-3, lr_warmup_steps=5, log_every=0,
                      batch_size=args.batch_size, device=args.device)
    t0 = time.perf_counter()
    run_trainer(tc, spec.loss_config(), torch.full((1,), 1e-3), batches, cfg)
    return tc.state_dict(), (time.perf_counter() - t0) / args.steps


def worker(args) -> None:
    from clt_eval.training import distributed as dist_

    dist_.init_from_env(args.device)
    state, per_step = train(args)
    if dist_.is_main():
        torch.save({"state": state, "per_step": per_step}, f"{args.worker}/rank0.pt")
    dist_.shutdown()


def cli(args) -> None:
    """``clt-eval train`` under torchrun and in one process: wall times and |Δ weight|."""
    from pathlib import Path

    from clt_eval.io import load_transcoder

    bin_ = Path(sys.executable).parent
    cmd = [str(bin_ / "clt-eval"), "train", "--steps", str(args.steps), "--batch-size",
           str(args.batch_size), "--n-features", str(args.n_features), "--wandb-mode",
           "disabled", "--device", args.device]
    launch = [str(bin_ / "torchrun"), "--standalone", "--nproc-per-node", str(args.ranks),
              "--no-python"]
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        seconds, states = {}, {}
        for name, prefix in (("ddp", launch), ("single", [])):
            t0 = time.perf_counter()
            subprocess.run(prefix + cmd + ["--out", f"{tmp}/{name}"], check=True, env=env,
                           capture_output=True)
            seconds[name] = time.perf_counter() - t0
            (folder,) = Path(tmp, name, "transcoders").iterdir()
            states[name] = load_transcoder(folder).state_dict()
    delta = max(float((states["single"][k].double() - states["ddp"][k].double()).abs().max())
                for k in states["single"])
    print(f"clt-eval train, default case study, {args.steps} steps, global batch "
          f"{args.batch_size}, {args.n_features} features")
    print(f"1 process        : {seconds['single']:6.1f} s wall")
    print(f"{args.ranks} ranks (torchrun): {seconds['ddp']:6.1f} s wall")
    print(f"max |Δ weight|   : {delta:.3g}  (float rounding; the test asserts <= 1e-5)")


def main() -> None:
    args = parse()
    if args.worker:
        worker(args)
        return
    if args.cli:
        cli(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(args.ranks), __file__, "--worker", tmp,
               *sys.argv[1:]]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
        t_launch = time.perf_counter() - t0
        ddp = torch.load(f"{tmp}/rank0.pt", weights_only=True)
    torch.set_num_threads(1)
    single, per_step = train(args)
    delta = max(float((single[k].double() - ddp["state"][k].double()).abs().max())
                for k in single)
    print(f"{args.steps} steps, global batch {args.batch_size}, CLT {args.n_layers} layers x "
          f"{args.n_features} features, d_model {args.d_model}")
    print(f"1 process        : {per_step * 1e3:8.1f} ms/step")
    print(f"{args.ranks} ranks (gloo)   : {ddp['per_step'] * 1e3:8.1f} ms/step  "
          f"(launch + import + train: {t_launch:.0f} s)")
    print(f"max |Δ weight|   : {delta:.3g}  (float rounding; the test asserts <= 1e-5)")


if __name__ == "__main__":
    main()
