"""Interventions on the intermediate step B, in the true and the replacement model.

The intervention site is the MLP output of the middle layer, in the subspace the ground-truth
B features write to: there the true model's B lives, and there the replacement model writes
its own account of B. A CLT whose early features write C through cross-layer decoders keeps
predicting C when B is changed at this site, which is exactly the unfaithfulness to expose.
"""

from __future__ import annotations

import torch

from clt_eval.replacement import run_replacement, run_true_model


def projector(dirs_GD: torch.Tensor) -> torch.Tensor:
    q, _ = torch.linalg.qr(dirs_GD.T.float())  # orthonormal basis of span(B), [D, G]
    return q @ q.T


def _ablate(P):
    return lambda v: v - v @ P


def _patch(P, src_RND):
    return lambda v: v - v @ P + src_RND @ P


@torch.no_grad()
def intervention_cases(case, model, tc, inputs):
    """Run every intervention; returns {kind: (true_clean [N'], true_int [N'], repl_int [R,N'])}.

    Kinds: ``ablate_all`` (remove B), ``ablate_<name>`` (remove one B feature) and ``patch``
    (set B to its value on another input, over all ordered pairs of distinct inputs).
    """
    m = case.middle_layer
    gt = next(g for g in case.ground_truth() if g.layer == m)
    hooks = (case.input_hooks, case.output_hooks)
    out = case.output_value
    true_clean = out(run_true_model(model, inputs, case.output_hooks))
    results = {}
    ablations = {"ablate_all": gt.directions_GD}
    ablations |= {f"ablate_{n}": gt.directions_GD[i:i + 1] for i, n in enumerate(gt.names)}
    for kind, dirs in ablations.items():
        P = projector(dirs)
        t = out(run_true_model(model, inputs, case.output_hooks, {m: _ablate(P)}))
        r, _, _ = run_replacement(model, tc, inputs, *hooks, {m: _ablate(P)})
        results[kind] = (true_clean, t, out(r))
    results["patch"] = _patch_pairs(case, model, tc, inputs, projector(gt.directions_GD))
    return results


def _patch_pairs(case, model, tc, inputs, P):
    """Patch B from input j into input i for all i != j."""
    m, N = case.middle_layer, inputs.shape[0]
    hooks = (case.input_hooks, case.output_hooks)
    i, j = torch.meshgrid(torch.arange(N), torch.arange(N), indexing="ij")
    keep = i != j
    i, j = i[keep], j[keep]
    # Each model's own clean value of B on the source input.
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

