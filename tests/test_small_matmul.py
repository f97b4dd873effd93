"""The compiled small products sum every element over k in order, with separate multiplies
and adds: bit for bit what elementwise torch ops give in that order, for any batch."""

from __future__ import annotations

import pytest
import torch

from clt_eval.small_matmul import KERNEL_FILE, kernel_source, small_matmul


def _in_order(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_k a[..., :, k] b[..., k, :] with one elementwise multiply and add per k, k = 0, 1, …"""
    out = a[..., :, :1] * b[..., :1, :]
    for k in range(1, a.shape[-1]):
        out = out + a[..., :, k:k + 1] * b[..., k:k + 1, :]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
# every block of the generated kernel: rows in fours, twos and ones (M = 16, 10, 7, 1, ...),
# columns in eights, fours and ones (N = 16, 20, 13, 5, 1, ...)
@pytest.mark.parametrize("shape", [(13, 8, 5), (16, 10, 16), (16, 16, 20), (1, 7, 1),
                                   (5, 1, 9), (4, 33, 17), (10, 16, 10), (7, 3, 13),
                                   (2, 5, 12), (6, 2, 27)])
def test_each_element_is_its_in_order_sum(shape, dtype):
    M, K, N = shape
    g = torch.Generator().manual_seed(0)
    # magnitudes far apart, so that any other order or a fused multiply-add rounds differently
    a = (torch.randn(7, 2, M, K, generator=g) * torch.logspace(-6, 6, K)).to(dtype)
    b = torch.randn(7, 2, K, N, generator=g, dtype=dtype)
    out = small_matmul(a, b)
    assert out.dtype == dtype and out.shape == (7, 2, M, N)
    assert torch.equal(out, _in_order(a, b))
    assert torch.equal(small_matmul(a[:1], b), _in_order(a[:1], b))  # a shared by the runs
    torch.testing.assert_close(out, a @ b, rtol=1e-4, atol=1e-3 * float(a.abs().max()))


def test_an_element_does_not_depend_on_the_batch_around_it():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(300, 13, 8, generator=g), torch.randn(300, 8, 5, generator=g)
    full = small_matmul(a, b)
    for r in (0, 17, 299):
        assert torch.equal(small_matmul(a[r:r + 1], b[r:r + 1])[0], full[r])
    assert torch.equal(small_matmul(a.flip(0), b.flip(0)), full.flip(0))


def test_the_generated_kernel_is_current():
    """The compiled source is what the generator writes (``python -m clt_eval.small_matmul``)."""
    assert KERNEL_FILE.read_text() == kernel_source()


def test_empty_products():
    assert small_matmul(torch.ones(0, 3, 2), torch.ones(0, 2, 4)).shape == (0, 3, 4)
    assert small_matmul(torch.ones(2, 0, 2), torch.ones(2, 2, 4)).shape == (2, 0, 4)
    assert small_matmul(torch.ones(2, 3, 2), torch.ones(2, 2, 0)).shape == (2, 3, 0)
