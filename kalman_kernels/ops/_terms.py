"""The scalar and m x m work of a step, written once for every path (docs/design.md, 2).

* :func:`factor_terms`: steps 2 to 5 of a batch observation (or sub-batch): S with the
  adaptive noise, the jitter ladder, the whitened residual, d2, the gate scale and the
  overflow guard. The single, sequential and distributed batch steps all use it.
* :func:`loss_terms`: the same decisions for the loss observation (m = 1, docs/design.md,
  2.2), one code for Python floats (the eager-CPU host path of :mod:`.loss_update`) and for
  0-d device tensors (GPUs, torch.compile, meta tensors, process groups). The two paths
  therefore run the same float64 operations in the same order and agree bit for bit.
* :func:`chunk_bounds`, :func:`slice_block`: the sub-batches of ``max_obs_per_update``,
  which the sequential and the distributed steps cut alike.

The equations are the reference's (:mod:`kalman_kernels.reference`: predict, adaptive noise,
gate, factor, whiten); this module only composes them, so no path re-derives a formula.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch

from .. import reference as ref
from ._common import StepHyper, noise_whitening, representable_step
from .blocks import Block, DenseBlock, KronBlock


def innovation_cov(kernels, block: Block, hp: StepHyper) -> torch.Tensor:
    """H_b diag(P-_b) H_b^T of one block (the backend's pass over its parameters)."""
    if isinstance(block, DenseBlock):
        return kernels.innovation_cov_dense(block.jac_2d(), block.cov, hp.forgetting,
                                            hp.process_noise)
    return kernels.innovation_cov_kron(block.inputs, block.grouped_grad_outputs, block.cov,
                                       hp.forgetting, hp.process_noise)


# ---------------------------------------------------------------------- batch observations
class Terms:
    """The m x m results of one observation (a plain class: torch.compile traces it)."""

    def __init__(self, r, s_mat, jitter, finite, factored, d2, s, solved, whiten_kalman,
                 whiten_info, guard):
        self.r = r
        self.s_mat = s_mat
        self.jitter = jitter
        self.finite = finite
        self.factored = factored
        self.d2 = d2
        self.s = s
        self.solved = solved
        self.whiten_kalman = whiten_kalman
        self.whiten_info = whiten_info
        self.guard = guard

    def kernel_args(self, hp: StepHyper):
        """(coef, F) of a block under ``hp``: coef = lr s S^-1 e, and the whitening of its
        covariance rule, L^-1 for ``"kalman"`` or R^-1/2 for ``"information"``
        (docs/design.md, 2, step 7)."""
        return (hp.lr * self.s) * self.solved, (self.whiten_info if hp.information
                                               else self.whiten_kalman)


def partial_innovation_cov(kernels, blocks, hypers, m: int, device) -> torch.Tensor:
    """sum over ``blocks`` of H_b diag(P-_b) H_b^T (m x m float64; zeros without blocks):
    S less the noise, or a shard's share of it (:mod:`kalman_kernels.fsdp`)."""
    hph = None
    for b, hp in zip(blocks, hypers):
        part = innovation_cov(kernels, b, hp)
        hph = part if hph is None else hph + part
    return hph if hph is not None else torch.zeros((m, m), dtype=torch.float64, device=device)


def factor_terms(kernels, blocks, hypers, e, r, gate, adaptive_rate, world=1, hph=None,
                 guard_on=None) -> Terms:
    """S, its factor, the whitened residual, gate and the overflow guard of one observation
    (or sub-batch) with residual ``e`` (float64) and noise ``r``; ``gate`` is the gate's
    probability (its threshold is taken at this observation's m) or None; ``world`` the
    number of independent steps whose sum the overflow guard bounds (ranks times
    sub-batches). ``hph``: H diag(P-) H^T when summed already (the shards' all-reduced
    partial sums, :mod:`kalman_kernels.fsdp`), else computed from ``blocks``;
    ``guard_on``: (params, covs, hypers) the overflow guard bounds instead of the blocks'
    (every shard of a sharded step guards the same set, so that ranks decide alike).
    Returns a :class:`Terms` of device tensors."""
    m = e.shape[0]
    if hph is None:
        hph = partial_innovation_cov(kernels, blocks, hypers, m, e.device)
    finite = torch.isfinite(hph).all() & torch.isfinite(e).all()
    if adaptive_rate > 0.0:
        adapted = ref.adapt_obs_noise(r, adaptive_rate, e, torch.diagonal(hph).mean())
        r = torch.where(finite, adapted, r)
    s_mat = ref.add_obs_noise(hph, r)
    factor, jitter, factored = ref.cholesky_with_jitter(s_mat)
    z = ref.whiten(factor, e)
    d2 = ref.mahalanobis(z)
    s = ref.gate_scale(d2, ref.gate_threshold(gate, m))
    solved = ref.solve_from_whitened(factor, z)              # S^-1 e (float64)
    whiten_kalman = ref.whitening_matrix(factor)             # L^-1
    g_params, g_covs, g_hypers = (guard_on if guard_on is not None else
                                  ([b.param for b in blocks], [b.cov for b in blocks], hypers))
    whiten_info = (noise_whitening(r, m) if any(hp.information for hp in g_hypers)
                   or any(hp.information for hp in hypers) else None)
    # Overflow guard (docs/robustness.md): scalars representable, step within the dtype's range.
    w_max = {False: whiten_kalman.abs().amax()}
    if whiten_info is not None:
        w_max[True] = whiten_info.abs().amax()
    guard = representable_step(g_params, g_covs, g_hypers, s * torch.sqrt(d2),
                               s * solved.abs().amax(), w_max, world)
    return Terms(r, s_mat, jitter, finite, factored, d2, s, solved, whiten_kalman,
                 whiten_info, guard & finite)


# ---------------------------------------------------------------------- the loss observation
class LossTerms:
    """The scalars of one loss observation: Python floats and bools on the host path, 0-d
    tensors on the device path (:func:`loss_terms`)."""

    __slots__ = ("e", "r", "s_val", "d2", "s", "finite", "guard", "ok")

    def __init__(self, e, r, s_val, d2, s, finite, guard, ok):
        self.e, self.r, self.s_val, self.d2, self.s = e, r, s_val, d2, s
        self.finite, self.guard, self.ok = finite, guard, ok

    def coef(self, hp: StepHyper):
        """lr s e / S: the mean step's scalar (mu += coef P- (.) g)."""
        return (hp.lr * self.s) * self.e / self.s_val

    def weight(self, hp: StepHyper):
        """The covariance rule's weight of g^2: 1/S for ``"kalman"``, 1/r for
        ``"information"`` (docs/design.md, 2, step 7)."""
        return 1.0 / self.r if hp.information else 1.0 / self.s_val


def loss_terms(e, r, quad, adaptive_rate: float, gate: Optional[float], params, covs, hypers,
               world: int = 1) -> LossTerms:
    """Residual ``e``, noise ``r`` and g^T P- g (``quad``) to the step's decisions: the
    adaptive noise (not when the observation is non-finite), S = g^T P- g + r, d2 = e^2 / S,
    the gate scale, the overflow guard (|delta mu_i| <= lr s sqrt(d2) sqrt(P-_i), since
    P-_i g_i^2 <= g^T P- g < S) and ``ok``. Python floats in, floats out (eager CPU, where
    the values are on the host already); 0-d float64 tensors in, tensors out, with no host
    read. A non-finite loss or gradient always reaches ``e`` or ``quad``."""
    host = not isinstance(quad, torch.Tensor)
    if host:
        finite = math.isfinite(e) and math.isfinite(quad)
    else:
        finite = torch.isfinite(e) & torch.isfinite(quad)
    if adaptive_rate > 0.0:
        adapted = ref.adapt_obs_noise(r, adaptive_rate, e, quad)
        r = (adapted if finite else r) if host else torch.where(finite, adapted, r)
    s_val = quad + r                      # S = g^T P- g + r (docs/design.md, 2.2)
    d2 = e * e / s_val
    # the gate's tau at m = 1; without a gate the host path skips the call (s = 1): each
    # Python call costs microseconds in the caches the kernels leave (ops/loss_update.py)
    s = (1.0 if (host and gate is None) else ref.gate_scale(d2, ref.gate_threshold(gate, 1)))
    if host:
        guard = finite and representable_step(params, covs, hypers, s * math.sqrt(d2),
                                              abs(s * e / s_val),
                                              {False: 1.0 / s_val, True: 1.0 / r}, world)
        ok = bool(guard and s_val > 0)
    else:
        guard = finite & representable_step(params, covs, hypers, s * torch.sqrt(d2),
                                             (s * e / s_val).abs(),
                                             {False: 1.0 / s_val, True: 1.0 / r}, world)
        ok = guard & (s_val > 0)
    return LossTerms(e, r, s_val, d2, s, finite, guard, ok)


# ---------------------------------------------------------------------- sub-batches
def _sample_lcm(blocks) -> int:
    lcm = 1
    for b in blocks:
        if isinstance(b, KronBlock):
            k = b.grouped_grad_outputs.shape[1]
            lcm = lcm * k // math.gcd(lcm, k)
    return lcm


def chunk_bounds(blocks, m: int, max_obs: Optional[int]) -> List[Tuple[int, int]]:
    """Row ranges of the sub-batches: at most ``max_obs`` observations each, cut on sample
    boundaries of every Kronecker block (a multiple of each block's K)."""
    if max_obs is None or m <= max_obs:
        return [(0, m)]
    unit = _sample_lcm(blocks)
    if unit > max_obs:
        raise ValueError(f"max_obs_per_update = {max_obs} is smaller than one sample's "
                         f"{unit} observations (the K scores of a Kronecker block's sample "
                         f"must stay in one sub-batch)")
    size = (max_obs // unit) * unit
    return [(lo, min(m, lo + size)) for lo in range(0, m, size)]


def slice_block(b: Block, lo: int, hi: int) -> Block:
    """Rows ``lo:hi`` of a block's observation (whole samples of a Kronecker block)."""
    if isinstance(b, DenseBlock):
        return DenseBlock(b.param, b.cov, b.jac[lo:hi])
    g = b.grouped_grad_outputs
    k = g.shape[1]
    return KronBlock(b.weight, b.cov, b.inputs[lo // k:hi // k], g[lo // k:hi // k])
