"""report.md for `clt-eval sweep`: every number from ``training.sweep_analysis``."""

from __future__ import annotations

import math
from pathlib import Path

from clt_eval.atomic import write_text_atomic
from clt_eval.training import sweep_analysis as A
from clt_eval.training import sweep_plots as P
from clt_eval.training import workers
from clt_eval.training.report import _table, analytic_section


def _f(v, digits=2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{digits}g}" if isinstance(v, float) and abs(v) < 0.01 and v != 0 else \
        (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def write_sweep_report(out: Path, spec, runner, grid: list[dict], matched: dict | None,
                       analytic: dict | None = None):
    """Writes report.md and the plots; returns (report path, plot paths, JSON summary).
    ``analytic``: the case study's hand-built decompositions priced (``report.analytic_costs``)."""
    from clt_eval.training.sweep_tracking import tracking_rows

    width = spec.matched_l0.n_features if spec.matched_l0 else _common_width(grid)
    gone = A.disappearance(grid, width)
    onset = A.width_onset(grid)
    by_id = {r["run_id"]: r for r in runner.store.records.values()}
    rows = A.matched_rows(matched, by_id) if matched else []
    versus, mitig = A.plt_vs_clt(rows), A.mitigations(rows)
    tracked = tracking_rows(runner, grid, width)
    # Two halves of about equal cost, drawn side by side when there are worker processes
    # (whose results travel as JSON: the paths as text).
    halves = workers.side_by_side([
        lambda: _names(P.phase_diagram(out, grid, width, "lambda"), P.front(out, grid),
                       P.width_plot(out, onset)),
        lambda: _names(P.phase_diagram(out, grid, width, "l0"),
                       P.cross_share_plot(out, grid, width), P.circuit_plot(out, rows))])
    (lam, front, width_p), (l0, cross, circuit) = [[p and Path(p) for p in h] for h in halves]
    plots = [lam, l0, front, cross] + [p for p in (width_p, circuit) if p is not None]
    parts = [_header(spec, grid, runner, width), _summary(gone, versus, mitig, onset),
             _gone_section(gone, tracked), _matched_section(rows, versus),
             _per_layer_section(rows), _circuit_section(rows),
             analytic_section(analytic or {}, rows),
             _mitigation_section(mitig), _width_section(onset),
             "## Plots\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in plots)]
    report = write_text_atomic(out / "report.md", "\n\n".join(parts) + "\n")
    strip = [{k: v for k, v in r.items() if k != "recs"} for r in rows]
    summary = {"disappearance": gone, "width_onset": onset, "matched": strip,
               "plt_vs_clt": versus, "mitigations": mitig, "tracking": tracked,
               "tables": {"disappearance": gone, "matched": [_flat(r) for r in strip]}}
    return report, plots, summary


def _names(*paths: Path | None) -> list[str | None]:
    return [None if p is None else str(p) for p in paths]


def _flat(row: dict) -> dict:
    return {k: v for k, v in row.items() if not isinstance(v, dict | list)}


def _common_width(grid) -> int:
    widths = [r["spec"]["n_features"] for r in grid]
    return max(set(widths), key=widths.count)


def _header(spec, grid, runner, width) -> str:
    n_all = len(runner.store.records)
    return (f"# clt-eval sweep `{spec.name}` on `{spec.case_study}`\n\n{spec.description}\n\n"
            f"{n_all} trained transcoders: {len(grid)} on the spec's grid, the rest found by the "
            f"matched-L0 search ({spec.train.steps} full-batch Adam steps each; "
            f"{runner.trained} trained by the last invocation, the others read back from "
            f"`sweep.json`). Curves and the disappearance table use the {width}-feature runs. "
            f"A run *skips* when its skip fraction (share of the output written by features of "
            f"earlier layers through cross-layer decoders) exceeds 0.5; the middle steps are "
            f"*gone* when the mean share of their ground-truth features recovered (Hungarian "
            f"match, correlation and decoder cosine ≥ 0.9) stays below {A.RECOVERED}. "
            f"Targets and λ are for total L0 (active features per sample, summed over layers). "
            f"Tests across seeds are "
            f"two-sided Mann–Whitney U (effect size: Cliff's δ, from −1 to 1) and Fisher's "
            f"exact test on the counts of seeds that skip.")


def _summary(gone, versus, mitig, onset) -> str:
    lines = []
    for r in gone:
        if r["arch"] != "clt":
            continue
        at = r["gone_at"]
        if at is None:
            lines.append(f"- **{r['setting']}**: mean recovery of the middle-layer features "
                         f"never stays below {A.RECOVERED} (it is {_f(r['recovery_at_min'])} at "
                         f"the smallest λ or k and {_f(r['recovery_at_max'])} at the largest).")
        elif at == "never recovered":
            lines.append(f"- **{r['setting']}**: the middle-layer features are not recovered "
                         f"(mean recovery < {A.RECOVERED}) at any λ or k of the grid.")
        else:
            lines.append(f"- **{r['setting']}**: the middle-layer features disappear from "
                         f"λ = {_f(at, 3)} (L0 {_f(r['l0_at'])}; cross-layer share of decoder "
                         f"mass there {_f(r['cross_share_at'])}).")
    keep = sorted({m["b"] for m in mitig if m["b_keeps_b"]})
    text = "## Summary\n\nWhere the middle step disappears in CLTs, per setting:\n\n"
    text += "\n".join(lines) if lines else "(no CLT settings)"
    if versus:
        sig = [v for v in versus if (v["middle_feature_recovery"]["p"] or 1) < 0.05]
        more = [v for v in versus if (v["skip_p_fisher"] or 1) < 0.05]
        text += (f"\n\nAt matched L0, CLTs differ from PLTs in middle-layer recovery with "
                 f"p < 0.05 in {len(sig)} of {len(versus)} (setting, target) pairs, and more "
                 f"CLT than PLT seeds skip (Fisher p < 0.05) in {len(more)}: "
                 + (", ".join(f"{v['setting']} at L0 {v['target']:g}" for v in more) or "none")
                 + ".")
    if mitig:
        text += ("\n\nMitigations that keep the middle-layer features (mean recovery ≥ "
                 f"{A.KEEPS_B}) without losing reconstruction (NMSE ≤ 0.05) at some matched "
                 f"L0: {', '.join(keep) if keep else 'none'}.")
    starts = [f"{o['setting']} at knob {o['knob']:g}: from width {o['any_from']}"
              for o in onset if o["any_from"] is not None]
    if onset:
        text += ("\n\nWidth: CLT seeds start to skip " + ("; ".join(starts) if starts else
                 "at no width tried") + ".")
    return text


def _gone_section(gone, tracked) -> str:
    head = ["setting", "arch", "recovery at smallest λ", "gone from λ", "L0 there",
            "cross-layer share there"]
    rows = [[r["setting"], r["arch"], _f(r["recovery_at_min"]), _f(r["gone_at"], 3),
             _f(r["l0_at"]), _f(r["cross_share_at"])] for r in gone]
    text = ("## Where the middle-layer features disappear\n\n" + _table(head, rows))
    if tracked:
        head = ["setting", "arch", "feature", "stops at λ (median over seeds)", "L0 there",
                "died", "changed", "kept", "never recovered"]
        trows = [[t["setting"], t["arch"], t["feature"], _f(t["stop_median"], 3),
                  _f(t["l0_median"]), t["fates"].get("died", 0), t["fates"].get("changed", 0),
                  t["fates"].get("kept", 0), t["fates"].get("never recovered", 0)]
                 for t in tracked]
        text += ("\n\n### Each half-XOR, tracked across λ\n\nFeatures are matched between "
                 "neighbouring λ points (Hungarian, activation correlation). *Died*: the "
                 "feature that matched it has no continuation at the next λ; *changed*: it "
                 "continues but no longer matches (absorbed into another feature).\n\n"
                 + _table(head, trows))
    return text


def _matched_section(rows, versus) -> str:
    head = ["setting", "arch", "target L0", "λ or k found", "L0 reached", "NMSE",
            "skip fraction", "seeds skipping", "B recovered", "intervention agr."]
    body = [[r["setting"], r["arch"], r["target"], _f(r.get("knob"), 3),
             _f(r.get("l0_total")), _f(r.get("nmse")), _f(r.get("skip_fraction")),
             _f(r.get("skips")), _f(r.get("middle_feature_recovery")),
             _f(r.get("intervention_agreement"))] if "recs" in r else
            [r["setting"], r["arch"], r["target"], r["status"]] + ["–"] * 6 for r in rows]
    text = "## PLT vs CLT at matched L0\n\n" + _table(head, body) + _unmatched_note(rows)
    if versus:
        head = ["setting", "target L0", "Δ B recovered (CLT − PLT)", "Cliff's δ", "p",
                "Δ skip fraction", "skip share PLT → CLT", "Fisher p"]
        body = [[v["setting"], v["target"], _f(v["middle_feature_recovery"]["diff"]),
                 _f(v["middle_feature_recovery"]["cliffs_delta"]),
                 _f(v["middle_feature_recovery"]["p"], 2), _f(v["skip_fraction"]["diff"]),
                 f"{_f(v['a_summary']['skips'])} → {_f(v['b_summary']['skips'])}",
                 _f(v["skip_p_fisher"], 2)] for v in versus]
        text += ("\n\n### Statistics across seeds\n\nA PLT's skip fraction is 0 by "
                 "construction, so any CLT has a larger one; whether CLT *seeds skip* more "
                 "often is Fisher's test on the counts.\n\n" + _table(head, body))
    return text


def _unmatched_note(rows) -> str:
    """The points whose seeds' L0 missed the target: with the jump in L0 the search found
    around it, or else the search seeds' mean beside the mean of all the seeds trained."""
    missed = A.unmatched(rows)
    if not missed:
        return ""
    lines = []
    for r in missed:
        t, c = r["target"], r.get("crossing")
        knob = "k" if r["setting"].startswith(("topk", "batchtopk")) else "λ"
        line = f"- {r['setting']} {r['arch'].upper()}, target {t:g}: L0 reached {_f(r['l0_total'])}"
        if c is not None and min(abs(c[1] - t), abs(c[3] - t)) > A.MATCH_TOL * t:
            line += (f"; L0 jumps over the target, from {_f(c[1])} at {knob} {c[0]:.3g} to "
                     f"{_f(c[3])} at {knob} {c[2]:.3g}")
        elif r.get("search_l0") is not None:
            line += (f"; the search's seeds averaged {_f(r['search_l0'])} at this {knob}, the "
                     f"{r['n']} seeds trained there average {_f(r['l0_total'])}")
        lines.append(line)
    return (f"\n\n**Not matched within {A.MATCH_TOL:.0%}.** At these points the seeds' mean "
            "total L0 misses the target by more than that, so PLT and CLT there are compared at "
            "different sparsity; read their rows with the L0 reached beside them.\n\n"
            + "\n".join(dict.fromkeys(lines)))


def _per_layer_section(rows) -> str:
    """Skip fraction and middle-step recovery at every layer of the chain."""
    def layers(v):
        return " / ".join(_f(x) for x in v) if v else "–"

    head = ["setting", "arch", "target L0", "skip fraction per layer",
            "middle-step recovery per layer"]
    body = [[r["setting"], r["arch"], r["target"], layers(r["skip_fraction_per_layer"]),
             layers(r["middle_feature_recovery_per_layer"])] for r in rows if "recs" in r]
    return ("## Per layer, at matched L0\n\nLayer 0, 1, … of the chain, means over seeds. "
            "*Skip fraction* at a step's layer: the share of what features write along that "
            "step's ground-truth directions that comes from earlier layers (– at layer 0, "
            "which has none, and at layers without a step). *Recovery*: the share of the "
            "step's ground-truth features matched by a transcoder feature at that layer (– "
            "off the steps; the last value is the output step's own features).\n\n"
            + _table(head, body))


def _circuit_section(rows) -> str:
    """The attribution graph of each run scored against the case study's true circuit."""
    head = ["setting", "arch", "target L0", "edge precision", "edge recall", "shortcut edges",
            "missing middle edges", "path depth"]
    body = [[r["setting"], r["arch"], r["target"], _f(r.get("circuit_edge_precision")),
             _f(r.get("circuit_edge_recall")), _f(r.get("shortcut_edges")),
             _f(r.get("missing_middle_edges")), _f(r.get("path_depth"))]
            for r in rows if "recs" in r]
    return ("## Attribution graphs against the true circuit, at matched L0\n\nEach run's "
            "attribution graph (direct effects between inputs, features and each step's "
            "output directions, averaged over the case study's inputs) with features mapped "
            "to the ground-truth features they recover. *Precision/recall*: of the true "
            "circuit's edges; *shortcut edges*: edges that jump over a step or write a later "
            "step straight from an earlier layer, which the true model does not have; "
            "*missing middle edges*: true edges out of a middle step that the graph lacks; "
            "*path depth*: the most features on one input→output path (the chain's number of "
            "steps when faithful). Means over seeds.\n\n" + _table(head, body))


def _mitigation_section(mitig) -> str:
    if not mitig:
        return "## Mitigations\n\nNo mitigation settings at matched L0."
    head = ["CLT setting", "vs", "target L0", "B recovered", "Δ vs baseline", "Cliff's δ", "p",
            "seeds skipping", "NMSE", "keeps B, reconstructs"]
    body = [[m["b"], m["a"], m["target"], _f(m["b_summary"]["middle_feature_recovery"]),
             _f(m["middle_feature_recovery"]["diff"]),
             _f(m["middle_feature_recovery"]["cliffs_delta"]),
             _f(m["middle_feature_recovery"]["p"], 2), _f(m["b_summary"]["skips"]),
             _f(m["b_summary"]["nmse"]), "yes" if m["b_keeps_b"] else "no"] for m in mitig]
    return ("## Mitigations, head to head at matched L0\n\nEach CLT setting against the "
            "concatenated-norm CLT of its penalty at the same target L0. `+κ` adds a "
            "λ-scaled l1 price on cross-layer decoder blocks (clt_eval/config.py says why "
            "κ = 1 suffices on this toy).\n\n" + _table(head, body))


def _width_section(onset) -> str:
    if not onset:
        return "## Width\n\nThe spec trains no setting at several widths."
    widths = sorted({w for o in onset for w in o["skip_share"]})
    head = ["setting", "knob"] + [f"w{w}" for w in widths] + ["any skip from", "most from"]
    body = [[o["setting"], _f(o["knob"], 3)]
            + [f"{_f(o['skip_share'][w])} ({_f(o['nmse'][w])})" if w in o["skip_share"] else "–"
               for w in widths] + [o["any_from"], o["most_from"]] for o in onset]
    return ("## Width: share of CLT seeds that skip (mean NMSE)\n\nFrom capacity-starved (too "
            "few layer-0 features to build the 12-feature shortcut, or even the 4 half-XORs) "
            "to generous. A high skip share at a width whose NMSE is poor is a transcoder that "
            "reconstructs little, and writes what it can from layer 0, not a clean shortcut."
            "\n\n" + _table(head, body))
