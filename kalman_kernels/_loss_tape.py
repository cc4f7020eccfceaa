"""What happened to the gradients between two loss steps (docs/design.md, 2.2).

:class:`LossTape` belongs to a :class:`~kalman_kernels.KalmanNGD`. Its post-accumulate-grad
hooks fire after every backward pass into a parameter, inside a step's closure or outside
one (``opt.observe(loss)``, trainers that call ``step()`` without a closure), and record:

* which parameters a closure's backward reached (torch.optim's closure convention: only
  those gradients belong to the closure's loss);
* the loss-step reduction g^T P- g, one share per tensor while its gradient is fresh (the
  single-pass loss step), with what each share was computed from: the gradient tensor and
  its version counter, the covariance tensor and its version counter, lam and q (tensors
  under ``MIN_SHARE_NUMEL`` elements are only recorded, and their shares summed at the step
  in one multi-tensor call: a hook's kernel call costs more than their reduction);
* a closure's backward that accumulated into a gradient an earlier backward outside the
  closure left (gradient accumulation over micro-batches the closure's loss does not cover);
* the losses given to ``observe()`` since the last step.

:meth:`LossTape.reduction` hands the summed shares to the step only when they are exactly
the step's g^T P- g: every parameter the step uses had one share (one backward pass), and
its gradient and covariance are the tensors the share read, unchanged since (an in-place
edit bumps a tensor's version counter: clipping, ``mul_``, ``zero_``). Everything else --
gradient accumulation, clipping, a GradScaler (its unscale does not bump the version, so a
scaler is detected from the attributes it sets on the optimizer instead), torch.distributed
(DDP averages gradients after they were accumulated), a first step before the hooks existed
-- falls back to the two-pass step, which reads the gradients as they are at the step.
"""
from __future__ import annotations

import weakref
from typing import Dict, Optional

import torch

# Why the last loss step summed g^T P- g after backward (diagnostics()["loss_reduction"]).
IN_BACKWARD = "in-backward"
# Gradients smaller than this are summed at the step, in one multi-tensor call, instead of
# in their hooks: a hook's kernel call costs tens of microseconds of dispatch, more than
# such a tensor's share of the reduction (the cpp kernels' work item is 2^16 elements).
MIN_SHARE_NUMEL = 1 << 16


def _flat(grad: torch.Tensor) -> torch.Tensor:
    """The gradient as the kernels read it: a complex one as its real view (the covariance
    has the view's shape), a non-contiguous one copied (the kernels take flat arrays)."""
    if grad.is_complex():
        grad = torch.view_as_real(grad)
    return grad if grad.is_contiguous() else grad.contiguous()


class _Share:
    __slots__ = ("count", "inside", "grad", "version", "cov", "cov_version", "lam", "q",
                 "deferred")

    def __init__(self):
        self.count = 0          # hook calls (backward passes into this parameter)
        self.inside = 0         # of them, inside a step's closure
        self.grad = None        # weakref to the gradient the share (or last call) read
        self.version = -1
        self.cov = None
        self.cov_version = -1
        self.lam = self.q = None
        self.deferred = False   # a small gradient: its share is summed at the step


class LossTape:
    """The bookkeeping between two steps (see the module docstring)."""

    def __init__(self):
        self.enabled = True            # reduce_in_backward(): sum g^T P- g in the hooks
        self.last_path: Optional[str] = None
        self.reset()

    def __getstate__(self):
        # copy.deepcopy / pickle: the record between two steps refers to live gradients
        # (weak references); a copy starts with none, as after a step
        return {"enabled": self.enabled, "last_path": self.last_path}

    def __setstate__(self, state):
        self.enabled = state["enabled"]
        self.last_path = state["last_path"]
        self.reset()

    def reset(self) -> None:
        """Forget everything (after a step, and at zero_grad)."""
        self.shares: Dict[int, _Share] = {}
        self.quad = None        # the running sum of the shares (a float on eager CPU)
        self.shared = True                           # every hook call added its share
        self.any_share = False                       # a hook added (or deferred) a share
        self.in_closure = False
        self.seen_inside: set = set()                # id(param) reached inside the closure
        self.backward_inside = 0
        self.accumulated_across = False              # see record()
        self.observed: Optional[torch.Tensor] = None  # sum of observe()d losses
        self.observed_before = False                 # observed outside the closure
        self.observed_inside = False

    # ------------------------------------------------------------------ hooks
    def record(self, param: torch.Tensor, kernels, cov_of, lam: float, q: float,
               compute: bool) -> None:
        """One post-accumulate-grad hook call for ``param`` (its ``.grad`` is fresh).
        ``compute``: add the share of g^T P- g (``cov_of()`` gives the covariance)."""
        grad = param.grad
        share = self.shares.get(id(param))
        if share is None:
            share = self.shares[id(param)] = _Share()
        if self.in_closure:
            self.backward_inside += 1
            self.seen_inside.add(id(param))
            if (share.count > share.inside and share.grad is not None
                    and share.grad() is grad and grad._version == share.version + 1):
                # the closure's backward added in place (one version bump, nothing else in
                # between) to a gradient a backward outside the closure had left
                self.accumulated_across = True
            share.inside += 1
        share.count += 1
        share.grad = weakref.ref(grad)
        share.version = grad._version
        if not compute:
            self.shared = False
            return
        if grad.numel() < MIN_SHARE_NUMEL:
            share.deferred = True
            self.any_share = True
            return
        cov = cov_of()
        with torch.no_grad():
            part = kernels.loss_quad_form([_flat(grad)], [cov], lam, q)
        if grad.is_cpu:
            # eager CPU: a Python float, like the loss step's host path (reading a CPU
            # tensor costs no synchronisation; a tensor add per hook costs microseconds)
            part = float(part)
        self.quad = part if self.quad is None else self.quad + part
        self.any_share = True
        share.deferred = False
        share.cov = weakref.ref(cov)
        share.cov_version = cov._version
        share.lam, share.q = lam, q

    # ------------------------------------------------------------------ observations
    def observe(self, loss: torch.Tensor) -> None:
        value = loss.detach().reshape(())
        self.observed = value if self.observed is None else self.observed + value
        if self.in_closure:
            self.observed_inside = True
        else:
            self.observed_before = True

    # ------------------------------------------------------------------ the step
    def reduction(self, used, cov_of, hyper_of, scaler: bool, kernels):
        """g^T P- g summed in the hooks when it is exactly the step's (see the module
        docstring), with the small gradients' shares summed now in one call per (lam, q)
        (``kernels()``: the step's backend); else None. ``used``: (param, group, grad) the
        step updates. Sets ``last_path``."""
        reason = self._why_not(used, cov_of, hyper_of, scaler)
        self.last_path = IN_BACKWARD if reason is None else f"two-pass: {reason}"
        if reason is not None:
            return None
        quad = self.quad
        small: dict = {}
        for p, group, grad in used:
            if self.shares[id(p)].deferred:
                hp = hyper_of(group)
                small.setdefault((hp.forgetting, hp.process_noise), []).append(
                    (_flat(grad), cov_of(p, group)))
        for (lam, q), pairs in small.items():
            with torch.no_grad():
                part = kernels().loss_quad_form([g for g, _ in pairs], [c for _, c in pairs],
                                              lam, q)
            if pairs[0][0].is_cpu:
                part = float(part)
            quad = part if quad is None else quad + part
        return quad

    def _why_not(self, used, cov_of, hyper_of, scaler: bool) -> Optional[str]:
        if not self.enabled:
            return "reduce_in_backward(False)"
        if scaler:
            return "a GradScaler steps the optimizer (its unscale edits the gradients)"
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return "torch.distributed is initialized (gradients may be reduced after backward)"
        if not self.any_share or not self.shared:
            return "no backward pass ran under the hooks"
        if len(self.shares) != len(used):
            return "backward reached other parameters than the step updates"
        for p, group, grad in used:
            share = self.shares.get(id(p))
            if share is None:
                return "a gradient the step uses was not produced under the hooks"
            if share.count != 1:
                return "several backward passes (gradient accumulation)"
            if share.grad() is not grad or grad._version != share.version:
                return "a gradient was changed after backward (e.g. clipping)"
            if share.deferred:
                continue            # summed now, from the step's own tensors
            cov = cov_of(p, group)
            if share.cov() is not cov or cov._version != share.cov_version:
                return "a covariance was changed after backward"
            hp = hyper_of(group)
            if hp.forgetting != share.lam or hp.process_noise != share.q:
                return "forgetting or process_noise changed after backward"
        return None
