"""Second moments of per-sample gradients in a Kronecker basis (docs/math.md §3).

EKFAC's and TEKFAC's re-scaling is the diagonal of the Fisher block in the basis
``Q_A ⊗ Q_G`` (or ``Q_Φ ⊗ Q_Ψ``)::

    S_batch = (1/M) Σ_i (Q_Gᵀ ∇W̄_i Q_A)^{⊙2},    ∇W̄_i = Σ_t g_{i,t} ā_{i,t}ᵀ   (d_out, d_in')

from the rows ``a`` ``(M, P, d_in')`` and per-sample ``g`` ``(M, P, d_out)`` of
:class:`~natgrad.capture.LayerStats`. With one position per sample (``P = 1``: a plain
Linear layer) ``∇W̄_i`` is the outer product ``g_i ā_iᵀ`` and the whole sum is one matmul
of squared projections; with several positions (Conv2d) the per-sample gradients are
formed a chunk of samples at a time, never more than one batch of them.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["basis_second_moment", "per_sample_grads"]

#: At most this many elements of per-sample gradients exist at once (float32: 64 MiB).
CHUNK_ELEMENTS = 1 << 24


def per_sample_grads(a: Tensor, g: Tensor) -> Tensor:
    """``∇W̄_i = Σ_t g_{i,t} ā_{i,t}ᵀ`` for every sample: ``(M, d_out, d_in')``.

    ``a`` is ``(M, P, d_in')``, ``g`` ``(M, P, d_out)`` (per-sample ``g_i``,
    docs/math.md §1), so ``∇W̄_i`` is the gradient of sample ``i``'s own loss ``ℓ_i``.
    """
    return torch.bmm(g.transpose(1, 2), a)


def basis_second_moment(
    a: Tensor, g: Tensor, Q_A: Tensor, Q_G: Tensor, *, chunk_elements: int = CHUNK_ELEMENTS
) -> Tensor:
    """``(1/M) Σ_i (Q_Gᵀ ∇W̄_i Q_A)^{⊙2}``, shape ``(d_out, d_in')`` (docs/math.md §3).

    Args:
        a: input rows ``(M, P, d_in')``.
        g: per-sample output-gradient rows ``(M, P, d_out)``.
        Q_A: orthogonal ``(d_in', d_in')`` basis of the input side.
        Q_G: orthogonal ``(d_out, d_out)`` basis of the output side.
        chunk_elements: upper bound on the number of per-sample-gradient entries held at
            once when ``P > 1`` (at least one sample, at most the batch, is processed).
    """
    m, p, d_in = a.shape
    d_out = g.shape[-1]
    if p == 1:
        # ∇W̄_i = g_i āᵢᵀ, so (Q_Gᵀ g_i āᵢᵀ Q_A)^{⊙2} = (Q_Gᵀg_i)^{⊙2} ((Q_Aᵀā_i)^{⊙2})ᵀ.
        g_rot = (g[:, 0] @ Q_G).square_()
        a_rot = (a[:, 0] @ Q_A).square_()
        return g_rot.T @ a_rot / m
    chunk = max(1, min(m, chunk_elements // max(1, d_out * d_in)))
    # Forming ∇W̄_i first and rotating it costs M·d_out·d_in'·(P + d_in' + d_out);
    # rotating the rows first costs M·P·(d_in'² + d_out² + d_out·d_in'). Take the cheaper.
    rows_first = p * (d_in * d_in + d_out * d_out + d_out * d_in) < d_out * d_in * (
        p + d_in + d_out
    )
    if rows_first:
        a, g = a @ Q_A, g @ Q_G
    out = torch.zeros(d_out, d_in, dtype=a.dtype, device=a.device)
    for start in range(0, m, chunk):
        grads = per_sample_grads(a[start : start + chunk], g[start : start + chunk])
        if not rows_first:
            grads = Q_G.T @ grads @ Q_A
        out += grads.square_().sum(dim=0)
    return out / m
