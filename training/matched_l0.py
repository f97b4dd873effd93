"""Matched-L0 search: the λ at which a setting reaches a requested total L0 per sample.

The same λ gives PLT and CLT different sparsity (docs/concepts.md §3), so they are compared
where they reach the same L0. L0 falls as λ grows, so the λ for a target is found by bisection in
log λ inside the pair of neighbouring grid points that brackets the target; each bisection
point trains a few seeds and uses their mean L0. The points of all brackets train as one
ensemble, two bisection steps at a time (``bisect_log``'s look-ahead).
The λ whose mean L0 came closest to the target is then trained with more seeds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from clt_eval.training.analysis import knob
from clt_eval.training.experiment import run_id

Knob = tuple  # (setting key, arch, target)


@dataclass(frozen=True)
class Bracket:
    """lo < hi in λ with f(lo) ≥ target ≥ f(hi) for a decreasing f; every point tried."""

    lo: float
    hi: float
    tried: tuple[tuple[float, float], ...]  # (λ, f(λ))

    def midpoint(self) -> float:
        return math.sqrt(self.lo * self.hi)  # bisection in log λ: λ spans decades

    def update(self, lam: float, value: float, target: float) -> Bracket:
        tried = (*self.tried, (lam, value))
        return replace(self, lo=lam, tried=tried) if value >= target else \
            replace(self, hi=lam, tried=tried)

    def best(self, target: float) -> tuple[float, float]:
        """The tried (λ, f) closest to the target; ties go to the smaller λ."""
        return min(self.tried, key=lambda p: (abs(p[1] - target), p[0]))


def initial_bracket(points: list[tuple[float, float]], target: float) -> Bracket | None:
    """From (λ, f) grid points, the first neighbouring pair with f(lo) ≥ target ≥ f(hi);
    None when the grid never crosses the target (it is out of the grid's range)."""
    pts = sorted(points)
    for (l0, f0), (l1, f1) in zip(pts, pts[1:], strict=False):
        if f0 >= target >= f1:
            return Bracket(l0, l1, tuple(pts))
    return None


def bisect_log(f: Callable[[list[list[float]]], list[list[float]]], brackets: list[Bracket],
               targets: list[float], iterations: int, ahead: bool = True) -> list[Bracket]:
    """Bisect every bracket at once: ``f`` maps a list of λ per bracket to their values in
    one call (one ensemble in the sweep).

    ``ahead``: each call but maybe the last also tries both midpoints the next step may
    need, so two steps take one call. The brackets, and every λ they try, are the plain
    bisection's; the midpoint not taken is trained for nothing. In a sweep that pays: an
    ensemble step costs ~10 ms plus ~0.1 ms a run (docs/concepts.md §8.6), so one ensemble
    of 3n runs (~10 + 0.3n ms) costs less than two of n (~20 + 0.2n ms) while n < 100."""
    done = 0
    while done < iterations:
        mids = [b.midpoint() for b in brackets]
        two = ahead and done + 1 < iterations
        # The next midpoint is sqrt(mid·hi) if the value reaches the target, else sqrt(lo·mid):
        # the very products ``midpoint`` forms then, so the floats (and run ids) match.
        lams = [[m, math.sqrt(m * b.hi), math.sqrt(b.lo * m)] if two else [m]
                for b, m in zip(brackets, mids, strict=True)]
        values = f(lams)
        new = []
        for b, row, vals, t in zip(brackets, lams, values, targets, strict=True):
            b = b.update(row[0], vals[0], t)
            if two:
                i = 1 if b.lo == row[0] else 2
                b = b.update(row[i], vals[i], t)
            new.append(b)
        brackets = new
        done += 2 if two else 1
    return brackets


# ---- the search inside a sweep ---------------------------------------------------------
def setting_key(spec) -> tuple:
    """What identifies a setting across arch, λ, seed: every other RunSpec field."""
    d = spec.to_dict()
    for name in ("arch", "sparsity_coef", "seed", "k"):
        d.pop(name)
    return tuple(sorted(d.items()))


def matched_l0_search(runner, spec, grid_records: list[dict]) -> dict:
    """Bisect λ for every (λ-based setting, arch, target) at the matched width, then train
    the λ found with ``seeds`` seeds. TopK/BatchTopK fix L0 by k instead: the grid's k
    whose mean L0 is closest to the target is used. Returns a JSON-ready summary."""
    m = spec.matched_l0
    targets = scaled_targets(m, runner.case)
    curves = _extend(runner, m, _grid_curves(grid_records, m.n_features), targets)
    out, keys, brackets = _plan(curves, targets)

    def mean_l0(lams: list[list[float]]) -> list[list[float]]:
        specs = [[[_with(base, arch, lam, s) for s in range(m.bisect_seeds)] for lam in row]
                 for (base, arch, _, _), row in zip(keys, lams, strict=True)]
        # Two targets in one bracket share a midpoint at first: train it once.
        recs = runner.run(list(dict.fromkeys(s for row in specs for point in row
                                             for s in point)), "matched-L0 bisection")
        by_id = {r["run_id"]: r["metrics"]["l0_total"] for r in recs}
        return [[_mean([by_id[run_id(s)] for s in point]) for point in row] for row in specs]

    if brackets:
        brackets = bisect_log(mean_l0, brackets, [k[2] for k in keys], m.iterations)
    for (_, _, target, entry), b in zip(keys, brackets, strict=True):
        lam, l0 = b.best(target)
        out.append(entry | {"status": "found", "lambda": lam, "bisection_l0": l0,
                            "tried": [list(p) for p in b.tried]})
    _train_finals(runner, [e for e in out if e["status"] == "found"], m.seeds)
    return {"targets": targets, "n_features": m.n_features, "points": out}


def scaled_targets(m, case) -> list[float]:
    """The total-L0 targets: as given, or per middle step of the case study's chain."""
    from clt_eval.case_study import middle_layers

    scale = len(middle_layers(case)) if m.per_middle_step else 1
    return [float(t) * scale for t in m.targets]


def _plan(curves: dict, targets) -> tuple[list, list, list]:
    """(finished entries, bisection keys, their brackets): TopK points are picked from the
    grid at once; λ points get a bracket, or are reported as out of the grid's range."""
    out, keys, brackets = [], [], []
    for (skey, arch), points in sorted(curves.items(), key=lambda kv: repr(kv[0])):
        base = _base(dict(skey))
        for target in targets:
            entry = {"setting": dict(skey), "arch": arch, "target": target}
            if base.penalty in ("topk", "batchtopk"):
                out.append(entry | _closest(points, target, "k"))
                continue
            b = initial_bracket(points, target)
            if b is None:
                out.append(entry | {"status": "out of grid range", "grid": points})
                continue
            brackets.append(b)
            keys.append((base, arch, target, entry))
    return out, keys, brackets


def _train_finals(runner, found: list[dict], seeds: int) -> None:
    """Train each point found with ``seeds`` seeds; adds run ids and the L0 reached."""
    finals = [(e, [_with(_base(e["setting"]), e["arch"], e["lambda"], s, e.get("k"))
                   for s in range(seeds)]) for e in found]
    # Targets that land on the same point (e.g. TopK's k for 1.0 and 1.5) share its runs.
    unique = list(dict.fromkeys(s for _, specs in finals for s in specs))
    by_id = {r["run_id"]: r for r in runner.run(unique, "matched-L0 runs")}
    for e, specs in finals:
        e["run_ids"] = [run_id(s) for s in specs]
        e["l0_reached"] = _mean([by_id[i]["metrics"]["l0_total"] for i in e["run_ids"]])


def _base(setting: dict):
    """A RunSpec for a setting; budget penalties get a placeholder k, set per point later."""
    from clt_eval.training.config import RunSpec

    budget = setting["penalty"] in ("topk", "batchtopk")
    return RunSpec(**setting, k=1 if budget else None)


EXTEND_FACTORS = (10.0, 10.0)  # each round extends the ends by a decade; one ensemble each


def _extend(runner, m, curves: dict, targets: list[float]) -> dict:
    """Grid curves that do not reach every target (L0 still above the smallest at the largest
    λ, or below the largest at the smallest λ) get points beyond their ends, a decade at a
    time: a case study with larger activations needs a larger λ for the same L0."""
    for factor in EXTEND_FACTORS:
        todo = {}
        for (skey, arch), pts in curves.items():
            base = _base(dict(skey))
            if base.penalty in ("topk", "batchtopk") or not pts:
                continue
            (lo, f_lo), (hi, f_hi) = pts[0], pts[-1]
            new = ([hi * factor] if f_hi > min(targets) else []) + \
                  ([lo / factor] if f_lo < max(targets) else [])
            todo[(skey, arch)] = [_with(base, arch, lam, s) for lam in new
                                  for s in range(m.bisect_seeds)]
        specs = [s for row in todo.values() for s in row]
        if not specs:
            break
        recs = {r["run_id"]: r for r in runner.run(specs, f"extending the λ grid ×{factor:g}")}
        for key, row in todo.items():
            by_lam: dict = {}
            for sp in row:
                by_lam.setdefault(sp.sparsity_coef, []).append(
                    recs[run_id(sp)]["metrics"]["l0_total"])
            curves[key] = sorted(curves[key] + [(lam, _mean(v)) for lam, v in by_lam.items()
                                                if not math.isnan(_mean(v))])
    return curves


def _with(base, arch: str, lam: float, seed: int, k: int | None = None):
    return replace(base, arch=arch, sparsity_coef=0.0 if k else float(lam), seed=seed,
                   k=k if k else base.k)


def _grid_curves(records: list[dict], width: int) -> dict:
    """{(setting key, arch): [(knob, mean L0 over seeds)]} at one width."""
    from clt_eval.training.config import RunSpec

    acc: dict = {}
    for r in records:
        spec = RunSpec(**r["spec"])
        if spec.n_features != width:
            continue
        acc.setdefault((setting_key(spec), spec.arch), {}).setdefault(knob(r), []).append(
            r["metrics"]["l0_total"])
    return {k: [(kn, _mean(v)) for kn, v in sorted(pts.items()) if not math.isnan(_mean(v))]
            for k, pts in acc.items()}


def _mean(values) -> float:
    """Mean L0 over seeds, leaving out diverged runs (their L0 is None); NaN if none is left."""
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else float("nan")


def _closest(points, target, name) -> dict:
    kn, l0 = min(points, key=lambda p: (abs(p[1] - target), p[0]))
    return {"status": "found", "lambda": 0.0, name: int(kn), "bisection_l0": l0,
            "tried": [list(p) for p in points]}
