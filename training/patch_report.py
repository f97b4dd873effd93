"""The outputs of `clt-eval patch`: report.md, effects.png and the wandb run.

Every number shown comes from the records ``training.patch_job`` computed; nothing here
measures anything.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from clt_eval.atomic import write_text_atomic

EFFECT_BARS = (("whole", "whole component", "#7f7f7f"), ("direction", "direction", "#1f77b4"),
               ("row_space_part", "row-space part", "#2ca02c"),
               ("kernel_part", "kernel part", "#d62728"))
# Above this many directions the plot shows transcoder directions averaged per
# (architecture, kind, ground-truth feature); the report's table still lists each one.
MAX_BAR_GROUPS = 40

EXPLANATION = """\
## The illusion, and how it is checked

Patching one direction of a component's activations (copying the source input's coordinate
along it into the base input's run) can move the model's output even when the component does
not use that direction. The trick needs two ingredients: a part of the direction that follows
the variable on real inputs but is invisible downstream (it lies in the kernel of the weights
that read the component out), and a part that downstream weights do see but that never
varies on real inputs (a dormant pathway). Patched together, the variation of the first part
is copied onto the second, and a pathway the model never uses produces the counterfactual
answer. Makelov, Lange and Nanda (ICLR 2024) call this an interpretability illusion.

Each direction below is judged by re-patching, with the same (base, source) pairs: the whole
component; the direction itself; its row-space part alone (the part the reader's weights see);
and its kernel part alone. A direction *works* when its patch achieves at least half of the
counterfactual change. A working direction is flagged as an *illusion* when the whole
component does almost nothing (< 0.05), or when its row-space part alone achieves less than
half of what the direction does, or when its row-space projection hardly varies on real
inputs (spread < 0.1 of the direction's). Effects are the least-squares slope of the achieved
output change on the wanted one: 1 = exactly the counterfactual, 0 = nothing.
"""


def _f(x, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _method(payload: dict) -> str:
    own = payload["case_directions_studied"]
    cfg = payload["config"]
    first = ("The case study names an MLP hidden space, so DAS (k = "
             f"{cfg['das_k']}, {cfg['das_steps']} steps) learns a direction there, and the "
             "known illusory and faithful directions it names are checked against the MLP's "
             "output weights." if own else
             "The case study names no MLP hidden space: no DAS or named directions; only "
             "transcoder features, in the residual stream.")
    return f"""## What was patched

{first}

Transcoder features: {len(cfg['sparsity_coefs'])} λ × {cfg['seeds']} seed(s) of PLT and CLT
({cfg['penalty']} penalty, {cfg['decoder_norm']} decoder norm, {cfg['n_features']} features
per layer, {cfg['steps']} steps). Every feature matched to a ground-truth feature of a middle
step (layers {payload['middle_layers']}) is patched in the true model along its *decoder*
direction at its layer's MLP-output hook and along its *encoder* direction at its layer's
MLP-input hook. The counterfactual is the true output when that ground-truth feature alone
takes the source's value. The whole component, and a row-space part that a reader shares
among several features, carry every feature's change, so the pairs are chosen to isolate the
feature: pairs where only it changes, else pairs where the step's other features change by
under a tenth of its change, else (flagged in each record) any pair where it changes.
A decoder direction is split against the input weights of every MLP after its layer up to the
next step's (all of them read the write before the next step does); an encoder direction
against its own layer's MLP input weights (the reader whose computation it imitates). A model
without MLP input weights is checked against the case study's `W_read()`, else the identity.
"""


def _summary_table(summary: dict) -> str:
    lines = ["| arch | runs | runs without a match | features matched | kind | directions "
             "| work (≥ 0.5) | illusions among working | share |", "|" + "---|" * 9]
    for arch, row in summary.items():
        for kind in ("decoder", "encoder", "all"):
            k = row[kind]
            lines.append(f"| {arch.upper()} | {row['runs']} | {row['runs_without_match']} | "
                         f"{row['features_matched']} | {kind} | {k['directions']} | "
                         f"{k['works']} | {k['illusions']} | "
                         f"{_f(k['illusion_share_of_working'])} |")
    return "\n".join(lines)


def _direction_table(records: list[dict]) -> str:
    lines = ["| direction | hook | reader | whole | direction | row part | kernel part | "
             "row variation | works | illusion | reason |", "|" + "---|" * 11]
    for r in records:
        e, var = r["effects"], r.get("variation") or {}
        lines.append(
            f"| {_cell(r['label'])} | `{r['hook']}` | {_cell(r['reader'])} | "
            f"{_f(e['whole'])} | {_f(e['direction'])} | {_f(e['row_space_part'])} | "
            f"{_f(e['kernel_part'])} | {_f(var.get('row_variation_ratio'))} | "
            f"{'yes' if r['works'] else 'no'} | {'**yes**' if r['illusion'] else 'no'} | "
            f"{_cell(r['reason'])} |")
    return "\n".join(lines)


def report_text(payload: dict) -> str:
    unmatched = [r for r in payload["runs"] if r["note"]]
    missing = ("\n".join(f"- `{r['run_id']}`: {r['note']}" for r in unmatched)
               if unmatched else "Every run matched at least one middle-step feature.")
    return f"""# Subspace activation patching on `{payload['case_study']}`

{EXPLANATION}
{_method(payload)}
## PLT vs CLT: how often a working feature direction is an illusion

{_summary_table(payload['summary'])}

## Runs with no matched middle-step feature

{missing}

## Every direction

Effects are fractions of the counterfactual change; row variation is the spread of the
row-space projection on real inputs over the direction's own.

![effects by component](effects.png)

{_direction_table(payload['records'])}

Computed in {payload['seconds']} s.
"""


# ---- the figure ------------------------------------------------------------------------------
def bar_groups(records: list[dict]) -> tuple[list[tuple[str, list[dict]]], bool]:
    """([(label, records)], averaged): one group per patched direction, or, when there are
    too many, transcoder directions pooled per (arch, kind, layer, ground-truth feature)."""
    done = [r for r in records if r["effects"]["direction"] is not None]
    if len(done) <= MAX_BAR_GROUPS:
        return [(r["label"], [r]) for r in done], False
    pooled: dict[tuple, list[dict]] = defaultdict(list)
    groups = []
    for r in done:
        if r["source"] != "transcoder":
            groups.append((r["label"], [r]))
        else:
            pooled[r["arch"], r["kind"], r["layer"], r["ground_truth_feature"]].append(r)
    for (arch, kind, layer, name), recs in pooled.items():
        groups.append((f"{arch.upper()} {kind} L{layer} {name} (n={len(recs)})", recs))
    return groups, True


def effects_figure(out: Path, records: list[dict]) -> Path:
    import numpy as np

    from clt_eval.training.sweep_plots import _plt, save_figure

    plt = _plt()
    groups, pooled = bar_groups(records)
    n = max(1, len(groups))
    fig, ax = plt.subplots(figsize=(max(7.0, 0.55 * n + 2), 5.2))
    x, width = np.arange(len(groups)), 0.2
    for i, (key, name, colour) in enumerate(EFFECT_BARS):
        vals = [[r["effects"][key] for r in recs] for _, recs in groups]
        mean = np.array([np.mean(v) for v in vals]) if vals else np.zeros(0)
        err = None
        if pooled:
            lo = np.array([min(v) for v in vals])
            hi = np.array([max(v) for v in vals])
            err = np.stack([mean - lo, hi - mean])
        ax.bar(x + (i - 1.5) * width, mean, width, yerr=err, capsize=2, color=colour,
               label=name)
    ax.axhline(0.5, color="black", lw=0.8, ls="--", label="works (0.5)")
    ax.axhline(0.0, color="black", lw=0.5)
    ax.set_xticks(x)
    ax.set_xticklabels([label for label, _ in groups], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("fraction of the counterfactual change")
    ax.set_xlabel("patched direction" + (" (transcoder directions: mean, whiskers min–max)"
                                         if pooled else ""))
    ax.set_title("Effect of patching each component: whole, direction, and the direction's "
                 "row-space and kernel parts", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # clear of the bars
    fig.tight_layout()
    path = save_figure(fig, out / "effects.png")
    plt.close(fig)
    return path


# ---- writing and logging ---------------------------------------------------------------------
def write_outputs(out: Path, payload: dict) -> dict:
    """effects.png and report.md under ``out``, each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    figure = effects_figure(out, payload["records"])
    report = write_text_atomic(out / "report.md", report_text(payload))
    return {"figure": figure, "report": report}


def table_rows(records: list[dict]) -> list[dict]:
    """One flat row per direction (for the wandb table)."""
    rows = []
    for r in records:
        e, var = r["effects"], r.get("variation") or {}
        rows.append({"label": r["label"], "source": r["source"], "run_id": r["run_id"],
                     "arch": r["arch"], "layer": r["layer"], "feature": r["feature"],
                     "kind": r["kind"], "hook": r["hook"], "reader": r["reader"],
                     "whole": e["whole"], "direction": e["direction"],
                     "row_space_part": e["row_space_part"], "kernel_part": e["kernel_part"],
                     "row_variation_ratio": var.get("row_variation_ratio"),
                     "works": r["works"], "illusion": r["illusion"], "reason": r["reason"]})
    return rows


def log_wandb(out: Path, cfg, payload: dict, figure: Path) -> None:
    """One wandb run: the config, the table of directions, the figure, the PLT/CLT counts."""
    from dataclasses import asdict

    from clt_eval.training.wandb_logger import WandbLogger

    logger = WandbLogger(cfg.wandb_mode, group=f"patch-{out.name}", root=out)
    logger.start(f"patch-{payload['case_study']}", asdict(cfg), job_type="patch")
    try:
        logger.table("directions", table_rows(payload["records"]))
        logger.images([figure])
        flat = {f"{arch}/{kind}/{k}": v for arch, row in payload["summary"].items()
                for kind in ("decoder", "encoder", "all") for k, v in row[kind].items()}
        logger.summary(flat | {"seconds": payload["seconds"]})
    finally:
        logger.finish()
