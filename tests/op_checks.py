"""Shared checks of the per-op kernel tests (tests/test_op_*.py).

Tolerances (docs/design.md, section 5): float64 1e-10; float32 1e-5 elementwise and 1e-4 for
reductions over n; bf16 / fp16 parameters 1e-2. Errors are measured per element against
the float64 answer, relative to the magnitude of the terms that make up that element (the
condition scale of the sum: the same sum over absolute values), and NaN never passes.
"""
from __future__ import annotations

import numpy as np
import torch

F64 = torch.float64
PARAM_DTYPES = [torch.float32, F64, torch.bfloat16, torch.float16]


def cov_dtype_for(param_dtype):
    return F64 if param_dtype == F64 else torch.float32


def tol_for(*dtypes, reduction: bool = False, exact64: bool = True) -> float:
    """The tolerance for the lowest-precision dtype among ``dtypes``."""
    if any(d in (torch.bfloat16, torch.float16) for d in dtypes):
        return 1e-2
    if all(d == F64 for d in dtypes) and exact64:
        return 1e-10
    return 1e-4 if reduction else 1e-5


def assert_close_scaled(actual, expected, scale, tol: float, what: str) -> None:
    """max_i |a_i - e_i| / scale_i <= tol, every element finite (NaN never passes)."""
    a = actual.detach().cpu().to(F64).reshape(-1)
    e = expected.detach().cpu().to(F64).reshape(-1)
    s = scale.detach().cpu().to(F64).reshape(-1).abs()
    assert a.shape == e.shape, (what, a.shape, e.shape)
    assert bool(torch.isfinite(a).all()), f"{what}: non-finite values in the result"
    assert bool(torch.isfinite(e).all()), f"{what}: non-finite values in the expected values"
    floor = torch.finfo(F64).tiny
    err = ((a - e).abs() / s.clamp_min(floor)).max().item() if a.numel() else 0.0
    assert err <= tol, f"{what}: scaled error {err:.3e} > {tol:.0e}"


def assert_sym_close(actual, expected, tol: float, what: str) -> None:
    """S_jk compared on the scale sqrt(S_jj S_kk) (Cauchy-Schwarz bound of every term sum);
    S must be float64 and exactly symmetric."""
    assert actual.dtype == F64, f"{what}: S must be float64, got {actual.dtype}"
    actual = actual.detach().cpu()
    expected = torch.as_tensor(expected).to(F64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert torch.equal(actual, actual.T), f"{what}: S is not exactly symmetric"
    d = torch.diagonal(expected).abs()
    scale = torch.sqrt(d[:, None] * d[None, :])
    assert_close_scaled(actual, expected, scale, tol, what)


def randn(shape, dtype, scale=1.0):
    """Standard normal values, never exactly zero, rounded into ``dtype`` (CPU)."""
    x = torch.randn(shape, dtype=F64) * scale
    x = torch.where(x.abs() < 1e-3, torch.full_like(x, 1e-3), x)
    return x.to(dtype)


def rand_cov(shape, dtype, lo=0.05, hi=1.0):
    """Positive covariances in [lo, hi) (CPU)."""
    return (lo + (hi - lo) * torch.rand(shape, dtype=F64)).to(dtype)


def embedded(values: torch.Tensor, pad: int = 37, sentinel: float = 12345.0):
    """A contiguous view of ``values`` inside a larger buffer with sentinel guard zones, to
    catch writes outside the tensor. Returns (view, check); check() asserts the guards."""
    flat = values.reshape(-1)
    buf = torch.full((flat.numel() + 2 * pad,), sentinel, dtype=values.dtype,
                     device=values.device)
    buf[pad:pad + flat.numel()] = flat
    view = buf[pad:pad + flat.numel()].view(values.shape)

    def check():
        assert bool((buf[:pad] == sentinel).all()), "write before the tensor's storage"
        assert bool((buf[pad + flat.numel():] == sentinel).all()), "write past the tensor's end"

    return view, check


def poison_allocator(shape, dtype=F64, device="cpu"):
    """Fill and free a block of the output's size so a kernel that skips elements of a
    freshly allocated output sees NaN there (allocators tend to reuse it)."""
    t = torch.full(shape, float("nan"), dtype=dtype, device=device)
    del t


def kron_jacobian(inputs, grad_outputs):
    """The dense (B K, d_out d_in) Jacobian of a sample-grouped Kronecker block, in NumPy
    float64: row (j, k) is vec(D[j, k] A[j]^T). Independent of the package."""
    a = np.asarray(inputs.detach().cpu().to(F64))
    d = np.asarray(grad_outputs.detach().cpu().to(F64))
    if d.ndim == 2:
        d = d[:, None, :]
    rows = [np.outer(d[j, k], a[j]).ravel() for j in range(d.shape[0]) for k in range(d.shape[1])]
    return torch.from_numpy(np.stack(rows))


def filter_terms(hph: torch.Tensor, information: bool, r=None):
    """(coef, whitening) as the ops layer builds them: coef = lr * s * S^-1 e;
    F = L^-1 (Kalman rule) or R^-1/2 (information rule). CPU float64."""
    m = hph.shape[0]
    r = float(torch.empty(()).uniform_(0.05, 0.5)) if r is None else r
    s = hph + r * torch.eye(m, dtype=F64)
    factor = torch.linalg.cholesky(s)
    e = torch.randn(m, dtype=F64)
    lr = float(torch.empty(()).uniform_(0.3, 1.0))
    coef = lr * torch.cholesky_solve(e[:, None], factor).reshape(-1)
    if information:
        whitening = torch.eye(m, dtype=F64) / r ** 0.5
    else:
        eye = torch.eye(m, dtype=F64)
        whitening = torch.linalg.solve_triangular(factor, eye, upper=False)
    return coef, whitening


def hyper():
    """Random forgetting and process noise."""
    return float(torch.empty(()).uniform_(0.6, 1.0)), float(torch.empty(()).uniform_(0.0, 0.05))


def true_(device="cpu"):
    return torch.ones((), dtype=torch.bool, device=device)


def false_(device="cpu"):
    return torch.zeros((), dtype=torch.bool, device=device)


_INT_OF = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16,
           torch.float16: torch.int16}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor (so that equality is bit-for-bit, NaN and -0 included)."""
    return t.contiguous().view(_INT_OF[t.dtype])


def op_cases(device="cpu", dtype=torch.float32):
    """(op name -> args) for every op of the schema (kalman_kernels/backends/library.py):
    small fresh inputs on ``device`` for ``torch.library.opcheck`` and the surface tests.
    Parameters, Jacobians and Kronecker factors in ``dtype``, covariances in float32 (float64
    for float64), filter terms float64. A new op adds its case here, and only here."""
    from kalman_kernels.backends import library

    cdt = cov_dtype_for(dtype)
    m, n, b, k, d_out, d_in = 3, 37, 3, 2, 4, 5
    t = lambda x: x.to(device)
    ok = true_(device)
    coef = t(torch.randn(m, dtype=F64))
    whitening = t(torch.linalg.cholesky(torch.eye(m, dtype=F64) * 2.0))
    coef_k = t(torch.randn(b * k, dtype=F64))
    whitening_k = t(torch.linalg.cholesky(torch.eye(b * k, dtype=F64) * 2.0))
    jac = t(randn((m, n), dtype))
    a, d = t(randn((b, d_in), dtype)), t(randn((b, k, d_out), dtype))
    w, wc = t(randn((d_out, d_in), dtype)), t(rand_cov((d_out, d_in), cdt))
    shapes = [(7,), (3, 4)]
    grads = [t(randn(s, dtype)) for s in shapes]
    params = [t(randn(s, dtype)) for s in shapes]
    covs = [t(rand_cov(s, cdt)) for s in shapes]
    scalars = t(torch.tensor([0.3, 0.7], dtype=F64))
    p, c = t(randn(n, dtype)), t(rand_cov(n, cdt))
    u, dd = t(randn(n, cdt)), t(rand_cov(n, cdt))
    cases = {
        "innovation_cov_dense": (jac, c, 0.9, 0.01),
        "innovation_cov_kron": (a, d, wc, 0.9, 0.01),
        "fused_update_dense_": (p, c, jac, coef, whitening, ok, 0.9, 0.01, 1e-4, 10.0, False),
        "fused_update_kron_": (w, wc, a, d, coef_k, whitening_k, ok, 0.9, 0.01, 1e-4, 10.0, True),
        "loss_quad_form": (grads, covs, 0.9, 0.01),
        "loss_step_": (params, grads, covs, scalars[0], scalars[1], ok, 0.9, 0.01, 1e-4, 10.0,
                       False),
        "step_terms_dense": (jac, coef, whitening),
        "step_terms_kron": (a, d, coef_k, whitening_k),
        "apply_terms_": (p, c, u, dd, ok, 0.9, 0.01, 1e-4, 10.0, False),
    }
    assert set(cases) == set(library.SCHEMAS), \
        f"tests/op_checks.py: op_cases has no case for {set(library.SCHEMAS) - set(cases)}"
    return cases
