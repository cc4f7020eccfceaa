"""The ``cpp`` backend: the C++ CPU extension ``kalman_kernels._C`` (csrc/).

The op schemas and their fake implementations come from :mod:`.schema` (defined before the
library loads); the extension registers CPU kernels for them (``TORCH_LIBRARY_IMPL``), so
``torch.compile`` traces through them without a graph break. This module wraps them into
the nine entry points of the backend contract (``kalman_kernels/backends/README.md``) —
reshapes (views) only, no host reads — and picks the kernels' instruction set
(baseline / AVX2 / AVX-512) from ``torch.backends.cpu.get_cpu_capability()``.

If ``kalman_kernels._C`` cannot be imported (not built, or built against another torch),
importing this module raises and the registry records the reason
(``kk.backend_errors()["cpp"]``).

Input handling: tensors updated in place (params / weights and covariances) must be
contiguous CPU tensors, or a ``RuntimeError`` names the argument; read-only inputs may be
non-contiguous (a Jacobian with unit column stride is read in place, anything else is
copied to a contiguous tensor first).
"""
from __future__ import annotations

import importlib
import os
from typing import Sequence

import torch

from . import schema

schema.define()
try:  # loading the library registers the CPU kernels of torch.ops.kalman_kernels
    _C = importlib.import_module("kalman_kernels._C")
except ImportError as _exc:
    raise ImportError(f"the C++ extension kalman_kernels._C is not built or cannot be loaded "
                      f"({_exc}); setup.py builds it during `pip install --no-build-isolation "
                      f"-e .` and prints why when the build fails") from _exc

NAME = "cpp"
DEVICES = {"cpu": 10}
HOW_TO_GET = ("reinstall with `pip install --no-build-isolation -e .` after torch, with a C++ "
              "compiler and ninja on PATH, and check the build log")
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
# The backend contract (signatures of kalman_kernels.reference)
# --------------------------------------------------------------------------------------
def _grouped(grad_outputs: torch.Tensor) -> torch.Tensor:
    return grad_outputs.unsqueeze(1) if grad_outputs.dim() == 2 else grad_outputs


def _rows(jac: torch.Tensor) -> torch.Tensor:
    return jac if jac.dim() == 2 else jac.reshape(jac.shape[0], -1)


def _ceiling(x) -> float:
    return float("inf") if x is None else x


def innovation_cov_dense(jac: torch.Tensor, cov: torch.Tensor, forgetting: float = 1.0,
                         process_noise: float = 0.0) -> torch.Tensor:
    """H diag(P-) H^T, float64 (m, m); jac is (m, n), cov holds n elements."""
    return _ops.innovation_cov_dense(_rows(jac), cov.reshape(-1), forgetting, process_noise)


def innovation_cov_kron(inputs: torch.Tensor, grad_outputs: torch.Tensor, cov: torch.Tensor,
                        forgetting: float = 1.0, process_noise: float = 0.0) -> torch.Tensor:
    """H diag(P-) H^T of a sample-grouped Kronecker block, (B K, B K) float64."""
    return _ops.innovation_cov_kron(inputs, _grouped(grad_outputs), cov, forgetting,
                                    process_noise)


def fused_update_dense_(param, cov, jac, coef, whitening, ok, forgetting, process_noise,
                        cov_floor, cov_ceiling, information) -> None:
    """In place when ``ok``: param += P- (.) H^T coef ; cov = rule(P-, ||F H_i||^2) clamped."""
    _ops.fused_update_dense_(param, cov, _rows(jac), coef, whitening, ok,
                             forgetting, process_noise, cov_floor, _ceiling(cov_ceiling),
                             information)


def fused_update_kron_(weight, cov, inputs, grad_outputs, coef, whitening, ok, forgetting,
                       process_noise, cov_floor, cov_ceiling, information) -> None:
    """The sample-grouped Kronecker form of :func:`fused_update_dense_`."""
    _ops.fused_update_kron_(weight, cov, inputs, _grouped(grad_outputs), coef, whitening, ok,
                            forgetting, process_noise, cov_floor, _ceiling(cov_ceiling),
                            information)


def loss_quad_form(grads: Sequence[torch.Tensor], covs: Sequence[torch.Tensor],
                   forgetting: float = 1.0, process_noise: float = 0.0) -> torch.Tensor:
    """sum over tensors of g^T P- g, a 0-d float64 tensor (per-element terms in at least
    float32, summed in float64)."""
    if len(grads) == 0:
        return torch.zeros((), dtype=torch.float64)
    return _ops.loss_quad_form.default(list(grads), list(covs), forgetting, process_noise)


def _scalar(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.tensor(float(x), dtype=torch.float64)


def loss_step_(params, grads, covs, coef, weight, ok, forgetting, process_noise, cov_floor,
               cov_ceiling, information) -> None:
    """In place over every tensor when ``ok``: mu += coef * P- (.) g ; P = rule(P-, weight g^2)."""
    if len(params) == 0:
        return
    # .default: the overload itself, one Python frame fewer per call (the loss step's host
    # code runs with cold caches; see ops/loss_update.py)
    _ops.loss_step_.default(list(params), list(grads), list(covs), _scalar(coef),
                            _scalar(weight), ok, forgetting, process_noise, cov_floor,
                            _ceiling(cov_ceiling), information)


def step_terms_dense(jac, coef, whitening):
    """(H^T coef, sum_l (F H)[l]^2), each (n,), float32 (float64 for a float64 Jacobian)."""
    return _ops.step_terms_dense(_rows(jac), coef, whitening)


def step_terms_kron(inputs, grad_outputs, coef, whitening):
    """The two terms of a sample-grouped Kronecker block, each (d_out, d_in)."""
    return _ops.step_terms_kron(inputs, _grouped(grad_outputs), coef, whitening)


def apply_terms_(param, cov, direction, diag_term, ok, forgetting, process_noise, cov_floor,
                 cov_ceiling, information) -> None:
    """In place when ``ok``: param += P- (.) direction ; cov = rule(P-, diag_term)."""
    _ops.apply_terms_(param, cov, direction, diag_term, ok,
                      forgetting, process_noise, cov_floor, _ceiling(cov_ceiling), information)
