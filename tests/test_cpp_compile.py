"""cpp backend under torch.compile: opcheck of every registered op, and compiled training
steps (fullgraph=True, so any graph break is an error) that call the ops."""
import pytest
import torch

from cpp_helpers import F64, cpp_backend, rand_cov, randn

ops = None


@pytest.fixture(scope="module")
def cpp():
    global ops
    module = cpp_backend()
    ops = torch.ops.kalman_kernels
    return module


def _dense_args(dtype, m=3, n=37):
    cdt = F64 if dtype == F64 else torch.float32
    jac = randn((m, n), dtype)
    param, cov = randn(n, dtype), rand_cov(n, cdt)
    coef = torch.randn(m, dtype=F64)
    whitening = torch.linalg.cholesky(torch.eye(m, dtype=F64) * 2.0)
    return param, cov, jac, coef, whitening


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
def test_opcheck_every_op(cpp, dtype):
    cdt = F64 if dtype == F64 else torch.float32
    param, cov, jac, coef, whitening = _dense_args(dtype)
    a, d = randn((3, 5), dtype), randn((3, 4), dtype)
    w, wc = randn((4, 5), dtype), rand_cov((4, 5), cdt)
    grads = [randn(7, dtype), randn((3, 4), dtype)]
    params = [randn(7, dtype), randn((3, 4), dtype)]
    covs = [rand_cov(7, cdt), rand_cov((3, 4), cdt)]
    scalars = torch.tensor([0.3, 0.7], dtype=F64)
    cases = [
        (ops.innovation_cov_dense, (jac, cov, 0.9, 0.01)),
        (ops.innovation_cov_kron, (a, d, wc, 0.9, 0.01)),
        (ops.fused_update_dense_, (param, cov, jac, coef, whitening, 0.9, 0.01, 1e-4, 10.0,
                                   False)),
        (ops.fused_update_kron_, (w, wc, a, d, coef, whitening, 0.9, 0.01, 1e-4, 10.0, True)),
        (ops.loss_quad_form, (grads, covs, 0.9, 0.01)),
        (ops.loss_step_, (params, grads, covs, scalars[0], scalars[1], 0.9, 0.01, 1e-4, 10.0,
                          False)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def _dense_step(param, cov, x, y, r: float):
    """One batch-mode Kalman step of linear regression y ~ x @ param (H = x), in float64
    m x m algebra, calling the cpp kernels for the passes over the parameters."""
    m = x.shape[0]
    e = (y - x @ param).to(torch.float64)
    hph = ops.innovation_cov_dense(x, cov, 1.0, 1e-4)
    s = hph + r * torch.eye(m, dtype=torch.float64)
    factor = torch.linalg.cholesky(s)
    eye = torch.eye(m, dtype=torch.float64)
    whitening = torch.linalg.solve_triangular(factor, eye, upper=False)
    coef = torch.cholesky_solve(e[:, None], factor).reshape(-1)
    ops.fused_update_dense_(param, cov, x, coef, whitening, 1.0, 1e-4, 1e-8, 10.0, False)
    return e.pow(2).mean()


def _loss_step(params, covs, x, y, r: float, lr: float):
    """One loss-observation step (DESIGN 2.2) of a linear model with analytic gradients."""
    w, b = params
    pred = x @ w + b
    resid = pred - y
    loss = 0.5 * resid.pow(2).mean()
    grads = [x.T @ resid / x.shape[0], resid.mean().reshape(1)]
    quad = ops.loss_quad_form(grads, covs, 1.0, 0.0)
    s = quad + r
    e = -loss.to(torch.float64)
    coef = lr * e / s
    weight = 1.0 / s
    ops.loss_step_(params, grads, covs, coef, weight, 1.0, 0.0, 1e-8, 10.0, False)
    return loss


def _run_dense(step_fn, seed_data, steps=5):
    x_all, y_all, p0, c0 = seed_data
    param, cov = p0.clone(), c0.clone()
    for i in range(steps):
        step_fn(param, cov, x_all[i], y_all[i], 0.1)
    return param, cov


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_dense_step_fullgraph(cpp, backend):
    n, m = 33, 8
    data = (torch.randn(5, m, n), torch.randn(5, m), torch.randn(n), rand_cov(n, torch.float32))
    torch._dynamo.reset()
    compiled = torch.compile(_dense_step, fullgraph=True, backend=backend)
    p_eager, c_eager = _run_dense(_dense_step, data)
    p_comp, c_comp = _run_dense(compiled, data)
    assert torch.allclose(p_comp, p_eager, rtol=1e-5, atol=1e-6)
    assert torch.allclose(c_comp, c_eager, rtol=1e-5, atol=1e-9)
    assert not torch.equal(p_comp, data[2]), "the compiled step did not update the parameter"


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_loss_step_fullgraph(cpp, backend):
    x, y = torch.randn(5, 16, 6), torch.randn(5, 16)
    w0, b0 = torch.randn(6), torch.randn(1)
    c0 = [rand_cov(6, torch.float32), rand_cov(1, torch.float32)]
    torch._dynamo.reset()
    compiled = torch.compile(_loss_step, fullgraph=True, backend=backend)
    results = []
    for fn in (_loss_step, compiled):
        params = [w0.clone(), b0.clone()]
        covs = [c.clone() for c in c0]
        for i in range(5):
            fn(params, covs, x[i], y[i], 0.5, 0.8)
        results.append(params + covs)
    for got, want in zip(results[1], results[0]):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-7)
    assert not torch.equal(results[1][0], w0)


def test_no_graph_break_reported_by_dynamo_explain(cpp):
    n, m = 17, 4
    x, y = torch.randn(m, n), torch.randn(m)
    param, cov = torch.randn(n), rand_cov(n, torch.float32)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(_dense_step)(param, cov, x, y, 0.1)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
