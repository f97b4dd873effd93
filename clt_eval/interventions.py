"""Interventions on the intermediate steps, in the true and the replacement model.

The intervention site is the MLP output of a middle step's layer, in the subspace the
ground-truth features of that step (B) write to: there the true model's B lives, and there
the replacement model writes its own account of B. A CLT whose early features write C
through cross-layer decoders keeps predicting C when B is changed at this site, which is
exactly the unfaithfulness to expose.
"""

from __future__ import annotations

import torch

from clt_eval.case_study import middle_layers, step_at
from clt_eval.metrics import span_basis
from clt_eval.replacement import run_replacement, run_true_model
from clt_eval.transcoder import row_matmul


def projector(dirs_GD: torch.Tensor) -> torch.Tensor:
    """Orthogonal projector [D, D] on the span of the rows (any rank)."""
    q = span_basis(dirs_GD)
    return q @ q.T


# row_matmul: a run's samples are edited the same whether other runs' samples come along.
def _ablate(P):
    return lambda v: v - row_matmul(v, P)


def _patch(P, src_RND):
    return lambda v: v - row_matmul(v, P) + row_matmul(src_RND, P)


MAX_PAIRS = 2048  # patch pairs per middle step: all N(N-1) for a truth table, a sample beyond


@torch.no_grad()
def intervention_cases(case, model, tc, inputs):
    """Run every intervention; returns {kind: (true_clean [N'], true_int [N'], repl_int [R,N'])}.

    At each middle step m: ``ablate_all`` (remove the step's features), ``ablate_<name>``
    (remove one) and ``patch`` (set them to their value on another input, over ordered pairs
    of distinct inputs). With several middle steps each kind is prefixed ``L<m>:``.
    """
    mids = middle_layers(case)
    true_clean = case.output_value(run_true_model(model, inputs, case.output_hooks))
    results = {}
    for m in mids:
        prefix = f"L{m}:" if len(mids) > 1 else ""
        for kind, value in _step_cases(case, model, tc, inputs, m, true_clean).items():
            results[prefix + kind] = value
    return results


def _step_cases(case, model, tc, inputs, m, true_clean):
    gt = step_at(case, m)
    hooks = (case.input_hooks, case.output_hooks)
    out = case.output_value
    results = {}
    ablations = {"ablate_all": gt.directions_GD}
    ablations |= {f"ablate_{n}": gt.directions_GD[i:i + 1] for i, n in enumerate(gt.names)}
    for kind, dirs in ablations.items():
        P = projector(dirs)
        t = out(run_true_model(model, inputs, case.output_hooks, {m: _ablate(P)}))
        r, _, _ = run_replacement(model, tc, inputs, *hooks, {m: _ablate(P)})
        results[kind] = (true_clean, t, out(r))
    results["patch"] = _patch_pairs(case, model, tc, inputs, m, projector(gt.directions_GD))
    return results


def patch_pairs(n: int, max_pairs: int = MAX_PAIRS) -> tuple[torch.Tensor, torch.Tensor]:
    """(base i, source j) index pairs with i != j: all of them, or a fixed random sample."""
    if n * (n - 1) <= max_pairs:
        i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        keep = i != j
        return i[keep], j[keep]
    g = torch.Generator().manual_seed(0)
    i = torch.randint(0, n, (max_pairs,), generator=g)
    j = (i + torch.randint(1, n, (max_pairs,), generator=g)) % n  # never equal to i
    return i, j


def _patch_pairs(case, model, tc, inputs, m, P):
    """Patch step m's subspace from input j into input i."""
    hooks = (case.input_hooks, case.output_hooks)
    i, j = patch_pairs(inputs.shape[0])
    # Each model's own clean value of the step's output on the source input.
    hook = case.output_hooks[m]
    _, cache = model.run_with_cache(inputs, names_filter=lambda n: n == hook)
    _, _, repl_recon = run_replacement(model, tc, inputs, *hooks)
    true_src = cache[hook][None, j]
    repl_src = repl_recon[:, j, m]
    pair_inputs = inputs[i]
    out = case.output_value
    true_clean = out(run_true_model(model, pair_inputs, case.output_hooks))
    t = out(run_true_model(model, pair_inputs, case.output_hooks, {m: _patch(P, true_src)}))
    r, _, _ = run_replacement(model, tc, pair_inputs, *hooks, {m: _patch(P, repl_src)})
    return true_clean, t, out(r)
