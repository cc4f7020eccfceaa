"""Property-based tests of the step (docs/robustness.md), on every available backend.

Hypothesis draws random problems: shapes (m from 1 to 64 observations, parameter tensors
from 1 to 1e5 elements, one to three blocks, dense and sample-grouped Kronecker), scales of
H, e, P and R anywhere from 1e-8 to 1e8, both covariance rules, gate and adaptive noise on
or off, floors and ceilings, float32 / bfloat16 / float64 parameters, and NaN / Inf
injected at random positions. After every step, either

* the step was applied: all state is finite, P lies in [cov_floor, cov_ceiling] (up to the
  storage dtype's rounding of the bounds), and the state equals the float64 reference's
  (backend "reference" on float64 copies of the same stored inputs) within the tolerances of
  docs/design.md, 5, each element's error measured against the magnitude of the terms it is made
  of (as tests/op_checks.py does: the Kalman covariance update cancels where an observation
  pins a parameter, and a float32 kernel cannot do better than that); or
* the step was skipped, and every parameter and covariance is bit-for-bit unchanged.

The skip decision must agree with the reference's (an injected NaN / Inf always skips).
Where S is so ill-conditioned that a backend computing in float32 cannot be expected to
reproduce the float64 answer (condition number x unit roundoff > 1e-3), only the first
part (finite, in bounds, or skipped and unchanged) is asserted.

Default profile ("kalman", registered in tests/conftest.py): a few hundred examples in
the normal test run; ``pytest --hypothesis-profile=long tests/test_property.py`` runs
thousands.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import event, given, note
from hypothesis import strategies as st

from kalman_kernels import ops
from kalman_kernels.ops import DenseBlock, KronBlock, StepHyper
from op_checks import bits
from step_backends import step_backends

F64 = torch.float64


BACKENDS = step_backends()
#: per-element work the Triton interpreter can afford per example
SMALL = {"triton"}
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2}
RED_TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 1e-2}
UNIT = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -24}


def _cov_dtype(dtype):
    return F64 if dtype == F64 else torch.float32


def _log_uniform(draw, lo_exp, hi_exp):
    """10^x, x spread over [lo_exp, hi_exp]: an integer decade (hypothesis spreads integers
    evenly) plus a fraction."""
    decade = draw(st.integers(math.floor(lo_exp), max(math.floor(lo_exp), math.ceil(hi_exp) - 1)))
    return min(10.0 ** hi_exp, 10.0 ** (decade + draw(st.floats(0.0, 1.0))))


@st.composite
def problems(draw):
    backend = draw(st.sampled_from(BACKENDS))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float64]))
    small = backend in SMALL                 # the Triton interpreter: ~1e6 elements/s
    budget = 2_000 if small else 100_000
    n_blocks = draw(st.integers(1, 3))
    kinds = [draw(st.sampled_from(["dense", "kron"])) for _ in range(n_blocks)]
    k_cls = draw(st.integers(1, 4))
    batch = draw(st.integers(1, (16 if small else 64) // k_cls))
    m = batch * k_cls
    shapes = []
    remaining = budget
    for kind in kinds:
        if kind == "dense":
            cap = max(1, min(remaining, 1_000_000 // (m * n_blocks)))
            numel = int(round(_log_uniform(draw, 0, math.log10(cap))))
            numel = max(1, min(numel, cap))
            shapes.append(("dense", (numel,) if draw(st.booleans()) else (1, numel)))
        else:
            cap = max(1, min(remaining, 60_000))
            d_out = max(1, min(cap, 300,
                               int(round(_log_uniform(draw, 0, math.log10(min(cap, 300)))))))
            d_in = max(1, min(cap // d_out, int(round(_log_uniform(draw, 0, 3)))))
            shapes.append(("kron", (d_out, d_in)))
        remaining = max(1, remaining - int(np.prod(shapes[-1][1])))
    scales = {k: _log_uniform(draw, -8, 8) for k in ("H", "e", "P", "R")}
    rule = draw(st.sampled_from(["kalman", "information"]))
    noise_form = draw(st.sampled_from(["scalar", "diag", "full"]))
    adaptive = draw(st.sampled_from([0.0, 0.3])) if noise_form == "scalar" else 0.0
    gate = draw(st.sampled_from([None, 0.99]))
    forgetting = draw(st.sampled_from([1.0, 0.9]))
    q = draw(st.sampled_from([0.0, 1e-3])) * scales["P"]
    floor = draw(st.sampled_from([0.0, 1e-6])) * scales["P"]
    ceiling = draw(st.sampled_from([math.inf, 10.0])) * scales["P"]
    lr = draw(st.sampled_from([1.0, 0.5]))
    inject = draw(st.sampled_from([None, None, None, "nan", "inf", "-inf"]))
    steps = draw(st.integers(1, 2))
    seed = draw(st.integers(0, 2 ** 32 - 1))
    return dict(backend=backend, dtype=dtype, kinds=kinds, shapes=shapes, k_cls=k_cls,
                batch=batch, m=m, scales=scales, rule=rule, noise_form=noise_form,
                adaptive=adaptive, gate=gate, hyper=StepHyper(lr, forgetting, q, floor, ceiling,
                                                              rule == "information"),
                inject=inject, steps=steps, seed=seed)


def _observation(p, rng, blocks_state):
    """Fresh random Jacobians (H scale), residual (e scale) and noise (R scale)."""
    dtype, m, sc = p["dtype"], p["m"], p["scales"]
    blocks = []
    for (kind, shape), (param, cov) in zip(p["shapes"], blocks_state):
        if kind == "dense":
            jac = torch.tensor(rng.standard_normal((m,) + shape) * sc["H"]).to(dtype)
            blocks.append(DenseBlock(param, cov, jac))
        else:
            d_out, d_in = shape
            # sqrt of the scale on each factor: the Jacobian rows D A^T carry sc["H"]
            root = math.sqrt(sc["H"])
            a = torch.tensor(rng.standard_normal((p["batch"], d_in)) * root).to(dtype)
            d = torch.tensor(rng.standard_normal((p["batch"], p["k_cls"], d_out)) * root).to(dtype)
            blocks.append(KronBlock(param, cov, a, d))
    e = torch.tensor(rng.standard_normal(m) * sc["e"]).to(dtype)
    if p["noise_form"] == "scalar":
        r = torch.tensor(sc["R"] * rng.uniform(0.5, 2.0), dtype=F64)
    elif p["noise_form"] == "diag":
        r = torch.tensor(sc["R"] * rng.uniform(0.5, 2.0, m), dtype=F64)
    else:
        x = rng.standard_normal((m, m))
        r = torch.tensor(sc["R"] * (x @ x.T / m + 0.5 * np.eye(m)), dtype=F64)
    if p["inject"] is not None:
        value = {"nan": float("nan"), "inf": float("inf"), "-inf": -float("inf")}[p["inject"]]
        targets = [("residual", e)]
        for b in blocks:
            targets += ([("jac", b.jac)] if isinstance(b, DenseBlock)
                        else [("inputs", b.inputs), ("grad_outputs", b.grad_outputs)])
        name, t = targets[rng.integers(len(targets))]
        t.view(-1)[rng.integers(t.numel())] = value
        note(f"injected {p['inject']} into {name}")
    return blocks, e, r


def _as64(blocks, e, r):
    out = []
    for b in blocks:
        if isinstance(b, DenseBlock):
            out.append(DenseBlock(b.param.to(F64, copy=True), b.cov.to(F64, copy=True),
                                  b.jac.to(F64)))
        else:
            out.append(KronBlock(b.weight.to(F64, copy=True), b.cov.to(F64, copy=True),
                                 b.inputs.to(F64), b.grad_outputs.to(F64)))
    return out, e.to(F64), r.clone()


def _term_scales(pre, blocks, oracle, hp, e):
    """Per element, the magnitude of the terms each new value is made of (docs/design.md, 5 measures
    errors against it, as tests/op_checks.py does): for mu_i, |mu_i| + P-_i sum_j |H_ji c_j|;
    for P_i under the Kalman rule, P-_i + P-_i^2 sum_l (sum_j |F_lj H_ji|)^2 (the update
    cancels where an observation pins a parameter); under the information rule, the new P_i
    itself (no cancellation). c = lr s S^-1 e and F = L^-1 from the reference's S."""
    s_mat = oracle.innovation_cov
    factor = torch.linalg.cholesky(s_mat)
    solved = torch.cholesky_solve(e.reshape(-1, 1), factor).reshape(-1)
    c = (hp.lr * oracle.gate_scale * solved).abs()
    f_abs = torch.linalg.solve_triangular(factor, torch.eye(len(e), dtype=F64), upper=False).abs()
    out = []
    for (mu0, p0), b in zip(pre, blocks):
        p_pred = p0 / hp.forgetting + hp.process_noise
        if isinstance(b, DenseBlock):
            h = b.jac.to(F64).reshape(len(e), -1).abs()
            step_terms = (c @ h).reshape(p0.shape)
            diag_abs = ((f_abs @ h) ** 2).sum(0).reshape(p0.shape)
        else:
            a = b.inputs.to(F64).abs()
            d = b.grouped_grad_outputs.to(F64).abs()
            batch, k = d.shape[0], d.shape[1]
            step_terms = torch.einsum("jk,jko,ji->oi", c.reshape(batch, k), d, a)
            g = torch.einsum("ljk,jko->ljo", f_abs.reshape(-1, batch, k), d)
            diag_abs = (torch.einsum("ljo,ji->loi", g, a) ** 2).sum(0)
        mu_scale = mu0.abs() + p_pred * step_terms
        cov_scale = (b.cov.to(F64).abs() if hp.information
                     else p_pred + p_pred * p_pred * diag_abs)
        out.append((mu_scale, cov_scale))
    return out


def _scaled_err(actual, expected, scale):
    a, b = actual.detach().to(F64).reshape(-1), expected.detach().to(F64).reshape(-1)
    return float(((a - b).abs() / scale.reshape(-1).clamp_min(1e-300)).max()) if a.numel() else 0.0


def _check_bounds(cov, hp, dtype):
    eps = torch.finfo(dtype).eps
    c = cov.to(F64)
    assert bool(torch.isfinite(c).all()), "non-finite covariance"
    assert float(c.min()) >= hp.cov_floor * (1 - 2 * eps), (float(c.min()), hp.cov_floor)
    assert float(c.max()) <= hp.cov_ceiling * (1 + 2 * eps), (float(c.max()), hp.cov_ceiling)


@pytest.mark.skipif(not BACKENDS, reason="no backend runs on CPU tensors")
@given(problems())
def test_kalman_step_finite_bounded_and_matches_reference_or_skips_unchanged(p):
    rng = np.random.default_rng(p["seed"])
    dtype, hp, sc = p["dtype"], p["hyper"], p["scales"]
    state = []
    for _kind, shape in p["shapes"]:
        param = torch.tensor(rng.standard_normal(shape)).to(dtype)
        cov = torch.tensor(sc["P"] * rng.uniform(0.5, 2.0, shape)).to(_cov_dtype(dtype))
        state.append((param, cov))
    r_state = None
    for step in range(p["steps"]):
        blocks, e, r = _observation(p, rng, state)
        if r_state is not None:
            r = r_state
        ref_blocks, ref_e, ref_r = _as64(blocks, e, r)
        before = [(bits(b.param).clone(), bits(b.cov).clone()) for b in blocks]
        pre = [(b.param.to(F64, copy=True), b.cov.to(F64, copy=True)) for b in blocks]
        kw = dict(gate=p["gate"], adaptive_rate=p["adaptive"])
        info = ops.kalman_step_(blocks, [hp] * len(blocks), e, r, backend=p["backend"], **kw)
        oracle = ops.kalman_step_(ref_blocks, [hp] * len(blocks), ref_e, ref_r,
                                  backend="reference", **kw)
        note(f"step {step}: skipped {info.skipped} ({info.reason}); reference skipped "
             f"{oracle.skipped} ({oracle.reason})")
        s_mat = oracle.innovation_cov
        cond = float(torch.linalg.cond(s_mat)) if bool(torch.isfinite(s_mat).all()) else math.inf
        unit = UNIT[dtype] if p["backend"] != "reference" else 2.0 ** -53
        well_posed = cond * unit <= 1e-3 and not (oracle.jitter or 0.0) > 0
        event(f"{p['backend']} {dtype}: " + ("skipped: " + (info.reason or "")[:30]
                                               if info.skipped else
                                               "applied, " + ("compared" if well_posed
                                                              else "ill-conditioned")))
        if p["inject"] is not None:
            assert info.skipped and oracle.skipped
        if info.skipped:
            assert oracle.skipped or not well_posed, "skipped where the reference was not"
            for b, (p0, c0) in zip(blocks, before):
                assert torch.equal(bits(b.param), p0) and torch.equal(bits(b.cov), c0)
            return
        assert not oracle.skipped or not well_posed, f"applied where the reference skipped " \
                                                     f"({oracle.reason})"
        for b in blocks:
            assert bool(torch.isfinite(b.param.to(F64)).all()), "non-finite parameter"
            _check_bounds(b.cov, hp, b.cov.dtype)
        if well_posed and not oracle.skipped:
            tol = max(TOL[dtype], cond * unit * 10) if p["backend"] != "reference" else TOL[dtype]
            red = max(RED_TOL[dtype], tol)
            assert abs(info.mahalanobis - oracle.mahalanobis) <= red * max(oracle.mahalanobis,
                                                                           1e-300)
            scales = _term_scales(pre, ref_blocks, oracle, hp, ref_e)
            for b, rb, (mu_scale, cov_scale) in zip(blocks, ref_blocks, scales):
                err_mu = _scaled_err(b.param, rb.param, mu_scale)
                assert err_mu <= tol, ("mean", err_mu, tol)
                cov_tol = max(tol, TOL[b.cov.dtype])
                err_cov = _scaled_err(b.cov, rb.cov, cov_scale)
                assert err_cov <= cov_tol, ("covariance", err_cov, cov_tol)
        if p["adaptive"]:
            r_state = info.obs_noise_tensor


@st.composite
def loss_problems(draw):
    backend = draw(st.sampled_from(BACKENDS))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float64]))
    budget = 2_000 if backend in SMALL else 100_000
    count = draw(st.integers(1, 3))
    sizes = [max(1, int(round(_log_uniform(draw, 0, math.log10(budget // count)))))
             for _ in range(count)]
    scales = {k: _log_uniform(draw, -8, 8) for k in ("g", "loss", "P", "R")}
    rule = draw(st.sampled_from(["kalman", "information"]))
    return dict(backend=backend, dtype=dtype, sizes=sizes, scales=scales, rule=rule,
                adaptive=draw(st.sampled_from([0.0, 0.3])),
                gate=draw(st.sampled_from([None, 0.99])),
                hyper=StepHyper(draw(st.sampled_from([1.0, 0.5])),
                                draw(st.sampled_from([1.0, 0.9])),
                                0.0, draw(st.sampled_from([0.0, 1e-6])) * scales["P"], math.inf,
                                rule == "information"),
                inject=draw(st.sampled_from([None, None, None, "nan", "inf"])),
                seed=draw(st.integers(0, 2 ** 32 - 1)))


@pytest.mark.skipif(not BACKENDS, reason="no backend runs on CPU tensors")
@given(loss_problems())
def test_loss_step_finite_bounded_and_matches_reference_or_skips_unchanged(p):
    rng = np.random.default_rng(p["seed"])
    dtype, hp, sc = p["dtype"], p["hyper"], p["scales"]
    params = [torch.tensor(rng.standard_normal(n)).to(dtype) for n in p["sizes"]]
    covs = [torch.tensor(sc["P"] * rng.uniform(0.5, 2.0, n)).to(_cov_dtype(dtype))
            for n in p["sizes"]]
    grads = [torch.tensor(rng.standard_normal(n) * sc["g"]).to(dtype) for n in p["sizes"]]
    loss = torch.tensor(sc["loss"] * rng.uniform(0.5, 2.0) * rng.choice([-1.0, 1.0]))
    if p["inject"] is not None:
        value = float(p["inject"])
        which = rng.integers(len(grads) + 1)
        if which == len(grads):
            loss = torch.tensor(value)
        else:
            grads[which].view(-1)[rng.integers(grads[which].numel())] = value
    r = sc["R"] * rng.uniform(0.5, 2.0)
    ref_params = [t.to(F64, copy=True) for t in params]
    ref_covs = [t.to(F64, copy=True) for t in covs]
    pre_params = [t.clone() for t in ref_params]
    pre_covs = [t.clone() for t in ref_covs]
    before = [(bits(a).clone(), bits(c).clone()) for a, c in zip(params, covs)]
    kw = dict(gate=p["gate"], adaptive_rate=p["adaptive"])
    hypers = [hp] * len(params)
    info = ops.loss_observation_step_(params, grads, covs, hypers, loss, r, backend=p["backend"],
                                      **kw)
    oracle = ops.loss_observation_step_(ref_params, [g.to(F64) for g in grads], ref_covs, hypers,
                                        loss.to(F64), r, backend="reference", **kw)
    note(f"skipped {info.skipped} ({info.reason}); reference {oracle.skipped} ({oracle.reason})")
    if p["inject"] is not None:
        assert info.skipped and oracle.skipped
    borderline = p["backend"] != "reference"          # g^T P g in float32 on other backends
    event(f"{p['backend']} {dtype}: " + ("skipped: " + (info.reason or "")[:30]
                                         if info.skipped else "applied"))
    if info.skipped:
        assert oracle.skipped or borderline
        for a, c, (p0, c0) in zip(params, covs, before):
            assert torch.equal(bits(a), p0) and torch.equal(bits(c), c0)
        return
    assert not oracle.skipped or borderline
    for a, c in zip(params, covs):
        assert bool(torch.isfinite(a.to(F64)).all())
        _check_bounds(c, hp, c.dtype)
    if not oracle.skipped:
        tol = TOL[dtype]
        assert info.mahalanobis == pytest.approx(oracle.mahalanobis, rel=RED_TOL[dtype])
        s_val = float(oracle.innovation_cov)
        coef = abs(hp.lr * oracle.gate_scale * float(-loss.to(F64)) / s_val)
        weight = 1.0 / oracle.obs_noise if hp.information else 1.0 / s_val
        for a, ra, c, rc, mu0, p0, g in zip(params, ref_params, covs, ref_covs, pre_params,
                                            pre_covs, grads):
            p_pred = p0 / hp.forgetting + hp.process_noise
            g64 = g.to(F64)
            mu_scale = mu0.abs() + coef * p_pred * g64.abs()
            cov_scale = rc.abs() if hp.information else p_pred + p_pred ** 2 * weight * g64 ** 2
            assert _scaled_err(a, ra, mu_scale) <= tol
            assert _scaled_err(c, rc, cov_scale) <= max(tol, TOL[c.dtype])
