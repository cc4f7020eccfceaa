"""step_terms_dense / step_terms_kron / apply_terms_ (the per-parameter terms that ranks
all-reduce, docs/design.md, 2.5) on every backend, against the float64 answer."""
import pytest
import torch

import kalman_kernels.reference as ref
from op_checks import (
    F64,
    assert_close_scaled,
    bits,
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


def _expected_terms(jac, coef, whitening):
    h = jac.to(F64)
    fh = whitening @ h
    afh = whitening.abs() @ h.abs()
    return (coef @ h, (fh * fh).sum(0), coef.abs() @ h.abs(), (afh * afh).sum(0))


def _check_terms(kb, got, jac, coef, whitening, dtype, what):
    u, d = got
    u_exp, d_exp, u_scale, d_scale = _expected_terms(jac, coef, whitening)
    assert u.dtype in (torch.float32, F64) and d.dtype == u.dtype
    if dtype == F64:
        assert u.dtype == F64, f"{what}: float64 inputs need float64 terms"
    tol = tol_for(dtype if dtype == F64 else torch.float32, reduction=True, exact64=kb.exact64)
    assert_close_scaled(u.reshape(-1), u_exp, u_scale, tol, what + " direction")
    assert_close_scaled(d.reshape(-1), d_exp, d_scale, tol, what + " diag")


@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m,n", [(1, 1), (1, 4099), (3, 7), (32, 1023), (40, 257),
                                 (70, 1031)])
def test_step_terms_dense(kb, dtype, m, n):
    if not kb.fits(m * n):
        pytest.skip("too large for the interpreter")
    jac = randn((m, n), dtype)
    coef, whitening = filter_terms(ref.innovation_cov_dense(jac, rand_cov(n, F64)), False)
    with kb.active() as be:
        got = be.step_terms_dense(kb.to(jac), kb.to(coef), kb.to(whitening))
    assert got[0].shape == (n,) and got[1].shape == (n,)
    _check_terms(kb, got, jac, coef, whitening, dtype, f"terms dense {kb} {dtype} m={m} n={n}")


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 1, 5, 7), (3, 4, 9, 6), (8, 10, 17, 3)],
                         ids=lambda s: "B{}K{}o{}i{}".format(*s))
def test_step_terms_kron(kb, dtype, shape):
    b, k, d_out, d_in = shape
    a, d = randn((b, d_in), dtype), randn((b, k, d_out), dtype)
    jac = kron_jacobian(a, d)
    coef, whitening = filter_terms(ref.innovation_cov_dense(jac, rand_cov(d_out * d_in, F64)),
                                   False)
    with kb.active() as be:
        got = be.step_terms_kron(kb.to(a), kb.to(d), kb.to(coef), kb.to(whitening))
    assert got[0].shape == (d_out, d_in) and got[1].shape == (d_out, d_in)
    _check_terms(kb, got, jac, coef, whitening, dtype, f"terms kron {kb} {dtype} {shape}")


@pytest.mark.parametrize("pdtype", [torch.float32, F64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("information", [False, True], ids=["kalman", "information"])
def test_apply_terms(kb, pdtype, information):
    n = 2051
    cdtype = F64 if pdtype == F64 else torch.float32
    param0, cov0 = randn((n,), pdtype), rand_cov((n,), cdtype)
    direction = randn((n,), F64, scale=0.3)
    diag = rand_cov((n,), F64, lo=0.0, hi=3.0)
    lam, q = hyper()
    p_pred = ref.predict_cov(cov0.to(F64), lam, q)
    raw = ref.cov_update(p_pred, diag, 0.0, float("inf"), information)
    floor, ceil = float(torch.quantile(raw, 0.2)), float(torch.quantile(raw, 0.8))
    exp_p = param0.to(F64) + p_pred * direction
    exp_c = raw.clamp(floor, ceil)
    param, check_p = embedded(kb.to(param0.clone()))
    cov, check_c = embedded(kb.to(cov0.clone()))
    with kb.active() as be:
        be.apply_terms_(param, cov, kb.to(direction.to(cdtype)), kb.to(diag.to(cdtype)),
                        true_(kb.device), lam, q, floor, ceil, information)
    check_p()
    check_c()
    tol = tol_for(pdtype, cdtype, exact64=kb.exact64)
    p_scale = param0.to(F64).abs() + p_pred * direction.abs()
    c_scale = torch.maximum(p_pred + p_pred * p_pred * diag, exp_c)
    assert_close_scaled(param, exp_p, p_scale, tol, f"apply {kb} param")
    assert_close_scaled(cov, exp_c, c_scale, tol_for(cdtype, exact64=kb.exact64), f"apply {kb} cov")


def test_apply_terms_ok_false(kb):
    param0, cov0 = randn((77,), torch.float32), rand_cov((77,), torch.float32)
    param, cov = kb.to(param0.clone()), kb.to(cov0.clone())
    nan = kb.to(torch.full((77,), float("nan"), dtype=torch.float32))
    with kb.active() as be:
        be.apply_terms_(param, cov, nan, nan, false_(kb.device), 0.5, 0.1, 0.3, 0.6, False)
    assert torch.equal(bits(param.cpu()), bits(param0))
    assert torch.equal(bits(cov.cpu()), bits(cov0))
