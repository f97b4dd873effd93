"""On-disk transcoder formats: clt-eval's own, circuit-tracer's CLT and per-layer layouts,
and sae_lens transcoder folders (docs/concepts.md §7). ``load_any`` reads any of them into a one-run
``Transcoder`` plus its ``LayerWindow``; ``save_as`` writes one atomically. Besides a folder,
``load_any`` takes ``hf://org/repo[/subfolder][@revision]`` and ``sae_lens:RELEASE/ID``
(``clt_eval.formats.hub``: downloaded into the Hugging Face cache, read from it offline).

sae_lens is imported only by the sae_lens export (it costs ~10 s).
"""

from __future__ import annotations

from pathlib import Path

from clt_eval.atomic import atomic_folder
from clt_eval.errors import check_choice
from clt_eval.formats import _common as C
from clt_eval.formats import circuit_tracer as ct
from clt_eval.formats import native, sae_lens_io
from clt_eval.formats.detect import DETECTED, detect_format, is_recognised
from clt_eval.lm.window import LayerWindow
from clt_eval.transcoder import Transcoder

FORMATS = ("clt-eval", "circuit-tracer", "sae-lens")

__all__ = ["DETECTED", "FORMATS", "detect_format", "load_any", "save_as"]


def load_any(path: str | Path, *, feature_input_hook: str | None = None,
             feature_output_hook: str | None = None, allow_external_paths: bool = False
             ) -> tuple[Transcoder, LayerWindow | None]:
    """Read a transcoder folder in any known format, checking every file and tensor.
    The window is None only for clt-eval folders saved without one.

    ``path``: a folder, ``hf://org/repo[/subfolder][@revision]`` or ``sae_lens:RELEASE/ID``.
    The hooks (block-relative, e.g. 'hook_resid_mid') let a circuit-tracer folder without
    config.yaml load; ``allow_external_paths`` lets a config.yaml name files outside its folder.
    """
    from clt_eval.formats import hub

    if hub.is_remote(path):
        return hub.load_remote(str(path), feature_input_hook=feature_input_hook,
                               feature_output_hook=feature_output_hook)
    hooks = (feature_input_hook, feature_output_hook)
    fmt = detect_format(path, hooks_given=all(hooks))
    if fmt == "clt-eval":
        return native.load_native(path)
    if fmt.startswith("circuit-tracer"):
        return ct.load_circuit_tracer(path, feature_input_hook=feature_input_hook,
                                      feature_output_hook=feature_output_hook,
                                      allow_external_paths=allow_external_paths)
    return sae_lens_io.load_sae_lens(path)


def save_as(tc: Transcoder, window: LayerWindow | None, path: str | Path, fmt: str, *,
            n_model_layers: int | None = None, scan: str | None = None,
            feature_input_hook: str | None = None, feature_output_hook: str | None = None
            ) -> Path:
    """Write the one-run ``tc`` to the folder ``path`` in ``fmt`` (one of FORMATS).

    Everything is built and checked in memory first, then written into a temporary sibling
    folder and renamed into place: a transcoder the format cannot hold writes nothing. An
    existing ``path`` is replaced only if it is empty or holds a transcoder in a known format.
    circuit-tracer gets the per-layer layout when ``tc`` is per-layer, else the CLT layout,
    one file per model layer: a window other than 0..L-1 needs ``n_model_layers`` and is padded
    with zero layers; ``scan`` names the transcoders in circuit-tracer's graphs. The hooks
    stand in for the window of a transcoder saved without one (model layers 0..L-1).
    """
    check_choice("to", fmt, FORMATS)
    target = Path(path)
    C.single_run(tc, f"{fmt} export")
    if window is None and feature_input_hook and feature_output_hook:
        window = ct.window_from_hooks(tc.cfg.n_layers, feature_input_hook, feature_output_hook)
    if fmt == "clt-eval":
        if window is not None:
            C.default_window(tc, window)  # checks its length now, before any write

        def write(folder: Path) -> None:
            native.save_native(tc, window, folder)
    elif fmt == "circuit-tracer":
        config, files = ct.circuit_tracer_files(tc, window, n_model_layers, scan)

        def write(folder: Path) -> None:
            ct.write_circuit_tracer(config, files, folder)
    else:
        window = C.default_window(tc, window)
        saes = sae_lens_io.to_sae_lens(tc, window)

        def write(folder: Path) -> None:
            sae_lens_io.write_sae_lens(saes, window.layers, folder)
    C.check_replaceable(target, is_recognised(target))
    with atomic_folder(target) as tmp:
        write(tmp)
    return target
