"""Backend registry: which kernel implementations exist here, and why the others do not.

A backend is a module exposing the kernel entry points of the contract in
``kalman_kernels/backends/README.md`` (the signatures of the functions of the same name
in :mod:`kalman_kernels.reference`). Backends are loaded lazily and the failure reason
of one that cannot load is kept, so that ``backend="cpp"`` on a machine where the
extension did not build raises with that reason instead of silently running something
else.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Dict, Optional, Tuple

import torch

NAMES = ("reference", "cpp", "triton", "cuda")

# name -> (module or None, reason it is unavailable or None)
_loaded: Dict[str, Tuple[Optional[ModuleType], Optional[str]]] = {}

_HOW_TO_GET = {
    "cpp": "reinstall with `pip install --no-build-isolation -e .` after torch, with a C++ "
           "compiler and ninja on PATH, and check the build log",
    "triton": "the Triton backend is not part of this release yet; use backend='reference' "
              "or 'auto'",
    "cuda": "the CUDA backend is not part of this release yet; use backend='reference' or "
            "'auto'",
}


def _load(name: str) -> Tuple[Optional[ModuleType], Optional[str]]:
    if name in _loaded:
        return _loaded[name]
    try:
        module = importlib.import_module(f"kalman_kernels.backends.{name}_backend")
        reason = getattr(module, "UNAVAILABLE_REASON", None)
        result = (None, reason) if reason else (module, None)
    except ModuleNotFoundError as exc:
        if exc.name == f"kalman_kernels.backends.{name}_backend":
            result = (None, f"the {name} backend is not built in this installation")
        else:
            result = (None, f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # a broken build must not break `import kalman_kernels`
        result = (None, f"{type(exc).__name__}: {exc}")
    _loaded[name] = result
    return result


def backends() -> Dict[str, bool]:
    """name -> whether that backend can run on this machine."""
    return {name: _load(name)[0] is not None for name in NAMES}


def backend_errors() -> Dict[str, str]:
    """name -> why that backend is unavailable (only the unavailable ones)."""
    return {name: _load(name)[1] for name in NAMES if _load(name)[0] is None}


def _supports_device(name: str, device: torch.device) -> bool:
    if name in ("reference",):
        return True
    if name == "cpp":
        return device.type == "cpu"
    return device.type == "cuda"


# Fastest first, per device type.
_AUTO_ORDER = {"cpu": ("cpp", "reference"), "cuda": ("cuda", "triton", "reference")}


def resolve(name: str, device: torch.device) -> ModuleType:
    """The backend module for ``name`` ("auto" picks the fastest available for ``device``)."""
    if name == "auto":
        for candidate in _AUTO_ORDER.get(device.type, ("reference",)):
            module, _ = _load(candidate)
            if module is not None and _supports_device(candidate, device):
                return module
        return _load("reference")[0]
    if name not in NAMES:
        raise ValueError(f"backend must be one of {('auto',) + NAMES}, got {name!r}")
    module, reason = _load(name)
    if module is None:
        raise RuntimeError(f"backend={name!r} is not available: {reason}. "
                           f"To get it: {_HOW_TO_GET.get(name, '')}")
    if not _supports_device(name, device):
        raise RuntimeError(f"backend={name!r} does not run on {device.type} tensors; use "
                           f"backend='auto' or move the tensors to a supported device")
    return module


def _require_cpp_if_asked() -> None:
    """KALMAN_KERNELS_REQUIRE_CPP=1 (set by CI): a missing C++ extension is an import error,
    never a silent fallback to the reference backend."""
    flag = os.environ.get("KALMAN_KERNELS_REQUIRE_CPP", "").strip().lower()
    if flag in ("1", "true", "yes", "on"):
        module, reason = _load("cpp")
        if module is None:
            raise ImportError(f"KALMAN_KERNELS_REQUIRE_CPP is set but the cpp backend cannot "
                              f"load: {reason}. To get it: {_HOW_TO_GET['cpp']}")


_require_cpp_if_asked()
