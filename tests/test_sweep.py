"""Sweeps: λ bisection, feature tracking, statistics, and resuming an interrupted sweep."""

import json
import math

import numpy as np
import pytest
import torch

from clt_eval.tracking import match_neighbours, stop_index, track
from clt_eval.training import sweep_analysis as A
from clt_eval.training.matched_l0 import Bracket, bisect_log, initial_bracket


# ---- bisection ---------------------------------------------------------------------------
def _l0(lam: float) -> float:
    """A monotone decreasing stand-in for L0(λ): 4 at λ → 0, 0 at λ → ∞."""
    return 4.0 / (1.0 + 10 * lam)


def test_bisection_finds_the_lambda_of_each_target_on_a_monotone_function():
    grid = [(lam, _l0(lam)) for lam in (0.01, 0.1, 1.0, 10.0)]
    targets = [1.0, 1.5, 2.0]
    brackets = [initial_bracket(grid, t) for t in targets]
    calls = []

    def f(lams):
        calls.append(lams)
        return [[_l0(x) for x in row] for row in lams]

    found = bisect_log(f, brackets, targets, iterations=20, ahead=False)
    assert len(calls) == 20 and all(len(c) == 3 for c in calls)  # all brackets per call
    for b, t in zip(found, targets, strict=True):
        lam, value = b.best(t)
        exact = (4.0 / t - 1.0) / 10  # solve 4 / (1 + 10λ) = t
        assert value == pytest.approx(t, rel=1e-3)
        assert lam == pytest.approx(exact, rel=1e-3)
        assert b.lo <= exact <= b.hi


@pytest.mark.parametrize("iterations", [1, 2, 3, 6, 7])
def test_looking_ahead_tries_the_very_points_of_plain_bisection_in_half_the_calls(iterations):
    grid = [(lam, _l0(lam)) for lam in (0.01, 0.1, 1.0, 10.0)]
    targets = [1.0, 1.5, 2.0, 2.5]
    calls = []

    def f(lams):
        calls.append(lams)
        return [[_l0(x) for x in row] for row in lams]

    def search(ahead):
        brackets = [initial_bracket(grid, t) for t in targets]
        return bisect_log(f, brackets, targets, iterations, ahead=ahead)

    plain = search(False)
    calls.clear()
    ahead = search(True)
    assert ahead == plain  # bounds and every (λ, L0) tried, bit for bit
    assert len(calls) == (iterations + 1) // 2
    assert [len(row) for row in calls[0]] == [3 if iterations > 1 else 1] * len(targets)


def test_bisection_keeps_the_bracket_and_reports_targets_outside_the_grid():
    grid = [(0.1, 2.0), (1.0, 0.4)]
    assert initial_bracket(grid, 3.0) is None  # L0 never reaches 3 on this grid
    assert initial_bracket(grid, 0.1) is None
    b = Bracket(0.1, 1.0, tuple(grid))
    assert b.midpoint() == pytest.approx(math.sqrt(0.1))
    assert b.update(0.3, 1.5, 1.0).lo == 0.3  # still above the target: move lo up
    assert b.update(0.3, 0.5, 1.0).hi == 0.3


def test_grid_is_extended_a_decade_at_a_time_until_it_reaches_the_targets():
    """A case study whose L0 stays above the targets at the grid's largest λ gets larger λ
    (at most two decades more), trained through the runner like any other point."""
    from clt_eval.training.config import RunSpec
    from clt_eval.training.experiment import run_id
    from clt_eval.training.matched_l0 import _extend, setting_key
    from clt_eval.training.sweep_spec import MatchedL0Spec

    class Runner:
        calls: list = []

        def run(self, specs, desc):
            self.calls.append(sorted({s.sparsity_coef for s in specs}))
            return [{"run_id": run_id(s), "metrics": {"l0_total": 400.0 / (1 + s.sparsity_coef)}}
                    for s in specs]

    spec = RunSpec(arch="clt", penalty="l1")
    key = (setting_key(spec), "clt")
    curves = {key: [(0.1, 363.6), (1.0, 200.0), (10.0, 36.4)]}  # never below 36
    runner = Runner()
    out = _extend(runner, MatchedL0Spec(bisect_seeds=2), curves, [1.0, 2.0])
    assert runner.calls == [[100.0], [1000.0]]
    assert [lam for lam, _ in out[key]] == [0.1, 1.0, 10.0, 100.0, 1000.0]
    assert initial_bracket(out[key], 1.0) is not None  # now bracketed: 0.4 < 1 < 3.96
    runner.calls.clear()
    reached = {key: [(0.1, 36.4), (1.0, 0.5)]}
    assert _extend(runner, MatchedL0Spec(), reached, [1.0, 2.0]) == reached
    assert runner.calls == []


# ---- feature tracking --------------------------------------------------------------------
def _hand_made():
    """3 λ points, 3 features, 2 ground-truth features on 8 samples. At λ1 the features are
    permuted (tracking must follow identity, not index); at λ2 g1's feature dies and g0's
    turns into a different feature (it now fires on g1's samples too)."""
    g0 = torch.tensor([1.0, 0, 1, 0, 1, 0, 0, 0])
    g1 = torch.tensor([0.0, 1, 0, 1, 0, 0, 1, 0])
    noise = torch.tensor([0.0, 0, 0, 0, 0, 1, 0, 1])
    gt = torch.stack([g0, g1], 1)
    acts = [torch.stack([g0, g1, noise], 1), torch.stack([g1, noise, g0], 1),
            torch.stack([g0 + 0.9 * g1, noise, torch.zeros(8)], 1)]
    dirs = torch.eye(4)[:2]
    decs = [torch.stack([dirs[0], dirs[1], torch.eye(4)[3]]),
            torch.stack([dirs[1], torch.eye(4)[3], dirs[0]]),
            torch.stack([dirs[0], torch.eye(4)[3], torch.eye(4)[2]])]
    return acts, decs, gt, dirs


def test_neighbour_matching_follows_features_through_a_permutation():
    acts, _, _, _ = _hand_made()
    succ, corr = match_neighbours(acts[0], acts[1])
    assert succ == [2, 0, 1] and min(corr) == pytest.approx(1.0)


def test_tracking_finds_where_each_feature_stops_and_how():
    acts, decs, gt, dirs = _hand_made()
    t = track(acts, decs, gt, dirs)
    assert t[0]["recovered"] == [True, True, False] and t[0]["stop"] == 2
    assert t[0]["fate"] == "changed"  # its feature continues but no longer matches
    assert t[1]["recovered"] == [True, True, False] and t[1]["stop"] == 2
    assert t[1]["fate"] == "died"


def test_stop_index_cases():
    assert stop_index([True, True, False, False]) == 2
    assert stop_index([True, False, True, False]) == 3  # recovered again at 2: stops at 3
    assert stop_index([True, True]) is None
    assert stop_index([False, False]) is None


# ---- statistics --------------------------------------------------------------------------
def test_compare_gives_effect_size_and_test_across_seeds():
    a, b = np.zeros(10), np.ones(10)
    c = A.compare(a, b)
    assert c["diff"] == 1.0 and c["cliffs_delta"] == 1.0 and c["p"] < 1e-3
    same = A.compare(np.full(5, 0.5), np.full(5, 0.5))
    assert same["cliffs_delta"] == 0.0 and math.isnan(same["p"])  # all tied: no test
    assert A.fisher_skip(np.zeros(10), np.ones(10)) < 1e-4


def test_bootstrap_band_contains_the_mean_and_collapses_for_constant_data():
    m, lo, hi = A.mean_ci(np.array([0.0, 0.2, 0.4, 1.0, 0.6]))
    assert lo <= m <= hi and lo < hi
    assert A.mean_ci(np.array([0.3, 0.3])) == (0.3, 0.3, 0.3)


# ---- resuming ----------------------------------------------------------------------------
# Two ensembles: tanh and TopK runs of one width would share one (mix_activations), so the
# TopK runs are one feature narrower.
RESUME_SPEC = {
    "name": "resume", "train": {"steps": 40, "log_every": 0},
    "grid": [{"arch": ["plt", "clt"], "penalty": "tanh", "sparsity_coef": [0.03, 0.3],
              "seeds": 2, "n_features": 8},
             {"arch": "clt", "penalty": "topk", "k": [1, 2], "seeds": 2, "n_features": 7}],
}


def _count_steps(monkeypatch, stop_at=None, runner_box=None):
    """Patch the trainer's step to count steps, and optionally ask for a stop at one."""
    import clt_eval.training.trainer as T

    real, count = T._step, {"n": 0}

    def step(*args, **kwargs):
        count["n"] += 1
        if stop_at is not None and count["n"] == stop_at:
            runner_box["runner"].active.request_stop()
        return real(*args, **kwargs)

    monkeypatch.setattr(T, "_step", step)
    return count


def test_interrupted_sweep_resumes_without_losing_or_repeating_a_step(tmp_path, monkeypatch):
    from clt_eval.training import sweep as S
    from clt_eval.training.sweep_spec import parse_spec

    spec = parse_spec(RESUME_SPEC)
    monkeypatch.setattr(S, "CHECKPOINT_EVERY", 10)
    box = {}
    real_runner = S.Runner

    def runner(*args, **kwargs):
        box["runner"] = real_runner(*args, **kwargs)
        return box["runner"]

    monkeypatch.setattr(S, "Runner", runner)
    # 2 ensembles of 40 steps; stop in the middle of the second one (global step 55).
    count = _count_steps(monkeypatch, stop_at=55, runner_box=box)
    out = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        S.run_sweep(spec, out, "disabled", progress=False)
    saved = json.loads((out / "sweep.json").read_text())
    assert len(saved["runs"]) == 8  # the first ensemble, recorded whole
    assert list((out / "checkpoints").glob("*.safetensors"))  # the second, mid-way
    assert count["n"] == 55
    result = S.run_sweep(spec, out, "disabled", progress=False)
    assert count["n"] == 80  # 2 ensembles x 40 steps in all: nothing repeated
    assert result["trained"] == 4 and not list((out / "checkpoints").glob("*"))

    fresh = S.run_sweep(spec, tmp_path / "fresh", "disabled", progress=False)
    a = {r["run_id"]: r["metrics"] for r in json.loads(result["sweep"].read_text())["runs"]}
    b = {r["run_id"]: r["metrics"] for r in json.loads(fresh["sweep"].read_text())["runs"]}
    assert a == b  # the resumed sweep is the uninterrupted one, metric for metric
    again = S.run_sweep(spec, out, "disabled", progress=False)
    assert again["trained"] == 0
    assert (out / "report.md").exists() and (out / "phase_lambda.png").exists()


def test_matched_l0_search_shares_points_and_replays_from_the_record(tmp_path):
    from clt_eval.training.sweep import run_sweep
    from clt_eval.training.sweep_spec import parse_spec

    # Two grid points only: both targets start in the same bracket, at the same midpoint.
    spec = parse_spec({"name": "m", "train": {"steps": 40, "log_every": 0},
                       "matched_l0": {"targets": [6.0, 7.5], "iterations": 2,
                                      "bisect_seeds": 1, "seeds": 2, "n_features": 8},
                       "grid": [{"arch": ["plt", "clt"], "penalty": "tanh",
                                 "sparsity_coef": [0.0001, 100.0], "seeds": 1,
                                 "n_features": 8}]})
    out = tmp_path / "m"
    first = run_sweep(spec, out, "offline", progress=False)  # real wandb runs, offline
    data = json.loads(first["sweep"].read_text())
    points = data["matched_l0"]["points"]
    assert {p["status"] for p in points} == {"found"}
    for p in points:
        assert len(p["run_ids"]) == 2 and p["l0_reached"] > 0
        lams = [lam for lam, _ in p["tried"]]
        assert 0.0001 <= p["lambda"] <= 100.0 and len(lams) == 4  # 2 grid + 2 bisection
    assert run_sweep(spec, out, "disabled", progress=False)["trained"] == 0
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) >= 3  # grid, bisection and final ensembles, and the summary
    assert any((r / "files" / "media" / "images").is_dir() for r in runs)  # the plots
