"""Helpers shared by the format readers and writers: strict tensor checks, thresholds,
building a one-run ``Transcoder`` from plain tensors, and atomic folder writes.

Every reader checks a foreign file completely (names, shapes, dtypes, finiteness) and fails
with one line naming the file and tensor, before anything is built or written (docs/concepts.md
§8.10).
"""

from __future__ import annotations

from pathlib import Path

import safetensors
import safetensors.torch
import torch

from clt_eval.config import TranscoderConfig
from clt_eval.errors import CltEvalError, require
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
    """A one-run Transcoder in eval mode holding ``tensors`` (names as in Transcoder, no run
    dim). Every tensor the config needs must be given; the shapes were checked by the reader."""
    tc = Transcoder([cfg], init=False)
    needed = {"W_enc", "b_enc", "W_dec", "b_dec"}
    needed |= {"W_skip"} if cfg.skip else set()
    needed |= {"log_threshold"} if cfg.activation == "jumprelu" else set()
    require(set(tensors) == needed, f"internal: tensors {sorted(tensors)} != {sorted(needed)}")
    for name, t in tensors.items():
        if name == "W_dec":  # dense [S, T, F, D] -> the per-source decoders [F, T_s, D]
            for s, T in enumerate(tc.n_targets):
                tc.decoder_params()[s][0] = t[s, s:s + T].permute(1, 0, 2)
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


