"""loss_quad_form / loss_step_ (the multi-tensor loss-observation step, docs/design.md, 2.2) on
every backend, against the float64 answer; the skip predicate ``ok``; empty lists."""
import pytest
import torch

import kalman_kernels.reference as ref
from op_checks import (
    F64,
    assert_close_scaled,
    bits,
    embedded,
    false_,
    rand_cov,
    randn,
    tol_for,
    true_,
)

# (param dtype, cov dtype) pairs the optimizer produces
DTYPE_PAIRS = [(torch.float32, torch.float32), (F64, F64), (torch.bfloat16, torch.float32),
               (torch.float16, torch.float32), (torch.float32, F64)]
# shapes of one multi-tensor call: odd sizes, one tensor crossing 65536-element chunks
SHAPES = [(1,), (7,), (1023,), (33, 131), (65536 + 4099,)]
SMALL_SHAPES = [(1,), (7,), (33, 31), (1029,)]


def _shapes(kb):
    return SHAPES if kb.fits(sum(torch.Size(s).numel() for s in SHAPES)) else SMALL_SHAPES


def _tensors(kb, pair, shapes):
    pdt, cdt = pair
    params = [randn(s, pdt) for s in shapes]
    grads = [randn(s, pdt, scale=0.1) for s in shapes]
    covs = [rand_cov(s, cdt) for s in shapes]
    return params, grads, covs


@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=lambda p: f"{p[0]}-{p[1]}")
def test_quad_form_matches_float64(kb, pair):
    _, grads, covs = _tensors(kb, pair, _shapes(kb))
    lam, q = 0.9, 0.01
    expected = sum(float((g.to(F64) ** 2 * (c.to(F64) / lam + q)).sum())
                   for g, c in zip(grads, covs))
    with kb.active() as be:
        got = be.loss_quad_form([kb.to(g) for g in grads], [kb.to(c) for c in covs], lam, q)
    assert isinstance(got, torch.Tensor) and got.dim() == 0 and got.dtype == F64
    assert got.device.type == torch.device(kb.device).type
    # a sum of positive terms: its own magnitude is the condition scale
    tol = 1e-10 if (pair == (F64, F64) and kb.exact64) else 1e-4
    assert abs(float(got) - expected) <= tol * expected, (float(got), expected)


def test_quad_form_noncontiguous_and_empty(kb):
    g = randn((300, 40), torch.float32).T
    c = rand_cov((300, 40), torch.float32).T
    expected = float((g.double() ** 2 * c.double()).sum())
    with kb.active() as be:
        got = be.loss_quad_form([kb.to(g)], [kb.to(c)], 1.0, 0.0)
        empty = be.loss_quad_form([], [], 1.0, 0.0)
    assert abs(float(got) - expected) <= 1e-4 * expected
    assert float(empty) == 0.0


def test_quad_form_overflow_is_not_finite(kb):
    """g^2 P overflowing float32 shows as a non-finite sum (the ops layer then skips), never
    as a silently wrong finite number."""
    g = torch.full((100,), 3e19, dtype=torch.float32)
    c = torch.ones(100, dtype=torch.float32)
    with kb.active() as be:
        got = float(be.loss_quad_form([kb.to(g)], [kb.to(c)], 1.0, 0.0))
    expected = 100 * 9e38
    assert not (abs(got - expected) > 1e-4 * expected and torch.isfinite(torch.tensor(got))), got


@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=lambda p: f"{p[0]}-{p[1]}")
@pytest.mark.parametrize("information", [False, True], ids=["kalman", "information"])
def test_loss_step_matches_float64(kb, pair, information):
    pdt, cdt = pair
    params0, grads, covs0 = _tensors(kb, pair, _shapes(kb))
    lam = float(torch.empty(()).uniform_(0.8, 1.0))
    q = float(torch.empty(()).uniform_(0.0, 0.01))
    coef = float(torch.empty(()).uniform_(-2.0, 2.0))
    weight = float(torch.empty(()).uniform_(0.1, 20.0))
    last = ref.cov_update(ref.predict_cov(covs0[-1].to(F64), lam, q),
                          weight * grads[-1].to(F64) ** 2, 0.0, float("inf"), information)
    floor = float(torch.quantile(last.reshape(-1)[:8192], 0.2))
    ceil = float(torch.quantile(last.reshape(-1)[:8192], 0.8))
    params, checks = zip(*[embedded(kb.to(p.clone())) for p in params0])
    covs, cchecks = zip(*[embedded(kb.to(c.clone())) for c in covs0])
    with kb.active() as be:
        be.loss_step_(list(params), [kb.to(g) for g in grads], list(covs),
                      torch.tensor(coef, dtype=F64, device=kb.device),
                      torch.tensor(weight, dtype=F64, device=kb.device), true_(kb.device),
                      lam, q, floor, ceil, information)
    for check in checks + cchecks:
        check()
    tol_p = tol_for(pdt, cdt, exact64=kb.exact64)
    tol_c = tol_for(cdt, pdt if pdt in (F64, torch.float32) else torch.float32,
                    exact64=kb.exact64)
    for i, (p0, g, c0, p, c) in enumerate(zip(params0, grads, covs0, params, covs)):
        g64 = g.to(F64)
        p_pred = ref.predict_cov(c0.to(F64), lam, q)
        exp_p = p0.to(F64) + coef * p_pred * g64
        exp_c = ref.cov_update(p_pred, weight * g64 * g64, floor, ceil, information)
        p_scale = p0.to(F64).abs() + abs(coef) * p_pred * g64.abs()
        c_scale = torch.maximum(p_pred + p_pred * p_pred * weight * g64 * g64, exp_c.abs())
        assert_close_scaled(p, exp_p, p_scale, tol_p, f"loss {kb} param[{i}] {pair}")
        assert_close_scaled(c, exp_c, c_scale, tol_c, f"loss {kb} cov[{i}] {pair}")


def test_loss_step_ok_false_leaves_state_bit_for_bit(kb):
    params0, grads, covs0 = _tensors(kb, (torch.bfloat16, torch.float32), SMALL_SHAPES)
    params = [kb.to(p.clone()) for p in params0]
    covs = [kb.to(c.clone()) for c in covs0]
    nan = torch.tensor(float("nan"), dtype=F64, device=kb.device)
    with kb.active() as be:
        be.loss_step_(params, [kb.to(g) for g in grads], covs, nan, nan, false_(kb.device),
                      0.5, 0.1, 0.3, 0.6, False)
    for p, p0, c, c0 in zip(params, params0, covs, covs0):
        assert torch.equal(bits(p.cpu()), bits(p0)), f"{kb}: param changed under ok=False"
        assert torch.equal(bits(c.cpu()), bits(c0)), f"{kb}: covariance changed under ok=False"


def test_loss_step_empty_lists(kb):
    one = torch.ones((), dtype=F64, device=kb.device)
    with kb.active() as be:
        be.loss_step_([], [], [], one, one, true_(kb.device), 1.0, 0.0, 0.0, float("inf"), False)


def _offset_copy(t: torch.Tensor, offset: int) -> torch.Tensor:
    """A contiguous copy of ``t`` starting ``offset`` elements into a larger buffer (its data
    pointer is then not 16-byte aligned for offset % 4 != 0 with 4-byte elements)."""
    buf = torch.empty(t.numel() + offset, dtype=t.dtype, device=t.device)
    view = buf[offset:].view(t.shape)
    view.copy_(t)
    return view


@pytest.mark.parametrize("pair", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                  (F64, F64)], ids=lambda p: f"{p[0]}-{p[1]}")
def test_loss_step_mixed_alignment(kb, pair):
    """Aligned, misaligned and odd-sized tensors in one call: params aligned, grads one
    element off, covs two off (vectorised kernels must take the scalar path where a tensor
    is misaligned, and handle the tails)."""
    pdt, cdt = pair
    shapes = [(4096 + 3,), (17, 5), (4,), (1,), (2 * 16384 + 1,)]
    params0, grads, covs0 = _tensors(kb, pair, shapes)
    lam, q, coef, weight = 0.95, 0.002, -0.7, 3.0
    params = [kb.to(p.clone()) for p in params0]
    gs = [_offset_copy(kb.to(g), 1) for g in grads]
    covs = [_offset_copy(kb.to(c.clone()), 2) for c in covs0]
    with kb.active() as be:
        quad = be.loss_quad_form(gs, covs, lam, q)
        be.loss_step_(params, gs, covs, torch.tensor(coef, dtype=F64, device=kb.device),
                      torch.tensor(weight, dtype=F64, device=kb.device), true_(kb.device),
                      lam, q, 0.0, float("inf"), False)
    expected_quad = sum(float((g.to(F64) ** 2 * (c.to(F64) / lam + q)).sum())
                        for g, c in zip(grads, covs0))
    assert abs(float(quad) - expected_quad) <= 1e-4 * expected_quad
    tol = tol_for(pdt, cdt, exact64=kb.exact64)
    for i, (p0, g, c0, p, c) in enumerate(zip(params0, grads, covs0, params, covs)):
        g64 = g.to(F64)
        p_pred = ref.predict_cov(c0.to(F64), lam, q)
        exp_p = p0.to(F64) + coef * p_pred * g64
        exp_c = ref.cov_update(p_pred, weight * g64 * g64, 0.0, float("inf"), False)
        assert_close_scaled(p, exp_p, p0.to(F64).abs() + abs(coef) * p_pred * g64.abs(), tol,
                            f"loss {kb} param[{i}] misaligned")
        assert_close_scaled(c, exp_c, p_pred + p_pred * p_pred * weight * g64 * g64,
                            tol_for(cdt, exact64=kb.exact64), f"loss {kb} cov[{i}] misaligned")


def test_loss_many_tensors_and_dtypes(kb):
    """More tensors than one multi-tensor launch carries (130), of mixed parameter dtypes
    in one call: the reduction and the step cover every tensor exactly once."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    shapes = [(int(torch.randint(1, 300, (), generator=gen)),) for _ in range(130)]
    params0 = [randn(s, dtypes[i % 3]) for i, s in enumerate(shapes)]
    grads = [randn(s, dtypes[i % 3], scale=0.1) for i, s in enumerate(shapes)]
    covs0 = [rand_cov(s, torch.float32) for s in shapes]
    params = [kb.to(p.clone()) for p in params0]
    covs = [kb.to(c.clone()) for c in covs0]
    with kb.active() as be:
        quad = be.loss_quad_form([kb.to(g) for g in grads], covs, 1.0, 0.0)
        be.loss_step_(params, [kb.to(g) for g in grads], covs,
                      torch.tensor(0.5, dtype=F64, device=kb.device),
                      torch.tensor(2.0, dtype=F64, device=kb.device), true_(kb.device),
                      1.0, 0.0, 0.0, float("inf"), True)
    expected_quad = sum(float((g.to(F64) ** 2 * c.to(F64)).sum()) for g, c in zip(grads, covs0))
    assert abs(float(quad) - expected_quad) <= 1e-4 * expected_quad
    for i, (p0, g, c0, p, c) in enumerate(zip(params0, grads, covs0, params, covs)):
        g64, c64 = g.to(F64), c0.to(F64)
        exp_p = p0.to(F64) + 0.5 * c64 * g64
        exp_c = ref.cov_update(c64, 2.0 * g64 * g64, 0.0, float("inf"), True)
        assert_close_scaled(p, exp_p, p0.to(F64).abs() + 0.5 * c64 * g64.abs(),
                            tol_for(p0.dtype, exact64=kb.exact64), f"loss {kb} param[{i}]")
        assert_close_scaled(c, exp_c, exp_c, 1e-5, f"loss {kb} cov[{i}]")


def test_inf_gradient_where_p_is_at_the_floor_reaches_the_quad_form(kb):
    """An Inf in g at an element whose covariance sits at a tiny floor still makes g^T P- g
    non-finite (Inf * 1e-12 = Inf; NaN * anything = NaN): the ops layer skips on it without
    reading the gradients a second time."""
    for value in (float("inf"), float("nan")):
        g = randn((4099,), torch.float32, scale=0.1)
        c = rand_cov((4099,), torch.float32)
        i = int(torch.randint(4099, ()))
        g[i] = value
        c[i] = 1e-12
        with kb.active() as be:
            got = be.loss_quad_form([kb.to(g)], [kb.to(c)], 1.0, 0.0)
        assert not bool(torch.isfinite(got.cpu())), (value, float(got))
