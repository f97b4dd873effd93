"""Data-parallel training: 2 gloo ranks under torchrun train exactly what one process trains
on the same global batches (up to float rounding), and the layout checks are one line."""

import importlib
import inspect
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.multiprocessing as mp

from clt_eval.errors import CltEvalError
from clt_eval.training import distributed as dist_

# One worker for every launch: as rank r of 2 (forked from pytest, or under torchrun), or as
# the single process. It trains a tiny CLT for 50 steps on global batches of 64 from a fixed
# data set, each rank on its rows, through a minimal loop and through the real trainer.
WORKER = textwrap.dedent("""
    import sys
    import torch
    from clt_eval.config import LossConfig, TranscoderConfig
    from clt_eval.losses import training_loss
    from clt_eval.training import distributed as dist_
    from clt_eval.training.config import TrainConfig
    from clt_eval.training.trainer import full_batches, train
    from clt_eval.transcoder import Transcoder

    CFG = TranscoderConfig(d_model=8, n_layers=2, n_features=16, arch="clt")
    LOSS = LossConfig(penalty="l1", sparsity_coef=1e-3)


    def data():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(256, 2, 8, generator=g)
        return x, torch.tanh(x @ torch.randn(8, 8, generator=g)) + 0.1 * x.roll(1, 1)


    def train_loop():
        tc = Transcoder([CFG], seeds=[3])
        batches = dist_.local_batches(full_batches(*data(), batch_size=64, seed=1))
        opt = torch.optim.Adam(tc.parameters(), lr=3e-3)
        for _ in range(50):
            xb, yb = next(batches)
            parts = training_loss(tc, tc(xb), yb, LOSS, torch.full((1,), 1e-3))
            opt.zero_grad(set_to_none=True)
            parts.total_R.sum().backward()
            dist_.sync_grads(tc)
            opt.step()
        return tc.state_dict()


    def train_trainer():
        tc = Transcoder([CFG], seeds=[3])
        batches = dist_.local_batches(full_batches(*data(), batch_size=64, seed=1))
        train(tc, LOSS, torch.full((1,), 1e-3), batches,
              TrainConfig(steps=50, lr=3e-3, lr_warmup_steps=5, log_every=0))
        return tc.state_dict()


    def run(out, trainer):
        torch.set_num_threads(1)
        dist_.init_from_env()
        result = {"loop": train_loop()}
        if trainer:
            result["trainer"] = train_trainer()
        torch.save(result, f"{out}/rank{dist_.rank()}.pt")
        dist_.shutdown()


    if __name__ == "__main__":
        run(sys.argv[1], sys.argv[2] == "1")
""")


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    folder = tmp_path_factory.mktemp("worker")
    (folder / "ddp_worker.py").write_text(WORKER)
    sys.path.insert(0, str(folder))
    try:
        yield importlib.import_module("ddp_worker")
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("ddp_worker", None)


def _trainer_hooked() -> bool:
    from clt_eval.training import trainer

    return "sync_grads" in inspect.getsource(trainer)


def _forked_rank(r: int, out: str, port: int, trainer: bool) -> None:
    os.environ.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    sys.modules["ddp_worker"].run(out, trainer)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _check(single: dict, rank0: dict, rank1: dict, init: dict) -> None:
    for mode in single:
        assert _max_diff(rank0[mode], rank1[mode]) == 0  # the replicas never drift apart
        assert _max_diff(single[mode], rank0[mode]) <= 1e-5
        assert _max_diff(init, single[mode]) > 1e-2  # not vacuous: training moved the weights


def test_two_forked_ranks_train_what_one_process_trains(worker, tmp_path):
    """Two gloo ranks forked from this process (no interpreter start-up: seconds)."""
    hooked = _trainer_hooked()
    # The single process first: its one-off lazy imports (Adam's first step: seconds) are
    # then done before the fork, and the ranks inherit them.
    single = {"loop": worker.train_loop()} | ({"trainer": worker.train_trainer()} if hooked
                                              else {})
    mp.start_processes(_forked_rank, args=(str(tmp_path), _free_port(), hooked), nprocs=2,
                       start_method="fork")
    init = worker.Transcoder([worker.CFG], seeds=[3]).state_dict()
    _check(single, *(torch.load(tmp_path / f"rank{r}.pt") for r in range(2)), init)
    if not hooked:
        pytest.skip("checked the minimal loop only: the trainer does not call sync_grads yet")


@pytest.mark.slow
def test_two_torchrun_ranks_train_what_one_process_trains(worker, tmp_path):
    """The real launcher: ``torchrun --standalone --nproc-per-node 2`` (a minute on 2 cores,
    most of it three interpreters importing torch)."""
    hooked = _trainer_hooked()
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
              "2", worker.__file__, str(tmp_path), str(int(hooked))]
    res = subprocess.run(launch, capture_output=True, text=True, timeout=300,
                         env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    single = {"loop": worker.train_loop()} | ({"trainer": worker.train_trainer()} if hooked
                                              else {})
    init = worker.Transcoder([worker.CFG], seeds=[3]).state_dict()
    _check(single, *(torch.load(tmp_path / f"rank{r}.pt") for r in range(2)), init)


# ---- single-process behaviour and checks -------------------------------------------------------
def test_single_process_is_rank_0_of_1_and_sync_is_a_no_op():
    assert (dist_.rank(), dist_.world_size(), dist_.is_main()) == (0, 1, True)
    assert not dist_.init_from_env() or dist_.launched()
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    dist_.sync_grads([p])
    assert p.grad.tolist() == [2.0, 2.0, 2.0]


def test_shards_are_disjoint_and_cover_the_global_batch():
    rows = [list(range(12))[dist_.shard(12, r, 3)] for r in range(3)]
    assert rows == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    x = torch.arange(24.0).view(2, 12, 1, 1)  # per-run batches split on the sample axis
    (part,) = next(dist_.local_batches([(x,)], 1, 3))
    assert part[:, :, 0, 0].tolist() == [[4, 5, 6, 7], [16, 17, 18, 19]]


def test_world_size_that_does_not_divide_the_batch_is_one_line():
    with pytest.raises(CltEvalError, match=r"batch_size=10: not divisible by the world size 4"):
        dist_.shard(10, 0, 4)


def test_checkpoint_from_another_config_or_batch_is_one_line():
    cfg = {"lr": 1e-3, "steps": 10}
    meta = dist_.checkpoint_metadata(64, cfg)
    assert meta[dist_.META_WORLD_SIZE] == "1"
    dist_.check_checkpoint_metadata(meta, "ck.safetensors", 64, cfg)  # same run: fine
    dist_.check_checkpoint_metadata(meta | {dist_.META_WORLD_SIZE: "4"}, "ck", 64, cfg)
    with pytest.raises(CltEvalError, match=r"ck\.safetensors: checkpoint field "
                       r"dist\.config_sha1 does not match"):
        dist_.check_checkpoint_metadata(meta, "ck.safetensors", 64, cfg | {"lr": 2e-3})
    with pytest.raises(CltEvalError, match=r"ck: checkpoint field dist\.world_size=4, this "
                       r"run has 1 ranks"):
        dist_.check_checkpoint_metadata(meta | {dist_.META_WORLD_SIZE: "4"}, "ck", 64, cfg,
                                        same_world=True)
    with pytest.raises(CltEvalError, match=r"dist\.global_batch=64, this run asks for a "
                       r"global batch of 32"):
        dist_.check_checkpoint_metadata(meta, "ck", 32, cfg)


def test_malformed_launcher_environment_is_one_line(monkeypatch):
    monkeypatch.setenv("RANK", "first")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(CltEvalError, match=r"environment RANK='first': expected an integer"):
        dist_.init_from_env()
    assert not dist_.initialized()
