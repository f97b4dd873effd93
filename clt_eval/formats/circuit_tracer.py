"""circuit-tracer's on-disk layouts (docs/concepts.md §7), read and written without circuit-tracer.

Facts from circuit-tracer's own loaders and ``to_safetensors`` (``load_clt``,
``load_transcoder_set``, ``load_transcoders``):

* ``config.yaml`` names ``model_kind`` (``cross_layer_transcoder`` or ``transcoder_set``),
  ``feature_input_hook`` and ``feature_output_hook``, relative to a block (circuit-tracer
  hooks ``blocks.{layer}.<hook>``, e.g. ``hook_resid_mid``, ``ln2.hook_normalized``,
  ``hook_mlp_out``), often ``model_name``; a transcoder set may name ``activation``
  (``relu`` / ``topk``) and ``k``. Dimensions are inferred from the tensors.
* CLT: ``W_enc_{i}.safetensors`` holds ``W_enc_{i}`` [F,D], ``b_enc_{i}`` [F], ``b_dec_{i}`` [D]
  and, for JumpReLU, ``threshold_{i}`` [F] (raw θ: a = z·1[z > θ]); ``W_dec_{i}.safetensors``
  holds ``W_dec_{i}`` [F, L-i, D], the decoders of layer i's features to layers i..L-1. The
  layout has no skip connection.
* Transcoder set: ``layer_{i}.safetensors`` with ``W_enc`` and ``W_dec`` (both [F,D]),
  ``b_enc`` [F], ``b_dec`` [D], optional ``activation_function.threshold`` [F] (an older
  short name ``threshold`` is read too), optional ``W_skip`` [D_out, D_in] and, from its TopK
  writer, an optional scalar ``k``.

clt-eval adds one key, ``clt_eval_layers``: the model layers of a windowed transcoder
(circuit-tracer ignores unknown keys). Files without it cover model layers 0..L-1.

circuit-tracer's TopK keeps the k largest raw pre-activations; clt-eval's keeps the k largest
after ReLU. They differ only where fewer than k pre-activations of a layer are positive.
"""

from __future__ import annotations

import re
from pathlib import Path

import safetensors.torch
import torch
import yaml

from clt_eval.config import TranscoderConfig
from clt_eval.errors import CltEvalError, require
from clt_eval.formats import _common as C
from clt_eval.lm.window import LayerWindow
from clt_eval.transcoder import Transcoder

CONFIG_FILE = "config.yaml"
MODEL_KINDS = {"cross_layer_transcoder": "clt", "transcoder_set": "plt"}
LAYERS_KEY = "clt_eval_layers"
THRESHOLD = "activation_function.threshold"  # what circuit-tracer's SingleLayerTranscoder saves
BLOCK = "blocks.{layer}."


# ---- config.yaml -------------------------------------------------------------------------
def read_config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    require(path.is_file(), f"{path}: missing; a circuit-tracer folder needs it to name "
            "model_kind, feature_input_hook and feature_output_hook")
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, ValueError, yaml.YAMLError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CltEvalError(f"{path}: not valid YAML ({first})") from None
    require(isinstance(data, dict), f"{path}: expected a YAML mapping")
    kind = data.get("model_kind")
    require(kind in MODEL_KINDS, f"{path}: field 'model_kind' is {kind!r}, expected one of "
            f"{sorted(MODEL_KINDS)}")
    for key in ("feature_input_hook", "feature_output_hook"):
        require(isinstance(data.get(key), str) and data[key],
                f"{path}: field {key!r} is {data.get(key)!r}, expected a hook name such as "
                "'hook_resid_mid' or 'hook_mlp_out'")
    return data


def _template(hook: str, path: Path, key: str) -> str:
    """circuit-tracer's block-relative hook as a LayerWindow template."""
    if "{layer}" in hook:  # some third-party writers store the full template already
        return hook
    require(not re.match(r"blocks\.\d+\.", hook), f"{path}: field {key!r} is {hook!r}; "
            "expected a hook relative to a block, such as 'hook_mlp_out'")
    return BLOCK + hook


def _relative(template: str, field: str) -> str:
    rest = template[len(BLOCK):]
    require(template.startswith(BLOCK) and rest and "{layer}" not in rest,
            f"window {field}={template!r}: circuit-tracer names hooks relative to a block; "
            "expected a template 'blocks.{layer}.<hook>'")
    return rest


def _window(config: dict, n_layers: int, path: Path) -> LayerWindow:
    layers = config.get(LAYERS_KEY, list(range(n_layers)))
    require(isinstance(layers, list) and len(layers) == n_layers,
            f"{path}: field {LAYERS_KEY!r} is {layers!r}, expected a list of {n_layers} model "
            "layers (one per transcoder layer)")
    name = config.get("model_name")
    try:
        return LayerWindow(tuple(layers),
                           _template(config["feature_input_hook"], path, "feature_input_hook"),
                           _template(config["feature_output_hook"], path, "feature_output_hook"),
                           name if isinstance(name, str) else None)
    except CltEvalError as exc:
        raise CltEvalError(f"{path}: {exc}") from None


# ---- reading -----------------------------------------------------------------------------
def _numbered(folder: Path, prefix: str) -> dict[int, Path]:
    """{i: folder/'{prefix}{i}.safetensors'}; a name with a non-numeric index is an error."""
    found = {}
    for p in folder.glob(f"{prefix}*.safetensors"):
        m = re.fullmatch(re.escape(prefix) + r"(\d+)\.safetensors", p.name)
        require(m is not None, f"{p}: unexpected file name; expected {prefix}<layer>.safetensors")
        found[int(m.group(1))] = p
    return found


def _layer_files(folder: Path, prefix: str, n: int | None = None) -> list[Path]:
    """Files {prefix}0..{prefix}(n-1), all present and nothing beyond (n: from the names)."""
    found = _numbered(folder, prefix)
    if n is None:  # the highest index, so that a gap is reported as the file it lacks
        n = max(found) + 1 if found else 0
    require(n > 0, f"{folder / f'{prefix}0.safetensors'}: missing; expected one "
            f"{prefix}<layer>.safetensors per layer")
    for i in range(n):
        require(i in found, f"{folder / f'{prefix}{i}.safetensors'}: missing; found "
                f"{prefix}* for layers {sorted(found)}, expected 0..{n - 1}")
    extra = sorted(set(found) - set(range(n)))
    if extra:  # e.g. more W_dec_* files than W_enc_* files
        raise CltEvalError(f"{found[extra[0]]}: a layer beyond the {n} layers the W_enc_* "
                           f"files give; expected {prefix}0..{prefix}{n - 1} only")
    return [found[i] for i in range(n)]


def load_circuit_tracer(path: str | Path) -> tuple[Transcoder, LayerWindow]:
    """Read a circuit-tracer CLT or transcoder-set folder into a one-run Transcoder."""
    folder = Path(path)
    require(folder.is_dir(), f"{folder}: missing; expected a circuit-tracer transcoder folder")
    config = read_config(folder)
    if MODEL_KINDS[config["model_kind"]] == "clt":
        tc = _load_clt(folder)
    else:
        tc = _load_set(folder, config)
    return tc, _window(config, tc.cfg.n_layers, folder / CONFIG_FILE)


def _load_clt(folder: Path) -> Transcoder:
    enc_files = _layer_files(folder, "W_enc_")
    L = len(enc_files)
    dec_files = _layer_files(folder, "W_dec_", L)
    first = C.read_safetensors(enc_files[0])
    F, D = C.feature_dims(first, enc_files[0], "W_enc_0")
    jump = "threshold_0" in first
    W_enc, b_enc, b_dec, thr = [], [], [], []
    W_dec = torch.zeros(L, L, F, D)
    dims = f"F={F}, D={D} from {enc_files[0].name}, L={L} from the number of W_enc_* files"
    for i, (ep, dp) in enumerate(zip(enc_files, dec_files, strict=True)):
        t = first if i == 0 else C.read_safetensors(ep)
        names = {f"W_enc_{i}", f"b_enc_{i}", f"b_dec_{i}"} | ({f"threshold_{i}"} if jump else set())
        C.check_names(t, ep, names)
        W_enc.append(C.take(t, ep, f"W_enc_{i}", [F, D], dims).T)
        b_enc.append(C.take(t, ep, f"b_enc_{i}", [F], dims))
        b_dec.append(C.take(t, ep, f"b_dec_{i}", [D], dims))
        if jump:
            thr.append(C.log_threshold(C.take(t, ep, f"threshold_{i}", [F], dims), ep,
                                       f"threshold_{i}", relu_first=False))
        d = C.read_safetensors(dp)
        C.check_names(d, dp, {f"W_dec_{i}"})
        W_dec[i, i:] = C.take(d, dp, f"W_dec_{i}", [F, L - i, D], dims).permute(1, 0, 2)
    cfg = _config(D, L, F, "clt", "jumprelu" if jump else "relu", folder)
    tensors = {"W_enc": torch.stack(W_enc), "b_enc": torch.stack(b_enc), "W_dec": W_dec,
               "b_dec": torch.stack(b_dec)}
    if jump:
        tensors["log_threshold"] = torch.stack(thr)
    return C.build_transcoder(cfg, tensors)


def _config(D: int, L: int, F: int, arch: str, activation: str, folder: Path,
            k: int | None = None, skip: bool = False) -> TranscoderConfig:
    try:
        # circuit-tracer's TopK is per layer; other activations keep the config default.
        mode = {"topk_mode": "per_layer"} if activation == "topk" else {}
        return TranscoderConfig(d_model=D, n_layers=L, n_features=F, arch=arch,
                                activation=activation, k=k, skip=skip, **mode)
    except CltEvalError as exc:
        raise CltEvalError(f"{folder}: {exc}") from None


def _set_files(folder: Path, config: dict) -> list[Path]:
    listed = config.get("transcoders")
    if listed is None:
        return _layer_files(folder, "layer_")
    where = folder / CONFIG_FILE
    require(isinstance(listed, list) and listed and all(isinstance(p, str) for p in listed),
            f"{where}: field 'transcoders' must be a list of file paths, one per layer")
    remote = [p for p in listed if "://" in p or not p.endswith(".safetensors")]
    if remote:
        raise CltEvalError(f"{where}: field 'transcoders' lists {remote[0]!r}; expected local "
                           ".safetensors files (download remote or .npz transcoders first)")
    return [folder / p for p in listed]  # an absolute p stays absolute


def _set_activation(config: dict, where: Path) -> tuple[str | None, int | None]:
    """(activation named by config.yaml or None, k); None means: decided by the weights."""
    act = config.get("activation")
    allowed = (None, "relu", "topk", "jumprelu", "jump_relu")
    require(act in allowed, f"{where}: field 'activation' is {act!r}, expected one of "
            f"{list(allowed)}")
    k = config.get("k")
    if act == "topk":
        require(isinstance(k, int) and not isinstance(k, bool) and k > 0,
                f"{where}: field 'k' is {k!r}, expected a positive integer with activation topk")
    return (None if act in ("jumprelu", "jump_relu") else act), k


def _load_set(folder: Path, config: dict) -> Transcoder:
    files = _set_files(folder, config)
    act, k = _set_activation(config, folder / CONFIG_FILE)
    L, first = len(files), C.read_safetensors(files[0])
    F, D = C.feature_dims(first, files[0], "W_enc")
    thr_name = next((n for n in (THRESHOLD, "threshold") if n in first), None)
    require(not (thr_name and act in ("relu", "topk")), f"{files[0]}: holds {thr_name!r} but "
            f"config.yaml says activation {act!r}; expected no threshold")
    skip, dims = "W_skip" in first, f"F={F}, D={D} from {files[0].name}"
    layers = []
    for i, p in enumerate(files):
        t = first if i == 0 else C.read_safetensors(p)
        required = {"W_enc", "W_dec", "b_enc", "b_dec"} | ({thr_name} if thr_name else set())
        C.check_names(t, p, required | ({"W_skip"} if skip else set()), {"k"})
        layers.append(_set_layer(t, p, F, D, thr_name, dims))
        if "k" in t and act != "relu":  # circuit-tracer's TopK writer stores k as a tensor
            k = _check_k(t["k"], k, p)
            act = "topk"
    require(not (act == "topk" and thr_name), f"{files[0]}: holds both {thr_name!r} and a "
            "TopK k; expected one activation")
    activation = act if act == "topk" else ("jumprelu" if thr_name else "relu")
    cfg = _config(D, L, F, "plt", activation, folder, k if activation == "topk" else None, skip)
    tensors = {name: torch.stack([d[name] for d in layers]) for name in layers[0]}
    W_dec = torch.zeros(L, L, F, D)
    W_dec[torch.arange(L), torch.arange(L)] = tensors.pop("W_dec_FD")
    return C.build_transcoder(cfg, tensors | {"W_dec": W_dec})


def _set_layer(t: dict, p: Path, F: int, D: int, thr_name: str | None, dims: str) -> dict:
    """One layer_{i}.safetensors in clt-eval's orientation."""
    out = {"W_enc": C.take(t, p, "W_enc", [F, D], dims).T,
           "W_dec_FD": C.take(t, p, "W_dec", [F, D], dims),
           "b_enc": C.take(t, p, "b_enc", [F], dims), "b_dec": C.take(t, p, "b_dec", [D], dims)}
    if "W_skip" in t:  # circuit-tracer applies x @ W_skip.T; clt-eval applies x @ W_skip
        out["W_skip"] = C.take(t, p, "W_skip", [D, D], dims).T
    if thr_name:
        theta = C.take(t, p, thr_name, [F], dims)
        out["log_threshold"] = C.log_threshold(theta, p, thr_name, relu_first=False)
    return out


def _check_k(t: torch.Tensor, k: int | None, path: Path) -> int:
    require(t.numel() == 1 and not t.is_floating_point() and int(t) > 0,
            f"{path}: tensor 'k' is {t.tolist()}, expected one positive integer")
    require(k is None or int(t) == k, f"{path}: tensor 'k' is {int(t)}, but config.yaml "
            f"gives k={k}; expected them to agree")
    return int(t)


# ---- writing -----------------------------------------------------------------------------
def circuit_tracer_files(tc: Transcoder, window: LayerWindow | None
                         ) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """(config.yaml contents, {file name: tensors}) for ``tc``: the CLT layout unless ``tc``
    is per-layer (its decoder mask is the identity). Checks everything; writes nothing."""
    C.single_run(tc, "circuit-tracer export")
    window = C.default_window(tc, window)
    config = {"model_kind": "transcoder_set" if C.is_per_layer(tc) else "cross_layer_transcoder"}
    if window.model_name:
        config["model_name"] = window.model_name
    config["feature_input_hook"] = _relative(window.input_hook, "input_hook")
    config["feature_output_hook"] = _relative(window.output_hook, "output_hook")
    config[LAYERS_KEY] = list(window.layers)
    if config["model_kind"] == "transcoder_set":
        return config, _set_tensors(tc, config)
    return config, _clt_tensors(tc)


def _clt_tensors(tc: Transcoder) -> dict[str, dict[str, torch.Tensor]]:
    cfg = tc.cfg
    require(not cfg.skip, "skip=True: circuit-tracer's CLT layout has no skip connection; "
            "expected a transcoder without W_skip (or a per-layer one)")
    theta = C.inference_threshold_LF(tc, "circuit-tracer's CLT layout")
    W_dec = tc.masked_W_dec()[0]
    files = {}
    for i in range(cfg.n_layers):
        enc = {f"W_enc_{i}": C.cpu32(tc.W_enc[0, i].T), f"b_enc_{i}": C.cpu32(tc.b_enc[0, i]),
               f"b_dec_{i}": C.cpu32(tc.b_dec[0, i])}
        if theta is not None:
            enc[f"threshold_{i}"] = C.cpu32(theta[i])
        files[f"W_enc_{i}.safetensors"] = enc
        files[f"W_dec_{i}.safetensors"] = {f"W_dec_{i}": C.cpu32(W_dec[i, i:].permute(1, 0, 2))}
    return files


def _set_tensors(tc: Transcoder, config: dict) -> dict[str, dict[str, torch.Tensor]]:
    cfg = tc.cfg
    theta = None
    if cfg.activation == "topk":
        # circuit-tracer's TopK is per layer; a joint top-k across layers has no equivalent.
        require(cfg.topk_mode == "per_layer" or cfg.n_layers == 1,
                "topk_mode='joint': circuit-tracer's TopK keeps k features per layer; expected "
                "topk_mode='per_layer' (or a single layer)")
        config.update(activation="topk", k=int(tc.k_R[0]))
    else:
        theta = C.inference_threshold_LF(tc, "circuit-tracer")
    files = {}
    for i in range(cfg.n_layers):
        t = {"W_enc": C.cpu32(tc.W_enc[0, i].T), "W_dec": C.cpu32(tc.W_dec[0, i, i]),
             "b_enc": C.cpu32(tc.b_enc[0, i]), "b_dec": C.cpu32(tc.b_dec[0, i])}
        if theta is not None:
            t[THRESHOLD] = C.cpu32(theta[i])
        if cfg.skip:
            t["W_skip"] = C.cpu32(tc.W_skip[0, i].T)
        files[f"layer_{i}.safetensors"] = t
    return files


def write_circuit_tracer(config: dict, files: dict[str, dict[str, torch.Tensor]],
                         folder: Path) -> None:
    """Write what ``circuit_tracer_files`` built into the (empty, temporary) ``folder``."""
    for name, tensors in files.items():
        safetensors.torch.save_file(tensors, str(folder / name))
    (folder / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
