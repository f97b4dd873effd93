"""Draw a pruned attribution graph as a PNG, and write a graph's files (JSON + viewer JSON +
PNG), for one prompt or many (resumable).

Layout as in the Circuit Tracing figures (Ameisen et al. 2025): x = token position, y =
model layer (embeddings at the bottom, logits at the top); nodes that share a cell sit side
by side. Only the ``max_nodes`` most influential feature and error nodes are drawn (a full
graph is a hairball); each is labelled (``L<layer>#<feature>`` for a feature, ``err`` for an
error node), logits with their token and probability. Node area grows with influence on the
logits; edge width with |weight|, blue for excitatory and red for inhibitory edges.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

from clt_eval.atomic import atomic_folder, write_json_atomic
from clt_eval.lm.graph import AttributionGraph, save_graph, save_viewer_json

KIND_COLORS = {"feature": "#ff7f0e", "error": "#8c8c8c", "embedding": "#2ca02c",
               "logit": "#9467bd"}
POSITIVE, NEGATIVE = (0.12, 0.47, 0.71), (0.84, 0.15, 0.16)  # edge colours (RGB)
MAX_NODES = 40  # feature + error nodes drawn


def node_xy(g: AttributionGraph) -> tuple[torch.Tensor, list[float]]:
    """([N, 2] plot coordinates, x of each position's centre): x = token position, each
    position as wide as its most crowded layer needs, nodes of a cell side by side; y = model
    layer."""
    cells: dict[tuple[int, int], list[int]] = {}
    for i in range(g.n_nodes):
        cells.setdefault((g.position[i], g.layer[i]), []).append(i)
    P = max([len(g.prompt_tokens)] + [p + 1 for p, _ in cells])
    crowd = [max([len(m) for (q, _), m in cells.items() if q == p], default=1)
             for p in range(P)]
    width = [max(1.0, 0.5 * n) for n in crowd]
    left = [sum(width[:p]) for p in range(P)]
    xy = torch.zeros(g.n_nodes, 2)
    for (p, layer), members in cells.items():
        for j, i in enumerate(members):
            xy[i, 0] = left[p] + 0.1 + (j + 0.5) / len(members) * (width[p] - 0.2)
            xy[i, 1] = layer
    return xy, [left[p] + width[p] / 2 for p in range(P)]


def top_edges(A_NN: torch.Tensor, max_edges: int) -> torch.Tensor:
    """[N, N] bool: the ``max_edges`` edges that carry the largest share of their target's
    input (|A[t, s]| / Σ_s |A[t, s]|), so every drawn node keeps its main inputs."""
    share = A_NN.abs() / A_NN.abs().sum(1, keepdim=True).clamp_min(1e-30)
    flat = share.flatten()
    n = min(max_edges, int((flat > 0).sum()))
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.topk(n).indices] = True
    return keep.view_as(A_NN) & (A_NN != 0)


def top_nodes(g: AttributionGraph, influence_N: torch.Tensor | None,
              max_nodes: int = MAX_NODES) -> torch.Tensor:
    """[N] bool: every embedding and logit, and the ``max_nodes`` feature/error nodes of
    highest influence (all of them without influences)."""
    inner = g.mask("feature") | g.mask("error")
    keep = ~inner
    if influence_N is None or int(inner.sum()) <= max_nodes:
        return keep | inner
    score = torch.where(inner, influence_N.abs(), torch.full_like(influence_N, -1.0))
    keep[score.topk(max_nodes).indices] = True
    return keep


def _label(g: AttributionGraph, i: int, logit_strs: list[str], logit_rank: int) -> str:
    kind = g.kind[i]
    if kind == "feature":
        return f"L{g.layer[i]}#{g.feature[i]}"
    if kind == "error":
        return "err"
    if kind == "logit":
        s = logit_strs[logit_rank] if logit_rank < len(logit_strs) else str(g.token[i])
        return f"{s!r} p={float(g.activation[i]):.2f}"
    return ""


def plot_graph(g: AttributionGraph, path: str | Path, influence_N: torch.Tensor | None = None,
               title: str | None = None, max_nodes: int = MAX_NODES) -> Path:
    """Write the drawing of ``g`` (best pruned first) to ``path``: at most ``max_nodes``
    feature/error nodes, by influence (module docstring)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection
    from matplotlib.lines import Line2D

    keep = top_nodes(g, influence_N, max_nodes)
    n_hidden = int((~keep).sum())
    if n_hidden:
        influence_N = influence_N[keep] if influence_N is not None else None
        g = g.subgraph(keep)
    xy, centres = node_xy(g)
    xy = xy.numpy()
    P, span = len(centres), float(xy[:, 0].max()) + 0.6 if g.n_nodes else 1.0
    M = int(g.meta.get("n_model_layers", max(g.layer) if g.layer else 1))
    fig, ax = plt.subplots(figsize=(min(4 + 0.75 * span, 16), min(3.5 + 0.55 * (M + 2), 10)))
    tgt, src = top_edges(g.A_NN, 3 * max_nodes).nonzero(as_tuple=True)
    if len(tgt):
        w = g.A_NN[tgt, src]
        width = (w.abs() / w.abs().max()).numpy()
        segs = [[xy[s], xy[t]] for s, t in zip(src.tolist(), tgt.tolist(), strict=True)]
        colors = [(*(POSITIVE if v > 0 else NEGATIVE), 0.15 + 0.6 * a)
                  for v, a in zip(w.tolist(), width.tolist(), strict=True)]
        ax.add_collection(LineCollection(segs, linewidths=0.3 + 3 * width, colors=colors,
                                         zorder=1))
    size = torch.full((g.n_nodes,), 40.0)
    if influence_N is not None and g.n_nodes:
        size = 25 + 300 * influence_N.abs() / influence_N.abs().max().clamp_min(1e-12)
    for kind, color in KIND_COLORS.items():
        idx = [i for i in range(g.n_nodes) if g.kind[i] == kind]
        if idx:
            ax.scatter(xy[idx, 0], xy[idx, 1], s=size[idx].numpy(), c=color,
                       edgecolors="black", linewidths=0.4, zorder=2)
    logit_strs = list(g.meta.get("logit_strs") or [])
    logits = [i for i in range(g.n_nodes) if g.kind[i] == "logit"]
    for i in range(g.n_nodes):
        text = _label(g, i, logit_strs, logits.index(i) if i in logits else 0)
        if text:
            ax.annotate(text, xy[i], textcoords="offset points", xytext=(2, 5), ha="left",
                        rotation=35, fontsize=6, zorder=3)
    labels = (g.prompt_strs or [str(t) for t in g.prompt_tokens])[:P]
    ax.set_xticks(centres[:len(labels)], [repr(s)[1:-1][:12] for s in labels], rotation=45,
                  fontsize=8, ha="right")
    ax.set_yticks([-1, *range(M), M], ["tokens", *map(str, range(M)), "logits"], fontsize=7)
    ax.set_xlim(-0.2, span)
    ax.set_ylim(-1.6, M + 1.6)
    ax.set_xlabel("token position")
    ax.set_ylabel("model layer")
    handles = [Line2D([], [], marker="o", ls="", color=c, markeredgecolor="black", label=k)
               for k, c in KIND_COLORS.items()]
    handles += [Line2D([], [], color=POSITIVE, label="excitatory edge"),
                Line2D([], [], color=NEGATIVE, label="inhibitory edge")]
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0),
              borderaxespad=0)
    shown = title or _title(g)
    if n_hidden:
        shown += f"\n(top {max_nodes} feature/error nodes by influence; {n_hidden} more hidden)"
    ax.set_title(shown, fontsize=9)
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
        fig.savefig(tmp, dpi=90)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return path


def write_graph(g: AttributionGraph, out_dir: str | Path, node_threshold: float = 0.8,
                edge_threshold: float = 0.98, max_nodes: int = MAX_NODES) -> dict[str, Path]:
    """Prune ``g`` and write into ``out_dir``: ``graph.json`` (the pruned graph, each node's
    influence, the scores of the full and the pruned graph), ``graph.viewer.json`` (the same
    graph for circuit-tracer's viewer / Neuronpedia) and ``graph.png``."""
    sub = g.prune(node_threshold, edge_threshold)
    # A logit's own weight counts as its influence, so the output nodes are drawn visible.
    out_inf = torch.tensor(sub.meta.pop("influence")) + sub.logit_weights()
    sub.meta.pop("cumulative_influence")
    out = Path(out_dir)
    return {"json": save_graph(sub, out / "graph.json", out_inf),
            "viewer": save_viewer_json(g, out / "graph.viewer.json", node_threshold,
                                       edge_threshold, slug=_slug(g)),
            "png": plot_graph(sub, out / "graph.png", out_inf, max_nodes=max_nodes)}


def _slug(g: AttributionGraph) -> str:
    text = str(g.meta.get("prompt", "graph"))
    words = "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")
    return "-".join(w for w in words.split("-") if w)[:40] or "graph"


def load_windowed_transcoder(path: str | Path, **load_opts):
    """(Transcoder, LayerWindow) from anything ``clt_eval.formats.load_any`` reads (a folder in
    any known format, hf://…, sae_lens:…; ``load_opts``: its hooks and
    ``allow_external_paths``); a clt-eval folder saved without a window replaces model layers
    0..L-1, as ``clt-eval convert`` assumes."""
    from clt_eval.formats import load_any
    from clt_eval.lm.window import LayerWindow

    tc, window = load_any(path, **load_opts)
    return tc, window or LayerWindow(tuple(range(tc.cfg.n_layers)))


LOAD_OPTS = ("feature_input_hook", "feature_output_hook", "allow_external_paths")


def _check_options(node_threshold: float, edge_threshold: float, max_logits: int,
                   out: Path) -> None:
    from clt_eval.errors import require

    for name, v in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        require(0 <= v <= 1, f"{name}={v!r}: expected a number in [0, 1]")
    require(max_logits > 0, f"max_logits={max_logits!r}: expected a positive integer")
    require(not out.exists() or out.is_dir(), f"{out}: exists and is not a folder")


def make_graph(transcoder: str | Path, model_name: str, prompt: str, out_dir: str | Path, *,
               target_tokens: list[int] | None = None, max_logits: int = 10,
               node_threshold: float = 0.8, edge_threshold: float = 0.98,
               batch_size: int = 16, skip_first: bool | None = True,
               conventions: str = "circuit-tracer", max_nodes: int = MAX_NODES,
               progress: bool | None = None, feature_input_hook: str | None = None,
               feature_output_hook: str | None = None,
               allow_external_paths: bool = False) -> dict[str, Path]:
    """`clt-eval graph`: attribute ``prompt`` through a saved windowed transcoder (a folder,
    hf://… or sae_lens:…), write ``graph.json``, ``graph.viewer.json`` and ``graph.png``.
    Every input is checked before anything is written. The hooks and
    ``allow_external_paths``: as in ``clt_eval.formats.load_any``."""
    from clt_eval.lm.attribution import attribute, tokenize_prompt
    from clt_eval.lm.models import load_model

    out = Path(out_dir)
    _check_options(node_threshold, edge_threshold, max_logits, out)
    tc, window = load_windowed_transcoder(
        transcoder, feature_input_hook=feature_input_hook,
        feature_output_hook=feature_output_hook, allow_external_paths=allow_external_paths)
    model = load_model(model_name)
    tokens = tokenize_prompt(model, prompt)
    g = attribute(model, tc, window, tokens, target_tokens=target_tokens,
                  max_logits=max_logits, batch_size=batch_size, skip_first=skip_first,
                  conventions=conventions, progress=progress)
    g.meta |= {"transcoder_path": str(transcoder), "prompt": prompt}
    return write_graph(g, out, node_threshold, edge_threshold, max_nodes)


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per non-empty line of a text file (`--prompts FILE`)."""
    from clt_eval.errors import CltEvalError, require

    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise CltEvalError(f"{path}: not a readable text file ({exc})") from None
    prompts = [line for line in lines if line.strip()]
    require(prompts, f"{path}: no prompts; expected one prompt per line")
    return prompts


def prompt_folder(i: int, prompt: str) -> str:
    """A prompt's subfolder: its index and a hash of its text, so an edited prompt gets a new
    graph and an unchanged one keeps its own."""
    return f"{i:03d}-{hashlib.sha1(prompt.encode()).hexdigest()[:8]}"


GRAPH_FILES = ("graph.json", "graph.viewer.json", "graph.png")


def make_graphs(transcoder: str | Path, model_name: str, prompts: list[str],
                out_dir: str | Path, **opts) -> dict:
    """`clt-eval graph --prompts FILE`: one graph folder per prompt under ``out_dir``
    (``prompt_folder``), plus ``graphs.json`` listing them. Resumable: a prompt whose folder
    already holds its finished files is kept, not recomputed; each folder appears whole or
    not at all. ``opts``: ``make_graph``'s options (the model and transcoder load once).
    What counts as finished is the prompt alone: rerun into a new folder after changing
    other options."""
    from clt_eval.errors import require
    from clt_eval.lm.attribution import attribute, tokenize_prompt
    from clt_eval.lm.models import load_model

    out = Path(out_dir)
    require(prompts, "prompts: expected at least one prompt")
    graph_opts = {k: opts.pop(k) for k in ("node_threshold", "edge_threshold", "max_nodes")
                  if k in opts}
    load_opts = {k: opts.pop(k) for k in LOAD_OPTS if k in opts}
    _check_options(graph_opts.get("node_threshold", 0.8), graph_opts.get("edge_threshold", 0.98),
                   opts.get("max_logits", 10), out)
    todo = [(i, p) for i, p in enumerate(prompts) if not _finished(out / prompt_folder(i, p), p)]
    if todo:  # the model and transcoder load once, and only if there is work
        tc, window = load_windowed_transcoder(transcoder, **load_opts)
        model = load_model(model_name)
    for i, prompt in todo:
        g = attribute(model, tc, window, tokenize_prompt(model, prompt), **opts)
        g.meta |= {"transcoder_path": str(transcoder), "prompt": prompt}
        with atomic_folder(out / prompt_folder(i, prompt)) as tmp:
            write_graph(g, tmp, **graph_opts)
    index = [{"index": i, "prompt": p, "folder": prompt_folder(i, p),
              "resumed": (i, p) not in todo} for i, p in enumerate(prompts)]
    write_json_atomic(out / "graphs.json", {"transcoder": str(transcoder), "model": model_name,
                                            "graphs": index})
    return {"index": out / "graphs.json", "computed": len(todo),
            "kept": len(prompts) - len(todo)}


def _finished(folder: Path, prompt: str) -> bool:
    if not all((folder / f).is_file() for f in GRAPH_FILES):
        return False
    try:
        return json.loads((folder / "graph.json").read_text())["meta"].get("prompt") == prompt
    except (OSError, ValueError, KeyError, TypeError):
        return False
