"""Every registered backend through the public API equals the reference backend: one
``ops.kalman_update_`` (dense + sample-grouped Kronecker blocks, gate, floor/ceiling),
one ``ops.loss_update_``, 50 KalmanNGD steps in batch mode and in loss mode, and the
g^T P g hooks of ``reduce_in_backward``. (The per-op tests, tests/test_op_*.py, check each
kernel against float64 on its own.)"""
import pytest
import torch

import kalman_kernels as kk
import kalman_kernels.reference as ref
from op_checks import F64, cov_dtype_for, rand_cov, randn


def _registered(kb):
    kb.need_registered()
    if kb.name == "reference":
        pytest.skip("the reference is what the others are compared with")


@pytest.mark.parametrize("cov_update", ["kalman", "information"])
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
def test_kalman_update_equals_reference(kb, cov_update, dtype):
    _registered(kb)
    b, k = 3, 2
    m = b * k
    cdt = cov_dtype_for(dtype)
    dense_p, dense_c = randn((11, 7), dtype), rand_cov((11, 7), cdt)
    jac = randn((m, 11, 7), dtype)
    kw, kc = randn((9, 5), dtype), rand_cov((9, 5), cdt)
    a, d = randn((b, 5), dtype), randn((b, k, 9), dtype)
    residual = torch.randn(m, dtype=dtype)
    state = {}
    for backend in ("reference", kb.name):
        tensors = [kb.to(t.clone()) for t in (dense_p, dense_c, kw, kc)]
        blocks = [kk.ops.DenseBlock(tensors[0], tensors[1], kb.to(jac)),
                  kk.ops.KronBlock(tensors[2], tensors[3], kb.to(a), kb.to(d))]
        with kb.active():
            info = kk.ops.kalman_update_(blocks, kb.to(residual), 0.1, lr=0.8, forgetting=0.97,
                                         process_noise=1e-3, cov_floor=1e-4, cov_ceiling=2.0,
                                         gate=0.99, cov_update=cov_update, backend=backend)
        state[backend] = ([t.cpu() for t in tensors], info)
    (t_ref, i_ref), (t_got, i_got) = state["reference"], state[kb.name]
    tol = 1e-10 if (dtype == F64 and kb.exact64) else 1e-4
    assert abs(i_ref.mahalanobis - i_got.mahalanobis) <= tol * abs(i_ref.mahalanobis)
    for got, want in zip(t_got, t_ref):
        scale = want.to(F64).abs().max()
        assert float((got.to(F64) - want.to(F64)).abs().max() / scale) <= tol


@pytest.mark.parametrize("cov_update", ["kalman", "information"])
@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.bfloat16], ids=str)
def test_loss_update_equals_reference(kb, cov_update, dtype):
    _registered(kb)
    shapes = [(17, 5), (1001,), (3,)]
    params0 = [randn(s, dtype) for s in shapes]
    grads = [randn(s, dtype, scale=0.3) for s in shapes]
    covs0 = [rand_cov(s, cov_dtype_for(dtype)) for s in shapes]
    out = {}
    for backend in ("reference", kb.name):
        ps = [kb.to(p.clone()) for p in params0]
        cs = [kb.to(c.clone()) for c in covs0]
        with kb.active():
            info = kk.ops.loss_update_(ps, [kb.to(g) for g in grads], cs, 0.7, 0.05, lr=0.9,
                                       forgetting=0.98, process_noise=1e-3, cov_floor=1e-4,
                                       cov_ceiling=1.0, gate=0.999, cov_update=cov_update,
                                       backend=backend)
        out[backend] = ([p.cpu() for p in ps], [c.cpu() for c in cs], info)
    ps_r, cs_r, i_r = out["reference"]
    ps_c, cs_c, i_c = out[kb.name]
    tol = {F64: 1e-10 if kb.exact64 else 1e-4, torch.float32: 1e-4, torch.bfloat16: 1e-2}[dtype]
    assert abs(i_r.mahalanobis - i_c.mahalanobis) <= 1e-4 * abs(i_r.mahalanobis) + 1e-300
    for got, want in zip(ps_c + cs_c, ps_r + cs_r):
        assert float((got.to(F64) - want.to(F64)).abs().max() / want.to(F64).abs().max()) <= tol


@pytest.mark.parametrize("mode", ["batch", "loss"])
def test_optimizer_trajectory_equals_reference_50_steps(kb, mode):
    """KalmanNGD(backend=...) follows the reference trajectory over 50 steps."""
    _registered(kb)
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    x_all = torch.randn(50, 8, 5, dtype=F64)
    w_true = torch.randn(3, 5, dtype=F64)
    y_all = x_all @ w_true.T + 0.1 * torch.randn(50, 8, 3, dtype=F64)
    init = torch.nn.Linear(5, 3).double().state_dict()
    results = {}
    for backend in ("reference", kb.name):
        model = torch.nn.Linear(5, 3).double().to(kb.device)
        model.load_state_dict(init)
        opt = kk.KalmanNGD(model.parameters(), lr=1.0, init_cov=0.5, obs_noise=0.05,
                           forgetting=0.99, process_noise=1e-4, backend=backend)
        if mode == "batch":
            opt.track(model)
        with kb.active():
            for x, y in zip(x_all, y_all):
                x, y = kb.to(x), kb.to(y)
                if mode == "batch":
                    opt.step(lambda x=x, y=y: (model(x), y))
                else:
                    opt.step(lambda x=x, y=y: torch.nn.functional.mse_loss(model(x), y))
        results[backend] = [p.detach().cpu().clone() for p in model.parameters()] + \
            [opt.covariance(p).cpu().clone() for p in model.parameters()]
    tol = 1e-9 if kb.exact64 else 1e-4
    for got, want in zip(results[kb.name], results["reference"]):
        assert float((got - want).abs().max() / want.abs().max()) <= tol


def test_quad_form_hooks_accumulate_during_backward(kb):
    kb.need_registered()
    from kalman_kernels.backends.loss_hooks import attach_quad_form_hooks
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Tanh(),
                                torch.nn.Linear(5, 1)).to(kb.device)
    covs = {p: kb.to(rand_cov(p.shape, torch.float32)) for p in model.parameters()}
    with kb.active():
        acc = attach_quad_form_hooks(model.parameters(), covs.__getitem__, forgetting=0.9,
                                     process_noise=0.01, backend=kb.name)
        x = kb.to(torch.randn(16, 7))
        model(x).pow(2).mean().backward()
    params = list(model.parameters())
    expected = float(ref.loss_quad_form([p.grad.cpu() for p in params],
                                        [covs[p].cpu() for p in params], 0.9, 0.01))
    assert acc.count == len(params)
    assert abs(float(acc.value) - expected) <= 1e-5 * expected
    acc.reset()
    acc.remove()
    model(x).pow(2).mean().backward()
    assert acc.value is None and acc.count == 0
