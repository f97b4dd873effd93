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


def convert(src: str | Path, dst: str | Path, to: str) -> Path:
    """Convert the transcoder folder ``src`` into ``dst`` in format ``to`` (one of FORMATS).
    Any problem with ``src`` or the conversion raises a one-line CltEvalError before anything
    is written."""
    check_choice("to", to, FORMATS)
    src, dst = Path(src), Path(dst)
    _check_apart(src, dst)
    tc, window = load_any(src)
    return save_as(tc, window, dst, to)
