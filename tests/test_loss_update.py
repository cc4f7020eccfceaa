"""Loss-observation mode (docs/design.md, 2.2) against the m = 1 full-matrix oracle."""
import math

import numpy as np
import pytest
import torch

import kalman_kernels as kk
from conftest import rel_err
from kalman_kernels import ops
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


@pytest.mark.parametrize("gate", [None, 0.5])
@pytest.mark.parametrize("adaptive", [0.0, 0.3])
@pytest.mark.parametrize("rule", ["kalman", "information"])
def test_host_scalar_path_equals_device_path_bit_for_bit(monkeypatch, gate, adaptive, rule):
    """On eager CPU tensors the loss step's scalar algebra runs in Python floats (no device
    round trips to avoid there); the device-tensor path (GPUs, torch.compile, meta) must
    give the same state bit for bit, the same info, and the same skips."""
    import kalman_kernels.ops.loss_update as lu
    from kalman_kernels.ops import StepHyper

    shapes = [(17, 5), (301,)]
    params0 = [torch.randn(s) for s in shapes]
    grads = [torch.randn(s) * 0.3 for s in shapes]
    covs0 = [torch.rand(s) * 0.1 + 0.01 for s in shapes]
    hypers = [StepHyper(0.8, 0.97, 1e-3, 1e-6, 10.0, rule == "information"),
              StepHyper(0.5, 1.0, 0.0, 0.0, float("inf"), rule == "information")]
    results = []
    for on_host in (True, False):
        monkeypatch.setattr(lu, "_on_host", lambda *a, on_host=on_host: on_host)
        for loss in (2.7, float("nan"), 1e38):
            ps = [p.clone() for p in params0]
            cs = [c.clone() for c in covs0]
            info = lu.loss_observation_step_(ps, grads, cs, hypers, torch.tensor(loss), 0.05,
                                             gate=gate, adaptive_rate=adaptive)
            results.append((ps, cs, info))
    half = len(results) // 2
    for (ps_h, cs_h, i_h), (ps_d, cs_d, i_d) in zip(results[:half], results[half:]):
        for a, b in zip(ps_h + cs_h, ps_d + cs_d):
            assert torch.equal(a.view(torch.int32), b.view(torch.int32))
        assert i_h.skipped == i_d.skipped and i_h.reason == i_d.reason
        for field in ("mahalanobis", "gate_scale", "obs_noise"):
            x, y = getattr(i_h, field), getattr(i_d, field)
            assert (math.isnan(x) and math.isnan(y)) or x == y, field
        assert torch.equal(i_h.innovation_cov, i_d.innovation_cov) or (
            bool(torch.isnan(i_h.innovation_cov).all())
            and bool(torch.isnan(i_d.innovation_cov).all()))
        # the host path's report makes its tensors when read: same dtypes, shapes, values
        for field in ("mahalanobis_tensor", "gate_scale_tensor", "skipped_tensor",
                      "jitter_tensor", "obs_noise_tensor", "nonfinite_tensor",
                      "overflow_tensor", "innovation_cov"):
            x, y = getattr(i_h, field), getattr(i_d, field)
            assert (x.dtype, x.shape, x.device) == (y.dtype, y.shape, y.device), field
            assert torch.equal(x, y) or bool((x.isnan() & y.isnan()).all()), field
            assert getattr(i_h, field) is x, f"{field} is made once"
        assert (i_h.jitter, i_h.gated, i_h.num_obs) == (i_d.jitter, i_d.gated, i_d.num_obs)
        assert math.isnan(i_h.p_value) == math.isnan(i_d.p_value)
        if not i_h.skipped:
            assert i_h.p_value == i_d.p_value
    # a loss of 1e38 overflows float32 unless the gate shrinks the step or the adaptive
    # noise absorbs it (r grows by beta e^2), which keep the step finite
    assert [r[2].skipped for r in results[:half]] == [False, True,
                                                     gate is None and adaptive == 0.0], \
        [r[2].reason for r in results[:half]]


def test_concurrent_host_steps_in_threads_match_sequential_steps():
    """The eager-CPU loss step carries its scalars into the kernels in per-thread reused
    tensors: steps running at once in several threads (the kernels release the GIL) must
    give what the same steps give one after another."""
    import threading

    def problem(seed):
        gen = torch.Generator().manual_seed(seed)
        shapes = [(4001,), (37, 129)]
        return ([torch.randn(s, generator=gen) for s in shapes],
                [[torch.randn(s, generator=gen) for s in shapes] for _ in range(steps)],
                [torch.rand(s, generator=gen) * 0.1 + 1e-3 for s in shapes],
                [float(torch.randn((), generator=gen)) * 3 for _ in range(steps)])

    steps = 500

    seeds = [int(torch.randint(0, 2**31 - 1, ())) + k for k in range(4)]

    def run(seed, out):
        params, grads, covs, losses = problem(seed)
        for g, loss in zip(grads, losses):
            ops.loss_update_(params, g, covs, loss, 0.3, lr=0.7, gate=0.99)
        out[seed] = params + covs

    sequential, concurrent = {}, {}
    for seed in seeds:
        run(seed, sequential)
    threads = [threading.Thread(target=run, args=(seed, concurrent)) for seed in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for seed in seeds:
        for a, b in zip(sequential[seed], concurrent[seed]):
            assert torch.equal(a, b)


def test_host_overhead_diagnostic_runs_and_times_every_phase():
    """``python -m benchmarks.host_overhead`` (the numbers in docs/cpp_backend.md) runs,
    sees both kernels and the bookkeeping inside the step, and sums the host time."""
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "benchmarks.host_overhead", "--n", "4000",
                          "--steps", "3"], capture_output=True, text=True, cwd=root,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    for phase in ("kernel loss_quad_form start -> kernel loss_quad_form end",
                  "kernel loss_step_ start -> kernel loss_step_ end",
                  "bookkeeping start -> bookkeeping end", "0-d tensor add_(1)",
                  "non-kernel time of the step"):
        assert phase in out.stdout, (phase, out.stdout)
