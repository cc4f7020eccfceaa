"""ops.class_head_update_ (docs/design.md, 2.6) against the dense Kalman update over the whole head.

The oracle is ``kalman_kernels.ops.kalman_update_`` on the reference backend with one
DenseBlock for the weight and one for the bias, whose Jacobian is the (B K) x (K d) matrix
built from autograd of the score function (plain or cosine), in float64. Fresh random inputs
every run.
"""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kalman_kernels as kk
from conftest import step_err
from kalman_kernels.ops.class_head import (
    ClassHeadInfo,
    class_head_predictive_variance,
    class_head_update_,
)

F64 = torch.float64


def _scores(w, bias, a, normalize_rows):
    rows = w / w.norm(dim=1, keepdim=True) if normalize_rows else w
    s = a @ rows.T
    return s if bias is None else s + bias


def _dense_jacobians(w, bias, a, normalize_rows):
    """(B*K, K, d) and (B*K, K) Jacobians of the flattened (row-major) scores, by autograd."""
    b, k = a.shape[0], w.shape[0]
    jw = torch.autograd.functional.jacobian(
        lambda ww: _scores(ww, bias, a, normalize_rows).reshape(-1), w)
    jb = None
    if bias is not None:
        jb = torch.autograd.functional.jacobian(
            lambda bb: _scores(w, bb, a, normalize_rows).reshape(-1), bias)
    assert jw.shape == (b * k, *w.shape)
    return jw, jb


def _case(k, d, b, *, dtype=F64, bias=True, seed=None, cov_scale=1e-1):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 31, ()).item()) if seed is None
                                      else seed)
    w = torch.randn(k, d, generator=g, dtype=F64)
    pw = (torch.rand(k, d, generator=g, dtype=F64) + 0.2) * cov_scale
    a = torch.nn.functional.normalize(torch.randn(b, d, generator=g, dtype=F64), dim=1)
    e = torch.randn(b, k, generator=g, dtype=F64) * 0.5
    bb = torch.randn(k, generator=g, dtype=F64) * 0.1 if bias else None
    pb = (torch.rand(k, generator=g, dtype=F64) + 0.2) * cov_scale if bias else None
    return dict(w=w.to(dtype), pw=pw.to(torch.float32 if dtype != F64 else F64), a=a.to(dtype),
                e=e.to(dtype), b=None if bb is None else bb.to(dtype),
                pb=None if pb is None else pb.to(torch.float32 if dtype != F64 else F64))


def _dense_reference(c, obs_noise, normalize_rows, **hyper):
    """Dense update of copies (float64): returns (w, pw, b, pb, info)."""
    w, pw = c["w"].to(F64).clone(), c["pw"].to(F64).clone()
    a, e = c["a"].to(F64), c["e"].to(F64)
    bias = None if c["b"] is None else c["b"].to(F64).clone()
    pb = None if c["pb"] is None else c["pb"].to(F64).clone()
    jw, jb = _dense_jacobians(w, bias, a, normalize_rows)
    blocks = [kk.ops.DenseBlock(w, pw, jw)]
    if bias is not None:
        blocks.append(kk.ops.DenseBlock(bias, pb, jb))
    if isinstance(obs_noise, torch.Tensor) and obs_noise.dim() >= 1:
        b, k = e.shape
        if obs_noise.shape == (k,):
            r = obs_noise.to(F64)[None, :].expand(b, k).reshape(-1).clone()
        else:
            r = obs_noise.to(F64).reshape(-1).clone()
    else:
        r = float(obs_noise)
    info = kk.ops.kalman_update_(blocks, e.reshape(-1), r, backend="reference", **hyper)
    return w, pw, bias, pb, info


def _run(c, obs_noise, normalize_rows, **hyper):
    w, pw = c["w"].clone(), c["pw"].clone()
    b = None if c["b"] is None else c["b"].clone()
    pb = None if c["pb"] is None else c["pb"].clone()
    info = class_head_update_(w, pw, b, pb, c["a"], c["e"], obs_noise,
                              normalize_rows=normalize_rows, **hyper)
    return w, pw, b, pb, info


def _rel(x, y):
    x, y = x.to(F64), y.to(F64)
    return float((x - y).abs().max() / y.abs().max().clamp(min=1e-300))


# --------------------------------------------------------------------------------------
# the Jacobian the dense oracle uses: autograd equals finite differences and the formula
# --------------------------------------------------------------------------------------
def test_cosine_jacobian_is_the_rank_one_corrected_kronecker_form():
    c = _case(5, 7, 4)
    w, a = c["w"], c["a"]
    jw, _ = _dense_jacobians(w, c["b"], a, True)
    # central finite differences of the cosine scores
    eps = 1e-6
    fd = torch.zeros_like(jw)
    for o in range(w.shape[0]):
        for i in range(w.shape[1]):
            wp, wm = w.clone(), w.clone()
            wp[o, i] += eps
            wm[o, i] -= eps
            fd[:, o, i] = (_scores(wp, c["b"], a, True) - _scores(wm, c["b"], a, True)
                           ).reshape(-1) / (2 * eps)
    assert torch.allclose(jw, fd, atol=1e-8)
    # closed form: row (j, k) is (a_j - s_jk u_k) / |w_k| on row k and zero elsewhere
    n = w.norm(dim=1)
    u = w / n[:, None]
    s = a @ u.T
    b, k = s.shape
    closed = torch.zeros_like(jw)
    for j in range(b):
        for kk_ in range(k):
            closed[j * k + kk_, kk_] = (a[j] - s[j, kk_] * u[kk_]) / n[kk_]
    assert torch.allclose(jw, closed, atol=1e-12)
    assert jw.abs().max() > 1e-2


# --------------------------------------------------------------------------------------
# float64: equal to the dense update
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("normalize_rows", [False, True], ids=["plain", "cosine"])
@pytest.mark.parametrize("k,d,b,bias", [(7, 5, 3, True), (4, 9, 6, False), (1, 6, 5, True),
                                        (6, 4, 1, True), (3, 3, 11, True)])
def test_float64_equals_dense_update(k, d, b, bias, normalize_rows):
    c = _case(k, d, b, bias=bias)
    got = _run(c, 0.3, normalize_rows, chunk_size=2)
    exp = _dense_reference(c, 0.3, normalize_rows)
    for x, y in zip(got[:4], exp[:4]):
        if y is None:
            assert x is None
            continue
        assert _rel(x, y) <= 1e-10, _rel(x, y)
    info, dinfo = got[4], exp[4]
    assert isinstance(info, ClassHeadInfo)
    assert not bool(info.skipped) and float(info.gate_scale) == 1.0
    assert math.isclose(float(info.mahalanobis), dinfo.mahalanobis, rel_tol=1e-10)
    assert info.class_mahalanobis.shape == (k,)
    assert math.isclose(float(info.class_mahalanobis.sum()), dinfo.mahalanobis, rel_tol=1e-10)
    # every element of the state was written (none left at its old value)
    assert (got[0] != c["w"]).all() and (got[1] != c["pw"]).all()
    if bias:
        assert (got[2] != c["b"]).all() and (got[3] != c["pb"]).all()


@pytest.mark.parametrize("normalize_rows", [False, True], ids=["plain", "cosine"])
@pytest.mark.parametrize("noise_kind", ["scalar-tensor", "per-class", "per-obs", "flat"])
def test_noise_forms_and_hyper_parameters(noise_kind, normalize_rows):
    k, d, b = 5, 6, 4
    c = _case(k, d, b)
    g = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 31, ()).item()))
    r = {"scalar-tensor": torch.tensor(0.2, dtype=F64),
         "per-class": torch.rand(k, generator=g, dtype=F64) + 0.1,
         "per-obs": torch.rand(b, k, generator=g, dtype=F64) + 0.1,
         "flat": torch.rand(b * k, generator=g, dtype=F64) + 0.1}[noise_kind]
    hyper = dict(lr=0.7, forgetting=0.9, process_noise=1e-3, cov_floor=0.02, cov_ceiling=0.11)
    got = _run(c, r, normalize_rows, **hyper)
    exp = _dense_reference(c, r, normalize_rows, **hyper)
    for x, y in zip(got[:4], exp[:4]):
        assert _rel(x, y) <= 1e-10
    assert (got[1] >= 0.02).all() and (got[1] <= 0.11).all()


@pytest.mark.parametrize("normalize_rows", [False, True], ids=["plain", "cosine"])
def test_information_rule_equals_dense(normalize_rows):
    c = _case(6, 5, 4)
    r = torch.rand(4, 6, dtype=F64) + 0.1
    got = _run(c, r, normalize_rows, cov_update="information", process_noise=1e-3)
    exp = _dense_reference(c, r, normalize_rows, cov_update="information", process_noise=1e-3)
    for x, y in zip(got[:4], exp[:4]):
        assert _rel(x, y) <= 1e-10


@pytest.mark.parametrize("normalize_rows", [False, True], ids=["plain", "cosine"])
def test_gate_equals_dense(normalize_rows):
    c = _case(6, 5, 4)
    c["e"] = c["e"] * 20                       # far outside the model's spread
    got = _run(c, 0.05, normalize_rows, gate=0.9)
    exp = _dense_reference(c, 0.05, normalize_rows, gate=0.9)
    s = float(got[4].gate_scale)
    assert 0 < s < 1 and math.isclose(s, exp[4].gate_scale, rel_tol=1e-10)
    for x, y in zip(got[:4], exp[:4]):
        assert _rel(x, y) <= 1e-10


@pytest.mark.parametrize("normalize_rows", [False, True], ids=["plain", "cosine"])
def test_adaptive_noise_matches_the_design_formula(normalize_rows):
    k, d, b = 5, 7, 4
    c = _case(k, d, b)
    r0, beta = 0.05, 0.3
    got = _run(c, r0, normalize_rows, adaptive_rate=beta)
    jw, jb = _dense_jacobians(c["w"], c["b"], c["a"], normalize_rows)
    h = torch.cat([jw.reshape(b * k, -1), jb], 1)
    p = torch.cat([c["pw"].reshape(-1), c["pb"]])
    spread = float(((h * h) @ p).mean())
    r1 = (1 - beta) * r0 + beta * max(1e-8, float((c["e"] ** 2).mean()) - spread)
    assert math.isclose(float(got[4].obs_noise), r1, rel_tol=1e-12)
    exp = _dense_reference(c, r1, normalize_rows)
    for x, y in zip(got[:4], exp[:4]):
        assert _rel(x, y) <= 1e-10


# --------------------------------------------------------------------------------------
# float32 / half parameters
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("normalize_rows", [False, True], ids=["plain", "cosine"])
def test_float32_within_tolerance(normalize_rows):
    k, d, b = 37, 53, 9
    c = _case(k, d, b, dtype=torch.float32, cov_scale=1e-2)
    got = _run(c, 0.1, normalize_rows)
    exp = _dense_reference(c, 0.1, normalize_rows)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    # the step (new - old) within 1e-5 of the float64 one beyond the rounding of the stored
    # result (the cosine head's steps are small beside its weights)
    for new, old, ref_new in ((got[0], c["w"], exp[0]), (got[1], c["pw"], exp[1]),
                              (got[2], c["b"], exp[2]), (got[3], c["pb"], exp[3])):
        assert step_err(new, old, ref_new) <= 1e-5
        assert _rel(new, ref_new) <= 1e-5
    assert math.isclose(float(got[4].mahalanobis), exp[4].mahalanobis, rel_tol=1e-4)


def test_bfloat16_weight_with_float32_covariance():
    c = _case(8, 16, 4, dtype=torch.float32)
    c["w"] = c["w"].to(torch.bfloat16)
    c["b"] = c["b"].to(torch.bfloat16)
    got = _run(c, 0.1, False)
    exp = _dense_reference(c, 0.1, False)
    assert got[0].dtype == torch.bfloat16
    assert _rel(got[0], exp[0]) <= 1e-2 and _rel(got[1], exp[1]) <= 1e-4


# --------------------------------------------------------------------------------------
# skips: non-finite inputs and failed factorisations leave the state bit for bit
# --------------------------------------------------------------------------------------
def _bits(t):
    return t.detach().clone().view(torch.int64 if t.dtype == F64 else torch.int32)


@pytest.mark.parametrize("where", ["features-nan", "features-inf", "residual-inf",
                                   "residual-nan", "cov-nan", "noise-nan"])
@pytest.mark.parametrize("normalize_rows", [False, True], ids=["plain", "cosine"])
def test_non_finite_input_skips_bit_for_bit(where, normalize_rows):
    k, d, b = 6, 5, 4
    c = _case(k, d, b)
    w, pw, bias, pb = c["w"].clone(), c["pw"].clone(), c["b"].clone(), c["pb"].clone()
    before = [_bits(t) for t in (w, pw, bias, pb)]
    a, e, r = c["a"].clone(), c["e"].clone(), torch.full((b, k), 0.1, dtype=F64)
    j, kk_ = int(torch.randint(0, b, ())), int(torch.randint(0, k, ()))
    if where == "features-nan":
        a[j, int(torch.randint(0, d, ()))] = float("nan")
    elif where == "features-inf":
        a[j, int(torch.randint(0, d, ()))] = float("inf")
    elif where == "residual-inf":
        e[j, kk_] = -float("inf")
    elif where == "residual-nan":
        e[j, kk_] = float("nan")
    elif where == "cov-nan":
        pw[kk_, 0] = float("nan")
        before[1] = _bits(pw)
    else:
        r[j, kk_] = float("nan")
    info = class_head_update_(w, pw, bias, pb, a, e, r, normalize_rows=normalize_rows, gate=0.99)
    assert bool(info.skipped) and float(info.gate_scale) == 0.0
    for t, bits in zip((w, pw, bias, pb), before):
        assert torch.equal(_bits(t), bits)


def test_failed_factorisation_at_every_jitter_skips():
    c = _case(4, 5, 3)
    w, pw = c["w"].clone(), c["pw"].clone()
    before = [_bits(w), _bits(pw)]
    r = torch.full((4,), 0.1, dtype=F64)
    r[2] = -1e3                                   # class 2's S is negative definite
    info = class_head_update_(w, pw, None, None, c["a"], c["e"], r)
    assert bool(info.skipped) and math.isnan(float(info.class_jitter[2]))
    assert torch.equal(_bits(w), before[0]) and torch.equal(_bits(pw), before[1])


def test_jitter_ladder_is_used_per_class():
    """Class 1's S is made slightly indefinite (duplicate inputs, a tiny negative noise); the
    ladder's first rung fixes it there and leaves the other classes unjittered."""
    k, d, b = 3, 4, 3
    c = _case(k, d, b, bias=False)
    c["a"][2] = c["a"][1]                         # rows 1 and 2 equal: A P A^T is singular
    r = torch.full((b, k), 0.1, dtype=F64)
    r[:, 1] = -1e-13
    w, pw = c["w"].clone(), c["pw"].clone()
    info = class_head_update_(w, pw, None, None, c["a"], c["e"], r)
    assert not bool(info.skipped)
    jit = info.class_jitter.tolist()
    assert jit[0] == 0.0 and jit[2] == 0.0 and jit[1] in kk.reference.JITTER_LADDER
    assert torch.isfinite(w).all() and torch.isfinite(pw).all()
    # the untouched classes equal the dense update of their own blocks
    sub = {"w": c["w"][[0, 2]], "pw": c["pw"][[0, 2]], "a": c["a"], "e": c["e"][:, [0, 2]],
           "b": None, "pb": None}
    exp = _dense_reference(sub, r[:, [0, 2]], False)
    assert _rel(w[[0, 2]], exp[0]) <= 1e-10 and _rel(pw[[0, 2]], exp[1]) <= 1e-10


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


@pytest.mark.parametrize("normalize_rows", [False, True], ids=["plain", "cosine"])
def test_no_host_synchronisation_inside_the_step(normalize_rows):
    c = _case(5, 4, 3)
    # the gate's chi-square quantile is a host-side constant of (gate, B K), computed on CPU
    # scalars and cached: compute it once outside, as a warm-up step does
    kk.reference.chi2_quantile(0.99, 15)
    with _NoHostSync() as mode:
        class_head_update_(c["w"], c["pw"], c["b"], c["pb"], c["a"], c["e"], 0.1, gate=0.99,
                           adaptive_rate=0.1, normalize_rows=normalize_rows)
    assert mode.syncs == []


# --------------------------------------------------------------------------------------
# validation: errors name the argument, nothing is written
# --------------------------------------------------------------------------------------
def test_bad_inputs_raise_before_any_write():
    c = _case(4, 5, 3)
    w, pw, b, pb = c["w"].clone(), c["pw"].clone(), c["b"].clone(), c["pb"].clone()
    snap = [t.clone() for t in (w, pw, b, pb)]
    a, e = c["a"], c["e"]
    bad = [
        (dict(weight_cov=pw.float()), TypeError, "weight_cov.*float64"),
        (dict(weight_cov=pw[:, :3]), ValueError, "weight_cov has shape"),
        (dict(bias_cov=None), ValueError, "bias and bias_cov go together"),
        (dict(bias=b[:3], bias_cov=pb[:3]), ValueError, "bias must have shape"),
        (dict(features=a[:, :4]), ValueError, "features must have shape"),
        (dict(features=a.long()), TypeError, "features must be a floating-point"),
        (dict(residual=e[:, :3]), ValueError, "residual must have shape"),
        (dict(obs_noise=torch.ones(3, 3, 3, dtype=F64)), ValueError, "obs_noise must be"),
        (dict(obs_noise=-1.0), ValueError, "obs_noise must be in"),
        (dict(lr=0.0), ValueError, "lr must be in"),
        (dict(forgetting=1.5), ValueError, "forgetting"),
        (dict(gate=1.0), ValueError, "gate"),
        (dict(cov_update="exact"), ValueError, "cov_update"),
        (dict(cov_floor=1.0, cov_ceiling=0.5), ValueError, "cov_floor"),
        (dict(obs_noise=torch.ones(4, dtype=F64), adaptive_rate=0.1), ValueError,
         "adaptive_rate > 0 needs a scalar"),
        (dict(bias=w[:, 0]), ValueError, "bias shares memory with weight"),
    ]
    for override, exc, pattern in bad:
        args = dict(weight=w, weight_cov=pw, bias=b, bias_cov=pb, features=a, residual=e,
                    obs_noise=0.1)
        args.update(override)
        with pytest.raises(exc, match=pattern):
            class_head_update_(args.pop("weight"), args.pop("weight_cov"), args.pop("bias"),
                               args.pop("bias_cov"), args.pop("features"), args.pop("residual"),
                               args.pop("obs_noise"), **args)
        for t, s in zip((w, pw, b, pb), snap):
            assert torch.equal(t, s)
    with pytest.raises(ValueError, match="on meta but weight is on cpu"):
        class_head_update_(w, pw, b, pb, a.to("meta"), e, 0.1)


# --------------------------------------------------------------------------------------
# predictive variance
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("normalize_rows", [False, True], ids=["plain", "cosine"])
def test_predictive_variance_equals_dense(normalize_rows):
    c = _case(6, 5, 7)
    jw, jb = _dense_jacobians(c["w"], c["b"], c["a"], normalize_rows)
    ref = ((jw.reshape(jw.shape[0], -1) ** 2) @ c["pw"].reshape(-1) + (jb ** 2) @ c["pb"] + 0.03)
    var = class_head_predictive_variance(c["w"], c["pw"], c["pb"], c["a"], 0.03,
                                         normalize_rows=normalize_rows)
    assert var.shape == (7, 6)
    assert _rel(var.reshape(-1), ref) <= 1e-12


def test_sequential_steps_stay_equal_to_dense():
    """Several steps in a row (plain head with bias): the structured and the dense filter
    follow the same trajectory."""
    c = _case(5, 6, 3)
    w1, pw1, b1, pb1 = c["w"].clone(), c["pw"].clone(), c["b"].clone(), c["pb"].clone()
    w2, pw2, b2, pb2 = c["w"].clone(), c["pw"].clone(), c["b"].clone(), c["pb"].clone()
    for _ in range(4):
        a = torch.nn.functional.normalize(torch.randn(3, 6, dtype=F64), dim=1)
        y = torch.nn.functional.one_hot(torch.randint(0, 5, (3,)), 5).to(F64)
        class_head_update_(w1, pw1, b1, pb1, a, y - _scores(w1, b1, a, True), 0.1,
                           normalize_rows=True)
        jw, jb = _dense_jacobians(w2, b2, a, True)
        kk.ops.kalman_update_([kk.ops.DenseBlock(w2, pw2, jw), kk.ops.DenseBlock(b2, pb2, jb)],
                              (y - _scores(w2, b2, a, True)).reshape(-1), 0.1,
                              backend="reference")
    for x, y in ((w1, w2), (pw1, pw2), (b1, b2), (pb1, pb2)):
        assert _rel(x, y) <= 1e-9
