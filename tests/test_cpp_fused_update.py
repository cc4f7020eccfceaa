"""cpp backend: fused_update_dense_ / fused_update_kron_ against the float64 reference.

Every case writes into parameter / covariance tensors embedded in guard buffers (writes
outside the tensors fail), compares every element with the reference on the scale of the
terms that form it, and runs every compiled instruction set this CPU supports.
"""
import pytest
import torch

import kalman_kernels as kk
import kalman_kernels.reference as ref
from cpp_helpers import (F64, ISAS, assert_close_scaled, cov_dtype_for, cpp_backend, embedded,
                         rand_cov, randn, tol_for, using_isa)

PARAM_DTYPES = [torch.float32, F64, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module")
def cpp():
    return cpp_backend()


def _filter_terms(hph, m, information, lam_r=None):
    """(coef, whitening) as ops builds them: coef = lr * s * S^-1 e; F = L^-1 or R^-1/2."""
    r = float(torch.empty(()).uniform_(0.05, 0.5)) if lam_r is None else lam_r
    s = hph + r * torch.eye(m, dtype=F64)
    factor = torch.linalg.cholesky(s)
    e = torch.randn(m, dtype=F64)
    lr = float(torch.empty(()).uniform_(0.3, 1.0))
    coef = lr * torch.cholesky_solve(e[:, None], factor).reshape(-1)
    if information:
        whitening = torch.eye(m, dtype=F64) / r ** 0.5
    else:
        whitening = ref.whitening_matrix(factor)
    return coef, whitening


def _expected(param, cov, direction, diag, lam, q, floor, ceil, information, abs_terms):
    """Reference result and per-element error scales: the componentwise condition scale of
    each sum, i.e. the same sum taken over absolute values. ``abs_terms`` = (|H|^T |c|,
    sum_l ((|F| |H|)_l)^2), the absolute-value versions of (direction, diag)."""
    p_pred = ref.predict_cov(cov.reshape(-1).to(F64), lam, q)
    step = p_pred * direction.reshape(-1).to(F64)
    new_param = param.reshape(-1).to(F64) + step
    raw = ref.cov_update(p_pred, diag.reshape(-1).to(F64), 0.0, float("inf"), information)
    new_cov = raw.clamp(floor, ceil)
    abs_dir, abs_diag = (t.reshape(-1).to(F64) for t in abs_terms)
    p_scale = param.reshape(-1).to(F64).abs() + p_pred * abs_dir
    if information:
        c_scale = torch.maximum(new_cov.abs(), new_cov * new_cov * abs_diag)
    else:
        c_scale = torch.maximum(p_pred + p_pred * p_pred * abs_diag, new_cov.abs())
    return new_param, new_cov, p_scale, c_scale, raw


def _abs_dense(jac, coef, whitening):
    return (ref.dense_step_direction(jac.to(F64).abs(), coef.abs()),
            ref.dense_diag_term(jac.to(F64).abs(), whitening.abs()))


def _abs_kron(a, d, coef, whitening):
    a, d = a.to(F64).abs(), d.to(F64).abs()
    m = a.shape[0]
    jac = torch.einsum("jo,ji->joi", d, a).reshape(m, -1)
    return _abs_dense(jac, coef, whitening)


def _bounds(raw, n):
    """A floor and a ceiling that clamp some elements (n >= 8), else inactive bounds."""
    if n < 8:
        return 0.0, float("inf")
    lo = float(torch.quantile(raw, 0.2))
    hi = float(torch.quantile(raw, 0.8))
    return lo, hi


def _check(cpp_param, cpp_cov, exp_param, exp_cov, p_scale, c_scale, pdtype, cdtype, what,
           floor, ceil):
    tol_p = tol_for(pdtype, cdtype)
    tol_c = tol_for(cdtype, pdtype if pdtype in (F64, torch.float32) else torch.float32)
    assert_close_scaled(cpp_param, exp_param, p_scale, tol_p, what + " param")
    assert_close_scaled(cpp_cov, exp_cov, c_scale, tol_c, what + " cov")
    got = cpp_cov.to(F64)
    assert bool((got >= torch.tensor(floor, dtype=cpp_cov.dtype).to(F64)).all()), "below floor"
    assert bool((got <= torch.tensor(ceil, dtype=cpp_cov.dtype).to(F64)).all()), "above ceiling"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("pdtype", PARAM_DTYPES, ids=str)
@pytest.mark.parametrize("information", [False, True], ids=["kalman", "information"])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 32])
@pytest.mark.parametrize("n", [1, 7, 1023, 4099])
def test_dense_matches_reference(cpp, isa, pdtype, information, m, n):
    cdtype = cov_dtype_for(pdtype)
    jac = randn((m, n), pdtype if pdtype != F64 else F64)
    param0 = randn(n, pdtype)
    cov0 = rand_cov(n, cdtype)
    lam = float(torch.empty(()).uniform_(0.7, 1.0))
    q = float(torch.empty(()).uniform_(0.0, 0.05))
    hph = ref.innovation_cov_dense(jac, cov0, lam, q)
    coef, whitening = _filter_terms(hph, m, information)
    direction = ref.dense_step_direction(jac, coef)
    diag = ref.dense_diag_term(jac, whitening)
    raw = ref.cov_update(ref.predict_cov(cov0.to(F64), lam, q), diag, 0.0, float("inf"),
                         information)
    floor, ceil = _bounds(raw, n)
    exp_p, exp_c, p_scale, c_scale, _ = _expected(param0, cov0, direction, diag, lam, q, floor,
                                                  ceil, information, _abs_dense(jac, coef, whitening))
    if n >= 8:
        assert bool((exp_c == floor).any()) and bool((exp_c == ceil).any())
    param, check_p = embedded(param0.clone())
    cov, check_c = embedded(cov0.clone())
    with using_isa(cpp, isa):
        cpp.fused_update_dense_(param, cov, jac, coef, whitening, lam, q, floor, ceil,
                                information)
    check_p()
    check_c()
    _check(param, cov, exp_p, exp_c, p_scale, c_scale, pdtype, cdtype,
           f"dense {isa} {pdtype} info={information} m={m} n={n}", floor, ceil)


@pytest.mark.parametrize("isa", ISAS)
def test_dense_large_threaded_and_m128(cpp, isa):
    for m, n in ((128, 5003), (8, 150_001)):
        jac = randn((m, n), torch.float32)
        param0, cov0 = randn(n, torch.float32), rand_cov(n, torch.float32)
        hph = ref.innovation_cov_dense(jac, cov0, 0.95, 1e-3)
        coef, whitening = _filter_terms(hph, m, False)
        p_ref, c_ref = param0.clone(), cov0.clone()
        ref.fused_update_dense_(p_ref, c_ref, jac, coef, whitening, 0.95, 1e-3, 1e-4, 10.0, False)
        direction = ref.dense_step_direction(jac, coef)
        diag = ref.dense_diag_term(jac, whitening)
        exp_p, exp_c, p_scale, c_scale, _ = _expected(param0, cov0, direction, diag, 0.95, 1e-3,
                                                      1e-4, 10.0, False,
                                                      _abs_dense(jac, coef, whitening))
        param, cov = param0.clone(), cov0.clone()
        with using_isa(cpp, isa):
            cpp.fused_update_dense_(param, cov, jac, coef, whitening, 0.95, 1e-3, 1e-4, 10.0,
                                    False)
        _check(param, cov, exp_p, exp_c, p_scale, c_scale, torch.float32, torch.float32,
               f"dense {isa} m={m} n={n}", 1e-4, 10.0)


def test_dense_float32_param_float64_cov(cpp):
    m, n = 4, 777
    jac = randn((m, n), torch.float32)
    param0, cov0 = randn(n, torch.float32), rand_cov(n, F64)
    coef, whitening = _filter_terms(ref.innovation_cov_dense(jac, cov0), m, False)
    p_ref, c_ref = param0.clone(), cov0.clone()
    ref.fused_update_dense_(p_ref, c_ref, jac, coef, whitening, 1.0, 0.0, 0.0, float("inf"),
                            False)
    param, cov = param0.clone(), cov0.clone()
    cpp.fused_update_dense_(param, cov, jac, coef, whitening, 1.0, 0.0, 0.0, float("inf"), False)
    assert torch.equal(param, p_ref) or float((param - p_ref).abs().max()) <= 1e-6
    assert float(((cov - c_ref).abs() / c_ref).max()) <= 1e-10


def test_dense_noncontiguous_jacobian_and_coef(cpp):
    m, n = 6, 1001
    jac_t = randn((n, m), torch.float32).T
    wide = randn((m, n + 9), torch.float32)[:, 5:5 + n]
    param0, cov0 = randn(n, torch.float32), rand_cov(n, torch.float32)
    for jac in (jac_t, wide):
        coef, whitening = _filter_terms(ref.innovation_cov_dense(jac, cov0), m, False)
        coef_strided = torch.stack([coef, coef], 1)[:, 0]
        whitening_t = whitening.T.contiguous().T
        p_ref, c_ref = param0.clone(), cov0.clone()
        ref.fused_update_dense_(p_ref, c_ref, jac, coef, whitening, 1.0, 0.0, 0.0, 1e9, False)
        param, cov = param0.clone(), cov0.clone()
        cpp.fused_update_dense_(param, cov, jac, coef_strided, whitening_t, 1.0, 0.0, 0.0, 1e9,
                                False)
        direction = ref.dense_step_direction(jac, coef)
        diag = ref.dense_diag_term(jac, whitening)
        exp_p, exp_c, p_scale, c_scale, _ = _expected(param0, cov0, direction, diag, 1.0, 0.0,
                                                      0.0, 1e9, False,
                                                      _abs_dense(jac, coef, whitening))
        _check(param, cov, exp_p, exp_c, p_scale, c_scale, torch.float32, torch.float32,
               "non-contiguous jac", 0.0, 1e9)


def test_inplace_noncontiguous_raises_naming_the_argument(cpp):
    m, n = 2, 20
    jac = randn((m, n), torch.float32)
    coef, whitening = torch.randn(m, dtype=F64), torch.eye(m, dtype=F64)
    param_nc = randn(2 * n, torch.float32)[::2]
    cov_nc = rand_cov(2 * n, torch.float32)[::2]
    with pytest.raises(RuntimeError, match="param"):
        cpp.fused_update_dense_(param_nc, rand_cov(n, torch.float32), jac, coef, whitening,
                                1.0, 0.0, 0.0, 1.0, False)
    with pytest.raises(RuntimeError, match="cov"):
        cpp.fused_update_dense_(randn(n, torch.float32), cov_nc, jac, coef, whitening,
                                1.0, 0.0, 0.0, 1.0, False)
    w_nc = randn((5, 4), torch.float32).T
    with pytest.raises(RuntimeError, match="weight"):
        cpp.fused_update_kron_(w_nc, rand_cov((4, 5), torch.float32), randn((m, 5), torch.float32),
                               randn((m, 4), torch.float32), coef, whitening, 1.0, 0.0, 0.0, 1.0,
                               False)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("pdtype", [torch.float32, F64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("information", [False, True], ids=["kalman", "information"])
@pytest.mark.parametrize("m", [1, 3, 32])
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (33, 65), (64, 257)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_kron_matches_reference(cpp, isa, pdtype, information, m, shape):
    cdtype = cov_dtype_for(pdtype)
    d_out, d_in = shape
    a, d = randn((m, d_in), pdtype), randn((m, d_out), pdtype)
    w0, cov0 = randn(shape, pdtype), rand_cov(shape, cdtype)
    lam = float(torch.empty(()).uniform_(0.7, 1.0))
    q = float(torch.empty(()).uniform_(0.0, 0.05))
    hph = ref.innovation_cov_kron(a, d, cov0, lam, q)
    coef, whitening = _filter_terms(hph, m, information)
    direction = ref.kron_step_direction(a, d, coef)
    diag = ref.kron_diag_term(a, d, whitening)
    raw = ref.cov_update(ref.predict_cov(cov0.to(F64), lam, q), diag, 0.0, float("inf"),
                         information).reshape(-1)
    n = d_out * d_in
    floor, ceil = _bounds(raw, n)
    exp_p, exp_c, p_scale, c_scale, _ = _expected(w0, cov0, direction, diag, lam, q, floor, ceil,
                                                  information, _abs_kron(a, d, coef, whitening))
    weight, check_w = embedded(w0.clone())
    cov, check_c = embedded(cov0.clone())
    with using_isa(cpp, isa):
        cpp.fused_update_kron_(weight, cov, a, d, coef, whitening, lam, q, floor, ceil,
                               information)
    check_w()
    check_c()
    _check(weight, cov, exp_p, exp_c, p_scale, c_scale, pdtype, cdtype,
           f"kron {isa} {pdtype} info={information} m={m} {shape}", floor, ceil)


def test_kron_equals_dense_float64(cpp):
    m, d_out, d_in = 5, 21, 34
    a, d = randn((m, d_in), F64), randn((m, d_out), F64)
    w0, cov0 = randn((d_out, d_in), F64), rand_cov((d_out, d_in), F64)
    coef, whitening = _filter_terms(ref.innovation_cov_kron(a, d, cov0), m, False)
    jac = torch.einsum("jo,ji->joi", d, a).reshape(m, -1)
    w1, c1 = w0.clone(), cov0.clone()
    w2, c2 = w0.clone(), cov0.clone()
    cpp.fused_update_kron_(w1, c1, a, d, coef, whitening, 0.9, 0.01, 0.0, 5.0, False)
    cpp.fused_update_dense_(w2, c2, jac, coef, whitening, 0.9, 0.01, 0.0, 5.0, False)
    assert float(((w1 - w2).abs() / (w2.abs() + 1e-300)).max()) <= 1e-10
    assert float(((c1 - c2).abs() / c2.abs()).max()) <= 1e-10


def test_kron_noncontiguous_inputs(cpp):
    m, d_out, d_in = 4, 9, 14
    a = randn((d_in, m), torch.float32).T
    d = randn((d_out, m), torch.float32).T
    w0, cov0 = randn((d_out, d_in), torch.float32), rand_cov((d_out, d_in), torch.float32)
    coef, whitening = _filter_terms(ref.innovation_cov_kron(a, d, cov0), m, False)
    w_ref, c_ref = w0.clone(), cov0.clone()
    ref.fused_update_kron_(w_ref, c_ref, a, d, coef, whitening, 1.0, 0.0, 0.0, 1e9, False)
    w, c = w0.clone(), cov0.clone()
    cpp.fused_update_kron_(w, c, a, d, coef, whitening, 1.0, 0.0, 0.0, 1e9, False)
    direction = ref.kron_step_direction(a, d, coef)
    diag = ref.kron_diag_term(a, d, whitening)
    exp_p, exp_c, p_scale, c_scale, _ = _expected(w0, cov0, direction, diag, 1.0, 0.0, 0.0, 1e9,
                                                  False, _abs_kron(a, d, coef, whitening))
    _check(w, c, exp_p, exp_c, p_scale, c_scale, torch.float32, torch.float32, "kron nc", 0.0,
           1e9)


# --------------------------------------------------------------------------------------
# End to end through kalman_kernels.ops and the optimizer
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("cov_update", ["kalman", "information"])
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
def test_kalman_update_cpp_equals_reference(cpp, cov_update, dtype):
    m = 6
    cdt = cov_dtype_for(dtype)
    dense_p, dense_c = randn((11, 7), dtype), rand_cov((11, 7), cdt)
    jac = randn((m, 11, 7), dtype)
    kw, kc = randn((9, 5), dtype), rand_cov((9, 5), cdt)
    a, d = randn((m, 5), dtype), randn((m, 9), dtype)
    residual = torch.randn(m, dtype=dtype)
    state = {}
    for backend in ("reference", "cpp"):
        tensors = [t.clone() for t in (dense_p, dense_c, kw, kc)]
        blocks = [kk.ops.DenseBlock(tensors[0], tensors[1], jac),
                  kk.ops.KronBlock(tensors[2], tensors[3], a, d)]
        info = kk.ops.kalman_update_(blocks, residual, 0.1, lr=0.8, forgetting=0.97,
                                     process_noise=1e-3, cov_floor=1e-4, cov_ceiling=2.0,
                                     gate=0.99, cov_update=cov_update, backend=backend)
        state[backend] = (tensors, info)
    (t_ref, i_ref), (t_cpp, i_cpp) = state["reference"], state["cpp"]
    tol = 1e-10 if dtype == F64 else 1e-4
    assert abs(i_ref.mahalanobis - i_cpp.mahalanobis) <= tol * abs(i_ref.mahalanobis)
    for got, want in zip(t_cpp, t_ref):
        scale = want.to(F64).abs().max()
        assert float((got.to(F64) - want.to(F64)).abs().max() / scale) <= tol


def test_optimizer_trajectory_cpp_equals_reference_50_steps(cpp):
    """KalmanNGD(backend='cpp') follows the reference trajectory over 50 batch steps."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    x_all = torch.randn(50, 8, 5, dtype=F64)
    w_true = torch.randn(3, 5, dtype=F64)
    y_all = x_all @ w_true.T + 0.1 * torch.randn(50, 8, 3, dtype=F64)
    init = torch.nn.Linear(5, 3).double().state_dict()
    results = {}
    for backend in ("reference", "cpp"):
        model = torch.nn.Linear(5, 3).double()
        model.load_state_dict(init)
        opt = kk.KalmanNGD(model.parameters(), lr=1.0, init_cov=0.5, obs_noise=0.05,
                           forgetting=0.99, process_noise=1e-4, backend=backend)
        for x, y in zip(x_all, y_all):
            opt.step(lambda x=x, y=y: (model(x), y))
        results[backend] = [p.detach().clone() for p in model.parameters()] + \
            [opt.covariance(p).clone() for p in model.parameters()]
    for got, want in zip(results["cpp"], results["reference"]):
        assert float((got - want).abs().max() / want.abs().max()) <= 1e-9
