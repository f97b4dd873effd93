"""Which on-disk format a transcoder folder is in, decided from its marker files alone."""

from __future__ import annotations

import json
from pathlib import Path

from clt_eval.errors import CltEvalError, require
from clt_eval.formats import circuit_tracer as ct
from clt_eval.formats.sae_lens_io import sae_lens_folders

DETECTED = ("clt-eval", "circuit-tracer-clt", "circuit-tracer-plt", "sae-lens")


def _native_format(path: Path) -> tuple[bool, str]:
    """(is clt-eval, why not) for a folder holding config.json."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return False, f"{path}: not valid JSON ({exc})"
    fmt = data.get("format") if isinstance(data, dict) else None
    return fmt == "clt-eval", f"{path}: field 'format' is {fmt!r}, expected 'clt-eval'"


def detect_format(path: str | Path, hooks_given: bool = False) -> str:
    """One of DETECTED, or a one-line CltEvalError naming what the folder lacks.
    ``hooks_given``: circuit-tracer files without config.yaml count (the hooks stand in)."""
    path = Path(path)
    require(path.exists(), f"{path}: missing; expected a transcoder folder")
    require(path.is_dir(), f"{path}: not a folder; expected a transcoder folder")
    why = None
    if (path / "config.json").is_file():
        native, why = _native_format(path / "config.json")
        if native:
            return "clt-eval"
    if (path / ct.CONFIG_FILE).is_file():
        kind = ct.MODEL_KINDS[ct.read_config(path)["model_kind"]]
        return f"circuit-tracer-{kind}"
    if sae_lens_folders(path) is not None:
        return "sae-lens"
    if any(path.glob("W_enc_*.safetensors")):
        ct_kind = "clt"
    elif any(path.glob("layer_*.safetensors")):
        ct_kind = "plt"
    else:
        ct_kind = None
    if ct_kind and hooks_given:
        return f"circuit-tracer-{ct_kind}"
    if ct_kind:
        raise CltEvalError(f"{path / ct.CONFIG_FILE}: missing; a circuit-tracer folder needs it "
                           "to name model_kind, feature_input_hook and feature_output_hook "
                           "(or give both hooks: --feature-input-hook/--feature-output-hook)")
    if why:
        raise CltEvalError(f"{why}; not a transcoder folder in a known format")
    found = sorted(p.name for p in path.iterdir())[:5]
    raise CltEvalError(f"{path}: not a transcoder folder in a known format (found {found}); "
                       "expected clt-eval's config.json, circuit-tracer's config.yaml or "
                       "sae_lens's cfg.json")


def is_recognised(path: Path) -> bool:
    """Whether ``path`` holds a transcoder in any known format (so it may be replaced)."""
    try:
        detect_format(path)
    except CltEvalError:
        return False
    return True
