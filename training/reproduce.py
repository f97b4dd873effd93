"""`clt-eval reproduce`: the headline experiment, run by the sweep engine.

For one case study (or ``--all`` of them), the packaged spec ``specs/reproduce.toml`` trains
PLT and CLT under every penalty × decoder norm on a bracketing grid, finds by bisection the λ
at which each reaches the target total L0s (per middle step of the chain), trains that λ with
≥ 10 seeds and reports the share of seeds that skip, PLT vs CLT, with the sweep's tests.
The report is the sweep's report (one writer for both jobs), plus the analytic costs of the
case study's hand-built exact decompositions when it has them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from clt_eval.atomic import nan_to_none, write_json_atomic, write_text_atomic
from clt_eval.case_study import case_study_targets, load_case_study
from clt_eval.training.checkpoint import is_main
from clt_eval.training.config import ReproduceConfig

SPECS = Path(__file__).parent / "specs"


def reproduce_spec(cfg: ReproduceConfig, case_study: str):
    """The packaged spec with this config's overrides (case study, steps, seeds, width)."""
    from clt_eval.training.sweep_spec import load_spec

    spec = load_spec(SPECS / ("reproduce_quick.toml" if cfg.quick else "reproduce.toml"))
    train = dataclasses.replace(spec.train, device=cfg.device, dtype=cfg.dtype)
    if cfg.steps is not None:
        train = dataclasses.replace(train, steps=cfg.steps)
    matched = spec.matched_l0
    if cfg.seeds is not None:
        matched = dataclasses.replace(matched, seeds=cfg.seeds)
    grids = spec.grids
    if cfg.n_features is not None:
        matched = dataclasses.replace(matched, n_features=cfg.n_features)
        grids = tuple(dataclasses.replace(g, values=g.values | {"n_features": (cfg.n_features,)})
                      for g in grids)
    return dataclasses.replace(spec, case_study=case_study, train=train, matched_l0=matched,
                               grids=grids)


def reproduce(cfg: ReproduceConfig, progress: bool = True) -> dict:
    """Run the job; returns {"report": path, "headline": {case study: rows}, ...}."""
    names = list(case_study_targets()) if cfg.all else [cfg.case_study]
    for name in names:  # every case study checked before anything is trained or written
        load_case_study(name, validate=True)
    root = Path(cfg.out)
    results = {}
    for name in names:
        out = root / _folder(name) if cfg.all else root
        results[name] = _one(cfg, name, out, progress)
    if not cfg.all:
        return results[names[0]]
    report = _cross_summary(root, results)
    return {"report": report, "headline": {n: r["headline"] for n, r in results.items()}}


def _one(cfg: ReproduceConfig, name: str, out: Path, progress: bool) -> dict:
    from clt_eval.training.sweep import run_sweep

    spec = reproduce_spec(cfg, name)
    # strict: a rerun resumes only with the very spec (and so the overrides) it began with.
    res = run_sweep(spec, out, cfg.wandb_mode, progress=progress,
                    save_transcoders=cfg.save_transcoders, strict=True)
    records = list(res["store"].records.values())
    if not is_main():
        return {"report": res["report"], "headline": headline(res["summary"])}
    write_json_atomic(out / "results.json", {"config": dataclasses.asdict(cfg) | {"case_study":
                                             name}, "runs": nan_to_none(records)}, records=True)
    if res["analytic"]:
        write_json_atomic(out / "analytic_costs.json", res["analytic"])
    return {"report": res["report"], "headline": headline(res["summary"])}


def headline(summary: dict) -> list[dict]:
    """Share of seeds that skip, PLT vs CLT, at each matched target: the paper's headline.
    With the mean total L0 each side reached: where L0 jumps over the target as λ grows (a
    CLT that starts skipping sheds features at once), the search stops at the closest side
    and the two can sit apart; the table shows by how much."""
    rows = []
    for v in summary.get("plt_vs_clt", []):
        rows.append({"setting": v["setting"], "target_l0": v["target"],
                     "plt_l0": v["a_summary"].get("l0_total"),
                     "clt_l0": v["b_summary"].get("l0_total"),
                     "plt_skip_share": v["a_summary"].get("skips"),
                     "clt_skip_share": v["b_summary"].get("skips"),
                     "fisher_p": v["skip_p_fisher"],
                     "plt_recall": v["a_summary"].get("circuit_edge_recall"),
                     "clt_recall": v["b_summary"].get("circuit_edge_recall")})
    return rows


def format_headline(rows: list[dict]) -> str:
    """The headline as a fixed-width text table for the terminal: the target total L0, the
    mean L0 each side reached, the share of seeds that skip and Fisher's p."""
    def f(v):
        return "–" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))

    head = (f"{'setting':<24}{'target':>7}{'PLT L0':>8}{'CLT L0':>8}{'PLT skip':>10}"
            f"{'CLT skip':>10}{'Fisher p':>10}")
    lines = [head] + [f"{r['setting']:<24}{r['target_l0']:>7g}{f(r.get('plt_l0')):>8}"
                      f"{f(r.get('clt_l0')):>8}{f(r['plt_skip_share']):>10}"
                      f"{f(r['clt_skip_share']):>10}{f(r['fisher_p']):>10}" for r in rows]
    return "\n".join(lines)


def _folder(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def _cross_summary(root: Path, results: dict) -> Path:
    """summary.md and summary.json across case studies: per case study, how many matched
    (setting, target) points have more CLT than PLT seeds skipping."""
    rows, lines = [], []
    for name, res in results.items():
        h = res["headline"]
        more = [r for r in h if (r["clt_skip_share"] or 0) > (r["plt_skip_share"] or 0)]
        sig = [r for r in h if (r["fisher_p"] if r["fisher_p"] is not None else 1) < 0.05]
        mean_clt = _mean([r["clt_skip_share"] for r in h])
        rows.append({"case_study": name, "points": len(h), "clt_skips_more": len(more),
                     "fisher_p_below_0.05": len(sig), "mean_clt_skip_share": mean_clt,
                     "report": str(res["report"].relative_to(root))})
        lines.append(f"| {name} | {len(h)} | {len(more)} | {len(sig)} | "
                     f"{'–' if mean_clt is None else f'{mean_clt:.2f}'} | "
                     f"[report]({rows[-1]['report']}) |")
    if not is_main():
        return root / "summary.md"
    write_json_atomic(root / "summary.json", {"case_studies": rows})
    text = ("# clt-eval reproduce --all\n\nFor each case study, the matched (setting, target "
            "L0) points where PLT and CLT were both found; how many have more CLT seeds than "
            "PLT seeds skipping, how many of those differ by Fisher's exact test (p < 0.05), "
            "and the mean share of CLT seeds that skip.\n\n"
            "| case study | points | CLT skips more | Fisher p < 0.05 | mean CLT skip share "
            "| report |\n|---|---|---|---|---|---|\n" + "\n".join(lines) + "\n")
    return write_text_atomic(root / "summary.md", text)


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None
