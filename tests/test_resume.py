"""Resuming `clt-eval train` and `clt-eval reproduce` after a kill, bit for bit.

Every write is atomic, so a process killed at any instant leaves what a process stopped by an
exception at that instant leaves; the fast tests stop training with an exception at a chosen
step, the slow ones SIGKILL a real `clt-eval` process at a random moment. Either way the rerun
of the same command must end with the weights and metrics of an uninterrupted run, repeating
at most one checkpoint interval of steps (none after SIGTERM or SIGINT, which save first).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

from clt_eval.errors import CltEvalError
from clt_eval.training.config import RunSpec, TrainConfig

EVERY = 5  # steps between checkpoints in these tests
STEPS = 24
# Two ensembles (the width and the pre-activation loss differ; width alone would pad the
# three into one): 2 runs, then 1; minibatches, so the batch order matters.
SPECS = [RunSpec(arch="plt", penalty="tanh", sparsity_coef=0.3, seed=0, n_features=4),
         RunSpec(arch="clt", penalty="tanh", sparsity_coef=0.3, seed=1, n_features=4),
         RunSpec(arch="clt", penalty="tanh", sparsity_coef=0.1, seed=2, n_features=6,
                 preact_coef=1e-3)]
CFG = TrainConfig(steps=STEPS, batch_size=8, log_every=0, lr=0.02, device="cpu")


class Killed(BaseException):
    """Stands for SIGKILL: nothing catches it, nothing is saved on the way out."""


@pytest.fixture
def steps(monkeypatch):
    """Count trainer steps; ``box["kill"] = n`` kills the n-th, ``box["signal"] = (n, sig)``
    sends ``sig`` to this process just before the n-th step (counting from 1)."""
    import clt_eval.training.sweep as S
    import clt_eval.training.trainer as T

    monkeypatch.setattr(S, "CHECKPOINT_EVERY", EVERY)
    real, box = T._step, {"n": 0}

    def step(*args, **kwargs):
        box["n"] += 1
        if box.get("kill") == box["n"]:
            raise Killed
        if box.get("signal", (None,))[0] == box["n"]:
            os.kill(os.getpid(), box["signal"][1])
        return real(*args, **kwargs)

    monkeypatch.setattr(T, "_step", step)
    return box


def _train(out: Path, specs=SPECS, cfg=CFG) -> Path:
    from clt_eval.training.runs import train_grid

    return train_grid("boolean_two_step", specs, cfg, out, "disabled")


def _weights(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {d.name: safetensors.torch.load_file(d / "weights.safetensors")
            for d in sorted((out / "transcoders").iterdir())}


def _assert_same_results(a: Path, b: Path) -> None:
    """Same records (every metric, as JSON writes it: exact for floats) and same weights."""
    ra, rb = (json.loads((p / "results.json").read_text()) for p in (a, b))
    assert ra["runs"] == rb["runs"]
    wa, wb = _weights(a), _weights(b)
    assert list(wa) == list(wb) and wa
    for name in wa:
        for key, t in wa[name].items():
            assert torch.equal(t, wb[name][key]), f"{name}/{key}"


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """The uninterrupted run every resumed one must equal."""
    out = tmp_path_factory.mktemp("fresh") / "train"
    _train(out)
    return out


@pytest.mark.parametrize("kill_at", [13, 37])  # inside the first ensemble, inside the second
def test_train_killed_mid_ensemble_resumes_bitwise(tmp_path, steps, fresh, kill_at):
    out = tmp_path / "train"
    steps["kill"] = kill_at
    with pytest.raises(Killed):
        _train(out)
    done = kill_at - 1
    recorded = json.loads((out / "results.json").read_text())["runs"] if done >= STEPS else []
    assert len(recorded) == (2 if done >= STEPS else 0)  # the finished ensemble, whole
    assert len(list((out / "checkpoints").glob("*.safetensors"))) == 1
    steps.update(n=0, kill=None)
    _train(out)
    repeated = done + steps["n"] - 2 * STEPS
    assert 0 <= repeated <= EVERY  # at most one checkpoint interval trained twice
    assert not list((out / "checkpoints").glob("*"))
    _assert_same_results(out, fresh)
    steps["n"] = 0
    _train(out)  # everything recorded: nothing trains again
    assert steps["n"] == 0
    _assert_same_results(out, fresh)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_train_stopped_by_a_signal_saves_and_repeats_no_step(tmp_path, steps, fresh, sig):
    out = tmp_path / "train"
    steps["signal"] = (31, sig)  # step 7 of the second ensemble
    with pytest.raises(KeyboardInterrupt, match="stopped after step 7"):
        _train(out)
    steps.update(n=0, signal=(None,))
    _train(out)
    assert steps["n"] == 2 * STEPS - 31  # the 31 steps done before the stop, never again
    _assert_same_results(out, fresh)


def test_train_refuses_other_arguments_in_the_same_folder(fresh):
    before = (fresh / "results.json").read_bytes()
    args = json.loads(before)["args"]
    assert args["case_study"] == "boolean_two_step" and args["train"]["steps"] == STEPS
    assert [RunSpec(**s) for s in args["specs"]] == SPECS
    with pytest.raises(CltEvalError, match=r"made with train\.lr=0\.02, this command has 0\.03"):
        _train(fresh, cfg=TrainConfig(**(CFG.__dict__ | {"lr": 0.03})))
    with pytest.raises(CltEvalError, match=r"made with 3 specs, this command has 2"):
        _train(fresh, specs=SPECS[:2])
    with pytest.raises(CltEvalError, match=r"specs\[2\]\.seed=2, this command has 5"):
        _train(fresh, specs=[*SPECS[:2], RunSpec(**(SPECS[2].to_dict() | {"seed": 5}))])
    assert (fresh / "results.json").read_bytes() == before  # nothing rewritten


def test_reproduce_resumes_only_with_the_spec_it_began_with(tmp_path):
    from clt_eval.training.config import ReproduceConfig
    from clt_eval.training.reproduce import reproduce_spec
    from clt_eval.training.sweep import SweepStore

    spec = reproduce_spec(ReproduceConfig(quick=True, seeds=2), "boolean_two_step")
    SweepStore(tmp_path, spec, strict=True).write()
    SweepStore(tmp_path, spec, strict=True)  # the same spec resumes
    other = reproduce_spec(ReproduceConfig(quick=True, seeds=3), "boolean_two_step")
    with pytest.raises(CltEvalError, match=r"matched_l0\.seeds=2, this spec has 3"):
        SweepStore(tmp_path, other, strict=True)
    SweepStore(tmp_path, other)  # a sweep may grow: only case study and training must match


def test_data_parallel_hook_syncs_every_step_and_only_rank_0_writes(tmp_path, steps,
                                                                    monkeypatch):
    from clt_eval.training import distributed

    synced = []
    monkeypatch.setattr(distributed, "sync_grads", lambda tc: synced.append(tc.n_runs))
    monkeypatch.setattr(distributed, "is_main", lambda: False)
    steps["signal"] = (30, signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "rank1")
    assert synced == [2] * STEPS + [1] * 6
    assert not (tmp_path / "rank1").exists()  # no checkpoint, results or transcoders


# ---- real processes, SIGKILL ---------------------------------------------------------------
# Runs `clt-eval` with checkpoints every EVERY steps, printing "step" after each step and
# pausing a little, so that a kill lands mid-ensemble.
CHILD = """
import sys, time, torch
torch.set_num_threads(1)
import clt_eval.training.sweep as S, clt_eval.training.trainer as T
S.CHECKPOINT_EVERY = int(sys.argv[1])
real = T._step
def step(*a, **k):
    out = real(*a, **k)
    print("step", flush=True)
    time.sleep(0.02)
    return out
T._step = step
from clt_eval.training.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _kill_when(args: list[str], ready, rng: random.Random, timeout: float = 300) -> int:
    """Start `clt-eval ARGS`, SIGKILL it a random 0-0.3 s after ``ready()``; steps it did."""
    env = os.environ | {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(EVERY), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    start = time.monotonic()
    while not ready():
        assert proc.poll() is None, "finished before the kill"
        assert time.monotonic() - start < timeout
        time.sleep(0.005)
    time.sleep(rng.uniform(0, 0.3))
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    return out.split().count("step")


def _cli(args: list[str]) -> None:
    from clt_eval.training.cli import main

    assert main(args) == 0


# JumpReLU: the two widths train as two ensembles (ReLU runs would be padded into one).
TRAIN_ARGS = ["train", "--arch", "plt", "clt", "--penalty", "tanh", "--sparsity-coef", "0.3",
              "--activation", "jumprelu",
              "--seed", "0", "1", "--n-features", "4", "6", "--steps", "60", "--batch-size", "8",
              "--lr", "0.02", "--log-every", "0", "--device", "cpu", "--threads", "1",
              "--wandb-mode", "disabled"]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_train_sigkilled_at_a_random_step_resumes_bitwise(tmp_path, steps, seed):
    out = tmp_path / "killed"
    ckpts = out / "checkpoints"
    rng = random.Random(seed)
    # Kill in the first ensemble (seed 0) or after it is recorded (seed 1).
    ready = ((lambda: any(ckpts.glob("*.safetensors"))) if seed == 0 else
             (lambda: (out / "results.json").exists() and any(ckpts.glob("*.safetensors"))))
    done = _kill_when(TRAIN_ARGS + ["--out", str(out)], ready, rng)
    assert list(ckpts.glob("*.safetensors"))
    steps["n"] = 0
    _cli(TRAIN_ARGS + ["--out", str(out)])
    assert 0 <= done + steps["n"] - 2 * 60 <= EVERY
    _cli(TRAIN_ARGS + ["--out", str(tmp_path / "fresh")])
    _assert_same_results(out, tmp_path / "fresh")


REPRODUCE_ARGS = ["reproduce", "--quick", "--steps", "20", "--seeds", "1", "--n-features", "6",
                  "--device", "cpu", "--threads", "1", "--wandb-mode", "disabled"]


def _reproduce_results(out: Path) -> tuple[list, list]:
    res = json.loads((out / "results.json").read_text())
    sweep = json.loads((out / "sweep.json").read_text())
    return res["runs"], sweep["runs"]


@pytest.mark.slow
def test_reproduce_sigkilled_after_recorded_runs_resumes_bitwise(tmp_path, steps):
    out = tmp_path / "killed"

    def ready():  # the grid's first ensemble recorded, the next one checkpointed
        return (out / "sweep.json").exists() and any((out / "checkpoints").glob("*"))

    _kill_when(REPRODUCE_ARGS + ["--out", str(out)], ready, random.Random(2))
    assert json.loads((out / "sweep.json").read_text())["runs"]
    _cli(REPRODUCE_ARGS + ["--out", str(out)])
    _cli(REPRODUCE_ARGS + ["--out", str(tmp_path / "fresh")])
    assert _reproduce_results(out) == _reproduce_results(tmp_path / "fresh")
    for name, tensors in _weights(tmp_path / "fresh").items():
        for key, t in tensors.items():
            saved = safetensors.torch.load_file(out / "transcoders" / name / "weights.safetensors")
            assert torch.equal(saved[key], t), f"{name}/{key}"


@pytest.mark.slow
def test_reproduce_all_resumes_after_a_kill_in_its_second_case_study(tmp_path, steps):
    from clt_eval.case_study import case_study_targets
    from clt_eval.training.reproduce import _folder

    first, second = list(case_study_targets())[:2]
    args = [*REPRODUCE_ARGS, "--all", "--steps", "10"]
    out = tmp_path / "killed"

    def ready():
        return ((out / _folder(first) / "results.json").exists()
                and any((out / _folder(second) / "checkpoints").glob("*")))

    _kill_when(args + ["--out", str(out)], ready, random.Random(3), timeout=900)
    _cli(args + ["--out", str(out)])
    _cli(args + ["--out", str(tmp_path / "fresh")])
    for name in map(_folder, case_study_targets()):
        assert _reproduce_results(out / name) == _reproduce_results(tmp_path / "fresh" / name)
    summary = json.loads((out / "summary.json").read_text())
    assert summary == json.loads((tmp_path / "fresh" / "summary.json").read_text())
