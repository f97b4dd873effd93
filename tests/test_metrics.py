"""Every metric of clt_eval/metrics.py on small hand-computed cases (docs/concepts.md §5)."""

import math

import numpy as np
import pytest
import torch

from clt_eval import metrics as M


def test_nmse_per_layer_with_known_error():
    target = torch.tensor([[0.0, 1.0], [1.0, 1.0], [2.0, 3.0], [3.0, 3.0]]).view(4, 2, 1)
    # Layer 0: variance sum 2.25+0.25+0.25+2.25 = 5, error 1 on one sample -> 0.2.
    # Layer 1: predicting the mean (2) leaves all the variance -> 1.0.
    recon0 = target.clone()
    recon0[0, 0, 0] += 1.0
    recon0[:, 1] = 2.0
    recon = torch.stack([recon0, target])  # run 1 is perfect
    nmse = M.nmse_per_layer(recon, target)
    assert nmse.shape == (2, 2)
    torch.testing.assert_close(nmse, torch.tensor([[0.2, 1.0], [0.0, 0.0]]))


def test_l0_per_layer():
    acts = torch.tensor([[[1.0, 0.0, 2.0], [1.0, 1.0, 1.0]],
                         [[0.0, -1.0, 0.0], [3.0, 0.0, -2.0]]])[None]  # [R=1, B=2, L=2, F=3]
    torch.testing.assert_close(M.l0_per_layer(acts), torch.tensor([[1.0, 2.0]]))


def test_dead_fraction():
    acts = torch.tensor([[[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]],
                         [[0.0, 0.0, -1.0, 0.0], [0.0, 0.0, 2.0, 3.0]]])[None]
    # Layer 0: only feature 0 fires -> 3/4 dead. Layer 1: all four fire somewhere -> 0.
    torch.testing.assert_close(M.dead_fraction(acts), torch.tensor([[0.75, 0.0]]))


def test_correlation_matrix():
    x = torch.tensor([1.0, 2.0, 4.0, 8.0])
    a = torch.stack([x, -x, torch.full_like(x, 3.0)], 1)
    b = torch.stack([x, 2 * x + 1], 1)
    corr = M.correlation_matrix(a, b)
    assert corr.shape == (3, 2)
    # A constant column (a dead feature) correlates 0, not NaN.
    torch.testing.assert_close(corr, torch.tensor([[1.0, 1.0], [-1.0, -1.0], [0.0, 0.0]]))
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(20, 3, generator=g), torch.randn(20, 2, generator=g)
    want = np.corrcoef(a.T.numpy(), b.T.numpy())[:3, 3:]
    np.testing.assert_allclose(M.correlation_matrix(a, b).numpy(), want, rtol=1e-5, atol=1e-6)


def test_cosine_matrix():
    u = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    v = torch.tensor([[0.0, 3.0], [1.0, 0.0]])
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(M.cosine_matrix(u, v),
                               torch.tensor([[0.0, 1.0], [s, s], [0.0, 0.0]]))


def _gt(n=60, g=3, d=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, g, generator=gen), torch.randn(g, d, generator=gen), gen


def test_match_features_recovers_permutation():
    gt_acts, gt_dirs, gen = _gt()
    n = gt_acts.shape[0]
    # Transcoder feature 4 is gt 0, 1 is gt 1, 3 is gt 2 (scaled and shifted); 0 and 2 noise.
    where = {0: 4, 1: 1, 2: 3}
    acts = torch.rand(n, 5, generator=gen)
    dec = torch.randn(5, 6, generator=gen)
    for g, f in where.items():
        acts[:, f] = 2.0 * gt_acts[:, g] + 0.5
        dec[f] = 3.0 * gt_dirs[g]
    m = M.match_features(acts, gt_acts, dec, gt_dirs, 0.9, 0.9)
    assert m["index"] == [4, 1, 3]
    assert m["recovered"] == [True, True, True]
    np.testing.assert_allclose(m["corr"], 1.0, atol=1e-5)
    np.testing.assert_allclose(m["cos"], 1.0, atol=1e-5)
    assert M.recovery_fraction(m) == 1.0


def test_match_features_flags_features_below_threshold():
    gt_acts, gt_dirs, gen = _gt(seed=1)
    n = gt_acts.shape[0]
    acts = gt_acts[:, [2, 0, 1]].clone()  # feature f holds gt (2, 0, 1)[f]
    dec = gt_dirs[[2, 0, 1]].clone()
    # gt 1 (feature 2): right activations, but a decoder orthogonal to the true direction.
    w = torch.randn(6, generator=gen)
    dec[2] = w - (w @ gt_dirs[1]) / gt_dirs[1].norm() ** 2 * gt_dirs[1]
    # gt 2 (feature 0): right decoder, activations drowned in noise.
    acts[:, 0] = gt_acts[:, 2] + 3.0 * torch.rand(n, generator=gen)
    m = M.match_features(acts, gt_acts, dec, gt_dirs, 0.9, 0.9)
    assert m["index"] == [1, 2, 0]
    assert abs(m["cos"][1]) < 1e-5 and m["corr"][1] > 0.99
    assert m["corr"][2] < 0.9 and m["cos"][2] > 0.99
    assert m["recovered"] == [True, False, False]
    assert math.isclose(M.recovery_fraction(m), 1 / 3)
    assert math.isnan(M.recovery_fraction({"recovered": []}))


def test_match_features_marks_unmatched_when_too_few_features():
    gt_acts, gt_dirs, _ = _gt(seed=2)
    m = M.match_features(gt_acts[:, [1]], gt_acts, gt_dirs[[1]], gt_dirs)
    assert m["index"] == [-1, 0, -1]
    assert m["recovered"] == [False, True, False]


def test_skip_fraction():
    u = torch.tensor([2.0, 0.0, 0.0])  # not unit length: only its direction matters
    contrib = torch.zeros(4, 2, 2, 3)  # [R, B, S, D], target layer 1
    contrib[0, :, 1, 0] = torch.tensor([2.0, -1.0])  # only the output's own layer
    contrib[1, :, 0, 0] = torch.tensor([1.0, 1.0])  # only cross-layer
    contrib[2, :, 0, 0] = torch.tensor([-1.0, 1.0])  # early mass 2 ...
    contrib[2, :, 1, 0] = torch.tensor([3.0, -3.0])  # ... own mass 6 -> 2/8
    contrib[2, :, :, 1] = 100.0  # off the output direction: ignored
    frac = M.skip_fraction(contrib, u, target_layer=1)  # run 3 writes nothing
    assert frac.shape == (4,)
    torch.testing.assert_close(frac[:3], torch.tensor([0.0, 1.0, 0.25]))
    assert torch.isnan(frac[3])


def test_skip_fraction_ignores_sources_after_the_target():
    u = torch.tensor([1.0, 0.0])
    contrib = torch.zeros(1, 1, 3, 2)
    contrib[0, 0, :, 0] = torch.tensor([1.0, 1.0, 5.0])
    torch.testing.assert_close(M.skip_fraction(contrib, u, target_layer=1), torch.tensor([0.5]))


def test_output_accuracy():
    true = torch.tensor([0.0, 2.0, 2.0, 0.0])
    pred = torch.tensor([[0.0, 2.0, 1.1, 0.4], [2.0, 0.0, 0.0, 2.0]])
    torch.testing.assert_close(M.output_accuracy(pred, true, tol=0.5), torch.tensor([0.75, 0.0]))


def test_intervention_agreement():
    clean = torch.tensor([0.0, 2.0, 2.0, 0.0])
    intervened = torch.tensor([0.0, 0.0, 2.0, 2.0])  # samples 1 and 3 move
    repl = torch.stack([clean, intervened, torch.tensor([5.0, 0.0, 5.0, 0.0])])
    got = M.intervention_agreement(clean, intervened, repl, tol=0.5)
    # "No change" scores 0, a perfect predictor 1; unmoved samples (0, 2) are not scored.
    torch.testing.assert_close(got, torch.tensor([0.0, 1.0, 0.5]))
    none = M.intervention_agreement(clean, clean + 0.1, repl, tol=0.5)
    assert none.shape == (3,) and torch.isnan(none).all()


def test_output_agreement():
    true = torch.tensor([1.0, 2.0, 3.0])
    pred = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [2.0, 2.0, 2.0]])
    res = M.output_agreement(pred, true)
    torch.testing.assert_close(res["mae"], torch.tensor([0.0, 4 / 3, 2 / 3]))
    torch.testing.assert_close(res["corr"], torch.tensor([1.0, -1.0, 0.0]))


# ---- run independence ----------------------------------------------------------------------
@torch.no_grad()
def _perturbed_ensemble(case, activation: str, k=None):
    from clt_eval.config import TranscoderConfig
    from clt_eval.transcoder import Transcoder

    cfgs = [TranscoderConfig(d_model=case.d_model, n_layers=case.n_layers, n_features=8,
                             arch=arch, activation=activation, k=k)
            for arch in ("clt", "plt", "clt", "clt", "plt")]
    tc = Transcoder(cfgs, seeds=[3, 1, 4, 1, 5])
    g = torch.Generator().manual_seed(0)
    for p in tc.parameters():  # away from the init, so every metric has something to measure
        p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return tc


@pytest.mark.parametrize("activation,k", [("relu", None), ("jumprelu", None), ("topk", 2)])
def test_every_metric_of_a_run_is_the_same_in_an_ensemble_and_alone(case, model, activation, k):
    """Bitwise (==, not allclose): a run's numbers must not depend on its neighbours."""
    from clt_eval.evaluate import evaluate

    tc = _perturbed_ensemble(case, activation, k)
    in_ensemble = evaluate(case, tc, model)
    for r in (0, 1, 4):
        alone = evaluate(case, tc.select([r]), model)[0]
        assert alone.keys() == in_ensemble[r].keys()
        differ = [key for key in alone if alone[key] != in_ensemble[r][key]]
        assert differ == [], f"run {r}: {differ}"


def test_reductions_over_runs_are_run_independent():
    """The run-batched metrics on wide data (where batched kernels round differently)."""
    g = torch.Generator().manual_seed(5)
    pred = torch.randn(5, 4099, generator=g)
    true = pred[2] + 0.3 * torch.randn(4099, generator=g)
    both, one = M.output_agreement(pred, true), M.output_agreement(pred[2:3].clone(), true)
    assert torch.equal(both["corr"][2:3], one["corr"]) and torch.equal(both["mae"][2:3],
                                                                         one["mae"])
    recon, target = torch.randn(5, 300, 3, 40, generator=g), torch.randn(300, 3, 40, generator=g)
    assert torch.equal(M.nmse_per_layer(recon, target)[2:3],
                       M.nmse_per_layer(recon[2:3].clone(), target))
    contrib, dirs = torch.randn(5, 300, 3, 40, generator=g), torch.randn(2, 40, generator=g)
    assert torch.equal(M.skip_fraction(contrib, dirs, 2)[2:3],
                       M.skip_fraction(contrib[2:3].clone(), dirs, 2))
    norms, acts = torch.rand(5, 3, 3, 64, generator=g), torch.rand(5, 300, 3, 64, generator=g)
    for a, b in zip(M.decoder_mass(norms, acts), M.decoder_mass(norms[2:3].clone(),
                                                                  acts[2:3].clone()), strict=True):
        assert torch.equal(a[2:3], b)
