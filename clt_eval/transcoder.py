"""One transcoder interface for per-layer (PLT) and cross-layer (CLT) transcoders.

A ``Transcoder`` holds an *ensemble* of R runs that share shapes and activation; a single
transcoder is an ensemble of one. PLT and CLT differ only in which decoder blocks s→ℓ exist:
the structural mask ``decoder_mask_RST`` is the identity for a PLT and upper-triangular
(ℓ ≥ s) for a CLT (docs/concepts.md §2). Nothing else in the library needs to know which is which.

Decoders are stored per source layer, ``W_dec_{s}`` [R, F, T_s, D], holding only the blocks
that can exist: Σ_s (L−s)·F·D weights per run for a CLT, L·F·D for a PLT, never the dense
L×L form (``dense_W_dec`` builds that for small toys and reference checks). Wide, sparsely
active transcoders decode from their active features only (``sparse_source_decode``).

Shapes: R runs, B samples, L layers (S source, T target), F features per layer, D d_model.

Runs are independent to the last bit: every product runs through ``run_matmul``, whose
arithmetic for one run does not depend on how many runs share the tensors or where the run
sits among them (BLAS's batched kernels do depend on it: measured, not assumed, see
``run_matmul``). ``Transcoder.exact = False`` takes the faster batched kernels instead.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import operator

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from clt_eval import activations as act
from clt_eval import fused_penalty
from clt_eval.config import TranscoderConfig
from clt_eval.errors import require
from clt_eval.small_matmul import COMPILED_DTYPES, small_matmul
from clt_eval.sparse import (  # noqa: F401  (re-exported: the sparse section lived here)
    SPARSE_ACTIVATIONS,
    SPARSE_MAX_SHARE,
    SPARSE_MIN_FEATURES,
    ActiveSet,
    Selection,
    sparse_encode,
    sparse_source_decode,
)

# ---- run-independent arithmetic -------------------------------------------------------
# Products above this many multiply-adds per matrix run as one BLAS call per run and matrix;
# smaller ones in one call for the whole ensemble (``small_matmul``, or elementwise ops off
# the CPU), where Python's per-call overhead (~10 µs) would cost more than the product.
LOOP_MIN_MACS = 1 << 16
# Off the CPU: elements of the temporary product tensor formed at once (runs are taken in
# slices): 4 MB, so the adds that sum it read it from cache (measured on the toy's shapes at
# 340 runs on the CPU: 15% less time than with a 64 MB budget; the same at 80 runs).
PRODUCT_BUDGET = 1 << 20


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
    per run and matrix, the same call a run alone makes. Small: every output element summed
    over k in one fixed order that does not depend on the other elements: on the CPU by
    ``small_matmul``'s compiled loops, elsewhere by ``_pairwise_products``. What does not
    work: a batched matmul (bmm/einsum) gives an element different roundings depending on
    the batch count or on how many runs share a matrix (measured with MKL: e.g. [13,8]@[8,5]
    blocks, with oneDNN on or off)."""
    M, K, N = a.shape[-2], a.shape[-1], b.shape[-1]
    batch = tuple(max(m, n) for m, n in zip(a.shape[:-2], b.shape[:-2], strict=True))
    if M * K * N >= LOOP_MIN_MACS:  # one BLAS call per run and matrix
        out = a.new_empty(*batch, M, N)
        for idx in itertools.product(*map(range, batch)):
            ia = tuple(i if n > 1 else 0 for i, n in zip(idx, a.shape[:-2], strict=True))
            ib = tuple(i if n > 1 else 0 for i, n in zip(idx, b.shape[:-2], strict=True))
            torch.mm(a[ia], b[ib], out=out[idx])
        return out
    if K == 0:
        return a.new_zeros(*batch, M, N)
    if a.device.type == "cpu" and a.dtype == b.dtype and a.dtype in COMPILED_DTYPES:
        return small_matmul(a, b)
    return _pairwise_products(a, b, batch, M, K, N)


def _pairwise_products(a, b, batch: tuple, M: int, K: int, N: int) -> torch.Tensor:
    """The products a_mk·b_kn as one elementwise tensor with k first, summed over k by
    ``_pairwise_sum``: an elementwise op rounds each element the same wherever it lies, so
    every output element is the same sum in the same order however many runs there are."""
    # k first and contiguous (copies of the small factors, not of the product), so the
    # product and every add of the sum run over long unit-stride rows.
    a_K = a.movedim(-1, 0).contiguous().unsqueeze(-1)  # [K, Ra, *G, M, 1]
    b_K = b.movedim(-2, 0).contiguous().unsqueeze(-2)  # [K, Rb, *G, 1, N]
    R, per_run = batch[0], math.prod(batch[1:]) * M * N * K
    step = max(1, PRODUCT_BUDGET // max(per_run, 1))
    out = None
    for r0 in range(0, R, step):
        r1 = min(R, r0 + step)
        a_r = a_K if a_K.shape[1] == 1 else a_K[:, r0:r1]
        b_r = b_K if b_K.shape[1] == 1 else b_K[:, r0:r1]
        part = _pairwise_sum(a_r * b_r)
        if r1 - r0 == R:
            return part
        out = a.new_empty(*batch, M, N) if out is None else out
        out[r0:r1] = part
    return out


def _pairwise_sum(t_KX: torch.Tensor) -> torch.Tensor:
    """Σ_k t[k], by halving: t[:h] + t[h:2h] (plus the odd one out) until one is left. Each
    level is an elementwise add, so an element's sum has the same order and rounding
    wherever it lies in the tensor. On the toys' shapes (k of 10 to 20) it is about twice as
    fast as a row sum over a short innermost k for 50 to 300 runs, and a little slower for
    one run (measured: 1.85 vs 4.05 ms at 270 runs, 0.13 vs 0.09 ms at one)."""
    while t_KX.shape[0] > 1:
        n = t_KX.shape[0]
        h = n // 2
        half = t_KX[:h] + t_KX[h:2 * h]
        if n % 2:
            half[-1] += t_KX[-1]
        t_KX = half
    return t_KX[0]


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


def row_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [..., K] @ b [K, N] with every row's result depending on that row alone, bitwise,
    however many rows come with it. A BLAS call blocks its work by the shape of the whole
    matrix, so a row rounds differently in a batch of 16 and of 1,600; here each row is an
    elementwise product summed along K (``row_sum``), taken in slices of rows to bound the
    temporary. Meant for small models (K·N of a few thousand) that many runs share."""
    K, N = b.shape
    a_MK = a.reshape(-1, K)
    if a_MK.shape[0] == 0:
        return a.new_zeros(*a.shape[:-1], N)
    # Both factors contiguous with K last, so the product is too and every row is summed
    # along unit stride (a strided factor can lay the product out K-major for one row only).
    a_MK, bT = a_MK.contiguous(), b.transpose(0, 1).contiguous()[None]
    step = max(1, PRODUCT_BUDGET // max(K * N, 1))
    parts = [row_sum((a_MK[i:i + step, None, :] * bT).contiguous().view(-1, K)).view(-1, N)
             for i in range(0, a_MK.shape[0], step)]
    out = parts[0] if len(parts) == 1 else torch.cat(parts)
    return out.view(*a.shape[:-1], N)


def _stack(ts: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """``torch.stack``, as a view when there is one tensor: a wide run's decode alone (one
    run, one layer) would otherwise copy its [B, D] output twice a step (3.2 of ~290 ms for
    a TopK transcoder of 8,192 features at batch 4,096)."""
    return ts[0].unsqueeze(dim) if len(ts) == 1 else torch.stack(ts, dim)


def _groups(keys: list) -> dict:
    """{key: [indices with that key]}, keys in first-seen order."""
    out: dict = {}
    for i, k in enumerate(keys):
        out.setdefault(k, []).append(i)
    return out


class TranscoderOutput:
    """A forward pass: pre-activations z [R,B,L,F], activations a = σ(z) [R,B,L,F] and the
    reconstructed MLP outputs ŷ [R,B,L,D]. When a sparse encode selected the features
    (TopK / BatchTopK at real widths), ``active`` lists the kept entries and the dense
    activations are built only if something reads ``acts_RBLF``: training reads the list."""

    def __init__(self, pre_RBLF: torch.Tensor, acts_RBLF: torch.Tensor | None,
                 recon_RBLD: torch.Tensor, active: ActiveSet | None = None):
        if acts_RBLF is None and active is None:
            raise ValueError("TranscoderOutput: acts_RBLF is None and there is no active set "
                             "to build it from")
        self.pre_RBLF, self.recon_RBLD, self.active = pre_RBLF, recon_RBLD, active
        self._acts = acts_RBLF

    @property
    def acts_RBLF(self) -> torch.Tensor:
        if self._acts is not None:
            return self._acts
        acts = self.active.dense()
        in_graph = any(v.requires_grad for vs in self.active.vals for v in vs)
        if acts.requires_grad or not in_graph:  # not kept if built under no_grad: a later
            self._acts = acts                   # read may need the graph
        return acts

    def l0_RB(self) -> torch.Tensor:
        """[R, B]: each sample's count of active features over all layers."""
        if self.active is not None:
            return self.active.l0()
        R, B = self.pre_RBLF.shape[:2]
        return row_sum((self.acts_RBLF > 0).float().reshape(R * B, -1)).view(R, B)


def structure_mask(arch: str, n_layers: int) -> torch.Tensor:
    """[S, T] bool: which decoder blocks s→t exist for ``arch``."""
    eye = torch.eye(n_layers, dtype=torch.bool)
    return eye if arch == "plt" else torch.ones(n_layers, n_layers).triu().bool()


def shared_fields(cfg: TranscoderConfig) -> dict:
    """Fields every run of an ensemble must agree on (arch, activation and k may vary per
    run, and the width for ReLU runs: ``Transcoder``'s padded widths)."""
    d = dataclasses.asdict(cfg)
    for name in ("arch", "activation", "k", "n_features"):
        d.pop(name)
    return d


class _AddBiasByWidth(torch.autograd.Function):
    """z + b for a ragged ensemble, [R,B,L,F]. The same values as a broadcast add; b's
    gradient is the batch sum of each width's stretch of runs cut to its width, so each run's
    sum has the order it has alone (a broadcast add's backward sums the padded tensor, in an
    order that depends on the number of features: measured, 2 against 8 features)."""

    @staticmethod
    def forward(ctx, z_RBLF, b_RLF, segments):
        ctx.segments = segments
        return z_RBLF + b_RLF[:, None]

    @staticmethod
    @once_differentiable
    def backward(ctx, g_RBLF):
        g_b = g_RBLF.new_zeros(g_RBLF.shape[0], *g_RBLF.shape[2:])
        for width, start, stop in ctx.segments:
            g_b[start:stop, :, :width] = g_RBLF[start:stop, ..., :width].contiguous().sum(1)
        return g_RBLF, g_b, None


def padding_is_exact(n_layers: int, d_model: int, width: int, batch: int,
                     device: torch.device | str, dtype: torch.dtype) -> bool:
    """Does a ReLU run padded to ``width`` features train to the numbers it gets alone
    (``Transcoder.ragged``), on batches of ``batch`` samples? Yes when every product of a
    step runs through ``small_matmul``'s in-order sums (an exact zero leaves those as they
    are; BLAS's and the pairwise sums' orders depend on the count). The largest product of a
    step is a batch of activations times the decoders of every target layer."""
    # and when the penalty's sums and the decoder norms run in ``fused_penalty``'s loops for
    # the padded width as for the run's own: at most layers² terms a sample, and at most
    # layers² decoder blocks a feature
    return (torch.device(device).type == "cpu" and dtype in COMPILED_DTYPES
            and batch * width * n_layers * max(d_model, 1) < LOOP_MIN_MACS
            and max(batch, d_model) * width * n_layers**2 <= fused_penalty.MAX_TERMS)


def _fit_axis(t: torch.Tensor, axis: int, n: int) -> torch.Tensor:
    """``t`` with ``axis`` cut to its first ``n`` entries, or zero-padded to ``n``."""
    if t.shape[axis] >= n:
        return t.narrow(axis, 0, n)
    pad = [0, 0] * (t.dim() - 1 - axis % t.dim()) + [0, n - t.shape[axis]]
    return nn.functional.pad(t, pad)


def _fit_features(state: dict, F: int) -> dict:
    """``state`` with every feature axis cut or zero-padded to ``F`` features."""
    for name in ("W_enc", "b_enc", "log_threshold"):
        if name in state:
            state[name] = _fit_axis(state[name], -1, F)
    for name in [k for k in state if k.startswith("W_dec_")]:
        state[name] = _fit_axis(state[name], 1, F)
    return state


def _zero_absent_grads(plt_rows: slice | list[int], W: torch.Tensor) -> None:
    """After a mixed ensemble's ``W_dec_{s}`` [R, F, T, D] has accumulated its gradient:
    zero it at the PLT runs' (``plt_rows``) absent slots 1..T-1 (in place: only those
    slots are touched)."""
    if W.grad is None:
        return
    if isinstance(plt_rows, slice):
        W.grad[plt_rows, :, 1:] = 0.0
    else:
        W.grad[:, :, 1:].index_fill_(0, torch.tensor(plt_rows, device=W.device), 0.0)


def fit_targets(W_RFTD: torch.Tensor, n_targets: int) -> torch.Tensor:
    """A per-source decoder with ``n_targets`` target slots: extra slots (absent blocks of a
    PLT run) dropped, missing ones added as zeros."""
    return _fit_axis(W_RFTD, 2, n_targets)


class Transcoder(nn.Module):
    """R runs of one shape. Decoders are stored per source layer s as ``W_dec_{s}``
    [R, F, T_s, D] holding the blocks s→s..s+T_s-1: T_s = L - s when any run is a CLT, 1 when
    all are PLTs. A PLT run in a mixed ensemble stores cross-layer slots that no reader
    uses: every reader masks them, and their gradients are zeroed as they accumulate
    (``_zero_absent_grads``). They start at zero and so stay zero under training (an
    optimiser moves a weight with zero gradient and zero moments by an exact zero), which
    lets the decode skip its mask while they are (``_absent_zero``).

    ReLU runs of different widths may share an ensemble (``ragged``): each stores the widest
    run's F features, its own first. A run's extra features start with zero weights, so
    their pre-activations are exact zeros, ReLU keeps them at zero and passes them no
    gradient, and their decoder rows are multiplied only by zero activations: they stay
    zero. A run keeps its alone numbers where every product adds its terms in order
    (``small_matmul``; ``padding_is_exact``), since an exact zero leaves such a sum as it
    is; the sums whose order depends on the count are taken width by width (the encoder
    bias's gradient here, the penalties in ``losses``). ``select`` cuts a run back to its
    width."""

    # Run-independent products (``run_matmul``); False: BLAS's batched kernels, faster for
    # large ensembles of small transcoders, but a run's numbers then depend on its ensemble.
    exact: bool = True
    # Decode sparse runs from their active features (see SPARSE_*); False: always dense.
    sparse_decode: bool = True

    def __init__(self, cfgs: list[TranscoderConfig], seeds: list[int] | None = None,
                 init: bool = True):
        """``init=False`` leaves the weights uninitialised (torch.empty, no pages touched):
        for loaders, which overwrite every tensor anyway."""
        super().__init__()
        require(len(cfgs) > 0, "Transcoder: expected at least one run config")
        base = shared_fields(cfgs[0])
        for i, c in enumerate(cfgs):
            require(shared_fields(c) == base,
                    f"run {i}: configs in one ensemble may differ only in arch, activation, "
                    "k and width")
        self.cfgs = list(cfgs)
        widths = [c.n_features for c in cfgs]
        # Runs of several widths: each stores max(widths) features, the ones past its own
        # width held at exact zeros (see the class docstring).
        self.ragged = len(set(widths)) > 1
        if self.ragged:
            other = sorted({c.activation for c in cfgs} - {"relu"})
            require(not other, f"runs of different widths ({sorted(set(widths))} features) "
                    f"share an ensemble only with the relu activation; got {other}")
        self._cfg = dataclasses.replace(cfgs[0], n_features=max(widths))
        # [(width, start, stop)]: the stretches of runs of one width, in order.
        self._width_segments = act.segments(widths)
        cfg = self._cfg
        R, L, F, D = len(cfgs), cfg.n_layers, cfg.n_features, cfg.d_model
        self.W_enc = nn.Parameter(torch.empty(R, L, D, F))
        self.b_enc = nn.Parameter(torch.empty(R, L, F))
        cross = any(c.arch != "plt" for c in cfgs)
        self.n_targets = [L - s if cross else 1 for s in range(L)]
        for s, T in enumerate(self.n_targets):
            self.register_parameter(f"W_dec_{s}", nn.Parameter(torch.empty(R, F, T, D)))
        self.b_dec = nn.Parameter(torch.empty(R, L, D))
        self.W_skip = nn.Parameter(torch.empty(R, L, D, D)) if cfg.skip else None
        # Runs may differ in activation: the toys' sweeps train l1, l0 and TopK runs as one
        # ensemble. The JumpReLU threshold then has a row for every run; the other runs never
        # read theirs, so it gets no gradient and Adam leaves it as it is.
        self.activation_groups = _groups([c.activation for c in cfgs])
        self.activation_segments = act.segments([c.activation for c in cfgs])
        self.log_threshold = (
            nn.Parameter(torch.full((R, L, F), math.log(cfg.jumprelu_threshold_init)))
            if "jumprelu" in self.activation_groups else None
        )
        # BatchTopK's inference threshold: a running estimate, not trained by gradient.
        self.register_buffer("batchtopk_threshold", torch.zeros(R, L))
        masks = torch.stack([structure_mask(c.arch, L) for c in cfgs])
        self.register_buffer("decoder_mask_RST", masks)
        # Only an ensemble mixing PLT and CLT runs stores slots that must be masked.
        self.mixed = cross and any(c.arch == "plt" for c in cfgs) and L > 1
        if self.mixed:
            plt = [r for r, c in enumerate(cfgs) if c.arch == "plt"]
            # A slice when the PLT runs lie side by side, as the trainer lays them out.
            self._plt_rows = (slice(plt[0], plt[-1] + 1)
                              if plt == list(range(plt[0], plt[-1] + 1)) else plt)
            for s, W in enumerate(self.decoder_params()):
                if self.n_targets[s] > 1:
                    W.register_post_accumulate_grad_hook(
                        functools.partial(_zero_absent_grads, self._plt_rows))
        ks = [c.k or 0 for c in cfgs]
        self.register_buffer("k_R", torch.tensor(ks, dtype=torch.long))
        if init:
            self.reset_parameters(seeds or list(range(R)))

    # ---- construction ---------------------------------------------------------------
    @property
    def cfg(self) -> TranscoderConfig:
        """The first run's config, with the stored width (``n_features``)."""
        return self._cfg

    @property
    def n_runs(self) -> int:
        return len(self.cfgs)

    @torch.no_grad()
    def reset_parameters(self, seeds: list[int]) -> None:
        """Initialise each run from its own seed, so a run does not depend on its neighbours
        (nor on how many target slots the ensemble stores)."""
        cfg = self.cfg
        L, D = cfg.n_layers, cfg.d_model
        for p in [self.W_enc, *self.decoder_params()]:
            p.zero_()
        for r, seed in enumerate(seeds):
            F = self.cfgs[r].n_features  # its own width: a padded run draws what it does alone
            g = torch.Generator().manual_seed(int(seed))
            w = (torch.rand(L, D, F, generator=g) * 2 - 1) / D**0.5
            self.W_enc[r, ..., :F] = w
            # Own-layer decoders start along the encoder's directions, every block at norm 0.1:
            # small, so early steps are driven by the data, and the same for cross-layer
            # blocks, so the initialisation favours neither skipping nor not skipping.
            own = w.transpose(1, 2)
            own = own / own.norm(dim=-1, keepdim=True) * 0.1
            for s, W in enumerate(self.decoder_params()):
                W[r, :F, 0] = own[s]
                for t in self.targets(s, r)[1:]:
                    dec = torch.rand(F, D, generator=g) * 2 - 1
                    W[r, :F, t - s] = dec / dec.norm(dim=-1, keepdim=True) * 0.1
        self.b_enc.zero_()
        self.b_dec.zero_()
        if self.W_skip is not None:
            self.W_skip.zero_()
        self.batchtopk_threshold.zero_()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Accept state dicts written with the old dense ``W_dec`` [R, S, T, F, D]."""
        dense = state_dict.pop(prefix + "W_dec", None)
        if dense is not None:
            for s, T in enumerate(self.n_targets):
                state_dict[f"{prefix}W_dec_{s}"] = fit_targets(
                    dense[:, s, s:].permute(0, 2, 1, 3), T).contiguous()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ---- decoder access -------------------------------------------------------------
    def decoder_params(self) -> list[nn.Parameter]:
        """The per-source decoder parameters W_dec_0..W_dec_{L-1}, [R, F, T_s, D] each."""
        return [getattr(self, f"W_dec_{s}") for s in range(self.cfg.n_layers)]

    def targets(self, s: int, run: int | None = None) -> range:
        """Target layers stored for source ``s`` (of one run: those that exist for it)."""
        T = self.n_targets[s]
        if run is not None and self.cfgs[run].arch == "plt":
            T = 1
        return range(s, s + T)

    def target_mask(self, s: int) -> torch.Tensor:
        """[R, T_s] bool: which stored slots of source ``s`` exist for each run."""
        return self.decoder_mask_RST[:, s, s:s + self.n_targets[s]]

    def decoder_from(self, s: int, masked: bool = True) -> torch.Tensor:
        """[R, F, T_s, D]: the decoders of layer s's features to layers s..s+T_s-1. Masked:
        absent blocks read as zeros (a copy only in mixed PLT/CLT ensembles, else the
        parameter itself)."""
        W = getattr(self, f"W_dec_{s}")
        if masked and self.mixed:
            return W * self.target_mask(s)[:, None, :, None]
        return W

    def decoder_block(self, s: int, t: int, masked: bool = True) -> torch.Tensor:
        """[R, F, D]: block s→t; zeros if no run stores it. Unmasked, a writable view."""
        if t not in range(s, s + self.n_targets[s]):
            require(masked, f"decoder block {s}->{t}: not stored (targets of source {s} are "
                    f"{list(self.targets(s))})")
            W = getattr(self, f"W_dec_{s}")
            return W.new_zeros(W.shape[0], W.shape[1], W.shape[3])
        block = getattr(self, f"W_dec_{s}")[:, :, t - s]
        if masked and self.mixed:
            return block * self.decoder_mask_RST[:, s, t, None, None]
        return block

    @torch.no_grad()
    def set_decoder_block(self, s: int, t: int, W: torch.Tensor,
                          runs: int | slice = slice(None)) -> None:
        """Write block s→t ([F, D], or [R, F, D] for all runs) of the chosen runs."""
        self.decoder_block(s, t, masked=False)[runs] = W

    def dense_W_dec(self) -> torch.Tensor:
        """[R, S, T, F, D]: the masked decoder in dense L×L form, for small toys and reference
        checks only; at real sizes it holds ~L/2 times the stored weights."""
        R, L, F, D = self.n_runs, self.cfg.n_layers, self.cfg.n_features, self.cfg.d_model
        W = self.W_enc.new_zeros(R, L, L, F, D)
        for s, T in enumerate(self.n_targets):
            W[:, s, s:s + T] = self.decoder_from(s).permute(0, 2, 1, 3)
        return W

    masked_W_dec = dense_W_dec  # the old name

    def threshold(self) -> torch.Tensor | None:
        return None if self.log_threshold is None else self.log_threshold.exp()

    # ---- forward ----------------------------------------------------------------------
    def _per_layer(self, x_BLD: torch.Tensor, W_RLDE: torch.Tensor) -> torch.Tensor:
        """[R,B,L,E]: x_l W^l for each run and layer; x shared ([B,L,D]) or per run."""
        if not self.exact:
            eq = "bld,rlde->rble" if x_BLD.dim() == 3 else "rbld,rlde->rble"
            return torch.einsum(eq, x_BLD, W_RLDE)
        x_RLBD = x_BLD.transpose(0, 1)[None] if x_BLD.dim() == 3 else x_BLD.transpose(1, 2)
        return run_matmul(x_RLBD, W_RLDE).transpose(1, 2).contiguous()

    def encode(self, x_BLD: torch.Tensor) -> torch.Tensor:
        """Pre-activations z for inputs shared by all runs ([B,L,D]) or per run ([R,B,L,D])."""
        if self._sparse_encodes(x_BLD):  # the same z; a backward that skips zero gradients
            return sparse_encode(x_BLD, self.W_enc, self.b_enc)
        z = self._per_layer(x_BLD, self.W_enc)
        if self.ragged and self.exact:
            return _AddBiasByWidth.apply(z, self.b_enc, self._width_segments)
        return z + self.b_enc[:, None]

    def _sparse_encodes(self, x_BLD: torch.Tensor) -> bool:
        """Does this input take ``sparse_encode``? Wide sparse transcoders in float32 (its
        kernels follow no autocast), with one input for all runs or one per run."""
        return (self.may_decode_sparsely() and x_BLD.dtype == self.W_enc.dtype == torch.float32
                and not torch.is_autocast_enabled(x_BLD.device.type)
                and (x_BLD.dim() == 3 or x_BLD.shape[0] == self.n_runs))

    def _selection(self, x_BLD: torch.Tensor) -> Selection | None:
        """The TopK / BatchTopK selection ``sparse_encode`` makes itself, listing the kept
        entries as it keeps them (no scan of the activations to find them again); None where
        the activation is applied separately (JumpReLU, BatchTopK's inference threshold)."""
        kind = self.cfg.activation
        if not self._sparse_encodes(x_BLD) or kind not in ("topk", "batchtopk"):
            return None
        if kind == "batchtopk" and not self.training:
            return None
        return Selection(kind, self.k_R.tolist(), self.cfg.topk_mode == "joint")

    def activate(self, pre_RBLF: torch.Tensor) -> torch.Tensor:
        """σ(z) for every run, each with its own activation (elementwise or per run, so a
        run's activations are the same alone and in any ensemble)."""
        if len(self.activation_groups) == 1:
            return self._activate(next(iter(self.activation_groups)), pre_RBLF, None)
        if act.contiguous(self.activation_segments, len(self.activation_groups)):
            return act.apply_by_segment(self._activate, pre_RBLF, self.activation_segments)
        out = torch.zeros_like(pre_RBLF)
        for kind, runs in self.activation_groups.items():
            idx = torch.tensor(runs, device=pre_RBLF.device)
            out = out.index_put((idx,), self._activate(kind, pre_RBLF[idx], idx))
        return out

    def _activate(self, kind: str, pre_RBLF: torch.Tensor, runs: torch.Tensor | slice | None):
        """One activation for the runs ``runs`` (indices or a slice; None: all), whose
        pre-activations are given."""
        cfg = self.cfg
        joint = cfg.topk_mode == "joint"

        def per_run(t: torch.Tensor) -> torch.Tensor:
            return t if runs is None else t[runs]

        if kind == "relu":
            return pre_RBLF.relu()
        if kind == "jumprelu":
            thr = per_run(self.threshold())[:, None]
            return act.jumprelu(pre_RBLF, thr, cfg.jumprelu_bandwidth)
        if kind == "topk":
            return act.topk(pre_RBLF, per_run(self.k_R), joint)
        # batchtopk: the batch-level selection while training, the learned threshold after.
        if not self.training:
            thr = per_run(self.batchtopk_threshold)[:, None, :, None]
            return pre_RBLF * (pre_RBLF > thr)
        acts, cut_RL = act.batchtopk(pre_RBLF, per_run(self.k_R), joint)
        self._track_threshold(cut_RL, runs)
        return acts

    @torch.no_grad()
    def _track_threshold(self, cut_RL: torch.Tensor,
                         runs: torch.Tensor | slice | None = None) -> None:
        """BatchTopK's running estimate of its inference threshold (EMA over batches)."""
        if runs is None:
            self.batchtopk_threshold.lerp_(cut_RL, 0.01)
        else:
            self.batchtopk_threshold[runs] = self.batchtopk_threshold[runs].lerp(cut_RL, 0.01)

    def support(self, pre_RBLF: torch.Tensor, acts_RBLF: torch.Tensor) -> torch.Tensor:
        """[R,B,L,F] bool: the features a sparse decode must read. The active ones; for
        JumpReLU under autograd also those within half a bandwidth below the threshold,
        whose activation gradient feeds the threshold's straight-through estimator."""
        on = acts_RBLF != 0
        if self.cfg.activation == "jumprelu" and torch.is_grad_enabled():
            near = pre_RBLF > self.threshold()[:, None] - self.cfg.jumprelu_bandwidth / 2
            on = on | near.detach()
        return on

    def may_decode_sparsely(self) -> bool:
        """Wide enough, and one activation, which leaves most features at exactly zero."""
        cfg = self.cfg
        return (self.sparse_decode and len(self.activation_groups) == 1
                and cfg.activation in SPARSE_ACTIVATIONS
                and cfg.n_features >= SPARSE_MIN_FEATURES)

    def sparse_runs(self, support_RBLF: torch.Tensor) -> torch.Tensor | None:
        """[R] bool: the runs to decode sparsely, each judged on its own activations only (so
        the choice, like everything else, does not depend on the other runs); None: none.
        ``support_RBLF``: a mask, or an ``ActiveSet`` (judged on how many entries it lists)."""
        if not self.may_decode_sparsely():
            return None
        if isinstance(support_RBLF, ActiveSet):
            chosen = support_RBLF.sparse_R().to(self.k_R.device)
        else:
            on_R = support_RBLF.flatten(1).sum(1)
            chosen = on_R <= SPARSE_MAX_SHARE * support_RBLF[0].numel()
        return chosen if bool(chosen.any()) else None

    def _product(self, a_RBF: torch.Tensor, W_RFX: torch.Tensor) -> torch.Tensor:
        if self.exact:
            return run_matmul(a_RBF[:, None], W_RFX[:, None])[:, 0]
        return torch.bmm(a_RBF, W_RFX)

    def _group_weights(self, s: int, runs: torch.Tensor | None, plt: bool,
                       joint: bool) -> torch.Tensor:
        """[R_g, F, T_g, D]: source s's decoders for a group of runs.

        In a mixed PLT/CLT ensemble, a PLT group reads its own-layer slot only (``plt``;
        see ``_plt_apart``). Otherwise, in a ``joint`` group, dense rows decode together,
        and PLT runs' absent slots read as exact +0: as they are while they hold zeros
        (``_absent_zero``; their gradients are zeroed as they accumulate), else through a
        ``torch.where`` (a caller wrote into them). A PLT run's own-layer outputs are then
        the same sums as alone; the absent slots add an exact zero to its other outputs, and
        to its activations' gradients after the own-layer terms. An exact zero leaves a sum
        as it is (but for the sign of a sum that is itself zero). One product for the whole
        ensemble costs less than one per kind (measured on the toy sweep's 30-run
        ensembles: 7.0-7.1 vs 8.4-8.5 and 8.5-9.8 vs 10.3-11.0 ms a step), and reading the
        slots as they are saves the where's copies forward and backward (interleaved A/B:
        44.0-49.6 vs 50.8-54.7 ms a step at 540 runs, 29.0-30.1 vs 30.6-31.1 at 306).
        """
        W = getattr(self, f"W_dec_{s}")
        if plt and W.shape[2] > 1:
            W = W[:, :, :1]
        elif joint and W.shape[2] > 1 and not self._absent_zero(s):
            W = torch.where(self.target_mask(s)[:, None, :, None], W, 0.0)
        return W if runs is None else W[runs]

    def _absent_zero(self, s: int) -> bool:
        """Do the PLT runs' absent slots of source ``s`` hold exact zeros? (A read of those
        slots only; -0 counts as zero, and a product with it adds an exact zero too.)"""
        rows = self._plt_rows
        W = getattr(self, f"W_dec_{s}").detach()[:, :, 1:]
        absent = W[rows] if isinstance(rows, slice) else W.index_select(
            0, torch.tensor(rows, device=W.device))
        return not bool(absent.any())

    def _write_group(self, acts_RBLF, support_RBLF, runs, plt: bool) -> torch.Tensor:
        """[R_g,B,L,D] for runs of one kind (dense or sparse decode; PLT or not).
        ``acts_RBLF`` may be None when ``support_RBLF`` is an ActiveSet: its values are the
        activations."""
        listed = isinstance(support_RBLF, ActiveSet)
        if acts_RBLF is None:
            R, B, L, F = (len(support_RBLF.lists), support_RBLF.n_rows,
                          len(support_RBLF.lists[0]), support_RBLF.n_cols)
            sources = [None] * L
        else:
            R, B, L, F = acts_RBLF.shape
            # unbind, not acts[:, :, s]: the backward of L selections would build L
            # gradients the size of all activations; that of one unbind stacks L slices.
            sources = acts_RBLF.unbind(2)
        # Do PLT rows decode in this group with CLT rows, reading every slot?
        joint = (self.mixed and not plt and support_RBLF is None
                 and not self._plt_apart(acts_RBLF))
        into = [[] for _ in range(L)]  # what each target layer receives, source by source
        for s, a_RBF in enumerate(sources):  # a fixed order of sources
            W = self._group_weights(s, runs, plt, joint)
            T = W.shape[2]
            if support_RBLF is None:
                part = self._product(a_RBF, W.reshape(R, F, -1))
            else:  # each run alone: its numbers never see another run's
                sups = (support_RBLF.source(s) if listed else support_RBLF[:, :, s].unbind(0))
                a_R = [None] * R if a_RBF is None else a_RBF.unbind(0)
                part = _stack([sparse_source_decode(a, sup, W_r.reshape(F, -1))
                               for a, sup, W_r in zip(a_R, sups, W.unbind(0), strict=True)])
            for i, p in enumerate(part.view(R, B, T, -1).unbind(2)):
                into[s + i].append(p)
        # Summed out of place and stacked once: adding into slices of one output tensor
        # made the backward copy the whole gradient for every slice.
        return _stack([functools.reduce(operator.add, parts) for parts in into], 2)

    def _row_keys(self, sparse_N: torch.Tensor | None, runs: list[int],
                  apart: bool = True) -> list[tuple]:
        """(sparse, plt) of each row of ``runs``: rows with equal keys decode alike. PLT
        rows of a mixed ensemble decode apart when sparse or when ``apart``."""
        sparse = [False] * len(runs) if sparse_N is None else sparse_N.tolist()
        return [(bool(sparse[i]), self.mixed and self.cfgs[r].arch == "plt"
                 and (bool(sparse[i]) or apart)) for i, r in enumerate(runs)]

    def _plt_apart(self, acts_RBLF: torch.Tensor | None) -> bool:
        """Must a mixed ensemble's dense PLT rows decode apart from its CLT rows? Yes unless
        every product of the decode, forward and backward, runs through the compiled
        per-element loops (``small_matmul``), where an element's sum does not depend on how
        many columns its product has; BLAS's per-run products (``LOOP_MIN_MACS`` and up) and
        the pairwise sums off the CPU do depend on it."""
        if acts_RBLF is None or not self.exact:
            return acts_RBLF is None  # a listed (sparse) decode; batched kernels: no promise
        B, F = acts_RBLF.shape[1], acts_RBLF.shape[3]
        return not (acts_RBLF.device.type == "cpu" and acts_RBLF.dtype in COMPILED_DTYPES
                    and B * F * self.n_targets[0] * self.cfg.d_model < LOOP_MIN_MACS)

    @staticmethod
    def _run_groups(keys: list[tuple]) -> list[tuple[list[int], bool, bool]]:
        """(rows, sparse, plt) groups of rows with equal ``_row_keys``, in order."""
        return [([i for i, k in enumerate(keys) if k == key], *key)
                for key in sorted(set(keys))]

    def write(self, acts_RBLF: torch.Tensor | None, support_RBLF: torch.Tensor | None = None,
              runs: list[int] | None = None) -> torch.Tensor:
        """[R,B,T,D]: Σ_s a_s W_dec^{s→t}, what the features write (no bias, no skip), summed
        over sources in a fixed order. Sparse runs read only the features in
        ``support_RBLF`` (default: the active ones). ``runs``: the runs whose activations
        ``acts_RBLF`` holds, one row each (default: all); each is decoded as it is alone.
        ``acts_RBLF`` may be None when ``support_RBLF`` is an ``ActiveSet``."""
        sparse_N = support = None
        if self.may_decode_sparsely():
            support = acts_RBLF != 0 if support_RBLF is None else support_RBLF
            sparse_N = self.sparse_runs(support)
        everyone = runs is None
        runs = list(range(self.n_runs)) if everyone else runs
        keys = self._row_keys(sparse_N, runs, self._plt_apart(acts_RBLF))
        groups = self._run_groups(keys)
        if len(groups) == 1 and everyone and (groups[0][1] or acts_RBLF is not None):
            _, sparse, plt = groups[0]  # the common case: no copies of the weights
            return self._write_group(acts_RBLF, support if sparse else None, None, plt)
        if acts_RBLF is None:  # a dense decode, or runs of several kinds: slices of these
            acts_RBLF = support_RBLF.dense()
        segs = act.segments(keys)
        if everyone and act.contiguous(segs, len(groups)):  # runs ordered by kind: views
            return act.apply_by_segment(
                lambda key, a, rows: self._write_group(a, support[rows] if key[0] else None,
                                                       rows, key[1]), acts_RBLF, segs)
        out = None
        for rows, sparse, plt in groups:
            pos = torch.tensor(rows, device=acts_RBLF.device)
            idx = torch.tensor([runs[i] for i in rows], device=acts_RBLF.device)
            y = self._write_group(acts_RBLF[pos], support[pos] if sparse else None, idx, plt)
            out = y.new_zeros(len(runs), *y.shape[1:]) if out is None else out
            out = out.index_put((pos,), y)
        return out

    def decode(self, acts_RBLF: torch.Tensor, x_BLD: torch.Tensor | None = None,
               support_RBLF: torch.Tensor | None = None) -> torch.Tensor:
        """ŷ_t = Σ_{s} a_s W_dec^{s→t} + b_dec^t (+ W_skip x_t); absent blocks are masked."""
        y = self.write(acts_RBLF, support_RBLF) + self.b_dec[:, None]
        if self.W_skip is not None and x_BLD is not None:
            y = y + self._per_layer(x_BLD, self.W_skip)
        return y

    def forward(self, x_BLD: torch.Tensor) -> TranscoderOutput:
        select = self._selection(x_BLD)
        if select is not None:  # encode and select in one: the kept entries come listed
            pre, support = sparse_encode(x_BLD, self.W_enc, self.b_enc, select)
            acts = None  # built from ``support`` only if something reads it
            if select.cut_RL is not None:
                self._track_threshold(select.cut_RL)
        else:
            pre = self.encode(x_BLD)
            acts = self.activate(pre)
            support = self.support(pre, acts) if self.may_decode_sparsely() else None
        active = support if isinstance(support, ActiveSet) else None
        return TranscoderOutput(pre, acts, self.decode(acts, x_BLD, support), active)

    # ---- quantities the penalties and metrics read ------------------------------------
    def contributions(self, acts_RBLF: torch.Tensor) -> torch.Tensor:
        """[R,B,S,T,D]: what layer s's features write to layer t (b_dec excluded)."""
        R, B, L, F = acts_RBLF.shape
        out = acts_RBLF.new_zeros(R, B, L, L, self.cfg.d_model)
        for s, a_RBF in enumerate(acts_RBLF.unbind(2)):
            W = self.decoder_from(s)
            T = W.shape[2]
            out[:, :, s, s:s + T] = self._product(a_RBF, W.reshape(R, F, -1)).view(R, B, T, -1)
        return out

    def decoder_block_norms(self) -> torch.Tensor:
        """[R,S,T,F]: ‖W_dec,i^{s→t}‖₂ for each feature and block (0 for absent blocks)."""
        L = self.cfg.n_layers
        decoders = self.decoder_params()
        if fused_penalty.norms_fit(decoders):  # small runs: one compiled pass
            masks = [self.target_mask(s) for s in range(L)] if self.mixed else None
            return fused_penalty.block_norms(decoders, masks)
        rows = []
        for s, T in enumerate(self.n_targets):
            # Mask the norms, not the weights: the same numbers (an absent block reads as
            # zeros, whose norm's gradient is 0) for a fraction of the work.
            n_RTF = getattr(self, f"W_dec_{s}").norm(dim=-1).transpose(1, 2)
            if self.mixed:
                n_RTF = n_RTF * self.target_mask(s)[..., None]
            rows.append(nn.functional.pad(n_RTF, (0, 0, s, L - s - T)))
        return torch.stack(rows, 1)

    # ---- ensembles --------------------------------------------------------------------
    def _fitted(self, state: dict) -> dict:
        """``state`` with per-source decoders cut or padded to this transcoder's slots and
        its width (features past a run's own width are zeros), and a JumpReLU threshold (at
        its initial value, never read) for runs that have none."""
        state = _fit_features(state, self.cfg.n_features)
        for s, T in enumerate(self.n_targets):
            state[f"W_dec_{s}"] = fit_targets(state[f"W_dec_{s}"], T)
        if self.log_threshold is not None and "log_threshold" not in state:
            R = state["W_enc"].shape[0]
            state["log_threshold"] = torch.full((R, *self.log_threshold.shape[1:]),
                                                math.log(self.cfg.jumprelu_threshold_init))
        return state

    @torch.no_grad()
    def select(self, runs: list[int]) -> Transcoder:
        """A new transcoder holding copies of the chosen runs."""
        out = Transcoder([self.cfgs[r] for r in runs], init=False)
        src = self.state_dict()
        out.load_state_dict(out._fitted({k: src[k][runs].clone() for k in out.state_dict()}))
        return out

    @staticmethod
    @torch.no_grad()
    def stack(parts: list[Transcoder]) -> Transcoder:
        """Concatenate transcoders with compatible shapes into one ensemble."""
        out = Transcoder([c for p in parts for c in p.cfgs], init=False)
        states = [out._fitted(p.state_dict()) for p in parts]
        out.load_state_dict({k: torch.cat([s[k] for s in states]) for k in states[0]})
        return out
