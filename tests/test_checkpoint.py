"""Restoring a checkpoint that does not fit the ensemble fails with one line naming the file."""

from __future__ import annotations

import pytest
import safetensors
import safetensors.torch
import torch

from clt_eval.config import TranscoderConfig
from clt_eval.errors import CltEvalError
from clt_eval.training.checkpoint import Checkpoint
from clt_eval.transcoder import Transcoder


def _setup(**kw) -> tuple[Transcoder, torch.optim.Optimizer]:
    tc = Transcoder([TranscoderConfig(d_model=4, n_layers=3, n_features=6, arch="clt", **kw)])
    opt = torch.optim.Adam(tc.parameters(), lr=1e-3)
    tc(torch.randn(5, 3, 4)).recon_RBLD.square().sum().backward()
    opt.step()  # Adam's moments exist, as in a real checkpoint
    return tc, opt


def test_checkpoint_round_trip_restores_state(tmp_path):
    tc, opt = _setup()
    ckpt = Checkpoint(tmp_path / "c.safetensors", every=1)
    ckpt.save(7, tc, opt, torch.zeros(1, 3, 6))
    tc2, opt2 = _setup()
    step, _ = ckpt.restore(tc2, opt2)
    assert step == 7
    for name, t in tc.state_dict().items():
        assert torch.equal(t, tc2.state_dict()[name]), name


def test_checkpoint_with_the_old_dense_decoder_is_refused(tmp_path):
    tc, opt = _setup()
    path = tmp_path / "old.safetensors"
    Checkpoint(path, every=1).save(3, tc, opt, torch.zeros(1, 3, 6))
    with safetensors.safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    for s in range(3):  # the layout before per-source storage: one dense decoder
        del tensors[f"model.W_dec_{s}"]
    tensors["model.W_dec"] = tc.dense_W_dec().detach().clone()
    safetensors.torch.save_file(tensors, str(path), metadata=meta)
    before = {k: v.clone() for k, v in tc.state_dict().items()}
    with pytest.raises(CltEvalError, match=r"old\.safetensors: checkpoint written before "
                       r"decoders were stored per source layer.*Delete it") as err:
        Checkpoint(path, every=1).restore(tc, opt)
    assert "\n" not in str(err.value)
    assert all(torch.equal(v, tc.state_dict()[k]) for k, v in before.items())  # untouched


def test_checkpoint_of_another_shape_is_refused(tmp_path):
    tc, opt = _setup()
    path = tmp_path / "c.safetensors"
    Checkpoint(path, every=1).save(3, tc, opt, torch.zeros(1, 3, 6))
    other, other_opt = _setup(skip=True)  # one parameter more
    with pytest.raises(CltEvalError, match=r"c\.safetensors: checkpoint does not fit this "
                       r"ensemble .*delete it") as err:
        Checkpoint(path, every=1).restore(other, other_opt)
    assert "\n" not in str(err.value)
