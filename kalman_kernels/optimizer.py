"""KalmanNGD: natural-gradient descent as a diagonal Kalman filter (DESIGN sections 2, 3).

The parameters are a Gaussian N(mu, diag P). ``step(closure)`` treats one minibatch as one
observation of the model:

* batch-observation mode: ``closure() -> (pred, target)`` with shapes (m,) or (m, K).
  The m*K predictions (flattened row-major) are the observations; their Jacobian is
  computed inside by batched autograd, or through sample-grouped Kronecker blocks for
  ``nn.Linear`` layers registered with :meth:`KalmanNGD.track` (:mod:`.observations`).
* loss-observation mode: ``closure() -> loss`` (a scalar tensor). The loss itself is one
  observation with target 0 (DESIGN 2.2). The closure may follow torch.optim's convention
  (zero the gradients, call ``loss.backward()``, return the loss: the gradients backward
  left are used) or return the loss with its graph (the optimizer differentiates it).

Like ``torch.optim.AdamW`` this class gathers state and calls a functional step
(:mod:`kalman_kernels.ops`); the step reads no device value on the host (DESIGN 4), so its
counters (``steps``, ``skipped_steps``) and the adaptive noise live in device tensors and
``last_info`` converts to Python numbers only when read.

Hyper-parameters that belong to a parameter (``lr``, ``init_cov``, ``process_noise``,
``forgetting``, ``cov_floor``, ``cov_ceiling``, ``cov_update``) may differ between param
groups. Those that belong to the observation (``obs_noise``, ``adaptive_obs_noise``,
``gate``, ``process_group``, ``backend``) are shared by every group and set on the
optimizer.
"""
from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from . import ops
from ._deferred import PendingFlags, compiling
from .backends import resolve
from .observations import LinearCapture, batch_observation
from .ops import KalmanInfo, StepHyper

_GROUP_KEYS = ("lr", "init_cov", "process_noise", "forgetting", "cov_floor", "cov_ceiling",
               "cov_update")
_OBSERVATION_KEYS = ("obs_noise", "adaptive_obs_noise", "gate", "process_group", "backend")
_FILTER = "filter"   # key of the optimizer-wide state (a string, so state_dict keeps it)


def _cov_dtype(param: torch.Tensor) -> torch.dtype:
    return torch.float64 if param.dtype == torch.float64 else torch.float32


class KalmanNGD(torch.optim.Optimizer):
    """Kalman-filter natural-gradient optimizer.

    Args:
        params: parameters or param groups.
        lr: step scale alpha of the mean update (1.0 = the exact Kalman update).
        init_cov: prior variance P0 of every parameter (the prior mean is its value).
        obs_noise: observation noise R: a float r (R = r I), an (m,) tensor or an (m, m)
            tensor.
        process_noise: q >= 0 added to P at every predict step.
        forgetting: lam in (0, 1]; P- = P / lam + q.
        cov_floor, cov_ceiling: P is clamped to [cov_floor, cov_ceiling] (None: no ceiling).
        adaptive_obs_noise: EMA rate beta of the innovation-based noise estimate (0: off).
        gate: chi-square probability (e.g. 0.999) beyond which a batch's step is shrunk,
            or None.
        cov_update: ``"kalman"`` (exact diagonal of (I - KH)P-) or ``"information"``.
        process_group: a torch.distributed group; every rank observes its own batch and
            all ranks apply the same all-reduced update (DESIGN 2.5).
        backend: ``"auto"``, ``"reference"``, ``"cpp"``, ``"triton"`` or ``"cuda"``.
    """

    def __init__(self, params, lr: float = 1.0, init_cov: float = 1e-3, obs_noise=1e-2,
                 process_noise: float = 0.0, forgetting: float = 1.0, cov_floor: float = 1e-12,
                 cov_ceiling: Optional[float] = None, adaptive_obs_noise: float = 0.0,
                 gate: Optional[float] = None, cov_update: str = "kalman", process_group=None,
                 backend: str = "auto"):
        defaults = dict(lr=lr, init_cov=init_cov, process_noise=process_noise,
                        forgetting=forgetting, cov_floor=cov_floor, cov_ceiling=cov_ceiling,
                        cov_update=cov_update)
        _check_group(defaults, where="KalmanNGD")
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
        if backend not in ("auto",) + _backend_names():
            raise ValueError(f"backend must be one of {('auto',) + _backend_names()}, got "
                             f"{backend!r}")
        self.obs_noise = obs_noise
        self.adaptive_obs_noise = float(adaptive_obs_noise)
        self.gate = gate
        self.process_group = process_group
        self.backend = backend
        self.last_info: Optional[KalmanInfo] = None
        self._captures: Dict[nn.Linear, LinearCapture] = {}
        self._warned: set = set()
        self._pending = PendingFlags()
        self._quad = None            # QuadFormAccumulator when reduce_in_backward() is on
        self._hooked: Dict[int, object] = {}
        self._in_closure = False
        self._backward_calls = 0
        super().__init__(params, defaults)
        device = self._device()
        self.state[_FILTER] = {
            "steps": torch.zeros((), dtype=torch.int64, device=device),
            "skipped_steps": torch.zeros((), dtype=torch.int64, device=device),
            "obs_noise": (torch.tensor(obs_noise, dtype=torch.float64, device=device)
                          if isinstance(obs_noise, float) else None)}
        if backend != "auto":
            resolve(backend, device)   # fail now, with the reason, not at step 1

    # ------------------------------------------------------------------ param groups
    def add_param_group(self, param_group: dict) -> None:
        for key in _OBSERVATION_KEYS:
            if key in param_group:
                raise ValueError(f"{key} belongs to the observation shared by all param groups;"
                                 f" set it on KalmanNGD(...), not in a param group")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_group(group, where=f"param group {len(self.param_groups) - 1}")
        for p in group["params"]:
            if not p.is_floating_point():
                raise TypeError(f"KalmanNGD optimises floating-point parameters, got {p.dtype}")
        devices = {p.device for g in self.param_groups for p in g["params"]}
        if len(devices) > 1:
            raise ValueError(f"all parameters must be on one device, got {sorted(map(str, devices))}")

    def _device(self) -> torch.device:
        return self.param_groups[0]["params"][0].device

    def _params(self):
        return [(p, g) for g in self.param_groups for p in g["params"] if p.requires_grad]

    # ------------------------------------------------------------------ state
    def _cov(self, p: torch.Tensor, group: dict) -> torch.Tensor:
        state = self.state[p]
        if "cov" not in state:
            state["cov"] = torch.full_like(p, float(group["init_cov"]), dtype=_cov_dtype(p),
                                           memory_format=torch.contiguous_format)
        return state["cov"]

    def _group_of(self, p: torch.Tensor) -> dict:
        for g in self.param_groups:
            if any(q is p for q in g["params"]):
                return g
        raise ValueError("covariance(p): p is not a parameter of this optimizer")

    def covariance(self, p: torch.Tensor) -> torch.Tensor:
        """The diagonal covariance P of parameter ``p`` (same shape; the prior before step 1)."""
        return self._cov(p, self._group_of(p))

    @property
    def skipped_steps(self) -> int:
        """Steps skipped so far (a non-finite observation or a failed factorisation)."""
        self._pending.poll(wait=True)
        return int(self.state[_FILTER]["skipped_steps"])

    @property
    def steps_taken(self) -> int:
        """Steps applied so far."""
        return int(self.state[_FILTER]["steps"])

    def _current_obs_noise(self):
        r = self.state[_FILTER].get("obs_noise")
        return r if (r is not None and self.adaptive_obs_noise > 0) else self.obs_noise

    @staticmethod
    def _hyper(group: dict) -> StepHyper:
        ceiling = group["cov_ceiling"]
        return StepHyper(float(group["lr"]), float(group["forgetting"]),
                         float(group["process_noise"]), float(group["cov_floor"]),
                         math.inf if ceiling is None else float(ceiling),
                         group["cov_update"] == "information")

    def state_dict(self):
        sd = super().state_dict()
        sd["state"][_FILTER] = dict(sd["state"].get(_FILTER, {}))
        return sd

    def load_state_dict(self, state_dict) -> None:
        # torch casts floating state to the parameter's dtype: a bf16 parameter's float32
        # covariance would come back rounded to bf16. Keep the saved covariances' dtype.
        saved_covs = {k: v["cov"] for k, v in state_dict["state"].items()
                      if isinstance(k, int) and isinstance(v, dict) and "cov" in v}
        for g in state_dict["param_groups"]:
            for key in _OBSERVATION_KEYS:
                if key in g:
                    raise ValueError(f"state_dict param group carries {key!r}, which is set on "
                                     f"the optimizer, not per group")
        super().load_state_dict(state_dict)
        flat = [p for g in self.param_groups for p in g["params"]]
        for index, cov in saved_covs.items():
            p = flat[index]
            self.state[p]["cov"] = cov.detach().to(device=p.device,
                                                   dtype=torch.promote_types(cov.dtype, _cov_dtype(p)),
                                                   copy=True)
        device = self._device()
        saved = dict(state_dict["state"].get(_FILTER, {}))
        filt = {}
        for key in ("steps", "skipped_steps"):
            filt[key] = torch.as_tensor(saved.get(key, 0), dtype=torch.int64).to(device).clone()
        r = saved.get("obs_noise")
        filt["obs_noise"] = (None if r is None else
                             torch.as_tensor(r, dtype=torch.float64).to(device).clone())
        self.state[_FILTER] = filt
        for group in self.param_groups:
            _check_group(group, where="loaded param group")

    # ------------------------------------------------------------------ tracking
    def track(self, module: nn.Module, verify: str = "first") -> "KalmanNGD":
        """Use sample-grouped Kronecker blocks (DESIGN 2.1) for ``module``'s nn.Linear
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
        found = 0
        for layer in module.modules():
            if isinstance(layer, nn.Linear) and id(layer.weight) in ours and layer not in self._captures:
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

    def reduce_in_backward(self) -> "KalmanNGD":
        """Loss mode, fused: sum g^T P- g during the backward pass (DESIGN 2.2).

        The closure then runs ``loss.backward()`` itself (the usual PyTorch closure). A
        post-accumulate-grad hook adds each parameter's share of g^T P- g while its fresh
        gradient is still in cache, so the step itself streams parameter, gradient and
        covariance once (5 streams instead of 7). It needs exactly one backward per step:
        with gradient accumulation the step recomputes the sum (and warns once).
        """
        if self._quad is None:
            from .backends.loss_hooks import QuadFormAccumulator
            self._quad = QuadFormAccumulator()
        return self

    def _install_grad_hooks(self) -> None:
        """One post-accumulate-grad hook per parameter: it records that backward ran inside
        the closure (torch.optim's closure convention) and, with reduce_in_backward(), adds
        the parameter's g^T P- g while the gradient is fresh."""
        me = weakref.ref(self)
        for p, group in self._params():
            if id(p) in self._hooked:
                continue

            def hook(param, group=group):
                opt = me()
                if opt is None or not opt._in_closure:
                    return
                opt._backward_calls += 1
                if opt._quad is not None and param.grad is not None:
                    kernels = resolve(opt.backend, param.device)
                    opt._quad.add(kernels, param.grad, opt._cov(param, group),
                                  float(group["forgetting"]), float(group["process_noise"]))

            self._hooked[id(p)] = p.register_post_accumulate_grad_hook(hook)

    # ------------------------------------------------------------------ step
    def step(self, closure: Optional[Callable] = None):
        """One Kalman step on the observation returned by ``closure``.

        Returns the loss tensor in loss-observation mode and the mean squared residual in
        batch mode. ``self.last_info`` holds the :class:`~kalman_kernels.ops.KalmanInfo`.
        """
        if closure is None:
            raise ValueError("KalmanNGD.step needs a closure: closure() -> (pred, target) for "
                             "batch observations, or closure() -> scalar loss tensor")
        self._pending.poll()
        self._install_grad_hooks()
        for capture in self._captures.values():
            capture.calls.clear()
            capture.armed = True
        if self._quad is not None:
            self._quad.reset()
        self._backward_calls = 0
        self._in_closure = True
        try:
            with torch.enable_grad():
                out = closure()
        finally:
            self._in_closure = False
            for capture in self._captures.values():
                capture.armed = False
        try:
            if isinstance(out, (tuple, list)) and len(out) == 2:
                return self._batch_step(*out)
            if isinstance(out, torch.Tensor):
                return self._loss_step(out, self._backward_calls > 0)
            raise TypeError(f"closure must return (pred, target) tensors or a scalar loss "
                            f"tensor, got {_describe(out)}")
        finally:
            for capture in self._captures.values():
                capture.calls.clear()

    def _record(self, info: KalmanInfo) -> None:
        """Counters and adaptive noise on the device; the skip warning once the flag has
        reached the host (see :mod:`kalman_kernels._deferred`)."""
        self.last_info = info
        filt = self.state[_FILTER]
        skipped = info.skipped_tensor.to(filt["steps"].device)
        filt["skipped_steps"].add_(skipped.to(torch.int64))
        filt["steps"].add_((~skipped).to(torch.int64))
        if self.adaptive_obs_noise > 0 and info.obs_noise_tensor is not None:
            filt["obs_noise"] = info.obs_noise_tensor.detach().to(torch.float64).reshape(())
        if "skip" in self._warned:
            return

        def callback(was_skipped: bool, info=info) -> None:
            if was_skipped and "skip" not in self._warned:
                self._warned.add("skip")
                warnings.warn(f"KalmanNGD: step skipped ({info.reason}); parameters and "
                              f"covariances are unchanged. Further skips are counted in "
                              f"optimizer.skipped_steps without a warning.", RuntimeWarning,
                              stacklevel=5)

        self._pending.add(info.skipped_tensor, callback)

    def _predict_only_(self, pairs, ok: torch.Tensor) -> None:
        """Parameters the observation does not touch still go through the predict step
        (when the step is applied)."""
        for p, g in pairs:
            hp = self._hyper(g)
            cov = self._cov(p, g)
            if hp.forgetting != 1.0 or hp.process_noise != 0.0 or hp.cov_floor > 0 or \
                    math.isfinite(hp.cov_ceiling):
                new = (cov / hp.forgetting + hp.process_noise).clamp_(hp.cov_floor, hp.cov_ceiling)
                cov.copy_(torch.where(ok.to(cov.device), new, cov))

    def _loss_step(self, loss: torch.Tensor, backward_seen: bool):
        if loss.numel() != 1:
            raise TypeError(f"closure returned a loss of shape {tuple(loss.shape)}; in "
                            f"loss-observation mode it must be a scalar (reduce it, e.g. "
                            f".mean()), or return (pred, target) for batch-observation mode")
        if not loss.is_floating_point():
            raise TypeError(f"closure returned a {loss.dtype} loss; it must be a floating tensor")
        if isinstance(self.obs_noise, torch.Tensor):
            raise ValueError("obs_noise must be a float in loss-observation mode (one "
                             "observation per step), got a tensor")
        pairs = self._params()
        params = [p for p, _ in pairs]
        if backward_seen:
            grads = [p.grad for p in params]          # torch.optim's closure convention
        elif loss.requires_grad:
            grads = list(torch.autograd.grad(loss.reshape(()), params, allow_unused=True))
        else:
            grads = [p.grad for p in params]
            if all(g is None for g in grads):
                raise ValueError("closure returned a loss that does not require grad and no "
                                 "parameter has a .grad: call loss.backward() in the closure, or "
                                 "return the loss tensor with its graph (KalmanNGD then "
                                 "differentiates it)")
        if all(g is None for g in grads):
            raise ValueError("the loss does not depend on any parameter of this optimizer (no "
                             "gradient reached them); check the closure and the params given "
                             "to KalmanNGD")
        used = [(p, g, grad) for (p, g), grad in zip(pairs, grads) if grad is not None]
        quad_form = None
        if self._quad is not None:
            if backward_seen and self._quad.count == len(used):
                quad_form = self._quad.value
            else:
                self._warn_once("quad", "KalmanNGD.reduce_in_backward: the closure did not run "
                                "exactly one backward pass over the parameters (no backward, "
                                "or gradient accumulation); g^T P g is recomputed after "
                                "backward instead")
        info = ops.loss_observation_step_(
            [p for p, _, _ in used], [grad.detach() for _, _, grad in used],
            [self._cov(p, g) for p, g, _ in used], [self._hyper(g) for _, g, _ in used],
            loss.detach(), self._current_obs_noise(), gate=self.gate,
            backend=self.backend, adaptive_rate=self.adaptive_obs_noise,
            quad_form=quad_form, process_group=self.process_group)
        self._predict_only_([(p, g) for (p, g), grad in zip(pairs, grads) if grad is None],
                            ~info.skipped_tensor)
        self._record(info)
        return loss.detach()

    def _batch_step(self, pred, target):
        if not isinstance(pred, torch.Tensor) or not isinstance(target, torch.Tensor):
            raise TypeError(f"closure must return (pred, target) as tensors, got "
                            f"({_describe(pred)}, {_describe(target)})")
        if pred.shape != target.shape:
            raise ValueError(f"pred has shape {tuple(pred.shape)} but target has shape "
                             f"{tuple(target.shape)}; they must match ((m,) or (m, K))")
        if pred.dim() not in (1, 2) or pred.numel() == 0:
            raise ValueError(f"pred must have shape (m,) or (m, K) with m >= 1, got "
                             f"{tuple(pred.shape)}")
        if pred.device != target.device or pred.device != self._device():
            raise ValueError(f"pred is on {pred.device}, target on {target.device} and the "
                             f"parameters on {self._device()}: put them on one device")
        if not pred.requires_grad:
            raise ValueError("pred does not require grad: the closure must compute it from the "
                             "parameters with autograd enabled")
        obs = batch_observation(pred, target, self._params(), self._captures, self._cov,
                                self._hyper, self._warn_once)
        if not obs.blocks:
            raise ValueError("pred does not depend on any parameter of this optimizer")
        info = ops.kalman_step_(obs.blocks, obs.hypers, obs.residual, self._current_obs_noise(),
                                gate=self.gate, backend=self.backend,
                                adaptive_rate=self.adaptive_obs_noise,
                                process_group=self.process_group)
        self._predict_only_(obs.untouched, ~info.skipped_tensor)
        self._record(info)
        return obs.residual.square().mean()

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned and not compiling():
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=4)

    # ------------------------------------------------------------------ uncertainty
    @contextlib.contextmanager
    def sampled_params(self, generator: Optional[torch.Generator] = None):
        """Inside the block every parameter is a draw theta ~ N(mu, diag P); restored after."""
        pairs = self._params()
        saved = [p.detach().clone() for p, _ in pairs]
        try:
            with torch.no_grad():
                for p, g in pairs:
                    cov = self._cov(p, g)
                    noise = torch.randn(p.shape, generator=generator, dtype=cov.dtype,
                                        device=p.device)
                    p.copy_((p.to(cov.dtype) + cov.clamp_min(0).sqrt() * noise).to(p.dtype))
            yield self
        finally:
            with torch.no_grad():
                for (p, _), value in zip(pairs, saved):
                    p.copy_(value)


# ---------------------------------------------------------------------- helpers
def _backend_names():
    from .backends import NAMES
    return NAMES


def _check_group(group: dict, where: str) -> None:
    ceiling = group.get("cov_ceiling")
    ops.check_hyper(lr=group["lr"], forgetting=group["forgetting"],
                    process_noise=group["process_noise"], cov_floor=group["cov_floor"],
                    cov_ceiling=math.inf if ceiling is None else ceiling,
                    cov_update=group["cov_update"], where=where)
    init_cov = group["init_cov"]
    if not (isinstance(init_cov, (int, float)) and math.isfinite(init_cov) and init_cov > 0):
        raise ValueError(f"{where}: init_cov must be a finite number > 0 (the prior variance), "
                         f"got {init_cov!r}")


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)}"
    if isinstance(x, (tuple, list)):
        return f"a {type(x).__name__} of length {len(x)}"
    return type(x).__name__
