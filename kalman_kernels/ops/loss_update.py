"""``loss_update_``: the loss-observation step (docs/design.md, 2.2).

One observation yhat = L with target y (0 by default): H = g^T, S = g^T P- g + r. One
multi-tensor reduction (g^T P- g), then one elementwise pass over every tensor. As in
:mod:`.kalman_update`, nothing reads a device value on the host: the loss, the reduction,
S, the gate and the skip predicate stay tensors (a non-finite loss or gradient always
reaches the loss or g^T P- g, since NaN * P = NaN and Inf * P > 0 = Inf or NaN). On eager
CPU the same decisions are taken on Python floats (:func:`_loss_step_on_host`); both paths
run one code for them, :func:`~._terms.loss_terms`. Under ``process_group`` the terms are
all-reduced by :func:`kalman_kernels.distributed.loss_step_`.
"""
from __future__ import annotations

import math
import threading
from typing import Callable, List, Optional, Sequence

import torch

from .. import distributed
from .._deferred import compiling
from ..backends import resolve
from ._common import (
    F64,
    HOST_FLAGS,
    CovValueCheck,
    HostKalmanInfo,
    KalmanInfo,
    StepHyper,
    check_cov,
    check_gate,
    check_no_overlap,
    hyper_from,
    numpy_view,
)
from ._terms import loss_terms
from .kalman_update import _pending, warn_if_skipped


def runs_by_hyper(hypers: Sequence[StepHyper]):
    """[(hyper, [indices])] grouping tensors that share hyper-parameters (one multi-tensor
    kernel call each)."""
    groups: dict = {}
    for i, hp in enumerate(hypers):
        groups.setdefault(hp, []).append(i)
    return list(groups.items())


def _as_tensor(x, device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().reshape(()).to(device=device, dtype=F64)
    return torch.tensor(float(x), dtype=F64, device=device)


def loss_observation_step_(params: List[torch.Tensor], grads: List[torch.Tensor],
                           covs: List[torch.Tensor], hypers: Sequence[StepHyper], loss,
                           obs_noise, *, target: float = 0.0, gate: Optional[float] = None,
                           backend: str = "auto", adaptive_rate: float = 0.0,
                           quad_form: Optional[torch.Tensor] = None,
                           process_group=None, rank_key: Optional[int] = None,
                           on_decided: Optional[Callable[[KalmanInfo], Callable[[], None]]]
                           = None) -> KalmanInfo:
    """One loss-observation step; tensors with equal hyper-parameters share one
    multi-tensor backend call. ``loss`` and ``obs_noise`` are floats or 0-d tensors.
    ``quad_form`` (g^T P- g, a 0-d tensor) may be supplied when it was accumulated during
    the backward pass. With ``process_group`` every rank observes its own loss and all ranks
    apply u = sum_r g_r c_r, d = sum_r w_r g_r^2 (docs/design.md, 2.5); every rank must then
    pass the same parameters in the same order (zero gradients for those its loss does not reach),
    and ``rank_key`` is the hash of its configuration, compared across ranks at every step.

    The step is skipped (state unchanged) when the loss or g^T P- g is not finite, or when
    it would overflow the parameters' or kernels' dtype (the guard of
    :func:`~._common.representable_step`, with |delta mu_i| <= lr s |e| / S P-_i |g_i|
    <= lr s sqrt(d2) sqrt(P-_i) since P-_i g_i^2 <= g^T P- g < S).

    ``on_decided(info)`` (the optimizer's bookkeeping) is called once the step's outcome is
    known and returns an undo function: on eager CPU before the elementwise pass (host code
    run between the passes is cheaper than after the last one, see
    :func:`_loss_step_on_host`; the undo runs if that pass raises), elsewhere after it.
    """
    check_gate(gate)
    runs = runs_by_hyper(hypers)
    if process_group is None and _on_host(params, loss, obs_noise, target, quad_form):
        with torch.no_grad():
            return _loss_step_on_host(resolve(backend, _CPU), params, grads, covs, hypers,
                                      runs, loss, target, obs_noise, quad_form, gate,
                                      adaptive_rate, on_decided)
    device = params[0].device if params else _CPU
    kernels = resolve(backend, device)
    world = 1 if process_group is None else distributed.world_size(process_group)
    with torch.no_grad():
        r = _as_tensor(obs_noise, device)
        e = _as_tensor(target, device) - _as_tensor(loss, device)
        if quad_form is None:
            for hp, idx in runs:
                part = kernels.loss_quad_form([grads[i] for i in idx], [covs[i] for i in idx],
                                              hp.forgetting, hp.process_noise)
                quad_form = part if quad_form is None else quad_form + part
            if quad_form is None:
                quad_form = torch.zeros((), dtype=F64, device=device)
        t = loss_terms(e, r, _as_tensor(quad_form, device), adaptive_rate, gate, params, covs,
                       hypers, world)
        ok, noise, mismatch, remote, clamps, shrink = t.ok, t.r, None, None, None, None
        if process_group is None:
            for hp, idx in runs:
                kernels.loss_step_([params[i] for i in idx], [grads[i] for i in idx],
                                   [covs[i] for i in idx], t.coef(hp), t.weight(hp), ok,
                                   hp.forgetting, hp.process_noise, hp.cov_floor,
                                   hp.cov_ceiling, hp.information)
        else:
            ok, mismatch, noise, clamps, shrink = distributed.loss_step_(
                kernels, params, grads, covs, hypers, t, process_group, rank_key,
                adaptive_rate > 0.0)
            remote = t.ok & ~ok & ~mismatch
    nan = torch.full((), float("nan"), dtype=F64, device=device)
    info = KalmanInfo(mahalanobis=torch.where(ok, t.d2, nan),
                      gate_scale=torch.where(ok, t.s, torch.zeros_like(t.s)), skipped=~ok,
                      innovation_cov=t.s_val.reshape(1, 1), jitter=torch.zeros_like(t.s),
                      obs_noise=noise, num_obs=1, nonfinite=~t.finite,
                      overflow=t.finite & ~t.guard, mismatch=mismatch, remote=remote,
                      cov_clamps=clamps)
    if process_group is not None:
        info.extras["max_shrink_tensor"] = shrink
    if on_decided is not None:
        on_decided(info)
    return info


_CPU = torch.device("cpu")


def _on_host(params: List[torch.Tensor], *scalars) -> bool:
    """Whether the step's scalars can be worked on as Python numbers: eager CPU, where
    reading a tensor costs no synchronisation (see :mod:`kalman_kernels._deferred`).
    ``is_cpu``, not ``.device``: no device object is made (each kind of small host
    operation costs tens of microseconds in the caches the kernels leave)."""
    if compiling() or (params and not params[0].is_cpu):
        return False
    for x in scalars:
        if isinstance(x, torch.Tensor) and not x.is_cpu:
            return False
    return True


def _loss_step_on_host(kernels, params, grads, covs, hypers, runs, loss, target, obs_noise,
                       quad_form, gate, adaptive_rate, on_decided=None) -> KalmanInfo:
    """:func:`loss_observation_step_` with its scalar algebra in Python floats, for eager CPU
    tensors: the same code as the device path (:func:`~._terms.loss_terms`: S, d2, the
    gate, adaptive noise, the overflow guard, the same float64 operations in the same
    order), on floats instead of its ~40 small tensor ops. Those cost far more than their
    warm-cache microseconds here: they run right after backward and the quadratic form have
    streamed the parameters through every cache, and each cold dispatcher call is tens of
    microseconds (about 1 ms per step at 10M parameters; ``benchmarks/public_api.py``). For
    the same reason everything the host does for this step (the info, ``on_decided``)
    happens before the elementwise pass, so that nothing but the return follows it. The
    report is a :class:`HostKalmanInfo` (tensors made only when read) and the kernels'
    scalars travel in reused 0-d tensors written through numpy (:class:`_HostScalarSlots`):
    the step creates no tensor. ``tests/test_loss_update.py`` compares both paths bit for
    bit."""
    if quad_form is None:
        quad = 0.0
        for hp, idx in runs:      # float64 sums in the device path's order
            quad = quad + float(kernels.loss_quad_form([grads[i] for i in idx],
                                                       [covs[i] for i in idx],
                                                       hp.forgetting, hp.process_noise))
    else:
        quad = float(quad_form)
    t = loss_terms(float(target) - _float(loss), _float(obs_noise), quad, adaptive_rate, gate,
                   params, covs, hypers)
    ok, s = t.ok, t.s
    info = HostKalmanInfo(mahalanobis=t.d2 if ok else math.nan, gate_scale=s if ok else 0.0,
                          skipped=not ok, innovation_cov=t.s_val, obs_noise=t.r,
                          nonfinite=not t.finite, overflow=t.finite and not t.guard)
    info.extras["host_flags"] = (not ok, ok and s < 1.0)     # (skipped, gated), read for free
    undo = on_decided(info) if on_decided is not None else None
    try:
        # a skipped step still goes through the kernels (their argument checks), with zeros
        values = ([v for hp, _ in runs for v in (t.coef(hp), t.weight(hp))] if ok
                  else [0.0] * (2 * len(runs)))
        scalars = _host_scalars(values)
        for i, (hp, idx) in enumerate(runs):
            kernels.loss_step_([params[j] for j in idx], [grads[j] for j in idx],
                               [covs[j] for j in idx], scalars[2 * i], scalars[2 * i + 1],
                               HOST_FLAGS[ok], hp.forgetting, hp.process_noise, hp.cov_floor,
                               hp.cov_ceiling, hp.information)
    except BaseException:
        if undo is not None:
            undo()
        raise
    return info


class _HostScalarSlots(threading.local):
    """0-d float64 tensors that carry the host path's step scalars into the kernels, written
    through their numpy views (no dispatcher call) right before each call and read by the
    kernel during it; one set per thread. Never handed out: the step's report is a
    :class:`HostKalmanInfo`."""

    def __init__(self) -> None:
        self.tensors: List[torch.Tensor] = []
        self.views: list = []

    def __call__(self, values: List[float]) -> List[torch.Tensor]:
        while len(self.tensors) < len(values):
            t = torch.zeros((), dtype=F64)
            self.tensors.append(t)
            self.views.append(numpy_view(t))
        for t, view, v in zip(self.tensors, self.views, values):
            if view is not None:
                view[...] = v
            else:
                t.fill_(v)
        return self.tensors


_host_scalars = _HostScalarSlots()


def _float(x) -> float:
    if isinstance(x, torch.Tensor) and x.requires_grad:
        x = x.detach()               # float() of a tensor that requires grad warns
    return float(x)


_cov_checks = CovValueCheck()


def loss_update_(params: List[torch.Tensor], grads: List[torch.Tensor], covs: List[torch.Tensor],
                 loss, obs_noise: float, *, target: float = 0.0, lr: float = 1.0,
                 forgetting: float = 1.0, process_noise: float = 0.0, cov_floor: float = 0.0,
                 cov_ceiling: float = float("inf"), gate: Optional[float] = None,
                 cov_update: str = "kalman", backend: str = "auto") -> KalmanInfo:
    """Functional loss-observation step (docs/design.md, 2.2): one observation yhat = L, target y.

    S = g^T P- g + r; mu += lr * s * P- g (y - L) / S; P = clamp(P- - P-^2 g^2 / S).
    ``loss`` is a float or a 0-d tensor (read on the device, never on the host). A
    non-finite loss or gradient, or a step that would overflow the parameters' dtype, skips
    the step (state unchanged bit for bit, a warning). Covariances must hold finite values
    >= 0 (checked when a tensor is first seen or was modified elsewhere since the last step).
    """
    hp = hyper_from(lr, forgetting, process_noise, cov_floor, cov_ceiling, cov_update)
    if not (isinstance(obs_noise, (int, float)) and not isinstance(obs_noise, bool)
            and obs_noise > 0 and math.isfinite(obs_noise)):
        raise ValueError(f"obs_noise must be a finite float > 0 in loss mode, got {obs_noise!r}")
    if not isinstance(params, (list, tuple)) or not isinstance(grads, (list, tuple)) or \
            not isinstance(covs, (list, tuple)):
        raise TypeError("params, grads and covs must be lists of tensors")
    if not (len(params) == len(grads) == len(covs)) or not params:
        raise ValueError("params, grads and covs must be non-empty lists of equal length")
    device = params[0].device
    for i, (p, g, c) in enumerate(zip(params, grads, covs)):
        if not isinstance(p, torch.Tensor) or not p.is_floating_point():
            raise TypeError(f"params[{i}] must be a floating-point tensor, got "
                            f"{getattr(p, 'dtype', type(p).__name__)}")
        if not isinstance(g, torch.Tensor) or g.shape != p.shape:
            raise ValueError(f"grads[{i}] has shape {tuple(getattr(g, 'shape', ()))}, params[{i}] "
                             f"{tuple(p.shape)}")
        if not g.is_floating_point():
            raise TypeError(f"grads[{i}] must be a floating-point tensor, got {g.dtype}")
        check_cov(f"covs[{i}]", p, c)
        if p.device != device or g.device != device or c.device != device:
            raise ValueError(f"params[{i}], grads[{i}] and covs[{i}] must be on the device of "
                             f"params[0] ({device})")
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise ValueError(f"loss must be a scalar (one observation), got a tensor of shape "
                             f"{tuple(loss.shape)}")
        if not loss.is_floating_point():
            raise TypeError(f"loss must be a floating-point scalar, got {loss.dtype}")
        if loss.device != device:
            raise ValueError(f"loss is on {loss.device} but params[0] is on {device}")
    elif not isinstance(loss, (int, float)) or isinstance(loss, bool):
        raise TypeError(f"loss must be a float or a 0-d tensor, got {type(loss).__name__}")
    check_no_overlap([(f"params[{i}]", p) for i, p in enumerate(params)]
                     + [(f"covs[{i}]", c) for i, c in enumerate(covs)])
    _cov_checks([(f"covs[{i}]", c) for i, c in enumerate(covs)])
    info = loss_observation_step_(list(params), list(grads), list(covs), [hp] * len(params),
                                  loss, float(obs_noise), target=target, gate=gate,
                                  backend=backend)
    if not compiling():
        _cov_checks.record(covs)
        warn_if_skipped(info, _pending, lambda i: f"loss_update_: step skipped ({i.reason}); "
                                                  f"state unchanged")
    return info
