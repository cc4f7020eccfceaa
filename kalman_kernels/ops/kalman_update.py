"""``kalman_update_``: one Kalman step over parameter blocks that share one observation.

The filter of docs/design.md, section 2, end to end: every block contributes to one
innovation covariance S (m x m, float64); S is factored once; every block is updated with
the same factor. The passes over the parameters go to a backend; the m x m work stays in
PyTorch, in float64, on the parameters' device (:func:`~._terms.factor_terms`, shared with
the sequential sub-batches and with scale-out, :mod:`kalman_kernels.distributed`).

The step never reads a device value on the host (docs/design.md, 4.2): non-finite inputs are
detected from S and the residual (NaN/Inf in H, A or D always reaches S), the jitter ladder, gate,
adaptive noise, the overflow guard and the skip decision are device tensors, and a skipped
step reaches the kernels as ``ok = False``, which leaves every tensor bit-for-bit
unchanged. So the step runs on a GPU without a synchronisation, under
``torch.compile(fullgraph=True)`` and on ``meta`` tensors.

Robustness (``docs/robustness.md``):

* overflow guard: ``ok`` also requires that the step's scalars are representable in the
  kernels' dtype and that the step on every parameter stays within half its dtype's range
  (:func:`~._common.representable_step`);
* memory guard: before any m x m matrix is allocated, the work space is estimated and a
  ``MemoryError`` says how large it would be and what to do
  (:func:`~._common.check_workspace`); ``max_obs_per_update`` splits the observation into
  sequential sub-batches instead;
* under ``process_group`` (:func:`kalman_kernels.distributed.batch_step_`) one small
  all-reduce carries the skip flags, a hash of the ranks' configuration (a mismatch skips
  the step on every rank) and the adaptive noise, and the Kalman rule's clamps of P below
  zero are counted (``info.cov_clamps``).
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Dict, Optional, Sequence, Tuple

import torch

from .. import distributed
from .._deferred import PendingFlags, compiling
from ..backends import resolve
from ._common import (
    F64,
    CovValueCheck,
    KalmanInfo,
    StepHyper,
    check_gate,
    check_workspace,
    hyper_from,
    obs_noise_matrix,
    reference_kron_bytes,
)
from ._terms import chunk_bounds, factor_terms, slice_block
from .blocks import Block, DenseBlock, KronBlock, validate_blocks


def _predicted_change(b: Block, delta: torch.Tensor) -> torch.Tensor:
    """H_b delta (the change of the linearised predictions), float64, (rows,)."""
    if isinstance(b, DenseBlock):
        return b.jac_2d().to(F64) @ delta.reshape(-1)
    out = b.inputs.to(F64) @ delta.reshape(b.weight.shape).T            # (B, d_out)
    return torch.einsum("jko,jo->jk", b.grouped_grad_outputs.to(F64), out).reshape(-1)


def _inputs_finite(blocks, e) -> torch.Tensor:
    ok = torch.isfinite(e).all()
    for b in blocks:
        for name, t in b.tensors().items():
            if name in ("jac", "inputs", "grad_outputs"):
                ok = ok & torch.isfinite(t).all()
    return ok


# ---------------------------------------------------------------------- the engine
_cov_checks = CovValueCheck()


def kalman_step_(blocks: Sequence[Block], hypers: Sequence[StepHyper], residual: torch.Tensor,
                 obs_noise, *, gate: Optional[float] = None, backend: str = "auto",
                 adaptive_rate: float = 0.0, process_group=None,
                 max_obs_per_update: Optional[int] = None,
                 untouched: Sequence[Tuple[torch.Tensor, torch.Tensor, StepHyper]] = (),
                 param_order: Optional[Dict[int, int]] = None,
                 rank_key: Optional[int] = None) -> KalmanInfo:
    """The engine behind :func:`kalman_update_` and the optimizer's batch mode.

    ``hypers[i]`` holds block i's lr / forgetting / process noise / floor / ceiling / rule.
    ``obs_noise`` is a float, a 0-d / (m,) / (m, m) tensor. With ``adaptive_rate`` > 0 a
    scalar noise is first moved towards the innovation-based estimate of docs/design.md, 2.3 (not
    when the observation is non-finite), and the updated value is used for this step and
    returned in ``info.obs_noise_tensor``. Raises only for bad input (before any write).

    ``max_obs_per_update``: process the m observations as sequential sub-batches of at
    most that many (cut on sample boundaries): sub-batch k sees the mean and covariance
    left by sub-batch k - 1 and its residual is corrected by the linearised change of the
    predictions, e_k - H_k (mu - mu_0); the predict step (forgetting, process noise) runs
    once, with the first (if that one is skipped, so is the predict). With a full covariance
    this equals one batch update exactly; with the diagonal one it differs slightly
    (docs/robustness.md). A non-finite value
    anywhere skips the whole step (checked before the first sub-batch); a sub-batch whose
    factorisation fails or that would overflow is skipped alone. Under ``process_group``
    the sub-batches are instead independent blocks, like the ranks (docs/design.md, 2.5).

    Distributed only: ``untouched`` are (param, cov, hyper) that the observation does not
    reach (they get zero terms, so every rank all-reduces the same layout), ``param_order``
    maps id(param) to its position (the all-reduce layout is sorted by it), ``rank_key`` is
    the hash of this rank's configuration compared across ranks at every step.
    """
    device = validate_blocks(blocks, residual)
    blocks = list(blocks)
    hypers = list(hypers)
    if len(hypers) != len(blocks):
        raise ValueError(f"hypers has {len(hypers)} entries for {len(blocks)} blocks")
    check_gate(gate)
    m = residual.shape[0]
    r = obs_noise_matrix(obs_noise, m, device)
    if adaptive_rate > 0.0 and r.dim() != 0:
        raise ValueError("adaptive_obs_noise needs a scalar obs_noise; it cannot adapt an "
                         "(m,) or (m, m) noise tensor")
    if max_obs_per_update is not None and not (isinstance(max_obs_per_update, int)
                                               and max_obs_per_update >= 1):
        raise ValueError(f"max_obs_per_update must be None or an int >= 1, got "
                         f"{max_obs_per_update!r}")
    bounds = chunk_bounds(blocks, m, max_obs_per_update)
    if len(bounds) > 1 and r.dim() == 2:
        raise ValueError("max_obs_per_update cannot split an observation whose (m, m) "
                         "obs_noise couples the observations; pass a scalar or (m,) noise")
    kernels = resolve(backend, device)
    dense_numel = sum(b.param.numel() for b in blocks if isinstance(b, DenseBlock))
    chunk = max(hi - lo for lo, hi in bounds)
    extra = 0
    if getattr(kernels, "NAME", None) == "reference":
        for b in blocks:
            if isinstance(b, KronBlock):
                k = b.grouped_grad_outputs.shape[1]
                extra += reference_kron_bytes(chunk // k, k, b.weight.shape[0])
    check_workspace(chunk, device, dense_numel=dense_numel, where="kalman_update_",
                    chunked=len(bounds) > 1, extra_bytes=extra)

    with torch.no_grad():
        e = residual.detach().to(F64)
        if process_group is not None:
            return distributed.batch_step_(kernels, blocks, hypers, e, r, gate, adaptive_rate,
                                           process_group, bounds, untouched, param_order,
                                           rank_key)
        if len(bounds) == 1:
            t = factor_terms(kernels, blocks, hypers, e, r, gate, adaptive_rate)
            ok = t.finite & t.factored & t.guard
            _apply_fused_(kernels, blocks, hypers, t, ok)
            nan = torch.full((), float("nan"), dtype=F64, device=device)
            return KalmanInfo(mahalanobis=torch.where(ok, t.d2, nan),
                              gate_scale=torch.where(ok, t.s, torch.zeros_like(t.s)),
                              skipped=~ok, innovation_cov=t.s_mat, jitter=t.jitter,
                              obs_noise=t.r if t.r.dim() == 0 else None, num_obs=m,
                              nonfinite=~t.finite, overflow=t.finite & ~t.guard)
        return _sequential_step_(kernels, blocks, hypers, e, r, gate, adaptive_rate, bounds)


def _apply_fused_(kernels, blocks, hypers, t, ok) -> None:
    for b, hp in zip(blocks, hypers):
        coef, whitening = t.kernel_args(hp)
        args = (coef, whitening, ok, hp.forgetting, hp.process_noise, hp.cov_floor,
                hp.cov_ceiling, hp.information)
        if isinstance(b, DenseBlock):
            kernels.fused_update_dense_(b.param, b.cov, b.jac_2d(), *args)
        else:
            kernels.fused_update_kron_(b.weight, b.cov, b.inputs, b.grouped_grad_outputs,
                                       *args)


def _sequential_step_(kernels, blocks, hypers, e, r, gate, adaptive_rate, bounds):
    """Sub-batches applied one after the other (see :func:`kalman_step_`)."""
    device = e.device
    m = e.shape[0]
    finite = _inputs_finite(blocks, e)
    start = [b.param.detach().to(F64, copy=True) for b in blocks]
    no_predict = [dataclasses.replace(hp, forgetting=1.0, process_noise=0.0) for hp in hypers]
    applied = torch.zeros((), dtype=torch.int64, device=device)
    d2_sum = torch.zeros((), dtype=F64, device=device)
    s_min = torch.ones((), dtype=F64, device=device)
    jitter = torch.zeros((), dtype=F64, device=device)
    overflow = torch.zeros((), dtype=torch.bool, device=device)
    for k, (lo, hi) in enumerate(bounds):
        sub = [slice_block(b, lo, hi) for b in blocks]
        e_k = e[lo:hi]
        if k > 0:
            for b, mu0 in zip(sub, start):
                e_k = e_k - _predicted_change(b, b.param.detach().to(F64) - mu0.reshape(
                    b.param.shape))
        r_k = r[lo:hi] if r.dim() == 1 else r
        # each sub-batch's step within max / (2 K): their sum stays within max / 2
        t = factor_terms(kernels, sub, hypers if k == 0 else no_predict, e_k, r_k, gate,
                         adaptive_rate, world=len(bounds))
        ok_k = finite & t.finite & t.factored & t.guard
        _apply_fused_(kernels, sub, hypers if k == 0 else no_predict, t, ok_k)
        applied = applied + ok_k.to(torch.int64)
        d2_sum = d2_sum + torch.where(ok_k, t.d2, torch.zeros_like(t.d2))
        s_min = torch.where(ok_k, torch.minimum(s_min, t.s), s_min)
        jitter = torch.where(ok_k, torch.maximum(jitter, t.jitter), jitter)
        overflow = overflow | (finite & t.finite & ~t.guard)
        if adaptive_rate > 0.0:
            r = torch.where(ok_k, t.r, r)
    ok = applied > 0
    nan = torch.full((), float("nan"), dtype=F64, device=device)
    info = KalmanInfo(mahalanobis=torch.where(ok, d2_sum, nan),
                      gate_scale=torch.where(ok, s_min, torch.zeros_like(s_min)),
                      skipped=~ok, innovation_cov=None, jitter=jitter,
                      obs_noise=r if r.dim() == 0 else None, num_obs=m, nonfinite=~finite,
                      overflow=finite & overflow & ~ok)
    info.extras["sub_batches"] = len(bounds)
    info.extras["sub_batches_applied_tensor"] = applied
    return info


_pending = PendingFlags()   # skip warnings of kalman_update_ on devices that cannot be read now


def warn_if_skipped(info: KalmanInfo, pending: PendingFlags, message, *, stacklevel=4) -> None:
    """Warn (``message(info)``) when ``info`` says the step was skipped, without waiting for
    the device (see :mod:`kalman_kernels._deferred`)."""
    pending.poll()

    def callback(skipped: bool) -> None:
        if skipped:
            warnings.warn(message(info), RuntimeWarning, stacklevel=stacklevel + 2)

    pending.add(info.skipped_tensor, callback)


def kalman_update_(blocks: Sequence[Block], residual: torch.Tensor, obs_noise, *,
                   lr: float = 1.0, forgetting: float = 1.0, process_noise: float = 0.0,
                   cov_floor: float = 0.0, cov_ceiling: float = float("inf"),
                   gate: Optional[float] = None, cov_update: str = "kalman",
                   backend: str = "auto", max_obs_per_update: Optional[int] = None
                   ) -> KalmanInfo:
    """One Kalman step, in place, over ``blocks`` that share the observation ``residual``.

    ``residual`` is e = y - yhat (m,); ``obs_noise`` is R: a float, an (m,) diagonal or an
    (m, m) matrix. ``lr`` scales the mean step (1 = the exact Kalman update); ``gate`` is a
    chi-square probability (e.g. 0.999) above which the step is shrunk (docs/design.md, 2.3).
    A non-finite residual or Jacobian, or a step that would overflow the parameters'
    dtype, skips the step, leaves every tensor unchanged bit for bit and warns (on CPU at
    once; on a GPU once the flag has reached the host, checked at the next call; never
    while torch.compile traces); ``info.skipped`` / ``info.reason`` report it.
    Covariances must hold finite values >= 0 (checked when a tensor is first seen or was
    modified elsewhere since the last step). ``max_obs_per_update`` splits a large
    observation into sequential sub-batches (see :func:`kalman_step_`); without it a batch
    whose m x m work would not fit in memory raises a ``MemoryError`` before allocating.
    """
    hp = hyper_from(lr, forgetting, process_noise, cov_floor, cov_ceiling, cov_update)
    if not isinstance(blocks, (DenseBlock, KronBlock)):   # a lone block is refused below
        blocks = list(blocks)
    count = len(blocks) if isinstance(blocks, list) else 1
    if isinstance(blocks, list):
        validate_blocks(blocks, residual)
        _cov_checks([(f"blocks[{i}].cov", b.cov) for i, b in enumerate(blocks)
                     if isinstance(b, (DenseBlock, KronBlock))])
    info = kalman_step_(blocks, [hp] * count, residual, obs_noise, gate=gate, backend=backend,
                        max_obs_per_update=max_obs_per_update)
    if not compiling():
        _cov_checks.record(b.cov for b in blocks)
        warn_if_skipped(info, _pending, lambda i: f"kalman_update_: step skipped ({i.reason}); "
                                                  f"parameters and covariances are unchanged")
    return info
