"""sae_lens transcoder folders: read them into PLTs; export PLTs as sae_lens objects.

sae_lens 6.54's ``SAE.save_model`` writes a folder with ``cfg.json`` (``d_in``, ``d_sae``,
``d_out``, ``dtype``, ``apply_b_dec_to_input``, ``normalize_activations``,
``reshape_activations``, ``architecture`` and ``metadata`` with ``hook_name`` — the input
hook — and ``hook_name_out``) and ``sae_weights.safetensors`` (``W_enc`` [d_in, d_sae],
``b_enc`` [d_sae], ``W_dec`` [d_sae, d_out], ``b_dec`` [d_out], ``threshold`` [d_sae] for
JumpReLU, ``W_skip`` [d_out, d_in] for skip transcoders). sae_lens has one transcoder per
layer and no CLT class, so a set of such folders (one per layer, in subfolders) is one
L-layer PLT, and only a PLT can be exported.

Reading parses the files directly (no ``import sae_lens``, which costs ~10 s); exporting
builds sae_lens's own classes so that its own ``save_model`` and loaders handle them.
sae_lens's JumpReLU is ReLU(z)·1[z > θ], equal to clt-eval's z·1[z > θ] for θ >= 0.
Note: ``HookedSAETransformer`` runs ``encode``/``decode`` only, so a skip transcoder's W_skip
term takes effect in ``SkipTranscoder.forward`` but not inside a HookedSAETransformer.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from clt_eval.config import TranscoderConfig
from clt_eval.errors import CltEvalError, require
from clt_eval.formats import _common as C
from clt_eval.lm.window import LayerWindow
from clt_eval.transcoder import Transcoder

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
# architecture -> (JumpReLU?, skip?)
ARCHS = {"transcoder": (False, False), "skip_transcoder": (False, True),
         "jumprelu_transcoder": (True, False), "jumprelu_skip_transcoder": (True, True)}
HOOK = re.compile(r"blocks\.(\d+)\.(.+)")


def sae_lens_folders(path: Path) -> list[Path] | None:
    """[path] for one sae_lens folder; its subfolders when every entry is one; else None."""
    if (path / CFG_FILE).is_file():
        return [path]
    entries = [p for p in path.iterdir() if not p.name.startswith(".")] if path.is_dir() else []
    if entries and all(p.is_dir() and (p / CFG_FILE).is_file() for p in entries):
        return sorted(entries)
    return None


# ---- reading -----------------------------------------------------------------------------
def _read_cfg(folder: Path) -> dict:
    path = folder / CFG_FILE
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CltEvalError(f"{path}: not valid JSON ({exc})") from None
    require(isinstance(cfg, dict), f"{path}: expected a JSON object")
    arch = cfg.get("architecture")
    require(arch in ARCHS, f"{path}: field 'architecture' is {arch!r}, expected one of "
            f"{sorted(ARCHS)} (a sae_lens transcoder)")
    for key in ("d_in", "d_sae", "d_out"):
        v = cfg.get(key)
        require(isinstance(v, int) and not isinstance(v, bool) and v > 0,
                f"{path}: field {key!r} is {v!r}, expected a positive integer")
    require(cfg["d_in"] == cfg["d_out"], f"{path}: d_in={cfg['d_in']} but d_out="
            f"{cfg['d_out']}; expected equal (a transcoder from an MLP's input to its output)")
    for key, want in (("apply_b_dec_to_input", False), ("normalize_activations", "none"),
                      ("reshape_activations", "none")):
        require(cfg.get(key, want) == want, f"{path}: field {key!r} is {cfg.get(key)!r}, "
                f"expected {want!r} (clt-eval has no such preprocessing)")
    return cfg


def _hook(cfg: dict, path: Path, key: str, old_key: str) -> tuple[int, str]:
    """(model layer, template) from a hook name 'blocks.<layer>.<hook>' in metadata (6.x) or
    at the top level (older configs, which call the input hook 'hook_point')."""
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    name = meta.get(key) or cfg.get(key) or cfg.get(old_key)
    m = HOOK.fullmatch(name) if isinstance(name, str) else None
    require(m is not None, f"{path}: field 'metadata.{key}' is {name!r}, expected a hook name "
            "'blocks.<layer>.<hook>'")
    return int(m.group(1)), "blocks.{layer}." + m.group(2)


def _read_folder(folder: Path) -> dict:
    """One sae_lens transcoder folder, checked, in clt-eval's orientation."""
    cfg, path = _read_cfg(folder), folder / CFG_FILE
    layer, in_hook = _hook(cfg, path, "hook_name", "hook_point")
    layer_out, out_hook = _hook(cfg, path, "hook_name_out", "hook_point_out")
    require(layer == layer_out, f"{path}: hook_name reads layer {layer} but hook_name_out "
            f"writes layer {layer_out}; expected one layer (a per-layer transcoder)")
    jump, skip = ARCHS[cfg["architecture"]]
    F, D = cfg["d_sae"], cfg["d_in"]
    wpath = folder / WEIGHTS_FILE
    t = C.read_safetensors(wpath)
    names = {"W_enc", "b_enc", "W_dec", "b_dec"} | ({"threshold"} if jump else set())
    C.check_names(t, wpath, names | ({"W_skip"} if skip else set()))
    dims = f"d_sae={F}, d_in={D} from {CFG_FILE}"
    out = {"W_enc": C.take(t, wpath, "W_enc", [D, F], dims),
           "b_enc": C.take(t, wpath, "b_enc", [F], dims),
           "W_dec_FD": C.take(t, wpath, "W_dec", [F, D], dims),
           "b_dec": C.take(t, wpath, "b_dec", [D], dims)}
    if jump:
        theta = C.take(t, wpath, "threshold", [F], dims)
        out["log_threshold"] = C.log_threshold(theta, wpath, "threshold", relu_first=True)
    if skip:  # sae_lens applies x @ W_skip.T; clt-eval applies x @ W_skip
        out["W_skip"] = C.take(t, wpath, "W_skip", [D, D], dims).T
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    model = meta.get("model_name") or cfg.get("model_name")
    return {"layer": layer, "hooks": (in_hook, out_hook), "arch": cfg["architecture"],
            "dims": (F, D), "model_name": model if isinstance(model, str) else None,
            "path": path, "tensors": out}


def load_sae_lens(path: str | Path) -> tuple[Transcoder, LayerWindow]:
    """One sae_lens transcoder folder, or a folder of them (one per layer), as one PLT."""
    path = Path(path)
    folders = sae_lens_folders(path)
    require(folders is not None, f"{path}: expected a sae_lens folder ({CFG_FILE} + "
            f"{WEIGHTS_FILE}) or a folder of such folders, one per layer")
    parts = sorted((_read_folder(f) for f in folders), key=lambda p: p["layer"])
    ref = parts[0]
    for p, prev in zip(parts[1:], parts, strict=False):
        require(p["layer"] != prev["layer"], f"{p['path']}: layer {p['layer']} again (also in "
                f"{prev['path']}); expected one folder per layer")
        for key in ("hooks", "arch", "dims"):
            require(p[key] == ref[key], f"{p['path']}: {key} {p[key]} differs from {ref[key]} "
                    f"in {ref['path']}; expected every layer to match")
    (F, D), (jump, skip) = ref["dims"], ARCHS[ref["arch"]]
    L = len(parts)
    cfg = TranscoderConfig(d_model=D, n_layers=L, n_features=F, arch="plt",
                           activation="jumprelu" if jump else "relu", skip=skip)
    tensors = {name: torch.stack([p["tensors"][name] for p in parts])
               for name in ref["tensors"] if name != "W_dec_FD"}
    W_own = torch.stack([p["tensors"]["W_dec_FD"] for p in parts])
    tc = C.build_transcoder(cfg, tensors | {"W_dec_own": W_own})
    window = LayerWindow(tuple(p["layer"] for p in parts), *ref["hooks"], ref["model_name"])
    return tc, window


# ---- exporting ---------------------------------------------------------------------------
def sae_lens_parts(tc: Transcoder, window: LayerWindow | None) -> list[tuple[str, dict, dict]]:
    """[(architecture, metadata, state dict)] per layer. Checks everything; imports nothing."""
    C.single_run(tc, "sae_lens export")
    require(C.is_per_layer(tc), f"arch={tc.cfg.arch!r}: sae_lens has no cross-layer "
            "transcoder class; expected a per-layer transcoder (PLT)")
    window = C.default_window(tc, window)
    for field in ("input_hook", "output_hook"):
        template = getattr(window, field)
        require(HOOK.fullmatch(template.replace("{layer}", "0")) is not None
                and template.startswith("blocks.{layer}."), f"window {field}={template!r}: "
                "expected a TransformerLens template 'blocks.{layer}.<hook>'")
    theta = C.inference_threshold_LF(tc, "sae_lens")
    skip = tc.cfg.skip
    arch = ("jumprelu_" if theta is not None else "") + ("skip_" if skip else "") + "transcoder"
    parts = []
    for i in range(tc.cfg.n_layers):
        state = {"W_enc": C.cpu32(tc.W_enc[0, i]), "b_enc": C.cpu32(tc.b_enc[0, i]),
                 "W_dec": C.cpu32(tc.decoder_block(i, i)[0]), "b_dec": C.cpu32(tc.b_dec[0, i])}
        if theta is not None:
            state["threshold"] = C.cpu32(theta[i])
        if skip:
            state["W_skip"] = C.cpu32(tc.W_skip[0, i].T)
        meta = {"hook_name": window.input_hooks()[i], "hook_name_out": window.output_hooks()[i]}
        if window.model_name:
            meta["model_name"] = window.model_name
        parts.append((arch, meta, state))
    return parts


def to_sae_lens(tc: Transcoder, window: LayerWindow | None = None) -> list:
    """One sae_lens Transcoder / SkipTranscoder / JumpReLUTranscoder / JumpReLUSkipTranscoder
    per layer of the PLT ``tc``, in eval mode, ready for ``HookedSAETransformer.add_sae``."""
    parts = sae_lens_parts(tc, window)  # fails fast, before the slow import
    import sae_lens.saes.transcoder as st
    from sae_lens.saes.sae import SAEMetadata

    classes = {"transcoder": (st.Transcoder, st.TranscoderConfig),
               "skip_transcoder": (st.SkipTranscoder, st.SkipTranscoderConfig),
               "jumprelu_transcoder": (st.JumpReLUTranscoder, st.JumpReLUTranscoderConfig),
               "jumprelu_skip_transcoder": (st.JumpReLUSkipTranscoder,
                                            st.JumpReLUSkipTranscoderConfig)}
    F, D = tc.cfg.n_features, tc.cfg.d_model
    saes = []
    for arch, meta, state in parts:
        cls, cfg_cls = classes[arch]
        # docs/concepts.md §7: sae_lens transcoders must be built with apply_b_dec_to_input=False.
        cfg = cfg_cls(d_in=D, d_sae=F, d_out=D, dtype="float32", device="cpu",
                      apply_b_dec_to_input=False, metadata=SAEMetadata(**meta))
        sae = cls(cfg)
        sae.load_state_dict(state, strict=True)
        saes.append(sae.eval())
    return saes


def write_sae_lens(saes: list, layers: tuple[int, ...], folder: Path) -> None:
    """Save each sae_lens object with sae_lens's own ``save_model`` into folder/layer_<l>."""
    for layer, sae in zip(layers, saes, strict=True):
        sae.save_model(folder / f"layer_{layer}")
