"""One TopK transcoder training step, clt-eval vs EleutherAI's sparsify, at the same shapes.

A per-layer transcoder from d_model 512 to 8192 features, k = 32 per sample, batch 4096:
forward, backward and an Adam step. clt-eval is timed through its real trainer
(``clt_eval.training.trainer.train``: TopK activation, MSE loss, divergence guard, AuxK's
dead-feature clock) in this process; sparsify's ``SparseCoder(transcode=True)`` is timed in
its own virtual environment, ``benchmarks/.venv-sparsify`` (created on first use: the CPU
torch wheel the project uses plus the ``eai-sparsify`` package from PyPI; never installed
into the project's environment, never a project dependency), with its training loss
(``fvu``; its AuxK term is 0 with no dead latents, as here), backward and ``torch.optim.Adam``.
Both use the same number of threads, the same random data, ``--warmup`` untimed steps and
the median of ``--steps`` timed ones. clt-eval's trainer has glibc's malloc keep freed
memory on the CPU (``clt_eval.device.keep_freed_memory``); sparsify as installed does not.
By default each round times three sides one after the other: clt-eval, sparsify as
installed, and sparsify with the same malloc setting (``--sparsify-malloc`` picks one of
the two instead), so that both ratios come from the same state of the machine. With
``--rounds N`` the sides alternate N times and each reports its best round: other jobs on a
shared machine slow one side at a time, and the fastest round is the one least disturbed.
``--profile`` prints clt-eval's step by operator (torch.profiler; it slows the step a
little). The target: clt-eval >= 1.5x as fast.

    .venv/bin/python benchmarks/bench_sparsify.py [--threads 2] [--steps 3] [--rounds 3]
        [--device cpu|cuda] [--sparsify-python PYTHON] [--sparsify-malloc both]

On a GPU (``--device cuda``) both sides run there, each step timed with the device
synchronised. ``--sparsify-python`` names an interpreter that already imports ``sparsify``
(a machine with no network, where the environment above cannot be made).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

VENV = Path(__file__).resolve().parent / ".venv-sparsify"
TORCH_WHEEL = "/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"
SPARSIFY = "eai-sparsify"
# How each sparsify side is named in the output (keyed by: malloc keeps freed memory).
LABEL = {False: " (as installed)", True: " (same malloc as clt-eval)"}

# Runs inside sparsify's environment: prints {"times": [...], "version": ...} as JSON.
SPARSIFY_STEP = r"""
import json, sys, time
import importlib.metadata as md
import torch
from sparsify import SparseCoder, SparseCoderConfig

a = json.loads(sys.argv[1])
torch.set_num_threads(a["threads"])
dev = torch.device(a["device"])
sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
g = torch.Generator().manual_seed(0)
x = torch.randn(a["batch"], a["d_model"], generator=g).to(dev)
y = torch.randn(a["batch"], a["d_model"], generator=g).to(dev)
sc = SparseCoder(a["d_model"], SparseCoderConfig(num_latents=a["features"], k=a["k"],
                                                 transcode=True), device=dev)
opt = torch.optim.Adam(sc.parameters(), lr=1e-3)
times = []
for i in range(a["warmup"] + a["steps"]):
    sync()
    t0 = time.perf_counter()
    out = sc(x, y)
    loss = out.fvu + out.auxk_loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync()
    times.append(time.perf_counter() - t0)
print(json.dumps({"times": times[a["warmup"]:], "version": md.version("eai-sparsify")}))
"""


def parse():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--features", type=int, default=8192)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (both sides)")
    p.add_argument("--sparsify-python", default=None,
                   help="an interpreter that imports sparsify (default: the benchmark's venv)")
    p.add_argument("--sparsify-malloc", choices=("both", "installed", "kept"), default="both",
                   help="sparsify as installed, with malloc keeping freed memory as "
                        "clt-eval's trainer sets it (GLIBC_TUNABLES), or both side by side")
    return p.parse_args()


def ensure_venv() -> Path:
    """sparsify's own environment, created once (minutes: it pulls transformers, datasets)."""
    python = VENV / "bin" / "python"
    ok = python.exists() and subprocess.run(
        [str(python), "-c", "import sparsify"], capture_output=True).returncode == 0
    if not ok:
        print(f"creating {VENV} (torch from {TORCH_WHEEL}, {SPARSIFY} from PyPI)", flush=True)
        subprocess.run([sys._base_executable, "-m", "venv",
                        "--clear", str(VENV)], check=True)
        wheel = TORCH_WHEEL if Path(TORCH_WHEEL).is_file() else "torch==2.13.0"
        pip = [str(python), "-m", "pip", "install", "-q"]
        subprocess.run(pip + [wheel], check=True)
        subprocess.run(pip + [SPARSIFY], check=True)
    return python


def time_sparsify(args, kept: bool) -> tuple[list[float], str]:
    # the step runs from / (away from this checkout): the interpreter's absolute path
    python = (Path(shutil.which(args.sparsify_python) or args.sparsify_python).absolute()
              if args.sparsify_python else ensure_venv())
    spec = {"batch": args.batch, "d_model": args.d_model, "features": args.features,
            "k": args.k, "threads": args.threads, "warmup": args.warmup, "steps": args.steps,
            "device": args.device}
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    if args.sparsify_python:  # its packages may come from PYTHONPATH (gpu_check.sh's wheels)
        env |= {k: v for k, v in os.environ.items() if k in ("PYTHONPATH", "PATH", "HOME")}
    if kept:  # the settings of clt_eval.device.keep_freed_memory
        from clt_eval.device import KEPT_MEMORY_TUNABLES

        env["GLIBC_TUNABLES"] = KEPT_MEMORY_TUNABLES
    res = subprocess.run([str(python), "-c", SPARSIFY_STEP, json.dumps(spec)],
                         capture_output=True, text=True, cwd="/", env=env)
    if res.returncode != 0:
        sys.exit(f"sparsify step failed:\n{res.stderr[-3000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    return out["times"], out["version"]


class StepClock:
    """The trainer's progress hook: a timestamp after every step (the device's queued work
    done)."""

    def __init__(self, device: torch.device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.stamps = [time.perf_counter()]

    def update(self, n: int) -> None:
        self.sync()
        self.stamps.append(time.perf_counter())


def time_clt_eval(args) -> list[float]:
    from clt_eval.training.config import RunSpec, TrainConfig
    from clt_eval.training.trainer import train
    from clt_eval.transcoder import Transcoder

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 1, args.d_model, generator=g).to(device)
    y = torch.randn(args.batch, 1, args.d_model, generator=g).to(device)
    spec = RunSpec(arch="plt", penalty="topk", decoder_norm="none", k=args.k,
                   topk_mode="per_layer", n_features=args.features)
    tc = Transcoder([spec.transcoder_config(args.d_model, 1)], seeds=[0])
    n = args.warmup + args.steps
    clock = StepClock(device)
    cfg = TrainConfig(steps=n, lr=1e-3, lr_warmup_steps=0, log_every=0, device=args.device)
    batches = iter(lambda: (x, y), None)
    train(tc, spec.loss_config(), torch.zeros(1), batches, cfg, progress=clock)
    steps = [b - a for a, b in zip(clock.stamps, clock.stamps[1:], strict=False)]
    return steps[args.warmup:]


def profile_clt_eval(args) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        time_clt_eval(args)
    n = args.warmup + args.steps
    print(f"clt-eval by operator, {n} steps (warm-up included):")
    print(prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=45,
        max_shapes_column_width=60))


def main() -> None:
    args = parse()
    from clt_eval.device import resolve_device
    from clt_eval.errors import CltEvalError

    try:
        args.device = str(resolve_device(args.device))
    except CltEvalError as e:
        sys.exit(f"bench_sparsify: {e}")
    if args.profile:
        profile_clt_eval(args)
    if args.rounds < 1:
        return
    shapes = (f"batch {args.batch}, d_model {args.d_model} -> {args.features} features, "
              f"k={args.k}, {args.device}, {args.threads} threads, median of {args.steps} "
              f"steps after {args.warmup} warm-up, best of {args.rounds} round(s)")
    print(shapes, flush=True)
    sides = {"installed": [False], "kept": [True], "both": [False, True]}[args.sparsify_malloc]
    ours, theirs = [], {kept: [] for kept in sides}
    for i in range(args.rounds):
        ours.append(statistics.median(time_clt_eval(args)))
        for kept in sides:
            t, version = time_sparsify(args, kept)
            theirs[kept].append(statistics.median(t))
        rest = ", ".join(f"sparsify{LABEL[kept]} {theirs[kept][-1] * 1e3:.0f}" for kept in sides)
        print(f"  round {i + 1}: clt-eval {ours[-1] * 1e3:.0f}, {rest} ms/step", flush=True)
    best = min(ours)
    print(f"clt-eval: {best * 1e3:.0f} ms/step", flush=True)
    for kept in sides:
        t = min(theirs[kept])
        print(f"sparsify {version}{LABEL[kept]}: {t * 1e3:.0f} ms/step; sparsify / clt-eval: "
              f"{t / best:.2f}x  (target >= 1.5x: clt-eval faster)", flush=True)


if __name__ == "__main__":
    main()
