"""The class-structured Kalman step of a linear head over K classes (docs/design.md, 2.6).

A head W (K x d, rows w_k) with bias b on a batch of B feature vectors a_j (rows of A) scores
observation (j, k) as

    plain:   yhat_jk = w_k . a_j + b_k
    cosine:  yhat_jk = (w_k / |w_k|) . a_j + b_k       (``normalize_rows=True``)

Either way observation (j, k) touches row k of W and b_k only, so with a diagonal P and a
diagonal observation noise the innovation covariance of the B K observations is exactly
block-diagonal over classes:

    S = blockdiag_k ( H_k diag(P-_k) H_k^T + P-_bk 1 1^T + R_k ),    B x B blocks,

where H_k (B x d) is the Jacobian of class k's B scores with respect to w_k. A step costs K
Cholesky factorisations of B x B instead of one of (B K) x (B K): for a 1000-class head at
batch 32 that is a few MB of work space instead of the 8 GB of a dense S.

Plain scores: H_k = A, and every S_k and every covariance term is a GEMM against the
pairwise products of the batch's inputs, Ap[(j, j'), i] = a_ji a_j'i (only j <= j' is kept,
S_k is symmetric):

    S_k[j, j']  = (P-_k . Ap^T)[(j, j')]                  one (K x d) @ (d x B(B+1)/2) GEMM
    diag_k[i]   = sum_{j,j'} (S_k^-1)_{jj'} a_ji a_j'i     one (K x B(B+1)/2) @ (.. x d) GEMM
    step_k      = A^T c_k,  c_k = S_k^-1 e_k               one (K x B) @ (B x d) GEMM

Cosine scores: with u_k = w_k / n_k, n_k = |w_k| and s_jk = u_k . a_j, the Jacobian row is
h_jk = (a_j - s_jk u_k) / n_k: the plain one minus a rank-one term per class. So

    n_k^2 S_k[j, j'] = (A P-_k A^T)_jj' - s_j'k g_jk - s_jk g_j'k + s_jk s_j'k q_k
    n_k^2 diag_k[i]  = (W_k . Ap)_i - 2 u_ki (A^T W_k s_k)_i + u_ki^2 s_k^T W_k s_k
    n_k   step_k     = A^T c_k - (c_k . s_k) u_k

with g_jk = sum_i P-_ki u_ki a_ji, q_k = sum_i P-_ki u_ki^2 and W_k = S_k^-1: the same GEMMs
plus O(K B^2 + K B d) corrections. Both forms are exact: they equal the dense update with the
(B K) x (K d) Jacobian (``tests/test_class_head.py`` checks it in float64 to 1e-10).

Host synchronisation: none. The skip decision (non-finite input, a class whose Cholesky fails
at every jitter), the jitter ladder, the gate scale and the adaptive noise are device tensors;
a skipped step writes the old values back through ``torch.where``, so the state is unchanged
bit for bit. Shapes, dtypes and devices are validated before anything is written.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

from .. import reference as ref
from ._common import KalmanInfo

__all__ = ["ClassHeadInfo", "class_head_update_", "class_head_predictive_variance"]

F64 = torch.float64
_COV_DTYPES = (torch.float32, torch.float64)
#: Classes per factorisation chunk: bounds the float64 work space (chunk x B x B per buffer).
DEFAULT_CHUNK = 128


class ClassHeadInfo(KalmanInfo):
    """What one class-structured step did: a :class:`~kalman_kernels.ops.KalmanInfo` (its
    tensors stay on the device; ``mahalanobis``, ``gate_scale``, ``skipped``, ``jitter``,
    ``obs_noise`` convert when read) plus the per-class terms, as tensors:

    ``class_mahalanobis``: the K terms e_k^T S_k^-1 e_k (their sum is ``mahalanobis``);
    ``class_jitter``: (K,) relative jitter each class's factorisation needed (0 for none,
    nan where every rung failed); ``jitter`` is their maximum. ``innovation_cov`` is None
    (S is block-diagonal: K blocks of B x B).
    """

    __slots__ = ("class_mahalanobis", "class_jitter")

    def __init__(self, *, class_mahalanobis, class_jitter, **kwargs):
        super().__init__(**kwargs)
        self.class_mahalanobis = class_mahalanobis
        self.class_jitter = class_jitter


# --------------------------------------------------------------------------------------
# Validation (shapes, dtypes, devices; nothing here reads tensor values)
# --------------------------------------------------------------------------------------
def _is_float_tensor(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point()


def _need_float(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}; convert it "
                        f"with {name}.float()")


def _need_cov(name: str, cov, value: torch.Tensor, value_name: str) -> None:
    _need_float(name, cov)
    if cov.shape != value.shape:
        raise ValueError(f"{name} has shape {tuple(cov.shape)} but {value_name} has shape "
                         f"{tuple(value.shape)}: the diagonal covariance is stored per element "
                         f"(torch.full_like({value_name}, p0, dtype=torch.float32))")
    if cov.dtype not in _COV_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {cov.dtype}: covariances are "
                        f"kept at least in float32 (use {name}.float())")
    if value.dtype == F64 and cov.dtype != F64:
        raise TypeError(f"{name} is {cov.dtype} for a float64 {value_name}: use a float64 "
                        f"covariance ({name}.double()), never lower precision than the parameter")


def _check_scalar(name: str, v, *, low: float, low_open: bool, high: float = math.inf,
                  high_open: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a Python number, got {type(v).__name__}")
    v = float(v)
    ok_low = v > low if low_open else v >= low
    ok_high = v < high if high_open else v <= high
    if not (ok_low and ok_high) or math.isnan(v):
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ValueError(f"{name} must be in {lo}{low}, {high}{hi}, got {v!r}")
    return v


def _validate(weight, weight_cov, bias, bias_cov, features, residual, obs_noise, *, lr,
              forgetting, process_noise, cov_floor, cov_ceiling, gate, cov_update,
              adaptive_rate):
    _need_float("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must be the (K, d) head, got shape {tuple(weight.shape)}")
    k, d = weight.shape
    if k < 1 or d < 1:
        raise ValueError(f"weight has shape {tuple(weight.shape)}: K >= 1 classes and d >= 1 "
                         f"features are needed")
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
    _need_float("residual", residual)
    if residual.shape not in ((b, k), (b * k,)):
        raise ValueError(f"residual must have shape (B, K) = ({b}, {k}) or (B*K,) = ({b * k},) "
                         f"(row-major, image by image), got {tuple(residual.shape)}")
    # obs_noise: a number, or a tensor of shape (), (K,), (B, K) or (B*K,)
    if isinstance(obs_noise, torch.Tensor):
        _need_float("obs_noise", obs_noise)
        if obs_noise.shape not in (torch.Size([]), (k,), (b, k), (b * k,)):
            raise ValueError(f"obs_noise must be a number or a tensor of shape () (r I), (K,) = "
                             f"({k},) (one r per class), (B, K) = ({b}, {k}) or (B*K,) = "
                             f"({b * k},) (one r per observation), got "
                             f"{tuple(obs_noise.shape)}; a full R coupling classes breaks the "
                             f"class structure (use ops.kalman_update_)")
    else:
        _check_scalar("obs_noise", obs_noise, low=0.0, low_open=True)
        if math.isinf(obs_noise):
            raise ValueError("obs_noise must be finite")
    lr = _check_scalar("lr", lr, low=0.0, low_open=True)
    if math.isinf(lr):
        raise ValueError("lr must be finite")
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
    _check_scalar("adaptive_rate", adaptive_rate, low=0.0, low_open=False, high=1.0)
    if adaptive_rate > 0 and isinstance(obs_noise, torch.Tensor) and obs_noise.dim() != 0:
        raise ValueError("adaptive_rate > 0 needs a scalar obs_noise (a number or a 0-d "
                         "tensor); it cannot adapt a per-class or per-observation noise")
    device = weight.device
    named = [("weight_cov", weight_cov), ("features", features), ("residual", residual)]
    if bias is not None:
        named += [("bias", bias), ("bias_cov", bias_cov)]
    if isinstance(obs_noise, torch.Tensor):
        named.append(("obs_noise", obs_noise))
    for name, t in named:
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but weight is on {device}: put every "
                             f"tensor of one call on one device ({name}.to({str(device)!r}))")
    ptrs = {weight.data_ptr(): "weight", weight_cov.data_ptr(): "weight_cov"}
    if bias is not None:
        for name, t in (("bias", bias), ("bias_cov", bias_cov)):
            if t.data_ptr() in ptrs:
                raise ValueError(f"{name} shares memory with {ptrs[t.data_ptr()]}: every state "
                                 f"tensor needs its own storage")
            ptrs[t.data_ptr()] = name
    return k, d, b


# --------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------
def _noise_per_obs(obs_noise, b: int, k: int, device) -> torch.Tensor:
    """R's diagonal as a (K, B) float64 tensor (class-major, as the blocks use it)."""
    if not isinstance(obs_noise, torch.Tensor):
        return torch.full((k, b), float(obs_noise), dtype=F64, device=device)
    r = obs_noise.detach().to(F64)
    if r.dim() == 0:
        return r.expand(k, b)
    if r.shape == (k,):          # one r per class (for B = 1 the same as one per observation)
        return r[:, None].expand(k, b)
    return r.reshape(b, k).T


def _pair_index(b: int, device):
    iu, ju = torch.triu_indices(b, b, device=device)
    # weight of each kept pair in a symmetric contraction: 1 on the diagonal, 2 off it
    mult = torch.where(iu == ju, 1.0, 2.0).to(device)
    return iu, ju, mult


def _factor_with_ladder(s: torch.Tensor):
    """Batched Cholesky of (n, B, B) float64 blocks with the jitter ladder of step 3
    (docs/design.md, 2), evaluated on the device: every rung is factored for every block
    and the first rung that succeeded is kept per block. Returns (L, jitter (n,), ok (n,) bool)."""
    factor, info = torch.linalg.cholesky_ex(s)
    ok = info == 0
    jitter = torch.zeros(s.shape[0], dtype=F64, device=s.device)
    if not ref.JITTER_LADDER:
        return factor, jitter, ok
    b = s.shape[-1]
    scale = torch.diagonal(s, dim1=-2, dim2=-1).sum(-1) / b
    eye = torch.eye(b, dtype=F64, device=s.device)
    for eps in ref.JITTER_LADDER:
        f_eps, info_eps = torch.linalg.cholesky_ex(s + (eps * scale)[:, None, None] * eye)
        use = (~ok) & (info_eps == 0)
        factor = torch.where(use[:, None, None], f_eps, factor)
        jitter = torch.where(use, torch.full_like(jitter, eps), jitter)
        ok = ok | use
    jitter = torch.where(ok, jitter, torch.full_like(jitter, float("nan")))
    return factor, jitter, ok


def _predicted(cov: torch.Tensor, forgetting: float, process_noise: float, dtype) -> torch.Tensor:
    """P- (the reference's predict step) in ``dtype``; lam = 1, q = 0 is P itself, exactly,
    and costs no pass over it."""
    p = cov.to(dtype)
    if forgetting == 1.0 and process_noise == 0.0:
        return p
    return ref.predict_cov(p, forgetting, process_noise)


# --------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------
def class_head_update_(weight: torch.Tensor, weight_cov: torch.Tensor,
                       bias: Optional[torch.Tensor], bias_cov: Optional[torch.Tensor],
                       features: torch.Tensor, residual: torch.Tensor,
                       obs_noise: Union[float, torch.Tensor], *, lr: float = 1.0,
                       forgetting: float = 1.0, process_noise: float = 0.0,
                       cov_floor: float = 0.0, cov_ceiling: float = math.inf,
                       gate: Optional[float] = None, cov_update: str = "kalman",
                       normalize_rows: bool = False, adaptive_rate: float = 0.0,
                       chunk_size: int = DEFAULT_CHUNK) -> ClassHeadInfo:
    """One exact Kalman step, in place, of a K-class linear head (docs/design.md, 2.6).

    ``weight`` (K, d) and ``weight_cov`` (K, d); ``bias`` / ``bias_cov`` (K,) or both None;
    ``features`` A (B, d): the head's input rows (e.g. normalised image embeddings);
    ``residual`` e = y - yhat, (B, K) or (B*K,) row-major; ``obs_noise`` R: a number or a
    tensor of shape () (r I), (K,) (one r per class), (B, K) or (B*K,) (one per observation).
    ``normalize_rows``: the scores use the row-normalised weight (cosine scores, module
    docstring); the step is then the exact EKF step linearised at the current weight.
    ``adaptive_rate`` beta > 0 (scalar R only): r <- (1-beta) r + beta max(1e-8, mean(e^2) -
    mean(diag(H P- H^T))) before S is formed (docs/design.md, 2.3); the r used is
    ``info.obs_noise``.
    ``gate``: chi-square probability over the B K observations (docs/design.md, 2.3).
    Other hyper-parameters as in :func:`kalman_kernels.ops.kalman_update_`.

    Work: two GEMMs with inner size B(B+1)/2, one with inner size B, K batched B x B Cholesky
    factorisations (times the jitter rungs), in float32 for float32 / half parameters and
    float64 for float64 ones; S, its factors, z and S^-1 e are float64. Extra memory is
    O(K d + K B^2 + B^2 d) (a few MB for K = 1000, B = 32, d = 512).
    """
    if cov_ceiling is None:
        cov_ceiling = math.inf
    k, d, b = _validate(weight, weight_cov, bias, bias_cov, features, residual, obs_noise,
                        lr=lr, forgetting=forgetting, process_noise=process_noise,
                        cov_floor=cov_floor, cov_ceiling=cov_ceiling, gate=gate,
                        cov_update=cov_update, adaptive_rate=adaptive_rate)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    device = weight.device
    cdt = F64 if weight.dtype == F64 else torch.float32     # GEMM / accumulation dtype
    information = cov_update == "information"
    m = b * k

    with torch.no_grad():
        a = features.detach().to(cdt)                           # (B, d)
        e = residual.detach().reshape(b, k).to(F64).T           # (K, B) class-major
        p_w = _predicted(weight_cov, forgetting, process_noise, cdt)          # (K, d)
        p_b = (_predicted(bias_cov, forgetting, process_noise, F64) if bias is not None
               else None)                                                  # (K,)
        w = weight.detach().to(cdt)
        if normalize_rows:
            norms = w.norm(dim=1)                               # (K,)
            u = w / norms[:, None]                              # unit rows
            s_scores = (a @ u.T).T.to(F64)                      # (K, B): s_jk
            g = (a @ (p_w * u).T).T.to(F64)                     # (K, B): g_jk
            q = (p_w * u * u).sum(1).to(F64)                    # (K,)
            inv_n2 = (1.0 / norms.to(F64)) ** 2                 # (K,)

        # --- observation noise (and its adaptive update, docs/design.md, 2.3) ----------
        r_obs = _noise_per_obs(obs_noise, b, k, device)         # (K, B) float64
        r_scalar = None
        if not isinstance(obs_noise, torch.Tensor) or obs_noise.dim() == 0:
            r_scalar = (obs_noise.detach().to(F64) if isinstance(obs_noise, torch.Tensor)
                        else torch.tensor(float(obs_noise), dtype=F64, device=device))
        if adaptive_rate > 0.0:
            # diag(H P- H^T) of every observation, without forming S
            hph_diag = ((a * a) @ p_w.T).T.to(F64)              # (K, B)
            if normalize_rows:
                hph_diag = (hph_diag - 2 * s_scores * g + s_scores ** 2 * q[:, None]) \
                    * inv_n2[:, None]
            if p_b is not None:
                hph_diag = hph_diag + p_b[:, None]
            r_scalar = ref.adapt_obs_noise(r_scalar, adaptive_rate, e, hph_diag.mean())
            r_obs = r_scalar.expand(k, b)

        # --- pass 1: S_k, factor, whiten, per chunk of classes ------------------------
        iu, ju, mult = _pair_index(b, device)
        a_pairs = a[iu] * a[ju]                                  # (T, d), T = B(B+1)/2
        coef = torch.empty(k, b, dtype=F64, device=device)       # S_k^-1 e_k
        sinv_pairs = torch.empty(k, iu.shape[0], dtype=cdt, device=device)
        d2 = torch.empty(k, dtype=F64, device=device)
        jitter = torch.empty(k, dtype=F64, device=device)
        ok_all = torch.ones((), dtype=torch.bool, device=device)
        finite_s = torch.ones((), dtype=torch.bool, device=device)
        if normalize_rows:
            ws = torch.empty(k, b, dtype=F64, device=device)     # W_k s_k
            sws = torch.empty(k, dtype=F64, device=device)       # s_k^T W_k s_k
        if p_b is not None:
            bias_diag = torch.empty(k, dtype=F64, device=device)  # 1^T W_k 1
        for k0 in range(0, k, chunk_size):
            k1 = min(k, k0 + chunk_size)
            kc = k1 - k0
            s_flat = (p_w[k0:k1] @ a_pairs.T).to(F64)            # (kc, T)
            s_blk = torch.zeros(kc, b, b, dtype=F64, device=device)
            s_blk[:, iu, ju] = s_flat
            s_blk[:, ju, iu] = s_flat
            if normalize_rows:
                sc, gc = s_scores[k0:k1], g[k0:k1]
                corr = (-sc[:, None, :] * gc[:, :, None] - sc[:, :, None] * gc[:, None, :]
                        + (sc[:, :, None] * sc[:, None, :]) * q[k0:k1, None, None])
                s_blk = (s_blk + corr) * inv_n2[k0:k1, None, None]
            if p_b is not None:
                s_blk = s_blk + p_b[k0:k1, None, None]
            s_blk = s_blk + torch.diag_embed(r_obs[k0:k1])
            finite_s = finite_s & torch.isfinite(s_blk).all()
            factor, jit, ok = _factor_with_ladder(s_blk)
            jitter[k0:k1] = jit
            ok_all = ok_all & ok.all()
            z = torch.linalg.solve_triangular(factor, e[k0:k1, :, None], upper=False)
            d2[k0:k1] = (z * z).sum((1, 2))
            coef[k0:k1] = torch.linalg.solve_triangular(factor.transpose(-2, -1), z,
                                                        upper=True)[..., 0]
            sinv = torch.cholesky_inverse(factor)                # (kc, B, B)
            sinv_pairs[k0:k1] = (sinv[:, iu, ju] * mult).to(cdt)
            if normalize_rows:
                v = (sinv @ s_scores[k0:k1, :, None])[..., 0]   # (kc, B)
                ws[k0:k1] = v
                sws[k0:k1] = (v * s_scores[k0:k1]).sum(1)
            if p_b is not None:
                bias_diag[k0:k1] = sinv.sum((1, 2))

        d2_total = d2.sum()
        ok_all = ok_all & finite_s & torch.isfinite(d2_total)
        scale = ref.gate_scale(d2_total, ref.gate_threshold(gate, m))   # tau: host constant
        step_coef = (lr * scale) * coef                          # (K, B) float64

        # --- pass 2: the K x d terms (three GEMMs) --------------------------------------
        direction = step_coef.to(cdt) @ a                        # (K, d): A^T c_k per row
        if information:
            r_inv = (1.0 / r_obs).to(cdt)                        # (K, B)
            diag_w = r_inv @ (a * a)
        else:
            diag_w = sinv_pairs @ a_pairs                        # (K, d)
        if normalize_rows:
            n_inv = (1.0 / norms).to(cdt)
            cs = (step_coef * s_scores).sum(1).to(cdt)           # c_k . s_k
            direction = (direction - cs[:, None] * u) * n_inv[:, None]
            if information:
                rs = r_inv * s_scores.to(cdt)
                diag_w = (diag_w - 2 * u * (rs @ a)
                          + u * u * (rs * s_scores.to(cdt)).sum(1)[:, None])
            else:
                diag_w = (diag_w - 2 * u * (ws.to(cdt) @ a) + u * u * sws.to(cdt)[:, None])
            diag_w = diag_w * (n_inv * n_inv)[:, None]

        new_w = w + p_w * direction
        new_pw = ref.cov_update(p_w, diag_w, cov_floor, cov_ceiling, information)
        keep = ~ok_all
        weight.copy_(torch.where(keep, weight, new_w.to(weight.dtype)))
        weight_cov.copy_(torch.where(keep, weight_cov, new_pw.to(weight_cov.dtype)))
        if bias is not None:
            if information:
                diag_b = (1.0 / r_obs).sum(1)
            else:
                diag_b = bias_diag
            new_b = bias.detach().to(F64) + p_b * step_coef.sum(1)
            new_pb = ref.cov_update(p_b, diag_b, cov_floor, cov_ceiling, information)
            bias.copy_(torch.where(keep, bias, new_b.to(bias.dtype)))
            bias_cov.copy_(torch.where(keep, bias_cov, new_pb.to(bias_cov.dtype)))

    return ClassHeadInfo(mahalanobis=d2_total, class_mahalanobis=d2,
                         gate_scale=torch.where(keep, torch.zeros_like(scale), scale),
                         skipped=keep, jitter=jitter.amax(), class_jitter=jitter,
                         obs_noise=r_scalar, num_obs=m,
                         nonfinite=~(finite_s & torch.isfinite(d2_total)))


def class_head_predictive_variance(weight: torch.Tensor, weight_cov: torch.Tensor,
                                   bias_cov: Optional[torch.Tensor], features: torch.Tensor,
                                   obs_noise: Union[float, torch.Tensor] = 0.0, *,
                                   normalize_rows: bool = False) -> torch.Tensor:
    """Linearised predictive variance of every score (docs/design.md, 2.4), (B, K):
    var_jk = h_jk^T diag(P_k) h_jk + P_bk + r, with h_jk the Jacobian row of score (j, k)
    (plain or cosine, as in :func:`class_head_update_`)."""
    cdt = F64 if weight.dtype == F64 else torch.float32
    with torch.no_grad():
        a = features.detach().to(cdt)
        p = weight_cov.detach().to(cdt)
        var = ((a * a) @ p.T).to(F64)                           # (B, K)
        if normalize_rows:
            w = weight.detach().to(cdt)
            norms = w.norm(dim=1)
            u = w / norms[:, None]
            s = (a @ u.T).to(F64)
            g = (a @ (p * u).T).to(F64)
            q = (p * u * u).sum(1).to(F64)
            var = (var - 2 * s * g + s * s * q) / (norms.to(F64) ** 2)
        if bias_cov is not None:
            var = var + bias_cov.detach().to(F64)
        if isinstance(obs_noise, torch.Tensor):
            var = var + obs_noise.detach().to(F64)
        else:
            var = var + float(obs_noise)
    return var
