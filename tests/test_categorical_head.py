"""ops.categorical_head_update_ against an independent dense EKF of the softmax head.

The oracle flattens the head's parameters (K d weights, then K biases), takes the Jacobian of
softmax(logits) with one class dropped per image by ``torch.func.jacrev``, uses
R = c (diag(p_j) - p_j p_j^T) restricted to the kept classes, S = H diag(P-) H^T + R and the
textbook diagonal-prior EKF update, all in float64. Fresh random inputs every run, from
the test's seed (a failing test prints it with the command that replays it).
"""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kalman_kernels as kk
from conftest import draw_seed, step_err
from kalman_kernels.ops.categorical_head import (
    CategoricalHeadInfo,
    categorical_head_update_,
    soft_target_tol,
)

F64 = torch.float64


@pytest.fixture
def gen():
    # drawn from the generators conftest seeds per test, so the replay command a failing
    # test prints (KALMAN_TEST_SEED=...) reproduces these inputs too
    return torch.Generator().manual_seed(draw_seed())


# --------------------------------------------------------------------------------------
# cases and the dense oracle
# --------------------------------------------------------------------------------------
def _case(g, k, d, b, *, bias=True, soft=False, cov_scale=0.5, w_scale=1.0):
    w = torch.randn(k, d, generator=g, dtype=F64) * w_scale
    pw = (torch.rand(k, d, generator=g, dtype=F64) + 0.2) * cov_scale
    a = torch.nn.functional.normalize(torch.randn(b, d, generator=g, dtype=F64), dim=1)
    if soft:
        y = torch.softmax(2 * torch.randn(b, k, generator=g, dtype=F64), 1)
    else:
        y = torch.randint(0, k, (b,), generator=g)
    bb = torch.randn(k, generator=g, dtype=F64) * 0.3 if bias else None
    pb = (torch.rand(k, generator=g, dtype=F64) + 0.2) * cov_scale if bias else None
    return dict(w=w, pw=pw, b=bb, pb=pb, a=a, y=y)


def _onehot(y, k):
    return y.to(F64) if y.is_floating_point() else torch.nn.functional.one_hot(y, k).to(F64)


def _oracle(c, *, obs_noise=1.0, logit_scale=1.0, lr=1.0, forgetting=1.0, process_noise=0.0,
            cov_floor=0.0, cov_ceiling=math.inf, gate=None, cov_update="kalman",
            linearize_at=None, drop=-1):
    """The dense drop-one-class EKF in float64: (w, pw, b, pb, stats). A (K, d, d) ``pw`` is
    the prior blockdiag(Sigma_k) (no bias); the result's covariance is then the (K, d, d)
    diagonal blocks of the dense posterior."""
    w, pw, a = c["w"].to(F64), c["pw"].to(F64), c["a"].to(F64)
    k, d = w.shape
    nb = a.shape[0]
    has_bias = c["b"] is not None
    blocks = pw.dim() == 3
    theta = torch.cat([w.reshape(-1)] + ([c["b"].to(F64)] if has_bias else []))
    if blocks:
        prior = torch.block_diag(*pw) / forgetting + process_noise * torch.eye(k * d, dtype=F64)
    else:
        prior = torch.cat([pw.reshape(-1)] + ([c["pb"].to(F64)] if has_bias else []))
        prior = prior / forgetting + process_noise
    y = _onehot(c["y"], k)
    kept = [j for j in range(k) if j != drop % k]

    def probs(th):
        z = a @ th[:k * d].reshape(k, d).T
        if has_bias:
            z = z + th[k * d:]
        return torch.softmax(logit_scale * z, 1)

    def h(th):
        return probs(th)[:, kept].reshape(-1)

    if linearize_at is None:
        th_lin = theta
    else:
        th_lin = torch.cat([linearize_at[0].to(F64).reshape(-1)]
                           + ([linearize_at[1].to(F64)] if has_bias else []))
    jac = torch.func.jacrev(h)(th_lin)                          # (B (K-1), n)
    p = probs(th_lin)
    res = y[:, kept].reshape(-1) - h(th_lin) - jac @ (theta - th_lin)
    r = torch.block_diag(*[(obs_noise * (torch.diag(pj) - torch.outer(pj, pj)))[kept][:, kept]
                           for pj in p])
    if blocks:
        s_mat = jac @ prior @ jac.T + r
    else:
        s_mat = (jac * prior) @ jac.T + r
    s_res = torch.linalg.solve(s_mat, res)
    d2 = float(res @ s_res)
    scale = 1.0
    if gate is not None:
        tau = kk.reference.chi2_quantile(gate, nb * (k - 1))
        scale = min(1.0, math.sqrt(tau / d2))
    log_det = float(torch.linalg.slogdet(s_mat)[1] - torch.linalg.slogdet(r)[1])
    ce = float(-(y * torch.log(p)).sum(1).mean())
    stats = dict(d2=d2, gate_scale=scale, log_det=log_det, cross_entropy=ce)
    if blocks:
        theta_new = theta + lr * scale * prior @ (jac.T @ s_res)
        post = prior - prior @ jac.T @ torch.linalg.solve(s_mat, jac @ prior)
        diag_blocks = torch.stack([post[i * d:(i + 1) * d, i * d:(i + 1) * d] for i in range(k)])
        return theta_new.reshape(k, d), diag_blocks, None, None, stats
    theta_new = theta + lr * scale * prior * (jac.T @ s_res)
    if cov_update == "kalman":
        p_new = prior - prior ** 2 * (jac * torch.linalg.solve(s_mat, jac)).sum(0)
    else:
        p_new = 1.0 / (1.0 / prior + (jac * torch.linalg.solve(r, jac)).sum(0))
    p_new = p_new.clamp(cov_floor, cov_ceiling)
    out_b = theta_new[k * d:] if has_bias else None
    out_pb = p_new[k * d:] if has_bias else None
    return (theta_new[:k * d].reshape(k, d), p_new[:k * d].reshape(k, d), out_b, out_pb,
            stats)


def _run(c, **hyper):
    w, pw = c["w"].clone(), c["pw"].clone()
    b = None if c["b"] is None else c["b"].clone()
    pb = None if c["pb"] is None else c["pb"].clone()
    info = categorical_head_update_(w, pw, b, pb, c["a"], c["y"], **hyper)
    return w, pw, b, pb, info


def _rel(x, y):
    x, y = x.to(F64), y.to(F64)
    return float((x - y).abs().max() / y.abs().max().clamp(min=1e-300))


def _assert_state_close(got, exp, tol):
    for name, x, y in zip(("weight", "weight_cov", "bias", "bias_cov"), got[:4], exp[:4]):
        if y is None:
            assert x is None
            continue
        assert torch.allclose(x.to(F64), y, rtol=tol, atol=tol * float(y.abs().max())), \
            (name, _rel(x, y))


# --------------------------------------------------------------------------------------
# the oracle itself, and the per-class identities against the dense matrices
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("soft,lin", [(False, False), (True, False), (True, True)])
def test_oracle_does_not_depend_on_the_dropped_class(gen, soft, lin):
    c = _case(gen, 5, 4, 3, soft=soft)
    hyper = dict(obs_noise=0.7, logit_scale=1.3)
    if lin:
        hyper["linearize_at"] = (c["w"] + 0.2 * torch.randn(5, 4, generator=gen, dtype=F64),
                                 c["b"] - 0.1)
    first = _oracle(c, drop=0, **hyper)
    last = _oracle(c, drop=-1, **hyper)
    mid = _oracle(c, drop=2, **hyper)
    for other in (last, mid):
        for x, y in zip(first[:4], other[:4]):
            assert _rel(x, y) <= 1e-10
        for key in ("d2", "log_det"):
            assert math.isclose(first[4][key], other[4][key], rel_tol=1e-10)


def test_per_class_woodbury_identities_equal_the_dense_matrices(gen):
    """Every identity of the module docstring, in float64, against the BK x BK matrices."""
    k, d, b, cn, s = 4, 5, 3, 0.6, 1.4
    c = _case(gen, k, d, b, soft=True)
    a, w, bias = c["a"], c["w"], c["b"]
    pw, pb = c["pw"], c["pb"]
    p = torch.softmax(s * (a @ w.T + bias), 1)                  # (B, K)
    e = _onehot(c["y"], k) - p
    # class-major dense pieces
    m_blocks = [s * s * ((a * pw[j]) @ a.T + pb[j]) for j in range(k)]
    m = torch.block_diag(*m_blocks)
    lam = torch.zeros(b * k, b * k, dtype=F64)
    for j in range(b):
        idx = [kk_ * b + j for kk_ in range(k)]
        lam[torch.tensor(idx)[:, None], torch.tensor(idx)[None, :]] = \
            torch.diag(p[j]) - torch.outer(p[j], p[j])
    e_cm = e.T.reshape(-1)
    big = cn * torch.eye(b * k, dtype=F64) + lam @ m
    x_dense = torch.linalg.solve(big, e_cm)
    g_dense = torch.linalg.solve(big, lam)
    assert torch.allclose(g_dense, g_dense.T, atol=1e-12)       # G is symmetric
    # per class
    zs, ws, qs = [], [], []
    for j in range(k):
        ek = torch.diag(p[:, j].sqrt())
        q = cn * torch.eye(b, dtype=F64) + ek @ m_blocks[j] @ ek
        assert torch.linalg.eigvalsh(q).min() >= cn * (1 - 1e-12)
        z = ek @ torch.linalg.inv(q) @ ek
        t_inv = torch.linalg.inv(cn * torch.eye(b, dtype=F64) + torch.diag(p[:, j]) @ m_blocks[j])
        assert torch.allclose(t_inv, (torch.eye(b, dtype=F64) - ek @ torch.linalg.inv(q) @ ek
                                      @ m_blocks[j]) / cn, atol=1e-12)
        assert torch.allclose(t_inv @ torch.diag(p[:, j]), z, atol=1e-12)
        zs.append(z)
        qs.append(q)
        ws.append(z @ m_blocks[j] @ e[:, j])
    sz = sum(zs)
    v = torch.linalg.solve(sz, sum(ws)) / cn
    x = torch.stack([(e[:, j] - ws[j]) / cn + zs[j] @ v for j in range(k)])   # (K, B)
    assert torch.allclose(x.reshape(-1), x_dense, rtol=1e-10, atol=1e-12)
    for j in range(k):
        g_kk = zs[j] - zs[j] @ torch.linalg.solve(sz, zs[j])
        blk = g_dense[j * b:(j + 1) * b, j * b:(j + 1) * b]
        assert torch.allclose(g_kk, blk, rtol=1e-10, atol=1e-12)
    # Mahalanobis and log det against the drop-one-class S
    ora = _oracle(c, obs_noise=cn, logit_scale=s)
    d2 = float((e.T * x / p.T).sum())
    assert math.isclose(d2, ora[4]["d2"], rel_tol=1e-10)
    log_det = (sum(float(torch.logdet(q)) for q in qs) + float(torch.logdet(cn * sz))
               - b * k * math.log(cn))
    assert math.isclose(log_det, ora[4]["log_det"], rel_tol=1e-10)
    dense_ld = float(torch.logdet(torch.eye(b * k, dtype=F64) + m @ lam / cn))
    assert math.isclose(log_det, dense_ld, rel_tol=1e-10)
    # push-through: P- J^T x is the drop-one gain applied to the residual
    step_w = pw * s * (x @ a)                                   # (K, d)
    assert torch.allclose(w + step_w, ora[0], rtol=1e-10, atol=1e-12)
    assert torch.allclose(bias + pb * s * x.sum(1), ora[2], rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------
# float64: equal to the dense EKF
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("b,k,d,bias,soft", [
    (1, 2, 1, True, False), (3, 3, 5, False, True), (7, 11, 13, True, False),
    (7, 2, 5, True, True), (1, 11, 13, False, False), (3, 11, 1, True, True),
    (7, 3, 13, False, False), (3, 2, 13, True, False)])
def test_float64_equals_dense_ekf(gen, b, k, d, bias, soft):
    c = _case(gen, k, d, b, bias=bias, soft=soft)
    got = _run(c, chunk_size=2)
    exp = _oracle(c)
    _assert_state_close(got, exp, 1e-8)
    info = got[4]
    assert isinstance(info, CategoricalHeadInfo)
    assert not info.skipped and info.gate_scale == 1.0 and info.reason is None
    assert info.num_obs == b * (k - 1)
    for key in ("d2", "log_det", "cross_entropy"):
        val = {"d2": info.mahalanobis, "log_det": info.log_det,
               "cross_entropy": info.cross_entropy}[key]
        assert math.isclose(val, exp[4][key], rel_tol=1e-8), key
    assert info.class_jitter.shape == (k,) and info.jitter == 0.0
    # the op works in place: every element of the state was written with the new value
    assert (got[0] != c["w"]).all() and (got[1] != c["pw"]).all()
    if bias:
        assert (got[2] != c["b"]).all() and (got[3] != c["pb"]).all()
    assert "CategoricalHeadInfo(" in repr(info)


@pytest.mark.parametrize("cov_update", ["kalman", "information"])
def test_hyper_parameters_equal_dense(gen, cov_update):
    c = _case(gen, 6, 5, 4, soft=True)
    hyper = dict(obs_noise=2.5, logit_scale=3.0, lr=0.7, forgetting=0.9, process_noise=1e-2,
                 cov_update=cov_update)
    got = _run(c, chunk_size=4, **hyper)
    exp = _oracle(c, **hyper)
    _assert_state_close(got, exp, 1e-8)
    assert math.isclose(got[4].mahalanobis, exp[4]["d2"], rel_tol=1e-8)
    assert math.isclose(got[4].log_det, exp[4]["log_det"], rel_tol=1e-8)


@pytest.mark.parametrize("cov_update", ["kalman", "information"])
def test_floor_and_ceiling(gen, cov_update):
    c = _case(gen, 5, 7, 6, cov_scale=0.3)
    c["y"] = torch.zeros(6, dtype=torch.int64)
    c["a"][:, -1] = 0.0              # weights no image sees keep their prior (0.52 > ceiling)
    c["pw"][:, -1] = 0.5
    c["pw"][:, 0] = 0.05             # priors below the floor
    hyper = dict(obs_noise=0.3, logit_scale=4.0, cov_floor=0.1, cov_ceiling=0.3,
                 cov_update=cov_update, process_noise=0.02)
    got = _run(c, **hyper)
    exp = _oracle(c, **hyper)
    _assert_state_close(got, exp, 1e-8)
    assert (got[1] >= 0.1).all() and (got[1] <= 0.3).all()
    unclamped = _oracle(c, **dict(hyper, cov_floor=0.0, cov_ceiling=math.inf))[1]
    assert (unclamped < 0.1).any() and (unclamped > 0.3).any()   # both bounds were active


def test_gate_follows_the_formula(gen):
    k, b = 6, 5
    c = _case(gen, k, 4, b, w_scale=3.0)
    # labels on the least likely class of each image: far outside the model's spread
    c["y"] = (c["a"] @ c["w"].T + c["b"]).argmin(1)
    got = _run(c, obs_noise=0.2, gate=0.9)
    exp = _oracle(c, obs_noise=0.2, gate=0.9)
    tau = kk.reference.chi2_quantile(0.9, b * (k - 1))
    d2 = exp[4]["d2"]
    assert d2 > tau
    s = got[4].gate_scale
    assert 0 < s < 1 and got[4].gated
    assert math.isclose(s, math.sqrt(tau / d2), rel_tol=1e-8)
    _assert_state_close(got, exp, 1e-8)
    # the gate shrinks the mean step only: the covariance equals the ungated step's
    ungated = _run(c, obs_noise=0.2)
    assert torch.equal(got[1], ungated[1]) and torch.equal(got[3], ungated[3])


@pytest.mark.parametrize("bias", [True, False])
def test_linearize_at_equals_dense_iterated_step(gen, bias):
    k, d, b = 5, 6, 4
    c = _case(gen, k, d, b, bias=bias, soft=bias)
    lin = (c["w"] + 0.3 * torch.randn(k, d, generator=gen, dtype=F64),
           (c["b"] + 0.2 * torch.randn(k, generator=gen, dtype=F64)) if bias else None)
    hyper = dict(obs_noise=0.8, logit_scale=1.7, linearize_at=lin)
    got = _run(c, chunk_size=3, **hyper)
    exp = _oracle(c, **hyper)
    _assert_state_close(got, exp, 1e-8)
    for key, val in (("d2", got[4].mahalanobis), ("log_det", got[4].log_det),
                     ("cross_entropy", got[4].cross_entropy)):
        assert math.isclose(val, exp[4][key], rel_tol=1e-8), key
    # linearising at the current mean is the default step
    same = _run(c, linearize_at=(c["w"].clone(), None if c["b"] is None else c["b"].clone()))
    default = _run(c)
    for x, y in zip(same[:4], default[:4]):
        if y is not None:
            assert _rel(x, y) <= 1e-12


def test_sequential_steps_stay_equal_to_dense(gen):
    k, d = 4, 5
    c = _case(gen, k, d, 3)
    state = dict(c)
    for step in range(4):
        b = (1, 3, 7, 2)[step]
        batch = _case(gen, k, d, b, soft=step % 2 == 1)
        state.update(a=batch["a"], y=batch["y"])
        got = _run(state, obs_noise=0.5, forgetting=0.95, process_noise=1e-3)
        exp = _oracle(state, obs_noise=0.5, forgetting=0.95, process_noise=1e-3)
        _assert_state_close(got, exp, 1e-8)
        state.update(w=got[0], pw=got[1], b=got[2], pb=got[3])


def test_chunk_size_does_not_change_the_result(gen):
    c = _case(gen, 9, 6, 5)
    ref_ = _run(c, chunk_size=9, gate=0.5)
    for chunk in (1, 2, 4, 100):
        got = _run(c, chunk_size=chunk, gate=0.5)
        for x, y in zip(got[:4], ref_[:4]):
            assert _rel(x, y) <= 1e-13
        assert math.isclose(got[4].log_det, ref_[4].log_det, rel_tol=1e-13)


# --------------------------------------------------------------------------------------
# float32 / bfloat16 parameters
# --------------------------------------------------------------------------------------
def _as(c, dtype, cov_dtype=torch.float32):
    out = dict(c)
    out["w"], out["a"] = c["w"].to(dtype), c["a"].to(dtype)
    out["pw"] = c["pw"].to(cov_dtype)
    if c["b"] is not None:
        out["b"], out["pb"] = c["b"].to(dtype), c["pb"].to(cov_dtype)
    if c["y"].is_floating_point():
        out["y"] = c["y"].to(dtype)
    return out


@pytest.mark.parametrize("soft", [False, True])
def test_float32_within_tolerance(gen, soft):
    c = _as(_case(gen, 37, 53, 9, soft=soft, cov_scale=0.05), torch.float32)
    got = _run(c, obs_noise=0.5, logit_scale=2.0, gate=0.99)
    exp = _oracle(c, obs_noise=0.5, logit_scale=2.0, gate=0.99)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    for new, old, ref_new in zip(got[:4], (c["w"], c["pw"], c["b"], c["pb"]), exp[:4]):
        assert _rel(new, ref_new) <= 1e-5
        # the step itself to 1e-5 (the gate can shrink it to ~1e-3 of the weights)
        assert step_err(new, old, ref_new) <= 1e-5
    assert math.isclose(got[4].mahalanobis, exp[4]["d2"], rel_tol=1e-4)
    assert math.isclose(got[4].log_det, exp[4]["log_det"], rel_tol=1e-4)


def test_bfloat16_weight_with_float32_covariance(gen):
    c = _as(_case(gen, 8, 16, 4, cov_scale=0.1), torch.bfloat16)
    c["a"] = c["a"].float()
    got = _run(c, obs_noise=0.5)
    exp = _oracle(c, obs_noise=0.5)
    assert got[0].dtype == torch.bfloat16 and got[2].dtype == torch.bfloat16
    assert _rel(got[0], exp[0]) <= 1e-2 and _rel(got[2], exp[2]) <= 1e-2
    assert _rel(got[1], exp[1]) <= 1e-4 and _rel(got[3], exp[3]) <= 1e-4


# --------------------------------------------------------------------------------------
# skips: the state is unchanged bit for bit
# --------------------------------------------------------------------------------------
def _bits(t):
    return t.detach().clone().view({8: torch.int64, 4: torch.int32, 2: torch.int16}[
        t.element_size()])


@pytest.mark.parametrize("where", ["features-nan", "features-inf", "weight-nan", "bias-inf",
                                   "soft-nan", "cov-nan", "bias-cov-inf", "lin-nan",
                                   "logits-overflow"])
def test_non_finite_input_skips_bit_for_bit(gen, where):
    k, d, b = 6, 5, 4
    c = _case(gen, k, d, b, soft=where == "soft-nan")
    w, pw, bias, pb = c["w"].clone(), c["pw"].clone(), c["b"].clone(), c["pb"].clone()
    a, y = c["a"].clone(), c["y"].clone()
    lin, scale = None, 1.0
    i, j = int(torch.randint(0, k, (), generator=gen)), int(torch.randint(0, d, (), generator=gen))
    if where == "features-nan":
        a[int(torch.randint(0, b, (), generator=gen)), j] = float("nan")
    elif where == "features-inf":
        a[0, j] = -float("inf")
    elif where == "weight-nan":
        w[i, j] = float("nan")
    elif where == "bias-inf":
        bias[i] = float("inf")
    elif where == "soft-nan":
        y[0, i] = float("nan")
    elif where == "cov-nan":
        pw[i, j] = float("nan")
    elif where == "bias-cov-inf":
        pb[i] = float("inf")
    elif where == "lin-nan":
        lin = (w.clone(), bias.clone())
        lin[0][i, j] = float("nan")
    else:
        w[i] = 1e300 * torch.sign(w[i])      # finite weights, logits beyond float64's range
        scale = 1e12
    before = [_bits(t) for t in (w, pw, bias, pb)]
    info = categorical_head_update_(w, pw, bias, pb, a, y, gate=0.99, linearize_at=lin,
                                    logit_scale=scale)
    assert info.skipped and info.gate_scale == 0.0
    assert "non-finite" in info.reason
    assert math.isnan(info.mahalanobis) and math.isnan(info.log_det)
    for t, bits in zip((w, pw, bias, pb), before):
        assert torch.equal(_bits(t), bits)


def test_invalid_targets_off_the_host_path_skip(gen):
    """bfloat16 soft targets have no NumPy view, so their values are not checked before the
    step (as on an accelerator): a negative entry or a bad row sum skips it, with a reason."""
    k, d, b = 4, 3, 2
    c = _case(gen, k, d, b)
    for bad in ("negative", "sum"):
        y = torch.full((b, k), 1.0 / k).to(torch.bfloat16)
        if bad == "negative":
            y[0, 0], y[0, 1] = -0.25, 0.75
        else:
            y[1] = y[1] * 2
        w, pw = c["w"].clone(), c["pw"].clone()
        before = [_bits(w), _bits(pw)]
        info = categorical_head_update_(w, pw, None, None, c["a"], y)
        assert info.skipped and "invalid targets" in info.reason
        assert torch.equal(_bits(w), before[0]) and torch.equal(_bits(pw), before[1])
    # within the tolerance the row is renormalised and the step is taken
    y = torch.full((b, k), 1.0 / k, dtype=F64)
    y[0] = y[0] * (1 + soft_target_tol(k, F64) / 2)
    info = categorical_head_update_(c["w"].clone(), c["pw"].clone(), None, None, c["a"], y)
    assert not info.skipped


@pytest.mark.parametrize("which", ["class", "capacitance"])
def test_failed_factorisation_skips(gen, monkeypatch, which):
    """Q_k = cI + E_k M_k E_k has eigenvalues >= c, so only non-finite input breaks it in
    practice; the skip path is exercised by reporting one block as failed at every rung."""
    import kalman_kernels.ops.categorical_head as ch
    real = ch._factor
    calls = []

    def failing(mat):
        factor, jitter, ok = real(mat)
        calls.append(mat.shape[0])
        if (which == "class") == (len(calls) == 1):
            factor = factor.clone()
            factor[0] = torch.eye(factor.shape[-1], dtype=F64)   # _factor's stand-in
            ok = ok.clone()
            ok[0] = False
            jitter = jitter.clone()
            jitter[0] = float("nan")
        return factor, jitter, ok

    monkeypatch.setattr(ch, "_factor", failing)
    c = _case(gen, 3, 4, 3)
    w, pw, bias, pb = c["w"].clone(), c["pw"].clone(), c["b"].clone(), c["pb"].clone()
    before = [_bits(t) for t in (w, pw, bias, pb)]
    info = categorical_head_update_(w, pw, bias, pb, c["a"], c["y"])
    assert info.skipped and "factorisation" in info.reason and info.jitter is None
    if which == "class":
        assert math.isnan(float(info.class_jitter[0]))
    for t, bits in zip((w, pw, bias, pb), before):
        assert torch.equal(_bits(t), bits)


def test_full_device_ladder_gives_the_same_bits(gen, monkeypatch):
    """Off eager CPU every jitter rung is factored on the device (no flag is read); on eager
    CPU the extra rungs are skipped when the plain factorisations all succeeded. Same bits."""
    import kalman_kernels.ops.categorical_head as ch
    c = _case(gen, 7, 6, 5, soft=True)
    fast = _run(c, chunk_size=3, gate=0.9, obs_noise=0.4)
    monkeypatch.setattr(ch, "readable_now", lambda t: False)
    full = _run(c, chunk_size=3, gate=0.9, obs_noise=0.4)
    for x, y in zip(fast[:4], full[:4]):
        assert torch.equal(x, y)
    assert fast[4].log_det == full[4].log_det and fast[4].jitter == full[4].jitter == 0.0


def test_near_singular_blocks_stay_finite(gen):
    """Duplicate images and a tiny c: Q_k = cI + E_k M_k E_k is numerically singular; the
    factorisation (with the ladder if needed) still gives a finite step."""
    c = _case(gen, 4, 3, 4)
    c["a"][1] = c["a"][0]
    c["a"][3] = c["a"][0]
    got = _run(c, obs_noise=1e-14)
    assert not got[4].skipped
    assert got[4].jitter in (0.0,) + tuple(kk.reference.JITTER_LADDER)
    for t in got[:4]:
        assert torch.isfinite(t).all()


class _NoHostSync(TorchDispatchMode):
    """Records the ops that copy a tensor's value to the host (item / bool / float)."""

    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
                    torch.ops.aten.item.default):
            self.syncs.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("soft,lin,cov_update", [(False, False, "kalman"),
                                                 (True, True, "kalman"),
                                                 (False, True, "information")])
def test_no_host_synchronisation_inside_the_step(gen, soft, lin, cov_update):
    k, d, b = 5, 4, 3
    c = _case(gen, k, d, b, soft=soft)
    kk.reference.chi2_quantile(0.99, b * (k - 1))      # host constant, cached (a warm-up step)
    lin_at = (c["w"] + 0.1, c["b"] - 0.1) if lin else None
    with _NoHostSync() as mode:
        info = categorical_head_update_(c["w"], c["pw"], c["b"], c["pb"], c["a"], c["y"],
                                        gate=0.99, linearize_at=lin_at, cov_update=cov_update,
                                        obs_noise=0.5, logit_scale=2.0, chunk_size=2)
    assert mode.syncs == []
    assert not info.skipped


# --------------------------------------------------------------------------------------
# validation: errors name the argument, nothing is written
# --------------------------------------------------------------------------------------
def test_bad_arguments_raise_before_any_write(gen):
    k, d, b = 4, 5, 3
    c = _case(gen, k, d, b)
    w, pw, bias, pb = c["w"].clone(), c["pw"].clone(), c["b"].clone(), c["pb"].clone()
    snap = [t.clone() for t in (w, pw, bias, pb)]
    a, y = c["a"], c["y"]
    soft = torch.full((b, k), 1.0 / k, dtype=F64)
    bad = [
        (dict(weight=w[:1], weight_cov=pw[:1], bias=bias[:1], bias_cov=pb[:1]), ValueError,
         "K >= 2"),
        (dict(weight=w[0]), ValueError, "weight must be the"),
        (dict(weight_cov=pw.float()), TypeError, "weight_cov.*float64"),
        (dict(weight_cov=pw[:, :3]), ValueError, "weight_cov has shape"),
        (dict(bias_cov=None), ValueError, "bias and bias_cov go together"),
        (dict(bias=bias[:3], bias_cov=pb[:3]), ValueError, "bias must have shape"),
        (dict(features=a[:, :4]), ValueError, "features must have shape"),
        (dict(features=a[:0]), ValueError, "B = 0"),
        (dict(features=a.long()), TypeError, "features must be a floating-point"),
        (dict(labels=[0, 1, 2]), TypeError, "labels must be a tensor"),
        (dict(labels=y.int()), TypeError, "labels must be int64"),
        (dict(labels=y[:2]), ValueError, r"labels \(class indices\) must have shape"),
        (dict(labels=torch.tensor([0, 4, 1])), ValueError, r"\[0, K\) = \[0, 4\); got 4"),
        (dict(labels=torch.tensor([0, -1, 1])), ValueError, "got -1"),
        (dict(labels=soft[:, :3]), ValueError, "soft targets .* must have shape"),
        (dict(labels=soft * 1.5), ValueError, "rows summing to 1"),
        (dict(labels=soft - 0.3), ValueError, "non-negative"),
        (dict(obs_noise=0.0), ValueError, "obs_noise must be in"),
        (dict(obs_noise=math.inf), ValueError, "obs_noise must be finite"),
        (dict(obs_noise=torch.tensor(1.0)), TypeError, "obs_noise must be a Python number"),
        (dict(logit_scale=-1.0), ValueError, "logit_scale must be in"),
        (dict(logit_scale="2"), TypeError, "logit_scale must be a Python number"),
        (dict(lr=0.0), ValueError, "lr must be in"),
        (dict(forgetting=1.5), ValueError, "forgetting"),
        (dict(process_noise=-1.0), ValueError, "process_noise"),
        (dict(gate=1.0), ValueError, "gate"),
        (dict(cov_update="exact"), ValueError, "cov_update"),
        (dict(cov_floor=1.0, cov_ceiling=0.5), ValueError, "cov_floor"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(linearize_at=w), TypeError, "linearize_at must be a pair"),
        (dict(linearize_at=(w[:, :2], bias)), ValueError, r"linearize_at\[0\]"),
        (dict(linearize_at=(w.clone(), None)), ValueError, r"linearize_at\[1\]"),
        (dict(linearize_at=(w.clone(), bias[:2])), ValueError, r"linearize_at\[1\]"),
        (dict(bias=w[:, 0]), ValueError, "bias shares memory with weight"),
        (dict(features=a.to("meta")), ValueError, "features is on meta but weight is on cpu"),
    ]
    for override, exc, pattern in bad:
        args = dict(weight=w, weight_cov=pw, bias=bias, bias_cov=pb, features=a, labels=y)
        args.update(override)
        with pytest.raises(exc, match=pattern):
            categorical_head_update_(args.pop("weight"), args.pop("weight_cov"),
                                     args.pop("bias"), args.pop("bias_cov"),
                                     args.pop("features"), args.pop("labels"), **args)
        for t, s in zip((w, pw, bias, pb), snap):
            assert torch.equal(t, s)


def test_exported_from_ops():
    assert kk.ops.categorical_head_update_ is categorical_head_update_
    assert kk.ops.CategoricalHeadInfo is CategoricalHeadInfo


# --------------------------------------------------------------------------------------
# the block form: one full d x d covariance per class
# --------------------------------------------------------------------------------------
def _block_case(gen, k, d, b, *, soft=False, scale=0.5):
    c = _case(gen, k, d, b, bias=False, soft=soft)
    x = torch.randn(k, d, d, generator=gen, dtype=F64)
    c["pw"] = scale * (x @ x.transpose(1, 2) / d + 0.2 * torch.eye(d, dtype=F64))
    return c


@pytest.mark.parametrize("b,k,d,soft", [(1, 2, 1, False), (3, 3, 5, True), (7, 11, 4, False),
                                        (3, 5, 13, True), (7, 2, 13, False)])
def test_blocks_equal_the_dense_ekf_with_a_block_diagonal_prior(gen, b, k, d, soft):
    c = _block_case(gen, k, d, b, soft=soft)
    hyper = dict(obs_noise=0.8, logit_scale=1.5, lr=0.9, forgetting=0.95, process_noise=1e-2)
    got = _run(c, chunk_size=2, **hyper)
    exp = _oracle(c, **hyper)
    _assert_state_close(got, exp, 1e-8)
    for key, val in (("d2", got[4].mahalanobis), ("log_det", got[4].log_det),
                     ("cross_entropy", got[4].cross_entropy)):
        assert math.isclose(val, exp[4][key], rel_tol=1e-8), key
    assert torch.equal(got[1], got[1].transpose(1, 2))          # written symmetric
    assert (got[0] != c["w"]).all() and (got[1] != c["pw"]).all()


def test_blocks_sub_chunks_do_not_change_the_result(gen, monkeypatch):
    import kalman_kernels.ops.categorical_head as ch
    c = _block_case(gen, 7, 5, 4)
    hyper = dict(obs_noise=0.6, forgetting=0.9, process_noise=1e-2, gate=0.5)
    ref_ = _run(c, chunk_size=7, **hyper)
    for chunk, sub_blocks in ((3, 1), (2, 2), (7, 3), (100, 1)):
        monkeypatch.setattr(ch, "BLOCK_CHUNK_ELEMENTS", sub_blocks * 25)
        got = _run(c, chunk_size=chunk, **hyper)
        for x, y in zip(got[:2], ref_[:2]):
            assert _rel(x, y) <= 1e-13
    exp = _oracle(c, **hyper)
    _assert_state_close(got, exp, 1e-8)


def test_blocks_gate_and_linearisation_point(gen):
    k, d, b = 5, 4, 6
    c = _block_case(gen, k, d, b)
    c["w"] = c["w"] * 3
    c["y"] = (c["a"] @ c["w"].T).argmin(1)
    lin = (c["w"] + 0.2 * torch.randn(k, d, generator=gen, dtype=F64), None)
    hyper = dict(obs_noise=0.2, gate=0.9, linearize_at=lin)
    got = _run(c, **hyper)
    exp = _oracle(c, **hyper)
    assert 0 < got[4].gate_scale < 1
    assert math.isclose(got[4].gate_scale, exp[4]["gate_scale"], rel_tol=1e-8)
    _assert_state_close(got, exp, 1e-8)


def test_diagonal_blocks_agree_with_the_diagonal_form(gen):
    """With Sigma_k = diag(P_k) both forms take the same mean step, and the block form's
    diagonal is the diagonal form's covariance (both are the exact posterior's diagonal)."""
    c = _case(gen, 6, 5, 4, bias=False, soft=True)
    diag = _run(c, obs_noise=0.7, logit_scale=2.0, gate=0.95)
    cb = dict(c, pw=torch.diag_embed(c["pw"]))
    blk = _run(cb, obs_noise=0.7, logit_scale=2.0, gate=0.95)
    assert _rel(blk[0], diag[0]) <= 1e-12
    assert _rel(torch.diagonal(blk[1], dim1=1, dim2=2), diag[1]) <= 1e-12
    assert math.isclose(blk[4].log_det, diag[4].log_det, rel_tol=1e-12)
    assert math.isclose(blk[4].mahalanobis, diag[4].mahalanobis, rel_tol=1e-12)


def test_blocks_sequential_steps(gen):
    k, d = 3, 4
    state = _block_case(gen, k, d, 2)
    for step in range(3):
        batch = _case(gen, k, d, (2, 5, 1)[step], bias=False)
        state.update(a=batch["a"], y=batch["y"])
        got = _run(state, obs_noise=0.5)
        exp = _oracle(state, obs_noise=0.5)
        _assert_state_close(got, exp, 1e-8)
        state.update(w=got[0], pw=got[1])


def test_blocks_float32_within_tolerance(gen):
    c = _as(_block_case(gen, 9, 17, 6, scale=0.05), torch.float32)
    got = _run(c, obs_noise=0.5, logit_scale=2.0)
    exp = _oracle(c, obs_noise=0.5, logit_scale=2.0)
    assert got[1].dtype == torch.float32
    for new, old, ref_new in zip(got[:2], (c["w"], c["pw"]), exp[:2]):
        assert _rel(new, ref_new) <= 1e-5
        assert _rel(new.to(F64) - old.to(F64), ref_new - old.to(F64)) <= 1e-4


@pytest.mark.parametrize("where", ["cov-nan", "cov-inf", "features-nan"])
def test_blocks_non_finite_input_skips_bit_for_bit(gen, where):
    c = _block_case(gen, 4, 3, 3)
    w, pw, a = c["w"].clone(), c["pw"].clone(), c["a"].clone()
    if where == "cov-nan":
        pw[2, 1, 0] = float("nan")
    elif where == "cov-inf":
        pw[0, 2, 2] = float("inf")
    else:
        a[1, 1] = float("nan")
    before = [_bits(w), _bits(pw)]
    info = categorical_head_update_(w, pw, None, None, a, c["y"])
    assert info.skipped and "non-finite" in info.reason
    assert torch.equal(_bits(w), before[0]) and torch.equal(_bits(pw), before[1])


def test_blocks_no_host_synchronisation(gen):
    c = _block_case(gen, 5, 4, 3, soft=True)
    kk.reference.chi2_quantile(0.99, 3 * 4)
    with _NoHostSync() as mode:
        info = categorical_head_update_(c["w"], c["pw"], None, None, c["a"], c["y"], gate=0.99,
                                        forgetting=0.9, process_noise=1e-3, chunk_size=2,
                                        linearize_at=(c["w"] + 0.1, None))
    assert mode.syncs == [] and not info.skipped


def test_blocks_bad_arguments_raise_before_any_write(gen):
    k, d, b = 4, 3, 2
    c = _block_case(gen, k, d, b)
    w, pw = c["w"].clone(), c["pw"].clone()
    snap = [w.clone(), pw.clone()]
    bias, pb = torch.zeros(k, dtype=F64), torch.ones(k, dtype=F64)
    bad = [
        (dict(bias=bias, bias_cov=pb), ValueError, "fold the bias in as a constant feature"),
        (dict(bias=bias, bias_cov=None), ValueError, "fold the bias in"),
        (dict(weight_cov=pw[:, :, :2]), ValueError, r"shape \(K, d, d\) = \(4, 3, 3\)"),
        (dict(weight_cov=pw.half()), TypeError, "weight_cov must be float32 or float64"),
        (dict(weight_cov=pw.float()), TypeError, "float64 weight"),
        (dict(cov_floor=1e-3), ValueError, "cov_floor / cov_ceiling"),
        (dict(cov_ceiling=10.0), ValueError, "cov_floor / cov_ceiling"),
        (dict(cov_update="information"), ValueError, "exact 'kalman' rule"),
    ]
    for override, exc, pattern in bad:
        args = dict(weight=w, weight_cov=pw, bias=None, bias_cov=None, features=c["a"],
                    labels=c["y"])
        args.update(override)
        with pytest.raises(exc, match=pattern):
            categorical_head_update_(args.pop("weight"), args.pop("weight_cov"),
                                     args.pop("bias"), args.pop("bias_cov"),
                                     args.pop("features"), args.pop("labels"), **args)
        assert torch.equal(w, snap[0]) and torch.equal(pw, snap[1])
