"""Shared helpers of the cpp-backend tests (tests/test_cpp_*.py).

* ``cpp_backend()`` returns the backend module, or skips with the recorded reason — and
  FAILS instead when KALMAN_KERNELS_REQUIRE_CPP is set (CI), so a missing extension is
  never a silent skip there.
* ``ISAS`` lists the instruction sets whose kernels can run on this CPU; the tests run
  every compiled copy of the kernels (baseline, AVX2, AVX-512) that the machine supports.
* Tolerances are DESIGN section 5: float64 1e-10; float32 1e-5 elementwise and 1e-4 for
  reductions over n; bf16 / fp16 parameters 1e-2. Errors are measured per element against
  the float64 reference, relative to the magnitude of the terms that make up that element
  (the condition scale of the sum), and NaN never passes.
"""
from __future__ import annotations

import contextlib
import os

import pytest
import torch

import kalman_kernels as kk

F64 = torch.float64


def _required() -> bool:
    return os.environ.get("KALMAN_KERNELS_REQUIRE_CPP", "").strip().lower() in (
        "1", "true", "yes", "on")


def cpp_backend():
    """The cpp backend module; skip (or fail under KALMAN_KERNELS_REQUIRE_CPP) without it."""
    if not kk.backends()["cpp"]:
        reason = kk.backend_errors().get("cpp", "unknown reason")
        if _required():
            pytest.fail(f"KALMAN_KERNELS_REQUIRE_CPP is set but the cpp backend is unavailable: "
                        f"{reason}")
        pytest.skip(f"cpp backend unavailable: {reason}")
    from kalman_kernels.backends import cpp_backend as module
    return module


def _runnable_isas():
    names = ["DEFAULT"]
    try:
        from kalman_kernels.backends import cpp_backend as module
    except Exception:
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


ISAS = _runnable_isas() if kk.backends()["cpp"] else ["DEFAULT"]


@contextlib.contextmanager
def using_isa(module, name):
    before = module.isa()
    module.set_isa(name)
    try:
        yield
    finally:
        module.set_isa(before)


def tol_for(*dtypes, reduction: bool = False) -> float:
    """The DESIGN 5 tolerance for the lowest-precision dtype among ``dtypes``."""
    if any(d in (torch.bfloat16, torch.float16) for d in dtypes):
        return 1e-2
    if all(d == F64 for d in dtypes):
        return 1e-10
    return 1e-4 if reduction else 1e-5


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, scale: torch.Tensor,
                        tol: float, what: str) -> None:
    """max_i |a_i - e_i| / scale_i <= tol, every element finite (NaN never passes)."""
    a = actual.detach().to(F64).reshape(-1)
    e = expected.detach().to(F64).reshape(-1)
    s = scale.detach().to(F64).reshape(-1).abs()
    assert a.shape == e.shape, (what, a.shape, e.shape)
    assert bool(torch.isfinite(a).all()), f"{what}: non-finite values in the cpp result"
    assert bool(torch.isfinite(e).all()), f"{what}: non-finite values in the reference"
    floor = torch.finfo(torch.float64).tiny
    err = ((a - e).abs() / s.clamp_min(floor)).max().item() if a.numel() else 0.0
    assert err <= tol, f"{what}: scaled error {err:.3e} > {tol:.0e}"


def assert_sym_close(actual: torch.Tensor, expected: torch.Tensor, tol: float,
                     what: str) -> None:
    """S_jk compared on the scale sqrt(S_jj S_kk) (Cauchy-Schwarz bound of every term sum)."""
    d = torch.diagonal(expected).abs().to(F64)
    scale = torch.sqrt(d[:, None] * d[None, :])
    assert actual.dtype == F64, f"{what}: S must be float64, got {actual.dtype}"
    assert actual.shape == expected.shape
    assert torch.equal(actual, actual.T), f"{what}: S is not exactly symmetric"
    assert_close_scaled(actual, expected, scale, tol, what)


def randn(shape, dtype, scale=1.0):
    """Standard normal values, never exactly zero, rounded into ``dtype``."""
    x = torch.randn(shape, dtype=F64) * scale
    x = torch.where(x.abs() < 1e-3, torch.full_like(x, 1e-3), x)
    return x.to(dtype)


def rand_cov(shape, dtype, lo=0.05, hi=1.0):
    """Positive covariances in [lo, hi)."""
    return (lo + (hi - lo) * torch.rand(shape, dtype=F64)).to(dtype)


def cov_dtype_for(param_dtype):
    return F64 if param_dtype == F64 else torch.float32


def embedded(values: torch.Tensor, pad: int = 37, sentinel: float = 12345.0):
    """A contiguous view of ``values`` inside a larger buffer with sentinel guard zones, to
    catch writes outside the tensor. Returns (view, check) where check() asserts the
    guards are intact."""
    flat = values.reshape(-1)
    buf = torch.full((flat.numel() + 2 * pad,), sentinel, dtype=values.dtype)
    buf[pad:pad + flat.numel()] = flat
    view = buf[pad:pad + flat.numel()].view(values.shape)

    def check():
        assert bool((buf[:pad] == sentinel).all()), "write before the tensor's storage"
        assert bool((buf[pad + flat.numel():] == sentinel).all()), "write past the tensor's end"

    return view, check


def poison_allocator(shape, dtype=F64):
    """Fill and free a block of the output's size so a kernel that skips elements of a
    freshly allocated output sees NaN there (the CPU allocator tends to reuse it)."""
    t = torch.full(shape, float("nan"), dtype=dtype)
    del t
