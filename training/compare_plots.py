"""PNG plots for `clt-eval compare` (matplotlib, headless, written atomically). Each plot
draws numbers from the compare records; none computes a metric of its own."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np

from clt_eval.training.sweep_plots import save_figure

COLORS = {"plt": "#1f77b4", "clt": "#d62728"}
NAMES = ("plt", "clt")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def write_plots(out: Path, result: dict, drawn: dict) -> list[Path]:
    """All plots of the report; ``drawn``: {group: (record, {name: (pruned graph, influence)})}."""
    paths = [layer_profiles(out, result["summary"]), prompt_metrics(out, result["prompts"]),
             interventions(out, result["prompts"])]
    for group, (rec, graphs) in drawn.items():
        paths.append(graph_pair(out / f"graphs_{_slug(group)}.png", rec, graphs))
    return paths


def _bars(ax, labels: list[str], series: dict[str, list[float]], width: float = 0.38):
    x = np.arange(len(labels))
    for i, (name, vals) in enumerate(series.items()):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, _nan(vals), width,
               color=COLORS.get(name, "#7f7f7f"), label=name.upper())
    ax.set_xticks(x, labels, fontsize=7)
    ax.tick_params(axis="y", labelsize=7)


def _nan(vals) -> list[float]:
    return [float("nan") if v is None else float(v) for v in vals]


def layer_profiles(out: Path, summary: dict) -> Path:
    """Per group: influence share, direct-edge share and L0 by window layer, PLT vs CLT."""
    plt = _plt()
    groups = list(summary)
    keys = (("influence_by_layer", "share of feature influence", "fraction of total"),
            ("direct_by_layer", "share of direct logit edges", "fraction of total"),
            ("l0_per_layer", "L0 per token", "active features"))
    fig, axes = plt.subplots(len(groups), 3, figsize=(11, 2.4 * len(groups)), squeeze=False)
    for gi, g in enumerate(groups):
        for ki, (key, title, unit) in enumerate(keys):
            ax = axes[gi, ki]
            L = len(summary[g]["plt"][key])
            _bars(ax, [str(i) for i in range(L)], {n: summary[g][n][key] for n in NAMES})
            ax.set_title(f"{g}: {title}", fontsize=8)
            ax.set_xlabel("window layer (index in the window)", fontsize=7)
            ax.set_ylabel(unit, fontsize=7)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, out / "layer_profiles.png")


METRICS = (("early_share", "early-layer share", "fraction"),
           ("l0_cv", "L0 CV across layers", "std / mean"),
           ("mean_path_length", "mean path length", "edges"),
           ("mean_feature_hops", "feature hops", "features on path"),
           ("window_replacement", "replacement (window)", "score (0–1)"),
           ("window_completeness", "completeness (window)", "score (0–1)"))


def prompt_labels(records: list[dict]) -> list[str]:
    """"<group> <n>" per prompt, n counting from 1 within its group: the whole group name,
    never cut short."""
    seen: dict[str, int] = {}
    out = []
    for r in records:
        seen[r["group"]] = seen.get(r["group"], 0) + 1
        out.append(f"{r['group']} {seen[r['group']]}")
    return out


def prompt_metrics(out: Path, records: list[dict]) -> Path:
    """One panel per metric, a pair of bars per prompt; the last panel is the Jaccard."""
    plt = _plt()
    labels = prompt_labels(records)
    fig, axes = plt.subplots(len(METRICS) + 1, 1, sharex=True,
                             figsize=(max(7, 0.45 * len(records) + 2), 2.0 * (len(METRICS) + 1)))
    for ax, (key, title, unit) in zip(axes, METRICS, strict=False):
        _bars(ax, labels, {n: [r[n][key] for r in records] for n in NAMES})
        ax.set_title(title, fontsize=8)
        ax.set_ylabel(unit, fontsize=7)
    _bars(axes[-1], labels, {"jaccard": [r["overlap"]["jaccard"] for r in records]}, 0.6)
    axes[-1].set_title("matched-node Jaccard, PLT vs CLT pruned graphs", fontsize=8)
    axes[-1].set_ylabel("Jaccard (0–1)", fontsize=7)
    axes[-1].set_xlabel("prompt (group, number within the group)", fontsize=8)
    axes[-1].tick_params(axis="x", labelrotation=45)
    for t in axes[-1].get_xticklabels():
        t.set_horizontalalignment("right")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, out / "prompt_metrics.png")


def interventions(out: Path, records: list[dict]) -> Path:
    """Δ log-prob of the answer: real model (x) vs replacement (y), per variant."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    markers = {"zero": "o", "patch": "^"}
    for ax, variant in zip(axes, ("frozen", "whole"), strict=True):
        lim = 0.0
        for name in NAMES:
            for kind, m in markers.items():
                cs = [c for r in records for c in r["interventions"]
                      if c["kind"] == kind and c["scope"] == "all"]
                if not cs:
                    continue
                x = [c["true"]["dlogprob"] for c in cs]
                y = [c[f"{name}_{variant}"]["dlogprob"] for c in cs]
                lim = max(lim, *map(abs, x), *map(abs, y))
                ax.scatter(x, y, s=22, marker=m, color=COLORS[name], alpha=0.75,
                           label=f"{name.upper()} {kind}")
        cs = [c for r in records for c in r["interventions"]
              if c["kind"] == "zero" and c["scope"] == "all" and "no_response" in c]
        if variant == "whole" and cs:  # the control: later window layers do not respond
            ax.scatter([c["true"]["dlogprob"] for c in cs],
                       [c["no_response"]["dlogprob"] for c in cs], s=18, marker="x",
                       color="#7f7f7f", alpha=0.7, label="control zero")
        lim = lim * 1.05 if lim > 0 and math.isfinite(lim) else 1.0
        ax.plot([-lim, lim], [-lim, lim], color="grey", lw=0.8, ls="--")
        ax.axhline(0, color="grey", lw=0.5)
        ax.axvline(0, color="grey", lw=0.5)
        ax.set_xlabel("Δ log p(answer), real model (nats)")
        ax.set_ylabel("Δ log p(answer), replacement (nats)")
        ax.set_title(f"middle-layer interventions, all positions ({variant} error)", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, out / "interventions.png")


def graph_pair(path: Path, rec: dict, graphs: dict) -> Path:
    """The PLT's and the CLT's graphs of one prompt, side by side: each transcoder's most
    influential features (``top_features_graph``), drawn by
    ``training.graph_plot.plot_graph`` and set next to each other."""
    from clt_eval.training.graph_plot import plot_graph

    plt = _plt()
    with tempfile.TemporaryDirectory() as tmp:
        images = []
        for name in NAMES:
            sub, inf = graphs[name]
            m = rec[name]
            title = (f"{name.upper()}: top {sum(k == 'feature' for k in sub.kind)} features; "
                     f"early share {m['early_share']:.2f}, path "
                     f"{m['mean_path_length']:.2f}, repl {m['window_replacement']:.2f}")
            images.append(plt.imread(plot_graph(sub, Path(tmp) / f"{name}.png", inf, title)))
    w = sum(im.shape[1] for im in images) / 120
    h = max(im.shape[0] for im in images) / 120
    fig, axes = plt.subplots(1, 2, figsize=(w, h + 0.5))
    for ax, im in zip(axes, images, strict=True):
        ax.imshow(im)
        ax.axis("off")
    fig.suptitle(f"{rec['group']}: {rec['text']!r} → {rec['target_str']!r}", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


DRAW_FEATURES = 40  # features in the side-by-side drawings: hundreds survive pruning here


def top_features_graph(g, influence_N, k: int = DRAW_FEATURES):
    """(subgraph, its influence): the ``k`` features of most influence on the answer with the
    embeddings and logits, for drawing only (a pruned graph of a transcoder with hundreds of
    active features per token is a hairball)."""
    import torch

    is_f = g.mask("feature")
    score = torch.where(is_f, influence_N, torch.full_like(influence_N, -1.0))
    top = score.topk(min(k, int(is_f.sum()))).indices
    keep = g.mask("embedding") | g.mask("logit")
    keep[top] = True
    return g.subgraph(keep), influence_N[keep]


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text).strip("_") or "group"
