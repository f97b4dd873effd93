"""Data-parallel training: 2 gloo ranks under torchrun train exactly what one process trains
on the same global batches (up to float rounding), and the layout checks are one line."""

import importlib
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
    import itertools
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


    class StopAfter:  # progress hook: the checkpoint saves and stops after `steps` steps

        def __init__(self, checkpoint, steps):
            self.checkpoint, self.steps, self.done = checkpoint, steps, 0

        def update(self, n):
            self.done += n
            if self.done == self.steps:
                self.checkpoint.request_stop()


    # The trainer's weights after 50 steps; with stop_after, None after saving a checkpoint
    # at that step (an interrupted job), which a later call resumes. skip: the number of
    # batches a resumed call must skip, replaced by noise, so that a resume that ignored
    # its checkpoint would end elsewhere.
    def train_trainer(checkpoint_path=None, stop_after=None, skip=0):
        from clt_eval.training.checkpoint import Checkpoint

        tc = Transcoder([CFG], seeds=[3])
        batches = dist_.local_batches(full_batches(*data(), batch_size=64, seed=1))
        for _ in range(skip):
            xb, yb = next(batches)
            noise = (torch.randn_like(xb), torch.randn_like(yb))
            batches = itertools.chain([noise], batches)
        ck = None if checkpoint_path is None else Checkpoint(checkpoint_path, every=0)
        progress = None if stop_after is None else StopAfter(ck, stop_after)
        try:
            train(tc, LOSS, torch.full((1,), 1e-3), batches,
                  TrainConfig(steps=50, lr=3e-3, lr_warmup_steps=5, log_every=0),
                  progress=progress, checkpoint=ck)
        except KeyboardInterrupt:
            return None
        return tc.state_dict()


    def run_resume(out, checkpoint_path, stop_after, skip):
        torch.set_num_threads(1)
        dist_.init_from_env()
        result = train_trainer(checkpoint_path, stop_after, skip)
        if result is not None:
            torch.save({"trainer": result}, f"{out}/rank{dist_.rank()}.pt")
        dist_.shutdown()


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


def _rank_results(folder) -> list[dict]:
    return [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(2)]


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
    # The single process first: its one-off lazy imports (Adam's first step: seconds) are
    # then done before the fork, and the ranks inherit them.
    single = {"loop": worker.train_loop(), "trainer": worker.train_trainer()}
    mp.start_processes(_forked_rank, args=(str(tmp_path), _free_port(), True), nprocs=2,
                       start_method="fork")
    init = worker.Transcoder([worker.CFG], seeds=[3]).state_dict()
    _check(single, *_rank_results(tmp_path), init)


def _forked_resume(r: int, out: str, port: int, checkpoint: str, stop_after, skip) -> None:
    os.environ.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    sys.modules["ddp_worker"].run_resume(out, checkpoint, stop_after, skip)


def test_a_checkpoint_resumes_on_another_number_of_ranks(worker, tmp_path):
    """Stopped after 20 of 50 steps on 2 ranks and finished by 1 process, or the other way
    round: both end where an uninterrupted single process ends (up to the rounding of the
    ranks' gradient average), and the checkpoint records the world size it was saved under."""
    import safetensors

    whole = worker.train_trainer()
    two_then_one = tmp_path / "ck_2_to_1.safetensors"
    mp.start_processes(_forked_resume, args=(str(tmp_path), _free_port(), str(two_then_one), 20,
                                             0), nprocs=2, start_method="fork")
    with safetensors.safe_open(str(two_then_one), "pt") as f:
        assert f.metadata()[dist_.META_WORLD_SIZE] == "2"
        assert f.metadata()["next_step"] == "20"
    resumed_on_one = worker.train_trainer(str(two_then_one), skip=20)

    one_then_two = tmp_path / "ck_1_to_2.safetensors"
    assert worker.train_trainer(str(one_then_two), stop_after=20) is None
    mp.start_processes(_forked_resume, args=(str(tmp_path), _free_port(), str(one_then_two),
                                             None, 20), nprocs=2, start_method="fork")
    rank0, rank1 = (r["trainer"] for r in _rank_results(tmp_path))
    assert _max_diff(rank0, rank1) == 0
    init = worker.Transcoder([worker.CFG], seeds=[3]).state_dict()
    for resumed in (resumed_on_one, rank0):
        assert _max_diff(whole, resumed) <= 1e-5
        assert _max_diff(init, resumed) > 1e-2


@pytest.mark.slow
def test_two_torchrun_ranks_train_what_one_process_trains(worker, tmp_path):
    """The real launcher: ``torchrun --standalone --nproc-per-node 2`` (a minute on 2 cores,
    most of it three interpreters importing torch)."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
              "2", worker.__file__, str(tmp_path), "1"]
    res = subprocess.run(launch, capture_output=True, text=True, timeout=300,
                         env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    single = {"loop": worker.train_loop(), "trainer": worker.train_trainer()}
    init = worker.Transcoder([worker.CFG], seeds=[3]).state_dict()
    _check(single, *_rank_results(tmp_path), init)


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


# ---- `clt-eval train` as a data-parallel job ---------------------------------------------------
# A tiny grid point of the default case study: 50 steps on global batches of 8 rows.
TRAIN_ARGS = {"steps": 50, "batch_size": 8, "n_features": 8, "wandb_mode": "disabled",
              "device": "cpu", "threads": 1}


def _api_rank(r: int, folder: str, ports: tuple[int, int, int]) -> None:
    """Rank ``r`` of 2 calling ``clt_eval.api.train``: with a global batch 2 ranks cannot
    split and with a file as the output folder (one-line errors on both, nobody left waiting),
    then the real job; notes what it saw in ``folder``."""
    import json

    from clt_eval import api

    os.environ.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    seen = {}
    os.environ["MASTER_PORT"] = str(ports[0])
    try:
        api.train(out=f"{folder}/odd", **TRAIN_ARGS | {"batch_size": 7})
    except CltEvalError as exc:
        seen["error"] = str(exc)
    os.environ["MASTER_PORT"] = str(ports[1])
    try:  # only rank 0 inspects the folder: the others get its error
        api.train(out=f"{folder}/a-file", **TRAIN_ARGS)
    except CltEvalError as exc:
        seen["folder_error"] = str(exc)
    os.environ["MASTER_PORT"] = str(ports[2])
    res = api.train(out=f"{folder}/ddp", **TRAIN_ARGS)
    seen |= {"results": str(res["results"]), "runs": res["runs"],
             "initialised_after": dist_.initialized()}
    with open(f"{folder}/rank{r}.json", "w") as f:
        json.dump(seen, f)


def _transcoder_diff(a, b) -> float:
    from clt_eval.io import load_transcoder

    (da,), (db,) = list(a.glob("transcoders/*")), list(b.glob("transcoders/*"))
    return _max_diff(load_transcoder(da).state_dict(), load_transcoder(db).state_dict())


def test_api_train_on_two_forked_ranks_equals_one_process(tmp_path):
    """``clt_eval.api.train`` under 2 gloo ranks (what `torchrun ... clt-eval train` runs):
    the weights of one process on the same global batches, one results.json, no lock left,
    and a batch the ranks cannot split refused on every rank before anything is written."""
    import json

    from clt_eval import api

    single = api.train(out=tmp_path / "single", **TRAIN_ARGS)  # imports done before the fork
    (tmp_path / "a-file").write_text("in the way")
    ports = (_free_port(), _free_port(), _free_port())
    mp.start_processes(_api_rank, args=(str(tmp_path), ports), nprocs=2, start_method="fork")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for seen in ranks:
        assert seen["error"] == ("batch_size=7: not divisible by the world size 2 (ranks); "
                                 "expected a multiple of 2")
        assert "a-file" in seen["folder_error"]
        assert seen["folder_error"] == ranks[0]["folder_error"]
        assert not seen["initialised_after"]  # the process group is torn down at the end
        assert seen["runs"] == ranks[0]["runs"]  # every rank returns rank 0's records
    assert not (tmp_path / "odd").exists()
    assert (tmp_path / "a-file").read_text() == "in the way"
    ddp = tmp_path / "ddp"
    assert _transcoder_diff(ddp, tmp_path / "single") <= 1e-5
    got, want = ranks[0]["runs"][0]["metrics"], single["runs"][0]["metrics"]
    assert got["final_loss"] == pytest.approx(want["final_loss"], rel=1e-5)  # global, not rank 0's
    assert got["nmse"] == pytest.approx(want["nmse"], rel=1e-4)
    assert sorted(p.name for p in ddp.iterdir()) == [".clt-eval-job.json", "results.json",
                                                     "transcoders"]  # no lock, no wandb files


@pytest.mark.slow
def test_torchrun_clt_eval_train_equals_one_process(tmp_path):
    """The promise of docs/scale.md, through the real launcher and the installed command:
    ``torchrun --standalone --nproc-per-node 2 --no-python clt-eval train`` (a minute on 2
    cores, most of it three interpreters importing torch)."""
    from pathlib import Path

    bin_ = Path(sys.executable).parent
    cli = [str(bin_ / "clt-eval"), "train", "--steps", "50", "--batch-size", "8",
           "--n-features", "8", "--wandb-mode", "disabled", "--device", "cpu"]
    torchrun = [str(bin_ / "torchrun"), "--standalone", "--nproc-per-node", "2", "--no-python"]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}

    def launch(cmd):
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env,
                              cwd=tmp_path)

    ddp = launch(torchrun + cli + ["--out", "OUT1"])
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = launch(cli + ["--out", "OUT2"])
    assert single.returncode == 0, single.stderr[-3000:]
    assert _transcoder_diff(tmp_path / "OUT1", tmp_path / "OUT2") <= 1e-5
    assert sorted(p.name for p in (tmp_path / "OUT1").iterdir()) == [
        ".clt-eval-job.json", "results.json", "transcoders"]  # written once, lock gone
    # A global batch 2 ranks cannot split: every rank says so in one line and exits 2 before
    # writing anything (torchrun itself then reports the failed ranks and exits 1).
    odd_cli = cli[:cli.index("--batch-size") + 1] + ["7"] + cli[cli.index("--batch-size") + 2:]
    odd = launch(torchrun + odd_cli + ["--out", "OUT3"])
    assert odd.returncode != 0
    assert odd.stdout.count("clt-eval: error: batch_size=7: not divisible by the world "
                            "size 2") + odd.stderr.count("clt-eval: error: batch_size=7") == 2
    assert "exitcode  : 2" in odd.stderr
    assert not (tmp_path / "OUT3").exists()


# A tiny random language model on a short corpus: 192 training tokens, global batches of 32.
LM_TEXT = "the quick brown fox jumps over the lazy dog while the cat sleeps. " * 40
LM_ARGS = {"model": "tiny", "layers": [1, 2], "n_tokens": 6 * 32, "eval_tokens": 2 * 32,
           "n_ctx": 32, "steps": 20, "batch_size": 32, "n_features": 16,
           "sparsity_coef": 1e-4, "wandb_mode": "disabled", "device": "cpu", "threads": 1}


def _api_lm_rank(r: int, folder: str, port: int) -> None:
    """Rank ``r`` of 2 training on the tiny model, each with a fresh activation cache to
    build: rank 0 fills it, rank 1 reads it."""
    import json

    from clt_eval import api

    os.environ.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    res = api.train(out=f"{folder}/ddp", corpus=f"{folder}/c.txt",
                    cache_dir=f"{folder}/ddp-cache", **LM_ARGS)
    with open(f"{folder}/rank{r}.json", "w") as f:
        json.dump(res["runs"], f)


def test_api_train_on_a_language_model_on_two_forked_ranks(tmp_path):
    import json

    from clt_eval import api

    (tmp_path / "c.txt").write_text(LM_TEXT)
    single = api.train(out=tmp_path / "single", corpus=str(tmp_path / "c.txt"),
                       cache_dir=str(tmp_path / "cache"), **LM_ARGS)
    mp.start_processes(_api_lm_rank, args=(str(tmp_path), _free_port()), nprocs=2,
                       start_method="fork")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]
    assert _transcoder_diff(tmp_path / "ddp", tmp_path / "single") <= 1e-5
    got, want = ranks[0][0]["metrics"], single["runs"][0]["metrics"]
    for key in ("final_loss", "final_train_mse", "nmse", "l0_total"):
        assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
    assert not list((tmp_path / "ddp").glob("*.lock*"))
