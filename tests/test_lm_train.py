"""Training transcoders on a (tiny random) language model: batch order, divergence, resume,
and the default activation cache (training.lm_train)."""

import json
import signal

import pytest
import torch

TEXT = "the quick brown fox jumps over the lazy dog while the cat sleeps. " * 40


@pytest.fixture()
def setup(tmp_path):
    from clt_eval.training.config import RunSpec
    from clt_eval.training.lm_train import LMDataConfig

    (tmp_path / "c.txt").write_text(TEXT)
    data = LMDataConfig(model="tiny", layers=(1, 2), corpus=str(tmp_path / "c.txt"),
                        n_tokens=6 * 32, eval_tokens=2 * 32, n_ctx=32,
                        cache_dir=str(tmp_path / "cache"))
    specs = [RunSpec(arch="clt", penalty="l1", sparsity_coef=1e-4, n_features=16, seed=s)
             for s in (0, 1)]
    return data, specs


def test_batch_at_a_step_depends_only_on_seed_and_step():
    from clt_eval.training.lm_train import StepBatches

    x = torch.arange(50.0)[:, None, None]
    a = StepBatches(x, x, 8, [3, 4])
    seq = [next(a)[0] for _ in range(14)]  # 6 batches an epoch: over two epoch boundaries
    alone = StepBatches(x, x, 8, [4])
    assert all(torch.equal(s[1], next(alone)[0]) for s in seq)  # run 1 as if trained alone
    later = StepBatches(x, x, 8, [3, 4])
    assert torch.equal(later.__next__()[0], seq[0])
    for t in (7, 13):
        assert torch.equal(torch.stack([later.x[later.indices(s, t)] for s in (3, 4)]), seq[t])
    epoch0 = torch.cat([b[0] for b in seq[:6]]).flatten()
    assert len(epoch0.unique()) == 48  # no sample twice within an epoch
    assert not torch.equal(seq[0][0], seq[0][1])  # the two seeds draw different batches


def test_default_cache_dir_is_keyed_and_can_be_turned_off(setup, tmp_path, monkeypatch):
    from dataclasses import replace

    from clt_eval.training.lm_train import default_cache_dir

    data, _ = setup
    monkeypatch.setenv("CLT_EVAL_CACHE", str(tmp_path / "home"))
    d = replace(data, cache_dir=None)
    assert d.resolved_cache_dir() == default_cache_dir(d)
    assert d.resolved_cache_dir().parent == tmp_path / "home" / "activations"
    assert default_cache_dir(replace(d, layers=(1, 3))) != default_cache_dir(d)
    assert default_cache_dir(replace(d, n_tokens=7 * 32)) != default_cache_dir(d)
    assert default_cache_dir(replace(d, input_hook="blocks.{layer}.hook_resid_mid")) != \
        default_cache_dir(d)
    before = default_cache_dir(d)
    (tmp_path / "c.txt").write_text(TEXT + "more")  # a changed corpus file: another cache
    assert default_cache_dir(d) != before
    assert replace(d, cache=False).resolved_cache_dir() is None
    assert data.resolved_cache_dir() == tmp_path / "cache"


def test_a_diverged_run_is_recorded_without_nan_and_not_saved(setup, tmp_path, monkeypatch):
    from clt_eval.training import lm_train
    from clt_eval.training.config import TrainConfig

    data, specs = setup
    real_next = lm_train.StepBatches.__next__

    def poisoned(self):  # run 1's inputs turn to NaN from step 5 on
        x, y = real_next(self)
        if self.step > 5:
            x = x.clone()
            x[1] = float("nan")
        return x, y

    monkeypatch.setattr(lm_train.StepBatches, "__next__", poisoned)
    out = tmp_path / "out"
    path = lm_train.train_on_model(data, specs, TrainConfig(steps=10, batch_size=32), out,
                                   wandb_mode="disabled")
    text = path.read_text()
    assert "NaN" not in text
    runs = json.loads(text)["runs"]
    assert runs[0]["metrics"]["diverged"] is None and runs[0]["metrics"]["nmse"] is not None
    assert runs[1]["metrics"]["diverged"]["step"] >= 5 and runs[1]["metrics"]["nmse"] is None
    assert sorted(p.name for p in (out / "transcoders").iterdir()) == [runs[0]["run_id"]]


def test_training_resumes_after_an_interruption_as_if_never_stopped(setup, tmp_path,
                                                                    monkeypatch):
    from clt_eval.io import load_transcoder
    from clt_eval.training import lm_train
    from clt_eval.training.config import TrainConfig

    data, specs = setup
    cfg = TrainConfig(steps=12, batch_size=32)
    whole = tmp_path / "whole"
    lm_train.train_on_model(data, specs, cfg, whole, wandb_mode="disabled")

    real_next = lm_train.StepBatches.__next__

    def interrupt_at_7(self):  # a SIGTERM that arrives while step 7 trains
        if self.step == 7:
            signal.raise_signal(signal.SIGTERM)
        return real_next(self)

    monkeypatch.setattr(lm_train.StepBatches, "__next__", interrupt_at_7)
    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        lm_train.train_on_model(data, specs, cfg, part, wandb_mode="disabled")
    ckpts = list((part / "checkpoints").iterdir())
    assert len(ckpts) == 1 and not (part / "results.json").exists()
    monkeypatch.setattr(lm_train.StepBatches, "__next__", real_next)
    lm_train.train_on_model(data, specs, cfg, part, wandb_mode="disabled")
    assert not list((part / "checkpoints").iterdir())
    a = json.loads((whole / "results.json").read_text())["runs"]
    b = json.loads((part / "results.json").read_text())["runs"]
    assert [r["metrics"] for r in a] == [r["metrics"] for r in b]
    for r in a:
        ta = load_transcoder(whole / "transcoders" / r["run_id"])
        tb = load_transcoder(part / "transcoders" / r["run_id"])
        for k, v in ta.state_dict().items():
            assert torch.equal(v, tb.state_dict()[k]), k
    # A third run finds every ensemble done and trains nothing.
    monkeypatch.setattr(lm_train, "train_group", None)
    lm_train.train_on_model(data, specs, cfg, part, wandb_mode="disabled")
