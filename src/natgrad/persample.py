"""Second moments of per-sample gradients in a Kronecker basis (docs/math.md §3).

EKFAC's and TEKFAC's re-scaling is the diagonal of the Fisher block in the basis
``Q_A ⊗ Q_G`` (or ``Q_Φ ⊗ Q_Ψ``)::

    S_batch = (1/M) Σ_i (Q_Gᵀ ∇W̄_i Q_A)^{⊙2},    ∇W̄_i = Σ_t g_{i,t} ā_{i,t}ᵀ   (d_out, d_in')

from the rows ``a`` ``(M, P, d_in')`` and per-sample ``g`` ``(M, P, d_out)`` of
:class:`~natgrad.capture.LayerStats`. With one position per sample (``P = 1``: a plain
Linear layer) ``∇W̄_i`` is the outer product ``g_i ā_iᵀ`` and the whole sum is one matmul
of squared projections; with several positions (Conv2d) the per-sample gradients are
formed a chunk of samples at a time, never more than one batch of them.

When a wide input factor keeps only its top-``k`` eigenvectors ``U`` ``(d_in', k)``
(docs/math.md §3, "Wide input factors"), the same moment is taken on the ``k`` columns of
``U`` (:func:`basis_second_moment` accepts a basis with fewer columns than rows) and, for
the rest of the space ``P = I − UUᵀ``, as one mean per row of ``Q_Gᵀ ∇W̄_i``
(:func:`complement_second_moment`), without forming any ``d_in' × d_in'`` matrix.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["basis_second_moment", "complement_second_moment", "per_sample_grads"]

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
    """``(1/M) Σ_i (Q_Gᵀ ∇W̄_i Q_A)^{⊙2}``, shape ``(d_out, k)`` (docs/math.md §3).

    Args:
        a: input rows ``(M, P, d_in')``.
        g: per-sample output-gradient rows ``(M, P, d_out)``.
        Q_A: ``(d_in', k)`` orthonormal columns of the input side: the whole orthogonal
            basis (``k = d_in'``) or the top-``k`` eigenvectors ``U`` of a wide factor.
        Q_G: orthogonal ``(d_out, d_out)`` basis of the output side.
        chunk_elements: upper bound on the number of per-sample-gradient entries held at
            once when ``P > 1`` (at least one sample, at most the batch, is processed).
    """
    m, p, d_in = a.shape
    d_out, k = g.shape[-1], Q_A.shape[1]
    if p == 1:
        # ∇W̄_i = g_i āᵢᵀ, so (Q_Gᵀ g_i āᵢᵀ Q_A)^{⊙2} = (Q_Gᵀg_i)^{⊙2} ((Q_Aᵀā_i)^{⊙2})ᵀ.
        g_rot = (g[:, 0] @ Q_G).square_()
        a_rot = (a[:, 0] @ Q_A).square_()
        return g_rot.T @ a_rot / m
    # Forming ∇W̄_i first and rotating it costs M·d_out·d_in'·(P + k + d_out); rotating
    # the rows first costs M·P·(d_in'·k + d_out² + d_out·k). Take the cheaper.
    rows_first = p * (d_in * k + d_out * d_out + d_out * k) < d_out * d_in * (p + k + d_out)
    width = k if rows_first else d_in
    chunk = max(1, min(m, chunk_elements // max(1, d_out * width)))
    if rows_first:
        a, g = a @ Q_A, g @ Q_G
    out = torch.zeros(d_out, k, dtype=a.dtype, device=a.device)
    for start in range(0, m, chunk):
        grads = per_sample_grads(a[start : start + chunk], g[start : start + chunk])
        if not rows_first:
            grads = Q_G.T @ grads @ Q_A
        out += grads.square_().sum(dim=0)
    return out / m


def complement_second_moment(
    a: Tensor, g: Tensor, U: Tensor, Q_G: Tensor, *, chunk_elements: int = CHUNK_ELEMENTS
) -> Tensor:
    """``s_⊥ = (1/(M·(d_in'−k))) Σ_i ‖(Q_Gᵀ ∇W̄_i (I − UUᵀ))[r, :]‖²`` for each row ``r``:
    the mean second moment of the per-sample gradients per direction of the complement of
    ``U``'s columns, shape ``(d_out,)`` (docs/math.md §3, "Wide input factors").

    The rows are projected first, ``ā_⊥ = ā − (āU)Uᵀ`` (``2·M·P·d_in'·k``), so no
    ``d_in' × d_in'`` projector exists and no difference of two large norms loses the
    small one. With ``P = 1`` the row norms factor,
    ``‖(Q_Gᵀg_i)[r]·ā_⊥,iᵀ‖² = (Q_Gᵀg_i)[r]²·‖ā_⊥,i‖²``; with ``P > 1`` each sample's
    ``Q_Gᵀ ∇W̄_i P = (g_i Q_G)ᵀ ā_⊥,i`` is formed (``P·d_out·d_in'``), or, when cheaper, its
    row norms are read off the ``P × P`` Gram ``ā_⊥,i ā_⊥,iᵀ``:
    ``‖row r‖² = h_rᵀ (ā_⊥,i ā_⊥,iᵀ) h_r`` with ``h_r = (g_i Q_G)[:, r]``
    (``P²·(d_in' + d_out)``).

    Args:
        a: input rows ``(M, P, d_in')``.
        g: per-sample output-gradient rows ``(M, P, d_out)``.
        U: ``(d_in', k)`` orthonormal columns, ``k < d_in'``.
        Q_G: orthogonal ``(d_out, d_out)`` basis of the output side.
        chunk_elements: as :func:`basis_second_moment`'s.
    """
    m, p, d_in = a.shape
    d_out, k = g.shape[-1], U.shape[1]
    a_perp = a - (a @ U) @ U.T
    g_rot = g @ Q_G
    if p == 1:
        energy = g_rot[:, 0].square().T @ a_perp[:, 0].square().sum(dim=1)
        return energy / (m * (d_in - k))
    gram_first = p * (d_in + d_out) < d_in * d_out
    per_sample = p * p if gram_first else d_out * d_in
    chunk = max(1, min(m, chunk_elements // max(1, per_sample)))
    energy = torch.zeros(d_out, dtype=a.dtype, device=a.device)
    for start in range(0, m, chunk):
        rows, h = a_perp[start : start + chunk], g_rot[start : start + chunk]
        if gram_first:
            gram = torch.bmm(rows, rows.transpose(1, 2))  # (c, P, P)
            energy += (torch.bmm(gram, h) * h).sum(dim=(0, 1))
        else:
            energy += per_sample_grads(rows, h).square_().sum(dim=(0, 2))
    return energy / (m * (d_in - k))
