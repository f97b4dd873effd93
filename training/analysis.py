"""Pure functions that turn per-run records into the report's tables.

A record is {"arch", "penalty", "decoder_norm", "sparsity_coef", "k", "seed", "metrics"} and
optionally "setting", the label it is reported under.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

NMSE_OK = 0.05  # a run must reconstruct this well to take part in a comparison


def setting(rec: dict) -> str:
    """The label a run is reported under: its own "setting", else penalty/decoder norm."""
    if rec.get("setting"):
        return rec["setting"]
    return rec["penalty"] if rec["decoder_norm"] == "none" else \
        f"{rec['penalty']}/{rec['decoder_norm']}"


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


def by_setting(records: list[dict]) -> dict:
    """{setting: {arch: {knob: [records over seeds]}}}."""
    out: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in records:
        out[setting(r)][r["arch"]][knob(r)].append(r)
    return out


def _mean(recs, key):
    return summarize([r["metrics"][key] for r in recs])["mean"]


def matched_pair(arch_runs: dict) -> tuple | None:
    """Pick (knob_plt, knob_clt) whose mean total L0 agree best, among well-reconstructing
    settings; ties go to the sparser pair (lower L0). None if no pair qualifies."""
    def ok(recs):
        m = _mean(recs, "nmse")
        return m is not None and m <= NMSE_OK
    plt_ok = {k: _mean(v, "l0_total") for k, v in arch_runs.get("plt", {}).items() if ok(v)}
    clt_ok = {k: _mean(v, "l0_total") for k, v in arch_runs.get("clt", {}).items() if ok(v)}
    if not plt_ok or not clt_ok:
        return None
    pairs = [(round(abs(lp - lc), 6), lp + lc, kp, kc) for kp, lp in plt_ok.items()
             for kc, lc in clt_ok.items()]
    _, _, kp, kc = min(pairs)
    return kp, kc


COMPARED = ("l0_total", "nmse", "skip_fraction", "skips", "middle_feature_recovery",
            "intervention_agreement", "output_accuracy", "offdist_mae", "sparsity_cost",
            "output_reads_inputs")


def _labels(name: str, arch_runs: dict) -> dict:
    first = next(iter(next(iter(arch_runs.values())).values()))[0]
    return {"setting": name, "penalty": first["penalty"], "decoder_norm": first["decoder_norm"]}


def matched_table(records: list[dict]) -> list[dict]:
    """One row per (setting, arch) at the matched-L0 pair of sparsity settings."""
    rows = []
    for name, arch_runs in sorted(by_setting(records).items()):
        labels = _labels(name, arch_runs)
        pair = matched_pair(arch_runs)
        if pair is None:
            rows.append(labels | {"arch": None,
                                  "note": f"no setting reconstructs with NMSE <= {NMSE_OK}"})
            continue
        for arch, kn in zip(("plt", "clt"), pair, strict=True):
            recs = arch_runs[arch][kn]
            row = labels | {"arch": arch, "knob": kn, "n_seeds": len(recs)}
            for key in COMPARED:
                row[key] = summarize([r["metrics"][key] for r in recs])
            rows.append(row)
    return rows


def setting_table(records: list[dict]) -> list[dict]:
    """Every (setting, arch, knob) with means over seeds."""
    rows = []
    for name, arch_runs in sorted(by_setting(records).items()):
        labels = _labels(name, arch_runs)
        for arch in sorted(arch_runs):
            for kn, recs in sorted(arch_runs[arch].items()):
                row = labels | {"arch": arch, "knob": kn}
                row |= {key: _mean(recs, key) for key in COMPARED}
                rows.append(row)
    return rows
