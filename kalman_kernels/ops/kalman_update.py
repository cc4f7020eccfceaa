"""``kalman_update_``: one Kalman step over parameter blocks that share one observation.

DESIGN section 2 end to end: every block contributes to one innovation covariance S (m x m,
float64); S is factored once; every block is updated with the same factor. The passes over
the parameters go to a backend; the m x m work stays here, in float64, on the parameters'
device.

The step never reads a device value on the host (DESIGN 4): non-finite inputs are detected
from S and the residual (NaN/Inf in H, A or D always reaches S), the jitter ladder, gate,
adaptive noise and the skip decision are device tensors, and a skipped step reaches the
kernels as ``ok = False``, which leaves every tensor bit-for-bit unchanged. So the step
runs on a GPU without a synchronisation, under ``torch.compile(fullgraph=True)`` and on
``meta`` tensors.
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch

from .. import reference as ref
from .._deferred import PendingFlags, compiling
from ..backends import resolve
from ._common import F64, KalmanInfo, StepHyper, check_gate, hyper_from, noise_whitening, \
    obs_noise_matrix
from .blocks import Block, DenseBlock, KronBlock, validate_blocks


def _innovation_cov(kernels, block: Block, hp: StepHyper) -> torch.Tensor:
    if isinstance(block, DenseBlock):
        return kernels.innovation_cov_dense(block.jac_2d(), block.cov, hp.forgetting,
                                            hp.process_noise)
    return kernels.innovation_cov_kron(block.inputs, block.grouped_grad_outputs, block.cov,
                                       hp.forgetting, hp.process_noise)


def _all_ranks_ok(ok: torch.Tensor, process_group) -> torch.Tensor:
    """ok on every rank (an all-reduce of device flags: no host read)."""
    import torch.distributed as dist
    bad = (~ok).to(torch.float32).reshape(1)
    dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=process_group)
    return bad.reshape(()) == 0


def kalman_step_(blocks: Sequence[Block], hypers: Sequence[StepHyper], residual: torch.Tensor,
                 obs_noise, *, gate: Optional[float] = None, backend: str = "auto",
                 adaptive_rate: float = 0.0, process_group=None) -> KalmanInfo:
    """The engine behind :func:`kalman_update_` and the optimizer's batch mode.

    ``hypers[i]`` holds block i's lr / forgetting / process noise / floor / ceiling / rule.
    ``obs_noise`` is a float, a 0-d / (m,) / (m, m) tensor. With ``adaptive_rate`` > 0 a
    scalar noise is first moved towards the innovation-based estimate of DESIGN 2.3 (not
    when the observation is non-finite), and the updated value is used for this step and
    returned in ``info.obs_noise_tensor``. Raises only for bad input (before any write).
    """
    device = validate_blocks(blocks, residual)
    blocks = list(blocks)
    check_gate(gate)
    m = residual.shape[0]
    r = obs_noise_matrix(obs_noise, m, device)
    if adaptive_rate > 0.0 and r.dim() != 0:
        raise ValueError("adaptive_obs_noise needs a scalar obs_noise; it cannot adapt an "
                         "(m,) or (m, m) noise tensor")
    kernels = resolve(backend, device)

    with torch.no_grad():
        e = residual.detach().to(F64)
        hph = None
        for b, hp in zip(blocks, hypers):
            part = _innovation_cov(kernels, b, hp)
            hph = part if hph is None else hph + part
        finite = torch.isfinite(hph).all() & torch.isfinite(e).all()
        if adaptive_rate > 0.0:
            adapted = ref.adapt_obs_noise(r, adaptive_rate, e, torch.diagonal(hph).mean())
            r = torch.where(finite, adapted, r)
        s_mat = ref.add_obs_noise(hph, r)
        factor, jitter, factored = ref.cholesky_with_jitter(s_mat)
        ok = finite & factored
        local_ok = ok
        if process_group is not None:
            ok = _all_ranks_ok(ok, process_group)

        z = ref.whiten(factor, e)
        d2 = ref.mahalanobis(z)
        tau = ref.chi2_quantile(float(gate), m) if gate is not None else None
        s = ref.gate_scale(d2, tau)
        solved = ref.solve_from_whitened(factor, z)              # S^-1 e (float64)
        whiten_kalman = ref.whitening_matrix(factor)             # L^-1
        whiten_info = noise_whitening(r, m) if any(hp.information for hp in hypers) else None

        if process_group is None:
            for b, hp in zip(blocks, hypers):
                coef = (hp.lr * s) * solved
                whitening = whiten_info if hp.information else whiten_kalman
                args = (coef, whitening, ok, hp.forgetting, hp.process_noise, hp.cov_floor,
                        hp.cov_ceiling, hp.information)
                if isinstance(b, DenseBlock):
                    kernels.fused_update_dense_(b.param, b.cov, b.jac_2d(), *args)
                else:
                    kernels.fused_update_kron_(b.weight, b.cov, b.inputs,
                                               b.grouped_grad_outputs, *args)
        else:
            _distributed_update_(kernels, blocks, hypers, s * solved, whiten_kalman, whiten_info,
                                 ok, process_group)

    nan = torch.full((), float("nan"), dtype=F64, device=device)
    return KalmanInfo(mahalanobis=torch.where(ok, d2, nan),
                      gate_scale=torch.where(ok, s, torch.zeros_like(s)),
                      skipped=~ok, innovation_cov=s_mat, jitter=jitter,
                      obs_noise=r if r.dim() == 0 else None, num_obs=m,
                      nonfinite=~finite,
                      remote=None if process_group is None else (local_ok & ~ok))


def _distributed_update_(kernels, blocks, hypers, coef, whiten_kalman, whiten_info, ok,
                         process_group):
    """DESIGN 2.5: all-reduce u = sum_r H_r^T c_r and d = sum_r diag(H_r^T W_r H_r), then
    every rank applies the same update (the backend's step_terms_* and apply_terms_)."""
    import torch.distributed as dist
    terms = []
    for b, hp in zip(blocks, hypers):
        whitening = whiten_info if hp.information else whiten_kalman
        c = hp.lr * coef
        if isinstance(b, DenseBlock):
            u, d = kernels.step_terms_dense(b.jac_2d(), c, whitening)
        else:
            u, d = kernels.step_terms_kron(b.inputs, b.grouped_grad_outputs, c, whitening)
        terms += [u.reshape(-1), d.reshape(-1)]
    apply_reduced_terms_(kernels, [(b.param, b.cov) for b in blocks], hypers, terms, ok,
                         process_group)


def apply_reduced_terms_(kernels, pairs, hypers, terms, ok, process_group) -> None:
    """Sum ``terms`` ([u_0, d_0, u_1, d_1, ...]) over the ranks in one all-reduce and apply
    them to ``pairs`` of (param, cov)."""
    import torch.distributed as dist
    dtype = F64 if any(t.dtype == F64 for t in terms) else torch.float32
    flat = torch.cat([t.to(dtype) for t in terms])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=process_group)
    offset = 0
    for (param, cov), hp in zip(pairs, hypers):
        n = param.numel()
        u, d = flat[offset:offset + n], flat[offset + n:offset + 2 * n]
        offset += 2 * n
        kernels.apply_terms_(param, cov, u, d, ok, hp.forgetting, hp.process_noise,
                             hp.cov_floor, hp.cov_ceiling, hp.information)


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
                   backend: str = "auto") -> KalmanInfo:
    """One Kalman step, in place, over ``blocks`` that share the observation ``residual``.

    ``residual`` is e = y - yhat (m,); ``obs_noise`` is R: a float, an (m,) diagonal or an
    (m, m) matrix. ``lr`` scales the mean step (1 = the exact Kalman update); ``gate`` is a
    chi-square probability (e.g. 0.999) above which the step is shrunk (DESIGN 2.3).
    A non-finite residual or Jacobian skips the step, leaves every tensor unchanged bit for
    bit and warns (on CPU at once; on a GPU once the flag has reached the host, checked at
    the next call; never while torch.compile traces); ``info.skipped`` reports it.
    """
    hp = hyper_from(lr, forgetting, process_noise, cov_floor, cov_ceiling, cov_update)
    if not isinstance(blocks, (DenseBlock, KronBlock)):   # a lone block is refused below
        blocks = list(blocks)
    count = len(blocks) if isinstance(blocks, list) else 1
    info = kalman_step_(blocks, [hp] * count, residual, obs_noise, gate=gate, backend=backend)
    if not compiling():
        warn_if_skipped(info, _pending, lambda i: f"kalman_update_: step skipped ({i.reason}); "
                                                  f"parameters and covariances are unchanged")
    return info
