"""The exact Kalman step of a softmax head observed through its categorical likelihood.

A head W (K x d, rows w_k) with bias b on a batch of B feature rows a_j (rows of A) has logits
z_jk = s (w_k . a_j + b_k) (s: ``logit_scale``) and class probabilities p_j = softmax(z_j).
Each image is observed as its target y_j (one-hot, or a soft target row summing to one) with
prediction p_j and the covariance of the categorical distribution, tempered by c
(``obs_noise``):

    yhat_j = p_j,    R_j = c Lambda_j,    Lambda_j = diag(p_j) - p_j p_j^T.

Lambda_j is singular (Lambda_j 1 = 0: the probabilities sum to one), so the proper filter drops
one class per image and works with the K - 1 others. The step below is that filter, written
so that it never picks a class: its result equals the dense drop-one-class EKF, whichever
class is dropped (``tests/test_categorical_head.py`` checks it against a dense float64 EKF
whose Jacobian comes from autograd).

Structure
---------
Order the B K observations class-major (all images of class 1, then class 2, ...). The
Jacobian of the logits is block-diagonal, J_k = s [A, 1] for class k's parameters
theta_k = (w_k, b_k), and the softmax's Jacobian is Lambda = blockdiag_j(Lambda_j), so the
observation Jacobian is H = Lambda J. With a diagonal prior P- the logit covariance is
block-diagonal too:

    M = J P- J^T = blockdiag_k M_k,   M_k = s^2 (A diag(P-_k) A^T + P-_bk 1 1^T)   (B x B),

built, as in :func:`~kalman_kernels.ops.class_head_update_`, by one GEMM of the covariances
against the pairwise products of the batch, Ap[(j, j'), i] = a_ji a_j'i (j <= j').

The gain without dropping a class. For a residual e = y - p whose rows sum to zero (true
for every valid target) the drop-one-class gain applied to e equals P- J^T (cI + Lambda M)^-1 e
(the push-through identity P- H^T (H P- H^T + R)^+ = P- J^T (cI + Lambda M)^-1 on zero-sum
vectors: Lambda's generalized inverse acts on them as the inverse of the kept block does).
Likewise the posterior covariance is P- - P- J^T G J P- with G = (cI + Lambda M)^-1 Lambda,
a symmetric BK x BK matrix. Neither BK x BK matrix is formed; they split into per-class B x B
pieces, all symmetric positive definite:

Write Lambda = D - U U^T with D = diag(p) and U's class-k block D_k = diag(p_.k) (B x B), and
E_k = D_k^(1/2). Then

* T = cI + D M is block-diagonal with blocks T_k = cI + D_k M_k. Woodbury on the factor
  E_k (E_k M_k) gives T_k^-1 = (I - E_k Q_k^-1 E_k M_k) / c with the SPD matrix
  Q_k = cI + E_k M_k E_k (eigenvalues >= c), and so T_k^-1 D_k = E_k Q_k^-1 E_k =: Z_k.
  From T_k Z_k = D_k: D_k M_k Z_k = D_k - c Z_k.
* cI + Lambda M = T - U (U^T M). Woodbury again: its capacitance is
  I - U^T M T^-1 U = I - sum_k D_k M_k Z_k = I - sum_k (D_k - c Z_k) = c SZ with
  SZ = sum_k Z_k, because sum_k D_k = I (each image's probabilities sum to one). SZ is SPD.
* Applied to e (with w_k = Z_k M_k e_k, which also equals D_k M_k T_k^-1 e_k):

      x = (cI + Lambda M)^-1 e:   x_k = t_k + Z_k v,   t_k = (e_k - w_k) / c,
                                  v = SZ^-1 (sum_k w_k) / c.

* Applied to Lambda, most terms cancel and G = blockdiag_k(Z_k) - Z SZ^-1 Z^T with
  Z = [Z_1; ...; Z_K]; the class blocks are G_kk = Z_k - Z_k SZ^-1 Z_k (symmetric).

Then, per class (the diagonal covariance keeps the diagonal of the posterior only):

    mean:  w_k += lr g P-_k (.) (s A^T x_k),      b_k += lr g P-_bk s 1^T x_k
    cov:   P_k  = P-_k - P-_k^2 (.) s^2 diag(A^T G_kk A)   (a GEMM against Ap),
           P_bk = P-_bk - P-_bk^2 s^2 1^T G_kk 1,

clamped to [cov_floor, cov_ceiling]. ``cov_update="information"`` uses
P = 1 / (1/P- + diag(J^T Lambda J) / c) instead (that is diag(H^T R^+ H) exactly): for weight
(k, i) the added information is s^2 / c sum_j p_jk (1 - p_jk) a_ji^2, for the bias
s^2 / c sum_j p_jk (1 - p_jk).

Mahalanobis distance over the B (K - 1) kept observations. For a zero-sum r,
Lambda_j^+ r = r / p_j + alpha 1 for some alpha, and the 1 direction is orthogonal to the
zero-sum residual, so d2 = e^T S^+ e = sum_{j,k} e_jk x_jk / p_jk. A probability that
underflowed to zero would make the term 0/0 although its limit is finite (x_jk is then
e_jk / c and e_jk = y_jk), so p is clamped below at float64's smallest normal number: a target
on a class of probability exactly 0 then gives a huge (possibly infinite) d2, which is the
honest answer; the gate then stops the mean step, and the covariance step is unaffected.

Log determinant (for a Laplace evidence): log det(I + P- J^T Lambda J / c)
= log det(cI + Lambda M) - B K log c (Sylvester), and det(T - U U^T M) = det(T) det(c SZ)
(matrix determinant lemma) with det T_k = det Q_k (Sylvester again), so

    log_det = sum_k log det Q_k + log det(c SZ) - B K log c.

Linearising elsewhere (``linearize_at``: an iterated / Gauss-Newton step from a prior mean):
p and Lambda are taken at the given point and the residual becomes
e = y - p(lin) - Lambda J (mean - lin); it still sums to zero per image.

Full covariance blocks
----------------------
A (K, d, d) ``weight_cov`` keeps one full covariance Sigma_k per class instead of a diagonal
(no separate bias: fold it in as a constant feature). The structure is unchanged, since J is
still block-diagonal over classes: M_k = s^2 A Sigma-_k A^T, the mean step is
w_k += lr g s Sigma-_k A^T x_k, and the class block of the posterior is

    Sigma_k = Sigma-_k - s^2 (Sigma-_k A^T) G_kk (A Sigma-_k),

written symmetric ((X + X^T) / 2). That is exactly the diagonal block of the dense posterior
under the prior blockdiag(Sigma-_k); the cross-class blocks the dense filter would create are
dropped, as the diagonal form drops every off-diagonal term. Predict:
Sigma- = Sigma / forgetting + process_noise I. Element-wise floor / ceiling clamps and the
diagonal information rule do not apply to full blocks and are refused. Cost: two
(d x d) (d x B) products per class, O(K B d^2) time (17 GFLOP each at K = 1000, d = 512,
B = 32), plus O(K B^3) as above; the blocks are read twice and written once, which bounds
the step by memory bandwidth at that size. Extra memory: V_k = Sigma-_k A^T kept between the
passes (K d B in the compute dtype: 66 MB at K = 1000) and two d x d work buffers of at most
``BLOCK_CHUNK_ELEMENTS`` elements, reused for every block.

Cost and precision
------------------
Time O(K B^3 + K B^2 d): two GEMMs with inner size B(B+1)/2 (about 1 GFLOP together at
K = 1000, B = 32, d = 512) in the covariance's dtype (float32 for float32 / half
parameters), one with inner size B for the mean step, and per class a B x B Cholesky
factorisation of Q_k (with the jitter ladder, every rung evaluated on the device), its
inverse and a few B x B products, batched over chunks of classes. Everything on the S side
(Q, Z, SZ, x, G, d2, log det) is float64 whatever the parameters' dtype. Work space:
O(chunk B^2) float64 per chunk buffer, plus the per-class Z_k kept between the two passes
(K B(B+1)/2 float64: 4.2 MB at K = 1000, B = 32) and the K x B(B+1)/2 coefficients of the
covariance GEMM.

Host synchronisation: none (the one host read, of the Cholesky flags on eager CPU tensors, is
free there and only skips jitter rungs that could not change the result; elsewhere every
rung is evaluated on the device). Non-finite inputs (features, weight, bias, soft targets, logits,
the linearisation point, covariances) and factorisations that fail at every jitter rung skip
the step: every state tensor is written back with its old value through ``torch.where``, so
it is unchanged bit for bit, and ``info.skipped`` says so. Arguments are validated (shapes,
dtypes, devices, and on the CPU the target values through a NumPy view, which costs no
dispatcher call) before anything is written.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .. import reference as ref
from .._deferred import compiling, readable_now
from ._common import KalmanInfo, numpy_view
from .class_head import (
    DEFAULT_CHUNK,
    _check_scalar,
    _factor_with_ladder,
    _need_cov,
    _need_float,
    _pair_index,
    _predicted,
)

__all__ = ["CategoricalHeadInfo", "categorical_head_update_", "soft_target_tol"]

F64 = torch.float64


def soft_target_tol(k: int, dtype: torch.dtype) -> float:
    """How far a soft target row's sum may be from 1: the rounding of a sum of K
    probabilities in the targets' dtype, never below 1e-6 (the rule of ``KalmanNGD``'s
    categorical likelihood). Accepted rows are then renormalised exactly, so the residual
    sums to zero and the step does not depend on a dropped class."""
    return max(1e-6, 4.0 * k * torch.finfo(dtype).eps)


#: The probability floor of the Mahalanobis sum (module docstring): float64's smallest normal.
_P_TINY = torch.finfo(F64).tiny


class CategoricalHeadInfo(KalmanInfo):
    """What one categorical-head step did: a :class:`~kalman_kernels.ops.KalmanInfo` (its
    tensors stay on the device; ``mahalanobis``, ``gate_scale``, ``skipped``, ``jitter``,
    ``obs_noise`` convert when read; ``num_obs`` is B (K - 1), the degrees of freedom of
    ``p_value``) plus, as tensors converted when read:

    ``log_det``: log det(I + P- J^T Lambda J / c), the log determinant a Laplace evidence
    needs (NaN when skipped); ``cross_entropy``: the batch's mean cross-entropy
    -mean_j sum_k y_jk log p_jk at the linearisation point (before the step);
    ``class_jitter``: (K,) relative jitter each class's Q_k needed (0 for none, NaN where
    every rung failed); ``jitter`` is the largest of those and of the capacitance's.
    ``innovation_cov`` is None (S is never formed).
    """

    __slots__ = ("log_det_tensor", "cross_entropy_tensor", "class_jitter",
                 "bad_targets_tensor")

    def __init__(self, *, log_det, cross_entropy, class_jitter, bad_targets=None, **kwargs):
        super().__init__(**kwargs)
        self.log_det_tensor = log_det
        self.cross_entropy_tensor = cross_entropy
        self.class_jitter = class_jitter
        self.bad_targets_tensor = bad_targets

    @property
    def log_det(self) -> float:
        return float(self._host_value(self.log_det_tensor, "log_det"))

    @property
    def cross_entropy(self) -> float:
        return float(self._host_value(self.cross_entropy_tensor, "cross_entropy"))

    @staticmethod
    def _host_value(t, what):
        if t.device.type == "meta":
            raise RuntimeError(f"CategoricalHeadInfo.{what}: this step ran on meta tensors, "
                               f"which hold no values")
        return t

    @property
    def reason(self) -> Optional[str]:
        if not self.skipped:
            return None
        if self._flag(self.nonfinite_tensor):
            return ("non-finite values in the inputs (features, weight, bias, targets, "
                    "linearisation point, covariances) or in the logits")
        if self._flag(self.bad_targets_tensor):
            return ("invalid targets: a label outside [0, K), or soft targets with a negative "
                    "entry or a row whose sum differs from 1 by more than soft_target_tol(K, "
                    "dtype)")
        return "the Cholesky factorisation of a class block or of the capacitance failed"

    def __repr__(self) -> str:
        if compiling():
            return "CategoricalHeadInfo(<traced>)"
        if self.skipped_tensor.device.type == "meta":
            return f"CategoricalHeadInfo(<meta tensors>, num_obs={self.num_obs})"
        return (f"CategoricalHeadInfo(mahalanobis={self.mahalanobis:.6g}, "
                f"gate_scale={self.gate_scale:.6g}, skipped={self.skipped}, "
                f"jitter={self.jitter}, log_det={self.log_det:.6g}, "
                f"cross_entropy={self.cross_entropy:.6g}, num_obs={self.num_obs}, "
                f"reason={self.reason!r})")


# --------------------------------------------------------------------------------------
# Validation (metadata only, plus CPU target values through a NumPy view)
# --------------------------------------------------------------------------------------
def _check_targets_on_host(labels: torch.Tensor, k: int) -> None:
    """Target values on the CPU cost nothing to read (no dispatcher call): check them and
    raise. On other devices the same conditions skip the step instead (a host read there
    would synchronise)."""
    if labels.device.type != "cpu" or compiling():
        return
    view = numpy_view(labels.detach())
    if view is None:
        return
    import numpy as np
    if not labels.is_floating_point():
        if view.size and (view.min() < 0 or view.max() >= k):
            bad = view[(view < 0) | (view >= k)]
            raise ValueError(f"labels must be class indices in [0, K) = [0, {k}); got "
                             f"{int(bad[0])}")
        return
    if not np.isfinite(view).all():
        return                                  # non-finite targets skip the step (reported)
    if view.size and view.min() < 0:
        raise ValueError("soft targets (labels of shape (B, K)) must be non-negative; got "
                         f"{float(view.min())}")
    sums = view.astype(np.float64).sum(1)
    off = np.abs(sums - 1.0)
    tol = soft_target_tol(k, labels.dtype)
    if off.size and off.max() > tol:
        j = int(off.argmax())
        raise ValueError(f"soft targets (labels of shape (B, K)) must have rows summing to 1 "
                         f"(within {tol:.1e}); row {j} sums to {float(sums[j])!r}: "
                         f"normalise them (labels / labels.sum(1, keepdim=True))")


def _need_block_cov(weight_cov, weight) -> None:
    """The block form: weight_cov (K, d, d), one full covariance per class."""
    _need_float("weight_cov", weight_cov)
    k, d = weight.shape
    if weight_cov.shape != (k, d, d):
        raise ValueError(f"weight_cov of the block form must have shape (K, d, d) = ({k}, {d}, "
                         f"{d}) (one d x d covariance per class), got "
                         f"{tuple(weight_cov.shape)}; a diagonal covariance has weight's "
                         f"shape ({k}, {d})")
    if weight_cov.dtype not in (torch.float32, F64):
        raise TypeError(f"weight_cov must be float32 or float64, got {weight_cov.dtype}: "
                        f"covariances are kept at least in float32 (use weight_cov.float())")
    if weight.dtype == F64 and weight_cov.dtype != F64:
        raise TypeError(f"weight_cov is {weight_cov.dtype} for a float64 weight: use a float64 "
                        f"covariance (weight_cov.double())")


def _refuse_bias_for_blocks(bias, bias_cov) -> None:
    if bias is not None or bias_cov is not None:
        raise ValueError("a (K, d, d) weight_cov (full covariance blocks) takes no separate "
                         "bias: fold the bias in as a constant feature column (append a 1 to "
                         "every feature row and the bias as the last column of weight, its "
                         "variance on the block's diagonal) and pass bias=None, bias_cov=None")


def _refuse_for_blocks(*, cov_floor, cov_ceiling, cov_update) -> None:
    """What the block form does not do, and what to do instead."""
    if cov_floor != 0.0 or not math.isinf(cov_ceiling):
        raise ValueError("cov_floor / cov_ceiling clamp a diagonal covariance element by "
                         "element; on full covariance blocks that would not keep them positive "
                         "semi-definite: leave them at 0.0 / inf with a (K, d, d) weight_cov")
    if cov_update != "kalman":
        raise ValueError(f"cov_update={cov_update!r} is a diagonal approximation; with full "
                         f"(K, d, d) covariance blocks the exact 'kalman' rule is used (pass "
                         f"cov_update='kalman')")


def _validate(weight, weight_cov, bias, bias_cov, features, labels, *, obs_noise, logit_scale,
              lr, forgetting, process_noise, cov_floor, cov_ceiling, gate, cov_update,
              linearize_at, chunk_size):
    _need_float("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must be the (K, d) head, got shape {tuple(weight.shape)}")
    k, d = weight.shape
    if k < 2 or d < 1:
        raise ValueError(f"weight has shape {tuple(weight.shape)}: a categorical head needs "
                         f"K >= 2 classes and d >= 1 features")
    blocks = isinstance(weight_cov, torch.Tensor) and weight_cov.dim() == 3
    if blocks:
        _need_block_cov(weight_cov, weight)
        _refuse_bias_for_blocks(bias, bias_cov)
    else:
        _need_cov("weight_cov", weight_cov, weight, "weight")
    if (bias is None) != (bias_cov is None):
        raise ValueError("bias and bias_cov go together: pass both (a (K,) bias and its (K,) "
                         "covariance) or neither")
    if bias is not None:
        _need_float("bias", bias)
        if bias.shape != (k,):
            raise ValueError(f"bias must have shape (K,) = ({k},) to match weight, got "
                             f"{tuple(bias.shape)}")
        _need_cov("bias_cov", bias_cov, bias, "bias")
    _need_float("features", features)
    if features.dim() != 2 or features.shape[1] != d:
        raise ValueError(f"features must have shape (B, d) = (B, {d}) (one row per image), got "
                         f"{tuple(features.shape)}")
    b = features.shape[0]
    if b < 1:
        raise ValueError("features has no rows (B = 0): an observation needs B >= 1")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a tensor: (B,) int64 class indices or (B, K) soft "
                        f"targets, got {type(labels).__name__}")
    if labels.is_floating_point():
        if labels.shape != (b, k):
            raise ValueError(f"soft targets (floating-point labels) must have shape (B, K) = "
                             f"({b}, {k}), got {tuple(labels.shape)}; class indices are a (B,) "
                             f"int64 tensor")
    else:
        if labels.dtype != torch.int64:
            raise TypeError(f"labels must be int64 class indices (labels.long()) or "
                            f"floating-point (B, K) soft targets, got {labels.dtype}")
        if labels.shape != (b,):
            raise ValueError(f"labels (class indices) must have shape (B,) = ({b},) to match "
                             f"features, got {tuple(labels.shape)}")
    for name, v in (("obs_noise", obs_noise), ("logit_scale", logit_scale), ("lr", lr)):
        if isinstance(v, torch.Tensor):
            raise TypeError(f"{name} must be a Python number (reading a tensor's value would "
                            f"synchronise with its device), got a tensor")
        _check_scalar(name, v, low=0.0, low_open=True)
        if math.isinf(v):
            raise ValueError(f"{name} must be finite, got {v!r}")
    _check_scalar("forgetting", forgetting, low=0.0, low_open=True, high=1.0)
    _check_scalar("process_noise", process_noise, low=0.0, low_open=False)
    if math.isinf(process_noise):
        raise ValueError("process_noise must be finite")
    _check_scalar("cov_floor", cov_floor, low=0.0, low_open=False)
    _check_scalar("cov_ceiling", cov_ceiling, low=0.0, low_open=True)
    if cov_floor > cov_ceiling:
        raise ValueError(f"cov_floor ({cov_floor}) must not exceed cov_ceiling ({cov_ceiling})")
    if gate is not None:
        _check_scalar("gate", gate, low=0.0, low_open=True, high=1.0, high_open=True)
    if cov_update not in ("kalman", "information"):
        raise ValueError(f"cov_update must be 'kalman' or 'information', got {cov_update!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    if blocks:
        _refuse_for_blocks(cov_floor=cov_floor, cov_ceiling=cov_ceiling, cov_update=cov_update)
    named = [("weight_cov", weight_cov), ("features", features), ("labels", labels)]
    if bias is not None:
        named += [("bias", bias), ("bias_cov", bias_cov)]
    if linearize_at is not None:
        if not isinstance(linearize_at, (tuple, list)) or len(linearize_at) != 2:
            raise TypeError("linearize_at must be a pair (weight_lin, bias_lin) (bias_lin None "
                            "for a head without bias), or None for the current mean")
        w_lin, b_lin = linearize_at
        _need_float("linearize_at[0] (weight_lin)", w_lin)
        if w_lin.shape != weight.shape:
            raise ValueError(f"linearize_at[0] (weight_lin) must have weight's shape "
                             f"{tuple(weight.shape)}, got {tuple(w_lin.shape)}")
        named.append(("linearize_at[0] (weight_lin)", w_lin))
        if (b_lin is None) != (bias is None):
            raise ValueError("linearize_at[1] (bias_lin) must be a (K,) tensor when the head "
                             "has a bias and None when it has none")
        if b_lin is not None:
            _need_float("linearize_at[1] (bias_lin)", b_lin)
            if b_lin.shape != (k,):
                raise ValueError(f"linearize_at[1] (bias_lin) must have shape (K,) = ({k},), "
                                 f"got {tuple(b_lin.shape)}")
            named.append(("linearize_at[1] (bias_lin)", b_lin))
    device = weight.device
    for name, t in named:
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but weight is on {device}: put every "
                             f"tensor of one call on one device")
    ptrs = {weight.data_ptr(): "weight", weight_cov.data_ptr(): "weight_cov"}
    if bias is not None:
        for name, t in (("bias", bias), ("bias_cov", bias_cov)):
            if t.data_ptr() in ptrs:
                raise ValueError(f"{name} shares memory with {ptrs[t.data_ptr()]}: every state "
                                 f"tensor needs its own storage")
            ptrs[t.data_ptr()] = name
    _check_targets_on_host(labels, k)
    return k, d, b


# --------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------
def _targets(labels: torch.Tensor, k: int, device):
    """(B, K) float64 targets and a 0-d bool flag of invalid values (decided on the device)."""
    if labels.is_floating_point():
        y = labels.detach().to(F64)
        sums = y.sum(1, keepdim=True)
        tol = soft_target_tol(k, labels.dtype)
        bad = ((y < 0).any() | ((sums - 1.0).abs() > tol).any())
        # exactly normalised, so the residual sums to zero per image (module docstring)
        return y / sums, bad
    lab = labels.detach()
    bad = ((lab < 0) | (lab >= k)).any()
    y = (lab[:, None] == torch.arange(k, device=device)).to(F64)
    return y, bad


def _pair_maps(iu: torch.Tensor, ju: torch.Tensor, b: int):
    """Index maps between the packed upper triangle (T entries) and full B x B blocks:
    ``packed.index_select(1, to_full)`` unpacks (a symmetric block), and
    ``full.reshape(n, B * B).index_select(1, to_pairs)`` packs. One gather each, cheaper
    than scattering into zeros twice."""
    pos = torch.empty(b, b, dtype=torch.long, device=iu.device)
    ar = torch.arange(iu.shape[0], device=iu.device)
    pos[iu, ju] = ar
    pos[ju, iu] = ar
    return pos.reshape(-1), iu * b + ju


def _factor(mat: torch.Tensor):
    """Batched Cholesky with the jitter ladder of ``class_head``. Q_k's eigenvalues are at
    least c, so the plain factorisation practically always succeeds; where the flags can be
    read for free (eager CPU) the ladder's extra rungs are skipped when it did, which changes
    nothing in the result (the ladder keeps rung 0 wherever rung 0 succeeded). Elsewhere every
    rung is evaluated on the device, as ``class_head`` does, so nothing waits for the flags.

    Factors that failed at every rung are replaced by I: their step is skipped anyway, and
    the solves that follow must not meet a zero pivot."""
    factor, info = torch.linalg.cholesky_ex(mat)
    ok = info == 0
    if readable_now(ok):
        view = numpy_view(ok)
        if view is not None and view.all():
            return factor, torch.zeros(mat.shape[0], dtype=F64, device=mat.device), ok
    factor, jitter, ok = _factor_with_ladder(mat)
    eye = torch.eye(mat.shape[-1], dtype=mat.dtype, device=mat.device)
    return torch.where(ok[:, None, None], factor, eye), jitter, ok


def _all_finite(t: torch.Tensor) -> torch.Tensor:
    """0-d flag: every element of ``t`` finite. One reduction (a sum is NaN or inf when an
    element is) instead of isfinite's several passes; a sum that overflows also counts,
    which needs values near the dtype's limit, where the step would overflow anyway."""
    return torch.isfinite(t.sum())


def _logdet_from_factor(factor: torch.Tensor) -> torch.Tensor:
    return 2.0 * torch.log(torch.diagonal(factor, dim1=-2, dim2=-1)).sum(-1)


class _Classes:
    """The per-class float64 terms of one step (module docstring), from pass 1 on:
    Z_k (packed upper triangles), t_k, the jitter per class, SZ, sum_k w_k, sum_k log det Q_k,
    and the maps between packed and full B x B blocks."""

    def __init__(self, k, b, device):
        self.iu, self.ju, self.mult = _pair_index(b, device)
        self.to_full, self.to_pairs = _pair_maps(self.iu, self.ju, b)
        n_pairs = self.iu.shape[0]
        self.b = b
        self.z_pairs = torch.empty(k, n_pairs, dtype=F64, device=device)
        self.t = torch.empty(k, b, dtype=F64, device=device)
        self.jitter = torch.empty(k, dtype=F64, device=device)
        self.sz = torch.zeros(b, b, dtype=F64, device=device)
        self.w_sum = torch.zeros(b, dtype=F64, device=device)
        self.logdet_q = torch.zeros((), dtype=F64, device=device)
        self.ok = torch.ones((), dtype=torch.bool, device=device)

    def unpack(self, pairs: torch.Tensor) -> torch.Tensor:
        return pairs.index_select(1, self.to_full).view(pairs.shape[0], self.b, self.b)

    def pack(self, blocks: torch.Tensor) -> torch.Tensor:
        return blocks.reshape(blocks.shape[0], self.b * self.b).index_select(1, self.to_pairs)

    def add_chunk(self, k0, k1, m_blk, obs):
        """Pass 1 for classes k0..k1-1, given M_k / s^2 as (kc, B, B) float64 blocks."""
        sq = obs.sq_s[k0:k1]
        q = torch.addcmul(obs.c_eye, m_blk, sq[:, :, None] * sq[:, None, :])  # cI + E M E
        factor, jit, ok = _factor(q)
        self.jitter[k0:k1] = jit
        self.ok = self.ok & ok.all()
        self.logdet_q = self.logdet_q + _logdet_from_factor(factor).sum()
        half = torch.linalg.solve_triangular(factor, torch.diag_embed(obs.sq_t[k0:k1]),
                                             upper=False)       # L_k^-1 E_k
        z = half.transpose(-2, -1) @ half                       # Z_k = E_k Q_k^-1 E_k
        m_e = (m_blk @ obs.e_t[k0:k1, :, None]) * obs.s2        # M_k e_k
        w_k = (z @ m_e)[..., 0]                                 # Z_k M_k e_k
        self.t[k0:k1] = (obs.e_t[k0:k1] - w_k) / obs.c
        self.w_sum = self.w_sum + w_k.sum(0)
        self.sz = self.sz + z.sum(0)
        self.z_pairs[k0:k1] = self.pack(z)

    def capacitance(self, c: float, k: int):
        """Factor SZ; v = SZ^-1 (sum_k w_k) / c and the log det. Sets ``sz_l``, ``v``,
        ``sz_jitter``, ``log_det``."""
        factor, jit, ok = _factor(self.sz[None])
        self.ok = self.ok & ok[0]
        self.sz_jitter = jit[0]
        self.v = torch.cholesky_solve((self.w_sum / c)[None, :, None], factor)[0, :, 0]
        self.log_det = (self.logdet_q + _logdet_from_factor(factor)[0]
                        + (self.b - self.b * k) * math.log(c))
        self.sz_l = factor[0]

    def x_and_g(self, k0, k1, with_g: bool):
        """x_k = t_k + Z_k v, and G_kk = Z_k - Z_k SZ^-1 Z_k (full blocks) when asked."""
        z = self.unpack(self.z_pairs[k0:k1])
        x = self.t[k0:k1] + z @ self.v
        if not with_g:
            return x, None
        half = torch.linalg.solve_triangular(self.sz_l, z, upper=False)   # L^-1 Z_k
        return x, torch.baddbmm(z, half.transpose(-2, -1), half, alpha=-1.0)


class _Observation:
    """p, the residual and their class-major forms at the linearisation point."""

    def __init__(self, *, a, w, bias64, linearize_at, labels, k, s, c, cdt, device):
        has_bias = bias64 is not None
        self.s, self.c, self.s2 = s, c, s * s
        finite = _all_finite(a) & _all_finite(w)
        if has_bias:
            finite = finite & _all_finite(bias64)
        if linearize_at is None:
            w_lin, b_lin = w, bias64
        else:
            w_lin = linearize_at[0].detach().to(cdt)
            b_lin = linearize_at[1].detach().to(F64) if has_bias else None
            finite = finite & _all_finite(w_lin)
            if has_bias:
                finite = finite & _all_finite(b_lin)
        logits = (a @ w_lin.T).to(F64)                          # (B, K)
        if has_bias:
            logits = logits + b_lin
        logits = logits * s
        finite = finite & _all_finite(logits)
        log_p = torch.log_softmax(logits, dim=1)
        p = torch.exp(log_p)                                    # (B, K) float64
        y, self.bad_targets = _targets(labels, k, device)
        finite = finite & _all_finite(y)
        self.cross_entropy = -(y * log_p).sum(1).mean()
        e = y - p
        if linearize_at is not None:
            # e -= Lambda J (mean - lin): the first-order term of h(mean) around lin
            dz = (a @ (w - w_lin).T).to(F64)
            if has_bias:
                dz = dz + (bias64 - b_lin)
            dz = dz * s
            e = e - (p * dz - p * (p * dz).sum(1, keepdim=True))
        self.finite = finite
        self.p_t = p.T.contiguous()                             # (K, B) class-major
        self.e_t = e.T.contiguous()
        self.sq_t = torch.sqrt(self.p_t)                        # E_k's diagonals
        self.sq_s = self.sq_t * s
        b = a.shape[0]
        self.c_eye = c * torch.eye(b, dtype=F64, device=device)


def _decide(obs, cls, x, gate, lr, b, k, device):
    """The skip flag, d2, the gate scale and the mean step's coefficients lr g s x."""
    finite = obs.finite & torch.isfinite(cls.log_det) & _all_finite(x)
    d2 = (obs.e_t * x / obs.p_t.clamp(min=_P_TINY)).sum()
    ok = cls.ok & finite & ~obs.bad_targets
    scale = ref.gate_scale(d2, ref.gate_threshold(gate, b * (k - 1)))   # tau: host constant
    return ~ok, finite, d2, scale, (lr * obs.s) * scale * x


def _info(obs, cls, keep, finite, d2, scale, b, k, device):
    nan = torch.full((), float("nan"), dtype=F64, device=device)
    return CategoricalHeadInfo(
        mahalanobis=torch.where(keep, nan, d2),
        gate_scale=torch.where(keep, torch.zeros_like(scale), scale),
        skipped=keep, jitter=torch.maximum(cls.jitter.amax(), cls.sz_jitter),
        class_jitter=cls.jitter, log_det=torch.where(keep, nan, cls.log_det),
        cross_entropy=obs.cross_entropy,
        obs_noise=torch.full((), obs.c, dtype=F64, device=device),
        num_obs=b * (k - 1), nonfinite=~finite, bad_targets=obs.bad_targets)


# --------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------
def categorical_head_update_(weight: torch.Tensor, weight_cov: torch.Tensor,
                             bias: Optional[torch.Tensor], bias_cov: Optional[torch.Tensor],
                             features: torch.Tensor, labels: torch.Tensor, *,
                             obs_noise: float = 1.0, logit_scale: float = 1.0,
                             lr: float = 1.0, forgetting: float = 1.0,
                             process_noise: float = 0.0, cov_floor: float = 0.0,
                             cov_ceiling: float = math.inf, gate: Optional[float] = None,
                             cov_update: str = "kalman",
                             linearize_at: Optional[Sequence[Optional[torch.Tensor]]] = None,
                             chunk_size: int = DEFAULT_CHUNK) -> CategoricalHeadInfo:
    """One exact Kalman step, in place, of a softmax head under the categorical likelihood.

    ``weight`` (K, d); ``weight_cov``: (K, d), a diagonal covariance, or (K, d, d), one full
    d x d covariance block per class (the "block" form: no bias, no floor / ceiling, Kalman
    rule only; see the module docstring); ``bias`` / ``bias_cov`` (K,) or both None;
    ``features`` A (B, d); ``labels``: (B,) int64 class indices or (B, K) soft targets
    (non-negative rows summing to one). Logits are ``logit_scale * (A W^T + b)``.
    ``obs_noise`` c > 0 tempers the likelihood: R_j = c (diag(p_j) - p_j p_j^T) (c = 1 is the
    exact categorical Fisher information; c > 1 trusts each batch less).
    ``linearize_at``: ``(weight_lin, bias_lin)``, the point where p and its Jacobian are
    taken (default: the current mean); the mean still moves from the current mean.
    ``gate``: chi-square probability over the B (K - 1) independent observations; it scales
    the mean step only. ``lr``, ``forgetting``, ``process_noise``, ``cov_floor``,
    ``cov_ceiling``, ``cov_update`` as in :func:`kalman_kernels.ops.class_head_update_`;
    ``chunk_size`` classes are factorised at a time (bounds the float64 work space; the
    block form multiplies its d x d blocks in smaller sub-chunks, ``BLOCK_CHUNK_ELEMENTS``).

    The result equals the dense EKF that drops one class per image (any class); the module
    docstring derives the per-class form. Returns a :class:`CategoricalHeadInfo`.
    """
    if cov_ceiling is None:
        cov_ceiling = math.inf
    k, d, b = _validate(weight, weight_cov, bias, bias_cov, features, labels,
                        obs_noise=obs_noise, logit_scale=logit_scale, lr=lr,
                        forgetting=forgetting, process_noise=process_noise,
                        cov_floor=cov_floor, cov_ceiling=cov_ceiling, gate=gate,
                        cov_update=cov_update, linearize_at=linearize_at,
                        chunk_size=chunk_size)
    device = weight.device
    cdt = F64 if weight.dtype == F64 else torch.float32     # GEMM / accumulation dtype
    with torch.no_grad():
        a = features.detach().to(cdt)                           # (B, d)
        w = weight.detach().to(cdt)                             # (K, d)
        bias64 = bias.detach().to(F64) if bias is not None else None
        obs = _Observation(a=a, w=w, bias64=bias64, linearize_at=linearize_at, labels=labels,
                           k=k, s=float(logit_scale), c=float(obs_noise), cdt=cdt,
                           device=device)
        common = dict(a=a, w=w, obs=obs, k=k, b=b, d=d, cdt=cdt, lr=lr, gate=gate,
                      forgetting=forgetting, process_noise=process_noise,
                      chunk_size=chunk_size, device=device)
        if weight_cov.dim() == 3:
            return _block_step(weight, weight_cov, **common)
        return _diagonal_step(weight, weight_cov, bias, bias_cov, bias64=bias64,
                              cov_floor=cov_floor, cov_ceiling=cov_ceiling,
                              information=cov_update == "information", **common)


def _diagonal_step(weight, weight_cov, bias, bias_cov, *, a, w, bias64, obs, k, b, d, cdt,
                   lr, gate, forgetting, process_noise, cov_floor, cov_ceiling, information,
                   chunk_size, device):
    has_bias = bias is not None
    s2 = obs.s2
    p_w = _predicted(weight_cov, forgetting, process_noise, cdt)           # (K, d)
    p_b = _predicted(bias_cov, forgetting, process_noise, F64) if has_bias else None
    obs.finite = obs.finite & _all_finite(p_w)
    if has_bias:
        obs.finite = obs.finite & _all_finite(p_b)

    # --- pass 1, per chunk of classes: M_k, Q_k, Z_k, t_k; SZ and sum_k w_k -------------
    cls = _Classes(k, b, device)
    a_pairs = a[cls.iu] * a[cls.ju]                             # (T, d), T = B(B+1)/2
    for k0 in range(0, k, chunk_size):
        k1 = min(k, k0 + chunk_size)
        # Q_k is finite when P-, A, p are (checked) unless the GEMM overflows; the log det
        # catches that (an inf or NaN in Q gives a failed factorisation or a non-finite pivot)
        m_pairs = (p_w[k0:k1] @ a_pairs.T).to(F64)               # (kc, T): A P-_k A^T
        if has_bias:
            m_pairs = m_pairs + p_b[k0:k1, None]
        cls.add_chunk(k0, k1, cls.unpack(m_pairs), obs)          # M_k / s^2
    cls.capacitance(obs.c, k)

    # --- pass 2, per chunk: x_k and G_kk, packed for the covariance GEMM ------------------
    mult_s2 = cls.mult.to(F64) * s2          # pair weights of the symmetric sum, times s^2
    x = torch.empty(k, b, dtype=F64, device=device)
    if not information:
        g_pairs = torch.empty(k, cls.iu.shape[0], dtype=cdt, device=device)
        g_sum = torch.empty(k, dtype=F64, device=device) if has_bias else None
    for k0 in range(0, k, chunk_size):
        k1 = min(k, k0 + chunk_size)
        x[k0:k1], g = cls.x_and_g(k0, k1, not information)
        if not information:
            g_pairs[k0:k1] = (cls.pack(g) * mult_s2).to(cdt)
            if has_bias:
                g_sum[k0:k1] = g.sum((1, 2)) * s2
    keep, finite, d2, scale, step_coef = _decide(obs, cls, x, gate, lr, b, k, device)

    # --- the K x d terms -------------------------------------------------------------------
    new_w = torch.addcmul(w, p_w, step_coef.to(cdt) @ a)
    if information:
        info_w = (obs.p_t * (1.0 - obs.p_t)) * (s2 / obs.c)     # (K, B)
        diag_w = info_w.to(cdt) @ (a * a)
    else:
        diag_w = g_pairs @ a_pairs     # s^2 diag(A^T G_kk A): s^2 and pair weights in g_pairs
    new_pw = ref.cov_update(p_w, diag_w, cov_floor, cov_ceiling, information)
    weight.copy_(torch.where(keep, weight, new_w.to(weight.dtype)))
    weight_cov.copy_(torch.where(keep, weight_cov, new_pw.to(weight_cov.dtype)))
    if has_bias:
        new_b = bias64 + p_b * step_coef.sum(1)
        new_pb = ref.cov_update(p_b, info_w.sum(1) if information else g_sum, cov_floor,
                                cov_ceiling, information)
        bias.copy_(torch.where(keep, bias, new_b.to(bias.dtype)))
        bias_cov.copy_(torch.where(keep, bias_cov, new_pb.to(bias_cov.dtype)))
    return _info(obs, cls, keep, finite, d2, scale, b, k, device)


#: The block form multiplies the d x d blocks in sub-chunks of at most this many elements per
#: work buffer (one 512 x 512 float32 block): the buffers then stay in a core's L2 cache
#: between the passes over them, and only the state itself streams from memory.
BLOCK_CHUNK_ELEMENTS = 1 << 18


def _block_step(weight, weight_cov, *, a, w, obs, k, b, d, cdt, lr, gate, forgetting,
                process_noise, chunk_size, device):
    """The block form: Sigma_k (d x d) per class. With V_k = Sigma-_k A^T (d x B):
    M_k = s^2 A V_k, the mean step s V_k x_k and Sigma_k = Sigma-_k - s^2 V_k G_kk V_k^T,
    made symmetric. V_k is kept between the passes (K d B in the compute dtype), so each
    d x d block is multiplied twice (once to make V_k, once in the update), and the
    prediction Sigma / forgetting + q I is folded into those products instead of being
    materialised: the blocks are read twice and written once. The B x B algebra runs in
    chunks of ``chunk_size`` classes, the d x d products in sub-chunks of
    ``BLOCK_CHUNK_ELEMENTS``."""
    s2 = obs.s2
    inv_f = 1.0 / forgetting
    q = process_noise
    sub = max(1, BLOCK_CHUNK_ELEMENTS // (d * d))
    cls = _Classes(k, b, device)
    v_all = torch.empty(k, d, b, dtype=cdt, device=device)     # Sigma-_k A^T
    finite_v = torch.ones((), dtype=torch.bool, device=device)
    a_t = a.T
    for k0 in range(0, k, chunk_size):
        k1 = min(k, k0 + chunk_size)
        for j0 in range(k0, k1, sub):
            j1 = min(k1, j0 + sub)
            # one (n d x d) @ (d x B) GEMM: the rows of every block against the batch
            v = weight_cov[j0:j1].reshape((j1 - j0) * d, d).to(cdt) @ a_t
            v_all[j0:j1] = v.view(j1 - j0, d, b)
        v = v_all[k0:k1]
        if inv_f != 1.0 or q != 0.0:
            v = v * inv_f + q * a_t
            v_all[k0:k1] = v
        # a non-finite covariance entry reaches V_k (IEEE products propagate NaN and inf,
        # and 0 * inf is NaN), so checking V_k (B/d of the blocks' size) is enough
        finite_v = finite_v & _all_finite(v)
        m_blk = torch.matmul(a, v).to(F64)                      # A Sigma-_k A^T
        m_blk = (m_blk + m_blk.transpose(-2, -1)) * 0.5         # exactly symmetric
        cls.add_chunk(k0, k1, m_blk, obs)
    obs.finite = obs.finite & finite_v
    cls.capacitance(obs.c, k)
    x = torch.empty(k, b, dtype=F64, device=device)
    for k0 in range(0, k, chunk_size):
        k1 = min(k, k0 + chunk_size)
        x[k0:k1], _ = cls.x_and_g(k0, k1, False)
    keep, finite, d2, scale, step_coef = _decide(obs, cls, x, gate, lr, b, k, device)

    # mean: w_k += lr g s Sigma-_k A^T x_k = V_k (lr g s x_k)
    new_w = w + torch.bmm(v_all, step_coef.to(cdt)[:, :, None])[..., 0]
    weight.copy_(torch.where(keep, weight, new_w.to(weight.dtype)))
    # covariance (the decision is known: each block is written once):
    # half = (Sigma / f + q I - s^2 V G V^T) / 2, then half + half^T, then the write. The two
    # work buffers are reused by every sub-chunk (fresh multi-MB buffers would also cost a
    # page fault per 4 kB).
    n_buf = min(sub, k)
    half_buf = torch.empty(n_buf, d, d, dtype=cdt, device=device)
    new_buf = torch.empty(n_buf, d, d, dtype=cdt, device=device)
    for k0 in range(0, k, chunk_size):
        k1 = min(k, k0 + chunk_size)
        _, g = cls.x_and_g(k0, k1, True)
        gv = torch.bmm(g.to(cdt), v_all[k0:k1].transpose(-2, -1))     # G_kk V_k^T
        for j0 in range(k0, k1, sub):
            j1 = min(k1, j0 + sub)
            n = j1 - j0
            old = weight_cov[j0:j1]
            half = torch.baddbmm(old.to(cdt), v_all[j0:j1], gv[j0 - k0:j1 - k0],
                                 beta=0.5 * inv_f, alpha=-0.5 * s2, out=half_buf[:n])
            if q != 0.0:
                half.diagonal(dim1=-2, dim2=-1).add_(0.5 * q)
            new = torch.add(half, half.transpose(-2, -1), out=new_buf[:n])
            torch.where(keep, old, new.to(old.dtype), out=old)
    return _info(obs, cls, keep, finite, d2, scale, b, k, device)
