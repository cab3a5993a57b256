"""Cost of K-FAC's wide input factor: exact damped inverse vs low rank plus isotropic rest.

The Fashion-MNIST CNN's linear 3136→256 layer has a ``3137 × 3137`` input factor ``A``
(bias column included) and ``256 × 3137`` gradients ``V``. For that shape (default
``n = 3137``, ``d = 256``) it times, interleaved round robin in one process (each round
runs every item once; the figure is the median over rounds):

* ``refresh_chol``: ``(A + φI)⁻¹`` by Cholesky (what ``FactoredInverse`` does, ``n³``);
* ``refresh_cold_k``: the top-``k`` eigenpairs by subspace iteration from the random
  start (``LowRankFactoredInverse``'s first refresh) and the trace-kept rest ``r``;
* ``refresh_warm_k``: the same started from the previous ``U`` (every later refresh);
* ``apply_dense``: ``V (A + φI)⁻¹`` with the stored inverse (``n²·d``);
* ``apply_low_rank_k``: ``V (Ã + φI)⁻¹`` from ``U``, ``Λ``, ``r`` (``2·n·k·d``);

and, per ``k``, the relative difference of the low-rank application from the exact one,
``‖V Ã_d⁻¹ − V A_d⁻¹‖ / ‖V A_d⁻¹‖`` (how much of the preconditioning the approximation
changes on this synthetic factor, not a statement about training), beside the same
measure for ``A`` replaced by its mean eigenvalue (``k = 0``) and by its diagonal.

The factor is synthetic: ``A = YᵀY/M`` from ``M`` rows of ReLU'd, correlated Gaussian
features with a decaying spectrum plus a bias column of ones, the shape of a CNN's
pooled post-ReLU features.

Usage: ``python benchmarks/wide_factor.py [--n 3137] [--d-out 256] [--ranks 64,128,256]
[--rows 4096] [--rounds 5] [--damping 0.1] [--dtype float32] [--json]``

EKFAC's and TEKFAC's eigenvalue-corrected inverse with the same kind of wide factor is
timed by ``benchmarks/eigen_corrected_wide.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch

from natgrad.inverses.low_rank import low_rank_apply_right, trace_residual, warm_top_eigenpairs
from natgrad.linalg import damped_inverse

#: ``LowRankFactoredInverse``'s defaults.
OVERSAMPLE, ITERATIONS, WARM_ITERATIONS = 16, 3, 1


def synthetic_rows(n: int, rows: int, dtype: torch.dtype) -> torch.Tensor:
    """``Y`` ``(rows, n)``: ReLU'd features with power-law correlations, last column 1."""
    gen = torch.Generator().manual_seed(n)
    latent = min(n - 1, 1024)
    mixing = torch.randn(latent, n - 1, generator=gen, dtype=torch.float64)
    mixing *= torch.arange(1, latent + 1, dtype=torch.float64).pow(-0.75)[:, None]
    Y = (torch.randn(rows, latent, generator=gen, dtype=torch.float64) @ mixing).relu_()
    return torch.cat([Y, torch.ones(rows, 1, dtype=torch.float64)], dim=1).to(dtype)


def synthetic_factor(n: int, rows: int, dtype: torch.dtype) -> torch.Tensor:
    """``A = YᵀY/M`` ``(n, n)`` from :func:`synthetic_rows` (formed in float64)."""
    Y = synthetic_rows(n, rows, torch.float64)
    return (Y.T @ Y / rows).to(dtype)


def low_rank_refresh(A: torch.Tensor, k: int, shift: float, previous: torch.Tensor | None):
    """``(U, Λ + φ, r + φ)`` as ``LowRankFactoredInverse`` refreshes one wide factor."""
    values, U = warm_top_eigenpairs(
        A,
        k,
        previous,
        oversample=OVERSAMPLE,
        iterations=ITERATIONS,
        warm_iterations=WARM_ITERATIONS,
    )
    return U, values + shift, trace_residual(A, values) + shift


def round_robin(items: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median milliseconds of each item, every round running each item once in turn."""
    times: dict[str, list[float]] = {name: [] for name in items}
    for fn in items.values():  # warm-up
        fn()
    for _ in range(rounds):
        for name, fn in items.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def parse_ranks(parser: argparse.ArgumentParser, text: str, n: int) -> list[int]:
    """``--ranks`` ``"64,128"`` → ``[64, 128]``, each in ``[1, n)``; else a usage error."""
    try:
        ranks = [int(k) for k in text.split(",")]
    except ValueError:
        parser.error(f"--ranks must be comma-separated integers, got {text!r}")
    if any(not 1 <= k < n for k in ranks):
        parser.error(f"--ranks must lie in [1, n), got {ranks} with n={n}")
    return ranks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=3137, help="factor width n (d_in')")
    parser.add_argument("--d-out", type=int, default=256, help="rows d of the gradient V")
    parser.add_argument("--ranks", default="64,128,256", help="ranks k, comma-separated")
    parser.add_argument("--rows", type=int, default=4096, help="rows M of the synthetic factor")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (median)")
    parser.add_argument("--damping", type=float, default=0.1, help="the shift φ of A")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    ranks = parse_ranks(parser, args.ranks, args.n)
    if min(args.n, args.d_out, args.rows, args.rounds, args.threads) < 1:
        parser.error("--n, --d-out, --rows, --rounds and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    A = synthetic_factor(args.n, args.rows, dtype)
    V = torch.randn(args.d_out, args.n, generator=torch.Generator().manual_seed(1), dtype=dtype)
    shift = args.damping
    A_inv = damped_inverse(A, shift)
    exact = V @ A_inv
    items: dict[str, Callable[[], object]] = {
        "refresh_chol": lambda: damped_inverse(A, shift),
        "apply_dense": lambda: V @ A_inv,
    }
    baselines = {  # the same measure for the approximations this one sits between
        "isotropic_rel_diff": V / (torch.trace(A).item() / args.n + shift),
        "diagonal_rel_diff": V / (A.diagonal() + shift),
    }
    baselines = {name: ((b - exact).norm() / exact.norm()).item() for name, b in baselines.items()}
    errors = {}
    for k in ranks:
        U, scale, rest = low_rank_refresh(A, k, shift, None)
        approx = low_rank_apply_right(V, U, scale, rest)
        errors[k] = ((approx - exact).norm() / exact.norm()).item()
        items[f"refresh_cold_{k}"] = lambda k=k: low_rank_refresh(A, k, shift, None)
        items[f"refresh_warm_{k}"] = lambda k=k, U=U: low_rank_refresh(A, k, shift, U)
        items[f"apply_low_rank_{k}"] = lambda U=U, s=scale, r=rest: low_rank_apply_right(V, U, s, r)
    ms = round_robin(items, args.rounds)

    rows = []
    for k in ranks:
        rows.append(
            {
                "k": k,
                "refresh_cold_ms": ms[f"refresh_cold_{k}"],
                "refresh_warm_ms": ms[f"refresh_warm_{k}"],
                "apply_ms": ms[f"apply_low_rank_{k}"],
                "chol/cold": ms["refresh_chol"] / ms[f"refresh_cold_{k}"],
                "chol/warm": ms["refresh_chol"] / ms[f"refresh_warm_{k}"],
                "apply_dense/apply": ms["apply_dense"] / ms[f"apply_low_rank_{k}"],
                "apply_rel_diff": errors[k],
            }
        )
    result = {
        "benchmark": "wide_factor",
        "n": args.n,
        "d_out": args.d_out,
        "rows": args.rows,
        "damping": args.damping,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "refresh_chol_ms": ms["refresh_chol"],
        "apply_dense_ms": ms["apply_dense"],
        **baselines,
        "ranks": rows,
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"n={args.n}, d={args.d_out}, {args.dtype}, {torch.get_num_threads()} thread(s), "
        f"median of {args.rounds} interleaved rounds"
    )
    print(
        f"refresh Cholesky {ms['refresh_chol']:8.1f} ms   apply dense {ms['apply_dense']:7.2f} ms"
    )
    print(
        f"rel. diff from the exact application: isotropic {baselines['isotropic_rel_diff']:.3g}, "
        f"diagonal {baselines['diagonal_rel_diff']:.3g}"
    )
    for r in rows:
        print(
            f"k={r['k']:4d}  refresh cold {r['refresh_cold_ms']:7.1f} ms ({r['chol/cold']:5.1f}x)"
            f"  warm {r['refresh_warm_ms']:7.1f} ms ({r['chol/warm']:5.1f}x)"
            f"  apply {r['apply_ms']:6.2f} ms ({r['apply_dense/apply']:5.1f}x)"
            f"  rel. diff {r['apply_rel_diff']:.3g}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
