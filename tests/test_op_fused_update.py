"""fused_update_dense_ / fused_update_kron_ on every backend, against the float64 answer.

Every case writes into parameter / covariance tensors embedded in guard buffers (writes
outside the tensors fail), compares every element with the float64 answer on the scale of
the terms that form it, clamps some elements at the floor and some at the ceiling, and
checks the skip predicate: ``ok`` false leaves both tensors bit-for-bit unchanged.
"""
import pytest
import torch

import kalman_kernels.reference as ref
from op_checks import (
    F64,
    PARAM_DTYPES,
    assert_close_scaled,
    bits,
    cov_dtype_for,
    embedded,
    false_,
    filter_terms,
    hyper,
    kron_jacobian,
    rand_cov,
    randn,
    tol_for,
    true_,
)

KRON_SHAPES = [(1, 1, 1, 1), (3, 1, 5, 7), (1, 10, 9, 4), (3, 2, 33, 17), (5, 7, 6, 11),
               (32, 10, 3, 5), (4, 3, 64, 129)]


def _expected(param, cov, jac, coef, whitening, lam, q, floor, ceil, information):
    """float64 answer and per-element error scales (the same sums over absolute values)."""
    h = jac.to(F64)
    p_pred = ref.predict_cov(cov.reshape(-1).to(F64), lam, q)
    direction = coef @ h
    fh = whitening @ h
    diag = (fh * fh).sum(0)
    new_param = param.reshape(-1).to(F64) + p_pred * direction
    new_cov = ref.cov_update(p_pred, diag, floor, ceil, information)
    abs_dir = coef.abs() @ h.abs()
    afh = whitening.abs() @ h.abs()
    abs_diag = (afh * afh).sum(0)
    p_scale = param.reshape(-1).to(F64).abs() + p_pred * abs_dir
    if information:
        c_scale = torch.maximum(new_cov.abs(), new_cov * new_cov * abs_diag)
    else:
        c_scale = torch.maximum(p_pred + p_pred * p_pred * abs_diag, new_cov.abs())
    return new_param, new_cov, p_scale, c_scale


def _bounds(jac, cov, whitening, lam, q, information):
    """A floor and a ceiling that clamp some elements (n >= 8), else inactive bounds."""
    n = cov.numel()
    if n < 8:
        return 0.0, float("inf")
    fh = whitening @ jac.to(F64)
    raw = ref.cov_update(ref.predict_cov(cov.reshape(-1).to(F64), lam, q), (fh * fh).sum(0),
                         0.0, float("inf"), information)
    return float(torch.quantile(raw, 0.2)), float(torch.quantile(raw, 0.8))


def _check(kb, param, cov, exp_p, exp_c, p_scale, c_scale, pdtype, cdtype, floor, ceil, what):
    tol_p = tol_for(pdtype, cdtype, exact64=kb.exact64)
    tol_c = tol_for(cdtype, pdtype if pdtype in (F64, torch.float32) else torch.float32,
                    exact64=kb.exact64)
    assert_close_scaled(param, exp_p, p_scale, tol_p, what + " param")
    assert_close_scaled(cov, exp_c, c_scale, tol_c, what + " cov")
    got = cov.detach().cpu().to(F64)
    assert bool((got >= torch.tensor(floor, dtype=cov.dtype).to(F64)).all()), "below floor"
    assert bool((got <= torch.tensor(ceil, dtype=cov.dtype).to(F64)).all()), "above ceiling"



@pytest.mark.parametrize("pdtype", PARAM_DTYPES, ids=str)
@pytest.mark.parametrize("information", [False, True], ids=["kalman", "information"])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 32])
@pytest.mark.parametrize("n", [1, 7, 1023, 4099])
def test_dense_matches_float64(kb, pdtype, information, m, n):
    _dense_case(kb, pdtype, information, m, n)


@pytest.mark.parametrize("pdtype", [torch.float32, F64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("information", [False, True], ids=["kalman", "information"])
@pytest.mark.parametrize("m,n", [(33, 130), (70, 1031), (128, 67)])
def test_dense_many_observations(kb, pdtype, information, m, n):
    """m > 32: the kernels' paths for many observations (e.g. a tiled F H), partial tiles."""
    _dense_case(kb, pdtype, information, m, n)


def _dense_case(kb, pdtype, information, m, n):
    if not kb.fits(m * n):
        pytest.skip("too large for the interpreter")
    cdtype = cov_dtype_for(pdtype)
    jac = randn((m, n), pdtype)
    param0, cov0 = randn(n, pdtype), rand_cov(n, cdtype)
    lam, q = hyper()
    coef, whitening = filter_terms(ref.innovation_cov_dense(jac, cov0, lam, q), information)
    floor, ceil = _bounds(jac, cov0, whitening, lam, q, information)
    exp = _expected(param0, cov0, jac, coef, whitening, lam, q, floor, ceil, information)
    if n >= 8:
        assert bool((exp[1] == floor).any()) and bool((exp[1] == ceil).any())
    param, check_p = embedded(kb.to(param0.clone()))
    cov, check_c = embedded(kb.to(cov0.clone()))
    with kb.active() as be:
        be.fused_update_dense_(param, cov, kb.to(jac), kb.to(coef), kb.to(whitening),
                               true_(kb.device), lam, q, floor, ceil, information)
    check_p()
    check_c()
    _check(kb, param, cov, *exp, pdtype, cdtype, floor, ceil,
           f"dense {kb} {pdtype} info={information} m={m} n={n}")


@pytest.mark.parametrize("pdtype", PARAM_DTYPES, ids=str)
@pytest.mark.parametrize("information", [False, True], ids=["kalman", "information"])
@pytest.mark.parametrize("shape", KRON_SHAPES, ids=lambda s: "B{}K{}o{}i{}".format(*s))
def test_kron_matches_float64(kb, pdtype, information, shape):
    b, k, d_out, d_in = shape
    if not kb.fits(b * b * d_out * d_in + (b * k) ** 2 * d_out):
        pytest.skip("too large for the interpreter")
    cdtype = cov_dtype_for(pdtype)
    a, d = randn((b, d_in), pdtype), randn((b, k, d_out), pdtype)
    w0, cov0 = randn((d_out, d_in), pdtype), rand_cov((d_out, d_in), cdtype)
    lam, q = hyper()
    jac = kron_jacobian(a, d)
    coef, whitening = filter_terms(ref.innovation_cov_dense(jac, cov0, lam, q), information)
    floor, ceil = _bounds(jac, cov0, whitening, lam, q, information)
    exp = _expected(w0, cov0, jac, coef, whitening, lam, q, floor, ceil, information)
    weight, check_w = embedded(kb.to(w0.clone()))
    cov, check_c = embedded(kb.to(cov0.clone()))
    with kb.active() as be:
        be.fused_update_kron_(weight, cov, kb.to(a), kb.to(d), kb.to(coef), kb.to(whitening),
                              true_(kb.device), lam, q, floor, ceil, information)
    check_w()
    check_c()
    _check(kb, weight, cov, *exp, pdtype, cdtype, floor, ceil,
           f"kron {kb} {pdtype} info={information} {shape}")


def test_kron_two_dim_grad_outputs_is_k1(kb):
    a, d = randn((6, 13), torch.float32), randn((6, 11), torch.float32)
    w0, cov0 = randn((11, 13), torch.float32), rand_cov((11, 13), torch.float32)
    jac = kron_jacobian(a, d)
    coef, whitening = filter_terms(ref.innovation_cov_dense(jac, cov0), False)
    exp = _expected(w0, cov0, jac, coef, whitening, 1.0, 0.0, 0.0, float("inf"), False)
    weight, cov = kb.to(w0.clone()), kb.to(cov0.clone())
    with kb.active() as be:
        be.fused_update_kron_(weight, cov, kb.to(a), kb.to(d), kb.to(coef), kb.to(whitening),
                              true_(kb.device), 1.0, 0.0, 0.0, float("inf"), False)
    _check(kb, weight, cov, *exp, torch.float32, torch.float32, 0.0, float("inf"),
           f"kron {kb} 2-D grad_outputs")


def test_dense_strided_read_only_inputs(kb):
    m, n = 5, 301
    jac = randn((n, m), torch.float32).T             # (m, n) with column stride m
    param0, cov0 = randn(n, torch.float32), rand_cov(n, torch.float32)
    coef, whitening = filter_terms(ref.innovation_cov_dense(jac, cov0), True)
    coef_strided = torch.stack([coef, coef], 1)[:, 0]
    exp = _expected(param0, cov0, jac, coef, whitening, 1.0, 0.0, 0.0, float("inf"), True)
    param, cov = kb.to(param0.clone()), kb.to(cov0.clone())
    with kb.active() as be:
        be.fused_update_dense_(param, cov, kb.to(jac), kb.to(coef_strided),
                               kb.to(whitening.T.contiguous().T), true_(kb.device), 1.0, 0.0, 0.0,
                               float("inf"), True)
    _check(kb, param, cov, *exp, torch.float32, torch.float32, 0.0, float("inf"),
           f"dense {kb} strided inputs")


# ------------------------------------------------------------------ the skip predicate
@pytest.mark.parametrize("kind", ["dense", "kron"])
@pytest.mark.parametrize("pdtype", [torch.float32, torch.bfloat16, F64], ids=str)
def test_ok_false_leaves_state_bit_for_bit(kb, kind, pdtype):
    """ok = False: nothing is written, even with NaN coefficients, a forgetting < 1 and a
    floor above some covariances (each of which would change the state if applied)."""
    cdtype = cov_dtype_for(pdtype)
    if kind == "dense":
        m, n = 3, 517
        shape = (n,)
        jac = randn((m, n), pdtype)
    else:
        b, k, d_out, d_in = 3, 2, 7, 9
        m, shape = b * k, (d_out, d_in)
        a, d = randn((b, d_in), pdtype), randn((b, k, d_out), pdtype)
    param0, cov0 = randn(shape, pdtype), rand_cov(shape, cdtype, lo=1e-6, hi=1.0)
    coef = torch.full((m,), float("nan"), dtype=F64)
    whitening = torch.full((m, m), float("nan"), dtype=F64)
    param, cov = kb.to(param0.clone()), kb.to(cov0.clone())
    args = (kb.to(coef), kb.to(whitening), false_(kb.device), 0.5, 0.1, 0.3, 0.6, False)
    with kb.active() as be:
        if kind == "dense":
            be.fused_update_dense_(param, cov, kb.to(jac), *args)
        else:
            be.fused_update_kron_(param, cov, kb.to(a), kb.to(d), *args)
    assert torch.equal(bits(param.cpu()), bits(param0)), f"{kb}: param changed under ok=False"
    assert torch.equal(bits(cov.cpu()), bits(cov0)), f"{kb}: covariance changed under ok=False"


def test_in_place_outputs_must_be_contiguous(kb):
    if kb.name == "reference":
        pytest.skip("the reference writes through any view")
    jac = randn((2, 10), torch.float32)
    param = kb.to(randn(20, torch.float32))[::2]
    cov = kb.to(rand_cov(10, torch.float32))
    coef, whitening = filter_terms(ref.innovation_cov_dense(jac, cov.cpu()), False)
    with kb.active() as be, pytest.raises(RuntimeError, match="param"):
        be.fused_update_dense_(param, cov, kb.to(jac), kb.to(coef), kb.to(whitening),
                               true_(kb.device), 1.0, 0.0, 0.0, float("inf"), False)


def test_kron_many_pairs_accumulate_in_blocks(kb):
    """Enough samples that the cpp backend accumulates the diagonal term over pair blocks
    (the O(n) fallback) instead of row tiles: same result."""
    if kb.interpreted or kb.emulated:
        pytest.skip("too large for an interpreter or emulator")
    b, k, d_out, d_in = 300, 1, 7, 1500
    a, d = randn((b, d_in), torch.float32), randn((b, k, d_out), torch.float32)
    w0, cov0 = randn((d_out, d_in), torch.float32), rand_cov((d_out, d_in), torch.float32)
    hph = ref.innovation_cov_kron(a, d, cov0)
    coef, whitening = filter_terms(hph, False, r=float(torch.diagonal(hph).mean()))
    weight, cov = kb.to(w0.clone()), kb.to(cov0.clone())
    with kb.active() as be:
        be.fused_update_kron_(weight, cov, kb.to(a), kb.to(d), kb.to(coef), kb.to(whitening),
                              true_(kb.device), 1.0, 0.0, 0.0, float("inf"), False)
    w_ref, c_ref = w0.clone(), cov0.clone()
    ref.fused_update_kron_(w_ref, c_ref, a, d, coef, whitening, true_(), 1.0, 0.0, 0.0,
                           float("inf"), False)
    step = (w_ref.double() - w0.double()).abs().max()
    assert float((weight.cpu().double() - w_ref.double()).abs().max()) <= 1e-4 * float(step) + 1e-6
    assert float((cov.cpu().double() - c_ref.double()).abs().max()) <= 1e-4 * float(cov0.max())
