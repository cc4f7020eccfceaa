"""KalmanNGD: natural-gradient descent as a diagonal Kalman filter (DESIGN sections 2, 3).

The parameters are a Gaussian N(mu, diag P). ``step(closure)`` treats one minibatch as one
observation of the model:

* batch-observation mode: ``closure() -> (pred, target)`` with shapes (m,) or (m, K).
  The m*K predictions (flattened row-major) are the observations; their Jacobian is
  computed inside by batched autograd, or through Kronecker blocks for ``nn.Linear``
  layers registered with :meth:`KalmanNGD.track`.
* loss-observation mode: ``closure() -> loss`` (a scalar tensor). The loss itself is one
  observation with target 0 (DESIGN 2.2); the optimizer differentiates it.

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
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from . import ops
from .ops import DenseBlock, KalmanInfo, KronBlock, StepHyper

_GROUP_KEYS = ("lr", "init_cov", "process_noise", "forgetting", "cov_floor", "cov_ceiling",
               "cov_update")
_OBSERVATION_KEYS = ("obs_noise", "adaptive_obs_noise", "gate", "process_group", "backend")
_FILTER = "filter"   # key of the optimizer-wide state (a string, so state_dict keeps it)


def _cov_dtype(param: torch.Tensor) -> torch.dtype:
    return torch.float64 if param.dtype == torch.float64 else torch.float32


class _LinearCapture:
    """Forward hook of one tracked nn.Linear: keeps its input and output of this step."""

    def __init__(self, layer: nn.Linear):
        self.layer = layer
        self.calls: List[tuple] = []
        self.handle = layer.register_forward_hook(self._hook)
        self.armed = False

    def _hook(self, module, args, output):
        if self.armed and torch.is_grad_enabled():
            self.calls.append((args[0], output))

    def usable(self) -> Optional[str]:
        """None if the capture gives a Kronecker block, else why it does not."""
        if len(self.calls) != 1:
            return f"called {len(self.calls)} times in one closure"
        a, out = self.calls[0]
        if a.dim() != 2:
            return f"its input has shape {tuple(a.shape)} (a sequence per sample), not (batch, d_in)"
        if not out.requires_grad:
            return "its output does not require grad"
        return None


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
        ops._check_gate(gate)
        if backend not in ("auto",) + _backend_names():
            raise ValueError(f"backend must be one of {('auto',) + _backend_names()}, got "
                             f"{backend!r}")
        self.obs_noise = obs_noise
        self.adaptive_obs_noise = float(adaptive_obs_noise)
        self.gate = gate
        self.process_group = process_group
        self.backend = backend
        self.last_info: Optional[KalmanInfo] = None
        self._captures: Dict[nn.Linear, _LinearCapture] = {}
        self._warned: set = set()
        self._quad = None            # accumulator of g^T P- g filled during backward
        self._quad_hyper: list = []
        super().__init__(params, defaults)
        self.state[_FILTER] = {"steps": 0, "skipped_steps": 0,
                               "obs_noise": obs_noise if isinstance(obs_noise, float) else None}
        if backend != "auto":
            from .backends import resolve
            resolve(backend, self._device())   # fail now, with the reason, not at step 1

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
        return int(self.state[_FILTER]["skipped_steps"])

    def _current_obs_noise(self):
        r = self.state[_FILTER].get("obs_noise")
        return r if r is not None else self.obs_noise

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
        self.state[_FILTER] = dict(state_dict["state"].get(_FILTER, self.state.get(_FILTER, {})))
        for group in self.param_groups:
            _check_group(group, where="loaded param group")

    # ------------------------------------------------------------------ tracking
    def track(self, module: nn.Module) -> "KalmanNGD":
        """Use Kronecker blocks (DESIGN 2.1) for ``module``'s nn.Linear weights in batch mode.

        Valid when observation (j, k) depends on a tracked layer only through batch row j
        of its input and output (e.g. K class scores per image from a per-image feature);
        this is checked at every step from the output Jacobian, and a violation raises.
        A layer called more than once per closure, or fed a sequence per sample, falls back
        to the dense Jacobian with a warning.
        """
        ours = {id(p) for g in self.param_groups for p in g["params"]}
        found = 0
        for layer in module.modules():
            if isinstance(layer, nn.Linear) and id(layer.weight) in ours and layer not in self._captures:
                self._captures[layer] = _LinearCapture(layer)
                found += 1
        if found == 0 and not any(layer in self._captures for layer in module.modules()):
            raise ValueError("track(module): module has no nn.Linear whose weight is a parameter "
                             "of this optimizer")
        return self

    def reduce_in_backward(self) -> "KalmanNGD":
        """Loss mode, fused: sum g^T P- g during the backward pass (DESIGN 2.2).

        After this call the closure runs ``loss.backward()`` itself (the usual PyTorch
        closure) and returns ``loss.detach()``. A post-accumulate-grad hook adds each
        parameter's share of g^T P- g while its fresh gradient is still in cache, so the step
        itself streams parameter, gradient and covariance once (5 streams instead of 7).
        It needs exactly one backward per step: with gradient accumulation, or after a
        group's ``forgetting`` / ``process_noise`` changed, the step recomputes the sum (and
        warns once).
        """
        if self._quad is not None:
            return self
        from .backends.loss_hooks import QuadFormAccumulator, attach_quad_form_hooks
        acc = QuadFormAccumulator()
        for group in self.param_groups:
            attach_quad_form_hooks([p for p in group["params"] if p.requires_grad],
                                   lambda p, g=group: self._cov(p, g), group["forgetting"],
                                   group["process_noise"], self.backend, acc)
        self._quad_hyper = [(g["forgetting"], g["process_noise"]) for g in self.param_groups]
        self._quad = acc
        return self

    def untrack(self) -> None:
        """Remove every hook installed by :meth:`track`."""
        for capture in self._captures.values():
            capture.handle.remove()
        self._captures.clear()

    # ------------------------------------------------------------------ step
    def step(self, closure: Optional[Callable] = None):
        """One Kalman step on the observation returned by ``closure``.

        Returns the loss tensor in loss-observation mode and the mean squared residual in
        batch mode. ``self.last_info`` holds the :class:`~kalman_kernels.ops.KalmanInfo`.
        """
        if closure is None:
            raise ValueError("KalmanNGD.step needs a closure: closure() -> (pred, target) for "
                             "batch observations, or closure() -> scalar loss tensor")
        for capture in self._captures.values():
            capture.calls.clear()
            capture.armed = True
        if self._quad is not None:
            self._quad.reset()
        try:
            with torch.enable_grad():
                out = closure()
        finally:
            for capture in self._captures.values():
                capture.armed = False
        try:
            if isinstance(out, (tuple, list)) and len(out) == 2:
                return self._batch_step(*out)
            if isinstance(out, torch.Tensor) and out.numel() == 1:
                return self._loss_step(out)
            raise TypeError(f"closure must return (pred, target) tensors or a scalar loss "
                            f"tensor, got {_describe(out)}")
        finally:
            for capture in self._captures.values():
                capture.calls.clear()

    def _record(self, info: KalmanInfo) -> None:
        self.last_info = info
        filt = self.state[_FILTER]
        if info.skipped:
            filt["skipped_steps"] += 1
            if "skip" not in self._warned:
                self._warned.add("skip")
                warnings.warn(f"KalmanNGD: step skipped ({info.reason}); parameters and "
                              f"covariances are unchanged. Further skips are counted in "
                              f"optimizer.skipped_steps without a warning.", RuntimeWarning,
                              stacklevel=3)
            return
        filt["steps"] += 1
        if self.adaptive_obs_noise > 0 and info.obs_noise is not None:
            filt["obs_noise"] = float(info.obs_noise)

    def _predict_only_(self, pairs) -> None:
        """Parameters the observation does not touch still go through the predict step."""
        for p, g in pairs:
            hp = self._hyper(g)
            cov = self._cov(p, g)
            if hp.forgetting != 1.0 or hp.process_noise != 0.0 or hp.cov_floor > 0 or math.isfinite(hp.cov_ceiling):
                cov.div_(hp.forgetting).add_(hp.process_noise).clamp_(hp.cov_floor, hp.cov_ceiling)

    def _loss_step(self, loss: torch.Tensor):
        if not loss.is_floating_point():
            raise TypeError(f"closure returned a {loss.dtype} loss; it must be a floating tensor")
        if isinstance(self.obs_noise, torch.Tensor):
            raise ValueError("obs_noise must be a float in loss-observation mode (one "
                             "observation per step), got a tensor")
        pairs = self._params()
        params = [p for p, _ in pairs]
        if loss.requires_grad:
            try:
                grads = torch.autograd.grad(loss.reshape(()), params, allow_unused=True)
            except RuntimeError as exc:
                if "second time" not in str(exc):
                    raise
                raise ValueError("the closure already called loss.backward(): return "
                                 "loss.detach() so KalmanNGD reads the .grad it left, or do not "
                                 "call backward (KalmanNGD differentiates the loss)") from exc
        else:
            grads = [p.grad for p in params]
            if all(g is None for g in grads):
                raise ValueError("closure returned a loss that does not require grad and no "
                                 "parameter has a .grad: return the loss tensor with its graph "
                                 "(KalmanNGD differentiates it)")
        used = [(p, g, grad) for (p, g), grad in zip(pairs, grads) if grad is not None]
        loss_value = float(loss.detach())
        quad_form = None
        if self._quad is not None and not loss.requires_grad:
            unchanged = self._quad_hyper == [(g["forgetting"], g["process_noise"])
                                             for g in self.param_groups]
            if unchanged and self._quad.count == len(used):
                quad_form = self._quad.value
            else:
                self._warn_once("quad", "KalmanNGD.reduce_in_backward: the backward pass did not "
                                "give one fresh gradient per parameter (gradient accumulation?) "
                                "or forgetting / process_noise changed; g^T P g is recomputed "
                                "after backward instead")
        info = ops.loss_observation_step_(
            [p for p, _, _ in used], [grad.detach() for _, _, grad in used],
            [self._cov(p, g) for p, g, _ in used], [self._hyper(g) for _, g, _ in used],
            loss_value, float(self._current_obs_noise()), gate=self.gate,
            backend=self.backend, adaptive_rate=self.adaptive_obs_noise,
            quad_form=quad_form, process_group=self.process_group)
        if not info.skipped:
            self._predict_only_([(p, g) for (p, g), grad in zip(pairs, grads) if grad is None])
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
        rows_per_sample = 1 if pred.dim() == 1 else pred.shape[1]
        flat = pred.reshape(-1)
        m = flat.shape[0]
        residual = target.detach().reshape(-1).to(torch.float64) - flat.detach().to(torch.float64)
        if self.process_group is None and not bool(torch.isfinite(residual).all()):
            # (With a process group every rank must still join the step's collectives;
            # kalman_step_ then skips on all ranks together.)
            info = KalmanInfo(float("nan"), 0.0, True, None, None,
                              "non-finite values in pred or target", m)
            self._record(info)
            return residual.square().mean()

        pairs = self._params()
        kron_layers = []
        for layer, capture in self._captures.items():
            why = capture.usable()
            if why is None:
                kron_layers.append((layer, capture))
            elif capture.calls or layer.weight.requires_grad:
                self._warn_once(f"dense:{id(layer)}",
                                f"KalmanNGD.track: {layer} {why}; using the dense Jacobian for it")
        kron_ids = {id(layer.weight) for layer, _ in kron_layers}
        kron_ids |= {id(layer.bias) for layer, _ in kron_layers if layer.bias is not None}
        dense_pairs = [(p, g) for p, g in pairs if id(p) not in kron_ids]
        outputs = [capture.calls[0][1] for _, capture in kron_layers]

        dense_jacs = _batched_jacobian(flat, [p for p, _ in dense_pairs])
        blocks, hypers, untouched = [], [], []
        for (p, g), jac in zip(dense_pairs, dense_jacs):
            if jac is None:
                untouched.append((p, g))
                continue
            blocks.append(DenseBlock(p, self._cov(p, g), jac.detach()))
            hypers.append(self._hyper(g))
        groups_of = {id(p): g for p, g in pairs}
        per_sample = pred.reshape(-1, rows_per_sample)
        output_grads = _per_sample_output_grads(per_sample, outputs, [l for l, _ in kron_layers])
        rows = torch.arange(m, device=flat.device) // rows_per_sample
        for (layer, capture), grad_outputs in zip(kron_layers, output_grads):
            inputs = capture.calls[0][0].detach()[rows]
            g = groups_of[id(layer.weight)]
            blocks.append(KronBlock(layer.weight, self._cov(layer.weight, g), inputs, grad_outputs))
            hypers.append(self._hyper(g))
            if layer.bias is not None and id(layer.bias) in groups_of:
                gb = groups_of[id(layer.bias)]
                blocks.append(DenseBlock(layer.bias, self._cov(layer.bias, gb), grad_outputs))
                hypers.append(self._hyper(gb))
        if not blocks:
            raise ValueError("pred does not depend on any parameter of this optimizer")
        info = ops.kalman_step_(blocks, hypers, residual, self._current_obs_noise(),
                                gate=self.gate, backend=self.backend,
                                adaptive_rate=self.adaptive_obs_noise,
                                process_group=self.process_group)
        if not info.skipped:
            self._predict_only_(untouched)
        self._record(info)
        return residual.square().mean()

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
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
                    p.copy_((p.to(cov.dtype) + cov.sqrt() * noise).to(p.dtype))
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


def _batched_jacobian(flat_pred: torch.Tensor, inputs: List[torch.Tensor],
                      eye: Optional[torch.Tensor] = None):
    """Rows of d flat_pred / d input, one per row of ``eye`` (default: the identity, i.e. the
    full Jacobian, each (m, *input.shape)); None for an input pred does not depend on."""
    if not inputs:
        return []
    if eye is None:
        m = flat_pred.shape[0]
        eye = torch.eye(m, dtype=flat_pred.dtype, device=flat_pred.device)
    m = eye.shape[0]
    try:
        return list(torch.autograd.grad(flat_pred, inputs, grad_outputs=eye, retain_graph=True,
                                        is_grads_batched=True, allow_unused=True))
    except RuntimeError:
        # Some ops have no batching rule for their backward: fall back to one row at a time.
        rows = [torch.autograd.grad(flat_pred, inputs, grad_outputs=eye[i], retain_graph=True,
                                    allow_unused=True) for i in range(m)]
        return [None if rows[0][k] is None else torch.stack([r[k] for r in rows])
                for k in range(len(inputs))]


def _per_sample_output_grads(per_sample: torch.Tensor, outputs: List[torch.Tensor],
                             layers: List[nn.Module]) -> List[torch.Tensor]:
    """D for every tracked layer: row (j, k) is d pred[j, k] / d out[j], shape (B*K, d_out).

    When observation (j, k) depends on the layer only through its own sample j, one
    backward pass per class k (the gradient of sum_j pred[j, k]) yields row j of every
    D[(j, k)] at once: K passes instead of B*K. A second set of K passes weighted by random
    per-sample coefficients u_j must then give u_j times the first; any cross-sample
    dependence (batch norm, attention across the batch) breaks that and raises.
    """
    if not outputs:
        return []
    batch, k_cls = per_sample.shape
    for out, layer in zip(outputs, layers):
        if out.shape[0] != batch:
            raise ValueError(f"tracked layer {layer} saw a batch of {out.shape[0]} samples but "
                             f"pred has {batch} rows: track() needs pred's first dimension to be "
                             f"the layer's batch dimension")
    gen = torch.Generator().manual_seed(0x6B6B)          # fixed: the probe never moves results
    u = torch.randn(batch, generator=gen, dtype=torch.float64).to(per_sample.device, per_sample.dtype)
    probes = torch.zeros((2 * k_cls, batch, k_cls), dtype=per_sample.dtype, device=per_sample.device)
    cls = torch.arange(k_cls, device=per_sample.device)
    probes[cls, :, cls] = 1.0
    probes[k_cls + cls, :, cls] = u
    grads = _batched_jacobian(per_sample, outputs, probes)
    result = []
    for grad, out, layer in zip(grads, outputs, layers):
        if grad is None:
            raise ValueError(f"pred does not depend on the output of tracked layer {layer}")
        grad = grad.detach()
        plain, weighted = grad[:k_cls], grad[k_cls:]              # (K, B, d_out) each
        expected = u.reshape(1, -1, 1) * plain
        scale = float(expected.abs().max()) if expected.numel() else 0.0
        # Rounding of the probe in low precision: allow a few ulps of the dtype.
        tol = max(1e-4, 8 * torch.finfo(grad.dtype).eps)
        if float((weighted - expected).abs().max()) > tol * max(scale, 1e-30):
            raise ValueError(f"tracked layer {layer}: an observation depends on another sample's "
                             f"output (e.g. batch normalisation or attention across the batch), "
                             f"so its Jacobian is not a Kronecker block; do not track this layer")
        result.append(plain.transpose(0, 1).reshape(batch * k_cls, -1))
    return result
