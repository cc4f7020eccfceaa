"""Backend registry: which kernel implementations exist here, and why the others do not.

A backend is a module ``kalman_kernels/backends/<name>_backend.py`` exposing the kernel
entry points of the contract (``kalman_kernels/backends/README.md``; the signatures of the
functions of the same name in :mod:`kalman_kernels.reference`) and declaring itself:

* ``NAME``: its name;
* ``DEVICES``: ``{device type: priority}``; ``backend="auto"`` takes, for a tensor's
  device type, the available backend with the highest priority. A priority of ``None``
  serves that device only when asked for by name (e.g. the Triton interpreter on CPU, a
  test tool). ``"*"`` matches every device type;
* ``UNAVAILABLE_REASON`` (optional): set when the module imports but cannot run here;
* ``HOW_TO_GET`` (optional): what a user does to get it.

The registry has no per-backend rules. Backends load lazily and the failure reason of one
that cannot load is kept, so ``backend="cpp"`` on a machine where the extension did not
build raises with that reason instead of silently running something else.
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
_how_to_get: Dict[str, str] = {}

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


def _priority(module: ModuleType, device_type: str):
    """(serves this device?, auto priority or None)."""
    devices = getattr(module, "DEVICES", {})
    if device_type in devices:
        return True, devices[device_type]
    if "*" in devices:
        return True, devices["*"]
    return False, None


def auto_order(device_type: str):
    """Available backends that ``backend="auto"`` would consider for ``device_type``,
    highest priority first."""
    ranked = []
    for name in NAMES:
        module, _ = _load(name)
        if module is None:
            continue
        serves, prio = _priority(module, device_type)
        if serves and prio is not None:
            ranked.append((prio, name))
    return [name for _, name in sorted(ranked, key=lambda t: -t[0])]


#: (name, device) -> module. Every backend is loaded at import and none appears later, so a
#: resolution never changes; steps resolve their backend each time, right after the backward
#: pass has flushed the caches, where the ~60 lines of the lookup cost tens of microseconds.
_resolved: Dict[tuple, ModuleType] = {}


def resolve(name: str, device: torch.device) -> ModuleType:
    """The backend module for ``name`` ("auto" picks the fastest available for ``device``)."""
    try:
        return _resolved[(name, device)]
    except (KeyError, TypeError):             # TypeError: an unhashable device argument
        pass
    module = _resolve(name, device)
    try:
        _resolved[(name, device)] = module
    except TypeError:
        pass
    return module


def _resolve(name: str, device) -> ModuleType:
    device = torch.device(device)
    if name == "auto":
        order = auto_order(device.type)
        if not order:
            raise RuntimeError(f"no backend serves {device.type} tensors")
        return _load(order[0])[0]
    if name not in NAMES:
        raise ValueError(f"backend must be one of {('auto',) + NAMES}, got {name!r}")
    module, reason = _load(name)
    if module is None:
        raise RuntimeError(f"backend={name!r} is not available: {reason}. To get it: "
                           f"{_how_to_get.get(name, _DEFAULT_HOW_TO_GET)}")
    serves, _ = _priority(module, device.type)
    if not serves:
        served = sorted(getattr(module, "DEVICES", {}))
        hint = _how_to_get.get(name)
        raise RuntimeError(f"backend={name!r} does not run on {device.type} tensors (it serves "
                           f"{', '.join(served) or 'no device here'}); use backend='auto' or "
                           f"move the tensors to a supported device"
                           + (f". To get it: {hint}" if hint else ""))
    return module


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


_require_cpp_if_asked()
# Load every backend now (cheap: nothing is compiled at import), so that resolve() under
# torch.compile only reads the cache: Dynamo cannot trace an import.
backends()
