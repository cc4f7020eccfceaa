"""Adapters on a frozen CLIP backbone and the two observation models.

Every adapter maps cached features x_j to class scores ``scores(x)`` (m, K), and every
trainable tensor is an ``nn.Linear`` weight whose input for image j is one vector built from
row j only. So observation (j, k) depends on a layer only through batch row j, which is the
condition for the Kronecker-structured Jacobian of DESIGN 2.1 (``KalmanNGD.track``): the
filter never materialises the (m K) x n Jacobian.

* ``LinearHead``: text-initialised linear head. Input: the normalised image embedding; weight
  (K, D) initialised with the normalised class text embeddings (the zero-shot classifier is the
  prior mean), score_jk = w_k . x_j / |x_j|. The rows of W are not re-normalised inside the
  observation (that would couple every observation to W outside the layer's output and break
  the Kronecker structure), so the score is the cosine at the prior mean and a dot product
  with a unit-norm image vector after that.
* ``ClipAdapter``: CLIP-Adapter residual MLP: g = 0.2 relu(W2 relu(W1 x)) + 0.8 x, with
  W1: D -> D/4, W2: D/4 -> D; score_jk = cosine(g_j, t_k) with fixed text features t_k.
  W2 starts near zero (a near-zero residual: the prior mean is the zero-shot model; exactly
  zero would kill the gradient through the last ReLU).
* ``ProjAdapter``: fine-tune the last visual projection (ProLIP style) from cached
  pre-projection features: g = W_proj^T p_j (W initialised with ``visual.proj``);
  score_jk = cosine(g_j, t_k).

Observation models (target y):
* ``logits``: yhat_jk = score_jk for all K classes, target one-hot (m K observations, row-major);
* ``paired``: yhat_j = score_{j, y_j} (the image and the text of its own class), target 1.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

ADAPTERS = ("head", "clip-adapter", "proj")
OBSERVATIONS = ("logits", "paired")


class Adapter(nn.Module):
    input_kind = "embed"  # which cached feature the adapter reads: "embed" or "pre"

    def scores(self, x: torch.Tensor) -> torch.Tensor:  # (m, K)
        raise NotImplementedError

    def forward(self, x):
        return self.scores(x)


class LinearHead(Adapter):
    def __init__(self, text_feats: torch.Tensor):
        super().__init__()
        k, d = text_feats.shape
        self.head = nn.Linear(d, k, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(F.normalize(text_feats.float(), dim=-1))

    def scores(self, x):
        return self.head(F.normalize(x, dim=-1))


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
                 seed: int = 0) -> Adapter:
    if kind == "head":
        return LinearHead(text_feats)
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
    if obs == "logits":
        return s, F.one_hot(y, s.shape[1]).to(s.dtype)
    if obs == "paired":
        return s.gather(1, y[:, None]).squeeze(1), torch.ones(s.shape[0], dtype=s.dtype,
                                                               device=s.device)
    raise ValueError(f"unknown observation model {obs!r}; choose from {', '.join(OBSERVATIONS)}")


def kron_factors(adapter: Adapter, x: torch.Tensor, y: Optional[torch.Tensor] = None,
                 obs: str = "logits") -> List[Tuple[nn.Linear, torch.Tensor, torch.Tensor]]:
    """Kronecker factors of the observation Jacobian (DESIGN 2.1), per ``nn.Linear`` layer:
    (layer, A (m, d_in), D (m, n_obs_per_row, d_out)) with
    d yhat_{j,k} / d W[o, i] = D[j, k, o] * A[j, i]. ``n_obs_per_row`` is K for ``logits`` and 1
    for ``paired``. Computed with one backward pass per class score (no per-parameter Jacobian).
    """
    layers = [m for m in adapter.modules() if isinstance(m, nn.Linear)]
    for m in layers:
        if m.bias is not None and m.bias.requires_grad:
            raise NotImplementedError("kron_factors: biases are not used by the adapters")
    captured: Dict[nn.Linear, Tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(mod, inp, out):
        captured[mod] = (inp[0].detach(), out)

    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        with torch.enable_grad():
            if obs == "logits":
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
def predictive_variance(adapter: Adapter, x: torch.Tensor, cov_of: Callable[[torch.Tensor], torch.Tensor],
                        obs_noise: float, batch_size: int = 512) -> torch.Tensor:
    """Linearised predictive variance of the ``logits`` observations (DESIGN 2.4):
    var_jk = H_jk diag(P) H_jk^T + r = sum_{o,i} P[o,i] D[j,k,o]^2 A[j,i]^2 + r, (m, K)."""
    out = []
    for s in range(0, x.shape[0], batch_size):
        xb = x[s:s + batch_size]
        var = None
        for layer, a, d in kron_factors(adapter, xb, obs="logits"):
            p = cov_of(layer.weight).to(torch.float64)
            v = torch.einsum("jko,oi,ji->jk", d.double() ** 2, p, a.double() ** 2)
            var = v if var is None else var + v
        out.append(var + obs_noise)
    return torch.cat(out).float()
