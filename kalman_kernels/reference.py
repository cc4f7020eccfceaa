"""Pure-PyTorch reference of the diagonal Kalman filter (DESIGN section 2).

This module is the oracle every other backend is tested against and is what
``backend="reference"`` runs. It favours readability over speed: one function per
equation, and every accumulation is done in float64 whatever the input dtype, so its
results are the float64 answer rounded once into the state's dtype.

Notation (DESIGN section 2): ``P`` is the diagonal covariance, ``P-`` the predicted one,
``H`` the (m, n) Jacobian, ``S = H diag(P-) H^T + R`` the innovation covariance,
``L`` its Cholesky factor, ``z = L^-1 e`` the whitened residual.

Two groups of functions live here:

* the equations, used by :mod:`kalman_kernels.ops` for the small m x m work that every
  backend shares (factor, whiten, gate, adaptive noise), and by the tests;
* the *kernel entry points* (``innovation_cov_dense``, ``innovation_cov_kron``,
  ``fused_update_dense_``, ``fused_update_kron_``, ``loss_quad_form``, ``loss_step_``):
  the per-parameter passes that compiled backends replace. Their signatures are the
  backend contract documented in ``kalman_kernels/backends/README.md``.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import torch

F64 = torch.float64

#: Relative jitters tried, in order, when the Cholesky factorisation of S fails
#: (DESIGN 2, step 3): S + eps * trace(S) / m * I.
JITTER_LADDER = (1e-10, 1e-8, 1e-6)

#: Lower bound of the adaptive observation noise (DESIGN 2.3): keeps r > 0 when the
#: residuals are smaller than the predicted spread.
ADAPTIVE_NOISE_FLOOR = 1e-8


# --------------------------------------------------------------------------------------
# Step 1: predict
# --------------------------------------------------------------------------------------
def predict_cov(cov: torch.Tensor, forgetting: float = 1.0, process_noise: float = 0.0) -> torch.Tensor:
    """P- = P / lam + q (the mean is unchanged by the prediction)."""
    return cov / forgetting + process_noise


# --------------------------------------------------------------------------------------
# Step 2: innovation covariance (without R)
# --------------------------------------------------------------------------------------
def innovation_cov_dense(jac: torch.Tensor, cov: torch.Tensor, forgetting: float = 1.0,
                         process_noise: float = 0.0) -> torch.Tensor:
    """H diag(P-) H^T for a dense block; ``jac`` is (m, n), ``cov`` holds n elements."""
    h = jac.reshape(jac.shape[0], -1).to(F64)
    p = predict_cov(cov.reshape(-1).to(F64), forgetting, process_noise)
    return (h * p) @ h.T


def innovation_cov_kron(inputs: torch.Tensor, grad_outputs: torch.Tensor, cov: torch.Tensor,
                        forgetting: float = 1.0, process_noise: float = 0.0) -> torch.Tensor:
    """S_jk = sum_{o,i} P-[o,i] D[j,o] D[k,o] A[j,i] A[k,i] (DESIGN 2.1), without building H.

    ``inputs`` A is (m, d_in), ``grad_outputs`` D is (m, d_out), ``cov`` is (d_out, d_in).
    """
    a = inputs.to(F64)
    d = grad_outputs.to(F64)
    p = predict_cov(cov.to(F64), forgetting, process_noise)
    dd = d[:, None, :] * d[None, :, :]          # (m, m, d_out): D_j (.) D_k
    aa = a[:, None, :] * a[None, :, :]          # (m, m, d_in):  A_j (.) A_k
    return torch.einsum("jko,oi,jki->jk", dd, p, aa)


def add_obs_noise(hph: torch.Tensor, obs_noise: torch.Tensor) -> torch.Tensor:
    """S = H P- H^T + R for R given as a 0-d scalar, an (m,) diagonal or an (m, m) matrix."""
    r = obs_noise.to(F64)
    if r.dim() == 0:
        return hph + r * torch.eye(hph.shape[0], dtype=F64, device=hph.device)
    if r.dim() == 1:
        return hph + torch.diag(r)
    return hph + r


# --------------------------------------------------------------------------------------
# Step 3: Cholesky with the jitter ladder
# --------------------------------------------------------------------------------------
def cholesky_with_jitter(s: torch.Tensor):
    """Factor S = L L^T in float64, adding eps * trace(S)/m * I on failure.

    Returns ``(L, jitter)`` where ``jitter`` is the eps that succeeded (0.0 for none), or
    ``(None, None)`` when every rung of the ladder failed: the caller skips the step.
    """
    s = s.to(F64)
    if not bool(torch.isfinite(s).all()):
        return None, None
    factor, info = torch.linalg.cholesky_ex(s)
    if int(info) == 0:
        return factor, 0.0
    m = s.shape[0]
    scale = float(torch.diagonal(s).sum()) / m
    eye = torch.eye(m, dtype=F64, device=s.device)
    for eps in JITTER_LADDER:
        factor, info = torch.linalg.cholesky_ex(s + (eps * scale) * eye)
        if int(info) == 0:
            return factor, eps
    return None, None


# --------------------------------------------------------------------------------------
# Step 4: whitened residual and Mahalanobis distance
# --------------------------------------------------------------------------------------
def whiten(factor: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """z = L^-1 e."""
    e = residual.reshape(-1, 1).to(F64)
    return torch.linalg.solve_triangular(factor, e, upper=False).reshape(-1)


def mahalanobis(z: torch.Tensor) -> float:
    """d2 = z^T z = e^T S^-1 e."""
    return float(z @ z)


def solve_from_whitened(factor: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """S^-1 e = L^-T z."""
    return torch.linalg.solve_triangular(factor.T, z.reshape(-1, 1), upper=True).reshape(-1)


def whitening_matrix(factor: torch.Tensor) -> torch.Tensor:
    """L^-1, so that diag(H^T S^-1 H)_i = || L^-1 H[:, i] ||^2."""
    eye = torch.eye(factor.shape[0], dtype=factor.dtype, device=factor.device)
    return torch.linalg.solve_triangular(factor, eye, upper=False)


# --------------------------------------------------------------------------------------
# Step 5: gate
# --------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1024)
def chi2_quantile(prob: float, dof: int) -> float:
    """The chi-square quantile at ``prob`` for ``dof`` degrees of freedom.

    Solved by bisection on the regularised lower incomplete gamma function, so that no
    SciPy is needed at run time (the tests compare it with ``scipy.stats.chi2.ppf``).
    """
    if not 0.0 < prob < 1.0:
        raise ValueError(f"gate must be a probability in (0, 1), got {prob}")
    k = torch.tensor(dof / 2.0, dtype=F64)

    def cdf(x: float) -> float:
        return float(torch.special.gammainc(k, torch.tensor(x / 2.0, dtype=F64)))

    lo, hi = 0.0, max(1.0, float(dof))
    while cdf(hi) < prob:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if cdf(mid) < prob:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * hi:
            break
    return 0.5 * (lo + hi)


def gate_scale(d2: float, tau: Optional[float]) -> float:
    """s = 1 without gating, else min(1, sqrt(tau / d2))."""
    if tau is None or d2 <= tau:
        return 1.0
    return math.sqrt(tau / d2)


# --------------------------------------------------------------------------------------
# Steps 6 and 7: mean step and covariance update
# --------------------------------------------------------------------------------------
def mean_step(param: torch.Tensor, cov_pred: torch.Tensor, direction: torch.Tensor,
              step_scale: float) -> torch.Tensor:
    """mu + alpha * s * P- (.) direction, where ``direction`` = H^T S^-1 e."""
    return param.to(F64) + step_scale * cov_pred.to(F64) * direction.to(F64)


def cov_update_kalman(cov_pred: torch.Tensor, diag_term: torch.Tensor, cov_floor: float,
                      cov_ceiling: float) -> torch.Tensor:
    """P = clamp(P- - P-^2 (.) diag(H^T S^-1 H), p_min, p_max) (step 7)."""
    return (cov_pred - cov_pred * cov_pred * diag_term).clamp(cov_floor, cov_ceiling)


def cov_update_information(cov_pred: torch.Tensor, diag_term: torch.Tensor, cov_floor: float,
                           cov_ceiling: float) -> torch.Tensor:
    """P = clamp(1 / (1/P- + diag(H^T R^-1 H)), p_min, p_max): never negative."""
    return (1.0 / (1.0 / cov_pred + diag_term)).clamp(cov_floor, cov_ceiling)


def cov_update(cov_pred, diag_term, cov_floor, cov_ceiling, information: bool):
    rule = cov_update_information if information else cov_update_kalman
    return rule(cov_pred, diag_term, cov_floor, cov_ceiling)


def dense_step_direction(jac: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """H^T c for a dense block (c is an m-vector)."""
    return coef.to(F64) @ jac.reshape(jac.shape[0], -1).to(F64)


def dense_diag_term(jac: torch.Tensor, whitening: torch.Tensor) -> torch.Tensor:
    """diag(H^T F^T F H) = column sums of (F H)^2; F = L^-1 (Kalman) or R^-1/2 (information)."""
    g = whitening.to(F64) @ jac.reshape(jac.shape[0], -1).to(F64)
    return (g * g).sum(0)


def kron_step_direction(inputs: torch.Tensor, grad_outputs: torch.Tensor,
                        coef: torch.Tensor) -> torch.Tensor:
    """H^T c = D^T diag(c) A, shaped like the weight (DESIGN 2.1)."""
    return grad_outputs.to(F64).T @ (coef.to(F64)[:, None] * inputs.to(F64))


def kron_diag_term(inputs: torch.Tensor, grad_outputs: torch.Tensor,
                   whitening: torch.Tensor) -> torch.Tensor:
    """diag(H^T W H)[o,i] = sum_{j,k} W_jk D[j,o] D[k,o] A[j,i] A[k,i], W = F^T F."""
    a = inputs.to(F64)
    d = grad_outputs.to(F64)
    f = whitening.to(F64)
    w = f.T @ f
    m = a.shape[0]
    dd = (d[:, None, :] * d[None, :, :]).reshape(m * m, -1)     # rows D_j (.) D_k
    aa = (a[:, None, :] * a[None, :, :]).reshape(m * m, -1)     # rows A_j (.) A_k
    return (dd * w.reshape(-1, 1)).T @ aa


# --------------------------------------------------------------------------------------
# Kernel entry points (the backend contract; see kalman_kernels/backends/README.md)
# --------------------------------------------------------------------------------------
def _write_(out: torch.Tensor, value: torch.Tensor) -> None:
    out.copy_(value.reshape(out.shape).to(out.dtype))


def fused_update_dense_(param: torch.Tensor, cov: torch.Tensor, jac: torch.Tensor,
                        coef: torch.Tensor, whitening: torch.Tensor, forgetting: float,
                        process_noise: float, cov_floor: float, cov_ceiling: float,
                        information: bool) -> None:
    """In place: param += P- (.) H^T coef ; cov = rule(P-, ||F H_i||^2) clamped.

    ``coef`` already carries lr * gate_scale * S^-1 e.
    """
    p_pred = predict_cov(cov.reshape(-1).to(F64), forgetting, process_noise)
    new_param = mean_step(param.reshape(-1), p_pred, dense_step_direction(jac, coef), 1.0)
    new_cov = cov_update(p_pred, dense_diag_term(jac, whitening), cov_floor, cov_ceiling, information)
    _write_(param, new_param)
    _write_(cov, new_cov)


def fused_update_kron_(weight: torch.Tensor, cov: torch.Tensor, inputs: torch.Tensor,
                       grad_outputs: torch.Tensor, coef: torch.Tensor, whitening: torch.Tensor,
                       forgetting: float, process_noise: float, cov_floor: float,
                       cov_ceiling: float, information: bool) -> None:
    """The Kronecker-block form of :func:`fused_update_dense_` for an (d_out, d_in) weight."""
    p_pred = predict_cov(cov.to(F64), forgetting, process_noise)
    new_weight = mean_step(weight, p_pred, kron_step_direction(inputs, grad_outputs, coef), 1.0)
    diag = kron_diag_term(inputs, grad_outputs, whitening)
    new_cov = cov_update(p_pred, diag, cov_floor, cov_ceiling, information)
    _write_(weight, new_weight)
    _write_(cov, new_cov)


def step_terms_dense(jac: torch.Tensor, coef: torch.Tensor, whitening: torch.Tensor):
    """(H^T c, diag(H^T F^T F H)) of a dense block, for the all-reduced update of 2.5."""
    return dense_step_direction(jac, coef), dense_diag_term(jac, whitening)


def step_terms_kron(inputs, grad_outputs, coef, whitening):
    """(D^T diag(c) A, kron diag term) of a Kronecker block, for the update of 2.5."""
    return (kron_step_direction(inputs, grad_outputs, coef),
            kron_diag_term(inputs, grad_outputs, whitening))


def apply_terms_(param: torch.Tensor, cov: torch.Tensor, direction: torch.Tensor,
                 diag_term: torch.Tensor, step_scale: float, forgetting: float,
                 process_noise: float, cov_floor: float, cov_ceiling: float,
                 information: bool) -> None:
    """param += step_scale * P- (.) direction ; cov = rule(P-, diag_term) (DESIGN 2.5)."""
    p_pred = predict_cov(cov.reshape(-1).to(F64), forgetting, process_noise)
    new_param = mean_step(param.reshape(-1), p_pred, direction.reshape(-1), step_scale)
    new_cov = cov_update(p_pred, diag_term.reshape(-1).to(F64), cov_floor, cov_ceiling, information)
    _write_(param, new_param)
    _write_(cov, new_cov)


# --------------------------------------------------------------------------------------
# Loss-observation mode (DESIGN 2.2)
# --------------------------------------------------------------------------------------
def loss_quad_form(grads: Sequence[torch.Tensor], covs: Sequence[torch.Tensor],
                   forgetting: float = 1.0, process_noise: float = 0.0) -> float:
    """g^T P- g summed over every parameter tensor (the one reduction of 2.2)."""
    total = 0.0
    for g, c in zip(grads, covs):
        g64 = g.to(F64)
        total += float((g64 * g64 * predict_cov(c.to(F64), forgetting, process_noise)).sum())
    return total


def loss_step_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
               covs: Sequence[torch.Tensor], coef: float, weight: float, forgetting: float,
               process_noise: float, cov_floor: float, cov_ceiling: float,
               information: bool) -> None:
    """In place over every tensor: mu += coef * P- (.) g ; P = rule(P-, weight * g^2).

    With S = g^T P- g + r and e = y - L: coef = lr * s * e / S; weight = 1/S for the Kalman
    rule, 1/r for the information rule.
    """
    for p, g, c in zip(params, grads, covs):
        g64 = g.to(F64)
        p_pred = predict_cov(c.to(F64), forgetting, process_noise)
        _write_(p, mean_step(p, p_pred, g64, coef))
        _write_(c, cov_update(p_pred, weight * g64 * g64, cov_floor, cov_ceiling, information))


def loss_innovation(quad_form: float, obs_noise: float) -> float:
    """S = g^T P- g + r (a scalar: one observation)."""
    return quad_form + obs_noise


# --------------------------------------------------------------------------------------
# Adaptive observation noise (DESIGN 2.3)
# --------------------------------------------------------------------------------------
def adapt_obs_noise(obs_noise: float, rate: float, residual: torch.Tensor,
                    predicted_spread: float, floor: float = ADAPTIVE_NOISE_FLOOR) -> float:
    """r <- (1 - beta) r + beta * max(r_min, mean(e^2) - mean(diag(H P- H^T)))."""
    if rate == 0.0:
        return obs_noise
    e = residual.to(F64)
    innovation_excess = float((e * e).mean()) - predicted_spread
    return (1.0 - rate) * obs_noise + rate * max(floor, innovation_excess)


# --------------------------------------------------------------------------------------
# Full-covariance filter: a test oracle and an option for tiny models (DESIGN 5a)
# --------------------------------------------------------------------------------------
def full_cov_update(mean: torch.Tensor, cov: torch.Tensor, jac: torch.Tensor,
                    residual: torch.Tensor, obs_noise: torch.Tensor, forgetting: float = 1.0,
                    process_noise: float = 0.0):
    """One exact Kalman step with a full (n, n) covariance, in float64.

    Returns ``(mean, cov)``; the covariance update uses the Joseph form so it stays
    symmetric positive semi-definite.
    """
    mu = mean.reshape(-1).to(F64)
    n = mu.numel()
    sigma = cov.to(F64) / forgetting + process_noise * torch.eye(n, dtype=F64, device=mu.device)
    h = jac.reshape(jac.shape[0], -1).to(F64)
    r = obs_noise.to(F64)
    m = h.shape[0]
    if r.dim() == 0:
        r = r * torch.eye(m, dtype=F64, device=mu.device)
    elif r.dim() == 1:
        r = torch.diag(r)
    s = h @ sigma @ h.T + r
    gain = torch.linalg.solve(s, h @ sigma).T           # Sigma H^T S^-1 (S symmetric)
    mu = mu + gain @ residual.reshape(-1).to(F64)
    i_kh = torch.eye(n, dtype=F64, device=mu.device) - gain @ h
    sigma = i_kh @ sigma @ i_kh.T + gain @ r @ gain.T
    return mu, 0.5 * (sigma + sigma.T)
