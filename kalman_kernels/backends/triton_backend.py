"""The ``triton`` backend: fused GPU kernels written in Triton (``kalman_kernels/triton/``).

The ops are those of :mod:`kalman_kernels.backends.schema`, defined (schemas and fake
implementations, from that module only) under the ``kalman_kernels_triton`` namespace;
this module registers their kernels for the CUDA and CPU dispatch keys with
``torch.library``, so ``torch.compile(fullgraph=True)`` traces through them as opaque
custom ops (and ``torch.library.opcheck`` checks them). The entry points below are thin
wrappers of the backend contract (``kalman_kernels/backends/README.md``): they reshape
(views only), never read a tensor's value on the host, and call the ops.

Where it runs:

* CUDA tensors on a machine with a GPU (``backend="auto"`` picks it there by
  :data:`DEVICES` priority; see ``docs/triton_backend.md`` for how that is decided);
* CPU tensors only under ``TRITON_INTERPRET=1`` (set before ``triton`` is imported):
  Triton's interpreter runs the same kernels in NumPy. That is a test tool (about 1e6
  elements/s), so ``backend="auto"`` never picks it: it serves CPU tensors only when asked
  for by name.

Without triton the registry records why (``kk.backend_errors()["triton"]``) and
``backend="triton"`` raises with that reason; with triton but without a GPU (and without the
interpreter) the backend is available but serves no device present, so ``backend="triton"``
on CPU tensors raises, saying how to get a device it serves.
"""
from __future__ import annotations

import contextlib
from typing import List, Sequence

import torch

from . import schema

NAME = "triton"

HOW_TO_GET = ("run on a machine with an NVIDIA (or AMD) GPU and the matching torch build, "
              "with triton installed (`pip install triton`; CUDA builds of torch bring it). "
              "To test the kernels without a GPU, set TRITON_INTERPRET=1 before triton is "
              "imported: Triton's interpreter then runs them on CPU tensors (slowly)")

try:
    import triton  # noqa: F401
except ImportError as _exc:
    raise ImportError(f"triton is not installed ({_exc}); the triton backend needs it: "
                      f"`pip install triton`") from _exc

from ..triton import _common, dense, kron, multi_tensor  # noqa: E402

#: Whether the kernels run through Triton's interpreter (TRITON_INTERPRET=1 at import).
INTERPRET: bool = _common.INTERPRET

#: ``backend="auto"`` priority on CUDA tensors. Higher wins; ``reference`` is 0 on every
#: device. The ``cuda`` (C++/CUDA) backend declares its own number; the faster of the two by
#: the table of ``benchmarks/gpu.py`` (recorded in docs/triton_backend.md) gets the higher
#: one. Until a GPU run exists, 20: above the reference, below a cuda backend that declares
#: 30 once it is measured faster (the docs say how to change either number).
CUDA_PRIORITY = 20

#: device type -> auto priority (None: only when named; the interpreter is a test tool)
DEVICES = {"cuda": CUDA_PRIORITY}
if INTERPRET:
    DEVICES["cpu"] = None

# Available wherever triton imports; without a GPU it serves no device here, and
# asking for it on CPU tensors outside the interpreter raises (registry), naming HOW_TO_GET.

NAMESPACE = schema.define(schema.TRITON_NAMESPACE)
_ops = getattr(torch.ops, NAMESPACE)

_PARAM_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_COV_DTYPES = (torch.float32, torch.float64)


# --------------------------------------------------------------------------------------
# Checks (Python metadata only: shapes, dtypes, devices, strides)
# --------------------------------------------------------------------------------------
def _fail(op: str, message: str):
    raise RuntimeError(f"triton backend ({op}): {message}")


def _device(op: str, *tensors: torch.Tensor) -> torch.device:
    device = tensors[0].device
    for t in tensors[1:]:
        if t.device != device:
            _fail(op, f"all tensors must be on one device, got {device} and {t.device}")
    if device.type == "cpu":
        if not INTERPRET:
            _fail(op, "CPU tensors need Triton's interpreter (TRITON_INTERPRET=1 set before "
                      "triton is imported), a test tool; on CPU use backend='cpp' or "
                      "'reference', or move the tensors to a GPU")
    elif device.type != "cuda":
        _fail(op, f"{device.type} tensors are not supported (CUDA GPUs, or CPU under the "
                  f"interpreter)")
    return device


@contextlib.contextmanager
def _on(device: torch.device):
    """Launch on the tensors' GPU (Triton launches on the current device)."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            yield
    else:
        yield


def _float(op: str, name: str, t: torch.Tensor, dtypes=_PARAM_DTYPES) -> None:
    if t.dtype not in dtypes:
        _fail(op, f"{name} must be one of {', '.join(str(d) for d in dtypes)}, got {t.dtype}")


def _flat_inplace(op: str, name: str, t: torch.Tensor) -> torch.Tensor:
    if not t.is_contiguous():
        _fail(op, f"{name} is updated in place and must be contiguous (shape "
                  f"{tuple(t.shape)}, strides {t.stride()}); keep the state in contiguous "
                  f"storage")
    return t.view(-1)


def _ok(op: str, ok: torch.Tensor) -> None:
    if ok.dim() != 0 or ok.dtype != torch.bool:
        _fail(op, f"ok must be a 0-d bool tensor, got {ok.dtype} of shape {tuple(ok.shape)}")


def _terms(op: str, coef: torch.Tensor, whitening: torch.Tensor, m: int) -> None:
    if coef.dim() != 1 or coef.shape[0] != m:
        _fail(op, f"coef must be (m,) = ({m},), got {tuple(coef.shape)}")
    if whitening.shape != (m, m):
        _fail(op, f"whitening must be (m, m) = ({m}, {m}), got {tuple(whitening.shape)}")
    _float(op, "coef", coef, _COV_DTYPES)
    _float(op, "whitening", whitening, _COV_DTYPES)


def _dense_shapes(op: str, jac: torch.Tensor, n: int) -> None:
    if jac.dim() != 2 or jac.shape[1] != n:
        _fail(op, f"jac must be (m, n) with n = {n}, got {tuple(jac.shape)}")


def _kron_shapes(op: str, inputs, grad_outputs, d_out: int, d_in: int) -> None:
    if inputs.dim() != 2 or grad_outputs.dim() != 3:
        _fail(op, f"inputs must be (B, d_in) and grad_outputs (B, K, d_out), got "
                  f"{tuple(inputs.shape)} and {tuple(grad_outputs.shape)}")
    if inputs.shape[0] != grad_outputs.shape[0] or inputs.shape[1] != d_in \
            or grad_outputs.shape[2] != d_out:
        _fail(op, f"inputs {tuple(inputs.shape)} and grad_outputs {tuple(grad_outputs.shape)} "
                  f"do not match a ({d_out}, {d_in}) weight")


# --------------------------------------------------------------------------------------
# Kernels of the ops (registered for CUDA and CPU below)
# --------------------------------------------------------------------------------------
def _innovation_cov_dense(jac, cov, forgetting, process_noise):
    op = "innovation_cov_dense"
    device = _device(op, jac, cov)
    _dense_shapes(op, jac, cov.numel())
    _float(op, "jac", jac)
    _float(op, "cov", cov, _COV_DTYPES)
    with _on(device):
        return dense.innovation_cov_dense(jac, cov, forgetting, process_noise)


def _innovation_cov_kron(inputs, grad_outputs, cov, forgetting, process_noise):
    op = "innovation_cov_kron"
    device = _device(op, inputs, grad_outputs, cov)
    if cov.dim() != 2:
        _fail(op, f"cov must be (d_out, d_in), got {tuple(cov.shape)}")
    _kron_shapes(op, inputs, grad_outputs, cov.shape[0], cov.shape[1])
    _float(op, "inputs", inputs)
    _float(op, "grad_outputs", grad_outputs)
    _float(op, "cov", cov, _COV_DTYPES)
    with _on(device):
        return kron.innovation_cov_kron(inputs, grad_outputs, cov, forgetting, process_noise)


def _fused_update_dense_(param, cov, jac, coef, whitening, ok, forgetting, process_noise,
                         cov_floor, cov_ceiling, information):
    op = "fused_update_dense_"
    device = _device(op, param, cov, jac, coef, whitening, ok)
    p = _flat_inplace(op, "param", param)
    c = _flat_inplace(op, "cov", cov)
    if c.numel() != p.numel():
        _fail(op, f"cov has {c.numel()} elements, param {p.numel()}")
    _dense_shapes(op, jac, p.numel())
    _terms(op, coef, whitening, jac.shape[0])
    _ok(op, ok)
    _float(op, "param", param)
    _float(op, "jac", jac)
    _float(op, "cov", cov, _COV_DTYPES)
    with _on(device):
        dense.fused_update_dense_(p, c, jac, coef, whitening, ok, forgetting, process_noise,
                                  cov_floor, cov_ceiling, information)


def _fused_update_kron_(weight, cov, inputs, grad_outputs, coef, whitening, ok, forgetting,
                        process_noise, cov_floor, cov_ceiling, information):
    op = "fused_update_kron_"
    device = _device(op, weight, cov, inputs, grad_outputs, coef, whitening, ok)
    if weight.dim() != 2 or cov.shape != weight.shape:
        _fail(op, f"weight must be 2-D and cov of its shape, got {tuple(weight.shape)} and "
                  f"{tuple(cov.shape)}")
    _flat_inplace(op, "weight", weight)
    _flat_inplace(op, "cov", cov)
    _kron_shapes(op, inputs, grad_outputs, weight.shape[0], weight.shape[1])
    _terms(op, coef, whitening, grad_outputs.shape[0] * grad_outputs.shape[1])
    _ok(op, ok)
    for name, t in (("weight", weight), ("inputs", inputs), ("grad_outputs", grad_outputs)):
        _float(op, name, t)
    _float(op, "cov", cov, _COV_DTYPES)
    with _on(device):
        kron.fused_update_kron_(weight, cov, inputs, grad_outputs, coef, whitening, ok,
                                forgetting, process_noise, cov_floor, cov_ceiling, information)


def _lists(op: str, **lists) -> None:
    lengths = {len(v) for v in lists.values()}
    if len(lengths) > 1:
        _fail(op, f"{', '.join(lists)} differ in length")
    first_name = next(iter(lists))
    for i, ts in enumerate(zip(*lists.values())):
        for name, t in zip(lists, ts):
            if t.numel() != ts[0].numel():
                _fail(op, f"{name}[{i}] has {t.numel()} elements, {first_name}[{i}] "
                          f"{ts[0].numel()}")


def _loss_quad_form(grads, covs, forgetting, process_noise):
    op = "loss_quad_form"
    _lists(op, grads=grads, covs=covs)
    if len(grads) == 0:
        return torch.zeros((), dtype=torch.float64)
    device = _device(op, *grads, *covs)
    for i, (g, c) in enumerate(zip(grads, covs)):
        _float(op, f"grads[{i}]", g)
        _float(op, f"covs[{i}]", c, _COV_DTYPES)
    with _on(device):
        return multi_tensor.loss_quad_form(grads, covs, forgetting, process_noise)


def _loss_step_(params, grads, covs, coef, weight, ok, forgetting, process_noise, cov_floor,
                cov_ceiling, information):
    op = "loss_step_"
    _lists(op, params=params, grads=grads, covs=covs)
    if len(params) == 0:
        return
    device = _device(op, *params, *grads, *covs, coef, weight, ok)
    for i, (p, g, c) in enumerate(zip(params, grads, covs)):
        _flat_inplace(op, f"params[{i}]", p)
        _flat_inplace(op, f"covs[{i}]", c)
        _float(op, f"params[{i}]", p)
        _float(op, f"grads[{i}]", g)
        _float(op, f"covs[{i}]", c, _COV_DTYPES)
    if coef.numel() != 1 or weight.numel() != 1:
        _fail(op, "coef and weight must be 0-d tensors")
    _ok(op, ok)
    with _on(device):
        multi_tensor.loss_step_(params, grads, covs, coef, weight, ok, forgetting, process_noise,
                                cov_floor, cov_ceiling, information)


def _step_terms_dense(jac, coef, whitening):
    op = "step_terms_dense"
    device = _device(op, jac, coef, whitening)
    if jac.dim() != 2:
        _fail(op, f"jac must be (m, n), got {tuple(jac.shape)}")
    _terms(op, coef, whitening, jac.shape[0])
    _float(op, "jac", jac)
    with _on(device):
        return dense.step_terms_dense(jac, coef, whitening)


def _step_terms_kron(inputs, grad_outputs, coef, whitening):
    op = "step_terms_kron"
    device = _device(op, inputs, grad_outputs, coef, whitening)
    if grad_outputs.dim() != 3 or inputs.dim() != 2:
        _fail(op, f"inputs must be (B, d_in) and grad_outputs (B, K, d_out), got "
                  f"{tuple(inputs.shape)} and {tuple(grad_outputs.shape)}")
    _kron_shapes(op, inputs, grad_outputs, grad_outputs.shape[2], inputs.shape[1])
    _terms(op, coef, whitening, grad_outputs.shape[0] * grad_outputs.shape[1])
    _float(op, "inputs", inputs)
    _float(op, "grad_outputs", grad_outputs)
    with _on(device):
        return kron.step_terms_kron(inputs, grad_outputs, coef, whitening)


def _apply_terms_(param, cov, direction, diag_term, ok, forgetting, process_noise, cov_floor,
                  cov_ceiling, information):
    op = "apply_terms_"
    device = _device(op, param, cov, direction, diag_term, ok)
    p = _flat_inplace(op, "param", param)
    c = _flat_inplace(op, "cov", cov)
    for name, t in (("cov", cov), ("direction", direction), ("diag_term", diag_term)):
        if t.numel() != p.numel():
            _fail(op, f"{name} has {t.numel()} elements, param {p.numel()}")
    _ok(op, ok)
    _float(op, "param", param)
    for name, t in (("cov", cov), ("direction", direction), ("diag_term", diag_term)):
        _float(op, name, t, _COV_DTYPES)
    with _on(device):
        multi_tensor.apply_terms_(p, c, direction, diag_term, ok, forgetting, process_noise,
                                  cov_floor, cov_ceiling, information)


KERNELS = {
    "innovation_cov_dense": _innovation_cov_dense,
    "innovation_cov_kron": _innovation_cov_kron,
    "fused_update_dense_": _fused_update_dense_,
    "fused_update_kron_": _fused_update_kron_,
    "loss_quad_form": _loss_quad_form,
    "loss_step_": _loss_step_,
    "step_terms_dense": _step_terms_dense,
    "step_terms_kron": _step_terms_kron,
    "apply_terms_": _apply_terms_,
}
assert set(KERNELS) == set(schema.SCHEMAS), "every op of the schema needs a Triton kernel"

_impl = torch.library.Library(NAMESPACE, "IMPL")
for _name, _fn in KERNELS.items():
    for _key in ("CUDA", "CPU"):   # CPU: the interpreter (or a clear error without it)
        _impl.impl(_name, _fn, _key)


# --------------------------------------------------------------------------------------
# The backend contract (signatures of kalman_kernels.reference)
# --------------------------------------------------------------------------------------
def _f(x) -> float:
    return float(x)


def _ceiling(x) -> float:
    return float("inf") if x is None else float(x)


def _scalar(x, device) -> torch.Tensor:
    """A 0-d float64 device tensor (a Python number is placed on the device, as the
    reference accepts one; tensors are used as they are)."""
    if isinstance(x, torch.Tensor):
        return x
    return torch.tensor(float(x), dtype=torch.float64, device=device)


def _pred(ok, device) -> torch.Tensor:
    if isinstance(ok, torch.Tensor):
        return ok
    return torch.tensor(bool(ok), dtype=torch.bool, device=device)


def _grouped(grad_outputs: torch.Tensor) -> torch.Tensor:
    return grad_outputs.unsqueeze(1) if grad_outputs.dim() == 2 else grad_outputs


def innovation_cov_dense(jac: torch.Tensor, cov: torch.Tensor, forgetting: float = 1.0,
                         process_noise: float = 0.0) -> torch.Tensor:
    """H diag(P-) H^T, (m, m) float64; jac is (m, *shape), cov holds n elements."""
    return _ops.innovation_cov_dense(jac.reshape(jac.shape[0], -1), cov, _f(forgetting),
                                     _f(process_noise))


def innovation_cov_kron(inputs: torch.Tensor, grad_outputs: torch.Tensor, cov: torch.Tensor,
                        forgetting: float = 1.0, process_noise: float = 0.0) -> torch.Tensor:
    """S of a sample-grouped Kronecker block, (B K, B K) float64, without building H."""
    return _ops.innovation_cov_kron(inputs, _grouped(grad_outputs), cov, _f(forgetting),
                                    _f(process_noise))


def fused_update_dense_(param: torch.Tensor, cov: torch.Tensor, jac: torch.Tensor,
                        coef: torch.Tensor, whitening: torch.Tensor, ok: torch.Tensor,
                        forgetting: float, process_noise: float, cov_floor: float,
                        cov_ceiling: float, information: bool) -> None:
    """In place when ok: param += P- (.) H^T coef ; cov = rule(P-, ||F H_i||^2) clamped."""
    _ops.fused_update_dense_(param, cov, jac.reshape(jac.shape[0], -1), coef, whitening,
                             _pred(ok, param.device), _f(forgetting), _f(process_noise),
                             _f(cov_floor), _ceiling(cov_ceiling), bool(information))


def fused_update_kron_(weight: torch.Tensor, cov: torch.Tensor, inputs: torch.Tensor,
                       grad_outputs: torch.Tensor, coef: torch.Tensor, whitening: torch.Tensor,
                       ok: torch.Tensor, forgetting: float, process_noise: float,
                       cov_floor: float, cov_ceiling: float, information: bool) -> None:
    """The sample-grouped Kronecker form of :func:`fused_update_dense_` (H never formed)."""
    _ops.fused_update_kron_(weight, cov, inputs, _grouped(grad_outputs), coef, whitening,
                            _pred(ok, weight.device), _f(forgetting), _f(process_noise),
                            _f(cov_floor), _ceiling(cov_ceiling), bool(information))


def loss_quad_form(grads: Sequence[torch.Tensor], covs: Sequence[torch.Tensor],
                   forgetting: float = 1.0, process_noise: float = 0.0) -> torch.Tensor:
    """g^T P- g summed over every tensor: a 0-d float64 tensor on the tensors' device."""
    if len(grads) == 0:
        return torch.zeros((), dtype=torch.float64)
    return _ops.loss_quad_form(list(grads), list(covs), _f(forgetting), _f(process_noise))


def loss_step_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
               covs: Sequence[torch.Tensor], coef, weight, ok, forgetting: float,
               process_noise: float, cov_floor: float, cov_ceiling: float,
               information: bool) -> None:
    """In place over every tensor when ok: mu += coef P- g ; P = rule(P-, weight g^2)."""
    if len(params) == 0:
        return
    device = params[0].device
    ps: List[torch.Tensor] = list(params)
    cs: List[torch.Tensor] = list(covs)
    _ops.loss_step_(ps, list(grads), cs, _scalar(coef, device), _scalar(weight, device),
                    _pred(ok, device), _f(forgetting), _f(process_noise), _f(cov_floor),
                    _ceiling(cov_ceiling), bool(information))


def step_terms_dense(jac: torch.Tensor, coef: torch.Tensor, whitening: torch.Tensor):
    """(H^T coef, diag(H^T F^T F H)), each (n,), for the all-reduced update
    (docs/design.md, 2.5)."""
    return _ops.step_terms_dense(jac.reshape(jac.shape[0], -1), coef, whitening)


def step_terms_kron(inputs: torch.Tensor, grad_outputs: torch.Tensor, coef: torch.Tensor,
                    whitening: torch.Tensor):
    """The two Kronecker terms, each (d_out, d_in) (docs/design.md, 2.5)."""
    return _ops.step_terms_kron(inputs, _grouped(grad_outputs), coef, whitening)


def apply_terms_(param: torch.Tensor, cov: torch.Tensor, direction: torch.Tensor,
                 diag_term: torch.Tensor, ok: torch.Tensor, forgetting: float,
                 process_noise: float, cov_floor: float, cov_ceiling: float,
                 information: bool) -> None:
    """In place when ok: param += P- direction ; cov = rule(P-, diag_term) (docs/design.md, 2.5)."""
    _ops.apply_terms_(param, cov, direction, diag_term, _pred(ok, param.device),
                      _f(forgetting), _f(process_noise), _f(cov_floor), _ceiling(cov_ceiling),
                      bool(information))
