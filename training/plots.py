"""PNG plots for the reproduce report (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from clt_eval.evaluate import SKIP_THRESHOLD
from training.analysis import by_setting

COLORS = {"plt": "#1f77b4", "clt": "#d62728"}


def plot_matched(out: Path, matched: list[dict], records: list[dict]) -> list[Path]:
    """Skip fraction and middle-layer recovery per setting at matched L0, a dot per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = by_setting(records)
    groups = sorted({r["setting"] for r in matched if r["arch"]})
    paths = []
    for key, title in (("skip_fraction", "Skip fraction (0 faithful, 1 skipped)"),
                       ("middle_feature_recovery", "Middle-layer (B) features recovered")):
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups)), 4))
        rng = np.random.default_rng(0)
        for gi, g in enumerate(groups):
            for ai, arch in enumerate(("plt", "clt")):
                row = next((r for r in matched if r["setting"] == g and r["arch"] == arch),
                           None)
                if row is None:
                    continue
                vals = [r["metrics"][key] for r in settings[g][arch][row["knob"]]]
                vals = np.array([np.nan if v is None else v for v in vals], dtype=float)
                xs = gi + (ai - 0.5) * 0.35 + rng.uniform(-0.08, 0.08, len(vals))
                ax.scatter(xs, vals, s=18, color=COLORS[arch], alpha=0.75,
                           label=arch.upper() if gi == 0 else None)
        ax.set_xticks(range(len(groups)), [g.replace("/", "\n").replace(" ", "\n")
                                           for g in groups], fontsize=8)
        ax.set_ylim(-0.05, 1.05)
        if key == "skip_fraction":  # above this a run counts as skipping
            ax.axhline(SKIP_THRESHOLD, color="grey", lw=0.8, ls="--")
        ax.set_title(f"{title}, at matched L0; one dot per seed")
        ax.legend()
        fig.tight_layout()
        path = out / f"{key}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
