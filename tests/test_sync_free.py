"""The public step reads no device value on the host (docs/design.md, 4.2).

* ``torch.compile(..., fullgraph=True)`` of functions that call ``ops.kalman_update_``
  (dense and Kronecker blocks, gate on), ``ops.kalman_step_`` (adaptive noise on) and
  ``ops.loss_update_`` compiles without a graph break (fullgraph makes any break an error)
  and matches the eager result, for the reference and cpp backends; a skipped step inside a
  compiled function leaves the state unchanged.
* So do the optimizer's functional steps (``kalman_kernels.functional``) with their
  ``FilterState``: counters, adapted noise and ``last_info`` as in eager mode.
* The same steps, and ``KalmanNGD`` in both modes, run on ``meta`` tensors, where any host
  read of a tensor value raises.
"""

import pytest
import torch
from torch import nn

import kalman_kernels as kk
from kalman_kernels import ops
from kernel_backends import REQUIRE_CPP
from op_checks import bits

BACKENDS = ["reference", "cpp"]


def _need(backend):
    if not kk.backends()[backend]:
        reason = kk.backend_errors()[backend]
        if backend == "cpp" and REQUIRE_CPP:
            pytest.fail(f"cpp backend required but unavailable: {reason}")
        pytest.skip(f"{backend} unavailable: {reason}")


def _state(device="cpu", dtype=torch.float32, b=3, k=2, d_in=5, d_out=4):
    g = torch.Generator().manual_seed(int(torch.randint(1 << 30, ())))
    r = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)
    u = lambda *s: (0.05 + torch.rand(*s, generator=g)).to(device=device, dtype=torch.float32
                                                           if dtype != torch.float64 else dtype)
    return dict(w=r(d_out, d_in), wc=u(d_out, d_in), b=r(d_out), bc=u(d_out),
                a=r(b, d_in), d=r(b, k, d_out), jac=r(b * k, d_out), res=r(b * k))


def _kalman_fn(backend, adaptive):
    def fn(w, wc, b, bc, a, d, jac, res):
        blocks = [ops.KronBlock(w, wc, a, d), ops.DenseBlock(b, bc, jac)]
        if adaptive:
            info = ops.kalman_step_(blocks, [ops.StepHyper(0.8, 0.95, 1e-3, 1e-6, 10.0)] * 2,
                                    res, torch.tensor(0.2, dtype=torch.float64, device=w.device),
                                    gate=0.95, backend=backend, adaptive_rate=0.3)
        else:
            info = ops.kalman_update_(blocks, res, 0.2, lr=0.8, forgetting=0.95,
                                      process_noise=1e-3, cov_floor=1e-6, cov_ceiling=10.0,
                                      gate=0.95, backend=backend)
        return (info.innovation_cov, info.mahalanobis_tensor, info.gate_scale_tensor,
                info.skipped_tensor, info.obs_noise_tensor)
    return fn


def _loss_fn(backend):
    def fn(w, wc, b, bc, a, d, jac, res):
        loss = (res * res).sum()
        info = ops.loss_update_([w, b], [a[:1].expand_as(w).contiguous(), jac[0].contiguous()],
                                [wc, bc], loss, 0.5, lr=0.7, forgetting=0.9, gate=0.9,
                                backend=backend)
        return info.innovation_cov, info.mahalanobis_tensor, info.skipped_tensor
    return fn


def _compare(fn, state, compiler="aot_eager"):
    eager = {k: v.clone() for k, v in state.items()}
    traced = {k: v.clone() for k, v in state.items()}
    out_e = fn(**eager)
    out_c = torch.compile(fn, fullgraph=True, backend=compiler)(**traced)
    for x, y in zip(out_e, out_c):
        if x is None:
            assert y is None
            continue
        assert torch.allclose(x.double(), y.double(), rtol=1e-6, atol=1e-12, equal_nan=True)
    for key in eager:
        assert torch.allclose(eager[key], traced[key], rtol=1e-6, atol=1e-7), key
    return eager, traced


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["kalman_update_", "kalman_step_adaptive", "loss_update_"])
def test_fullgraph_compile_matches_eager(backend, kind):
    _need(backend)
    torch._dynamo.reset()
    fn = (_loss_fn(backend) if kind == "loss_update_"
          else _kalman_fn(backend, kind != "kalman_update_"))
    state = _state()
    before = {k: v.clone() for k, v in state.items()}
    eager, _ = _compare(fn, state)
    assert not torch.equal(eager["w"], before["w"]), "the step did not move the weight"


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_skip_leaves_state_bit_for_bit(backend):
    """A NaN in A inside a compiled step: ok = False reaches the kernels; nothing changes."""
    _need(backend)
    torch._dynamo.reset()
    state = _state()
    state["a"][1, 2] = float("nan")
    before = {k: v.clone() for k, v in state.items()}
    fn = torch.compile(_kalman_fn(backend, False), fullgraph=True, backend="aot_eager")
    _, _, _, skipped, _ = fn(**state)
    assert bool(skipped)
    for key in ("w", "wc", "b", "bc"):
        assert torch.equal(bits(state[key]), bits(before[key])), key


def test_inductor_compiles_the_step():
    """The default compiler (inductor) too, with the cpp backend when it is built."""
    backend = "cpp" if kk.backends()["cpp"] else "reference"
    torch._dynamo.reset()
    _compare(_kalman_fn(backend, False), _state(), compiler="inductor")


def _functional_fn(backend, mode):
    """KalmanNGD's functional step (kalman_kernels.functional) with its FilterState."""
    from kalman_kernels.functional import kalman_ngd_batch_step, kalman_ngd_loss_step
    hp = ops.StepHyper(0.8, 0.95, 1e-3, 1e-6, 10.0)

    def fn(state, w, wc, b, bc, a, d, jac, res):
        if mode == "batch":
            info = kalman_ngd_batch_step([ops.KronBlock(w, wc, a, d), ops.DenseBlock(b, bc, jac)],
                                         [hp, hp], res, 0.2, state, gate=0.95,
                                         adaptive_obs_noise=0.3, backend=backend)
        else:
            info = kalman_ngd_loss_step([w, b], [0.1 * w, jac[0].contiguous()], [wc, bc],
                                        [hp, hp], (res * res).sum(), state, obs_noise=0.5,
                                        gate=0.9, adaptive_obs_noise=0.2, backend=backend)
        return info.mahalanobis_tensor, info.skipped_tensor
    return fn


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["batch", "loss"])
def test_functional_optimizer_step_compiles_fullgraph_with_its_state(backend, mode):
    """The optimizer's functional steps compile without a graph break, state included:
    the counters, the adapted noise and last_info come out as in eager mode."""
    from kalman_kernels.functional import COUNTERS, FilterState
    _need(backend)
    torch._dynamo.reset()
    fn = _functional_fn(backend, mode)
    initial = _state()
    runs = []
    for compiled in (False, True):
        state = FilterState()
        state.reset("cpu", 0.2)
        tensors = {k: v.clone() for k, v in initial.items()}
        step = torch.compile(fn, fullgraph=True, backend="aot_eager") if compiled else fn
        for _ in range(2):
            out = step(state, **tensors)
        runs.append((out, state, tensors))
    (out_e, st_e, t_e), (out_c, st_c, t_c) = runs
    for x, y in zip(out_e, out_c):
        assert torch.allclose(x.double(), y.double(), rtol=1e-6, atol=1e-12)
    for key in COUNTERS:
        assert int(st_e.tensors[key]) == int(st_c.tensors[key]), key
    assert int(st_c.tensors["steps"]) == 2
    assert torch.allclose(st_e.tensors["obs_noise"], st_c.tensors["obs_noise"], rtol=1e-6)
    assert st_c.last_info is not None and not st_c.last_info.skipped
    for key in t_e:
        assert torch.allclose(t_e[key], t_c[key], rtol=1e-6, atol=1e-7), key


# ------------------------------------------------------------------ meta tensors
def test_functional_steps_run_on_meta_tensors():
    state = _state("meta")
    info = _kalman_fn("reference", False)(**state)
    assert info[0].device.type == "meta" and info[0].shape == (6, 6)
    _kalman_fn("reference", True)(**state)
    _loss_fn("reference")(**state)


@pytest.mark.parametrize("mode", ["batch-dense", "batch-tracked", "loss-graph", "loss-standard",
                                  "loss-hooked"])
def test_optimizer_steps_run_on_meta_tensors(mode):
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to("meta")
    opt = kk.KalmanNGD(model.parameters(), adaptive_obs_noise=0.1, gate=0.99,
                       process_noise=1e-4, backend="reference")
    x = torch.randn(8, 5, device="meta")
    y = torch.randn(8, 3, device="meta")
    if mode == "batch-tracked":
        opt.track(model, verify="never")        # verifying reads one value, on purpose
    if mode == "loss-hooked":
        opt.reduce_in_backward()

    def standard():
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        return loss

    for _ in range(2):
        if mode.startswith("batch"):
            opt.step(lambda: (model(x).softmax(1), y))
        elif mode == "loss-graph":
            opt.step(lambda: (model(x) - y).pow(2).mean())
        else:
            opt.step(standard)
    assert opt.state["filter"]["steps"].device.type == "meta"
    assert opt.last_info.skipped_tensor.device.type == "meta"
