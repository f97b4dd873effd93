"""report.md and plots for `clt-eval reproduce`. Every number comes from clt_eval.metrics
(via the run records) or clt_eval.costs; this module only arranges them."""

from __future__ import annotations

from pathlib import Path

from clt_eval.atomic import write_text_atomic
from clt_eval.costs import cost_key, sparsity_costs
from clt_eval.evaluate import evaluate
from training.analysis import NMSE_OK, matched_table, setting_table

SKIPPING = ("clt_shortcut", "clt_skip_keeps_b")  # decompositions that write C from layer 0


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
                "intervention_agreement")
        out[name] = {"arch": tc.cfg.arch, "costs": costs, "metrics": {k: m[k] for k in keep}}
    return out


def prediction(analytic: dict, key: str) -> tuple[str, bool | None]:
    """(cheapest decomposition, does a skipping one beat every non-skipping one?)."""
    costs = {n: d["costs"][key] for n, d in analytic.items()}
    best = min(costs, key=costs.get)
    skip = min(costs[n] for n in costs if n in SKIPPING)
    keep = min(costs[n] for n in costs if n not in SKIPPING)
    return best, (None if abs(skip - keep) < 1e-6 else skip < keep)


def _fmt(s) -> str:
    if isinstance(s, dict):
        return "–" if s["mean"] is None else f"{s['mean']:.2f} ± {s['sd']:.2f}"
    return "–" if s is None else (f"{s:.3g}" if isinstance(s, float) else str(s))


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows])


def write_report(out: Path, records: list[dict], analytic: dict, cfg) -> tuple[Path, list[Path]]:
    from training.plots import plot_matched

    matched = matched_table(records)
    plots = plot_matched(out, matched, records)
    parts = [_header(records, cfg), _summary(analytic, matched), _matched_section(matched),
             _analytic_section(analytic, matched), _findings(analytic, matched),
             _settings_section(records),
             "## Plots\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in plots)]
    return write_text_atomic(out / "report.md", "\n\n".join(parts) + "\n"), plots


def _header(records, cfg) -> str:
    seeds = len({r["seed"] for r in records})
    return (f"# clt-eval reproduce: `{cfg.case_study}`\n\n"
            f"{len(records)} trained transcoders ({seeds} seeds per setting, {cfg.n_features} "
            f"features per layer, {cfg.steps} full-batch Adam steps). PLT and CLT are compared "
            f"at matched total L0 (features active per sample, summed over layers): for each "
            f"penalty, the pair of settings whose mean L0 agree best among settings with mean "
            f"NMSE ≤ {NMSE_OK}. Means ± sd over seeds. *Skip fraction*: share of the output C "
            f"written by layer-0 features through cross-layer decoders (0 faithful, 1 fully "
            f"skipped); a run *skips* above 0.5. *Intervention agreement*: over interventions on B "
            f"(ablate all, ablate each, patch from every other input) that change the true output, "
            f"the share where the replacement model's output agrees. *C reads A*: of what the "
            f"output layer's active features read (input × encoder weight), the share from the "
            f"inputs A rather than from B (0 = as the true circuit).")


def _summary(analytic, matched) -> str:
    """The headline in a few sentences, every number from the tables below."""
    clt = [r for r in matched if r["arch"] == "clt"]
    if not clt:
        return "## Summary\n\nNo setting reconstructed well enough to compare."
    share = [r["skips"]["mean"] or 0.0 for r in clt]
    text = (f"At matched L0, the share of CLT seeds that skip ranges from {min(share):.0%} to "
            f"{max(share):.0%} across {len(clt)} settings; PLTs cannot skip by construction.")
    if analytic:
        pays = [r for r in clt if prediction(analytic, cost_key(r["penalty"],
                                                               r["decoder_norm"]))[1]]
        majority = [r for r in pays if (r["skips"]["mean"] or 0.0) > 0.5]
        text += (f" The analytic costs make skipping strictly cheaper in {len(pays)} of them; "
                 f"training makes most CLT seeds skip in {len(majority)} of those.")
        if len(majority) < len(pays) / 2:
            text += (" The sparsity loss does reward the shortcut, as Lange et al. (2026, "
                     "\"Cross-layer transcoders are incentivized to learn unfaithful circuits\") "
                     "argue, but from a random start gradient descent mostly settles in a "
                     "costlier optimum that skips less than the cheapest shortcut: the "
                     "incentive is real, the outcome depends on the seed.")
    return "## Summary\n\n" + text


def _matched_section(matched) -> str:
    head = ["setting", "arch", "λ or k", "L0", "NMSE", "skip fraction", "runs skipping",
            "B recovered", "intervention agr.", "C reads A", "output acc."]
    rows = [[r["setting"], r["arch"], r.get("knob"), r.get("l0_total"),
             r.get("nmse"), r.get("skip_fraction"), r.get("skips"),
             r.get("middle_feature_recovery"), r.get("intervention_agreement"),
             r.get("output_reads_inputs"), r.get("output_accuracy")] if r["arch"] else
            [r["setting"], r["note"]] + [None] * 9 for r in matched]
    return "## PLT vs CLT at matched L0\n\n" + _table(head, rows)


def _analytic_section(analytic, matched) -> str:
    if not analytic:
        return "## Analytic costs\n\nThis case study provides no hand-built decompositions."
    names = list(analytic)
    head = ["setting (priced by)"] + names + ["cheapest", "predicts CLT skip",
                                              "trained PLT cost", "trained CLT cost",
                                              "CLT runs skipping"]
    by = {(r["setting"], r["arch"]): r for r in matched if r["arch"]}
    rows = []
    for (name, arch), r in sorted(by.items()):
        if arch != "clt":
            continue
        key = cost_key(r["penalty"], r["decoder_norm"])
        best, skip = prediction(analytic, key)
        plt_row = by.get((name, "plt"), {})
        rows.append([f"{name} ({key})"] + [analytic[n]["costs"][key] for n in names]
                    + [best, {True: "yes", False: "no", None: "tie"}[skip],
                       plt_row.get("sparsity_cost"), r["sparsity_cost"], r["skips"]])
    desc = "\n".join(f"- `{n}` ({d['arch']}): L0 {d['metrics']['l0_total']:.2f}, skip fraction "
                     f"{d['metrics']['skip_fraction']:.2f}, B recovered "
                     f"{d['metrics']['middle_feature_recovery']:.2f}"
                     for n, d in analytic.items())
    return ("## Analytic sparsity costs of exact decompositions\n\nEach decomposition "
            "reconstructs both MLPs exactly; costs are per sample per unit λ (tanh with c = 1; "
            "topk rows give the largest per-sample L0, the smallest joint k that fits). The "
            "trained columns price the trained transcoders the same way, at the matched "
            "setting.\n\n" + desc + "\n\n" + _table(head, rows))


def _findings(analytic, matched) -> str:
    by = {(r["setting"], r["arch"]): r for r in matched if r["arch"]}
    lines = [_finding(analytic, r, by.get((name, "plt")))
             for (name, arch), r in sorted(by.items()) if arch == "clt"]
    plts = [r for r in matched if r["arch"] == "plt"
            and r["intervention_agreement"]["mean"] is not None]
    if plts and min(r["intervention_agreement"]["mean"] for r in plts) < 0.9:
        agree = [r["intervention_agreement"]["mean"] for r in plts]
        reads = [r["output_reads_inputs"]["mean"] for r in plts
                 if r["output_reads_inputs"]["mean"] is not None]
        lines.append(
            f"- PLT intervention agreement is also below 1 ({min(agree):.2f} to "
            f"{max(agree):.2f}) although a PLT has no cross-layer decoder. Its output-layer "
            f"features take {min(reads):.0%} to {max(reads):.0%} of their input from A "
            "directly (MLP1's input holds A as well as B): an A→C path inside one layer, which "
            "the skip fraction does not count but the interventions on B expose.")
    return "## Findings\n\n" + "\n".join(lines)


def _finding(analytic, r, p) -> str:
    skip = r["skips"]["mean"] or 0.0
    line = (f"- **{r['setting']}**: {skip:.0%} of CLT runs skip (skip "
            f"fraction {_fmt(r['skip_fraction'])}); B recovered CLT "
            f"{_fmt(r['middle_feature_recovery'])} vs PLT "
            f"{_fmt(p['middle_feature_recovery']) if p else '–'}")
    if not analytic:
        return line + "."
    key = cost_key(r["penalty"], r["decoder_norm"])
    best, pred = prediction(analytic, key)
    verdict = {True: "the costs favour skipping", False: "the costs favour not skipping",
               None: "the costs tie"}[pred]
    if pred is None or pred == (skip > 0.5):
        return line + f"; {verdict}, and training agrees."
    cheapest = analytic[best]["costs"][key]
    trained = r["sparsity_cost"]["mean"]
    why = (f" Trained CLTs cost {trained:.3g} per sample against {cheapest:.3g} for "
           f"`{best}`: gradient descent ended at a costlier point (a local optimum, or not "
           "yet converged) instead of the cheaper exact decomposition." if trained is not None
           and trained > cheapest else
           f" Trained CLTs cost {trained:.3g}, no more than `{best}` ({cheapest:.3g}), by "
           "reconstructing less than exactly (see NMSE).")
    return line + f"; {verdict}, but training disagrees." + why


def _settings_section(records) -> str:
    rows = setting_table(records)
    head = ["setting", "arch", "λ or k", "L0", "NMSE", "skip", "skips", "B rec.",
            "interv.", "acc.", "off-dist MAE"]
    body = [[r["setting"], r["arch"], r["knob"], r["l0_total"], r["nmse"],
             r["skip_fraction"], r["skips"], r["middle_feature_recovery"],
             r["intervention_agreement"], r["output_accuracy"], r["offdist_mae"]] for r in rows]
    return "## Every setting (means over seeds)\n\n" + _table(head, body)
