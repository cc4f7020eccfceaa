"""Robustness (docs/robustness.md): bad inputs, the overflow guard, diagnostics, the memory
guard and sequential sub-batches. Every test that runs a step runs it on every
backend that runs the step on CPU tensors here (tests/step_backends.py)."""
import copy
import math
import resource

import numpy as np
import pytest
import torch
from torch import nn

import kalman_kernels as kk
from conftest import rel_err
from kalman_kernels import ops
from kalman_kernels.ops import _common
from op_checks import bits
from step_backends import step_backends

BACKENDS = step_backends()
F64 = torch.float64


def _state(*tensors):
    return [bits(t).clone() for t in tensors]


def _unchanged(before, *tensors):
    return all(torch.equal(bits(t), b) for t, b in zip(tensors, before))


# ====================================================================== overflow guard
@pytest.mark.parametrize("backend", BACKENDS)
def test_residual_1e37_and_loss_1e38_skip_and_keep_float32_state(backend):
    p = torch.randn(6, 5)
    c = torch.full((6, 5), 0.1)
    w, wc = torch.randn(3, 4), torch.full((3, 4), 0.1)
    before = _state(p, c, w, wc)
    blocks = [ops.DenseBlock(p, c, torch.randn(2, 6, 5)),
              ops.KronBlock(w, wc, torch.randn(2, 4), torch.randn(2, 3))]
    with pytest.warns(RuntimeWarning, match="overflow"):
        info = ops.kalman_update_(blocks, torch.tensor([1e37, -1e37]), 0.01, backend=backend)
    assert info.skipped and "overflow" in info.reason
    assert _unchanged(before, p, c, w, wc)
    params, covs = [torch.randn(7), torch.randn(2, 3)], [torch.full((7,), 0.1),
                                                          torch.full((2, 3), 0.1)]
    grads = [torch.randn(7), torch.randn(2, 3)]
    before = _state(*params, *covs)
    with pytest.warns(RuntimeWarning, match="overflow"):
        info = ops.loss_update_(params, grads, covs, torch.tensor(1e38), 0.01, backend=backend)
    assert info.skipped and "overflow" in info.reason
    assert _unchanged(before, *params, *covs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_overflow_guard_follows_the_parameter_dtype(backend):
    """h = 0.5, P = 1, r = 1e-3, e = 6e4: the exact step is h e / (h^2 + r) = 1.2e5, beyond
    float16's 65504 (the reference would write Inf) but fine for float32: skipped for the float16
    parameter, applied (and finite) for the float32 one."""
    for dtype in (torch.float16, torch.float32):
        p = torch.zeros(3, dtype=dtype)
        c = torch.ones(3)
        jac = torch.tensor([[0.5, 0.0, 0.0]], dtype=dtype)
        info = ops.kalman_step_([ops.DenseBlock(p, c, jac)], [ops.StepHyper()],
                                torch.tensor([6e4], dtype=dtype), 1e-3, backend=backend)
        assert bool(torch.isfinite(p).all())
        if dtype == torch.float16:
            assert info.skipped and "overflow" in info.reason and not bool(p.any())
        else:
            assert not info.skipped and float(p[0]) == pytest.approx(0.5 * 6e4 / 0.251, rel=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_but_representable_steps_are_applied(backend, rng):
    """The guard is not a loss of data: e = 1e10 standard deviations is still applied
    (the threshold for float32 is lr s sqrt(d2) ~ 9e18)."""
    p = torch.zeros(3)
    c = torch.ones(3)
    info = ops.kalman_update_([ops.DenseBlock(p, c, torch.ones(1, 3))], torch.tensor([1e10]),
                              1.0, backend=backend)
    assert not info.skipped and bool(torch.isfinite(p).all()) and float(p.abs().max()) > 1e9


def test_step_bound_of_the_guard_holds(rng):
    """The guard's inequality |delta mu_i| <= lr s sqrt(d2) sqrt(P-_i), checked on random
    problems in float64 (the derivation is in ops._common.representable_step)."""
    for _ in range(50):
        m, n = int(rng.integers(1, 9)), int(rng.integers(1, 30))
        scale = 10.0 ** rng.uniform(-4, 4, 3)
        mu = torch.zeros(n, dtype=F64)
        cov = torch.tensor(rng.uniform(0.1, 2.0, n) * scale[0])
        jac = torch.tensor(rng.standard_normal((m, n)) * scale[1])
        e = torch.tensor(rng.standard_normal(m) * scale[2])
        p_pred = cov / 0.9 + 1e-3
        info = ops.kalman_update_([ops.DenseBlock(mu, cov, jac)], e, 0.5, lr=0.7,
                                  forgetting=0.9, process_noise=1e-3, backend="reference")
        bound = 0.7 * info.gate_scale * math.sqrt(info.mahalanobis) * p_pred.sqrt()
        assert bool((mu.abs() <= bound * (1 + 1e-9)).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_optimizer_loss_1e38_is_a_counted_skip(backend):
    model = nn.Linear(3, 2)
    opt = kk.KalmanNGD(model.parameters(), backend=backend)
    before = _state(*model.parameters())
    x = torch.randn(4, 3)
    with pytest.warns(RuntimeWarning, match="overflow"):
        opt.step(lambda: model(x).sum() + 1e38)
    assert opt.skipped_steps == 1 and _unchanged(before, *model.parameters())


# ====================================================================== bad inputs
def test_load_state_dict_from_another_model_raises_and_changes_nothing():
    a, b = nn.Linear(4, 3), nn.Linear(3, 4)
    opt_a = kk.KalmanNGD(a.parameters())
    opt_a.step(lambda: (a(torch.randn(2, 4)), torch.randn(2, 3)))
    opt_b = kk.KalmanNGD(b.parameters(), init_cov=0.3)
    opt_b.step(lambda: (b(torch.randn(2, 3)), torch.randn(2, 4)))
    saved = copy.deepcopy(opt_b.state_dict())
    with pytest.raises(ValueError, match=r"\['cov'\] has shape \(3, 4\) but parameter 0 has "
                                         r"shape \(4, 3\)"):
        opt_b.load_state_dict(opt_a.state_dict())
    with pytest.raises(ValueError, match="1 parameters, this optimizer's 2"):
        kk.KalmanNGD(nn.Linear(3, 4).parameters()).load_state_dict(
            kk.KalmanNGD([nn.Parameter(torch.zeros(2))]).state_dict())
    bad = copy.deepcopy(saved)
    bad["state"][0]["cov"][0, 0] = -1.0
    with pytest.raises(ValueError, match=r"state_dict\['state'\]\[0\]\['cov'\] holds 1 entry"):
        opt_b.load_state_dict(bad)
    bad = copy.deepcopy(saved)
    bad["param_groups"][0]["lr"] = -1.0
    with pytest.raises(ValueError, match="lr must be"):
        opt_b.load_state_dict(bad)
    after = opt_b.state_dict()
    for key in (0, 1):
        assert torch.equal(after["state"][key]["cov"], saved["state"][key]["cov"])
    assert after["param_groups"][0]["lr"] == saved["param_groups"][0]["lr"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_or_nan_covariance_is_named(backend):
    p, c = torch.randn(5), torch.tensor([0.1, -0.1, 0.1, 0.1, 0.1])
    before = _state(p, c)
    with pytest.raises(ValueError, match=r"blocks\[0\].cov holds 1 entry .* negative"):
        ops.kalman_update_([ops.DenseBlock(p, c, torch.randn(2, 5))], torch.randn(2), 0.1,
                           backend=backend)
    with pytest.raises(ValueError, match=r"covs\[0\] holds 1 entry"):
        ops.loss_update_([p], [torch.randn(5)], [c], 1.0, 0.1, backend=backend)
    c[1] = float("nan")
    with pytest.raises(ValueError, match=r"covs\[0\] holds"):
        ops.loss_update_([p], [torch.randn(5)], [c], 1.0, 0.1, backend=backend)
    assert torch.equal(bits(p), before[0])
    # checked once per tensor version: a valid tensor edited in place is checked again
    good = torch.full((5,), 0.1)
    ops.loss_update_([p], [torch.randn(5)], [good], 1.0, 0.1, backend=backend)
    good[3] = -2.0
    with pytest.raises(ValueError, match="negative"):
        ops.loss_update_([p], [torch.randn(5)], [good], 1.0, 0.1, backend=backend)
    # ... and through the optimizer
    model = nn.Linear(3, 2)
    opt = kk.KalmanNGD(model.parameters(), backend=backend)
    opt.step(lambda: model(torch.randn(2, 3)).sum())
    with torch.no_grad():
        opt.covariance(model.weight)[0, 0] = -1e-3
    with pytest.raises(ValueError, match=r"covariance of parameter 0 \(shape \(2, 3\)\)"):
        opt.step(lambda: model(torch.randn(2, 3)).sum())


@pytest.mark.parametrize("backend", BACKENDS)
def test_integer_tensors_are_named(backend):
    with pytest.raises(TypeError, match=r"params\[0\] must be a floating-point"):
        ops.loss_update_([torch.arange(5)], [torch.randn(5)], [torch.ones(5)], 1.0, 0.1,
                         backend=backend)
    with pytest.raises(TypeError, match=r"grads\[0\] must be a floating-point"):
        ops.loss_update_([torch.randn(5)], [torch.arange(5)], [torch.ones(5)], 1.0, 0.1,
                         backend=backend)
    with pytest.raises(TypeError, match="loss must be a floating-point"):
        ops.loss_update_([torch.randn(5)], [torch.randn(5)], [torch.ones(5)],
                         torch.tensor(3), 0.1, backend=backend)
    with pytest.raises(TypeError, match="DenseBlock.param must be a floating-point"):
        ops.DenseBlock(torch.arange(3), torch.ones(3), torch.randn(1, 3))
    with pytest.raises(TypeError, match="floating-point parameters"):
        kk.KalmanNGD([nn.Parameter(torch.arange(3.0)), torch.arange(3)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_aliased_tensors_are_refused_before_any_write(backend):
    t, c = torch.randn(5), torch.full((5,), 0.1)
    before = _state(t, c)
    with pytest.raises(ValueError, match=r"params\[1\] and params\[0\] share memory"):
        ops.loss_update_([t, t], [torch.randn(5)] * 2, [c, c.clone()], 1.0, 0.1,
                         backend=backend)
    with pytest.raises(ValueError, match=r"blocks\[0\].cov and blocks\[0\].param share memory"):
        ops.kalman_update_([ops.DenseBlock(t, t, torch.randn(2, 5))], torch.randn(2), 0.1,
                           backend=backend)
    buf = torch.randn(10)
    with pytest.raises(ValueError, match="share memory"):
        ops.loss_update_([buf[:6], buf[4:]], [torch.randn(6)] * 2,
                         [torch.full((6,), 0.1), torch.full((6,), 0.1)], 1.0, 0.1,
                         backend=backend)
    assert _unchanged(before, t, c)


@pytest.mark.parametrize("key, value, match", [
    ("lr", -1.0, "lr must be"), ("forgetting", 0.0, "forgetting must be in"),
    ("cov_floor", 10.0, "cov_floor"), ("cov_update", "ekf", "cov_update must be"),
    ("process_noise", float("nan"), "process_noise must be"),
])
def test_param_groups_edited_after_construction_are_checked_at_step(key, value, match):
    model = nn.Linear(3, 2)
    opt = kk.KalmanNGD(model.parameters(), cov_ceiling=1.0)
    opt.param_groups[0][key] = value
    before = _state(*model.parameters())
    with pytest.raises(ValueError, match=f"param group 0 \\(checked at every step\\): {match}"):
        opt.step(lambda: model(torch.randn(2, 3)).sum())
    assert _unchanged(before, *model.parameters()) and opt.steps_taken == 0


def test_loss_closure_that_reaches_no_parameter_is_refused():
    model, other = nn.Linear(3, 2), nn.Linear(3, 1)
    opt = kk.KalmanNGD(model.parameters())
    opt.step(lambda: model(torch.randn(2, 3)).sum())           # leaves no .grad (graph mode)
    for p in model.parameters():                               # stale gradients lying around
        p.grad = torch.ones_like(p)
    before = _state(*model.parameters())

    def detached():
        loss = other(torch.randn(2, 3)).sum()
        loss.backward()
        return loss.detach()

    def standard():
        opt.zero_grad(set_to_none=False)
        loss = other(torch.randn(2, 3)).sum()
        loss.backward()
        return loss

    with pytest.raises(ValueError, match="reached no parameter"):
        opt.step(detached)
    with pytest.raises(ValueError, match="does not depend on any parameter"):
        opt.step(standard)
    with pytest.raises(ValueError, match="does not depend on any parameter"):
        opt.step(lambda: other(torch.randn(2, 3)).sum())
    assert _unchanged(before, *model.parameters()) and opt.steps_taken == 1


def test_model_double_after_the_first_step_promotes_in_both_modes():
    for mode in ("loss", "batch"):
        model = nn.Linear(3, 2)
        opt = kk.KalmanNGD(model.parameters(), init_cov=0.1)
        opt.step(lambda: model(torch.randn(4, 3)).sum())
        saved = opt.covariance(model.weight).clone()
        model.double()
        x = torch.randn(4, 3, dtype=F64)
        with pytest.warns(RuntimeWarning, match="promoted to float64"):
            if mode == "loss":
                opt.step(lambda: model(x).pow(2).sum())
            else:
                opt.step(lambda: (model(x), torch.zeros(4, 2, dtype=F64)))
        cov = opt.covariance(model.weight)
        assert cov.dtype == F64 and opt.steps_taken == 2
        assert bool((cov <= saved.double()).all())          # the update used the old P


def test_two_element_loss_and_loss_pair_are_named():
    model = nn.Linear(3, 2)
    opt = kk.KalmanNGD(model.parameters())
    with pytest.raises(TypeError, match=r"loss of shape \(2,\).*the loss must be a scalar"):
        opt.step(lambda: model(torch.randn(1, 3)).reshape(-1))
    with pytest.raises(ValueError, match="return the loss tensor alone"):
        opt.step(lambda: (model(torch.randn(1, 3)).sum(), torch.tensor(1.0)))
    with pytest.raises(ValueError, match="loss must be a scalar"):
        ops.loss_update_([torch.randn(3)], [torch.randn(3)], [torch.ones(3)], torch.ones(2), 0.1)


def test_meta_model_runs_and_reading_values_says_why():
    model = nn.Linear(3, 2).to("meta")
    opt = kk.KalmanNGD(model.parameters()).track(model)        # default verify="first"
    x = torch.randn(4, 3, device="meta")
    opt.step(lambda: (model(x), torch.zeros(4, 2, device="meta")))
    opt.step(lambda: model(x).sum())
    with pytest.raises(RuntimeError, match="meta tensors, which hold no values"):
        _ = opt.last_info.mahalanobis       # reading the property is what raises
    with pytest.raises(RuntimeError, match="meta device, which holds no values"):
        _ = opt.skipped_steps
    with pytest.raises(RuntimeError, match="meta device"):
        opt.diagnostics()
    assert "meta" in repr(opt.last_info)


# ====================================================================== diagnostics
def test_p_value_is_the_chi_square_tail():
    from scipy.stats import chi2
    for dof in (1, 2, 7, 64, 1000):
        for x in (0.0, 0.3, dof * 0.5, float(dof), dof * 2.0 + 10, dof * 10.0 + 200):
            expected = chi2.sf(x, dof)
            got = _common.chi2_sf(x, dof)
            assert got == pytest.approx(expected, rel=1e-9, abs=1e-300), (dof, x)


def test_diagnostics_counters_are_driven():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = kk.KalmanNGD(model.parameters(), init_cov=1.0, obs_noise=0.05, gate=0.99,
                       cov_floor=0.3, adaptive_obs_noise=0.2)
    x = torch.randn(8, 4)
    opt.step(lambda: (model(x), model(x).detach() + 0.1 * torch.randn(8, 3)))
    d = opt.diagnostics()
    assert d["steps"] == 1 and d["skipped_steps"] == 0 and d["gated_steps"] == 0
    info = opt.last_info
    assert d["mahalanobis"] == info.mahalanobis and d["num_obs"] == 24
    assert d["p_value"] == pytest.approx(_common.chi2_sf(info.mahalanobis, 24))
    assert d["obs_noise"] != 0.05                                   # adapted
    # an outlier batch: gated
    opt.step(lambda: (model(x), model(x).detach() + 100.0))
    assert opt.last_info.gated and opt.diagnostics()["gated_steps"] == 1
    assert opt.last_info.p_value < 1e-10
    # a non-finite batch: skipped
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step(lambda: (model(x), torch.full((8, 3), float("nan"))))
    d = opt.diagnostics()
    assert d["skipped_steps"] == 1 and d["skipped"] and d["p_value"] != d["p_value"]
    # the floor (0.3) is reached by strongly observed weights
    for _ in range(5):
        opt.step(lambda: (model(x), model(x).detach()))
    d = opt.diagnostics()
    covs = torch.cat([opt.covariance(p).reshape(-1) for p in model.parameters()]).double()
    at_floor = int((covs <= float(torch.tensor(0.3, dtype=torch.float32))).sum())
    assert d["floor_clamped"] == at_floor > 0
    g = d["groups"][0]
    assert g["numel"] == 15 and g["cov_min"] == pytest.approx(float(covs.min()))
    assert g["cov_max"] == pytest.approx(float(covs.max()))
    assert g["cov_mean"] == pytest.approx(float(covs.mean()))
    assert d["cov_clamps"] == 0 and opt.last_info.cov_clamps is None   # single process


# ====================================================================== memory guard
def test_huge_batch_raises_memory_error_before_allocating(monkeypatch):
    """m * K = 20,000 observations: S alone would be 3.2 GB (x6 for the factor, L^-1 ...).
    The guard compares with the memory available (pinned here to 8 GiB so the test does not
    depend on the machine) and raises before any m x m matrix exists."""
    monkeypatch.setattr(_common, "available_bytes", lambda device: 8 << 30)
    model = nn.Linear(8, 100)
    opt = kk.KalmanNGD(model.parameters()).track(model)
    x = torch.randn(200, 8)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(MemoryError, match=r"m = 20000 .* GiB .*max_obs_per_update"):
        opt.step(lambda: (model(x), torch.zeros(200, 100)))
    with pytest.raises(MemoryError, match="m = 30000"):
        ops.kalman_update_([ops.DenseBlock(torch.zeros(1), torch.ones(1), torch.ones(30000, 1))],
                           torch.zeros(30000), 1.0)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss      # KiB
    assert grown < 1 << 20                                  # far less than one S (3.2 GB)
    assert opt.steps_taken == 0


def test_workspace_estimate_counts_the_m_by_m_matrices():
    m = 10_000
    assert _common.workspace_bytes(m) == 6 * 8 * m * m
    assert _common.workspace_bytes(m, 100, batched_ladder=True) == 8 * (12 * m * m + 3 * m * 100)


# ====================================================================== sub-batches
@pytest.mark.parametrize("backend", BACKENDS)
def test_sub_batches_equal_one_batch_where_the_diagonal_filter_is_exact(backend, rng):
    """H with one non-zero per row and column (exact case 2 of docs/design.md, 5): the diagonal
    filter is the exact
    posterior, so sequential sub-batches equal one batch update, predict step included."""
    n, m = 40, 24
    jac = torch.zeros(m, n, dtype=F64)
    cols = rng.choice(n, size=m, replace=False)
    jac[np.arange(m), cols] = torch.tensor(rng.uniform(0.5, 2.0, m))
    e = torch.tensor(rng.standard_normal(m))
    r = torch.tensor(rng.uniform(0.1, 0.5, m))
    mu0, p0 = torch.tensor(rng.standard_normal(n)), torch.tensor(rng.uniform(0.1, 2.0, n))
    kw = dict(lr=1.0, forgetting=0.95, process_noise=1e-3, backend=backend)
    mu_a, p_a = mu0.clone(), p0.clone()
    ops.kalman_update_([ops.DenseBlock(mu_a, p_a, jac)], e, r, **kw)
    mu_b, p_b = mu0.clone(), p0.clone()
    info = ops.kalman_update_([ops.DenseBlock(mu_b, p_b, jac)], e, r, max_obs_per_update=5, **kw)
    assert info.extras["sub_batches"] == 5 and not info.skipped
    assert rel_err(mu_b, mu_a) <= 1e-12 and rel_err(p_b, p_a) <= 1e-12


def test_sub_batches_of_a_full_covariance_equal_one_batch(rng):
    """The identity behind the residual correction: with a full covariance, sequential
    sub-batches whose residuals are corrected by -H_k (mu - mu_0) equal one batch."""
    from kalman_kernels.reference import full_cov_update
    n, m = 6, 12
    h = torch.tensor(rng.standard_normal((m, n)))
    e = torch.tensor(rng.standard_normal(m))
    mu0, sigma0 = torch.zeros(n, dtype=F64), torch.diag(torch.tensor(rng.uniform(0.2, 1, n)))
    r = torch.tensor(0.3, dtype=F64)
    mu_a, sig_a = full_cov_update(mu0, sigma0, h, e, r)
    mu_b, sig_b = mu0, sigma0
    for lo in range(0, m, 4):
        e_k = e[lo:lo + 4] - h[lo:lo + 4] @ (mu_b - mu0)
        mu_b, sig_b = full_cov_update(mu_b, sig_b, h[lo:lo + 4], e_k, r)
    assert rel_err(mu_b, mu_a) <= 1e-10 and rel_err(sig_b, sig_a) <= 1e-10


@pytest.mark.parametrize("backend", BACKENDS)
def test_sub_batches_differ_slightly_with_a_diagonal_covariance(backend, rng):
    """Linear regression (n = 20, m = 512 in sub-batches of 64): the diagonal filter's
    sequential result differs from the one-batch result by a few percent of the step
    (docs/robustness.md gives the measured figures); both reduce the error."""
    n, m = 20, 512
    x = torch.tensor(rng.standard_normal((m, n)))
    w = torch.tensor(rng.standard_normal(n))
    y = x @ w + 0.1 * torch.tensor(rng.standard_normal(m))
    mu_a, p_a = torch.zeros(n, dtype=F64), torch.ones(n, dtype=F64)
    mu_b, p_b = mu_a.clone(), p_a.clone()
    ops.kalman_update_([ops.DenseBlock(mu_a, p_a, x)], y, 0.01, backend=backend)
    ops.kalman_update_([ops.DenseBlock(mu_b, p_b, x)], y, 0.01, backend=backend,
                       max_obs_per_update=64)
    diff = float((mu_b - mu_a).norm() / mu_a.norm())
    assert 0 < diff < 0.2
    assert float((mu_b - w).norm()) < 0.5 * float(w.norm())
    assert float((mu_a - w).norm()) < 0.5 * float(w.norm())


@pytest.mark.parametrize("backend", BACKENDS)
def test_sub_batches_cut_on_samples_and_skip_all_on_nan(backend, rng):
    w, c = torch.randn(3, 5, dtype=F64), torch.full((3, 5), 0.2, dtype=F64)
    a, d = torch.randn(6, 5, dtype=F64), torch.randn(6, 3, 3, dtype=F64)   # B = 6, K = 3
    e = torch.randn(18, dtype=F64)
    info = ops.kalman_update_([ops.KronBlock(w, c, a, d)], e, 0.5, backend=backend,
                              max_obs_per_update=7)        # 2 samples (6 observations) each
    assert info.extras["sub_batches"] == 3 and not info.skipped
    with pytest.raises(ValueError, match="smaller than one sample's 3 observations"):
        ops.kalman_update_([ops.KronBlock(w, c, a, d)], e, 0.5, backend=backend,
                           max_obs_per_update=2)
    with pytest.raises(ValueError, match="couples the observations"):
        ops.kalman_update_([ops.KronBlock(w, c, a, d)], e, torch.eye(18, dtype=F64),
                           backend=backend, max_obs_per_update=6)
    before = _state(w, c)
    e[-1] = float("nan")                                   # in the last sub-batch only
    with pytest.warns(RuntimeWarning, match="skipped"):
        info = ops.kalman_update_([ops.KronBlock(w, c, a, d)], e, 0.5, backend=backend,
                                  max_obs_per_update=6)
    assert info.skipped and _unchanged(before, w, c)


def test_optimizer_max_obs_per_update_equals_the_functional_sub_batches(rng):
    torch.manual_seed(0)
    model = nn.Linear(5, 4).double()
    twin = copy.deepcopy(model)
    opt = kk.KalmanNGD(model.parameters(), init_cov=0.1, obs_noise=0.2, forgetting=0.99,
                       max_obs_per_update=8).track(model)
    x = torch.tensor(rng.standard_normal((10, 5)))
    t = torch.tensor(rng.standard_normal((10, 4)))
    opt.step(lambda: (model(x), t))
    assert opt.last_info.extras["sub_batches"] == 5           # 2 samples x 4 scores each
    wc, bc = torch.full((4, 5), 0.1, dtype=F64), torch.full((4,), 0.1, dtype=F64)
    e = (t - twin(x)).detach().reshape(-1)
    d = torch.eye(4, dtype=F64).expand(10, 4, 4).contiguous()
    with torch.no_grad():
        ops.kalman_update_([ops.KronBlock(twin.weight, wc, x, d),
                            ops.DenseBlock(twin.bias, bc, d.reshape(40, 4))], e, 0.2,
                           forgetting=0.99, cov_floor=1e-12, max_obs_per_update=8)
    assert rel_err(model.weight, twin.weight) <= 1e-12 and rel_err(model.bias, twin.bias) <= 1e-12
    assert rel_err(opt.covariance(model.weight), wc) <= 1e-12
    with pytest.raises(ValueError, match="max_obs_per_update must be"):
        kk.KalmanNGD(model.parameters(), max_obs_per_update=0)


def test_memory_guard_counts_the_reference_kronecker_temporaries(monkeypatch):
    """40 samples x 100 classes of a (100, 8) weight on the reference backend: the guard adds
    that backend's Kronecker temporaries (Q and one sample's products) to the m x m work and
    refuses a step that would not fit; sequential sub-batches fit."""
    monkeypatch.setattr(_common, "available_bytes", lambda device: 512 << 20)
    w, c = torch.zeros(100, 8), torch.full((100, 8), 0.1)
    block = ops.KronBlock(w, c, torch.randn(40, 8), torch.randn(40, 100, 100))
    extra = _common.reference_kron_bytes(40, 100, 100)
    assert 0 < extra < _common.workspace_bytes(4000)
    with pytest.raises(MemoryError, match="backend temporaries"):
        ops.kalman_update_([block], torch.zeros(4000), 1.0, backend="reference")
    info = ops.kalman_update_([block], torch.zeros(4000), 1.0, backend="reference",
                              max_obs_per_update=200)          # 2 samples per sub-batch
    assert info.extras["sub_batches"] == 20 and not info.skipped