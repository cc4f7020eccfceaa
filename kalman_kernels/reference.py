"""Pure-PyTorch reference of the diagonal Kalman filter (docs/design.md, section 2).

This module is the oracle every other backend is tested against and is what
``backend="reference"`` runs. It favours readability over speed: one function per
equation, and every accumulation is done in float64 whatever the input dtype, so its
results are the float64 answer rounded once into the state's dtype.

Notation (docs/design.md, section 2): ``P`` is the diagonal covariance, ``P-`` the predicted one,
``H`` the (m, n) Jacobian, ``S = H diag(P-) H^T + R`` the innovation covariance,
``L`` its Cholesky factor, ``z = L^-1 e`` the whitened residual.

Two groups of functions live here:

* the equations, used by :mod:`kalman_kernels.ops` for the small m x m work that every
  backend shares (factor, whiten, gate, adaptive noise), and by the tests. They take and
  return tensors and never read a tensor's value on the host, so a step runs on any device
  without a synchronisation, under ``torch.compile(fullgraph=True)`` and on ``meta`` tensors;
* the *kernel entry points* (``innovation_cov_dense``, ``innovation_cov_kron``,
  ``fused_update_dense_``, ``fused_update_kron_``, ``loss_quad_form``, ``loss_step_``,
  ``step_terms_dense``, ``step_terms_kron``, ``apply_terms_``): the per-parameter passes
  that compiled backends replace. Their signatures are the backend contract documented in
  ``kalman_kernels/backends/README.md``; the in-place ones take a 0-d boolean ``ok`` and
  leave their outputs bit-for-bit unchanged when it is false.

Kronecker blocks are *sample-grouped* (docs/design.md, 2.1): inputs A (B, d_in) hold one
row per sample and grad_outputs D (B, K, d_out) the K observations of each sample, so
observation (j, k) has the Jacobian row vec(D[j, k] A[j]^T), in row-major (j, k) order.
K = 1 (grad_outputs (B, d_out)) is the plain block of one observation per input row.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

F64 = torch.float64

#: Relative jitters tried, in order, when the Cholesky factorisation of S fails
#: (step 3 of the filter, docs/design.md, 2): S + eps * trace(S) / m * I.
JITTER_LADDER = (1e-10, 1e-8, 1e-6)

#: Lower bound of the adaptive observation noise (docs/design.md, 2.3): keeps r > 0 when the
#: residuals are smaller than the predicted spread.
ADAPTIVE_NOISE_FLOOR = 1e-8

Scalar = Union[float, torch.Tensor]


# --------------------------------------------------------------------------------------
# Step 1: predict
# --------------------------------------------------------------------------------------
def predict_cov(cov: torch.Tensor, forgetting: float = 1.0,
                process_noise: float = 0.0) -> torch.Tensor:
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
    return _symmetric((h * p) @ h.T)


def _symmetric(s: torch.Tensor) -> torch.Tensor:
    """(S + S^T) / 2: exactly symmetric whatever order the matmul summed in."""
    return 0.5 * (s + s.T)


def grouped(grad_outputs: torch.Tensor) -> torch.Tensor:
    """grad_outputs as (B, K, d_out): a 2-D (B, d_out) block is K = 1."""
    return grad_outputs.unsqueeze(1) if grad_outputs.dim() == 2 else grad_outputs


def pair_products(inputs: torch.Tensor) -> torch.Tensor:
    """Ap[j, j', i] = a_j,i a_j',i (B, B, d_in): the inner dimension of the grouped forms."""
    a = inputs.to(F64)
    return a[:, None, :] * a[None, :, :]


def innovation_cov_kron(inputs: torch.Tensor, grad_outputs: torch.Tensor, cov: torch.Tensor,
                        forgetting: float = 1.0, process_noise: float = 0.0) -> torch.Tensor:
    """H diag(P-) H^T of a sample-grouped Kronecker block, without building H (docs/design.md, 2.1).

    ``inputs`` A is (B, d_in), ``grad_outputs`` D is (B, K, d_out) (or (B, d_out): K = 1),
    ``cov`` is (d_out, d_in). With Q[j, j', o] = sum_i P-[o, i] a_j,i a_j',i:
    S[(j, k), (j', k')] = sum_o D[j, k, o] D[j', k', o] Q[j, j', o], an (B K, B K) matrix.
    """
    d = grouped(grad_outputs).to(F64)
    batch, k = d.shape[0], d.shape[1]
    p = predict_cov(cov.to(F64), forgetting, process_noise)
    q = pair_products(inputs) @ p.T                              # (B, B, d_out)
    # one sample j at a time: a (K, B, d_out) temporary, never (B, K, B, K, d_out)
    rows = [torch.einsum("ko,Jo,JKo->kJK", d[j], q[j], d) for j in range(batch)]
    return _symmetric(torch.stack(rows).reshape(batch * k, batch * k))


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
def cholesky_with_jitter(s: torch.Tensor, *, batched: Optional[bool] = None):
    """Factor S = L L^T in float64, adding eps * trace(S)/m * I on failure.

    Returns ``(L, jitter, ok)`` as tensors: ``jitter`` the eps that succeeded (0 for none),
    ``ok`` a 0-d bool, false when S is not finite or every rung of the ladder failed (the
    caller then skips the step; L is meaningless). ``batched`` factors every rung at once
    and picks the first success on the device (no host read: GPUs, torch.compile, meta
    tensors); the default does so everywhere but for eager CPU tensors, where reading
    ``info`` costs nothing and the rungs are tried one after the other.
    """
    s = s.to(F64)
    m = s.shape[-1]
    finite = torch.isfinite(s).all()
    eps = torch.tensor((0.0,) + JITTER_LADDER, dtype=F64, device=s.device)
    eye = torch.eye(m, dtype=F64, device=s.device)
    # A non-finite S is factored as the identity (the result is discarded): the factor
    # never holds NaN/Inf that could leak into anything the caller computes from it.
    s = torch.where(finite, s, eye)
    scale = torch.diagonal(s).sum() / m
    if batched is None:
        batched = s.device.type != "cpu" or torch.compiler.is_compiling()
    if batched:
        factors, info = torch.linalg.cholesky_ex(s + (eps * scale)[:, None, None] * eye)
        good = info == 0
        # the first rung that succeeded (0 if none), picked without a data-dependent shape
        first = torch.argmax(good.to(torch.int8)).reshape(1)
        return (factors.index_select(0, first)[0], eps.index_select(0, first)[0],
                finite & good.any())
    for rung in range(eps.shape[0]):
        factor, info = torch.linalg.cholesky_ex(s + (eps[rung] * scale) * eye)
        if int(info) == 0:
            return factor, eps[rung], finite.clone()
    return factor, eps[-1], torch.zeros((), dtype=torch.bool, device=s.device)


# --------------------------------------------------------------------------------------
# Step 4: whitened residual and Mahalanobis distance
# --------------------------------------------------------------------------------------
def whiten(factor: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """z = L^-1 e."""
    e = residual.reshape(-1, 1).to(F64)
    return torch.linalg.solve_triangular(factor, e, upper=False).reshape(-1)


def mahalanobis(z: torch.Tensor) -> torch.Tensor:
    """d2 = z^T z = e^T S^-1 e (a 0-d tensor)."""
    return z @ z


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
def _regularized_gamma(a: float, x: float):
    """(P(a, x), Q(a, x)), the regularised lower and upper incomplete gamma functions, in
    plain floats: the series for P below a + 1, Lentz's continued fraction for Q above (so a
    small Q keeps its relative precision)."""
    if x <= 0.0:
        return 0.0, 1.0
    log_front = a * math.log(x) - x - math.lgamma(a)
    if x < a + 1.0:
        term = total = 1.0 / a
        denom = a
        for _ in range(100_000):
            denom += 1.0
            term *= x / denom
            total += term
            if abs(term) < abs(total) * 1e-17:
                break
        p = min(1.0, total * math.exp(log_front))
        return p, max(0.0, 1.0 - p)
    tiny = 1e-300
    b = x + 1.0 - a
    c = 1.0 / tiny
    d = 1.0 / b
    h = d
    for i in range(1, 100_000):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-16:
            break
    q = min(1.0, math.exp(log_front) * h)
    return max(0.0, 1.0 - q), q


def _gammainc_lower(a: float, x: float) -> float:
    """Regularised lower incomplete gamma P(a, x)."""
    return _regularized_gamma(a, x)[0]


def chi2_sf(x: float, dof: int) -> float:
    """P(X >= x) for X chi-square with ``dof`` degrees of freedom: the p-value of a
    Mahalanobis distance d2 = x (plain floats; small p-values keep their relative
    precision)."""
    if not math.isfinite(x):
        return 0.0 if x > 0 else float("nan")
    return _regularized_gamma(dof / 2.0, x / 2.0)[1]


_CHI2_CACHE: dict = {}


def chi2_quantile(prob: float, dof: int) -> float:
    """The chi-square quantile at ``prob`` for ``dof`` degrees of freedom.

    Plain-float bisection on the regularised incomplete gamma function (no SciPy at run
    time; the tests compare with ``scipy.stats.chi2.ppf``). Host arithmetic on Python
    numbers only: it never touches a tensor, so it costs no device synchronisation.
    """
    key = (float(prob), int(dof))
    if key in _CHI2_CACHE:
        return _CHI2_CACHE[key]
    if not 0.0 < prob < 1.0:
        raise ValueError(f"gate must be a probability in (0, 1), got {prob}")
    k = dof / 2.0
    lo, hi = 0.0, max(1.0, float(dof))
    while _gammainc_lower(k, hi / 2.0) < prob:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _gammainc_lower(k, mid / 2.0) < prob:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * hi:
            break
    _CHI2_CACHE[key] = value = 0.5 * (lo + hi)
    return value


# A host-side constant for torch.compile: evaluated while tracing, never traced into. This is
# what torch.compiler.assume_constant_result sets; setting it directly keeps importing this
# module from importing torch._dynamo (over a second).
chi2_quantile._dynamo_marked_constant = True


def gate_threshold(gate: Optional[float], dof: int) -> Optional[float]:
    """tau, the chi-square quantile of the gate probability at ``dof`` degrees of freedom
    (the number of observations); None when there is no gate. A host constant."""
    return None if gate is None else chi2_quantile(float(gate), dof)


def gate_scale(d2: Scalar, tau: Optional[float]) -> Scalar:
    """s = 1 without gating, else min(1, sqrt(tau / d2)): a 0-d float64 tensor for a tensor
    ``d2``, a Python float for a float (the same operations: host arithmetic is float64)."""
    if not isinstance(d2, torch.Tensor):
        if tau is None or not d2 > tau:
            return 1.0
        # torch's CPU sqrt, not math.sqrt: the two differ in the last bit for about 1 % of
        # arguments, and the host path must match the tensor path bit for bit (only a gated
        # step pays for this call)
        return float(torch.tensor(tau / d2, dtype=F64).sqrt())
    d2 = d2.to(F64)
    one = torch.ones((), dtype=F64, device=d2.device)
    if tau is None:
        return one
    # tau as a tensor: a true division (a Python scalar over a tensor may be computed as a
    # reciprocal times the scalar, one ulp away from tau / d2 in host arithmetic)
    return torch.where(d2 > tau, torch.sqrt(torch.full_like(d2, tau) / d2), one)


# --------------------------------------------------------------------------------------
# Steps 6 and 7: mean step and covariance update
# --------------------------------------------------------------------------------------
def mean_step(param: torch.Tensor, cov_pred: torch.Tensor, direction: torch.Tensor,
              step_scale: Scalar) -> torch.Tensor:
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
    """H^T c = sum_j (sum_k c_jk D[j, k]) A[j]^T, shaped like the weight (docs/design.md, 2.1)."""
    d = grouped(grad_outputs).to(F64)
    c = coef.to(F64).reshape(d.shape[0], d.shape[1])
    dc = torch.einsum("jk,jko->jo", c, d)                       # (B, d_out)
    return dc.T @ inputs.to(F64)


def kron_diag_term(inputs: torch.Tensor, grad_outputs: torch.Tensor,
                   whitening: torch.Tensor) -> torch.Tensor:
    """diag(H^T W H)[o, i] = sum_{j,j'} G[j, j', o] a_j,i a_j',i with W = F^T F and
    G[j, j', o] = sum_{k,k'} W[(j, k), (j', k')] D[j, k, o] D[j', k', o]."""
    d = grouped(grad_outputs).to(F64)
    batch, k = d.shape[0], d.shape[1]
    f = whitening.to(F64)
    w = (f.T @ f).reshape(batch, k, batch, k)
    # one sample j at a time: z[J, k, o] = sum_K w[j, k, J, K] D[J, K, o], then G[j, J, o]
    g = torch.stack([torch.einsum("ko,kJo->Jo", d[j], torch.einsum("kJK,JKo->kJo", w[j], d))
                     for j in range(batch)])                    # (B, B, d_out)
    return torch.einsum("jJo,jJi->oi", g, pair_products(inputs))


# --------------------------------------------------------------------------------------
# Kernel entry points (the backend contract; see kalman_kernels/backends/README.md)
# --------------------------------------------------------------------------------------
def _write_(out: torch.Tensor, value: torch.Tensor, ok: torch.Tensor) -> None:
    """out <- value where ok, else out unchanged bit for bit (a device-side predicate)."""
    new = value.reshape(out.shape).to(out.dtype)
    out.copy_(torch.where(torch.as_tensor(ok, device=out.device), new, out))


def fused_update_dense_(param: torch.Tensor, cov: torch.Tensor, jac: torch.Tensor,
                        coef: torch.Tensor, whitening: torch.Tensor, ok: torch.Tensor,
                        forgetting: float, process_noise: float, cov_floor: float,
                        cov_ceiling: float, information: bool) -> None:
    """In place, when ``ok``: param += P- (.) H^T coef ; cov = rule(P-, ||F H_i||^2) clamped.

    ``coef`` already carries lr * gate_scale * S^-1 e.
    """
    p_pred = predict_cov(cov.reshape(-1).to(F64), forgetting, process_noise)
    new_param = mean_step(param.reshape(-1), p_pred, dense_step_direction(jac, coef), 1.0)
    new_cov = cov_update(p_pred, dense_diag_term(jac, whitening), cov_floor, cov_ceiling,
                         information)
    _write_(param, new_param, ok)
    _write_(cov, new_cov, ok)


def fused_update_kron_(weight: torch.Tensor, cov: torch.Tensor, inputs: torch.Tensor,
                       grad_outputs: torch.Tensor, coef: torch.Tensor, whitening: torch.Tensor,
                       ok: torch.Tensor, forgetting: float, process_noise: float,
                       cov_floor: float, cov_ceiling: float, information: bool) -> None:
    """The sample-grouped Kronecker form of :func:`fused_update_dense_` for a (d_out, d_in)
    weight; ``coef`` has B K entries in (j, k) order, ``whitening`` is (B K, B K)."""
    p_pred = predict_cov(cov.to(F64), forgetting, process_noise)
    new_weight = mean_step(weight, p_pred, kron_step_direction(inputs, grad_outputs, coef), 1.0)
    diag = kron_diag_term(inputs, grad_outputs, whitening)
    new_cov = cov_update(p_pred, diag, cov_floor, cov_ceiling, information)
    _write_(weight, new_weight, ok)
    _write_(cov, new_cov, ok)


def step_terms_dense(jac: torch.Tensor, coef: torch.Tensor, whitening: torch.Tensor):
    """(H^T c, diag(H^T F^T F H)) of a dense block, flat (n,), for the all-reduced update
    of docs/design.md, 2.5."""
    return dense_step_direction(jac, coef), dense_diag_term(jac, whitening)


def step_terms_kron(inputs, grad_outputs, coef, whitening):
    """(H^T c, diag(H^T F^T F H)) of a Kronecker block, each (d_out, d_in) (docs/design.md, 2.5)."""
    return (kron_step_direction(inputs, grad_outputs, coef),
            kron_diag_term(inputs, grad_outputs, whitening))


def apply_terms_(param: torch.Tensor, cov: torch.Tensor, direction: torch.Tensor,
                 diag_term: torch.Tensor, ok: torch.Tensor, forgetting: float,
                 process_noise: float, cov_floor: float, cov_ceiling: float,
                 information: bool) -> None:
    """In place, when ``ok``: param += P- (.) direction ; cov = rule(P-, diag_term)
    (docs/design.md, 2.5; ``direction`` already carries lr * s)."""
    p_pred = predict_cov(cov.reshape(-1).to(F64), forgetting, process_noise)
    new_param = mean_step(param.reshape(-1), p_pred, direction.reshape(-1), 1.0)
    new_cov = cov_update(p_pred, diag_term.reshape(-1).to(F64), cov_floor, cov_ceiling, information)
    _write_(param, new_param, ok)
    _write_(cov, new_cov, ok)


# --------------------------------------------------------------------------------------
# Loss-observation mode (docs/design.md, 2.2)
# --------------------------------------------------------------------------------------
def loss_quad_form(grads: Sequence[torch.Tensor], covs: Sequence[torch.Tensor],
                   forgetting: float = 1.0, process_noise: float = 0.0) -> torch.Tensor:
    """g^T P- g summed over every parameter tensor (the one reduction of 2.2), a 0-d
    float64 tensor."""
    total = None
    for g, c in zip(grads, covs):
        g64 = g.to(F64)
        part = (g64 * g64 * predict_cov(c.to(F64), forgetting, process_noise)).sum()
        total = part if total is None else total + part
    if total is None:
        return torch.zeros((), dtype=F64)
    return total


def loss_step_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
               covs: Sequence[torch.Tensor], coef: Scalar, weight: Scalar, ok: torch.Tensor,
               forgetting: float, process_noise: float, cov_floor: float, cov_ceiling: float,
               information: bool) -> None:
    """In place over every tensor, when ``ok``: mu += coef * P- (.) g ; P = rule(P-, weight g^2).

    With S = g^T P- g + r and e = y - L: coef = lr * s * e / S; weight = 1/S for the Kalman
    rule, 1/r for the information rule. ``coef`` and ``weight`` are 0-d float64 tensors on
    the parameters' device (or Python floats).
    """
    for p, g, c in zip(params, grads, covs):
        g64 = g.to(F64)
        p_pred = predict_cov(c.to(F64), forgetting, process_noise)
        _write_(p, mean_step(p, p_pred, g64, coef), ok)
        _write_(c, cov_update(p_pred, weight * g64 * g64, cov_floor, cov_ceiling, information), ok)


def loss_innovation(quad_form: Scalar, obs_noise: Scalar) -> Scalar:
    """S = g^T P- g + r (a scalar: one observation)."""
    return quad_form + obs_noise


# --------------------------------------------------------------------------------------
# Adaptive observation noise (docs/design.md, 2.3)
# --------------------------------------------------------------------------------------
def adapt_obs_noise(obs_noise: Scalar, rate: float, residual: torch.Tensor,
                    predicted_spread: Scalar, floor: float = ADAPTIVE_NOISE_FLOOR):
    """r <- (1 - beta) r + beta * max(r_min, mean(e^2) - mean(diag(H P- H^T))).

    Tensors in, a 0-d float64 tensor out; Python floats in (a float ``residual`` is one
    observation), a float out, with no tensor made."""
    if rate == 0.0:
        return obs_noise
    if isinstance(residual, (int, float)):
        excess = residual * residual - predicted_spread
    else:
        e = torch.as_tensor(residual).to(F64)
        excess = (e * e).mean() - predicted_spread
    if not isinstance(obs_noise, torch.Tensor) and not isinstance(predicted_spread, torch.Tensor):
        return (1.0 - rate) * obs_noise + rate * max(floor, float(excess))
    return (1.0 - rate) * obs_noise + rate * torch.clamp(excess, min=floor)


# --------------------------------------------------------------------------------------
# Full-covariance filter: a test oracle and an option for tiny models (docs/design.md, 5)
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
