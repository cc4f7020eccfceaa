"""The ``cpp`` backend: the C++ CPU extension ``kalman_kernels._C`` (csrc/).

Loading the extension registers CPU kernels (``TORCH_LIBRARY_IMPL``) for the ops that
:mod:`.library` defines; the entry points are that module's one wrapper bound to them
(:data:`KERNELS`). This module only loads the library and picks the kernels' instruction
set (baseline / AVX2 / AVX-512) from ``torch.backends.cpu.get_cpu_capability()``.

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

import torch

from . import library

library.define()  # the op schemas must exist before the extension registers kernels for them
try:
    _C = importlib.import_module("kalman_kernels._C")
except ImportError as _exc:
    raise ImportError(f"the C++ extension kalman_kernels._C is not built or cannot be loaded "
                      f"({_exc}); setup.py builds it during `pip install --no-build-isolation "
                      f"-e .` and prints why when the build fails") from _exc

NAME = "cpp"
DEVICES = ("cpu",)
HOW_TO_GET = ("reinstall with `pip install --no-build-isolation -e .` after torch, with a C++ "
              "compiler and ninja on PATH, and check the build log")
KERNELS = library.Kernels(NAME, library.NAMESPACE, DEVICES)
globals().update(KERNELS.entry_points())     # cpp_backend.loss_step_ and the others


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
    return torch.ops.kalman_kernels._isa()


def set_isa(name: str) -> None:
    """Switch the kernels to another compiled instruction set (tests, benchmarks).

    Raises if this CPU lacks it (running it would die with SIGILL)."""
    torch.ops.kalman_kernels._set_isa(name)


set_isa(_choose_isa())
