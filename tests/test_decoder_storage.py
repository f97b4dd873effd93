"""Per-source decoder storage against the dense L×L reference it replaced.

Decoders are stored per source layer as W_dec_{s} [R, F, T_s, D]. Everything the transcoder
computes from them must match the dense masked form [R, S, T, F, D] (``dense_W_dec``) run
through plain einsums: outputs, contributions, block norms, losses and gradients.
"""

from __future__ import annotations

import pytest
import torch

from clt_eval.config import LossConfig, TranscoderConfig
from clt_eval.losses import training_loss
from clt_eval.transcoder import Transcoder, structure_mask

B, L, D, F = 6, 4, 5, 7

ARCH_SETS = {"plt": ["plt", "plt"], "clt": ["clt", "clt"], "mixed": ["clt", "plt", "clt"]}


def _random(archs, **kw) -> Transcoder:
    cfgs = [TranscoderConfig(d_model=D, n_layers=L, n_features=F, arch=a, **kw) for a in archs]
    tc = Transcoder(cfgs)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in tc.parameters():  # every stored slot, the masked ones of a PLT run too
            p.copy_(torch.randn(p.shape, generator=g))
    return tc


def _dense_reference(tc: Transcoder, W_RSTFD: torch.Tensor, x_BLD: torch.Tensor):
    """(acts, recon, contributions, block norms) from a dense decoder, by einsum."""
    acts = tc.activate(tc.encode(x_BLD))
    contrib = torch.einsum("rbsf,rstfd->rbstd", acts, W_RSTFD)
    recon = contrib.sum(2) + tc.b_dec[:, None]
    return acts, recon, contrib, W_RSTFD.norm(dim=-1)


@pytest.mark.parametrize("archs", ARCH_SETS.values(), ids=ARCH_SETS.keys())
def test_stored_size_is_only_the_blocks_that_exist(archs):
    tc = _random(archs)
    R = len(archs)
    cross = any(a == "clt" for a in archs)
    per_run = sum(L - s for s in range(L)) if cross else L
    assert sum(W.numel() for W in tc.decoder_params()) == R * per_run * F * D
    assert not any(name == "W_dec" for name, _ in tc.named_parameters())
    # The dense form is the structural mask applied to the stored blocks.
    dense = tc.dense_W_dec()
    for r, a in enumerate(archs):
        absent = ~structure_mask(a, L)
        assert (dense[r][absent] == 0).all()
        assert (dense[r][~absent].abs() > 0).all()


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("archs", ARCH_SETS.values(), ids=ARCH_SETS.keys())
def test_per_source_matches_dense_reference(archs, exact, monkeypatch):
    monkeypatch.setattr(Transcoder, "exact", exact)
    tc = _random(archs)
    x = torch.randn(B, L, D, generator=torch.Generator().manual_seed(1))
    out = tc(x)
    acts, recon, contrib, norms = _dense_reference(tc, tc.dense_W_dec(), x)
    torch.testing.assert_close(out.acts_RBLF, acts, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.recon_RBLD, recon, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(tc.contributions(acts), contrib, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(tc.decoder_block_norms(), norms, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("norm", ["concatenated", "summed", "per_block"])
@pytest.mark.parametrize("archs", ARCH_SETS.values(), ids=ARCH_SETS.keys())
def test_losses_and_gradients_match_dense_reference(archs, norm):
    """The training loss through per-source storage equals the loss through a dense leaf
    decoder; the gradients of every stored slot equal the dense gradient of that block (zero
    for the masked slots of a PLT run)."""
    tc = _random(archs)
    R = len(archs)
    x = torch.randn(B, L, D, generator=torch.Generator().manual_seed(2))
    y = torch.randn(B, L, D, generator=torch.Generator().manual_seed(3))
    loss_cfg = LossConfig(penalty="l1", decoder_norm=norm, cross_layer_coef=0.3)
    coef = torch.full((R,), 0.1)
    got = training_loss(tc, tc(x), y, loss_cfg, coef).total_R
    got.sum().backward()

    ref = _random(archs)  # the same numbers, decoded from a dense leaf tensor
    W_dense = ref.dense_W_dec().detach().requires_grad_()
    ref.dense_W_dec = lambda: W_dense
    ref.decoder_block_norms = lambda: W_dense.norm(dim=-1)
    ref.write = lambda acts, support=None: torch.einsum("rbsf,rstfd->rbtd", acts, W_dense)
    want = training_loss(ref, ref(x), y, loss_cfg, coef).total_R
    want.sum().backward()

    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(tc.W_enc.grad, ref.W_enc.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tc.b_dec.grad, ref.b_dec.grad, atol=1e-5, rtol=1e-5)
    mask = torch.stack([structure_mask(a, L) for a in archs])
    for s, W in enumerate(tc.decoder_params()):
        for t in tc.targets(s):
            want_g = W_dense.grad[:, s, t] * mask[:, s, t, None, None]
            torch.testing.assert_close(W.grad[:, :, t - s], want_g, atol=1e-5, rtol=1e-5)


def test_block_access_and_writes():
    tc = _random(["clt", "plt"])
    W = torch.randn(F, D)
    tc.set_decoder_block(1, 3, W, runs=0)
    assert torch.equal(tc.decoder_block(1, 3)[0], W)
    assert torch.equal(tc.dense_W_dec()[0, 1, 3], W)
    # A PLT run's cross-layer block reads as zero whatever its slot holds.
    tc.set_decoder_block(1, 3, W, runs=1)
    assert (tc.decoder_block(1, 3)[1] == 0).all()
    assert torch.equal(tc.decoder_block(1, 3, masked=False)[1], W)
    assert (tc.decoder_block(3, 1) == 0).all()  # t < s: never a block
    assert list(tc.decoder_from(1).shape) == [2, F, L - 1, D]


def test_old_dense_state_dict_loads():
    """State dicts (checkpoints) written with the dense W_dec [R, S, T, F, D] still load."""
    tc = _random(["clt", "plt"])
    old = {k: v for k, v in tc.state_dict().items() if not k.startswith("W_dec_")}
    old["W_dec"] = tc.dense_W_dec().detach().clone()
    back = Transcoder(tc.cfgs)
    back.load_state_dict(old)
    assert torch.equal(back.dense_W_dec(), tc.dense_W_dec())
    plt = Transcoder(tc.cfgs[1:])  # a PLT keeps only the diagonal of a dense decoder
    plt.load_state_dict({k: v[1:] for k, v in old.items()})
    assert [W.shape[2] for W in plt.decoder_params()] == [1] * L
    assert torch.equal(plt.dense_W_dec()[0], tc.dense_W_dec()[1])


def test_init_of_a_run_does_not_depend_on_the_ensemble_layout():
    """A PLT run's weights are the same whether its ensemble stores L-s slots or one."""
    cfg = lambda a: TranscoderConfig(d_model=D, n_layers=L, n_features=F, arch=a)  # noqa: E731
    mixed = Transcoder([cfg("clt"), cfg("plt")], seeds=[0, 5])
    alone = Transcoder([cfg("plt")], seeds=[5])
    for name, t in mixed.select([1]).state_dict().items():
        assert torch.equal(t, alone.state_dict()[name]), name
    assert all((W[1, :, 1:] == 0).all() for W in mixed.decoder_params())
