"""Trainer schedules, determinism, and the run/train configs."""

from __future__ import annotations

import math

import pytest
import torch
from clt_eval.training.config import ReproduceConfig, RunSpec, TrainConfig
from clt_eval.training.experiment import group_specs
from clt_eval.training.trainer import full_batches, init_b_dec, lambda_factor, lr_factor, train

from clt_eval.errors import CltEvalError
from clt_eval.transcoder import Transcoder


def test_lr_warms_up_then_decays_to_final_fraction():
    cfg = TrainConfig(steps=1000, lr_warmup_steps=100, lr_final_frac=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.01)
    assert lr_factor(99, cfg) == pytest.approx(1.0)
    assert lr_factor(100, cfg) == pytest.approx(1.0)
    assert lr_factor(550, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert lr_factor(1000, cfg) == pytest.approx(0.1)


def test_lambda_warms_up_linearly():
    cfg = TrainConfig(steps=1000, lambda_warmup_frac=0.2)
    assert [lambda_factor(s, cfg) for s in (0, 100, 200, 900)] == [0.0, 0.5, 1.0, 1.0]
    assert lambda_factor(0, TrainConfig(steps=10, lambda_warmup_frac=0.0)) == 1.0


def _fit(x, y, specs, steps=30):
    tc = Transcoder([s.transcoder_config(10, 2) for s in specs], seeds=[s.seed for s in specs])
    init_b_dec(tc, y)
    coefs = torch.tensor([s.sparsity_coef for s in specs])
    train(tc, [s.loss_config() for s in specs], coefs, full_batches(x, y),
          TrainConfig(steps=steps, log_every=0))
    return tc


def test_training_is_deterministic_under_a_seed(x_BLD, y_BLD):
    specs = [RunSpec(arch="clt", penalty="tanh", sparsity_coef=0.1, seed=3)]
    a, b = _fit(x_BLD, y_BLD, specs), _fit(x_BLD, y_BLD, specs)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    c = _fit(x_BLD, y_BLD, [RunSpec(arch="clt", penalty="tanh", sparsity_coef=0.1, seed=4)])
    assert not torch.equal(a.W_enc, c.W_enc)


def test_training_reduces_reconstruction_error(x_BLD, y_BLD):
    from clt_eval.metrics import nmse_per_layer

    specs = [RunSpec(arch=a, penalty="l1", sparsity_coef=0.01, seed=0) for a in ("plt", "clt")]
    before = _fit(x_BLD, y_BLD, specs, steps=1)
    after = _fit(x_BLD, y_BLD, specs, steps=300)
    with torch.no_grad():
        assert (nmse_per_layer(after(x_BLD).recon_RBLD, y_BLD)
                < 0.2 * nmse_per_layer(before(x_BLD).recon_RBLD, y_BLD)).all()


def test_minibatches_cover_the_data_each_epoch():
    x = torch.arange(10.0).view(10, 1, 1)
    batches = full_batches(x, x, batch_size=5, seed=0)
    seen = torch.cat([next(batches)[0] for _ in range(2)]).flatten().sort().values
    assert torch.equal(seen, torch.arange(10.0))


def test_runs_with_different_penalties_share_an_ensemble_by_activation():
    specs = [RunSpec(penalty="l1", decoder_norm="summed"), RunSpec(penalty="tanh"),
             RunSpec(penalty="l0", decoder_norm="none"),
             RunSpec(penalty="topk", decoder_norm="none", k=2)]
    groups = group_specs(specs)
    assert sorted(len(g) for g in groups) == [1, 1, 2]


@pytest.mark.parametrize("kwargs, needle", [
    ({"penalty": "l1", "activation": "topk", "k": 1}, "activation='topk'"),
    ({"penalty": "l0", "decoder_norm": "concatenated"}, "decoder_norm='concatenated'"),
    ({"penalty": "topk", "decoder_norm": "none"}, "k=None"),
    ({"sparsity_coef": float("inf")}, "sparsity_coef=inf"),
])
def test_run_spec_rejects_bad_combinations(kwargs, needle):
    with pytest.raises(CltEvalError, match=needle.replace("(", r"\(")):
        RunSpec(**kwargs)


def test_train_and_reproduce_configs_validate():
    with pytest.raises(CltEvalError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(CltEvalError, match="lr"):
        TrainConfig(lr=float("nan"))
    with pytest.raises(CltEvalError, match="wandb_mode"):
        ReproduceConfig(wandb_mode="sometimes")
    with pytest.raises(CltEvalError, match="seeds"):
        ReproduceConfig(seeds=0)


def test_reproduce_spec_applies_overrides():
    from clt_eval.training.reproduce import reproduce_spec

    spec = reproduce_spec(ReproduceConfig(seeds=3, n_features=8, steps=50), "boolean_chain@k=3")
    assert spec.case_study == "boolean_chain@k=3" and spec.train.steps == 50
    assert spec.matched_l0.seeds == 3 and spec.matched_l0.n_features == 8
    assert {r.n_features for r in spec.runs()} == {8}
    assert spec.matched_l0.per_middle_step


def test_run_ids_are_unique_across_non_default_fields():
    from clt_eval.training.experiment import run_id

    a = RunSpec(penalty="tanh", activation="relu")
    b = RunSpec(penalty="tanh", activation="jumprelu")
    c = RunSpec(penalty="tanh", activation="relu", preact_coef=1e-4)
    assert len({run_id(a), run_id(b), run_id(c)}) == 3
    assert run_id(a) == run_id(RunSpec(penalty="tanh"))  # defaults spelled out or not
