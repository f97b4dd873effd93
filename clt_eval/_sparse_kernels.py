"""Compiled CPU kernels (numba) for wide sparse transcoders: ``rows_topk`` behind
``clt_eval.topk.topk_rows`` (see that module for the method) and ``by_column``, which groups
listed entries by feature for ``clt_eval.sparse.Listed``. Module-level functions, not
closures: numba's on-disk cache keys a closure on its captured objects, which differ in
every process, so a closure would compile on every run."""

import numba
import numpy as np


@numba.njit(inline="always")
def better(va, ia, vb, ib):
    """(va, column ia) ranks above (vb, ib): larger value, NaN above every number,
    then the lower column."""
    if va != va:
        return vb == vb or ia < ib
    if vb != vb:
        return False
    return va > vb or (va == vb and ia < ib)


@numba.njit(cache=True)
def best_first(cv, ci, n, k):
    """Quickselect: cv/ci[:n] rearranged so that [:k] hold the best k, cv[k-1] the
    k-th best of all."""
    lo, hi, t = 0, n - 1, k - 1
    while lo < hi:
        a, b, c = lo, (lo + hi) >> 1, hi  # median of three as the pivot
        if better(cv[b], ci[b], cv[a], ci[a]):
            a, b = b, a
        if better(cv[c], ci[c], cv[b], ci[b]):
            b, c = c, b
            if better(cv[b], ci[b], cv[a], ci[a]):
                a, b = b, a
        cv[b], cv[hi] = cv[hi], cv[b]
        ci[b], ci[hi] = ci[hi], ci[b]
        pv, pi = cv[hi], ci[hi]
        s = lo
        for j in range(lo, hi):
            if better(cv[j], ci[j], pv, pi):
                cv[j], cv[s] = cv[s], cv[j]
                ci[j], ci[s] = ci[s], ci[j]
                s += 1
        cv[s], cv[hi] = cv[hi], cv[s]
        ci[s], ci[hi] = ci[hi], ci[s]
        if s == t:
            return
        if s < t:
            lo = s + 1
        else:
            hi = s - 1


@numba.njit(cache=True)
def group_bar(row, k, gv, gi):
    """The k-th largest of the G = len(gv) group maxima (column j in group j mod G):
    the row's k-th largest entry is at least this (or NaN)."""
    G, M = len(gv), len(row)
    for g in range(G):
        gv[g] = row[g]
        gi[g] = g
    for j0 in range(G, M - G + 1, G):
        block = row[j0:j0 + G]  # a slice: LLVM then sees no overlap with gv, vectorises
        for g in range(G):
            v = block[g]
            gv[g] = v if v > gv[g] else gv[g]
    for j in range(max(G, M - M % G), M):
        if row[j] > gv[j % G]:
            gv[j % G] = row[j]
    best_first(gv, gi, G, k)
    return gv[k - 1]


@numba.njit(cache=True)
def row_topk(row, k, cv, ci, gv, gi, mask, out_v, out_i):
    """The best k of ``row`` into out_v/out_i in column order; cv/ci list the entries
    that reach the bar, ``mask`` (zero-padded to whole words) flags them."""
    M = len(row)
    bar = group_bar(row, k, gv, gi)
    for j in range(M):  # which entries reach the bar: a vectorised compare
        mask[j] = not (row[j] < bar)
    words = mask.view(np.uint64)  # 8 flags a word; the padding past M stays 0
    n, strict = 0, False
    for w in range(len(words)):
        if words[w] == 0:
            continue
        for j in range(8 * w, min(8 * w + 8, M)):
            v = row[j]
            # once the list has been cut, a later column must beat the bar outright
            if not mask[j] or (strict and not (v > bar or (v != v and bar == bar))):
                continue
            if n == len(cv):  # full: keep the best k, raise the bar to the k-th
                best_first(cv, ci, n, k)
                n, bar, strict = k, cv[k - 1], True
                if not (v > bar or (v != v and bar == bar)):
                    continue
            cv[n] = v
            ci[n] = j
            n += 1
    best_first(cv, ci, n, k)
    if k <= 64:  # the kept k in column order: insertion sort while k is small
        for a in range(1, k):
            ta, tv, b = ci[a], cv[a], a - 1
            while b >= 0 and ci[b] > ta:
                ci[b + 1] = ci[b]
                cv[b + 1] = cv[b]
                b -= 1
            ci[b + 1] = ta
            cv[b + 1] = tv
        for j in range(k):
            out_v[j] = cv[j]
            out_i[j] = ci[j]
    else:
        order = np.argsort(ci[:k])
        for j in range(k):
            out_v[j] = cv[order[j]]
            out_i[j] = ci[order[j]]


@numba.njit(cache=True, nogil=True, fastmath=False)
def rows_topk(z, k, lo, hi, out_v, out_i, bias):
    """Rows lo..hi-1 of z [N, M] (C-contiguous), each first raised in place by its bias row
    ``bias[r % len(bias)]`` unless ``bias`` has no rows."""
    M = z.shape[1]
    G = max(4 * k, 64)  # groups: ~1.2 k entries of a random row reach their bar
    cv = np.empty(max(4 * k, 64), z.dtype)
    ci = np.empty(len(cv), np.int64)
    gv = np.empty(G, z.dtype)
    gi = np.empty(G, np.int64)
    mask = np.zeros(8 * ((M + 7) // 8), np.uint8)
    for r in range(lo, hi):
        row = z[r]
        if len(bias):  # while the row is in cache: no pass of its own over memory
            b = bias[r % len(bias)]
            for j in range(M):
                row[j] = row[j] + b[j]
        row_topk(row, k, cv, ci, gv, gi, mask, out_v[r], out_i[r])


@numba.njit(cache=True, nogil=True)
def by_column(rows, cols, n_cols, order, rows_out, cols_out, starts):
    """A stable counting sort of entries (rows[n], cols[n]) by column: ``order`` the
    permutation, rows_out/cols_out the entries in that order, ``starts`` [n_cols] where
    each column's entries begin. The same as a stable ``torch.sort`` of ``cols``."""
    nxt = np.zeros(n_cols, np.int64)
    for c in cols:
        nxt[c] += 1
    s = 0
    for f in range(n_cols):
        starts[f] = s
        s += nxt[f]
        nxt[f] = starts[f]
    for n in range(len(cols)):
        c = cols[n]
        p = nxt[c]
        order[p] = n
        rows_out[p] = rows[n]
        cols_out[p] = c
        nxt[c] = p + 1
