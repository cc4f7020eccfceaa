"""Functional, in-place Kalman steps over parameter blocks that share one observation.

``kalman_update_(blocks, residual, obs_noise, ...)`` is DESIGN section 2 end to end:
every block contributes to one innovation covariance S (m x m, float64); S is factored
once; then every block is updated with the same factor. The per-parameter passes go to a
backend (``reference``, ``cpp``, ...); the small m x m work stays here in float64.

Nothing is written until every input has been validated and S has been factored, so a
bad input raises and a non-finite observation skips the step with the state unchanged
bit for bit.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Union

import torch

from .. import reference as ref
from ..backends import resolve

__all__ = ["DenseBlock", "KronBlock", "KalmanInfo", "kalman_update_", "loss_update_",
           "kalman_step_", "loss_observation_step_", "StepHyper"]

_COV_DTYPES = (torch.float32, torch.float64)


# --------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------
def _check_cov(name: str, value: torch.Tensor, cov: torch.Tensor) -> None:
    if not isinstance(cov, torch.Tensor):
        raise TypeError(f"{name}.cov must be a tensor, got {type(cov).__name__}")
    if cov.shape != value.shape:
        raise ValueError(f"{name}.cov has shape {tuple(cov.shape)} but the parameter has shape "
                         f"{tuple(value.shape)}; the diagonal covariance is stored per element")
    if cov.dtype not in _COV_DTYPES:
        raise TypeError(f"{name}.cov must be float32 or float64, got {cov.dtype}; covariances "
                        f"are kept at least in float32 (DESIGN 3)")
    if value.dtype == torch.float64 and cov.dtype != torch.float64:
        raise TypeError(f"{name}.cov is {cov.dtype} for a float64 parameter; use a float64 "
                        f"covariance (never lower precision than the parameter)")


def _check_float(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


@dataclass
class DenseBlock:
    """A parameter tensor with an explicit Jacobian ``jac`` of shape (m, *param.shape)."""

    param: torch.Tensor
    cov: torch.Tensor
    jac: torch.Tensor

    def __post_init__(self):
        _check_float("DenseBlock.param", self.param)
        _check_float("DenseBlock.jac", self.jac)
        _check_cov("DenseBlock", self.param, self.cov)
        if self.jac.dim() != self.param.dim() + 1 or self.jac.shape[1:] != self.param.shape:
            raise ValueError(f"DenseBlock.jac must have shape (m, *param.shape) = (m, "
                             f"{', '.join(map(str, self.param.shape))}), got "
                             f"{tuple(self.jac.shape)}")
        if self.jac.shape[0] < 1:
            raise ValueError("DenseBlock.jac has no rows (m = 0): an observation needs m >= 1")

    @property
    def num_obs(self) -> int:
        return self.jac.shape[0]

    def tensors(self):
        return {"param": self.param, "cov": self.cov, "jac": self.jac}

    def observation_tensors(self):
        return (self.jac,)


@dataclass
class KronBlock:
    """An ``nn.Linear`` weight (d_out, d_in) whose Jacobian rows are vec(D_j A_j^T) (2.1)."""

    weight: torch.Tensor
    cov: torch.Tensor
    inputs: torch.Tensor
    grad_outputs: torch.Tensor

    def __post_init__(self):
        _check_float("KronBlock.weight", self.weight)
        _check_float("KronBlock.inputs", self.inputs)
        _check_float("KronBlock.grad_outputs", self.grad_outputs)
        if self.weight.dim() != 2:
            raise ValueError(f"KronBlock.weight must be 2-D (d_out, d_in), got shape "
                             f"{tuple(self.weight.shape)}")
        _check_cov("KronBlock", self.weight, self.cov)
        d_out, d_in = self.weight.shape
        if self.inputs.dim() != 2 or self.inputs.shape[1] != d_in:
            raise ValueError(f"KronBlock.inputs must have shape (m, d_in) = (m, {d_in}), got "
                             f"{tuple(self.inputs.shape)}")
        if self.grad_outputs.dim() != 2 or self.grad_outputs.shape[1] != d_out:
            raise ValueError(f"KronBlock.grad_outputs must have shape (m, d_out) = (m, {d_out}),"
                             f" got {tuple(self.grad_outputs.shape)}")
        if self.inputs.shape[0] != self.grad_outputs.shape[0]:
            raise ValueError(f"KronBlock.inputs has {self.inputs.shape[0]} rows but "
                             f"grad_outputs has {self.grad_outputs.shape[0]}; both need one row "
                             f"per observation")
        if self.inputs.shape[0] < 1:
            raise ValueError("KronBlock.inputs has no rows (m = 0): an observation needs m >= 1")

    @property
    def param(self) -> torch.Tensor:
        return self.weight

    @property
    def num_obs(self) -> int:
        return self.inputs.shape[0]

    def tensors(self):
        return {"weight": self.weight, "cov": self.cov, "inputs": self.inputs,
                "grad_outputs": self.grad_outputs}

    def observation_tensors(self):
        return (self.inputs, self.grad_outputs)


Block = Union[DenseBlock, KronBlock]


@dataclass
class KalmanInfo:
    """What one Kalman step did.

    ``mahalanobis`` is e^T S^-1 e; ``gate_scale`` the factor s applied to the mean step;
    ``skipped`` whether the state was left unchanged (``reason`` says why);
    ``innovation_cov`` S (m x m, float64, R included); ``jitter`` the relative jitter the
    Cholesky factorisation needed (0.0 for none); ``obs_noise`` the scalar r used, when R
    was a scalar (adaptive noise updates it).
    """

    mahalanobis: float
    gate_scale: float
    skipped: bool
    innovation_cov: Optional[torch.Tensor]
    jitter: Optional[float] = 0.0
    reason: Optional[str] = None
    num_obs: int = 0
    obs_noise: Optional[float] = None
    extras: dict = field(default_factory=dict)


@dataclass(frozen=True)
class StepHyper:
    """Per-block hyper-parameters (the optimizer's param groups may differ)."""

    lr: float = 1.0
    forgetting: float = 1.0
    process_noise: float = 0.0
    cov_floor: float = 0.0
    cov_ceiling: float = math.inf
    information: bool = False


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------
def check_hyper(*, lr, forgetting, process_noise, cov_floor, cov_ceiling, cov_update,
                where: str = "") -> None:
    """Raise a ValueError naming the first bad hyper-parameter."""
    pre = f"{where}: " if where else ""
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"{pre}lr must be a finite number > 0, got {lr!r}")
    if not (isinstance(forgetting, (int, float)) and 0.0 < forgetting <= 1.0):
        raise ValueError(f"{pre}forgetting must be in (0, 1] (1 = no forgetting), got "
                         f"{forgetting!r}")
    if not (isinstance(process_noise, (int, float)) and math.isfinite(process_noise)
            and process_noise >= 0):
        raise ValueError(f"{pre}process_noise must be a finite number >= 0, got "
                         f"{process_noise!r}")
    if not (isinstance(cov_floor, (int, float)) and cov_floor >= 0 and math.isfinite(cov_floor)):
        raise ValueError(f"{pre}cov_floor must be a finite number >= 0, got {cov_floor!r}")
    if not (isinstance(cov_ceiling, (int, float)) and cov_ceiling > 0):
        raise ValueError(f"{pre}cov_ceiling must be > 0 (or inf / None for no ceiling), got "
                         f"{cov_ceiling!r}")
    if cov_floor > cov_ceiling:
        raise ValueError(f"{pre}cov_floor ({cov_floor}) must not exceed cov_ceiling "
                         f"({cov_ceiling})")
    if cov_update not in ("kalman", "information"):
        raise ValueError(f"{pre}cov_update must be 'kalman' or 'information', got "
                         f"{cov_update!r}")


def _check_gate(gate) -> None:
    if gate is not None and not (isinstance(gate, (int, float)) and 0.0 < gate < 1.0):
        raise ValueError(f"gate must be None (off) or a probability in (0, 1) such as 0.999, "
                         f"got {gate!r}")


def obs_noise_matrix(obs_noise, m: int, device, *, name: str = "obs_noise") -> torch.Tensor:
    """Validate R and return it as a float64 tensor: 0-d (r I), (m,) diagonal or (m, m)."""
    if isinstance(obs_noise, bool):
        raise TypeError(f"{name} must be a float or a tensor, got bool")
    if isinstance(obs_noise, (int, float)):
        if not (math.isfinite(obs_noise) and obs_noise > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {obs_noise!r}")
        return torch.tensor(float(obs_noise), dtype=torch.float64, device=device)
    if not isinstance(obs_noise, torch.Tensor):
        raise TypeError(f"{name} must be a float, an (m,) tensor or an (m, m) tensor, got "
                        f"{type(obs_noise).__name__}")
    if obs_noise.device != torch.device(device):
        raise ValueError(f"{name} is on {obs_noise.device} but the parameters are on {device}; "
                         f"move it with .to({str(device)!r})")
    r = obs_noise.detach().to(torch.float64)
    if not bool(torch.isfinite(r).all()):
        raise ValueError(f"{name} has non-finite entries")
    if r.dim() == 0 or (r.dim() == 1 and r.shape[0] == m):
        if bool((r <= 0).any()):
            raise ValueError(f"{name} must be > 0 everywhere (a variance), got min "
                             f"{float(r.min())}")
        return r
    if r.dim() == 2 and r.shape == (m, m):
        if not torch.allclose(r, r.T, rtol=1e-12, atol=0.0):
            raise ValueError(f"{name} as an (m, m) matrix must be symmetric")
        if int(torch.linalg.cholesky_ex(r)[1]) != 0:
            raise ValueError(f"{name} as an (m, m) matrix must be positive definite")
        return r
    raise ValueError(f"{name} must be a float, an ({m},) tensor or an ({m}, {m}) tensor for "
                     f"m = {m} observations, got shape {tuple(r.shape)}")


def _noise_whitening(r: torch.Tensor, m: int) -> torch.Tensor:
    """F with F^T F = R^-1 (for the information-form covariance rule)."""
    if r.dim() == 0:
        return torch.eye(m, dtype=torch.float64, device=r.device) / math.sqrt(float(r))
    if r.dim() == 1:
        return torch.diag(r.rsqrt())
    return ref.whitening_matrix(torch.linalg.cholesky(r))


def _validate_blocks(blocks: Sequence[Block], residual: torch.Tensor) -> torch.device:
    if isinstance(blocks, (DenseBlock, KronBlock)):
        raise TypeError("blocks must be a list of DenseBlock / KronBlock, got a single block; "
                        "wrap it in a list")
    blocks = list(blocks)
    if not blocks:
        raise ValueError("blocks is empty: pass at least one DenseBlock or KronBlock")
    for i, b in enumerate(blocks):
        if not isinstance(b, (DenseBlock, KronBlock)):
            raise TypeError(f"blocks[{i}] must be a DenseBlock or KronBlock, got "
                            f"{type(b).__name__}")
    _check_float("residual", residual)
    if residual.dim() != 1:
        raise ValueError(f"residual must be a 1-D (m,) tensor, got shape {tuple(residual.shape)}")
    m = residual.shape[0]
    device = blocks[0].param.device
    seen = set()
    for i, b in enumerate(blocks):
        if b.num_obs != m:
            raise ValueError(f"blocks[{i}] has {b.num_obs} observation rows but residual has "
                             f"m = {m}")
        for name, t in b.tensors().items():
            if t.device != device:
                raise ValueError(f"blocks[{i}].{name} is on {t.device} but blocks[0] is on "
                                 f"{device}: all tensors of one call must be on one device")
        key = b.param.data_ptr()
        if key in seen:
            raise ValueError(f"blocks[{i}] updates a parameter that an earlier block already "
                             f"updates; give each tensor one block")
        seen.add(key)
    if residual.device != device:
        raise ValueError(f"residual is on {residual.device} but the blocks are on {device}: all "
                         f"tensors of one call must be on one device")
    return device


def _all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


# --------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------
def _innovation_cov(backend, block: Block, hp: StepHyper) -> torch.Tensor:
    if isinstance(block, DenseBlock):
        return backend.innovation_cov_dense(block.jac.reshape(block.num_obs, -1),
                                            block.cov, hp.forgetting, hp.process_noise)
    return backend.innovation_cov_kron(block.inputs, block.grad_outputs, block.cov,
                                       hp.forgetting, hp.process_noise)


def kalman_step_(blocks: Sequence[Block], hypers: Sequence[StepHyper], residual: torch.Tensor,
                 obs_noise, *, gate: Optional[float] = None, backend: str = "auto",
                 adaptive_rate: float = 0.0, process_group=None) -> KalmanInfo:
    """The engine behind :func:`kalman_update_` and the optimizer's batch mode.

    ``hypers[i]`` holds block i's lr / forgetting / process noise / floor / ceiling / rule.
    With ``adaptive_rate`` > 0 a scalar ``obs_noise`` is first moved towards the
    innovation-based estimate of DESIGN 2.3, and the updated value is used for this step
    and returned in ``info.obs_noise``.
    """
    device = _validate_blocks(blocks, residual)
    blocks = list(blocks)
    _check_gate(gate)
    m = residual.shape[0]
    r = obs_noise_matrix(obs_noise, m, device)
    kernels = resolve(backend, device)

    def skipped(reason, s=None, d2=float("nan")):
        return KalmanInfo(mahalanobis=d2, gate_scale=0.0, skipped=True, innovation_cov=s,
                          jitter=None, reason=reason, num_obs=m,
                          obs_noise=float(r) if r.dim() == 0 else None)

    observed = [residual] + [t for b in blocks for t in b.observation_tensors()]
    local_ok = _all_finite(observed)
    hph = None
    if local_ok:
        with torch.no_grad():
            hph = sum(_innovation_cov(kernels, b, hp) for b, hp in zip(blocks, hypers))
        local_ok = bool(torch.isfinite(hph).all())

    if local_ok and adaptive_rate > 0.0:
        if r.dim() != 0:
            raise ValueError("adaptive_obs_noise needs a scalar obs_noise; it cannot adapt an "
                             "(m,) or (m, m) noise tensor")
        spread = float(torch.diagonal(hph).mean())
        r = torch.tensor(ref.adapt_obs_noise(float(r), adaptive_rate, residual, spread),
                         dtype=torch.float64, device=device)

    factor = jitter = None
    s_mat = None
    if local_ok:
        s_mat = ref.add_obs_noise(hph, r)
        factor, jitter = ref.cholesky_with_jitter(s_mat)

    if process_group is not None:
        # Every rank must take the same decision, or the parameters drift apart.
        import torch.distributed as dist
        flag = torch.tensor([0.0 if (local_ok and factor is not None) else 1.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=process_group)
        if float(flag) > 0:
            return skipped("non-finite observation or failed factorisation on some rank", s_mat)
    if not local_ok:
        return skipped("non-finite values in the residual, the Jacobian or S")
    if factor is None:
        return skipped("the Cholesky factorisation of S failed at every jitter", s_mat)

    z = ref.whiten(factor, residual)
    d2 = ref.mahalanobis(z)
    tau = ref.chi2_quantile(float(gate), m) if gate is not None else None
    s = ref.gate_scale(d2, tau)
    solved = ref.solve_from_whitened(factor, z)                  # S^-1 e (float64)
    whiten_kalman = ref.whitening_matrix(factor)                 # L^-1
    whiten_info = None
    if any(hp.information for hp in hypers):
        whiten_info = _noise_whitening(r, m)

    with torch.no_grad():
        if process_group is None:
            for b, hp in zip(blocks, hypers):
                coef = (hp.lr * s) * solved
                whitening = whiten_info if hp.information else whiten_kalman
                args = (coef, whitening, hp.forgetting, hp.process_noise, hp.cov_floor,
                        hp.cov_ceiling, hp.information)
                if isinstance(b, DenseBlock):
                    kernels.fused_update_dense_(b.param, b.cov, b.jac.reshape(m, -1), *args)
                else:
                    kernels.fused_update_kron_(b.weight, b.cov, b.inputs, b.grad_outputs, *args)
        else:
            _distributed_update_(blocks, hypers, s * solved, whiten_kalman, whiten_info,
                                 process_group)

    return KalmanInfo(mahalanobis=d2, gate_scale=s, skipped=False, innovation_cov=s_mat,
                      jitter=jitter, reason=None, num_obs=m,
                      obs_noise=float(r) if r.dim() == 0 else None)


def _distributed_update_(blocks, hypers, coef, whiten_kalman, whiten_info, process_group):
    """DESIGN 2.5: all-reduce u = sum_r H_r^T c_r and d = sum_r diag(H_r^T W_r H_r)."""
    import torch.distributed as dist
    terms = []
    for b, hp in zip(blocks, hypers):
        whitening = whiten_info if hp.information else whiten_kalman
        if isinstance(b, DenseBlock):
            u, d = ref.step_terms_dense(b.jac.reshape(b.num_obs, -1), coef, whitening)
        else:
            u, d = ref.step_terms_kron(b.inputs, b.grad_outputs, coef, whitening)
        terms += [u.reshape(-1), d.reshape(-1)]
    flat = torch.cat(terms)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=process_group)
    offset = 0
    for b, hp in zip(blocks, hypers):
        n = b.param.numel()
        u, d = flat[offset:offset + n], flat[offset + n:offset + 2 * n]
        offset += 2 * n
        ref.apply_terms_(b.param, b.cov, u, d, hp.lr, hp.forgetting, hp.process_noise,
                         hp.cov_floor, hp.cov_ceiling, hp.information)


def kalman_update_(blocks: Sequence[Block], residual: torch.Tensor, obs_noise, *,
                   lr: float = 1.0, forgetting: float = 1.0, process_noise: float = 0.0,
                   cov_floor: float = 0.0, cov_ceiling: float = float("inf"),
                   gate: Optional[float] = None, cov_update: str = "kalman",
                   backend: str = "auto") -> KalmanInfo:
    """One Kalman step, in place, over ``blocks`` that share the observation ``residual``.

    ``residual`` is e = y - yhat (m,); ``obs_noise`` is R: a float, an (m,) diagonal or an
    (m, m) matrix. ``lr`` scales the mean step (1 = the exact Kalman update); ``gate`` is a
    chi-square probability (e.g. 0.999) above which the step is shrunk (DESIGN 2.3).
    A non-finite residual or Jacobian skips the step, leaves every tensor unchanged and
    warns; ``info.skipped`` reports it.
    """
    if cov_ceiling is None:
        cov_ceiling = math.inf
    check_hyper(lr=lr, forgetting=forgetting, process_noise=process_noise, cov_floor=cov_floor,
                cov_ceiling=cov_ceiling, cov_update=cov_update)
    hp = StepHyper(float(lr), float(forgetting), float(process_noise), float(cov_floor),
                   float(cov_ceiling), cov_update == "information")
    if not isinstance(blocks, (DenseBlock, KronBlock)):   # a lone block is refused below
        blocks = list(blocks)
    info = kalman_step_(blocks, [hp] * (len(blocks) if isinstance(blocks, list) else 1),
                        residual, obs_noise, gate=gate, backend=backend)
    if info.skipped:
        warnings.warn(f"kalman_update_: step skipped ({info.reason}); parameters and "
                      f"covariances are unchanged", RuntimeWarning, stacklevel=2)
    return info


# --------------------------------------------------------------------------------------
# Loss-observation mode (DESIGN 2.2)
# --------------------------------------------------------------------------------------
def loss_observation_step_(params: List[torch.Tensor], grads: List[torch.Tensor], covs: List[torch.Tensor],
               hypers: Sequence[StepHyper], loss: float, obs_noise: float, *,
               target: float = 0.0, gate: Optional[float] = None, backend: str = "auto",
               adaptive_rate: float = 0.0, quad_form: Optional[float] = None,
               process_group=None) -> KalmanInfo:
    """One loss-observation step; tensors with equal hyper-parameters share one
    multi-tensor backend call. ``quad_form`` (g^T P- g) may be supplied when it was
    accumulated during the backward pass. With ``process_group`` every rank observes its
    own loss and all ranks apply u = sum_r g_r c_r, d = sum_r w_r g_r^2 (DESIGN 2.5).
    """
    device = params[0].device if params else torch.device("cpu")
    _check_gate(gate)
    r = float(obs_noise)
    e = float(target) - float(loss)
    kernels = resolve(backend, device)
    runs = _runs_by_hyper(hypers)
    ok = math.isfinite(e) and _all_finite(grads)
    if ok and quad_form is None:
        quad_form = sum(kernels.loss_quad_form([grads[i] for i in idx], [covs[i] for i in idx],
                                               hp.forgetting, hp.process_noise)
                        for hp, idx in runs)
    ok = ok and math.isfinite(quad_form)
    if process_group is not None:
        import torch.distributed as dist
        flag = torch.tensor([0.0 if ok else 1.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=process_group)
        if float(flag) > 0:
            return KalmanInfo(float("nan"), 0.0, True, None, None,
                              "non-finite loss or gradient on some rank", 1, r)
    if not ok:
        return KalmanInfo(float("nan"), 0.0, True, None, None,
                          "non-finite loss, gradient or g^T P g", 1, r)
    if adaptive_rate > 0.0:
        r = ref.adapt_obs_noise(r, adaptive_rate, torch.tensor([e], dtype=torch.float64),
                                quad_form)
    s_val = ref.loss_innovation(quad_form, r)
    d2 = e * e / s_val
    tau = ref.chi2_quantile(float(gate), 1) if gate is not None else None
    s = ref.gate_scale(d2, tau)
    with torch.no_grad():
        if process_group is None:
            for hp, idx in runs:
                coef = hp.lr * s * e / s_val
                weight = 1.0 / r if hp.information else 1.0 / s_val
                kernels.loss_step_([params[i] for i in idx], [grads[i] for i in idx],
                                   [covs[i] for i in idx], coef, weight, hp.forgetting,
                                   hp.process_noise, hp.cov_floor, hp.cov_ceiling,
                                   hp.information)
        else:
            import torch.distributed as dist
            terms = []
            for g, hp in zip(grads, hypers):
                g64 = g.reshape(-1).to(torch.float64)
                weight = 1.0 / r if hp.information else 1.0 / s_val
                terms += [g64 * (s * e / s_val), g64 * g64 * weight]
            flat = torch.cat(terms)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=process_group)
            offset = 0
            for p, c, hp in zip(params, covs, hypers):
                n = p.numel()
                ref.apply_terms_(p, c, flat[offset:offset + n], flat[offset + n:offset + 2 * n],
                                 hp.lr, hp.forgetting, hp.process_noise, hp.cov_floor,
                                 hp.cov_ceiling, hp.information)
                offset += 2 * n
    s_tensor = torch.tensor([[s_val]], dtype=torch.float64)
    return KalmanInfo(d2, s, False, s_tensor, 0.0, None, 1, r)


def _runs_by_hyper(hypers: Sequence[StepHyper]):
    """[(hyper, [indices])] grouping tensors that share hyper-parameters."""
    groups: dict = {}
    for i, hp in enumerate(hypers):
        groups.setdefault(hp, []).append(i)
    return list(groups.items())


def loss_update_(params: List[torch.Tensor], grads: List[torch.Tensor], covs: List[torch.Tensor],
                 loss: float, obs_noise: float, *, target: float = 0.0, lr: float = 1.0,
                 forgetting: float = 1.0, process_noise: float = 0.0, cov_floor: float = 0.0,
                 cov_ceiling: float = float("inf"), gate: Optional[float] = None,
                 cov_update: str = "kalman", backend: str = "auto") -> KalmanInfo:
    """Functional loss-observation step (DESIGN 2.2): one observation yhat = L, target y.

    S = g^T P- g + r; mu += lr * s * P- g (y - L) / S; P = clamp(P- - P-^2 g^2 / S).
    """
    if cov_ceiling is None:
        cov_ceiling = math.inf
    check_hyper(lr=lr, forgetting=forgetting, process_noise=process_noise, cov_floor=cov_floor,
                cov_ceiling=cov_ceiling, cov_update=cov_update)
    if not (isinstance(obs_noise, (int, float)) and obs_noise > 0 and math.isfinite(obs_noise)):
        raise ValueError(f"obs_noise must be a finite float > 0 in loss mode, got {obs_noise!r}")
    if not (len(params) == len(grads) == len(covs)) or not params:
        raise ValueError("params, grads and covs must be non-empty lists of equal length")
    for i, (p, g, c) in enumerate(zip(params, grads, covs)):
        if g.shape != p.shape:
            raise ValueError(f"grads[{i}] has shape {tuple(g.shape)}, params[{i}] "
                             f"{tuple(p.shape)}")
        _check_cov(f"covs[{i}]", p, c)
        if g.device != p.device or c.device != p.device:
            raise ValueError(f"params[{i}], grads[{i}] and covs[{i}] must be on one device")
    hp = StepHyper(float(lr), float(forgetting), float(process_noise), float(cov_floor),
                   float(cov_ceiling), cov_update == "information")
    info = loss_observation_step_(params, grads, covs, [hp] * len(params), float(loss), float(obs_noise),
                      target=target, gate=gate, backend=backend)
    if info.skipped:
        warnings.warn(f"loss_update_: step skipped ({info.reason}); state unchanged",
                      RuntimeWarning, stacklevel=2)
    return info
