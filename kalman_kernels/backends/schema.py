"""The op schema: one definition of every kernel op, shared by every compiled backend.

The compiled backends (``cpp`` on CPU, ``cuda`` on NVIDIA GPUs) register implementations
of the ops below under the ``kalman_kernels`` namespace, one per dispatch key
(``TORCH_LIBRARY_IMPL(kalman_kernels, CPU | CUDA, m)``), so PyTorch's dispatcher picks the
device. The Triton backend defines the same ops, with the same schema strings and fake
implementations, under ``kalman_kernels_triton`` (it serves the same device as ``cuda``, so
it needs its own names). Nothing else defines an op or a fake: the schema strings, the
shape checks and the output dtypes live here only.

Semantics are those of the functions of the same name in :mod:`kalman_kernels.reference`
(see ``kalman_kernels/backends/README.md``). In short:

* ``ok`` is a 0-d ``bool`` tensor on the ops' device: when it is false an in-place op
  writes nothing (the skip predicate of a sync-free step, docs/design.md, 4.2);
* ``coef`` (m,), ``whitening`` (m, m), and the loss step's ``coef`` / ``weight`` (0-d) are
  float64 tensors on the ops' device;
* Kronecker blocks are sample-grouped: ``inputs`` (B, d_in), ``grad_outputs``
  (B, K, d_out), m = B K observations in (j, k) order.
"""
from __future__ import annotations

from typing import Dict

import torch

NAMESPACE = "kalman_kernels"
TRITON_NAMESPACE = "kalman_kernels_triton"

_UPDATE_SCALARS = ("float forgetting, float process_noise, float cov_floor, float cov_ceiling, "
                   "bool information")

#: op name -> schema (arguments and returns), the single source of truth.
SCHEMAS: Dict[str, str] = {
    "innovation_cov_dense":
        "(Tensor jac, Tensor cov, float forgetting, float process_noise) -> Tensor",
    "innovation_cov_kron":
        "(Tensor inputs, Tensor grad_outputs, Tensor cov, float forgetting, "
        "float process_noise) -> Tensor",
    "fused_update_dense_":
        "(Tensor(a!) param, Tensor(b!) cov, Tensor jac, Tensor coef, Tensor whitening, "
        f"Tensor ok, {_UPDATE_SCALARS}) -> ()",
    "fused_update_kron_":
        "(Tensor(a!) weight, Tensor(b!) cov, Tensor inputs, Tensor grad_outputs, Tensor coef, "
        f"Tensor whitening, Tensor ok, {_UPDATE_SCALARS}) -> ()",
    "loss_quad_form":
        "(Tensor[] grads, Tensor[] covs, float forgetting, float process_noise) -> Tensor",
    "loss_step_":
        "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] covs, Tensor coef, Tensor weight, "
        f"Tensor ok, {_UPDATE_SCALARS}) -> ()",
    "step_terms_dense":
        "(Tensor jac, Tensor coef, Tensor whitening) -> (Tensor, Tensor)",
    "step_terms_kron":
        "(Tensor inputs, Tensor grad_outputs, Tensor coef, Tensor whitening) -> (Tensor, Tensor)",
    "apply_terms_":
        "(Tensor(a!) param, Tensor(b!) cov, Tensor direction, Tensor diag_term, Tensor ok, "
        f"{_UPDATE_SCALARS}) -> ()",
}

F64 = torch.float64


def _acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any operand is float64, else float32: the dtype of step terms."""
    return F64 if any(t.dtype == F64 for t in tensors) else torch.float32


# --------------------------------------------------------------------------------------
# Shape checks (shared by the fakes; compiled kernels repeat them with their own messages)
# --------------------------------------------------------------------------------------
def _check_ok(ok: torch.Tensor) -> None:
    torch._check(ok.dim() == 0,
                 lambda: f"ok must be a 0-d bool tensor, got shape {tuple(ok.shape)}")


def _check_coef(coef: torch.Tensor, whitening: torch.Tensor, m) -> None:
    torch._check(coef.dim() == 1 and coef.shape[0] == m,
                 lambda: f"coef must be (m,) = ({m},), got {tuple(coef.shape)}")
    torch._check(whitening.dim() == 2 and whitening.shape[0] == m and whitening.shape[1] == m,
                 lambda: f"whitening must be (m, m) = ({m}, {m}), got {tuple(whitening.shape)}")


def _check_dense(jac: torch.Tensor, n) -> None:
    torch._check(jac.dim() == 2, lambda: f"jac must be (m, n), got {tuple(jac.shape)}")
    torch._check(jac.shape[1] == n, lambda: f"jac has {jac.shape[1]} columns, the parameter "
                                            f"{n} elements")


def _check_kron(inputs: torch.Tensor, grad_outputs: torch.Tensor, d_out, d_in) -> None:
    torch._check(inputs.dim() == 2, lambda: f"inputs must be (B, d_in), got {tuple(inputs.shape)}")
    torch._check(grad_outputs.dim() == 3,
                 lambda: f"grad_outputs must be (B, K, d_out), got {tuple(grad_outputs.shape)}")
    torch._check(inputs.shape[0] == grad_outputs.shape[0],
                 lambda: f"inputs has {inputs.shape[0]} rows, grad_outputs {grad_outputs.shape[0]}")
    torch._check(inputs.shape[1] == d_in and grad_outputs.shape[2] == d_out,
                 lambda: f"inputs (B, {inputs.shape[1]}) and grad_outputs (B, K, "
                         f"{grad_outputs.shape[2]}) do not match a ({d_out}, {d_in}) weight")


# --------------------------------------------------------------------------------------
# Fake implementations: output shapes and dtypes, for torch.compile / FakeTensor / meta
# --------------------------------------------------------------------------------------
def _fake_innovation_cov_dense(jac, cov, forgetting, process_noise):
    _check_dense(jac, cov.numel())
    m = jac.shape[0]
    return jac.new_empty((m, m), dtype=F64)


def _fake_innovation_cov_kron(inputs, grad_outputs, cov, forgetting, process_noise):
    torch._check(cov.dim() == 2, lambda: f"cov must be (d_out, d_in), got {tuple(cov.shape)}")
    _check_kron(inputs, grad_outputs, cov.shape[0], cov.shape[1])
    m = grad_outputs.shape[0] * grad_outputs.shape[1]
    return inputs.new_empty((m, m), dtype=F64)


def _fake_fused_update_dense_(param, cov, jac, coef, whitening, ok, forgetting, process_noise,
                              cov_floor, cov_ceiling, information):
    _check_dense(jac, param.numel())
    torch._check(cov.numel() == param.numel(), lambda: "cov and param differ in size")
    _check_coef(coef, whitening, jac.shape[0])
    _check_ok(ok)


def _fake_fused_update_kron_(weight, cov, inputs, grad_outputs, coef, whitening, ok,
                             forgetting, process_noise, cov_floor, cov_ceiling, information):
    torch._check(weight.dim() == 2, lambda: f"weight must be 2-D, got {tuple(weight.shape)}")
    torch._check(cov.shape == weight.shape, lambda: "cov and weight differ in shape")
    _check_kron(inputs, grad_outputs, weight.shape[0], weight.shape[1])
    _check_coef(coef, whitening, grad_outputs.shape[0] * grad_outputs.shape[1])
    _check_ok(ok)


def _fake_loss_quad_form(grads, covs, forgetting, process_noise):
    torch._check(len(grads) == len(covs), lambda: "grads and covs differ in length")
    device = grads[0].device if len(grads) else torch.device("cpu")
    return torch.empty((), dtype=F64, device=device)


def _fake_loss_step_(params, grads, covs, coef, weight, ok, forgetting, process_noise,
                     cov_floor, cov_ceiling, information):
    torch._check(len(params) == len(grads) == len(covs),
                 lambda: "params, grads and covs differ in length")
    torch._check(coef.numel() == 1 and weight.numel() == 1, lambda: "coef and weight are scalars")
    _check_ok(ok)


def _fake_step_terms_dense(jac, coef, whitening):
    torch._check(jac.dim() == 2, lambda: f"jac must be (m, n), got {tuple(jac.shape)}")
    _check_coef(coef, whitening, jac.shape[0])
    n = jac.shape[1]
    dtype = _acc_dtype(jac)
    return jac.new_empty((n,), dtype=dtype), jac.new_empty((n,), dtype=dtype)


def _fake_step_terms_kron(inputs, grad_outputs, coef, whitening):
    _check_kron(inputs, grad_outputs, grad_outputs.shape[-1], inputs.shape[-1])
    _check_coef(coef, whitening, grad_outputs.shape[0] * grad_outputs.shape[1])
    shape = (grad_outputs.shape[2], inputs.shape[1])
    dtype = _acc_dtype(inputs, grad_outputs)
    return inputs.new_empty(shape, dtype=dtype), inputs.new_empty(shape, dtype=dtype)


def _fake_apply_terms_(param, cov, direction, diag_term, ok, forgetting, process_noise,
                       cov_floor, cov_ceiling, information):
    torch._check(cov.numel() == param.numel() and direction.numel() == param.numel()
                 and diag_term.numel() == param.numel(),
                 lambda: "cov, direction and diag_term must have the parameter's size")
    _check_ok(ok)


FAKES = {name: globals()[f"_fake_{name}"] for name in SCHEMAS}

_libraries: Dict[str, torch.library.Library] = {}


def define(namespace: str = NAMESPACE) -> str:
    """Define every op of :data:`SCHEMAS` (and its fake) under ``namespace``, once.

    Returns the namespace. Backends then register kernels for the names
    (``TORCH_LIBRARY_IMPL`` in C++, ``torch.library.impl`` / ``register_kernel`` in Python).
    """
    if namespace in _libraries:
        return namespace
    lib = torch.library.Library(namespace, "FRAGMENT")
    for name, schema in SCHEMAS.items():
        lib.define(name + schema)
        torch.library.register_fake(f"{namespace}::{name}", FAKES[name], lib=lib)
    _libraries[namespace] = lib
    return namespace


def op(name: str, namespace: str = NAMESPACE):
    """The OpOverloadPacket ``torch.ops.<namespace>.<name>`` (defining the schema if needed)."""
    define(namespace)
    return getattr(getattr(torch.ops, namespace), name)
