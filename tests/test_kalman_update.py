"""kalman_update_ (batch observations) against the independent NumPy oracle."""
import math

import numpy as np
import pytest
import torch

import kalman_kernels as kk
from conftest import rel_err
from kalman_kernels import ops
from oracle_numpy import kalman_step, kron_rows

CPU_BACKENDS = [name for name, ok in kk.backends().items() if ok and name in ("reference", "cpp")]

TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def _cov_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _random_problem(rng, shapes, m, dtype, kron=()):
    """Blocks with fresh random values; `kron` lists the indices that are Kronecker blocks."""
    blocks, h_cols, mus, ps = [], [], [], []
    for i, shape in enumerate(shapes):
        param = torch.tensor(rng.standard_normal(shape), dtype=dtype)
        cov = torch.tensor(rng.uniform(0.05, 1.0, shape), dtype=_cov_dtype(dtype))
        if i in kron:
            d_out, d_in = shape
            a = torch.tensor(rng.standard_normal((m, d_in)), dtype=dtype)
            d = torch.tensor(rng.standard_normal((m, d_out)), dtype=dtype)
            blocks.append(ops.KronBlock(param, cov, a, d))
            h_cols.append(kron_rows(a.double().numpy(), d.double().numpy()))
        else:
            jac = torch.tensor(rng.standard_normal((m,) + tuple(shape)), dtype=dtype)
            blocks.append(ops.DenseBlock(param, cov, jac))
            h_cols.append(jac.double().reshape(m, -1).numpy())
        mus.append(param.double().reshape(-1).numpy())
        ps.append(cov.double().reshape(-1).numpy())
    return blocks, np.concatenate(h_cols, 1), np.concatenate(mus), np.concatenate(ps)


def _split(flat, blocks):
    out, offset = [], 0
    for b in blocks:
        n = b.param.numel()
        out.append(flat[offset:offset + n])
        offset += n
    return out


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 17])
def test_matches_full_matrix_oracle(rng, backend, dtype, m):
    shapes = [(5, 7), (13,), (3, 3, 2)]
    blocks, h, mu, p = _random_problem(rng, shapes, m, dtype, kron=(0,))
    e_t = torch.tensor(rng.standard_normal(m), dtype=dtype)
    e = e_t.double().numpy()              # the oracle sees exactly the stored inputs
    r = rng.uniform(0.1, 1.0)
    lr, lam, q = rng.uniform(0.3, 1.0), rng.uniform(0.8, 1.0), rng.uniform(0.0, 0.05)
    mu_exp, p_exp, s_exp, d2_exp, _ = kalman_step(mu, p, h, e, r, lr=lr, lam=lam, q=q)
    info = ops.kalman_update_(blocks, e_t, r, lr=lr, forgetting=lam,
                              process_noise=q, backend=backend)
    assert not info.skipped
    tol = TOL[dtype]
    # S and d2 are reductions over n: the reduction tolerance (docs/design.md, 5).
    red_tol = {torch.float64: 1e-10, torch.float32: 1e-4}.get(dtype, 1e-2)
    assert rel_err(info.innovation_cov, s_exp) <= red_tol
    assert abs(info.mahalanobis - d2_exp) <= red_tol * d2_exp
    for b, mu_b, p_b, mu0 in zip(blocks, _split(mu_exp, blocks), _split(p_exp, blocks),
                                 _split(mu, blocks)):
        # Every element was written: the step moves every mean and shrinks every variance.
        assert rel_err(b.param, mu_b) <= tol
        assert rel_err(b.cov, p_b) <= max(tol, 1e-5) if b.cov.dtype == torch.float32 else \
            rel_err(b.cov, p_b) <= tol
        if dtype == torch.float64:
            assert rel_err(b.param.double().reshape(-1).numpy() - mu0, mu_b - mu0) <= 1e-9


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("noise_kind", ["scalar", "diag", "full"])
@pytest.mark.parametrize("rule", ["kalman", "information"])
def test_noise_forms_and_rules(rng, backend, noise_kind, rule):
    m = 6
    blocks, h, mu, p = _random_problem(rng, [(4, 9), (11,)], m, torch.float64, kron=(0,))
    e = rng.standard_normal(m)
    if noise_kind == "scalar":
        r_np = rng.uniform(0.1, 1.0)
        r_t = r_np
    elif noise_kind == "diag":
        r_np = rng.uniform(0.1, 1.0, m)
        r_t = torch.tensor(r_np)
    else:
        x = rng.standard_normal((m, m))
        r_np = x @ x.T / m + 0.2 * np.eye(m)
        r_t = torch.tensor(r_np)
    p_min, p_max = 0.02, 0.6        # both bounds active for some elements
    mu_exp, p_exp, _, _, _ = kalman_step(mu, p, h, e, r_np, p_min=p_min, p_max=p_max, rule=rule)
    ops.kalman_update_(blocks, torch.tensor(e), r_t, cov_floor=p_min, cov_ceiling=p_max,
                       cov_update=rule, backend=backend)
    got_mu = np.concatenate([b.param.reshape(-1).numpy() for b in blocks])
    got_p = np.concatenate([b.cov.reshape(-1).numpy() for b in blocks])
    assert rel_err(got_mu, mu_exp) <= 1e-10
    assert rel_err(got_p, p_exp) <= 1e-10
    assert got_p.min() >= p_min and got_p.max() <= p_max


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gate_shrinks_outlier_step(rng, backend):
    from scipy.stats import chi2
    m = 4
    blocks, h, mu, p = _random_problem(rng, [(20,)], m, torch.float64)
    e = 100.0 * rng.standard_normal(m)                     # far beyond the 0.99 quantile
    mu_exp, p_exp, _, d2, s = kalman_step(mu, p, h, e, 0.1, gate=0.99)
    info = ops.kalman_update_(blocks, torch.tensor(e), 0.1, gate=0.99, backend=backend)
    assert s < 1.0
    assert info.gate_scale == pytest.approx(math.sqrt(chi2.ppf(0.99, m) / d2), rel=1e-9)
    assert rel_err(blocks[0].param, mu_exp) <= 1e-10
    assert rel_err(blocks[0].cov, p_exp) <= 1e-10   # the gate scales the mean step only


def test_kron_block_equals_dense_block_of_outer_products(rng):
    m, d_out, d_in = 5, 6, 4
    w = torch.tensor(rng.standard_normal((d_out, d_in)))
    cov = torch.tensor(rng.uniform(0.1, 1.0, (d_out, d_in)))
    a = torch.tensor(rng.standard_normal((m, d_in)))
    d = torch.tensor(rng.standard_normal((m, d_out)))
    jac = torch.einsum("jo,ji->joi", d, a)          # row j is D_j A_j^T
    e = torch.tensor(rng.standard_normal(m))
    w2, cov2 = w.clone(), cov.clone()
    i1 = ops.kalman_update_([ops.KronBlock(w, cov, a, d)], e, 0.3, backend="reference")
    i2 = ops.kalman_update_([ops.DenseBlock(w2, cov2, jac)], e, 0.3, backend="reference")
    assert rel_err(i1.innovation_cov, i2.innovation_cov) <= 1e-12
    assert rel_err(w, w2) <= 1e-12 and rel_err(cov, cov2) <= 1e-12


def test_exact_case_one_parameter_per_observation(rng):
    """Exact case 2 (docs/design.md, 5): H with one non-zero per row and column keeps the
    diagonal filter exact."""
    from kalman_kernels.reference import full_cov_update
    n, m, steps = 40, 8, 30
    mu = torch.tensor(rng.standard_normal(n))
    cov = torch.tensor(rng.uniform(0.1, 2.0, n))
    mu_full, sigma_full = mu.clone(), torch.diag(cov.clone())
    for _ in range(steps):
        touched = rng.choice(n, size=m, replace=False)
        jac = torch.zeros(m, n, dtype=torch.float64)
        jac[np.arange(m), touched] = torch.tensor(rng.uniform(0.5, 2.0, m) * rng.choice([-1, 1], m))
        e = torch.tensor(rng.standard_normal(m))
        r = torch.tensor(rng.uniform(0.05, 0.5, m))
        mu_full, sigma_full = full_cov_update(mu_full, sigma_full, jac, e, r, 0.95, 1e-3)
        ops.kalman_update_([ops.DenseBlock(mu, cov, jac)], e, r, forgetting=0.95,
                           process_noise=1e-3, backend="reference")
    off_diag = sigma_full - torch.diag(torch.diagonal(sigma_full))
    assert float(off_diag.abs().max()) <= 1e-12
    assert rel_err(mu, mu_full) <= 1e-10
    assert rel_err(cov, torch.diagonal(sigma_full)) <= 1e-10


def test_non_finite_observation_skips_and_leaves_state_bitwise(rng):
    blocks, _, _, _ = _random_problem(rng, [(6, 5), (7,)], 3, torch.float32, kron=(0,))
    before = [(b.param.clone(), b.cov.clone()) for b in blocks]
    for bad in ("residual", "jac", "inputs"):
        e = torch.tensor(rng.standard_normal(3), dtype=torch.float32)
        saved = None
        if bad == "residual":
            e[1] = float("nan")
        elif bad == "jac":
            saved = blocks[1].jac.clone()
            blocks[1].jac[2, 3] = float("inf")
        else:
            saved = blocks[0].inputs.clone()
            blocks[0].inputs[0, 0] = float("nan")
        with pytest.warns(RuntimeWarning, match="skipped"):
            info = ops.kalman_update_(blocks, e, 0.1)
        assert info.skipped and info.reason
        for b, (p0, c0) in zip(blocks, before):
            assert torch.equal(b.param, p0) and torch.equal(b.cov, c0)
        if bad == "jac":
            blocks[1].jac.copy_(saved)
        elif bad == "inputs":
            blocks[0].inputs.copy_(saved)


def test_jitter_ladder_rescues_singular_innovation():
    # Two identical observations of one parameter with (numerically) no noise: S singular.
    param = torch.tensor([0.5], dtype=torch.float64)
    cov = torch.tensor([1.0], dtype=torch.float64)
    jac = torch.ones(2, 1, dtype=torch.float64)
    info = ops.kalman_update_([ops.DenseBlock(param, cov, jac)],
                              torch.tensor([1.0, 1.0], dtype=torch.float64), 1e-300)
    assert not info.skipped and info.jitter > 0
    assert torch.isfinite(param).all() and torch.isfinite(cov).all()


@pytest.mark.parametrize("case, exc, match", [
    ("jac_shape", ValueError, "jac must have shape"),
    ("cov_shape", ValueError, "cov has shape"),
    ("cov_dtype", TypeError, "cov must be float32 or float64"),
    ("residual_len", ValueError, "observation rows"),
    ("residual_dim", ValueError, "residual must be a 1-D"),
    ("noise_neg", ValueError, "obs_noise must be"),
    ("noise_zero", ValueError, "obs_noise must be"),
    ("noise_shape", ValueError, "obs_noise must be"),
    ("noise_not_pd", ValueError, "positive definite"),
    ("lr", ValueError, "lr must be"),
    ("forgetting", ValueError, "forgetting must be in"),
    ("process_noise", ValueError, "process_noise must be"),
    ("floor_ceiling", ValueError, "cov_floor"),
    ("rule", ValueError, "cov_update must be"),
    ("gate", ValueError, "gate must be"),
    ("device", ValueError, "device"),
    ("backend", ValueError, "backend must be one of"),
    ("single_block", TypeError, "list"),
    ("kron_inputs", ValueError, "inputs must have shape"),
    ("duplicate", ValueError, "share memory"),
])
def test_bad_input_is_named_and_state_unchanged(case, exc, match):
    p = torch.randn(4, 3)
    c = torch.full((4, 3), 0.1)
    jac = torch.randn(2, 4, 3)
    e = torch.randn(2)
    kw = {}
    noise = 0.1
    p0, c0 = p.clone(), c.clone()

    def call():
        blocks = [ops.DenseBlock(p, c, jac)]
        res = e
        nonlocal noise
        if case == "jac_shape":
            blocks = [ops.DenseBlock(p, c, torch.randn(2, 3, 4))]
        elif case == "cov_shape":
            blocks = [ops.DenseBlock(p, torch.full((12,), 0.1), jac)]
        elif case == "cov_dtype":
            blocks = [ops.DenseBlock(p, c.half(), jac)]
        elif case == "residual_len":
            res = torch.randn(3)
        elif case == "residual_dim":
            res = torch.randn(2, 1)
        elif case == "noise_neg":
            noise = -1.0
        elif case == "noise_zero":
            noise = 0.0
        elif case == "noise_shape":
            noise = torch.ones(5)
        elif case == "noise_not_pd":
            noise = torch.tensor([[1.0, 2.0], [2.0, 1.0]])
        elif case == "lr":
            kw["lr"] = 0.0
        elif case == "forgetting":
            kw["forgetting"] = 1.5
        elif case == "process_noise":
            kw["process_noise"] = -0.1
        elif case == "floor_ceiling":
            kw.update(cov_floor=1.0, cov_ceiling=0.5)
        elif case == "rule":
            kw["cov_update"] = "joseph"
        elif case == "gate":
            kw["gate"] = 1.5
        elif case == "device":
            res = torch.randn(2, device="meta")
        elif case == "backend":
            kw["backend"] = "fortran"
        elif case == "single_block":
            blocks = blocks[0]
        elif case == "kron_inputs":
            blocks = [ops.KronBlock(p, c, torch.randn(2, 4), torch.randn(2, 4))]
        elif case == "duplicate":
            blocks = [ops.DenseBlock(p, c, jac), ops.DenseBlock(p, c, jac)]
        return ops.kalman_update_(blocks, res, noise, **kw)

    with pytest.raises(exc, match=match):
        call()
    assert torch.equal(p, p0) and torch.equal(c, c0)


def test_unavailable_backend_raises_with_reason():
    errors = kk.backend_errors()
    assert set(kk.backends()) == {"reference", "cpp", "triton", "cuda"}
    assert kk.backends()["reference"] is True
    p, c, jac = torch.randn(3), torch.full((3,), 0.1), torch.randn(1, 3)
    for name in ("triton", "cuda"):
        if name == "triton" and kk.backends()["triton"] and not torch.cuda.is_available():
            continue   # the test run's Triton interpreter serves CPU tensors (a test tool)
        # Triton/CUDA kernels run on GPU tensors only: on this CPU tensor the request must
        # fail loudly, with the reason (not built / wrong device), never fall back.
        with pytest.raises(RuntimeError, match=name):
            ops.kalman_update_([ops.DenseBlock(p, c, jac)], torch.randn(1), 0.1, backend=name)
        if not kk.backends()[name]:
            assert errors[name]


@pytest.mark.parametrize("forgetting, process_noise", [(1.0, 0.0), (0.9, 0.0), (1.0, 0.01)])
def test_effective_step_size_decays_like_one_over_t_unless_forgetting_or_noise(forgetting,
                                                                               process_noise):
    """One parameter observed directly (h = 1, r = 1): P_t^-1 = lam P_{t-1}^-1 + 1 (+ q)."""
    param = torch.zeros(1, dtype=torch.float64)
    cov = torch.full((1,), 100.0, dtype=torch.float64)
    p_inv = 1 / 100.0
    for _ in range(400):
        ops.kalman_update_([ops.DenseBlock(param, cov, torch.ones(1, 1, dtype=torch.float64))],
                           torch.ones(1, dtype=torch.float64) - param, 1.0,
                           forgetting=forgetting, process_noise=process_noise)
        p_inv = 1.0 / ((1.0 / p_inv) / forgetting + process_noise) + 1.0
        assert float(cov) == pytest.approx(1.0 / p_inv, rel=1e-12)
    if forgetting == 1.0 and process_noise == 0.0:
        assert float(cov) * 400 == pytest.approx(1.0, rel=1e-2)        # P_t ~ 1/t: freezes
    elif forgetting < 1.0:
        assert float(cov) == pytest.approx(1 - forgetting, rel=1e-9)   # P* = 1 - lam
    else:
        q = process_noise                                              # P* solves P = (P+q)/(P+q+1)
        assert float(cov) == pytest.approx((-q + math.sqrt(q * q + 4 * q)) / 2, rel=1e-6)
