"""Evaluate every run of a transcoder ensemble against a case study's ground truth."""

from __future__ import annotations

import math

import torch

from clt_eval import metrics as M
from clt_eval.interventions import intervention_cases, projector
from clt_eval.replacement import collect_mlp_io, run_replacement

# Thresholds for "recovered" (GUIDE §5) and for "skips" (the output is mostly written
# through cross-layer decoders).
CORR_MIN, COS_MIN, SKIP_THRESHOLD = 0.9, 0.9, 0.5
OFF_DISTRIBUTION_SAMPLES = 512


def output_tolerance(true_out: torch.Tensor) -> float:
    """Half the gap between the two output levels: a prediction closer than this is right."""
    levels = true_out.unique()
    return float((levels.max() - levels.min()) / 2) if levels.numel() > 1 else 0.5


@torch.no_grad()
def evaluate(case, tc, model=None) -> list[dict]:
    """One metrics dict per run of ``tc`` (an ensemble), in run order."""
    tc.eval()
    model = model if model is not None else case.model()
    inputs = case.inputs()
    gt_layers = case.ground_truth()
    x, y, cache = collect_mlp_io(model, inputs, case.input_hooks, case.output_hooks,
                                 [g.hook for g in gt_layers])
    out = tc(x)
    per_run = _reconstruction(out, y) | _recovery(tc, out, gt_layers, cache)
    middle = [g.layer for g in gt_layers].index(case.middle_layer)
    per_run["middle_feature_recovery"] = per_run["recovery_per_layer"][:, middle]
    per_run |= _skip(case, tc, out, gt_layers)
    mass, share = M.decoder_mass(tc.decoder_block_norms(), out.acts_RBLF)
    per_run["decoder_mass_per_layer"], per_run["cross_layer_share"] = mass, share
    per_run["output_reads_inputs"] = _reads_inputs(case, tc, out, x, gt_layers)
    per_run |= _behaviour(case, model, tc, inputs, cache["output"])
    return [{k: _item(v, r) for k, v in per_run.items()} for r in range(tc.n_runs)]


def _item(v, r):
    """Run r's value of a per-run metric, as plain JSON-ready Python."""
    if isinstance(v, dict):
        return {k: _item(x, r) for k, x in v.items()}
    x = v[r]
    return _json_safe(x.tolist() if isinstance(x, torch.Tensor) else x)


def _json_safe(x):
    """NaN becomes None (JSON has no NaN; None reads as "undefined"), also inside lists."""
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return None if isinstance(x, float) and math.isnan(x) else x


def _reconstruction(out, y) -> dict:
    nmse = M.nmse_per_layer(out.recon_RBLD, y)
    l0 = M.l0_per_layer(out.acts_RBLF)
    return {"nmse": nmse.mean(-1), "nmse_per_layer": nmse, "l0_per_layer": l0,
            "l0_total": l0.sum(-1), "dead_fraction_per_layer": M.dead_fraction(out.acts_RBLF)}


def _recovery(tc, out, gt_layers, cache) -> dict:
    """Per layer: fraction of ground-truth features recovered; the middle layer singled out."""
    R = tc.n_runs
    per_layer = torch.zeros(R, len(gt_layers))
    matches = [[None] * len(gt_layers) for _ in range(R)]
    W = tc.masked_W_dec()
    for j, g in enumerate(gt_layers):
        for r in range(R):
            m = M.match_features(out.acts_RBLF[r, :, g.layer], cache[g.hook],
                                 W[r, g.layer, g.layer], g.directions_GD, CORR_MIN, COS_MIN)
            per_layer[r, j] = M.recovery_fraction(m)
            matches[r][j] = {"layer": g.layer, "names": list(g.names)} | m
    return {"recovery_per_layer": per_layer, "matches": matches}


def _skip(case, tc, out, gt_layers) -> dict:
    gt_c = next(g for g in gt_layers if g.layer == case.output_layer)
    contrib = tc.contributions(out.acts_RBLF)[:, :, :, case.output_layer]  # [R,B,S,D]
    frac = M.skip_fraction(contrib, gt_c.directions_GD[0], case.output_layer)
    return {"skip_fraction": frac, "skips": (frac > SKIP_THRESHOLD).float()}


def _reads_inputs(case, tc, out, x, gt_layers) -> list[float]:
    """Per run: share of the output layer's feature inputs that comes from A, not B."""
    b_dirs = next(g for g in gt_layers if g.layer == case.middle_layer).directions_GD
    P_a, P_b = projector(case.input_directions()), projector(b_dirs)
    layer = case.output_layer
    return [M.read_share(x[:, layer], tc.W_enc[r, layer], out.acts_RBLF[r, :, layer], P_a, P_b)
            for r in range(tc.n_runs)]


def _behaviour(case, model, tc, inputs, true_final) -> dict:
    """Replacement-model accuracy, interventions, and agreement off the training inputs."""
    hooks = (case.input_hooks, case.output_hooks)
    true_out = case.output_value(true_final)
    tol = output_tolerance(true_out)
    repl, _, _ = run_replacement(model, tc, inputs, *hooks)
    res = {"output_accuracy": M.output_accuracy(case.output_value(repl), true_out, tol)}
    cases = intervention_cases(case, model, tc, inputs)
    agree = {k: M.intervention_agreement(*v, tol) for k, v in cases.items()}
    cat = [torch.cat([v[i] for v in cases.values()], dim=-1) for i in range(3)]
    res["intervention_agreement"] = M.intervention_agreement(*cat, tol)
    res["intervention_agreement_by_kind"] = agree
    off = case.off_distribution_inputs(n=OFF_DISTRIBUTION_SAMPLES, seed=0)
    off_true = case.output_value(model(off))
    off_repl, _, _ = run_replacement(model, tc, off, *hooks)
    agreement = M.output_agreement(case.output_value(off_repl), off_true)
    res["offdist_mae"], res["offdist_corr"] = agreement["mae"], agreement["corr"]
    return res

