"""The ``cuda`` backend: CUDA kernels from the extension ``kalman_kernels._cuda`` (csrc/cuda/).

The extension registers kernels for the CUDA dispatch key of the ``kalman_kernels::*`` ops
that :mod:`kalman_kernels.backends.schema` defines (schemas and fake implementations live
there only), so PyTorch's dispatcher sends CUDA tensors to them; the entry points below
are thin wrappers that reshape (views only), check that the tensors are on a GPU and call
the ops. Nothing here reads a tensor's value on the host: a step runs without a
synchronisation, under ``torch.compile(fullgraph=True)`` and inside a CUDA graph.

Availability (``kk.backends()["cuda"]``) needs both the built extension and a visible CUDA
GPU; ``kk.backend_errors()["cuda"]`` says which is missing (for a missing extension, what
setup.py recorded when it decided not to build it, or failed to).

``backend="auto"`` priority for CUDA tensors (``DEVICES``): 30, above the Triton backend's 20.
Basis: the paper rooflines of docs/cuda_backend.md (no GPU was available when this was
written): both backends are at the same memory-bandwidth floor for the elementwise and
small-m kernels, and the CUDA kernels avoid Triton's JIT compilation and autotuning on the
first call of every shape; the compute-bound kernels (m >= 32 dense, Kronecker) are
fp32-FMA tiles in both. Replace by measured numbers from ``benchmarks/gpu.py`` on a GPU.
"""
from __future__ import annotations

import importlib
from typing import List, Sequence

import torch

from . import schema

NAME = "cuda"
#: device type -> priority for backend="auto" (see the module docstring for the basis).
DEVICES = {"cuda": 30}
HOW_TO_GET = ("on a machine with an NVIDIA GPU (sm_80 or newer) and a CUDA build of torch, "
              "install a CUDA toolkit of torch's CUDA major version and rebuild with "
              "`pip install --no-build-isolation -e .` (setup.py finds the toolkit from "
              "CUDA_HOME or the nvcc on PATH; KALMAN_KERNELS_BUILD_CUDA=1 forces the build)")
UNAVAILABLE_REASON = None

schema.define()  # the op schemas must exist before the extension registers kernels for them


def _build_note() -> str:
    """What setup.py recorded about the CUDA build (kalman_kernels/_build_info.py)."""
    try:
        from .. import _build_info  # written by setup.py
        return str(getattr(_build_info, "CUDA_BUILD", "")).strip()
    except ImportError:
        return ""


def _not_built_reason(exc: BaseException) -> str:
    note = _build_note()
    why = f"the extension kalman_kernels._cuda is not built ({exc})"
    if note:
        why += f"; setup.py: {note}"
    elif torch.version.cuda is None:
        why += f"; torch {torch.__version__} is a CPU-only build, which cannot build it"
    return why


try:  # loading the library registers the CUDA kernels of torch.ops.kalman_kernels
    _ext = importlib.import_module("kalman_kernels._cuda")
except ImportError as _exc:
    _ext = None
    UNAVAILABLE_REASON = _not_built_reason(_exc)

if _ext is not None and not torch.cuda.is_available():
    UNAVAILABLE_REASON = (
        f"no CUDA GPU is visible (torch.cuda.is_available() is False; torch "
        f"{torch.__version__}, CUDA {torch.version.cuda}); the extension kalman_kernels._cuda "
        f"is built, for architectures {_ext.compiled_archs()}")


def compiled_archs() -> str:
    """The GPU architectures the extension was compiled for (e.g. '800,900'), or ''."""
    return _ext.compiled_archs() if _ext is not None else ""


def _float(x) -> float:
    return float(x)


def _ceiling(x) -> float:
    return float("inf") if x is None else float(x)


class Kernels:
    """The entry points of the backend contract bound to an op namespace and a device type.

    The module-level functions are those of ``Kernels(torch.ops.kalman_kernels, "cuda")``;
    the tests also bind the same wrappers to the CPU-emulated build of the kernels.
    """

    def __init__(self, ops, device_type: str, label: str):
        self._ops = ops
        self._device_type = device_type
        self._label = label

    # ------------------------------------------------------------------ checks / helpers
    def _check_device(self, op: str, **tensors) -> None:
        for name, t in tensors.items():
            if t.device.type != self._device_type:
                raise RuntimeError(
                    f"backend={self._label!r}: {op} needs {self._device_type} tensors, but "
                    f"{name} is on {t.device}; move the tensors to a GPU (e.g. .cuda()) or use "
                    f"backend='auto' / 'cpp' / 'reference' for CPU tensors")

    def _check_list(self, op: str, name: str, tensors: Sequence[torch.Tensor]) -> None:
        for i, t in enumerate(tensors):
            self._check_device(op, **{f"{name}[{i}]": t})

    def _scalar(self, value, device) -> torch.Tensor:
        """A 0-d float64 tensor on ``device`` (a Python float becomes one: a host-to-device
        copy of a constant, no synchronisation)."""
        if isinstance(value, torch.Tensor):
            return value.reshape(()) if value.dim() else value
        return torch.tensor(float(value), dtype=torch.float64, device=device)

    @staticmethod
    def _rows(jac: torch.Tensor) -> torch.Tensor:
        return jac if jac.dim() == 2 else jac.reshape(jac.shape[0], -1)

    @staticmethod
    def _grouped(grad_outputs: torch.Tensor) -> torch.Tensor:
        return grad_outputs.unsqueeze(1) if grad_outputs.dim() == 2 else grad_outputs

    # ------------------------------------------------------------------ entry points
    def innovation_cov_dense(self, jac: torch.Tensor, cov: torch.Tensor, forgetting: float = 1.0,
                             process_noise: float = 0.0) -> torch.Tensor:
        """H diag(P-) H^T, float64 (m, m); jac is (m, n) (or (m, *shape)), cov n elements."""
        self._check_device("innovation_cov_dense", jac=jac, cov=cov)
        return self._ops.innovation_cov_dense(self._rows(jac), cov.reshape(-1),
                                              _float(forgetting), _float(process_noise))

    def innovation_cov_kron(self, inputs: torch.Tensor, grad_outputs: torch.Tensor,
                            cov: torch.Tensor, forgetting: float = 1.0,
                            process_noise: float = 0.0) -> torch.Tensor:
        """S of a sample-grouped Kronecker block, (B K, B K) float64, without building H."""
        self._check_device("innovation_cov_kron", inputs=inputs, grad_outputs=grad_outputs,
                           cov=cov)
        return self._ops.innovation_cov_kron(inputs, self._grouped(grad_outputs), cov,
                                             _float(forgetting), _float(process_noise))

    def fused_update_dense_(self, param: torch.Tensor, cov: torch.Tensor, jac: torch.Tensor,
                            coef: torch.Tensor, whitening: torch.Tensor, ok: torch.Tensor,
                            forgetting: float, process_noise: float, cov_floor: float,
                            cov_ceiling: float, information: bool) -> None:
        """In place when ``ok``: param += P- (.) H^T coef ; cov = rule(P-, ||F H_i||^2)."""
        self._check_device("fused_update_dense_", param=param, cov=cov, jac=jac, coef=coef,
                           whitening=whitening, ok=ok)
        self._ops.fused_update_dense_(param, cov, self._rows(jac), coef, whitening, ok,
                                      _float(forgetting), _float(process_noise),
                                      _float(cov_floor), _ceiling(cov_ceiling),
                                      bool(information))

    def fused_update_kron_(self, weight: torch.Tensor, cov: torch.Tensor, inputs: torch.Tensor,
                           grad_outputs: torch.Tensor, coef: torch.Tensor,
                           whitening: torch.Tensor, ok: torch.Tensor, forgetting: float,
                           process_noise: float, cov_floor: float, cov_ceiling: float,
                           information: bool) -> None:
        """The Kronecker form of :meth:`fused_update_dense_`; H is never materialised."""
        self._check_device("fused_update_kron_", weight=weight, cov=cov, inputs=inputs,
                           grad_outputs=grad_outputs, coef=coef, whitening=whitening, ok=ok)
        self._ops.fused_update_kron_(weight, cov, inputs, self._grouped(grad_outputs), coef,
                                     whitening, ok, _float(forgetting), _float(process_noise),
                                     _float(cov_floor), _ceiling(cov_ceiling), bool(information))

    def loss_quad_form(self, grads: Sequence[torch.Tensor], covs: Sequence[torch.Tensor],
                       forgetting: float = 1.0, process_noise: float = 0.0) -> torch.Tensor:
        """sum over tensors of g^T P- g, a 0-d float64 tensor on the tensors' device."""
        grads, covs = list(grads), list(covs)
        if not grads:
            return torch.zeros((), dtype=torch.float64)
        self._check_list("loss_quad_form", "grads", grads)
        self._check_list("loss_quad_form", "covs", covs)
        return self._ops.loss_quad_form(grads, covs, _float(forgetting), _float(process_noise))

    def loss_step_(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                   covs: Sequence[torch.Tensor], coef, weight, ok: torch.Tensor,
                   forgetting: float, process_noise: float, cov_floor: float,
                   cov_ceiling: float, information: bool) -> None:
        """In place over every tensor when ``ok``: mu += coef P- (.) g ; P = rule(P-, weight g^2).
        ``coef`` and ``weight`` are 0-d float64 tensors on the device (or Python floats)."""
        params: List[torch.Tensor] = list(params)
        if not params:
            return
        grads, covs = list(grads), list(covs)
        self._check_list("loss_step_", "params", params)
        self._check_list("loss_step_", "grads", grads)
        self._check_list("loss_step_", "covs", covs)
        self._check_device("loss_step_", ok=ok)
        device = params[0].device
        self._ops.loss_step_(params, grads, covs, self._scalar(coef, device),
                             self._scalar(weight, device), ok, _float(forgetting),
                             _float(process_noise), _float(cov_floor), _ceiling(cov_ceiling),
                             bool(information))

    def step_terms_dense(self, jac: torch.Tensor, coef: torch.Tensor, whitening: torch.Tensor):
        """(H^T coef, diag(H^T F^T F H)), each (n,): the terms ranks all-reduce
        (docs/design.md, 2.5)."""
        self._check_device("step_terms_dense", jac=jac, coef=coef, whitening=whitening)
        return self._ops.step_terms_dense(self._rows(jac), coef, whitening)

    def step_terms_kron(self, inputs: torch.Tensor, grad_outputs: torch.Tensor,
                        coef: torch.Tensor, whitening: torch.Tensor):
        """The two Kronecker step terms, each (d_out, d_in)."""
        self._check_device("step_terms_kron", inputs=inputs, grad_outputs=grad_outputs,
                           coef=coef, whitening=whitening)
        return self._ops.step_terms_kron(inputs, self._grouped(grad_outputs), coef, whitening)

    def apply_terms_(self, param: torch.Tensor, cov: torch.Tensor, direction: torch.Tensor,
                     diag_term: torch.Tensor, ok: torch.Tensor, forgetting: float,
                     process_noise: float, cov_floor: float, cov_ceiling: float,
                     information: bool) -> None:
        """In place when ``ok``: param += P- (.) direction ; cov = rule(P-, diag_term)."""
        self._check_device("apply_terms_", param=param, cov=cov, direction=direction,
                           diag_term=diag_term, ok=ok)
        self._ops.apply_terms_(param, cov, direction, diag_term, ok, _float(forgetting),
                               _float(process_noise), _float(cov_floor), _ceiling(cov_ceiling),
                               bool(information))


_kernels = Kernels(torch.ops.kalman_kernels, "cuda", "cuda")

innovation_cov_dense = _kernels.innovation_cov_dense
innovation_cov_kron = _kernels.innovation_cov_kron
fused_update_dense_ = _kernels.fused_update_dense_
fused_update_kron_ = _kernels.fused_update_kron_
loss_quad_form = _kernels.loss_quad_form
loss_step_ = _kernels.loss_step_
step_terms_dense = _kernels.step_terms_dense
step_terms_kron = _kernels.step_terms_kron
apply_terms_ = _kernels.apply_terms_
