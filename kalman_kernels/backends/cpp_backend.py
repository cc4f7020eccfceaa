"""The ``cpp`` backend: the C++ CPU extension ``kalman_kernels._C`` (csrc/).

The extension registers its kernels as ``torch.ops.kalman_kernels.*`` (TORCH_LIBRARY);
this module wraps them into the six entry points of the backend contract
(``kalman_kernels/backends/README.md``), registers their fake (meta) implementations so
``torch.compile`` traces through them without a graph break, and picks the kernels'
instruction set (baseline / AVX2 / AVX-512) from ``torch.backends.cpu.get_cpu_capability()``.

If ``kalman_kernels._C`` cannot be imported (not built, or built against another torch),
importing this module raises and the registry records the reason
(``kk.backend_errors()["cpp"]``).

Input handling: tensors updated in place (params / weights and covariances) must be
contiguous CPU tensors, or a ``RuntimeError`` names the argument; read-only inputs
(jac, inputs, grad_outputs, grads, coef, whitening) may be non-contiguous: a Jacobian with
unit column stride is read in place, anything else is copied to a contiguous tensor first.
"""
from __future__ import annotations

import importlib
import os
from typing import List, Sequence

import torch

try:  # loading the library registers torch.ops.kalman_kernels
    _C = importlib.import_module("kalman_kernels._C")
except ImportError as _exc:
    raise ImportError(f"the C++ extension kalman_kernels._C is not built or cannot be loaded "
                      f"({_exc}); setup.py builds it during `pip install --no-build-isolation "
                      f"-e .` and prints why when the build fails") from _exc

NAME = "cpp"
_ops = torch.ops.kalman_kernels

# torch capability string -> the kernel table compiled for it
_ISA_FOR_CAPABILITY = {"DEFAULT": "DEFAULT", "NO AVX": "DEFAULT", "AVX2": "AVX2",
                       "AVX512": "AVX512"}


def _choose_isa() -> str:
    """The instruction set of the kernels: torch's CPU capability (which honours
    ATEN_CPU_CAPABILITY), or KALMAN_KERNELS_CPU_CAPABILITY when set."""
    wanted = os.environ.get("KALMAN_KERNELS_CPU_CAPABILITY")
    if not wanted:
        try:
            wanted = torch.backends.cpu.get_cpu_capability()
        except Exception:  # pragma: no cover - very old torch
            wanted = "DEFAULT"
    wanted = wanted.upper()
    if wanted.startswith("AVX512"):
        wanted = "AVX512"
    return _ISA_FOR_CAPABILITY.get(wanted, "DEFAULT")


def isa() -> str:
    """The instruction set the kernels run with now: 'DEFAULT', 'AVX2' or 'AVX512'."""
    return _ops._isa()


def set_isa(name: str) -> None:
    """Switch the kernels to another compiled instruction set (tests, benchmarks).

    Raises if this CPU lacks it (running it would die with SIGILL)."""
    _ops._set_isa(name)


set_isa(_choose_isa())


# --------------------------------------------------------------------------------------
# Fake (meta) implementations: shapes and dtypes only, for torch.compile / FakeTensor
# --------------------------------------------------------------------------------------
def _register_fakes() -> None:
    lib = "kalman_kernels::"

    @torch.library.register_fake(lib + "innovation_cov_dense")
    def _(jac, cov, forgetting, process_noise):
        m = jac.shape[0]
        return jac.new_empty((m, m), dtype=torch.float64)

    @torch.library.register_fake(lib + "innovation_cov_kron")
    def _(inputs, grad_outputs, cov, forgetting, process_noise):
        m = inputs.shape[0]
        return inputs.new_empty((m, m), dtype=torch.float64)

    @torch.library.register_fake(lib + "fused_update_dense_")
    def _(param, cov, jac, coef, whitening, forgetting, process_noise, cov_floor, cov_ceiling,
          information):
        return None

    @torch.library.register_fake(lib + "fused_update_kron_")
    def _(weight, cov, inputs, grad_outputs, coef, whitening, forgetting, process_noise,
          cov_floor, cov_ceiling, information):
        return None

    @torch.library.register_fake(lib + "loss_quad_form")
    def _(grads, covs, forgetting, process_noise):
        device = grads[0].device if len(grads) else torch.device("cpu")
        return torch.empty((), dtype=torch.float64, device=device)

    @torch.library.register_fake(lib + "loss_step_")
    def _(params, grads, covs, coef, weight, forgetting, process_noise, cov_floor, cov_ceiling,
          information):
        return None


_register_fakes()


# --------------------------------------------------------------------------------------
# The backend contract (signatures of kalman_kernels.reference)
# --------------------------------------------------------------------------------------
def _f(x) -> float:
    return float(x)


def _ceiling(x) -> float:
    return float("inf") if x is None else float(x)


def innovation_cov_dense(jac: torch.Tensor, cov: torch.Tensor, forgetting: float = 1.0,
                         process_noise: float = 0.0) -> torch.Tensor:
    """H diag(P-) H^T, float64 (m, m); jac is (m, n), cov holds n elements."""
    if jac.dim() != 2:
        jac = jac.reshape(jac.shape[0], -1)
    return _ops.innovation_cov_dense(jac, cov.reshape(-1), _f(forgetting), _f(process_noise))


def innovation_cov_kron(inputs: torch.Tensor, grad_outputs: torch.Tensor, cov: torch.Tensor,
                        forgetting: float = 1.0, process_noise: float = 0.0) -> torch.Tensor:
    """S_jk = sum_{o,i} P-[o,i] D[j,o] D[k,o] A[j,i] A[k,i], without building H."""
    return _ops.innovation_cov_kron(inputs, grad_outputs, cov, _f(forgetting), _f(process_noise))


def _inplace_flat(t: torch.Tensor, name: str) -> torch.Tensor:
    if not t.is_contiguous():
        raise RuntimeError(f"cpp backend: {name} is updated in place and must be contiguous "
                           f"(shape {tuple(t.shape)}, strides {t.stride()}); keep the state in "
                           f"contiguous storage")
    return t.view(-1)


def fused_update_dense_(param: torch.Tensor, cov: torch.Tensor, jac: torch.Tensor,
                        coef: torch.Tensor, whitening: torch.Tensor, forgetting: float,
                        process_noise: float, cov_floor: float, cov_ceiling: float,
                        information: bool) -> None:
    """In place: param += P- (.) H^T coef ; cov = rule(P-, ||F H_i||^2) clamped."""
    p = _inplace_flat(param, "param")
    c = _inplace_flat(cov, "cov")
    if jac.dim() != 2:
        jac = jac.reshape(jac.shape[0], -1)
    _ops.fused_update_dense_(p, c, jac, coef, whitening, _f(forgetting), _f(process_noise),
                             _f(cov_floor), _ceiling(cov_ceiling), bool(information))


def fused_update_kron_(weight: torch.Tensor, cov: torch.Tensor, inputs: torch.Tensor,
                       grad_outputs: torch.Tensor, coef: torch.Tensor, whitening: torch.Tensor,
                       forgetting: float, process_noise: float, cov_floor: float,
                       cov_ceiling: float, information: bool) -> None:
    """The Kronecker-block form of :func:`fused_update_dense_`; H is never materialised."""
    _inplace_flat(weight, "weight")
    _inplace_flat(cov, "cov")
    _ops.fused_update_kron_(weight, cov, inputs, grad_outputs, coef, whitening, _f(forgetting),
                            _f(process_noise), _f(cov_floor), _ceiling(cov_ceiling),
                            bool(information))


def loss_quad_form(grads: Sequence[torch.Tensor], covs: Sequence[torch.Tensor],
                   forgetting: float = 1.0, process_noise: float = 0.0) -> float:
    """sum over tensors of g^T P- g (float32 blocks summed in float64; float64 throughout
    for float64 tensors)."""
    if len(grads) == 0:
        return 0.0
    return float(_ops.loss_quad_form(list(grads), list(covs), _f(forgetting),
                                     _f(process_noise)))


def loss_step_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
               covs: Sequence[torch.Tensor], coef: float, weight: float, forgetting: float,
               process_noise: float, cov_floor: float, cov_ceiling: float,
               information: bool) -> None:
    """In place over every tensor: mu += coef * P- (.) g ; P = rule(P-, weight * g^2)."""
    if len(params) == 0:
        return
    ps: List[torch.Tensor] = list(params)
    cs: List[torch.Tensor] = list(covs)
    for i, (p, c) in enumerate(zip(ps, cs)):
        _inplace_flat(p, f"params[{i}]")
        _inplace_flat(c, f"covs[{i}]")
    scalars = torch.tensor([float(coef), float(weight)], dtype=torch.float64)
    _ops.loss_step_(ps, list(grads), cs, scalars[0], scalars[1], _f(forgetting),
                    _f(process_noise), _f(cov_floor), _ceiling(cov_ceiling), bool(information))
