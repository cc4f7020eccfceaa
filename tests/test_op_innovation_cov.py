"""innovation_cov_dense / innovation_cov_kron on every backend, against float64 NumPy.

S = H diag(P-) H^T with P- = P / lam + q; the Kronecker block is sample-grouped
(inputs (B, d_in), grad_outputs (B, K, d_out)) and is checked against the dense formula on
its explicit Jacobian. Fresh random inputs every run; odd sizes; m = 1; S exactly
symmetric and every element written; non-finite inputs always reach S.
"""
import numpy as np
import pytest
import torch

from op_checks import (
    F64,
    PARAM_DTYPES,
    assert_sym_close,
    cov_dtype_for,
    hyper,
    kron_jacobian,
    poison_allocator,
    rand_cov,
    randn,
    tol_for,
)

SIZES_N = [1, 7, 1023, 4099]
SIZES_M = [1, 3, 6, 8, 32, 40]
# (B, K, d_out, d_in): odd sizes, B = 1, K = 1 (the plain block), many classes
KRON_SHAPES = [(1, 1, 1, 1), (3, 1, 5, 7), (1, 10, 9, 4), (3, 2, 33, 17), (5, 7, 6, 11),
               (32, 10, 3, 5), (4, 3, 64, 129)]


def expected_dense(jac, cov, lam, q):
    h = np.asarray(jac.detach().cpu().to(F64)).reshape(jac.shape[0], -1)
    p = np.asarray(cov.detach().cpu().to(F64)).reshape(-1) / lam + q
    return torch.from_numpy((h * p) @ h.T)


def _tol(kb, *dtypes):
    # bf16/fp16 inputs are exact in float32, so the float32 reduction tolerance applies
    dts = [d if d == F64 else torch.float32 for d in dtypes]
    return tol_for(*dts, reduction=True, exact64=kb.exact64)


@pytest.mark.parametrize("dtype", PARAM_DTYPES, ids=str)
@pytest.mark.parametrize("m", SIZES_M)
@pytest.mark.parametrize("n", SIZES_N)
def test_dense_matches_numpy(kb, dtype, m, n):
    if not kb.fits(m * n):
        pytest.skip("too large for the interpreter")
    jac = randn((m, n), dtype)
    cov = rand_cov(n, cov_dtype_for(dtype))
    lam, q = hyper()
    poison_allocator((m, m), device=kb.device)
    with kb.active() as be:
        got = be.innovation_cov_dense(kb.to(jac), kb.to(cov), lam, q)
    assert got.device.type == torch.device(kb.device).type
    assert_sym_close(got, expected_dense(jac, cov, lam, q), _tol(kb, dtype, cov.dtype),
                     f"S dense {kb} {dtype} m={m} n={n}")


@pytest.mark.parametrize("m,n", [(8, 200_003), (128, 20_011)])
def test_dense_large_threaded(kb, m, n):
    """Several tiles per thread; m not a multiple of the register blocks."""
    if not kb.fits(m * n):
        pytest.skip("too large for the interpreter")
    jac = randn((m, n), torch.float32)
    cov = rand_cov(n, torch.float32)
    with kb.active() as be:
        got = be.innovation_cov_dense(kb.to(jac), kb.to(cov), 0.9, 1e-3)
    assert_sym_close(got, expected_dense(jac, cov, 0.9, 1e-3), 1e-4, f"S dense {kb} m={m}")


def test_dense_f32_jac_f64_cov_accumulates_in_f64(kb):
    jac = randn((5, 1001), torch.float32)
    cov = rand_cov(1001, F64)
    with kb.active() as be:
        got = be.innovation_cov_dense(kb.to(jac), kb.to(cov), 1.0, 0.0)
    assert_sym_close(got, expected_dense(jac, cov, 1.0, 0.0), 1e-10 if kb.exact64 else 1e-4,
                     f"S {kb} f32 jac, f64 cov")


def test_dense_strided_jacobian(kb):
    """A Jacobian that is a transposed or column-sliced view is read correctly."""
    base = randn((301, 9), torch.float32)
    jac = base.T                                    # (9, 301), column stride 9
    cov = rand_cov(301, torch.float32)
    sliced = randn((4, 700), torch.float32)[:, ::2]
    cov2 = rand_cov(350, torch.float32)
    with kb.active() as be:
        got = be.innovation_cov_dense(kb.to(jac), kb.to(cov), 1.0, 0.0)
        got2 = be.innovation_cov_dense(kb.to(sliced), kb.to(cov2), 0.8, 0.0)
    assert_sym_close(got, expected_dense(jac, cov, 1.0, 0.0), 1e-4, f"S {kb} transposed jac")
    assert_sym_close(got2, expected_dense(sliced, cov2, 0.8, 0.0), 1e-4, f"S {kb} sliced jac")


@pytest.mark.parametrize("dtype", PARAM_DTYPES, ids=str)
@pytest.mark.parametrize("shape", KRON_SHAPES, ids=lambda s: "B{}K{}o{}i{}".format(*s))
def test_kron_matches_dense_jacobian(kb, dtype, shape):
    b, k, d_out, d_in = shape
    if not kb.fits(b * b * d_out * d_in + (b * k) ** 2 * d_out):
        pytest.skip("too large for the interpreter")
    a = randn((b, d_in), dtype)
    d = randn((b, k, d_out), dtype)
    cov = rand_cov((d_out, d_in), cov_dtype_for(dtype))
    lam, q = hyper()
    m = b * k
    poison_allocator((m, m), device=kb.device)
    with kb.active() as be:
        got = be.innovation_cov_kron(kb.to(a), kb.to(d), kb.to(cov), lam, q)
    assert got.shape == (m, m)
    expected = expected_dense(kron_jacobian(a, d), cov, lam, q)
    assert_sym_close(got, expected, _tol(kb, dtype, cov.dtype), f"S kron {kb} {dtype} {shape}")


def test_kron_two_dim_grad_outputs_is_k1(kb):
    """(B, d_out) grad_outputs is the plain block (one observation per input row)."""
    a, d = randn((6, 13), torch.float32), randn((6, 11), torch.float32)
    cov = rand_cov((11, 13), torch.float32)
    with kb.active() as be:
        got = be.innovation_cov_kron(kb.to(a), kb.to(d), kb.to(cov), 0.95, 0.01)
    expected = expected_dense(kron_jacobian(a, d), cov, 0.95, 0.01)
    assert_sym_close(got, expected, 1e-4, f"S kron {kb} 2-D grad_outputs")


def test_kron_non_contiguous_inputs(kb):
    a = randn((23, 5), torch.float32).T              # (5, 23)
    d = randn((5, 9, 3), torch.float32).transpose(1, 2).contiguous().transpose(1, 2)
    assert not d.is_contiguous()
    cov = rand_cov((3, 23), torch.float32)
    with kb.active() as be:
        got = be.innovation_cov_kron(kb.to(a), kb.to(d), kb.to(cov), 1.0, 0.0)
    expected = expected_dense(kron_jacobian(a, d), cov, 1.0, 0.0)
    assert_sym_close(got, expected, 1e-4, f"S kron {kb} strided inputs")


# ------------------------------------------------------------------ non-finite inputs
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=str)
@pytest.mark.parametrize("where", ["anywhere", "zero-cov-column"])
def test_dense_non_finite_reaches_s(kb, value, where):
    """NaN/Inf anywhere in H reaches S, also in a column whose P- is exactly 0
    (Inf * 0 = NaN): the ops layer tests S instead of every input element."""
    m, n = 4, 257
    jac = randn((m, n), torch.float32)
    cov = rand_cov(n, torch.float32)
    col = int(torch.randint(n, ()))
    row = int(torch.randint(m, ()))
    if where == "zero-cov-column":
        cov[col] = 0.0
    jac[row, col] = value
    with kb.active() as be:
        got = be.innovation_cov_dense(kb.to(jac), kb.to(cov), 1.0, 0.0)
    assert not bool(torch.isfinite(got).all()), f"{kb}: non-finite H did not reach S"
    assert not bool(torch.isfinite(got[row, row])), f"{kb}: S[{row},{row}] stayed finite"


@pytest.mark.parametrize("target", ["inputs", "grad_outputs"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=str)
def test_kron_non_finite_reaches_s(kb, target, value):
    """NaN/Inf only in A (or only in D) of a Kronecker block reaches S, even where the
    other factor or P is zero."""
    b, k, d_out, d_in = 3, 4, 5, 7
    a = randn((b, d_in), torch.float32)
    d = randn((b, k, d_out), torch.float32)
    cov = rand_cov((d_out, d_in), torch.float32)
    j = int(torch.randint(b, ()))
    if target == "inputs":
        i = int(torch.randint(d_in, ()))
        a[j, i] = value
        cov[:, i] = 0.0          # P is zero in the poisoned input's column
        d[j] = 0.0               # and the sample's output gradients are zero
    else:
        kk_, o = int(torch.randint(k, ())), int(torch.randint(d_out, ()))
        d[j, kk_, o] = value
        cov[o, :] = 0.0
    with kb.active() as be:
        got = be.innovation_cov_kron(kb.to(a), kb.to(d), kb.to(cov), 1.0, 0.0)
    assert not bool(torch.isfinite(got).all()), f"{kb}: non-finite {target} did not reach S"


@pytest.mark.parametrize("m,n", [(32, 100_003), (3, 1_000_001), (7, 300_007)])
def test_dense_result_independent_of_thread_count(kb, m, n):
    """Fixed tiles and tile groups, summed in order: bit for bit the same S for 1 and 2
    threads (CPU backends)."""
    if kb.name != "cpp":
        pytest.skip("thread count of the cpp backend's own reduction (the reference uses torch.mm)")
    jac = randn((m, n), torch.float32)
    cov = rand_cov(n, torch.float32)
    before = torch.get_num_threads()
    try:
        with kb.active() as be:
            torch.set_num_threads(1)
            one = be.innovation_cov_dense(jac, cov, 0.9, 0.01)
            torch.set_num_threads(2)
            two = be.innovation_cov_dense(jac, cov, 0.9, 0.01)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_kron_repeat_is_bit_identical(kb):
    """The same inputs give the same S bit for bit on every call."""
    a, d = randn((9, 33), torch.float32), randn((9, 4, 17), torch.float32)
    cov = rand_cov((17, 33), torch.float32)
    with kb.active() as be:
        first = be.innovation_cov_kron(kb.to(a), kb.to(d), kb.to(cov), 0.9, 0.01)
        second = be.innovation_cov_kron(kb.to(a), kb.to(d), kb.to(cov), 0.9, 0.01)
    assert torch.equal(first, second)


def test_kron_many_pairs_in_blocks(kb):
    """A batch so large that the pairwise products are processed in blocks (cpp: over 32 MB)
    still gives the dense formula's S."""
    if kb.interpreted or kb.emulated:
        pytest.skip("too large for an interpreter or emulator")
    b, k, d_out, d_in = 300, 1, 9, 1500
    a, d = randn((b, d_in), torch.float32), randn((b, k, d_out), torch.float32)
    cov = rand_cov((d_out, d_in), torch.float32)
    with kb.active() as be:
        got = be.innovation_cov_kron(kb.to(a), kb.to(d), kb.to(cov), 1.0, 0.0)
    expected = ref_kron(a, d, cov)
    assert_sym_close(got, expected, 1e-4, f"S kron {kb} B=300")


def ref_kron(a, d, cov):
    import kalman_kernels.reference as ref
    return ref.innovation_cov_kron(a, d, cov)
