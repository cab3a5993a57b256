"""Cost of EKFAC's wide input factor: the full eigenbasis vs top-``k`` eigenvectors plus an
isotropic complement (``EKFACConfig.low_rank``, docs/math.md §3 "Wide input factors").

The Fashion-MNIST CNN's linear 3136→256 layer has a ``3137 × 3137`` input factor ``A``
(bias column included), a ``256 × 256`` output factor ``G`` and ``256 × 3137`` gradients.
For that shape (default ``n = 3137``, ``d = 256``) it times, interleaved round robin in one
process (each round runs every item once; the figure is the median over rounds), the
three operations of each strategy, the library's own classes on the same factors:

* ``refresh``: ``EigenCorrectedInverse`` — ``eigh`` of ``A`` and ``G``;
  ``LowRankEigenCorrectedInverse`` — the top ``k`` of ``A`` by subspace iteration from the
  previous ``U`` (``refresh_warm``, every refresh but the first) or from the random start
  (``refresh_cold``), and ``eigh`` of ``G``;
* ``observe``: the re-scaling fitted to one batch of ``--batch`` samples;
* ``apply``: ``Δ`` for one gradient matrix;

and the relative difference of the low-rank ``Δ`` from the full one after both observed
the same batch, ``‖Δ_k − Δ‖ / ‖Δ‖`` (how much the approximation changes the
preconditioning on this synthetic layer, not a statement about training).

The input rows are ``wide_factor.py``'s synthetic ReLU'd features; the output rows are
Gaussian with a decaying scale per column.

Usage: ``python benchmarks/eigen_corrected_wide.py [--n 3137] [--d-out 256] [--ranks 128]
[--rows 4096] [--batch 128] [--rounds 3] [--damping 1e-3] [--dtype float32] [--json]``
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from wide_factor import parse_ranks, round_robin, synthetic_rows

from natgrad.capture import LayerStats
from natgrad.curvature import KroneckerFactors
from natgrad.inverses import EigenCorrectedInverse, LowRankEigenCorrectedInverse


def synthetic_stats(n: int, d_out: int, rows: int, dtype: torch.dtype) -> LayerStats:
    """``rows`` samples of one position: ``a`` ``(rows, 1, n)``, ``g`` ``(rows, 1, d_out)``."""
    a = synthetic_rows(n, rows, dtype)
    gen = torch.Generator().manual_seed(d_out)
    scale = torch.arange(1, d_out + 1, dtype=torch.float64).pow(-0.5)
    g = (torch.randn(rows, d_out, generator=gen, dtype=torch.float64) * scale).to(dtype)
    return LayerStats(a[:, None], g[:, None])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=3137, help="input width n (d_in')")
    parser.add_argument("--d-out", type=int, default=256, help="output width d_out")
    parser.add_argument("--ranks", default="128", help="ranks k, comma-separated")
    parser.add_argument("--rows", type=int, default=4096, help="rows of the factors")
    parser.add_argument("--batch", type=int, default=128, help="samples per observed batch")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (median)")
    parser.add_argument("--damping", type=float, default=1e-3, help="λ on the re-scaling")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    ranks = parse_ranks(parser, args.ranks, args.n)
    if min(args.n, args.d_out, args.rows, args.batch, args.rounds, args.threads) < 1:
        parser.error("--n, --d-out, --rows, --batch, --rounds and --threads must be >= 1")
    if args.batch > args.rows:
        parser.error(f"--batch must be at most --rows ({args.rows}), got {args.batch}")
    torch.set_num_threads(args.threads)
    dtype, device = getattr(torch, args.dtype), torch.device("cpu")
    shape = (args.d_out, args.n)

    stats = synthetic_stats(args.n, args.d_out, args.rows, dtype)
    curvature = KroneckerFactors(shape, dtype, device)
    curvature.update(stats, 0.0)
    batch = LayerStats(stats.a[: args.batch], stats.g[: args.batch])
    V = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    damping = args.damping

    full = EigenCorrectedInverse(dtype, device)
    full.refresh(curvature, damping)
    full.observe(batch, 0.95)
    exact = full.apply(V, damping)
    items = {
        "refresh_full": lambda: EigenCorrectedInverse(dtype, device).refresh(curvature, damping),
        "observe_full": lambda: full.batch_scale(batch),
        "apply_full": lambda: full.apply(V, damping),
    }
    differences = {}
    for k in ranks:
        low = LowRankEigenCorrectedInverse(dtype, device, shape=shape, rank=k)
        low.refresh(curvature, damping)  # cold; the later ones in the loop are warm
        low.observe(batch, 0.95)
        differences[k] = ((low.apply(V, damping) - exact).norm() / exact.norm()).item()

        def cold(k=k):
            LowRankEigenCorrectedInverse(dtype, device, shape=shape, rank=k).refresh(
                curvature, damping
            )

        def warm(low=low):  # restore U afterwards: every round starts from the same U
            U = low.U
            low.refresh(curvature, damping)
            low.U = U

        items[f"refresh_cold_{k}"] = cold
        items[f"refresh_warm_{k}"] = warm
        items[f"observe_{k}"] = lambda low=low: low.batch_scale(batch)
        items[f"apply_{k}"] = lambda low=low: low.apply(V, damping)
    ms = round_robin(items, args.rounds)

    rows = [
        {
            "k": k,
            "refresh_cold_ms": ms[f"refresh_cold_{k}"],
            "refresh_warm_ms": ms[f"refresh_warm_{k}"],
            "observe_ms": ms[f"observe_{k}"],
            "apply_ms": ms[f"apply_{k}"],
            "refresh_full/warm": ms["refresh_full"] / ms[f"refresh_warm_{k}"],
            "observe_full/observe": ms["observe_full"] / ms[f"observe_{k}"],
            "apply_full/apply": ms["apply_full"] / ms[f"apply_{k}"],
            "apply_rel_diff": differences[k],
        }
        for k in ranks
    ]
    result = {
        "benchmark": "eigen_corrected_wide",
        "n": args.n,
        "d_out": args.d_out,
        "rows": args.rows,
        "batch": args.batch,
        "damping": damping,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "refresh_full_ms": ms["refresh_full"],
        "observe_full_ms": ms["observe_full"],
        "apply_full_ms": ms["apply_full"],
        "ranks": rows,
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"n={args.n}, d_out={args.d_out}, batch {args.batch}, {args.dtype}, "
        f"{torch.get_num_threads()} thread(s), median of {args.rounds} interleaved rounds"
    )
    print(
        f"full basis: refresh {ms['refresh_full']:8.1f} ms  observe {ms['observe_full']:7.2f} ms"
        f"  apply {ms['apply_full']:7.2f} ms"
    )
    for r in rows:
        print(
            f"k={r['k']:4d}  refresh cold {r['refresh_cold_ms']:7.1f} ms"
            f"  warm {r['refresh_warm_ms']:7.1f} ms ({r['refresh_full/warm']:5.1f}x)"
            f"  observe {r['observe_ms']:6.2f} ms ({r['observe_full/observe']:5.1f}x)"
            f"  apply {r['apply_ms']:6.2f} ms ({r['apply_full/apply']:5.1f}x)"
            f"  rel. diff {r['apply_rel_diff']:.3g}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
