"""The cuda backend's kernels, emulated on the CPU (csrc/cuda/emulate.h), for machines
without a GPU.

``backend()`` compiles csrc/cuda/emulated.cpp -- the same kernel source (kernels.cuh) and
operator layer (ops_impl.h) as the CUDA build, with a host compiler and the fiber-based
emulator of CUDA threads, barriers and warp shuffles -- registers it for CPU tensors under
the ``kalman_kernels_cuda_emulated`` namespace (schemas, fakes and default kernels from
``kalman_kernels/backends/library.py``) and returns the one wrapper of the entry points
(``library.Kernels``) bound to it, as the cuda backend binds it to ``kalman_kernels``. The
per-op tests run it as the ``cuda-emulated`` variant (tests/kernel_backends.py), so the
kernels' indexing, tiling, barriers, the skip predicate and the alignment of vector
accesses are checked here, where no GPU exists. It says nothing about speed.

The build (one host-compiler translation unit, about a minute) is cached in
``build/cuda_emulated`` and reused while the sources are unchanged.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = "kalman_kernels_cuda_emulated"
SOURCES = [ROOT / "csrc" / "cuda" / "emulated.cpp"]

_lock = threading.Lock()
_state = {"kernels": None, "error": None}


def _build() -> None:
    from torch.utils.cpp_extension import load

    from kalman_kernels.backends import library

    library.define(NAMESPACE)
    build_dir = ROOT / "build" / "cuda_emulated"
    build_dir.mkdir(parents=True, exist_ok=True)
    load(name="kk_cuda_emulated", sources=[str(s) for s in SOURCES],
         extra_include_paths=[str(ROOT / "csrc")],
         extra_cflags=["-O2", "-Wno-unknown-pragmas", "-DKK_CUDA_EMULATE=1"],
         build_directory=str(build_dir), is_python_module=False, verbose=False)


def backend():
    """The emulated cuda backend: an object with the nine entry points of the backend
    contract, running the CUDA kernels' code on CPU tensors. Raises if it cannot be built."""
    with _lock:
        if _state["kernels"] is None and _state["error"] is None:
            try:
                _build()
                from kalman_kernels.backends import library
                _state["kernels"] = library.Kernels("cuda", NAMESPACE, ("cpu",),
                                                    label="cuda (emulated on CPU)")
            except Exception as exc:  # noqa: BLE001 -- reported to every test that needs it
                _state["error"] = f"{type(exc).__name__}: {exc}"
        if _state["error"] is not None:
            raise RuntimeError(f"the emulated cuda kernels did not build: {_state['error']}")
        return _state["kernels"]


def error() -> Optional[str]:
    """Why the emulation is unavailable (None when it built or was not tried)."""
    return _state["error"]
