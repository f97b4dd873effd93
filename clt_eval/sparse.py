"""Sparse-aware arithmetic for wide TopK, BatchTopK and JumpReLU transcoders.

At real widths almost every feature of every sample is exactly zero, so two of a training
step's three big products are mostly wasted work when done densely: the decode (the
activations times the decoder) and the encoder's weight gradient (the inputs times the
pre-activations' gradient, which is zero wherever a feature was not selected). Here both run
over the listed entries only (``Listed``): one run's, one layer's (sample, feature) pairs.

* ``sparse_encode``: z = x W + b for every run and layer, one ``addmm`` each, or with the
  TopK / BatchTopK selection (``Selection``) one ``mm`` each whose bias the selection adds
  as it reads the rows (``clt_eval.topk``). The selection lists the kept entries as it
  makes them: no scan of the dense activations to find them.
  The backward computes the gradients of W, b (and x) from the gradient's nonzero entries
  when they are few, else with dense products.
* ``sparse_source_decode``: Σ_n a_n W[f_n] per sample with ``embedding_bag``, forward and
  backward, reading only the listed decoder rows.

Runs are independent to the last bit: everything is computed one run at a time, and every
reduction either adds in an order fixed by the entries (``embedding_bag``: per output element,
entries in list order) or is BLAS with inputs at 64-byte-aligned addresses (MKL's ``sdot``
rounds differently depending on the alignment of its inputs: measured).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from clt_eval.topk import topk_rows

# A run decodes from its active features only when the transcoder is wide and at most this
# share of its (sample, layer, feature) activations is on: gathering rows then costs less
# than the dense product, whose work grows with every feature, firing or not.
SPARSE_MIN_FEATURES = 1024
SPARSE_MAX_SHARE = 1 / 16
SPARSE_ACTIVATIONS = ("topk", "batchtopk", "jumprelu")

# PyTorch's CPU allocator aligns to this many bytes; see ``_aligned``.
ALIGN = 64


def sparse_enough(n_entries: int, n_slots: int) -> bool:
    """Is a run with ``n_entries`` listed of ``n_slots`` (sample, layer, feature) slots sparse
    enough for the listed arithmetic?"""
    return n_entries <= SPARSE_MAX_SHARE * n_slots


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous at an aligned address: a copy only when it is not. BLAS reductions
    (``sdot``) round depending on where their inputs start, and a run's slice of an
    ensemble's tensor starts elsewhere than the same run's tensor alone."""
    if t.is_contiguous() and t.data_ptr() % ALIGN == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def each_list(lists: list[list[Listed]]) -> list[tuple[int, int, Listed]]:
    """(run, layer, entries) for every run's and layer's list, runs first."""
    return [(r, layer, lst) for r, layers in enumerate(lists) for layer, lst in enumerate(layers)]


def _starts(sorted_ids: torch.Tensor, n: int) -> torch.Tensor:
    """[n]: where each id's entries start in ``sorted_ids`` (ascending): embedding_bag's
    offsets for bags 0..n-1 (an empty bag starts where the next one does)."""
    return torch.searchsorted(sorted_ids, torch.arange(n, device=sorted_ids.device))


class Listed:
    """One run's and one layer's listed entries, in sample order: entry n is feature
    ``cols[n]`` of sample ``rows[n]`` (``rows`` ascending). Indices only, no values: the
    encoder's backward keeps these, and a value in the autograd graph kept there would tie
    the graph into a reference cycle. Index structures are built once and shared by the
    decode and the encoder gradient."""

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor, n_rows: int, n_cols: int,
                 row_starts: torch.Tensor | None = None):
        self.rows, self.cols = rows, cols
        self.n_rows, self.n_cols = n_rows, n_cols
        self._row_starts = row_starts
        self._by_col: tuple[torch.Tensor, ...] | None = None

    def __len__(self) -> int:
        return len(self.cols)

    def row_starts(self) -> torch.Tensor:
        if self._row_starts is None:
            self._row_starts = _starts(self.rows, self.n_rows)
        return self._row_starts

    def by_col(self) -> tuple[torch.Tensor, ...]:
        """(order, rows and cols in that order, feature starts): the entries grouped by
        feature, each feature's in sample order (a stable sort)."""
        if self._by_col is None and self.cols.device.type == "cpu" and len(self.cols):
            # a counting sort: 8 vs 14 ms for 262,144 entries over 8,192 features
            from clt_eval._sparse_kernels import by_column

            rows, cols = self.rows.contiguous(), self.cols.contiguous()
            order, rows_out, cols_out = (torch.empty_like(cols) for _ in range(3))
            starts = torch.empty(self.n_cols, dtype=cols.dtype)
            by_column(rows.numpy(), cols.numpy(), self.n_cols, order.numpy(),
                      rows_out.numpy(), cols_out.numpy(), starts.numpy())
            self._by_col = order, rows_out, cols_out, starts
        elif self._by_col is None:
            cols, order = torch.sort(self.cols, stable=True)
            self._by_col = order, self.rows[order], cols, _starts(cols, self.n_cols)
        return self._by_col

    def sum_by_col(self, weights: torch.Tensor, M_BX: torch.Tensor) -> torch.Tensor:
        """[F, X]: Σ over each feature's entries n of weights[n] · M[rows[n]]."""
        order, rows, _, starts = self.by_col()
        return F.embedding_bag(rows, M_BX, starts, mode="sum", per_sample_weights=weights[order])

    def dots(self, M_BX: torch.Tensor, W_FX: torch.Tensor) -> torch.Tensor:
        """[N]: ⟨M[rows[n]], W[cols[n]]⟩ for every entry (inputs 64-byte aligned, see
        ``_aligned``). Taken feature by feature: each decoder row is read once and stays in
        cache for all its samples (measured 20 vs 30 ms for 4096 x 32 entries of width 512);
        every dot is the same computation in any order."""
        order, rows, cols, _ = self.by_col()
        out = torch.empty(len(self), dtype=W_FX.dtype, device=W_FX.device)
        out[order] = torch.ops.aten._embedding_bag_per_sample_weights_backward(
            _aligned(M_BX), _aligned(W_FX), cols, self.row_starts(), rows, 0, -1)
        return out

    def sum_by_row(self, weights: torch.Tensor, M_FX: torch.Tensor) -> torch.Tensor:
        """[B, X]: Σ over each sample's entries n of weights[n] · M[cols[n]]."""
        return F.embedding_bag(self.cols, M_FX, self.row_starts(), mode="sum",
                               per_sample_weights=weights)


class ActiveSet:
    """The listed entries of R runs and L layers, ``lists[r][l]``, and their activations
    ``vals[r][l]`` (in the autograd graph): what a sparse decode reads in place of a
    [R,B,L,F] support mask (``Transcoder.write`` indexes it by run like one)."""

    def __init__(self, lists: list[list[Listed]], vals: list[list[torch.Tensor]],
                 n_rows: int, n_cols: int):
        self.lists, self.vals, self.n_rows, self.n_cols = lists, vals, n_rows, n_cols

    def __getitem__(self, runs) -> ActiveSet:
        runs = (range(*runs.indices(len(self.lists))) if isinstance(runs, slice)
                else [int(r) for r in runs])
        return ActiveSet([self.lists[r] for r in runs], [self.vals[r] for r in runs],
                         self.n_rows, self.n_cols)

    def source(self, s: int) -> list[tuple[Listed, torch.Tensor]]:
        """(entries, activations) of layer s for each run."""
        return [(lst[s], v[s]) for lst, v in zip(self.lists, self.vals, strict=True)]

    @torch.no_grad()
    def fired(self) -> torch.Tensor:
        """[R, L, F] bool: the features positive for some sample, ``(acts > 0).any(1)``
        read from the listed entries instead of from every activation."""
        R, L = len(self.lists), len(self.lists[0])
        out = torch.zeros(R, L, self.n_cols, dtype=torch.bool, device=self.vals[0][0].device)
        for r, layer, lst in each_list(self.lists):
            out[r, layer, lst.cols[self.vals[r][layer] > 0]] = True
        return out

    def dense(self) -> torch.Tensor:
        """[R,B,L,F]: the activations, zero outside the listed entries; in the autograd
        graph through ``vals`` (each slot is written once: no accumulation order)."""
        R, L = len(self.lists), len(self.lists[0])
        vals = [v for per_run in self.vals for v in per_run]
        index = [(torch.full_like(lst.rows, r), lst.rows, torch.full_like(lst.rows, layer),
                  lst.cols) for r, layer, lst in each_list(self.lists)]
        out = vals[0].new_zeros(R, self.n_rows, L, self.n_cols)
        return out.index_put(tuple(torch.cat(axis) for axis in zip(*index, strict=True)),
                             torch.cat(vals))

    @torch.no_grad()
    def l0(self) -> torch.Tensor:
        """[R, B]: each sample's count of positive activations over all layers, ``(acts >
        0)`` summed per sample, from the listed entries."""
        out = torch.zeros(len(self.lists), self.n_rows, device=self.vals[0][0].device)
        for r, layer, lst in each_list(self.lists):
            out[r] += torch.bincount(lst.rows[self.vals[r][layer] > 0], minlength=self.n_rows)
        return out

    def sparse_R(self) -> torch.Tensor:
        """[R] bool: which runs list few enough entries for the sparse arithmetic."""
        slots = self.n_rows * len(self.lists[0]) * self.n_cols
        return torch.tensor([sparse_enough(sum(map(len, layers)), slots)
                             for layers in self.lists])


# ---- decode -----------------------------------------------------------------------------
class _ListedDecode(torch.autograd.Function):
    """y[b] = Σ_n vals[n] · W[cols[n]] over sample b's entries, forward and backward."""

    @staticmethod
    def forward(ctx, vals, W_FX, lst: Listed):
        ctx.save_for_backward(vals, W_FX)
        ctx.lst = lst
        return lst.sum_by_row(vals, W_FX)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_BX):
        vals, W_FX = ctx.saved_tensors
        lst = ctx.lst
        g_vals = g_W = None
        if ctx.needs_input_grad[0]:  # ⟨g_b, W_f⟩ for the listed entries only
            g_vals = lst.dots(g_BX, W_FX)
        if ctx.needs_input_grad[1]:  # Σ_n vals[n] g_{rows[n]} into the listed rows only
            g_W = lst.sum_by_col(vals, g_BX.contiguous())
        return g_vals, g_W, None


def sparse_source_decode(acts_BF: torch.Tensor, support, W_FX: torch.Tensor) -> torch.Tensor:
    """[B, X] = acts_BF @ W_FX reading only the rows of the listed features; the backward
    likewise touches only those rows and computes the activations' gradient for those
    features only. ``support`` is a pair (``Listed``, their activations), which then stand
    for ``acts_BF``, or a [B, F] bool mask, which must cover every feature whose activation
    gradient matters (for JumpReLU also the ones just below the threshold, which its
    straight-through estimator reads)."""
    if isinstance(support, tuple):
        lst, vals = support
    else:
        rows, cols = support.nonzero(as_tuple=True)  # row-major: samples in order
        lst, vals = Listed(rows, cols, *acts_BF.shape), acts_BF[rows, cols]
    return _ListedDecode.apply(vals, W_FX, lst)


# ---- encoder ------------------------------------------------------------------------------
def _x_of(x: torch.Tensor, r: int, layer: int) -> torch.Tensor:
    """[B, D]: run r's input at ``layer`` (x shared [B,L,D] or per run [R,B,L,D])."""
    return x[:, layer] if x.dim() == 3 else x[r, :, layer]


class Selection:
    """TopK (per sample) or BatchTopK (per batch) selection of the ReLU'd pre-activations,
    listing the kept entries as it keeps them. ``k_R``: each run's k. After a call,
    ``lists[r][l]`` hold the entries (without values) and, for BatchTopK, ``cut_RL`` each
    run's smallest kept positive value (its threshold estimate; 0 if none)."""

    def __init__(self, kind: str, k_R: list[int], joint: bool):
        self.kind, self.k_R, self.joint = kind, k_R, joint
        self.lists: list[list[Listed]] = []
        self.cut_RL: torch.Tensor | None = None

    def __call__(self, pre_RBLF: torch.Tensor, b_RLF: torch.Tensor) -> torch.Tensor:
        """The kept values of every run and layer in list order [N], the encoder bias
        ``b_RLF`` first added to ``pre_RBLF`` in place (by TopK's kernel as it reads each
        row). No dense activations are built: at real widths zeroing a [R,B,L,F] tensor
        every step costs about two thirds of the selection itself (measured 27 vs 42 ms at
        4,096 × 8,192, k = 32); ``ActiveSet.dense`` builds it when something reads it."""
        R = pre_RBLF.shape[0]
        pick = self._per_sample if self.kind == "topk" else self._per_batch
        cuts, vals = [], []
        for r in range(R):
            lists, v, cut = pick(pre_RBLF[r], b_RLF[r], self.k_R[r])
            self.lists.append(lists)
            vals += v
            cuts.append(cut)
        if self.kind == "batchtopk":
            self.cut_RL = torch.stack(cuts)
        return torch.cat(vals)

    def _per_sample(self, pre_BLF, b_LF, k):
        B, L, F = pre_BLF.shape
        rows_BK = torch.arange(B, device=pre_BLF.device)[:, None]
        if not self.joint:  # k per sample and layer: every sample lists k entries
            v, i = topk_rows(pre_BLF, min(k, F), bias=b_LF)  # row (b, l) gets b_LF[l]
            v = v.relu()  # on the k kept values, not on all B·F
            kk = v.shape[-1]
            rows = rows_BK.expand(B, kk).reshape(-1)
            starts = torch.arange(B, device=v.device) * kk
            lists = [Listed(rows, i[:, layer].reshape(-1), B, F, starts)
                     for layer in range(L)]
            return lists, [v[:, layer].reshape(-1) for layer in range(L)], None
        v, i = topk_rows(pre_BLF.reshape(B, L * F), min(k, L * F), bias=b_LF.reshape(1, -1))
        return self._split(rows_BK.expand_as(i), i // F, i % F, v.relu(), B, L, F)

    def _per_batch(self, pre_BLF, b_LF, k):
        B, L, F = pre_BLF.shape
        pre_BLF.add_(b_LF)
        if self.joint:  # k·B over all samples and layers
            flat = [pre_BLF.reshape(-1)]
        else:  # k·B per layer over all samples
            flat = [pre_BLF[:, layer].reshape(-1) for layer in range(L)]
        lists, vals, cuts = [], [], []
        for f in flat:
            v, i = f.topk(min(k * B, f.numel()), sorted=False)
            i, order = i.sort()  # samples in order
            v = v[order].relu()
            cuts.append(torch.where(v > 0, v, torch.inf).amin().nan_to_num(posinf=0.0)
                        if len(v) else v.new_zeros(()))
            if self.joint:
                lists, vals, _ = self._split(i // (L * F), (i // F) % L, i % F, v, B, L, F)
                return lists, vals, cuts[0].expand(L)
            lists.append(Listed(i // F, i % F, B, F))
            vals.append(v)
        return lists, vals, torch.stack(cuts)

    @staticmethod
    def _split(rows, layer, cols, v, B, L, F):
        """Entries over all layers (in sample order) as one list per layer."""
        lists, vals = [], []
        for j in range(L):
            m = layer == j
            lists.append(Listed(rows[m], cols[m], B, F))
            vals.append(v[m])
        return lists, vals, None

    def active_set(self, vals_N: torch.Tensor) -> ActiveSet:
        """The lists with their values (slices of ``vals_N``, in the autograd graph). The
        lists are the very objects the encoder's backward reads: their index structures
        are built once for both."""
        L = len(self.lists[0])
        pieces = vals_N.split([len(lst) for layers in self.lists for lst in layers])
        vals = [list(pieces[r * L:(r + 1) * L]) for r in range(len(self.lists))]
        return ActiveSet(self.lists, vals, self.lists[0][0].n_rows, self.lists[0][0].n_cols)


def _encode_into(pre_RBLF, x, W_RLDF, b_RLF=None) -> None:
    """pre[r, :, l] = x_l W[r, l] (+ b[r, l]): one ``mm`` or ``addmm`` per run and layer (the
    call a run makes alone), a bias added in the product's own pass."""
    R, L = W_RLDF.shape[:2]
    for r in range(R):
        for layer in range(L):
            x_BD, out = _x_of(x, r, layer), pre_RBLF[r, :, layer]
            if b_RLF is None:
                torch.mm(x_BD, W_RLDF[r, layer], out=out)
            else:
                torch.addmm(b_RLF[r, layer], x_BD, W_RLDF[r, layer], out=out)


def _dense_gradient(g_pre, g_vals, vals, select, shape) -> torch.Tensor:
    """[R,B,L,F]: every gradient reaching the pre-activations, summed densely."""
    G = g_pre.clone() if g_pre is not None else torch.zeros(shape, dtype=vals.dtype,
                                                            device=vals.device)
    if g_vals is not None:  # a kept value is z where positive (its ReLU), else 0
        flat = each_list(select.lists)
        pieces = (g_vals * (vals > 0)).split([len(lst) for _, _, lst in flat])
        for (r, layer, lst), g in zip(flat, pieces, strict=True):
            G[r, :, layer].index_put_((lst.rows, lst.cols), g, accumulate=True)
    return G


def _entries_of(G_BLF: torch.Tensor) -> tuple[list[Listed], list[torch.Tensor]]:
    """One run's nonzero gradient entries, listed per layer (in sample order), and their
    values."""
    B, L, F = G_BLF.shape
    b, layer, f = G_BLF.nonzero(as_tuple=True)  # row-major: samples in order
    lists, grads = [], []
    for j in range(L):
        m = layer == j
        lists.append(Listed(b[m], f[m], B, F))
        grads.append(G_BLF[b[m], j, f[m]])
    return lists, grads


def _plans(ctx, g_pre, g_vals):
    """Per run: ("listed", lists, gradients per layer) or ("dense", G [B,L,F]). Each run is
    judged on its own numbers: sparse enough (``sparse_enough``) or not."""
    x, W, *kept = ctx.saved_tensors
    select = ctx.select
    R, L, _, F = W.shape
    B = x.shape[-3]
    if g_pre is None:  # only the listed values' gradients: no scan
        (vals,) = kept
        flat = [lst for layers in select.lists for lst in layers]
        # through the ReLU on the kept values: kept and positive
        pieces = (g_vals * (vals > 0)).split([len(lst) for lst in flat])
        if all(sparse_enough(sum(map(len, layers)), B * L * F) for layers in select.lists):
            return [("listed", layers, pieces[r * L:(r + 1) * L])
                    for r, layers in enumerate(select.lists)]
    # Some gradient arrives dense (or a run lists too many entries): sum it all densely and
    # list each sparse run's nonzero entries. Bit for bit what the listed path gives a run:
    # per feature the same samples in the same order, less entries whose gradient is 0.
    vals = kept[0] if kept else None
    G = _dense_gradient(g_pre, g_vals, vals, select, (R, B, L, F))
    nz_R = (G != 0).flatten(1).sum(1).tolist()
    return [("listed", *_entries_of(G[r])) if sparse_enough(nz_R[r], B * L * F)
            else ("dense", G[r]) for r in range(R)]


class _SparseEncode(torch.autograd.Function):
    """z = x W + b for every run and layer, optionally followed by a ``Selection``; the
    backward reads only the gradient's nonzero entries when a run has few of them."""

    @staticmethod
    def forward(ctx, x, W_RLDF, b_RLF, select: Selection | None):
        R, L, _, F = W_RLDF.shape
        pre = W_RLDF.new_empty(R, x.shape[-3], L, F)
        # A selection adds the bias itself, as it reads: addmm's bias is a pass of its own
        # over the [B, F] product (a copy before the product; 32 of 340 ms a TopK step).
        _encode_into(pre, x, W_RLDF, b_RLF if select is None else None)
        ctx.select = select
        ctx.set_materialize_grads(False)  # outputs nobody reads get no gradient tensor
        if select is None:
            ctx.save_for_backward(x, W_RLDF)
            return pre
        vals = select(pre, b_RLF.detach())
        ctx.save_for_backward(x, W_RLDF, vals)
        return pre, vals

    @staticmethod
    @once_differentiable
    def backward(ctx, g_pre, g_vals=None):
        if g_pre is None and g_vals is None:
            return None, None, None, None
        x, W = ctx.saved_tensors[:2]
        need_x, need_W, need_b = ctx.needs_input_grad[:3]
        R, L, D, F = W.shape
        gx = torch.zeros_like(x) if need_x else None
        gW = torch.empty_like(W) if need_W else None
        gb = torch.empty(R, L, F, dtype=W.dtype, device=W.device) if need_b else None
        for r, (kind, *plan) in enumerate(_plans(ctx, g_pre, g_vals)):
            for layer in range(L):
                x_BD = _x_of(x, r, layer)
                gx_BD = None if gx is None else _x_of(gx, r, layer)
                if kind == "listed":
                    _listed_layer(plan[0][layer], plan[1][layer], x_BD, W[r, layer], gW, gb,
                                  gx_BD, r, layer)
                else:
                    _dense_layer(plan[0][:, layer], x_BD, W[r, layer], gW, gb, gx_BD, r,
                                 layer)
        return gx, gW, gb, None


def _listed_layer(lst: Listed, g_N, x_BD, W_DF, gW, gb, gx_BD, r, layer) -> None:
    """Gradients of one run's and layer's encoder from its listed entries: B·k·D
    multiply-adds where the dense product takes B·F·D."""
    if gW is not None:
        _transpose_into(gW[r, layer], lst.sum_by_col(g_N, _aligned(x_BD)))  # from [F, D]
    if gb is not None:  # each feature's gradients summed in sample order, as sum_by_col does
        gb[r, layer] = torch.zeros_like(gb[r, layer]).index_add_(0, lst.cols, g_N)
    if gx_BD is not None:
        gx_BD += lst.sum_by_row(g_N, W_DF.t().contiguous())


def _transpose_into(dst_DF: torch.Tensor, src_FD: torch.Tensor, block: int = 256) -> None:
    """dst = srcᵀ in blocks of features: a plain strided copy reads a new cache line of the
    source for every element it writes (measured 15 vs 4 ms for 8192 x 512)."""
    for i in range(0, src_FD.shape[0], block):
        dst_DF[:, i:i + block] = src_FD[i:i + block].t()


def _dense_layer(G_BF, x_BD, W_DF, gW, gb, gx_BD, r, layer) -> None:
    """The same gradients as dense products, one BLAS call per run and layer."""
    if gW is not None:
        torch.mm(x_BD.t(), G_BF, out=gW[r, layer])
    if gb is not None:
        gb[r, layer] = G_BF.sum(0)
    if gx_BD is not None:
        gx_BD += G_BF @ W_DF.t()


def sparse_encode(x: torch.Tensor, W_RLDF: torch.Tensor, b_RLF: torch.Tensor,
                  select: Selection | None = None):
    """Pre-activations [R,B,L,F] of inputs shared ([B,L,D]) or per run ([R,B,L,D]); with a
    ``Selection``, (pre-activations, ``ActiveSet`` of the kept entries), whose ``dense()``
    gives the activations [R,B,L,F]. For wide, sparse transcoders: see the module's
    docstring."""
    if select is None:
        return _SparseEncode.apply(x, W_RLDF, b_RLF, None)
    pre, vals = _SparseEncode.apply(x, W_RLDF, b_RLF, select)
    return pre, select.active_set(vals)
