"""Phase diagrams, reconstruction-vs-sparsity fronts and width curves for the sweep report.

Every curve is a ``training.sweep_analysis.curves`` result: the mean over seeds with a 95%
bootstrap band. PLT and CLT sit side by side, one colour per setting.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from clt_eval.evaluate import SKIP_THRESHOLD
from clt_eval.training import sweep_analysis as A

METRICS = (("skip_fraction", "skip fraction (0 faithful, 1 skipped)"),
           ("middle_feature_recovery", "middle-layer (B) features recovered"))
YLABELS = {"skip_fraction": "skip fraction (share of output mass)",
           "middle_feature_recovery": "B features recovered (fraction)"}
# The three kinds of run the front plot tells apart (``_kind``), with marker and colour.
SKIPS, KEEPS_B, NEITHER = ("skips (skip fraction > 0.5)", "keeps B (≥ 3 in 4 middle features)",
                           "neither")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: Path) -> Path:
    """Atomic: a crash never leaves half a PNG behind. ``bbox_inches="tight"`` grows the
    canvas to fit whatever sticks out (a legend beside the axes, long rotated tick labels),
    so no label is cut off at the edge. The plots here set the gaps between their panels by
    hand rather than with ``tight_layout``, which lays every label out once more (measured
    on the four grid plots of `reproduce`: 6.0 s with it, 5.0 s without)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def phase_diagram(out: Path, records: list[dict], width: int, x: str) -> Path:
    """Rows: skip fraction, middle recovery; columns: PLT, CLT; x: λ (log) or mean L0."""
    plt = _plt()
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharey=True, sharex=(x == "lambda"))
    lam_records = [r for r in records if r["penalty"] not in ("topk", "batchtopk")] \
        if x == "lambda" else records
    names = sorted({A.label(r["spec"]) for r in lam_records})
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    colours = {n: cmap(i % cmap.N) for i, n in enumerate(names)}
    for row, (metric, title) in enumerate(METRICS):
        curves = A.curves(lam_records, metric, width)
        for col, arch in enumerate(("plt", "clt")):
            ax = axes[row, col]
            for (name, a), pts in sorted(curves.items()):
                if a != arch:
                    continue
                xs = [p["knob"] if x == "lambda" else p["l0"] for p in pts]
                order = sorted(range(len(xs)), key=xs.__getitem__)
                xs = [xs[i] for i in order]
                ax.plot(xs, [pts[i]["mean"] for i in order], marker="o", ms=3,
                        color=colours[name], label=name)
                ax.fill_between(xs, [pts[i]["lo"] for i in order],
                                [pts[i]["hi"] for i in order], color=colours[name], alpha=0.15)
            if x == "lambda":
                ax.set_xscale("log")
            if metric == "skip_fraction":
                ax.axhline(SKIP_THRESHOLD, color="grey", lw=0.8, ls="--")
            ax.set_title(f"{arch.upper()}: {title}", fontsize=10)
            ax.set_xlabel("λ (sparsity coefficient, log scale)" if x == "lambda"
                          else "total L0 per sample (mean over seeds)")
            ax.set_ylabel(YLABELS[metric])
            ax.set_ylim(-0.05, 1.05)
    axes[0, 1].legend(fontsize=7, loc="best")
    fig.suptitle(f"Phase diagram vs {'λ' if x == 'lambda' else 'L0'} ({width} features per "
                 "layer): mean over seeds, 95% bootstrap band")
    fig.subplots_adjust(hspace=0.3, wspace=0.08, top=0.92)
    path = save_figure(fig, out / f"phase_{x}.png")
    plt.close(fig)
    return path


def front(out: Path, records: list[dict]) -> Path:
    """NMSE vs total L0, one point per run: skipping CLTs, CLTs that keep B, the rest."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, arch in zip(axes, ("plt", "clt"), strict=True):
        runs = [r for r in records if r["arch"] == arch]
        kinds = {SKIPS: ("x", "#d62728"), KEEPS_B: ("o", "#2ca02c"), NEITHER: (".", "#999999")}
        for kind, (marker, colour) in kinds.items():
            pts = [r["metrics"] for r in runs if _kind(r["metrics"]) == kind]
            ax.scatter([m["l0_total"] for m in pts], [max(m["nmse"], 1e-6) for m in pts],
                       marker=marker, color=colour, s=14, alpha=0.6, label=f"{kind}: {len(pts)}")
        ax.set_yscale("log")
        ax.set_xlabel("total L0 per sample")
        ax.set_title(f"{arch.upper()}: reconstruction vs sparsity, one point per run")
        ax.legend(fontsize=8)
    for ax in axes:  # sharey hides the right panel's tick labels, not its meaning
        ax.set_ylabel("NMSE (fraction of variance unexplained, log)")
    fig.subplots_adjust(wspace=0.15)
    path = save_figure(fig, out / "front.png")
    plt.close(fig)
    return path


def _kind(m: dict) -> str:
    if (m.get("skip_fraction") or 0) > SKIP_THRESHOLD:
        return SKIPS
    if (m.get("middle_feature_recovery") or 0) >= A.KEEPS_B:
        return KEEPS_B
    return NEITHER


def width_plot(out: Path, onset: list[dict]) -> Path | None:
    if not onset:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for row in onset:
        ws = list(row["skip_share"])
        ax.plot(ws, list(row["skip_share"].values()), marker="o",
                label=f"{row['setting']}, knob {row['knob']:g}")
    # the cheapest shortcut needs 12 (docs/concepts.md §4)
    ax.axvline(12, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("features per layer")
    ax.set_ylabel("share of CLT seeds that skip")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("Width: where skipping starts (dotted: the 12 features of the cheapest shortcut)",
                 fontsize=9)
    ax.legend(fontsize=7)
    path = save_figure(fig, out / "width.png")
    plt.close(fig)
    return path


def cross_share_plot(out: Path, records: list[dict], width: int) -> Path:
    """CLT: share of decoder mass in cross-layer blocks vs λ, one curve per setting."""
    plt = _plt()
    lam = [r for r in records if r["arch"] == "clt" and r["penalty"] not in ("topk", "batchtopk")]
    fig, ax = plt.subplots(figsize=(7, 4))
    for (name, _), pts in sorted(A.curves(lam, "cross_layer_share", width).items()):
        xs = [p["knob"] for p in pts]
        ax.plot(xs, [p["mean"] for p in pts], marker="o", ms=3, label=name)
        ax.fill_between(xs, [p["lo"] for p in pts], [p["hi"] for p in pts], alpha=0.15)
    ax.set_xscale("log")
    ax.set_xlabel("λ (sparsity coefficient, log scale)")
    ax.set_ylabel("cross-layer share of decoder mass (fraction)")
    ax.set_title("CLT: decoder mass in cross-layer blocks vs λ (mean, 95% band)", fontsize=9)
    ax.legend(fontsize=7)
    path = save_figure(fig, out / "cross_layer_share.png")
    plt.close(fig)
    return path


def circuit_plot(out: Path, rows: list[dict]) -> Path | None:
    """At matched L0, per setting: edge recall against the true circuit and the number of
    shortcut edges, a dot per seed, PLT beside CLT."""
    rows = [r for r in rows if "recs" in r]
    if not rows:
        return None
    plt = _plt()
    keys = sorted({(r["setting"], r["target"]) for r in rows}, key=repr)
    fig, axes = plt.subplots(2, 1, figsize=(max(7, 0.55 * len(keys)), 6.5), sharex=True)
    rng = np.random.default_rng(0)
    colors = {"plt": "#1f77b4", "clt": "#d62728"}
    for r in rows:
        x = keys.index((r["setting"], r["target"])) + (-0.15 if r["arch"] == "plt" else 0.15)
        for ax, key in zip(axes, ("circuit_edge_recall", "shortcut_edges"), strict=True):
            vals = [m["metrics"].get(key) for m in r["recs"]]
            vals = [v for v in vals if v is not None]
            ax.scatter(x + rng.uniform(-0.06, 0.06, len(vals)), vals, s=10,
                       color=colors[r["arch"]], alpha=0.7)
    for arch, c in colors.items():
        axes[0].scatter([], [], color=c, label=arch.upper())
    axes[0].set_ylabel("edge recall vs true circuit")
    axes[0].set_ylim(-0.05, 1.05)
    axes[1].set_ylabel("shortcut edges (count)")
    axes[1].set_xlabel("setting, matched total L0 per sample")
    axes[1].set_xticks(range(len(keys)))
    axes[1].set_xticklabels([f"{s}, L0 {t:g}" for s, t in keys], rotation=30, fontsize=7,
                            ha="right", rotation_mode="anchor")
    axes[0].legend(fontsize=8)
    axes[0].set_title("Attribution graphs scored against the true circuit (dot = seed)",
                      fontsize=9)
    fig.subplots_adjust(hspace=0.08)
    path = save_figure(fig, out / "circuit.png")
    plt.close(fig)
    return path
