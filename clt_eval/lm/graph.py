"""Attribution graphs: the data structure, pruning, graph scores and JSON.

Definitions follow Ameisen et al. (2025), "Circuit Tracing: Revealing Computational Graphs in
Language Models" (transformer-circuits.pub, methods §§ "Graph pruning" and "Evaluating the
replacement model"), as circuit-tracer implements them:

- ``A[t, s]`` is the direct effect of source node s on target node t (rows are targets).
  Nodes are features, error nodes, input embeddings (sources only) and logits (sinks only).
- Influence uses the row-normalised absolute matrix Â = |A| / Σ_s |A[t, s]|: each target's
  inputs are shares of 1. Paths compose by products, so node n's influence on the logits is
  I = w · (Â + Â² + …) = w · ((I − Â)⁻¹ − I), with w the logit nodes' probabilities. The
  graph is a DAG (a node only reads earlier layers and positions), so Â is nilpotent and the
  series ends after at most (depth) terms.
- Replacement score: the share of the inputs' influence on the logits that does not end in an
  error node, I_emb / (I_emb + I_err).
- Completeness score: each node's share of non-error inputs, 1 − Σ_{s error} Â[n, s],
  averaged with weights I_n + w_n (its influence on the output, itself included for logits).
- Pruning: keep the nodes that carry ``node_threshold`` of the total influence, then the
  edges that carry ``edge_threshold`` of the influence recomputed on that subgraph (edge score
  Â'[t, s] · (I'_t + w_t)), then drop feature/error nodes left with no outgoing edge and
  features left with no incoming edge; embeddings and logits are always kept. Which nodes are
  ranked for the node threshold is a convention (docs/circuit_tracer.md): circuit-tracer
  (the default) ranks every node, token embeddings included, so influential tokens take part
  of the ``node_threshold`` share and fewer features and errors are kept; clt-eval's earlier
  convention ranks only feature and error nodes.

``Graph`` (an alias of ``AttributionGraph``) is the object the Python API hands out: nodes,
``adjacency``, ``scores``, ``prune`` -> Graph, ``to_json`` (clt-eval's format) and
``to_viewer_json`` (the JSON circuit-tracer's local viewer and Neuronpedia read).
``attribute(transcoder, model, prompt, **opts)`` builds one.

Shapes: N nodes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from clt_eval.atomic import write_json_atomic
from clt_eval.errors import CltEvalError, check_choice, require

KINDS = ("feature", "error", "embedding", "logit")
FORMAT, VERSION = "clt-eval-graph", 1


@dataclass
class AttributionGraph:
    """Nodes as parallel per-node lists, and the dense direct-effect matrix ``A_NN``.

    ``layer`` is the *model* layer (embeddings -1, logits n_model_layers); ``tc_layer`` the
    transcoder's own layer of a feature (-1 for other nodes). ``activation`` is the feature's
    activation, the norm of an error or embedding vector, a logit node's probability.
    ``token`` is the token id of an embedding or logit node (-1 otherwise).
    """

    kind: list[str]
    layer: list[int]
    tc_layer: list[int]
    position: list[int]
    feature: list[int]
    activation: list[float]
    token: list[int]
    A_NN: torch.Tensor
    prompt_tokens: list[int]
    prompt_strs: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    scores: dict = field(default_factory=dict)

    @property
    def n_nodes(self) -> int:
        return len(self.kind)

    def mask(self, kind: str) -> torch.Tensor:
        return torch.tensor([k == kind for k in self.kind], dtype=torch.bool)

    def logit_weights(self) -> torch.Tensor:
        """w: each logit node's probability, 0 for other nodes."""
        act = torch.tensor(self.activation, dtype=self.A_NN.dtype)
        return torch.where(self.mask("logit"), act, torch.zeros_like(act))

    def node_id(self, i: int) -> str:
        k, ly, p = self.kind[i], self.layer[i], self.position[i]
        return {"feature": f"F{ly}.{p}.{self.feature[i]}", "error": f"E{ly}.{p}",
                "embedding": f"T{p}", "logit": f"L{self.token[i]}"}[k]

    def subgraph(self, node_mask_N: torch.Tensor, edge_mask_NN: torch.Tensor | None = None):
        """The graph restricted to kept nodes (and kept edges)."""
        keep = node_mask_N.nonzero()[:, 0].tolist()
        A = self.A_NN if edge_mask_NN is None else self.A_NN * edge_mask_NN
        pick = lambda xs: [xs[i] for i in keep]  # noqa: E731
        return AttributionGraph(
            pick(self.kind), pick(self.layer), pick(self.tc_layer), pick(self.position),
            pick(self.feature), pick(self.activation), pick(self.token),
            A[keep][:, keep].clone(), list(self.prompt_tokens), list(self.prompt_strs),
            dict(self.meta), dict(self.scores))

    # ---- the Python API's view ---------------------------------------------------------
    @property
    def adjacency(self) -> torch.Tensor:
        """[N, N] direct effects, rows are targets (``A_NN``)."""
        return self.A_NN

    @property
    def nodes(self) -> list[dict]:
        """One dict per node: id, kind, layer, tc_layer, position, feature, activation, token."""
        return [{"id": self.node_id(i), "kind": self.kind[i], "layer": self.layer[i],
                 "tc_layer": self.tc_layer[i], "position": self.position[i],
                 "feature": self.feature[i], "activation": float(self.activation[i]),
                 "token": self.token[i]} for i in range(self.n_nodes)]

    def influence(self) -> torch.Tensor:
        """[N] each node's influence on the logits (module docstring)."""
        return influence(normalize_rows(self.A_NN), self.logit_weights())

    def prune(self, node_threshold: float = 0.8, edge_threshold: float = 0.98,
              conventions: str | None = None) -> AttributionGraph:
        """The pruned graph (module docstring), its scores those of the full graph plus
        ``pruned_*`` and the thresholds; ``meta["influence"]`` keeps each kept node's influence
        in the full graph. ``conventions`` None: the one the graph was built with."""
        conventions = conventions or self.meta.get("conventions", "circuit-tracer")
        node_mask, edge_mask, inf = prune(self.A_NN, self.logit_weights(), self.kind,
                                          node_threshold, edge_threshold, conventions)
        sub = self.subgraph(node_mask, edge_mask)
        pruned = graph_scores(sub.A_NN, sub.logit_weights(), sub.mask("error"),
                              sub.mask("embedding"))
        sub.scores = {**self.scores, **{f"pruned_{k}": v for k, v in pruned.items()},
                      "n_nodes_full": self.n_nodes, "n_nodes_pruned": sub.n_nodes,
                      "n_edges_pruned": int((sub.A_NN != 0).sum()),
                      "node_threshold": node_threshold, "edge_threshold": edge_threshold}
        sub.meta = dict(self.meta) | {"influence": inf[node_mask].tolist(),
                                      "cumulative_influence":
                                          cumulative_share(inf)[node_mask].tolist()}
        return sub

    def to_json(self, influence_N: torch.Tensor | None = None) -> dict:
        return to_json(self, influence_N)

    def to_viewer_json(self, node_threshold: float = 0.8, edge_threshold: float = 0.98,
                       slug: str = "clt-eval-graph", scan: str | None = None) -> dict:
        return to_viewer_json(self, node_threshold, edge_threshold, slug, scan)


Graph = AttributionGraph


# ---- influence, pruning and scores (pure functions of tensors) ---------------------------
def normalize_rows(A_NN: torch.Tensor) -> torch.Tensor:
    """Â = |A| with each target's row summing to 1 (rows without inputs stay 0)."""
    a = A_NN.abs()
    return a / a.sum(1, keepdim=True).clamp_min(1e-30)


def influence(An_NN: torch.Tensor, w_N: torch.Tensor, max_iter: int | None = None):
    """I = w (Â + Â² + …): every node's total influence on the weighted sinks, [N]."""
    step = w_N @ An_NN
    total = step.clone()
    for _ in range(max_iter or An_NN.shape[0] + 1):
        if not bool(step.abs().max() > 1e-12 * total.abs().max().clamp_min(1e-30)):
            return total
        step = step @ An_NN
        total = total + step
    raise CltEvalError("influence: the series did not converge; the graph has a cycle")


def graph_scores(A_NN: torch.Tensor, w_N: torch.Tensor, is_error_N: torch.Tensor,
                 is_embedding_N: torch.Tensor) -> dict[str, float]:
    """Replacement and completeness scores (Ameisen et al. 2025), each in [0, 1]."""
    An = normalize_rows(A_NN)
    inf = influence(An, w_N)
    from_emb, from_err = inf[is_embedding_N].sum(), inf[is_error_N].sum()
    denom = from_emb + from_err
    replacement = from_emb / denom if denom > 0 else torch.tensor(float("nan"))
    clean_share = 1 - An[:, is_error_N].sum(1)
    out = inf + w_N
    completeness = (clean_share * out).sum() / out.sum()
    return {"replacement": float(replacement), "completeness": float(completeness)}


def cumulative_cutoff(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """The smallest score among the top scores that together reach ``threshold`` of the sum."""
    vals = scores.flatten().sort(descending=True).values
    if vals.numel() == 0 or float(vals.sum()) <= 0:
        return torch.tensor(float("inf"))
    cum = vals.cumsum(0) / vals.sum()
    i = int(torch.searchsorted(cum, torch.tensor(threshold, dtype=cum.dtype)))
    return vals[min(i, vals.numel() - 1)]


def cumulative_share(influence_N: torch.Tensor) -> torch.Tensor:
    """[N]: the share of the total influence held by the nodes ranked at or above each node
    (what circuit-tracer's viewer shows as a node's "influence": small = most important)."""
    vals, order = influence_N.sort(descending=True)
    total = vals.sum()
    cum = vals.cumsum(0) / (total if float(total) > 0 else 1.0)
    out = torch.zeros_like(influence_N)
    out[order] = cum
    return out


def prune(A_NN: torch.Tensor, w_N: torch.Tensor, kind: list[str], node_threshold: float = 0.8,
          edge_threshold: float = 0.98, conventions: str = "circuit-tracer"):
    """(node_mask [N], edge_mask [N, N], influence [N]) of the pruned graph (module docstring).
    ``conventions``: "circuit-tracer" ranks every node for the node threshold, "clt-eval"
    only feature and error nodes."""
    for name, v in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        require(0 <= v <= 1, f"{name}={v!r}: expected a number in [0, 1]")
    check_choice("conventions", conventions, ("circuit-tracer", "clt-eval"))
    is_feat = torch.tensor([k == "feature" for k in kind])
    inner = is_feat | torch.tensor([k == "error" for k in kind])
    inf = influence(normalize_rows(A_NN), w_N)
    ranked = inf if conventions == "circuit-tracer" else inf[inner]
    node_mask = ~inner | (inf >= cumulative_cutoff(ranked, node_threshold))
    pruned = A_NN * node_mask[:, None] * node_mask[None, :]
    An = normalize_rows(pruned)
    edge_score = An * (influence(An, w_N) + w_N)[:, None]
    edge_mask = (edge_score >= cumulative_cutoff(edge_score[pruned != 0], edge_threshold))
    edge_mask &= pruned != 0
    while True:  # removing a node can strand others; at most depth rounds
        has_out, has_in = edge_mask.any(0), edge_mask.any(1)
        new = node_mask & ~(inner & ~has_out) & ~(is_feat & ~has_in)
        if bool((new == node_mask).all()):
            break
        node_mask = new
        edge_mask &= node_mask[:, None] & node_mask[None, :]
    return node_mask, edge_mask, inf


def total_effect(A_NN: torch.Tensor, acts_N: torch.Tensor, is_feature_N: torch.Tensor,
                 source: int) -> torch.Tensor:
    """Predicted change of every node's pre-activation when ``source``'s activation is scaled
    by (1 + ε), divided by ε, with downstream features responding linearly (active ones stay
    active with unit slope, inactive ones off), [N].

    ``A[t, s] = a_s ∂z_t/∂a_s``, so ``J = A · diag(1/a)`` over feature columns is the Jacobian
    of pre-activations w.r.t. activations, and the effect is (I − J)⁻¹ A[:, source], summed as
    the finite series Σ_k J^k A[:, source] (the graph is a DAG).
    """
    safe = torch.where(is_feature_N & (acts_N != 0), acts_N, torch.ones_like(acts_N))
    J = A_NN * ((is_feature_N & (acts_N != 0)) / safe)[None, :]
    step = A_NN[:, source].clone()
    total = step.clone()
    for _ in range(A_NN.shape[0] + 1):
        step = J @ step
        if not bool(step.abs().max() > 0):
            return total
        total = total + step
    raise CltEvalError("total_effect: the series did not converge; the graph has a cycle")


# ---- JSON --------------------------------------------------------------------------------
def to_json(g: AttributionGraph, influence_N: torch.Tensor | None = None) -> dict:
    """Nodes with their fields, the nonzero edges with weights, scores (NaN as null) and the
    prompt."""
    nodes = []
    for i in range(g.n_nodes):
        node = {"id": g.node_id(i), "kind": g.kind[i], "layer": g.layer[i],
                "tc_layer": g.tc_layer[i], "position": g.position[i], "feature": g.feature[i],
                "activation": float(g.activation[i]), "token": g.token[i]}
        if influence_N is not None:
            node["influence"] = float(influence_N[i])
        nodes.append(node)
    tgt, src = g.A_NN.nonzero(as_tuple=True)
    ids = [n["id"] for n in nodes]
    edges = [{"source": ids[s], "target": ids[t], "weight": float(g.A_NN[t, s])}
             for t, s in zip(tgt.tolist(), src.tolist(), strict=True)]
    scores = {k: None if isinstance(v, float) and v != v else v for k, v in g.scores.items()}
    return {"format": FORMAT, "version": VERSION, "prompt_tokens": list(g.prompt_tokens),
            "prompt_strs": list(g.prompt_strs), "meta": g.meta, "scores": scores,
            "nodes": nodes, "edges": edges}


def from_json(data: dict, source: str = "graph") -> AttributionGraph:
    require(isinstance(data, dict) and data.get("format") == FORMAT,
            f"{source}: field 'format' is not {FORMAT!r}")
    require(data.get("version") == VERSION, f"{source}: field 'version' is "
            f"{data.get('version')!r}, expected {VERSION}")
    nodes = data["nodes"]
    col = lambda k: [n[k] for n in nodes]  # noqa: E731
    bad = sorted({k for k in col("kind") if k not in KINDS})
    require(not bad, f"{source}: unknown node kind(s) {bad}; expected {list(KINDS)}")
    index = {n["id"]: i for i, n in enumerate(nodes)}
    A = torch.zeros(len(nodes), len(nodes))
    for e in data["edges"]:
        require(e["source"] in index and e["target"] in index,
                f"{source}: edge {e['source']!r} -> {e['target']!r} names an unknown node")
        A[index[e["target"]], index[e["source"]]] = e["weight"]
    return AttributionGraph(col("kind"), col("layer"), col("tc_layer"), col("position"),
                            col("feature"), col("activation"), col("token"), A,
                            data["prompt_tokens"], data.get("prompt_strs", []),
                            data.get("meta", {}), data.get("scores", {}))


def save_graph(g: AttributionGraph, path: str | Path, influence_N=None) -> Path:
    return write_json_atomic(path, to_json(g, influence_N))


def load_graph(path: str | Path) -> AttributionGraph:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CltEvalError(f"{path}: not a readable JSON file ({exc})") from None
    try:
        return from_json(data, str(path))
    except (KeyError, TypeError) as exc:
        raise CltEvalError(f"{path}: not an attribution graph (missing {exc})") from None


# ---- circuit-tracer's viewer JSON ----------------------------------------------------------
# The graph files circuit-tracer's create_graph_files writes for its local viewer and for
# Neuronpedia: metadata, qParams, nodes and links. Feature nodes are named by model layer;
# a logit node sits on layer n_layers + 1. Fields clt-eval has no value for keep the
# viewer's defaults ("clerp" "", "run_idx" 0, …). circuit-tracer names an error node
# "0_<layer>_<pos>", which a layer-0 feature <layer> at <pos> also gets; node ids must be
# unique, so such an error node (only such) is named "err_<layer>_<pos>" instead.
VIEWER_NODE_DEFAULTS = {"token_prob": 0.0, "is_target_logit": False, "run_idx": 0,
                        "reverse_ctx_idx": 0, "clerp": "", "influence": None,
                        "activation": None}


def _viewer_node(g: AttributionGraph, i: int, cum: float | None, first_logit: bool,
                 n_model_layers: int, logit_str: str) -> dict:
    kind, layer, pos = g.kind[i], g.layer[i], g.position[i]
    node = dict(VIEWER_NODE_DEFAULTS, ctx_idx=pos, influence=cum)
    if kind == "feature":
        f = g.feature[i]
        node |= {"node_id": f"{layer}_{f}_{pos}", "feature": f, "layer": str(layer),
                 "feature_type": "cross layer transcoder", "jsNodeId": f"{layer}_{f}-0",
                 "activation": float(g.activation[i])}
    elif kind == "error":
        node |= {"node_id": f"0_{layer}_{pos}", "feature": -1, "layer": str(layer),
                 "feature_type": "mlp reconstruction error", "jsNodeId": f"{layer}_{pos}-0"}
    elif kind == "embedding":
        tok = g.token[i]
        node |= {"node_id": f"E_{tok}_{pos}", "feature": pos, "layer": "E",
                 "feature_type": "embedding", "jsNodeId": f"E_{tok}-{pos}"}
    else:
        tok, prob, lay = g.token[i], float(g.activation[i]), str(n_model_layers + 1)
        node |= {"node_id": f"{lay}_{tok}_{pos}", "feature": tok, "layer": lay,
                 "feature_type": "logit", "jsNodeId": f"L_{tok}-{pos}", "token_prob": prob,
                 "is_target_logit": first_logit, "influence": None,
                 "clerp": f'Output "{logit_str}" (p={prob:.3f})'}
    return node


def to_viewer_json(g: AttributionGraph, node_threshold: float = 0.8,
                   edge_threshold: float = 0.98, slug: str = "clt-eval-graph",
                   scan: str | None = None) -> dict:
    """The pruned graph as circuit-tracer's viewer reads it (module comment above). A node's
    "influence" is its cumulative share (``cumulative_share``); nodes left without an edge are
    dropped unless they are embeddings or logits, as circuit-tracer does."""
    conventions = g.meta.get("conventions", "circuit-tracer")
    node_mask, edge_mask, inf = prune(g.A_NN, g.logit_weights(), g.kind, node_threshold,
                                      edge_threshold, conventions)
    cum = cumulative_share(inf)
    M = int(g.meta.get("n_model_layers", max([ly for ly in g.layer if ly >= 0], default=0)))
    logit_idx = [i for i in range(g.n_nodes) if g.kind[i] == "logit"]
    logit_strs = list(g.meta.get("logit_strs") or [])
    nodes = {}
    for i in node_mask.nonzero()[:, 0].tolist():
        k = logit_idx.index(i) if g.kind[i] == "logit" else -1
        label = logit_strs[k] if 0 <= k < len(logit_strs) else str(g.token[i])
        nodes[i] = _viewer_node(g, i, float(cum[i]), k == 0, M, label)
    feature_ids = {n["node_id"] for n in nodes.values() if n["feature"] != -1}
    for i, n in nodes.items():
        if g.kind[i] == "error" and n["node_id"] in feature_ids:
            n["node_id"] = f"err_{g.layer[i]}_{g.position[i]}"
    tgt, src = (edge_mask & (g.A_NN != 0)).nonzero(as_tuple=True)
    links = [{"source": nodes[s]["node_id"], "target": nodes[t]["node_id"],
              "weight": float(g.A_NN[t, s])}
             for t, s in zip(tgt.tolist(), src.tolist(), strict=True) if s in nodes and t in nodes]
    used = {x for link in links for x in (link["source"], link["target"])}
    kept = [n for n in nodes.values()
            if n["node_id"] in used or n["feature_type"] in ("embedding", "logit")]
    strs = g.prompt_strs or [str(t) for t in g.prompt_tokens]
    meta = {"slug": slug, "scan": scan or str(g.meta.get("scan") or g.meta.get(
                "transcoder_path") or "clt-eval"),
            "transcoder_list": [], "prompt_tokens": list(strs),
            "prompt": str(g.meta.get("prompt", "".join(strs))),
            "node_threshold": node_threshold}
    qparams = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "",
               "sg_pos": ""}
    return {"metadata": meta, "qParams": qparams, "nodes": kept, "links": links}


def save_viewer_json(g: AttributionGraph, path: str | Path, node_threshold: float = 0.8,
                     edge_threshold: float = 0.98, slug: str | None = None,
                     scan: str | None = None) -> Path:
    path = Path(path)
    data = to_viewer_json(g, node_threshold, edge_threshold, slug or path.stem.split(".")[0],
                          scan)
    return write_json_atomic(path, data)


# ---- the one-call API --------------------------------------------------------------------
def attribute(transcoder, model, prompt, *, window=None, conventions: str = "circuit-tracer",
              target_tokens: list[int] | None = None, max_logits: int = 10,
              logit_prob: float = 0.95, batch_size: int = 16, skip_first: bool | None = None,
              progress: bool | None = None) -> Graph:
    """The attribution graph of ``prompt``'s next-token prediction.

    ``transcoder``: a Transcoder (with ``window``, default model layers 0..L-1) or anything
    ``clt_eval.formats.load_any`` reads (a folder, ``hf://…``, ``sae_lens:…``); ``model``: a
    model name ``clt_eval.lm.models.load_model`` knows, or a HookedTransformer; ``prompt``:
    text (tokenised as training windows start) or token ids. The other options are
    ``clt_eval.lm.attribution.attribute``'s."""
    from clt_eval.lm import attribution as attr
    from clt_eval.lm.window import LayerWindow
    from clt_eval.transcoder import Transcoder

    if isinstance(transcoder, Transcoder):
        tc = transcoder
    else:
        from clt_eval.formats import load_any

        tc, loaded = load_any(transcoder)
        window = window or loaded
    window = window or LayerWindow(tuple(range(tc.cfg.n_layers)))
    if isinstance(model, str):
        from clt_eval.lm.models import load_model

        model = load_model(model)
    if isinstance(prompt, str):
        tokens = attr.tokenize_prompt(model, prompt)
    else:
        tokens = torch.as_tensor(prompt, dtype=torch.long)
    g = attr.attribute(model, tc, window, tokens, target_tokens=target_tokens,
                       max_logits=max_logits, logit_prob=logit_prob, batch_size=batch_size,
                       skip_first=skip_first, conventions=conventions, progress=progress)
    if isinstance(prompt, str):
        g.meta["prompt"] = prompt
    if not isinstance(transcoder, Transcoder):
        g.meta["transcoder_path"] = str(transcoder)
    return g
