"""What every step of the ops layer shares: hyper-parameters, the step's result, the
validation of observation noise and of the tensors a step writes.

Validation reads only metadata (shapes, dtypes, devices, storage ranges), never a tensor's
value, except for an explicit ``obs_noise`` tensor on the CPU, whose values are checked
where reading them costs nothing (DESIGN 4: no host round trips inside a step).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional, Tuple

import torch

from .. import reference as ref
from .._deferred import compiling, readable_now

F64 = torch.float64
COV_DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True)
class StepHyper:
    """Per-block hyper-parameters (the optimizer's param groups may differ)."""

    lr: float = 1.0
    forgetting: float = 1.0
    process_noise: float = 0.0
    cov_floor: float = 0.0
    cov_ceiling: float = math.inf
    information: bool = False


class KalmanInfo:
    """What one Kalman step did.

    The step never reads a device value on the host, so everything it reports is held as
    tensors on the parameters' device (``*_tensor`` attributes, usable inside
    ``torch.compile`` and without a GPU synchronisation); the plain attributes convert them
    to Python numbers only when read:

    * ``mahalanobis``: e^T S^-1 e (NaN when the step was skipped before it was computed);
    * ``gate_scale``: the factor s applied to the mean step (0.0 when skipped);
    * ``skipped``: whether every tensor was left unchanged; ``reason`` says why;
    * ``innovation_cov``: S (m x m, float64, R included), a tensor;
    * ``jitter``: the relative jitter the Cholesky factorisation needed (0.0 for none,
      None when skipped); ``obs_noise``: the scalar r used, when R was a scalar (adaptive
      noise updates it); ``num_obs``: m.
    """

    __slots__ = ("mahalanobis_tensor", "gate_scale_tensor", "skipped_tensor",
                 "innovation_cov", "jitter_tensor", "obs_noise_tensor", "num_obs",
                 "nonfinite_tensor", "remote_tensor", "extras")

    def __init__(self, *, mahalanobis, gate_scale, skipped, innovation_cov=None, jitter=None,
                 obs_noise=None, num_obs: int = 0, nonfinite=None, remote=None):
        self.mahalanobis_tensor = mahalanobis
        self.gate_scale_tensor = gate_scale
        self.skipped_tensor = skipped
        self.innovation_cov = innovation_cov
        self.jitter_tensor = jitter
        self.obs_noise_tensor = obs_noise
        self.num_obs = int(num_obs)
        self.nonfinite_tensor = nonfinite
        self.remote_tensor = remote
        self.extras: dict = {}

    @property
    def mahalanobis(self) -> float:
        return float(self.mahalanobis_tensor)

    @property
    def gate_scale(self) -> float:
        return float(self.gate_scale_tensor)

    @property
    def skipped(self) -> bool:
        return bool(self.skipped_tensor)

    @property
    def jitter(self) -> Optional[float]:
        if self.jitter_tensor is None or self.skipped:
            return None
        return float(self.jitter_tensor)

    @property
    def obs_noise(self) -> Optional[float]:
        return None if self.obs_noise_tensor is None else float(self.obs_noise_tensor)

    @property
    def reason(self) -> Optional[str]:
        if not self.skipped:
            return None
        if self.nonfinite_tensor is not None and bool(self.nonfinite_tensor):
            return "non-finite values in the observation (residual, Jacobian, loss, gradient or S)"
        if self.remote_tensor is not None and bool(self.remote_tensor):
            return "non-finite observation or failed factorisation on another rank"
        return "the Cholesky factorisation of S failed at every jitter"

    def __repr__(self) -> str:
        if compiling():
            return "KalmanInfo(<traced>)"
        return (f"KalmanInfo(mahalanobis={self.mahalanobis:.6g}, gate_scale={self.gate_scale:.6g}, "
                f"skipped={self.skipped}, jitter={self.jitter}, obs_noise={self.obs_noise}, "
                f"num_obs={self.num_obs}, reason={self.reason!r})")


def check_hyper(*, lr, forgetting, process_noise, cov_floor, cov_ceiling, cov_update,
                where: str = "") -> None:
    """Raise a ValueError naming the first bad hyper-parameter."""
    pre = f"{where}: " if where else ""
    if not (isinstance(lr, (int, float)) and not isinstance(lr, bool) and math.isfinite(lr)
            and lr > 0):
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


def check_gate(gate) -> None:
    if gate is not None and not (isinstance(gate, (int, float)) and 0.0 < gate < 1.0):
        raise ValueError(f"gate must be None (off) or a probability in (0, 1) such as 0.999, "
                         f"got {gate!r}")


def hyper_from(lr, forgetting, process_noise, cov_floor, cov_ceiling, cov_update) -> StepHyper:
    """Validate the functional API's keyword hyper-parameters and pack them."""
    if cov_ceiling is None:
        cov_ceiling = math.inf
    check_hyper(lr=lr, forgetting=forgetting, process_noise=process_noise, cov_floor=cov_floor,
                cov_ceiling=cov_ceiling, cov_update=cov_update)
    return StepHyper(float(lr), float(forgetting), float(process_noise), float(cov_floor),
                     float(cov_ceiling), cov_update == "information")


def obs_noise_matrix(obs_noise, m: int, device, *, name: str = "obs_noise") -> torch.Tensor:
    """Validate R and return it as a float64 tensor on ``device``: 0-d (r I), (m,) diagonal
    or (m, m). Values of an explicit tensor are checked where that costs no device
    synchronisation (eager CPU); elsewhere a bad R shows as a failed factorisation (skip)."""
    if isinstance(obs_noise, bool):
        raise TypeError(f"{name} must be a float or a tensor, got bool")
    if isinstance(obs_noise, (int, float)):
        if not (math.isfinite(obs_noise) and obs_noise > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {obs_noise!r}")
        return torch.tensor(float(obs_noise), dtype=F64, device=device)
    if not isinstance(obs_noise, torch.Tensor):
        raise TypeError(f"{name} must be a float, an (m,) tensor or an (m, m) tensor, got "
                        f"{type(obs_noise).__name__}")
    if obs_noise.device != torch.device(device):
        raise ValueError(f"{name} is on {obs_noise.device} but the parameters are on {device}; "
                         f"move it with .to({str(device)!r})")
    if not obs_noise.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {obs_noise.dtype}")
    r = obs_noise.detach().to(F64)
    shape_ok = r.dim() == 0 or (r.dim() == 1 and r.shape[0] == m) or (
        r.dim() == 2 and tuple(r.shape) == (m, m))
    if not shape_ok:
        raise ValueError(f"{name} must be a float, an ({m},) tensor or an ({m}, {m}) tensor for "
                         f"m = {m} observations, got shape {tuple(r.shape)}")
    if readable_now(r):
        if not bool(torch.isfinite(r).all()):
            raise ValueError(f"{name} has non-finite entries")
        if r.dim() < 2 and bool((r <= 0).any()):
            raise ValueError(f"{name} must be > 0 everywhere (a variance), got min "
                             f"{float(r.min())}")
        if r.dim() == 2:
            if not torch.allclose(r, r.T, rtol=1e-12, atol=0.0):
                raise ValueError(f"{name} as an (m, m) matrix must be symmetric")
            if int(torch.linalg.cholesky_ex(r)[1]) != 0:
                raise ValueError(f"{name} as an (m, m) matrix must be positive definite")
    return r


def noise_whitening(r: torch.Tensor, m: int) -> torch.Tensor:
    """F with F^T F = R^-1 (the information-form covariance rule)."""
    if r.dim() == 0:
        return torch.eye(m, dtype=F64, device=r.device) * r.rsqrt()
    if r.dim() == 1:
        return torch.diag(r.rsqrt())
    return ref.whitening_matrix(torch.linalg.cholesky(r))


def check_cov(name: str, value: torch.Tensor, cov) -> None:
    if not isinstance(cov, torch.Tensor):
        raise TypeError(f"{name}.cov must be a tensor, got {type(cov).__name__}")
    if cov.shape != value.shape:
        raise ValueError(f"{name}.cov has shape {tuple(cov.shape)} but the parameter has shape "
                         f"{tuple(value.shape)}; the diagonal covariance is stored per element")
    if cov.dtype not in COV_DTYPES:
        raise TypeError(f"{name}.cov must be float32 or float64, got {cov.dtype}; covariances "
                        f"are kept at least in float32 (DESIGN 3)")
    if value.dtype == torch.float64 and cov.dtype != torch.float64:
        raise TypeError(f"{name}.cov is {cov.dtype} for a float64 parameter; use a float64 "
                        f"covariance (never lower precision than the parameter)")


def check_float(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _byte_range(t: torch.Tensor) -> Tuple[int, int, int]:
    """(storage id, first byte, one past the last byte) that ``t`` can touch."""
    size = t.element_size()
    start = t.storage_offset()
    span = 1 + sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride())) if t.numel() else 0
    base = t.untyped_storage().data_ptr()
    return base, base + start * size, base + (start + span) * size


def check_no_overlap(named: Iterable[Tuple[str, torch.Tensor]]) -> None:
    """Raise if two tensors that a step writes share memory (the same tensor twice, a
    parameter passed as its own covariance, overlapping views): they would be updated twice
    or read after being written. Skipped while torch.compile traces (no storage there)."""
    if compiling():
        return
    spans = []
    for name, t in named:
        if t.numel() == 0 or t.device.type == "meta":
            continue
        base, lo, hi = _byte_range(t)
        for other_name, (obase, olo, ohi) in spans:
            if lo < ohi and olo < hi:
                raise ValueError(f"{name} and {other_name} share memory (the same tensor, or "
                                 f"overlapping views of one); every parameter and covariance a "
                                 f"step updates must be a separate tensor")
        spans.append((name, (base, lo, hi)))
