"""Pure functions that turn sweep records into curves, onsets and statistics.

Every number in the sweep report comes from here (over records whose metrics come from
``clt_eval.metrics``). Records are those of ``training.experiment.record``.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
from scipy import stats

from clt_eval.config import DEFAULT_ACTIVATION
from clt_eval.training.analysis import NMSE_OK, knob

RECOVERED = 0.5  # mean middle-layer recovery below this: the middle step counts as gone
KEEPS_B = 0.75  # a run "keeps B" when it recovers 3 in 4 of the middle-step features


def label(spec: dict) -> str:
    """A setting's name: penalty/decoder norm, plus whatever else is not the default."""
    name = spec["penalty"] if spec["decoder_norm"] == "none" else \
        f"{spec['penalty']}/{spec['decoder_norm']}"
    act = spec.get("activation")
    if act and act != DEFAULT_ACTIVATION[spec["penalty"]]:
        name += f" +{act}"
    if spec.get("cross_layer_coef"):
        name += f" +κ={spec['cross_layer_coef']:g}"
    return name


def groups(records: list[dict], width: int | None = None) -> dict:
    """{(setting label, arch): {knob: [records over seeds]}}, optionally at one width."""
    out: dict = defaultdict(lambda: defaultdict(list))
    for r in records:
        if width is None or r["spec"]["n_features"] == width:
            out[(label(r["spec"]), r["arch"])][knob(r)].append(r)
    return out


def values(recs: list[dict], key: str) -> np.ndarray:
    v = [r["metrics"].get(key) for r in recs]
    return np.array([x for x in v if x is not None and not math.isnan(x)], dtype=float)


def mean_ci(v: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    """Mean and 95% bootstrap interval over seeds (percentile method: robust with 3-10
    seeds, where BCa's acceleration estimate is unstable). A constant sample has a zero-width
    interval; an empty one is all NaN."""
    if v.size == 0:
        return (math.nan,) * 3
    m = float(v.mean())
    if v.size < 2 or np.ptp(v) == 0:
        return m, m, m
    res = stats.bootstrap((v,), np.mean, n_resamples=2000, confidence_level=0.95,
                          method="percentile", random_state=np.random.default_rng(seed))
    return m, float(res.confidence_interval.low), float(res.confidence_interval.high)


def curves(records: list[dict], metric: str, width: int) -> dict:
    """{(setting, arch): [{"knob", "l0", "mean", "lo", "hi", "n"}]} sorted by knob."""
    out = {}
    for key, by_knob in groups(records, width).items():
        pts = []
        for kn, recs in sorted(by_knob.items()):
            m, lo, hi = mean_ci(values(recs, metric))
            pts.append({"knob": kn, "l0": float(values(recs, "l0_total").mean()), "mean": m,
                        "lo": lo, "hi": hi, "n": len(recs)})
        out[key] = pts
    return out


def disappearance(records: list[dict], width: int) -> list[dict]:
    """Per (setting, arch): the first knob from which mean middle-layer recovery stays below
    RECOVERED, the L0 and cross-layer share there, and recovery at the smallest knob."""
    rows = []
    rec = curves(records, "middle_feature_recovery", width)
    share = curves(records, "cross_layer_share", width)
    for key, pts in sorted(rec.items()):
        gone = [i for i in range(len(pts)) if all(p["mean"] < RECOVERED for p in pts[i:])]
        first = gone[0] if gone else None
        row = {"setting": key[0], "arch": key[1], "recovery_at_min": pts[0]["mean"],
               "recovery_at_max": pts[-1]["mean"], "gone_at": None, "l0_at": None,
               "cross_share_at": None}
        if first is not None and first > 0:
            row |= {"gone_at": pts[first]["knob"], "l0_at": pts[first]["l0"],
                    "cross_share_at": share[key][first]["mean"]}
        elif first == 0:
            row["gone_at"] = "never recovered"
        rows.append(row)
    return rows


def width_onset(records: list[dict]) -> list[dict]:
    """Per (setting, knob) of CLT runs trained at several widths: the share of seeds that
    skip at each width, and the narrowest width where any / most seeds skip."""
    acc: dict = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r["arch"] == "clt":
            acc[(label(r["spec"]), knob(r))][r["spec"]["n_features"]].append(r)
    rows = []
    for (name, kn), by_w in sorted(acc.items()):
        if len(by_w) < 2:
            continue
        share = {w: float(values(v, "skips").mean()) for w, v in sorted(by_w.items())}
        nmse = {w: float(values(v, "nmse").mean()) for w, v in sorted(by_w.items())}
        rows.append({"setting": name, "knob": kn, "skip_share": share, "nmse": nmse,
                     "any_from": next((w for w, s in share.items() if s > 0), None),
                     "most_from": next((w for w, s in share.items() if s > 0.5), None)})
    return rows


def compare(a: np.ndarray, b: np.ndarray) -> dict:
    """b vs a across seeds: difference of means, Cliff's delta (P(b > a) − P(b < a), a rank
    effect size that suits bounded, tied metrics like these), and the two-sided Mann–Whitney
    U test's p-value (NaN when either side is empty or every value is tied)."""
    if a.size == 0 or b.size == 0:
        return {"diff": math.nan, "cliffs_delta": math.nan, "p": math.nan}
    gt = (b[:, None] > a[None, :]).mean()
    lt = (b[:, None] < a[None, :]).mean()
    p = math.nan
    if np.ptp(np.concatenate([a, b])) > 0:
        p = float(stats.mannwhitneyu(b, a, alternative="two-sided").pvalue)
    return {"diff": float(b.mean() - a.mean()), "cliffs_delta": float(gt - lt), "p": p}


def fisher_skip(a_skips: np.ndarray, b_skips: np.ndarray) -> float:
    """Fisher's exact test on the counts of seeds that skip (p-value; NaN if empty)."""
    if a_skips.size == 0 or b_skips.size == 0:
        return math.nan
    table = [[int(a_skips.sum()), int(a_skips.size - a_skips.sum())],
             [int(b_skips.sum()), int(b_skips.size - b_skips.sum())]]
    return float(stats.fisher_exact(table).pvalue)


METRICS = ("l0_total", "nmse", "skip_fraction", "skips", "middle_feature_recovery",
           "intervention_agreement", "cross_layer_share", "circuit_edge_precision",
           "circuit_edge_recall", "shortcut_edges", "missing_middle_edges", "path_depth")


PER_LAYER = ("skip_fraction_per_layer", "middle_feature_recovery_per_layer")


def point_summary(recs: list[dict]) -> dict:
    return {k: float(values(recs, k).mean()) if values(recs, k).size else None
            for k in METRICS} | {"n": len(recs)}


def per_layer_means(recs: list[dict], key: str) -> list[float | None]:
    """Mean over runs of a per-layer metric (a list per run, None where undefined)."""
    lists = [r["metrics"].get(key) for r in recs if r["metrics"].get(key) is not None]
    if not lists:
        return []
    out = []
    for col in zip(*lists, strict=False):
        vals = [v for v in col if v is not None and not math.isnan(v)]
        out.append(float(np.mean(vals)) if vals else None)
    return out


# A matched point whose seeds' mean total L0 lies further than this share of the target from it
# is reported as not matched (the L0 curve jumps over the target, or k is an integer).
MATCH_TOL = 0.1


def matched_rows(matched: dict, by_id: dict) -> list[dict]:
    """One row per matched point (setting, arch, target) with its metrics over seeds, and
    where the search found L0 crossing the target (``crossing``)."""
    rows = []
    for p in matched["points"]:
        row = {"setting": label(p["setting"] | {"arch": p["arch"]}), "arch": p["arch"],
               "target": p["target"], "status": p["status"]}
        if "run_ids" in p:
            recs = [by_id[i] for i in p["run_ids"]]
            knob_found = p.get("k") or p["lambda"]
            row |= {"knob": knob_found, "recs": recs} | point_summary(recs)
            row |= {k: per_layer_means(recs, k) for k in PER_LAYER}
            row["crossing"] = crossing(p.get("tried") or [], p["target"], knob_found)
            row["search_l0"] = p.get("bisection_l0")
        rows.append(row)
    return sorted(rows, key=lambda r: (r["setting"], r["target"], r["arch"]))


def crossing(tried: list, target: float, near: float) -> list[float] | None:
    """[knob a, L0 a, knob b, L0 b]: the neighbouring tried points (in knob order) between
    whose mean L0 the target lies, the pair nearest ``near`` (the knob chosen); None if the
    tried points never cross it."""
    pts = sorted((float(k), float(v)) for k, v in tried if v is not None)
    cross = [i for i in range(len(pts) - 1)
             if min(pts[i][1], pts[i + 1][1]) <= target <= max(pts[i][1], pts[i + 1][1])]
    if not cross:
        return None
    at = min(range(len(pts)), key=lambda i: abs(pts[i][0] - near))
    i = min(cross, key=lambda i: min(abs(i - at), abs(i + 1 - at)))
    return [*pts[i], *pts[i + 1]]


def unmatched(rows: list[dict]) -> list[dict]:
    """Matched points whose seeds' mean L0 misses the target by more than ``MATCH_TOL``."""
    return [r for r in rows if "recs" in r and r.get("l0_total") is not None
            and abs(r["l0_total"] - r["target"]) > MATCH_TOL * r["target"]]


def plt_vs_clt(rows: list[dict]) -> list[dict]:
    """At each matched target: CLT against PLT of the same setting."""
    by = {(r["setting"], r["arch"], r["target"]): r for r in rows if "recs" in r}
    out = []
    for (name, arch, target), clt in sorted(by.items(), key=lambda kv: repr(kv[0])):
        plt = by.get((name, "plt", target))
        if arch != "clt" or plt is None:
            continue
        out.append(_versus(name, target, plt, clt, "PLT", "CLT"))
    return out


def mitigations(rows: list[dict]) -> list[dict]:
    """CLT under each decoder norm / mitigation against the concatenated-norm CLT of the same
    penalty, at the same target L0."""
    clt = {(r["setting"], r["target"]): r for r in rows if r["arch"] == "clt" and "recs" in r}
    out = []
    for (name, target), r in sorted(clt.items(), key=lambda kv: repr(kv[0])):
        pen = name.split("/")[0].split(" ")[0]
        base = clt.get((f"{pen}/concatenated", target))
        if base is None or base is r:
            continue
        out.append(_versus(name, target, base, r, f"{pen}/concatenated", name))
    return out


def _versus(name, target, a, b, a_name, b_name) -> dict:
    row = {"setting": name, "target": target, "a": a_name, "b": b_name,
           "a_summary": {k: v for k, v in a.items() if k != "recs"},
           "b_summary": {k: v for k, v in b.items() if k != "recs"}}
    for key in ("middle_feature_recovery", "skip_fraction", "nmse"):
        row[key] = compare(values(a["recs"], key), values(b["recs"], key))
    row["skip_p_fisher"] = fisher_skip(values(a["recs"], "skips"), values(b["recs"], "skips"))
    row["b_keeps_b"] = bool((b["middle_feature_recovery"] or 0) >= KEEPS_B
                            and (b["nmse"] if b["nmse"] is not None else 1) <= NMSE_OK)
    return row
