"""Draw a pruned attribution graph as a PNG, and write a graph's files (JSON + PNG).

Layout as in the Circuit Tracing figures (Ameisen et al. 2025): x = token position, y =
model layer (embeddings at the bottom, logits at the top); nodes that share a cell sit side
by side. Node area grows with influence on the logits; edge width with |weight|, blue for
excitatory and red for inhibitory edges.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from clt_eval.lm.graph import AttributionGraph, graph_scores, prune, save_graph

KIND_COLORS = {"feature": "#ff7f0e", "error": "#8c8c8c", "embedding": "#2ca02c",
               "logit": "#9467bd"}
POSITIVE, NEGATIVE = (0.12, 0.47, 0.71), (0.84, 0.15, 0.16)  # edge colours (RGB)


def node_xy(g: AttributionGraph) -> torch.Tensor:
    """[N, 2] plot coordinates: position (spread within its cell) and model layer."""
    cells: dict[tuple[int, int], list[int]] = {}
    for i in range(g.n_nodes):
        cells.setdefault((g.position[i], g.layer[i]), []).append(i)
    xy = torch.zeros(g.n_nodes, 2)
    for (p, layer), members in cells.items():
        for j, i in enumerate(members):
            xy[i, 0] = p + (j + 0.5) / len(members) * 0.8 - 0.4
            xy[i, 1] = layer
    return xy


def plot_graph(g: AttributionGraph, path: str | Path, influence_N: torch.Tensor | None = None,
               title: str | None = None) -> Path:
    """Write the drawing of ``g`` (best pruned first: a full graph is a hairball) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection

    xy = node_xy(g).numpy()
    P = max(len(g.prompt_tokens), 1)
    M = int(g.meta.get("n_model_layers", max(g.layer) if g.layer else 1))
    fig, ax = plt.subplots(figsize=(min(3 + 0.6 * P, 24), min(3 + 0.45 * (M + 2), 16)))
    tgt, src = g.A_NN.nonzero(as_tuple=True)
    if len(tgt):
        w = g.A_NN[tgt, src]
        width = (w.abs() / w.abs().max()).numpy()
        segs = [[xy[s], xy[t]] for s, t in zip(src.tolist(), tgt.tolist(), strict=True)]
        colors = [(*(POSITIVE if v > 0 else NEGATIVE), 0.15 + 0.6 * a)
                  for v, a in zip(w.tolist(), width.tolist(), strict=True)]
        ax.add_collection(LineCollection(segs, linewidths=0.3 + 3 * width, colors=colors,
                                         zorder=1))
    size = torch.full((g.n_nodes,), 30.0)
    if influence_N is not None and g.n_nodes:
        size = 15 + 300 * influence_N.abs() / influence_N.abs().max().clamp_min(1e-12)
    for kind, color in KIND_COLORS.items():
        idx = [i for i in range(g.n_nodes) if g.kind[i] == kind]
        if idx:
            ax.scatter(xy[idx, 0], xy[idx, 1], s=size[idx].numpy(), c=color, label=kind,
                       edgecolors="black", linewidths=0.4, zorder=2)
    for i in (i for i in range(g.n_nodes) if g.kind[i] == "logit"):
        strs = g.meta.get("logit_strs") or []
        k = [j for j in range(g.n_nodes) if g.kind[j] == "logit"].index(i)
        label = strs[k] if k < len(strs) else str(g.token[i])
        ax.annotate(repr(label), xy[i], textcoords="offset points", xytext=(0, 7),
                    ha="left", rotation=45, fontsize=6)
    labels = g.prompt_strs or [str(t) for t in g.prompt_tokens]
    ax.set_xticks(range(P), [repr(s)[1:-1][:12] for s in labels], rotation=60, fontsize=7)
    ax.set_yticks([-1, *range(M), M], ["emb", *map(str, range(M)), "logits"], fontsize=7)
    ax.set_xlim(-0.6, P - 0.4)
    ax.set_ylim(-1.6, M + 1.2)
    ax.set_xlabel("token position")
    ax.set_ylabel("model layer")
    ax.legend(fontsize=7, loc="upper left", markerscale=0.6)
    ax.set_title(title or _title(g), fontsize=9)
    fig.tight_layout()
    return _savefig_atomic(fig, Path(path))


def _title(g: AttributionGraph) -> str:
    s = g.scores
    parts = [f"{k} {s[k]:.3f}" for k in ("replacement", "completeness") if k in s]
    return "attribution graph" + (": " + ", ".join(parts) if parts else "")


def _savefig_atomic(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return path


def write_graph(g: AttributionGraph, out_dir: str | Path, node_threshold: float = 0.8,
                edge_threshold: float = 0.98) -> dict[str, Path]:
    """Prune ``g`` and write ``graph.json`` (the pruned graph, each node's influence, the
    scores of the full and the pruned graph) and ``graph.png`` into ``out_dir``."""
    node_mask, edge_mask, inf = prune(g.A_NN, g.logit_weights(), g.kind, node_threshold,
                                      edge_threshold)
    sub = g.subgraph(node_mask, edge_mask)
    pruned = graph_scores(sub.A_NN, sub.logit_weights(), sub.mask("error"),
                          sub.mask("embedding"))
    sub.scores = {**g.scores, **{f"pruned_{k}": v for k, v in pruned.items()},
                  "n_nodes_full": g.n_nodes, "n_nodes_pruned": sub.n_nodes,
                  "n_edges_pruned": int((sub.A_NN != 0).sum()),
                  "node_threshold": node_threshold, "edge_threshold": edge_threshold}
    # A logit's own weight counts as its influence, so the output nodes are drawn visible.
    out_inf = (inf + g.logit_weights())[node_mask]
    out = Path(out_dir)
    return {"json": save_graph(sub, out / "graph.json", out_inf),
            "png": plot_graph(sub, out / "graph.png", out_inf)}


def load_windowed_transcoder(path: str | Path):
    """(Transcoder, LayerWindow) from a transcoder folder in any format ``clt_eval.formats``
    reads; a clt-eval folder saved without a window replaces model layers 0..L-1, as
    ``clt-eval convert`` assumes."""
    from clt_eval.formats import load_any
    from clt_eval.lm.window import LayerWindow

    tc, window = load_any(path)
    return tc, window or LayerWindow(tuple(range(tc.cfg.n_layers)))


def make_graph(transcoder: str | Path, model_name: str, prompt: str, out_dir: str | Path, *,
               target_tokens: list[int] | None = None, max_logits: int = 10,
               node_threshold: float = 0.8, edge_threshold: float = 0.98,
               batch_size: int = 16, skip_first: bool = True) -> dict[str, Path]:
    """`clt-eval graph`: attribute ``prompt`` through a saved windowed transcoder, write
    ``graph.json`` and ``graph.png``. Every input is checked before anything is written."""
    from clt_eval.errors import require
    from clt_eval.lm.attribution import attribute, tokenize_prompt
    from clt_eval.lm.models import load_model

    for name, v in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        require(0 <= v <= 1, f"{name}={v!r}: expected a number in [0, 1]")
    require(max_logits > 0, f"max_logits={max_logits!r}: expected a positive integer")
    out = Path(out_dir)
    require(not out.exists() or out.is_dir(), f"{out}: exists and is not a folder")
    tc, window = load_windowed_transcoder(transcoder)
    model = load_model(model_name)
    tokens = tokenize_prompt(model, prompt)
    g = attribute(model, tc, window, tokens, target_tokens=target_tokens,
                  max_logits=max_logits, batch_size=batch_size, skip_first=skip_first)
    g.meta |= {"transcoder_path": str(transcoder), "prompt": prompt}
    return write_graph(g, out, node_threshold, edge_threshold)
