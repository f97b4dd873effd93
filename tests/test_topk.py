"""clt_eval.topk: the compiled per-row top-k against an independent reference (a stable
descending sort: largest first, NaN above every number, ties to the lower column)."""

import pytest
import torch

from clt_eval.topk import MAX_K, compiled, topk_rows


def reference(z: torch.Tensor, k: int):
    cols = z.sort(dim=-1, descending=True, stable=True).indices[..., :k].sort(dim=-1).values
    return z.gather(-1, cols), cols


def same(z: torch.Tensor, k: int) -> None:
    vals, cols = topk_rows(z, k)
    ref_vals, ref_cols = reference(z, k)
    assert torch.equal(cols, ref_cols)
    assert torch.equal(vals.nan_to_num(7.0), ref_vals.nan_to_num(7.0))  # NaN == NaN here


def rows(seed: int, n: int, m: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(n, m, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("k", [1, 7, 32, 65, 300])
def test_random_rows(k):
    z = rows(0, 200, 4096)
    assert compiled(z, k)
    same(z, k)


def test_hostile_rows():
    z = rows(1, 64, 2048)
    ascending = z.sort(dim=-1).values  # every entry beats the ones before: the list refills
    same(ascending, 32)
    same(ascending.flip(-1), 32)
    same(torch.randint(0, 4, (64, 2048), generator=torch.Generator().manual_seed(2)).float(),
         32)  # many ties at the cut
    same(torch.zeros(8, 1000), 9)  # all tied: the lowest columns
    with_nan = z.clone()
    with_nan[with_nan > 2.0] = float("nan")
    with_nan[:, 5] = float("inf")
    with_nan[:, 9] = -float("inf")
    same(with_nan, 32)
    same(torch.full((4, 512), float("nan")), 16)
    same(torch.full((4, 512), -float("inf")), 16)
    odd = rows(3, 16, 3001)  # width not a multiple of the groups or of 8
    odd[:, ::7] = -float("inf")
    same(odd, 50)


def test_shapes_dtypes_and_threads():
    same(rows(4, 100, 2000, torch.float64), 32)
    z3 = rows(5, 300, 1024).view(100, 3, 1024)
    vals, cols = topk_rows(z3, 32)
    assert vals.shape == cols.shape == (100, 3, 32)
    same(z3, 32)
    before = torch.get_num_threads()
    try:  # rows split over threads give the same entries as one thread
        torch.set_num_threads(1)
        one = topk_rows(rows(6, 512, 1024), 16)
        torch.set_num_threads(2)
        two = topk_rows(rows(6, 512, 1024), 16)
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(one, two, strict=True))


def test_fallback_sorts_by_column_too():
    narrow = rows(7, 50, 100)
    assert not compiled(narrow, 5)
    vals, cols = topk_rows(narrow, 5)
    assert torch.equal(cols, cols.sort(dim=-1).values)
    assert torch.equal(vals, narrow.gather(-1, cols))
    assert torch.equal(cols, reference(narrow, 5)[1])
    wide = rows(8, 2, 16 * MAX_K)
    assert not compiled(wide, MAX_K + 1)
    assert torch.equal(topk_rows(wide, MAX_K + 1)[1], reference(wide, MAX_K + 1)[1])


@pytest.mark.parametrize("width,k", [(1024, 16), (100, 5)])  # the kernel, then torch.topk
def test_bias_is_added_in_place_row_by_row(width, k):
    z = rows(9, 12, width)
    bias = rows(10, 3, width)
    raised = (z.view(4, 3, width) + bias).view(12, width)
    vals, cols = topk_rows(z, k, bias=bias)
    assert torch.equal(z, raised)  # row r got bias[r % 3]
    ref_vals, ref_cols = reference(raised, k)
    assert torch.equal(cols, ref_cols) and torch.equal(vals, ref_vals)
    with pytest.raises(ValueError, match=r"bias \(5, "):
        topk_rows(z, k, bias=rows(11, 5, width))


def test_a_forked_child_gets_threads_of_its_own():
    import multiprocessing

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        z = rows(12, 512, 1024)
        expected = topk_rows(z, 8)[1]  # the parent's pool now exists
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(1) as pool:
            got = pool.apply_async(_select_in_child, (z, 8)).get(timeout=60)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got, expected)


def _select_in_child(z, k):
    torch.set_num_threads(2)
    return topk_rows(z, k)[1]
