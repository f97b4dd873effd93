"""Save and load a single transcoder as a folder: ``config.json`` plus ``weights.safetensors``.

safetensors plus JSON, never pickle (docs/concepts.md §8.9): a weights file cannot run code when
loaded.
Saving is atomic: everything is written into a temporary sibling folder and renamed into place,
so a crash or a bad input never leaves a half-written transcoder behind. Loading checks every
field and tensor against the config and fails with one line naming the file and what was
expected (docs/concepts.md §8.10).

Tensors on disk carry no run dim: ``W_enc`` [L,D,F], ``b_enc`` [L,F], one decoder per source
layer ``W_dec_{s}`` [F,T_s,D] (blocks s→s..s+T_s-1; T_s = L-s for a CLT, 1 for a PLT),
``b_dec`` [L,D], and when the config asks for them ``W_skip`` [L,D,D], ``log_threshold`` [L,F]
(jumprelu), ``batchtopk_threshold`` [L] (batchtopk). Folders written before the per-source
layout hold one dense ``W_dec`` [L,L,F,D] instead; they still load.

Loading is lazy: the transcoder's parameters are allocated once, uninitialised, and filled one
tensor at a time from the memory-mapped file, so a large CLT needs about its own size in memory
rather than twice that.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from clt_eval.atomic import atomic_folder
from clt_eval.config import TranscoderConfig
from clt_eval.errors import CltEvalError, require
from clt_eval.transcoder import Transcoder

FORMAT = "clt-eval"
VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"


def expected_shapes(cfg: TranscoderConfig) -> dict[str, list[int]]:
    """The tensors a folder for ``cfg`` must hold, and their shapes (no run dim)."""
    L, F, D = cfg.n_layers, cfg.n_features, cfg.d_model
    T = [L - s if cfg.arch != "plt" else 1 for s in range(L)]
    shapes = {"W_enc": [L, D, F], "b_enc": [L, F],
              **{f"W_dec_{s}": [F, T[s], D] for s in range(L)}, "b_dec": [L, D]}
    if cfg.skip:
        shapes["W_skip"] = [L, D, D]
    if cfg.activation == "jumprelu":
        shapes["log_threshold"] = [L, F]
    if cfg.activation == "batchtopk":
        shapes["batchtopk_threshold"] = [L]
    return shapes


# ---- saving ------------------------------------------------------------------------------
def save_transcoder(tc: Transcoder, path: str | Path, extra: dict | None = None) -> Path:
    """Write ``tc`` (one run) to the folder ``path``, replacing an earlier save there."""
    require(tc.n_runs == 1, f"save_transcoder: expected a single run, got an ensemble of "
            f"{tc.n_runs}; pick one with tc.select([r])")
    target = Path(path)
    _check_replaceable(target)
    config = {"format": FORMAT, "version": VERSION, "transcoder": tc.cfg.to_dict(),
              "extra": extra or {}}
    try:  # serialise before touching the disk, so a bad `extra` writes nothing
        config_text = json.dumps(config, indent=2)
    except (TypeError, ValueError) as exc:
        raise CltEvalError(f"{target}: extra is not JSON-serialisable ({exc})") from None
    tensors = _tensors_to_save(tc)
    with atomic_folder(target) as tmp:
        (tmp / CONFIG_FILE).write_text(config_text)
        safetensors.torch.save_file(tensors, str(tmp / WEIGHTS_FILE))
    return target


def _check_replaceable(target: Path) -> None:
    """Refuse to delete anything that does not look like an earlier save: a typo in ``path``
    must never wipe out an unrelated folder."""
    if not target.exists():
        return
    require(target.is_dir(), f"{target}: exists and is not a folder; expected a clt-eval "
            "transcoder folder or a new path")
    others = sorted(p.name for p in target.iterdir() if p.name not in (CONFIG_FILE, WEIGHTS_FILE))
    require(not others, f"{target}: exists and holds other files {others}; expected an empty "
            "folder or a clt-eval transcoder folder")


def legacy_shapes(cfg: TranscoderConfig) -> dict[str, list[int]]:
    """The tensors of a folder written with the old dense decoder ``W_dec`` [L,L,F,D]."""
    L, F, D = cfg.n_layers, cfg.n_features, cfg.d_model
    shapes = {k: v for k, v in expected_shapes(cfg).items() if not k.startswith("W_dec_")}
    return {"W_dec": [L, L, F, D], **shapes}


def _tensors_to_save(tc: Transcoder) -> dict[str, torch.Tensor]:
    full = {"W_enc": tc.W_enc, "b_enc": tc.b_enc, "b_dec": tc.b_dec, "W_skip": tc.W_skip,
            "log_threshold": tc.log_threshold, "batchtopk_threshold": tc.batchtopk_threshold}
    # One run is never a mixed ensemble: its stored slots are exactly its blocks.
    full |= {f"W_dec_{s}": W for s, W in enumerate(tc.decoder_params())}
    # Clone: safetensors refuses views and tensors that share storage.
    return {name: full[name][0].detach().cpu().contiguous().clone()
            for name in expected_shapes(tc.cfg)}


# ---- loading -----------------------------------------------------------------------------
def load_transcoder(path: str | Path) -> Transcoder:
    """Read a folder written by ``save_transcoder`` into a one-run ``Transcoder`` in eval mode."""
    folder = Path(path)
    config_path = folder / CONFIG_FILE
    data = _read_config(folder)
    require("transcoder" in data, f"{config_path}: missing field 'transcoder'")
    try:
        cfg = TranscoderConfig.from_dict(data["transcoder"], source=str(config_path))
    except CltEvalError as exc:  # __post_init__'s messages name the field but not the file
        msg = str(exc)
        raise CltEvalError(msg if str(config_path) in msg else f"{config_path}: {msg}") from None
    tc = Transcoder([cfg], init=False)
    _fill_weights(folder / WEIGHTS_FILE, cfg, tc)
    return tc.eval()


def load_extra(path: str | Path) -> dict:
    """The ``extra`` dict saved alongside a transcoder (e.g. training metadata)."""
    return _read_config(Path(path)).get("extra", {})


def _read_config(folder: Path) -> dict:
    require(folder.is_dir(), f"{folder}: missing; expected a clt-eval transcoder folder")
    config_path = folder / CONFIG_FILE
    require(config_path.is_file(),
            f"{config_path}: missing; expected a clt-eval transcoder folder")
    try:
        data = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:  # ValueError covers bad JSON and bad UTF-8
        raise CltEvalError(f"{config_path}: not valid JSON ({exc})") from None
    require(isinstance(data, dict), f"{config_path}: expected a JSON object")
    require(data.get("format") == FORMAT,
            f"{config_path}: field 'format' is {data.get('format')!r}, expected {FORMAT!r}")
    require(data.get("version") == VERSION,
            f"{config_path}: field 'version' is {data.get('version')!r}, expected {VERSION}")
    require(isinstance(data.get("extra", {}), dict),
            f"{config_path}: field 'extra' must be a JSON object")
    return data


FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def open_safetensors(path: Path, what: str = "a safetensors file"):
    """A memory-mapped reader of ``path``, or one line saying why it cannot be read."""
    require(path.is_file(), f"{path}: missing; expected {what}")
    try:
        return safetensors.safe_open(str(path), framework="pt")
    except (OSError, safetensors.SafetensorError) as exc:
        raise CltEvalError(f"{path}: not a readable safetensors file ({exc})") from None


def _open_weights(weights_path: Path):
    return open_safetensors(weights_path, "the transcoder weights")


def _check_header(f, weights_path: Path, cfg: TranscoderConfig) -> dict[str, list[int]]:
    """Names, shapes and dtypes from the file's header, before any tensor is read; returns
    the expected shapes of the layout the file holds (per-source or the old dense one)."""
    names = set(f.keys())
    shapes = expected_shapes(cfg)
    if "W_dec" in names and not any(n.startswith("W_dec_") for n in names):
        shapes = legacy_shapes(cfg)
    missing = sorted(set(shapes) - names)
    require(not missing, f"{weights_path}: missing tensor(s) {missing}; expected "
            f"{sorted(shapes)} for activation={cfg.activation!r}, skip={cfg.skip}")
    unexpected = sorted(names - set(shapes))
    require(not unexpected, f"{weights_path}: unexpected tensor(s) {unexpected}; expected "
            f"{sorted(shapes)} for activation={cfg.activation!r}, skip={cfg.skip}")
    dims = f"n_layers={cfg.n_layers}, n_features={cfg.n_features}, d_model={cfg.d_model}"
    for name, shape in shapes.items():
        view = f.get_slice(name)
        require(list(view.get_shape()) == shape, f"{weights_path}: tensor {name!r} has shape "
                f"{list(view.get_shape())}, expected {shape} from {CONFIG_FILE} ({dims})")
        require(view.get_dtype() in FLOAT_DTYPES, f"{weights_path}: tensor {name!r} has dtype "
                f"{view.get_dtype()}, expected a float dtype {list(FLOAT_DTYPES)}")
    return shapes


# Bytes of a tensor read at once while loading: large tensors are read in slices of rows.
READ_CHUNK_BYTES = 1 << 25


def _row_chunks(shape: list[int]) -> list[tuple[int, int]]:
    n = shape[0]
    row_bytes = 8 * max(1, math.prod(shape[1:]))  # 8: the widest float dtype read
    step = max(1, READ_CHUNK_BYTES // row_bytes)
    return [(lo, min(n, lo + step)) for lo in range(0, n, step)]


def _read_rows(weights_path: Path, name: str, lo: int, hi: int) -> torch.Tensor:
    """Rows lo..hi of tensor ``name``, through a mapping of the file opened for them alone:
    pages of a mapping that have been read stay resident (and count in the process's memory)
    until it is unmapped, so one mapping held over the whole load would add the file's size
    again."""
    with _open_weights(weights_path) as f:
        t = f.get_slice(name)[lo:hi]
    bad = int((~torch.isfinite(t)).sum())
    require(bad == 0, f"{weights_path}: tensor {name!r} has {bad} non-finite value(s) "
            "(NaN or inf); expected finite numbers")
    return t


@torch.no_grad()
def _fill_weights(weights_path: Path, cfg: TranscoderConfig, tc: Transcoder) -> None:
    """Copy the file's tensors into ``tc``'s (uninitialised) parameters a slice at a time, so
    the load needs about the parameters' own size plus one slice."""
    with _open_weights(weights_path) as f:
        shapes = _check_header(f, weights_path, cfg)
    for name, shape in shapes.items():
        for lo, hi in _row_chunks(shape):
            part = _read_rows(weights_path, name, lo, hi)
            if name == "W_dec":  # the old dense layout [S, T, F, D]
                for i, s in enumerate(range(lo, hi)):
                    T = tc.n_targets[s]
                    tc.decoder_params()[s][0] = part[i, s:s + T].permute(1, 0, 2)
            else:
                getattr(tc, name)[0, lo:hi] = part  # the run dim is added back
            del part
