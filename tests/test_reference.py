"""The reference equations on their own: exact cases and helpers (docs/design.md, 2 and 5)."""
import numpy as np
import pytest
import torch
from scipy.stats import chi2

from conftest import rel_err
from kalman_kernels import reference as ref
from oracle_numpy import blr_posterior, kron_rows


@pytest.mark.parametrize("prob", [0.5, 0.9, 0.99, 0.999])
@pytest.mark.parametrize("dof", [1, 2, 7, 32, 320])
def test_chi2_quantile_matches_scipy(prob, dof):
    assert ref.chi2_quantile(prob, dof) == pytest.approx(chi2.ppf(prob, dof), rel=1e-9)


def test_sequential_full_covariance_filter_is_bayesian_linear_regression(rng):
    """Exact case 1 (docs/design.md, 5): batches of a linear-Gaussian model give the
    closed-form posterior."""
    n, batches, m, r = 6, 7, 5, 0.3
    w_true = rng.standard_normal(n)
    prior_mean = rng.standard_normal(n) * 0.1
    prior_var = rng.uniform(0.5, 2.0, n)
    xs, ys = [], []
    mu = torch.tensor(prior_mean)
    sigma = torch.diag(torch.tensor(prior_var))
    for _ in range(batches):
        x = rng.standard_normal((m, n))
        y = x @ w_true + np.sqrt(r) * rng.standard_normal(m)
        xs.append(x)
        ys.append(y)
        e = torch.tensor(y) - torch.tensor(x) @ mu          # the model is linear: H = X
        mu, sigma = ref.full_cov_update(mu, sigma, torch.tensor(x), e,
                                         torch.tensor(r, dtype=torch.float64))
    mean_exp, cov_exp = blr_posterior(np.concatenate(xs), np.concatenate(ys), prior_mean,
                                      prior_var, r)
    assert rel_err(mu, mean_exp) <= 1e-10
    assert rel_err(sigma, cov_exp) <= 1e-10


def test_kron_innovation_and_terms_equal_dense_rows(rng):
    m, d_out, d_in = 4, 5, 3
    a = torch.tensor(rng.standard_normal((m, d_in)))
    d = torch.tensor(rng.standard_normal((m, d_out)))
    p = torch.tensor(rng.uniform(0.1, 1.0, (d_out, d_in)))
    h = torch.tensor(kron_rows(a.numpy(), d.numpy()))
    assert rel_err(ref.innovation_cov_kron(a, d, p, 0.9, 0.01),
                   ref.innovation_cov_dense(h, p, 0.9, 0.01)) <= 1e-12
    c = torch.tensor(rng.standard_normal(m))
    f = torch.tensor(np.tril(rng.standard_normal((m, m))))
    assert rel_err(ref.kron_step_direction(a, d, c).reshape(-1),
                   ref.dense_step_direction(h, c)) <= 1e-12
    assert rel_err(ref.kron_diag_term(a, d, f).reshape(-1), ref.dense_diag_term(h, f)) <= 1e-12


@pytest.mark.parametrize("batched", [False, True], ids=["sequential", "batched"])
def test_cholesky_ladder_reports_failure_and_success(batched):
    """Both ways of walking the ladder (host reads on eager CPU, all rungs at once on a
    device) give the same factor, jitter and verdict."""
    _, _, ok = ref.cholesky_with_jitter(-torch.eye(3, dtype=torch.float64), batched=batched)
    assert not bool(ok)
    nan = torch.full((2, 2), float("nan"), dtype=torch.float64)
    factor, _, ok = ref.cholesky_with_jitter(nan, batched=batched)
    assert not bool(ok) and bool(torch.isfinite(factor).all())
    singular = torch.ones(3, 3, dtype=torch.float64)
    factor, jitter, ok = ref.cholesky_with_jitter(singular, batched=batched)
    assert bool(ok) and float(jitter) in ref.JITTER_LADDER
    scale = 1.0   # trace(S) / m
    rebuilt = factor @ factor.T
    expected = singular + float(jitter) * scale * torch.eye(3, dtype=torch.float64)
    assert torch.allclose(rebuilt, expected, rtol=1e-12, atol=1e-12)
    good = torch.eye(3, dtype=torch.float64) * 2
    factor, jitter, ok = ref.cholesky_with_jitter(good, batched=batched)
    assert bool(ok) and float(jitter) == 0.0
    assert torch.equal(factor, torch.linalg.cholesky(good))


def test_whitening_gives_mahalanobis_and_solve(rng):
    m = 6
    x = rng.standard_normal((m, m))
    s = torch.tensor(x @ x.T + m * np.eye(m))
    e = torch.tensor(rng.standard_normal(m))
    factor, _, _ = ref.cholesky_with_jitter(s)
    z = ref.whiten(factor, e)
    s_inv = np.linalg.inv(s.numpy())
    assert float(ref.mahalanobis(z)) == pytest.approx(float(e.numpy() @ s_inv @ e.numpy()),
                                                      rel=1e-12)
    assert rel_err(ref.solve_from_whitened(factor, z), s_inv @ e.numpy()) <= 1e-12
    w = ref.whitening_matrix(factor)
    assert rel_err(w.T @ w, s_inv) <= 1e-10


def test_information_rule_never_negative_where_kalman_would_be_clamped():
    # A huge diagonal term: the Kalman rule goes negative (then clamps to the floor),
    # the information rule stays positive.
    p_pred = torch.tensor([1.0, 2.0], dtype=torch.float64)
    big = torch.tensor([10.0, 5.0], dtype=torch.float64)
    kal = ref.cov_update_kalman(p_pred, big, 0.0, float("inf"))
    info = ref.cov_update_information(p_pred, big, 0.0, float("inf"))
    assert (kal == 0).all()
    assert torch.allclose(info, 1 / (1 / p_pred + big))
    assert (info > 0).all()


def test_adaptive_noise_formula(rng):
    e = torch.tensor(rng.standard_normal(9))
    spread, r, beta = 0.2, 0.5, 0.1
    expected = (1 - beta) * r + beta * max(ref.ADAPTIVE_NOISE_FLOOR, float((e * e).mean()) - spread)
    assert ref.adapt_obs_noise(r, beta, e, spread) == pytest.approx(expected, rel=1e-14)
    # Residuals smaller than the predicted spread: the floor keeps r positive.
    tiny = torch.full((3,), 1e-6, dtype=torch.float64)
    assert ref.adapt_obs_noise(r, 1.0, tiny, spread) == ref.ADAPTIVE_NOISE_FLOOR
    assert ref.adapt_obs_noise(r, 0.0, e, spread) == r


def test_gate_scale():
    assert ref.gate_scale(5.0, None) == 1.0
    assert ref.gate_scale(5.0, 10.0) == 1.0
    assert ref.gate_scale(40.0, 10.0) == pytest.approx(0.5)
