"""An independent float64 NumPy formulation of one Kalman step, for the tests.

It builds the full m x n Jacobian and runs the textbook full-matrix Kalman update with a
diagonal prior covariance, then takes the diagonal. Nothing here imports the package.
"""
import numpy as np
from scipy.stats import chi2


def kron_rows(inputs, grad_outputs):
    """H rows vec(D_j A_j^T) of a Kronecker block, shape (m, d_out * d_in)."""
    a = np.asarray(inputs, dtype=np.float64)
    d = np.asarray(grad_outputs, dtype=np.float64)
    return np.stack([np.outer(d[j], a[j]).ravel() for j in range(a.shape[0])])


def noise_matrix(r, m):
    r = np.asarray(r, dtype=np.float64)
    if r.ndim == 0:
        return float(r) * np.eye(m)
    if r.ndim == 1:
        return np.diag(r)
    return r


def kalman_step(mu, p, h, e, r, *, lr=1.0, lam=1.0, q=0.0, p_min=0.0, p_max=np.inf, gate=None,
                rule="kalman"):
    """Returns (mu_new, p_new, S, d2, s) for one step; all float64 NumPy."""
    mu = np.asarray(mu, dtype=np.float64).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    h = np.asarray(h, dtype=np.float64)
    e = np.asarray(e, dtype=np.float64).ravel()
    m = h.shape[0]
    R = noise_matrix(r, m)
    p_pred = p / lam + q
    sigma = np.diag(p_pred)
    S = h @ sigma @ h.T + R
    S_inv = np.linalg.inv(S)
    gain = sigma @ h.T @ S_inv
    d2 = float(e @ S_inv @ e)
    s = 1.0
    if gate is not None:
        tau = chi2.ppf(gate, m)
        s = min(1.0, np.sqrt(tau / d2))
    mu_new = mu + lr * s * gain @ e
    if rule == "kalman":
        post = (np.eye(len(p)) - gain @ h) @ sigma
        p_new = np.diag(post).copy()
    else:
        p_new = 1.0 / (1.0 / p_pred + np.diag(h.T @ np.linalg.inv(R) @ h))
    return mu_new, np.clip(p_new, p_min, p_max), S, d2, s


def loss_step(mu, p, g, loss, r, *, target=0.0, lr=1.0, lam=1.0, q=0.0, p_min=0.0,
              p_max=np.inf, rule="kalman"):
    """Loss-observation mode (docs/design.md, 2.2) written as the m = 1 case of the
    full-matrix filter with H = g^T."""
    mu_new, p_new, S, d2, s = kalman_step(mu, p, np.asarray(g, dtype=np.float64).reshape(1, -1),
                                          [target - loss], r, lr=lr, lam=lam, q=q, p_min=p_min,
                                          p_max=p_max, rule=rule)
    return mu_new, p_new, S, d2


def blr_posterior(X, y, prior_mean, prior_var, r):
    """Closed-form Bayesian linear regression posterior (prior N(mu0, diag(v0)), noise r I)."""
    X = np.asarray(X, dtype=np.float64)
    prec = np.diag(1.0 / np.asarray(prior_var)) + X.T @ X / r
    rhs = np.asarray(prior_mean) / np.asarray(prior_var) + X.T @ np.asarray(y) / r
    return np.linalg.solve(prec, rhs), np.linalg.inv(prec)
