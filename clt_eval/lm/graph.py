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
- Pruning: keep the feature and error nodes that carry ``node_threshold`` of the total
  influence, then the edges that carry ``edge_threshold`` of the influence recomputed on that
  subgraph (edge score Â'[t, s] · (I'_t + w_t)), then drop feature/error nodes left with no
  outgoing edge and features left with no incoming edge. Unlike circuit-tracer we rank only
  feature and error nodes for the node threshold: embeddings and logits are always kept, so
  counting them would only shift the cut-off.

Shapes: N nodes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from clt_eval.atomic import write_json_atomic
from clt_eval.errors import CltEvalError, require

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


def prune(A_NN: torch.Tensor, w_N: torch.Tensor, kind: list[str], node_threshold: float = 0.8,
          edge_threshold: float = 0.98):
    """(node_mask [N], edge_mask [N, N], influence [N]) of the pruned graph (module docstring)."""
    for name, v in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        require(0 <= v <= 1, f"{name}={v!r}: expected a number in [0, 1]")
    is_feat = torch.tensor([k == "feature" for k in kind])
    inner = is_feat | torch.tensor([k == "error" for k in kind])
    inf = influence(normalize_rows(A_NN), w_N)
    node_mask = ~inner | (inf >= cumulative_cutoff(inf[inner], node_threshold))
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
