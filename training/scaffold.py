"""`clt-eval case-studies new NAME --out DIR`: write a starter package for a new case study.

The package is a working plugin from the first minute: a hand-built three-step Boolean chain,
its contract and truth-table tests, and a pyproject.toml that registers it in the
``clt_eval.case_studies`` entry-point group. The files are the templates in
``scaffold_template/`` (``*.tmpl``, so that neither Python nor ruff reads them raw) with
``{{name}}``, ``{{Class}}`` and ``{{dist}}`` filled in; the folder ``package/`` becomes the
module folder ``<name>/``.
"""

from __future__ import annotations

import importlib.util
import keyword
import os
import re
import secrets
import shutil
from pathlib import Path

from clt_eval.errors import CltEvalError, require

TEMPLATE_DIR = Path(__file__).parent / "scaffold_template"
_NAME = re.compile(r"[a-z][a-z0-9_]*")
# Names the generated module imports or defines at top level: a class of the same name would
# shadow them.
_TAKEN_CLASSES = {"Circuit", "GroundTruthLayer"}


def class_name(name: str) -> str:
    """``my_chain`` -> ``MyChain``: the factory class the entry point names."""
    return "".join(part[:1].upper() + part[1:] for part in name.split("_"))


def dist_name(name: str) -> str:
    """The distribution (pip) name of the generated package."""
    return "clt-eval-case-" + name.replace("_", "-")


def check_name(name: str) -> None:
    """One-line ``CltEvalError`` unless ``name`` can be the module and the registered name."""
    require(isinstance(name, str) and _NAME.fullmatch(name) is not None,
            f"case-study name {name!r}: expected lowercase letters, digits and underscores, "
            "starting with a letter (it becomes the module name)")
    require(not keyword.iskeyword(name),
            f"case-study name {name!r} is a Python keyword; expected another name")
    require(class_name(name) not in _TAKEN_CLASSES,
            f"case-study name {name!r}: its class {class_name(name)!r} would shadow a name "
            "the module imports; expected another name")
    # A module that already exists would shadow the new one, or be shadowed by it.
    require(importlib.util.find_spec(name) is None,
            f"case-study name {name!r}: a module of that name is already importable; "
            "expected a new name")


def render(text: str, name: str) -> str:
    for key, value in (("name", name), ("Class", class_name(name)), ("dist", dist_name(name))):
        text = text.replace("{{" + key + "}}", value)
    return text


def _target(rel: Path, name: str) -> Path:
    """Where a template file lands: ``.tmpl`` dropped, ``package/`` renamed to ``name/``."""
    parts = [name if p == "package" else p for p in rel.parts]
    parts[-1] = parts[-1].removesuffix(".tmpl")
    return Path(*parts)


def _write_all(root: Path, name: str) -> None:
    for src in sorted(TEMPLATE_DIR.rglob("*")):
        if not src.is_file() or "__pycache__" in src.parts:
            continue
        dst = root / _target(src.relative_to(TEMPLATE_DIR), name)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(render(src.read_text(encoding="utf-8"), name), encoding="utf-8")


def scaffold(name: str, out: Path) -> Path:
    """Write the starter package for case study ``name`` into the folder ``out``.

    ``out`` must not exist or be empty. The package is built in a temporary sibling folder
    and renamed into place, so a failure leaves nothing half-written. Returns ``out``.
    """
    check_name(name)
    out = Path(out)
    require(not out.exists() or (out.is_dir() and not any(out.iterdir())),
            f"--out {str(out)!r} already exists and is not an empty folder; expected a new "
            "or empty folder")
    require(TEMPLATE_DIR.is_dir(), f"template folder {str(TEMPLATE_DIR)!r} is missing; "
            "expected it installed with clt-eval (reinstall the package)")
    # Not tempfile.mkdtemp: its folder is private (0700), and the package should get the
    # user's usual permissions.
    tmp = out.parent / f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        tmp.mkdir(parents=True)
        _write_all(tmp, name)
        if out.exists():
            out.rmdir()  # empty (checked above); rename cannot replace it everywhere
        os.replace(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CltEvalError(f"--out {str(out)!r}: could not write the package "
                           f"({type(exc).__name__}: {exc})") from None
    return out
