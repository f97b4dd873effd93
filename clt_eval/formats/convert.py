"""``clt-eval convert SRC DST --to FORMAT``: read a transcoder folder in any known format,
check it completely, and write it in another, atomically."""

from __future__ import annotations

from pathlib import Path

from clt_eval.errors import check_choice, require
from clt_eval.formats import FORMATS, load_any, save_as


def _check_apart(src: Path, dst: Path) -> None:
    """Replacing DST must never delete or change SRC."""
    s, d = src.resolve(), dst.resolve()
    require(s != d and d not in s.parents and s not in d.parents,
            f"{dst}: overlaps the source folder {src}; expected a destination outside it")


def convert(src: str | Path, dst: str | Path, to: str, *, n_model_layers: int | None = None,
            scan: str | None = None, feature_input_hook: str | None = None,
            feature_output_hook: str | None = None, allow_external_paths: bool = False) -> Path:
    """Convert the transcoder ``src`` (a folder, hf://… or sae_lens:…) into the folder ``dst``
    in format ``to`` (one of FORMATS). Any problem with ``src`` or the conversion raises a
    one-line CltEvalError before anything is written.

    ``n_model_layers``: the model's layer count, to pad a windowed transcoder for
    circuit-tracer; ``scan``: circuit-tracer's name for the transcoders; the hooks read a
    circuit-tracer folder without config.yaml, or stand in for a missing window on export;
    ``allow_external_paths``: let a config.yaml name files outside its folder."""
    from clt_eval.formats import hub

    check_choice("to", to, FORMATS)
    dst = Path(dst)
    if not hub.is_remote(src):
        src = Path(src)
        _check_apart(src, dst)
    tc, window = load_any(src, feature_input_hook=feature_input_hook,
                          feature_output_hook=feature_output_hook,
                          allow_external_paths=allow_external_paths)
    return save_as(tc, window, dst, to, n_model_layers=n_model_layers, scan=scan,
                   feature_input_hook=feature_input_hook, feature_output_hook=feature_output_hook)
