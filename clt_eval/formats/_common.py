"""Helpers shared by the format readers and writers: strict tensor checks, thresholds,
building a one-run ``Transcoder`` from plain tensors, and atomic folder writes.

Large files are read lazily (``read_header`` then ``fill``): shapes and dtypes from the
header, then each tensor a slice of rows at a time straight into the transcoder's parameters.
Every reader checks a foreign file completely (names, shapes, dtypes, finiteness) and fails
with one line naming the file and tensor, before anything is built or written (docs/concepts.md
§8.10).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import safetensors
import safetensors.torch
import torch

from clt_eval.config import TranscoderConfig
from clt_eval.errors import CltEvalError, require
from clt_eval.io import open_safetensors
from clt_eval.lm.window import LayerWindow
from clt_eval.transcoder import Transcoder

# The smallest normal float32. A stored threshold of 0 becomes this, because clt-eval keeps
# log θ: z·1[z > tiny] differs from z·1[z > 0] only on denormal inputs.
TINY = torch.finfo(torch.float32).tiny


# ---- reading -----------------------------------------------------------------------------
def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    require(path.is_file(), f"{path}: missing; expected a safetensors file")
    try:
        return safetensors.torch.load_file(str(path))
    except (OSError, safetensors.SafetensorError) as exc:
        raise CltEvalError(f"{path}: not a readable safetensors file ({exc})") from None


# ---- lazy reading: headers first, then tensors a slice of rows at a time ------------------
class TensorInfo(NamedTuple):
    shape: list[int]
    dtype: str  # safetensors' dtype name, e.g. "F32"


FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
# safetensors' dtype names as torch's, for messages that read like those for loaded tensors.
TORCH_NAMES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64",
               "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
               "BOOL": "bool"}
# Bytes of a stored tensor read at once: large decoders are read in slices of rows.
READ_CHUNK_BYTES = 1 << 25


def _open(path: Path):
    return open_safetensors(path)


def read_header(path: Path) -> dict[str, TensorInfo]:
    """{name: (shape, dtype)} from a safetensors file's header; no tensor is read."""
    with _open(path) as f:
        return {n: TensorInfo(list(f.get_slice(n).get_shape()), f.get_slice(n).get_dtype())
                for n in f.keys()}


def read_rows(path: Path, name: str, lo: int, hi: int) -> torch.Tensor:
    """Rows lo..hi of a stored tensor, through a mapping opened for them alone (read pages
    of a mapping stay resident until it is closed, so one held over a whole load would add
    the file's size again)."""
    with _open(path) as f:
        return f.get_slice(name)[lo:hi]


def fill(dest: torch.Tensor | None, header: dict[str, TensorInfo], path: Path, name: str,
         shape: list[int], why: str = "",
         pick: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
    """Check tensor ``name`` (shape and dtype from the header, then finiteness) and copy it
    into ``dest`` (laid out as stored, or as ``pick`` makes a slice of rows) a slice of rows
    at a time; ``dest=None`` only checks. Values are converted to dest's dtype."""
    info = header[name]
    require(info.shape == list(shape), f"{path}: tensor {name!r} has shape {info.shape}, "
            f"expected {list(shape)}" + (f" ({why})" if why else ""))
    require(info.dtype in FLOAT_DTYPES,
            f"{path}: tensor {name!r} has dtype "
            f"{'torch.' + TORCH_NAMES[info.dtype] if info.dtype in TORCH_NAMES else info.dtype}"
            ", expected a float dtype")
    n = shape[0] if shape else 1
    step = max(1, READ_CHUNK_BYTES // (8 * max(1, math.prod(shape[1:]))))  # 8: widest float
    bad = 0
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        part = read_rows(path, name, lo, hi) if shape else _read_all(path, name)
        bad += int((~torch.isfinite(part)).sum())
        if dest is not None:
            dest[lo:hi] = pick(part) if pick else part
        del part
    require(bad == 0, f"{path}: tensor {name!r} has {bad} non-finite value(s) (NaN or inf); "
            "expected finite numbers")


def _read_all(path: Path, name: str) -> torch.Tensor:
    with _open(path) as f:
        return f.get_tensor(name)


def read(header: dict[str, TensorInfo], path: Path, name: str, shape: list[int],
         why: str = "") -> torch.Tensor:
    """A small tensor, checked as ``fill`` does, as float32."""
    out = torch.empty(shape)
    fill(out, header, path, name, shape, why)
    return out


def check_names(tensors: dict, path: Path, required: set[str], optional: set[str] = frozenset()):
    """Fail on missing or unexpected tensor names: an unknown tensor could change what the
    transcoder computes, so it is never silently dropped."""
    missing = sorted(required - set(tensors))
    require(not missing, f"{path}: missing tensor(s) {missing}; expected {sorted(required)}"
            + (f" and optionally {sorted(optional)}" if optional else ""))
    unexpected = sorted(set(tensors) - required - set(optional))
    require(not unexpected, f"{path}: unexpected tensor(s) {unexpected}; expected "
            f"{sorted(required)}" + (f" and optionally {sorted(optional)}" if optional else ""))


def take(tensors: dict, path: Path, name: str, shape: list[int], why: str = "") -> torch.Tensor:
    """The float32 tensor ``name`` after checking its shape, dtype and values."""
    t = tensors[name]
    require(list(t.shape) == list(shape), f"{path}: tensor {name!r} has shape {list(t.shape)}, "
            f"expected {list(shape)}" + (f" ({why})" if why else ""))
    require(t.is_floating_point(),
            f"{path}: tensor {name!r} has dtype {t.dtype}, expected a float dtype")
    t = t.to(torch.float32)
    bad = int((~torch.isfinite(t)).sum())
    require(bad == 0, f"{path}: tensor {name!r} has {bad} non-finite value(s) (NaN or inf); "
            "expected finite numbers")
    return t


def feature_dims(tensors: dict, path: Path, name: str) -> tuple[int, int]:
    """(F, D) from an encoder stored as [F, D], the first file a reader opens."""
    require(name in tensors, f"{path}: missing tensor {name!r}; expected the encoder [F, D]")
    shape = list(tensors[name].shape)
    require(len(shape) == 2 and min(shape) > 0,
            f"{path}: tensor {name!r} has shape {shape}, expected [F, D] (features, d_model)")
    return shape[0], shape[1]


def log_threshold(theta_F: torch.Tensor, path: Path, name: str, relu_first: bool) -> torch.Tensor:
    """log θ for clt-eval's JumpReLU from a raw stored threshold θ.

    ``relu_first``: the source applies ReLU before the jump (sae_lens), so θ <= 0 acts like
    θ = 0. Without it (circuit-tracer: z·1[z > θ]) a negative θ lets negative pre-activations
    through, which a log-parameterised threshold cannot express.
    """
    theta = theta_F.to(torch.float64)
    if relu_first:
        theta = theta.clamp(min=0)
    n_neg = int((theta < 0).sum())
    require(n_neg == 0, f"{path}: tensor {name!r} has {n_neg} negative threshold(s); expected "
            "thresholds >= 0 (clt-eval stores log θ)")
    return theta.clamp(min=TINY).log().to(torch.float32)


# ---- building ----------------------------------------------------------------------------
@torch.no_grad()
def build_transcoder(cfg: TranscoderConfig, tensors: dict[str, torch.Tensor]) -> Transcoder:
    """A one-run per-layer Transcoder in eval mode holding ``tensors`` (names as in
    Transcoder, no run dim; ``W_dec_own`` [L, F, D] the own-layer decoders). Every tensor the
    config needs must be given; the shapes were checked by the reader."""
    require(cfg.arch == "plt", f"internal: build_transcoder builds PLTs, got {cfg.arch!r}")
    tc = Transcoder([cfg], init=False)
    needed = {"W_enc", "b_enc", "W_dec_own", "b_dec"}
    needed |= {"W_skip"} if cfg.skip else set()
    needed |= {"log_threshold"} if cfg.activation == "jumprelu" else set()
    require(set(tensors) == needed, f"internal: tensors {sorted(tensors)} != {sorted(needed)}")
    for name, t in tensors.items():
        if name == "W_dec_own":  # [L, F, D] -> W_dec_{s} [1, F, 1, D]
            for s, W in enumerate(tc.decoder_params()):
                W[0, :, 0] = t[s]
        else:
            getattr(tc, name).copy_(t[None])
    return tc.eval()


def single_run(tc: Transcoder, what: str) -> None:
    require(tc.n_runs == 1, f"{what}: expected a single run, got an ensemble of {tc.n_runs}; "
            "pick one with tc.select([r])")


def is_per_layer(tc: Transcoder) -> bool:
    """True when only own-layer decoder blocks exist (a PLT, or any 1-layer transcoder)."""
    L = tc.cfg.n_layers
    return bool(torch.equal(tc.decoder_mask_RST[0].cpu(), torch.eye(L, dtype=torch.bool)))


def default_window(tc: Transcoder, window: LayerWindow | None) -> LayerWindow:
    """``window``, or model layers 0..L-1 with the default hooks; checked against ``tc``."""
    window = window or LayerWindow(tuple(range(tc.cfg.n_layers)))
    require(window.n_layers == tc.cfg.n_layers, f"window: has {window.n_layers} layers "
            f"{list(window.layers)}, expected {tc.cfg.n_layers} (the transcoder's n_layers)")
    return window


def inference_threshold_LF(tc: Transcoder, fmt: str) -> torch.Tensor | None:
    """Raw JumpReLU thresholds θ [L,F] for formats that store them; None for ReLU.

    BatchTopK at inference is a per-layer threshold (Transcoder.activate in eval mode), i.e.
    a JumpReLU whose θ is that layer's threshold for every feature, so it exports exactly.
    """
    cfg = tc.cfg
    if cfg.activation == "relu":
        return None
    if cfg.activation == "jumprelu":
        return tc.log_threshold[0].detach().double().exp().float().cpu()
    if cfg.activation == "batchtopk":
        thr_L = tc.batchtopk_threshold[0].detach().float().cpu()
        require(bool((thr_L >= 0).all()), f"batchtopk_threshold={thr_L.tolist()}: expected "
                f"values >= 0 to write as {fmt} JumpReLU thresholds")
        return thr_L[:, None].expand(cfg.n_layers, cfg.n_features).contiguous()
    raise CltEvalError(f"activation={cfg.activation!r} (topk_mode={cfg.topk_mode!r}): {fmt} "
                       "has no such activation; expected relu, jumprelu or batchtopk")


def cpu32(t: torch.Tensor) -> torch.Tensor:
    """A detached float32 CPU copy that safetensors accepts (no views, no shared storage)."""
    return t.detach().to("cpu", torch.float32).contiguous().clone()


# ---- writing -----------------------------------------------------------------------------
def check_replaceable(target: Path, recognised: bool) -> None:
    """Only a missing path, an empty folder or a folder that holds a transcoder in a known
    format (``recognised``) may be replaced: a typo must never wipe out unrelated files."""
    if not target.exists():
        return
    require(target.is_dir(), f"{target}: exists and is not a folder; expected a transcoder "
            "folder to replace or a new path")
    others = sorted(p.name for p in target.iterdir())
    require(not others or recognised, f"{target}: exists and holds other files {others[:5]}; "
            "expected an empty folder or a transcoder folder to replace")


