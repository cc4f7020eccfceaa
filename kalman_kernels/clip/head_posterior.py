"""The head's posterior under the categorical likelihood: iterated Kalman updates to the MAP,
the Laplace evidence, and the prior variance chosen (or averaged) by that evidence.

The model. A text-initialised linear head over K classes on normalised image features a_j,
logits z_jk = s (w_k . a_j + b_k) with s the backbone's logit scale, is observed through its
categorical likelihood (``ops.categorical_head_update_``): each labelled image is one
observation y_j ~ Categorical(softmax(z_j)), with the moment-matched noise
R_j = c (diag(p_j) - p_j p_j^T) (c = ``obs_noise``, 1 is the untempered likelihood). The
prior is theta_k = (w_k, b_k) ~ N(theta0_k, P0 I) with theta0 = (the normalised class text
embedding, 0): the zero-shot classifier.

Why iterate. One Kalman pass linearises the softmax at the prior mean; where the zero-shot
classifier is poor, that linearisation is poor and one pass (or tempered passes, which carry
one pass's information) cannot leave it. The iterated EKF re-linearises: iteration i runs the
Kalman update *from the prior* (mean theta0, covariance P0) with p and its Jacobian taken at
the previous iterate theta_i (``linearize_at``). For a batch that holds all the shots this
update is exactly a Gauss-Newton step on

    Phi(theta) = sum_j CE_j(theta) / c + |theta - theta0|^2 / (2 P0)

(the push-through identity turns the Kalman gain into the Newton system), so the fixed point
is the MAP. Gauss-Newton can overshoot on a softmax far from its optimum, so each iterate is
damped by a backtracking line search on Phi (the damped, or Levenberg, IEKF). For a linear
head the Gauss-Newton matrix is the Hessian, Phi is convex, and the iteration converges.

The posterior. The Kalman update from the prior at the MAP gives the Laplace posterior: its
mean is the MAP and its covariance (P0^-1 + J^T Lambda J / c)^-1 in the structure the filter
keeps: ``covariance="block"`` keeps one (d+1) x (d+1) block per class (the bias folded in as
a constant feature), exactly the class-diagonal blocks of the full posterior when all shots are
one batch; ``"diag"`` keeps its diagonal. The probit predictive uses the per-class score
variance a^T Sigma_k a, which depends on class k's block only, so with one batch the block
structure loses nothing for it.

The prior variance. The Laplace approximation of the evidence (marginal likelihood of the
shots) is

    log p(D | P0) ~ -Phi(theta*) - 1/2 log det(I + P0 J^T Lambda J / c),

and the log determinant comes with the Kalman step (``info.log_det``), so every candidate P0
costs one fit. ``fit_by_evidence`` fits a log-spaced grid of P0 (warm-started along it) and
either keeps the best (``average=False``, type-II maximum likelihood) or averages the
predictive over the grid with weights proportional to the evidence (a log-uniform hyperprior
on P0; candidates with weight below ``prune`` are dropped). No validation data is used.

Scale. With all shots in one batch the step costs O(K n^3 + K n^2 d) for n shots; above
``max_batch`` images the pass is sequential over minibatches of ``max_batch`` and the result is
no longer the exact Gauss-Newton step (the structured covariance drops cross-class terms
between batches), but it is still a Kalman filter re-linearised at the previous iterate, and
the line search keeps every accepted iterate a descent on Phi. Its fixed point is then close
to the MAP, not at it (a 40-image toy at max_batch 16 stopped 8% above the optimal Phi), and
``converged`` is False when the iteration stalls with a step larger than rounding.
Memory: block K (d+1)^2, diag K (d+1) floats per posterior kept.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from kalman_kernels.ops.categorical_head import categorical_head_update_

F64 = torch.float64
COVARIANCES = ("block", "diag")
#: log10 P0 of the default evidence grid: 1e-4 .. 1e1, three points per decade
DEFAULT_GRID = tuple(10.0 ** (e / 3.0) for e in range(-12, 4))


def augment(features: torch.Tensor) -> torch.Tensor:
    """Rows (a_j, 1) of the normalised features: the bias is a constant feature."""
    a = F.normalize(features.to(F64), dim=-1)
    return torch.cat([a, torch.ones(a.shape[0], 1, dtype=F64, device=a.device)], 1)


@dataclass
class HeadPosterior:
    """A Gaussian posterior over the head theta = [W | b] (K, d+1), logits s * theta a_aug."""
    mean: torch.Tensor               # (K, d+1)
    cov: torch.Tensor                # (K, d+1, d+1) block or (K, d+1) diagonal
    init_cov: float
    logit_scale: float
    log_evidence: float = float("nan")
    iterations: int = 0
    converged: bool = False
    objective: float = float("nan")   # Phi at the mean

    @property
    def covariance_kind(self) -> str:
        return "block" if self.cov.dim() == 3 else "diag"

    def scores(self, feats_aug: torch.Tensor) -> torch.Tensor:
        """Mean scores theta_k . a (not multiplied by the logit scale), (n, K)."""
        return feats_aug @ self.mean.t()

    def score_variance(self, feats_aug: torch.Tensor) -> torch.Tensor:
        """Posterior variance of each class score, a^T Sigma_k a, (n, K)."""
        if self.cov.dim() == 3:
            return torch.einsum("na,kab,nb->nk", feats_aug, self.cov, feats_aug)
        return (feats_aug * feats_aug) @ self.cov.t()

    def probs(self, feats_aug: torch.Tensor, tau: Optional[float] = None,
              predictive: str = "probit") -> torch.Tensor:
        """Class probabilities: ``"probit"`` softmax(tau mu / sqrt(1 + pi/8 tau^2 var)) (the
        Gaussian scores' spread tempers each logit), ``"map"`` softmax(tau mu)."""
        t = self.logit_scale if tau is None else float(tau)
        mu = self.scores(feats_aug)
        if predictive == "map":
            return torch.softmax(t * mu, 1)
        var = self.score_variance(feats_aug)
        return torch.softmax(t * mu / torch.sqrt(1 + (math.pi / 8) * t * t * var), 1)


@dataclass
class PosteriorMixture:
    """An evidence-weighted mixture of head posteriors (one per prior variance kept)."""
    members: List[HeadPosterior]
    weights: List[float]
    evidence_grid: List[tuple] = field(default_factory=list)   # (P0, log evidence) of every fit

    head: Optional[torch.nn.Linear] = field(default=None, repr=False)  # set by attach()

    @property
    def best(self) -> HeadPosterior:
        return self.members[max(range(len(self.weights)), key=self.weights.__getitem__)]

    @property
    def skipped_steps(self) -> int:
        """Kalman steps skipped (non-finite input or a failed factorisation): the fits raise
        instead of skipping, so this is always 0; kept for the optimizers' interface."""
        return 0

    def attach(self, head: torch.nn.Linear) -> "PosteriorMixture":
        """Tie ``covariance(p)`` to an ``nn.Linear`` holding the best member's mean."""
        self.head = head
        return self

    def covariance(self, p: torch.Tensor) -> torch.Tensor:
        """The posterior variance of each element of the attached head's weight (K, d) or
        bias (K,) under the highest-weight member: the diagonal of its covariance."""
        if self.head is None:
            raise RuntimeError("attach(head) first: the mixture does not know the parameters")
        cov = self.best.cov
        diag = torch.diagonal(cov, dim1=1, dim2=2) if cov.dim() == 3 else cov
        if p is self.head.weight:
            return diag[:, :-1]
        if self.head.bias is not None and p is self.head.bias:
            return diag[:, -1]
        raise KeyError("not a parameter of the attached head")

    def probs(self, feats_aug, tau=None, predictive="probit") -> torch.Tensor:
        return sum(w * m.probs(feats_aug, tau, predictive)
                   for w, m in zip(self.weights, self.members))

    def scores(self, feats_aug) -> torch.Tensor:
        return sum(w * m.scores(feats_aug) for w, m in zip(self.weights, self.members))

    def sample_probs(self, feats_aug, tau, samples: int,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Monte-Carlo predictive: the mean softmax(tau theta a) over ``samples`` draws, each
        from a member picked with its weight, theta_k ~ N(mean_k, Sigma_k)."""
        w = torch.tensor(self.weights, dtype=F64)
        picks = torch.multinomial(w, samples, replacement=True, generator=_cpu(generator))
        acc = 0
        for i in picks.tolist():
            m = self.members[i]
            z = torch.randn(m.mean.shape, generator=generator, dtype=F64, device=m.mean.device)
            if m.cov.dim() == 3:
                eye = torch.eye(m.cov.shape[-1], dtype=F64, device=m.cov.device)
                root = torch.linalg.cholesky(m.cov + 1e-12 * eye)     # tiny floor: PSD blocks
                theta = m.mean + (root @ z[..., None])[..., 0]
            else:
                theta = m.mean + m.cov.clamp_min(0).sqrt() * z
            acc = acc + torch.softmax(float(tau) * feats_aug @ theta.t(), 1)
        return acc / samples

    def score_variance(self, feats_aug) -> torch.Tensor:
        """The mixture's score variance: sum_i w_i (var_i + mu_i^2) - mean^2."""
        mean = self.scores(feats_aug)
        second = sum(w * (m.score_variance(feats_aug) + m.scores(feats_aug) ** 2)
                     for w, m in zip(self.weights, self.members))
        return (second - mean * mean).clamp_min(0)


def _cpu(generator: Optional[torch.Generator]) -> Optional[torch.Generator]:
    """torch.multinomial on a CPU tensor needs a CPU generator."""
    return generator if generator is None or generator.device.type == "cpu" else None


def prior_mean(text_feats: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """theta0 = (scale * normalised class text embeddings, bias 0), (K, d+1), float64."""
    w = F.normalize(text_feats.to(F64), dim=-1) * float(scale)
    return torch.cat([w, torch.zeros(w.shape[0], 1, dtype=F64, device=w.device)], 1)


def _prior_cov(theta0: torch.Tensor, init_cov: float, covariance: str) -> torch.Tensor:
    k, d1 = theta0.shape
    if covariance == "block":
        return (torch.eye(d1, dtype=theta0.dtype, device=theta0.device)
                .expand(k, d1, d1) * float(init_cov)).contiguous()
    if covariance == "diag":
        return torch.full_like(theta0, float(init_cov))
    raise ValueError(f"covariance must be one of {COVARIANCES}, got {covariance!r}")


def objective(theta, theta0, init_cov, feats_aug, labels, logit_scale, obs_noise=1.0) -> float:
    """Phi(theta) = sum_j CE_j / c + |theta - theta0|^2 / (2 P0)."""
    ce = F.cross_entropy(logit_scale * feats_aug @ theta.t(), labels, reduction="sum")
    return float(ce / obs_noise + ((theta - theta0) ** 2).sum() / (2 * init_cov))


def kalman_pass(theta0, cov0, feats_aug, labels, *, logit_scale, obs_noise=1.0,
                linearize_at=None, max_batch: int = 512):
    """One Kalman pass from (theta0, cov0) over the data in minibatches of ``max_batch``
    (one batch when the data fits), each step linearised at ``linearize_at`` (None: the
    running mean, i.e. the plain EKF). Returns (mean, cov, sum of log det terms, skipped)."""
    mean, cov = theta0.clone(), cov0.clone()
    log_det, skipped = 0.0, 0
    n = feats_aug.shape[0]
    for s in range(0, n, max_batch):
        info = _step(mean, cov, feats_aug[s:s + max_batch], labels[s:s + max_batch],
                     logit_scale=logit_scale, obs_noise=obs_noise, linearize_at=linearize_at)
        skipped += int(info.skipped)
        log_det += info.log_det if not info.skipped else 0.0
    return mean, cov, log_det, skipped


def _step(mean, cov, feats_aug, labels, *, logit_scale, obs_noise, linearize_at):
    # the bias is folded in as the last (constant) feature, so the op sees a bias-free head
    # with a (K, d+1) diagonal or (K, d+1, d+1) block covariance
    lin = None if linearize_at is None else (linearize_at, None)
    return categorical_head_update_(mean, cov, None, None, feats_aug, labels,
                                    obs_noise=obs_noise, logit_scale=logit_scale,
                                    linearize_at=lin)


def fit_map(feats_aug: torch.Tensor, labels: torch.Tensor, theta0: torch.Tensor,
            init_cov: float, *, logit_scale: float, obs_noise: float = 1.0,
            covariance: str = "block", max_iters: int = 50, tol: float = 1e-9,
            max_batch: int = 512, start: Optional[torch.Tensor] = None) -> HeadPosterior:
    """Damped iterated Kalman updates from the prior N(theta0, init_cov I) to the MAP, then the
    Laplace posterior there (module docstring). ``start``: the first linearisation point
    (default theta0; a neighbouring fit's MAP warm-starts a grid)."""
    cov0 = _prior_cov(theta0, init_cov, covariance)

    def phi(t):
        return objective(t, theta0, init_cov, feats_aug, labels, logit_scale, obs_noise)

    ref = (theta0 if start is None else start).clone()
    f_ref = phi(ref)
    converged, it = False, 0
    for it in range(1, max_iters + 1):  # noqa: B007 - `it` is read after the loop
        cand, _, _, _ = kalman_pass(theta0, cov0, feats_aug, labels, logit_scale=logit_scale,
                                    obs_noise=obs_noise, linearize_at=ref, max_batch=max_batch)
        step = cand - ref
        t, f_new = 1.0, phi(cand)
        while not f_new <= f_ref and t > 1e-4:      # backtrack (also on nan)
            t *= 0.5
            f_new = phi(ref + t * step)
        if not f_new <= f_ref:
            # no descent along the step: at the optimum when the step is rounding-sized;
            # otherwise the minibatched passes' direction has stalled short of it
            converged = bool(step.abs().max() <= 1e-6 * (1 + ref.abs().max()))
            break
        ref = ref + t * step
        done = f_ref - f_new <= tol * max(1.0, abs(f_new))
        f_ref = f_new
        if done:
            converged = True
            break
    last, cov, log_det, _ = kalman_pass(theta0, cov0, feats_aug, labels,
                                        logit_scale=logit_scale, obs_noise=obs_noise,
                                        linearize_at=ref, max_batch=max_batch)
    if converged:
        # The loop stops when the objective stops changing, which happens a step too early:
        # a step of size s changes it by ~s^2, so a ~1e-8 step is invisible in float64. The
        # final pass is one more (undamped) Gauss-Newton step from ref, which this close to
        # the optimum lands on it to rounding; the covariance and log det from ref differ
        # from those at the new point only to second order.
        ref, f_ref = last, phi(last)
    return HeadPosterior(ref, cov, float(init_cov), float(logit_scale),
                         log_evidence=-f_ref - 0.5 * log_det, iterations=it,
                         converged=converged, objective=f_ref)


def fit_by_evidence(feats_aug: torch.Tensor, labels: torch.Tensor, theta0: torch.Tensor, *,
                    logit_scale: float, grid: Sequence[float] = DEFAULT_GRID,
                    average: bool = True, prune: float = 1e-3,
                    mean_scales: Sequence[float] = (1.0,), **kw) -> PosteriorMixture:
    """Fit every P0 of ``grid`` (ascending, each warm-started at the previous MAP) and weight
    the fits by their Laplace evidence: ``average=True`` keeps every fit with weight >=
    ``prune`` (renormalised), ``average=False`` the single best one. ``mean_scales``: prior
    means scale * theta0 to weigh as well (the evidence compares them like P0: same data,
    same likelihood); the default keeps the zero-shot classifier as the one prior mean."""
    if not grid:
        raise ValueError("grid must hold at least one prior variance P0 > 0")
    if not mean_scales:
        raise ValueError("mean_scales must hold at least one prior-mean scale")
    fits = []
    for scale in mean_scales:
        start = None
        for p0 in sorted(float(g) for g in grid):
            if not p0 > 0:
                raise ValueError(f"every prior variance in grid must be > 0, got {p0!r}")
            post = fit_map(feats_aug, labels, theta0 * float(scale), p0,
                           logit_scale=logit_scale, start=start, **kw)
            fits.append(post)
            start = post.mean
    ev = torch.tensor([f.log_evidence for f in fits], dtype=F64)
    if not torch.isfinite(ev).any():
        raise RuntimeError("no prior variance of the grid gave a finite evidence (every fit "
                           "was skipped or diverged): check the features for NaN/Inf")
    ev = torch.where(torch.isfinite(ev), ev, torch.full_like(ev, -math.inf))
    w = torch.softmax(ev, 0)
    table = [(f.init_cov, f.log_evidence) for f in fits]
    if not average:
        i = int(torch.argmax(w))
        return PosteriorMixture([fits[i]], [1.0], table)
    keep = [i for i in range(len(fits)) if float(w[i]) >= prune]
    tot = float(w[keep].sum())
    return PosteriorMixture([fits[i] for i in keep], [float(w[i]) / tot for i in keep], table)


__all__ = ["HeadPosterior", "PosteriorMixture", "augment", "prior_mean", "objective",
           "kalman_pass", "fit_map", "fit_by_evidence", "DEFAULT_GRID", "COVARIANCES"]
