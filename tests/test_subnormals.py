"""Training on the CPU flushes subnormal floats to zero, in every thread that computes, and
nowhere else (clt_eval.device.flushed_subnormals)."""

import pytest
import torch

from clt_eval.device import flushed_subnormals, subnormals_flushed
from clt_eval.topk import topk_rows

TINY = 1e-20  # TINY * TINY = 1e-40: a float32 subnormal


def unflushed(n: int = 1 << 20) -> int:
    """How many of n products that round to a subnormal stay nonzero (an op that large is
    split over every torch thread)."""
    x = torch.full((n,), TINY)
    return int(((x * TINY) != 0).sum())


@pytest.fixture
def two_threads():
    if "OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("torch's worker threads are not OpenMP's here")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_every_torch_thread_flushes_inside_and_none_after(two_threads):
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush subnormals")
    assert unflushed() == 1 << 20
    with flushed_subnormals() as on:
        assert on and subnormals_flushed()
        assert unflushed() == 0  # not half: the worker thread flushes too
        with flushed_subnormals(False) as inner:
            assert not inner and unflushed() == 1 << 20
        assert unflushed() == 0
    assert not subnormals_flushed()
    assert unflushed() == 1 << 20


def test_topk_threads_follow_the_caller(two_threads):
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush subnormals")
    z = torch.full((512, 1024), 3e-38)
    bias = torch.full((1, 1024), -2.9e-38)  # z + bias = 1e-39, a subnormal
    # the pool's threads exist before and go on after: each call sets them as its caller is
    assert (topk_rows(z.clone(), 8, bias=bias)[0] > 0).all()  # rows split over two threads
    with flushed_subnormals():
        vals, _ = topk_rows(z.clone(), 8, bias=bias)
    assert torch.equal(vals, torch.zeros_like(vals))
    assert (topk_rows(z.clone(), 8, bias=bias)[0] > 0).all()


def test_training_flushes_and_gives_the_setting_back(two_threads):
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush subnormals")
    from clt_eval.training.config import RunSpec, TrainConfig
    from clt_eval.training.trainer import train
    from clt_eval.transcoder import Transcoder

    seen = []

    class Watch:  # the trainer's progress hook, called after every step
        def update(self, n: int) -> None:
            seen.append(unflushed(1 << 16))

    spec = RunSpec(arch="plt", penalty="l1", n_features=8)
    tc = Transcoder([spec.transcoder_config(10, 2)], seeds=[0])
    x = torch.randn(16, 2, 10)
    train(tc, spec.loss_config(), torch.ones(1), iter(lambda: (x, x), None),
          TrainConfig(steps=3, log_every=0, device="cpu"), progress=Watch())
    assert seen == [0, 0, 0]
    assert unflushed() == 1 << 20
