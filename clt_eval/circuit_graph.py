"""Attribution-graph faithfulness: a transcoder's feature graph against the true circuit.

An attribution graph reads a replacement model as a graph of features. Even when every
feature reconstructs perfectly, the graph can describe a different computation from the true
model's: a cross-layer transcoder may compute the output from the inputs at the first layer
and write it through a cross-layer decoder, so the middle step never appears on any path.
These functions build the graph of each run of an ensemble and compare it, after matching,
with the case study's ground-truth circuit.

Nodes
    * one node per input direction (the rows of ``case.input_directions()``), named after the
      circuit's input nodes (layer -1, in circuit order) or ``input{i}`` when the counts
      differ;
    * one node per transcoder feature (layer s, index f);
    * one *write site* W(V) per ground-truth feature V of every step (layer t): whatever
      lands along V's direction in layer t's MLP output. It lets a cross-layer decoder that
      writes V's value be an edge into V even though no feature at layer t stands for it.

Edges and their weights
    The replacement model is linear between features: with no attention, layer ℓ's MLP input
    is the embedding plus every earlier layer's (reconstructed) MLP output, so a feature's
    pre-activation is a sum of direct effects, one per source node. (With attention or
    LayerNorm this is the direct residual path only, which is what an attribution graph
    draws.) Each weight is the mean over samples of |direct effect|, and an effect into a
    feature counts only on samples where that feature is active (an inactive feature passes
    nothing on), i.e. it is 0 elsewhere:
    * input i → feature f@ℓ: c_i · ⟨d_i, W_enc^ℓ_f⟩, with c the least-squares coefficients
      of the embedding on the input directions d (pseudo-inverse). The embedding is the
      first MLP input x_0: nothing has written to the stream before the first MLP, and the
      inputs are written once and read by every layer. Only x_0 is read, so passing the true
      model's MLP inputs or the replacement model's gives the same input nodes; which model
      the graph describes is decided by ``acts_RBLF`` (``evaluate`` passes the transcoder's
      activations on the true model's MLP inputs, as its other metrics do).
    * feature g@s → feature f@ℓ (s < ℓ): a_g · Σ_{s≤t<ℓ} ⟨W_dec^{s→t}_g, W_enc^ℓ_f⟩, i.e.
      everything g writes to the layers between its own and ℓ, read by f's encoder.
    * feature g@s → W(V), V at layer t ≥ s: a_g · ⟨W_dec^{s→t}_g, v̂⟩ with v̂ V's unit
      direction (each ground-truth feature of a step is projected on its own direction).
      The feature at layer t matched to V is V itself writing its own value: it is no edge,
      but its weight does count in W(V)'s total, so that a small cross-layer leak next to
      a large own-layer write is not kept.
    Biases, the skip map and the reconstruction error are no nodes.

Pruning
    An edge is kept when its weight is > 0 and at least ``threshold`` × the total weight into
    its target (dead features therefore have no edges).

Mapping
    A transcoder feature maps to ground-truth node V when it is V's *recovered* match (the
    per-step Hungarian matching of ``evaluate``); every other feature maps to nothing. W(V)
    maps to V, an input to its name. The predicted circuit is the set of (map(u), map(v)) over
    kept edges with both ends mapped and map(u) ≠ map(v).

Scores, per run
    * circuit_edge_precision = |predicted ∩ true| / |predicted| (NaN if nothing is predicted),
      circuit_edge_recall = |predicted ∩ true| / |true|.
    * shortcut_edges: kept edges u → v, v mapped to V at step layer t, that the true circuit
      cannot have: (a) u (an input, layer -1, or a feature) lies strictly before the layer of
      the step preceding V's (the first step's predecessor is layer -1, so nothing jumps into
      it), or (b) v is W(V) and u is a feature at a layer s < t: an earlier feature writes V's
      value through a cross-layer decoder. In both cases an edge whose mapped pair (map(u), V)
      is a true edge is not a shortcut: the true model has that edge (for a chain whose steps
      only read the previous step, (a) never meets one).
    * missing_middle_edges: true edges from a node of a middle step (any step but the output)
      into a node of the next step that are not predicted.
    * path_depth: over kept edges, the most transcoder-feature nodes on a path from an input to
      an output node (a feature matched to an output feature, or an output feature's write
      site); 0 if no such path. A faithful k-step decomposition has depth k; a CLT that computes
      the output at layer 0 and writes it through a cross-layer decoder has depth 1.
    * predicted_edges: the predicted circuit, as sorted [source, target] name pairs.

Shapes: R runs, B samples, L layers (S source), F features, I inputs, G ground-truth features
of one step, D d_model, N ground-truth nodes (inputs and step features). Memory stays
O(R·L·F·F + R·B·L·F): the graph is built one target layer at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from clt_eval.case_study import output_layer, steps
from clt_eval.errors import require

# Relative slack on "weight ≥ threshold × total", so that equal weights at exactly the
# threshold are kept whatever the rounding of the sum.
_TIE_SLACK = 1e-6


@dataclass
class _Step:
    layer: int
    prev_layer: int  # layer of the preceding step, -1 for the first
    ids_G: torch.Tensor  # node ids of its ground-truth features
    units_GD: torch.Tensor  # their unit directions


@dataclass
class _Nodes:
    names: list[str]  # node id -> name; inputs first, then every step's features
    n_inputs: int
    steps: list[_Step]
    out_ids: torch.Tensor  # node ids of the output step's features
    node_id_RLF: torch.Tensor  # ground-truth node each feature maps to, -1 for none
    true_NN: torch.Tensor  # [N+1, N+1] bool true-edge table; index N stands for "unmapped"
    true_edges: set[tuple[str, str]]
    middle_next: set[tuple[str, str]]  # true edges from a middle step into the next step

    def ext(self, ids: torch.Tensor) -> torch.Tensor:
        """Node ids with "unmapped" (-1) sent to the table's extra index N."""
        return torch.where(ids < 0, len(self.names), ids)


@dataclass
class _Tally:
    """What the layer-by-layer pass accumulates for every run."""

    n_runs: int
    runs: list[torch.Tensor] = field(default_factory=list)  # per kept mapped edge: its run
    codes: list[torch.Tensor] = field(default_factory=list)  # and src * N + dst
    shortcuts_R: torch.Tensor = field(init=False)  # [R] long
    depth_R: torch.Tensor = field(init=False)  # [R] long: deepest path into an output node

    def __post_init__(self):
        self.shortcuts_R = torch.zeros(self.n_runs, dtype=torch.long)
        self.depth_R = torch.zeros(self.n_runs, dtype=torch.long)


@torch.no_grad()
def circuit_scores(case, tc, x_BLD, acts_RBLF, matches, threshold: float = 0.05) -> dict:
    """Per-run graph scores of ``tc`` against ``case.circuit()`` (see the module docstring).

    ``x_BLD``: MLP inputs [B, L, D] (or per run [R, B, L, D]); only layer 0, the embedding,
    is read. ``acts_RBLF``: the features' activations on the same samples. ``matches[r][j]``:
    ``evaluate._recovery``'s match dict of run r and step j (keys layer, names, index,
    recovered). Returns tensors [R] (precision, recall, shortcut_edges, missing_middle_edges,
    path_depth) and ``predicted_edges``, a list per run.
    """
    R, B, L, F = acts_RBLF.shape
    _check(tc, x_BLD, acts_RBLF, matches, threshold)
    nodes = _nodes(case, matches, R, L, F)
    dirs_ID = case.input_directions().float()
    c_RBI = input_coefficients(x_BLD, dirs_ID, R)
    W_enc = tc.W_enc.detach().float()
    # Absent blocks are zero; t < s is zeroed too, so a sum over t < ℓ is over s ≤ t < ℓ.
    W_dec = tc.dense_W_dec().detach().float()  # [R,S,T,F,D]: the small toys this scores
    W_dec = W_dec * torch.ones(L, L).triu().bool()[None, :, :, None, None]
    acts = acts_RBLF.detach().float().abs()  # only |a| enters a weight, and a ≠ 0 marks "on"
    tally, depth_RLF = _Tally(R), torch.zeros(R, L, F, dtype=torch.long)
    for layer in range(L):
        kept_in, kept_ff = _into_features(layer, c_RBI, dirs_ID, W_enc, W_dec, acts, threshold)
        depth_RLF[:, layer] = _feature_depth(kept_in, kept_ff, depth_RLF[:, :layer])
        _tally_features(tally, nodes, layer, kept_in, kept_ff)
        for step in (s for s in nodes.steps if s.layer == layer):
            kept_w = _into_write_site(step, nodes, W_dec, acts, threshold)
            _tally_write_site(tally, nodes, step, kept_w, depth_RLF[:, : layer + 1])
    out_layer = output_layer(case)
    is_out_RF = (nodes.node_id_RLF[:, out_layer, :, None] == nodes.out_ids).any(-1)
    depth_out = torch.where(is_out_RF, depth_RLF[:, out_layer], 0).amax(-1)
    tally.depth_R = torch.maximum(tally.depth_R, depth_out)
    return _scores(tally, nodes)


# ---- edge weights ---------------------------------------------------------------------------
def input_coefficients(x_BLD: torch.Tensor, dirs_ID: torch.Tensor, n_runs: int) -> torch.Tensor:
    """[R, B, I]: least-squares coefficients of the embedding (layer 0's MLP input) on the
    input directions."""
    x0 = x_BLD[..., 0, :].float()
    c = x0 @ torch.linalg.pinv(dirs_ID)
    return c.expand(n_runs, *c.shape) if c.dim() == 2 else c


def _keep(w: torch.Tensor, total: torch.Tensor, threshold: float) -> torch.Tensor:
    return (w > 0) & (w >= threshold * total * (1 - _TIE_SLACK))


def _into_features(layer, c_RBI, dirs_ID, W_enc, W_dec, acts, threshold):
    """Kept edges into layer ``layer``'s features: from inputs [R, I, F] and from the features
    of every earlier layer [R, S=layer, G=F, F]. ``acts`` holds |a|."""
    on_RBF = (acts[:, :, layer] > 0).float()
    B = on_RBF.shape[1]
    enc_RDF = W_enc[:, layer]
    # Σ_b |c_bi · ⟨d_i, w_f⟩| · 1[f on] = |⟨d_i, w_f⟩| · Σ_b |c_bi| · 1[f on]: no [B,I,F].
    w_in = (dirs_ID @ enc_RDF).abs() * torch.einsum("rbi,rbf->rif", c_RBI.abs(), on_RBF) / B
    if layer == 0:
        total_RF = w_in.sum(1)
        return _keep(w_in, total_RF[:, None], threshold), None
    wsum_RSGD = W_dec[:, :layer, :layer].sum(2)  # what g@s writes to layers s..ℓ-1
    dot_RSGF = torch.einsum("rsgd,rdf->rsgf", wsum_RSGD, enc_RDF).abs()
    co_RSGF = torch.einsum("rbsg,rbf->rsgf", acts[:, :, :layer], on_RBF) / B
    w_ff = dot_RSGF * co_RSGF
    total_RF = w_in.sum(1) + w_ff.sum((1, 2))
    return (_keep(w_in, total_RF[:, None], threshold),
            _keep(w_ff, total_RF[:, None, None], threshold))


def _into_write_site(step: _Step, nodes: _Nodes, W_dec, acts, threshold) -> torch.Tensor:
    """Kept edges g@s → W(V) for the step's features V: [R, S=t+1, F, G], V's own matched
    feature excluded (it is V, not an edge into V) but counted in the total."""
    t = step.layer
    proj_RSFG = torch.einsum("rsfd,gd->rsfg", W_dec[:, : t + 1, t], step.units_GD).abs()
    w = proj_RSFG * acts[:, :, : t + 1].mean(1)[..., None]
    own = torch.zeros_like(w, dtype=torch.bool)
    own[:, t] = nodes.node_id_RLF[:, t, :, None] == step.ids_G
    kept = _keep(w, w.sum((1, 2))[:, None, None], threshold)
    return kept & ~own


# ---- depth, mapped edges and shortcuts --------------------------------------------------------
def _via(depth_RSG: torch.Tensor) -> torch.Tensor:
    """Depth reached through a source feature: its own + 1, 0 when no input reaches it."""
    return torch.where(depth_RSG > 0, depth_RSG + 1, 0)


def _feature_depth(kept_in, kept_ff, depth_RSF) -> torch.Tensor:
    """[R, F]: most features on a kept path from an input ending at each feature (0: none)."""
    d = kept_in.any(1).long()
    if kept_ff is not None:
        d = torch.maximum(d, (_via(depth_RSF)[..., None] * kept_ff).amax((1, 2)))
    return d


def _add_pairs(tally: _Tally, kept, src, dst, n_nodes: int) -> None:
    """Record the kept edges whose two ends map to different ground-truth nodes."""
    src, dst = torch.broadcast_tensors(src, dst)
    ok = kept & (src >= 0) & (dst >= 0) & (src != dst)
    tally.runs.append(ok.nonzero()[:, 0])
    tally.codes.append(src[ok] * n_nodes + dst[ok])


def _tally_features(tally: _Tally, nodes: _Nodes, layer: int, kept_in, kept_ff) -> None:
    I, N = nodes.n_inputs, len(nodes.names)
    dst_RF = nodes.node_id_RLF[:, layer]
    src_in = torch.arange(I)[None, :, None]
    _add_pairs(tally, kept_in, src_in, dst_RF[:, None], N)
    if kept_ff is not None:
        _add_pairs(tally, kept_ff, nodes.node_id_RLF[:, :layer, :, None], dst_RF[:, None, None], N)
    step = next((s for s in nodes.steps if s.layer == layer), None)
    if step is None:
        return
    # (a): sources strictly before the preceding step's layer, into mapped features.
    dst_ext = nodes.ext(dst_RF)
    mapped_RF = dst_RF >= 0
    if step.prev_layer > -1:
        jump = kept_in & mapped_RF[:, None] & ~nodes.true_NN[src_in, dst_ext[:, None]]
        tally.shortcuts_R += jump.sum((1, 2))
    if kept_ff is not None and step.prev_layer > 0:
        src_ext = nodes.ext(nodes.node_id_RLF[:, : step.prev_layer, :, None])
        not_true = ~nodes.true_NN[src_ext, dst_ext[:, None, None]]
        jump = kept_ff[:, : step.prev_layer] & mapped_RF[:, None, None] & not_true
        tally.shortcuts_R += jump.sum((1, 2, 3))


def _tally_write_site(tally: _Tally, nodes: _Nodes, step: _Step, kept_w, depth_RSF) -> None:
    t, N = step.layer, len(nodes.names)
    src_RSF1 = nodes.node_id_RLF[:, : t + 1, :, None]
    _add_pairs(tally, kept_w, src_RSF1, step.ids_G, N)
    # (b), which contains (a) here: an earlier feature writes V unless (map(u), V) is true.
    not_true = ~nodes.true_NN[nodes.ext(src_RSF1[:, :t]), step.ids_G]
    tally.shortcuts_R += (kept_w[:, :t] & not_true).sum((1, 2, 3))
    if bool((step.ids_G[:, None] == nodes.out_ids).any()):
        is_out_G = (step.ids_G[:, None] == nodes.out_ids).any(-1)
        reach = depth_RSF[..., None] * kept_w * is_out_G  # W(V) adds no feature to a path
        tally.depth_R = torch.maximum(tally.depth_R, reach.amax((1, 2, 3)))


# ---- nodes and scores -------------------------------------------------------------------------
def _input_names(circuit, n_inputs: int, gt_names: set[str]) -> list[str]:
    if circuit.node_layers:
        names = [n for n in circuit.nodes if circuit.node_layers.get(n) == -1]
    else:  # a circuit without layers: every node that is no step feature is an input
        names = [n for n in circuit.nodes if n not in gt_names]
    return names if len(names) == n_inputs else [f"input{i}" for i in range(n_inputs)]


def _nodes(case, matches, R: int, L: int, F: int) -> _Nodes:
    gt = steps(case)
    gt_names = [n for g in gt for n in g.names]
    require(len(set(gt_names)) == len(gt_names),
            "case study ground_truth(): feature names must be unique across steps")
    circuit = case.circuit()
    inputs = _input_names(circuit, case.input_directions().shape[0], set(gt_names))
    names = inputs + gt_names
    require(len(set(names)) == len(names),
            "case study: input names and ground-truth feature names must differ")
    id_of = {n: i for i, n in enumerate(names)}
    step_list, prev = [], -1
    for g in gt:
        dirs = g.directions_GD.float()
        ids = torch.tensor([id_of[n] for n in g.names], dtype=torch.long)
        step_list.append(_Step(g.layer, prev, ids, dirs / dirs.norm(dim=-1, keepdim=True)
                               .clamp_min(1e-12)))
        prev = g.layer
    node_id = torch.full((R, L, F), -1, dtype=torch.long)
    for r, run in enumerate(matches):
        for m in run:
            for g, name in enumerate(m["names"]):
                require(name in id_of, f"matches[{r}]: feature {name!r} is no ground-truth "
                        "feature of the case study")
                if m["recovered"][g] and m["index"][g] >= 0:
                    node_id[r, m["layer"], m["index"][g]] = id_of[name]
    true_edges = set(map(tuple, circuit.edges))
    true_NN = torch.zeros(len(names) + 1, len(names) + 1, dtype=torch.bool)
    for u, v in true_edges:
        if u in id_of and v in id_of:
            true_NN[id_of[u], id_of[v]] = True
    layer_of = {n: s.layer for s, g in zip(step_list, gt, strict=True) for n in g.names}
    next_layer = {a.layer: b.layer for a, b in zip(step_list, step_list[1:], strict=False)}
    middle_next = {(u, v) for u, v in true_edges if u in layer_of and v in layer_of
                   and next_layer.get(layer_of[u]) == layer_of[v]}
    return _Nodes(names, len(inputs), step_list, step_list[-1].ids_G, node_id, true_NN,
                  true_edges, middle_next)


def _scores(tally: _Tally, nodes: _Nodes) -> dict:
    N, R = len(nodes.names), tally.n_runs
    keyed = (torch.cat(tally.runs) * N * N + torch.cat(tally.codes)).unique().tolist()
    per_run: list[set[tuple[str, str]]] = [set() for _ in range(R)]
    for k in keyed:  # one pass in Python over the mapped edges only
        r, code = divmod(k, N * N)
        per_run[r].add((nodes.names[code // N], nodes.names[code % N]))
    precision, recall, missing, predicted = [], [], [], []
    for pairs in per_run:
        hit = len(pairs & nodes.true_edges)
        precision.append(hit / len(pairs) if pairs else math.nan)
        recall.append(hit / len(nodes.true_edges) if nodes.true_edges else math.nan)
        missing.append(len(nodes.middle_next - pairs))
        predicted.append(sorted([u, v] for u, v in pairs))
    return {
        "circuit_edge_precision": torch.tensor(precision),
        "circuit_edge_recall": torch.tensor(recall),
        "shortcut_edges": tally.shortcuts_R.clone(),
        "missing_middle_edges": torch.tensor(missing, dtype=torch.long),
        "path_depth": tally.depth_R.float(),
        "predicted_edges": predicted,
    }


def _check(tc, x_BLD, acts_RBLF, matches, threshold) -> None:
    R, B, L, F = acts_RBLF.shape
    require(tuple(tc.W_enc.shape[:2]) == (R, L) and tc.W_enc.shape[-1] == F,
            f"acts_RBLF: shape {tuple(acts_RBLF.shape)} does not fit the transcoder "
            f"(runs, layers, features = {tc.n_runs}, {tc.cfg.n_layers}, {tc.cfg.n_features})")
    require(x_BLD.dim() in (3, 4) and x_BLD.shape[-3] == B and x_BLD.shape[-1] == tc.cfg.d_model,
            f"x_BLD: shape {tuple(x_BLD.shape)}; expected [B={B}, L, D={tc.cfg.d_model}] "
            "or [R, B, L, D]")
    require(len(matches) == R, f"matches: {len(matches)} runs; expected one list per run ({R})")
    require(isinstance(threshold, int | float) and 0 <= threshold <= 1,
            f"threshold={threshold!r}: expected a number in [0, 1]")
