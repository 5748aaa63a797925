#!/usr/bin/env python3
"""How fast do the standard LAPACK eigensolvers run on this machine, next to its f32 GEMM rate?

    python3 -m venv V && V/bin/pip install numpy scipy threadpoolctl mkl
    V/bin/python scripts/bench/eigh-lapack.py [--threads 2] [--repeats 5]

The yardstick for issue 7's "dominant operations at >= 50% of the GEMM rate" as it applies to
the fit's eigendecompositions (`benches/ops.rs` times ours, faer's, with the same nominal FLOP
count): symmetric eigendecompositions with eigenvectors of K-FAC-like covariances
A = X^T X / N (N = 2,698 tokens, feature scales decaying as a power law, like a capture's
activations), n = 576 and 1,536 (SmolLM2-135M's widths), the ops bench's own matrix
(1,024 standard normal rows, 1,536 wide, rank 1,024) and the same with 2,698 rows (full rank), by
- OpenBLAS's LAPACK through scipy: divide and conquer (?syevd, what faer and torch use),
  relatively robust representations (?syevr), QR iteration (?syev);
- Intel MKL's LAPACKE_?syevd, loaded with ctypes from the `mkl` wheel (if installed);
and the f32 GEMM [1024, 576] x [576, 1536] of each library, the same shape as the ops bench.
Rates are nominal: 10/3 n^3 FLOPs per eigendecomposition, 2 m n k per GEMM; each row shows
the best of --repeats and its share of the fastest f32 GEMM measured in this run.
"""

import argparse
import ctypes
import glob
import os
import sys
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    os.environ.setdefault("MKL_NUM_THREADS", str(args.threads))
    os.environ.setdefault("OPENBLAS_NUM_THREADS", str(args.threads))
    import numpy as np
    import scipy.linalg as sla
    from threadpoolctl import threadpool_limits

    threadpool_limits(args.threads)
    mkl = load_mkl(args.threads)
    rng = np.random.default_rng(0)

    def best(f):
        f()  # warm-up
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            f()
            times.append(time.perf_counter() - t)
        return min(times)

    rows = []
    a32 = rng.standard_normal((1024, 576), dtype=np.float32)
    b32 = rng.standard_normal((576, 1536), dtype=np.float32)
    gemm_flops = 2.0 * 1024 * 576 * 1536
    rows.append(("GEMM f32 (OpenBLAS)", "1024x576x1536", gemm_flops, best(lambda: a32 @ b32)))
    if mkl is not None:
        c32 = np.empty((1024, 1536), dtype=np.float32)
        rows.append(
            ("GEMM f32 (MKL)", "1024x576x1536", gemm_flops, best(lambda: mkl_sgemm(mkl, a32, b32, c32)))
        )
    gemm_rate = max(f / t for _, _, f, t in rows)

    cases = [
        # the ops bench's matrix: 1,024 standard normal rows, rank 1,024 (its eigenvalue 0 is
        # a third of the spectrum, which divide and conquer deflates)
        ("ops bench, rank 1024", 1536, 1024, lambda n: np.ones(n)),
        # the same at full rank, like the ops bench at --tokens 2560 (the workload's 2,698 rows)
        ("normal, full rank", 1536, 2698, lambda n: np.ones(n)),
        # K-FAC-like: 2,698 rows (the benchmark workload's tokens), scales decaying as 1/k
        ("power law, full rank", 576, 2698, lambda n: (1.0 + np.arange(n)) ** -1.0),
        ("power law, full rank", 1536, 2698, lambda n: (1.0 + np.arange(n)) ** -1.0),
    ]
    for label, n, rows_x, scale in cases:
        x = rng.standard_normal((rows_x, n)) * scale(n)
        a64 = x.T @ x / rows_x
        eig_flops = 10.0 / 3.0 * n**3
        for dt, name in ((np.float64, "f64"), (np.float32, "f32")):
            a = a64.astype(dt)
            for driver in ("evd", "evr", "ev"):
                rows.append(
                    (
                        f"eigh {name} OpenBLAS ?sy{driver}",
                        f"{n}x{n}, {label}",
                        eig_flops,
                        best(lambda: sla.eigh(a, driver=driver, check_finite=False)),
                    )
                )
            if mkl is not None:
                rows.append((f"eigh {name} MKL ?syevd", f"{n}x{n}, {label}", eig_flops, best(lambda: mkl_syevd(mkl, a))))

    print(f"{args.threads} threads, best of {args.repeats}; nominal FLOPs (10/3 n^3 per eigh, 2mnk per GEMM)")
    print("| operation | shape | ms | GFLOP/s | of the f32 GEMM rate |")
    print("|---|---|---|---|---|")
    for what, shape, flops, secs in rows:
        rate = flops / secs / 1e9
        print(f"| {what} | {shape} | {secs * 1e3:.1f} | {rate:.1f} | {100 * rate / (gemm_rate / 1e9):.0f}% |")


def load_mkl(threads):
    """libmkl_rt from the `mkl` wheel (in sys.prefix/lib), or None."""
    found = sorted(glob.glob(os.path.join(sys.prefix, "lib", "libmkl_rt.so*")))
    if not found:
        print("note: MKL not installed (pip install mkl): OpenBLAS only", file=sys.stderr)
        return None
    lib = ctypes.CDLL(found[0])
    lib.MKL_Set_Num_Threads(ctypes.c_int(threads))
    return lib


def mkl_sgemm(lib, a, b, c):
    import numpy as np

    m, k = a.shape
    n = b.shape[1]
    p = lambda x: x.ctypes.data_as(ctypes.c_void_p)  # noqa: E731
    # cblas_sgemm(RowMajor=101, NoTrans=111, NoTrans, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc)
    lib.cblas_sgemm(
        101, 111, 111, m, n, k, ctypes.c_float(1.0), p(a), k, p(b), n, ctypes.c_float(0.0), p(c), n
    )
    assert np.isfinite(c[0, 0])


def mkl_syevd(lib, a):
    """Eigenvalues and eigenvectors by LAPACKE_?syevd on a copy of a; checks A v = lambda v."""
    import numpy as np

    n = a.shape[0]
    work = np.array(a, copy=True, order="C")
    w = np.empty(n, dtype=a.dtype)
    f = lib.LAPACKE_dsyevd if a.dtype == np.float64 else lib.LAPACKE_ssyevd
    info = f(
        101,
        ctypes.c_char(b"V"),
        ctypes.c_char(b"L"),
        n,
        work.ctypes.data_as(ctypes.c_void_p),
        n,
        w.ctypes.data_as(ctypes.c_void_p),
    )
    if info != 0:
        raise RuntimeError(f"LAPACKE_?syevd info = {info}")
    # eigenvectors are the columns of `work` (row-major layout keeps LAPACK's convention)
    v = work[:, -1]
    r = a @ v - w[-1] * v
    assert np.linalg.norm(r) <= 1e-3 * abs(w[-1]) * np.linalg.norm(v), "MKL eigenpair check"


if __name__ == "__main__":
    main()
