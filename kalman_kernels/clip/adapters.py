"""Adapters on a frozen CLIP backbone and the two observation models.

Every adapter maps cached features x_j to class scores ``scores(x)`` (m, K), and every
trainable tensor is an ``nn.Linear`` weight whose input for image j is one vector built from
row j only. So observation (j, k) depends on a layer only through batch row j, which is the
condition for the Kronecker-structured Jacobian (docs/design.md, 2.1; ``KalmanNGD.track``): the
filter never materialises the (m K) x n Jacobian.

* ``LinearHead``: text-initialised linear head with a bias. Input: the normalised image
  embedding a_j = x_j / |x_j|; weight (K, D) initialised with the normalised class text
  embeddings and bias 0 (the zero-shot classifier is the prior mean). Two score forms:
  plain, score_jk = w_k . a_j + b_k (a cosine at the prior mean, a dot product after it), and
  cosine (``normalize_rows=True``), score_jk = (w_k / |w_k|) . a_j + b_k, a cosine at every
  point. Either way observation (j, k) touches row k only: the Kalman step is the exact
  class-structured one of ``kalman_kernels.ops.class_head`` (docs/design.md, 2.6), for any K.
* ``ClipAdapter``: CLIP-Adapter residual MLP: g = 0.2 relu(W2 relu(W1 x)) + 0.8 x, with
  W1: D -> D/4, W2: D/4 -> D; score_jk = cosine(g_j, t_k) with fixed text features t_k.
  W2 starts near zero (a near-zero residual: the prior mean is the zero-shot model; exactly
  zero would kill the gradient through the last ReLU).
* ``ProjAdapter``: fine-tune the last visual projection (ProLIP style) from cached
  pre-projection features: g = W_proj^T p_j (W initialised with ``visual.proj``);
  score_jk = cosine(g_j, t_k).

Observation models (target y):
* ``logits``: yhat_jk = score_jk for all K classes, target one-hot (m K observations, row-major);
* ``cosine-logits``: the same with the head's rows normalised (cosine scores); for the other
  adapters, whose scores are cosines already, it is ``logits``;
* ``paired``: yhat_j = score_{j, y_j} (the image and the text of its own class), target 1.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

ADAPTERS = ("head", "clip-adapter", "proj")
OBSERVATIONS = ("logits", "cosine-logits", "paired")


class Adapter(nn.Module):
    input_kind = "embed"  # which cached feature the adapter reads: "embed" or "pre"

    def scores(self, x: torch.Tensor) -> torch.Tensor:  # (m, K)
        raise NotImplementedError

    def forward(self, x):
        return self.scores(x)


class LinearHead(Adapter):
    def __init__(self, text_feats: torch.Tensor, bias: bool = True, normalize_rows: bool = False):
        super().__init__()
        k, d = text_feats.shape
        self.head = nn.Linear(d, k, bias=bias)
        self.normalize_rows = bool(normalize_rows)
        with torch.no_grad():
            self.head.weight.copy_(F.normalize(text_feats.float(), dim=-1))
            if bias:
                self.head.bias.zero_()

    @staticmethod
    def features(x):
        """The head's input rows a_j = x_j / |x_j|."""
        return F.normalize(x, dim=-1)

    def scores(self, x):
        a = self.features(x)
        if self.normalize_rows:
            return F.linear(a, F.normalize(self.head.weight, dim=-1), self.head.bias)
        return self.head(a)


class ClipAdapter(Adapter):
    def __init__(self, text_feats: torch.Tensor, reduction: int = 4, ratio: float = 0.2,
                 residual_init: float = 1e-2, seed: int = 0):
        super().__init__()
        d = text_feats.shape[1]
        g = torch.Generator().manual_seed(seed)
        self.fc1 = nn.Linear(d, max(1, d // reduction), bias=False)
        self.fc2 = nn.Linear(max(1, d // reduction), d, bias=False)
        with torch.no_grad():
            b1 = 1.0 / self.fc1.in_features ** 0.5
            self.fc1.weight.copy_((torch.rand(self.fc1.weight.shape, generator=g) * 2 - 1) * b1)
            self.fc2.weight.copy_(torch.randn(self.fc2.weight.shape, generator=g) * residual_init
                                  / self.fc2.in_features ** 0.5)
        self.ratio = ratio
        self.register_buffer("text", F.normalize(text_feats.float(), dim=-1))

    def adapted(self, x):
        x = F.normalize(x, dim=-1)
        a = F.relu(self.fc2(F.relu(self.fc1(x))))
        return self.ratio * a + (1 - self.ratio) * x

    def scores(self, x):
        return F.normalize(self.adapted(x), dim=-1) @ self.text.t()


class ProjAdapter(Adapter):
    input_kind = "pre"

    def __init__(self, proj: torch.Tensor, text_feats: torch.Tensor):
        super().__init__()
        w, d = proj.shape
        self.proj = nn.Linear(w, d, bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(proj.detach().float().t())
        self.register_buffer("text", F.normalize(text_feats.float(), dim=-1))

    def scores(self, x):
        return F.normalize(self.proj(x), dim=-1) @ self.text.t()


def make_adapter(kind: str, text_feats: torch.Tensor, proj: Optional[torch.Tensor] = None,
                 seed: int = 0, obs: str = "logits") -> Adapter:
    """``obs="cosine-logits"`` makes the head's scores cosines (row-normalised weight). With
    ``obs="paired"`` the head has no bias: the paired observation (own class's score -> 1)
    could be met by raising b_k for every image, which says nothing about the class."""
    if kind == "head":
        return LinearHead(text_feats, bias=obs != "paired",
                          normalize_rows=obs == "cosine-logits")
    if kind == "clip-adapter":
        return ClipAdapter(text_feats, seed=seed)
    if kind == "proj":
        if proj is None:
            raise ValueError("adapter 'proj' needs a ViT model with a visual.proj matrix (and "
                             "cached pre-projection features); this model has none")
        return ProjAdapter(proj, text_feats)
    raise ValueError(f"unknown adapter {kind!r}; choose from {', '.join(ADAPTERS)}")


def observation(adapter: Adapter, x: torch.Tensor, y: torch.Tensor, obs: str
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(prediction, target) of an observation model on a batch (see the module docstring)."""
    s = adapter.scores(x)
    if obs in ("logits", "cosine-logits"):
        return s, F.one_hot(y, s.shape[1]).to(s.dtype)
    if obs == "paired":
        return s.gather(1, y[:, None]).squeeze(1), torch.ones(s.shape[0], dtype=s.dtype,
                                                               device=s.device)
    raise ValueError(f"unknown observation model {obs!r}; choose from {', '.join(OBSERVATIONS)}")


def kron_factors(adapter: Adapter, x: torch.Tensor, y: Optional[torch.Tensor] = None,
                 obs: str = "logits") -> List[Tuple[nn.Linear, torch.Tensor, torch.Tensor]]:
    """Kronecker factors of the observation Jacobian (docs/design.md, 2.1), per ``nn.Linear`` layer:
    (layer, A (m, d_in), D (m, n_obs_per_row, d_out)) with
    d yhat_{j,k} / d W[o, i] = D[j, k, o] * A[j, i] (and d yhat_{j,k} / d b[o] = D[j, k, o]
    for a layer's bias). ``n_obs_per_row`` is K for ``logits`` and 1 for ``paired``.
    Computed with one backward pass per class score (no per-parameter Jacobian). Not for the
    cosine head, whose row normalisation happens outside the layer (see
    ``kalman_kernels.ops.class_head``).
    """
    if isinstance(adapter, LinearHead) and adapter.normalize_rows:
        raise ValueError("kron_factors: the cosine head normalises its rows outside the layer; "
                         "its Jacobian is the class-structured one of ops.class_head")
    layers = [m for m in adapter.modules() if isinstance(m, nn.Linear)]
    captured: Dict[nn.Linear, Tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(mod, inp, out):
        captured[mod] = (inp[0].detach(), out)

    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        with torch.enable_grad():
            if obs in ("logits", "cosine-logits"):
                pred = adapter.scores(x)
            elif obs == "paired":
                if y is None:
                    raise ValueError("paired observations need labels")
                pred = adapter.scores(x).gather(1, y[:, None])
            else:
                raise ValueError(f"unknown observation model {obs!r}")
            outs = [captured[m][1] for m in layers]
            ds = [[] for _ in layers]
            for k in range(pred.shape[1]):
                gs = torch.autograd.grad(pred[:, k].sum(), outs, retain_graph=True,
                                         allow_unused=True)
                for li, g in enumerate(gs):
                    ds[li].append(torch.zeros_like(outs[li]) if g is None else g.detach())
    finally:
        for h in handles:
            h.remove()
    return [(m, captured[m][0], torch.stack(d, 1)) for m, d in zip(layers, ds)]


@torch.no_grad()
def predictive_variance(adapter: Adapter, x: torch.Tensor,
                        cov_of: Callable[[torch.Tensor], torch.Tensor],
                        obs_noise: float, batch_size: int = 512) -> torch.Tensor:
    """Linearised predictive variance of the ``logits`` observations (docs/design.md, 2.4), (m, K):
    var_jk = H_jk diag(P) H_jk^T + r. For the head (plain or cosine) it is the
    class-structured formula of ``ops.class_head``; for the other adapters
    sum_{o,i} P[o,i] D[j,k,o]^2 A[j,i]^2 (+ sum_o P_b[o] D[j,k,o]^2 for biases) from the
    Kronecker factors."""
    from kalman_kernels.ops.class_head import class_head_predictive_variance
    out = []
    for s in range(0, x.shape[0], batch_size):
        xb = x[s:s + batch_size]
        if isinstance(adapter, LinearHead):
            lin = adapter.head
            var = class_head_predictive_variance(
                lin.weight, cov_of(lin.weight), None if lin.bias is None else cov_of(lin.bias),
                adapter.features(xb), obs_noise, normalize_rows=adapter.normalize_rows)
            out.append(var)
            continue
        var = None
        for layer, a, d in kron_factors(adapter, xb, obs="logits"):
            p = cov_of(layer.weight).to(torch.float64)
            v = torch.einsum("jko,oi,ji->jk", d.double() ** 2, p, a.double() ** 2)
            if layer.bias is not None and layer.bias.requires_grad:
                v = v + (d.double() ** 2) @ cov_of(layer.bias).to(torch.float64)
            var = v if var is None else var + v
        out.append(var + obs_noise)
    return torch.cat(out).float()
