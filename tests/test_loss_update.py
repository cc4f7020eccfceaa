"""Loss-observation mode (DESIGN 2.2) against the m = 1 full-matrix oracle."""
import numpy as np
import pytest
import torch

import kalman_kernels as kk
from kalman_kernels import ops
from conftest import rel_err
from oracle_numpy import loss_step

CPU_BACKENDS = [name for name, ok in kk.backends().items() if ok and name in ("reference", "cpp")]
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rule", ["kalman", "information"])
def test_loss_update_matches_oracle(rng, backend, dtype, rule):
    shapes = [(7, 3), (1,), (33,), (2, 2, 5)]
    cov_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    params = [torch.tensor(rng.standard_normal(s), dtype=dtype) for s in shapes]
    grads = [torch.tensor(rng.standard_normal(s), dtype=dtype) for s in shapes]
    covs = [torch.tensor(rng.uniform(0.01, 0.2, s), dtype=cov_dtype) for s in shapes]
    flat = lambda ts: np.concatenate([t.double().reshape(-1).numpy() for t in ts])
    mu0, g, p0 = flat(params), flat(grads), flat(covs)
    loss, r, lr, lam, q = rng.uniform(0.5, 2.0), rng.uniform(0.1, 1.0), 0.7, 0.95, 1e-3
    mu_exp, p_exp, s_exp, d2_exp = loss_step(mu0, p0, g, loss, r, lr=lr, lam=lam, q=q,
                                             p_min=1e-4, rule=rule)
    info = ops.loss_update_(params, grads, covs, loss, r, lr=lr, forgetting=lam,
                            process_noise=q, cov_floor=1e-4, cov_update=rule, backend=backend)
    assert not info.skipped
    red_tol = {torch.float64: 1e-10, torch.float32: 1e-4}.get(dtype, 1e-2)
    assert float(info.innovation_cov) == pytest.approx(float(s_exp.item()), rel=red_tol)
    assert info.mahalanobis == pytest.approx(d2_exp, rel=red_tol)
    assert rel_err(flat(params), mu_exp) <= TOL[dtype]
    assert rel_err(flat(covs), p_exp) <= max(TOL[dtype], 1e-5 if cov_dtype == torch.float32 else 0)
    # The step decreases the loss to first order: it moves against the gradient.
    assert float(np.dot(flat(params) - mu0, g)) < 0


def test_loss_update_nonfinite_gradient_skips_bitwise():
    params = [torch.randn(5)]
    covs = [torch.full((5,), 0.1)]
    grads = [torch.tensor([1.0, float("nan"), 0.0, 1.0, 2.0])]
    p0, c0 = params[0].clone(), covs[0].clone()
    with pytest.warns(RuntimeWarning, match="skipped"):
        info = ops.loss_update_(params, grads, covs, 1.0, 0.1)
    assert info.skipped
    assert torch.equal(params[0], p0) and torch.equal(covs[0], c0)


def test_loss_update_bad_inputs():
    p, g, c = [torch.randn(3)], [torch.randn(4)], [torch.ones(3)]
    with pytest.raises(ValueError, match="grads\\[0\\]"):
        ops.loss_update_(p, g, c, 1.0, 0.1)
    with pytest.raises(ValueError, match="obs_noise"):
        ops.loss_update_(p, [torch.randn(3)], c, 1.0, -0.1)
    with pytest.raises(ValueError, match="lr"):
        ops.loss_update_(p, [torch.randn(3)], c, 1.0, 0.1, lr=-1.0)
