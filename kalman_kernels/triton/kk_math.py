"""Per-element math of the Triton kernels: ``csrc/kk_math.h``, function for function.

Every function below has the name, the arguments and the formula of its C++ twin in
``csrc/kk_math.h`` (which the ``cpp`` and ``cuda`` backends include), so the three
backends compute the same expressions in the same order. Changing a formula means
changing both files; ``tests/test_triton_backend.py`` checks that the lists of functions
agree. The C++ ``one`` argument (a typed 1 for vector types) is Triton's weakly typed ``1.0``.

The last section (loads, stores, scalars) is Triton-only: how values enter and leave the
arithmetic type (float32, or float64 when an operand is float64).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import INTERPRET

_INTERPRETING = tl.constexpr(INTERPRET)


# ---------------------------------------------------------------- csrc/kk_math.h
@triton.jit
def kk_max(x, lo):
    """KkMinMax::max: max(x, lo), NaN-propagating (like torch.clamp)."""
    return tl.where(x != x, x, tl.where(x < lo, lo, x))


@triton.jit
def kk_min(x, hi):
    """KkMinMax::min: min(x, hi), NaN-propagating."""
    return tl.where(x != x, x, tl.where(x > hi, hi, x))


@triton.jit
def predict(cov, inv_lam, q):
    """Step 1, predict: P- = P / lam + q, with inv_lam = 1 / lam precomputed."""
    return cov * inv_lam + q


@triton.jit
def cov_kalman(p_pred, d):
    """Step 7, Kalman rule: P = P- - P-^2 d, d = diag(H^T S^-1 H)_i."""
    return p_pred - p_pred * p_pred * d


@triton.jit
def cov_information(p_pred, d):
    """Information rule ("VD-EKF"): P = 1 / (1/P- + d), d = diag(H^T R^-1 H)_i."""
    return 1.0 / (1.0 / p_pred + d)


@triton.jit
def clamp(x, lo, hi):
    """clamp(x, p_min, p_max), NaN-propagating."""
    return kk_min(kk_max(x, lo), hi)


@triton.jit
def cov_rule(p_pred, d, lo, hi, INFORMATION: tl.constexpr):
    """The covariance rule chosen at compile time, followed by the floor/ceiling."""
    if INFORMATION:
        updated = cov_information(p_pred, d)
    else:
        updated = cov_kalman(p_pred, d)
    return clamp(updated, lo, hi)


@triton.jit
def mean_step(param, p_pred, direction):
    """Step 6, mean: mu + P- (.) direction (direction already carries lr * s)."""
    return param + p_pred * direction


@triton.jit
def loss_update(param, cov, grad, coef, weight, inv_lam, q, lo, hi, INFORMATION: tl.constexpr):
    """Loss-observation mode (docs/design.md, 2.2), one element: mu += coef * P- g ;
    P = rule(P-, weight * g^2). Returns (param, cov)."""
    p_pred = predict(cov, inv_lam, q)
    new_param = param + coef * p_pred * grad
    new_cov = cov_rule(p_pred, weight * grad * grad, lo, hi, INFORMATION)
    return new_param, new_cov


@triton.jit
def quad_term(grad, cov, inv_lam, q):
    """One term of the loss-mode reduction g^T P- g."""
    return grad * grad * predict(cov, inv_lam, q)


# ---------------------------------------------------------------- Triton-only: types
@triton.jit
def to_acc(x, ACC: tl.constexpr):
    """A loaded value in the arithmetic type. bfloat16 goes through float32 (the
    interpreter stores bfloat16 as uint16 and converts it correctly only to float32)."""
    if x.dtype == tl.bfloat16:
        x = x.to(tl.float32)
    return x.to(ACC)


@triton.jit
def to_store(x, DT: tl.constexpr):
    """Round once, to nearest even, into the stored dtype. The interpreter truncates
    float32 -> bfloat16, so there the rounding is done on the bits."""
    if DT == tl.bfloat16:
        x = x.to(tl.float32)
        if _INTERPRETING:
            bits = x.to(tl.uint32, bitcast=True)
            rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = tl.where(x != x, x, rounded.to(tl.float32, bitcast=True))
    return x.to(DT)


@triton.jit
def scalar(x, ACC: tl.constexpr):
    """A hyper-parameter (passed as float64) in the arithmetic type, converted once."""
    return tl.full((), x, ACC)
