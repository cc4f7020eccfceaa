"""What every step of the ops layer shares: hyper-parameters, the step's result, the
validation of observation noise and of the tensors a step writes.

Validation reads only metadata (shapes, dtypes, devices, storage ranges), never a tensor's
value, except for an explicit ``obs_noise`` tensor on the CPU, whose values are checked
where reading them costs nothing (no host round trips inside a step: docs/design.md, 4.2).
"""
from __future__ import annotations

import math
import os
import weakref
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Tuple

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


chi2_sf = ref.chi2_sf   # the p-value of a Mahalanobis distance (kalman_kernels.reference)


def _host(t: torch.Tensor, what: str):
    """The tensor ``t`` for a host read, or a clear error when it holds no values."""
    if t.device.type == "meta":
        raise RuntimeError(f"KalmanInfo.{what}: this step ran on meta tensors, which hold no "
                           f"values; read the *_tensor attributes (shapes and dtypes only), or "
                           f"run the step on a real device")
    return t


class KalmanInfo:
    """What one Kalman step did.

    The step never reads a device value on the host, so everything it reports is held as
    tensors on the parameters' device (``*_tensor`` attributes, usable inside
    ``torch.compile`` and without a GPU synchronisation); the plain attributes convert them
    to Python numbers only when read:

    * ``mahalanobis``: d2 = e^T S^-1 e (NaN when the step was skipped); ``p_value``: the
      chi-square probability of a d2 at least this large with ``num_obs`` degrees of
      freedom (small: the batch is an outlier under the model);
    * ``gate_scale``: the factor s applied to the mean step (0.0 when skipped); ``gated``:
      whether the gate shrank this step (s < 1);
    * ``skipped``: whether every tensor was left unchanged; ``reason`` says why;
    * ``innovation_cov``: S (m x m, float64, R included), a tensor;
    * ``jitter``: the relative jitter the Cholesky factorisation needed (0.0 for none,
      None when skipped); ``obs_noise``: the scalar r used, when R was a scalar (adaptive
      noise updates it); ``num_obs``: m;
    * ``cov_clamps``: under ``process_group`` with the ``"kalman"`` rule, the number of
      covariance elements whose summed update went below zero and were clamped to the
      floor (docs/design.md, 2.5); None elsewhere (a single observation cannot do that).
    """

    __slots__ = ("mahalanobis_tensor", "gate_scale_tensor", "skipped_tensor",
                 "innovation_cov", "jitter_tensor", "obs_noise_tensor", "num_obs",
                 "nonfinite_tensor", "remote_tensor", "overflow_tensor", "mismatch_tensor",
                 "cov_clamps_tensor", "extras")

    def __init__(self, *, mahalanobis, gate_scale, skipped, innovation_cov=None, jitter=None,
                 obs_noise=None, num_obs: int = 0, nonfinite=None, remote=None,
                 overflow=None, mismatch=None, cov_clamps=None):
        self.mahalanobis_tensor = mahalanobis
        self.gate_scale_tensor = gate_scale
        self.skipped_tensor = skipped
        self.innovation_cov = innovation_cov
        self.jitter_tensor = jitter
        self.obs_noise_tensor = obs_noise
        self.num_obs = int(num_obs)
        self.nonfinite_tensor = nonfinite
        self.remote_tensor = remote
        self.overflow_tensor = overflow
        self.mismatch_tensor = mismatch
        self.cov_clamps_tensor = cov_clamps
        self.extras: dict = {}

    @property
    def mahalanobis(self) -> float:
        return float(_host(self.mahalanobis_tensor, "mahalanobis"))

    @property
    def p_value(self) -> float:
        """P(chi2_m >= d2): NaN when skipped."""
        d2 = self.mahalanobis
        return float("nan") if math.isnan(d2) else chi2_sf(d2, max(1, self.num_obs))

    @property
    def gate_scale(self) -> float:
        return float(_host(self.gate_scale_tensor, "gate_scale"))

    @property
    def gated(self) -> bool:
        return not self.skipped and self.gate_scale < 1.0

    @property
    def skipped(self) -> bool:
        return bool(_host(self.skipped_tensor, "skipped"))

    @property
    def jitter(self) -> Optional[float]:
        if self.jitter_tensor is None or self.skipped:
            return None
        return float(self.jitter_tensor)

    @property
    def obs_noise(self) -> Optional[float]:
        if self.obs_noise_tensor is None:
            return None
        return float(_host(self.obs_noise_tensor, "obs_noise"))

    @property
    def cov_clamps(self) -> Optional[int]:
        if self.cov_clamps_tensor is None:
            return None
        return int(_host(self.cov_clamps_tensor, "cov_clamps"))

    def _flag(self, t) -> bool:
        return t is not None and bool(t)

    @property
    def reason(self) -> Optional[str]:
        if not self.skipped:
            return None
        if self._flag(self.nonfinite_tensor):
            return "non-finite values in the observation (residual, Jacobian, loss, gradient or S)"
        if self._flag(self.overflow_tensor):
            return ("the step would overflow the parameters' or kernels' dtype (an extreme "
                    "residual or loss: lr * s * sqrt(d2) * sqrt(max P-) beyond half the dtype's "
                    "range, or step coefficients that the kernels cannot represent)")
        if self._flag(self.mismatch_tensor):
            return ("the ranks' parameter shapes or hyper-parameters differ (a hash of them is "
                    "checked at every step)")
        if self._flag(self.remote_tensor):
            return "non-finite observation, overflow or failed factorisation on another rank"
        return "the Cholesky factorisation of S failed at every jitter"

    def __repr__(self) -> str:
        if compiling():
            return "KalmanInfo(<traced>)"
        if self.skipped_tensor.device.type == "meta":
            return f"KalmanInfo(<meta tensors>, num_obs={self.num_obs})"
        return (f"KalmanInfo(mahalanobis={self.mahalanobis:.6g}, p_value={self.p_value:.3g}, "
                f"gate_scale={self.gate_scale:.6g}, skipped={self.skipped}, "
                f"jitter={self.jitter}, obs_noise={self.obs_noise}, num_obs={self.num_obs}, "
                f"reason={self.reason!r})")


def _frozen_flag(value: bool) -> torch.Tensor:
    with torch.inference_mode():     # in-place writes outside inference mode raise
        return torch.tensor(value)


#: 0-d bool flags shared by every host-decided step (a fresh tensor per flag is a dispatcher
#: call each); inference tensors, so they cannot be modified in place.
HOST_FLAGS = {False: _frozen_flag(False), True: _frozen_flag(True)}


def numpy_view(t: torch.Tensor):
    """``t.numpy()`` (a CPU tensor's memory, written without a dispatcher call), or None
    where this torch was built without numpy support (callers then use torch ops)."""
    try:
        return t.numpy()
    except (RuntimeError, TypeError):
        return None


def _made_on_read(name: str, make):
    """A KalmanInfo tensor field made from the host numbers when first read, then kept."""
    def get(self):
        made = self._made
        t = made.get(name)
        if t is None:
            t = made[name] = make(self._numbers)
        return t
    get.__name__ = name
    return property(get)


def _f64(key: str):
    return lambda nums: torch.tensor(nums[key], dtype=F64)


class HostKalmanInfo(KalmanInfo):
    """The :class:`KalmanInfo` of a step whose scalars were decided as Python numbers
    (the eager-CPU loss step, where reading a value costs no synchronisation). It holds the
    numbers and makes each ``*_tensor`` field only when it is read: the step itself creates
    no tensor for its report (each small tensor op costs tens of microseconds right after
    the kernels have streamed the parameters through the caches). Reads give the same
    values, dtypes and shapes as the device-decided :class:`KalmanInfo`."""

    __slots__ = ("_numbers", "_made")

    def __init__(self, *, mahalanobis: float, gate_scale: float, skipped: bool,
                 innovation_cov: float, obs_noise: float, nonfinite: bool, overflow: bool):
        self._numbers = {"mahalanobis": mahalanobis, "gate_scale": gate_scale,
                         "skipped": skipped, "innovation_cov": innovation_cov,
                         "obs_noise": obs_noise, "nonfinite": nonfinite, "overflow": overflow}
        self._made = {}
        self.num_obs = 1
        self.remote_tensor = self.mismatch_tensor = self.cov_clamps_tensor = None
        self.extras = {}

    mahalanobis_tensor = _made_on_read("mahalanobis_tensor", _f64("mahalanobis"))
    gate_scale_tensor = _made_on_read("gate_scale_tensor", _f64("gate_scale"))
    obs_noise_tensor = _made_on_read("obs_noise_tensor", _f64("obs_noise"))
    jitter_tensor = _made_on_read("jitter_tensor", lambda nums: torch.zeros((), dtype=F64))
    innovation_cov = _made_on_read(
        "innovation_cov", lambda nums: torch.tensor([[nums["innovation_cov"]]], dtype=F64))
    skipped_tensor = property(lambda self: HOST_FLAGS[self._numbers["skipped"]])
    nonfinite_tensor = property(lambda self: HOST_FLAGS[self._numbers["nonfinite"]])
    overflow_tensor = property(lambda self: HOST_FLAGS[self._numbers["overflow"]])

    def __reduce__(self):
        # copies (an optimizer's deepcopy or pickle) carry the numbers; the tensors are
        # made again when read (the inherited slots are properties here)
        return (_host_info, (dict(self._numbers), self.num_obs, dict(self.extras)))

    mahalanobis = property(lambda self: self._numbers["mahalanobis"])
    gate_scale = property(lambda self: self._numbers["gate_scale"])
    skipped = property(lambda self: self._numbers["skipped"])
    obs_noise = property(lambda self: self._numbers["obs_noise"])
    jitter = property(lambda self: None if self._numbers["skipped"] else 0.0)


def _host_info(numbers: dict, num_obs: int, extras: dict) -> HostKalmanInfo:
    info = HostKalmanInfo(**numbers)
    info.num_obs = num_obs
    info.extras.update(extras)
    return info


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
                        f"are kept at least in float32")
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
        for other_name, (_obase, olo, ohi) in spans:
            if lo < ohi and olo < hi:
                raise ValueError(f"{name} and {other_name} share memory (the same tensor, or "
                                 f"overlapping views of one); every parameter and covariance a "
                                 f"step updates must be a separate tensor")
        spans.append((name, (base, lo, hi)))


# ---------------------------------------------------------------------- overflow guard
#: finfo(dtype).max of the floating dtypes, looked up once (a torch.finfo per step costs
#: tens of microseconds in the cold caches the loss step runs in; a dict, not lru_cache,
#: which torch.compile warns about)
_DTYPE_MAX = {dt: float(torch.finfo(dt).max)
              for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}


def _max_of(dtype: torch.dtype) -> float:
    found = _DTYPE_MAX.get(dtype)
    return found if found is not None else float(torch.finfo(dtype).max)


def compute_dtype(param: torch.Tensor, cov: torch.Tensor) -> torch.dtype:
    """The dtype a kernel may do a block's per-element math in: float64 only when both the
    parameter and its covariance are float64 (covariances and accumulations are at least
    float32: docs/design.md, 3)."""
    return F64 if (param.dtype == F64 and cov.dtype == F64) else torch.float32


def representable_step(params: Sequence[torch.Tensor], covs: Sequence[torch.Tensor],
                       hypers: Sequence[StepHyper], whitened_norm: torch.Tensor,
                       coef_max: torch.Tensor, weight_max, world: int = 1) -> torch.Tensor:
    """The overflow guard of a step, a 0-d bool device tensor (no host read).

    A step must never make finite state non-finite (docs/robustness.md, "The overflow
    guard"). Two conditions, both on the step's scalars, so they cost O(m^2) work and no pass
    over the parameters:

    1. every scalar handed to the kernels (``coef`` = lr s S^-1 e, the whitening matrix or
       the loss step's weight) is finite and representable in the dtype the kernels compute
       in (:func:`compute_dtype`): a kernel that converts it cannot produce an Inf;
    2. the step on every parameter is at most half the parameter dtype's range. For the
       Kalman mean step, |delta mu_i| = lr s P-_i |h_i^T S^-1 e| <= lr s sqrt(d2) sqrt(P-_i)
       (Cauchy-Schwarz in the S^-1 inner product and P-_i h_i^T S^-1 h_i <= 1, since
       S >= P-_i h_i h_i^T), so it suffices that lr * s * sqrt(d2) * sqrt(max P-) <= max / 2
       (max / (2 W) on each of W ranks, whose steps add). ``whitened_norm`` is s sqrt(d2).

    ``coef_max`` is max |S^-1 e| (the guard multiplies in each tensor's lr); ``weight_max``
    maps ``information`` (bool) to the largest whitening entry or weight of that rule.
    max P- uses the covariance dtype's largest value when that already gives a threshold
    above 1e6 standard deviations (float32 / bfloat16 parameters with float32 covariances:
    lr s sqrt(d2) <= 9.2e18; float64: 6.7e153), so no reduction over P is needed; for
    parameters whose range is narrower than their covariance's (float16, or a float64
    covariance of a float32 parameter) it is the actual max of the covariances, one
    multi-tensor reduction of P on the device. A parameter then stays finite whenever
    |mu| <= max / 2 before the step, and the covariance update never exceeds
    max(P-, cov_floor). Tensors sharing (dtypes, hyper-parameters) are checked together.
    """
    host = not isinstance(whitened_norm, torch.Tensor)
    ok = True if host else torch.ones((), dtype=torch.bool, device=whitened_norm.device)
    for hp, big_c, limit, sqrt_pbar in _guard_groups(params, covs, hypers, world, host):
        sqrt_ppred = sqrt_pbar * math.sqrt(1.0 / hp.forgetting) + math.sqrt(hp.process_noise)
        bound = (hp.lr * whitened_norm) * sqrt_ppred
        if host:      # eager CPU: the same conditions on Python floats
            ok = ok and (hp.lr * coef_max <= big_c and weight_max[hp.information] <= big_c
                         and bound <= limit)
        else:
            ok = ok & ((hp.lr * coef_max) <= big_c) & (weight_max[hp.information] <= big_c) \
                & (bound <= limit)
    return ok


def _guard_groups(params, covs, hypers, world: int, host: bool):
    """Per group of tensors sharing (dtypes, hyper-parameters): (hyper, largest kernel
    scalar, half the parameter dtype's range per rank, sqrt(max P) or its bound)."""
    groups: dict = {}
    for p, c, hp in zip(params, covs, hypers):
        groups.setdefault((p.dtype, c.dtype, compute_dtype(p, c), hp), []).append(c)
    for (p_dtype, c_dtype, k_dtype, hp), group_covs in groups.items():
        limit = _max_of(p_dtype) / (2.0 * world)
        big_cov = _max_of(c_dtype)
        if limit / math.sqrt(big_cov) >= 1e6:
            sqrt_pbar = math.sqrt(big_cov)
        else:
            flat = [c.detach() for c in group_covs if c.numel()]
            maxima = torch._foreach_norm(flat, float("inf")) if flat else []  # P >= 0
            if host:
                sqrt_pbar = math.sqrt(max((float(t) for t in maxima), default=0.0))
            elif maxima:
                sqrt_pbar = torch.stack([t.to(F64) for t in maxima]).amax().sqrt()
            else:
                sqrt_pbar = 0.0
        yield hp, _max_of(k_dtype), limit, sqrt_pbar


# ---------------------------------------------------------------------- value checks
class CovValueCheck:
    """Checks that covariance tensors hold finite values >= 0 (a negative variance would be
    used as is and yield NaN when sampled), once per tensor *version*.

    Reading values on the host is a synchronisation on a GPU (docs/design.md, 4.2), so each
    tensor is checked when first seen and again only after something else modified it in place
    (``tensor._version`` changed since this step's own write, recorded with
    :meth:`record`). In steady state (the same tensors every step, written only by the
    step) nothing is read. Nothing is checked while torch.compile traces or on meta
    tensors.
    """

    def __init__(self):
        self._seen: dict = {}

    @staticmethod
    def _version(t: torch.Tensor):
        try:
            return t._version
        except RuntimeError:          # inference tensors have no version counter
            return None

    def _known(self, t: torch.Tensor) -> bool:
        entry = self._seen.get(id(t))
        if entry is None or entry[0]() is not t:
            return False
        version = self._version(t)
        return version is not None and entry[1] == version

    def __call__(self, named: Iterable[Tuple[str, torch.Tensor]]) -> None:
        if compiling():
            return
        for name, t in named:
            if t.device.type == "meta" or t.numel() == 0 or self._known(t):
                continue
            with torch.no_grad():
                bad = ~(t >= 0)                     # NaN and negative values
                bad |= torch.isinf(t)
                if bool(bad.any()):
                    count = int(bad.sum())
                    low = float(torch.nan_to_num(t.detach(), nan=0.0).min())
                    raise ValueError(
                        f"{name} holds {count} entr{'y that is' if count == 1 else 'ies that are'} "
                        f"negative, NaN or Inf (min {low:g}); a covariance is a variance per "
                        f"element and must be finite and >= 0")
            self._remember(t)

    def _remember(self, t: torch.Tensor) -> None:
        version = self._version(t)
        if version is None:
            return
        key = id(t)

        def forget(ref, key=key, seen=self._seen):
            entry = seen.get(key)
            if entry is not None and entry[0] is ref:
                del seen[key]

        self._seen[key] = (weakref.ref(t, forget), version)

    def record(self, tensors: Iterable[torch.Tensor]) -> None:
        """After the step wrote ``tensors``: their new versions are the step's own."""
        if compiling():
            return
        seen = self._seen
        for t in tensors:
            entry = seen.get(id(t))
            if entry is not None and entry[0]() is t:
                version = self._version(t)
                if version is None:
                    continue
                seen[id(t)] = (entry[0], version)       # the same weak reference


# ---------------------------------------------------------------------- memory guard
#: m x m float64 matrices alive at once in a batch step (S's parts, S, the factor, the
#: ladder's temporaries, L^-1 and its right-hand side): about 6 when the ladder is tried rung
#: by rung (eager CPU), 12 when every rung is factored at once (GPU, torch.compile).
_MM_COPIES = {False: 6, True: 12}
#: float64 copies of an (m, n) dense Jacobian the reference kernels make (H, H P-, F H).
_JAC_COPIES = 3
#: Refuse when the estimate exceeds this fraction of the memory available now.
MEMORY_FRACTION = 0.5
_QUERY_ABOVE = 256 << 20


def _gib(n: float) -> str:
    return f"{n / 2 ** 30:.3g} GiB"


def available_bytes(device) -> Optional[int]:
    """Memory available now on ``device`` (CPU: MemAvailable of /proc/meminfo; CUDA: free
    device memory), or None when unknown."""
    device = torch.device(device)
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        if device.type == "cpu":
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
            pages = os.sysconf("SC_AVPHYS_PAGES")
            return int(pages) * int(os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, RuntimeError, AttributeError):
        return None
    return None


def workspace_bytes(m: int, dense_numel: int = 0, *, batched_ladder: bool = False) -> int:
    """Estimated peak bytes of one batch step with m observations: the m x m float64 work
    (S, factor, L^-1, ...) and the float64 copies of dense Jacobians (m x dense_numel)."""
    return 8 * (_MM_COPIES[bool(batched_ladder)] * m * m + _JAC_COPIES * m * dense_numel)


def reference_kron_bytes(batch: int, k: int, d_out: int) -> int:
    """The reference backend's Kronecker temporaries: Q (B, B, d_out) float64 and, one
    sample at a time, a (K, B, d_out) and a (K, B, K) product (kalman_kernels/reference.py)."""
    return 8 * (batch * batch * d_out + 2 * k * batch * d_out + batch * k * batch * k)


def check_workspace(m: int, device, *, dense_numel: int = 0, where: str = "kalman_update_",
                    jacobian_bytes: int = 0, chunked: bool = False,
                    extra_bytes: int = 0) -> None:
    """Raise a MemoryError before allocating when a batch step of m observations would need
    more than MEMORY_FRACTION of the memory available on ``device`` (``extra_bytes``: the
    backend's own temporaries, e.g. :func:`reference_kron_bytes`)."""
    device = torch.device(device)
    if compiling() or device.type not in ("cpu", "cuda"):
        return
    batched = device.type != "cpu"
    need = workspace_bytes(m, dense_numel, batched_ladder=batched) + int(jacobian_bytes) \
        + int(extra_bytes)
    if need < _QUERY_ABOVE:
        return
    free = available_bytes(device)
    if free is None or need <= MEMORY_FRACTION * free:
        return
    one = 8 * m * m
    hint = ("lower max_obs_per_update" if chunked else
            "pass max_obs_per_update=N (KalmanNGD(..., max_obs_per_update=N) or "
            "ops.kalman_update_(..., max_obs_per_update=N)) to process the batch as "
            "sequential sub-batches of at most N observations")
    jac_note = (f"; dense Jacobians {_gib(jacobian_bytes + 8 * _JAC_COPIES * m * dense_numel)}"
                if (dense_numel or jacobian_bytes) else "")
    raise MemoryError(
        f"{where}: a batch observation of m = {m} observations needs about {_gib(need)} "
        f"(each m x m float64 matrix -- S, its Cholesky factor, L^-1 -- is {_gib(one)}"
        f"{jac_note}"
        f"{f'; the backend temporaries {_gib(extra_bytes)}' if extra_bytes else ''}"
        f"), more than {MEMORY_FRACTION:.0%} of the {_gib(free)} available on {device}. "
        f"Use smaller batches, loss-observation mode (closure() -> scalar loss: m = 1), or "
        f"{hint}")
