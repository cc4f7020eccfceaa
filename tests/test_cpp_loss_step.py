"""cpp backend: loss_quad_form / loss_step_ (DESIGN 2.2) against the float64 reference."""
import pytest
import torch

import kalman_kernels as kk
import kalman_kernels.reference as ref
from cpp_helpers import (F64, ISAS, assert_close_scaled, cov_dtype_for, cpp_backend, embedded,
                         rand_cov, randn, tol_for, using_isa)

# (param dtype, cov dtype) pairs the optimizer produces
DTYPE_PAIRS = [(torch.float32, torch.float32), (F64, F64), (torch.bfloat16, torch.float32),
               (torch.float16, torch.float32), (torch.float32, F64)]
# shapes of one multi-tensor call: odd sizes, a tensor crossing the 65536-element chunks
SHAPES = [(1,), (7,), (1023,), (33, 131), (65536 + 4099,)]


@pytest.fixture(scope="module")
def cpp():
    return cpp_backend()


def _tensors(pair, shapes=SHAPES):
    pdt, cdt = pair
    params = [randn(s, pdt) for s in shapes]
    grads = [randn(s, pdt, scale=0.1) for s in shapes]
    covs = [rand_cov(s, cdt) for s in shapes]
    return params, grads, covs


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=lambda p: f"{p[0]}-{p[1]}")
def test_quad_form_matches_reference(cpp, isa, pair):
    _, grads, covs = _tensors(pair)
    lam, q = 0.9, 0.01
    expected = ref.loss_quad_form(grads, covs, lam, q)
    with using_isa(cpp, isa):
        got = cpp.loss_quad_form(grads, covs, lam, q)
    assert isinstance(got, float)
    # a sum of positive terms over n: its own magnitude is the condition scale
    tol = 1e-10 if pair == (F64, F64) else 1e-4
    assert abs(got - expected) <= tol * expected, (got, expected)


def test_quad_form_noncontiguous_and_empty(cpp):
    g = randn((300, 40), torch.float32).T          # non-contiguous grad: read via a copy
    c = rand_cov((300, 40), torch.float32).T
    assert abs(cpp.loss_quad_form([g], [c]) - ref.loss_quad_form([g], [c])) <= \
        1e-4 * ref.loss_quad_form([g], [c])
    assert cpp.loss_quad_form([], []) == 0.0


def _bounds(covs, grads, lam, q, weight, information):
    """floor / ceiling that clamp some elements of the largest tensor."""
    p_pred = ref.predict_cov(covs[-1].to(F64), lam, q)
    raw = ref.cov_update(p_pred, weight * grads[-1].to(F64) ** 2, 0.0, float("inf"), information)
    return float(torch.quantile(raw[:8192], 0.2)), float(torch.quantile(raw[:8192], 0.8))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=lambda p: f"{p[0]}-{p[1]}")
@pytest.mark.parametrize("information", [False, True], ids=["kalman", "information"])
def test_loss_step_matches_reference(cpp, isa, pair, information):
    pdt, cdt = pair
    params0, grads, covs0 = _tensors(pair)
    lam = float(torch.empty(()).uniform_(0.8, 1.0))
    q = float(torch.empty(()).uniform_(0.0, 0.01))
    coef = float(torch.empty(()).uniform_(-2.0, 2.0))
    weight = float(torch.empty(()).uniform_(0.1, 20.0))
    floor, ceil = _bounds(covs0, grads, lam, q, weight, information)
    # reference
    p_ref = [p.clone() for p in params0]
    c_ref = [c.clone() for c in covs0]
    # the float64 answer (reference rounds once into storage; compare against float64)
    exp_p, exp_c, p_scale, c_scale = [], [], [], []
    for p, g, c in zip(params0, grads, covs0):
        g64 = g.to(F64)
        p_pred = ref.predict_cov(c.to(F64), lam, q)
        step = coef * p_pred * g64
        exp_p.append(p.to(F64) + step)
        new_c = ref.cov_update(p_pred, weight * g64 * g64, floor, ceil, information)
        exp_c.append(new_c)
        p_scale.append(p.to(F64).abs() + step.abs())
        c_scale.append(torch.maximum(p_pred + p_pred * p_pred * weight * g64 * g64, new_c)
                       if not information else new_c)
    assert bool((exp_c[-1] == floor).any()) and bool((exp_c[-1] == ceil).any())
    views = [embedded(p.clone()) for p in params0]
    cviews = [embedded(c.clone()) for c in covs0]
    with using_isa(cpp, isa):
        cpp.loss_step_([v for v, _ in views], grads, [v for v, _ in cviews], coef, weight, lam, q,
                       floor, ceil, information)
    for (_, check), (_, ccheck) in zip(views, cviews):
        check()
        ccheck()
    tol_p = tol_for(pdt, cdt)
    tol_c = 1e-10 if cdt == F64 and pdt == F64 else 1e-5
    for i, ((p, _), (c, _)) in enumerate(zip(views, cviews)):
        what = f"loss {isa} {pair} info={information} tensor {i}"
        assert_close_scaled(p, exp_p[i], p_scale[i], tol_p, what + " param")
        assert_close_scaled(c, exp_c[i], c_scale[i], tol_c, what + " cov")
    del p_ref, c_ref


def test_loss_step_noncontiguous(cpp):
    p0 = randn(500, torch.float32)
    g_nc = randn(1000, torch.float32)[::2]
    c0 = rand_cov(500, torch.float32)
    p1, c1, p2, c2 = p0.clone(), c0.clone(), p0.clone(), c0.clone()
    cpp.loss_step_([p1], [g_nc], [c1], 0.5, 0.05, 1.0, 0.0, 0.0, float("inf"), False)
    ref.loss_step_([p2], [g_nc], [c2], 0.5, 0.05, 1.0, 0.0, 0.0, float("inf"), False)
    assert float(((p1 - p2).abs() / (p2.abs() + 1e-3)).max()) <= 1e-5
    assert float(((c1 - c2).abs() / c2).max()) <= 1e-5
    p_nc = randn(1000, torch.float32)[::2]
    with pytest.raises(RuntimeError, match=r"params\[1\]"):
        cpp.loss_step_([p1, p_nc], [g_nc, g_nc], [c1, c0.clone()], 0.5, 2.0, 1.0, 0.0, 0.0, 1.0,
                       False)
    with pytest.raises(RuntimeError, match=r"covs\[0\]"):
        cpp.loss_step_([p1], [g_nc], [rand_cov(1000, torch.float32)[::2]], 0.5, 2.0, 1.0, 0.0,
                       0.0, 1.0, False)


@pytest.mark.parametrize("cov_update", ["kalman", "information"])
@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.bfloat16], ids=str)
def test_loss_update_cpp_equals_reference(cpp, cov_update, dtype):
    shapes = [(17, 5), (1001,), (3,)]
    params0 = [randn(s, dtype) for s in shapes]
    grads = [randn(s, dtype, scale=0.3) for s in shapes]
    covs0 = [rand_cov(s, cov_dtype_for(dtype)) for s in shapes]
    out = {}
    for backend in ("reference", "cpp"):
        ps = [p.clone() for p in params0]
        cs = [c.clone() for c in covs0]
        info = kk.ops.loss_update_(ps, grads, cs, 0.7, 0.05, lr=0.9, forgetting=0.98,
                                   process_noise=1e-3, cov_floor=1e-4, cov_ceiling=1.0,
                                   gate=0.999, cov_update=cov_update, backend=backend)
        out[backend] = (ps, cs, info)
    ps_r, cs_r, i_r = out["reference"]
    ps_c, cs_c, i_c = out["cpp"]
    tol = {F64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 1e-2}[dtype]
    assert abs(i_r.mahalanobis - i_c.mahalanobis) <= 1e-4 * abs(i_r.mahalanobis) + 1e-300
    for got, want in zip(ps_c + cs_c, ps_r + cs_r):
        assert float((got.to(F64) - want.to(F64)).abs().max() / want.to(F64).abs().max()) <= tol


def test_optimizer_loss_mode_cpp_equals_reference(cpp):
    x = torch.randn(64, 6)
    y = torch.randn(64, 1)
    init = torch.nn.Linear(6, 1).state_dict()
    res = {}
    for backend in ("reference", "cpp"):
        model = torch.nn.Linear(6, 1)
        model.load_state_dict(init)
        opt = kk.KalmanNGD(model.parameters(), lr=0.5, init_cov=1e-2, obs_noise=0.5,
                           backend=backend)
        for step in range(50):
            xb, yb = x[step % 8::8], y[step % 8::8]

            opt.step(lambda: torch.nn.functional.mse_loss(model(xb), yb))
        res[backend] = [p.detach().clone() for p in model.parameters()]
    for got, want in zip(res["cpp"], res["reference"]):
        assert float((got - want).abs().max() / want.abs().max()) <= 1e-4


def test_quad_form_hooks_accumulate_during_backward(cpp):
    from kalman_kernels.backends.loss_hooks import attach_quad_form_hooks
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    covs = {p: rand_cov(p.shape, torch.float32) for p in model.parameters()}
    acc = attach_quad_form_hooks(model.parameters(), covs.__getitem__, forgetting=0.9,
                                 process_noise=0.01, backend="cpp")
    x = torch.randn(16, 7)
    model(x).pow(2).mean().backward()
    params = list(model.parameters())
    expected = ref.loss_quad_form([p.grad for p in params], [covs[p] for p in params], 0.9, 0.01)
    assert acc.count == len(params)
    assert abs(acc.value - expected) <= 1e-5 * expected
    acc.reset()
    acc.remove()
    model(x).pow(2).mean().backward()
    assert acc.value == 0.0 and acc.count == 0
