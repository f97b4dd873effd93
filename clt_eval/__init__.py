"""clt-eval: train or load per-layer (PLT) and cross-layer (CLT) transcoders and measure how
faithful they are to the circuit they replace.

The Python API mirrors the `clt-eval` commands (``clt_eval.api``): ``clt_eval.train``,
``sweep``, ``reproduce``, ``load``, ``convert``, ``attribute``, ``graph``, ``compare`` and
``patch``. ``evaluate`` and ``case_studies`` live in ``clt_eval.api`` only, because
``clt_eval.evaluate`` and ``clt_eval.case_studies`` already name a module and a package.

They load on first use (PEP 562), so ``import clt_eval`` imports neither torch nor the
training stack: a command line or a script that only needs a config pays for none of it.
"""

from __future__ import annotations

_API = ("train", "sweep", "reproduce", "load", "convert", "attribute", "graph", "compare",
        "patch")

__all__ = ["api", *_API]


def __getattr__(name: str):
    if name in _API:
        from clt_eval import api

        return getattr(api, name)
    if name == "api":
        import importlib

        return importlib.import_module("clt_eval.api")
    raise AttributeError(f"module 'clt_eval' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
