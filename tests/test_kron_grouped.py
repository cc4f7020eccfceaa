"""Sample-grouped Kronecker blocks through the public step, on every backend.

A block whose output gradients are (B, K, d_out) against inputs (B, d_in) must give exactly
the step of the same Jacobian written out: the ungrouped block (each input row repeated K
times) and the dense Jacobian, in float64 to 1e-10 (and the NumPy full-matrix oracle), for
K in {1, 2, 7, 10}, B in {1, 3, 32}, odd layer sizes, a bias block, several tracked layers
sharing one S, both covariance rules, gate on; float32 within the tolerances of docs/design.md, 5.
Then through KalmanNGD.track: tracked (grouped) steps equal untracked (dense Jacobian) steps.
"""
import copy

import numpy as np
import pytest
import torch
from torch import nn

import kalman_kernels as kk
from conftest import rel_err
from kalman_kernels import ops
from op_checks import F64, kron_jacobian
from oracle_numpy import kalman_step

SHAPES = [(1, 1), (3, 2), (3, 7), (32, 10), (1, 10), (32, 1)]
LAYERS = [(5, 9), (4, 3)]            # two tracked layers (d_out, d_in) sharing one S


def _problem(b, k, dtype, device, gen):
    """Two grouped Kronecker blocks and a bias block of fresh random values (CPU copies kept
    for the oracle)."""
    r = lambda *s: torch.randn(*s, generator=gen, dtype=F64)
    u = lambda *s: 0.05 + torch.rand(*s, generator=gen, dtype=F64)
    cdt = F64 if dtype == F64 else torch.float32
    parts = []
    for d_out, d_in in LAYERS:
        parts.append(dict(kind="kron", param=r(d_out, d_in), cov=u(d_out, d_in), a=r(b, d_in),
                          d=r(b, k, d_out)))
    d_out = LAYERS[0][0]
    parts.append(dict(kind="bias", param=r(d_out), cov=u(d_out), d=parts[0]["d"]))
    res = r(b * k)
    for p in parts:
        for key in ("param", "cov", "a", "d"):
            if key in p:
                p[key + "_dev"] = p[key].to(device=device, dtype=cdt if key == "cov" else dtype)
    return parts, res.to(device)


def _blocks(parts, form):
    blocks = []
    for p in parts:
        param, cov = p["param_dev"].clone(), p["cov_dev"].clone()
        d = p["d_dev"]
        b, k, d_out = d.shape
        if p["kind"] == "bias":
            blocks.append(ops.DenseBlock(param, cov, d.reshape(b * k, d_out)))
        elif form == "grouped":
            blocks.append(ops.KronBlock(param, cov, p["a_dev"], d))
        elif form == "ungrouped":
            blocks.append(ops.KronBlock(param, cov, p["a_dev"].repeat_interleave(k, 0),
                                        d.reshape(b * k, d_out)))
        else:
            jac = kron_jacobian(p["a_dev"], d).to(device=d.device, dtype=d.dtype)
            blocks.append(ops.DenseBlock(param, cov, jac.reshape((b * k,) + tuple(param.shape))))
    return blocks


@pytest.mark.parametrize("rule", ["kalman", "information"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}K{s[1]}")
def test_grouped_equals_ungrouped_dense_and_oracle_float64(kb, shape, rule):
    b, k = shape
    kb.need_registered()
    if not kb.fits(b * b * 45 + (b * k) ** 2 * 5):
        pytest.skip("too large for the interpreter")
    gen = torch.Generator().manual_seed(int(torch.randint(1 << 30, ())))
    parts, res = _problem(b, k, F64, kb.device, gen)
    kw = dict(lr=0.9, forgetting=0.97, process_noise=1e-3, cov_floor=1e-8, gate=0.9,
              cov_update=rule, backend=kb.name)
    results = {}
    with kb.active():
        for form in ("grouped", "ungrouped", "dense"):
            blocks = _blocks(parts, form)
            info = ops.kalman_update_(blocks, res, 0.3, **kw)
            assert not info.skipped
            results[form] = ([blk.param.detach().cpu() for blk in blocks],
                             [blk.cov.detach().cpu() for blk in blocks], info)
    tol = 1e-10 if kb.exact64 else 1e-4
    # Covariances are P- - P-^2 diag(H^T S^-1 H): with m up to 320 observations of a
    # 45-parameter layer P shrinks by orders of magnitude, so they are compared on the scale
    # of the terms they are formed from (P-), not of the small result.
    p_scale = [(p["cov"] / 0.97 + 1e-3).max() for p in parts]
    for form in ("ungrouped", "dense"):
        for x, y in zip(results["grouped"][0], results[form][0]):
            assert rel_err(x, y) <= tol, form
        for x, y, scale in zip(results["grouped"][1], results[form][1], p_scale):
            assert float((x - y).abs().max()) <= tol * float(scale), form
        assert rel_err(results["grouped"][2].innovation_cov, results[form][2].innovation_cov) <= tol
    # the independent full-matrix oracle
    h = np.concatenate([kron_jacobian(p["a"], p["d"]).numpy() if p["kind"] == "kron" else
                        p["d"].reshape(b * k, -1).numpy() for p in parts], 1)
    mu = np.concatenate([p["param"].reshape(-1).numpy() for p in parts])
    cov = np.concatenate([p["cov"].reshape(-1).numpy() for p in parts])
    mu_new, p_new, s_mat, _, _ = kalman_step(mu, cov, h, res.cpu().numpy(), 0.3, lr=0.9, lam=0.97,
                                             q=1e-3, p_min=1e-8, gate=0.9, rule=rule)
    got_mu = np.concatenate([t.reshape(-1).numpy() for t in results["grouped"][0]])
    got_p = np.concatenate([t.reshape(-1).numpy() for t in results["grouped"][1]])
    assert rel_err(got_mu, mu_new) <= tol
    assert np.abs(got_p - p_new).max() <= tol * (cov / 0.97 + 1e-3).max()
    assert rel_err(results["grouped"][2].innovation_cov, s_mat) <= tol


@pytest.mark.parametrize("shape", [(3, 7), (32, 10)], ids=lambda s: f"B{s[0]}K{s[1]}")
def test_grouped_float32_within_tolerance(kb, shape):
    """float32 blocks against the float64 answer from the same (rounded) inputs, every
    element on the scale of the terms it is formed from (docs/design.md, 5): for the mean
    |mu| + P- |H|^T |c|, for the covariance P- + P-^2 (|H|^T |S^-1| |H|)_ii. With m = 320
    observations of small layers the posterior shrinks P by orders of magnitude, so a
    relative error of the small result would measure the cancellation, not the kernel."""
    b, k = shape
    kb.need_registered()
    if not kb.fits(b * b * 45 + (b * k) ** 2 * 5):
        pytest.skip("too large for the interpreter")
    gen = torch.Generator().manual_seed(int(torch.randint(1 << 30, ())))
    parts, res = _problem(b, k, torch.float32, kb.device, gen)
    with kb.active():
        blocks32 = _blocks(parts, "grouped")
        ops.kalman_update_(blocks32, res, 0.3, gate=0.9, backend=kb.name)
    for p in parts:       # the float64 answer from the same (float32-rounded) inputs
        for key in ("param", "cov", "a", "d"):
            if key in p:
                p[key + "_dev"] = p[key + "_dev"].to(F64)
    blocks64 = _blocks(parts, "grouped")
    info = ops.kalman_update_(blocks64, res.to(F64), 0.3, gate=0.9, backend="reference")
    # condition scales from the explicit Jacobian
    h = torch.cat([kron_jacobian(p["a_dev"], p["d_dev"]) if p["kind"] == "kron" else
                   p["d_dev"].reshape(b * k, -1).cpu() for p in parts], 1).abs()
    s_inv = torch.linalg.inv(info.innovation_cov.cpu())
    c = (s_inv @ res.cpu().to(F64)).abs() * info.gate_scale
    dir_abs = c @ h
    diag_abs = ((s_inv.abs() @ h) * h).sum(0)
    offset = 0
    for p, x, y in zip(parts, blocks32, blocks64):
        n = x.param.numel()
        p_pred = p["cov_dev"].cpu().reshape(-1).to(torch.float32).double()
        start = p["param_dev"].cpu().reshape(-1)
        mu_scale = start.abs() + p_pred * dir_abs[offset:offset + n]
        cov_scale = p_pred + p_pred ** 2 * diag_abs[offset:offset + n]
        offset += n
        err_mu = ((x.param.cpu().double().reshape(-1) - y.param.cpu().reshape(-1)).abs()
                  / mu_scale).max()
        err_cov = ((x.cov.cpu().double().reshape(-1) - y.cov.cpu().reshape(-1)).abs()
                   / cov_scale).max()
        assert float(err_mu) <= 1e-4 and float(err_cov) <= 1e-4, (float(err_mu), float(err_cov))


class _Net(nn.Module):
    def __init__(self, d_in=7, hidden=9, k=5):
        super().__init__()
        self.l1, self.l2 = nn.Linear(d_in, hidden), nn.Linear(hidden, hidden)
        self.l3 = nn.Linear(hidden, k)

    def forward(self, x):
        return self.l3(torch.tanh(self.l2(torch.tanh(self.l1(x)))))


@pytest.mark.parametrize("rule", ["kalman", "information"])
@pytest.mark.parametrize("batch", [1, 3, 32])
def test_tracked_steps_equal_dense_jacobian_steps(batch, rule):
    """KalmanNGD.track (three grouped Kronecker blocks + biases, softmax observations of
    K = 5 classes) equals the untracked optimizer (dense Jacobians) over three steps."""
    torch.manual_seed(int(torch.randint(1 << 30, ())))
    base = _Net().double()
    dense, kron = copy.deepcopy(base), copy.deepcopy(base)
    kw = dict(init_cov=0.05, obs_noise=0.1, forgetting=0.98, gate=0.99, cov_update=rule)
    opt_d, opt_k = kk.KalmanNGD(dense.parameters(), **kw), kk.KalmanNGD(kron.parameters(), **kw)
    opt_k.track(kron, verify="always")
    for _ in range(3):
        x = torch.randn(batch, 7, dtype=F64)
        t = torch.softmax(torch.randn(batch, 5, dtype=F64), 1)
        opt_d.step(lambda: (dense(x).softmax(1), t))
        opt_k.step(lambda: (kron(x).softmax(1), t))
        assert rel_err(opt_k.last_info.innovation_cov, opt_d.last_info.innovation_cov) <= 1e-10
    for (name, a), b in zip(dense.named_parameters(), kron.parameters()):
        assert rel_err(b, a) <= 1e-10, name
        assert rel_err(opt_k.covariance(b), opt_d.covariance(a)) <= 1e-10, name
