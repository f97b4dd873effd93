"""Peak memory of loading a real-size CLT: does lazy loading stay near 1× the tensors' size?

Writes a synthetic 12-layer CLT (F=4096, D=768, ~1.1 GB of float32) as a clt-eval folder and
as a circuit-tracer folder (W_enc_i / W_dec_i files), then for each, in a fresh subprocess,
loads it and runs a small batch of activations through it, measuring the peak resident memory
(ru_maxrss) above the baseline after importing torch and clt_eval. Prints the ratio to the
tensors' total size (target ≤ 1.2) and the peak that ratio projects for Gemma-2-2B's CLT shape
(26 layers × 16,384 features × d_model 2,304).

    .venv/bin/python benchmarks/bench_memory.py [--layers 12 --features 4096 --d-model 768]
        [--format clt-eval|circuit-tracer|both] [--malloc kept|default]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

GEMMA = dict(layers=26, features=16_384, d_model=2_304)


def tensor_bytes(L: int, F: int, D: int) -> int:
    """float32 bytes of a ReLU CLT: encoders, per-source decoders (Σ_s (L-s) blocks), biases."""
    blocks = L * (L + 1) // 2
    return 4 * (L * D * F + L * F + blocks * F * D + L * D)


def write_clt(folder: Path, L: int, F: int, D: int) -> None:
    import safetensors.torch
    import torch

    from clt_eval.config import TranscoderConfig
    from clt_eval.io import CONFIG_FILE, FORMAT, VERSION, WEIGHTS_FILE

    cfg = TranscoderConfig(d_model=D, n_layers=L, n_features=F, arch="clt")
    g = torch.Generator().manual_seed(0)
    tensors = {"W_enc": torch.randn(L, D, F, generator=g) / D**0.5,
               "b_enc": torch.zeros(L, F), "b_dec": torch.zeros(L, D)}
    for s in range(L):
        tensors[f"W_dec_{s}"] = torch.randn(F, L - s, D, generator=g) * 0.01
    folder.mkdir(parents=True)
    config = {"format": FORMAT, "version": VERSION, "transcoder": cfg.to_dict(), "extra": {}}
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    safetensors.torch.save_file(tensors, str(folder / WEIGHTS_FILE))


def write_circuit_tracer_clt(folder: Path, L: int, F: int, D: int) -> None:
    """The same kind of CLT in circuit-tracer's layout, one file pair per layer, each tensor
    made and written on its own so the writer stays small too."""
    import safetensors.torch
    import torch
    import yaml

    g = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True)
    for i in range(L):
        safetensors.torch.save_file(
            {f"W_enc_{i}": torch.randn(F, D, generator=g) / D**0.5, f"b_enc_{i}": torch.zeros(F),
             f"b_dec_{i}": torch.zeros(D)}, str(folder / f"W_enc_{i}.safetensors"))
        safetensors.torch.save_file({f"W_dec_{i}": torch.randn(F, L - i, D, generator=g) * 0.01},
                                    str(folder / f"W_dec_{i}.safetensors"))
    config = {"model_kind": "cross_layer_transcoder", "feature_input_hook": "hook_resid_mid",
              "feature_output_hook": "hook_mlp_out"}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))


WRITERS = {"clt-eval": write_clt, "circuit-tracer": write_circuit_tracer_clt}
LOADERS = {"clt-eval": "from clt_eval.io import load_transcoder as load",
           "circuit-tracer": "from clt_eval.formats.circuit_tracer import load_circuit_tracer\n"
                             "load = lambda p: load_circuit_tracer(p)[0]"}

CHILD = """
import resource, sys, torch
{loader}
if sys.argv[2] == "kept":  # as every clt-eval command on the CPU runs
    from clt_eval.device import keep_freed_memory
    keep_freed_memory()
torch.randn(8, 8) @ torch.randn(8, 8)  # BLAS and the allocator warmed up: part of the baseline
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tc = load(sys.argv[1])
after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with torch.no_grad():
    x = torch.randn(8, tc.cfg.n_layers, tc.cfg.d_model)
    out = tc(x)
assert torch.isfinite(out.recon_RBLD).all()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(base, after_load, peak)
"""


def measure(folder: Path, fmt: str = "clt-eval", malloc: str = "kept") -> tuple[int, int, int]:
    """(baseline, after load, peak after a forward pass) ru_maxrss of a fresh process, bytes.
    ``malloc``: "kept" (freed memory kept for reuse, as clt-eval's commands set it on the
    CPU) or "default" (glibc's own settings)."""
    child = CHILD.format(loader=LOADERS[fmt])
    res = subprocess.run([sys.executable, "-c", child, str(folder), malloc], capture_output=True,
                         text=True, check=True)
    return tuple(int(v) * 1024 for v in res.stdout.split())  # Linux: ru_maxrss is in KiB


def run_case(fmt: str, L: int, F: int, D: int, malloc: str = "kept") -> dict[str, float]:
    """Write a CLT in format ``fmt`` (from another process), load it in a fresh one; the
    memory above the baseline, in bytes, and its ratio to the tensors' size."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "clt"
        # Written by another process: a child's ru_maxrss starts from its parent's resident
        # size at fork, so this process must stay small for the measurement to mean anything.
        subprocess.run([sys.executable, __file__, "--write", str(folder), "--format", fmt,
                        "--layers", str(L), "--features", str(F), "--d-model", str(D)],
                       check=True)
        base, after_load, peak = measure(folder, fmt, malloc)
    size = tensor_bytes(L, F, D)
    return {"base": base, "load": after_load - base, "peak": peak - base,
            "ratio": (peak - base) / size}


def report(fmt: str, L: int, F: int, D: int, m: dict[str, float]) -> None:
    gib, size = 2**30, tensor_bytes(L, F, D)
    print(f"[{fmt}] CLT L={L} F={F} D={D}: tensors {size / gib:.3f} GiB "
          f"(dense L×L decoder would be {4 * L * L * F * D / gib:.3f} GiB)")
    print(f"  baseline RSS after imports   {m['base'] / gib:.3f} GiB")
    print(f"  peak RSS above baseline      load {m['load'] / gib:.3f} GiB, "
          f"load + forward {m['peak'] / gib:.3f} GiB")
    print(f"  peak / tensors size          {m['ratio']:.3f}  (target <= 1.2)")
    g = GEMMA
    gemma = tensor_bytes(g["layers"], g["features"], g["d_model"])
    print(f"  Gemma-2-2B CLT ({g['layers']} layers x {g['features']} features x d_model "
          f"{g['d_model']}): tensors {gemma / gib:.1f} GiB, projected peak "
          f"{m['ratio'] * gemma / gib:.1f} GiB above baseline")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--features", type=int, default=4096)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--format", choices=[*WRITERS, "both"], default="both")
    ap.add_argument("--malloc", choices=["kept", "default"], default="kept",
                    help="kept: freed memory kept for reuse, as clt-eval's commands set it on "
                         "the CPU; default: glibc's own settings")
    ap.add_argument("--write", type=Path, help=argparse.SUPPRESS)  # internal: the writer
    args = ap.parse_args()
    L, F, D = args.layers, args.features, args.d_model
    if args.write:
        WRITERS[args.format](args.write, L, F, D)
        return
    print(f"malloc: {args.malloc}")
    for fmt in WRITERS if args.format == "both" else [args.format]:
        report(fmt, L, F, D, run_case(fmt, L, F, D, args.malloc))


if __name__ == "__main__":
    main()
