"""Small pure helpers over per-run records, shared by the sweep's analysis and reports.

A record is {"arch", "penalty", "decoder_norm", "sparsity_coef", "k", "seed", "metrics"}.
"""

from __future__ import annotations

import math

import numpy as np

NMSE_OK = 0.05  # a run must reconstruct this well to take part in a comparison


def knob(rec: dict) -> float:
    """The sparsity setting a run was trained at: λ, or k for topk/batchtopk."""
    return rec["k"] if rec["penalty"] in ("topk", "batchtopk") else rec["sparsity_coef"]


def summarize(values: list) -> dict:
    """mean, sd and n over the defined (non-None, non-NaN) values."""
    v = np.array([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    if v.size == 0:
        return {"mean": None, "sd": None, "n": 0}
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if v.size > 1 else 0.0,
            "n": int(v.size)}
