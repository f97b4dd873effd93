"""The divergence guard: a run that blows up is stopped alone and reported, never saved."""

from __future__ import annotations

import json

import pytest
import torch

from clt_eval.errors import CltEvalError
from clt_eval.training.checkpoint import Checkpoint
from clt_eval.training.config import RunSpec, TrainConfig
from clt_eval.training.trainer import full_batches, init_b_dec, train
from clt_eval.transcoder import Transcoder

B, L, D, F = 13, 3, 7, 5
SPECS = [RunSpec(arch="clt", penalty="l1", sparsity_coef=0.01, seed=0, n_features=F),
         RunSpec(arch="plt", penalty="tanh", decoder_norm="summed", sparsity_coef=0.3, seed=1,
                 n_features=F),
         RunSpec(arch="clt", penalty="l1", decoder_norm="per_block", sparsity_coef=0.1, seed=2,
                 n_features=F),
         RunSpec(arch="plt", penalty="l1", sparsity_coef=0.05, seed=3, n_features=F)]


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, L, D, generator=g)
    return x, torch.tanh(x @ torch.randn(D, D, generator=g)) + 0.1


def _sabotage(batches, tc_box, run, step, how):
    """Batches as usual, but before ``step`` damage ``run``'s weights (a stand-in for a run
    whose numbers blew up)."""
    for i, batch in enumerate(batches):
        if i == step:
            with torch.no_grad():
                how(tc_box[0], run)
        yield batch


def _fit(specs, data, steps=80, sabotage=None, checkpoint=None, tc=None, **cfg):
    x, y = data
    if tc is None:
        tc = Transcoder([s.transcoder_config(D, L) for s in specs],
                        seeds=[s.seed for s in specs])
        init_b_dec(tc, y)
    batches = full_batches(x, y)
    if sabotage is not None:
        batches = _sabotage(batches, [tc], *sabotage)
    final = train(tc, [s.loss_config() for s in specs],
                  torch.tensor([s.sparsity_coef for s in specs]), batches,
                  TrainConfig(steps=steps, lr=0.02, log_every=0, device="cpu", **cfg),
                  checkpoint=checkpoint, run_names=[f"r{i}" for i in range(len(specs))])
    return tc, final


def _nan(tc, r):
    tc.W_enc[r, 0, 0, 0] = float("nan")


def _blow_up(tc, r):
    for W in tc.decoder_params():
        W.data[r] *= 1e4


def _assert_runs_equal(a, ia, b, ib):
    for name, t in a.state_dict().items():
        assert torch.equal(t[ia], b.state_dict()[name][ib]), name


def test_a_nan_run_is_stopped_and_the_others_go_on_unchanged(data, capsys):
    tc, final = _fit(SPECS, data, sabotage=(2, 30, _nan))
    assert final["diverged"] == [None, None, {"step": 30, "reason": "loss nan"}, None]
    assert capsys.readouterr().err.strip() == (
        "clt-eval: warning: run r2 diverged at step 30 (loss nan); the other runs go on")
    # Caught with a NaN weight, so there is no finite state to keep: zeroed, and held there.
    assert all(bool(t[2].eq(0).all()) for t in tc.state_dict().values()
               if t.is_floating_point())
    without, _ = _fit([SPECS[i] for i in (0, 1, 3)], data)
    for j, i in enumerate((0, 1, 3)):
        _assert_runs_equal(tc, i, without, j)
    assert bool(final["loss"][[0, 1, 3]].isfinite().all())


def test_a_loss_that_grows_past_the_factor_freezes_the_run_where_it_was(data, capsys):
    seen = {}

    def blow_up_and_remember(tc, r):
        _blow_up(tc, r)
        seen.update({k: v[r].clone() for k, v in tc.state_dict().items()})

    tc, final = _fit(SPECS, data, sabotage=(1, 20, blow_up_and_remember))
    d = final["diverged"][1]
    assert d["step"] == 20 and d["reason"].startswith("loss ") and "> 10000 x first loss" in \
        d["reason"]
    assert "run r1 diverged at step 20" in capsys.readouterr().err
    for k, v in tc.state_dict().items():  # finite when caught: kept as it was
        assert torch.equal(v[1], seen[k]), k
    assert [i for i, d in enumerate(final["diverged"]) if d] == [1]
    # With the check off, the same damage trains on.
    _, unguarded = _fit(SPECS, data, sabotage=(1, 20, _blow_up), divergence_factor=0)
    assert unguarded["diverged"] == [None] * 4


def test_divergence_survives_a_checkpoint(data, tmp_path):
    ckpt = Checkpoint(tmp_path / "ckpt.safetensors", every=0)
    whole, final = _fit(SPECS, data, steps=60, sabotage=(3, 10, _nan))

    def stop_at_40(tc, r):
        ckpt.request_stop()

    first = Transcoder([s.transcoder_config(D, L) for s in SPECS], seeds=[s.seed for s in SPECS])
    init_b_dec(first, data[1])
    x, y = data
    batches = _sabotage(_sabotage(full_batches(x, y), [first], 3, 10, _nan), [first], 0, 40,
                        stop_at_40)
    with pytest.raises(KeyboardInterrupt):
        train(first, [s.loss_config() for s in SPECS],
              torch.tensor([s.sparsity_coef for s in SPECS]), batches,
              TrainConfig(steps=60, lr=0.02, log_every=0, device="cpu"), checkpoint=ckpt)
    fresh = Transcoder([s.transcoder_config(D, L) for s in SPECS], seeds=[s.seed for s in SPECS])
    _, resumed = _fit(SPECS, data, steps=60, checkpoint=Checkpoint(ckpt.path, every=0),
                      tc=fresh)
    assert resumed["diverged"] == final["diverged"]
    for i in range(4):
        _assert_runs_equal(fresh, i, whole, i)


@pytest.mark.parametrize("factor", [1.0, 0.5, -1.0, float("inf"), float("nan")])
def test_divergence_factor_is_validated(factor):
    with pytest.raises(CltEvalError, match="divergence_factor"):
        TrainConfig(divergence_factor=factor)


# clt_eval.metrics.correlation_matrix takes all runs' outputs as the columns of one matrix
# (a column mean and a matrix product over the samples), whose rounding depends on the number
# of columns; computed run by run, it would be exact too.
NOT_YET_EXACT = ("offdist_corr",)


class _Logger:
    """The wandb logger's interface, recording nothing."""

    def start(self, name, config):
        pass

    def ensemble_logger(self, ids):
        return None

    def table(self, key, rows):
        pass

    def finish(self):
        pass


def test_train_group_records_a_diverged_run_without_nan_and_saves_nothing(case, model, toy_io,
                                                                          tmp_path):
    """λ = 10⁶ makes the penalty explode as soon as λ's warm-up starts (step 1)."""
    from clt_eval.training.experiment import run_id, train_log_save

    specs = [RunSpec(arch="clt", penalty="l1", sparsity_coef=0.01, seed=0),
             RunSpec(arch="plt", penalty="l1", sparsity_coef=1e6, seed=1),
             RunSpec(arch="plt", penalty="tanh", sparsity_coef=0.1, seed=2)]
    cfg = TrainConfig(steps=40, log_every=0, device="cpu")  # bit-exact on the CPU
    recs = train_log_save(case, model, specs, cfg, toy_io, _Logger(), None, tmp_path)
    json.dumps(recs, allow_nan=False)  # no NaN or inf anywhere
    bad = recs[1]["metrics"]
    assert bad["diverged"]["step"] == 1 and "x first loss" in bad["diverged"]["reason"]
    assert all(v is None for k, v in bad.items() if k != "diverged")
    assert set(bad) == set(recs[0]["metrics"])
    saved = sorted(p.name for p in (tmp_path / "transcoders").iterdir())
    assert saved == sorted(run_id(specs[i]) for i in (0, 2))
    # Each healthy run's record is the one it gets trained alone, bit for bit, but for
    # metrics computed across runs in a way that is not yet exact (see NOT_YET_EXACT).
    for i in (0, 2):
        [alone] = train_log_save(case, model, [specs[i]], cfg, toy_io, _Logger(), None,
                                 tmp_path / "alone", save=False)
        got, want = dict(recs[i]["metrics"]), dict(alone["metrics"])
        for key in NOT_YET_EXACT:
            assert got.pop(key) == pytest.approx(want.pop(key), rel=1e-5)
        assert json.dumps(recs[i] | {"metrics": got}) == json.dumps(alone | {"metrics": want})


# ---- end to end: `clt-eval train` and `clt-eval sweep` ---------------------------------------
def _strict_json(path):
    """The file as JSON, failing on NaN or Infinity (which strict JSON does not have)."""
    def refuse(const):
        raise AssertionError(f"{path}: {const} in JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


TINY = [RunSpec(arch=a, penalty="tanh", sparsity_coef=0.1, seed=s, n_features=4)
        for a in ("plt", "clt") for s in (0, 1)]


@pytest.mark.parametrize("lr", [1e30, 1e4])
def test_train_with_a_huge_lr_records_every_run_diverged_and_saves_none(tmp_path, capsys, lr):
    from clt_eval.training.experiment import run_id
    from clt_eval.training.runs import train_grid

    cfg = TrainConfig(steps=10, lr=lr, log_every=0, device="cpu")
    path = train_grid("boolean_two_step", TINY, cfg, tmp_path, "disabled")
    runs = _strict_json(path)["runs"]
    assert [r["run_id"] for r in runs] == [run_id(s) for s in TINY]
    for r in runs:
        d = r["metrics"]["diverged"]
        assert isinstance(d["step"], int) and 0 <= d["step"] < 10 and d["reason"]
        assert all(v is None for k, v in r["metrics"].items() if k != "diverged")
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "diverged" in ln]
    assert len(lines) == len(TINY)  # one line per run, naming it
    for s, line in zip(TINY, lines, strict=True):
        assert line.startswith(f"clt-eval: warning: run {run_id(s)} diverged at step ")
    assert not (tmp_path / "transcoders").exists()  # no weights of a diverged run


def test_train_keeps_the_runs_that_did_not_diverge(tmp_path, capsys):
    from clt_eval.io import load_transcoder
    from clt_eval.training.experiment import run_id
    from clt_eval.training.runs import train_grid

    specs = [TINY[0], RunSpec(**(TINY[1].to_dict() | {"sparsity_coef": 1e6}))]
    path = train_grid("boolean_two_step", specs, TrainConfig(steps=30, log_every=0,
                                                               device="cpu"),
                      tmp_path, "disabled")
    ok, bad = _strict_json(path)["runs"]
    assert ok["metrics"]["diverged"] is None and ok["metrics"]["nmse"] is not None
    assert bad["metrics"]["diverged"]["step"] == 1
    assert capsys.readouterr().err.count("diverged at step") == 1
    assert [p.name for p in (tmp_path / "transcoders").iterdir()] == [run_id(specs[0])]
    tc = load_transcoder(tmp_path / "transcoders" / run_id(specs[0]))
    assert all(bool(t.isfinite().all()) for t in tc.state_dict().values()
               if t.is_floating_point())


def test_sweep_with_a_huge_lr_records_diverged_runs_and_reports_it(tmp_path, capsys):
    from clt_eval.training.sweep import run_sweep
    from clt_eval.training.sweep_spec import parse_spec

    spec = parse_spec({"name": "blowup", "matched_l0": None,
                       "train": {"steps": 10, "lr": 1e30, "log_every": 0, "device": "cpu"},
                       "grid": [{"arch": ["plt", "clt"], "penalty": "tanh",
                                 "sparsity_coef": 0.1, "seeds": 1, "n_features": 4}]})
    res = run_sweep(spec, tmp_path, "disabled", progress=False)
    runs = _strict_json(res["sweep"])["runs"]
    assert len(runs) == 2 and all(r["metrics"]["diverged"]["step"] >= 0 for r in runs)
    assert capsys.readouterr().err.count("diverged at step") == 2
    assert "Every one of the 2 runs diverged" in res["report"].read_text()
    assert not (tmp_path / "transcoders").exists()
