"""Move the loss-mode reduction into the backward pass (docs/design.md, 2.2).

The loss-observation step needs g^T P- g over every parameter before it can update any of
them. Computed after backward, that is one extra read of every gradient and covariance.
A post-accumulate-grad hook computes each tensor's partial sum while its gradient is fresh
(still in cache), so the step itself streams only params, grads and covs once (5 streams
instead of 7).

    acc = attach_quad_form_hooks(params, covs_getter=opt_cov_lookup)
    loss.backward()                 # hooks fill acc.value (a 0-d float64 device tensor)
    kk.ops.loss_observation_step_(..., quad_form=acc.value)
    acc.reset()

``covs_getter(param)`` returns the covariance tensor of ``param``. The partial sums use the
backend's ``loss_quad_form`` kernel and stay on the device (no host read).
"""
from __future__ import annotations

from typing import Callable, Iterable, List, Optional

import torch

from . import resolve


class QuadFormAccumulator:
    """Running g^T P- g over the hooked parameters: ``value`` is a 0-d float64 tensor on the
    parameters' device (None before the first hook call), ``count`` the hook calls."""

    def __init__(self):
        self.value: Optional[torch.Tensor] = None
        self.count = 0
        self._handles: List = []

    def add(self, kernels, grad: torch.Tensor, cov: torch.Tensor, forgetting: float,
            process_noise: float) -> None:
        with torch.no_grad():
            part = kernels.loss_quad_form([grad], [cov], forgetting, process_noise)
        self.value = part if self.value is None else self.value + part
        self.count += 1

    def reset(self) -> None:
        """Zero the sum (call after each step)."""
        self.value = None
        self.count = 0

    def remove(self) -> None:
        """Detach the hooks."""
        for h in self._handles:
            h.remove()
        self._handles.clear()


def attach_quad_form_hooks(params: Iterable[torch.Tensor],
                           covs_getter: Callable[[torch.Tensor], torch.Tensor],
                           forgetting: float = 1.0, process_noise: float = 0.0,
                           backend: str = "auto",
                           accumulator: Optional[QuadFormAccumulator] = None
                           ) -> QuadFormAccumulator:
    """Register a post-accumulate-grad hook on every parameter that adds its g^T P- g."""
    acc = accumulator if accumulator is not None else QuadFormAccumulator()
    lam, q = float(forgetting), float(process_noise)
    for p in params:
        if not p.requires_grad:
            continue
        kernels = resolve(backend, p.device)

        def hook(param: torch.Tensor, kernels=kernels) -> None:
            if param.grad is not None:
                acc.add(kernels, param.grad, covs_getter(param), lam, q)

        acc._handles.append(p.register_post_accumulate_grad_hook(hook))
    return acc
