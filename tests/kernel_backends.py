"""The kernel backends that every per-op test module (tests/test_op_*.py) runs.

Each test that takes the ``kb`` fixture (tests/conftest.py) runs once per backend variant:

* ``reference`` on CPU (the oracle checks itself against the NumPy oracle too);
* ``cpp`` once per instruction set this CPU can run (DEFAULT, AVX2, AVX-512). A missing
  extension skips with the recorded reason, and FAILS under KALMAN_KERNELS_REQUIRE_CPP (CI);
* ``triton`` on a GPU, or on CPU tensors through the interpreter when TRITON_INTERPRET=1
  (``kb.interpreted``: tests keep sizes small, the interpreter runs ~1e6 elements/s);
* ``cuda`` on a GPU (skipped without one, with the reason);
* ``cuda-emulated``: the cuda backend's kernel code compiled for the CPU against a CUDA
  emulator (tests/cuda_emulation.py), on CPU tensors, so that the CUDA kernels are tested on
  machines without a GPU. A failed emulation build skips, and FAILS under
  KALMAN_KERNELS_REQUIRE_CPP (it needs only the C++ compiler the cpp backend needs).

New backends appear here without touching the test modules.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Optional

import pytest
import torch

from kalman_kernels.backends import _load


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


REQUIRE_CPP = _flag("KALMAN_KERNELS_REQUIRE_CPP")
INTERPRET = _flag("TRITON_INTERPRET")


@dataclass
class KernelBackend:
    name: str
    device: str
    isa: Optional[str] = None
    interpreted: bool = False
    emulated: bool = False

    @property
    def module(self):
        if self.emulated:
            import cuda_emulation
            try:
                return cuda_emulation.backend()
            except RuntimeError as exc:
                if REQUIRE_CPP:
                    pytest.fail(f"KALMAN_KERNELS_REQUIRE_CPP is set but {exc}")
                pytest.skip(str(exc))
        module, reason = _load(self.name)
        if module is None:
            if self.name == "cpp" and REQUIRE_CPP:
                pytest.fail(f"KALMAN_KERNELS_REQUIRE_CPP is set but the cpp backend is "
                            f"unavailable: {reason}")
            pytest.skip(f"{self.name} backend unavailable: {reason}")
        return module

    @contextlib.contextmanager
    def active(self):
        """The backend module, with this variant's instruction set selected (cpp)."""
        module = self.module
        if self.isa is None:
            yield module
            return
        before = module.isa()
        module.set_isa(self.isa)
        try:
            yield module
        finally:
            module.set_isa(before)

    def to(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device)

    def fits(self, numel: int) -> bool:
        """Whether a case of ``numel`` parameter elements is run on this variant (the Triton
        interpreter runs ~1e6 elements/s: keep its cases <= 1e5 elements of work)."""
        return not self.interpreted or numel <= 20_000

    def need_registered(self) -> None:
        """Skip tests that reach the kernels through the ops layer (``backend=name``) for a
        variant the registry cannot resolve (the emulated CUDA kernels)."""
        if self.emulated:
            pytest.skip("the emulated cuda kernels are not a registered backend; the per-op "
                        "tests cover them")

    @property
    def exact64(self) -> bool:
        """float64 arithmetic throughout (Triton's float64 support is partial)."""
        return self.name != "triton"

    def __str__(self) -> str:
        return (self.name + (f"-{self.isa}" if self.isa else "")
                + ("-emulated" if self.emulated else ""))


def _cpp_isas():
    names = ["DEFAULT"]
    module, _ = _load("cpp")
    if module is None:
        return names
    current = module.isa()
    for name in ("AVX2", "AVX512"):
        try:
            module.set_isa(name)
            names.append(name)
        except RuntimeError:
            pass
    module.set_isa(current)
    return names


def variants():
    gpu = torch.cuda.is_available()
    out = [KernelBackend("reference", "cpu")]
    out += [KernelBackend("cpp", "cpu", isa) for isa in _cpp_isas()]
    if gpu:
        out.append(KernelBackend("triton", "cuda"))
    else:
        out.append(KernelBackend("triton", "cpu", interpreted=True))
    out.append(KernelBackend("cuda", "cuda"))
    out.append(KernelBackend("cuda", "cpu", emulated=True))
    return out


def params():
    result = []
    for v in variants():
        marks = []
        if v.device == "cuda" and not torch.cuda.is_available():
            marks.append(pytest.mark.skip(reason=f"{v.name}: no CUDA GPU on this machine"))
        if v.name == "triton" and v.device == "cpu" and not INTERPRET:
            marks.append(pytest.mark.skip(reason="triton on CPU tensors needs TRITON_INTERPRET=1 "
                                                 "set before triton is imported"))
        result.append(pytest.param(v, id=str(v), marks=marks))
    return result
