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

circuit-tracer's loaders (``load_transcoders`` / ``load_transcoder_set`` / ``load_clt``) read
``model_kind``, ``feature_input_hook``, ``feature_output_hook`` and ``scan`` (the name a graph
records for the transcoders), a transcoder set's ``transcoders`` list (``hf://`` URIs or local
paths; circuit-tracer resolves a relative path against its working directory, so a folder we
write loads there as-is when uploaded with hf:// entries or read from inside it), and
``model_name`` names the model. It numbers files by *model* layer: file i replaces model layer
i's MLP and every model layer needs one. A windowed transcoder (model layers 10..13 of 30) is
therefore written padded with all-zero layers, whose features never fire, so circuit-tracer's
error node there is the whole MLP output, as clt-eval treats layers outside a window.

clt-eval adds two keys circuit-tracer ignores: ``clt_eval_layers``, the model layer of each
file (files without it cover model layers 0..L-1), and, for a padded export,
``clt_eval_window``, the layers that hold the transcoder, which clt-eval keeps on reading.
Folders circuit-tracer's own ``to_safetensors`` wrote have no config.yaml; they load when the
two hooks are given. A ``transcoders`` entry that is absolute or climbs out of the folder with
``..`` is refused unless ``allow_external_paths`` (a config file must not make clt-eval read
arbitrary files).

circuit-tracer's TopK keeps the k largest raw pre-activations; clt-eval's keeps the k largest
after ReLU. They differ only where fewer than k pre-activations of a layer are positive.
"""

from __future__ import annotations

import dataclasses
import os
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
WINDOW_KEY = "clt_eval_window"
HOOK_KEYS = ("feature_input_hook", "feature_output_hook")
THRESHOLD = "activation_function.threshold"  # what circuit-tracer's SingleLayerTranscoder saves
BLOCK = "blocks.{layer}."


# ---- config.yaml -------------------------------------------------------------------------
def read_config(folder: Path, hooks: tuple[str | None, str | None] = (None, None)) -> dict:
    """config.yaml, checked. ``hooks`` (feature_input_hook, feature_output_hook) fill fields the
    file lacks; without a config.yaml they and the file names (W_enc_* or layer_*) make one."""
    path = folder / CONFIG_FILE
    if not path.is_file() and all(hooks):
        data = {"model_kind": _kind_from_files(folder)}
    else:
        require(path.is_file(), f"{path}: missing; a circuit-tracer folder needs it to name "
                "model_kind, feature_input_hook and feature_output_hook (or give both hooks: "
                "feature_input_hook / feature_output_hook)")
        data = _read_yaml(path)
    for key, given in zip(HOOK_KEYS, hooks, strict=True):
        if given is None:
            continue
        have = data.get(key)
        same = have is None or (isinstance(have, str) and _template(have, path, key)
                                == _template(given, path, key))
        require(same, f"{path}: field {key!r} is {have!r} but {key}={given!r} was given; "
                "expected them to agree")
        data[key] = given
    kind = data.get("model_kind")
    require(kind in MODEL_KINDS, f"{path}: field 'model_kind' is {kind!r}, expected one of "
            f"{sorted(MODEL_KINDS)}")
    for key in HOOK_KEYS:
        require(isinstance(data.get(key), str) and data[key],
                f"{path}: field {key!r} is {data.get(key)!r}, expected a hook name such as "
                "'hook_resid_mid' or 'hook_mlp_out'")
    return data


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, ValueError, yaml.YAMLError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CltEvalError(f"{path}: not valid YAML ({first})") from None
    require(isinstance(data, dict), f"{path}: expected a YAML mapping")
    return data


def _kind_from_files(folder: Path) -> str:
    if any(folder.glob("W_enc_*.safetensors")):
        return "cross_layer_transcoder"
    require(any(folder.glob("layer_*.safetensors")), f"{folder}: no W_enc_<layer>.safetensors "
            "or layer_<layer>.safetensors files; expected a circuit-tracer transcoder folder")
    return "transcoder_set"


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


def _stored_layers(config: dict, n_layers: int, path: Path) -> list[int]:
    layers = config.get(LAYERS_KEY, list(range(n_layers)))
    require(isinstance(layers, list) and len(layers) == n_layers,
            f"{path}: field {LAYERS_KEY!r} is {layers!r}, expected a list of {n_layers} model "
            "layers (one per transcoder layer)")
    # In file order: a CLT's W_dec_i holds blocks to the files after i.
    require(all(isinstance(m, int) and not isinstance(m, bool) for m in layers)
            and layers == sorted(set(layers)), f"{path}: field {LAYERS_KEY!r} is {layers!r}, "
            "expected distinct model layers in increasing order")
    return layers


def _kept(config: dict, stored: list[int], path: Path) -> list[int]:
    """Indices of the stored layers that hold the transcoder (all but a padded export's zeros)."""
    window = config.get(WINDOW_KEY)
    if window is None:
        return list(range(len(stored)))
    require(isinstance(window, list) and window and all(w in stored for w in window),
            f"{path}: field {WINDOW_KEY!r} is {window!r}, expected a non-empty list of layers "
            f"among {LAYERS_KEY} {stored}")
    return [stored.index(w) for w in window]


def _window(config: dict, layers: list[int], path: Path) -> LayerWindow:
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


def load_circuit_tracer(path: str | Path, *, feature_input_hook: str | None = None,
                        feature_output_hook: str | None = None,
                        allow_external_paths: bool = False,
                        files: list[Path] | None = None) -> tuple[Transcoder, LayerWindow]:
    """Read a circuit-tracer CLT or transcoder-set folder into a one-run Transcoder.

    The hooks fill in (or must agree with) config.yaml's; with both, a folder without a
    config.yaml loads too. ``files``: a transcoder set's layer files already resolved (by the
    hub loader), used instead of config.yaml's ``transcoders`` list."""
    folder = Path(path)
    require(folder.is_dir(), f"{folder}: missing; expected a circuit-tracer transcoder folder")
    config = read_config(folder, (feature_input_hook, feature_output_hook))
    where = folder / CONFIG_FILE
    if MODEL_KINDS[config["model_kind"]] == "clt":
        enc_files = _layer_files(folder, "W_enc_")
        stored = _stored_layers(config, len(enc_files), where)
        keep = _kept(config, stored, where)
        tc = _load_clt(folder, enc_files, keep)
    else:
        files = files or _set_files(folder, config, allow_external_paths)
        arch, tensors = _load_set(folder, config, files)
        stored = _stored_layers(config, len(files), where)
        keep = _kept(config, stored, where)
        cfg = dataclasses.replace(arch, n_layers=len(keep))
        tc = C.build_transcoder(cfg, {name: t[keep] for name, t in tensors.items()})
    return tc, _window(config, [stored[i] for i in keep], where)


@torch.no_grad()
def _load_clt(folder: Path, enc_files: list[Path], keep: list[int]) -> Transcoder:
    """The CLT's layers ``keep``, read lazily: the transcoder is allocated once, uninitialised,
    and each stored tensor is checked and copied into it a slice at a time (circuit-tracer's
    W_dec_i [F, L-i, D] is already the per-source layout), so loading needs about the
    transcoder's own size. Layers outside ``keep`` (a padded export's zeros) are checked only."""
    L = len(enc_files)
    dec_files = _layer_files(folder, "W_dec_", L)
    first = C.read_header(enc_files[0])
    F, D = C.feature_dims(first, enc_files[0], "W_enc_0")
    jump = "threshold_0" in first
    tc = Transcoder([_config(D, len(keep), F, "clt", "jumprelu" if jump else "relu", folder)],
                    init=False)
    dims = f"F={F}, D={D} from {enc_files[0].name}, L={L} from the number of W_enc_* files"
    for i, (ep, dp) in enumerate(zip(enc_files, dec_files, strict=True)):
        j = keep.index(i) if i in keep else None
        h = first if i == 0 else C.read_header(ep)
        names = {f"W_enc_{i}", f"b_enc_{i}", f"b_dec_{i}"} | ({f"threshold_{i}"} if jump else set())
        C.check_names(h, ep, names)
        kept = j is not None
        C.fill(tc.W_enc[0, j].T if kept else None, h, ep, f"W_enc_{i}", [F, D], dims)
        C.fill(tc.b_enc[0, j] if kept else None, h, ep, f"b_enc_{i}", [F], dims)
        C.fill(tc.b_dec[0, j] if kept else None, h, ep, f"b_dec_{i}", [D], dims)
        if jump:
            theta = C.read(h, ep, f"threshold_{i}", [F], dims)
            log_theta = C.log_threshold(theta, ep, f"threshold_{i}", relu_first=False)
            if kept:
                tc.log_threshold[0, j] = log_theta
        d = C.read_header(dp)
        C.check_names(d, dp, {f"W_dec_{i}"})
        C.fill(tc.decoder_params()[j][0] if kept else None, d, dp, f"W_dec_{i}",
               [F, L - i, D], dims, pick=_targets_picker(keep[j:] if kept else [], i, L))
    return tc.eval()


def _targets_picker(targets: list[int], i: int, L: int):
    """From rows of W_dec_i [n, L-i, D], the blocks to the kept ``targets`` (None: all)."""
    cols = [t - i for t in targets]
    return None if cols == list(range(L - i)) else (lambda rows: rows[:, cols])


def _config(D: int, L: int, F: int, arch: str, activation: str, folder: Path,
            k: int | None = None, skip: bool = False) -> TranscoderConfig:
    try:
        # circuit-tracer's TopK is per layer; other activations keep the config default.
        mode = {"topk_mode": "per_layer"} if activation == "topk" else {}
        return TranscoderConfig(d_model=D, n_layers=L, n_features=F, arch=arch,
                                activation=activation, k=k, skip=skip, **mode)
    except CltEvalError as exc:
        raise CltEvalError(f"{folder}: {exc}") from None


def _set_files(folder: Path, config: dict, allow_external_paths: bool = False) -> list[Path]:
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
    outside = [p for p in listed if leaves_folder(p)]
    if outside and not allow_external_paths:
        raise CltEvalError(f"{where}: field 'transcoders' lists {outside[0]!r}, outside the "
                           "folder; expected paths inside it (pass allow_external_paths=True / "
                           "--allow-external-paths if you trust this file)")
    return [folder / p for p in listed]  # an absolute p stays absolute


def leaves_folder(entry: str) -> bool:
    """Whether a path named in a config file is absolute or climbs out of its folder (read
    as written: ``a/../../b`` climbs out even if ``a`` is a link)."""
    norm = os.path.normpath(entry)
    return os.path.isabs(entry) or norm == ".." or norm.startswith(".." + os.sep)


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


def _load_set(folder: Path, config: dict, files: list[Path]
              ) -> tuple[TranscoderConfig, dict[str, torch.Tensor]]:
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
    return cfg, tensors | {"W_dec_own": tensors.pop("W_dec_FD")}


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
def window_from_hooks(n_layers: int, feature_input_hook: str, feature_output_hook: str,
                      model_name: str | None = None) -> LayerWindow:
    """Model layers 0..L-1 with the given hooks (block-relative or 'blocks.{layer}.' templates)."""
    where = Path("hooks")
    return LayerWindow(tuple(range(n_layers)),
                       _template(feature_input_hook, where, "feature_input_hook"),
                       _template(feature_output_hook, where, "feature_output_hook"), model_name)


def _model_layers(window: LayerWindow, n_model_layers: int | None) -> list[int]:
    """The model layers the files cover: the window itself when it is 0..L-1, else 0..M-1."""
    if n_model_layers is None:
        require(list(window.layers) == list(range(window.n_layers)),
                f"window layers {list(window.layers)}: circuit-tracer needs a transcoder for "
                "every model layer from 0; expected n_model_layers (--n-model-layers), the "
                "model's layer count, to pad the others with zeros")
        return list(window.layers)
    M = n_model_layers
    require(isinstance(M, int) and not isinstance(M, bool) and M > max(window.layers),
            f"n_model_layers={M!r}: expected an integer above the window's last layer "
            f"{max(window.layers)}")
    return list(range(M))


def circuit_tracer_files(tc: Transcoder, window: LayerWindow | None,
                         n_model_layers: int | None = None, scan: str | None = None
                         ) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """(config.yaml contents, {file name: tensors}) for ``tc``: the CLT layout unless ``tc``
    is per-layer (its decoder mask is the identity), one file per model layer (module
    docstring: a window is padded with zero layers). Checks everything; writes nothing."""
    C.single_run(tc, "circuit-tracer export")
    require(window is not None, "circuit-tracer export: the transcoder was saved without a "
            "window, so the hooks it was trained on are unknown; expected feature_input_hook "
            "and feature_output_hook (--feature-input-hook / --feature-output-hook)")
    window = C.default_window(tc, window)
    model_layers = _model_layers(window, n_model_layers)
    plt = C.is_per_layer(tc)
    config = {"model_kind": "transcoder_set" if plt else "cross_layer_transcoder"}
    if window.model_name:
        config["model_name"] = window.model_name
    config["scan"] = scan or f"{window.model_name or 'model'}/clt-eval-{'plt' if plt else 'clt'}"
    config["feature_input_hook"] = _relative(window.input_hook, "input_hook")
    config["feature_output_hook"] = _relative(window.output_hook, "output_hook")
    index = {m: ell for ell, m in enumerate(window.layers)}
    if plt:
        files = _set_tensors(tc, config, model_layers, index)
        config["transcoders"] = list(files)
    else:
        files = _clt_tensors(tc, model_layers, index)
    config[LAYERS_KEY] = model_layers
    if len(model_layers) != window.n_layers:
        config[WINDOW_KEY] = list(window.layers)
    return config, files


def _clt_tensors(tc: Transcoder, model_layers: list[int], index: dict[int, int]
                 ) -> dict[str, dict[str, torch.Tensor]]:
    """W_enc_i / W_dec_i per model layer i; layers outside the window are zeros (their
    features never fire: pre-activation 0, threshold 0)."""
    cfg = tc.cfg
    require(not cfg.skip, "skip=True: circuit-tracer's CLT layout has no skip connection; "
            "expected a transcoder without W_skip (or a per-layer one)")
    theta = C.inference_threshold_LF(tc, "circuit-tracer's CLT layout")
    F, D, M = cfg.n_features, cfg.d_model, len(model_layers)
    files = {}
    for i, m in enumerate(model_layers):
        s = index.get(m)
        enc = {f"W_enc_{i}": torch.zeros(F, D), f"b_enc_{i}": torch.zeros(F),
               f"b_dec_{i}": torch.zeros(D)}
        dec = (_clt_decoder(tc, s, list(index)[s:], model_layers, i) if s is not None
               else torch.zeros(F, M - i, D))
        if s is not None:
            enc = {f"W_enc_{i}": C.cpu32(tc.W_enc[0, s].T), f"b_enc_{i}": C.cpu32(tc.b_enc[0, s]),
                   f"b_dec_{i}": C.cpu32(tc.b_dec[0, s])}
        if theta is not None:
            enc[f"threshold_{i}"] = C.cpu32(theta[s]) if s is not None else torch.zeros(F)
        files[f"W_enc_{i}.safetensors"] = enc
        files[f"W_dec_{i}.safetensors"] = {f"W_dec_{i}": dec}
    return files


def _clt_decoder(tc: Transcoder, s: int, targets: list[int], model_layers: list[int], i: int
                 ) -> torch.Tensor:
    """W_dec_i [F, M-i, D] from source s's stored blocks to the model layers ``targets``
    (model layer i holds window layer s); a padded export's slots for model layers outside
    the window stay zero."""
    W = tc.decoder_from(s)[0].detach()
    cols = [model_layers.index(m) - i for m in targets]
    if cols == list(range(len(model_layers) - i)):
        return C.cpu32(W)
    dec = torch.zeros(W.shape[0], len(model_layers) - i, W.shape[2])
    dec[:, cols] = W.to("cpu", torch.float32)
    return dec


def _set_tensors(tc: Transcoder, config: dict, model_layers: list[int], index: dict[int, int]
                 ) -> dict[str, dict[str, torch.Tensor]]:
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
    F, D = cfg.n_features, cfg.d_model
    files = {}
    for i, m in enumerate(model_layers):
        s = index.get(m)
        if s is None:  # padding: a transcoder that writes nothing
            t = {"W_enc": torch.zeros(F, D), "W_dec": torch.zeros(F, D),
                 "b_enc": torch.zeros(F), "b_dec": torch.zeros(D)}
            t |= {THRESHOLD: torch.zeros(F)} if theta is not None else {}
            t |= {"W_skip": torch.zeros(D, D)} if cfg.skip else {}
        else:
            t = {"W_enc": C.cpu32(tc.W_enc[0, s].T), "W_dec": C.cpu32(tc.decoder_block(s, s)[0]),
                 "b_enc": C.cpu32(tc.b_enc[0, s]), "b_dec": C.cpu32(tc.b_dec[0, s])}
            if theta is not None:
                t[THRESHOLD] = C.cpu32(theta[s])
            if cfg.skip:
                t["W_skip"] = C.cpu32(tc.W_skip[0, s].T)
        files[f"layer_{i}.safetensors"] = t
    return files


def write_circuit_tracer(config: dict, files: dict[str, dict[str, torch.Tensor]],
                         folder: Path) -> None:
    """Write what ``circuit_tracer_files`` built into the (empty, temporary) ``folder``."""
    for name, tensors in files.items():
        safetensors.torch.save_file(tensors, str(folder / name))
    (folder / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
