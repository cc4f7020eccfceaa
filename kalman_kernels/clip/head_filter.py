"""The Kalman filter of the text-initialised head, class by class (docs/design.md, 2.6).

``HeadKalman`` keeps the head's mean (its weight and bias) and diagonal covariance and
steps them with ``kalman_kernels.ops.class_head.class_head_update_``: the exact Kalman
update of the B K class-logit observations of a batch, with K B x B factorisations instead
of one (B K) x (B K) S, so the batch is not capped by the number of classes. It offers what
the application uses of ``KalmanNGD``: ``step``, ``covariance``, ``sampled_params``,
``skipped_steps``, ``obs_noise`` and the predictive variance.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F

from kalman_kernels.ops.class_head import (
    ClassHeadInfo,
    class_head_predictive_variance,
    class_head_update_,
)

from .adapters import LinearHead


class HeadKalman:
    """Kalman filter over a ``LinearHead``'s weight and bias (plain or cosine scores).

    ``init_cov`` is P0 of every weight and bias element; ``obs_noise`` the scalar r (the
    starting value when ``adaptive_obs_noise`` > 0); ``gate`` a chi-square probability or
    None; ``lr``, ``forgetting``, ``process_noise``, ``cov_floor`` as in ``KalmanNGD``.
    """

    def __init__(self, head: LinearHead, *, init_cov: float, obs_noise: float, lr: float = 1.0,
                 forgetting: float = 1.0, process_noise: float = 0.0, cov_floor: float = 1e-12,
                 adaptive_obs_noise: float = 0.0, gate: Optional[float] = None):
        if not isinstance(head, LinearHead):
            raise TypeError(f"HeadKalman needs a LinearHead, got {type(head).__name__}")
        self.head = head
        lin = head.head
        self.weight_cov = torch.full_like(lin.weight, float(init_cov), dtype=torch.float32
                                          if lin.weight.dtype != torch.float64 else torch.float64)
        self.bias_cov = (None if lin.bias is None else
                         torch.full_like(lin.bias, float(init_cov), dtype=self.weight_cov.dtype))
        self.hyper = dict(lr=lr, forgetting=forgetting, process_noise=process_noise,
                          cov_floor=cov_floor, gate=gate, adaptive_rate=adaptive_obs_noise)
        self._r = torch.tensor(float(obs_noise), dtype=torch.float64, device=lin.weight.device)
        self._skipped = torch.zeros((), dtype=torch.long, device=lin.weight.device)
        self.last_info: Optional[ClassHeadInfo] = None

    # ------------------------------------------------------------------ state
    @property
    def obs_noise(self) -> float:
        """The observation noise r in use (adapted when ``adaptive_obs_noise`` > 0)."""
        return float(self._r)

    @property
    def skipped_steps(self) -> int:
        return int(self._skipped)

    def covariance(self, p: torch.Tensor) -> torch.Tensor:
        lin = self.head.head
        if p is lin.weight:
            return self.weight_cov
        if lin.bias is not None and p is lin.bias:
            return self.bias_cov
        raise KeyError("not a parameter of this head")

    # ------------------------------------------------------------------ step
    def step(self, x: torch.Tensor, y: torch.Tensor) -> ClassHeadInfo:
        """One exact Kalman step on a batch: x raw image features (B, D), y labels (B,)."""
        lin = self.head.head
        with torch.no_grad():
            scores = self.head.scores(x)
            residual = F.one_hot(y, scores.shape[1]).to(scores.dtype) - scores
            info = class_head_update_(
                lin.weight.data, self.weight_cov,
                None if lin.bias is None else lin.bias.data, self.bias_cov,
                self.head.features(x), residual, self._r,
                normalize_rows=self.head.normalize_rows, **self.hyper)
        if info.obs_noise_tensor is not None:
            self._r = torch.where(info.skipped_tensor, self._r, info.obs_noise_tensor)
        self._skipped += info.skipped_tensor.long()
        self.last_info = info
        return info

    # ------------------------------------------------------------------ uncertainty
    def predictive_variance(self, x: torch.Tensor) -> torch.Tensor:
        lin = self.head.head
        return class_head_predictive_variance(lin.weight, self.weight_cov, self.bias_cov,
                                              self.head.features(x), self._r,
                                              normalize_rows=self.head.normalize_rows).float()

    @contextlib.contextmanager
    def sampled_params(self, generator: Optional[torch.Generator] = None):
        """Inside the block the head's weight and bias are a draw from N(mu, diag P)."""
        lin = self.head.head
        pairs = [(lin.weight, self.weight_cov)]
        if lin.bias is not None:
            pairs.append((lin.bias, self.bias_cov))
        saved = [p.detach().clone() for p, _ in pairs]
        try:
            with torch.no_grad():
                for p, c in pairs:
                    noise = torch.randn(p.shape, generator=generator, dtype=c.dtype,
                                        device=p.device)
                    p.copy_((p.to(c.dtype) + c.sqrt() * noise).to(p.dtype))
            yield self
        finally:
            with torch.no_grad():
                for (p, _), s in zip(pairs, saved):
                    p.copy_(s)


def uses_head_filter(adapter, optimizer: str, obs: str) -> bool:
    """The class-structured filter serves the Kalman batch mode of the head with the class
    logits (plain or cosine) observation."""
    return (optimizer == "kalman" and isinstance(adapter, LinearHead)
            and obs in ("logits", "cosine-logits"))


__all__ = ["HeadKalman", "uses_head_filter"]
