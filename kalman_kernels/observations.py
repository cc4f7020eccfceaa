"""Building the observation blocks of batch-observation mode (docs/design.md, 2.1).

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

With ``likelihood="categorical"`` the closure returns ``(logits, labels)`` instead, and
:func:`categorical_observation` turns them into the probabilities of K - 1 classes per
sample, their residual and their (m, m) noise (docs/math.md, "The categorical likelihood");
those probabilities then go through :func:`batch_observation` like any (B, K - 1) prediction.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ._deferred import readable_now
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
            return (f"its input has shape {tuple(a.shape)} (a sequence per sample), "
                    f"not (batch, d_in)")
        if not out.requires_grad:
            return "its output does not require grad"
        if self.layer.weight.is_complex():
            return "its weight is complex (Kronecker blocks are real)"
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
    for grad, _out, layer, check in zip(grads, outputs, layers, verify):
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


def check_prediction(pred, target, device) -> None:
    """Shapes, dtypes and devices of the closure's ``(pred, target)`` (Gaussian batch
    mode): (m,) or (m, K) tensors of one shape on the parameters' ``device``, ``pred`` with
    its graph."""
    if not isinstance(pred, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError(f"closure must return (pred, target) as tensors, got "
                        f"({describe(pred)}, {describe(target)})")
    if pred.is_complex() or target.is_complex():
        raise TypeError("pred and target must be real: the observation is real (complex "
                        "parameters are fine). To observe both parts of a complex prediction, "
                        "return torch.view_as_real(pred).flatten(-2) and the same of target")
    if pred.dim() == 0 and target.dim() == 0:
        raise ValueError("closure returned a pair of 0-d tensors: batch-observation mode "
                         "needs (pred, target) of shape (m,) or (m, K); for loss-"
                         "observation mode return the loss tensor alone (`return loss`, "
                         "not `return loss, aux`)")
    if pred.shape != target.shape:
        raise ValueError(f"pred has shape {tuple(pred.shape)} but target has shape "
                         f"{tuple(target.shape)}; they must match ((m,) or (m, K))")
    if pred.dim() not in (1, 2) or pred.numel() == 0:
        raise ValueError(f"pred must have shape (m,) or (m, K) with m >= 1, got "
                         f"{tuple(pred.shape)}")
    if pred.device != target.device or pred.device != device:
        raise ValueError(f"pred is on {pred.device}, target on {target.device} and the "
                         f"parameters on {device}: put them on one device")
    if not pred.requires_grad:
        raise ValueError("pred does not require grad: the closure must compute it from the "
                         "parameters with autograd enabled")


@dataclass
class BatchObservation:
    """The blocks of one batch-mode step, their hyper-parameters, the residual (float64),
    and the parameters the observation does not touch (they only go through the predict)."""

    blocks: List = field(default_factory=list)
    hypers: List[StepHyper] = field(default_factory=list)
    residual: Optional[torch.Tensor] = None
    untouched: List[Tuple[torch.Tensor, dict]] = field(default_factory=list)
    #: (weight, why) of the tracked layers that got a dense block this step
    fallbacks: List[Tuple[torch.Tensor, str]] = field(default_factory=list)
    #: the weights that got a Kronecker block this step, and their layers' biases (a dense
    #: block whose Jacobian is the layer's D)
    kron_weights: List[torch.Tensor] = field(default_factory=list)
    kron_biases: List[torch.Tensor] = field(default_factory=list)
    #: the parameter each block updates (a block holds its real view for a complex one)
    origin: List[torch.Tensor] = field(default_factory=list)


def real_view(t: torch.Tensor) -> torch.Tensor:
    """A complex tensor as its real view (..., 2) of real and imaginary parts, detached; a
    real tensor as it is. The filter treats a complex parameter as the pair of its parts
    (docs/design.md, 3): a Jacobian or gradient of a real observation with respect to a
    complex parameter, in torch's convention (d/d re + i d/d im), has as its real view the
    Jacobian with respect to that pair."""
    return torch.view_as_real(t.detach()) if t.is_complex() else t


def batch_observation(pred: torch.Tensor, target: torch.Tensor,
                      pairs: Sequence[Tuple[torch.Tensor, dict]],
                      captures: Dict[nn.Linear, LinearCapture],
                      cov_of: Callable[[torch.Tensor, dict], torch.Tensor],
                      hyper_of: Callable[[dict], StepHyper],
                      warn_once: Callable[[str, str], None],
                      residual: Optional[torch.Tensor] = None) -> BatchObservation:
    """Blocks of ``pred`` (m,) or (B, K) against ``target`` for the parameters ``pairs``
    ((param, group)); tracked layers in ``captures`` give Kronecker blocks. ``residual``
    (float64, (m,)) replaces ``target - pred`` when the caller computed it more accurately
    (the categorical observation does, from float64 probabilities); ``target`` is then
    unused."""
    rows_per_sample = 1 if pred.dim() == 1 else pred.shape[1]
    flat = pred.reshape(-1)
    obs = BatchObservation()
    if residual is None:
        obs.residual = (target.detach().reshape(-1).to(torch.float64)
                        - flat.detach().to(torch.float64))
    else:
        obs.residual = residual

    kron_layers = []
    for layer, capture in captures.items():
        why = capture.usable()
        if why is None:
            kron_layers.append((layer, capture))
        else:
            obs.fallbacks.append((layer.weight, why))
            if capture.calls or layer.weight.requires_grad:
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
        obs.blocks.append(DenseBlock(real_view(p), cov_of(p, g), real_view(jac)))
        obs.hypers.append(hyper_of(g))
        obs.origin.append(p)

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
        obs.origin.append(layer.weight)
        obs.kron_weights.append(layer.weight)
        if layer.bias is not None and id(layer.bias) in groups_of:
            obs.kron_biases.append(layer.bias)
            gb = groups_of[id(layer.bias)]
            obs.blocks.append(DenseBlock(layer.bias, cov_of(layer.bias, gb),
                                         grad_outputs.reshape(-1, grad_outputs.shape[-1])))
            obs.hypers.append(hyper_of(gb))
            obs.origin.append(layer.bias)
    return obs


# ---------------------------------------------------------------------- categorical
#: The likelihoods of batch-observation mode (``KalmanNGD(likelihood=...)``).
LIKELIHOODS = ("gaussian", "categorical")


@dataclass
class CategoricalObservation:
    """The moment-matched observation of a softmax classifier (docs/math.md, "The
    categorical likelihood"). ``pred`` (B, K - 1): the probabilities of the kept classes,
    with their graph to the parameters (the filter differentiates them); ``residual``
    (B (K - 1),) and ``noise`` (B (K - 1), B (K - 1)): float64, detached; ``loss``: the
    batch's mean cross-entropy before the step (float64, 0-d)."""

    pred: torch.Tensor
    residual: torch.Tensor
    noise: torch.Tensor
    loss: torch.Tensor


def _soft_target_tol(k_cls: int, dtype: torch.dtype) -> float:
    # The rounding of a sum of K probabilities in the targets' dtype, and never below 1e-6:
    # soft targets made in float32 and cast to float64 still pass.
    return max(1e-6, 4.0 * k_cls * torch.finfo(dtype).eps)


def check_categorical(logits, labels, device) -> None:
    """Shapes, dtypes and devices of the closure's ``(logits, labels)``; on eager CPU also
    the label values (elsewhere reading them would stall the device: bad values then make
    the target non-finite and the step is skipped, see :func:`categorical_terms`)."""
    if not isinstance(logits, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError(f"with likelihood='categorical' the closure must return (logits, "
                        f"labels) as tensors, got ({describe(logits)}, {describe(labels)})")
    if logits.dim() != 2 or logits.shape[0] == 0:
        raise ValueError(f"logits must have shape (B, K) with B >= 1 (one row of K class "
                         f"scores per sample), got {tuple(logits.shape)}")
    batch, k_cls = logits.shape
    if k_cls < 2:
        raise ValueError(f"logits has K = {k_cls} class: a softmax over one class is the "
                         f"constant 1 and observes nothing; the categorical likelihood needs "
                         f"K >= 2 scores per sample (for a binary classifier with one logit z "
                         f"of shape (B, 1), return torch.cat([torch.zeros_like(z), z], 1))")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor, got {logits.dtype}")
    if logits.device != torch.device(device) or labels.device != logits.device:
        raise ValueError(f"logits is on {logits.device}, labels on {labels.device} and the "
                         f"parameters on {device}: put them on one device")
    if not logits.requires_grad:
        raise ValueError("logits does not require grad: the closure must compute it from the "
                         "parameters with autograd enabled")
    if labels.dim() == 1:
        if labels.dtype != torch.int64:
            raise TypeError(f"labels of shape (B,) are class indices and must be int64, got "
                            f"{labels.dtype}: convert them with labels.long(), or pass soft "
                            f"targets of shape (B, K) (floating, rows summing to 1)")
        if labels.shape[0] != batch:
            raise ValueError(f"labels has {labels.shape[0]} entries but logits has {batch} "
                             f"rows: one class index per sample")
        if readable_now(labels) and labels.numel():
            low, high = int(labels.min()), int(labels.max())
            if low < 0 or high >= k_cls:
                raise ValueError(f"labels must be class indices in [0, {k_cls - 1}] for K = "
                                 f"{k_cls} logits, got values from {low} to {high}")
    elif labels.dim() == 2:
        if tuple(labels.shape) != (batch, k_cls):
            raise ValueError(f"soft targets must have the shape of logits, {(batch, k_cls)}, "
                             f"got {tuple(labels.shape)}")
        if not labels.is_floating_point():
            raise TypeError(f"soft targets of shape (B, K) must be floating-point "
                            f"probabilities, got {labels.dtype}; class indices have shape "
                            f"(B,) and dtype int64")
        if readable_now(labels):
            y = labels.detach().to(torch.float64)
            finite = torch.isfinite(y).all(1)      # a non-finite row skips the step instead
            if bool((finite & (y < 0).any(1)).any()):
                raise ValueError(f"soft targets must be probabilities >= 0, got a minimum of "
                                 f"{float(y[finite].min())}")
            tol = _soft_target_tol(k_cls, labels.dtype)
            off = torch.where(finite, (y.sum(1) - 1.0).abs(), torch.zeros_like(y[:, 0]))
            if float(off.amax()) > tol:
                raise ValueError(f"soft targets must sum to 1 in every row (within {tol:.1e}), "
                                 f"got a row whose sum is off by {float(off.amax()):.3e}; "
                                 f"normalise them, e.g. labels / labels.sum(1, keepdim=True)")
    else:
        raise ValueError(f"labels must be class indices of shape (B,) = ({batch},) (int64) or "
                         f"soft targets of shape (B, K) = {(batch, k_cls)}, got shape "
                         f"{tuple(labels.shape)}")


def categorical_terms(logits: torch.Tensor, labels: torch.Tensor, tempering):
    """The detached parts of the categorical observation: ``(keep, residual, noise, loss)``.

    With p_j = softmax(logits_j) and y_j the one-hot (or soft) target, sample j contributes
    the residual y_j - p_j and the noise c (diag(p_j) - p_j p_j^T), c = ``tempering``. That
    noise is singular (its rows sum to zero, as the residual's entries do), so one class per
    sample is dropped: the K - 1 kept residuals of one choice are an invertible linear map
    of another's, and the Kalman step is invariant under such a map, so the choice changes
    nothing in exact arithmetic. Each sample drops its most probable class: the kept block
    diag(q) - q q^T (q the kept probabilities, sum(q) <= 1 - 1/K) is then as well
    conditioned as the dropped class allows, however confident the prediction; dropping a
    fixed class would factor a block whose smallest eigenvalue scales with that class's
    probability. ``keep`` (B, K - 1) lists each sample's kept classes in ascending order.

    Values that cannot be checked without a host read (labels out of range, soft targets
    not summing to 1, off eager CPU) make that sample's target NaN, so the step is skipped
    like any non-finite observation; a non-finite noise (non-finite logits) is replaced by
    the identity, which leaves the skip to the non-finite residual and Jacobian. No value
    is read on the host (GPUs, torch.compile, meta tensors).
    """
    f64 = torch.float64
    batch, k_cls = logits.shape
    device = logits.device
    z = logits.detach().to(f64)
    p = torch.softmax(z, dim=1)
    log_p = torch.log_softmax(z, dim=1)
    if labels.dim() == 1:
        valid = (labels >= 0) & (labels < k_cls)
        y = (labels[:, None] == torch.arange(k_cls, device=device)).to(f64)
    else:
        y = labels.detach().to(f64)
        tol = _soft_target_tol(k_cls, labels.dtype)
        valid = ((y.sum(1) - 1.0).abs() <= tol) & (y >= 0).all(1)
    nan = torch.full((), float("nan"), dtype=f64, device=device)
    y = torch.where(valid[:, None], y, nan)
    drop = p.argmax(1)
    kept = torch.arange(k_cls - 1, device=device)[None, :]
    keep = kept + (kept >= drop[:, None]).to(kept.dtype)               # (B, K - 1)
    p_keep = p.gather(1, keep)
    residual = (y.gather(1, keep) - p_keep).reshape(-1)
    # A probability that underflowed to exactly 0 would make R singular; the smallest
    # normal float64 keeps it factorable and changes nothing else (its H row is 0 too).
    q = p_keep.clamp_min(torch.finfo(f64).tiny)
    blocks = tempering * (torch.diag_embed(q) - q[:, :, None] * q[:, None, :])
    m = batch * (k_cls - 1)
    eye_b = torch.eye(batch, dtype=f64, device=device)
    noise = (eye_b[:, None, :, None] * blocks[:, :, None, :]).reshape(m, m)  # block diagonal
    noise = torch.where(torch.isfinite(noise).all(), noise,
                        torch.eye(m, dtype=f64, device=device))
    loss = -torch.where(y == 0, torch.zeros_like(y), y * log_p).sum(1).mean()
    return keep, residual, noise, loss


def categorical_observation(logits: torch.Tensor, labels: torch.Tensor, tempering,
                            device) -> CategoricalObservation:
    """Validate the closure's ``(logits, labels)`` and build the observation
    (:func:`categorical_terms`); ``pred`` keeps the graph through the softmax."""
    check_categorical(logits, labels, device)
    keep, residual, noise, loss = categorical_terms(logits, labels, tempering)
    pred = torch.softmax(logits, dim=1).gather(1, keep)
    return CategoricalObservation(pred, residual, noise, loss)


def describe(x) -> str:
    """A closure result in words, for error messages."""
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)}"
    if isinstance(x, (tuple, list)):
        return f"a {type(x).__name__} of length {len(x)}"
    return type(x).__name__
