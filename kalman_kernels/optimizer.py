"""KalmanNGD: natural-gradient descent as a diagonal Kalman filter (docs/math.md).

The parameters are a Gaussian N(mu, diag P). ``step(closure)`` treats one minibatch as one
observation of the model:

* batch-observation mode: ``closure() -> (pred, target)`` with shapes (m,) or (m, K).
  The m*K predictions (flattened row-major) are the observations; their Jacobian is
  computed inside by batched autograd, or through sample-grouped Kronecker blocks for
  ``nn.Linear`` layers registered with :meth:`KalmanNGD.track` (:mod:`.observations`).
  With ``likelihood="categorical"`` the closure returns ``(logits, labels)`` instead:
  logits (B, K) and int64 class indices (B,) or soft targets (B, K); the observation is
  the softmax probabilities of K - 1 classes per sample with the noise of the categorical
  distribution, and the step is the online natural gradient of the cross-entropy
  (docs/math.md, "The categorical likelihood").
* loss-observation mode: ``closure() -> loss`` (a scalar tensor). The loss itself is one
  observation with target 0 (docs/math.md). The closure may follow torch.optim's convention
  (zero the gradients, call ``loss.backward()``, return the loss: the gradients backward
  left are used) or return the loss with its graph (the optimizer differentiates it).

Like ``torch.optim.AdamW`` this class validates its arguments, runs the closure and
gathers what a step needs (gradients or observation blocks, covariances, hyper-parameters);
one functional step per mode does the step (:mod:`kalman_kernels.functional`, on top of
:mod:`kalman_kernels.ops`; docs/design.md, 1). The step reads no device value on the host,
so its counters (``steps``, ``skipped_steps``) and the adaptive noise live in device tensors
(:class:`~kalman_kernels.functional.FilterState`) and ``last_info`` converts to Python
numbers only when read. Scale-out (``process_group``) is :mod:`kalman_kernels.distributed`;
parameters sharded by FSDP2's ``fully_shard``, :mod:`kalman_kernels.fsdp` (docs/fsdp.md).

Hyper-parameters that belong to a parameter (``lr``, ``init_cov``, ``process_noise``,
``forgetting``, ``cov_floor``, ``cov_ceiling``, ``cov_update``) may differ between param
groups. Those that belong to the observation (``obs_noise``, ``adaptive_obs_noise``,
``gate``, ``process_group``, ``backend``, ``likelihood``) are shared by every group and
set on the optimizer.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import weakref
from typing import Callable, Dict, Optional

import torch
from torch import nn

from . import distributed, fsdp, ops
from ._deferred import compiling
from ._loss_tape import LossTape
from ._staging import Staging, block_param, stage_block
from .backends import resolve
from .functional import (
    COUNTERS,
    FILTER_KEY,
    SAVED_KEY,
    FilterState,
    kalman_ngd_batch_step,
    kalman_ngd_loss_step,
    loaded_form,
    saved_form,
)
from .observations import (
    LIKELIHOODS,
    LinearCapture,
    batch_observation,
    categorical_observation,
    check_prediction,
    describe,
    real_view,
)
from .ops import KalmanInfo, StepHyper
from .ops._common import CovValueCheck, check_workspace
from .report import OptimizerReport, build_report

_GROUP_KEYS = ("lr", "init_cov", "process_noise", "forgetting", "cov_floor", "cov_ceiling",
               "cov_update")
_OBSERVATION_KEYS = ("obs_noise", "adaptive_obs_noise", "gate", "process_group", "backend",
                     "max_obs_per_update", "likelihood")
# Below this step scale (divided by the number of ranks under a process group, where
# lr = 1/W is the advised setting) a warning says that lr is not a learning rate. The
# covariance update does not scale with lr, so lr = 0.01 spends the information of each
# batch while moving the mean a hundredth of the way: the run ends near its start. 0.1 lets
# every deliberate damping through and catches the 1e-2 .. 1e-5 of SGD and AdamW habits.
SMALL_LR = 0.1


class _DefaultObsNoise(float):
    """The default of ``obs_noise``: a float equal to 1e-2 (so the signature still reads
    ``obs_noise=0.01``), but a distinct object, so that ``likelihood="categorical"`` can
    tell "not passed" (tempering 1.0, the plain natural gradient) from an explicit 1e-2.
    It is never stored: the optimizer keeps a plain float."""

    __slots__ = ()

    def __repr__(self) -> str:
        return repr(float(self))


_OBS_NOISE_DEFAULT = _DefaultObsNoise(1e-2)


def _cov_dtype(param: torch.Tensor) -> torch.dtype:
    return torch.float64 if param.dtype in (torch.float64, torch.complex128) else torch.float32


_real = real_view      # a complex tensor as its (..., 2) real view


def _prior_cov(p: torch.Tensor, group: dict) -> torch.Tensor:
    """A new covariance for ``p``: every element the group's ``init_cov``. Contiguous whatever
    p's strides (the kernels write it as one flat array), one variance per real number (a
    complex p has two: docs/design.md, 3)."""
    return torch.full(_state_shape(p), float(group["init_cov"]), dtype=_cov_dtype(p),
                      device=p.device)


def _state_shape(p: torch.Tensor) -> torch.Size:
    """The shape of p's covariance: p's, with a trailing 2 for a complex p."""
    return p.shape + (2,) if p.is_complex() else p.shape


class KalmanNGD(torch.optim.Optimizer):
    """Kalman-filter natural-gradient optimizer.

    Args:
        params: parameters or param groups.
        lr: step scale alpha of the mean update (1.0 = the exact Kalman update). Not a
            learning rate: the step size comes from ``init_cov`` and ``obs_noise``, and the
            covariance update does not scale with ``lr``, so a small ``lr`` spends each
            batch's information without moving the mean. ``lr < 0.1`` (``0.1 / W`` under a
            process group of W ranks) raises a ``UserWarning`` once per optimizer, at
            construction or when a scheduler or param group sets it. For smaller steps lower
            ``init_cov`` (the prior variance, which also plays weight decay's part, towards
            the initial values) or raise ``obs_noise``.
        init_cov: prior variance P0 of every parameter (the prior mean is its value).
        obs_noise: observation noise R: a float r (R = r I), an (m,) tensor or an (m, m)
            tensor. With ``likelihood="categorical"`` a scalar c that tempers the
            categorical noise, R = c (diag(p) - p p^T) per sample; there the default is
            1.0 (the natural gradient of the cross-entropy), not 1e-2 (the signature's
            default is a private float equal to 1e-2 that tells "not passed" apart).
        process_noise: q >= 0 added to P at every predict step.
        forgetting: lam in (0, 1]; P- = P / lam + q.
        cov_floor, cov_ceiling: P is clamped to [cov_floor, cov_ceiling] (None: no ceiling).
        adaptive_obs_noise: EMA rate beta of the innovation-based noise estimate (0: off).
        gate: chi-square probability (e.g. 0.999) beyond which a batch's step is shrunk,
            or None.
        cov_update: ``"kalman"`` (exact diagonal of (I - KH)P-) or ``"information"``.
        process_group: a torch.distributed group; every rank observes its own batch and
            all ranks apply the same all-reduced update (README, "Robustness and
            scale").
        backend: ``"auto"``, ``"reference"``, ``"cpp"``, ``"triton"`` or ``"cuda"``.
        max_obs_per_update: batch mode processes at most this many observations per
            Kalman update: a larger batch is split into sequential sub-batches (the m x m
            work shrinks quadratically). None (default): one update per batch, and a batch
            whose m x m work would not fit in memory raises a MemoryError before
            allocating. See docs/robustness.md.
        likelihood: the observation model of batch mode. ``"gaussian"`` (default): the
            closure returns (pred, target), observed with noise ``obs_noise``.
            ``"categorical"``: the closure returns (logits, labels), logits (B, K) with
            K >= 2 and labels int64 class indices (B,) or soft targets (B, K) whose rows
            sum to 1; the step is the online natural gradient of the cross-entropy
            (docs/math.md, "The categorical likelihood"). It needs a scalar
            ``obs_noise`` and refuses ``adaptive_obs_noise`` and ``max_obs_per_update``.
            Loss-observation mode is the same under either.

    Diagnostics: ``last_info`` (:class:`~kalman_kernels.ops.KalmanInfo` of the last step)
    and :meth:`diagnostics` (a dict of counters and covariance statistics) read device
    values only when called.
    """

    # torch.amp.GradScaler.step(opt) then leaves the unscaling to this optimizer (it sets
    # ``grad_scale`` and ``found_inf`` on it): the loss step unscales the gradients itself and
    # knows that a scaler is at work, whose unscale the backward hooks cannot see
    _step_supports_amp_scaling = True

    def __init__(self, params, lr: float = 1.0, init_cov: float = 1e-3,
                 obs_noise=_OBS_NOISE_DEFAULT, process_noise: float = 0.0,
                 forgetting: float = 1.0, cov_floor: float = 1e-12,
                 cov_ceiling: Optional[float] = None, adaptive_obs_noise: float = 0.0,
                 gate: Optional[float] = None, cov_update: str = "kalman", process_group=None,
                 backend: str = "auto", max_obs_per_update: Optional[int] = None,
                 likelihood: str = "gaussian"):
        defaults = dict(lr=lr, init_cov=init_cov, process_noise=process_noise,
                        forgetting=forgetting, cov_floor=cov_floor, cov_ceiling=cov_ceiling,
                        cov_update=cov_update)
        _check_group(defaults, where="KalmanNGD")
        obs_noise, tempering = _check_observation(
            obs_noise, obs_noise is not _OBS_NOISE_DEFAULT, adaptive_obs_noise, gate,
            max_obs_per_update, backend, likelihood)
        self.obs_noise = obs_noise
        self.likelihood = likelihood
        self._tempering = tempering     # c of R = c (diag(p) - p p^T); None when Gaussian
        self.adaptive_obs_noise = float(adaptive_obs_noise)
        self.gate = gate
        self.process_group = process_group
        self.backend = backend
        self.max_obs_per_update = max_obs_per_update
        self._filter = FilterState()     # counters, adapted noise, last_info, deferred flags
        self._cov_checks = CovValueCheck()
        self._ranks = distributed.RankAgreement(process_group)
        self._captures: Dict[nn.Linear, LinearCapture] = {}
        self._tape = LossTape()      # the hooks' record between steps (observe, g^T P- g)
        self._hooked: Dict[int, object] = {}
        self._hook_kernels: Dict[tuple, object] = {}
        self._checked_groups: Dict[int, tuple] = {}   # id(group) -> (values, StepHyper)
        self._last_blocks = None     # what the last step gave each parameter (describe())
        self._param_names: Dict[torch.Tensor, str] = {}   # from track(module)
        super().__init__(params, defaults)
        device = self._device()
        self.state[FILTER_KEY] = self._filter.reset(device, obs_noise)
        if tempering is not None:
            # saved with the state, so that a resumed optimizer observes alike
            self.state[FILTER_KEY]["likelihood"] = likelihood
            self.state[FILTER_KEY]["tempering"] = torch.tensor(tempering, dtype=torch.float64,
                                                            device=device)
        if backend != "auto":
            resolve(backend, device)   # fail now, with the reason, not at step 1
        # FSDP2 (fully_shard) parameters: sharded covariances and steps (kalman_kernels/fsdp.py)
        self._sharded = fsdp.check_supported(self)
        # now, not at the first step: a trainer's first backward passes (gradient
        # accumulation, observe()) come before it
        self._install_grad_hooks()

    # ------------------------------------------------------------------ copies
    # What copy.deepcopy and pickle carry (torch.optim.Optimizer's own __getstate__ keeps
    # only defaults, state and param_groups, which leaves a copy that cannot step), per
    # attribute: the observation's settings, the FilterState (counters, adapted noise,
    # last_info, warnings given; it is state["filter"] too, and stays one object), the
    # tracked layers (their forward hooks travel with them: copy the model and the
    # optimizer together, copy.deepcopy((model, opt)), to keep the tracking on the copied
    # model), the names and last blocks of describe(), and whether reduce_in_backward() is
    # on (the LossTape carries that switch and forgets the record between steps, which
    # refers to live gradients). Rebuilt: the post-accumulate-grad hooks (tensors' hooks
    # are not copied; the copy registers them on its own parameters), the per-step scratch,
    # the caches keyed by id() and the covariance value check (the copy checks its
    # covariances once). Not
    # carried, as with torch.optim: the step and state_dict hooks, and the patches of
    # methods on the instance (an LR scheduler's wrapper of step). Refused: a process
    # group or FSDP2 shards, which belong to this process's torch.distributed run.
    _REBUILT = ("_cov_checks", "_ranks", "_hooked", "_hook_kernels", "_checked_groups",
                "_written_covs")

    def __getstate__(self) -> dict:
        if self.process_group is not None or self._sharded is not None:
            raise TypeError(
                "a KalmanNGD with a process_group or over FSDP2-sharded parameters cannot be "
                "copied or pickled: they belong to this process's torch.distributed run. Save "
                "and restore its state instead: opt.state_dict() (torch.distributed.checkpoint "
                "under FSDP2), then a new KalmanNGD(...) and load_state_dict on it")
        state = super().__getstate__()
        for key, value in self.__dict__.items():
            # an instance attribute that is a function is a patch of a method (an LR
            # scheduler wraps opt.step with a closure over this optimizer): a copy that
            # kept it would step the original
            if key not in self._REBUILT and not key.startswith("_optimizer_") and \
                    not callable(value):
                state.setdefault(key, value)
        state["_full_copy"] = True
        return state

    def __setstate__(self, state: dict) -> None:
        # torch.optim's load_state_dict calls this with state and param_groups alone
        full = state.pop("_full_copy", False)
        marked = "differentiable" in state.get("defaults", {})
        super().__setstate__(state)
        if not full:
            return
        if not marked:      # torch adds it for old pickles; a copy keeps the defaults as they were
            self.defaults.pop("differentiable", None)
        self._cov_checks = CovValueCheck()
        self._ranks = distributed.RankAgreement(self.process_group)
        self._hooked = {}
        self._hook_kernels = {}
        self._checked_groups = {}
        self._written_covs = None
        self._install_grad_hooks()

    # ------------------------------------------------------------------ param groups
    def add_param_group(self, param_group: dict) -> None:
        for key in _OBSERVATION_KEYS:
            if key in param_group:
                raise ValueError(f"{key} belongs to the observation shared by all param groups;"
                                 f" set it on KalmanNGD(...), not in a param group")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_group(group, where=f"param group {len(self.param_groups) - 1}")
        self._warn_small_lr(len(self.param_groups) - 1, group)
        for p in group["params"]:
            if not (p.is_floating_point() or p.is_complex()):
                raise TypeError(f"KalmanNGD optimises floating-point parameters (or complex "
                                f"ones), got {p.dtype}")
        devices = {p.device for g in self.param_groups for p in g["params"]}
        if len(devices) > 1:
            raise ValueError(f"all parameters must be on one device, "
                             f"got {sorted(map(str, devices))}")

    def _device(self) -> torch.device:
        return self.param_groups[0]["params"][0].device

    def _params(self):
        return [(p, g) for g in self.param_groups for p in g["params"] if p.requires_grad]

    # ------------------------------------------------------------------ state
    def _cov(self, p: torch.Tensor, group: dict) -> torch.Tensor:
        state = self.state[p]
        if "cov" not in state:
            state["cov"] = _prior_cov(p, group)
            return state["cov"]
        cov = state["cov"]
        if cov.shape != _state_shape(p):
            raise ValueError(f"a parameter of shape {tuple(p.shape)} has a covariance of shape "
                             f"{tuple(cov.shape)}: the parameter was replaced or reshaped after "
                             f"the optimizer state was created (or the state was loaded from "
                             f"another model); create the optimizer for the model as it is now")
        if not (cov.is_cpu and p.is_cpu) and cov.device != p.device:
            raise ValueError(f"a parameter on {p.device} has its covariance on {cov.device}: the "
                             f"model was moved after the optimizer state was created; call "
                             f"opt.load_state_dict(opt.state_dict()) after model.to(...) (it "
                             f"moves the state to the parameters' device), or create the "
                             f"optimizer after moving the model")
        if _cov_dtype(p) == torch.float64 and cov.dtype != torch.float64:
            # model.double() after the first step: both modes promote, losslessly, and say so.
            state["cov"] = cov = cov.to(torch.float64)
            self._filter.warn_once(
                "promote", "KalmanNGD: a parameter became float64 after its float32 covariance "
                "was created (model.double() after the optimizer was built?); the covariance "
                "was promoted to float64 (lossless). Create the optimizer after setting the "
                "model's dtype to avoid this.")
        return cov

    def _group_of(self, p: torch.Tensor) -> dict:
        for g in self.param_groups:
            if any(q is p for q in g["params"]):
                return g
        raise ValueError("covariance(p): p is not a parameter of this optimizer")

    def covariance(self, p: torch.Tensor) -> torch.Tensor:
        """The diagonal covariance P of parameter ``p`` (same shape; the prior before step 1)."""
        return self._cov(p, self._group_of(p))

    @property
    def last_info(self) -> Optional[KalmanInfo]:
        """The :class:`~kalman_kernels.ops.KalmanInfo` of the last step (None before one)."""
        return self._filter.last_info

    @property
    def skipped_steps(self) -> int:
        """Steps skipped so far (a non-finite observation, an overflow or a failed
        factorisation)."""
        self._filter.pending.poll(wait=True)
        return self._filter.counter("skipped_steps")

    @property
    def steps_taken(self) -> int:
        """Steps applied so far."""
        return self._filter.counter("steps")

    def diagnostics(self) -> dict:
        """What the filter is doing, as Python numbers (reads device values: call it between
        steps, e.g. when logging; never inside a compiled region).

        * ``steps``, ``skipped_steps``, ``gated_steps``: applied steps, skipped steps
          (non-finite observation, overflow, failed factorisation, ranks disagreeing) and
          applied steps the gate shrank (s < 1);
        * ``mahalanobis``, ``p_value``, ``num_obs``, ``gate_scale``, ``skipped``, ``reason``,
          ``jitter``: the last step (``last_info``): d2 = e^T S^-1 e, the chi-square
          probability of a d2 at least that large under the model (m degrees of freedom;
          persistently tiny p-values: R too small or the model misspecified), the gate scale;
        * ``obs_noise``: the current scalar r (adapted, with ``adaptive_obs_noise``); with
          ``likelihood="categorical"`` the tempering c of its batch observations;
        * ``floor_clamped``: covariance elements now at ``cov_floor`` (frozen parameters,
          counted now, one pass over P); ``cov_clamps``: elements the ``"kalman"`` rule
          pushed below zero under ``process_group`` so far (clamped to the floor);
          ``max_shrink``: under ``process_group`` with the ``"kalman"`` rule, the largest
          P- d of the last step summed over the ranks (the fraction of a prior variance the
          step removed): above 1 it is clamped; near 1 the ranks' summed mean steps
          overshoot (docs/robustness.md, "Scale-out");
        * ``groups``: per param group, ``cov_min`` / ``cov_mean`` / ``cov_max`` of P,
          ``numel`` and ``floor_clamped``;
        * ``loss_reduction``: how the last loss step summed g^T P- g: ``"in-backward"``
          (in the backward hooks, single pass) or ``"two-pass: <why>"`` (None before a
          loss step; see :meth:`reduce_in_backward`).
        """
        self._filter.pending.poll(wait=True)
        out = {key: self._filter.counter(key) for key in COUNTERS}
        info = self.last_info
        out.update(mahalanobis=None, p_value=None, num_obs=None, gate_scale=None, skipped=None,
                   reason=None, jitter=None, max_shrink=None)
        if info is not None:
            out.update(mahalanobis=info.mahalanobis, p_value=info.p_value,
                       num_obs=info.num_obs, gate_scale=info.gate_scale, skipped=info.skipped,
                       reason=info.reason, jitter=info.jitter)
            shrink = info.extras.get("max_shrink_tensor")
            if shrink is not None:
                out["max_shrink"] = float(shrink)
        r = (self._filter.obs_noise(self.obs_noise) if self._tempering is None
             else self._tempering)
        out["obs_noise"] = (float(r) if not isinstance(r, torch.Tensor) or r.dim() == 0
                            else None)
        groups = []
        total_clamped = 0
        with torch.no_grad():
            for group in self.param_groups:
                if self._sharded is not None:     # statistics over every rank's shards
                    groups.append(self._sharded.group_stats(group))
                    total_clamped += groups[-1]["floor_clamped"]
                    continue
                covs = [self._cov(p, group).reshape(-1) for p in group["params"]
                        if p.requires_grad]
                if not covs:
                    groups.append({"numel": 0, "cov_min": None, "cov_mean": None,
                                   "cov_max": None, "floor_clamped": 0})
                    continue
                flat = torch.cat([c.to(torch.float64) for c in covs])
                # the floor as stored: rounded into each covariance's dtype
                clamped = sum(int((c <= c.new_tensor(float(group["cov_floor"]))).sum())
                              for c in covs)
                total_clamped += clamped
                groups.append({"numel": flat.numel(), "cov_min": float(flat.min()),
                               "cov_mean": float(flat.mean()), "cov_max": float(flat.max()),
                               "floor_clamped": clamped})
        out["floor_clamped"] = total_clamped
        out["groups"] = groups
        out["loss_reduction"] = self._tape.last_path
        return out

    @staticmethod
    def _hyper(group: dict) -> StepHyper:
        ceiling = group["cov_ceiling"]
        return StepHyper(float(group["lr"]), float(group["forgetting"]),
                         float(group["process_noise"]), float(group["cov_floor"]),
                         math.inf if ceiling is None else float(ceiling),
                         group["cov_update"] == "information")

    def state_dict(self):
        """``torch.optim.Optimizer.state_dict()``, with the filter-wide state (counters,
        adapted noise) inside every parameter's entry under ``"kalman_filter"`` (the form
        ``torch.distributed.checkpoint`` takes; :func:`~kalman_kernels.functional.saved_form`)."""
        sd = super().state_dict()
        sd["state"][FILTER_KEY] = dict(sd["state"].get(FILTER_KEY, {}))
        # A trainable parameter whose covariance the first step has not created yet gets the
        # entry that step would create (the prior), so a fresh optimizer's state dict is the
        # complete template torch.distributed.checkpoint loads a checkpoint into (FSDP2
        # creates its sharded covariances at construction and when a group is added).
        for saved, group in zip(sd["param_groups"], self.param_groups):
            for index, p in zip(saved["params"], group["params"]):
                if p.requires_grad and index not in sd["state"] and self._sharded is None:
                    sd["state"][index] = {"cov": _prior_cov(p, group)}
        return saved_form(sd)

    def load_state_dict(self, state_dict) -> None:
        """Restore a state saved by :meth:`state_dict` (exact resume, across backends and
        devices). Everything is checked before anything is changed: the saved covariances
        must match the parameters' shapes (a state from another model raises, naming the
        parameter) and hold finite values >= 0, and the saved hyper-parameters must be
        valid. Covariances keep their saved dtype (never rounded to a bf16 parameter's).
        The likelihood must be the one the state was saved with (a Gaussian filter's
        posterior is no prior for a categorical one by accident); with
        ``likelihood="categorical"`` the saved tempering c (``obs_noise``) is restored."""
        if not isinstance(state_dict, dict) or "state" not in state_dict or \
                "param_groups" not in state_dict:
            raise TypeError("load_state_dict expects the dict returned by "
                            "KalmanNGD.state_dict() (keys 'state' and 'param_groups')")
        state_dict = loaded_form(state_dict)
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"the state_dict has {len(saved_groups)} param groups, this "
                             f"optimizer {len(self.param_groups)}")
        index_to_param = {}
        for i, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            for key in _OBSERVATION_KEYS:
                if key in saved:
                    raise ValueError(f"state_dict param group carries {key!r}, which is set on "
                                     f"the optimizer, not per group")
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"param group {i} of the state_dict has "
                                 f"{len(saved['params'])} parameters, this optimizer's "
                                 f"{len(group['params'])}: the state belongs to another model")
            merged = dict(group)
            merged.update({k: v for k, v in saved.items() if k != "params"})
            _check_group(merged, where=f"state_dict param group {i}")
            index_to_param.update(zip(saved["params"], group["params"]))
        saved_filter = state_dict["state"].get(FILTER_KEY, {})
        saved_likelihood = (saved_filter.get("likelihood", "gaussian")
                            if isinstance(saved_filter, dict) else "gaussian")
        if saved_likelihood != self.likelihood:
            raise ValueError(f"the state_dict was saved by KalmanNGD(likelihood="
                             f"{saved_likelihood!r}) but this optimizer has likelihood="
                             f"{self.likelihood!r}: create it with likelihood="
                             f"{saved_likelihood!r} to resume")
        saved_tempering = None
        if self._tempering is not None:
            saved_tempering = saved_filter.get("tempering")
            value = (None if saved_tempering is None or (isinstance(saved_tempering, torch.Tensor)
                                                         and saved_tempering.device.type == "meta")
                     else float(saved_tempering))
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"the state_dict's saved tempering ('tempering' in each "
                                 f"parameter entry's {SAVED_KEY!r}) must be a finite number > 0 "
                                 f"(the categorical obs_noise), got {value!r}")
            saved_tempering = value
        saved_covs = {}
        for key, value in state_dict["state"].items():
            if not (isinstance(key, int) and isinstance(value, dict) and "cov" in value):
                continue
            if key not in index_to_param:
                raise ValueError(f"state_dict['state'][{key}] names no parameter of this "
                                 f"optimizer")
            p = index_to_param[key]
            cov = value["cov"]
            where = f"state_dict['state'][{key}]['cov']"
            if not isinstance(cov, torch.Tensor) or cov.dtype not in (torch.float32,
                                                                       torch.float64):
                raise TypeError(f"{where} must be a float32 or float64 tensor, got "
                                f"{getattr(cov, 'dtype', type(cov).__name__)}")
            if cov.shape != _state_shape(p):
                parts = (f" (complex: its covariance is {tuple(_state_shape(p))}, the variances of "
                         f"the real and imaginary parts)" if p.is_complex() else "")
                raise ValueError(f"{where} has shape {tuple(cov.shape)} but parameter {key} "
                                 f"has shape {tuple(p.shape)}{parts}: the state belongs to "
                                 f"another model (or the model's layers were reordered)")
            if cov.device.type != "meta":
                CovValueCheck()([(where, cov)])
            saved_covs[key] = cov
        super().load_state_dict(state_dict)
        for index, cov in saved_covs.items():
            p = index_to_param[index]
            self.state[p]["cov"] = cov.detach().to(
                device=p.device, dtype=torch.promote_types(cov.dtype, _cov_dtype(p)), copy=True)
        device = self._device()
        filt = self._filter.restore(device, dict(state_dict["state"].get(FILTER_KEY, {})))
        if self._tempering is not None:
            if saved_tempering is not None:
                self._tempering = saved_tempering
            filt["likelihood"] = self.likelihood
            filt["tempering"] = torch.tensor(self._tempering, dtype=torch.float64,
                                             device=device)
        self.state[FILTER_KEY] = filt
        self._cov_checks = CovValueCheck()

    # ------------------------------------------------------------------ tracking
    def track(self, module: nn.Module, verify: str = "first") -> "KalmanNGD":
        """Use sample-grouped Kronecker blocks (docs/math.md) for ``module``'s nn.Linear
        weights in batch mode.

        Valid when observation (j, k) depends on a tracked layer only through batch row j
        of its input and output (e.g. K class scores per image from a per-image feature).
        ``verify`` says when that is checked from the output Jacobian (a violation raises):
        ``"first"`` (default) on a layer's first batch step, ``"always"`` at every step
        (it doubles the probe backward passes and reads a device value on the host), or
        ``"never"``. A layer called more than once per closure, or fed a sequence per
        sample, falls back to the dense Jacobian with a warning.
        """
        if verify not in ("first", "always", "never"):
            raise ValueError(f"verify must be 'first', 'always' or 'never', got {verify!r}")
        ours = {id(p) for g in self.param_groups for p in g["params"]}
        for name, p in module.named_parameters():     # names for describe()
            if id(p) in ours:
                self._param_names.setdefault(p, name)
        found = 0
        for layer in module.modules():
            if (isinstance(layer, nn.Linear) and id(layer.weight) in ours
                    and layer not in self._captures):
                self._captures[layer] = LinearCapture(layer, verify)
                found += 1
        if found == 0 and not any(layer in self._captures for layer in module.modules()):
            raise ValueError("track(module): module has no nn.Linear whose weight is a parameter "
                             "of this optimizer")
        return self

    def untrack(self) -> None:
        """Remove every hook installed by :meth:`track`."""
        for capture in self._captures.values():
            capture.remove()
        self._captures.clear()

    # ------------------------------------------------------------------ report
    def _record_blocks(self, mode: str, reached, unreached, obs=None) -> None:
        """Keep what this step gave each parameter, for :meth:`describe`: references only
        (the loss step's host path is timed; docs/design.md, 8)."""
        self._last_blocks = (mode, reached, unreached,
                             None if obs is None else (obs.kron_weights, obs.kron_biases,
                                                       obs.fallbacks))

    def describe(self, module: Optional[nn.Module] = None) -> OptimizerReport:
        """A per-parameter report (:class:`~kalman_kernels.report.OptimizerReport`): for
        each parameter its name, shape, the block kind the last step gave it (Kronecker,
        dense, loss-diagonal, unused, frozen, or not stepped yet), its covariance memory,
        and why a tracked layer's parameter got a dense block. ``str(report)`` is a table.

        ``module`` names the parameters (``module.named_parameters()``); without it, the
        names of tracked modules are used, and "group g, param i" for the rest. Reads no
        device value."""
        return build_report(self.param_groups, self.state, self._captures, self._param_names,
                            self._last_blocks, module)

    def reduce_in_backward(self, enabled: bool = True) -> "KalmanNGD":
        """Loss mode: whether g^T P- g may be summed during the backward pass (default: on).

        A post-accumulate-grad hook adds each parameter's share of g^T P- g while its fresh
        gradient is still in cache, so the step itself streams parameter, gradient and
        covariance once (5 streams instead of 7). The step uses that sum only where it is
        exactly the step's (docs/design.md, 2.2): one backward pass per parameter since the
        last step, and gradients and covariances unchanged since (no gradient accumulation,
        no clipping, no GradScaler, no torch.distributed). Anywhere else the step sums after
        backward (two passes), with the same numbers; ``diagnostics()["loss_reduction"]``
        says which path the last loss step took and why. ``enabled=False`` always takes
        the two-pass path (and the hooks compute nothing). Returns ``self``.
        """
        if enabled and self._sharded is not None:
            raise ValueError("KalmanNGD.reduce_in_backward() does not compose with FSDP2 yet: "
                             "the gradient shards arrive after backward's reduce-scatter; the "
                             "sharded loss step reduces g^T P g over the shards itself")
        self._tape.enabled = bool(enabled)
        return self

    def _install_grad_hooks(self) -> None:
        """One post-accumulate-grad hook per parameter: it records into the tape which
        gradients backward produced (inside the step's closure: torch.optim's closure
        convention) and adds the parameter's share of g^T P- g while the gradient is fresh
        (see kalman_kernels/_loss_tape.py)."""
        me = weakref.ref(self)
        for p, group in self._params():
            if id(p) in self._hooked:
                continue

            mine = weakref.ref(p)

            def hook(param, group=group, mine=mine):
                opt = me()
                if opt is None or param is not mine() or param.grad is None or compiling():
                    return      # (a deepcopy of the parameter may carry the hook along)
                tape = opt._tape
                compute = (tape.enabled and opt.process_group is None
                           and not (torch.distributed.is_available()
                                    and torch.distributed.is_initialized()))
                kernels = None
                if compute:     # resolved once per (backend, device kind)
                    key = (opt.backend, param.is_cpu)
                    kernels = opt._hook_kernels.get(key)
                    if kernels is None:
                        kernels = opt._hook_kernels[key] = resolve(opt.backend, param.device)
                tape.record(param, kernels, lambda: opt._cov(param, group),
                            float(group["forgetting"]), float(group["process_noise"]),
                            compute)

            self._hooked[id(p)] = p.register_post_accumulate_grad_hook(hook)

    def observe(self, loss) -> "KalmanNGD":
        """Hand the loss of a backward pass to the next :meth:`step` (loss-observation
        mode without a closure).

        For training loops that call ``step()`` without a closure (Hugging Face
        ``Trainer``, ``GradScaler.step(opt)``): call ``loss.backward()`` (or
        ``scaler.scale(loss).backward()``), then ``opt.observe(loss)`` with the same loss,
        *unscaled* (not ``scaler.scale(loss)``: nothing in the scaled tensor tells it apart,
        so this is not checked), then ``opt.step()``. The step observes the sum of the
        losses observed since the last step (gradient accumulation: observe each
        micro-batch's loss, the tensor you called backward on) against the gradients in
        ``.grad`` (every parameter whose ``.grad`` is not None, as torch.optim's optimizers
        use them). ``zero_grad()``
        forgets the observed losses with the gradients. Inside a closure, observed losses
        replace the closure's return value. ``loss``: a 1-element floating tensor (with or
        without its graph; its value is what is used). Returns ``self``.
        """
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"observe(loss) takes the loss tensor you called backward on, got "
                            f"{describe(loss)}; a Python number has no device and no link to "
                            f"the gradients: pass the tensor (e.g. opt.observe(loss) after "
                            f"loss.backward())")
        if loss.numel() != 1 or not loss.is_floating_point():
            raise TypeError(f"observe(loss): the loss must be a 1-element floating tensor, got "
                            f"{loss.dtype} of shape {tuple(loss.shape)}; reduce it (e.g. "
                            f".mean()) before backward and observe the reduced loss")
        if not (loss.is_cpu and self._device().type == "cpu") and \
                loss.device != self._device():
            raise ValueError(f"observe(loss): the loss is on {loss.device} but the parameters "
                             f"are on {self._device()}")
        self._install_grad_hooks()
        self._tape.observe(loss)
        return self

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch.optim's zero_grad; also forgets the losses observed since the last step
        (their gradients are gone)."""
        super().zero_grad(set_to_none=set_to_none)
        tape = self._tape
        in_closure = tape.in_closure
        enabled, last = tape.enabled, tape.last_path
        tape.reset()
        tape.in_closure, tape.enabled, tape.last_path = in_closure, enabled, last

    # ------------------------------------------------------------------ step
    def step(self, closure: Optional[Callable] = None):
        """One Kalman step on the observation returned by ``closure``, or, without a
        closure, on the losses handed over by :meth:`observe` since the last step.

        What the closure may return (docs/design.md, 2.2 and 3):

        * ``(pred, target)``: batch-observation mode (``(logits, labels)`` with
          ``likelihood="categorical"``);
        * a loss tensor with its graph and no backward inside: loss mode, KalmanNGD
          differentiates it;
        * the loss after ``loss.backward()`` inside the closure (torch.optim's convention;
          with or without its graph, e.g. ``loss.detach()``): loss mode on the gradients
          that backward left;
        * a Python number (int or float): accepted as the loss value only when a backward
          pass ran inside the closure (the number is then taken to be the value of the
          loss that backward differentiated); without one it is refused, since a number
          carries no gradient;
        * ``None``: nothing is observed and nothing changes when no backward ran (as a
          torch.optim optimizer does without gradients); refused when one did (the step
          would not know the loss).

        Returns the loss tensor in loss-observation mode and the mean squared residual in
        batch mode. ``self.last_info`` holds the :class:`~kalman_kernels.ops.KalmanInfo`.
        """
        try:
            return self._checked_step(closure)
        except BaseException:
            # GradScaler.step deletes the grad_scale / found_inf it set only after a step
            # that returned; left behind, they would make the next step look scaled
            for name in ("grad_scale", "found_inf"):
                self.__dict__.pop(name, None)
            raise

    def _checked_step(self, closure):
        tape = self._tape
        if hasattr(self, "found_inf") and closure is not None:
            # GradScaler.step(opt, closure): the scaler unscales before the closure runs
            raise RuntimeError("KalmanNGD.step: GradScaler.step(opt, closure) would observe "
                               "the scaled gradients the closure's backward makes; run "
                               "scaler.scale(loss).backward() yourself, then "
                               "opt.observe(loss) with the unscaled loss, then "
                               "scaler.step(opt) without a closure")
        if closure is None and tape.observed is None:
            raise ValueError(
                "KalmanNGD.step() got no closure and no loss was observed since the last step "
                "(the loss is the observation): call opt.observe(loss) after loss.backward() "
                "and before opt.step() (the unscaled loss under a GradScaler), or pass a "
                "closure: opt.step(closure). With Hugging Face Trainer use "
                "kalman_kernels.integrations.KalmanTrainer; with Lightning, "
                "kalman_kernels.integrations.KalmanObserveLoss (README, 'Using KalmanNGD with "
                "trainers')")
        try:
            return self._step(closure)
        finally:
            enabled, last = tape.enabled, tape.last_path
            tape.reset()
            tape.enabled, tape.last_path = enabled, last

    def _step(self, closure):
        tape = self._tape
        self._filter.pending.poll()
        self._check_groups()
        self._check_cov_values()
        self._install_grad_hooks()
        self._written_covs = None     # the loss step names the covariances it wrote
        if closure is None:
            if self._sharded is not None:
                raise ValueError("KalmanNGD.step() without a closure (opt.observe(loss)) does "
                                 "not compose with FSDP2 yet: pass the closure, "
                                 "opt.step(closure)")
            result = self._loss_step(tape.observed, "observed")
        else:
            result = self._closure_step(closure)
        if not compiling():
            written = self._written_covs
            self._cov_checks.record(written if written is not None else
                                    (self.state[p]["cov"] for p, _ in self._params()
                                     if "cov" in self.state[p]))
        return result

    def _closure_step(self, closure):
        tape = self._tape
        sharded = self._sharded      # FSDP2 parameters: the steps of kalman_kernels/fsdp.py
        snapshot = sharded.before_closure() if sharded is not None else None
        for capture in self._captures.values():
            capture.calls.clear()
            capture.armed = True
        tape.in_closure = True
        try:
            with torch.enable_grad():
                out = closure()
        finally:
            tape.in_closure = False
            for capture in self._captures.values():
                capture.armed = False
        try:
            if isinstance(out, (tuple, list)) and len(out) == 2:
                return (self._batch_step(*out) if sharded is None
                        else sharded.batch_step(*out))
            if sharded is not None:
                if not isinstance(out, torch.Tensor):
                    raise TypeError(f"under FSDP2 the closure must return (pred, target) "
                                    f"tensors or the scalar loss tensor, got {describe(out)}")
                return sharded.loss_step(out, snapshot)
            backward = tape.backward_inside > 0
            if tape.observed is not None:
                if tape.observed_before and backward and not tape.observed_inside:
                    raise ValueError(
                        "KalmanNGD.step(closure): losses were observed before the step, but "
                        "the closure's own backward pass was not: its gradient is in .grad "
                        "while its loss is not in the observation. Call opt.observe(loss) in "
                        "the closure too (observed losses replace its return value), or "
                        "observe nothing and return the summed loss from the closure")
                return self._loss_step(tape.observed, "observed")
            if tape.accumulated_across:
                raise ValueError(
                    "KalmanNGD.step(closure): the closure's backward added to gradients that "
                    "a backward pass outside the closure left since the last step (gradient "
                    "accumulation over micro-batches, e.g. Lightning's "
                    "accumulate_grad_batches), but the closure's loss covers only its own "
                    "pass. Hand the other micro-batches' losses to opt.observe(loss) (with "
                    "Lightning: the kalman_kernels.integrations.KalmanObserveLoss callback), "
                    "accumulate inside one closure and return the summed loss, or call "
                    "opt.zero_grad() if those gradients are stale")
            if out is None:
                if backward:
                    raise TypeError("closure ran backward but returned None: return the loss "
                                    "(KalmanNGD observes its value), or opt.observe(loss) "
                                    "inside the closure")
                return None
            if isinstance(out, numbers.Real) and not isinstance(out, bool):  # NumPy's too
                if not backward:
                    raise TypeError(
                        f"closure returned a Python number ({out!r}) and ran no backward pass "
                        f"over the parameters: a number carries no gradient. Call "
                        f"loss.backward() in the closure (the number is then taken as that "
                        f"loss's value), or return the loss tensor itself")
                out = torch.tensor(float(out), dtype=torch.float64, device=self._device())
            if isinstance(out, torch.Tensor):
                return self._loss_step(out, "closure" if backward else "graph")
            raise TypeError(f"closure must return (pred, target) tensors, a scalar loss tensor "
                            f"or (after loss.backward() inside it) the loss as a number; got "
                            f"{describe(out)}")
        finally:
            for capture in self._captures.values():
                capture.calls.clear()

    def _check_groups(self) -> None:
        """Groups edited since the last step (a scheduler's lr, a user's cov_floor) are
        validated again; unchanged ones are not (their values are compared, not re-checked:
        the validation and the StepHyper it yields are functions of those values)."""
        checked = self._checked_groups
        for i, group in enumerate(self.param_groups):
            values = tuple(group[k] for k in _GROUP_KEYS)
            entry = checked.get(id(group))
            if entry is None or entry[0] != values:
                _check_group(group, where=f"param group {i} (checked at every step)")
                self._warn_small_lr(i, group)
                checked[id(group)] = (values, self._hyper(group))

    def _warn_small_lr(self, index: int, group: dict) -> None:
        """Once per optimizer: an lr that reads like a learning rate (see SMALL_LR)."""
        if "small-lr" in self._filter.warned or compiling():
            return
        ranks = 1
        if self.process_group is not None and torch.distributed.is_initialized():
            ranks = torch.distributed.get_world_size(self.process_group)
        lr = float(group["lr"])
        if lr >= SMALL_LR / ranks:
            return
        self._filter.warn_once(
            "small-lr", f"KalmanNGD: lr={lr:g} (param group {index}) is a step scale, not a "
            f"learning rate: 1.0 is the exact Kalman update, and lr={lr:g} moves the mean "
            f"{lr:g} of the way while the covariance shrinks as if it had moved all of it, so "
            f"training stalls near the start. Leave lr=1.0 (lr=1/W under a process group of W "
            f"ranks); for smaller, AdamW-like steps lower init_cov or raise obs_noise (README, "
            f"'Coming from AdamW').", UserWarning)

    def _hyper_of(self, group: dict) -> StepHyper:
        """The group's StepHyper as validated at the start of this step."""
        entry = self._checked_groups.get(id(group))
        return entry[1] if entry is not None else self._hyper(group)

    def _check_cov_values(self) -> None:
        """Covariances edited in place since the last step (through covariance(p)) must
        still be finite and >= 0; unedited ones are not read (see CovValueCheck)."""
        if compiling():
            return
        named = []
        known = self._cov_checks._known
        for i, (p, _) in enumerate(self._params()):
            cov = self.state[p].get("cov") if p in self.state else None
            if cov is not None and not known(cov):      # names only for what is read
                named.append((f"the covariance of parameter {i} (shape {tuple(p.shape)})", cov))
        if named:
            self._cov_checks(named)

    # ------------------------------------------------------------------ process groups
    def _rank_key(self, mode: str) -> Optional[int]:
        """The hash of what every rank must agree on (kalman_kernels.distributed): the mode,
        the observation's settings, the param groups' hyper-parameters and the parameters'
        shapes; None without a process group and while torch.compile traces."""
        if self._ranks.process_group is None or compiling():
            return None
        r = self.obs_noise
        noise = (("tensor", tuple(r.shape)) if isinstance(r, torch.Tensor) else float(r))
        kernels = resolve(self.backend, self._device())
        tracked = tuple(sorted(i for i, (p, _) in enumerate(self._params())
                               if any(layer.weight is p for layer in self._captures)))
        settings = [("obs_noise", noise), ("adaptive_obs_noise", self.adaptive_obs_noise),
                    ("gate", self.gate),
                    ("backend", getattr(kernels, "NAME", str(self.backend))),
                    ("max_obs_per_update", self.max_obs_per_update), ("tracked", tracked)]
        if self._tempering is not None:
            settings.append(("likelihood", self.likelihood, self._tempering))
        config = distributed.rank_config(mode, settings, self.param_groups, _GROUP_KEYS)
        return self._ranks.key(config, self._device())

    def _loss_step(self, loss: torch.Tensor, source: str):
        """The loss step on ``loss``; ``source``: ``"closure"`` (backward ran in the closure:
        the gradients it reached), ``"graph"`` (differentiate ``loss``) or ``"observed"``
        (observe(): every ``.grad`` that is not None)."""
        if loss.numel() != 1:
            raise TypeError(f"closure returned a loss of shape {tuple(loss.shape)}; in "
                            f"loss-observation mode the loss must be a scalar (reduce it, e.g. "
                            f".mean()), or return (pred, target) for batch-observation mode")
        if not loss.is_floating_point():
            raise TypeError(f"closure returned a {loss.dtype} loss; it must be a floating tensor")
        if isinstance(self.obs_noise, torch.Tensor):
            raise ValueError("obs_noise must be a float in loss-observation mode (one "
                             "observation per step), got a tensor")
        if not (loss.is_cpu and self.param_groups[0]["params"][0].is_cpu) and \
                loss.device != self._device():
            raise ValueError(f"closure returned a loss on {loss.device} but the parameters are "
                             f"on {self._device()}")
        rank_key = self._rank_key("loss")
        pairs = self._params()
        params = [p for p, _ in pairs]
        scaler = hasattr(self, "found_inf")   # GradScaler.step set grad_scale and found_inf
        if source == "closure":
            # torch.optim's closure convention: the gradients backward left -- only those
            # that this closure's backward reached (a stale .grad from an earlier step, or
            # a zeroed one the loss never touched, is not a gradient of this loss).
            seen = self._tape.seen_inside
            grads = [p.grad if id(p) in seen else None for p in params]
        elif source == "observed":
            grads = [p.grad for p in params]
        elif loss.requires_grad:
            grads = list(torch.autograd.grad(loss.reshape(()), params, allow_unused=True))
        else:
            raise ValueError("closure returned a loss that does not require grad and its "
                             "backward pass (if any) reached no parameter of this optimizer: "
                             "call loss.backward() in the closure on a loss computed from the "
                             "optimised parameters, or return the loss tensor with its graph "
                             "(KalmanNGD then differentiates it)")
        if all(g is None for g in grads):
            raise ValueError("the loss does not depend on any parameter of this optimizer (no "
                             "gradient reached them); check the closure and the params given "
                             "to KalmanNGD" if source != "observed" else
                             "KalmanNGD.step(): a loss was observed but no parameter of this "
                             "optimizer has a gradient: call loss.backward() before "
                             "opt.observe(loss) and opt.step(), and zero_grad() after the "
                             "step, not between")
        if scaler and getattr(self, "grad_scale", None) is not None:
            # GradScaler hands the unscaling to the optimizer (_step_supports_amp_scaling):
            # unscale in place, as its unscale_ would (an overflow then shows as a
            # non-finite gradient and skips the step); never observe scaled gradients
            present = [g for g in grads if g is not None]
            inv = self.grad_scale.double().reciprocal().float()
            torch._amp_foreach_non_finite_check_and_unscale_(
                present, torch.zeros_like(self.found_inf), inv.to(present[0].device))
        if self.process_group is not None:
            # every rank all-reduces the same layout: zero gradients where its loss is flat
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        used = [(p, g, grad) for (p, g), grad in zip(pairs, grads) if grad is not None]
        quad_form = None
        if source != "graph":
            quad_form = self._tape.reduction(used, self._cov, self._hyper_of, scaler,
                                             lambda: resolve(self.backend, self._device()))
        else:
            self._tape.last_path = "two-pass: the closure returned the loss with its graph"
        if self.process_group is not None:
            self._ranks.check_ddp_grads_once(loss, [grad for _, _, grad in used])
        loss_value = loss.detach()
        covs = [self._cov(p, g) for p, g, _ in used]
        untouched = [(self._cov(p, g), self._hyper_of(g))
                     for (p, g), grad in zip(pairs, grads) if grad is None]
        self._written_covs = covs + [c for c, _ in untouched]
        self._record_blocks("loss", [p for p, _, _ in used],
                            [p for (p, _), grad in zip(pairs, grads) if grad is None])
        staging = Staging()
        kalman_ngd_loss_step(
            [staging.stage(_real(p)) for p, _, _ in used],
            [Staging.read(_real(grad.detach() if grad.requires_grad else grad))
             for _, _, grad in used],
            covs, [self._hyper_of(g) for _, g, _ in used], loss_value, self._filter,
            obs_noise=self.obs_noise, gate=self.gate,
            adaptive_obs_noise=self.adaptive_obs_noise, backend=self.backend,
            quad_form=quad_form, process_group=self.process_group, rank_key=rank_key,
            untouched=untouched)
        staging.write_back()
        return loss_value

    def _batch_step(self, pred, target):
        if self._tempering is not None:
            return self._categorical_step(pred, target)
        check_prediction(pred, target, self._device())
        obs = self._batch_update(pred, target, self.obs_noise)
        return obs.residual.square().mean()

    def _categorical_step(self, logits, labels):
        """Batch mode with the categorical likelihood: the K - 1 kept probabilities of each
        sample are the observations, with the residual and the (m, m) noise of
        :func:`~.observations.categorical_terms`. Returns the batch's mean cross-entropy
        before the step."""
        cat = categorical_observation(logits, labels, self._tempering, self._device())
        m = cat.residual.shape[0]
        try:
            self._batch_update(cat.pred, None, cat.noise, residual=cat.residual,
                               extra_bytes=2 * 8 * m * m)   # R and its validation's factor
        except MemoryError as exc:
            raise MemoryError(f"{exc} (likelihood='categorical' cannot split a batch: its "
                              f"noise is one (m, m) matrix with m = B (K - 1); for a "
                              f"softmax head with many classes use its class-structured "
                              f"step, kalman_kernels.ops.categorical_head_update_)") from None
        return cat.loss

    def _batch_update(self, pred, target, noise, residual=None, extra_bytes: int = 0):
        """The Kalman step of a validated batch observation ``pred`` (with its graph) against
        ``target`` (or the given float64 ``residual``) with noise ``noise``."""
        rank_key = self._rank_key("batch")
        pairs = self._params()
        m = pred.numel()
        kron_ids = {id(layer.weight) for layer in self._captures}
        dense_numel = sum(p.numel() for p, _ in pairs if id(p) not in kron_ids)
        chunk = m if self.max_obs_per_update is None else min(m, self.max_obs_per_update)
        check_workspace(chunk, pred.device, dense_numel=dense_numel,
                        jacobian_bytes=2 * m * dense_numel * pred.element_size(),
                        where="KalmanNGD.step (batch mode)",
                        chunked=self.max_obs_per_update is not None, extra_bytes=extra_bytes)
        obs = batch_observation(pred, target, pairs, self._captures, self._cov,
                                self._hyper_of, self._filter.warn_once, residual=residual)
        if not obs.blocks:
            raise ValueError("pred does not depend on any parameter of this optimizer")
        self._record_blocks("batch", obs.origin, [p for p, _ in obs.untouched], obs)
        staging = Staging()
        blocks = [stage_block(block, staging) for block in obs.blocks]
        distributed_step = self.process_group is not None
        # untouched parameters are written only under a process group (zero terms)
        untouched = [(staging.stage(_real(p)) if distributed_step else p, self._cov(p, g),
                      self._hyper_of(g)) for p, g in obs.untouched]
        order = None
        if distributed_step:
            index = {id(p): i for i, (p, _) in enumerate(pairs)}
            order = {id(block_param(b)): index[id(p)] for b, p in zip(blocks, obs.origin)}
            order.update((id(t), index[id(p)]) for (t, _, _), (p, _) in
                         zip(untouched, obs.untouched))
        kalman_ngd_batch_step(
            blocks, obs.hypers, obs.residual, noise, self._filter, gate=self.gate,
            adaptive_obs_noise=self.adaptive_obs_noise, backend=self.backend,
            process_group=self.process_group, max_obs_per_update=self.max_obs_per_update,
            untouched=untouched, param_order=order, rank_key=rank_key)
        staging.write_back()
        return obs

    # ------------------------------------------------------------------ uncertainty
    @contextlib.contextmanager
    def sampled_params(self, generator: Optional[torch.Generator] = None):
        """Inside the block every parameter is a draw theta ~ N(mu, diag P); restored after."""
        if self._sharded is not None:
            raise ValueError("KalmanNGD.sampled_params does not compose with FSDP2 yet (each "
                             "rank would draw its own shard's noise); sample on a gathered "
                             "model")
        pairs = self._params()
        saved = [p.detach().clone() for p, _ in pairs]
        try:
            with torch.no_grad():
                for p, g in pairs:
                    cov = self._cov(p, g)
                    real = _real(p)        # a complex p: its parts, each with its variance
                    noise = torch.randn(cov.shape, generator=generator, dtype=cov.dtype,
                                        device=p.device)
                    real.copy_((real.to(cov.dtype) + cov.clamp_min(0).sqrt() * noise)
                               .to(real.dtype))
            yield self
        finally:
            with torch.no_grad():
                for (p, _), value in zip(pairs, saved):
                    p.copy_(value)


# ---------------------------------------------------------------------- helpers
def _backend_names():
    from .backends import NAMES
    return NAMES


def _check_observation(obs_noise, given: bool, adaptive_obs_noise, gate, max_obs_per_update,
                       backend, likelihood):
    """Validate the arguments of the observation shared by every param group; returns the
    noise to keep (a float, or a detached copy of a tensor) and the categorical tempering
    (None for the Gaussian likelihood). ``given``: obs_noise was passed."""
    if isinstance(obs_noise, torch.Tensor):
        ops.obs_noise_matrix(obs_noise, obs_noise.shape[0] if obs_noise.dim() else 1,
                             obs_noise.device)
        obs_noise = obs_noise.detach().clone()
    else:
        ops.obs_noise_matrix(obs_noise, 1, "cpu")
        obs_noise = float(obs_noise)
    if not (isinstance(adaptive_obs_noise, (int, float)) and 0.0 <= adaptive_obs_noise <= 1.0):
        raise ValueError(f"adaptive_obs_noise must be an EMA rate in [0, 1] (0 = off), got "
                         f"{adaptive_obs_noise!r}")
    if adaptive_obs_noise > 0 and isinstance(obs_noise, torch.Tensor):
        raise ValueError("adaptive_obs_noise needs a scalar obs_noise; it cannot adapt an "
                         "(m,) or (m, m) tensor")
    ops.check_gate(gate)
    if max_obs_per_update is not None and (isinstance(max_obs_per_update, bool) or not
                                           isinstance(max_obs_per_update, int) or
                                           max_obs_per_update < 1):
        raise ValueError(f"max_obs_per_update must be None or an int >= 1, got "
                         f"{max_obs_per_update!r}")
    if backend not in ("auto",) + _backend_names():
        raise ValueError(f"backend must be one of {('auto',) + _backend_names()}, got "
                         f"{backend!r}")
    return obs_noise, _categorical_tempering(likelihood, obs_noise, given, adaptive_obs_noise,
                                             max_obs_per_update)


def _categorical_tempering(likelihood, obs_noise, given: bool, adaptive_obs_noise,
                           max_obs_per_update) -> Optional[float]:
    """Validate ``likelihood`` and what it allows; the tempering c of the categorical noise
    R = c (diag(p) - p p^T) (None for the Gaussian likelihood). ``obs_noise`` was validated
    as a noise already (a finite number > 0 or a tensor)."""
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
    if likelihood == "gaussian":
        return None
    if isinstance(obs_noise, torch.Tensor) and obs_noise.dim() != 0:
        raise ValueError(f"likelihood='categorical' takes a scalar obs_noise: the tempering c "
                         f"of the noise R = c (diag(p) - p p^T) that the softmax gives; got a "
                         f"tensor of shape {tuple(obs_noise.shape)}. An (m,) or (m, m) noise "
                         f"belongs to the Gaussian likelihood; pass a float (default 1.0)")
    if adaptive_obs_noise > 0:
        raise ValueError("adaptive_obs_noise cannot be used with likelihood='categorical': "
                         "the observation noise is given by the model's probabilities, not "
                         "estimated from the residuals; set adaptive_obs_noise=0 and, to "
                         "temper the likelihood, pass a fixed obs_noise c")
    if max_obs_per_update is not None:
        raise ValueError("max_obs_per_update cannot be used with likelihood='categorical': "
                         "its noise is one (m, m) matrix, which the sub-batches would have to "
                         "split; use smaller batches, or for a softmax head with many "
                         "classes its class-structured step "
                         "(kalman_kernels.ops.categorical_head_update_)")
    if not given:
        return 1.0       # R = Lambda: the natural gradient of the cross-entropy itself
    if isinstance(obs_noise, torch.Tensor):
        value = obs_noise.detach()
        if value.device.type == "meta":
            raise ValueError("likelihood='categorical' needs a value for obs_noise; a meta "
                             "tensor has none: pass a float")
        return float(value)
    return float(obs_noise)


def _check_group(group: dict, where: str) -> None:
    if isinstance(group["lr"], torch.Tensor):
        # torch.optim's wording. A tensor lr pays off where a step is captured (CUDA graphs,
        # torch.compile without recompiling on a new lr); KalmanNGD.step is neither, and
        # its step decides on host numbers (docs/design.md, 4.2), so it would only add a
        # host read of the tensor at every step.
        raise ValueError(f"lr as a Tensor is not supported for KalmanNGD ({where}): lr is a "
                         f"step scale that every step uses as a Python number; pass "
                         f"lr=float(lr) (LR schedulers work with a float lr)")
    ceiling = group.get("cov_ceiling")
    ops.check_hyper(lr=group["lr"], forgetting=group["forgetting"],
                    process_noise=group["process_noise"], cov_floor=group["cov_floor"],
                    cov_ceiling=math.inf if ceiling is None else ceiling,
                    cov_update=group["cov_update"], where=where)
    init_cov = group["init_cov"]
    if not (isinstance(init_cov, (int, float)) and math.isfinite(init_cov) and init_cov > 0):
        raise ValueError(f"{where}: init_cov must be a finite number > 0 (the prior variance), "
                         f"got {init_cov!r}")
