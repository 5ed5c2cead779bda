"""lib/gemm's products called directly against numpy in float64: cdsl_gemm_narrow (vectors along
the rows, the rows of A packed a block at a time), cdsl_gemm_narrow_t (the same with A given
transposed, read where it lies but for a last block of rows past a whole tile), cdsl_gemm_broadcast (vectors along the
columns, A read where it lies), and the packed cdsl_gemm of stored matrices with each operand
transposed or not (its packing of a transposed A and of B's last, partial panel copy elements
a panel's width at a time; beside an untransposed A, an untransposed B's whole panels are read
in place). A conv reaches the first two only with accumulate = 0, a
contiguous A and one thread's worth of rows per tile; here every edge of their blocking is run:
rows and columns that fill no whole vector or tile, more columns than one staged chunk, a
reduction shorter than a vector and longer than a packed block, strides wider than the matrices,
adding into C, and the threads' split."""
from __future__ import annotations

import ctypes
import subprocess

import numpy as np
import pytest

from convdsl.targets.c import CTarget

WRAPPER = """
#include "kernels.c"
/* B stored row-major (b->B, ldb): both products read it where it lies or stage it. */
/* narrow: 0 broadcast, 1 narrow, 2 narrow_t (A given transposed: lda is its row stride). */
__attribute__((visibility("default"))) void product(int narrow, int64_t M, int64_t N, int64_t K, const real *A,
        int64_t lda, const real *B, int64_t ldb, real *C, int64_t ldc, int accumulate, real *work, double split)
{
    const cdsl_broadcast_b b = {B, ldb, NULL, NULL};
    if (narrow == 2)
        cdsl_gemm_narrow_t(M, N, K, A, lda, &b, C, ldc, accumulate, work, split);
    else if (narrow)
        cdsl_gemm_narrow(M, N, K, A, lda, &b, C, ldc, accumulate, work, split);
    else
        cdsl_gemm_broadcast(M, N, K, A, lda, &b, C, ldc, accumulate, work, split);
}
/* The unpacked dot products: C[i·csi + j·csj] (+)= Σ_k A[i·lda + k] · B[j·ldb + k]. */
__attribute__((visibility("default"))) void dot(int64_t M, int64_t N, int64_t K, const real *A, int64_t lda,
        const real *B, int64_t ldb, real *C, int64_t csi, int64_t csj, int accumulate, double split)
{
    cdsl_gemm_dot(M, N, K, A, lda, B, ldb, C, csi, csj, accumulate, split);
}
/* The packed GEMM of stored matrices, A and B each row-major or transposed. */
__attribute__((visibility("default"))) void stored(int trans_a, int trans_b, int64_t M, int64_t N, int64_t K,
        const real *A, int64_t lda, const real *B, int64_t ldb, real *C, int64_t ldc, int accumulate, double split)
{
    cdsl_gemm(trans_a, trans_b, M, N, K, A, lda, B, ldb, C, ldc, accumulate, split);
}
"""

# (M, N, K): one row, rows past whole vectors and tiles (17, 33, 49, 65, 100), a column, the
# columns of every tile width and past one chunk of 64 (65, 130), reductions shorter than a
# vector, just past one (17) and past a packed block (300: 128 to 64 per block).
# Up to 12 columns, cdsl_gemm_dot's tiles take every column at once, their rows chosen by the
# columns and the size of B (lib/gemm.c: cdsl_gemm_dot_wide): one row (N = 1; N ≥ 5 with a short
# B), four (N ≤ 4), three (5 to 9 columns of a long B: 50 × 7 × 700) or two (10 to 12: 29 × 11 ×
# 400), with rows left over at the end of a block of 24 and of A.
SHAPES = [(1, 1, 1), (1, 9, 17), (17, 1, 5), (33, 13, 300), (49, 16, 16), (65, 36, 31), (100, 64, 129),
          (24, 65, 7), (64, 130, 40), (5, 4, 2), (130, 9, 160), (48, 12, 64), (7, 96, 3), (50, 7, 700),
          (29, 11, 400), (26, 3, 33)]


@pytest.fixture(scope="module", params=["f32", "f64"])
def library(request, tmp_path_factory):
    dtype = request.param
    out = tmp_path_factory.mktemp(f"gemm_{dtype}")
    (out / "kernels.c").write_text(CTarget().kernel_library(dtype).c)
    (out / "wrapper.c").write_text(WRAPPER)
    lib = out / "libproduct.so"
    # -O3 as the modules are built (the suite's -O0 would hide what gcc's vectorizer does).
    proc = subprocess.run(["cc", "-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-o", str(lib),
                           str(out / "wrapper.c"), "-lm"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    handle = ctypes.CDLL(str(lib))
    handle.product.restype = None
    handle.product.argtypes = [ctypes.c_int] + [ctypes.c_int64] * 3 + [ctypes.c_void_p, ctypes.c_int64,
                                                                      ctypes.c_void_p, ctypes.c_int64,
                                                                      ctypes.c_void_p, ctypes.c_int64, ctypes.c_int,
                                                                      ctypes.c_void_p, ctypes.c_double]
    handle.dot.restype = None
    handle.dot.argtypes = [ctypes.c_int64] * 3 + [ctypes.c_void_p, ctypes.c_int64] * 2 + [
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_double]
    handle.stored.restype = None
    handle.stored.argtypes = [ctypes.c_int] * 2 + [ctypes.c_int64] * 3 + [ctypes.c_void_p, ctypes.c_int64] * 3 + [
        ctypes.c_int, ctypes.c_double]
    return handle, np.float32 if dtype == "f32" else np.float64


def run(library, form, M, N, K, *, pad=(0, 0, 0), accumulate=False, split=1e30, seed=0):
    handle, real = library
    rng = np.random.default_rng(seed)
    trans_a, trans_b = form in ("gemm-tn", "gemm-tt", "narrow-t"), form in ("gemm-nt", "gemm-tt", "dot", "dot-ct")
    lda, ldb, ldc = (M if trans_a else K) + pad[0], (K if trans_b else N) + pad[1], N + pad[2]
    A = rng.standard_normal((K if trans_a else M, lda)).astype(real)
    B = rng.standard_normal((N if trans_b else K, ldb)).astype(real)
    # dot-ct writes C transposed (csi = 1: column j of C is a row of CT, as dense's batch of outputs).
    C = rng.standard_normal((N, M + pad[2]) if form == "dot-ct" else (M, ldc)).astype(real)
    before = C.copy()
    work = np.zeros(max(K * max(N, 64), 8192) + 64, real)
    ptr = lambda a: a.ctypes.data_as(ctypes.c_void_p)
    if form in ("dot", "dot-ct"):
        csi, csj = (1, M + pad[2]) if form == "dot-ct" else (ldc, 1)
        handle.dot(M, N, K, ptr(A), lda, ptr(B), ldb, ptr(C), csi, csj, int(accumulate), split)
    elif form.startswith("gemm"):
        handle.stored(int(trans_a), int(trans_b), M, N, K, ptr(A), lda, ptr(B), ldb, ptr(C), ldc, int(accumulate),
                      split)
    else:
        handle.product({"broadcast": 0, "narrow": 1, "narrow-t": 2}[form], M, N, K, ptr(A), lda, ptr(B), ldb, ptr(C),
                       ldc, int(accumulate), ptr(work), split)
    if form == "dot-ct":
        C, before = C.T, before.T
    A = A[:, :M].T if trans_a else A[:, :K]
    B = B[:, :K].T if trans_b else B[:, :N]
    want = A.astype(np.float64) @ B.astype(np.float64) + (before[:M, :N] if accumulate else 0)
    scale = np.abs(A).astype(np.float64) @ np.abs(B).astype(np.float64) + 1
    tol = 1e-5 if real == np.float32 else 1e-12
    assert np.all(np.abs(C[:M, :N] - want) <= tol * scale), (form, M, N, K)
    # Nothing past the columns of C (past its rows, for dot-ct's Cᵀ) is written.
    np.testing.assert_array_equal(C[:, N:], before[:, N:])
    np.testing.assert_array_equal(C[M:], before[M:])


FORMS = ["narrow", "narrow-t", "broadcast", "dot", "dot-ct", "gemm-nn", "gemm-tn", "gemm-nt", "gemm-tt"]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("M, N, K", SHAPES)
def test_products_of_few_columns_match_numpy(library, form, M, N, K):
    run(library, form, M, N, K)


@pytest.mark.parametrize("form", FORMS)
def test_strided_operands_adding_into_c_and_split_across_threads(library, form):
    for i, (M, N, K) in enumerate(SHAPES):
        run(library, form, M, N, K, pad=(3, 5, 2), accumulate=True, seed=i)
        run(library, form, M, N, K, split=0, seed=100 + i)       # split: always a parallel region
