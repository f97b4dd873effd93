"""The analytic part of the report: a case study's hand-built exact decompositions, priced
under every penalty (clt_eval.costs) and evaluated (clt_eval.evaluate), beside training."""

from __future__ import annotations

from clt_eval.costs import cost_key, sparsity_costs
from clt_eval.evaluate import evaluate


def skipping(name: str) -> bool:
    """Decompositions that write a later step from an earlier layer are named so."""
    return "skip" in name or "shortcut" in name


def analytic_costs(case, x_BLD) -> dict:
    """{decomposition: {"costs": {penalty/norm: cost}, "metrics": {...}}} for the case study's
    hand-built exact decompositions (empty if it has none)."""
    build = getattr(case, "analytic_decompositions", None)
    if build is None:
        return {}
    out = {}
    for name, tc in build().items():
        costs = {k: float(v[0]) for k, v in sparsity_costs(tc, x_BLD).items()}
        m = evaluate(case, tc)[0]
        keep = ("nmse", "l0_total", "skip_fraction", "middle_feature_recovery",
                "intervention_agreement", "circuit_edge_precision", "circuit_edge_recall",
                "shortcut_edges", "path_depth")
        out[name] = {"arch": tc.cfg.arch, "costs": costs, "metrics": {k: m[k] for k in keep}}
    return out


def prediction(analytic: dict, key: str) -> tuple[str, bool | None]:
    """(cheapest decomposition, does a skipping one beat every non-skipping one?)."""
    costs = {n: d["costs"][key] for n, d in analytic.items()}
    best = min(costs, key=costs.get)
    skip = min((costs[n] for n in costs if skipping(n)), default=None)
    keep = min((costs[n] for n in costs if not skipping(n)), default=None)
    if skip is None or keep is None:
        return best, None
    return best, (None if abs(skip - keep) < 1e-6 else skip < keep)


def _fmt(s) -> str:
    return "–" if s is None else (f"{s:.3g}" if isinstance(s, float) else str(s))


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows])


def analytic_section(analytic: dict, rows: list[dict]) -> str:
    """The hand-built decompositions' costs beside what training found at matched L0."""
    if not analytic:
        return ("## Analytic costs\n\nThis case study provides no hand-built exact "
                "decompositions (`analytic_decompositions()`).")
    names = list(analytic)
    head = ["setting (priced by)", "target L0"] + names + [
        "cheapest", "costs favour skipping", "trained CLT cost", "CLT seeds skipping"]
    body = []
    for r in rows:
        if r["arch"] != "clt" or "recs" not in r:
            continue
        spec = r["recs"][0]["spec"]
        key = cost_key(spec["penalty"], spec["decoder_norm"])
        if key is None:
            continue
        best, skip = prediction(analytic, key)
        cost = [x["metrics"].get("sparsity_cost") for x in r["recs"]]
        cost = [c for c in cost if c is not None]
        body.append([f"{r['setting']} ({key})", r["target"]]
                    + [analytic[n]["costs"][key] for n in names]
                    + [best, {True: "yes", False: "no", None: "tie"}[skip],
                       sum(cost) / len(cost) if cost else None, r.get("skips")])
    desc = "\n".join(f"- `{n}` ({d['arch']}): L0 {_fmt(d['metrics']['l0_total'])}, skip "
                     f"fraction {_fmt(d['metrics']['skip_fraction'])}, middle features "
                     f"recovered {_fmt(d['metrics']['middle_feature_recovery'])}"
                     for n, d in analytic.items())
    return ("## Analytic sparsity costs of exact decompositions\n\nEach decomposition "
            "reconstructs every MLP exactly; costs are per sample per unit λ (tanh with c = 1; "
            "for topk the largest per-sample L0, the smallest joint k that fits). A "
            "decomposition whose name says *skip* or *shortcut* writes a later step from an "
            "earlier layer. The trained column prices the trained CLTs the same way. Where "
            "the costs favour skipping but few seeds skip, gradient descent stopped in a "
            "costlier optimum, or the matched L0 is far from the decomposition's own L0.\n\n"
            + desc + "\n\n" + _table(head, body))
