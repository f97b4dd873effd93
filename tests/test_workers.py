"""Ensembles cut into parts trained by forked worker processes (training/workers.py): the
result equals the whole ensemble's bit for bit, errors and stops come back to the caller,
and part checkpoints resume and are cleaned up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from unittest import mock

import pytest
import torch

from clt_eval.errors import CltEvalError
from clt_eval.training import workers
from clt_eval.training.checkpoint import Checkpoint
from clt_eval.training.config import RunSpec, TrainConfig
from clt_eval.training.experiment import train_group

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forks on Linux")

# PLT and CLT, three activations, several penalties and norms: every kind of decode segment.
SPECS = [RunSpec(arch=a, penalty=p, decoder_norm=n, sparsity_coef=c, n_features=6, seed=s)
         for s, (a, p, n, c) in enumerate([
             ("plt", "l1", "concatenated", 0.01), ("plt", "tanh", "concatenated", 0.1),
             ("plt", "l0", "none", 0.01), ("clt", "l1", "summed", 0.03),
             ("clt", "l1", "per_block", 0.3), ("clt", "tanh", "concatenated", 0.05),
             ("clt", "l0", "none", 0.003)])]
SPECS += [RunSpec(arch=a, penalty="topk", decoder_norm="none", k=k, n_features=6, seed=9 + k)
          for a, k in [("plt", 2), ("clt", 1), ("clt", 3)]]
CFG = TrainConfig(steps=30, lr=0.02, log_every=10)


def _train(case, model, toy_io, n_workers, checkpoint=None, specs=SPECS, cfg=CFG):
    logged = []
    with workers.use_workers(n_workers), mock.patch.object(workers, "MIN_PART_RUNS", 3):
        res = train_group(case, model, specs, cfg, toy_io,
                          logger=lambda step, values: logged.append((step, values)),
                          checkpoint=checkpoint)
    return res, logged


def test_parts_are_contiguous_near_equal_and_respect_the_minimum():
    assert workers.parts(80, 2, 24) == [range(0, 40), range(40, 80)]
    assert workers.parts(47, 2, 24) == [range(0, 47)]  # two parts would be under 24 runs
    assert workers.parts(100, 3, 10) == [range(0, 33), range(33, 67), range(67, 100)]
    assert workers.parts(10, 1, 1) == [range(0, 10)]


def test_an_ensemble_split_across_processes_equals_the_whole_bit_for_bit(case, model, toy_io):
    whole, logged_whole = _train(case, model, toy_io, 1)
    with mock.patch.object(workers, "run_parts", wraps=workers.run_parts) as spy:
        split, logged_split = _train(case, model, toy_io, 3)
    assert len(spy.call_args.args[0]) == 3  # three processes trained it
    a, b = whole.transcoder.state_dict(), split.transcoder.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert json.dumps(whole.records) == json.dumps(split.records)
    assert [s for s, _ in logged_whole] == [s for s, _ in logged_split] == [0, 10, 20, 29]
    for (_, u), (_, v) in zip(logged_whole, logged_split, strict=True):
        assert u.keys() == v.keys() and all(torch.equal(u[k], v[k]) for k in u)
    assert not split.transcoder.training  # left in eval mode, as ``train`` leaves one


def test_one_worker_or_a_small_ensemble_forks_nothing(case, model, toy_io):
    with mock.patch.object(workers, "run_parts") as spy:
        _train(case, model, toy_io, 1)
        with workers.use_workers(4):  # 10 runs: below the real minimum part size
            train_group(case, model, SPECS, replace(CFG, steps=2), toy_io)
    spy.assert_not_called()


def test_a_failing_part_raises_its_error_here():
    def bad():
        raise CltEvalError("runs.toml: field 'x': expected a number")

    def crash():
        raise ValueError("boom")

    with pytest.raises(CltEvalError, match="field 'x': expected a number"):
        workers.run_parts([lambda: (1, {}), bad])
    with pytest.raises(RuntimeError, match="ValueError: boom"):
        workers.run_parts([lambda: (1, {}), crash])
    t = torch.randn(3, 4, dtype=torch.float64)
    (a, _), (b, tensors) = workers.run_parts([lambda: (1, {}), lambda: ([2, "c"], {"t": t})])
    assert a == 1 and b == [2, "c"] and torch.equal(tensors["t"], t)


def test_side_by_side_keeps_the_order_with_and_without_workers():
    fns = [lambda: "a", lambda: os.getpid(), lambda: "c"]
    with workers.use_workers(1):
        assert workers.side_by_side(fns) == ["a", os.getpid(), "c"]
    with workers.use_workers(3):
        out = workers.side_by_side(fns)
    assert out[0] == "a" and out[2] == "c" and out[1] != os.getpid()


def test_parts_stop_save_and_resume_to_the_uninterrupted_result(case, model, toy_io, tmp_path):
    """A stop asked of the ensemble's checkpoint stops every part at a step boundary with its
    own checkpoint; training again resumes each part and ends where an uninterrupted run does;
    removing the ensemble's checkpoint removes the parts'."""
    whole, _ = _train(case, model, toy_io, 1)
    ckpt = Checkpoint(tmp_path / "c.safetensors", every=5)
    ckpt.request_stop()  # as SIGINT would: every part saves after its first step and stops
    with pytest.raises(KeyboardInterrupt):
        _train(case, model, toy_io, 2, checkpoint=ckpt)
    saved = sorted(p.name for p in tmp_path.iterdir())
    assert saved == ["c.part1of2.safetensors", "c.part2of2.safetensors"]
    resumed, _ = _train(case, model, toy_io, 2, Checkpoint(ckpt.path, every=5))
    a, b = whole.transcoder.state_dict(), resumed.transcoder.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    Checkpoint(ckpt.path, every=5).remove()
    assert list(tmp_path.iterdir()) == []


def test_auto_workers_are_the_cores_idle_now():
    from clt_eval import device

    with mock.patch.object(device, "busy_cores", return_value=64):
        assert device.auto_workers() == 1  # a busy machine: one process, one fixed cost
    with mock.patch.object(device, "busy_cores", return_value=0):
        assert device.auto_workers() == device._idle_cores(0) >= 1


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads /proc/stat")
def test_busy_cores_sees_a_job_that_started_a_moment_ago():
    """The load average would still read ~0 half a second after the spinner starts."""
    from clt_eval.device import busy_cores

    spin = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\n"
                             "while time.time() - t < 20: pass"])
    try:
        time.sleep(0.5)
        with mock.patch("os.getloadavg", return_value=(0.0, 0.0, 0.0)):
            assert busy_cores() >= 1 and busy_cores(average=True) >= 1
    finally:
        spin.kill()
        spin.wait()


def test_tiny_jobs_use_worker_processes_of_one_thread_each():
    from clt_eval._api_setup import compute

    with compute(3, tiny=True):
        assert workers.workers() == 3 and torch.get_num_threads() == 1
    with compute(2, tiny=False):
        assert workers.workers() == 1 and torch.get_num_threads() == 2
    assert workers.workers() == 1
