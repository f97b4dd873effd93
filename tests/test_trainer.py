"""Trainer schedules, determinism, and the run/train configs."""

from __future__ import annotations

import math

import pytest
import torch

from clt_eval.errors import CltEvalError
from clt_eval.training.config import ReproduceConfig, RunSpec, TrainConfig
from clt_eval.training.experiment import group_specs
from clt_eval.training.trainer import full_batches, init_b_dec, lambda_factor, lr_factor, train
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


def test_small_relu_ensembles_of_several_widths_are_padded_into_one_where_allowed():
    from clt_eval.training.experiment import PAD_BELOW

    def runs(width, n, **kw):
        return [RunSpec(penalty="tanh", n_features=width, seed=i, **kw) for i in range(n)]

    specs = (runs(2, 3) + runs(8, 4) + runs(4, PAD_BELOW)  # too big to pad: stays apart
             + runs(3, 2, preact_coef=0.1)  # another ensemble key: padded on its own
             + [RunSpec(penalty="topk", decoder_norm="none", k=1, n_features=5)])
    assert sorted(map(len, group_specs(specs))) == [1, 2, 3, 4, PAD_BELOW]
    groups = group_specs(specs, mix_activations=True, pad=lambda width: width <= 8)
    widths = sorted(sorted({s.n_features for s in g}) for g in groups)
    assert widths == [[2, 8], [3], [4], [5]]  # TopK's key mixes, but only ReLU runs pad
    # Widths the caller does not allow stay apart.
    groups = group_specs(specs, pad=lambda width: width <= 4)
    assert sorted(sorted({s.n_features for s in g}) for g in groups) == [[2], [3], [4], [5],
                                                                          [8]]


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


# ---- device and precision ----------------------------------------------------------------
def test_device_and_dtype_are_checked():
    with pytest.raises(CltEvalError, match="device 'gpu'"):
        TrainConfig(device="gpu")
    with pytest.raises(CltEvalError, match="dtype 'float16'"):
        TrainConfig(dtype="float16")
    with pytest.raises(CltEvalError, match="dtype"):
        ReproduceConfig(dtype="half")
    assert TrainConfig(device="cuda:1").device == "cuda:1"  # a GPU is looked for at training


def _fit_on(x, y, specs, device, dtype, steps=40, checkpoint=None, stop_at=None):
    """Train on ``device``; with ``stop_at``, ask ``checkpoint`` to stop after that step."""
    tc = Transcoder([s.transcoder_config(x.shape[-1], x.shape[1]) for s in specs],
                    seeds=[s.seed for s in specs])
    init_b_dec(tc, y)
    batches = full_batches(x.to(device), y.to(device), 8, seed=[s.seed for s in specs])
    if stop_at is not None:
        batches = _stop_after(batches, checkpoint, stop_at)
    final = train(tc, [s.loss_config() for s in specs],
                  torch.tensor([s.sparsity_coef for s in specs]), batches,
                  TrainConfig(steps=steps, log_every=10, lr=0.02, device=device, dtype=dtype),
                  checkpoint=checkpoint)
    return tc, final


def _stop_after(batches, checkpoint, step):
    for i, batch in enumerate(batches):
        if i == step:
            checkpoint.request_stop()
        yield batch


DEVICE_SPECS = [RunSpec(arch="clt", penalty="tanh", sparsity_coef=0.1, seed=0),
                RunSpec(arch="plt", penalty="l1", sparsity_coef=0.03, seed=1)]


def _check_device_training(x, y, device, tmp_path):
    """float32 and bfloat16 train finite float32 weights that come back to the CPU; bfloat16
    rounds differently; a checkpointed float32 run resumes to the uninterrupted weights."""
    from clt_eval.training.checkpoint import Checkpoint

    start, _ = _fit_on(x, y, DEVICE_SPECS, device, "float32", steps=1)
    runs = {}
    for dtype in ("float32", "bfloat16"):
        tc, final = _fit_on(x, y, DEVICE_SPECS, device, dtype)
        assert tc.W_enc.device.type == "cpu" and final["loss"].device.type == "cpu"
        assert all(t.dtype == torch.float32 and bool(t.isfinite().all())
                   for t in tc.parameters())  # float32 master weights in both
        assert final["diverged"] == [None, None]
        runs[dtype] = tc
    assert not torch.equal(runs["float32"].W_enc, runs["bfloat16"].W_enc)
    assert not torch.equal(start.W_enc, runs["bfloat16"].W_enc)  # it trained
    ckpt = Checkpoint(tmp_path / f"{device}.safetensors", every=7)
    with pytest.raises(KeyboardInterrupt):
        _fit_on(x, y, DEVICE_SPECS, device, "float32", checkpoint=ckpt, stop_at=23)
    resumed, _ = _fit_on(x, y, DEVICE_SPECS, device, "float32",
                         checkpoint=Checkpoint(ckpt.path, every=7))
    for (name, a), b in zip(resumed.state_dict().items(), runs["float32"].state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name
    return runs


def test_training_on_the_cpu_in_float32_and_bfloat16(x_BLD, y_BLD, tmp_path):
    _check_device_training(x_BLD, y_BLD, "cpu", tmp_path)


@pytest.mark.cuda
def test_training_on_cuda_in_float32_and_bfloat16(x_BLD, y_BLD, tmp_path):
    on_gpu = _check_device_training(x_BLD, y_BLD, "cuda", tmp_path)
    on_cpu, _ = _fit_on(x_BLD, y_BLD, DEVICE_SPECS, "cpu", "float32")
    # Same batches, same seeds; only the kernels' rounding differs.
    for (name, a), b in zip(on_gpu["float32"].state_dict().items(),
                            on_cpu.state_dict().values(), strict=True):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-4), name


@pytest.mark.cuda
def test_train_grid_on_cuda_saves_cpu_transcoders(tmp_path):
    import json

    from clt_eval.io import load_transcoder
    from clt_eval.training.runs import train_grid

    cfg = TrainConfig(steps=30, batch_size=8, log_every=0, device="cuda", dtype="bfloat16")
    path = train_grid("boolean_two_step", DEVICE_SPECS, cfg, tmp_path, "disabled")
    runs = json.loads(path.read_text())["runs"]
    assert [r["metrics"]["diverged"] for r in runs] == [None, None]
    for r in runs:
        tc = load_transcoder(tmp_path / "transcoders" / r["run_id"])
        assert tc.W_enc.device.type == "cpu" and bool(tc.W_enc.isfinite().all())
