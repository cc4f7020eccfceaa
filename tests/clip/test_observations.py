"""Observation models against finite differences of the adapted model, and one KalmanNGD step
through Kronecker blocks (opt.track) against the dense update built from those differences."""
import pytest
import torch

import kalman_kernels as kk
from kalman_kernels.clip.adapters import (
    ClipAdapter,
    LinearHead,
    ProjAdapter,
    kron_factors,
    observation,
    predictive_variance,
)

K, D, W = 3, 8, 6


def _adapter(kind):
    g = torch.Generator().manual_seed(1)
    text = torch.randn(K, D, generator=g, dtype=torch.float64)
    if kind == "head":
        a = LinearHead(text)
    elif kind == "cosine-head":
        a = LinearHead(text, normalize_rows=True)
    elif kind == "clip-adapter":
        a = ClipAdapter(text, reduction=2, residual_init=0.5, seed=3)
    else:
        a = ProjAdapter(torch.randn(W, D, generator=g, dtype=torch.float64), text)
    a = a.double()
    # move away from the prior mean so that nothing is special about the point
    with torch.no_grad():
        for p in a.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return a


def _batch(kind, m=7):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(m, W if kind == "proj" else D, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 2, 0, 1, 2][:m])  # several images per class
    return x, y


def _fd_jacobian(adapter, x, y, obs, eps=1e-6):
    """Central differences of the flattened observations w.r.t. every parameter element."""
    cols = {}
    for name, p in adapter.named_parameters():
        jac = torch.zeros(observation(adapter, x, y, obs)[0].numel(), p.numel(),
                          dtype=torch.float64)
        flat = p.data.view(-1)
        for i in range(p.numel()):
            old = flat[i].item()
            flat[i] = old + eps
            up = observation(adapter, x, y, obs)[0].reshape(-1)
            flat[i] = old - eps
            dn = observation(adapter, x, y, obs)[0].reshape(-1)
            flat[i] = old
            jac[:, i] = (up - dn) / (2 * eps)
        cols[name] = jac
    return cols


@pytest.mark.parametrize("kind", ["head", "clip-adapter", "proj"])
@pytest.mark.parametrize("obs", ["logits", "paired"])
def test_observation_jacobian_matches_finite_differences(kind, obs):
    a = _adapter(kind)
    x, y = _batch(kind)
    pred, target = observation(a, x, y, obs)
    if obs == "logits":
        assert pred.shape == (7, K)
        assert torch.equal(target.sum(1), torch.ones(7, dtype=torch.float64))
        assert torch.equal(target.argmax(1), y)
        # cosine scores are bounded (the head is a cosine at its prior mean only)
        if kind != "head":
            assert pred.abs().max() <= 1 + 1e-12
    else:
        assert pred.shape == (7,) and torch.equal(target, torch.ones(7, dtype=torch.float64))
        assert torch.allclose(pred, a.scores(x)[torch.arange(7), y])
    fd = _fd_jacobian(a, x, y, obs)
    names = {id(p): n for n, p in a.named_parameters()}
    factors = kron_factors(a, x, y, obs)
    n_checked = 0
    for layer, A, Dm in factors:
        n_per = K if obs == "logits" else 1
        assert A.shape[0] == 7 and Dm.shape[:2] == (7, n_per)
        # H[(j, k), (o, i)] = D[j, k, o] A[j, i]  (Kronecker structure, docs/design.md, 2.1)
        H = torch.einsum("jko,ji->jkoi", Dm, A).reshape(7 * n_per, -1)
        ref = fd[names[id(layer.weight)]]
        assert H.shape == ref.shape
        assert torch.allclose(H, ref, atol=1e-7, rtol=1e-6), (H - ref).abs().max()
        assert ref.abs().max() > 1e-3  # the check is not vacuous
        n_checked += 1
        if layer.bias is not None:      # the bias's Jacobian is D itself
            refb = fd[names[id(layer.bias)]]
            assert torch.allclose(Dm.reshape(7 * n_per, -1), refb, atol=1e-7)
            n_checked += 1
    assert n_checked == len(fd)


@pytest.mark.parametrize("kind,obs", [("head", "logits"), ("cosine-head", "cosine-logits")])
def test_head_filter_step_equals_dense_update(kind, obs):
    """The application's class-structured head filter (HeadKalman, ops.class_head) against
    the dense float64 update built from finite differences of the adapted model's scores.
    The cosine head (rows normalised) is the cosine class-logits observation."""
    from kalman_kernels.clip.head_filter import HeadKalman
    a1, a2 = _adapter(kind), _adapter(kind)
    x, y = _batch("head")
    fd = _fd_jacobian(a2, x, y, "logits")
    pred, target = observation(a2, x, y, obs)
    residual = (target - pred).detach().reshape(-1)
    p0, r = 1e-2, 1e-2
    blocks = [kk.ops.DenseBlock(p.data, torch.full_like(p, p0), fd[n].reshape(-1, *p.shape))
              for n, p in a2.named_parameters()]
    kk.ops.kalman_update_(blocks, residual, r, backend="reference")
    filt = HeadKalman(a1, init_cov=p0, obs_noise=r)
    info = filt.step(x, y)
    assert not bool(info.skipped)
    for (n, p1), blk in zip(a1.named_parameters(), blocks):
        assert torch.allclose(p1.data, blk.param, atol=1e-10, rtol=1e-9), n
        assert torch.allclose(filt.covariance(p1), blk.cov, atol=1e-10, rtol=1e-9), n
    # and the predictive variance is the dense one at the new state
    fd2 = _fd_jacobian(a1, x, y, "logits")
    ref = sum((fd2[n] ** 2) @ filt.covariance(p).reshape(-1)
              for n, p in a1.named_parameters()) + r
    assert torch.allclose(filt.predictive_variance(x).double().reshape(-1), ref, rtol=1e-5)


@pytest.mark.parametrize("kind", ["head", "clip-adapter"])
@pytest.mark.parametrize("obs", ["logits", "paired"])
def test_tracked_kalman_step_equals_dense_update(kind, obs):
    """One KalmanNGD step with opt.track (Kronecker blocks) equals kalman_update_ with the dense
    finite-difference Jacobian (float64 reference)."""
    a1, a2 = _adapter(kind), _adapter(kind)
    x, y = _batch(kind)
    fd = _fd_jacobian(a2, x, y, obs)
    pred, target = observation(a2, x, y, obs)
    residual = (target - pred).detach().reshape(-1)
    p0, r = 1e-2, 1e-2
    blocks = [kk.ops.DenseBlock(p.data, torch.full_like(p, p0),
                                fd[n].reshape(-1, *p.shape))
              for n, p in a2.named_parameters()]
    kk.ops.kalman_update_(blocks, residual, r, backend="reference")

    opt = kk.KalmanNGD(a1.parameters(), init_cov=p0, obs_noise=r, backend="reference")
    opt.track(a1)
    opt.step(lambda: observation(a1, x, y, obs))
    for (n, p1), blk in zip(a1.named_parameters(), blocks):
        assert torch.allclose(p1.data, blk.param, atol=1e-9, rtol=1e-7), n
        assert torch.allclose(opt.covariance(p1), blk.cov, atol=1e-9, rtol=1e-7), n
    assert not torch.allclose(blocks[0].param, _adapter(kind).head.weight if kind == "head"
                              else _adapter(kind).fc1.weight)


def test_predictive_variance_matches_dense_formula():
    a = _adapter("clip-adapter")
    x, y = _batch("clip-adapter")
    fd = _fd_jacobian(a, x, y, "logits")
    g = torch.Generator().manual_seed(5)
    covs = {n: torch.rand(p.shape, generator=g, dtype=torch.float64) * 1e-2
            for n, p in a.named_parameters()}
    by_param = {id(p): covs[n] for n, p in a.named_parameters()}
    var = predictive_variance(a, x, lambda p: by_param[id(p)], obs_noise=0.05)
    ref = sum((fd[n] ** 2) @ covs[n].reshape(-1) for n in covs) + 0.05
    assert torch.allclose(var.double().reshape(-1), ref, rtol=1e-5)
