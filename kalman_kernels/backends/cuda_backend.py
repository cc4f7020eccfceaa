"""The ``cuda`` backend: CUDA kernels from the extension ``kalman_kernels._cuda`` (csrc/cuda/).

Loading the extension registers kernels for the CUDA dispatch key of the ``kalman_kernels::*``
ops that :mod:`.library` defines, so PyTorch's dispatcher sends CUDA tensors to them; the
entry points are that module's one wrapper bound to them (:data:`KERNELS`), which refuses
tensors of another device type. Nothing in a step reads a tensor's value on the host: it
runs without a synchronisation, under ``torch.compile(fullgraph=True)`` and inside a CUDA
graph.

Availability (``kk.backends()["cuda"]``) needs both the built extension and a visible CUDA
GPU; ``kk.backend_errors()["cuda"]`` says which is missing (for a missing extension, what
setup.py recorded when it decided not to build it, or failed to). ``backend="auto"`` runs
these kernels on CUDA tensors whenever they are built (docs/design.md, 4.4).
"""
from __future__ import annotations

import importlib

import torch

from . import library

NAME = "cuda"
DEVICES = ("cuda",)
HOW_TO_GET = ("on a machine with an NVIDIA GPU (sm_80 or newer) and a CUDA build of torch, "
              "install a CUDA toolkit of torch's CUDA major version and rebuild with "
              "`pip install --no-build-isolation -e .` (setup.py finds the toolkit from "
              "CUDA_HOME or the nvcc on PATH; KALMAN_KERNELS_BUILD_CUDA=1 forces the build)")
UNAVAILABLE_REASON = None

library.define()  # the op schemas must exist before the extension registers kernels for them


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


KERNELS = library.Kernels(NAME, library.NAMESPACE, DEVICES,
                          hint="On CPU tensors use backend='auto', 'cpp' or 'reference'")
globals().update(KERNELS.entry_points())     # cuda_backend.loss_step_ and the others
