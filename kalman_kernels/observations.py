"""Building the observation blocks of batch-observation mode (DESIGN 2.1, issue 12).

``KalmanNGD.step`` in batch mode gets ``(pred, target)`` from the closure; this module turns
that into parameter blocks for :func:`kalman_kernels.ops.kalman_step_`:

* parameters of tracked ``nn.Linear`` layers (:class:`LinearCapture`, installed by
  ``KalmanNGD.track``) become sample-grouped Kronecker blocks: the layer's input A (B, d_in)
  from a forward hook, and D (B, K, d_out), the gradients of each sample's K predictions
  with respect to that sample's layer output, from K probe backward passes (one per score
  index k, each summing over the batch) — not B K passes; the bias is a dense block whose
  Jacobian is D;
* every other parameter the prediction depends on gets its dense Jacobian (m, *shape) by
  batched autograd.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .ops import DenseBlock, KronBlock, StepHyper

#: Seed of the random per-sample weights of the cross-sample check (fixed: the probe never
#: changes results, and a test can reproduce it).
_PROBE_SEED = 0x6B6B


class LinearCapture:
    """Forward hook of one tracked nn.Linear: keeps its input and output of this step."""

    def __init__(self, layer: nn.Linear, verify: str = "first"):
        self.layer = layer
        self.verify = verify
        self.verified = False
        self.calls: List[tuple] = []
        self.armed = False
        self.handle = layer.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        if self.armed and torch.is_grad_enabled():
            self.calls.append((args[0], output))

    def usable(self) -> Optional[str]:
        """None if this step's capture gives a Kronecker block, else why it does not."""
        if len(self.calls) != 1:
            return f"called {len(self.calls)} times in one closure"
        a, out = self.calls[0]
        if a.dim() != 2:
            return f"its input has shape {tuple(a.shape)} (a sequence per sample), not (batch, d_in)"
        if not out.requires_grad:
            return "its output does not require grad"
        return None

    def remove(self) -> None:
        self.handle.remove()


def batched_jacobian(flat_pred: torch.Tensor, inputs: Sequence[torch.Tensor],
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
        return list(torch.autograd.grad(flat_pred, list(inputs), grad_outputs=eye,
                                        retain_graph=True, is_grads_batched=True,
                                        allow_unused=True))
    except RuntimeError:
        # Some ops have no batching rule for their backward: fall back to one row at a time.
        rows = [torch.autograd.grad(flat_pred, list(inputs), grad_outputs=eye[i],
                                    retain_graph=True, allow_unused=True) for i in range(m)]
        return [None if rows[0][k] is None else torch.stack([r[k] for r in rows])
                for k in range(len(inputs))]


def per_sample_output_grads(per_sample: torch.Tensor, outputs: List[torch.Tensor],
                            layers: List[nn.Module], verify: List[bool]) -> List[torch.Tensor]:
    """D of every tracked layer, (B, K, d_out): D[j, k] = d pred[j, k] / d out[j].

    When observation (j, k) depends on the layer only through its own sample j, one
    backward pass per score index k (the gradient of sum_j pred[j, k]) gives D[:, k] for
    every sample at once: K passes, not B K. For a layer with ``verify`` set, a second set
    of K passes weighted by random per-sample coefficients u_j must give u_j times the
    first; cross-sample dependence (batch norm, attention across the batch) breaks that and
    raises. The check reads a value on the host, so the optimizer runs it on a layer's first
    step only unless asked for every step (``track(verify="always")``).
    """
    if not outputs:
        return []
    batch, k_cls = per_sample.shape
    for out, layer in zip(outputs, layers):
        if out.shape[0] != batch:
            raise ValueError(f"tracked layer {layer} saw a batch of {out.shape[0]} samples but "
                             f"pred has {batch} rows: track() needs pred's first dimension to be "
                             f"the layer's batch dimension")
    checking = any(verify)
    passes = 2 * k_cls if checking else k_cls
    probes = torch.zeros((passes, batch, k_cls), dtype=per_sample.dtype, device=per_sample.device)
    cls = torch.arange(k_cls, device=per_sample.device)
    probes[cls, :, cls] = 1.0
    if checking:
        gen = torch.Generator().manual_seed(_PROBE_SEED)
        u = torch.randn(batch, generator=gen, dtype=torch.float64).to(per_sample.device,
                                                                      per_sample.dtype)
        probes[k_cls + cls, :, cls] = u
    grads = batched_jacobian(per_sample, outputs, probes)
    result = []
    for grad, out, layer, check in zip(grads, outputs, layers, verify):
        if grad is None:
            raise ValueError(f"pred does not depend on the output of tracked layer {layer}")
        grad = grad.detach()
        plain = grad[:k_cls]                                      # (K, B, d_out)
        if check:
            expected = u.reshape(1, -1, 1) * plain
            scale = float(expected.abs().max()) if expected.numel() else 0.0
            # Rounding of the probe in low precision: allow a few ulps of the dtype.
            tol = max(1e-4, 8 * torch.finfo(grad.dtype).eps)
            if float((grad[k_cls:] - expected).abs().max()) > tol * max(scale, 1e-30):
                raise ValueError(f"tracked layer {layer}: an observation depends on another "
                                 f"sample's output (e.g. batch normalisation or attention across "
                                 f"the batch), so its Jacobian is not a Kronecker block; do not "
                                 f"track this layer")
        result.append(plain.permute(1, 0, 2).contiguous())        # (B, K, d_out)
    return result


@dataclass
class BatchObservation:
    """The blocks of one batch-mode step, their hyper-parameters, the residual (float64),
    and the parameters the observation does not touch (they only go through the predict)."""

    blocks: List = field(default_factory=list)
    hypers: List[StepHyper] = field(default_factory=list)
    residual: Optional[torch.Tensor] = None
    untouched: List[Tuple[torch.Tensor, dict]] = field(default_factory=list)


def batch_observation(pred: torch.Tensor, target: torch.Tensor,
                      pairs: Sequence[Tuple[torch.Tensor, dict]],
                      captures: Dict[nn.Linear, LinearCapture],
                      cov_of: Callable[[torch.Tensor, dict], torch.Tensor],
                      hyper_of: Callable[[dict], StepHyper],
                      warn_once: Callable[[str, str], None]) -> BatchObservation:
    """Blocks of ``pred`` (m,) or (B, K) against ``target`` for the parameters ``pairs``
    ((param, group)); tracked layers in ``captures`` give Kronecker blocks."""
    rows_per_sample = 1 if pred.dim() == 1 else pred.shape[1]
    flat = pred.reshape(-1)
    obs = BatchObservation()
    obs.residual = target.detach().reshape(-1).to(torch.float64) - flat.detach().to(torch.float64)

    kron_layers = []
    for layer, capture in captures.items():
        why = capture.usable()
        if why is None:
            kron_layers.append((layer, capture))
        elif capture.calls or layer.weight.requires_grad:
            warn_once(f"dense:{id(layer)}",
                      f"KalmanNGD.track: {layer} {why}; using the dense Jacobian for it")
    groups_of = {id(p): g for p, g in pairs}
    kron_layers = [(layer, c) for layer, c in kron_layers if id(layer.weight) in groups_of]
    kron_ids = {id(layer.weight) for layer, _ in kron_layers}
    kron_ids |= {id(layer.bias) for layer, _ in kron_layers if layer.bias is not None}
    dense_pairs = [(p, g) for p, g in pairs if id(p) not in kron_ids]

    dense_jacs = batched_jacobian(flat, [p for p, _ in dense_pairs])
    for (p, g), jac in zip(dense_pairs, dense_jacs):
        if jac is None:
            obs.untouched.append((p, g))
            continue
        obs.blocks.append(DenseBlock(p, cov_of(p, g), jac.detach()))
        obs.hypers.append(hyper_of(g))

    per_sample = pred.reshape(-1, rows_per_sample)
    # The cross-sample check reads values: not on meta tensors, which have none (a meta
    # run traces shapes; the check then runs on the first step with real tensors).
    readable = pred.device.type != "meta"
    verify = [readable and (c.verify == "always" or (c.verify == "first" and not c.verified))
              for _, c in kron_layers]
    output_grads = per_sample_output_grads(per_sample, [c.calls[0][1] for _, c in kron_layers],
                                           [layer for layer, _ in kron_layers], verify)
    for (layer, capture), grad_outputs, checked in zip(kron_layers, output_grads, verify):
        capture.verified = capture.verified or checked
        g = groups_of[id(layer.weight)]
        inputs = capture.calls[0][0].detach()
        obs.blocks.append(KronBlock(layer.weight, cov_of(layer.weight, g), inputs, grad_outputs))
        obs.hypers.append(hyper_of(g))
        if layer.bias is not None and id(layer.bias) in groups_of:
            gb = groups_of[id(layer.bias)]
            obs.blocks.append(DenseBlock(layer.bias, cov_of(layer.bias, gb),
                                         grad_outputs.reshape(-1, grad_outputs.shape[-1])))
            obs.hypers.append(hyper_of(gb))
    return obs
