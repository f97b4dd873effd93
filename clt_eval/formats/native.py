"""clt-eval's own format (``clt_eval.io``) with the transcoder's LayerWindow.

The window travels in ``config.json``'s ``extra["window"]`` (``LayerWindow.to_dict()``), so a
transcoder trained on model layers 4..7 still says so after a save and a load. A toy
transcoder saved with ``extra["case_study"]`` gets the window of that case study's hooks (so an
export names the hooks it was trained on, e.g. ``blocks.{layer}.hook_resid_mid``); other folders
without a window load with none.
"""

from __future__ import annotations

import re
from pathlib import Path

from clt_eval import io
from clt_eval.errors import CltEvalError, require
from clt_eval.lm.window import LayerWindow
from clt_eval.transcoder import Transcoder

WINDOW_KEY = "window"


def save_native(tc: Transcoder, window: LayerWindow | None, path: str | Path,
                extra: dict | None = None) -> Path:
    """``io.save_transcoder`` with ``window`` stored under ``extra["window"]``."""
    extra = dict(extra or {})
    if window is not None:
        require(window.n_layers == tc.cfg.n_layers, f"window: has {window.n_layers} layers "
                f"{list(window.layers)}, expected {tc.cfg.n_layers} (the transcoder's n_layers)")
        extra[WINDOW_KEY] = window.to_dict()
    return io.save_transcoder(tc, path, extra=extra)


def load_window(path: str | Path, n_layers: int) -> LayerWindow | None:
    """The window saved with a clt-eval transcoder folder, checked against its n_layers."""
    data = io.load_extra(path).get(WINDOW_KEY)
    if data is None:
        return None
    where = f"{Path(path) / io.CONFIG_FILE}: extra.window"
    window = LayerWindow.from_dict(data, source=where)
    require(window.n_layers == n_layers, f"{where}: has {window.n_layers} layers, expected "
            f"{n_layers} (the transcoder's n_layers)")
    return window


def window_from_hook_names(inputs, outputs) -> LayerWindow | None:
    """The window whose hooks are ``inputs``/``outputs`` ('blocks.<layer>.<hook>', one hook
    per layer, the same layers); None when they do not have that form."""
    def split(names):
        found = [re.fullmatch(r"blocks\.(\d+)\.(.+)", n) for n in names]
        if not names or not all(found) or len({m.group(2) for m in found}) != 1:
            return None
        return tuple(int(m.group(1)) for m in found), "blocks.{layer}." + found[0].group(2)
    a, b = split(list(inputs)), split(list(outputs))
    if a is None or b is None or a[0] != b[0] or list(a[0]) != sorted(set(a[0])):
        return None
    return LayerWindow(a[0], a[1], b[1])


def _case_study_window(path: str | Path, n_layers: int) -> LayerWindow | None:
    spec = io.load_extra(path).get("case_study")
    if not isinstance(spec, str):
        return None
    from clt_eval.case_study import load_case_study, parse_name

    try:
        # Registered names only: a folder (perhaps downloaded) must not make us import an
        # arbitrary module:Factory it names.
        if ":" in parse_name(spec)[0]:
            return None
        case = load_case_study(spec)
    except (CltEvalError, ImportError):  # an unknown plugin: the folder still loads
        return None
    window = window_from_hook_names(getattr(case, "input_hooks", ()),
                                    getattr(case, "output_hooks", ()))
    return window if window is not None and window.n_layers == n_layers else None


def load_native(path: str | Path) -> tuple[Transcoder, LayerWindow | None]:
    tc = io.load_transcoder(path)
    window = load_window(path, tc.cfg.n_layers)
    return tc, window or _case_study_window(path, tc.cfg.n_layers)
