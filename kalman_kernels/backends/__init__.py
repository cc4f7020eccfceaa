"""Backend registry: which kernel implementations exist here, why the others do not, and
which one ``backend=`` names.

A backend is a module ``kalman_kernels/backends/<name>_backend.py`` declaring:

* ``NAME``: its name;
* ``DEVICES``: the device types it serves (``"*"``: every device type);
* ``KERNELS`` (compiled backends): the entry points of the contract, the one wrapper of
  :class:`.library.Kernels` bound to the op namespace its kernels are registered under;
  the reference backend's entry points are the reference functions themselves;
* ``UNAVAILABLE_REASON`` (optional): set when the module imports but cannot run here;
* ``HOW_TO_GET`` (optional): what a user does to get it.

``backend="auto"`` follows one rule, :func:`auto` (docs/design.md, 4.4). Backends load at
import and the failure reason of one that cannot load is kept, so ``backend="cpp"`` on a
machine where the extension did not build raises with that reason instead of silently
running something else.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Dict, Optional, Tuple

import torch

from . import library

NAMES = ("reference", "cpp", "triton", "cuda")

# name -> (module or None, reason it is unavailable or None)
_loaded: Dict[str, Tuple[Optional[ModuleType], Optional[str]]] = {}
_how_to_get: Dict[str, str] = {}

#: The kalman_kernels ops where no compiled kernel serves the device: their default kernel,
#: the reference, runs (docs/design.md, 4.3).
_DEFAULT = library.Kernels("reference", library.NAMESPACE)

_DEFAULT_HOW_TO_GET = ("reinstall with `pip install --no-build-isolation -e .` after torch and "
                       "read the build output")


def _load(name: str) -> Tuple[Optional[ModuleType], Optional[str]]:
    if name in _loaded:
        return _loaded[name]
    try:
        module = importlib.import_module(f"kalman_kernels.backends.{name}_backend")
        if getattr(module, "HOW_TO_GET", None):
            _how_to_get[name] = module.HOW_TO_GET
        reason = getattr(module, "UNAVAILABLE_REASON", None)
        result = (None, reason) if reason else (module, None)
    except ModuleNotFoundError as exc:
        if exc.name == f"kalman_kernels.backends.{name}_backend":
            result = (None, f"the {name} backend is not part of this installation")
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


def _serves(module: ModuleType, device_type: str) -> bool:
    devices = getattr(module, "DEVICES", ())
    return device_type in devices or "*" in devices


def _kernels(module: ModuleType):
    """A backend's entry points for a resolved device: its bound wrapper without the per-call
    device check (the device is checked here, once), or the module (the reference)."""
    kernels = getattr(module, "KERNELS", module)
    return kernels.resolved() if isinstance(kernels, library.Kernels) else kernels


def auto(device_type: str):
    """What ``backend="auto"`` runs on ``device_type`` tensors: the ``kalman_kernels`` ops.

    The one rule (docs/design.md, 4.4): PyTorch's dispatcher runs the kernel registered for
    the tensors' device (``cpp`` on CPU, ``cuda`` on CUDA GPUs; Triton's on CUDA where the
    cuda extension is not built, see :func:`_triton_for_the_cuda_key`) and, on a device
    without one, the ops' default kernel, the reference. The entry points returned carry the
    name of the backend whose kernel will run.
    """
    for name in NAMES:
        module, _ = _load(name)
        kernels = _kernels(module) if module is not None else None
        if (getattr(kernels, "namespace", None) == library.NAMESPACE
                and _serves(module, device_type)):
            return kernels
    if device_type == "cuda" and _TRITON_ON_CUDA is not None:
        return _TRITON_ON_CUDA
    return _DEFAULT


#: (name, device) -> entry points. Every backend is loaded at import and none appears later,
#: so a resolution never changes; steps resolve their backend each time, right after the
#: backward pass has flushed the caches, where the lookup's lines cost tens of microseconds.
_resolved: Dict[tuple, object] = {}


def resolve(name: str, device: torch.device):
    """The entry points of backend ``name`` for ``device`` tensors (``"auto"``: :func:`auto`);
    they carry the backend's name as ``NAME``."""
    try:
        return _resolved[(name, device)]
    except (KeyError, TypeError):             # TypeError: an unhashable device argument
        pass
    kernels = _resolve(name, device)
    try:
        _resolved[(name, device)] = kernels
    except TypeError:
        pass
    return kernels


def _resolve(name: str, device):
    device = torch.device(device)
    if name == "auto":
        return auto(device.type)
    if name not in NAMES:
        raise ValueError(f"backend must be one of {('auto',) + NAMES}, got {name!r}")
    module, reason = _load(name)
    if module is None:
        raise RuntimeError(f"backend={name!r} is not available: {reason}. To get it: "
                           f"{_how_to_get.get(name, _DEFAULT_HOW_TO_GET)}")
    if not _serves(module, device.type):
        served = sorted(getattr(module, "DEVICES", ()))
        hint = _how_to_get.get(name)
        raise RuntimeError(f"backend={name!r} does not run on {device.type} tensors (it serves "
                           f"{', '.join(served) or 'no device here'}); use backend='auto' or "
                           f"move the tensors to a supported device"
                           + (f". To get it: {hint}" if hint else ""))
    return _kernels(module)


def _require_cpp_if_asked() -> None:
    """KALMAN_KERNELS_REQUIRE_CPP=1 (set by CI): a missing C++ extension is an import error,
    never a silent fallback to the reference backend."""
    flag = os.environ.get("KALMAN_KERNELS_REQUIRE_CPP", "").strip().lower()
    if flag in ("1", "true", "yes", "on"):
        module, reason = _load("cpp")
        if module is None:
            raise ImportError(f"KALMAN_KERNELS_REQUIRE_CPP is set but the cpp backend cannot "
                              f"load: {reason}. To get it: "
                              f"{_how_to_get.get('cpp', _DEFAULT_HOW_TO_GET)}")


def _triton_for_the_cuda_key():
    """Where no compiled kernel is registered for the CUDA key of the kalman_kernels ops (the
    cuda extension did not build, e.g. no CUDA toolkit at install) and triton imports, Triton's
    kernels become those ops' CUDA kernels: the dispatcher then runs Triton on CUDA tensors
    rather than the slow default kernel, and the one rule of ``auto`` is unchanged (the
    dispatcher picks by device). Returns the entry points ``auto`` names for CUDA tensors, or
    None where this does not apply."""
    triton_module, _ = _load("triton")
    if triton_module is None:
        return None
    if any(torch._C._dispatch_has_kernel_for_dispatch_key(f"{library.NAMESPACE}::{op}", "CUDA")
           for op in library.SCHEMAS):
        return None
    registration = torch.library.Library(library.NAMESPACE, "IMPL")
    for op, kernel in triton_module.KERNEL_FUNCTIONS.items():
        registration.impl(op, kernel, "CUDA")
    _registrations.append(registration)    # a Library deregisters when collected
    return library.Kernels("triton", library.NAMESPACE, ("cuda",)).resolved()


_registrations: list = []
_require_cpp_if_asked()
# Load every backend now (cheap: nothing is compiled at import), so that resolve() under
# torch.compile only reads the cache: Dynamo cannot trace an import.
backends()
_TRITON_ON_CUDA = _triton_for_the_cuda_key()
