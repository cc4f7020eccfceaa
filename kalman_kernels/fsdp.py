"""KalmanNGD over FSDP2 (``torch.distributed.fsdp.fully_shard``): sharded parameters and
covariances, one reduction of the m x m (or 1 x 1) innovation terms per step
(docs/fsdp.md).

Under ``fully_shard`` every parameter is a DTensor sharded on dim 0 over a 1-D device mesh;
rank k holds rows [o_k, o_k + n_k) (``torch.chunk``'s split: uneven, possibly empty). The
filter's covariance is diagonal, so it is sharded exactly like its parameter (a DTensor with
the parameter's placement, which distributed checkpoints save and reshard like any
optimizer state), and every cross-shard quantity of a step is a sum over the shards:

* **loss mode**: the observation is the loss averaged over the ranks, L = mean_r L_r,
  whose gradient is what FSDP's reduce-scatter leaves in each ``p.grad`` shard (it averages
  the ranks' gradients). g^T P- g = sum_k g_k^T P-_k g_k: each rank reduces its shard, and
  one all-reduce carries that partial sum, L_r, the configuration hash and (only for
  parameters whose dtype needs it) the overflow guard's covariance bound. Every rank then
  takes the same decisions (S, the gate, adaptive noise, the non-finite and overflow
  skips) from the same reduced numbers and updates its own shard.
* **batch mode**: the observation is every rank's samples together (m = sum_r m_r rows,
  rank-major), as if one process had run the closure on the global batch. Each rank forms
  the Jacobian of its own m_r predictions with respect to the unsharded parameters (or the
  sample-grouped Kronecker factors A, D of a tracked ``nn.Linear``), and one all-to-all
  sends every shard owner the columns of its shard (the rows of D of its output rows; A
  whole). Rank k then holds the global observation restricted to its shard, forms its
  partial S_k = H_k diag(P-_k) H_k^T, and one all-reduce sums S and gathers the residuals;
  the factorisation, gate, adaptive noise and skip run identically on every rank, and each
  rank applies the exact Kalman update to its shard. A small all-reduce of the batch sizes
  and the tracked layers' usability comes first (three collectives per step).

The result equals the single-process step on the full model with the same global
observation, to float64 rounding (``tests/test_fsdp.py``). What does not compose is refused
at construction or at the step, naming it (:func:`check_supported`).
"""
from __future__ import annotations

import math
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import distributed
from .backends import resolve
from .observations import (
    LinearCapture,
    batched_jacobian,
    check_prediction,
    per_sample_output_grads,
)
from .ops import DenseBlock, KalmanInfo, KronBlock
from .ops._common import F64, _max_of, obs_noise_matrix
from .ops._terms import factor_terms, loss_terms, partial_innovation_cov
from .ops.kalman_update import _apply_fused_
from .ops.loss_update import runs_by_hyper


def is_sharded(param: torch.Tensor) -> bool:
    """Whether ``param`` is a DTensor (FSDP2 or another DTensor parallelism). Without
    ``torch.distributed.tensor`` imported there is no DTensor, and importing it costs
    seconds: a plain optimizer does not pay for it."""
    module = sys.modules.get("torch.distributed.tensor")
    dtensor = getattr(module, "DTensor", None)
    return dtensor is not None and isinstance(param, dtensor)


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (the tensor itself, so in-place writes land in it)."""
    return t._local_tensor if is_sharded(t) else t


def _fsdp_params() -> Dict[int, tuple]:
    """id(sharded parameter) -> (FSDPParam, FSDPParamGroup) of every live fully_shard state."""
    from torch.distributed._composable_state import _module_state_mapping
    from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState
    found: Dict[int, tuple] = {}
    for ref in list(_module_state_mapping.values()):
        state = ref()
        if not isinstance(state, FSDPState):
            continue
        groups = getattr(state, "_fsdp_param_groups", None)
        if groups is None:
            group = getattr(state, "_fsdp_param_group", None)
            groups = [] if group is None else [group]
        for group in groups:
            for fp in group.fsdp_params:
                found[id(fp.sharded_param)] = (fp, group)
    return found


def _rows(n: int, world: int, k: int) -> Tuple[int, int]:
    """(offset, rows) of rank k's dim-0 shard of n rows (torch.chunk's split, as FSDP2's)."""
    chunk = -(-n // world) if n else 0
    lo = min(k * chunk, n)
    return lo, max(0, min(lo + chunk, n) - lo)


class _Sharded:
    """One sharded parameter: its FSDP bookkeeping and the rows every rank holds."""

    def __init__(self, param, fsdp_param, group, world: int, rank: int):
        self.param = param
        self.fsdp_param = fsdp_param
        self.group = group
        self.shape = tuple(param.shape)
        self.rest = math.prod(self.shape[1:]) if len(self.shape) > 1 else 1
        self.rows = [_rows(self.shape[0], world, k) for k in range(world)]
        local = _local(param)
        if tuple(local.shape[1:]) != self.shape[1:] or local.shape[0] != self.rows[rank][1]:
            raise ValueError(f"KalmanNGD under FSDP2: a parameter of shape {self.shape} has a "
                             f"local shard of shape {tuple(local.shape)} on rank {rank}, not "
                             f"the dim-0 split of fully_shard's default placement; only "
                             f"Shard(0) is supported (no shard_placement_fn)")

    def unsharded(self) -> torch.Tensor:
        """The parameter FSDP2 all-gathers for forward and backward (the leaf of the graph)."""
        return self.fsdp_param._unsharded_param


def check_supported(opt) -> Optional["ShardedFilter"]:
    """The :class:`ShardedFilter` of optimizer ``opt`` when its parameters are FSDP2 DTensors
    (None when none is); raises, naming it, for what does not compose."""
    params = [p for g in opt.param_groups for p in g["params"]]
    sharded = [p for p in params if is_sharded(p)]
    if not sharded:
        return None
    if len(sharded) != len(params):
        raise ValueError("KalmanNGD: some parameters are DTensors (fully_shard) and some are "
                         "plain tensors; under FSDP2 every parameter of the optimizer must be "
                         "sharded: call fully_shard on the root module too (it takes the "
                         "parameters no inner fully_shard took)")
    return ShardedFilter(opt, sharded)


class ShardedFilter:
    """The FSDP2 side of a :class:`~kalman_kernels.KalmanNGD`: the shards, their
    covariances (DTensors with the parameters' placement), the loss and batch steps over
    shards, and the optimizer state in the form distributed checkpoints take."""

    def __init__(self, opt, params: Sequence[torch.Tensor]):
        from torch.distributed.tensor import Shard
        self.opt = opt
        mesh = params[0].device_mesh
        for p in params:
            if p.device_mesh.ndim != 1 or len(p.placements) != 1:
                raise ValueError(f"KalmanNGD under FSDP2 supports a 1-D device mesh (plain "
                                 f"FSDP); a parameter is placed {tuple(p.placements)} on a "
                                 f"{p.device_mesh.ndim}-D mesh: tensor parallelism, HSDP "
                                 f"and other 2-D meshes do not compose yet")
            if p.placements[0] != Shard(0):
                raise ValueError(f"KalmanNGD under FSDP2 supports parameters sharded on dim 0 "
                                 f"(Shard(0), fully_shard's default), got {p.placements[0]}: "
                                 f"drop shard_placement_fn")
            if p.device_mesh != mesh:
                raise ValueError("KalmanNGD under FSDP2: all parameters must share one "
                                 "device mesh")
        if opt.process_group is not None:
            raise ValueError("KalmanNGD: process_group is for replicated parameters (each rank "
                             "observes its own batch); with fully_shard the optimizer reduces "
                             "over the parameters' device mesh itself: pass process_group=None")
        if isinstance(opt.obs_noise, torch.Tensor):
            raise ValueError("KalmanNGD under FSDP2 takes a scalar obs_noise (the ranks' "
                             "observations share it); an (m,) or (m, m) tensor does not "
                             "compose yet")
        if opt._tempering is not None:
            raise ValueError("KalmanNGD(likelihood='categorical') does not compose with FSDP2 "
                             "yet (its (m, m) noise would have to be gathered); use the "
                             "Gaussian likelihood or loss mode")
        if opt.max_obs_per_update is not None:
            raise ValueError("KalmanNGD(max_obs_per_update=...) does not compose with FSDP2 "
                             "yet (sequential sub-batches would need a reduction each); "
                             "leave it None")
        self.mesh = mesh
        self.group = mesh.get_group()
        self.world = mesh.size()
        self.rank = mesh.get_local_rank()
        self.shards: Dict[int, _Sharded] = {}
        self._add(params)
        opt._ranks = distributed.RankAgreement(self.group)

    def _add(self, params) -> None:
        """Check and register sharded parameters; their covariances exist from the start
        (a distributed checkpoint loads in place into the state a fresh optimizer returns,
        so that state must hold every sharded tensor)."""
        opt = self.opt
        found = _fsdp_params()
        for p in params:
            if not is_sharded(p) or p.device_mesh != self.mesh:
                raise ValueError("KalmanNGD under FSDP2: a parameter added later is not "
                                 "sharded over the optimizer's device mesh")
            entry = found.get(id(p))
            if entry is None:
                raise ValueError("KalmanNGD: a parameter is a DTensor that no fully_shard "
                                 "state owns (tensor parallelism, or distribute_tensor by "
                                 "hand); only FSDP2's fully_shard composes yet")
            fp, group = entry
            policy = group.mp_policy
            if policy.param_dtype is not None or policy.reduce_dtype is not None or \
                    policy.output_dtype is not None:
                raise ValueError(f"KalmanNGD under FSDP2: a MixedPrecisionPolicy "
                                 f"(param_dtype={policy.param_dtype}, reduce_dtype="
                                 f"{policy.reduce_dtype}) does not compose yet; give fully_shard "
                                 f"the default policy (cast the model itself instead)")
            if type(group.offload_policy).__name__ == "CPUOffloadPolicy" or \
                    getattr(fp, "offload_to_cpu", False):
                raise ValueError("KalmanNGD under FSDP2: CPUOffloadPolicy does not compose yet "
                                 "(the covariances and the step would have to follow the "
                                 "parameters to the host); drop offload_policy")
            self.shards[id(p)] = _Sharded(p, fp, group, self.world, self.rank)
        for group in opt.param_groups:
            for p in group["params"]:
                if p.requires_grad and "cov" not in opt.state[p]:
                    opt.state[p]["cov"] = self.new_cov(p, float(group["init_cov"]))

    def _pairs(self):
        """The optimizer's (param, group) pairs, registering any added since (add_param_group)."""
        pairs = self.opt._params()
        new = [p for p, _ in pairs if id(p) not in self.shards]
        if new:
            self._add(new)
        return pairs

    # ------------------------------------------------------------------ state
    @staticmethod
    def new_cov(p, value: float):
        """A covariance with ``p``'s placement: every element ``value``."""
        from torch.distributed.tensor import DTensor
        local = _local(p)
        dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
        data = torch.full(local.shape, value, dtype=dtype, device=local.device)
        return DTensor.from_local(data, p.device_mesh, p.placements, run_check=False,
                                  shape=p.shape, stride=p.stride())

    def group_stats(self, group: dict) -> dict:
        """``diagnostics()``'s statistics of a param group's covariances over every rank's
        shards (a collective: every rank calls it)."""
        opt = self.opt
        covs = [opt._cov(p, group) for p in group["params"] if p.requires_grad]
        n, low, mean, high, clamped = (self.cov_stats(covs, float(group["cov_floor"]))
                                       if covs else (0, None, None, None, 0))
        return {"numel": n, "cov_min": low if n else None, "cov_mean": mean if n else None,
                "cov_max": high if n else None, "floor_clamped": clamped}

    def cov_stats(self, covs: Sequence[torch.Tensor], floor: float):
        """(numel, min, mean, max, floor_clamped) of the sharded ``covs`` over every rank (one
        all-reduce each of SUM and MAX): the diagnostics' per-group statistics."""
        import torch.distributed as dist
        device = _local(covs[0]).device
        total = torch.zeros(3, dtype=F64, device=device)       # numel, sum, floor_clamped
        extremes = torch.full((2,), -math.inf, dtype=F64, device=device)   # -min, max
        for c in covs:
            local = _local(c)
            if not local.numel():
                continue
            flat = local.reshape(-1).to(F64)
            total += torch.stack([torch.tensor(float(flat.numel()), dtype=F64, device=device),
                                  flat.sum(),
                                  (local <= local.new_tensor(floor)).sum().to(F64)])
            extremes = torch.maximum(extremes, torch.stack([-flat.min(), flat.max()]))
        distributed.collective_("stats-sum", total, dist.ReduceOp.SUM, self.group)
        distributed.collective_("stats-max", extremes, dist.ReduceOp.MAX, self.group)
        n = int(total[0])
        return n, -float(extremes[0]), float(total[1]) / max(n, 1), float(extremes[1]), \
            int(total[2])

    # ------------------------------------------------------------------ shared pieces
    def _check_reduction(self) -> None:
        for shard in self.shards.values():
            group = shard.group
            if not getattr(group, "reduce_grads", True):
                raise ValueError("KalmanNGD under FSDP2 (loss mode): gradient reduction is "
                                 "off (set_requires_gradient_sync(False)); the step needs the "
                                 "reduced gradient of the loss: turn it back on for the "
                                 "backward of the step's closure")
            factor = getattr(group, "gradient_divide_factor", None)
            if factor is not None and factor != self.world:
                raise ValueError(f"KalmanNGD under FSDP2 (loss mode): the gradient divide "
                                 f"factor is {factor}, not the world size {self.world}; the "
                                 f"step observes the ranks' mean loss, whose gradient is the "
                                 f"default (averaged) reduction: remove "
                                 f"set_gradient_divide_factor")

    def _guard_inputs(self, params, covs, hypers):
        """For the overflow guard: the local maxima of the covariances whose dtype's range
        does not bound the step by itself (float16 parameters, or a float64 covariance of a
        float32 parameter), to be summed over the ranks (a sum of maxima of P >= 0 bounds
        the global maximum), and the indices they belong to. Every rank then guards the
        same bound and decides alike."""
        need = [i for i, (p, c) in enumerate(zip(params, covs))
                if (_max_of(p.dtype) / 2.0) / math.sqrt(_max_of(c.dtype)) < 1e6]
        device = covs[0].device if covs else torch.device("cpu")
        if not need:
            return need, torch.zeros(0, dtype=F64, device=device)
        maxima = [covs[i].detach().amax().to(F64) if covs[i].numel()
                  else torch.zeros((), dtype=F64, device=device) for i in need]
        return need, torch.stack(maxima)

    @staticmethod
    def _guard_covs(covs, need, bounds):
        """The covariances the guard reads: the summed bounds where it reads values."""
        out = list(covs)
        for i, b in zip(need, bounds):
            out[i] = b.to(covs[i].dtype).reshape(1)
        return out

    def _kernels(self, device):
        return resolve(self.opt.backend, device)

    # ------------------------------------------------------------------ loss mode
    def before_closure(self):
        """What tells, after the closure, whether its backward left fresh gradients: a weak
        reference to each gradient and its version (FSDP2 assigns the reduce-scattered
        shard, or adds it in place when one is there). Weak, so that ``zero_grad`` inside
        the closure still frees the old gradients (and their ids may then be reused)."""
        import weakref
        return [(None, None) if p.grad is None else
                (weakref.ref(p.grad), _local(p.grad)._version) for p, _ in self._pairs()]

    @staticmethod
    def _fresh(p, snap) -> bool:
        if p.grad is None:
            return False
        ref, version = snap
        return ref is None or ref() is not p.grad or _local(p.grad)._version != version

    def loss_step(self, loss: torch.Tensor, snapshot) -> torch.Tensor:
        """Loss mode over shards (the module docstring): the observation is L = mean_r L_r
        with the gradient FSDP reduce-scattered. When the closure ran no backward, the
        optimizer runs ``loss.backward()`` (FSDP2's gradient reduction lives in its
        backward hooks), which leaves ``.grad`` set."""
        import torch.distributed as dist
        opt = self.opt
        if loss.numel() != 1 or not loss.is_floating_point():
            raise TypeError(f"closure returned a {loss.dtype} loss of shape "
                            f"{tuple(loss.shape)}; in loss-observation mode the loss must be a "
                            f"floating scalar")
        self._check_reduction()
        pairs = self._pairs()
        fresh = [self._fresh(p, s) for (p, _), s in zip(pairs, snapshot)]
        if not any(fresh):
            if not loss.requires_grad:
                raise ValueError("closure returned a loss that does not require grad and ran "
                                 "no backward reaching the parameters: call loss.backward() in "
                                 "the closure, or return the loss with its graph")
            for p, _ in pairs:
                p.grad = None
            loss.backward()
            fresh = [p.grad is not None for p, _ in pairs]
        rank_key = opt._rank_key("loss")
        device = _local(pairs[0][0]).device
        kernels = self._kernels(device)
        params = [_local(p) for p, _ in pairs]
        covs = [_local(opt._cov(p, g)) for p, g in pairs]
        hypers = [opt._hyper_of(g) for _, g in pairs]
        grads = [_local(p.grad).detach() if f else torch.zeros_like(lp)
                 for (p, _), f, lp in zip(pairs, fresh, params)]
        runs = [(hp, [i for i in idx if params[i].numel()]) for hp, idx in runs_by_hyper(hypers)]
        runs = [(hp, idx) for hp, idx in runs if idx]
        filt = opt._filter
        filt.adaptive = opt.adaptive_obs_noise > 0.0
        with torch.no_grad():
            quad = torch.zeros((), dtype=F64, device=device)
            for hp, idx in runs:
                quad = quad + kernels.loss_quad_form([grads[i] for i in idx],
                                                     [covs[i] for i in idx],
                                                     hp.forgetting, hp.process_noise)
            need, maxima = self._guard_inputs(params, covs, hypers)
            flat = torch.cat([quad.reshape(1), loss.detach().to(F64).reshape(1),
                              distributed.key_slots(rank_key, self.world, device), maxima])
            distributed.collective_("fsdp-loss", flat, dist.ReduceOp.SUM, self.group)
            k = distributed.KEY_SLOTS
            mismatch = distributed.key_mismatch(flat[2:2 + k], self.world)
            r = torch.as_tensor(filt.obs_noise(opt.obs_noise), dtype=F64).to(device)
            e = -(flat[1] / self.world)
            t = loss_terms(e, r.reshape(()), flat[0], opt.adaptive_obs_noise, opt.gate,
                           params, self._guard_covs(covs, need, flat[2 + k:]), hypers)
            ok = t.ok & ~mismatch
            for hp, idx in runs:
                kernels.loss_step_([params[i] for i in idx], [grads[i] for i in idx],
                                   [covs[i] for i in idx], t.coef(hp), t.weight(hp), ok,
                                   hp.forgetting, hp.process_noise, hp.cov_floor,
                                   hp.cov_ceiling, hp.information)
        nan = torch.full((), float("nan"), dtype=F64, device=device)
        info = KalmanInfo(mahalanobis=torch.where(ok, t.d2, nan),
                          gate_scale=torch.where(ok, t.s, torch.zeros_like(t.s)), skipped=~ok,
                          innovation_cov=t.s_val.reshape(1, 1), jitter=torch.zeros_like(t.s),
                          obs_noise=t.r, num_obs=1, nonfinite=~t.finite,
                          overflow=t.finite & ~t.guard, mismatch=mismatch)
        filt.record(info)
        opt._written_covs = [opt.state[p]["cov"] for p, _ in pairs]
        return loss.detach()

    # ------------------------------------------------------------------ batch mode
    def _layers(self, pairs) -> List[Tuple[object, LinearCapture, _Sharded, Optional[_Sharded]]]:
        """The tracked nn.Linear layers whose weight is a parameter here: (layer, capture,
        weight shard, bias shard or None)."""
        ours = {id(p) for p, _ in pairs}
        out = []
        for layer, capture in self.opt._captures.items():
            wid = next((i for i, s in self.shards.items()
                        if any(m is layer and n == "weight"
                               for m, n in _module_infos(s.fsdp_param))), None)
            if wid is None or wid not in ours:
                continue
            bid = next((i for i, s in self.shards.items()
                        if any(m is layer and n == "bias" for m, n in _module_infos(s.fsdp_param))),
                       None)
            out.append((layer, capture, self.shards[wid],
                        self.shards[bid] if bid is not None and bid in ours else None))
        return out

    def batch_step(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Batch mode over shards (the module docstring): the observation is every rank's
        (pred, target) rows together, rank-major."""
        import torch.distributed as dist
        opt = self.opt
        pairs = self._pairs()
        device = _local(pairs[0][0]).device
        check_prediction(pred, target, device)
        rank_key = opt._rank_key("batch")
        world, rank = self.world, self.rank
        k_cls = 1 if pred.dim() == 1 else pred.shape[1]
        m_r = pred.numel()
        layers = self._layers(pairs)
        # 1. sizes and the tracked layers' usability, so that every rank builds the same layout
        usable = [capture.usable() is None for _, capture, _, _ in layers]
        sizes = torch.zeros(2 * world + len(layers), dtype=F64, device=device)
        sizes[rank] = m_r
        sizes[world + rank] = k_cls
        for i, u in enumerate(usable):
            sizes[2 * world + i] = float(u)
        distributed.collective_("fsdp-sizes", sizes, dist.ReduceOp.SUM, self.group)
        ms = [int(v) for v in sizes[:world].tolist()]
        ks = [int(v) for v in sizes[world:2 * world].tolist()]
        if len(set(ks)) != 1:
            raise ValueError(f"KalmanNGD under FSDP2 (batch mode): the ranks' predictions have "
                             f"{ks} scores per sample; every rank must return (pred, target) of "
                             f"shape (B_r,) or (B_r, K) with the same K")
        kron = [int(v) == world for v in sizes[2 * world:].tolist()]
        for (layer, capture, _, _), u, k in zip(layers, usable, kron):
            if not k and (capture.calls or u):
                opt._filter.warn_once(f"dense:{id(layer)}",
                                      f"KalmanNGD.track: {layer} {capture.usable() or 'is'} "
                                      f"not usable as a Kronecker block on every rank; using "
                                      f"the dense Jacobian for it")
        kron_layers = [entry for entry, k in zip(layers, kron) if k]
        kron_ids = {id(w.param) for _, _, w, _ in kron_layers}
        bias_ids = {id(b.param) for _, _, _, b in kron_layers if b is not None}
        # dense blocks: every other parameter; a tracked layer's bias has the Jacobian D
        dense = [self.shards[id(p)] for p, _ in pairs if id(p) not in kron_ids]
        bs = [m // k_cls for m in ms]
        m_total = sum(ms)
        # 2. this rank's observation over the unsharded parameters
        flat_pred = pred.reshape(-1)
        error = None
        jacs: Dict[int, torch.Tensor] = {}
        inputs: List[torch.Tensor] = []
        dgrads: List[torch.Tensor] = []
        try:
            autograd = [s for s in dense if id(s.param) not in bias_ids]
            got = batched_jacobian(flat_pred, [s.unsharded() for s in autograd])
            for s, jac in zip(autograd, got):
                jacs[id(s.param)] = (torch.zeros((m_r,) + s.shape, dtype=s.param.dtype,
                                                 device=device) if jac is None
                                     else jac.detach())
            verify = [c.verify == "always" or (c.verify == "first" and not c.verified)
                      for _, c, _, _ in kron_layers]
            per_sample = pred.reshape(-1, k_cls)
            outs = per_sample_output_grads(per_sample, [c.calls[0][1] for _, c, _, _ in
                                                        kron_layers],
                                           [layer for layer, _, _, _ in kron_layers], verify)
            for (_, c, _, b), d, checked in zip(kron_layers, outs, verify):
                c.verified = c.verified or checked
                inputs.append(c.calls[0][0].detach())
                dgrads.append(d)
                if b is not None:
                    jacs[id(b.param)] = d.reshape(m_r, -1)
        except (ValueError, RuntimeError) as exc:
            error = exc
        # 3. one all-to-all: every shard owner gets its columns of every rank's rows
        dtype = torch.float64 if any(p.dtype == torch.float64 for p, _ in pairs) \
            else torch.float32
        send_dense = [(s, s.rest) for s in dense]
        kron_geo = [(w, w.shape[1]) for _, _, w, _ in kron_layers]

        def count(k: int, m: int, b: int) -> int:
            n = sum(m * s.rows[k][1] * rest for s, rest in send_dense)
            n += sum(b * k_cls * w.rows[k][1] + b * d_in for w, d_in in kron_geo)
            return n + 1                       # the error flag

        pieces = []
        for k in range(world):
            part = []
            for s, _ in send_dense:
                lo, n = s.rows[k]
                jac = jacs.get(id(s.param)) if error is None else None
                part.append(jac.reshape(m_r, -1)[:, lo * s.rest:(lo + n) * s.rest]
                            .reshape(-1).to(dtype) if jac is not None
                            else torch.zeros(m_r * n * s.rest, dtype=dtype, device=device))
            for i, (w, d_in) in enumerate(kron_geo):
                lo, n = w.rows[k]
                if error is None:
                    part.append(dgrads[i][:, :, lo:lo + n].reshape(-1).to(dtype))
                    part.append(inputs[i].reshape(-1).to(dtype))
                else:
                    part.append(torch.zeros(bs[rank] * (k_cls * n + d_in), dtype=dtype,
                                            device=device))
            part.append(torch.full((1,), 0.0 if error is None else 1.0, dtype=dtype,
                                   device=device))
            pieces.append(torch.cat(part))
        send = torch.cat(pieces)
        in_splits = [p.numel() for p in pieces]
        out_splits = [count(rank, ms[r], bs[r]) for r in range(world)]
        recv = torch.empty(sum(out_splits), dtype=dtype, device=device)
        distributed.exchange_("fsdp-observation", recv, send, out_splits, in_splits,
                              self.group)
        chunks = list(torch.split(recv, out_splits))
        failed = [r for r in range(world) if float(chunks[r][-1]) != 0.0]
        if error is not None:
            raise error
        if failed:
            raise RuntimeError(f"KalmanNGD under FSDP2 (batch mode): building the observation "
                               f"failed on rank(s) {failed} (their error says why); the step "
                               f"was not taken on any rank")
        # 4. this shard's blocks over the global observation
        cursor = [0] * world

        def take(r: int, n: int) -> torch.Tensor:
            piece = chunks[r][cursor[r]:cursor[r] + n]
            cursor[r] += n
            return piece

        blocks, hypers = [], []
        for s, rest in send_dense:
            n = s.rows[rank][1]
            jac = torch.cat([take(r, ms[r] * n * rest).reshape(ms[r], n * rest)
                             for r in range(world)])
            if n:
                g = _group_of(opt, s.param)
                blocks.append(DenseBlock(_local(s.param), _local(opt._cov(s.param, g)),
                                         jac.to(s.param.dtype).reshape((m_total, n) +
                                                                       s.shape[1:])))
                hypers.append(opt._hyper_of(g))
        for w, d_in in kron_geo:
            n = w.rows[rank][1]
            ds, as_ = [], []
            for r in range(world):
                ds.append(take(r, bs[r] * k_cls * n).reshape(bs[r], k_cls, n))
                as_.append(take(r, bs[r] * d_in).reshape(bs[r], d_in))
            if n:
                g = _group_of(opt, w.param)
                blocks.append(KronBlock(_local(w.param), _local(opt._cov(w.param, g)),
                                        torch.cat(as_).to(w.param.dtype),
                                        torch.cat(ds).to(w.param.dtype)))
                hypers.append(opt._hyper_of(g))
        # 5. one all-reduce: the partial S, the residuals, the configuration hash, the bounds
        kernels = self._kernels(device)
        all_params = [_local(p) for p, _ in pairs]
        all_covs = [_local(opt._cov(p, g)) for p, g in pairs]
        all_hypers = [opt._hyper_of(g) for _, g in pairs]
        filt = opt._filter
        filt.adaptive = opt.adaptive_obs_noise > 0.0
        with torch.no_grad():
            hph = partial_innovation_cov(kernels, blocks, hypers, m_total, device)
            e = torch.zeros(m_total, dtype=F64, device=device)
            start = sum(ms[:rank])
            e[start:start + m_r] = (target.detach().reshape(-1).to(F64)
                                    - flat_pred.detach().to(F64))
            need, maxima = self._guard_inputs(all_params, all_covs, all_hypers)
            flat = torch.cat([hph.reshape(-1), e,
                              distributed.key_slots(rank_key, world, device), maxima])
            distributed.collective_("fsdp-terms", flat, dist.ReduceOp.SUM, self.group)
            mm = m_total * m_total
            hph = flat[:mm].reshape(m_total, m_total)
            e = flat[mm:mm + m_total]
            k = distributed.KEY_SLOTS
            mismatch = distributed.key_mismatch(flat[mm + m_total:mm + m_total + k], world)
            guard_covs = self._guard_covs(all_covs, need, flat[mm + m_total + k:])
            r = obs_noise_matrix(filt.obs_noise(opt.obs_noise), m_total, device)
            t = factor_terms(kernels, blocks, hypers, e, r, opt.gate, opt.adaptive_obs_noise,
                             hph=hph, guard_on=(all_params, guard_covs, all_hypers))
            ok = t.finite & t.factored & t.guard & ~mismatch
            _apply_fused_(kernels, blocks, hypers, t, ok)
        nan = torch.full((), float("nan"), dtype=F64, device=device)
        info = KalmanInfo(mahalanobis=torch.where(ok, t.d2, nan),
                          gate_scale=torch.where(ok, t.s, torch.zeros_like(t.s)),
                          skipped=~ok, innovation_cov=t.s_mat, jitter=t.jitter,
                          obs_noise=t.r if t.r.dim() == 0 else None, num_obs=m_total,
                          nonfinite=~t.finite, overflow=t.finite & ~t.guard, mismatch=mismatch)
        filt.record(info)
        opt._written_covs = [opt.state[p]["cov"] for p, _ in pairs]
        return e.square().mean()


def _module_infos(fsdp_param):
    """(module, attribute name) pairs where FSDP2 registers ``fsdp_param``."""
    info = getattr(fsdp_param, "_module_info", None)
    out = []
    if info is not None:
        out.append((info.module, info.param_name))
        out += list(zip(getattr(info, "shared_modules", []) or [],
                        getattr(info, "shared_param_names", []) or []))
    return out


def _group_of(opt, p) -> dict:
    for g in opt.param_groups:
        if any(q is p for q in g["params"]):
            return g
    raise ValueError("a sharded parameter is not in the optimizer's param groups")

