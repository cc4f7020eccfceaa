"""Every op of the schema under torch.compile, for every registered kernel variant:
``torch.library.opcheck`` (schema, fake implementation and kernel agree: shapes, dtypes,
aliasing, mutation), and fullgraph-compiled steps calling the backend's entry points
(a graph break is an error) equal the eager steps. The reference variant runs the ops'
default kernels (the reference, registered as CompositeExplicitAutograd: what a device
without a compiled kernel runs, docs/design.md, 4.3) in a namespace no backend registers
kernels for."""
import contextlib

import pytest
import torch

from kalman_kernels.backends import library
from op_checks import F64, op_cases, rand_cov

#: The ops with nothing but their default kernels.
DEFAULT_ONLY = "kalman_kernels_default_only"


@contextlib.contextmanager
def _registered(kb):
    """The variant's entry points over registered ops."""
    if kb.interpreted:
        pytest.skip("the interpreted Triton ops have their own compile tests "
                    "(tests/test_triton_backend.py)")
    if kb.name == "reference":
        yield library.Kernels("reference", DEFAULT_ONLY)
        return
    with kb.active() as be:
        yield be


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
def test_opcheck_every_op(kb, dtype):
    with _registered(kb) as be:
        # the op namespace the variant's entry points call (a backend module's KERNELS, or
        # the bound wrapper itself)
        ops = getattr(be, "KERNELS", be).ops
        for name, args in op_cases(kb.device, dtype).items():
            torch.library.opcheck(getattr(ops, name), args)


def _dense_step(be, param, cov, x, y, r: float):
    """One batch-mode Kalman step of linear regression y ~ x @ param (H = x): float64 m x m
    algebra around the backend's two passes over the parameters."""
    m = x.shape[0]
    e = (y - x @ param).to(torch.float64)
    hph = be.innovation_cov_dense(x, cov, 1.0, 1e-4)
    s = hph + r * torch.eye(m, dtype=torch.float64, device=x.device)
    factor = torch.linalg.cholesky(s)
    eye = torch.eye(m, dtype=torch.float64, device=x.device)
    whitening = torch.linalg.solve_triangular(factor, eye, upper=False)
    coef = torch.cholesky_solve(e[:, None], factor).reshape(-1)
    ok = torch.isfinite(s).all()
    be.fused_update_dense_(param, cov, x, coef, whitening, ok, 1.0, 1e-4, 1e-8, 10.0, False)
    return e.pow(2).mean()


def _loss_step(be, params, covs, x, y, r: float, lr: float):
    """One loss-observation step (docs/design.md, 2.2) of a linear model with analytic gradients."""
    w, b = params
    resid = x @ w + b - y
    loss = 0.5 * resid.pow(2).mean()
    grads = [x.T @ resid / x.shape[0], resid.mean().reshape(1)]
    quad = be.loss_quad_form(grads, covs, 1.0, 0.0)
    s = quad + r
    e = -loss.to(torch.float64)
    be.loss_step_(params, grads, covs, lr * e / s, 1.0 / s, torch.isfinite(s), 1.0, 0.0, 1e-8,
                  10.0, False)
    return loss


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiled_dense_step_fullgraph(kb, compiler):
    n, m = 33, 8
    x_all, y_all = kb.to(torch.randn(5, m, n)), kb.to(torch.randn(5, m))
    p0, c0 = kb.to(torch.randn(n)), kb.to(rand_cov(n, torch.float32))
    with _registered(kb) as be:
        torch._dynamo.reset()
        step = lambda p, c, x, y: _dense_step(be, p, c, x, y, 0.1)
        compiled = torch.compile(step, fullgraph=True, backend=compiler)
        results = []
        for fn in (step, compiled):
            param, cov = p0.clone(), c0.clone()
            for i in range(5):
                fn(param, cov, x_all[i], y_all[i])
            results.append((param, cov))
    (p_e, c_e), (p_c, c_c) = results
    assert torch.allclose(p_c, p_e, rtol=1e-5, atol=1e-6)
    assert torch.allclose(c_c, c_e, rtol=1e-5, atol=1e-9)
    assert not torch.equal(p_c, p0), "the compiled step did not update the parameter"


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiled_loss_step_fullgraph(kb, compiler):
    x, y = kb.to(torch.randn(5, 16, 6)), kb.to(torch.randn(5, 16))
    w0, b0 = kb.to(torch.randn(6)), kb.to(torch.randn(1))
    c0 = [kb.to(rand_cov(6, torch.float32)), kb.to(rand_cov(1, torch.float32))]
    with _registered(kb) as be:
        torch._dynamo.reset()
        step = lambda ps, cs, xi, yi: _loss_step(be, ps, cs, xi, yi, 0.5, 0.8)
        compiled = torch.compile(step, fullgraph=True, backend=compiler)
        results = []
        for fn in (step, compiled):
            params = [w0.clone(), b0.clone()]
            covs = [c.clone() for c in c0]
            for i in range(5):
                fn(params, covs, x[i], y[i])
            results.append(params + covs)
    for got, want in zip(results[1], results[0]):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-7)
    assert not torch.equal(results[1][0], w0)
