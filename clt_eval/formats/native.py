"""clt-eval's own format (``clt_eval.io``) with the transcoder's LayerWindow.

The window travels in ``config.json``'s ``extra["window"]`` (``LayerWindow.to_dict()``), so a
transcoder trained on model layers 4..7 still says so after a save and a load. Folders
without it (e.g. toy transcoders) load with no window.
"""

from __future__ import annotations

from pathlib import Path

from clt_eval import io
from clt_eval.errors import require
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


def load_native(path: str | Path) -> tuple[Transcoder, LayerWindow | None]:
    tc = io.load_transcoder(path)
    return tc, load_window(path, tc.cfg.n_layers)
