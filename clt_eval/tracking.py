"""Feature tracking across a sweep of sparsity coefficients (pure functions of tensors).

At each λ point of one (setting, arch, seed) the ground-truth features are matched to the
transcoder's (``metrics.match_features``), and the transcoder's features are matched to
those at the next λ point by activation correlation (Hungarian, one-to-one). Following a
ground-truth feature's partner through these neighbour matches tells *how* it is lost as λ
grows: the partner dies (stops firing), or lives on but turns into something else.

Shapes: K λ points, N samples, F features, G ground-truth features, D d_model.
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment

from clt_eval.metrics import correlation_matrix, match_features

CONTINUITY_MIN = 0.5  # a neighbour match below this correlation is a different feature


def match_neighbours(acts_a_NF: torch.Tensor, acts_b_NF: torch.Tensor):
    """One-to-one match of features at one λ point to the next: (successor [F], corr [F])."""
    corr = correlation_matrix(acts_a_NF.float(), acts_b_NF.float())
    rows, cols = linear_sum_assignment(corr.numpy(), maximize=True)
    succ = [-1] * acts_a_NF.shape[1]
    c = [0.0] * acts_a_NF.shape[1]
    for f, g in zip(rows.tolist(), cols.tolist(), strict=True):
        succ[f], c[f] = g, float(corr[f, g])
    return succ, c


def stop_index(recovered_K: list[bool]) -> int | None:
    """First point from which the feature is never recovered again, if it ever was;
    None if it is kept to the end or never recovered."""
    if not any(recovered_K) or recovered_K[-1]:
        return None
    last = max(i for i, r in enumerate(recovered_K) if r)
    return last + 1


def track(acts_KNF: list[torch.Tensor], dec_KFD: list[torch.Tensor], gt_acts_NG: torch.Tensor,
          gt_dirs_GD: torch.Tensor, corr_min: float = 0.9, cos_min: float = 0.9) -> list[dict]:
    """For each ground-truth feature: ``recovered`` per point, ``stop`` (index or None) and
    ``fate`` — "kept", "never recovered", "died" (its partner has no continuation at the next
    point: no successor that fires and correlates ≥ CONTINUITY_MIN with it) or "changed"
    (the partner continues but no longer matches: it was absorbed into something else)."""
    K, G = len(acts_KNF), gt_acts_NG.shape[1]
    matches = [match_features(a, gt_acts_NG, d, gt_dirs_GD, corr_min, cos_min)
               for a, d in zip(acts_KNF, dec_KFD, strict=True)]
    links = [match_neighbours(acts_KNF[k], acts_KNF[k + 1]) for k in range(K - 1)]
    out = []
    for g in range(G):
        rec = [m["recovered"][g] for m in matches]
        stop = stop_index(rec)
        fate = "kept" if rec[-1] else "never recovered"
        if stop is not None:
            partner = matches[stop - 1]["index"][g]
            succ, corr = links[stop - 1]
            nxt = succ[partner]
            fires = nxt >= 0 and bool((acts_KNF[stop][:, nxt] > 0).any())
            fate = "changed" if fires and corr[partner] >= CONTINUITY_MIN else "died"
        out.append({"recovered": rec, "stop": stop, "fate": fate,
                    "corr": [m["corr"][g] for m in matches]})
    return out
