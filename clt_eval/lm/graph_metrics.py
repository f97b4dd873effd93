"""PLT-vs-CLT proxies of faithfulness on a language model, as pure functions (docs/concepts.md §5).

Without ground truth the proxies are: the share of the output's attribution that comes from
early-layer features, the spread of L0 across layers, the mean path length of the graph,
replacement and completeness scores (``clt_eval.lm.graph.graph_scores``), the overlap of the
two transcoders' graphs after matching their features, and how well each replacement predicts
the real model's response to interventions at middle layers.

Conventions: ``An_NN`` is the row-normalised |A| of an attribution graph (rows are targets,
``clt_eval.lm.graph.normalize_rows``); ``w_N`` the logit nodes' probabilities (0 elsewhere);
"influence" is ``clt_eval.lm.graph.influence``: I = w (Â + Â² + …) (Ameisen et al. 2025,
"Circuit Tracing", §"Graph pruning"). Window layers are the transcoder's own layers 0..L−1.

Shapes: N nodes, L window layers, P positions, F features, K path lengths.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.stats import spearmanr

from clt_eval.errors import require
from clt_eval.metrics import correlation_matrix


# ---- where the influence sits -------------------------------------------------------------------
def n_early_layers(n_layers: int) -> int:
    """"Early" = the first ⌊L/2⌋ window layers (layers 0..⌊L/2⌋−1). With odd L the middle
    layer counts as neither early nor late-only: it is left in the denominator, not the
    numerator, so a 3-layer window's early share is that of layer 0 alone."""
    return n_layers // 2


def influence_by_layer(influence_N: torch.Tensor, tc_layer_N: torch.Tensor,
                       is_feature_N: torch.Tensor, n_layers: int) -> torch.Tensor:
    """[L]: the share of the feature nodes' total influence on the logits that sits at each
    window layer, Σ_{features at ℓ} I_n / Σ_{features} I_n (sums to 1; NaN if no feature has
    influence). Influence counts every path through a node, so a feature at layer 0 whose
    output reaches the logits through a layer-3 feature carries that path's mass too."""
    inf = torch.where(is_feature_N, influence_N.abs(), torch.zeros_like(influence_N))
    layer = torch.where(is_feature_N, tc_layer_N, torch.zeros_like(tc_layer_N)).long()
    per = torch.zeros(n_layers, dtype=inf.dtype).index_add_(0, layer, inf)
    total = per.sum()
    return per / total if float(total) > 0 else torch.full_like(per, float("nan"))


def early_share(share_L: torch.Tensor) -> float:
    """Σ of ``share_L`` over the early layers (``n_early_layers``): the share of the feature
    nodes' influence on the logits that comes from features in the window's first half.
    A CLT that writes the output straight from early features through cross-layer decoders
    (the shortcut of docs/concepts.md §1) raises it; a PLT must route that output through later
    layers' features or the residual stream."""
    return float(share_L[:n_early_layers(share_L.numel())].sum())


def direct_logit_share(A_NN: torch.Tensor, w_N: torch.Tensor, tc_layer_N: torch.Tensor,
                       is_feature_N: torch.Tensor, n_layers: int) -> torch.Tensor:
    """[L]: of the logits' *direct* inputs from features, Σ_t w_t |A[t, n]|, the share from
    each window layer (one-edge paths only; NaN if no feature feeds a logit directly)."""
    direct_N = (w_N[:, None] * A_NN.abs()).sum(0)
    return influence_by_layer(direct_N, tc_layer_N, is_feature_N, n_layers)


# ---- L0 on the prompt ---------------------------------------------------------------------------
def l0_per_layer(acts_PLF: torch.Tensor, first: int = 0) -> torch.Tensor:
    """[L]: mean number of active features per token at each window layer, over positions
    ``first``.. (``first=1`` leaves out BOS when it was given no features)."""
    return (acts_PLF[first:] != 0).float().sum(-1).mean(0)


def l0_spread(l0_L: torch.Tensor) -> dict[str, float]:
    """How unevenly the active features spread over the layers.

    ``cv``: coefficient of variation, std/mean over layers (population std; 0 = even).
    ``entropy``: H(l0/Σl0) / log L, 1 = even, 0 = all in one layer (1 when L = 1).
    ``late_minus_early``: mean L0 of the late half minus the early half, over the mean L0
    (a CLT that skips its middle layers and writes everything from early features would have
    L0 piled up early). NaN when nothing is active.
    """
    l0 = l0_L.double()
    L, total = l0.numel(), float(l0.sum())
    if total <= 0:
        return {"cv": float("nan"), "entropy": float("nan"), "late_minus_early": float("nan")}
    p = l0 / total
    h = float(-(p[p > 0] * p[p > 0].log()).sum())
    k, mean = n_early_layers(L), float(l0.mean())
    late = float(l0[L - k:].mean()) if k else mean
    early = float(l0[:k].mean()) if k else mean
    return {"cv": float(l0.std(unbiased=False)) / mean,
            "entropy": h / math.log(L) if L > 1 else 1.0,
            "late_minus_early": (late - early) / mean}


# ---- path length --------------------------------------------------------------------------------
def path_mass(An_NN: torch.Tensor, w_N: torch.Tensor, source_N: torch.Tensor,
              max_len: int | None = None) -> torch.Tensor:
    """[K]: m_k = Σ_{n ∈ sources} (w Âᵏ)_n, the logit-weighted mass of paths of exactly k
    edges from a source node to the logits, k = 1..K. These are the terms of the influence
    series restricted to sources: Σ_k m_k = Σ_{sources} I_n. The series ends at the graph's
    depth (it is a DAG), or at ``max_len``."""
    step, out = w_N @ An_NN, []
    limit = max_len or An_NN.shape[0] + 1
    scale = step.abs().max().clamp_min(1e-30)
    while len(out) < limit and bool(step.abs().max() > 1e-12 * scale):
        out.append(step[source_N].sum())
        step = step @ An_NN
    return torch.stack(out) if out else torch.zeros(0)


def mean_path_length(mass_K: torch.Tensor) -> float:
    """Σ_k k·m_k / Σ_k m_k: the influence-weighted mean number of edges on a path from the
    sources to the logits (NaN without paths). In an attribution graph the only inner nodes
    are features, so a path of k edges passes through k − 1 features: mean feature hops =
    mean path length − 1."""
    total = float(mass_K.sum())
    if total <= 0:
        return float("nan")
    k = torch.arange(1, mass_K.numel() + 1, dtype=mass_K.dtype)
    return float((k * mass_K).sum()) / total


# ---- matching PLT to CLT features ---------------------------------------------------------------
def match_layers(acts_a_NLF: torch.Tensor, acts_b_NLG: torch.Tensor):
    """One-to-one matching of transcoder A's features to B's, layer by layer, maximising the
    total Pearson correlation of their activations over N tokens (Hungarian algorithm, as
    ``clt_eval.metrics.match_features`` matches to ground truth).

    Returns (partner_LF: B's feature matched to each of A's, −1 if none — only when A has
    more features than B; corr_LF: that pair's correlation, 0 for dead or unmatched)."""
    N, L, F = acts_a_NLF.shape
    require(acts_b_NLG.shape[:2] == (N, L), f"match_layers: activations of shape "
            f"{list(acts_a_NLF.shape)} and {list(acts_b_NLG.shape)}; expected the same tokens "
            "and layers")
    partner = torch.full((L, F), -1, dtype=torch.long)
    corr = torch.zeros(L, F)
    for ell in range(L):
        c = correlation_matrix(acts_a_NLF[:, ell].double(), acts_b_NLG[:, ell].double())
        rows, cols = linear_sum_assignment(c.numpy(), maximize=True)
        partner[ell, rows] = torch.from_numpy(cols).long()
        corr[ell, rows] = c[rows, cols].float()
    return partner, corr


def matched_node_jaccard(nodes_a: set, nodes_b: set, partner_LF: torch.Tensor,
                         corr_LF: torch.Tensor, threshold: float) -> dict:
    """Overlap of two graphs' feature nodes after matching.

    Nodes are (window layer ℓ, position p, feature f). A's node maps to (ℓ, p, partner(ℓ, f))
    if its partner's correlation reaches ``threshold``; otherwise it stays A's own and can
    match nothing. Jaccard = |mapped A ∩ B| / |mapped A ∪ B| (NaN if both are empty).
    ``cell_jaccard`` is the same over (ℓ, p) cells, ignoring feature identity: whether the two
    graphs use the same layers at the same tokens at all.
    """
    mapped, n_mappable = set(), 0
    for ell, p, f in nodes_a:
        if f >= 0 and partner_LF[ell, f] >= 0 and float(corr_LF[ell, f]) >= threshold:
            mapped.add((ell, p, int(partner_LF[ell, f])))
            n_mappable += 1
        else:
            mapped.add(("a", ell, p, f))  # a tag B's nodes never carry
    union = mapped | set(nodes_b)
    shared = mapped & set(nodes_b)
    cells_a, cells_b = {n[:2] for n in nodes_a}, {n[:2] for n in nodes_b}
    cells_u = cells_a | cells_b
    return {"jaccard": len(shared) / len(union) if union else float("nan"),
            "cell_jaccard": len(cells_a & cells_b) / len(cells_u) if cells_u else float("nan"),
            "n_a": len(nodes_a), "n_b": len(nodes_b), "n_a_mappable": n_mappable,
            "n_shared": len(shared)}


# ---- interventions ------------------------------------------------------------------------------
def middle_layers(n_layers: int) -> list[int]:
    """The window layers that are neither first nor last (all of them when L < 3): where a
    two-step computation keeps its intermediate result, and what a skipping CLT leaves out."""
    return list(range(1, n_layers - 1)) if n_layers >= 3 else list(range(n_layers))


def effect_agreement(true_N: torch.Tensor, pred_N: torch.Tensor,
                     min_effect: float = 0.0) -> dict[str, float]:
    """How well a replacement predicts the real model's response to interventions.

    ``true_N``/``pred_N``: the change of the same quantity (e.g. the answer's log-prob) under
    the same intervention, in the real model and in the replacement, over N cases.

    ``corr``: Pearson correlation (NaN with fewer than 2 cases or no variance);
    ``spearman``: rank correlation, which a few large effects cannot dominate;
    ``mad``: mean |pred − true|;
    ``slope``: Σ pred·true / Σ true², the least-squares slope through 0 (1 = right size,
    < 1 = the replacement under-predicts; a skipping CLT's middle layers carry less);
    ``sign_and_half``: over the cases with |true| ≥ ``min_effect``, the fraction where pred
    has the sign of true and at least half its size (NaN if there are none);
    ``n``, ``n_moved``: the number of cases, and of those counted by ``sign_and_half``.
    """
    t, p = true_N.double().flatten(), pred_N.double().flatten()
    require(t.shape == p.shape, f"effect_agreement: {t.numel()} true and {p.numel()} "
            "predicted effects; expected the same cases")
    n = t.numel()
    corr = spearman = float("nan")
    if n >= 2 and float(t.std()) > 0 and float(p.std()) > 0:
        corr = float(np.corrcoef(t.numpy(), p.numpy())[0, 1])
        spearman = float(spearmanr(t.numpy(), p.numpy()).statistic)
    moved = (t.abs() >= min_effect) & (t != 0)  # a zero effect has no sign to get right
    hit = (torch.sign(p) == torch.sign(t)) & (p.abs() >= 0.5 * t.abs())
    denom = float((t * t).sum())
    return {"corr": corr, "spearman": spearman,
            "mad": float((p - t).abs().mean()) if n else float("nan"),
            "slope": float((p * t).sum()) / denom if denom > 0 else float("nan"),
            "sign_and_half": float(hit[moved].double().mean()) if bool(moved.any())
            else float("nan"),
            "n": n, "n_moved": int(moved.sum())}
