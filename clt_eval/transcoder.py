"""One transcoder interface for per-layer (PLT) and cross-layer (CLT) transcoders.

A ``Transcoder`` holds an *ensemble* of R runs that share shapes and activation; a single
transcoder is an ensemble of one. PLT and CLT differ only in which decoder blocks s→ℓ exist:
the structural mask ``decoder_mask_RST`` is the identity for a PLT and upper-triangular
(ℓ ≥ s) for a CLT (docs/concepts.md §2). Nothing else in the library needs to know which is which.

Shapes: R runs, B samples, L layers (S source, T target), F features per layer, D d_model.

Runs are independent to the last bit: every product runs through ``run_matmul``, whose
arithmetic for one run does not depend on how many runs share the tensors or where the run
sits among them (BLAS's batched kernels do depend on it: measured, not assumed, see
``run_matmul``). ``Transcoder.exact = False`` takes the faster batched kernels instead.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from clt_eval import activations as act
from clt_eval.config import TranscoderConfig
from clt_eval.errors import require

# ---- run-independent arithmetic -------------------------------------------------------
# Products above this many multiply-adds per matrix run as one BLAS call per run and matrix;
# smaller ones as one elementwise product and sum over the whole ensemble, where Python's
# per-call overhead (~10 µs) would cost more than the product itself.
LOOP_MIN_MACS = 1 << 16
# Elements of the temporary product tensor formed at once (runs are taken in slices).
PRODUCT_BUDGET = 1 << 24


def row_sum(t_MX: torch.Tensor) -> torch.Tensor:
    """Sum over everything but the first axis, [M], in an order independent of M.

    PyTorch sums a tensor down to a single number with one partial sum per thread, but sums
    several rows one row per thread; so a lone run's sum (M = 1) would round differently from
    the same run's row in an ensemble (measured: from 32768 elements, PyTorch's grain size,
    on 2 threads). Viewing a long lone row as two rows (a stride-0 view, nothing copied)
    takes the multi-row path; a short one is summed serially either way."""
    M = t_MX.shape[0]
    flat = t_MX.reshape(M, -1)
    return flat.expand(2, -1).sum(-1)[:1] if M == 1 and flat.shape[1] >= 4096 else flat.sum(-1)


def _matmul_exact(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [Ra,*G,M,K] @ b [Rb,*G,K,N] -> [R,*G,M,N] (batch axes of size 1 broadcast), every
    run's numbers computed exactly as they would be for that run alone.

    Two ways, chosen by the size of one matrix product, never by R. Large: one ``torch.mm``
    per run and matrix, the same call a run alone makes. Small: the products a_mk·b_kn as one
    elementwise tensor with k last, summed over k; an elementwise op rounds each element the
    same wherever it lies, and a row sum treats every row alike. What does not work: a
    batched matmul (bmm/einsum) gives an element different roundings depending on the batch
    count or on how many runs share a matrix (measured with MKL: e.g. [13,8]@[8,5] blocks)."""
    M, K, N = a.shape[-2], a.shape[-1], b.shape[-1]
    batch = tuple(max(m, n) for m, n in zip(a.shape[:-2], b.shape[:-2], strict=True))
    out = a.new_empty(*batch, M, N) if M * K * N >= LOOP_MIN_MACS else None
    if out is not None:  # one BLAS call per run and matrix
        for idx in itertools.product(*map(range, batch)):
            ia = tuple(i if n > 1 else 0 for i, n in zip(idx, a.shape[:-2], strict=True))
            ib = tuple(i if n > 1 else 0 for i, n in zip(idx, b.shape[:-2], strict=True))
            torch.mm(a[ia], b[ib], out=out[idx])
        return out
    bT = b.transpose(-1, -2)
    R, per_run = batch[0], math.prod(batch[1:]) * M * N * K
    step = max(1, PRODUCT_BUDGET // max(per_run, 1))
    for r0 in range(0, R, step):
        r1 = min(R, r0 + step)
        a_r = a if a.shape[0] == 1 else a[r0:r1]
        b_r = bT if bT.shape[0] == 1 else bT[r0:r1]
        # Written into a fresh contiguous tensor, so k is the last, unit-stride axis of the
        # sum whatever strides the inputs have.
        prod = a.new_empty(r1 - r0, *batch[1:], M, N, K)
        torch.mul(a_r.unsqueeze(-2), b_r.unsqueeze(-3), out=prod)
        part = row_sum(prod.view(-1, K)).view(prod.shape[:-1])
        if r1 - r0 == R:
            return part
        out = a.new_empty(*batch, M, N) if out is None else out
        out[r0:r1] = part
    return out


class _RunMatmul(torch.autograd.Function):
    """``_matmul_exact`` with gradients computed the same way (each run's own numbers only)."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return _matmul_exact(a, b)

    @staticmethod
    @once_differentiable  # the backward's own products are not differentiated again
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        ga = gb = None
        if ctx.needs_input_grad[0]:
            ga = _matmul_exact(g, b.transpose(-1, -2)).sum_to_size(a.shape)
        if ctx.needs_input_grad[1]:
            gb = _matmul_exact(a.transpose(-1, -2), g).sum_to_size(b.shape)
        return ga, gb


def run_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [Ra,*G,M,K] @ b [Rb,*G,K,N] -> [R,*G,M,N], R = max(Ra, Rb): each run's result and
    gradients are what they would be with that run alone."""
    return _RunMatmul.apply(a, b)


@dataclass
class TranscoderOutput:
    pre_RBLF: torch.Tensor  # encoder pre-activations z
    acts_RBLF: torch.Tensor  # feature activations a = σ(z)
    recon_RBLD: torch.Tensor  # ŷ, the reconstructed MLP outputs


def structure_mask(arch: str, n_layers: int) -> torch.Tensor:
    """[S, T] bool: which decoder blocks s→t exist for ``arch``."""
    eye = torch.eye(n_layers, dtype=torch.bool)
    return eye if arch == "plt" else torch.ones(n_layers, n_layers).triu().bool()


def shared_fields(cfg: TranscoderConfig) -> dict:
    """Fields every run of an ensemble must agree on (arch and k may vary per run)."""
    d = dataclasses.asdict(cfg)
    d.pop("arch")
    d.pop("k")
    return d


class Transcoder(nn.Module):
    # Run-independent products (``run_matmul``); False: BLAS's batched kernels, faster for
    # large ensembles of small transcoders, but a run's numbers then depend on its ensemble.
    exact: bool = True

    def __init__(self, cfgs: list[TranscoderConfig], seeds: list[int] | None = None):
        super().__init__()
        require(len(cfgs) > 0, "Transcoder: expected at least one run config")
        base = shared_fields(cfgs[0])
        for i, c in enumerate(cfgs):
            require(shared_fields(c) == base,
                    f"run {i}: configs in one ensemble may differ only in arch and k")
        self.cfgs = list(cfgs)
        cfg = cfgs[0]
        R, L, F, D = len(cfgs), cfg.n_layers, cfg.n_features, cfg.d_model
        self.W_enc = nn.Parameter(torch.zeros(R, L, D, F))
        self.b_enc = nn.Parameter(torch.zeros(R, L, F))
        self.W_dec = nn.Parameter(torch.zeros(R, L, L, F, D))
        self.b_dec = nn.Parameter(torch.zeros(R, L, D))
        self.W_skip = nn.Parameter(torch.zeros(R, L, D, D)) if cfg.skip else None
        self.log_threshold = (
            nn.Parameter(torch.full((R, L, F), math.log(cfg.jumprelu_threshold_init)))
            if cfg.activation == "jumprelu" else None
        )
        # BatchTopK's inference threshold: a running estimate, not trained by gradient.
        self.register_buffer("batchtopk_threshold", torch.zeros(R, L))
        masks = torch.stack([structure_mask(c.arch, L) for c in cfgs])
        self.register_buffer("decoder_mask_RST", masks)
        ks = [c.k or 0 for c in cfgs]
        self.register_buffer("k_R", torch.tensor(ks, dtype=torch.long))
        self.reset_parameters(seeds or list(range(R)))

    # ---- construction ---------------------------------------------------------------
    @property
    def cfg(self) -> TranscoderConfig:
        return self.cfgs[0]

    @property
    def n_runs(self) -> int:
        return len(self.cfgs)

    @torch.no_grad()
    def reset_parameters(self, seeds: list[int]) -> None:
        """Initialise each run from its own seed, so a run does not depend on its neighbours."""
        cfg = self.cfg
        L, F, D = cfg.n_layers, cfg.n_features, cfg.d_model
        for r, seed in enumerate(seeds):
            g = torch.Generator().manual_seed(int(seed))
            w = (torch.rand(L, D, F, generator=g) * 2 - 1) / D**0.5
            self.W_enc[r] = w
            # Own-layer decoders start along the encoder's directions, every block at norm 0.1:
            # small, so early steps are driven by the data, and the same for cross-layer
            # blocks, so the initialisation favours neither skipping nor not skipping.
            dec = torch.rand(L, L, F, D, generator=g) * 2 - 1
            dec = dec / dec.norm(dim=-1, keepdim=True) * 0.1
            diag = torch.arange(L)
            dec[diag, diag] = w.transpose(1, 2) / w.transpose(1, 2).norm(dim=-1, keepdim=True) * 0.1
            self.W_dec[r] = dec * self.decoder_mask_RST[r, :, :, None, None]
        self.b_enc.zero_()
        self.b_dec.zero_()

    # ---- forward ----------------------------------------------------------------------
    def masked_W_dec(self) -> torch.Tensor:
        return self.W_dec * self.decoder_mask_RST[:, :, :, None, None]

    def threshold(self) -> torch.Tensor | None:
        return None if self.log_threshold is None else self.log_threshold.exp()

    def _per_layer(self, x_BLD: torch.Tensor, W_RLDE: torch.Tensor) -> torch.Tensor:
        """[R,B,L,E]: x_l W^l for each run and layer; x shared ([B,L,D]) or per run."""
        if not self.exact:
            eq = "bld,rlde->rble" if x_BLD.dim() == 3 else "rbld,rlde->rble"
            return torch.einsum(eq, x_BLD, W_RLDE)
        x_RLBD = x_BLD.transpose(0, 1)[None] if x_BLD.dim() == 3 else x_BLD.transpose(1, 2)
        return run_matmul(x_RLBD, W_RLDE).transpose(1, 2).contiguous()

    def encode(self, x_BLD: torch.Tensor) -> torch.Tensor:
        """Pre-activations z for inputs shared by all runs ([B,L,D]) or per run ([R,B,L,D])."""
        return self._per_layer(x_BLD, self.W_enc) + self.b_enc[:, None]

    def activate(self, pre_RBLF: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        joint = cfg.topk_mode == "joint"
        if cfg.activation == "relu":
            return pre_RBLF.relu()
        if cfg.activation == "jumprelu":
            return act.jumprelu(pre_RBLF, self.threshold()[:, None], cfg.jumprelu_bandwidth)
        if cfg.activation == "topk":
            return act.topk(pre_RBLF, self.k_R, joint)
        # batchtopk: the batch-level selection while training, the learned threshold after.
        if not self.training:
            thr = self.batchtopk_threshold[:, None, :, None]
            return pre_RBLF * (pre_RBLF > thr)
        acts, cut_RL = act.batchtopk(pre_RBLF, self.k_R, joint)
        with torch.no_grad():  # running estimate of the threshold (EMA over batches)
            self.batchtopk_threshold.lerp_(cut_RL, 0.01)
        return acts

    def write(self, acts_RBLF: torch.Tensor) -> torch.Tensor:
        """[R,B,T,D]: Σ_s a_s W_dec^{s→t}, what the features write (no bias, no skip)."""
        if not self.exact:
            return torch.einsum("rbsf,rstfd->rbtd", acts_RBLF, self.masked_W_dec())
        R, B, S, F = acts_RBLF.shape
        W_R1XY = self.masked_W_dec().permute(0, 1, 3, 2, 4).reshape(R, 1, S * F, -1)
        y = run_matmul(acts_RBLF.reshape(R, 1, B, S * F), W_R1XY)
        return y.view(R, B, S, -1)  # T = S: every layer is both a source and a target

    def decode(self, acts_RBLF: torch.Tensor, x_BLD: torch.Tensor | None = None) -> torch.Tensor:
        """ŷ_t = Σ_{s} a_s W_dec^{s→t} + b_dec^t (+ W_skip x_t); absent blocks are masked."""
        y = self.write(acts_RBLF) + self.b_dec[:, None]
        if self.W_skip is not None and x_BLD is not None:
            y = y + self._per_layer(x_BLD, self.W_skip)
        return y

    def forward(self, x_BLD: torch.Tensor) -> TranscoderOutput:
        pre = self.encode(x_BLD)
        acts = self.activate(pre)
        return TranscoderOutput(pre, acts, self.decode(acts, x_BLD))

    # ---- quantities the penalties and metrics read ------------------------------------
    def contributions(self, acts_RBLF: torch.Tensor) -> torch.Tensor:
        """[R,B,S,T,D]: what layer s's features write to layer t (b_dec excluded)."""
        if not self.exact:
            return torch.einsum("rbsf,rstfd->rbstd", acts_RBLF, self.masked_W_dec())
        y_RSTBD = run_matmul(acts_RBLF.transpose(1, 2)[:, :, None], self.masked_W_dec())
        return y_RSTBD.permute(0, 3, 1, 2, 4).contiguous()

    def decoder_block_norms(self) -> torch.Tensor:
        """[R,S,T,F]: ‖W_dec,i^{s→t}‖₂ for each feature and block (0 for absent blocks)."""
        # Mask the norms, not the [R,S,T,F,D] weights: the same numbers (an absent block is
        # stored as zeros, and the norm's gradient at 0 is 0) for a tenth of the work.
        return self.W_dec.norm(dim=-1) * self.decoder_mask_RST[..., None]

    # ---- ensembles --------------------------------------------------------------------
    @torch.no_grad()
    def select(self, runs: list[int]) -> Transcoder:
        """A new transcoder holding copies of the chosen runs."""
        out = Transcoder([self.cfgs[r] for r in runs])
        src, dst = self.state_dict(), out.state_dict()
        for name in dst:
            dst[name] = src[name][runs].clone()
        out.load_state_dict(dst)
        return out

    @staticmethod
    @torch.no_grad()
    def stack(parts: list[Transcoder]) -> Transcoder:
        """Concatenate transcoders with compatible shapes into one ensemble."""
        out = Transcoder([c for p in parts for c in p.cfgs])
        states = [p.state_dict() for p in parts]
        out.load_state_dict({k: torch.cat([s[k] for s in states]) for k in states[0]})
        return out
