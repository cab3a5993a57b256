"""The per-step fast paths against the obvious dense computations they replace.

Patch rows gathered from a strided window view (``layers.patch_rows``) against explicit
loops and ``F.unfold``; the symmetric block product ``linalg.gram`` (with the running
average folded in) against ``rowsᵀrows``; ``linalg.all_finite`` against
``torch.isfinite(t).all()``; K-FAC's fused factor update against the two-step formula
``X ← ε X + (1−ε) X_batch``.
"""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from reference import patches_by_loops
from torch import nn

import natgrad
from natgrad import linalg
from natgrad.curvature import KroneckerFactors, NonFiniteStatistics
from natgrad.layers import handler_for, patch_rows

pytestmark = pytest.mark.usefixtures("float64", "one_thread")

PATCH_CASES = list(
    itertools.product(
        [(3, 3), (2, 3), (1, 1)], [1, 2, (2, 1)], [0, 1, (2, 0)], [1, 2], [True, False]
    )
)


@pytest.mark.parametrize("kernel,stride,padding,dilation,bias", PATCH_CASES)
def test_patch_rows_equal_loops_and_unfold(kernel, stride, padding, dilation, bias):
    conv = nn.Conv2d(2, 3, kernel, stride=stride, padding=padding, dilation=dilation, bias=bias)
    x = torch.randn(3, 2, 9, 8)
    rows = handler_for(conv).input_rows(conv, x)
    assert torch.equal(rows, patches_by_loops(x, conv))
    unfolded = F.unfold(
        x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride
    ).transpose(1, 2)
    assert torch.equal(rows[..., : unfolded.shape[-1]], unfolded)
    assert rows.is_contiguous()


def test_patch_rows_of_strided_layouts_and_unbatched_input():
    conv = nn.Conv2d(3, 2, 3, padding="same")
    x = torch.randn(4, 3, 7, 6)
    ref = patches_by_loops(x, nn.Conv2d(3, 2, 3, padding=1))
    handler = handler_for(conv)
    channels_last = x.to(memory_format=torch.channels_last)
    sliced = torch.randn(4, 3, 7, 12)[..., ::2]  # non-contiguous, storage offset 0
    sliced.copy_(x)
    offset = torch.randn(5, 3, 7, 6)[1:]  # storage offset ≠ 0
    offset.copy_(x)
    for layout in (channels_last, sliced, offset):
        assert torch.equal(handler.input_rows(conv, layout), ref)
    assert torch.equal(handler.input_rows(conv, x[1]), ref[1:2])


def test_patch_rows_reject_an_input_smaller_than_the_kernel():
    with pytest.raises(ValueError, match="smaller than the dilated kernel 5×5"):
        patch_rows(torch.randn(1, 1, 3, 3), (3, 3), (2, 2), (0, 0), (1, 1), True)


@pytest.mark.parametrize("n,d", [(7, 5), (3, 9), (40, 17), (64, 30)])
@pytest.mark.parametrize("blocked", [False, True])
def test_gram_equals_dense_product(monkeypatch, n, d, blocked):
    if blocked:  # force the symmetric block path onto small matrices
        monkeypatch.setattr(linalg, "GRAM_MIN_COLUMNS", 1)
    rows = torch.randn(n, d)
    acc = torch.randn(d, d)
    acc = acc + acc.T
    dense = rows.T @ rows
    torch.testing.assert_close(linalg.gram(rows), dense, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(linalg.gram(rows, 0.3), 0.3 * dense, rtol=1e-13, atol=1e-13)
    out = linalg.gram(rows, 0.05 / n, acc=acc, beta=0.95)
    torch.testing.assert_close(out, 0.95 * acc + 0.05 * dense / n, rtol=1e-13, atol=1e-13)
    # β = 0 ignores acc entirely, NaN included (as a first running-average step must).
    nan_acc = torch.full((d, d), math.nan)
    torch.testing.assert_close(linalg.gram(rows, acc=nan_acc, beta=0.0), dense)
    if blocked and n >= d:
        assert torch.equal(out, out.T)  # the lower blocks are the upper ones, mirrored


def test_gram_blocked_path_is_taken_for_tall_wide_rows(monkeypatch):
    calls = []
    real = torch.Tensor.addmm_

    def counted(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "addmm_", counted)
    rows = torch.randn(linalg.GRAM_MIN_COLUMNS + 8, linalg.GRAM_MIN_COLUMNS)
    torch.testing.assert_close(linalg.gram(rows), rows.T @ rows, rtol=1e-12, atol=1e-12)
    assert len(calls) == linalg.GRAM_BLOCKS


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_all_finite_agrees_with_isfinite(dtype):
    big = torch.finfo(dtype).max
    cases = [
        torch.randn(50, 7, dtype=dtype),
        torch.tensor([1.0, math.nan, 2.0], dtype=dtype),
        torch.tensor([math.inf, 1.0], dtype=dtype),
        torch.tensor([-math.inf, 1.0], dtype=dtype),
        torch.tensor([math.inf, -math.inf], dtype=dtype),
        torch.tensor([big, big, -big / 2], dtype=dtype),  # finite, but the sum overflows
        torch.empty(0, 3, dtype=dtype),
        torch.randn(8, 9, dtype=dtype).T,
    ]
    for t in cases:
        assert linalg.all_finite(t) == bool(torch.isfinite(t).all()), t


def _stats(m, p, d_in, d_out):
    return natgrad.LayerStats(torch.randn(m, p, d_in), torch.randn(m, p, d_out))


@pytest.mark.parametrize("blocked", [False, True])
def test_fused_factor_update_equals_running_average_of_batch_factors(monkeypatch, blocked):
    if blocked:
        monkeypatch.setattr(linalg, "GRAM_MIN_COLUMNS", 1)
    curv = KroneckerFactors((4, 6), torch.float64, torch.device("cpu"))
    A_ref = G_ref = None
    for decay in [0.0, 0.9, 0.5, 0.95]:
        stats = _stats(5, 9, 6, 4)
        curv.update(stats, decay)
        A_b, G_b = linalg.input_factor(stats.a), linalg.output_factor(stats.g)
        A_ref = linalg.running_average(A_ref, A_b, decay)
        G_ref = linalg.running_average(G_ref, G_b, decay)
        A, G = curv.factors()
        torch.testing.assert_close(A, A_ref, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(G, G_ref, rtol=1e-13, atol=1e-13)


def test_fused_update_leaves_state_untouched_on_a_non_finite_batch():
    curv = KroneckerFactors((4, 6), torch.float64, torch.device("cpu"))
    curv.update(_stats(5, 2, 6, 4), 0.0)
    before = curv.state_dict()
    bad = _stats(5, 2, 6, 4)
    bad.g[1, 0, 2] = math.nan
    with pytest.raises(NonFiniteStatistics):
        curv.update(bad, 0.9)
    for key, value in curv.state_dict().items():
        assert torch.equal(value, before[key])


def test_fused_update_with_a_non_finite_state_follows_the_formula():
    # A corrupted running factor is not the batch's fault: the update goes through as
    # ε X + (1−ε) X_batch would (the inverse refresh then reports the fault).
    curv = KroneckerFactors((4, 6), torch.float64, torch.device("cpu"))
    curv.update(_stats(5, 2, 6, 4), 0.0)
    curv.A[0, 0] = math.inf
    curv.update(_stats(5, 2, 6, 4), 0.9)
    assert curv.A[0, 0] == math.inf and torch.isfinite(curv.A[1:, 1:]).all()


def test_damped_inverse_equals_dense_inverse():
    X = torch.randn(30, 12)
    X = X.T @ X / 30
    ref = torch.linalg.inv(X + 0.2 * torch.eye(12))
    torch.testing.assert_close(linalg.damped_inverse(X, 0.2), ref, rtol=1e-10, atol=1e-12)
    X[3, 3] = math.nan
    with pytest.raises(linalg.DecompositionError):
        linalg.damped_inverse(X, 0.2)
