"""Scale-out over torch.distributed (docs/design.md, 2.5): every collective of the package and
the agreement of the ranks, in one module.

Each rank observes its own batch against the same prior; the ranks all-reduce the
per-parameter terms u = sum_r H_r^T c_r and d = sum_r diag(H_r^T W_r H_r) and apply the same
update, so replicas never drift. A step under a process group makes two collectives, both
all-reduces of device tensors (no host read, docs/design.md, 4.2):

* :func:`all_ranks_ok`: the skip flags, a hash of each rank's configuration (ranks that
  disagree skip the step everywhere instead of hanging in a mismatched all-reduce) and the
  adaptive noise, in one small SUM;
* :func:`apply_reduced_terms_`: the terms of every parameter in one flat SUM, then the
  update (``apply_terms_``) with the Kalman rule's clamps counted.

The steps: :func:`batch_step_` (called by :func:`kalman_kernels.ops.kalman_step_` with a
process group) and :func:`loss_step_` (by :func:`kalman_kernels.ops.loss_observation_step_`);
the m x m work they share with the local steps is in :mod:`kalman_kernels.ops._terms`.

Before the first step, :class:`RankAgreement` compares the ranks' configurations themselves
(a clear error on every rank) and, in loss mode, whether the gradients were already averaged
by DistributedDataParallel.
"""
from __future__ import annotations

import hashlib
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import reference as ref
from ._deferred import compiling
from .ops._common import F64, KalmanInfo
from .ops._terms import factor_terms, slice_block
from .ops.blocks import DenseBlock

#: Bits of the configuration hash carried by the per-step all-reduce, in pieces of 16 bits
#: (sums of squares of W pieces stay exact in float64 for W <= 1448 ranks).
_KEY_PIECES = 3
_KEY_MAX_WORLD = 1448


def world_size(process_group) -> int:
    import torch.distributed as dist
    return dist.get_world_size(process_group)


def collective_(name: str, tensor: torch.Tensor, op, process_group) -> None:
    """``dist.all_reduce`` of ``tensor`` in place (the one place for the package's
    collectives; ``name`` says which, for a debugger or a patched test)."""
    import torch.distributed as dist
    dist.all_reduce(tensor, op=op, group=process_group)


def exchange_(name: str, output: torch.Tensor, tensor: torch.Tensor, output_splits,
              input_splits, process_group) -> None:
    """``dist.all_to_all_single``: ``tensor``'s pieces of ``input_splits`` elements go to
    ranks 0, 1, ..., and ``output`` receives theirs (``output_splits``). The sharded batch
    step's one exchange of the observation (:mod:`kalman_kernels.fsdp`)."""
    import torch.distributed as dist
    dist.all_to_all_single(output, tensor, list(output_splits), list(input_splits),
                           group=process_group)


def _key_pieces(key: Optional[int]) -> List[float]:
    key = 0 if key is None else int(key)
    return [float((key >> (16 * i)) & 0xFFFF) for i in range(_KEY_PIECES)]


#: Length of :func:`key_slots`.
KEY_SLOTS = 2 * _KEY_PIECES


def key_slots(key: Optional[int], world: int, device) -> torch.Tensor:
    """The configuration hash ``key`` as float64 slots to SUM over ranks (pieces and their
    squares); :func:`key_mismatch` of the sums says whether the ranks' hashes differ."""
    pieces = _key_pieces(key) if world <= _KEY_MAX_WORLD else [0.0] * _KEY_PIECES
    return torch.tensor([v for p in pieces for v in (p, p * p)], dtype=F64, device=device)


def key_mismatch(summed: torch.Tensor, world: int) -> torch.Tensor:
    """0-d bool tensor: the summed :func:`key_slots` of ``world`` ranks come from different
    hashes (W * sum(h^2) == (sum h)^2 exactly when every rank holds the same h)."""
    sums = summed.reshape(_KEY_PIECES, 2)
    return (world * sums[:, 1] != sums[:, 0] * sums[:, 0]).any()


def all_ranks_ok(ok: torch.Tensor, process_group, key: Optional[int] = None,
                 obs_noise: Optional[torch.Tensor] = None):
    """One SUM all-reduce of device values (no host read): returns ``(ok on every rank and
    configuration hashes equal, hashes differ, mean of obs_noise over the ranks or None)``.

    ``key`` is an integer hash of this rank's shapes and hyper-parameters: the pieces and
    their squares are summed, and W * sum(h^2) == (sum h)^2 exactly when every rank holds
    the same h.
    """
    import torch.distributed as dist
    world = world_size(process_group)
    device = ok.device
    bad = (~ok).to(F64).reshape(1)
    key_t = key_slots(key, world, device)
    r = (obs_noise.detach().to(F64).reshape(1) if obs_noise is not None
         else torch.zeros(1, dtype=F64, device=device))
    flat = torch.cat([bad, key_t, r])
    collective_("flags", flat, dist.ReduceOp.SUM, process_group)
    mismatch = key_mismatch(flat[1:1 + KEY_SLOTS], world)
    everyone = (flat[0] == 0) & ~mismatch
    mean_r = flat[-1] / world if obs_noise is not None else None
    return everyone, mismatch, mean_r


def _zero_terms(param: torch.Tensor, dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    z = torch.zeros(param.numel(), dtype=dtype, device=param.device)
    return z, z


def apply_reduced_terms_(kernels, entries, ok, process_group,
                         param_order: Optional[Dict[int, int]] = None):
    """Sum the terms of ``entries`` ((param, cov, hyper, u, d); u = d = None for zero terms)
    over the ranks in one all-reduce and apply them. The layout is sorted by
    ``param_order[id(param)]`` when given, so ranks whose observations reach different
    parameters still all-reduce the same layout. Returns ``(clamps, shrink)``: the number
    of covariance elements the ``"kalman"`` rule pushed below zero (clamped to the floor), a
    0-d int64 tensor, and the largest P- d summed over the ranks (Kalman-rule tensors only;
    None without any), a 0-d tensor."""
    import torch.distributed as dist
    entries = list(entries)
    if param_order is not None:
        entries.sort(key=lambda t: param_order[id(t[0])])
    dtype = F64 if any(p.dtype == F64 for p, *_ in entries) else torch.float32
    flat_terms = []
    for param, _cov, _hp, u, d in entries:
        if u is None:
            u, d = _zero_terms(param, dtype)
        flat_terms += [u.reshape(-1).to(dtype), d.reshape(-1).to(dtype)]
    flat = torch.cat(flat_terms)
    collective_("terms", flat, dist.ReduceOp.SUM, process_group)
    offset = 0
    clamps = torch.zeros((), dtype=torch.int64, device=flat.device)
    shrink = None
    for param, cov, hp, _, _ in entries:
        n = param.numel()
        u, d = flat[offset:offset + n], flat[offset + n:offset + 2 * n]
        offset += 2 * n
        if not hp.information:
            # P- - P-^2 d < 0 <=> P- d > 1: the floor catches it (the caution of
            # docs/design.md, 2.5). P- d summed over the ranks is the fraction of the prior
            # variance the step removes; near 1 the block-diagonal update is a poor
            # approximation.
            p_pred = ref.predict_cov(cov.reshape(-1).to(d.dtype), hp.forgetting,
                                     hp.process_noise)
            fraction = p_pred * d
            clamps = clamps + (fraction > 1).sum()
            if fraction.numel():
                top = fraction.amax()
                shrink = top if shrink is None else torch.maximum(shrink, top)
        kernels.apply_terms_(param, cov, u, d, ok, hp.forgetting, hp.process_noise,
                             hp.cov_floor, hp.cov_ceiling, hp.information)
    return torch.where(ok, clamps, torch.zeros_like(clamps)), shrink


# ---------------------------------------------------------------------- the steps
def batch_step_(kernels, blocks, hypers, e, r, gate, adaptive_rate, process_group, bounds,
                untouched, param_order, rank_key) -> KalmanInfo:
    """The batch step of :func:`kalman_kernels.ops.kalman_step_` under a process group:
    all-reduce u = sum_r H_r^T c_r and d = sum_r diag(H_r^T W_r H_r), then every rank
    applies the same update. Local sub-batches (``bounds``) are independent blocks too.
    ``untouched`` (param, cov, hyper) get zero terms, so that every rank all-reduces the
    same layout (sorted by ``param_order``)."""
    world = world_size(process_group)
    device = e.device
    m = e.shape[0]
    acc_u: List[Optional[torch.Tensor]] = [None] * len(blocks)
    acc_d: List[Optional[torch.Tensor]] = [None] * len(blocks)
    local_ok = torch.ones((), dtype=torch.bool, device=device)
    finite_all = torch.ones((), dtype=torch.bool, device=device)
    guard_all = torch.ones((), dtype=torch.bool, device=device)
    d2_sum = torch.zeros((), dtype=F64, device=device)
    s_min = torch.ones((), dtype=F64, device=device)
    jitter = torch.zeros((), dtype=F64, device=device)
    s_mat = None
    for lo, hi in bounds:
        sub = blocks if len(bounds) == 1 else [slice_block(b, lo, hi) for b in blocks]
        r_k = r[lo:hi] if (r.dim() == 1 and len(bounds) > 1) else r
        t = factor_terms(kernels, sub, hypers, e[lo:hi], r_k, gate, adaptive_rate,
                         world=world * len(bounds))
        if adaptive_rate > 0.0:
            r = t.r
        s_mat = t.s_mat if len(bounds) == 1 else None
        local_ok = local_ok & t.finite & t.factored & t.guard
        finite_all = finite_all & t.finite
        guard_all = guard_all & t.guard
        d2_sum = d2_sum + t.d2
        s_min = torch.minimum(s_min, t.s)
        jitter = torch.maximum(jitter, t.jitter)
        for i, (b, hp) in enumerate(zip(sub, hypers)):
            c, whitening = t.kernel_args(hp)
            if isinstance(b, DenseBlock):
                u, d = kernels.step_terms_dense(b.jac_2d(), c, whitening)
            else:
                u, d = kernels.step_terms_kron(b.inputs, b.grouped_grad_outputs, c, whitening)
            acc_u[i] = u if acc_u[i] is None else acc_u[i] + u
            acc_d[i] = d if acc_d[i] is None else acc_d[i] + d
    adaptive = adaptive_rate > 0.0 and r.dim() == 0
    ok, mismatch, mean_r = all_ranks_ok(local_ok, process_group, rank_key,
                                        r if adaptive else None)
    entries = [(b.param, b.cov, hp, u, d) for b, hp, u, d in zip(blocks, hypers, acc_u, acc_d)]
    entries += [(p, c, hp, None, None) for p, c, hp in untouched]
    clamps, shrink = apply_reduced_terms_(kernels, entries, ok, process_group, param_order)
    nan = torch.full((), float("nan"), dtype=F64, device=device)
    info = KalmanInfo(mahalanobis=torch.where(ok, d2_sum, nan),
                      gate_scale=torch.where(ok, s_min, torch.zeros_like(s_min)),
                      skipped=~ok, innovation_cov=s_mat, jitter=jitter,
                      obs_noise=(mean_r if adaptive else (r if r.dim() == 0 else None)),
                      num_obs=m, nonfinite=~finite_all, overflow=finite_all & ~guard_all,
                      mismatch=mismatch, remote=local_ok & ~ok & ~mismatch, cov_clamps=clamps)
    if len(bounds) > 1:
        info.extras["sub_batches"] = len(bounds)
    info.extras["max_shrink_tensor"] = shrink
    return info


def loss_step_(kernels, params, grads, covs, hypers, t, process_group, rank_key,
               adaptive: bool):
    """The loss step of :func:`kalman_kernels.ops.loss_observation_step_` under a process
    group, from this rank's decisions ``t`` (:class:`~kalman_kernels.ops._terms.LossTerms`
    of device tensors): u = sum_r g_r c_r, d = sum_r w_r g_r^2. Every rank passes the same
    parameters in the same order (zero gradients where its loss is flat). Returns
    ``(ok, mismatch, noise, clamps, shrink)``: the all-ranks skip predicate, the
    configuration mismatch flag, the noise to report (the ranks' mean when ``adaptive``),
    and what :func:`apply_reduced_terms_` returns."""
    ok, mismatch, mean_r = all_ranks_ok(t.ok, process_group, rank_key,
                                        t.r if adaptive else None)
    entries = []
    for p, g, c, hp in zip(params, grads, covs, hypers):
        u, d = kernels.step_terms_dense(g.reshape(1, -1), t.coef(hp).reshape(1),
                                        t.weight(hp).sqrt().reshape(1, 1))
        entries.append((p, c, hp, u, d))
    clamps, shrink = apply_reduced_terms_(kernels, entries, ok, process_group)
    return ok, mismatch, (mean_r if adaptive else t.r), clamps, shrink


# ---------------------------------------------------------------------- rank agreement
def rank_config(mode: str, settings: Sequence[tuple], param_groups, group_keys) -> tuple:
    """What every rank must agree on: the step's mode, the optimizer's ``settings`` (pairs
    of name and value), each param group's hyper-parameters (``group_keys``) and each
    parameter's shape, dtype and requires_grad."""
    items = [("mode", mode)] + list(settings)
    for gi, group in enumerate(param_groups):
        items.append((f"group {gi}", tuple((k, group[k]) for k in group_keys)))
        for p in group["params"]:
            items.append((f"group {gi} parameter", tuple(p.shape), str(p.dtype),
                          bool(p.requires_grad)))
    return tuple(items)


class RankAgreement:
    """An optimizer's agreement with the other ranks of ``process_group``: the 48-bit hash
    of its configuration that every step's all-reduce compares (:func:`all_ranks_ok`), and
    the checks made once, at the first step."""

    def __init__(self, process_group):
        self.process_group = process_group
        self._cache = None            # (config, key)
        self._checked = False
        self._ddp_checked = False

    def key(self, config: tuple, device: torch.device) -> Optional[int]:
        """The hash of ``config`` (:func:`rank_config`); on the first step the
        configurations themselves are compared across ranks (a clear error on every rank
        instead of a hang in a mismatched all-reduce). None while torch.compile traces."""
        if compiling():
            return None
        if self._cache is not None and self._cache[0] == config:
            key = self._cache[1]
        else:
            digest = hashlib.sha256(repr(config).encode()).digest()
            key = int.from_bytes(digest[:6], "little")
            self._cache = (config, key)
        if not self._checked and device.type != "meta":
            self._check_agree(config)
            self._checked = True
        return key

    def _check_agree(self, config: tuple) -> None:
        import torch.distributed as dist
        group = self.process_group
        gathered = [None] * world_size(group)
        dist.all_gather_object(gathered, config, group=group)
        first = gathered[0]
        for rank, other in enumerate(gathered[1:], start=1):
            if other == first:
                continue
            diff = next((f"{a} on rank 0, {b} on rank {rank}" for a, b in zip(first, other)
                         if a != b),
                        f"{len(first)} entries on rank 0, {len(other)} on rank {rank}")
            raise ValueError(f"KalmanNGD(process_group=...): the ranks disagree on parameter "
                             f"shapes or hyper-parameters ({diff}); every rank must build the "
                             f"same model and optimizer, and return the same kind of closure "
                             f"result (raised on every rank at the first step)")

    def check_ddp_grads_once(self, loss: torch.Tensor, grads) -> None:
        """Loss mode, first step: gradients that are bitwise equal on every rank while the
        losses differ were already averaged across ranks (a DistributedDataParallel
        backward); the cross-rank all-reduce would then count them W times. One small
        all-reduce, once."""
        if self._ddp_checked or compiling() or loss.device.type == "meta":
            return
        self._ddp_checked = True
        import torch.distributed as dist
        with torch.no_grad():
            checksum = sum((g.detach().to(F64) * (1.0 + 1e-3 * i)).sum()
                           for i, g in enumerate(grads))
            value = loss.detach().to(F64).reshape(())
            values = torch.stack([checksum, -checksum, value, -value]).reshape(-1)
            collective_("ddp-check", values, dist.ReduceOp.MAX, self.process_group)
            grads_equal = bool(values[0] == -values[1])
            losses_differ = bool(values[2] != -values[3])
        if grads_equal and losses_differ:
            raise ValueError(
                "KalmanNGD(process_group=...) in loss mode: the gradients are identical on every "
                "rank while the losses differ, so they were already averaged across ranks (a "
                "DistributedDataParallel backward). With process_group every rank must observe "
                "its own gradient: run the closure's backward under ddp_model.no_sync(), or "
                "call the wrapped module (ddp_model.module). Or keep DDP's gradient averaging, "
                "drop process_group, and average the loss across ranks in the closure "
                "(docs/robustness.md, 'DistributedDataParallel').")
