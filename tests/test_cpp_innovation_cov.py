"""cpp backend: innovation_cov_dense / innovation_cov_kron against the float64 reference."""
import pytest
import torch

import kalman_kernels.reference as ref
from cpp_helpers import (F64, ISAS, assert_sym_close, cov_dtype_for, cpp_backend,
                         poison_allocator, rand_cov, randn, tol_for, using_isa)

JAC_DTYPES = [torch.float32, F64, torch.bfloat16, torch.float16]
SIZES_N = [1, 7, 1023, 4099]
SIZES_M = [1, 3, 6, 8, 32]


@pytest.fixture(scope="module")
def cpp():
    return cpp_backend()


def _hyper():
    lam = float(torch.empty(()).uniform_(0.5, 1.0))
    q = float(torch.empty(()).uniform_(0.0, 0.1))
    return lam, q


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", JAC_DTYPES, ids=str)
@pytest.mark.parametrize("m", SIZES_M)
@pytest.mark.parametrize("n", SIZES_N)
def test_dense_matches_reference(cpp, isa, dtype, m, n):
    jac = randn((m, n), dtype)
    cov = rand_cov(n, cov_dtype_for(dtype))
    lam, q = _hyper()
    expected = ref.innovation_cov_dense(jac, cov, lam, q)
    poison_allocator((m, m))
    with using_isa(cpp, isa):
        got = cpp.innovation_cov_dense(jac, cov, lam, q)
    # bf16/fp16 Jacobians are exact in float32, so the float32 reduction tolerance applies.
    tol = tol_for(dtype if dtype == F64 else torch.float32, reduction=True)
    assert_sym_close(got, expected, tol, f"S dense {isa} {dtype} m={m} n={n}")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m", [8, 128])
def test_dense_large_threaded(cpp, isa, m):
    """Several tiles per thread, m not fitting the register blocks evenly at 128 + 0."""
    n = 200_003 if m == 8 else 20_011
    jac = randn((m, n), torch.float32)
    cov = rand_cov(n, torch.float32)
    expected = ref.innovation_cov_dense(jac, cov, 0.9, 1e-3)
    with using_isa(cpp, isa):
        got = cpp.innovation_cov_dense(jac, cov, 0.9, 1e-3)
    assert_sym_close(got, expected, 1e-4, f"S dense {isa} m={m} n={n}")


def test_dense_cov_f64_with_f32_jac_accumulates_in_f64(cpp):
    jac = randn((5, 1001), torch.float32)
    cov = rand_cov(1001, F64)
    got = cpp.innovation_cov_dense(jac, cov, 1.0, 0.0)
    assert_sym_close(got, ref.innovation_cov_dense(jac, cov), 1e-10, "S f32 jac, f64 cov")


def test_dense_noncontiguous_inputs(cpp):
    m, n = 5, 1031
    wide = randn((m, n + 40), torch.float32)
    jac_rows = wide[:, 3:3 + n]                       # row stride != n, read in place
    jac_t = randn((n, m), torch.float32).T            # column stride != 1, copied
    cov_strided = rand_cov(2 * n, torch.float32)[::2]
    for jac in (jac_rows, jac_t):
        assert not jac.is_contiguous()
        got = cpp.innovation_cov_dense(jac, cov_strided, 0.95, 0.01)
        expected = ref.innovation_cov_dense(jac.contiguous(), cov_strided.contiguous(), 0.95, 0.01)
        assert_sym_close(got, expected, 1e-4, "S non-contiguous")


def test_dense_shaped_jacobian(cpp):
    """jac (m, *param.shape) and cov of the parameter's shape, as ops passes them."""
    jac = randn((4, 6, 7), F64)
    cov = rand_cov((6, 7), F64)
    got = cpp.innovation_cov_dense(jac, cov, 1.0, 0.0)
    assert_sym_close(got, ref.innovation_cov_dense(jac, cov), 1e-10, "S shaped")


KRON_SHAPES = [(1, 1), (7, 13), (33, 65), (64, 257)]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", SIZES_M)
@pytest.mark.parametrize("shape", KRON_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_kron_matches_reference(cpp, isa, dtype, m, shape):
    d_out, d_in = shape
    a = randn((m, d_in), dtype)
    d = randn((m, d_out), dtype)
    cov = rand_cov(shape, cov_dtype_for(dtype))
    lam, q = _hyper()
    expected = ref.innovation_cov_kron(a, d, cov, lam, q)
    poison_allocator((m, m))
    with using_isa(cpp, isa):
        got = cpp.innovation_cov_kron(a, d, cov, lam, q)
    tol = tol_for(dtype if dtype == F64 else torch.float32, reduction=True)
    assert_sym_close(got, expected, tol, f"S kron {isa} {dtype} m={m} {shape}")


def test_kron_equals_dense_with_materialised_jacobian(cpp):
    m, d_out, d_in = 6, 19, 23
    a, d = randn((m, d_in), F64), randn((m, d_out), F64)
    cov = rand_cov((d_out, d_in), F64)
    jac = torch.einsum("jo,ji->joi", d, a).reshape(m, -1)
    dense = cpp.innovation_cov_dense(jac, cov, 0.8, 0.02)
    kron = cpp.innovation_cov_kron(a, d, cov, 0.8, 0.02)
    assert_sym_close(kron, dense, 1e-10, "kron vs dense")


def test_kron_noncontiguous_inputs(cpp):
    m, d_out, d_in = 4, 10, 17
    a = randn((d_in, m), torch.float32).T
    d = randn((d_out, m), torch.float32).T
    cov = rand_cov((d_in, d_out), torch.float32).T      # read-only: copied
    got = cpp.innovation_cov_kron(a, d, cov, 1.0, 0.0)
    expected = ref.innovation_cov_kron(a.contiguous(), d.contiguous(), cov.contiguous())
    assert_sym_close(got, expected, 1e-4, "S kron non-contiguous")


def test_bad_inputs_raise(cpp):
    with pytest.raises(RuntimeError, match="cov has"):
        cpp.innovation_cov_dense(torch.randn(3, 10), torch.rand(9))
    with pytest.raises(RuntimeError, match="float32 or float64"):
        cpp.innovation_cov_dense(torch.randn(3, 10), torch.rand(10).half())
    with pytest.raises(RuntimeError, match="cov must be"):
        cpp.innovation_cov_kron(torch.randn(3, 4), torch.randn(3, 5), torch.rand(4, 5))


@pytest.mark.parametrize("m,n", [(32, 100_003), (3, 1_000_001), (7, 300_007)])
def test_dense_result_independent_of_thread_count(cpp, m, n):
    """Fixed tiles and tile groups, summed in order: bitwise the same for 1 and 2 threads."""
    jac = randn((m, n), torch.float32)
    cov = rand_cov(n, torch.float32)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpp.innovation_cov_dense(jac, cov, 0.9, 0.01)
        torch.set_num_threads(2)
        two = cpp.innovation_cov_dense(jac, cov, 0.9, 0.01)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)
